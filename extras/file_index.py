"""The file index for the paper's scale (1.7M files): every header read once, in parallel, into one .npz.

Reading every header at every start (and on every DDP rank and resume) costs minutes at the
paper's scale, so (path, sample rate, length) is read once, in resumable shards of parallel
processes, into one file that later runs load in a second: `python extras/file_index.py --data
DIR [DIR ...] --out INDEX.npz`, then `train.py --data DIR ... --index INDEX.npz` (which also builds
it when missing, and rebuilds it when a --data source or a file in it changed since: each file's
size and modification time are stored with its header).
"""
import contextlib
import hashlib
import json
import os
import signal
import sys
import time
import warnings

import numpy as np

if __package__ in (None, ""):  # run as a script: the core files sit in the folder above
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import data as D
from data import UsageError
from extras.cli import data_source
from extras.cache import stamp
from model import SAMPLE_RATE


def source_names(sources):
    """--data entries as the index records them: absolute paths, or "demo"."""
    sources = [sources] if isinstance(sources, (str, os.PathLike)) else sources
    return [str(s) if str(s) == "demo" else os.path.abspath(s) for s in sources]


def source_stamp(source):
    """A source's modification time (a folder's changes when files are added to or removed from
    it); -1 once it is gone, so a moved source warns instead of failing."""
    return 0 if source == "demo" else os.stat(source).st_mtime_ns if os.path.exists(source) else -1


def save_files(path, files, **extra):
    """Files (and extra arrays) -> one .npz, written atomically."""
    D.write_atomic(path, lambda f: np.savez(f, paths=files.paths, rates=files.rates, frames=files.frames, **extra))


def index_shard(task):
    """Read one shard's headers and store them atomically (run in a pool worker) -> CPU seconds."""
    path, paths, cpu = task[0], task[1], time.process_time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the reasons are stored; every reader of the index names them
        files, skipped = D.scan_audio(paths)
    stamps = np.array([stamp(p) for p in files.paths], dtype=np.int64).reshape(-1, 2)  # (F, 2) size, time
    save_files(path, files, stamps=stamps, skipped=np.frombuffer(json.dumps(skipped).encode(), np.uint8))
    return time.process_time() - cpu


def build_index(sources, out, workers=None, shard_files=2000, demo_dir="demo_audio"):
    """Read every header of every source once, in parallel and resumably -> writes `out`.

    Shards of shard_files headers are written atomically to OUT.parts/ as they finish; a killed
    build rerun with the same sources keeps its finished shards. Bad files: one warning each.
    """
    names, t0 = source_names(sources), time.time()
    per_source = [D.list_audio([s], demo_dir) for s in names]
    parts = D.make_folder(out + ".parts")
    tasks = []
    for s, paths in enumerate(per_source):
        for i in range(0, len(paths), shard_files):
            chunk = paths[i: i + shard_files]  # a shard is named by its paths, so a changed source redoes it
            key = hashlib.sha1(os.fsencode("\n".join(chunk))).hexdigest()[:12]
            tasks.append((os.path.join(parts, f"{s:03d}-{i // shard_files:06d}-{key}.npz"), chunk))
    todo = [t for t in tasks if not os.path.exists(t[0])]
    n_files, n_read = sum(map(len, per_source)), sum(len(c) for _, c in todo)
    print(f"index: {n_files} files in {len(names)} sources, {len(tasks) - len(todo)} of {len(tasks)} shards "
          f"done before; reading {n_read} headers with {workers or os.cpu_count()} processes -> {out}", flush=True)
    cpu = 0.0  # CPU seconds of the readers: the rate per core, whatever else the machine runs
    if todo:
        import multiprocessing  # fork: the workers need this module, not a fresh interpreter
        with multiprocessing.get_context("fork").Pool(workers or os.cpu_count(), initializer=quiet) as pool:
            cpu = sum(pool.imap_unordered(index_shard, todo))
    files, source, bad = merge_shards(tasks, names, out)
    took = time.time() - t0
    print(f"index: {len(files.paths)} files, {len(bad)} unreadable skipped, {files.lengths.sum() / SAMPLE_RATE / 3600:.2f}"
          f" h, in {took:.1f} s ({n_files / max(took, 1e-9):.0f} files/s; {n_read / max(cpu, 1e-9):.0f} headers "
          f"per CPU-second) -> {out}", flush=True)
    for reason in bad:
        warnings.warn(f"skipping {reason}", stacklevel=2)
    return files, source, len(bad)


