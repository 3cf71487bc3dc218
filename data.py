"""Data for EnCodecMAE, section 3.1: audio -> mono 24 kHz -> random 4-s crops, and the frozen codec.

Used by train.py, kmeans.py and evaluate.py (no command of its own). It reads what libsndfile
reads (wav, flac, ogg, mp3) from folders or .txt lists of paths, visits each file ceil(length / 4 s)
times per epoch and skips a bad file with one warning naming it. `load_codec` gives the frozen
EnCodec, `load_checkpoint` a trained model. Crops carry `padding`: True where a frame is not real
audio. The last section holds what every command line shares (one-line errors, atomic writes):
the paper's method ends before it.
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
import traceback
import warnings
from typing import NamedTuple

import numpy as np
import soundfile as sf
import torch
from torch.utils.data import Dataset

import model as M
from model import CROP_SAMPLES, HOP, SAMPLE_RATE, num_frames

AUDIO_EXTS = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff")
MIN_RATE = 1000    # sample rates outside [MIN_RATE, MAX_RATE]: a broken header, not an exotic file
MAX_RATE = 384000
MAX_PEAK = 1e3     # samples 60 dB beyond full scale: a broken file (or integer PCM stored as float)


# ---------------------------------------------------------------- reading audio [3.1]
class AudioError(Exception):
    """A file that cannot be training audio; the message names the file and what is wrong."""


def resampled_length(n_src, rate):
    """Samples at 24 kHz of n_src samples at `rate`: an exact integer ceil, no float rounding."""
    return (n_src * SAMPLE_RATE + rate - 1) // rate


def read_header(path):
    """(sample rate, samples) from the header, or AudioError. The last sample is read back (one
    seek, 0.1 ms) to catch a file cut short; not for mp3, where a seek parses every frame before
    it: read_audio notices then."""
    if os.path.isdir(path):
        raise AudioError(f"{path}: a folder, not an audio file")
    if not os.path.isfile(path):
        raise AudioError(f"{path}: no such file")
    if not os.access(path, os.R_OK):
        raise AudioError(f"{path}: permission denied")
    if os.path.getsize(path) == 0:
        raise AudioError(f"{path}: empty file (0 bytes)")
    try:
        f = sf.SoundFile(os.fsencode(path))  # bytes: soundfile encodes a str as UTF-8
    except (RuntimeError, OSError) as err:  # libsndfile's own text can mislead
        raise AudioError(f"{path}: not an audio file libsndfile can decode "
                         "(unknown format or corrupt header)") from err
    with f:
        rate = f.samplerate
        n_src = f.frames
        if not MIN_RATE <= rate <= MAX_RATE:
            raise AudioError(f"{path}: absurd sample rate {rate} Hz "
                             f"(allowed {MIN_RATE}..{MAX_RATE})")
        if n_src <= 0:
            raise AudioError(f"{path}: empty file (zero samples)")
        with contextlib.suppress(RuntimeError, OSError):
            f.seek(n_src - 1 if f.format != "MP3" else 0)
            if len(f.read(1, dtype="float32")) == 1:
                return rate, n_src
    raise AudioError(f"{path}: truncated or corrupt: its header promises {n_src} samples, "
                     "the last cannot be read")


def probe_audio(path):
    """Length in 24-kHz samples from the header alone (cheap), or AudioError."""
    rate, n_src = read_header(path)
    return resampled_length(n_src, rate)


@functools.lru_cache(maxsize=None)
def resampler(rate):
    """torchaudio's resampler to 24 kHz: its sinc kernel is built once per rate."""
    import torchaudio.transforms as AT  # imported only when a file is not at 24 kHz
    return AT.Resample(rate, SAMPLE_RATE)


def resample_24k(x, rate):
    """(..., n) at `rate` -> (..., resampled_length(n, rate)) at 24 kHz, on x's device."""
    return resampler(rate).to(x.device, x.dtype)(x)


