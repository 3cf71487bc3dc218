"""Data for EnCodecMAE, section 3.1: audio -> mono 24 kHz -> random 4-s crops, and the frozen codec.

Used by train.py, kmeans.py and evaluate.py (no command of its own). It reads what libsndfile
reads (wav, flac, ogg, mp3) from folders or .txt lists of paths, visits each file ceil(length / 4 s)
times per epoch and skips a bad file with one warning naming it. `load_codec` gives the frozen
EnCodec, `load_checkpoint` a trained model. Crops carry `padding`: True where a frame is not real
audio. Also what every command line shares: one-line errors with exit status 2, progress lines.
"""
import argparse
import contextlib
import functools
import hashlib
import json
import math
import os
import re
import signal
import sys
import time
import warnings
from typing import NamedTuple

import numpy as np
import soundfile as sf
import torch
from torch.utils.data import Dataset

import model as M
from model import CROP_SAMPLES, HOP, SAMPLE_RATE, num_frames

AUDIO_EXTS = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff")
MIN_RATE, MAX_RATE = 1000, 384000  # outside this range a header is broken, not exotic
MAX_PEAK = 1e3  # samples 60 dB beyond full scale: a broken file (or integer PCM stored as float)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)  # Ctrl-C, and what schedulers send before a kill


# ---------------------------------------------------------------- a user's mistakes: one line, exit 2
class UsageError(Exception):
    """A user's mistake (a bad flag, a missing file): one line on stderr and exit status 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        raise UsageError(message)


def run_cli(main, argv=None):
    """Run a command-line main: a UsageError is one line and exit 2, a stop signal one line and 128 + its number."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt(signum)  # unwinds as Ctrl-C does: a write_atomic on the way removes its temporary
    name, before = os.path.basename(sys.argv[0]), {s: signal.signal(s, interrupt) for s in STOP_SIGNALS[1:]}
    try:
        return main(argv)
    except UsageError as err:  # from a DataLoader worker it comes after the worker's traceback: its last line
        message = re.sub(r"^[\w.]*UsageError: ", "", str(err).strip().splitlines()[-1])
        print(f"{name}: error: {message}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    except KeyboardInterrupt as err:
        signum = err.args[0] if err.args else signal.SIGINT
        print(f"{name}: stopped by {signal.Signals(signum).name}; the work finished is kept: the same command "
              "resumes it", file=sys.stderr, flush=True)
        raise SystemExit(128 + signum) from None
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


def at_least(low, kind=int, high=math.inf):
    """An argparse type: a number in [low, high]; argparse names the flag in its one-line error."""
    def number(text):
        with contextlib.suppress(ValueError):
            if low <= kind(text) <= high:  # NaN fails too
                return kind(text)
        raise argparse.ArgumentTypeError(f"{text}: must be {'an integer' if kind is int else 'a number'} >= {low}"
                                         + (f" and <= {high}" if high < math.inf else ""))
    return number


def encodec_source(text):
    """An argparse type: pretrained, random or an EnCodec checkpoint file (checked before any download)."""
    if text not in ("pretrained", "random") and not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"{text}: use pretrained, random or the path of an encodec_24khz-*.th file")
    return text


def data_source(text):
    """An argparse type: "demo", a .txt list of paths, or a readable folder."""
    if not (text == "demo" or (text.endswith(".txt") and os.path.isfile(text)) or os.path.isdir(text)):
        raise argparse.ArgumentTypeError(f"{text}: no such folder or .txt list (or use demo)")
    if os.path.isdir(text) and not os.access(text, os.R_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"{text}: permission denied (the folder cannot be read)")
    return text


def device(text):
    """An argparse type: a torch device this machine has (one line instead of torch's error mid-run)."""
    with contextlib.suppress(RuntimeError):  # not a device name: refused below
        dev = torch.device(text)
        if dev.type == "cpu" or (dev.type == "cuda" and (dev.index or 0) < torch.cuda.device_count()):
            return dev
    raise argparse.ArgumentTypeError(f"{text}: not a device here; use cpu"
                                     + (", cuda or cuda:N" if torch.cuda.is_available() else ""))


