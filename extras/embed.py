"""`python evaluate.py embed`: frame embeddings of your own audio files as .npy, a folder tree at a time.

`python evaluate.py embed --upstream ckpt.pt --out EMB [--scene] AUDIO_DIR_OR_FILE ...` writes
EMB/<path>.npy (T, D) float32 at 75 Hz (and <path>.scene.npy (D,)) for every audio file, each
through evaluate.embed_file, the function your own code calls. Resumable: EMB/embed.json names
the upstream that wrote the folder, and files already written are skipped.
"""
import json
import os
import warnings
from pathlib import Path

import numpy as np

import data as D
import evaluate as E
from data import AUDIO_EXTS, AudioError, UsageError, at_least, write_atomic
from model import SAMPLE_RATE


def embed_plan(sources, out):
    """Files and folders -> [(audio path, output path without .npy)]; a folder's tree is mirrored
    under out, a file lands at out/<name>. Names keep their extension: x.wav and x.mp3 never meet."""
    plan = []
    for src in map(Path, sources):
        if src.is_dir():
            found = sorted(p for p in src.rglob("*") if p.is_file() and p.name.lower().endswith(AUDIO_EXTS))
            if not found:
                raise UsageError(f"{src}: no audio files ({' '.join(AUDIO_EXTS)}) in this folder")
            plan += [(p, Path(out) / p.relative_to(src)) for p in found]
        elif src.is_file():
            plan.append((src, Path(out) / src.name))
        else:
            raise UsageError(f"{src}: no such file or folder")
    first = {}
    for path, dest in plan:
        if first.setdefault(dest, path) != path:
            raise UsageError(f"{path} and {first[dest]} would both write {dest}.npy: embed them separately")
    return plan


def check_embed_out(args):
    """--out remembers which upstream wrote it: a rerun resumes, another upstream needs another --out."""
    spec = args.upstream
    meta = dict(upstream=spec, layer=args.layer, encodec=args.encodec, scene_pooling="real-frames",
                seed=args.seed if spec.startswith("ECMAE-R:") else None,
                checkpoint=[os.path.getsize(spec), int(os.path.getmtime(spec))] if os.path.isfile(spec) else None)
    path = Path(args.out, "embed.json")
    if path.exists() and json.loads(path.read_text()) != meta:
        raise UsageError(f"--out {args.out}: holds embeddings of another upstream or setting ({path}); "
                         "choose a new --out")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda f: f.write(json.dumps(meta).encode()))


def embed_files(upstream, todo, lengths, scene, log_every=5.0):
    """Embed [(path, dest)] into dest.npy (and dest.scene.npy), a progress line every log_every
    seconds paced by lengths (24-kHz samples) -> [(path, reason)] of the files skipped."""
    skipped, total, done_s = [], lengths.sum() / SAMPLE_RATE, 0.0
    progress = D.Progress("embed", total, every=log_every, unit="x real time")
    for k, (path, dest) in enumerate(todo):
        try:
            frames = E.embed_file(upstream, path)  # (T, D)
        except AudioError as err:
            skipped.append((path, str(err)))
            warnings.warn(f"skipping {err}")
        else:
            dest.parent.mkdir(parents=True, exist_ok=True)
            if scene:  # the mean of the frames centred inside the audio, as the HEAR scene embedding
                pooled = frames[:E.real_frames(lengths[k])].mean(0)  # (D,)
                write_atomic(f"{dest}.scene.npy", lambda f: np.save(f, pooled.numpy()))
            write_atomic(f"{dest}.npy", lambda f: np.save(f, frames.numpy()))  # last: marks the file done
        done_s += lengths[k] / SAMPLE_RATE
        progress.update(lengths[k] / SAMPLE_RATE, f"{k + 1}/{len(todo)} files, {done_s:.1f}/{total:.1f} s of audio")
    return skipped


def embed_main(argv):
    p = D.Parser(prog="evaluate.py embed", description=(
        "Frame embeddings (T, D) float32 at 75 Hz of every audio file given or found under the folders "
        "given, as OUT/<path>.npy mirroring the folders (OUT/x.wav.npy for a file given by itself). "
        "Resumable: files already written are skipped."))
    p.add_argument("sources", nargs="+", metavar="FILE_OR_FOLDER", help="audio files and folders (recursive)")
    p.add_argument("--upstream", required=True, help="EC, ECMAE-R:<size> or a train.py checkpoint")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--scene", action="store_true",
                   help="also write <path>.scene.npy (D,): the mean of the frames centred inside the audio")
    E.upstream_args(p)
    p.add_argument("--log-every", type=at_least(0.0, float), default=5.0, help="seconds between progress lines")
    args = p.parse_args(argv)
    E.check_upstream(args.upstream, args.layer)
    plan = embed_plan(args.sources, args.out)
    check_embed_out(args)
    finished = lambda dest: os.path.exists(f"{dest}.npy") and (not args.scene or os.path.exists(f"{dest}.scene.npy"))
    todo = [(path, dest) for path, dest in plan if not finished(dest)]
    print(f"embed: {len(plan)} files, {len(plan) - len(todo)} already done; {args.upstream} -> {args.out}",
          flush=True)
    files, skipped = D.scan_audio([path for path, _ in todo])  # bad headers: warned here
    bad = {str(p) for p, _ in skipped}
    readable = [(path, dest) for path, dest in todo if str(path) not in bad]
    if readable:  # the model loads only when there is something to embed
        upstream = E.open_upstream(args.upstream, args)
        skipped += embed_files(upstream, readable, files.lengths, args.scene, args.log_every)
    print(f"embed: {len(todo) - len(skipped)} files written, {len(plan) - len(todo)} were done, "
          f"{len(skipped)} skipped (named above)", flush=True)
    return skipped
