"""Tests of extras/released.py: the authors' released checkpoints load and give THEIR embeddings.

`python -m pytest -q extras/tests/test_released.py -s` from the repository root (CPU, offline, no authors'
package; -s prints every max abs diff). The fixtures in extras/tests/fixtures/released/ were written by the
authors' own code (.ci/released_fixtures.py build): tiny random models in their file formats.
"""
import os
import warnings

import pytest
import torch

from extras import embed as embed_tool
from extras.released import load_released, released_scene, released_timestamps
from extras.tests.released_cases import (CODEC_SEED, FIXTURES, KINDS, fixture_clips, fixture_path,
                                         v2_variant)

MEL = "mel256-ec-base_st"  # the cheapest kind (no codec) for tests of the plumbing
# One thread, as test_all.py: on this busy 2-core machine two threads made the codec's LSTM ten
# times slower (the whole file took 50 s instead of 8 s).
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def clips():
    return [torch.from_numpy(c)[None] for c in fixture_clips()]  # (1, n) each, 24 kHz


def expected(kind):
    return torch.load(FIXTURES / f"{kind}.expected.pt", weights_only=True)


def saved(tmp_path, obj, name="x.pt"):
    torch.save(obj, tmp_path / name)
    return tmp_path / name


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_kind_gives_the_authors_embeddings(kind, clips):
    """Each recorded clip and layer equals their extract_features_from_array within 1e-5 (max abs)."""
    exp, m = expected(kind), load_released(fixture_path(kind))
    for j in exp["clip_ids"]:
        ours = m.all_layers(clips[j])
        for layer in exp["layers"]:
            mine, theirs = ours[layer if layer == -1 else layer % m.arch.n_layers][0], exp["out"][f"{j}/{layer}"]
            assert mine.shape == theirs.shape, (kind, j, layer)
            diff = float((mine - theirs).abs().max())
            print(f"{kind} clip {j} ({clips[j].shape[1] / 24000:.2f} s) layer {layer}: max abs diff {diff:.1e}")
            assert diff <= 1e-5, (kind, j, layer, diff)


def test_frames_counts_layers_as_their_extractor(clips):
    """layer=L-1 is v1's last normed stream (not the final output) but v2's final output."""
    v1, v2 = "encodecmae-small", MEL
    L1, L2 = (load_released(fixture_path(k)).arch.n_layers for k in (v1, v2))
    inner = load_released(fixture_path(v1), layer=L1 - 1).frames(clips[0])[0]
    assert torch.allclose(inner, expected(v1)["out"][f"0/{L1 - 1}"], atol=1e-5)
    assert not torch.allclose(inner, expected(v1)["out"]["0/-1"], atol=1e-2)
    last = load_released(fixture_path(v2), layer=L2 - 1).frames(clips[0])[0]
    assert torch.allclose(last, expected(v2)["out"]["0/-1"], atol=1e-5)
    with pytest.raises(ValueError, match="their layers count"):
        load_released(fixture_path(v2), layer=L2)


def test_v2_refuses_clips_too_short_for_a_chunk(clips):
    """200 samples: v2 skips every chunk of <= 2048 samples (theirs then crashes), so a clear ValueError."""
    with pytest.raises(ValueError, match="no chunk over 2048 samples"):
        load_released(fixture_path(MEL)).frames(clips[4])


def test_network_has_their_parameters_with_one_shared_feed_forward():
    """Our feature path holds exactly their parameter count: one FF block serves every layer."""
    for kind in KINDS:
        m = load_released(fixture_path(kind))
        layers = m.visible_encoder.encoder_layers
        assert all(layer.ff_layer is layers[0].ff_layer for layer in layers), kind
        ours = sum(p.numel() for n, p in m.named_parameters() if not n.startswith("wav_encoder.encoder."))
        assert ours == expected(kind)["n_params"], (kind, ours)


