"""Faults a shared cluster brings (docs/BAD_INPUT.md): reused folders, preemption, full disks, stale caches.

Each test shows one kind: no user's data is lost, nothing is computed on stale input, and the
command ends with one line and an exit status, never a traceback.
"""
import builtins
import errno
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

import data as D
import evaluate as E
import kmeans
import model as M
import train
from extras import cache, file_index
from extras import embed as embed_tool
from extras import demo_audio as demo
from model import CROP_SAMPLES, SAMPLE_RATE, num_frames
from test_all import TINY_RUN, codec, losses, short_cache, stage_one, tone, write  # noqa: F401

torch.set_num_threads(1)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tiny_run(short_cache, out, *extra):
    """train.py's arguments for a tiny run from the shared cache (4 training crops, 2 steps per epoch)."""
    audio, cache_dir = short_cache
    return TINY_RUN + ["--data", audio, "--cache", cache_dir, "--batch_size", "2", "--out", str(out), *extra]


def one_line(main, argv, capsys):
    """A command line that must stop -> (exit status, its stderr); a traceback fails the test."""
    with pytest.raises(SystemExit) as done:
        D.run_cli(main, argv)
    return done.value.code, capsys.readouterr().err


class FullDisk:
    """A file on a disk that fills up after `room` bytes: the write past it raises ENOSPC."""

    def __init__(self, f, room):
        self.f, self.room = f, room

    def write(self, data):
        data = data if isinstance(data, str) else memoryview(data).cast("B")
        n = min(len(data), self.room)
        self.f.write(data[:n])
        self.room -= n
        if n < len(data):
            raise OSError(errno.ENOSPC, "No space left on device")
        return n

    __enter__ = lambda self: self
    __exit__ = lambda self, *exc: self.f.close()
    __getattr__ = lambda self, name: getattr(self.f, name)


def fill_disk(monkeypatch, part, room=64):
    """From now on, files opened for writing whose path contains `part` sit on a full disk."""
    real = builtins.open

    def opener(file, mode="r", *args, **kwargs):
        f = real(file, mode, *args, **kwargs)
        named = isinstance(file, (str, bytes, os.PathLike)) and part in os.fsdecode(file)
        return FullDisk(f, room) if named and mode[0] in "wa" else f
    monkeypatch.setattr(builtins, "open", opener)


def temporaries(folder):
    return [p for p in glob.glob(os.path.join(folder, "**", "*.tmp*"), recursive=True)]


# ---------------------------------------------------------------- run folders: one run, one folder
def test_a_new_run_refuses_a_folder_holding_another_runs_checkpoints(short_cache, tmp_path, capsys):
    """A fresh run (or stage 2) into a used --out is refused: its --keep_last deleted that run's checkpoints."""
    out = tmp_path / "run"
    train.main(tiny_run(short_cache, out, "--steps", "2", "--ckpt_every", "1"))
    before = sorted(os.listdir(out)), (out / "metrics.jsonl").read_text()
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "index.json").write_text("{}")
    for extra in (["--keep_last", "1", "--seed", "1"],
                  ["--init_from", str(out / "ckpt-00000002.pt"), "--kmeans_store", str(tmp_path / "store")]):
        code, err = one_line(train.main, tiny_run(short_cache, out, "--steps", "1", *extra), capsys)
        assert code == 2 and err.count("\n") == 1 and "ckpt-00000002.pt" in err and "--resume" in err, err
    assert (sorted(os.listdir(out)), (out / "metrics.jsonl").read_text()) == before
    train.main(tiny_run(short_cache, out, "--steps", "3", "--resume"))  # --resume continues it
    assert sorted(losses(out)) == [1, 2, 3]


