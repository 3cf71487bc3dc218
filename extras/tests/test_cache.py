"""Tests of the frozen-codec cache (extras/cache.py) and evaluate.py --codec-cache (extras/codec_frames.py)."""
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
from extras import demo_signals
from model import CROP_FRAMES, CROP_SAMPLES, HOP, SAMPLE_RATE, gap_mask, make_config, num_frames
from test_all import (TINY_RUN, codec, demo_cache, losses, short_cache, stage_one, three_sounds_task,  # noqa: F401
                      tiny_checkpoint, tone, write)

torch.set_num_threads(1)


class StandInCodec(torch.nn.Module):
    """A tiny causal stand-in for EnCodec with its forward: (B, n) -> (B, T, 128), (B, T, 8)."""
    n_q, dim, source = 8, 128, "stand-in"

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.proj = torch.nn.Parameter(torch.randn(HOP, 128, generator=g) / HOP ** 0.5)
        self.books = torch.nn.Parameter(torch.randn(128, 8 * 1024, generator=g))

    @torch.no_grad()
    def forward(self, wav):
        B, n = wav.shape
        T = num_frames(n)
        frames = F.pad(wav, (0, T * HOP - n)).view(B, T, HOP)
        feats = torch.tanh(frames @ self.proj * 10)  # (B, T, 128)
        feats = feats + feats.cumsum(1) / torch.arange(1, T + 1)[:, None]  # causal context (LSTM)
        return feats, (feats @ self.books).view(B, T, 8, 1024).argmax(-1)  # (B, T, 128), (B, T, 8)


def test_cache_round_trip_equals_the_codec_on_the_fly(tmp_path):
    """[2.1] cached frames (fp16) and codes of a 4-s clip equal the frozen codec run directly."""
    codec = StandInCodec()
    wav = demo_signals.demo_clips(1, seconds=4.0, seed=5)  # (1, 96000)
    path = write(tmp_path, "clip.wav", wav[0].numpy(), subtype="FLOAT")
    n, skipped = cache.build_cache(codec, [path], tmp_path / "cache")
    assert n == 1 and skipped == []
    crop = cache.CachedCropDataset(tmp_path / "cache")[0]
    feats, codes = codec(wav)
    assert crop.feats.shape == (CROP_FRAMES, 128) and crop.codes.dtype == torch.int64
    assert torch.allclose(crop.feats, feats[0], atol=2e-3, rtol=1e-3)  # fp16 storage
    assert torch.equal(crop.codes, codes[0])
    assert not crop.padding.any() and (crop.extra == -1).all()


def test_cache_chunks_long_files_and_pads_short_ones(tmp_path):
    """[3.1] long files keep ceil(n / HOP) frames across chunks; short cached clips are padded."""
    codec = StandInCodec()
    paths = [write(tmp_path, "long.wav", tone(9.1)), write(tmp_path, "short.wav", tone(1.0))]
    cache.build_cache(codec, paths, tmp_path / "cache", chunk_seconds=4.0)
    ds = cache.CachedCropDataset(tmp_path / "cache", paths=paths[::-1])
    assert ds.lengths.tolist() == [75, num_frames(round(9.1 * SAMPLE_RATE))]
    assert len(ds) == 1 + 3
    assert ds[0].padding.sum() == CROP_FRAMES - 75 and (ds[0].codes[75:] == 0).all()
    head = np.load(tmp_path / "cache" / (ds.ids[1].decode() + ".codes.npy"))[:CROP_FRAMES]
    first_chunk = torch.from_numpy(tone(4.0)).float()[None]  # (1, 96000)
    assert torch.equal(torch.from_numpy(head).long(), codec(first_chunk)[1][0])


def test_a_killed_cache_build_keeps_finished_files_and_a_rerun_completes_it(tmp_path):
    """[3.1] a crash keeps finished files, half-written files are never read, a rerun finishes."""
    paths = [write(tmp_path, f"{i}.wav", tone(1.0 + i)) for i in range(3)]
    cache.build_cache(StandInCodec(), paths, tmp_path / "straight")
    straight = cache.CachedCropDataset(tmp_path / "straight")
    codec, calls, cache_dir = StandInCodec(), [], tmp_path / "cache"

    def crash_on_second_file(wav):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the power goes out mid-run
        return StandInCodec.forward(codec, wav)
    codec.forward = crash_on_second_file
    with pytest.raises(KeyboardInterrupt):
        cache.build_cache(codec, paths, cache_dir)
    assert len(cache.read_manifest(cache_dir)) == 1
    second = cache.read_manifest(tmp_path / "straight")[os.path.abspath(paths[1])]["id"]
    (cache_dir / f"{second}.feats.npy").write_bytes(b"half")  # as if killed before its manifest line
    (cache_dir / f"{second}.codes.npy.tmp99").write_bytes(b"half")
    with open(cache_dir / "manifest.jsonl", "a") as f:
        f.write('{"path": "' + os.path.abspath(paths[1]) + '", "id"')  # a torn line
    assert len(cache.CachedCropDataset(cache_dir)) == 1
    n, _ = cache.build_cache(StandInCodec(), paths, cache_dir)
    assert n == 3 and not [p for p in os.listdir(cache_dir) if ".tmp" in p]
    again = cache.CachedCropDataset(cache_dir)
    assert len(again) == len(straight) == 3
    assert all(torch.equal(again[i].feats, straight[i].feats) for i in range(3))
    with pytest.raises(D.UsageError, match="holds frames of codec 'stand-in', not of --encodec random"):
        cache.build_cache(type("Other", (StandInCodec,), {"source": "random"})(), paths, cache_dir)