def quiet():
    """A pool worker leaves Ctrl-C and SIGTERM to the main process, which stops the pool (and says so once)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def merge_shards(tasks, names, out):
    """Concatenate the shards into one index file (atomically), with the reasons for the bad files."""
    shards, sources, bad, stamps = [], [], [], []
    for path, _ in tasks:
        with np.load(path) as z:
            shards.append(D.Files(z["paths"], z["rates"], z["frames"]))
            bad += [reason for _, reason in json.loads(z["skipped"].tobytes())]
            stamps.append(z["stamps"] if "stamps" in z else np.full((len(z["paths"]), 2), -1))
        sources.append(np.full(len(shards[-1].paths), int(os.path.basename(path)[:3]), np.int64))
    files = D.Files(*(np.concatenate([s[i] for s in shards]) if shards else np.zeros(0, np.int64) for i in range(3)))
    source = np.concatenate(sources) if sources else np.zeros(0, np.int64)
    meta = json.dumps({"sources": names, "stamps": [source_stamp(s) for s in names], "bad": bad}).encode()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    save_files(out, files, source=source, stamps=np.concatenate(stamps) if stamps else np.zeros((0, 2), np.int64),
               meta=np.frombuffer(meta, np.uint8))
    for path, _ in tasks:  # our shards by name, then the folder if nothing else is in it
        os.remove(path)
    with contextlib.suppress(OSError):
        os.rmdir(out + ".parts")
    return files, source, bad


def changed_files(out):
    """The files of the index at `out` rewritten since their headers were read: size or time differ."""
    with np.load(out) as z:
        paths, stamps = z["paths"], z["stamps"] if "stamps" in z else None  # an older index: no stamps
    return [] if stamps is None else [os.fsdecode(p) for p, s in zip(paths, stamps.tolist())
                                      if os.path.exists(p) and stamp(p) != s]


def read_index(out, sources):
    """The index at `out` -> (Files, the --data entry of each, unreadable count), each unreadable file
    named in a warning; it must list exactly these sources.

    Only the sources' own modification times are checked (no per-file stat, so this takes a second
    for millions of files): files added deep inside a folder need `python extras/file_index.py` again.
    """
    meta = check_index(out, sources)
    with np.load(out) as z:
        files, source = D.Files(z["paths"], z["rates"], z["frames"]), z["source"]
    for reason in meta["bad"]:  # every run names what it leaves out, as a header scan did
        warnings.warn(f"skipping {reason}", stacklevel=2)
    changed = [s for s, t in zip(meta["sources"], meta["stamps"]) if source_stamp(s) != t]
    if changed:
        warnings.warn(f"{changed} changed since the index {out} was built; added files are not used until "
                      f"`python extras/file_index.py --data {' '.join(meta['sources'])} --out {out}` rebuilds it")
    return files, source, len(meta["bad"])


def check_index(out, sources):
    """An index file that lists exactly these --data sources -> its metadata, else UsageError naming --index."""
    try:
        with np.load(out) as z:
            meta = json.loads(z["meta"].tobytes())
    except Exception as err:  # not an .npz, cut short, another kind of .npz: the file, not the code
        raise UsageError(f"--index {out}: not a file index written by `python extras/file_index.py` "
                         f"({type(err).__name__}); rebuild it with that command") from None
    if meta["sources"] != source_names(sources):
        raise UsageError(f"--index {out}: lists the sources {meta['sources']}, not {source_names(sources)}; pass "
                         f"another --index or rebuild it with `python extras/file_index.py --data ... --out {out}`")
    return meta


def ensure_index(sources, out, rank=0, barrier=lambda: None, workers=None):
    """The index at `out`, built (by rank 0; the others wait for it at barrier()) if missing or if a
    source changed since -> (Files, the --data entry of each, unreadable count)."""
    if rank == 0:
        changed = [s for s, t in zip(*(lambda m: (m["sources"], m["stamps"]))(check_index(out, sources)))
                   if source_stamp(s) != t] if os.path.exists(out) else []
        rewritten = changed_files(out) if os.path.exists(out) and not changed else []
        if rewritten:  # its old length (and rate) would be used
            warnings.warn(f"{rewritten[0]} changed since the index {out} read its header ({len(rewritten)} files "
                          "changed): reading every header again")
        if changed or rewritten or not os.path.exists(out):
            print(f"index {out}: {'missing' if not changed else f'{changed} changed since it was built'}; "
                  "building it", flush=True)
            build_index(sources, out, workers)
    barrier()
    return read_index(out, sources)


def main(argv=None):
    parser = D.Parser(prog="extras/file_index.py", description=__doc__.splitlines()[0])
    parser.add_argument("--data", nargs="+", required=True, type=data_source, help="folders, .txt lists, or demo")
    parser.add_argument("--out", required=True, help="index file (.npz)")
    parser.add_argument("--workers", type=D.at_least(1), default=os.cpu_count(), help="processes reading headers")
    parser.add_argument("--shard-files", type=D.at_least(1), default=2000, help="headers per resumable shard")
    args = parser.parse_args(argv)
    if os.path.isdir(args.out) or (os.path.exists(args.out) and not args.out.endswith(".npz")):
        raise UsageError(f"--out {args.out}: exists and is not an index file (.npz); choose another path")
    if os.path.exists(args.out):
        check_index(args.out, args.data)  # never replace a file that is not an index of these sources
        os.remove(args.out)  # asked for explicitly: a fresh index; finished shards of a killed build are kept
    print(f"index: (re)building {args.out}; train.py reads it with --index {args.out}")
    build_index(args.data, args.out, args.workers, args.shard_files)


if __name__ == "__main__":
    D.run_cli(main)