def test_batch_rows_equal_single_clip_calls(clips):
    """Each row of a batch gets the single-clip answer (their batched call does not, docs/RELEASED.md)."""
    for kind, j in (("encodecmae-small", 0), ("ec-ec-base", 1)):
        rows = load_released(fixture_path(kind)).frames(clips[j].repeat(2, 1))
        assert (rows - expected(kind)["out"][f"{j}/-1"]).abs().max() <= 1e-5, kind


def test_their_hear_protocol_frames_centre_timestamps_in_ms_and_mean_pooling(clips):
    """Their wrapper's protocol on our frames: ints for sizes, 75 Hz frames, centre timestamps in
    ms, the scene embedding the mean of all frames."""
    m = load_released(fixture_path(MEL))
    assert type(m.scene_embedding_size) is int
    assert m.scene_embedding_size == m.timestamp_embedding_size == 36
    emb = m.frames(clips[0].repeat(2, 1))  # (2, T, D)
    ts = released_timestamps(emb.shape[1], emb.shape[0])  # (2, T)
    assert emb.shape == (2, 97, 36) and ts.shape == (2, 97) and torch.isfinite(emb).all()
    assert torch.allclose(ts[:, 0], torch.tensor(1000 * 0.5 / 75))  # ms at frame centres
    assert torch.allclose(ts.diff(), torch.tensor(1000 / 75))
    assert torch.allclose(released_scene(emb), emb.mean(1))
    assert not torch.allclose(released_scene(emb), emb[:, :-1].mean(1))  # the last frame too


def test_one_rate_per_object_the_hear_model_takes_48k_the_upstream_24k(tmp_path):
    """The released upstream's frames() take 24 kHz and it says so; the HEAR model that wraps it
    declares HEAR's 48000 (HEAR has no 24 kHz). The same sound, each at its own rate, gives the
    same frames; the upstream fed 48 kHz would give twice the frames, at half the pitch."""
    import numpy as np
    import soundfile as sf
    import evaluate as E
    from data import read_audio
    upstream = load_released(fixture_path(MEL))
    hear = E.load_model(f"released:{fixture_path(MEL)}")
    rates = (upstream.sample_rate, hear.sample_rate, hear.upstream.sample_rate)
    assert rates == (24000, 48000, 24000) and all(type(r) is int for r in rates)
    t = np.arange(int(1.5 * 48000)) / 48000
    noise = 0.05 * np.random.default_rng(0).standard_normal(len(t))
    audio = (0.3 * np.sin(2 * np.pi * 440 * t) + noise).astype(np.float32)  # 1.5 s at 48 kHz
    sf.write(tmp_path / "a.wav", audio, 48000, subtype="FLOAT")
    wav24 = read_audio(tmp_path / "a.wav")  # (n,) at 24 kHz: the file resampled as any file is
    emb, _ = E.get_timestamp_embeddings(torch.from_numpy(audio)[None], hear)  # (1, T, D)
    frames = upstream.frames(wav24[None])  # (1, T', D)
    assert emb.shape[1] == 112 and torch.allclose(emb, frames[:, :112], atol=1e-5)
    assert upstream.frames(torch.from_numpy(audio)[None]).shape[1] >= 2 * 112


def test_key_changes_when_the_file_changes(tmp_path):
    """A rewritten file (new mtime or size) gets a new key, so cached embeddings are not reused."""
    path = tmp_path / "mel.pt"
    path.write_bytes(fixture_path(MEL).read_bytes())
    first = load_released(path).key
    os.utime(path, (1e9, 1e9))
    assert load_released(path).key != first and load_released(path).name == "released:mel"


@pytest.mark.parametrize("what", ["ours", "random bytes", "truncated", "not a dict"])
def test_files_that_are_not_released_models_are_refused(what, tmp_path):
    """One of our train.py checkpoints, random bytes, a truncated download: one-line ValueError."""
    path = tmp_path / "bad.pt"
    if what == "ours":
        torch.save({"model": {}, "config": {"d_model": 8}, "encodec": "random"}, path)
    elif what == "random bytes":
        path.write_bytes(bytes(torch.randint(0, 256, (5000,), generator=torch.Generator().manual_seed(0)).tolist()))
    elif what == "truncated":
        path.write_bytes(fixture_path(MEL).read_bytes()[:60000])
    else:
        torch.save([1, 2], path)
    with pytest.raises(ValueError) as err:
        load_released(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)
    assert what != "ours" or "train.py" in str(err.value)