def read_audio(path, start=0, frames=None, header=None):
    """24-kHz samples [start, start + frames) of a file as mono float32 (n,); `header`: the
    file's (rate, samples) if known. Only the source samples the crop needs are read: starting on
    a multiple of o keeps the polyphase filter's phase, and margins wider than the sinc filter (and
    an mp3 seek's 2304-sample warm-up) make the crop equal the whole file resampled."""
    rate, n_src = read_header(path) if header is None else (int(header[0]), int(header[1]))
    n = resampled_length(n_src, rate)
    stop = n if frames is None else min(n, start + frames)
    g = math.gcd(rate, SAMPLE_RATE)
    o = rate // g  # o source samples <-> q output samples
    q = SAMPLE_RATE // g
    margin = math.ceil((6 * o / (0.99 * min(o, q)) + 2 + 2304) / o)
    first = max(0, start // q - margin)
    s0 = first * o
    s1 = min(n_src, (stop // q + 1 + margin) * o)
    try:
        with sf.SoundFile(os.fsencode(path)) as f:
            f.seek(s0)
            x = f.read(s1 - s0, dtype="float32", always_2d=True)  # (n_read, channels)
    except (RuntimeError, OSError) as err:
        raise AudioError(f"{path}: corrupt audio data between samples {s0} and {s1} "
                         f"({err})") from err
    if len(x) < s1 - s0:  # so every read of a file agrees on its length, or fails
        raise AudioError(f"{path}: truncated: its header promises {n_src} samples, "
                         f"the data ends at {s0 + len(x)}")
    peak = np.abs(x).max()  # NaN if any sample is NaN
    if not np.isfinite(peak):
        raise AudioError(f"{path}: NaN or inf samples")
    if peak > MAX_PEAK:
        raise AudioError(f"{path}: samples beyond +-{MAX_PEAK:g} (peak {peak:.3g}); audio should "
                         "lie in [-1, 1] (integer PCM stored as float?)")
    wav = torch.from_numpy(x.mean(axis=1))  # downmix to mono (n_read,)
    if rate != SAMPLE_RATE:
        wav = resample_24k(wav, rate)
    offset = start - first * q  # where `start` falls in what was read
    return wav[offset: offset + stop - start]


def list_audio(sources, demo_dir="demo_audio"):
    """Audio paths from folders (recursive, sorted) and .txt lists; "demo" is the synthetic set."""
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    paths = []
    for src in map(str, sources):
        if src == "demo":
            from extras.demo_signals import write_demo_dataset  # teaching and tests only
            paths += write_demo_dataset(demo_dir)
        elif os.path.isfile(src) and src.endswith(".txt"):
            with open(src, errors="surrogateescape") as f:  # a path per line, relative to the list
                lines = [line.strip() for line in f]
            folder = os.path.dirname(src)
            paths += [os.path.join(folder, p) for p in lines if p and not p.startswith("#")]
        elif os.path.isdir(src):
            paths += find_audio(src)
        else:
            raise FileNotFoundError(f"data source {src!r} is neither a directory nor a .txt list")
    return paths


def find_audio(folder):
    """The audio files under a folder, sorted; an unreadable folder is named in a warning."""
    def unreadable(err):
        warnings.warn(f"skipping {err.filename}: {err.strerror} (a folder that cannot be read)")
    found = []
    for root, folders, names in os.walk(folder, onerror=unreadable):
        found += [os.path.join(root, n) for n in names if n.lower().endswith(AUDIO_EXTS)]
        for name in folders:
            if name.lower().endswith(AUDIO_EXTS):
                warnings.warn(f"{os.path.join(root, name)}: a folder named like an audio file; "
                              "it is searched as a folder, not read as audio")
    if not found:
        raise ValueError(f"data source {folder!r}: no audio files ({', '.join(AUDIO_EXTS)})")
    return sorted(found)


# ---------------------------------------------------------------- files as arrays [3.1]
class Files(NamedTuple):
    """Audio files as arrays, not one Python object per file: DataLoader workers share arrays,
    while a list of str is copied into every worker. The file index (extras/file_index.py)
    gives the same."""

    paths: np.ndarray   # (F,) bytes, os.fsencode of each path
    rates: np.ndarray   # (F,) int64 source sample rate
    frames: np.ndarray  # (F,) int64 source samples

    @property
    def lengths(self):
        """(F,) samples at 24 kHz."""
        return resampled_length(self.frames, self.rates)

    def path(self, i):
        return os.fsdecode(self.paths[i])

    def take(self, idx):
        return Files(self.paths[idx], self.rates[idx], self.frames[idx])


def scan_audio(paths):
    """Every header read here, each bad file named in a warning -> (Files, [(path, reason)])."""
    kept = []
    headers = []
    skipped = []
    for path in paths:
        try:
            headers.append(read_header(path))
            kept.append(os.fsencode(path))
        except AudioError as err:
            skipped.append((path, str(err)))
            warnings.warn(f"skipping {err}", stacklevel=2)
    rates, frames = np.array(headers, dtype=np.int64).reshape(-1, 2).T
    return Files(np.array(kept, dtype=bytes), rates, frames), skipped


def file_id(path):
    """A stable name for a file's derived arrays (k-means labels, cached frames)."""
    return hashlib.sha1(os.fsencode(os.path.abspath(path))).hexdigest()[:16]


# ---------------------------------------------------------------- datasets of 4-s crops [3.1]
class Crop(NamedTuple):
    """One training crop and what belongs to its frames."""

    wav: torch.Tensor      # (CROP_SAMPLES,) float32, zeros where padded
    padding: torch.Tensor  # (T,) bool, True = padded frame
    extra: torch.Tensor    # (T,) int64 k-means targets, -1 where absent or padded


def visits_per_file(lengths, crop):
    """How often each file is visited per epoch: ceil(length / crop), so long audio is seen more."""
    return (np.asarray(lengths) + crop - 1) // crop


class Visits(Dataset):
    """Items over files, a file counting ceil(length / crop) times [3.1], found by a binary search:
    the dataset holds (F,) arrays only. An item's crop depends on (seed, epoch, index) alone: call
    set_epoch(e) every epoch."""

    def __init__(self, lengths, crop, seed):
        self.ends = np.cumsum(visits_per_file(lengths, crop))  # (F,) items of files 0..f together
        self.lengths = lengths
        self.crop = crop
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return int(self.ends[-1]) if len(self.ends) else 0

    def file_of(self, item):
        """The file an item crops (files, for an array of items)."""
        return np.searchsorted(self.ends, item, side="right")

    def crop_start(self, item, step):
        """A random start on a multiple of `step` with the crop inside the file (0 if shorter)."""
        room = max(0, int(self.lengths[self.file_of(item)]) - self.crop) // step
        rng = np.random.default_rng([self.seed, self.epoch, item])
        return step * int(rng.integers(room + 1))


class CropDataset(Visits):
    """Random 4-s crops of audio files -> Crop(wav, padding, extra). `paths`: a list (headers read
    now) or Files; `extra_store`: stage 2's k-means targets (kmeans.py). A file that fails when
    read is named in a warning and the next item stands in for it."""

    def __init__(self, paths, seed=0, extra_store=None, n_skipped=0):
        if isinstance(paths, Files):
            self.files = paths
            self.skipped = []
        else:
            self.files, self.skipped = scan_audio(paths)
        self.store = None
        self.failed = {}  # path -> why it failed when read
        self.n_scanned_out = n_skipped  # files the caller's scan already left out
        if extra_store is not None:
            names = list(map(os.fsdecode, self.files.paths))
            kept, self.store, unlabelled = load_frame_store(extra_store, names)
            self.files = self.files.take(kept)
            self.skipped = self.skipped + unlabelled
        if not len(self.files.paths):
            raise ValueError(f"no readable audio among {len(paths)} files")
        super().__init__(self.files.lengths, CROP_SAMPLES, seed)

    @property
    def n_skipped(self):
        return len(self.skipped) + len(self.failed) + self.n_scanned_out

    def __getitem__(self, index):
        for k in range(len(self)):
            item = (index + k) % len(self)
            path = self.files.path(self.file_of(item))
            if path in self.failed:
                continue
            try:
                return self.read_crop(item)
            except AudioError as err:  # from now on this file is skipped, in this process
                self.failed[path] = str(err)
                warnings.warn(f"skipping {err}; using another item "
                              f"({len(self.failed)} files failed when read)")
        raise AudioError(f"none of the {len(self.files.paths)} files of the dataset could be read")

    def read_crop(self, item):
        f = self.file_of(item)
        T = num_frames(self.crop)
        # Deviation: crops start on a codec hop (13 ms grid), not any sample, so frame-level
        # stores (k-means targets, the cache) line up with them.
        start = self.crop_start(item, HOP)
        header = (self.files.rates[f], self.files.frames[f])
        wav = read_audio(self.files.path(f), start, self.crop, header)
        padding = torch.arange(T) >= num_frames(len(wav))  # (T,) a partly filled frame is real
        extra = torch.full((T,), -1, dtype=torch.int64)
        if self.store is not None:
            extra = frame_labels(self.store[f], start // HOP, T, num_frames(int(self.lengths[f])))
        wav = cut_frames(wav.numpy(), 0, self.crop, 0, np.float32)  # (CROP_SAMPLES,) zero-padded
        return Crop(wav, padding, extra.masked_fill(padding, -1))


# ---------------------------------------------------------------- k-means targets of stage 2 [2.3]
def load_frame_store(store_dir, paths, warn=True):
    """Each path's k-means targets, from STORE/index.json ({audio path: {"npy", "frames"}}) ->
    (positions in paths that have them, their .npy files as bytes, [(path, reason)] of the others,
    each named in a warning: stage 2 needs targets)."""
    try:
        with open(os.path.join(store_dir, "index.json")) as f:
            index = {os.path.abspath(p): e["npy"] for p, e in json.load(f).items()}
    except (OSError, ValueError, AttributeError, KeyError, TypeError) as err:
        raise UsageError(f"{store_dir}/index.json: unreadable or not a k-means store's "
                         f"({type(err).__name__}); rerun kmeans.py with --out {store_dir}"
                         ) from None
    kept = []
    npys = []
    skipped = []
    for i, path in enumerate(paths):
        name = index.get(os.path.abspath(path))
        if name is None:
            skipped.append((path, f"{path}: no k-means targets in {store_dir}"))
        else:
            kept.append(i)
            npys.append(os.fsencode(os.path.join(store_dir, name)))
    if paths and not kept:  # a store made on other data: nothing of this --data can train stage 2
        raise UsageError(f"--kmeans_store {store_dir} labels none of the {len(paths)} files of "
                         "--data (it was made on other audio): run kmeans.py on this data")
    for _, reason in skipped if warn else []:
        warnings.warn(f"skipping {reason} (kmeans.py skipped it or it is new)", stacklevel=2)
    return np.array(kept, dtype=np.int64), np.array(npys, dtype=bytes), skipped


def cut_frames(array, start, T, fill, dtype):
    """Rows [start, start + T) of an array, `fill` past its end -> tensor (in numpy: small torch
    ops can stall a busy process)."""
    out = np.full((T,) + array.shape[1:], fill, dtype)
    part = array[start: start + T]
    out[: len(part)] = part
    return torch.from_numpy(out)


def frame_labels(npy, start, T, n_frames):
    """Frames [start, start + T) of a file's k-means labels, -1 past its end -> (T,) int64."""
    try:
        labels = np.load(os.fsdecode(npy), mmap_mode="r")
        wrong = "" if labels.shape == (n_frames,) else f"{labels.size} labels for {n_frames} frames"
    except (OSError, ValueError) as err:  # deleted, cut short
        wrong = f"unreadable ({err})"
    if wrong:  # another file's labels, or a damaged file: it cannot train stage 2
        raise UsageError(f"{os.fsdecode(npy)}: {wrong}; delete it and rerun kmeans.py with the "
                         "same --out")
    return cut_frames(labels, start, T, -1, np.int64)


# ---------------------------------------------------------------- the codec, trained models [2.1]
CHECKPOINTS = "ckpt-" + "[0-9]" * 8 + ".pt"  # train.py's checkpoint names: OUT/ckpt-00001000.pt


def load_codec(source="pretrained"):
    """EnCodec: "pretrained" (a torch hub download), a local checkpoint file, or "random" (seeded,
    offline; a new copy each call). Nothing falls back to random weights by itself."""
    if source == "random":  # offline tests and demos: its targets are not the paper's
        from extras.random_codec import random_codec
        return random_codec()
    if source != "pretrained":
        if not os.path.isfile(source):
            raise FileNotFoundError(f"--encodec {source!r}: no such checkpoint file "
                                    "(pretrained, random or a .th path)")
        try:
            state = torch.load(source, map_location="cpu", weights_only=True)
            return M.Codec(M.build_encodec(False, state), source)
        except Exception as err:  # not a torch file, or weights of another model
            first = str(err).strip().splitlines()[0][:160]
            raise UsageError(f"--encodec {source}: not the weights of EnCodec's 24 kHz model "
                             f"(encodec_24khz-d7cc33bc.th): {first}") from None
    try:
        return M.Codec(M.build_encodec(pretrained=True), source)
    except Exception as err:  # any download failure ends here, loudly
        raise RuntimeError(
            f"EnCodec's pretrained 24 kHz weights could not be loaded ({err}); this machine may be "
            "offline.\n  Copy encodec_24khz-d7cc33bc.th from a machine with internet and pass "
            "--encodec PATH, or use\n  --encodec random (seeded, for smoke tests only: its targets "
            "are not the paper's).") from err


def load_checkpoint(path, keys=("model", "config", "encodec")):
    """A train.py checkpoint -> (EnCodecMAE in eval mode, the dict). Strict: any problem is a
    ValueError naming the file and what is wrong with it."""
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, not a torch file, foreign pickles: the file, not the code
        raise ValueError(f"{path}: not a readable checkpoint (truncated, or not one: "
                         f"{type(err).__name__})") from None
    missing = [k for k in keys if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise ValueError(f"{path}: not a train.py checkpoint (no {', '.join(missing)})")
    try:  # a strict load: the weights must fit the config stored with them
        net = M.EnCodecMAE(M.ModelConfig(**ckpt["config"]))
        net.load_state_dict(ckpt["model"])
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0]
        raise ValueError(f"{path}: its model weights do not fit the config stored with them "
                         f"({first})") from None
    except (ValueError, TypeError, ArithmeticError) as err:  # n_heads 0: a ZeroDivisionError
        raise ValueError(f"{path}: its model config is wrong ({str(err).strip()})") from None
    return net.eval(), ckpt


# ---------------------------------------------------------------- what every command line shares
class UsageError(Exception):
    """A user's mistake (a bad flag, a bad file): one line on stderr and exit status 2."""


class Parser(argparse.ArgumentParser):
    """argparse whose errors are a UsageError: one line, not the usage block."""

    def error(self, message):
        raise UsageError(message)


def run_cli(main, argv=None):
    """Run a command line's main: a UsageError, or an option whose extras/ file is missing, is one
    line and exit status 2. SIGTERM and SIGUSR1 (what schedulers send before a kill) stop it as
    Ctrl-C does, unwinding (a write_atomic on the way removes its temporary file): one line and
    exit status 128 + the signal."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt(signum)
    name = os.path.basename(sys.argv[0])
    before = {s: signal.signal(s, interrupt) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        return main(argv)
    except UsageError as err:  # from a DataLoader worker it follows the worker's traceback
        message = re.sub(r"^[\w.]*UsageError: ", "", str(err).strip().splitlines()[-1])
        print(f"{name}: error: {message}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    except ModuleNotFoundError as err:  # an option that needs extras/, deleted here
        if not (err.name or "").startswith("extras"):
            raise
        line = traceback.extract_tb(err.__traceback__)[-1].line  # the import that failed
        module = re.search(r"(?:from|import) (extras[\w.]*)", line or "")
        missing = module[1].replace(".", "/") + ".py" if module else "extras/"
        print(f"{name}: error: this option needs {missing}, which is not here (extras/ deleted?)",
              file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    except KeyboardInterrupt as err:
        signum = err.args[0] if err.args else signal.SIGINT
        print(f"{name}: stopped by {signal.Signals(signum).name}; the work finished is kept: "
              "the same command resumes it", file=sys.stderr, flush=True)
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
        what = "an integer" if kind is int else "a number"
        bound = f" and <= {high}" if high < math.inf else ""
        raise argparse.ArgumentTypeError(f"{text}: must be {what} >= {low}{bound}")
    return number


def write_atomic(path, write):
    """Write via `{path}.tmp{pid}` and os.replace, so the name never holds half a file; a write
    that fails (a full disk, a read-only folder) is a UsageError saying so."""
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
        cause = err if isinstance(err, OSError) else err.__context__  # torch.save wraps it
        if not isinstance(cause, OSError):
            raise
        raise UsageError(f"cannot write {path}: {cause.strerror or cause}; free space or choose a "
                         "folder you can write (what was written before is intact)") from None


def make_folder(path, flag="--out"):
    """An output folder, made if missing; one we cannot write is a UsageError naming the flag."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as err:  # FileExistsError: a file of that name
        raise UsageError(f"{flag} {path}: cannot make this folder ({err.strerror}); "
                         f"choose another {flag}") from None
    if not os.access(path, os.W_OK | os.X_OK):  # root may write anywhere but a read-only disk
        raise UsageError(f"{flag} {path}: read-only (no permission to write there); "
                         f"choose another {flag}")
    return path


def device(text):
    """An argparse type: a torch device this machine has (one line, not torch's error mid-run)."""
    with contextlib.suppress(RuntimeError):  # not a device name: refused below
        dev = torch.device(text)
        gpus_here = dev.type == "cuda" and (dev.index or 0) < torch.cuda.device_count()
        if dev.type == "cpu" or gpus_here:
            return dev
    gpus = ", cuda or cuda:N" if torch.cuda.is_available() else ""
    raise argparse.ArgumentTypeError(f"{text}: not a device here; use cpu{gpus}")


def encodec_source(text):
    """An argparse type: pretrained, random or an EnCodec checkpoint file (before any download)."""
    if text not in ("pretrained", "random") and not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"{text}: use pretrained, random or the path of an "
                                         "encodec_24khz-*.th file")
    return text
