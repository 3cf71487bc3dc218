"""The frozen-codec cache (a speed-up beside the paper): EnCodec runs once per file, crops are then cut from its stored frames.

`python extras/cache.py --data DIR [DIR ...] --out CACHE --encodec pretrained` (or train.py --cache
CACHE, which completes a cache before training) stores each file's 128-d frames (fp16) and 8 RVQ
codes (int16) as memory-mappable .npy, about 20 kB per second of audio, resumably and atomically;
`CachedCropDataset` reads random 4-s crops from it. Deviation: the paper encodes each 4-s crop; a
cached crop sees the causal encoder's state from the whole file (or 60-s chunk) before it.
"""
import contextlib
import itertools
import json
import os
import sys
import time
import warnings
from typing import NamedTuple

import numpy as np
import torch

if __package__ in (None, ""):  # run as a script: the core files sit in the folder above
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import data as D
from data import AudioError, UsageError
from model import CROP_FRAMES, HOP, SAMPLE_RATE, num_frames


class CachedCrop(NamedTuple):
    feats: torch.Tensor    # (T, 128) float32 codec frames, zeros where padded
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
    audio changed since or whose arrays are missing (each named: they are encoded again) -> finished entries."""
    D.make_folder(cache_dir)
    meta_path = os.path.join(cache_dir, "cache.json")
    meta = {"codec": codec.source, "sample_rate": SAMPLE_RATE, "hop": HOP}
    if not os.path.exists(meta_path):
        D.write_atomic(meta_path, lambda f: f.write(json.dumps(meta).encode()))
    if read_meta(cache_dir) != meta:
        raise ValueError(f"{cache_dir} was built with another codec ({meta_path}): use a new --out")
    D.remove_temporaries(cache_dir, r"[0-9a-f]{16}\.(feats|codes)\.npy|manifest\.jsonl|cache\.json")  # ours only
    done, names = read_manifest(cache_dir), set(os.listdir(cache_dir))
    for path in changed_since(done):
        warnings.warn(f"{path}: changed since it was cached (size or time); encoding it again")
        del done[path]
    for path in [p for p, e in done.items() if not {e["id"] + ".feats.npy", e["id"] + ".codes.npy"} <= names]:
        warnings.warn(f"{path}: its cached arrays in {cache_dir} are missing; encoding it again")
        del done[path]
    lines = "".join(json.dumps(e) + "\n" for e in done.values()).encode()
    D.write_atomic(os.path.join(cache_dir, "manifest.jsonl"), lambda f: f.write(lines))
    return done


@torch.no_grad()
def encode(codec, wav, chunk_samples):
    """Codec frames and codes of (B, n) audio, chunk by chunk -> (B, T, 128) fp16, (B, T, Q) int16."""
    device = next(codec.parameters()).device
    outs = [codec(chunk.to(device)) for chunk in wav.split(chunk_samples, dim=1)]
    feats, codes = torch.cat([o[0] for o in outs], 1).cpu(), torch.cat([o[1] for o in outs], 1).cpu()
    assert feats.shape[1] == codes.shape[1] == num_frames(wav.shape[1]), "codec frame count mismatch"
    peak = feats.abs().max()  # NaN if any frame is NaN
    if not peak < 6e4:  # audio within MAX_PEAK stays far below this with EnCodec
        raise AudioError(f"codec frames reach {peak:.3g}, beyond what fp16 holds (65504)")
    assert 0 <= codes.min() and codes.max() < 2 ** 15, "codes do not fit int16"
    return feats.half().numpy(), codes.short().numpy()


def encode_group(codec, wavs, chunk_samples, skipped):
    """[(path, wav)] -> [(path, wav, feats, codes)]: one batch, or file by file if the batch fails.

    A file's own failure (AudioError) skips it with one warning; so one bad file never costs the
    others of its batch. Files of unequal length (changed since the scan) also go one by one.
    """
    try:
        wav = torch.stack([w for _, w in wavs])  # (B, n)
        feats, codes = encode(codec, wav, chunk_samples)  # (B, T, 128), (B, T, Q)
        return [(path, wav, f, c) for (path, wav), f, c in zip(wavs, feats, codes)]
    except (AudioError, RuntimeError) as err:
        if len(wavs) > 1:
            return [out for one in wavs for out in encode_group(codec, [one], chunk_samples, skipped)]
        if not isinstance(err, AudioError):
            raise  # a single file that breaks the codec is a bug: keep its traceback
        skipped.append((wavs[0][0], f"{wavs[0][0]}: {err}"))
        warnings.warn(f"skipping {skipped[-1][1]}")
        return []


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


def read_group(paths, skipped):
    """[(path, wav)] for the files that read; the others are warned about and added to `skipped`."""
    wavs = []
    for path in paths:
        try:
            wavs.append((path, D.read_audio(path)))
        except AudioError as err:
            skipped.append((path, str(err)))
            warnings.warn(f"skipping {err}")
    return wavs


def build_cache(codec, paths, cache_dir, batch_seconds=240.0, chunk_seconds=60.0, log_every=30.0):
    """Run the frozen codec once per file; store feats (T, 128) fp16 and codes (T, Q) int16 [3.1].

    Deviation: the paper encodes each 4-s crop; a cached crop instead sees the causal encoder's
    state from the whole file (or chunk_seconds chunk) at its start (docs/SCALE.md measures it).
    Resumable: files in the manifest are skipped. Only files of equal length share a batch, so
    no padding changes a frame. A bad file (unreadable, cut short, NaN or huge samples, frames
    beyond fp16) is skipped with one warning naming it and the reason, and never costs the other
    files of its batch. Returns (number of cached files, [(path, reason)] skipped).
    """
    done = open_cache(cache_dir, codec)
    files, skipped = D.scan_audio([p for p in paths if os.path.abspath(p) not in done])
    todo, lengths = [os.fsdecode(p) for p in files.paths], files.lengths
    chunk = HOP * max(1, round(chunk_seconds * SAMPLE_RATE / HOP))  # whole frames per chunk
    hours = lengths.sum() / SAMPLE_RATE / 3600
    print(f"cache: {len(done)} files done, {len(todo)} to encode ({hours:.2f} h), {len(skipped)} skipped;"
          f" codec {codec.source} -> {cache_dir}", flush=True)
    t0, n_new, progress = time.time(), 0, D.Progress("cache", max(1, len(todo)), every=log_every)
    for n, same in itertools.groupby(sorted(zip(lengths.tolist(), todo)), key=lambda x: x[0]):
        same, per = [p for _, p in same], max(1, int(batch_seconds * SAMPLE_RATE) // n)
        for group in (same[i: i + per] for i in range(0, len(same), per)):  # equal lengths: no padding
            wavs = read_group(group, skipped)
            encoded = encode_group(codec, wavs, chunk, skipped) if wavs else []
            for path, wav, f, c in encoded:
                done[os.path.abspath(path)] = store_entry(cache_dir, path, len(wav), f, c)
            n_new += len(encoded)
            progress.update(len(group), f"{n_new}/{len(todo)} files cached")
    print(f"cache: {len(done)} files cached ({n_new} new) in {time.time() - t0:.0f} s, "
          f"{len(skipped)} skipped", flush=True)
    return len(done), skipped


class CachedCropDataset(D.Visits):
    """Random 4-s crops read at frame level from the cache (memory-mapped) -> CachedCrop.

    `paths`: the audio files to use (a list, or Files.paths as bytes), or None for every cached file.
    """

    def __init__(self, cache_dir, crop_frames=CROP_FRAMES, seed=0, extra_store=None, paths=None):
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
            raise ValueError(f"{cache_dir}: none of the {len(self.skipped)} files asked for is usable "
                             "(run `python extras/cache.py` on them)")
        # (F,) arrays: ids as fixed-width bytes (16 hex digits), frames as int64
        self.dir, self.ids = cache_dir, np.array([done[k]["id"] for k in keys], dtype="S16")
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
        return CachedCrop(D.cut_frames(feats, start, T, 0, np.float32),  # (T, 128)
                          D.cut_frames(codes, start, T, 0, np.int64), padding, extra)  # (T, Q)


def main(argv=None):
    parser = D.Parser(prog="extras/cache.py", description=__doc__.splitlines()[0])
    parser.add_argument("--data", nargs="+", required=True, type=D.data_source, help="folders, .txt lists, or demo")
    parser.add_argument("--out", required=True, help="cache folder (a rerun completes it)")
    parser.add_argument("--encodec", default="pretrained", type=D.encodec_source, help="pretrained | random | checkpoint")
    parser.add_argument("--device", type=D.device, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-seconds", type=D.at_least(0.01, float), default=240.0, help="audio per codec batch")
    parser.add_argument("--chunk-seconds", type=D.at_least(0.01, float), default=60.0, help="longer files go in chunks")
    args = parser.parse_args(argv)
    try:  # every check before the codec loads (a download, or seconds of calibration for "random")
        paths = D.list_audio(args.data, demo_dir=os.path.join(args.out, "demo_audio"))
    except (ValueError, FileNotFoundError) as err:
        raise UsageError(f"--data: {err}") from None
    D.make_folder(args.out)
    build_cache(D.load_codec(args.encodec).to(args.device), paths, args.out, args.batch_seconds, args.chunk_seconds)


if __name__ == "__main__":
    D.run_cli(main)
