"""Tests of the MAE's filterbank inputs (extras/filterbank.py): the paper's future work, sec. 4.

`python -m pytest -q extras/tests/test_input.py` from the repository root (CPU, offline). The
fixture in extras/tests/fixtures/ was written by the AUTHORS' own Mel/SpectrogramProcessor classes
(`.ci/frontend_fixture.py`, run in a venv outside the repository) on the clips below.
"""
import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

import model as M
from extras.filterbank import filterbank_frames

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
            ours = filterbank_frames(torch.from_numpy(clip)[None], kind)[0]  # (T, bins)
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
            assert filterbank_frames(wav, kind).shape == (2, M.num_frames(n), M.INPUT_DIMS[kind])


# ---------------------------------------------------------------- the input choice, end to end
from test_all import TINY_RUN, codec, losses, short_cache  # noqa: E402,F401


def test_a_filterbank_input_trains_from_audio_and_from_the_cache_with_the_codecs_targets(
        short_cache, tmp_path):
    """[4] --input mel (or spec): the MAE reads the filterbank, Linear(256 -> D), the targets are
    still the codec's codes; from raw audio and from the codec cache alike; it is in the
    checkpoint's config, and stage 2 continues on it."""
    import data as D
    import train
    audio, cache_dir = short_cache
    run = TINY_RUN + ["--data", audio, "--batch_size", "2", "--steps", "2", "--ckpt_every", "2"]
    train.main(run + ["--input", "mel", "--out", str(tmp_path / "raw")])
    train.main(run + ["--input", "mel", "--cache", cache_dir, "--out", str(tmp_path / "cached")])
    for out in ("raw", "cached"):
        model, ckpt = D.load_checkpoint(str(tmp_path / out / "ckpt-00000002.pt"))
        assert ckpt["config"]["input"] == "mel" and model.in_proj.in_features == 256
        assert all(0 < loss < 8 for loss in losses(tmp_path / out).values())  # about ln(1024)
    stage1 = D.load_checkpoint(str(tmp_path / "cached" / "ckpt-00000002.pt"))[0]
    assert stage1.cfg.d_input == 256 and M.make_config("tiny").d_input == 128


def test_cached_filterbank_crops_are_the_filterbank_of_the_same_audio(short_cache, codec, tmp_path):
    """[4] a crop from the cache for input mel: its frames are the filterbank of the audio the
    codec's codes of that crop came from, frame for frame (padded clips, and crops inside a
    longer file)."""
    import soundfile as sf
    from extras import cache, demo_signals
    from extras.cache import CachedCropDataset
    import data as D
    audio, cache_dir = short_cache
    long = str(tmp_path / "long.wav")
    sf.write(long, demo_signals.synth_clip("chord", 7.0, 2).numpy(), M.SAMPLE_RATE)
    cache_dir = str(tmp_path / "cache")
    paths = [long] + D.list_audio(audio)[:2]
    cache.build_cache(codec, paths, cache_dir)
    codes = CachedCropDataset(cache_dir, seed=3)
    mel = CachedCropDataset(cache_dir, seed=3, input_kind="mel")
    for i in range(len(mel)):
        crop, same = mel[i], codes[i]
        assert torch.equal(crop.codes, same.codes) and torch.equal(crop.padding, same.padding)
        start = mel.crop_start(i, 1)  # in frames
        path = mel.audio[mel.file_of(i)].decode()
        wav = D.read_audio(path, start * M.HOP, M.CROP_SAMPLES)
        wav = torch.nn.functional.pad(wav, (0, M.CROP_SAMPLES - len(wav)))
        want = filterbank_frames(wav[None], "mel")[0]  # (300, 256)
        assert crop.feats.shape == (M.CROP_FRAMES, 256) and torch.allclose(crop.feats, want)
    assert any(mel.crop_start(i, 1) > 0 for i in range(len(mel)))  # some crops start inside a file


def test_a_filterbank_model_embeds_without_any_codec_in_kmeans_evaluate_and_hear(
        short_cache, tmp_path, monkeypatch):
    """[4] a mel-input checkpoint (and ECMAE-R:tiny:mel) embeds from the filterbank alone, in
    4-s chunks: evaluate.embed_file, the HEAR module and kmeans.py never load a codec."""
    import dataclasses
    import data as D
    import evaluate as E
    import kmeans
    audio, _ = short_cache
    torch.manual_seed(0)
    cfg = M.make_config("tiny", input="mel")
    path = str(tmp_path / "mel.pt")
    torch.save({"model": M.EnCodecMAE(cfg).state_dict(), "config": dataclasses.asdict(cfg),
                "encodec": "random", "step": 0}, path)
    monkeypatch.setattr(D, "load_codec", lambda *a: pytest.fail("a codec loaded"))
    mae = D.load_checkpoint(path)[0]
    wav_path = D.list_audio(audio)[-1]
    wav = D.read_audio(wav_path)
    long = torch.cat([wav, wav, wav])[None]  # (1, n) over 4 s: two chunks
    upstream = E.load_upstream(path)
    want = M.embed_audio(mae, None, long)[0]  # (T, 128)
    assert torch.allclose(upstream.frames(long)[0], want) and len(want) == M.num_frames(long.shape[1])
    assert torch.allclose(E.embed_file(upstream, wav_path), M.embed_audio(mae, None, wav[None])[0])
    hear = E.load_model(path)
    assert E.get_scene_embeddings(torch.zeros(2, 48000), hear).shape == (2, 128)
    assert E.load_upstream("ECMAE-R:tiny:mel").mae.in_proj.in_features == 256
    store = tmp_path / "km"
    kmeans.main(["--checkpoint", path, "--data", audio, "--out", str(store), "--k", "4",
                 "--n-clips", "4", "--n-frames", "200"])
    assert len(list(store.glob("*.npy"))) == len(D.list_audio(audio))