# What their load_model does with each (their code at HEAD, docs/RELEASED.md "Errors"): KeyError,
# "No configurable matching reference", gin's SyntaxError (twice).
@pytest.mark.parametrize("what, says", [
    ("no imports", "without 'imports'"),
    ("unknown model class", "get_model.model = @encodecmae.models.EncodecMAEX"),
    ("a line that is not gin", "line 279: expected '=' or ':' after 'this'"),
    ("== for =", "line 13: expected '=' or ':' after 'MODEL_DIM'"),
])
def test_files_their_loader_refuses_are_refused_in_one_line_naming_the_file(what, says, tmp_path):
    """A v2 file without 'imports', a get_model.model naming an unknown class, a gin syntax error
    (our parser skipped such a line; gin stops there): refused, one line naming the file."""
    path = saved(tmp_path, v2_variant(what))
    with pytest.raises(ValueError) as err:
        load_released(path)
    assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)
    assert says in str(err.value), str(err.value)


def test_a_syntax_error_in_a_raw_config_or_a_v1_config_gin_is_refused_naming_its_line(tmp_path):
    """The authors' raw block syntax (spec-ec-base) and a v1 config.gin: read as strictly as gin
    reads them, the error on gin's line."""
    ckpt = torch.load(fixture_path("spec-ec-base"), weights_only=True)
    for broken, line in ((ckpt["config"] + "\nthis is not gin\n", 226),
                         (ckpt["config"].replace("    num_heads", "    num heads", 1), 134)):
        with pytest.raises(ValueError, match=f"line {line}: .*gin refuses it too"):
            load_released(saved(tmp_path, dict(ckpt, config=broken)))
    v1 = tmp_path / "v1"
    v1.mkdir()
    (v1 / "model.pt").write_bytes(fixture_path("encodecmae-small").read_bytes())
    gin = fixture_path("encodecmae-small").with_name("config.gin").read_text()
    (v1 / "config.gin").write_text(gin.replace("MODEL_DIM = 36", "MODEL_DIM = 36)"))
    with pytest.raises(ValueError, match=f"^{v1 / 'config.gin'}, line 14: expected the end"):
        load_released(v1 / "model.pt")


@pytest.mark.parametrize("what, says, not_said", [
    ("no config", "a v2 state_dict without 'config'", "neither feat_projector"),
    ("config as bytes", "its 'config' is bytes, not the text", "neither feat_projector"),
    ("empty config", "binds no get_model.model", "None heads"),
    ("renamed num_heads", "gives the encoder's MultiHeadAttention no num_heads", "None heads"),
    ("undefined macro", "uses the macro %NUM_X_HEADS, which it never defines", "cannot be read"),
])
def test_each_damaged_file_is_told_what_is_wrong_and_what_to_do(what, says, not_said, tmp_path):
    """One line each, naming the file, saying what is wrong (not a misleading cause), what to do."""
    path = saved(tmp_path, v2_variant(what))
    with pytest.raises(ValueError) as err:
        load_released(path)
    message = str(err.value)
    assert message.startswith(str(path)) and "\n" not in message
    assert says in message and not_said not in message, message
    assert message.endswith("download the file again"), message


@pytest.mark.parametrize("cut", [0.25, 0.5, 0.75])
def test_a_truncated_v1_config_gin_says_so(cut, tmp_path):
    """A config.gin cut short (at a line's end or within one) is named as the damaged file."""
    (tmp_path / "model.pt").write_bytes(fixture_path("encodecmae-small").read_bytes())
    gin = fixture_path("encodecmae-small").with_name("config.gin").read_text()
    (tmp_path / "config.gin").write_text(gin[: int(cut * len(gin))])
    with pytest.raises(ValueError) as err:
        load_released(tmp_path / "model.pt")
    message = str(err.value)
    assert message.startswith(str(tmp_path / "config.gin")) and "\n" not in message
    assert "None heads" not in message and message.endswith("download the file again"), message


