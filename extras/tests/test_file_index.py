"""Tests of the file index for the paper's 1.7M files (extras/file_index.py)."""
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
from extras import cache, file_index, random_codec
from extras import demo_audio as demo
from model import CROP_FRAMES, CROP_SAMPLES, HOP, SAMPLE_RATE, gap_mask, make_config, num_frames
from test_all import (TINY_RUN, codec, demo_cache, losses, short_cache, stage_one, three_sounds_task,  # noqa: F401
                      tiny_checkpoint, tone, write)

torch.set_num_threads(1)


def tiny_wavs(folder, n, first=0):
    """n tiny 16-bit wavs, written as bytes (sf.write costs ~5 ms a file): file i has i % 50 + 1
    samples at 16 or 24 kHz -> paths."""
    import struct
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i in range(first, first + n):
        size, rate = 2 * (i % 50 + 1), (16000, 24000)[i % 2]
        path = os.path.join(folder, f"{i:05d}.wav")
        with open(path, "wb") as f:
            f.write(b"RIFF" + struct.pack("<I", 36 + size) + b"WAVEfmt " +
                    struct.pack("<IHHIIHH", 16, 1, 1, rate, 2 * rate, 2, 16) + b"data" +
                    struct.pack("<I", size) + bytes(size))
        paths.append(path)
    return paths


def test_file_index_reads_thousands_of_headers_in_parallel_and_skips_bad_files(tmp_path, capsys):
    """[3.1] one index over every --data source: rate and length of each file, bad files warned once."""
    a, b = tiny_wavs(tmp_path / "a", 1200), tiny_wavs(tmp_path / "b", 800, first=1200)
    (tmp_path / "a" / "corrupt.wav").write_bytes(b"RIFF not really")
    (tmp_path / "b" / "empty.flac").write_bytes(b"")
    out = str(tmp_path / "index.npz")
    with pytest.warns(UserWarning, match="skipping") as caught:
        file_index.main(["--data", str(tmp_path / "a"), str(tmp_path / "b"), "--out", out,
                         "--workers", "2", "--shard-files", "300"])
    assert len(caught) == 2 and f"-> {out}" in capsys.readouterr().out
    with pytest.warns(UserWarning, match="skipping") as again:  # every later start names them too
        files, source, n_bad = file_index.read_index(out, [tmp_path / "a", tmp_path / "b"])
    assert list(map(os.fsdecode, files.paths)) == a + b and n_bad == 2 and len(again) == 2
    i = np.arange(2000)
    assert (files.frames == i % 50 + 1).all() and (files.rates == np.where(i % 2, 24000, 16000)).all()
    assert (source == (i >= 1200)).all() and not os.path.exists(out + ".parts")
    with pytest.raises(D.UsageError, match="lists the sources"):  # an index is for its own sources only
        file_index.read_index(out, [tmp_path / "a"])


def test_a_killed_index_build_keeps_finished_shards_and_a_rerun_completes_it(tmp_path, monkeypatch):
    """[3.1] a crash keeps finished shards; the rerun reads only the rest and gives the same index."""
    paths = tiny_wavs(tmp_path / "audio", 500)
    straight = file_index.build_index([tmp_path / "audio"], str(tmp_path / "straight.npz"), workers=1, shard_files=100)[0]
    read_header = D.read_header

    def power_cut(path):  # the machine dies while the last shard is read
        if path == paths[450]:
            raise RuntimeError("power cut")
        return read_header(path)
    monkeypatch.setattr(D, "read_header", power_cut)
    out = str(tmp_path / "index.npz")
    with pytest.raises(RuntimeError, match="power cut"):
        file_index.build_index([tmp_path / "audio"], out, workers=1, shard_files=100)
    monkeypatch.undo()
    assert not os.path.exists(out) and len(os.listdir(out + ".parts")) == 4
    with open(paths[10], "wb") as f:  # in a finished shard: a rerun that re-read it would skip it
        f.write(b"garbage")
    files, _, n_bad = file_index.build_index([tmp_path / "audio"], out, workers=1, shard_files=100)
    assert list(map(os.fsdecode, files.paths)) == list(map(os.fsdecode, straight.paths)) == paths and n_bad == 0
    assert (files.frames == straight.frames).all() and (files.rates == straight.rates).all()


