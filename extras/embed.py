"""`python evaluate.py embed`: frame embeddings of your audio as .npy files, a folder tree at a time (a tool beside 3.2).

`python evaluate.py embed --upstream ckpt.pt --out EMB [--scene] AUDIO_DIR_OR_FILE ...` writes EMB/<path>.npy
(T, D) float32 at 75 Hz (and <path>.scene.npy (D,)) for every audio file, each through evaluate.embed_pieces,
what evaluate.embed_file, the function for your own code, runs: a long file is read, embedded and written a
minute at a time, with a progress line per piece. Resumable: EMB/embed.json names the upstream that wrote the
folder, and files already written are skipped.
"""
import json
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):  # run as a script: the core files sit in the folder above
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import data as D
from data import AudioError, UsageError, at_least, write_atomic
import evaluate as E
from evaluate import check_upstream, embed_pieces, open_upstream, pooled, upstream_args
from model import SAMPLE_RATE, num_frames


def embed_plan(sources, out):
    """Files and folders -> [(audio path, output path without .npy)]: a folder's tree is mirrored under
    out, a file lands at out/<name>. Names keep their extension, so x.wav and x.mp3 never meet."""
    plan = []
    for src in map(Path, sources):
        if not (src.is_dir() or src.is_file()):
            raise UsageError(f"{src}: no such file or folder")
        try:  # a folder is walked as for training: one it cannot read is named in a warning
            found = [Path(p) for p in D.list_audio([os.path.abspath(src)])] if src.is_dir() else []
        except ValueError:
            raise UsageError(f"{src}: no audio files ({' '.join(D.AUDIO_EXTS)}) in this folder") from None
        plan += [(p, Path(out) / p.relative_to(src.absolute())) for p in found] if src.is_dir() else [
            (src, Path(out) / src.name)]
    first = {}
    for path, dest in plan:
        if first.setdefault(dest, path) != path:
            raise UsageError(f"{path} and {first[dest]} would both write {dest}.npy: embed them separately")
    return plan


def embed_main(argv):
    p = D.Parser(prog="evaluate.py embed", description="Frame embeddings (T, D) float32 at 75 Hz of every audio "
                 "file given or found under the folders given, as OUT/<path>.npy mirroring the folders "
                 "(OUT/x.wav.npy for a file given alone). Resumable: files already written are skipped.")
    p.add_argument("sources", nargs="+", metavar="FILE_OR_FOLDER", help="audio files and folders (recursive)")
    p.add_argument("--upstream", required=True, help="EC, ECMAE-R:<size>, a train.py checkpoint or released:FILE")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--scene", action="store_true", help="also <path>.scene.npy (D,): the scene embedding [3.2]")
    upstream_args(p)
    p.add_argument("--log-every", type=at_least(0.0, float), default=5.0, help="seconds between progress lines")
    args = p.parse_args(argv)
    check_upstream(args.upstream, args.layer)
    plan, file = embed_plan(args.sources, args.out), args.upstream.removeprefix("released:")
    # --out remembers which upstream wrote it: a rerun resumes, another upstream needs another --out
    meta = json.dumps(dict(upstream=args.upstream, layer=args.layer, encodec=args.encodec, scene_pooling="real-frames",
                           seed=args.seed if args.upstream.startswith("ECMAE-R:") else None, checkpoint=[
                               os.path.getsize(file), int(os.path.getmtime(file))] if os.path.isfile(file) else None))
    meta_path = Path(D.make_folder(args.out), "embed.json")
    if meta_path.exists() and meta_path.read_text(errors="replace") != meta:
        raise UsageError(f"--out {args.out}: holds embeddings of another upstream or setting ({meta_path}); "
                         "choose a new --out")
    write_atomic(meta_path, lambda f: f.write(meta.encode()))
    done = lambda dest: os.path.exists(f"{dest}.npy") and (not args.scene or os.path.exists(f"{dest}.scene.npy"))
    todo = [(path, dest) for path, dest in plan if not done(dest)]
    print(f"embed: {len(plan)} files, {len(plan) - len(todo)} already done; {args.upstream} -> {args.out}", flush=True)
    files, skipped = D.scan_audio([path for path, _ in todo])  # bad headers: warned here
    n_todo, todo = len(todo), [(path, dest) for path, dest in todo if str(path) not in {str(p) for p, _ in skipped}]
    upstream = open_upstream(args.upstream, args) if todo else None  # the model loads only when needed
    progress = D.Progress("embed", files.lengths.sum() / SAMPLE_RATE, every=args.log_every, unit="x real time")
    for k, ((path, dest), n) in enumerate(zip(todo, files.lengths.tolist())):
        step = lambda seconds: progress.update(seconds, f"{k + 1}/{len(todo)} files")  # a line per piece
        try:
            D.make_folder(dest.parent)
            write_atomic(f"{dest}.npy", lambda f: write_frames(f, upstream, path, n, step))
            if args.scene:  # pooled from the file just written, memory-mapped: read through, not copied
                frames = torch.from_numpy(np.load(f"{dest}.npy", mmap_mode="c"))[None]  # (1, T, D)
                write_atomic(f"{dest}.scene.npy", lambda f: np.save(f, pooled(upstream, frames, n)[0].numpy()))
        except AudioError as err:
            skipped.append((path, str(err)))
            warnings.warn(f"skipping {err}")
    print(f"embed: {n_todo - len(skipped)} files written, {len(plan) - n_todo} were done, "
          f"{len(skipped)} skipped (named above)", flush=True)
    return skipped


def write_frames(f, upstream, path, n, done):
    """A file's frames (T, D) float32 into an open .npy piece by piece, so memory holds a piece, not the
    file; done(seconds of audio) after each piece (a long file's progress)."""
    header = lambda T: np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False,
                                                                "shape": (T, upstream.timestamp_embedding_size)})
    header(num_frames(n))  # T as far as known; written again at the end (its length, 128 bytes, stays)
    start, seen = f.tell(), 0
    for k, piece in enumerate(embed_pieces(upstream, path)):  # (T_piece, D)
        f.write(np.ascontiguousarray(piece.numpy(), "<f4").tobytes())
        seen += len(piece)
        done(min(E.EMBED_SEGMENT, n - k * E.EMBED_SEGMENT) / SAMPLE_RATE)
    f.seek(0)
    header(seen)
    assert f.tell() == start, "the .npy header changed its length"


if __name__ == "__main__":  # the same as `python evaluate.py embed ...`
    D.run_cli(embed_main)