class Progress:
    """A line at most every `every` seconds and at the end: share done, speed, ETA (work found done is not speed)."""

    def __init__(self, stage, total, every=10.0, unit=None):
        self.stage, self.total, self.every, self.unit, self.done, self.resumed = stage, total, every, unit, 0, 0
        self.t0 = self.last = time.time()

    def update(self, amount, detail, resumed=False):
        self.done, self.resumed, now = self.done + amount, self.resumed + amount * resumed, time.time()
        if now - self.last >= self.every or self.done >= self.total:
            self.last, speed = now, (self.done - self.resumed) / max(now - self.t0, 1e-9)
            print(f"{self.stage}: {detail}, {self.done / max(self.total, 1e-9):.1%} in {now - self.t0:.0f} s"
                  f"{f', {speed:.1f}{self.unit}' if self.unit else ''}, ETA "
                  f"{(self.total - self.done) / max(speed, 1e-9):.0f} s", flush=True)


def write_atomic(path, write):
    """Write via `{path}.tmp{pid}` and os.replace: the name never holds half a file; a failed write is a UsageError."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        cause = err if isinstance(err, OSError) else err.__context__  # torch.save wraps it in a RuntimeError
        if not isinstance(cause, OSError):
            raise
        raise UsageError(f"cannot write {path}: {cause.strerror or cause}; free space or choose a folder you can "
                         "write (what was written before is intact)") from None


def make_folder(path, flag="--out"):
    """An output folder, made if missing; one we cannot write (root may, except on a read-only disk) is a UsageError."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as err:  # FileExistsError: a file of that name
        raise UsageError(f"{flag} {path}: cannot make this folder ({err.strerror}); choose another {flag}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path}: read-only (no permission to write there); choose another {flag}")
    return path


def remove_temporaries(folder, names):
    """Delete exactly the `{name}.tmp{pid}` files a killed write_atomic left, for the names matching regex `names`."""
    for entry in os.listdir(folder):
        if re.fullmatch(rf"(?:{names})\.tmp\d+", entry):
            os.remove(os.path.join(folder, entry))


# ---------------------------------------------------------------- reading audio [3.1]
class AudioError(Exception):
    """A file that cannot be training audio; the message names the file and what is wrong."""