@pytest.mark.parametrize("what, says", [
    ("random bytes", "not a torch checkpoint (5,000 bytes, starting"),
    ("bytes that start like a pickle", "not a torch checkpoint (5,002 bytes, starting b'\\x80"),
    ("an HTML page", "not a torch checkpoint (23 bytes, starting b'<html><b'): download it again"),
    ("empty", "an empty file (0 bytes): download it again"),
    ("truncated", "a torch zip archive cut short or damaged (60,000 bytes): download it again"),
    ("truncated more", "a torch zip archive cut short or damaged (100,000 bytes)"),
    ("pickled object", "it pickles argparse.Namespace besides tensors, which is refused unread"),
])
def test_an_unreadable_file_is_one_plain_line_not_torchs_text(what, says, tmp_path):
    """Random bytes, a web page, a cut download, a foreign pickle: what it is, in whole words."""
    path = tmp_path / "bad.pt"
    data = fixture_path(MEL).read_bytes()
    noise = torch.randint(0, 256, (5000,), generator=torch.Generator().manual_seed(0)).tolist()
    blobs = {"random bytes": bytes(noise), "an HTML page": b"<html><body>404</body>\n",
             "bytes that start like a pickle": b"\x80\x04" + bytes(noise),
             "empty": b"", "truncated": data[:60000], "truncated more": data[:100000]}
    if what == "pickled object":
        import argparse
        torch.save({"state_dict": {}, "args": argparse.Namespace(a=1)}, path)  # not weights only
    else:
        path.write_bytes(blobs[what])
    with pytest.raises(ValueError) as err, warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        load_released(path)
    assert not warned, warned[0].message  # nor torch's warning (an unexpected pickle protocol)
    message = str(err.value)
    assert message.startswith(str(path)) and "\n" not in message, message
    assert says in message, message
    assert "Weights only" not in message and "PytorchStreamReader" not in message, message


def test_unknown_designs_are_refused(tmp_path):
    """An unknown front end, per-layer FF weights, or heads that do not divide the projections: ValueError."""
    ckpt = torch.load(fixture_path(MEL), weights_only=True)
    odd = dict(ckpt, config=ckpt["config"].replace("@torch.nn.Identity", "@encodecmae.models.encoders.SEANetEncoder"))
    with pytest.raises(ValueError, match="SEANetEncoder"):
        load_released(saved(tmp_path, odd))
    sd = dict(ckpt["state_dict"])
    key = "visible_encoder.encoder_layers.1.ff_layer.0.weight"
    sd[key] = sd[key] + 1  # layer 1's copy of the FF block no longer equals layer 0's
    with pytest.raises(ValueError, match="shared"):
        load_released(saved(tmp_path, dict(ckpt, state_dict=sd)))
    heads = dict(ckpt, config=ckpt["config"] + "\nNUM_ENCODER_HEADS = 5\n")
    with pytest.raises(ValueError, match="5 heads"):
        load_released(saved(tmp_path, heads))


def test_v1_needs_its_config_gin(tmp_path):
    """A v1 model.pt without the config.gin beside it is refused, and config= finds it elsewhere."""
    (tmp_path / "model.pt").write_bytes(fixture_path("encodecmae-small").read_bytes())
    with pytest.raises(ValueError, match="config.gin"):
        load_released(tmp_path / "model.pt")
    gin = fixture_path("encodecmae-small").with_name("config.gin")
    assert load_released(tmp_path / "model.pt", config=gin).arch.version == "v1"


