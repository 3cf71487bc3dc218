"""Tests of the MAE's filterbank inputs (model.filterbank_frames): the paper's future work, sec. 4.

`python -m pytest -q extras/tests/test_input.py` from the repository root (CPU, offline). The
fixture in extras/tests/fixtures/ was written by the AUTHORS' own Mel/SpectrogramProcessor classes
(`.ci/frontend_fixture.py`, run in a venv outside the repository) on the clips below.
"""
import hashlib
from pathlib import Path

import numpy as np
import torch

import model as M

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "authors_v2_front_end.pt"
SEED = 31
SECONDS = (0.5, 1.0, 4.0)  # Kaldi gives 36, 74 and 300 frames; the codec 38, 75 and 300


def fixture_clips():
    """The fixture's three clips at 24 kHz: a gliding tone with a tremolo over seeded noise, its
    last tenth exact zeros (Kaldi's log floor)."""
    rng = np.random.default_rng(SEED)
    clips = []
    for seconds in SECONDS:
        n = int(seconds * M.SAMPLE_RATE)
        t = np.arange(n) / M.SAMPLE_RATE
        glide = np.sin(2 * np.pi * (220 * t + 300 * t ** 2))
        tremolo = 0.6 + 0.4 * np.sin(2 * np.pi * 3 * t)
        tone = glide * tremolo
        clip = 0.3 * tone + 0.03 * rng.standard_normal(n)
        clip[int(0.9 * n):] = 0.0
        clips.append(clip.astype(np.float32))
    return clips


def sha(clip):
    return hashlib.sha256(clip.tobytes()).hexdigest()


def test_mel_and_spec_inputs_equal_the_authors_v2_front_end():
    """On every frame both have, our mel and spec inputs equal their v2 processors' within 1e-5,
    and ours always has the codec's num_frames(n) frames, each of the kind's INPUT_DIMS width."""
    fixture = torch.load(FIXTURE, weights_only=True)
    for clip, theirs in zip(fixture_clips(), fixture["clips"], strict=True):
        assert sha(clip) == theirs["sha256"], "the clips changed: rerun .ci/frontend_fixture.py"
        n = len(clip)
        for kind in ("mel", "spec"):
            ours = M.filterbank_frames(torch.from_numpy(clip)[None], kind)[0]  # (T, bins)
            assert ours.dtype == torch.float32
            assert ours.shape == (M.num_frames(n), M.INPUT_DIMS[kind]), (kind, n)
            rows = theirs["frames"]  # the recorded frames, all below their count and ours
            diff = float((ours[rows] - theirs[kind]).abs().max())
            print(f"{n / M.SAMPLE_RATE:.1f} s {kind}: {len(ours)} frames (theirs {theirs['T']}), "
                  f"max abs diff {diff:.1e} on {len(rows)} of them")
            assert diff <= 1e-5, (kind, n, diff)
    for n in (240, 12001, 150000, 240000):  # under one window; past 4.25 s Kaldi gives MORE frames
        for kind in ("mel", "spec"):
            wav = torch.full((2, n), 0.01)
            assert M.filterbank_frames(wav, kind).shape == (2, M.num_frames(n), M.INPUT_DIMS[kind])