def test_a_second_run_on_one_folder_is_refused_and_a_stale_lock_is_taken_over(short_cache, tmp_path, capsys,
                                                                                monkeypatch):
    """A live run's lock (the OS lock held) refuses a second run; a killed run's note is taken over with a warning."""
    import fcntl
    out = tmp_path / "run"
    out.mkdir()
    lock = out / "train.lock"
    lock.write_text(f"pid {os.getpid()} on {socket.gethostname()}\n")
    with open(lock) as held:  # another open file description: as another process would hold it
        fcntl.flock(held, fcntl.LOCK_EX)
        code, err = one_line(train.main, tiny_run(short_cache, out, "--steps", "1"), capsys)
    assert code == 2 and err.count("\n") == 1 and f"pid {os.getpid()}" in err and not glob.glob(str(out / "ckpt-*"))
    lock.write_text("pid 4242 on a-host-since-killed\n")  # a SIGKILLed run: its note stays, its OS lock went with it
    held, save = [], train.save_checkpoint
    monkeypatch.setattr(train, "save_checkpoint", lambda *a: (held.append(lock.read_text()), save(*a))[1])
    with pytest.warns(UserWarning, match="stale lock .*pid 4242"):
        train.main(tiny_run(short_cache, out, "--steps", "1"))
    assert held[0] == f"pid {os.getpid()} on {socket.gethostname()}\n" and lock.read_text() == ""  # held, released


def test_resume_refuses_when_no_checkpoint_loads_and_keeps_the_history(short_cache, tmp_path, capsys):
    """--resume with checkpoints none of which loads (torn, or weights that do not fit) changes nothing."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "ckpt-00000004.pt").write_bytes(b"torn by a full disk")
    cfg = train.M.make_config("tiny")
    torch.save({"model": {"no": torch.zeros(1)}, "config": train.asdict(cfg), "encodec": "random", "optimizer": {},
                "scaler": {}, "step": 2, "train_config": {}, "rng": torch.get_rng_state()}, out / "ckpt-00000002.pt")
    history = "".join(json.dumps({"step": s, "loss": 7.0}) + "\n" for s in range(1, 5))
    (out / "metrics.jsonl").write_text(history)
    code, err = one_line(train.main, tiny_run(short_cache, out, "--steps", "5", "--resume"), capsys)
    assert code == 2 and err.count("\n") == 1 and "ckpt-00000002.pt" in err and "ckpt-00000004.pt" in err, err
    assert (out / "metrics.jsonl").read_text() == history and not glob.glob(str(out / "ckpt-00000005*"))


# ---------------------------------------------------------------- preemption
def test_sigterm_finishes_the_step_saves_and_resume_continues_exactly(short_cache, tmp_path):
    """SIGTERM after the first logged step: a checkpoint, exit 143 and one line; --resume gives the same losses."""
    run = lambda out, *extra: tiny_run(short_cache, out, "--ckpt_every", "1000", *extra)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    job = subprocess.Popen([sys.executable, "train.py", *run(tmp_path / "stopped", "--steps", "1000")], cwd=ROOT,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    for line in job.stdout:
        if line.startswith("step 1/"):
            job.send_signal(signal.SIGTERM)
            break
    out, err = job.communicate(timeout=120)
    assert job.returncode == 143 and "Traceback" not in err and "--resume" in err.splitlines()[-1], (out, err)
    (saved,) = glob.glob(str(tmp_path / "stopped" / "ckpt-*.pt"))
    step = torch.load(saved, weights_only=True)["step"]  # the step it was in when the signal came
    assert step < 1000 and sorted(losses(tmp_path / "stopped")) == list(range(1, step + 1))  # none lost or redone
    assert (tmp_path / "stopped" / "train.lock").read_text() == ""  # released: nothing for the next run to take over
    train.main(run(tmp_path / "stopped", "--steps", str(step + 2), "--resume"))
    train.main(run(tmp_path / "straight", "--steps", str(step + 2)))
    assert losses(tmp_path / "stopped") == losses(tmp_path / "straight")


def test_ctrl_c_while_the_loader_forks_its_workers_stops_with_a_checkpoint(short_cache, tmp_path, monkeypatch,
                                                                           capsys):
    """Ctrl-C as the second epoch's DataLoader starts its worker: the run stops at that step, saved, exit 130."""
    real, made = train.DataLoader, []

    def loader(*args, **kwargs):
        made.append(1)
        if len(made) == 2:  # the epoch boundary after step 2
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)
    monkeypatch.setattr(train, "DataLoader", loader)
    before = signal.getsignal(signal.SIGINT)
    try:
        code, err = one_line(train.main, tiny_run(short_cache, tmp_path / "run", "--steps", "50", "--workers", "1"),
                             capsys)
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C ended the run with a traceback, no checkpoint")
    assert code == 130 and "SIGINT" in err and "--resume" in err and err.count("\n") == 1, err
    assert [os.path.basename(p) for p in glob.glob(str(tmp_path / "run" / "ckpt-*.pt"))] in (
        ["ckpt-00000002.pt"], ["ckpt-00000003.pt"])
    assert signal.getsignal(signal.SIGINT) is before


