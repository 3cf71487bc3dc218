"""The frozen-codec cache (a speed-up beside the paper): EnCodec runs once per file, crops are then cut from its stored frames.

`python extras/cache.py --data DIR [DIR ...] --out CACHE --encodec pretrained` (or train.py --cache
CACHE, which completes a cache before training) stores each file's 128-d frames (fp16) and 8 RVQ
codes (int16) as memory-mappable .npy, about 20 kB per second of audio, resumably and atomically;
`CachedCropDataset` reads random 4-s crops from it. Deviation: the paper encodes each 4-s crop; a
cached crop sees the causal encoder's state from the whole file (or 60-s chunk) before it.
"""
import contextlib
import io
import json
import os
import sys
import time
import warnings
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader

if __package__ in (None, ""):  # run as a script: the core files sit in the folder above
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import data as D
from data import AudioError, UsageError
from extras.cli import Progress, data_source, remove_temporaries
from extras.filterbank import filterbank_frames
import model as M
from model import CROP_FRAMES, HOP, SAMPLE_RATE, num_frames


class CachedCrop(NamedTuple):
    """A crop from the cache: the MAE's input frames and targets, cut from the stored arrays."""

    feats: torch.Tensor    # (T, 128) float32 codec frames (or the filterbank's), zeros where padded
    codes: torch.Tensor    # (T, Q) int64 codec targets, 0 where padded
    padding: torch.Tensor  # (T,) bool, True = padded frame
    extra: torch.Tensor    # (T,) int64 k-means targets, -1 where absent or padded


def read_manifest(cache_dir):
    """Finished files {abs audio path: {"path", "id", "samples", "frames", "stamp"}} from CACHE/manifest.jsonl.

    A line is appended only after both .npy files are complete, so a file missing here is redone;
    a line torn by a crash (or garbled: not an entry) is dropped. "stamp" is the audio file's
    size and modification time when it was encoded (older caches have none).
    """
    entries, path = {}, os.path.join(cache_dir, "manifest.jsonl")
    if os.path.exists(path):
        with open(path, errors="replace") as f:
            for line in f:
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    entry = json.loads(line)
                    entries[entry["path"]] = entry
    return entries


def stamp(path):
    """An audio file's [size, modification time in ns]: a file rewritten in place changes it."""
    info = os.stat(path)
    return [info.st_size, info.st_mtime_ns]


def changed_since(entries):
    """The paths whose audio file exists and was rewritten since it was encoded (its stamp differs)."""
    return [p for p, e in entries.items() if "stamp" in e and os.path.exists(p) and stamp(p) != e["stamp"]]


def open_cache(cache_dir, codec):
    """Create or resume a cache: check its codec, drop temporaries and torn lines, and the entries whose
    audio changed since or whose arrays are missing or damaged (each named: they are encoded again)
    -> finished entries."""
    D.make_folder(cache_dir)
    meta_path = os.path.join(cache_dir, "cache.json")
    meta = {"codec": codec.source, "sample_rate": SAMPLE_RATE, "hop": HOP}
    if not os.path.exists(meta_path):
        D.write_atomic(meta_path, lambda f: f.write(json.dumps(meta).encode()))
    built = read_meta(cache_dir)
    if built != meta:
        raise UsageError(f"{cache_dir} holds frames of codec {built.get('codec')!r}, not of --encodec "
                         f"{codec.source}: use that codec, or a new --out for this one")
    remove_temporaries(cache_dir, r"[0-9a-f]{16}\.(feats|codes)\.npy|manifest\.jsonl|cache\.json")  # ours only
    done = read_manifest(cache_dir)
    for path in changed_since(done):
        warnings.warn(f"{path}: changed since it was cached (size or time); encoding it again")
        del done[path]
    for path, entry in list(done.items()):
        wrong = damaged_arrays(cache_dir, entry)
        if wrong:
            warnings.warn(f"{path}: its cached arrays in {cache_dir} are {wrong}; encoding it again")
            del done[path]
    lines = "".join(json.dumps(e) + "\n" for e in done.values()).encode()
    D.write_atomic(os.path.join(cache_dir, "manifest.jsonl"), lambda f: f.write(lines))
    return done


