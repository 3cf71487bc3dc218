"""Tests of the benchmarks' arithmetic (extras/bench.py) and weighted mixing (extras/mixing.py)."""
import json
import math
import os
import subprocess
import sys
from dataclasses import asdict

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import data as D
import evaluate as E
import kmeans
import model as M
import train
from extras import bench, cache, file_index, random_codec
from extras import demo_audio as demo
from model import CROP_FRAMES, CROP_SAMPLES, HOP, SAMPLE_RATE, gap_mask, make_config, num_frames
from test_all import (TINY_RUN, codec, demo_cache, losses, short_cache, stage_one, three_sounds_task,  # noqa: F401
                      tiny_checkpoint, tone, write)

torch.set_num_threads(1)


def test_mixing_follows_weights_and_holdout_is_fixed(tmp_path):
    """[3.1] mixed datasets fill shares set by their weights; the validation split is seeded."""
    from extras.mixing import MixedDataset
    a = D.CropDataset([write(tmp_path, "a.wav", tone(40.0))])  # 10 items
    b = D.CropDataset([write(tmp_path, "b.wav", tone(8.0))])  # 2 items
    assert len(MixedDataset([a, b])) == 12
    mixed = MixedDataset([a, b], [1, 3])
    where = np.array([mixed.locate(k) for k in range(len(mixed))])  # (12, 2) dataset, item
    assert len(mixed) == 12 and (where[:, 0] == 1).sum() == 9 and len(mixed[11].wav) == CROP_SAMPLES
    assert (where[where[:, 0] == 1, 1] < 2).all() and len(set(where[where[:, 0] == 0, 1])) == 3
    assert where[3:11].tolist() == [[1, 0], [1, 1]] * 4  # whole passes in order, then a random part
    from extras.validation import readable_holdout
    files = D.scan_audio([write(tmp_path, f"f{i}.wav", tone(0.1)) for i in range(20)])[0]
    train_part, valid = readable_holdout(files, np.arange(20), 4, seed=0)
    assert len(valid) == 4 and sorted(np.r_[train_part, valid]) == list(range(20))
    assert np.array_equal(readable_holdout(files, np.arange(20), 4, seed=0)[1], valid)
    assert not np.array_equal(readable_holdout(files, np.arange(20), 4, seed=1)[1], valid)


def test_benchmark_utilization_cannot_exceed_100_percent():
    """extras/bench.py train: a step faster than the measured GEMM peak is measured against itself, never >100%."""
    peak, how = bench.utilization_peak(120e9, [100e9, 90e9], lambda: 110e9, 11)
    assert peak == 120e9 and "re-measured best of 10: 110" in how and "its own rate" in how
    assert bench.utilization_peak(120e9, [100e9, 90e9], lambda: 130e9, 11)[0] == 130e9
    assert bench.utilization_peak(50e9, [90e9, 100e9], lambda: 1 / 0, 11)[0] == 100e9  # no re-measure