def test_sigterm_stops_embed_cleanly_and_a_rerun_resumes(tmp_path, monkeypatch, capsys):
    """The other commands: SIGTERM mid-work is one line and 143, no temporary file left, a rerun finishes."""
    (tmp_path / "audio").mkdir()
    for i in range(3):
        write(tmp_path / "audio", f"{i}.wav", tone(0.5))
    real = D.read_audio
    stop = lambda path, *a, **k: (os.kill(os.getpid(), signal.SIGTERM) if "1.wav" in str(path) else None,
                                  real(path, *a, **k))[1]
    monkeypatch.setattr(E, "read_audio", stop)
    before = signal.signal(signal.SIGTERM, lambda *a: pytest.fail("SIGTERM killed the command"))
    try:
        argv = ["--upstream", "EC", "--encodec", "random", "--out", str(tmp_path / "emb"),
                str(tmp_path / "audio")]
        code, err = one_line(embed_tool.main, argv, capsys)
        assert code == 143 and err.count("\n") == 1 and "SIGTERM" in err, err
        assert sorted(os.listdir(tmp_path / "emb")) == ["0.wav.npy", "embed.json"]
        monkeypatch.setattr(E, "read_audio", real)
        embed_tool.main(argv)
        assert len(glob.glob(str(tmp_path / "emb" / "*.wav.npy"))) == 3
    finally:
        signal.signal(signal.SIGTERM, before)


# ---------------------------------------------------------------- full disks, read-only and misplaced outputs
def test_a_full_disk_is_one_line_leaves_no_temporaries_and_keeps_what_was_complete(
        short_cache, stage_one, codec, tmp_path, monkeypatch, capsys):
    """Checkpoint, metrics, cache, index, k-means and embedding writes on a full disk: exit 2, one line."""
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        fill_disk(m, "ckpt-00000002.pt")
        code, err = one_line(train.main, tiny_run(short_cache, out, "--steps", "2", "--ckpt_every", "1"), capsys)
    assert code == 2 and err.count("\n") == 1 and "ckpt-00000002.pt" in err and "No space" in err, err
    assert not temporaries(out) and D.load_checkpoint(str(out / "ckpt-00000001.pt"))[1]["step"] == 1
    train.main(tiny_run(short_cache, out, "--steps", "2", "--resume"))  # the disk has room again
    with monkeypatch.context() as m:
        fill_disk(m, "metrics.jsonl")
        code, err = one_line(train.main, tiny_run(short_cache, tmp_path / "m", "--steps", "1"), capsys)
    assert code == 2 and err.count("\n") == 1 and "metrics.jsonl" in err, err
    audio, _ = short_cache
    paths = sorted(glob.glob(os.path.join(audio, "*.wav")))
    embed = ["--upstream", "EC", "--encodec", "random", "--out", str(tmp_path / "emb"), audio]
    index = ["--data", audio, "--out", str(tmp_path / "index.npz"), "--workers", "1"]
    km = ["--checkpoint", stage_one[2], "--data", audio, "--out", str(tmp_path / "km"), "--k", "4",
          "--n-clips", "4", "--n-frames", "200"]
    for part, main, argv, folder in (
            ("3.wav.npy", embed_tool.main, embed, tmp_path / "emb"), ("index.npz", file_index.main, index, tmp_path),
            (".npy", kmeans.run, km, tmp_path / "km"), ("manifest.jsonl", cache.main, [
                "--data", audio, "--out", str(tmp_path / "c"), "--encodec", "random"], tmp_path / "c")):
        with monkeypatch.context() as m:
            fill_disk(m, part)
            code, err = one_line(main, argv, capsys)
        assert code == 2 and err.count("\n") == 1 and "No space" in err and not temporaries(folder), (part, err)
    assert len(glob.glob(str(tmp_path / "emb" / "*.npy"))) == 3  # the files embedded before are kept
    cache.build_cache(codec, paths, tmp_path / "c")  # a rerun completes the cache
    assert len(cache.read_manifest(tmp_path / "c")) == len(paths)


