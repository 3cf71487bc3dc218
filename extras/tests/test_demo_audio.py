"""Tests of the demo audio and the seeded random codec (extras/demo_audio.py, extras/random_codec.py)."""
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


def test_random_codec_is_deterministic_and_uses_many_codes(codec):
    """[2.1] the seeded random codec gives the same targets twice and many distinct codes per stream."""
    wav = demo_signals.demo_clips(8, seconds=1.0, seed=21)
    feats, codes = codec(wav)
    assert feats.shape == (8, 75, 128) and codes.shape == (8, 75, 8)
    random_codec._BUILT.clear()  # rebuild it from the seed alone
    with pytest.warns(UserWarning):
        again = D.load_codec("random")
    assert torch.equal(again(wav)[1], codes) and torch.allclose(again(wav)[0], feats)
    distinct = [codes[..., q].unique().numel() for q in range(8)]
    assert min(distinct) >= 100, distinct


def test_demo_clips_are_deterministic_varied_and_not_clipped():
    """Demo audio: same seed, same clips; every clip is audible, peaks at 0.5, and kinds differ."""
    clips = demo_signals.demo_clips(10, seconds=1.0, seed=3)
    assert clips.shape == (10, SAMPLE_RATE) and torch.equal(clips, demo_signals.demo_clips(10, seconds=1.0, seed=3))
    assert torch.allclose(clips.abs().amax(1), torch.full((10,), 0.5)) and (clips.std(1) > 0.02).all()
    assert not torch.equal(clips, demo_signals.demo_clips(10, seconds=1.0, seed=4))
    spectra = torch.fft.rfft(clips).abs()
    centroid = (spectra * torch.arange(spectra.shape[1])).sum(1) / spectra.sum(1)  # (10,)
    assert len(set(centroid.round().tolist())) == 10
    with pytest.raises(ValueError, match="unknown synthetic kind"):
        demo_signals.synth_clip("drum", 1.0, 0)


def test_demo_dataset_has_varied_lengths_and_trains_through_crops(tmp_path):
    """Demo data set: 16-bit wavs shorter and longer than 4 s, written once, read as crops."""
    paths = demo_signals.write_demo_dataset(tmp_path, n_files=6, seed=0)
    assert demo_signals.write_demo_dataset(tmp_path, n_files=6, seed=0) == paths
    durations = [sf.info(p).duration for p in paths]
    assert min(durations) < 4 < max(durations) and sf.info(paths[0]).subtype == "PCM_16"
    listed = D.list_audio(["demo"], demo_dir=str(tmp_path / "demo"))  # what --data demo reads
    assert len(listed) == 64
    assert [os.path.basename(p) for p in listed[:6]] == [os.path.basename(p) for p in paths]
    ds = D.CropDataset(paths)
    assert len(ds) >= 6 and ds.n_skipped == 0 and ds[0].wav.abs().max() > 0.1


MISSING_SOURCES = demo.missing_sources()  # fluidsynth, its soundfont, espeak-ng: optional Debian packages


needs_real_sources = pytest.mark.skipif(bool(MISSING_SOURCES), reason="real demo sources not installed: "
                                        + "; ".join(MISSING_SOURCES) + f" ({demo.APT})")


