"""Data for EnCodecMAE [3.1]: audio -> mono 24 kHz -> random 4-s crops; the codec; a codec cache.

`python data.py cache --data DIR [DIR ...] --out CACHE --encodec pretrained` runs the frozen codec
once per file and stores its 128-d frames (fp16) and 8 RVQ codes (int16) as memory-mappable .npy.
Reads whatever libsndfile reads (wav, flac, ogg, mp3); `--data demo` writes and reads the
synthetic demo set of demo.py. `load_codec` gives the frozen EnCodec (pretrained, a local file, or
seeded random). Crops carry `padding`: True where a frame is not real audio.
`python data.py index --data DIR [DIR ...] --out INDEX.npz` reads every header once (train.py does
it when the index is missing); `python data.py bench` prints a loader worker's crops/s by format.
"""
import argparse
import functools
import hashlib
import itertools
import json
import math
import os
import shutil
import sys
import time
import warnings
from typing import NamedTuple

import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

import model
from demo import APT, build_real_demo, demo_clips, make_demo_tasks, missing_sources, write_demo_dataset
from model import CROP_FRAMES, CROP_SAMPLES, HOP, SAMPLE_RATE, num_frames

AUDIO_EXTS = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff")
MIN_RATE, MAX_RATE = 1000, 384000  # outside this range a header is broken, not exotic
# Audio is in [-1, 1]; float files may overshoot a little, but 60 dB beyond full scale is a broken
# file (or integer PCM stored as float), and its codec frames would overflow the cache's fp16.
MAX_PEAK = 1e3


# ---------------------------------------------------------------- a user's mistakes
class UsageError(Exception):
    """A user's mistake (a bad flag, a missing file): the CLIs print it as one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    """argparse whose errors are UsageErrors: one line, not a usage block."""

    def error(self, message):
        raise UsageError(message)


def run_cli(main, argv=None):
    """Run a command-line main: a UsageError becomes one line on stderr and exit status 2,
    before any expensive setup when main validates first; bugs keep their traceback."""
    try:
        return main(argv)
    except UsageError as err:
        print(f"{os.path.basename(sys.argv[0])}: error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def check_range(flag, value, low, high=None):
    """A number in [low, high] (no upper bound when high is None), else UsageError naming the flag."""
    if not (low <= value and (high is None or value <= high)):  # NaN fails too
        raise UsageError(f"{flag} {value}: must be " + (f"{low}..{high}" if high is not None else f">= {low}"))
    return value


def check_encodec(source, flag="--encodec"):
    """pretrained, random or an existing EnCodec checkpoint file, else UsageError (before any download)."""
    if source not in ("pretrained", "random") and not os.path.isfile(source):
        raise UsageError(f"{flag} {source}: use pretrained, random or the path of an encodec_24khz-*.th file")


def check_data_source(src, flag="--data"):
    """"demo", a .txt list, or a folder holding at least one audio file (found without listing it all)."""
    if src == "demo" or (src.endswith(".txt") and os.path.isfile(src)):
        return
    if not os.path.isdir(src):
        raise UsageError(f"{flag} {src}: no such folder or .txt list (or use demo)")
    for _, _, names in os.walk(src):
        if any(name.lower().endswith(AUDIO_EXTS) for name in names):
            return
    raise UsageError(f"{flag} {src}: the folder holds no audio files ({', '.join(AUDIO_EXTS)})")


def check_device(name):
    """A --device this machine has, else UsageError: one line instead of torch's error mid-run."""
    try:
        device = torch.device(name)
    except RuntimeError:
        device = torch.device("meta")  # not a device name: refused below
    have = {"cpu": True, "cuda": (device.index or 0) < torch.cuda.device_count(),
            "mps": torch.backends.mps.is_available()}
    if not have.get(device.type, False):
        raise UsageError(f"--device {name}: not a device here; use cpu"
                         + (", cuda or cuda:N" if torch.cuda.is_available() else ""))
    return device


class Progress:
    """One progress line at most every `every` seconds, and at the end: the share done, the speed
    (when `unit` names it) and an ETA. Work found already done (a resume) counts as done but not
    in the speed. The cache build, kmeans.py and evaluate.py embed all report this way."""

    def __init__(self, stage, total, every=10.0, unit=None):
        self.stage, self.total, self.every, self.unit, self.done, self.resumed = stage, total, every, unit, 0, 0
        self.t0 = self.last = time.time()

    def update(self, amount, detail, resumed=False):
        self.done += amount
        self.resumed += amount if resumed else 0  # instant work would inflate the speed
        now = time.time()
        if now - self.last < self.every and self.done < self.total:
            return
        self.last, elapsed = now, now - self.t0
        speed = (self.done - self.resumed) / max(elapsed, 1e-9)
        eta = (self.total - self.done) / max(speed, 1e-9)
        rate = f", {speed:.1f}{self.unit}" if self.unit else ""
        print(f"{self.stage}: {detail}, {self.done / max(self.total, 1e-9):.1%} in {elapsed:.0f} s{rate}, "
              f"ETA {eta:.0f} s", flush=True)


# ---------------------------------------------------------------- reading audio [3.1]
class AudioError(Exception):
    """A file that cannot be training audio; the message names the file and what is wrong."""


