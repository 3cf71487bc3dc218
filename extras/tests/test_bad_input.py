"""Bad input never stops a run: bad files skipped and named, bad command lines one line and exit 2."""
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
from extras import embed as embed_tool
from extras import demo_audio as demo
from extras import demo_signals
from model import CROP_FRAMES, CROP_SAMPLES, HOP, SAMPLE_RATE, gap_mask, make_config, num_frames
from test_all import (TINY_RUN, codec, demo_cache, losses, short_cache, stage_one, three_sounds_task,  # noqa: F401
                      tiny_checkpoint, tone, write)

torch.set_num_threads(1)


def test_bad_files_raise_audio_error_and_silence_is_valid(tmp_path):
    """[3.1] corrupt, empty, cut-short, NaN, huge and absurd-rate files fail loudly; silence is audio."""
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(np.random.default_rng(0).bytes(4000))
    (tmp_path / "empty.wav").write_bytes(b"")
    nan = tone(1.0)
    nan[100] = np.nan
    (tmp_path / "random.mp3").write_bytes(np.random.default_rng(1).bytes(4000))  # libsndfile: "not a regular file"
    (tmp_path / "folder.wav").mkdir()
    huge = tone(1.0)
    huge[100] = 1e30
    bad = {"corrupt.wav": "not an audio file libsndfile can decode", "empty.wav": "empty file",
           "random.mp3": "not an audio file libsndfile can decode", "folder.wav": "a folder",
           write(tmp_path, "zero.wav", np.zeros(0)): "empty",
           write(tmp_path, "nan.wav", nan, subtype="FLOAT"): "NaN",
           write(tmp_path, "huge.wav", huge, subtype="FLOAT"): "beyond",
           write(tmp_path, "slow.wav", tone(1.0, 100), 100): "absurd sample rate"}
    for ext in ("mp3", "flac"):  # cut short: the header still promises the whole second
        whole = (tmp_path / write(tmp_path, f"whole.{ext}", tone(1.0))).read_bytes()
        (tmp_path / f"cut.{ext}").write_bytes(whole[: len(whole) // 3])
        bad[f"cut.{ext}"] = "truncated"
    with pytest.raises(D.AudioError, match="truncated"):  # flac: already the cheap header scan
        D.probe_audio(tmp_path / "cut.flac")
    for name, reason in bad.items():
        with pytest.raises(D.AudioError, match=reason) as err:
            D.read_audio(tmp_path / name)
        assert os.path.basename(name) in str(err.value)  # the message names the file
    assert D.read_audio(write(tmp_path, "silence.wav", np.zeros(8000))).abs().max() == 0


def test_bad_files_are_skipped_counted_and_never_crash_a_dataloader(tmp_path):
    """[3.1] bad files get one warning each and a count; a file failing at read time is replaced."""
    (tmp_path / "corrupt.wav").write_bytes(np.random.default_rng(0).bytes(4000))
    (tmp_path / "empty.wav").write_bytes(b"")
    write(tmp_path, "zero.wav", np.zeros(0))
    nan = tone(5.0)
    nan[::1000] = np.inf  # passes the header scan, fails when read
    write(tmp_path, "nan.wav", nan, subtype="FLOAT")
    write(tmp_path, "good.wav", tone(6.0))
    write(tmp_path, "silence.wav", np.zeros(SAMPLE_RATE))
    with pytest.warns(UserWarning) as caught:
        ds = D.CropDataset(D.list_audio(tmp_path))
    assert ds.n_skipped == 3 and len(caught) == 3 and all("skipping" in str(w.message) for w in caught)
    with pytest.warns(UserWarning, match="NaN or inf"):
        batches = list(DataLoader(ds, batch_size=2))
    assert sum(len(b.wav) for b in batches) == len(ds) == 5  # nan 2 + good 2 + silence 1
    assert all(torch.isfinite(b.wav).all() for b in batches) and len(ds.failed) == 1
    assert ds.n_skipped == 4  # 3 at the scan, 1 when read


BAD_COMMAND_LINES = [  # (flag named in the message, arguments)
    ("--steps", ["--steps", "-1"]), ("--batch_size", ["--batch_size", "0"]), ("M_prop", ["--M_prop", "1.5"]),
    ("--lr", ["--lr", "abc"]), ("--config", ["--config", "huge"]), ("--M_porp", ["--M_porp=0.3"]),
    ("--keep_last", ["--keep_last", "0"]), ("--workers", ["--workers", "-2"]), ("--seed", ["--seed", "-1"]),
    ("--betas", ["--betas", "0.9"]), ("--gamma", ["--gamma", "median"]), ("--val_every", ["--val_every", "0"]),
    ("--batch_size", ["--batch_size", "6", "--grad_accum", "4"]), ("--data_weights", ["--data_weights", "1", "2"]),
    ("--encodec", ["--encodec", "no/such/codec.th"]), ("--steps", ["--steps", "1.5"]),
    ("--data", ["--data", "no/such/folder"]), ("--data", ["--data", "{empty}"]),
    ("--init_from", ["--init_from", "{stage1}"]),  # without --kmeans_store
    ("--init_from", ["--init_from", "no/such.pt", "--kmeans_store", "{store}"]),
    ("--init_from", ["--init_from", "{not_a_checkpoint}", "--kmeans_store", "{store}"]),
    ("--kmeans_store", ["--init_from", "{stage1}", "--kmeans_store", "{empty}"]),
    ("argument", ["steps=3"]), ("takes-no-value", ["--resume", "takes-no-value"]),
    ("--index", ["--index", "{not_a_checkpoint}"]),  # not an index
    ("--index", ["--index", "{index}"]),  # an index of other sources than --data demo
] + ([("--device", ["--device", "cuda"])] if not torch.cuda.is_available() else [])


def test_bad_command_lines_get_one_line_naming_the_flag_and_exit_status_2(tmp_path, monkeypatch, capsys):
    """[3.1] each user mistake: exit status 2, one stderr line naming the flag, before the codec loads."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "index.json").write_text("{}")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    torch.save({"model": {}, "config": asdict(make_config("tiny")), "encodec": "random"}, tmp_path / "s1.pt")
    (tmp_path / "audio").mkdir()
    write(tmp_path / "audio", "a.wav", tone(0.1))
    file_index.build_index([str(tmp_path / "audio")], str(tmp_path / "index.npz"), workers=1)
    where = dict(empty=tmp_path / "empty", store=tmp_path / "store", not_a_checkpoint=tmp_path / "junk.pt",
                 stage1=tmp_path / "s1.pt", index=tmp_path / "index.npz")

    def expensive(*args, **kwargs):
        raise AssertionError("the codec was loaded before the command line was checked")
    monkeypatch.setattr(D, "load_codec", expensive)
    wrong = []
    for flag, argv in BAD_COMMAND_LINES:
        argv = [a.format(**where) for a in argv] + ["--out", str(tmp_path / "run")]
        with pytest.raises(SystemExit) as done:  # anything else (a traceback) fails the test here
            D.run_cli(train.main, argv)
        err = capsys.readouterr().err
        if not (done.value.code == 2 and err.count("\n") == 1 and flag in err):
            wrong.append((argv, done.value.code, err))
    with capsys.disabled():
        print(f"\ntrain.py: {len(BAD_COMMAND_LINES)} bad command lines tried, "
              f"{len(BAD_COMMAND_LINES) - len(wrong)} one-line errors naming the flag with exit status 2")
    assert not wrong, wrong
    assert not (tmp_path / "run").exists()  # nothing was set up
    done = subprocess.run([sys.executable, "train.py", "--steps", "-1"], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert "argument --steps: -1: must be an integer >= 1" in done.stderr, done.stderr


def test_the_start_line_counts_unreadable_files_of_both_splits(short_cache, tmp_path, capsys):
    """[3.1] bad files among the held-out ones are counted too: one count for the whole run."""
    audio, _ = short_cache
    folder = tmp_path / "audio"
    folder.mkdir()
    for name in os.listdir(audio):
        (folder / name).write_bytes(open(os.path.join(audio, name), "rb").read())
    (folder / "bad0.wav").write_bytes(b"")
    (folder / "bad1.mp3").write_bytes(bytes(range(256)) * 8)
    (folder / "bad2.flac").write_bytes(b"fLaC")
    train.main(TINY_RUN + ["--data", str(folder), "--val_files", "4", "--batch_size", "2", "--steps", "1",
                           "--out", str(tmp_path / "run")])
    assert "3 unreadable files skipped" in capsys.readouterr().out


def test_kmeans_command_line_mistakes_are_one_line_and_exit_2(stage_one, tmp_path, capsys):
    """[2.3] kmeans.py: a bad flag or path is one line naming it, exit status 2, before any data is read."""
    root, paths, checkpoint = stage_one
    audio, out = str(root / "audio"), str(tmp_path / "store")
    base = ["--checkpoint", checkpoint, "--data", audio, "--out", out]
    cases = [([], "need --checkpoint"), (["--k", "abc"], "--k"), (base + ["--k", "0"], "--k: 0"),
             (base + ["--k", "2000"], "--k 2000"), (base + ["--n-clips", "0"], "--n-clips: 0"),
             (base + ["--layer", "-2"], "--layer -2"), (base + ["--layer", "3"], "--layer 3: use -1"),
             (base + ["--n-frames", "10", "--k", "16"], "--n-frames 10"),
             (["--checkpoint", str(tmp_path / "none.pt"), "--data", audio, "--out", out], "--checkpoint"),
             (["--checkpoint", paths[0], "--data", audio, "--out", out], "not a readable checkpoint"),
             (["--checkpoint", checkpoint, "--data", str(tmp_path / "nowhere"), "--out", out], "--data"),
             (["--checkpoint", checkpoint, "--cache", str(tmp_path), "--out", out], "--cache")]
    whole = open(checkpoint, "rb").read()
    (tmp_path / "cut.pt").write_bytes(whole[: len(whole) // 2])  # a copy cut short
    cases.append((["--checkpoint", str(tmp_path / "cut.pt"), "--data", audio, "--out", out], "truncated"))
    if not torch.cuda.is_available():
        cases.append((base + ["--device", "cuda"], "--device: cuda: not a device here"))
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            kmeans.main(argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.count("\n") == 1 and message in err, (argv, err)
    assert not os.path.exists(out)  # refused before any work
    with capsys.disabled():
        print(f"\nkmeans.py: {len(cases)} bad command lines tried, {len(cases)} one-line errors with exit status 2")


def test_kmeans_skips_a_file_that_fails_to_read_and_names_it_once(stage_one, tmp_path, capsys):
    """[2.3] a file whose header reads but whose audio does not is warned about once, left out of the store."""
    root, paths, checkpoint = stage_one
    folder = tmp_path / "audio"
    os.makedirs(folder)
    for p in paths:
        os.symlink(p, folder / os.path.basename(p))
    wav = demo_signals.synth_clip("note", 3.0, 5).numpy()
    wav[30000] = np.nan  # the header and the last sample read fine: it fails only when read whole
    sf.write(folder / "nan.wav", wav, M.SAMPLE_RATE, subtype="FLOAT")
    with pytest.warns(UserWarning) as record:
        kmeans.main(["--checkpoint", checkpoint, "--data", str(folder), "--out", str(tmp_path / "store"),
                     "--k", "4", "--n-clips", "4", "--n-frames", "200"])
    named = [str(w.message) for w in record if "nan.wav" in str(w.message)]
    assert len(named) == 1 and "NaN" in named[0], named
    with open(tmp_path / "store" / "index.json") as f:
        index = json.load(f)
    assert sorted(index) == sorted(str(folder / os.path.basename(p)) for p in paths)
    assert "labelled 2 files, skipped 1 unreadable" in capsys.readouterr().out
    assert kmeans.load(str(tmp_path / "store" / "centroids.pt"))[1]["n_clips"] == 3  # the clips it could read


def test_unreadable_hear_clips_are_skipped_with_their_label_rows(tmp_path, monkeypatch):
    """[3.2] a missing or corrupt clip is skipped with one warning naming it; its label goes with it."""
    clips = {s: [(torch.randn(4800) * 0.1, ["a" if i % 2 else "b"]) for i in range(4)]
             for s in ("train", "valid", "test")}
    path = demo.write_task(tmp_path, "bad", clips, False, False, 0.2)
    (path / "48000" / "train" / "train_0001.wav").write_bytes(os.urandom(300))  # random bytes
    os.remove(path / "48000" / "valid" / "valid_0002.wav")
    seen = {}
    real_probe_task = E.probe_task
    monkeypatch.setattr(E, "probe_task", lambda data, *a, **k: seen.update(data) or real_probe_task(data, *a, **k))
    argv = ["--tasks-dir", str(tmp_path), "--upstream", "EC", "--encodec", "random", "--grid-points", "1",
            "--max-epochs", "3", "--out", str(tmp_path / "out")]
    for run in range(2):  # the rerun reads cached embeddings and names the files again
        with pytest.warns(UserWarning) as caught:
            E.main(argv)
        named = [str(w.message) for w in caught if "skipping" in str(w.message)]
        assert len(named) == 2 and "train_0001.wav: " in named[0] and "valid_0002.wav: named in valid.json" in named[1]
        X, Y = seen["train"]  # the split -> (X, Y) that the probes get
        assert X.shape[0] == 3 and Y.argmax(1).tolist() == [1, 1, 0]  # b, (a skipped), b, a
        assert seen["valid"][1].argmax(1).tolist() == [1, 0, 0]  # b, a, (b skipped), a
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["skipped"] == ["bad/train/train_0001.wav", "bad/valid/valid_0002.wav"]


def test_bad_inputs_get_clear_errors(tmp_path):
    """[3.2] an unknown label, an empty split, a mismatched checkpoint."""
    clips = {s: [(torch.randn(2400) * 0.1, ["a"]), (torch.randn(2400) * 0.1, ["b"])]
             for s in ("train", "valid", "test")}
    path = demo.write_task(tmp_path, "bad", clips, False, False, 0.1)
    task = E.read_task(path)
    files, _ = E.read_split(task, "train")
    (path / "valid.json").write_text(json.dumps({files[0]: ["zebra"]}))
    with pytest.raises(ValueError, match="label 'zebra' of train_0000.wav is not in labelvocabulary"):
        E.read_split(task, "valid")
    (path / "test.json").write_text("{}")
    with pytest.raises(ValueError, match="test.json: the split is empty"):
        E.read_split(task, "test")
    ckpt = tiny_checkpoint(tmp_path / "other.pt", d_model=64, n_heads=4)
    with pytest.raises(ValueError, match="do not fit the config stored with them"):
        E.load_upstream(ckpt, encodec="random")


def warned(run, good, bad):
    """Run one stage: (its result, how often its warnings name each bad file, the good files they name)."""
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = run()
    said = [str(w.message) for w in caught]
    return result, {b: sum(b in m for m in said) for b in bad}, [g for g in good if any(g in m for m in said)]


@pytest.fixture(scope="module")
def fuzz(tmp_path_factory, codec):
    """A folder of good audio at odd rates, channel counts, lengths and names mixed with every kind
    of bad file, its cache build (result and warnings), and an untrained tiny stage-1 checkpoint."""
    root = tmp_path_factory.mktemp("fuzz")
    audio, rng = root / "audio", np.random.default_rng(0)
    (audio / "x.wav").mkdir(parents=True)  # a folder named like audio: warned about, searched
    good = [write(audio, "g_24k.wav", tone(0.8)), write(audio, "g_8k.wav", tone(0.5, 8000), 8000),
            write(audio, "g_22k.flac", tone(1.2, 22050), 22050), write(audio, "g_96k.wav", tone(0.3, 96000), 96000),
            write(audio, "g_11k.mp3", tone(1.0, 11025), 11025),
            write(audio, "g_six_channels.wav", tone(0.7, channels=6)),
            write(audio, "g_ünïcødé_音.flac", tone(0.6)), write(audio, "g_one_sample.wav", np.full(1, 0.1)),
            write(audio, "g_silence.ogg", np.zeros(9000)), write(audio, "g_float.wav", tone(1.5), subtype="FLOAT"),
            write(audio, "g_cut_short.wav", tone(1.0))]
    wav = (audio / "g_cut_short.wav").read_bytes()
    (audio / "g_cut_short.wav").write_bytes(wav[: len(wav) // 2])  # libsndfile reads the half that is there
    bad = {}
    for ext in ("wav", "flac", "mp3", "ogg"):
        bad[f"b_random.{ext}"], bad[f"b_zero_bytes.{ext}"] = rng.bytes(3000), b""
    for ext in ("flac", "mp3"):
        whole = (audio / write(audio, f"b_cut.{ext}", tone(1.0))).read_bytes()
        bad[f"b_cut.{ext}"] = whole[: len(whole) // 3]  # the header still promises 1 s
        bad[f"b_header_only.{ext}"] = whole[:120]
    bad["b_header_only.wav"] = (audio / write(audio, "b_header_only.wav", np.zeros(0))).read_bytes()
    for name, content in bad.items():
        (audio / name).write_bytes(content)
    for name, value in (("b_nan.wav", np.nan), ("b_inf.wav", np.inf), ("b_huge.wav", 1e30)):
        x = tone(1.0)
        x[500] = value  # passes the header scan, fails when read
        bad[name] = write(audio, name, x, subtype="FLOAT")
    paths, listed, _ = warned(lambda: D.list_audio(audio), good, ["x.wav"])
    assert sorted(paths) == sorted(good + [str(audio / b) for b in bad]) and listed == {"x.wav": 1}
    built = warned(lambda: cache.build_cache(codec, paths, root / "cache"), good, bad)
    torch.manual_seed(0)
    cfg = M.make_config("tiny")
    torch.save({"model": M.EnCodecMAE(cfg).state_dict(), "config": asdict(cfg), "encodec": "random", "step": 0},
               root / "stage1.pt")
    return root, good, sorted(bad), built


def test_fuzz_cache_build_skips_each_bad_file_once_and_caches_every_good_one(fuzz):
    """[3.1] every bad file is skipped with one warning naming it; every good one is cached."""
    root, good, bad, ((n, skipped), named, good_named) = fuzz
    assert n == len(good) and sorted(os.path.basename(p) for p, _ in skipped) == bad
    assert named == {b: 1 for b in bad} and good_named == []
    cached = cache.read_manifest(root / "cache")
    assert sorted(cached) == sorted(os.path.abspath(g) for g in good)
    assert 0.49 * SAMPLE_RATE < cached[os.path.abspath(good[-1])]["samples"] < 0.5 * SAMPLE_RATE  # what is there
    print(f"\nfuzz cache build: {len(good) + len(bad)} files tried, {len(skipped)} skipped with a message, "
          f"{n} cached, crashes 0")


def test_fuzz_training_on_raw_audio_and_from_the_cache_finishes(fuzz, tmp_path):
    """[3.1] train.py runs on the folder, raw and cached: bad files left out, no good file named."""
    root, good, bad, _ = fuzz
    run = ["--config", "tiny", "--encodec", "random", "--batch_size", "2", "--workers", "0", "--val_files", "1",
           "--gamma", "uniform", "--log_every", "1", "--val_every", "1000", "--steps", "2",
           "--data", str(root / "audio")]
    for out, extra in (("raw", []), ("cached", ["--cache", str(root / "cache")])):
        _, named, good_named = warned(lambda: train.main(run + ["--out", str(tmp_path / out)] + extra), good, bad)
        assert os.path.exists(tmp_path / out / "ckpt-00000002.pt") and good_named == [], out
        # Each bad file is named once: by the cache build, or by the raw scan, except that a file
        # failing only when read (NaN, inf, huge samples, a cut mp3) is named when a crop reads it.
        read_only = ("b_nan.wav", "b_inf.wav", "b_huge.wav", "b_cut.mp3") if out == "raw" else ()
        assert all(named[b] == 1 or (b in read_only and named[b] == 0) for b in bad), (out, named)
        print(f"\nfuzz training ({out}): {len(good) + len(bad)} files tried, "
              f"{sum(v > 0 for v in named.values())} named in warnings, 2 steps, crashes 0")


def test_fuzz_training_when_the_held_out_file_is_bad(fuzz, tmp_path):
    """[3.1] with --seed 2 the one held-out file is b_zero_bytes.ogg: training still runs, naming it once."""
    root, good, bad, _ = fuzz
    run = ["--config", "tiny", "--encodec", "random", "--batch_size", "2", "--workers", "0", "--val_files", "1",
           "--gamma", "uniform", "--val_every", "1000", "--steps", "1", "--seed", "2", "--data", str(root / "audio"),
           "--out", str(tmp_path / "run")]
    _, named, good_named = warned(lambda: train.main(run), good, bad)
    assert os.path.exists(tmp_path / "run" / "ckpt-00000001.pt")
    assert good_named == [] and named["b_zero_bytes.ogg"] == 1


def test_fuzz_kmeans_labels_every_cached_good_file(fuzz, tmp_path):
    """[2.3] kmeans.py over the fuzz folder's cache labels exactly the good files."""
    root, good, bad, _ = fuzz
    index, _, good_named = warned(lambda: kmeans.build_targets(
        str(root / "stage1.pt"), str(tmp_path / "km"), cache_dir=str(root / "cache"), n_clips=8, n_frames=200, k=4),
        good, bad)
    assert sorted(index) == sorted(os.path.abspath(g) for g in good) and good_named == []
    print(f"\nfuzz k-means (cache): {len(good)} files labelled, crashes 0")


def test_fuzz_kmeans_on_raw_audio_skips_each_bad_file_once(fuzz, tmp_path):
    """[2.3] kmeans.py over the raw fuzz folder: bad files named once, every good file labelled."""
    root, good, bad, _ = fuzz
    index, named, good_named = warned(lambda: kmeans.build_targets(
        str(root / "stage1.pt"), str(tmp_path / "km"), data=[str(root / "audio")], n_clips=8, n_frames=200, k=4),
        good, bad)
    assert sorted(index) == sorted(os.path.abspath(g) for g in good) and good_named == []
    assert named == {b: 1 for b in bad}
    print(f"\nfuzz k-means (raw): {len(good) + len(bad)} files tried, {len(bad)} skipped with a message, crashes 0")


def test_fuzz_evaluation_embeds_a_task_with_a_bad_file(tmp_path):
    """[3.2] evaluate.py's embedding of a HEAR split holding a bad file names it once and finishes."""
    clips = {s: [(torch.from_numpy(tone(0.5, freq=200.0 * (i + 1))).float(), [str(i % 2)]) for i in range(3)]
             for s in ("train", "valid", "test")}
    task = E.read_task(demo.write_task(tmp_path, "fuzz", clips, False, False, 0.5))
    files, _ = E.read_split(task, "train")
    bad_name = files[1]
    (task.audio_dir / "train" / bad_name).write_bytes(np.random.default_rng(0).bytes(3000))
    upstream = E.load_upstream("EC", encodec="random")
    _, named, _ = warned(lambda: E.embed_split([upstream], task, "train", files, tmp_path / "emb"), files, [bad_name])
    assert named == {bad_name: 1}
    print(f"\nfuzz evaluation: {len(files)} files tried, 1 skipped with a message, crashes 0")


def test_bad_evaluate_command_lines_give_one_line_and_exit_2_before_loading_a_model(tmp_path, capsys, monkeypatch):
    """[3.2] each mistake on evaluate.py's command line: exit status 2, one stderr line naming the flag."""
    demo.write_task(tmp_path / "tasks", "t", {s: [(torch.zeros(2400), ["a"])] for s in ("train", "valid", "test")},
                 False, False, 0.1)
    (tmp_path / "empty").mkdir()
    (tmp_path / "audio").mkdir()
    sf.write(tmp_path / "audio" / "x.wav", np.zeros(2400, dtype="float32"), 24000)
    ckpt = tiny_checkpoint(tmp_path / "tiny.pt")
    tasks, ec = ["--tasks-dir", str(tmp_path / "tasks")], ["--upstream", "EC"]
    cases = [([], "--tasks-dir"), (ec, "--tasks-dir"), (tasks, "--upstream"),
             (["--tasks-dir", str(tmp_path / "nowhere")] + ec, "--tasks-dir"),
             (["--tasks-dir", str(tmp_path / "empty")] + ec, "--tasks-dir"),
             (tasks + ec + ["--task", "nope"], "--task"),
             (tasks + ["--upstream", "ECMAE-R:huge"], "--upstream"),
             (tasks + ["--upstream", str(tmp_path / "missing.pt")], "--upstream"),
             (tasks + ["--upstream", "ECMAE-R:tiny", "--layer", "3"], "--layer"),
             (tasks + ec + ["--layer", "0"], "--layer"),
             (tasks + ec + ["--max-epochs", "0"], "--max-epochs"),
             (tasks + ec + ["--max-epochs", "abc"], "--max-epochs"),
             (tasks + ec + ["--grid-points", "17"], "--grid-points"),
             (tasks + ec + ["--batch-size", "0"], "--batch-size"),
             (tasks + ec + ["--device", "tpu"], "--device"),
             (tasks + ec + ["--device", "cuda:9"], "--device"),
             (tasks + ec + ["--encodec", str(tmp_path / "nope.th")], "--encodec"),
             (tasks + ec + ["--codec-cache", str(tmp_path / "audio" / "x.wav")], "--codec-cache")]
    cases = [(E.main, argv, flag) for argv, flag in cases] + [(embed_tool.main, argv, flag) for argv, flag in [
             (["--upstream", "EC", str(tmp_path / "audio")], "--out"),
             (["--upstream", "EC", "--out", str(tmp_path / "o"), str(tmp_path / "no.wav")], "no.wav"),
             (["--upstream", "EC", "--out", str(tmp_path / "o"), str(tmp_path / "empty")], "empty"),
             (["--upstream", "ECMAE-R:tiny", "--layer", "-2", "--out", str(tmp_path / "o"),
               str(tmp_path / "audio")], "--layer")]]
    monkeypatch.setattr(E, "load_upstream", lambda *a, **k: pytest.fail("a model loaded before the check"))
    for main, argv, flag in cases:
        with pytest.raises(SystemExit) as done:
            D.run_cli(main, argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert done.value.code == 2 and len(err) == 1 and flag in err[0], (argv, err)
    monkeypatch.undo()  # a checkpoint's depth is known once it loads: still one line, exit 2
    with pytest.raises(SystemExit) as done:
        D.run_cli(E.main, tasks + ["--upstream", ckpt, "--encodec", "random", "--layer", "3"])
    err = capsys.readouterr().err.strip().splitlines()
    assert done.value.code == 2 and len(err) == 1 and "--layer 3" in err[0]
    with capsys.disabled():
        print(f"\nevaluate.py: {len(cases) + 1} bad command lines tried, {len(cases) + 1} one-line errors "
              "with exit status 2")