def task_files(root):
    """{relative path: bytes} of every file under root."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@needs_real_sources
def test_real_tasks_keep_test_instruments_and_voices_unseen_and_labels_as_documented(tmp_path):
    """Real demo tasks: same bytes for a seed; test programs and voices never in train or valid."""
    args = dict(seed=5, clips=(4, 1, 8), seconds=(0.5, 0.5, 0.5))
    demo.make_real_tasks(tmp_path / "a", **args)
    demo.make_real_tasks(tmp_path / "b", **args)
    assert task_files(tmp_path / "a") == task_files(tmp_path / "b")
    programs, voices = demo.program_split(5), demo.voice_split(5)
    for task in ("instrument-family", "spoken-keyword", "spoken-language"):
        root = tmp_path / "a" / task
        sources = json.loads((root / "sources.json").read_text())
        for split in ("train", "valid", "test"):
            labels = json.loads((root / f"{split}.json").read_text())
            assert sorted(labels) == sorted(sources[split])
            assert len(labels) == dict(zip(("train", "valid", "test"), args["clips"]))[split]
            for name, source in sources[split].items():
                assert (root / "48000" / split / name).exists()
                if task == "instrument-family":  # the family is the program's GM family, p // 8
                    assert source in programs[split] and labels[name] == [demo.GM_FAMILIES[source // 8]]
                else:
                    assert source in voices[split]
        if task != "instrument-family":
            classes = demo.KEYWORDS[:8] if "keyword" in task else demo.LANGUAGES  # in turn, as documented
            assert {labels[f"test_{i:04d}.wav"][0] for i in range(8)} == set(classes)
        used = {split: set(sources[split].values()) for split in sources}
        assert not used["test"] & (used["train"] | used["valid"])
    assert all(sorted(programs[s]) == sorted(set(programs[s])) for s in programs)
    assert sorted(sum(programs.values(), [])) == list(range(128)) and len(programs["test"]) == 32
    families = lambda split: {p // 8 for p in programs[split]}
    assert families("train") == families("valid") == families("test") == set(range(16))  # every family in each
    groups = {v: g for g in demo.VOICE_GROUPS for v in g.split()}
    assert sorted(sum(voices.values(), [])) == sorted(groups)
    for a, b in [("train", "test"), ("train", "valid"), ("valid", "test")]:  # alike variants stay together
        assert not {groups[v] for v in voices[a]} & {groups[v] for v in voices[b]}
    assert demo.program_split(6) != programs and demo.voice_split(6) != voices


@needs_real_sources
def test_real_corpus_is_deterministic_varied_and_never_plays_valid_or_test_programs_or_voices(tmp_path):
    """Real demo corpus: same bytes for a seed, every kind present, only train programs and voices."""
    paths = demo.write_real_corpus(tmp_path / "a", hours=0.004, seed=2, seconds=(1.0, 1.5))
    demo.write_real_corpus(tmp_path / "b", hours=0.004, seed=2, seconds=(1.0, 1.5))
    assert task_files(tmp_path / "a") == task_files(tmp_path / "b")
    assert D.list_audio([str(tmp_path / "a")]) == sorted(paths) and len(paths) >= 10
    manifest = json.loads((tmp_path / "a" / "corpus.json").read_text())
    kinds = {info["kind"] for info in manifest.values()}  # music, speech, ambience alone and mixed, a crowd
    assert {part for kind in kinds for part in kind.split("+")} == {"music", "speech", "ambience", "babble"}
    assert {"music", "speech", "ambience"} <= kinds and any("+" in kind for kind in kinds)
    programs = {p for info in manifest.values() for p in info.get("programs", [])}
    voices = {v for info in manifest.values() for v in info.get("voices", [])}
    assert programs and programs <= set(demo.program_split(2)["train"])
    assert voices and voices <= set(demo.voice_split(2)["train"])
    for path in paths:
        wav, rate = sf.read(path)
        assert rate == SAMPLE_RATE and wav.std() > 0.01 and 0.45 < np.abs(wav).max() <= 0.5


@needs_real_sources
def test_a_missing_espeak_voice_variant_is_reported_not_silently_replaced(monkeypatch):
    """espeak-ng would speak an unknown variant in its default voice, merging speakers: refuse."""
    monkeypatch.setattr(demo, "VOICE_GROUPS", demo.VOICE_GROUPS + ("nosuchvoice",))
    assert [m for m in demo.missing_sources() if "nosuchvoice" in m]
    with pytest.raises(FileNotFoundError, match="nosuchvoice"):
        demo.require_sources()


def test_demo_real_names_the_missing_debian_package_in_one_line(tmp_path, monkeypatch, capsys):
    """Without the optional sources, demo-real says which Debian package to install, exit status 2."""
    monkeypatch.setattr(demo, "SOUNDFONT", str(tmp_path / "none.sf2"))
    with pytest.raises(SystemExit) as exit:
        D.run_cli(demo.main, ["real", "--out", str(tmp_path / "out"), "--hours", "0", "--clips", "1", "1", "1"])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and len(err.strip().splitlines()) == 1 and "fluid-soundfont-gm" in err
    assert not (tmp_path / "out").exists()
    with pytest.raises(FileNotFoundError, match="apt-get install fluidsynth fluid-soundfont-gm espeak-ng"):
        demo.make_real_tasks(tmp_path / "out")