def resampled_length(n_src, rate):
    """Samples at 24 kHz for n_src samples at `rate`: an exact integer ceil, never float rounding."""
    return -(-n_src * SAMPLE_RATE // rate)


def read_header(path):
    """(sample rate, samples) from the header, with its last sample read back; bad files -> AudioError.

    Reading the last sample catches a file cut short (a download or copy that stopped) whose
    header still promises the full length, at the cost of one seek (0.1 ms). Not for mp3: there a
    seek parses every frame header up to it (50-70 ms for 10 min), so read_audio catches the
    short read instead: the cache build at once, training when a crop reaches the missing end.
    """
    if os.path.isdir(path):
        raise AudioError(f"{path}: a folder, not an audio file")
    if not os.path.isfile(path):
        raise AudioError(f"{path}: no such file")
    if os.path.getsize(path) == 0:
        raise AudioError(f"{path}: empty file (0 bytes)")
    try:
        f = sf.SoundFile(str(path))
    except (RuntimeError, OSError) as err:  # libsndfile's text can mislead ("not a regular file")
        raise AudioError(f"{path}: not an audio file libsndfile can decode (unknown format or "
                         f"corrupt header)") from err
    with f:
        rate, n_src = f.samplerate, f.frames
        if not MIN_RATE <= rate <= MAX_RATE:
            raise AudioError(f"{path}: absurd sample rate {rate} Hz (allowed {MIN_RATE}..{MAX_RATE})")
        if n_src <= 0:
            raise AudioError(f"{path}: empty file (zero samples)")
        try:
            f.seek(n_src - 1 if f.format != "MP3" else 0)
            last = len(f.read(1, dtype="float32"))
        except (RuntimeError, OSError):
            last = 0
    if last != 1:
        raise AudioError(f"{path}: truncated or corrupt: its header promises {n_src} samples, "
                         "the last cannot be read")
    return rate, n_src


def probe_audio(path):
    """Length in 24-kHz samples from the header alone (cheap), or AudioError."""
    rate, n_src = read_header(path)
    return resampled_length(n_src, rate)


def source_span(start, stop, rate, n_src):
    """Source samples [s0, s1) covering 24-kHz samples [start, stop), and start's offset in them."""
    g = math.gcd(rate, SAMPLE_RATE)
    o, q = rate // g, SAMPLE_RATE // g  # o source samples <-> q output samples
    # Segments start on a multiple of o, so the polyphase filter keeps its phase, with margins
    # wider than torchaudio's sinc filter and than an mp3 decoder's warm-up after a seek (2304
    # samples): the crop then equals that part of the whole file, read and resampled.
    m = math.ceil((6 * o / (0.99 * min(o, q)) + 2 + 2304) / o)
    p0 = max(0, start // q - m)
    return p0 * o, min(n_src, (stop // q + 1 + m) * o), start - p0 * q


class Resampler(NamedTuple):
    kernel: torch.Tensor  # (m * q, 1, W) windowed-sinc filters, one per output phase
    width: int            # left context in source samples
    stride: int           # m * o source samples per step of the convolution


@functools.lru_cache(maxsize=None)
def resampler(rate):
    """torchaudio's windowed-sinc resampler from `rate` to 24 kHz, its kernel computed once per rate
    (torchaudio.functional.resample recomputes it on every call, which costs as much as applying it).

    torchaudio maps o source samples to q outputs with q filters; we stack m shifted copies so
    one convolution step makes at least 16 outputs (48 -> 24 kHz has q = 1, and a one-filter
    convolution runs 3x slower per output). Same filters, same sums: the output is unchanged.
    """
    import torchaudio.transforms as AT  # lazy: torchaudio is heavy and only needed off 24 kHz
    r, g = AT.Resample(rate, SAMPLE_RATE), math.gcd(rate, SAMPLE_RATE)
    o, q, W = rate // g, SAMPLE_RATE // g, r.kernel.shape[-1]
    m = math.ceil(16 / q)
    kernel = torch.zeros(m * q, 1, W + (m - 1) * o)
    for j in range(m):  # step j of the m: its q filters start j * o source samples later
        kernel[j * q: (j + 1) * q, :, j * o: j * o + W] = r.kernel
    return Resampler(kernel, r.width, m * o)


def resample_24k(x, rate):
    """(..., n) at `rate` -> (..., resampled_length(n, rate)) at 24 kHz with torchaudio's sinc filters."""
    r, g = resampler(rate), math.gcd(rate, SAMPLE_RATE)
    # Trailing zeros change nothing (torchaudio pads with zeros too) and leave room to cut the
    # exact length.
    pad = r.stride + rate // g * math.ceil(64 / (SAMPLE_RATE // g))
    flat = x.reshape(-1, 1, x.shape[-1])  # (B, 1, n)
    kernel = r.kernel.to(x.device, x.dtype)  # a no-op on CPU float32; HEAR audio may sit on a GPU
    y = F.conv1d(F.pad(flat, (r.width, r.width + pad)), kernel, stride=r.stride)  # (B, m q, n / (m o))
    return y.transpose(1, 2).reshape(x.shape[:-1] + (-1,))[..., : resampled_length(x.shape[-1], rate)]


INT_SUBTYPES = {"PCM_S8": np.int16, "PCM_U8": np.int16, "PCM_16": np.int16, "PCM_24": np.int32,
                "PCM_32": np.int32}


def read_span(path, s0, s1):
    """Source samples [s0, s1) as float32 (n, C), in [-1, 1) as libsndfile scales them.

    Integer files are read as integers and scaled here by a power of two (exact, so the values
    are libsndfile's own): its int-to-float conversion costs more than reading a wav.
    """
    with sf.SoundFile(str(path)) as f:
        f.seek(s0)
        dtype = INT_SUBTYPES.get(f.subtype, np.float32)
        x = f.read(s1 - s0, dtype=dtype.__name__, always_2d=True)
    if dtype is np.float32:
        return x
    return x.astype(np.float32) * np.float32(1.0 / (-np.iinfo(dtype).min))


def read_audio(path, start=0, frames=None, header=None):
    """Samples [start, start + frames) of a file (24-kHz units) as mono float32 at 24 kHz -> (n,).

    `header` = (sample rate, samples) when already known (the file index), so only the span is opened.
    """
    rate, n_src = read_header(path) if header is None else (int(header[0]), int(header[1]))
    n = resampled_length(n_src, rate)
    stop = n if frames is None else min(n, start + frames)
    s0, s1, offset = source_span(start, stop, rate, n_src)
    try:
        x = read_span(path, s0, s1)  # (n_read, C)
    except (RuntimeError, OSError) as err:
        raise AudioError(f"{path}: corrupt audio data between samples {s0} and {s1} ({err})") from err
    if len(x) < s1 - s0:  # so every read of a file agrees on its length, or fails
        raise AudioError(f"{path}: truncated: its header promises {n_src} samples, the data ends "
                         f"at {s0 + len(x)}")
    peak = np.abs(x).max()  # NaN if any sample is NaN
    if not np.isfinite(peak):
        raise AudioError(f"{path}: NaN or inf samples")
    if peak > MAX_PEAK:
        raise AudioError(f"{path}: samples beyond +-{MAX_PEAK:g} (peak {peak:.3g}); audio should "
                         "lie in [-1, 1] (integer PCM stored as float?)")
    wav = torch.from_numpy(x[:, 0] if x.shape[1] == 1 else x.mean(axis=1))  # downmix to mono (n_read,)
    if rate != SAMPLE_RATE:
        wav = resample_24k(wav, rate)
    return wav[offset: offset + stop - start]  # (stop - start,)


def list_audio(sources, demo_dir="demo_audio"):
    """Audio paths from directories (recursive, sorted) and .txt lists; "demo" is the synthetic set."""
    paths = []
    for src in [sources] if isinstance(sources, (str, os.PathLike)) else sources:
        src = str(src)
        if src == "demo":
            paths += write_demo_dataset(demo_dir)
        elif os.path.isdir(src):
            found = []
            for root, folders, names in os.walk(src):
                found += [os.path.join(root, name) for name in names if name.lower().endswith(AUDIO_EXTS)]
                for name in folders:  # searched like any folder, but say so: it looks like a file
                    if name.lower().endswith(AUDIO_EXTS):
                        warnings.warn(f"{os.path.join(root, name)}: a folder named like an audio file; "
                                      "it is searched as a folder, not read as audio")
            found.sort()
            if not found:
                raise ValueError(f"data source {src!r}: no audio files ({', '.join(AUDIO_EXTS)})")
            paths += found
        elif os.path.isfile(src) and src.endswith(".txt"):
            with open(src) as f:  # one path per line; relative paths are relative to the list
                lines = [line.strip() for line in f]
            paths += [os.path.join(os.path.dirname(src), line) for line in lines
                      if line and not line.startswith("#")]
        else:
            raise FileNotFoundError(f"data source {src!r} is neither a directory nor a .txt list")
    return paths


# ---------------------------------------------------------------- datasets of 4-s crops [3.1]
class Crop(NamedTuple):
    wav: torch.Tensor      # (CROP_SAMPLES,) float32, zeros where padded
    padding: torch.Tensor  # (T,) bool, True = padded frame
    extra: torch.Tensor    # (T,) int64 k-means targets, -1 where absent or padded


class CachedCrop(NamedTuple):
    feats: torch.Tensor    # (T, 128) float32 codec frames, zeros where padded
    codes: torch.Tensor    # (T, Q) int64 codec targets, 0 where padded
    padding: torch.Tensor  # (T,) bool, True = padded frame
    extra: torch.Tensor    # (T,) int64 k-means targets, -1 where absent or padded


# ---------------------------------------------------------------- the file index [3.1]
# The paper's data is 1.7 million files. Reading every header at every start (and on every DDP
# rank and resume) costs minutes, so (path, sample rate, length) is read once, in parallel, into
# one .npz file that every later run loads in a second. Datasets keep files as arrays, not lists
# of Python objects, so DataLoader workers share them instead of copying them.
def scan_audio(paths):
    """Read every header; bad files get one warning each -> (paths kept, lengths, [(path, reason)])."""
    paths = list(paths)
    files, skipped = scan_files(paths)
    for path, reason in skipped:
        warnings.warn(f"skipping {reason}", stacklevel=2)
    bad = {str(path) for path, _ in skipped}
    return [p for p in paths if str(p) not in bad], files.lengths, skipped  # the callers' path objects


def scan_files(paths):
    """Headers of `paths` in this process -> (Files of the readable ones, [(path, reason)])."""
    kept, header, skipped = [], [], []
    for path in paths:
        try:
            header.append(read_header(path))
            kept.append(path)
        except AudioError as err:
            skipped.append((path, str(err)))
    rates, frames = np.array(header, dtype=np.int64).reshape(-1, 2).T
    return Files(PathArray.from_list(kept), rates, frames), skipped


class PathArray:
    """Paths as one byte buffer plus offsets: two arrays whatever the number of files."""

    def __init__(self, buf, offsets):
        self.buf, self.offsets = buf, offsets  # (bytes,) uint8, (F + 1,) int64

    @classmethod
    def from_list(cls, paths):
        raw = [os.fsencode(p) for p in paths]
        offsets = np.concatenate([[0], np.cumsum([len(r) for r in raw], dtype=np.int64)]).astype(np.int64)
        return cls(np.frombuffer(b"".join(raw), np.uint8), offsets)

    def __len__(self):
        return len(self.offsets) - 1

    def __getitem__(self, i):
        return os.fsdecode(self.buf[self.offsets[i]: self.offsets[i + 1]].tobytes())

    def tolist(self):
        return [self[i] for i in range(len(self))]

    def take(self, idx):
        """The paths at positions idx (an int array), gathered without a Python loop."""
        sizes = np.diff(self.offsets)[idx]  # (n,)
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        gather = np.repeat(self.offsets[:-1][idx] - offsets[:-1], sizes) + np.arange(offsets[-1])
        return PathArray(self.buf[gather], offsets)


class Files:
    """Audio files as arrays: paths, source sample rate and samples, which --data source (F,) each."""

    def __init__(self, paths, rates, frames, source=None, n_skipped=0):
        self.paths, self.rates, self.frames = paths, rates, frames
        self.source = np.zeros(len(rates), np.int64) if source is None else source
        self.n_skipped = n_skipped  # unreadable files left out when the headers were read

    lengths = property(lambda self: resampled_length(self.frames, self.rates))  # (F,) at 24 kHz

    def __len__(self):
        return len(self.rates)

    def take(self, idx, n_skipped=0):
        return Files(self.paths.take(idx), self.rates[idx], self.frames[idx], self.source[idx], n_skipped)


def source_names(sources):
    """--data entries as the index records them: absolute paths, or "demo"."""
    sources = [sources] if isinstance(sources, (str, os.PathLike)) else sources
    return [str(s) if str(s) == "demo" else os.path.abspath(s) for s in sources]


def default_index(sources):
    """Where an index lives unless --index says otherwise: runs/index/<sha1 of the sources>.npz."""
    key = hashlib.sha1(json.dumps(source_names(sources)).encode()).hexdigest()[:12]
    return os.path.join("runs", "index", f"{key}.npz")


def stamp(source):
    """A source's modification time (a folder's changes when files are added to or removed from
    it); -1 once it is gone, so a moved source warns instead of failing."""
    return 0 if source == "demo" else os.stat(source).st_mtime_ns if os.path.exists(source) else -1


def index_shard(task):
    """Read one shard's headers and store them atomically (run in a pool worker) -> CPU seconds."""
    path, paths, cpu = task[0], task[1], time.process_time()
    files, skipped = scan_files(paths)
    reasons = json.dumps(skipped).encode()
    write_atomic(path, lambda f: np.savez(f, buf=files.paths.buf, offsets=files.paths.offsets, rates=files.rates,
                                          frames=files.frames, skipped=np.frombuffer(reasons, np.uint8)))
    return time.process_time() - cpu


def read_shard(path):
    """A finished shard -> (Files, [(path, reason)] of its unreadable files)."""
    with np.load(path) as z:
        files = Files(PathArray(z["buf"], z["offsets"]), z["rates"], z["frames"])
        return files, json.loads(z["skipped"].tobytes())


def build_index(sources, out, workers=None, shard_files=2000, demo_dir="demo_audio"):
    """Read every header of every source once, in parallel and resumably -> Files; writes `out`.

    Shards of shard_files headers are written atomically to OUT.parts/ as they finish; a killed
    build rerun with the same sources keeps its finished shards. Bad files: one warning each.
    """
    names, t0 = source_names(sources), time.time()
    per_source = [list_audio([s], demo_dir) for s in names]
    parts = out + ".parts"
    os.makedirs(parts, exist_ok=True)
    tasks = []
    for s, paths in enumerate(per_source):
        for i in range(0, len(paths), shard_files):
            chunk = paths[i: i + shard_files]  # a shard is named by its paths, so a changed source redoes it
            key = hashlib.sha1("\n".join(chunk).encode()).hexdigest()[:12]
            tasks.append((os.path.join(parts, f"{s:03d}-{i // shard_files:06d}-{key}.npz"), chunk))
    todo = [t for t in tasks if not os.path.exists(t[0])]
    n_files = sum(map(len, per_source))
    print(f"index: {n_files} files in {len(names)} sources, {len(tasks) - len(todo)} of {len(tasks)} "
          f"shards done before; reading {sum(len(c) for _, c in todo)} headers with "
          f"{workers or os.cpu_count()} processes -> {out}", flush=True)
    cpu = 0.0  # CPU seconds of the readers: the rate per core, whatever else the machine runs
    if todo:
        import multiprocessing  # fork: the workers need this module, not a fresh interpreter
        with multiprocessing.get_context("fork").Pool(workers or os.cpu_count()) as pool:
            cpu = sum(pool.imap_unordered(index_shard, todo))
    files = merge_shards(tasks, names, out)
    took, n_read = time.time() - t0, sum(len(c) for _, c in todo)
    print(f"index: {len(files)} files, {files.n_skipped} unreadable skipped, "
          f"{files.lengths.sum() / SAMPLE_RATE / 3600:.2f} h, in {took:.1f} s ({n_files / max(took, 1e-9):.0f} "
          f"files/s; {n_read / max(cpu, 1e-9):.0f} headers per CPU-second) -> {out}", flush=True)
    return files


def merge_shards(tasks, names, out):
    """Concatenate the shards into one index file (atomically), with the reasons for the bad files."""
    shards, bad, skipped_per_source = [], [], np.zeros(len(names), np.int64)
    for path, _ in tasks:
        files, skipped = read_shard(path)
        s = int(os.path.basename(path)[:3])
        files.source[:] = s
        shards.append(files)
        skipped_per_source[s] += len(skipped)
        bad += [reason for _, reason in skipped]
    sizes = [len(f.paths.buf) for f in shards]
    shift = np.repeat(np.cumsum([0] + sizes[:-1]), [len(f) for f in shards]).astype(np.int64)
    offsets = np.concatenate([np.concatenate([f.paths.offsets[:-1] for f in shards]) + shift, [sum(sizes)]])
    meta = json.dumps({"sources": names, "stamps": [stamp(s) for s in names],
                       "skipped": skipped_per_source.tolist(), "bad": bad}).encode()
    cat = lambda key: np.concatenate([getattr(f, key) for f in shards]).astype(np.int64)
    files = Files(PathArray(np.concatenate([f.paths.buf for f in shards]), offsets.astype(np.int64)),
                  cat("rates"), cat("frames"), cat("source"), int(skipped_per_source.sum()))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    write_atomic(out, lambda f: np.savez(f, buf=files.paths.buf, offsets=files.paths.offsets, rates=files.rates,
                                         frames=files.frames, source=files.source, meta=np.frombuffer(meta, np.uint8)))
    shutil.rmtree(out + ".parts")
    return files


def read_index(out, sources):
    """The index at `out` -> (Files, unreadable files per source), each of those named in a warning;
    it must list exactly these sources.

    Only the sources' own modification times are checked (no per-file stat, so this takes a second
    for millions of files): files added deep inside a folder need `python data.py index` again.
    """
    check_index(out, sources)
    with np.load(out) as z:
        meta = json.loads(z["meta"].tobytes())
        files = Files(PathArray(z["buf"], z["offsets"]), z["rates"], z["frames"], z["source"], sum(meta["skipped"]))
    names = source_names(sources)
    for reason in meta["bad"]:  # every run names what it leaves out, as a header scan did
        warnings.warn(f"skipping {reason}", stacklevel=2)
    changed = [s for s, t in zip(names, meta["stamps"]) if stamp(s) != t]
    if changed:
        warnings.warn(f"{changed} changed since the index {out} was built; added files are not used until "
                      f"`python data.py index --data {' '.join(names)} --out {out}` rebuilds it")
    return files, meta["skipped"]


def check_index(out, sources):
    """An index file that lists exactly these --data sources, else UsageError naming --index."""
    try:
        with np.load(out) as z:
            listed = json.loads(z["meta"].tobytes())["sources"]
    except Exception as err:  # not an .npz, cut short, another kind of .npz: the file, not the code
        raise UsageError(f"--index {out}: not a file index written by `python data.py index` "
                         f"({type(err).__name__})") from None
    if listed != source_names(sources):
        raise UsageError(f"--index {out}: lists the sources {listed}, not {source_names(sources)}; pass "
                         f"another --index or rebuild it with `python data.py index --data ... --out {out}`")


def changed_sources(out, sources):
    """The sources whose modification time differs from the one stored in the index at `out`."""
    with np.load(out) as z:
        meta = json.loads(z["meta"].tobytes())
    return [s for s, t in zip(meta["sources"], meta["stamps"]) if s in source_names(sources) and stamp(s) != t]


def ensure_index(sources, out, workers=None):
    """Build the index at `out` if it is missing or a source changed since it was built."""
    changed = changed_sources(out, sources) if os.path.exists(out) else []
    if changed or not os.path.exists(out):
        print(f"index {out}: {'missing' if not changed else f'{changed} changed since it was built'}; "
              "building it", flush=True)
        build_index(sources, out, workers)


# ---------------------------------------------------------------- crops of indexed files [3.1]
def load_frame_store(store_dir, paths):
    """Each path's k-means target file, from STORE/index.json ({audio path: {"npy", "frames"}}).

    Returns (kept: positions in paths that have targets, their .npy files, [(path, reason)] for
    the others); each of those gets one warning, as a file with no targets cannot train stage 2.
    """
    with open(os.path.join(store_dir, "index.json")) as f:
        index = {os.path.abspath(p): e["npy"] for p, e in json.load(f).items()}
    kept, npys, skipped = [], [], []
    for i, path in enumerate(paths):
        if os.path.abspath(path) in index:
            kept.append(i)
            npys.append(os.path.join(store_dir, index[os.path.abspath(path)]))
        else:
            skipped.append((path, f"{path}: no k-means targets in {store_dir}"))
            warnings.warn(f"skipping {skipped[-1][1]} (kmeans.py skipped it or it is new)", stacklevel=2)
    return kept, npys, skipped


def cut_frames(array, start, T, fill, dtype):
    """Rows [start, start + T) of a (memory-mapped) array, padded with `fill` past its end -> tensor.

    Done in numpy: small torch ops in a busy main process can stall on thread hand-offs.
    """
    out = np.full((T,) + array.shape[1:], fill, dtype)
    part = array[start: start + T]
    out[: len(part)] = part
    return torch.from_numpy(out)


def frame_labels(npy, start, T, n_frames):
    """Frames [start, start + T) of a file's k-means labels, -1 past its end -> (T,) int64."""
    labels = np.load(npy, mmap_mode="r")
    assert labels.shape == (n_frames,), f"{npy}: {labels.shape[0]} labels for {n_frames} frames"
    return cut_frames(labels, start, T, -1, np.int64)


def file_id(path):
    """A stable short name for a file's derived arrays: the sha1 of its absolute path."""
    return hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:16]


def visits_per_file(lengths, crop):
    """How often each file is visited per epoch: ceil(length / crop), so long audio is seen more [3.1]."""
    return -(-np.asarray(lengths) // crop)


class Visits(Dataset):
    """Items over files: a file counts ceil(length / crop) times, so long audio is seen more [3.1].

    Item i belongs to the file whose cumulative visit count first exceeds i (a binary search),
    so the dataset holds (F,) arrays only, never one entry per item. The crop of an item depends
    on (seed, epoch, index) only: call set_epoch(e) every epoch (DataLoader workers copy the
    dataset at each epoch unless persistent_workers=True).
    """

    def __init__(self, lengths, crop, seed):
        self.ends = np.cumsum(visits_per_file(lengths, crop))  # (F,) items of files 0..f together
        self.lengths, self.crop, self.seed, self.epoch = lengths, crop, seed, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return int(self.ends[-1]) if len(self.ends) else 0

    def file_of(self, item):
        """The file (or files, for an array of items) that an item crops."""
        return np.searchsorted(self.ends, item, side="right")

    def crop_start(self, item, step):
        """A random start on a multiple of `step` with the crop inside the file (0 if shorter)."""
        room = max(0, int(self.lengths[self.file_of(item)]) - self.crop) // step
        return step * int(np.random.default_rng([self.seed, self.epoch, item]).integers(room + 1))


class CropDataset(Visits):
    """Random 4-s crops of raw audio files -> Crop(wav, padding, extra).

    `paths`: a list (every header is read now) or the Files of an index (nothing is read now).
    """

    def __init__(self, paths, crop_samples=CROP_SAMPLES, seed=0, extra_store=None):
        assert crop_samples % HOP == 0, "crops must be whole codec frames"
        self.files, self.skipped = (paths, []) if isinstance(paths, Files) else scan_files(paths)
        for _, reason in self.skipped:
            warnings.warn(f"skipping {reason}", stacklevel=2)
        self.store = None
        if extra_store is not None:
            kept, store, unlabelled = load_frame_store(extra_store, self.files.paths.tolist())
            self.files = self.files.take(np.array(kept, dtype=np.int64), self.files.n_skipped)
            self.store, self.skipped = PathArray.from_list(store), self.skipped + unlabelled
        if not len(self.files):
            raise ValueError(f"no readable audio among {len(paths)} files")
        super().__init__(self.files.lengths, crop_samples, seed)
        self.failed = {}  # path -> reason: files that passed the scan but broke when read (this process)

    n_skipped = property(lambda self: len(self.skipped) + len(self.failed) + self.files.n_skipped)
    paths = property(lambda self: self.files.paths)

    def __getitem__(self, index):
        """The crop for `index`; if its file breaks at read time, the next item whose file reads."""
        for k in range(len(self)):
            item = (index + k) % len(self)
            path = self.files.paths[self.file_of(item)]
            if path not in self.failed:
                try:
                    return self.read_crop(item)
                except AudioError as err:  # from now on this file is skipped, in this process
                    self.failed[path] = str(err)
                    warnings.warn(f"skipping {err}; using another item ({len(self.failed)} files "
                                  "failed when read so far)")
        raise AudioError(f"none of the {len(self.files)} files of the dataset could be read")

    def read_crop(self, item):
        f, T = self.file_of(item), num_frames(self.crop)
        # Deviation: crops start on a codec hop (13 ms grid), not any sample, so frame-level
        # stores (k-means targets, the cache) line up with them.
        start = self.crop_start(item, HOP)
        wav = read_audio(self.files.paths[f], start, self.crop, (self.files.rates[f], self.files.frames[f]))
        padding = torch.arange(T) >= num_frames(len(wav))  # (T,) a partly filled frame is real
        extra = torch.full((T,), -1, dtype=torch.int64)
        if self.store is not None:
            extra = frame_labels(self.store[f], start // HOP, T, num_frames(int(self.lengths[f])))
        wav = cut_frames(wav.numpy(), 0, self.crop, 0, np.float32)  # (CROP_SAMPLES,) zero-padded
        return Crop(wav, padding, extra.masked_fill(padding, -1))


class MixedDataset(Dataset):
    """Several datasets as one; with weights, dataset i fills the share w_i / sum(w) of an epoch."""

    def __init__(self, datasets, weights=None, seed=0):
        assert weights is None or len(weights) == len(datasets), "one weight per dataset"
        self.datasets, self.weights, self.seed = list(datasets), weights, seed
        self.set_epoch(0)

    n_skipped = property(lambda self: sum(d.n_skipped for d in self.datasets))

    def set_epoch(self, epoch):
        """Pass the epoch on and redraw which items of each dataset fill its share.

        Dataset i fills items [ends[i-1], ends[i]): whole passes in order, then a random part of
        one more pass. Only that part is stored, so memory follows the datasets, not the epoch.
        """
        self.sizes = np.array([len(d) for d in self.datasets], dtype=np.int64)
        counts = self.sizes if self.weights is None else np.array(
            [round(int(self.sizes.sum()) * w / sum(self.weights)) for w in self.weights], dtype=np.int64)
        rng = np.random.default_rng([self.seed, epoch])
        self.ends, self.whole = np.cumsum(counts), counts // self.sizes * self.sizes  # (S,) each
        self.part = [rng.permutation(size)[: count % size] for size, count in zip(self.sizes, counts)]
        for d in self.datasets:
            d.set_epoch(epoch)

    def __len__(self):
        return int(self.ends[-1])

    def locate(self, index):
        """(dataset, item of that dataset) behind an item of the mix."""
        i = int(np.searchsorted(self.ends, index, side="right"))  # the dataset filling this item
        j = index - (int(self.ends[i - 1]) if i else 0)  # its position within the share
        return i, int(j % self.sizes[i] if j < self.whole[i] else self.part[i][j - self.whole[i]])

    def __getitem__(self, index):
        i, inner = self.locate(index)
        return self.datasets[i][inner]


def mix_datasets(datasets, weights=None, seed=0):
    """Mix datasets (the paper mixes AudioSet, FMA and LibriLight [3.1]), optionally weighted."""
    return MixedDataset(datasets, weights, seed)


def holdout(n_files, n_or_fraction, seed=0):
    """A fixed validation subset of n_files: n files (int) or a fraction (float) -> (train, valid)
    positions, each sorted."""
    n = round(n_files * n_or_fraction) if isinstance(n_or_fraction, float) else int(n_or_fraction)
    if not 0 < n < n_files:
        raise ValueError(f"hold-out {n_or_fraction} of {n_files} files leaves a side empty")
    valid = np.zeros(n_files, bool)
    valid[np.random.default_rng(seed).permutation(n_files)[:n]] = True
    return np.flatnonzero(~valid), np.flatnonzero(valid)


def readable_holdout(files, group, n_or_fraction, seed=0):
    """Split the files at positions `group` into (train, valid) positions, holding out files whose
    first 4 s read: validation crops are fixed, so a held-out file that fails when read would fail
    every validation. One that fails is warned about, left out of both sides, and replaced."""
    while True:
        train, valid = (group[part] for part in holdout(len(group), n_or_fraction, seed))
        bad = []
        for f in valid:
            try:
                read_audio(files.paths[f], 0, CROP_SAMPLES, (files.rates[f], files.frames[f]))
            except AudioError as err:
                warnings.warn(f"skipping {err}", stacklevel=2)
                bad.append(f)
        if not bad:
            return train, valid
        group = np.setdiff1d(group, bad)


def split_holdout(paths, n_or_fraction, seed=0):
    """A fixed validation subset of a list of paths -> (train_paths, valid_paths)."""
    train, valid = holdout(len(paths), n_or_fraction, seed)
    return [paths[i] for i in train], [paths[i] for i in valid]


# ---------------------------------------------------------------- the frozen codec, by source [2.1]
OFFLINE_HELP = (
    "EnCodec's pretrained 24 kHz weights could not be loaded ({err}). This machine may be offline.\n"
    "  Either copy encodec_24khz-d7cc33bc.th from a machine with internet and pass its path\n"
    "  (--encodec /path/to/encodec_24khz-d7cc33bc.th), or use --encodec random for a seeded\n"
    "  random codec (smoke tests only: its targets are not the paper's)."
)
_RANDOM_CODECS = {}  # seed -> codec: building one costs seconds, every caller gets the same


def load_codec(source="pretrained", seed=0):
    """EnCodec by source: "pretrained" (hub download), a local checkpoint path, or "random"."""
    if source == "random":
        if seed not in _RANDOM_CODECS:
            warnings.warn("--encodec random: a seeded random codec; its inputs and targets are NOT the "
                          "paper's (smoke tests and teaching only).", stacklevel=2)
            audio = demo_clips(24, seconds=1.0, seed=seed)  # (24, 24000) varied synthetic audio
            _RANDOM_CODECS[seed] = model.random_codec(seed, audio)
        return _RANDOM_CODECS[seed]
    if source == "pretrained":
        try:
            encodec = model.build_encodec(pretrained=True)
        except Exception as err:  # any download failure ends here, loudly
            raise RuntimeError(OFFLINE_HELP.format(err=err)) from err
    else:
        if not os.path.isfile(source):
            raise FileNotFoundError(f"--encodec {source!r}: no such checkpoint file; "
                                    "expected 'pretrained', 'random' or a path to encodec_24khz-*.th")
        encodec = model.build_encodec(pretrained=False)
        encodec.load_state_dict(torch.load(source, map_location="cpu", weights_only=True))
    return model.Codec(model.fold_weight_norm(encodec), source)


# ---------------------------------------------------------------- the frozen-codec feature cache
def read_manifest(cache_dir):
    """Finished files {abs audio path: {"path", "id", "samples", "frames"}} from CACHE/manifest.jsonl.

    A line is appended only after both .npy files are complete, so a file missing here is redone;
    a line torn by a crash is not valid JSON and is dropped.
    """
    entries, path = {}, os.path.join(cache_dir, "manifest.jsonl")
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    entry = json.loads(line)
                    entries[entry["path"]] = entry
                except json.JSONDecodeError:
                    pass
    return entries


def write_atomic(path, write):
    """Write through a temporary name, then os.replace: the final name never holds half a file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def open_cache(cache_dir, codec):
    """Create or resume a cache: check its codec, drop temporaries and torn lines -> finished entries."""
    os.makedirs(cache_dir, exist_ok=True)
    meta_path = os.path.join(cache_dir, "cache.json")
    meta = {"codec": codec.source, "sample_rate": SAMPLE_RATE, "hop": HOP}
    if not os.path.exists(meta_path):
        write_atomic(meta_path, lambda f: f.write(json.dumps(meta).encode()))
    with open(meta_path) as f:
        if json.load(f) != meta:
            raise ValueError(f"{cache_dir} was built with another codec ({meta_path}): use a new --out")
    for name in os.listdir(cache_dir):
        if ".tmp" in name:  # left by a killed run
            os.remove(os.path.join(cache_dir, name))
    done = read_manifest(cache_dir)
    lines = "".join(json.dumps(e) + "\n" for e in done.values()).encode()
    write_atomic(os.path.join(cache_dir, "manifest.jsonl"), lambda f: f.write(lines))
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
    entry = {"path": key, "id": file_id(key), "samples": n_samples,
             "frames": len(feats)}
    base = os.path.join(cache_dir, entry["id"])
    write_atomic(base + ".feats.npy", lambda f: np.save(f, feats))  # (T, 128) fp16
    write_atomic(base + ".codes.npy", lambda f: np.save(f, codes))  # (T, Q) int16
    with open(os.path.join(cache_dir, "manifest.jsonl"), "a") as f:
        f.write(json.dumps(entry) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return entry


def read_group(paths, skipped):
    """[(path, wav)] for the files that read; the others are warned about and added to `skipped`."""
    wavs = []
    for path in paths:
        try:
            wavs.append((path, read_audio(path)))
        except AudioError as err:
            skipped.append((path, str(err)))
            warnings.warn(f"skipping {err}")
    return wavs


def build_cache(codec, paths, cache_dir, batch_seconds=240.0, chunk_seconds=60.0, log_every=30.0):
    """Run the frozen codec once per file; store feats (T, 128) fp16 and codes (T, Q) int16 [3.1].

    Deviation: the paper encodes each 4-s crop; a cached crop instead sees the causal encoder's
    state from the whole file (or chunk_seconds chunk) at its start (README: cache vs on the fly).
    Resumable: files in the manifest are skipped. Only files of equal length share a batch, so
    no padding changes a frame. A bad file (unreadable, cut short, NaN or huge samples, frames
    beyond fp16) is skipped with one warning naming it and the reason, and never costs the other
    files of its batch. Returns (number of cached files, [(path, reason)] skipped).
    """
    done = open_cache(cache_dir, codec)
    todo, lengths, skipped = scan_audio([p for p in paths if os.path.abspath(p) not in done])
    chunk = HOP * max(1, round(chunk_seconds * SAMPLE_RATE / HOP))  # whole frames per chunk
    hours = lengths.sum() / SAMPLE_RATE / 3600
    print(f"cache: {len(done)} files done, {len(todo)} to encode ({hours:.2f} h), {len(skipped)} skipped;"
          f" codec {codec.source} -> {cache_dir}", flush=True)
    t0, n_new, progress = time.time(), 0, Progress("cache", max(1, len(todo)), every=log_every)
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


class CachedCropDataset(Visits):
    """Random 4-s crops read at frame level from the cache (memory-mapped) -> CachedCrop.

    `paths`: the audio files to use (a list or a PathArray), or None for every cached file.
    """

    def __init__(self, cache_dir, crop_frames=CROP_FRAMES, seed=0, extra_store=None, paths=None):
        done = read_manifest(cache_dir)
        keys = sorted(done) if paths is None else [os.path.abspath(p) for p in (
            paths.tolist() if isinstance(paths, PathArray) else paths)]
        self.skipped = [(k, f"{k}: not in the cache {cache_dir}") for k in keys if k not in done]
        if self.skipped:  # one line: the build named each file it skipped, with the reason
            warnings.warn(f"{cache_dir}: {len(self.skipped)} of {len(keys)} files are not in the cache, "
                          "left out (its build skipped them, or they are new: `python data.py cache` "
                          "adds new files)", stacklevel=2)
        keys = [k for k in keys if k in done]
        self.store = None
        if extra_store is not None:
            kept, store, unlabelled = load_frame_store(extra_store, keys)
            keys, self.skipped = [keys[i] for i in kept], self.skipped + unlabelled
            self.store = PathArray.from_list(store)
        if not keys:
            raise ValueError(f"{cache_dir}: none of the {len(self.skipped)} files asked for is usable "
                             "(run `python data.py cache` on them)")
        # (F,) arrays: ids as fixed-width bytes (16 hex digits), frames as int64
        self.dir, self.ids = cache_dir, np.array([done[k]["id"] for k in keys], dtype="S16")
        frames = np.array([done[k]["frames"] for k in keys], dtype=np.int64)
        super().__init__(frames, crop_frames, seed)

    n_skipped = property(lambda self: len(self.skipped))

    def __getitem__(self, item):
        f, T = self.file_of(item), self.crop
        start, n = self.crop_start(item, 1), int(self.lengths[f])
        base = os.path.join(self.dir, self.ids[f].decode())
        feats = np.load(base + ".feats.npy", mmap_mode="r")  # (n, 128) fp16, nothing read yet
        codes = np.load(base + ".codes.npy", mmap_mode="r")  # (n, Q) int16
        assert len(feats) == len(codes) == n, f"{base}: cached arrays do not match the manifest"
        padding = torch.arange(T) >= n - start  # (T,)
        extra = torch.full((T,), -1, dtype=torch.int64)
        if self.store is not None:
            extra = frame_labels(self.store[f], start, T, n)
        return CachedCrop(cut_frames(feats, start, T, 0, np.float32),  # (T, 128)
                          cut_frames(codes, start, T, 0, np.int64), padding, extra)  # (T, Q)


# ---------------------------------------------------------------- loader benchmark
BENCH_FORMATS = (("wav", "PCM_16"), ("flac", "PCM_16"), ("ogg", "VORBIS"), ("mp3", "MPEG_LAYER_III"))
GPU_CROPS_PER_S = 1920  # 15 steps/s x 128 crops: what one fast GPU takes [3.1]


def bench_signal(seconds, rate, seed):
    """Music-like test audio (n,): a new harmonic note every 0.5 s over soft noise, so lossy codecs
    and flac work as hard as on real recordings (a pure tone or silence would flatter them)."""
    rng, t = np.random.default_rng(seed), np.arange(round(seconds * rate)) / rate
    f0 = 110 * 2 ** (rng.integers(0, 36, int(2 * seconds) + 1) / 12)[(2 * t).astype(int)]  # (n,) Hz
    phase = 2 * np.pi * np.cumsum(f0) / rate
    x = sum(np.sin(k * phase) / k for k in range(1, 6)) * np.exp(-3 * (t % 0.5))
    x = x + 0.05 * np.convolve(rng.standard_normal(len(t)), np.ones(8) / 8, "same")
    return 0.3 * x / np.abs(x).max()


def crops_per_second(dataset, seconds):
    """Crops one process reads per second of its own CPU time (so other programs on a shared machine
    do not count), over random items for about `seconds` of CPU."""
    order = np.random.default_rng(0).permutation(len(dataset))
    dataset[int(order[0])]  # warm-up: imports, resampling kernels
    n, t0 = 0, time.process_time()
    while time.process_time() - t0 < seconds or n < 3:
        dataset[int(order[n % len(order)])]
        n += 1
    return n / (time.process_time() - t0)


def bench(out_dir, seconds=30.0, n_files=2, per_case=2.0, encodec="random"):
    """Print crops per CPU-second of one DataLoader worker (one thread) per format and rate, raw and
    cached, and the workers (cores) that feed one GPU taking GPU_CROPS_PER_S."""
    torch.set_num_threads(1)  # as in a DataLoader worker
    os.makedirs(out_dir, exist_ok=True)
    print(f"bench: {n_files} files of {seconds:.0f} s per case, 4-s crops, 1 thread, CPU time, in {out_dir}\n"
          f"| source | rate | crops/s per worker (core) | workers for {GPU_CROPS_PER_S} crops/s |\n|---|---|---|---|")
    row = lambda name, rate, r: print(f"| {name} | {rate} | {r:.0f} | {math.ceil(GPU_CROPS_PER_S / r)} |", flush=True)
    for ext, subtype in BENCH_FORMATS:
        if ext.upper() not in sf.available_formats():
            print(f"| {ext} | - | not supported by this libsndfile | - |")
            continue
        for rate in (16000, 44100, 48000):
            paths = [os.path.join(out_dir, f"{ext}{rate}-{i}.{ext}") for i in range(n_files)]
            for i, path in enumerate(paths):
                if not os.path.exists(path):
                    sf.write(path, bench_signal(seconds, rate, i), rate, subtype=subtype)
            row(ext, rate, crops_per_second(CropDataset(paths), per_case))
    cache = os.path.join(out_dir, "cache")
    build_cache(load_codec(encodec), [os.path.join(out_dir, "wav16000-0.wav")], cache, log_every=1e9)
    row(f"cache ({encodec} codec)", "75 Hz", crops_per_second(CachedCropDataset(cache), per_case))


# ---------------------------------------------------------------- command line
def main(argv=None):
    parser = Parser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    cache = sub.add_parser("cache", help="run the frozen codec once over a dataset (resumable)")
    cache.add_argument("--data", nargs="+", required=True, help="folders, .txt lists, or demo")
    cache.add_argument("--out", required=True, help="cache folder")
    cache.add_argument("--encodec", default="pretrained", help="pretrained | random | checkpoint path")
    cache.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    cache.add_argument("--batch-seconds", type=float, default=240.0, help="audio per codec batch")
    cache.add_argument("--chunk-seconds", type=float, default=60.0, help="longer files go in chunks")
    tasks = sub.add_parser("demo-tasks", help="three labelled demo tasks in the HEAR layout (demo.py)")
    tasks.add_argument("--out", required=True)
    tasks.add_argument("--clips", type=int, default=120, help="clips per task")
    tasks.add_argument("--seconds", type=float, default=2.0)
    tasks.add_argument("--seed", type=int, default=0)
    real = sub.add_parser("demo-real", help="pretraining audio and three tasks from sampled instruments "
                          "and espeak-ng voices (demo.py; needs fluidsynth, fluid-soundfont-gm, espeak-ng)")
    real.add_argument("--out", required=True, help="writes OUT/corpus and OUT/tasks")
    real.add_argument("--hours", type=float, default=1.5, help="pretraining audio (0: tasks only)")
    real.add_argument("--clips", type=int, nargs=3, default=[720, 240, 480],
                      metavar=("TRAIN", "VALID", "TEST"), help="clips per split of each task")
    real.add_argument("--seed", type=int, default=0, help="the sounds and the program and voice splits")
    index = sub.add_parser("index", help="read every file's header once (parallel, resumable)")
    index.add_argument("--data", nargs="+", required=True, help="folders, .txt lists, or demo")
    index.add_argument("--out", help="index file (default: runs/index/<sha1 of --data>.npz, "
                                     "where train.py looks unless given --index)")
    index.add_argument("--workers", type=int, default=os.cpu_count(), help="processes reading headers")
    index.add_argument("--shard-files", type=int, default=2000, help="headers per resumable shard")
    bench_ = sub.add_parser("bench", help="crops/s of one loader worker per format and rate")
    bench_.add_argument("--out", default=os.path.join("runs", "bench"), help="folder for the test files")
    bench_.add_argument("--seconds", type=float, default=30.0, help="length of each test file")
    bench_.add_argument("--per-case", type=float, default=2.0, help="seconds of reading per case")
    bench_.add_argument("--encodec", default="random", help="codec for the cached case")
    args = parser.parse_args(argv)
    if args.command == "demo-real":
        if args.hours < 0 or min(args.clips) < 1:
            raise UsageError(f"--hours must be >= 0 and each --clips >= 1, got {args.hours}, {args.clips}")
        if missing_sources():
            raise UsageError(f"demo-real needs {'; '.join(missing_sources())}; install with: {APT}")
        return build_real_demo(args.out, args.hours, args.clips, args.seed)
    if args.command == "demo-tasks":
        for path in make_demo_tasks(args.out, args.clips, args.seconds, args.seed):
            print(f"wrote {path}")
        return
    if args.command == "index":
        if args.workers < 1 or args.shard_files < 1:
            raise UsageError(f"--workers {args.workers} and --shard-files {args.shard_files} must be >= 1")
        missing = [d for d in args.data if d != "demo" and not os.path.exists(d)]
        if missing:
            raise UsageError(f"--data {missing[0]}: no such folder or .txt list")
        out = args.out or default_index(args.data)
        print(f"index: (re)building {out}; train.py reads it for the same --data, or with --index {out}")
        if os.path.exists(out):
            os.remove(out)  # asked for explicitly: a fresh index; finished shards of a killed build are kept
        build_index(args.data, out, args.workers, args.shard_files)
        return read_index(out, args.data)  # names each unreadable file
    if args.command == "bench":
        return bench(args.out, args.seconds, per_case=args.per_case, encodec=args.encodec)
    # Every check before the codec loads (a download, or seconds of calibration for "random").
    for flag, value in (("--batch-seconds", args.batch_seconds), ("--chunk-seconds", args.chunk_seconds)):
        check_range(flag, value, 0.01, 1e6)  # seconds of audio
    check_encodec(args.encodec)
    for src in args.data:
        check_data_source(src)
    device = check_device(args.device)
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f"--out {args.out}: exists and is not a folder")
    try:
        paths = list_audio(args.data, demo_dir=os.path.join(args.out, "demo_audio"))
    except (ValueError, FileNotFoundError) as err:
        raise UsageError(f"--data: {err}") from None
    codec = load_codec(args.encodec).to(device)
    build_cache(codec, paths, args.out, args.batch_seconds, args.chunk_seconds)


if __name__ == "__main__":
    run_cli(main)