def test_codec_comes_from_the_file_the_seed_or_encodec_path(tmp_path, clips):
    """Without codec weights: encodec=PATH loads a local EnCodec; no seed and no path is refused."""
    from encodec import EncodecModel
    ckpt = torch.load(fixture_path("ec-ec-base"), weights_only=True)
    bare = saved(tmp_path, {k: v for k, v in ckpt.items() if not k.startswith("codec_")}, "bare.pt")
    with pytest.raises(ValueError, match="encodec="):
        load_released(bare)
    with torch.random.fork_rng():
        torch.manual_seed(CODEC_SEED)  # the fixture's random codec, as a local encodec_24khz-*.th would hold
        th = saved(tmp_path, EncodecModel.encodec_model_24khz(pretrained=False).state_dict(), "encodec.th")
    y = load_released(bare, encodec=str(th)).frames(clips[0])[0]
    assert (y - expected("ec-ec-base")["out"]["0/-1"]).abs().max() <= 1e-5
    wrong = saved(tmp_path, dict(ckpt, codec_sha256="0" * 64), "wrong.pt")
    with pytest.raises(ValueError, match="another random codec"):
        load_released(wrong)
    with pytest.raises(ValueError, match="need no EnCodec"):
        load_released(fixture_path(MEL), encodec=str(th))


def test_info_command_prints_one_line_per_fact(capsys):
    """`python extras/released.py info PATH` describes a file; a bad one is one error line and
    exit 2; `--help` runs as a script."""
    import subprocess
    import sys
    from data import run_cli
    from extras.released import main
    assert main(["info", str(fixture_path(MEL))]) == 0
    assert "v2, mel front end (256-d), D=36, 3 layers, 12 heads of 3" in capsys.readouterr().out
    with pytest.raises(SystemExit) as done:
        run_cli(main, ["info", str(FIXTURES / "missing.pt")])
    err = capsys.readouterr().err.strip().splitlines()
    assert done.value.code == 2 and len(err) == 1 and "missing.pt: no such file" in err[0], err
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "released.py")
    helped = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True)
    assert helped.returncode == 0 and "info" in helped.stdout, helped.stderr


@pytest.mark.parametrize("kind, tails", [("ec-ec-base", [84000]), (MEL, [84000, 1000]),
                                         ("encodecmae-small", [84000])])
def test_a_long_file_piece_by_piece_gives_the_frames_of_the_whole_file(kind, tails, tmp_path,
                                                                        monkeypatch):
    """embed_file and `evaluate.py embed` read a file a piece at a time (memory of one piece) and
    give frames() of the whole file: also for v2, whose extractor counts min(n, 4 s) samples of
    every chunk as real with n the WHOLE file's length, when the last piece is shorter than 4 s
    (3.5 s: their mask would hide one frame) or too short for a chunk (1000 samples: skipped, as
    the whole file's last chunk is)."""
    import numpy as np
    import soundfile as sf
    import evaluate as E
    from model import CROP_SAMPLES
    monkeypatch.setattr(E, "EMBED_SEGMENT", CROP_SAMPLES)  # 4-s pieces: a 7.5-s file is two
    m = load_released(fixture_path(kind))
    lengths = []
    frames = m.frames

    def recording(wav, **kw):  # what embed_file holds at once
        lengths.append(wav.shape[1])
        return frames(wav, **kw)
    monkeypatch.setattr(m, "frames", recording)
    for tail in tails:
        noise = np.random.default_rng(tail).standard_normal(CROP_SAMPLES + tail)
        wav = (0.1 * noise).astype(np.float32)
        sf.write(tmp_path / "long.wav", wav, 24000, subtype="FLOAT")
        whole = frames(torch.from_numpy(wav)[None])[0]  # (T, D)
        lengths.clear()
        assert torch.equal(E.embed_file(m, tmp_path / "long.wav"), whole), (kind, tail)
        assert lengths == [CROP_SAMPLES, tail]  # never more than a piece at once
        if kind == MEL:  # the command line writes the same frames (the cheapest kind: no codec)
            out = tmp_path / f"emb{tail}"
            spec = f"released:{fixture_path(kind)}"
            argv = ["--upstream", spec, "--out", str(out), str(tmp_path / "long.wav")]
            assert embed_tool.main(argv) == []
            assert np.array_equal(np.load(out / "long.wav.npy"), whole.numpy()), (kind, tail)