def test_a_bad_file_is_skipped_by_name_and_never_costs_its_batch(tmp_path):
    """[3.1] cut-short, huge and codec-breaking files are skipped, named once; batch-mates are cached."""
    mp3 = (tmp_path / write(tmp_path, "0good.mp3", tone(1.0))).read_bytes()
    (tmp_path / "1cut.mp3").write_bytes(mp3[: len(mp3) // 3])  # its header still says 1 s
    huge, loud = tone(1.0), tone(1.0)
    huge[5] = 1e30
    loud[5] = 900.0  # within MAX_PEAK, but our codec below overflows fp16 on it
    paths = [str(tmp_path / "0good.mp3"), str(tmp_path / "1cut.mp3"), write(tmp_path, "2good.wav", tone(1.0)),
             write(tmp_path, "3huge.wav", huge, subtype="FLOAT"), write(tmp_path, "4loud.wav", loud, subtype="FLOAT")]

    class Overflowing(StandInCodec):
        def forward(self, wav):
            feats, codes = super().forward(wav)
            return feats * wav.abs().amax(1)[:, None, None] ** 2, codes  # frames grow with loudness

    with pytest.warns(UserWarning) as caught:
        n, skipped = cache.build_cache(Overflowing(), paths, tmp_path / "cache", batch_seconds=10)
    assert n == 2 and [os.path.basename(p) for p, _ in skipped] == ["1cut.mp3", "3huge.wav", "4loud.wav"]
    messages = [str(w.message) for w in caught]
    for name, reason in (("1cut.mp3", "truncated"), ("3huge.wav", "beyond"), ("4loud.wav", "fp16")):
        assert sum(name in m for m in messages) == 1 and reason in next(m for m in messages if name in m)
    with pytest.warns(UserWarning) as caught:
        ds = cache.CachedCropDataset(tmp_path / "cache", paths=paths)  # what train.py --cache asks for
    assert len(ds) == 2 and ds.n_skipped == 3 and len(caught) == 1  # named by the build, counted here
    assert "3 of 5 files are not in the cache" in str(caught[0].message)


def test_files_without_kmeans_targets_are_skipped_and_counted(tmp_path):
    """[2.3] a file the target store lacks is dropped with a warning and a count, not a KeyError."""
    paths = [write(tmp_path, f"{i}.wav", tone(1.0)) for i in range(3)]
    store = tmp_path / "store"
    store.mkdir()
    np.save(store / "a.npy", np.zeros(75, np.int16))
    (store / "index.json").write_text(json.dumps({os.path.abspath(paths[0]): {"npy": "a.npy", "frames": 75}}))
    cache.build_cache(StandInCodec(), paths, tmp_path / "cache")
    for make in (lambda: D.CropDataset(paths, extra_store=store),
                 lambda: cache.CachedCropDataset(tmp_path / "cache", paths=paths, extra_store=store)):
        with pytest.warns(UserWarning, match="no k-means targets") as caught:
            ds = make()
        assert len(ds) == 1 and ds.n_skipped == 2 and len(caught) == 2
        assert (ds[0].extra[:75] == 0).all()


def test_the_cache_command_checks_its_flags_before_loading_the_codec(tmp_path, monkeypatch, capsys):
    """[3.1] a bad extras/cache.py flag or path: one line naming it, exit status 2, and no codec is loaded."""
    def no_codec(*args, **kwargs):
        raise AssertionError("the codec loaded before the flags were checked")
    monkeypatch.setattr(D, "load_codec", no_codec)
    (tmp_path / "empty").mkdir()
    audio = tmp_path / "audio"
    audio.mkdir()
    write(audio, "a.wav", tone(0.1))
    ok = ["--data", str(audio), "--out", str(tmp_path / "out"), "--encodec", "random", "--device", "cpu"]
    cases = {"--data": ok[:1] + [str(tmp_path / "missing")] + ok[2:],
             "no audio files": ok[:1] + [str(tmp_path / "empty")] + ok[2:],
             "--encodec": ok[:-3] + ["nowhere.th"] + ok[-2:],
             "--device": ok[:-1] + ["cuda:7"],
             "--batch-seconds": ok + ["--batch-seconds", "0"],
             "--chunk-seconds": ok + ["--chunk-seconds", "-1"]}
    for flag, argv in cases.items():
        with pytest.raises(SystemExit) as exit_:
            D.run_cli(cache.main, argv)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and err.count("\n") == 1 and flag in err, (flag, err)
    assert not (tmp_path / "out").exists()
    with capsys.disabled():
        print(f"\nextras/cache.py: {len(cases)} bad command lines tried, {len(cases)} one-line errors with exit status 2")


def test_cached_crops_are_cheap_to_load(tmp_path):
    """[3.1] a cached crop loads in about a millisecond, far below a training step."""
    import time
    paths = [write(tmp_path, f"{i}.wav", tone(10.0, freq=200.0 + i)) for i in range(4)]
    cache.build_cache(StandInCodec(), paths, tmp_path / "cache")
    ds = cache.CachedCropDataset(tmp_path / "cache")
    t0 = time.perf_counter()
    crops = [ds[i] for i in range(len(ds))]
    per_crop = (time.perf_counter() - t0) / len(ds)
    batch = next(iter(DataLoader(ds, batch_size=8, shuffle=True)))
    assert isinstance(batch, cache.CachedCrop) and batch.feats.shape == (8, CROP_FRAMES, 128)
    assert crops[0].feats.dtype == torch.float32 and per_crop < 0.01, per_crop


def test_store_from_the_feature_cache_feeds_a_nine_stream_model(stage_one):
    """[2.3] labels from cached frames line up with the cache_dir; stage 2 trains on Q + 1 = 9 streams."""
    root, paths, checkpoint = stage_one
    cache_dir, store = str(root / "cache"), str(root / "store_cache")
    cache.build_cache(D.load_codec("random"), paths, cache_dir)
    kmeans.main(["--checkpoint", checkpoint, "--cache", cache_dir, "--out", store,
                 "--k", "8", "--n-clips", "3", "--n-frames", "300"])
    mtime = os.path.getmtime(os.path.join(store, "index.json"))
    kmeans.main(["--checkpoint", checkpoint, "--cache", cache_dir, "--out", store, "--k", "8"])  # resumes
    assert os.path.getmtime(os.path.join(store, "index.json")) >= mtime
    data = cache.CachedCropDataset(cache_dir, extra_store=store)
    batch = [data[i] for i in range(len(data))]
    for crop in batch:
        assert ((crop.extra >= 0) == ~crop.padding).all() and crop.extra.max() < 8
    net = D.load_checkpoint(checkpoint)[0]
    stage2 = M.add_kmeans_stream(net)
    assert stage2.cfg.n_streams == 9 and stage2.head.linear.out_features == 9 * stage2.cfg.K
    feats = torch.stack([c.feats for c in batch])  # (B, T, 128)
    targets = torch.cat([torch.stack([c.codes for c in batch]),
                         torch.stack([c.extra for c in batch]).clamp_min(0)[..., None]], -1)  # (B, T, 9)
    padding = torch.stack([c.padding for c in batch])  # (B, T)
    mask = gap_mask((~padding).sum(1), padding.shape[1], 0.5, 15)  # (B, T)
    out = stage2(feats, targets, mask, padding)
    assert out.masked_loss.shape == (9,) and torch.isfinite(out.loss)


def test_codec_cache_embeds_as_without_it_and_later_runs_read_no_audio(tmp_path, monkeypatch):
    """[3.2] --codec-cache keeps the frozen codec's frames of the task clips: the embeddings equal an
    evaluation without it, and a later run (another --out) reads no audio and runs no codec, yet
    still names the clip it skipped."""
    clips = {s: [(torch.randn(9600 + 4800 * (i % 2)) * 0.1, ["a" if i % 2 else "b"]) for i in range(4)]
             for s in ("train", "valid", "test")}
    path = demo.write_task(tmp_path, "lengths", clips, False, False, 0.2)
    (path / "48000" / "train" / "train_0001.wav").write_bytes(os.urandom(300))
    ckpt = tiny_checkpoint(tmp_path / "tiny.pt")
    argv = lambda out, *cache: ["--tasks-dir", str(tmp_path), "--upstream", "EC", "--upstream", ckpt, "--encodec",
                                "random", "--grid-points", "1", "--max-epochs", "3", "--out", str(tmp_path / out), *cache]
    embedded = lambda out: {c.relative_to(tmp_path / out): np.load(c)["X"]
                            for c in sorted((tmp_path / out / "embeddings").rglob("*.npz"))}
    with pytest.warns(UserWarning, match="train_0001.wav"):
        E.main(argv("plain"))
        E.main(argv("kept", "--codec-cache", str(tmp_path / "frames")))
    plain, kept = embedded("plain"), embedded("kept")
    assert len(plain) == 6 and list(plain) == list(kept)  # per upstream: train, valid, test
    assert all(np.allclose(a, b, atol=1e-5) for a, b in zip(plain.values(), kept.values()))
    assert len(list((tmp_path / "frames").rglob("*.npz"))) == 3  # one codec: train, valid, test

    def no_audio(*args, **kwargs):
        raise AssertionError("read audio or ran the codec despite --codec-cache")
    for name in ("read_audio", "probe_audio", "codec_embed_audio"):
        monkeypatch.setattr(E, name, no_audio)
    with pytest.warns(UserWarning, match="train_0001.wav"):
        E.main(argv("later", "--codec-cache", str(tmp_path / "frames")))
    assert all(np.allclose(a, b, atol=1e-5) for a, b in zip(plain.values(), embedded("later").values()))