def test_an_out_that_is_a_file_or_read_only_is_one_line_before_any_work(stage_one, tmp_path, monkeypatch, capsys):
    """--out naming a user's file, or a read-only folder: one line, exit 2, the file untouched, no work done."""
    root, paths, checkpoint = stage_one
    audio = str(root / "audio")
    mine = tmp_path / "notes.txt"
    mine.write_text("a user's file")
    commands = lambda out: [
        (train.main, TINY_RUN + ["--data", audio, "--val_files", "1", "--batch_size", "1", "--out", out]),
        (kmeans.run, ["--checkpoint", checkpoint, "--data", audio, "--out", out, "--k", "4"]),
        (embed_tool.main, ["--upstream", "EC", "--encodec", "random", "--out", out, audio]),
        (cache.main, ["--data", audio, "--out", out, "--encodec", "random"]),
        (file_index.main, ["--data", str(mine), "--out", str(mine)])]
    monkeypatch.setattr(D, "load_codec", lambda *a: pytest.fail("the codec loaded before --out was checked"))
    for main, argv in commands(str(mine)):
        code, err = one_line(main, argv, capsys)
        assert code == 2 and err.count("\n") == 1 and "notes.txt" in err, (argv, err)
    assert mine.read_text() == "a user's file"
    locked = tmp_path / "read-only"
    locked.mkdir()
    real = os.access  # root writes anywhere whatever chmod says: the folder's access says no
    monkeypatch.setattr(os, "access", lambda p, mode, **k: False if "read-only" in os.fsdecode(p) and mode & os.W_OK
                        else real(p, mode, **k))
    for main, argv in commands(str(locked))[:4]:
        code, err = one_line(main, argv, capsys)
        assert code == 2 and err.count("\n") == 1 and "read-only" in err, (argv, err)
    assert os.listdir(locked) == []


# ---------------------------------------------------------------- stale and corrupt caches, indexes and stores
def test_a_rewritten_audio_file_is_noticed_by_the_cache_the_index_and_kmeans(codec, tmp_path):
    """An audio file rewritten in place (new length): the cache re-encodes it, the index re-reads it, naming it."""
    folder = tmp_path / "audio"
    folder.mkdir()
    paths = [write(folder, "a.wav", tone(1.0)), write(folder, "b.wav", tone(1.5))]
    cache.build_cache(codec, paths, tmp_path / "cache")
    file_index.build_index([str(folder)], str(tmp_path / "index.npz"), workers=1)
    write(folder, "a.wav", tone(2.0))  # the folder's own time does not change
    os.utime(paths[0], ns=(os.stat(paths[0]).st_atime_ns, os.stat(paths[0]).st_mtime_ns + 10 ** 9))
    with pytest.raises(D.UsageError, match="a.wav.*changed"):  # k-means would label old frames
        kmeans.open_source(cache_dir=str(tmp_path / "cache"), codec_source="random")
    with pytest.warns(UserWarning, match="a.wav.*changed"):
        cache.build_cache(codec, paths, tmp_path / "cache")
    assert cache.read_manifest(tmp_path / "cache")[paths[0]]["frames"] == num_frames(2 * SAMPLE_RATE)
    with pytest.warns(UserWarning, match="a.wav.*changed"):
        files, _, _ = file_index.ensure_index([str(folder)], str(tmp_path / "index.npz"))
    assert files.lengths.tolist() == [2 * SAMPLE_RATE, 1.5 * SAMPLE_RATE]


