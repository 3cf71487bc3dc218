"""Prints what the MAE's input costs on this CPU (issue 31): mel and spec inputs beside the codec.

A developer's tool, one sitting: `python .ci/frontend_speed.py` times, for a batch of 16 seeded
random 4-s crops at 1 and 2 threads, extras/filterbank.py (mel, spec), the seeded random codec's
full pass (model.Codec.forward: frames and codes) and its quantizer alone on cached frames; then
the bytes per second of audio a cache of each input would hold in fp16 (+ the int16 codes).
"""
import os
import statistics
import sys
import time
import warnings

import torch

if __package__ in (None, ""):  # run as a script: the core files sit in the folder above
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import model as M
from extras.filterbank import filterbank_frames
from extras.random_codec import random_codec

B = 16


def timed_ms(fn, reps):
    """(median, min) wall milliseconds of fn() over reps calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times), min(times)


@torch.no_grad()
def quantize(codec, emb):
    """What Codec.forward does after the encoder: the RVQ codes of (B, 128, T) frames."""
    with M.codec_precision(emb.device):
        return codec.quantizer.encode(emb, M.FRAME_RATE, 6.0)  # (8, B, T)


def main():
    wav = 0.1 * torch.randn(B, M.CROP_SAMPLES, generator=torch.Generator().manual_seed(31))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its "NOT the paper's" notice: known, timing only
        codec = random_codec()
    emb = codec.raw_frames(wav)  # (B, 128, T): the frames a cache holds
    cases = {  # name: (what runs, how many timed calls: the codec's pass takes seconds)
        "mel front end (filterbank_frames)": (lambda: filterbank_frames(wav, "mel"), 5),
        "spec front end (filterbank_frames)": (lambda: filterbank_frames(wav, "spec"), 5),
        "codec full pass (Codec.forward)": (lambda: codec(wav), 2),
        "codec quantizer alone, cached frames": (lambda: quantize(codec, emb), 5)}
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"batch of {B} random 4-s crops ({M.CROP_FRAMES} frames); ms per batch, median (min) "
          "of 5 calls (the codec's pass: 2) after a warm-up")
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for name, (fn, reps) in cases.items():
            median, fastest = timed_ms(fn, reps)
            print(f"  threads {threads}  {name:40s} {median:8.1f} ({fastest:.1f})")
    one_second = torch.zeros(1, M.SAMPLE_RATE)
    codes = M.FRAME_RATE * codec.n_q * 2  # int16 codes, cached for every input
    print(f"cache per second of audio, fp16 frames + {codes} B of int16 codes:")
    for kind in M.INPUT_DIMS:
        if kind == "encodec":
            frames = codec.features(one_second)
        else:
            frames = filterbank_frames(one_second, kind)
        size = frames[0].numel() * 2 + codes
        per_hour = size * 3600 / 1e6
        print(f"  {kind:8s} {tuple(frames.shape[1:])} per s: {size} B/s = {per_hour:.1f} MB/h")


if __name__ == "__main__":
    main()