def resampled_length(n_src, rate):
    return -(-n_src * SAMPLE_RATE // rate)  # samples at 24 kHz: an exact integer ceil, no float rounding


def read_header(path):
    """(sample rate, samples) from the header, or AudioError. Its last sample is read back (one seek, 0.1 ms) to catch
    a file cut short; not for mp3, where a seek parses every frame before it: read_audio catches it then."""
    for bad, why in ((os.path.isdir, "a folder, not an audio file"), (lambda p: not os.path.isfile(p), "no such file"),
                     (lambda p: not os.access(p, os.R_OK), "permission denied"),
                     (lambda p: os.path.getsize(p) == 0, "empty file (0 bytes)")):
        if bad(path):
            raise AudioError(f"{path}: {why}")
    try:
        f = sf.SoundFile(os.fsencode(path))  # bytes: soundfile encodes a str as UTF-8, failing other names
    except (RuntimeError, OSError) as err:  # libsndfile's text can mislead ("not a regular file")
        raise AudioError(f"{path}: not an audio file libsndfile can decode (unknown format or corrupt header)") from err
    with f:
        rate, n_src = f.samplerate, f.frames
        if not MIN_RATE <= rate <= MAX_RATE:
            raise AudioError(f"{path}: absurd sample rate {rate} Hz (allowed {MIN_RATE}..{MAX_RATE})")
        if n_src <= 0:
            raise AudioError(f"{path}: empty file (zero samples)")
        with contextlib.suppress(RuntimeError, OSError):
            f.seek(n_src - 1 if f.format != "MP3" else 0)
            if len(f.read(1, dtype="float32")) == 1:
                return rate, n_src
    raise AudioError(f"{path}: truncated or corrupt: its header promises {n_src} samples, the last cannot be read")


def probe_audio(path):
    """Length in 24-kHz samples from the header alone (cheap), or AudioError."""
    return resampled_length(*read_header(path)[::-1])


@functools.lru_cache(maxsize=None)
def resampler(rate):
    import torchaudio.transforms as AT  # lazily: only off 24 kHz; the sinc kernel is built once per rate
    return AT.Resample(rate, SAMPLE_RATE)


def resample_24k(x, rate):
    """(..., n) at `rate` -> (..., resampled_length(n, rate)) at 24 kHz (HEAR audio may sit on a GPU)."""
    return resampler(rate).to(x.device, x.dtype)(x)


def read_audio(path, start=0, frames=None, header=None):
    """24-kHz samples [start, start + frames) of a file as mono float32 -> (n,); `header`: (rate, samples) if known."""
    rate, n_src = read_header(path) if header is None else (int(header[0]), int(header[1]))
    n = resampled_length(n_src, rate)
    stop = n if frames is None else min(n, start + frames)
    # Only source samples [s0, s1) are read: starting on a multiple of o keeps the polyphase filter's phase, margins
    # wider than the sinc filter and an mp3 seek's warm-up (2304 samples) make it equal the whole file resampled.
    g = math.gcd(rate, SAMPLE_RATE)
    o, q = rate // g, SAMPLE_RATE // g  # o source samples <-> q output samples
    m = math.ceil((6 * o / (0.99 * min(o, q)) + 2 + 2304) / o)
    p0 = max(0, start // q - m)
    s0, s1, offset = p0 * o, min(n_src, (stop // q + 1 + m) * o), start - p0 * q  # offset: where `start` falls
    try:
        with sf.SoundFile(os.fsencode(path)) as f:
            f.seek(s0)
            x = f.read(s1 - s0, dtype="float32", always_2d=True)  # (n_read, C)
    except (RuntimeError, OSError) as err:
        raise AudioError(f"{path}: corrupt audio data between samples {s0} and {s1} ({err})") from err
    if len(x) < s1 - s0:  # so every read of a file agrees on its length, or fails
        raise AudioError(f"{path}: truncated: its header promises {n_src} samples, the data ends at {s0 + len(x)}")
    peak = np.abs(x).max()  # NaN if any sample is NaN
    if not np.isfinite(peak):
        raise AudioError(f"{path}: NaN or inf samples")
    if peak > MAX_PEAK:
        raise AudioError(f"{path}: samples beyond +-{MAX_PEAK:g} (peak {peak:.3g}); audio should lie in "
                         "[-1, 1] (integer PCM stored as float?)")
    wav = torch.from_numpy(x.mean(axis=1))  # downmix to mono (n_read,)
    return (wav if rate == SAMPLE_RATE else resample_24k(wav, rate))[offset: offset + stop - start]


def list_audio(sources, demo_dir="demo_audio"):
    """Audio paths from directories (recursive, sorted) and .txt lists; "demo" is the synthetic set."""
    paths = []
    for src in map(str, [sources] if isinstance(sources, (str, os.PathLike)) else sources):
        if src == "demo":
            from extras.demo_audio import write_demo_dataset  # teaching and tests only
            paths += write_demo_dataset(demo_dir)
        elif os.path.isfile(src) and src.endswith(".txt"):
            with open(src, errors="surrogateescape") as f:  # one path per line, relative to the list
                lines = [line.strip() for line in f]
            paths += [os.path.join(os.path.dirname(src), p) for p in lines if p and not p.startswith("#")]
        elif not os.path.isdir(src):
            raise FileNotFoundError(f"data source {src!r} is neither a directory nor a .txt list")
        else:
            found = []
            for root, folders, names in os.walk(src, onerror=lambda err: warnings.warn(
                    f"skipping {err.filename}: {err.strerror} (a folder that cannot be read)")):
                found += [os.path.join(root, n) for n in names if n.lower().endswith(AUDIO_EXTS)]
                for name in (n for n in folders if n.lower().endswith(AUDIO_EXTS)):
                    warnings.warn(f"{os.path.join(root, name)}: a folder named like an audio file; it is "
                                  "searched as a folder, not read as audio")
            if not found:
                raise ValueError(f"data source {src!r}: no audio files ({', '.join(AUDIO_EXTS)})")
            paths += sorted(found)
    return paths


# ---------------------------------------------------------------- files as arrays [3.1]
class Files(NamedTuple):
    """Audio files as arrays, not one Python object per file (DataLoader workers share arrays; a
    list of str is copied into every worker). The file index (extras/file_index.py) gives the same."""
    paths: np.ndarray   # (F,) bytes, os.fsencode of each path
    rates: np.ndarray   # (F,) int64 source sample rate
    frames: np.ndarray  # (F,) int64 source samples
    lengths = property(lambda self: resampled_length(self.frames, self.rates))  # (F,) at 24 kHz

    def path(self, i):
        return os.fsdecode(self.paths[i])

    def take(self, idx):
        return Files(*(a[idx] for a in self))


def scan_audio(paths):
    """Every header read here, each bad file named in a warning -> (Files, [(path, reason)] skipped)."""
    kept, header, skipped = [], [], []
    for path in paths:
        try:
            header.append(read_header(path))
            kept.append(os.fsencode(path))
        except AudioError as err:
            skipped.append((path, str(err)))
            warnings.warn(f"skipping {err}", stacklevel=2)
    rates, frames = np.array(header, dtype=np.int64).reshape(-1, 2).T
    return Files(np.array(kept, dtype=bytes), rates, frames), skipped


def file_id(path):
    return hashlib.sha1(os.fsencode(os.path.abspath(path))).hexdigest()[:16]  # names a file's derived arrays


# ---------------------------------------------------------------- datasets of 4-s crops [3.1]
class Crop(NamedTuple):
    wav: torch.Tensor      # (CROP_SAMPLES,) float32, zeros where padded
    padding: torch.Tensor  # (T,) bool, True = padded frame
    extra: torch.Tensor    # (T,) int64 k-means targets, -1 where absent or padded


def visits_per_file(lengths, crop):
    """How often each file is visited per epoch: ceil(length / crop), so long audio is seen more [3.1]."""
    return -(-np.asarray(lengths) // crop)


class Visits(Dataset):
    """Items over files, a file counting ceil(length / crop) times [3.1], found by a binary search: the dataset holds
    (F,) arrays only. An item's crop depends on (seed, epoch, index) only: call set_epoch(e) every epoch."""

    def __init__(self, lengths, crop, seed):
        self.ends = np.cumsum(visits_per_file(lengths, crop))  # (F,) items of files 0..f together
        self.lengths, self.crop, self.seed, self.epoch = lengths, crop, seed, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return int(self.ends[-1]) if len(self.ends) else 0

    def file_of(self, item):
        return np.searchsorted(self.ends, item, side="right")  # the file an item crops (files, for an array)

    def crop_start(self, item, step):
        """A random start on a multiple of `step` with the crop inside the file (0 if shorter)."""
        room = max(0, int(self.lengths[self.file_of(item)]) - self.crop) // step
        return step * int(np.random.default_rng([self.seed, self.epoch, item]).integers(room + 1))


class CropDataset(Visits):
    """Random 4-s crops of audio files -> Crop(wav, padding, extra); `paths` a list (headers read now) or Files, and
    `extra_store` stage 2's k-means targets (kmeans.py). A file failing when read is named; the next item stands in."""

    def __init__(self, paths, seed=0, extra_store=None, n_skipped=0):
        self.files, self.skipped = (paths, []) if isinstance(paths, Files) else scan_audio(paths)
        self.store, self.failed, self.n_scanned_out = None, {}, n_skipped  # failed: path -> reason
        if extra_store is not None:
            kept, self.store, unlabelled = load_frame_store(extra_store, list(map(os.fsdecode, self.files.paths)))
            self.files, self.skipped = self.files.take(kept), self.skipped + unlabelled
        if not len(self.files.paths):
            raise ValueError(f"no readable audio among {len(paths)} files")
        super().__init__(self.files.lengths, CROP_SAMPLES, seed)

    n_skipped = property(lambda self: len(self.skipped) + len(self.failed) + self.n_scanned_out)

    def __getitem__(self, index):
        for k in range(len(self)):
            item = (index + k) % len(self)
            path = self.files.path(self.file_of(item))
            if path not in self.failed:
                try:
                    return self.read_crop(item)
                except AudioError as err:  # from now on this file is skipped, in this process
                    self.failed[path] = str(err)
                    warnings.warn(f"skipping {err}; using another item ({len(self.failed)} files failed when read)")
        raise AudioError(f"none of the {len(self.files.paths)} files of the dataset could be read")

    def read_crop(self, item):
        f, T = self.file_of(item), num_frames(self.crop)
        # Deviation: crops start on a codec hop (13 ms grid), not any sample, so frame-level
        # stores (k-means targets, the cache) line up with them.
        start = self.crop_start(item, HOP)
        wav = read_audio(self.files.path(f), start, self.crop, (self.files.rates[f], self.files.frames[f]))
        padding = torch.arange(T) >= num_frames(len(wav))  # (T,) a partly filled frame is real
        extra = torch.full((T,), -1, dtype=torch.int64)
        if self.store is not None:
            extra = frame_labels(self.store[f], start // HOP, T, num_frames(int(self.lengths[f])))
        wav = cut_frames(wav.numpy(), 0, self.crop, 0, np.float32)  # (CROP_SAMPLES,) zero-padded
        return Crop(wav, padding, extra.masked_fill(padding, -1))


# ---------------------------------------------------------------- k-means targets of stage 2 [2.3]
def load_frame_store(store_dir, paths):
    """Each path's k-means targets, from STORE/index.json ({audio path: {"npy", "frames"}}) -> (positions in paths
    that have them, their .npy files as bytes, [(path, reason)] of the others, each named: stage 2 needs targets)."""
    try:
        with open(os.path.join(store_dir, "index.json")) as f:
            index = {os.path.abspath(p): e["npy"] for p, e in json.load(f).items()}
    except (OSError, ValueError, AttributeError, KeyError, TypeError) as err:
        raise UsageError(f"{store_dir}/index.json: unreadable or not a k-means store's ({type(err).__name__}); "
                         f"rerun kmeans.py with --out {store_dir} to write it again") from None
    kept = [i for i, p in enumerate(paths) if os.path.abspath(p) in index]
    skipped = [(p, f"{p}: no k-means targets in {store_dir}") for p in paths if os.path.abspath(p) not in index]
    for _, reason in skipped:
        warnings.warn(f"skipping {reason} (kmeans.py skipped it or it is new)", stacklevel=2)
    npys = [os.fsencode(os.path.join(store_dir, index[os.path.abspath(paths[i])])) for i in kept]
    return np.array(kept, dtype=np.int64), np.array(npys, dtype=bytes), skipped


def cut_frames(array, start, T, fill, dtype):
    """Rows [start, start + T), `fill` past the end -> tensor; in numpy, as small torch ops can stall a busy process."""
    out = np.full((T,) + array.shape[1:], fill, dtype)
    part = array[start: start + T]
    out[: len(part)] = part
    return torch.from_numpy(out)


def frame_labels(npy, start, T, n_frames):
    """Frames [start, start + T) of a file's k-means labels, -1 past its end -> (T,) int64."""
    try:
        labels = np.load(os.fsdecode(npy), mmap_mode="r")
        wrong = f"{labels.size} labels for {n_frames} frames" if labels.shape != (n_frames,) else ""
    except (OSError, ValueError) as err:  # deleted, cut short
        wrong = f"unreadable ({err})"
    if wrong:  # another file's labels, or a damaged file: it cannot train stage 2
        raise UsageError(f"{os.fsdecode(npy)}: {wrong}; delete it and rerun kmeans.py with the same --out")
    return cut_frames(labels, start, T, -1, np.int64)


# ---------------------------------------------------------------- the frozen codec and trained models [2.1]
def load_codec(source="pretrained"):
    """EnCodec: "pretrained" (a torch hub download), a local checkpoint, or "random" (seeded; a new copy each call)."""
    if source == "random":  # offline tests and demos: its targets are not the paper's
        from extras.random_codec import random_codec
        return random_codec()
    if source == "pretrained":
        try:
            return M.Codec(M.build_encodec(pretrained=True), source)
        except Exception as err:  # any download failure ends here, loudly
            raise RuntimeError(
                f"EnCodec's pretrained 24 kHz weights could not be loaded ({err}); this machine may be offline.\n"
                "  Copy encodec_24khz-d7cc33bc.th from a machine with internet and pass --encodec PATH, or use\n"
                "  --encodec random (seeded, for smoke tests only: its targets are not the paper's).") from err
    if not os.path.isfile(source):
        raise FileNotFoundError(f"--encodec {source!r}: no such checkpoint file (pretrained, random or a .th path)")
    return M.Codec(M.build_encodec(False, torch.load(source, map_location="cpu", weights_only=True)), source)


def load_checkpoint(path, keys=("model", "config", "encodec")):
    """A train.py checkpoint -> (EnCodecMAE in eval mode, the dict). Strict: any problem is a ValueError naming it."""
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, not a torch file, foreign pickles: the file, not the code
        raise ValueError(f"{path}: not a readable checkpoint (truncated, or not one: {type(err).__name__})") from None
    missing = [k for k in keys if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise ValueError(f"{path}: not a train.py checkpoint (no {', '.join(missing)})")
    try:  # a strict load: the weights must fit the config stored with them
        net = M.EnCodecMAE(M.ModelConfig(**ckpt["config"]))
        net.load_state_dict(ckpt["model"])
    except (ValueError, TypeError, RuntimeError, ArithmeticError) as err:  # n_heads 0: a ZeroDivisionError
        what = "weights do not fit the config stored with them" if isinstance(err, RuntimeError) else "config is wrong"
        raise ValueError(f"{path}: its model {what} ({str(err).strip().splitlines()[0]})") from None
    return net.eval(), ckpt