def test_corrupt_cache_files_are_named_with_the_command_that_repairs_them(codec, tmp_path, capsys):
    """A deleted array is encoded again, a cut one named with its repair, a garbled manifest or cache.json: one line."""
    folder = tmp_path / "audio"
    folder.mkdir()
    paths = [write(folder, "a.wav", tone(1.0)), write(folder, "b.wav", tone(1.5))]
    c = tmp_path / "cache"
    cache.build_cache(codec, paths, c)
    entries = cache.read_manifest(c)
    a, b = (os.path.join(c, entries[p]["id"]) for p in paths)
    os.remove(a + ".feats.npy")
    with open(c / "manifest.jsonl", "a") as f:
        f.write('[1, 2]\n{"no": "path"}\n')  # valid JSON, not an entry
    with pytest.warns(UserWarning, match="a.wav"):
        cache.build_cache(codec, paths, c)  # the deleted array: re-encoded
    assert os.path.exists(a + ".feats.npy") and len(cache.read_manifest(c)) == 2
    whole = open(b + ".codes.npy", "rb").read()
    open(b + ".codes.npy", "wb").write(whole[: len(whole) // 2])
    crops = cache.CachedCropDataset(c, paths=paths)
    with pytest.raises(D.UsageError, match=r"codes.npy.*extras/cache.py"):
        [crops[i] for i in range(len(crops))]
    (c / "cache.json").write_text("{garbled")
    code, err = one_line(cache.main, ["--data", str(folder), "--out", str(c), "--encodec", "random"], capsys)
    assert code == 2 and err.count("\n") == 1 and "cache.json" in err, err


def test_a_cache_whose_arrays_were_deleted_or_cut_short_encodes_those_files_again(codec, tmp_path, capsys):
    """Arrays deleted or cut short behind the cache's back: the cache command names each one and
    encodes it again (not "done"), and every crop of training from it reads."""
    folder = tmp_path / "audio"
    folder.mkdir()
    paths = [write(folder, f"{i}.wav", tone(1.0 + 0.5 * i)) for i in range(3)]
    c = tmp_path / "cache"
    cache.build_cache(codec, paths, c)
    entries = cache.read_manifest(c)
    first, second = (os.path.join(c, entries[p]["id"]) for p in paths[:2])
    os.remove(first + ".codes.npy")
    whole = open(second + ".feats.npy", "rb").read()
    open(second + ".feats.npy", "wb").write(whole[: len(whole) // 2])  # a disk that filled, say
    capsys.readouterr()
    with pytest.warns(UserWarning) as caught:
        assert cache.build_cache(codec, paths, c)[0] == 3
    named = " ".join(str(w.message) for w in caught)
    assert "0.wav" in named and "missing" in named and "1.wav" in named and "damaged" in named
    assert "2 to encode" in capsys.readouterr().out
    crops = cache.CachedCropDataset(c, paths=paths)
    assert all(len(crops[i].feats) == M.CROP_FRAMES for i in range(len(crops)))


def test_a_codec_weights_file_of_another_model_is_one_line_naming_it(short_cache, tmp_path, capsys):
    """--encodec FILE with weights that do not fit EnCodec's 24 kHz model (another model's, or not
    torch's at all), for training and for the cache command: one line naming the file, exit 2."""
    wrong = tmp_path / "other.th"
    torch.save({"encoder.model.0.conv.conv.weight": torch.zeros(3, 1, 7)}, wrong)
    garbage = tmp_path / "garbage.th"
    garbage.write_bytes(os.urandom(300))
    audio, _ = short_cache
    for weights in (wrong, garbage):
        run = [*TINY_RUN, "--data", audio, "--out", str(tmp_path / "run"), "--encodec", str(weights)]
        for main, argv in ((train.main, run),
                           (cache.main, ["--data", audio, "--out", str(tmp_path / "c"), "--encodec",
                                         str(weights)])):
            code, err = one_line(main, argv, capsys)
            assert code == 2 and err.count("\n") == 1 and str(weights) in err, err
            assert "24 kHz" in err


def test_stage_two_with_a_store_of_other_audio_is_one_line_before_the_setup(stage_one, tmp_path,
                                                                            monkeypatch, capsys):
    """[2.3] a k-means store made on other data labels none of --data: one line, exit 2, before
    the codec loads."""
    root, paths, checkpoint = stage_one
    store = tmp_path / "km"
    store.mkdir()
    (store / "index.json").write_text(json.dumps({"/elsewhere/x.wav": {"npy": "x.npy", "frames": 9}}))
    monkeypatch.setattr(D, "load_codec", lambda *a: pytest.fail("the codec loaded first"))
    argv = [*TINY_RUN, "--data", str(root / "audio"), "--out", str(tmp_path / "s2"), "--init_from",
            checkpoint, "--kmeans_store", str(store)]
    code, err = one_line(train.main, argv, capsys)
    assert code == 2 and err.count("\n") == 1 and "labels none" in err and str(store) in err, err


def test_labels_of_older_centroids_are_never_kept_in_a_store_fit_again(stage_one, tmp_path):
    """[2.3] a store's labels belong to its centroids: centroids.pt deleted and fit again (here
    with another checkpoint), every file is labelled again and index.json names only new labels."""
    root, paths, checkpoint = stage_one
    store = tmp_path / "km"
    argv = ["--data", str(root / "audio"), "--out", str(store), "--k", "4", "--n-clips", "4",
            "--n-frames", "200"]
    kmeans.main(["--checkpoint", checkpoint, *argv])
    old = json.loads((store / "index.json").read_text())
    state = torch.load(checkpoint, weights_only=True)
    state["model"] = {k: v * 1.5 if v.is_floating_point() else v for k, v in state["model"].items()}
    other = tmp_path / "other.pt"
    torch.save(state, other)
    os.remove(store / "centroids.pt")
    kmeans.main(["--checkpoint", str(other), *argv])
    new = json.loads((store / "index.json").read_text())
    assert new.keys() == old.keys()
    assert all(new[p]["npy"] != old[p]["npy"] for p in new)  # none of the old model's labels reused
    model = D.load_checkpoint(str(other))[0]
    centroids = kmeans.load(str(store / "centroids.pt"))[0]
    source = kmeans.open_source(str(root / "audio"))
    for f, path in enumerate(source.paths):
        want = kmeans.assign(kmeans.embed_file(model, D.load_codec("random"), source, f), centroids)
        assert np.array_equal(np.load(store / new[path]["npy"]), want.numpy())


def test_a_kmeans_store_refuses_a_replaced_checkpoint_and_names_labels_of_the_wrong_shape(stage_one, tmp_path,
                                                                                         capsys):
    """Labels of another model are never mixed in; a label file or index.json that does not fit is named."""
    root, paths, checkpoint = stage_one
    ckpt, store = tmp_path / "s1.pt", tmp_path / "km"
    shutil.copy(checkpoint, ckpt)
    argv = ["--checkpoint", str(ckpt), "--data", str(root / "audio"), "--out", str(store), "--k", "4",
            "--n-clips", "4", "--n-frames", "200"]
    kmeans.main(argv)
    state = torch.load(ckpt, weights_only=True)
    state["model"] = {k: v + 1 if v.is_floating_point() else v for k, v in state["model"].items()}
    torch.save(state, ckpt)  # retrained in place: same path, other weights
    code, err = one_line(kmeans.run, argv, capsys)
    assert code == 2 and err.count("\n") == 1 and "s1.pt" in err and "changed" in err, err
    index = json.loads((store / "index.json").read_text())
    np.save(store / index[paths[0]]["npy"], np.zeros(3, np.int16))  # 3 labels for 150 frames
    crops = D.CropDataset(paths, extra_store=str(store))
    with pytest.raises(D.UsageError, match=r"3 labels for 150 frames.*kmeans.py"):
        [crops[i] for i in range(len(crops))]
    (store / "index.json").write_text('{"garbled')
    with pytest.raises(D.UsageError, match="index.json.*kmeans.py"):
        D.CropDataset(paths, extra_store=str(store))


def test_a_checkpoint_whose_weights_do_not_fit_its_config_is_one_line_in_kmeans(tmp_path, capsys):
    """kmeans.py --checkpoint whose config the network cannot take (n_heads 0: a ZeroDivisionError): one line."""
    cfg = {**train.asdict(train.M.make_config("tiny")), "n_heads": 0}
    torch.save({"model": {}, "config": cfg, "encodec": "random"}, tmp_path / "odd.pt")
    code, err = one_line(kmeans.run, ["--checkpoint", str(tmp_path / "odd.pt"), "--data", "demo", "--out",
                                      str(tmp_path / "km")], capsys)
    assert code == 2 and err.count("\n") == 1 and "odd.pt" in err, err


# ---------------------------------------------------------------- odd inputs
def test_evaluation_faults_are_one_line_and_a_zero_byte_cache_is_redone(tmp_path, capsys):
    """[3.2] a label outside the vocabulary or an empty split: one line; a zero-byte embedding cache: re-embedded."""
    clips = {s: [(torch.randn(2400) * 0.1, ["a"]), (torch.randn(2400) * 0.1, ["b"])]
             for s in ("train", "valid", "test")}
    path = demo.write_task(tmp_path / "tasks", "t", clips, False, False, 0.1)
    argv = ["--tasks-dir", str(tmp_path / "tasks"), "--upstream", "EC", "--encodec", "random", "--grid-points", "1",
            "--max-epochs", "3", "--out", str(tmp_path / "out")]
    good = (path / "valid.json").read_text()
    for text, message in (('{"valid_0000.wav": ["zebra"]}', "zebra"), ("{}", "empty")):
        (path / "valid.json").write_text(text)
        code, err = one_line(E.main, argv, capsys)
        assert code == 2 and err.count("\n") == 1 and message in err and "valid.json" in err, err
    (path / "valid.json").write_text(good)
    E.main(argv)
    (cached,) = glob.glob(str(tmp_path / "out" / "embeddings" / "*" / "t" / "valid.npz"))
    open(cached, "wb").close()  # a full disk or a killed copy
    with pytest.warns(UserWarning, match="valid.npz"):
        E.main(argv)
    assert os.path.getsize(cached) > 0


def test_file_names_that_are_not_utf8_are_read_cached_indexed_and_embedded(codec, tmp_path):
    """Names as bytes (latin-1 é): every stage reads them through os.fsencode, none raises UnicodeEncodeError."""
    folder = tmp_path / "audio"
    folder.mkdir()
    odd = os.fsdecode(os.path.join(os.fsencode(folder), b"caf\xe9.wav"))  # a surrogate escape in the str
    sf.write(os.fsencode(odd), tone(0.5), SAMPLE_RATE)
    write(folder, "plain.wav", tone(0.5))
    paths = D.list_audio(str(folder))
    assert odd in paths and len(D.read_audio(odd)) == SAMPLE_RATE // 2
    assert cache.build_cache(codec, paths, tmp_path / "cache")[0] == 2
    assert len(file_index.build_index([str(folder)], str(tmp_path / "index.npz"), workers=1)[0].paths) == 2
    embed_tool.main(["--upstream", "EC", "--encodec", "random", "--out", str(tmp_path / "emb"), str(folder)])
    assert os.path.exists(os.fsencode(os.path.join(tmp_path, "emb", os.path.basename(odd) + ".npy")))


def test_fewer_files_than_val_files_is_one_line(tmp_path, capsys):
    """[3.1] a folder of 3 files with the default --val_files 16: one line naming the flag."""
    for i in range(3):
        write(tmp_path, f"{i}.wav", tone(0.5))
    code, err = one_line(train.main, TINY_RUN + ["--data", str(tmp_path), "--val_files", "16", "--out",
                                                  str(tmp_path / "run")], capsys)
    assert code == 2 and err.count("\n") == 1 and "--val_files" in err, err


def test_a_folder_that_cannot_be_read_is_named_as_such(tmp_path, monkeypatch):
    """A subfolder without read permission is named in a warning by every command that walks folders."""
    for sub in ("open", "closed"):
        (tmp_path / "audio" / sub).mkdir(parents=True)
        write(tmp_path / "audio" / sub, "x.wav", tone(0.3))
    real = os.scandir  # as root, chmod does not stop reading: the walk's scandir says no

    def scandir(path="."):
        if os.fsdecode(path).endswith("closed"):
            raise PermissionError(errno.EACCES, "Permission denied", os.fsdecode(path))
        return real(path)
    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.warns(UserWarning, match="closed.*Permission denied"):
        assert len(D.list_audio(str(tmp_path / "audio"))) == 1
    with pytest.warns(UserWarning, match="closed.*Permission denied"):
        from extras.embed import embed_plan
        assert len(embed_plan([tmp_path / "audio"], tmp_path / "emb")) == 1


# ---------------------------------------------------------------- long files, TensorBoard
def test_embed_reports_progress_per_piece_and_writes_what_embed_file_gives(tmp_path, monkeypatch, capsys):
    """A long file is embedded piece by piece: a progress line per piece, the .npy equal to embed_file's frames."""
    write(tmp_path, "long.wav", tone(9.0))
    monkeypatch.setattr(E, "EMBED_SEGMENT", CROP_SAMPLES)  # 3 pieces: 4 s, 4 s, 1 s
    embed_tool.main(["--upstream", "EC", "--encodec", "random", "--out", str(tmp_path / "emb"), "--log-every", "0",
            str(tmp_path / "long.wav")])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("embed: 1/1 files")]
    assert len(lines) == 3, lines  # one per piece
    frames = np.load(tmp_path / "emb" / "long.wav.npy")
    want = E.embed_file(E.load_upstream("EC", encodec="random"), tmp_path / "long.wav")
    assert frames.shape == (num_frames(9 * SAMPLE_RATE), 128) and np.allclose(frames, want.numpy(), atol=1e-5)


def test_tensorboard_logs_the_metrics_and_its_absence_is_one_line(short_cache, tmp_path, monkeypatch, capsys):
    """--tensorboard: the scalars of metrics.jsonl as TensorBoard events; without the package, one line."""
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "torch.utils.tensorboard", None)  # not installed
        m.delitem(sys.modules, "extras.tensorboard", raising=False)
        code, err = one_line(train.main, tiny_run(short_cache, tmp_path / "none", "--steps", "1", "--tensorboard"),
                             capsys)
    assert code == 2 and err.count("\n") == 1 and "pip install tensorboard" in err, err
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    train.main(tiny_run(short_cache, tmp_path / "tb", "--steps", "2", "--tensorboard"))
    events = event_accumulator.EventAccumulator(str(tmp_path / "tb" / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [1, 2]
    assert [e.value for e in events.Scalars("loss")] == pytest.approx(list(losses(tmp_path / "tb").values()))
    assert "masked_acc/0" in events.Tags()["scalars"]