def reachable_objects(root):
    """Python objects reachable from root, numpy arrays counted once each (their data is one buffer)."""
    import gc
    seen, todo = set(), [root]
    while todo:
        obj = todo.pop()
        if id(obj) not in seen and not isinstance(obj, type):
            seen.add(id(obj))
            if not isinstance(obj, np.ndarray):
                todo += gc.get_referents(obj)
    return len(seen)


@pytest.mark.parametrize("cached", [False, True])
def test_a_worker_holds_arrays_not_one_python_object_per_file(tmp_path, cached):
    """[3.1] a dataset (as pickled into each DataLoader worker) holds the same few objects for 1k or
    10k files, and under 100 bytes per file."""
    sizes, objects = [], []
    for n in (1000, 10000):
        names = [f"/data/fma/full/{i:06d}.mp3" for i in range(n)]  # never opened
        frames = np.random.default_rng(n).integers(44100, 44100 * 30, n)
        if cached:
            with open(tmp_path / "manifest.jsonl", "w") as f:
                f.writelines(json.dumps({"path": p, "id": D.file_id(p), "samples": int(k), "frames": int(k) // HOP})
                             + "\n" for p, k in zip(names, frames))
            ds = cache.CachedCropDataset(tmp_path)
        else:
            ds = D.CropDataset(D.Files(np.array([os.fsencode(p) for p in names]), np.full(n, 44100), frames))
        from extras.mixing import MixedDataset
        mixed = MixedDataset([ds, ds], [1, 2])
        sizes.append(len(__import__("pickle").dumps(ds)) / n)
        objects.append(reachable_objects(mixed))
    assert objects[0] == objects[1] < 100, objects
    assert sizes[1] < 100 and abs(sizes[1] - sizes[0]) < 0.1 * sizes[0], sizes


def test_training_starts_from_the_index_without_reading_a_header(tmp_path, monkeypatch, capsys):
    """[3.1] with an index, a start (every rank, every resume) lists no folder and reads no header;
    a changed folder rebuilds it."""
    tiny_wavs(tmp_path / "audio", 30)
    sf.write(tmp_path / "audio" / "long.flac", tone(9.0, 16000), 16000)  # 3 crops
    cfg = train.TrainConfig(data=(str(tmp_path / "audio"),), index=str(tmp_path / "index.npz"), val_files=4)
    first = train.build_datasets(cfg, make_config("tiny"), None, 0)
    assert f"index {cfg.index}: missing; building it" in capsys.readouterr().out

    def forbidden(*args, **kwargs):
        raise AssertionError("a header or folder was read at start-up")
    for module, name in [(D.sf, "info"), (D.os, "walk"), (D, "read_header"), (D, "list_audio")]:
        monkeypatch.setattr(module, name, forbidden)
    train_set, val_set, train_files = train.build_datasets(cfg, make_config("tiny"), None, 0)
    assert len(train_set) == len(first[0]) > 25 and len(val_set) == len(first[1]) >= 4
    assert np.array_equal(train_files.paths, first[2].paths)
    long = int(np.flatnonzero(train_set.crops.lengths == 9 * SAMPLE_RATE)[0])
    item, mask = train_set[int(train_set.crops.ends[long]) - 1]  # reads 4 s of long.flac, no header
    assert item.wav.abs().max() > 0.4 and mask.shape == (CROP_FRAMES,)
    monkeypatch.undo()
    tiny_wavs(tmp_path / "audio", 1, first=99)  # the folder changes: the next start rebuilds the index
    again = train.build_datasets(cfg, make_config("tiny"), None, 0)
    assert "changed since it was built; building it" in capsys.readouterr().out
    assert len(again[2].paths) + len(again[1].crops.files.paths) == 32
    with pytest.warns(UserWarning, match="changed since the index"):  # a reader of an old index is told
        os.remove(tmp_path / "audio" / "00099.wav")
        file_index.read_index(cfg.index, cfg.data)