def test_evaluate_embed_writes_the_authors_frames_for_a_folder(tmp_path, capsys):
    """`extras/embed.py --upstream released:FILE` writes each file's frames: their extractor's, any rate."""
    import numpy as np
    import soundfile as sf
    import evaluate as E
    from data import read_audio
    (tmp_path / "audio" / "sub").mkdir(parents=True)
    sf.write(tmp_path / "audio" / "a.wav", fixture_clips()[1], 24000, subtype="FLOAT")
    sf.write(tmp_path / "audio" / "sub" / "b.wav", 0.1 * np.random.default_rng(0).standard_normal(70000), 44100)
    for kind in ("encodecmae-small", MEL):
        out, spec = tmp_path / f"emb-{kind}", f"released:{fixture_path(kind)}"
        assert embed_tool.main(["--upstream", spec, "--out", str(out), "--scene", str(tmp_path / "audio")]) == []
        m = load_released(fixture_path(kind))
        for name in ("a.wav", "sub/b.wav"):
            want = m.frames(read_audio(tmp_path / "audio" / name)[None])[0]  # (T, D)
            assert np.allclose(np.load(out / f"{name}.npy"), want.numpy(), atol=1e-6), (kind, name)
            assert np.allclose(np.load(out / f"{name}.scene.npy"), released_scene(want[None])[0].numpy(), atol=1e-6)
    assert "2 files written" in capsys.readouterr().out


def test_the_hear_module_and_the_evaluation_take_a_released_spec(tmp_path):
    """HEAR's load_model and `evaluate.py --upstream released:FILE` serve the authors' model: their frames,
    scene = mean of all frames (their wrapper), timestamps in ms inside the audio, 48 kHz declared."""
    import torchaudio
    import evaluate as E
    from extras.demo_audio import make_demo_tasks
    spec = f"released:{fixture_path(MEL)}"
    model = E.load_model(spec)
    audio = torchaudio.functional.resample(torch.from_numpy(fixture_clips()[1])[None], 24000, 48000)  # (1, n)
    emb, ts = E.get_timestamp_embeddings(audio, model)
    frames = model.upstream.frames(torchaudio.functional.resample(audio, 48000, 24000))
    assert model.sample_rate == 48000 and ts.max() <= 1000 * audio.shape[1] / 48000
    assert torch.allclose(emb, frames[:, : emb.shape[1]], atol=1e-4)  # two resamplers, the same sinc kernel
    assert torch.allclose(ts[0, 1] - ts[0, 0], torch.tensor(1000 / 75))
    assert torch.allclose(E.get_scene_embeddings(audio, model), released_scene(frames), atol=1e-4)
    make_demo_tasks(tmp_path / "tasks", clips=10, seconds=0.5)
    results = E.main(["--tasks-dir", str(tmp_path / "tasks"), "--task", "demo-pitch", "--upstream", spec,
                      "--grid-points", "1", "--max-epochs", "3", "--out", str(tmp_path / "out")])
    assert 0 <= results[model.upstream.name]["demo-pitch"]["test"] <= 1


@pytest.mark.parametrize("what", ["ours", "random bytes", "truncated"])
def test_a_file_that_is_not_a_released_model_is_one_line_and_exit_2_on_every_command_line(what, tmp_path, capsys):
    """embed and the evaluation refuse a non-released file given as released:FILE with one line, exit 2."""
    import evaluate as E
    from data import run_cli
    path = tmp_path / "x.pt"
    if what == "ours":
        torch.save({"model": {}, "config": {}, "encodec": "random"}, path)
    else:
        path.write_bytes(os.urandom(5000) if what == "random bytes" else fixture_path(MEL).read_bytes()[:60000])
    import soundfile as sf
    sf.write(tmp_path / "a.wav", fixture_clips()[1], 24000)
    for argv in (["--upstream", f"released:{path}", "--out", str(tmp_path / "emb"), str(tmp_path / "a.wav")],):
        with pytest.raises(SystemExit) as done:
            run_cli(embed_tool.main, argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert done.value.code == 2 and len(err) == 1 and str(path) in err[0], err