def npy_bytes(shape, dtype):
    """The size of a .npy file that np.save writes for an array of this shape and dtype."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                                  "fortran_order": False, "shape": shape})
    return len(header.getvalue()) + int(np.prod(shape)) * np.dtype(dtype).itemsize


def damaged_arrays(cache_dir, entry):
    """"" if a cache entry's two arrays are there at their full size, else what is wrong. Sizes
    only (a stat each): a cache of 1.7M files is checked in seconds, not by reading them."""
    base = os.path.join(cache_dir, entry["id"])
    for name, shape, dtype in ((".feats.npy", (entry["frames"], 128), np.float16),
                               (".codes.npy", (entry["frames"], M.Codec.n_q), np.int16)):
        try:
            size = os.path.getsize(base + name)
        except OSError:
            return "missing"
        if size != npy_bytes(shape, dtype):
            return f"damaged ({entry['id']}{name}: {size} bytes, not {npy_bytes(shape, dtype)})"
    return ""


@torch.no_grad()
def encode(codec, wav):
    """Codec frames and codes of (B, n) audio pieces -> (B, T, 128) fp16, (B, T, Q) int16 (numpy)."""
    device = next(codec.parameters()).device
    feats, codes = (x.cpu() for x in codec(wav.to(device, non_blocking=True)))
    assert feats.shape[1] == codes.shape[1] == num_frames(wav.shape[1]), "codec frame count mismatch"
    peak = feats.abs().max()  # NaN if any frame is NaN
    if not peak < 6e4:  # audio within MAX_PEAK stays far below this with EnCodec
        raise AudioError(f"codec frames reach {peak:.3g}, beyond what fp16 holds (65504)")
    assert 0 <= codes.min() and codes.max() < 2 ** 15, "codes do not fit int16"
    return feats.half().numpy(), codes.short().numpy()


def encode_group(codec, pieces):
    """[(key, wav)] -> ([(key, feats, codes)], [(key, reason)] that failed): one batch, or piece by
    piece if the batch fails, so one bad file never costs the others of its batch. Pieces of
    unequal length (a file changed since the scan) also go one by one."""
    try:
        feats, codes = encode(codec, torch.stack([w for _, w in pieces]))  # (B, T, 128), (B, T, Q)
        return [(key, f, c) for (key, _), f, c in zip(pieces, feats, codes)], []
    except (AudioError, RuntimeError) as err:
        if len(pieces) > 1:
            outs = [encode_group(codec, [one]) for one in pieces]
            return [x for ok, _ in outs for x in ok], [x for _, bad in outs for x in bad]
        if not isinstance(err, AudioError):
            raise  # a single piece that breaks the codec is a bug: keep its traceback
        return [], [(pieces[0][0], str(err))]


def store_entry(cache_dir, path, n_samples, feats, codes):
    """Write one file's arrays, then commit it with a manifest line (the arrays are complete by then)."""
    key = os.path.abspath(path)
    entry = {"path": key, "id": D.file_id(key), "samples": n_samples, "frames": len(feats), "stamp": stamp(key)}
    base = os.path.join(cache_dir, entry["id"])
    D.write_atomic(base + ".feats.npy", lambda f: np.save(f, feats))  # (T, 128) fp16
    D.write_atomic(base + ".codes.npy", lambda f: np.save(f, codes))  # (T, Q) int16
    manifest = os.path.join(cache_dir, "manifest.jsonl")
    try:
        with open(manifest, "a") as f:
            f.write(json.dumps(entry) + "\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:  # a torn line is dropped when the cache is opened again
        raise UsageError(f"cannot write {manifest}: {err.strerror}; free space, then rerun: the files cached "
                         "so far are kept") from None
    return entry


def read_meta(cache_dir):
    """CACHE/cache.json (what the cache was built with), or a UsageError saying it is damaged."""
    try:
        with open(os.path.join(cache_dir, "cache.json")) as f:
            return json.load(f)
    except (OSError, ValueError) as err:
        raise UsageError(f"{cache_dir}/cache.json: unreadable ({type(err).__name__}); this is not a whole cache: "
                         "rebuild it with `python extras/cache.py` into a new --out") from None


def piece_batches(lengths, chunk, batch_samples):
    """Cut each file into chunk-long pieces and a shorter last one; batch pieces of equal length, at
    most batch_samples of audio a batch -> [[(file, start, n), ...], ...]. Files go by length, so
    equal last pieces sit side by side and a file's pieces share few batches: few files are open."""
    batches, groups = [], {"full": [], "last": []}
    for f in np.argsort(lengths, kind="stable"):
        for start in range(0, int(lengths[f]), chunk):
            piece = (int(f), start, min(chunk, int(lengths[f]) - start))
            group = groups["full" if piece[2] == chunk else "last"]
            if group and group[0][2] != piece[2]:  # no later file has a last piece this long
                batches.append(group[:])
                group.clear()
            group.append(piece)
            if len(group) * piece[2] >= batch_samples:
                batches.append(group[:])
                group.clear()
    return batches + [group for group in groups.values() if group]


class PieceReader(torch.utils.data.Dataset):
    """Batch b of a plan, read in a DataLoader worker while the codec encodes the one before ->
    (pieces, [(n,) audio or None], [(file, reason)] of the pieces that did not read)."""

    def __init__(self, files, plan):
        self.files, self.plan = files, plan

    __len__ = lambda self: len(self.plan)

    def __getitem__(self, b):
        wavs, failed = [], []
        for f, start, n in self.plan[b]:
            try:  # only this piece of the file is read and resampled, never the whole file
                wavs.append(D.read_audio(self.files.path(f), start, n, (self.files.rates[f], self.files.frames[f])))
            except AudioError as err:
                wavs.append(None)
                failed.append((f, str(err)))
        return self.plan[b], wavs, failed


def build_cache(codec, paths, cache_dir, batch_seconds=240.0, chunk_seconds=60.0, log_every=30.0, workers=0):
    """Run the frozen codec once per file; store feats (T, 128) fp16 and codes (T, Q) int16 [3.1].

    Deviation: the paper encodes each 4-s crop; a cached crop instead sees the causal encoder's
    state from the whole file (or chunk_seconds chunk) at its start (docs/SCALE.md measures it).
    Each chunk is encoded on its own, as a batch of pieces of equal length (a long file's chunks, and
    other files' equal chunks): no padding changes a frame, and a GPU gets wide batches for the
    codec's LSTM. `workers` processes read the pieces meanwhile, each only its span of the file.
    Resumable: files in the manifest are skipped. A bad file (unreadable, cut short, NaN or huge
    samples, frames beyond fp16) is skipped with one warning naming it and the reason, and never
    costs the other files of its batch. Returns (number of cached files, [(path, reason)] skipped).
    """
    done = open_cache(cache_dir, codec)
    files, skipped = D.scan_audio([p for p in paths if os.path.abspath(p) not in done])
    todo, lengths = [os.fsdecode(p) for p in files.paths], files.lengths
    chunk = HOP * max(1, round(chunk_seconds * SAMPLE_RATE / HOP))  # whole frames per chunk
    print(f"cache: {len(done)} files done, {len(todo)} to encode ({lengths.sum() / SAMPLE_RATE / 3600:.2f} h), "
          f"{len(skipped)} skipped; codec {codec.source} -> {cache_dir}", flush=True)
    plan = piece_batches(lengths, chunk, batch_seconds * SAMPLE_RATE)
    cuda = next(codec.parameters()).is_cuda
    loader = DataLoader(PieceReader(files, plan), batch_size=None, num_workers=workers, pin_memory=cuda)
    t0, n_new, parts, failed = time.time(), 0, {}, set()  # parts: file -> {start: (feats, codes)}
    progress = Progress("cache", max(1, lengths.sum()) / SAMPLE_RATE, every=log_every, unit=" s audio/s")

    def fail(f, reason):  # the first failure of a file skips it; its other pieces are dropped
        if f not in failed:
            failed.add(f)
            parts.pop(f, None)
            skipped.append((todo[f], reason))
            warnings.warn(f"skipping {reason}")
    for pieces, wavs, bad in loader:
        for f, reason in bad:
            fail(f, reason)
        ok = [(p, w) for p, w in zip(pieces, wavs) if p[0] not in failed]
        encoded, bad = encode_group(codec, ok) if ok else ([], [])
        for (f, _, _), reason in bad:
            fail(f, f"{todo[f]}: {reason}")
        for (f, start, _), feats, codes in encoded:
            if f in failed:
                continue
            parts.setdefault(f, {})[start] = feats, codes
            if len(parts[f]) == -(-int(lengths[f]) // chunk):  # every piece of the file is in: store it
                mine = parts.pop(f)
                feats, codes = (np.concatenate(a) for a in zip(*(mine[s] for s in sorted(mine))))
                done[os.path.abspath(todo[f])] = store_entry(cache_dir, todo[f], int(lengths[f]), feats, codes)
                n_new += 1
        progress.update(sum(n for _, _, n in pieces) / SAMPLE_RATE, f"{n_new}/{len(todo)} files cached")
    print(f"cache: {len(done)} files cached ({n_new} new) in {time.time() - t0:.0f} s, "
          f"{len(skipped)} skipped", flush=True)
    return len(done), skipped


class CachedCropDataset(D.Visits):
    """Random 4-s crops read at frame level from the cache (memory-mapped) -> CachedCrop.

    `paths`: the audio files to use (a list, or Files.paths as bytes), or None for every cached file.
    input_kind mel or spec [4]: the crop's feats are the filterbank of its audio, read from the file
    (the codes, the targets, still come from the cache): cheaper than the codec by 200x.
    """

    def __init__(self, cache_dir, crop_frames=CROP_FRAMES, seed=0, extra_store=None, paths=None,
                 input_kind="encodec"):
        done = read_manifest(cache_dir)
        keys = sorted(done) if paths is None else [os.path.abspath(os.fsdecode(p)) for p in paths]
        stale = changed_since({k: done[k] for k in keys if k in done})
        if stale:  # frames of the old audio: train.py --cache has re-encoded them by now
            raise UsageError(f"{stale[0]} changed since it was cached ({len(stale)} files changed): rerun "
                             f"`python extras/cache.py --data ... --out {cache_dir}` to encode them again")
        self.skipped = [(k, f"{k}: not in the cache {cache_dir}") for k in keys if k not in done]
        if self.skipped:  # one line: the build named each file it skipped, with the reason
            warnings.warn(f"{cache_dir}: {len(self.skipped)} of {len(keys)} files are not in the cache, "
                          "left out (its build skipped them, or they are new: `python extras/cache.py` "
                          "adds new files)", stacklevel=2)
        keys = [k for k in keys if k in done]
        self.store = None
        if extra_store is not None:
            kept, self.store, unlabelled = D.load_frame_store(extra_store, keys)
            keys, self.skipped = [keys[i] for i in kept], self.skipped + unlabelled
        if not keys:
            raise UsageError(f"{cache_dir}: none of the {len(self.skipped)} files asked for is usable "
                             "(run `python extras/cache.py` on them)")
        # (F,) arrays: ids as fixed-width bytes (16 hex digits), frames as int64
        self.dir, self.ids = cache_dir, np.array([done[k]["id"] for k in keys], dtype="S16")
        self.input_kind = input_kind
        self.audio = np.array([os.fsencode(k) for k in keys], dtype=bytes)  # (F,) for the filterbank
        frames = np.array([done[k]["frames"] for k in keys], dtype=np.int64)
        super().__init__(frames, crop_frames, seed)

    n_skipped = property(lambda self: len(self.skipped))

    def __getitem__(self, item):
        f, T = self.file_of(item), self.crop
        start, n = self.crop_start(item, 1), int(self.lengths[f])
        base = os.path.join(self.dir, self.ids[f].decode())
        try:
            feats = np.load(base + ".feats.npy", mmap_mode="r")  # (n, 128) fp16, nothing read yet
            codes = np.load(base + ".codes.npy", mmap_mode="r")  # (n, Q) int16
            wrong = "" if len(feats) == len(codes) == n else f"{len(feats)} and {len(codes)} frames, not {n}"
        except (OSError, ValueError) as err:  # deleted, cut short or garbled since the build
            wrong = str(err)
        if wrong:  # the cache build encodes a file again once its arrays are gone
            raise UsageError(f"{base}.feats.npy or .codes.npy is damaged ({wrong}): delete both, then run "
                             f"`python extras/cache.py --data ... --out {self.dir}` to encode that file again")
        padding = torch.arange(T) >= n - start  # (T,)
        extra = torch.full((T,), -1, dtype=torch.int64)
        if self.store is not None:
            extra = D.frame_labels(self.store[f], start, T, n)
        if self.input_kind == "encodec":
            feats = D.cut_frames(feats, start, T, 0, np.float32)  # (T, 128)
        else:  # the crop's audio (frame t of the cache is samples [320 t, 320 (t + 1)))
            wav = D.read_audio(os.fsdecode(self.audio[f]), start * HOP, T * HOP)
            wav = D.cut_frames(wav.numpy(), 0, T * HOP, 0, np.float32)  # (T * HOP,) zero-padded
            feats = filterbank_frames(wav[None], self.input_kind)[0]  # (T, bins)
        return CachedCrop(feats, D.cut_frames(codes, start, T, 0, np.int64), padding, extra)


def cached_crops(codec, paths, cfg, rank, barrier, input_kind="encodec"):
    """train.py --cache: the cache of `paths` completed by rank 0 (the others wait at barrier()) -> a function
    (files, seed, n_skipped) -> CachedCropDataset of those files, in place of data.CropDataset."""
    if rank == 0:
        build_cache(codec, paths, cfg.cache, workers=cfg.workers)
    barrier()
    store = cfg.kmeans_store or None

    def crops(files, seed, n_skipped=0):  # n_skipped: the files' scan; the cache counts what it lacks itself
        return CachedCropDataset(cfg.cache, seed=seed, extra_store=store, paths=files.paths,
                                 input_kind=input_kind)
    return crops


def main(argv=None):
    parser = D.Parser(prog="extras/cache.py", description=__doc__.splitlines()[0])
    parser.add_argument("--data", nargs="+", required=True, type=data_source, help="folders, .txt lists, or demo")
    parser.add_argument("--out", required=True, help="cache folder (a rerun completes it)")
    parser.add_argument("--encodec", default="pretrained", type=D.encodec_source, help="pretrained | random | checkpoint")
    parser.add_argument("--device", type=D.device, default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the codec runs: cpu, cuda or cuda:N")
    parser.add_argument("--batch-seconds", type=D.at_least(0.01, float), default=240.0, help="audio per codec batch")
    parser.add_argument("--chunk-seconds", type=D.at_least(0.01, float), default=60.0, help="longer files go in chunks")
    parser.add_argument("--workers", type=D.at_least(0), default=4, help="processes reading audio")
    args = parser.parse_args(argv)
    try:  # every check before the codec loads (a download, or seconds of calibration for "random")
        paths = D.list_audio(args.data, demo_dir=os.path.join(args.out, "demo_audio"))
    except (ValueError, FileNotFoundError) as err:
        raise UsageError(f"--data: {err}") from None
    D.make_folder(args.out)
    build_cache(D.load_codec(args.encodec).to(args.device), paths, args.out, args.batch_seconds, args.chunk_seconds,
                workers=args.workers)


if __name__ == "__main__":
    D.run_cli(main)
