"""The paper's claims as tests: masking, loss, codec targets, training, k-means, evaluation.

Run: python -m pytest -q test_all.py   (CPU, a few minutes, no downloads: the seeded random
codec stands in for EnCodec's pretrained weights, and clips are short).
"""
import math

import pytest
import torch
import torch.nn.functional as F

import model as M
from model import EnCodecMAE, gap_mask, gather_visible, make_config, restore_sequence

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def codec():
    M._RANDOM_CODECS.clear()
    with pytest.warns(UserWarning, match="NOT the paper's"):  # it says so, once
        return M.load_codec("random", seed=0)


# ---------------------------------------------------------------- masking [2]
def test_gap_mask_hides_exactly_M_prop_of_frames():
    """[2] every clip hides exactly round(M_prop * T) frames."""
    g = torch.Generator().manual_seed(0)
    for T, M_prop, M_gap in [(300, 0.5, 15), (301, 0.5, 15), (300, 0.3, 5), (64, 0.8, 10)]:
        mask = gap_mask(torch.full((16,), T), T, M_prop, M_gap, g)
        assert mask.shape == (16, T)
        assert (mask.sum(1) == round(M_prop * T)).all()


def test_gap_mask_hides_contiguous_gaps_of_M_gap_frames():
    """[2] hidden frames come in runs of at least M_gap, except one trimmed span per clip."""
    g = torch.Generator().manual_seed(1)
    M_gap = 15
    mask = gap_mask(torch.full((32,), 300), 300, 0.5, M_gap, g)
    for row in mask.int().tolist():
        runs, n = [], 0
        for v in row + [0]:
            if v:
                n += 1
            elif n:
                runs.append(n)
                n = 0
        assert sum(r < M_gap for r in runs) <= 1, runs


def test_gap_mask_differs_between_examples_and_follows_the_seed():
    """[2] each example gets its own mask; the same generator seed gives the same masks."""
    masks = gap_mask(torch.full((8,), 300), 300, 0.5, 15, torch.Generator().manual_seed(3))
    assert len({tuple(m.tolist()) for m in masks}) == 8
    again = gap_mask(torch.full((8,), 300), 300, 0.5, 15, torch.Generator().manual_seed(3))
    assert torch.equal(masks, again)


def test_gap_mask_never_hides_padding():
    """[2] padded frames of short clips are never hidden; real frames hide round(M_prop * length)."""
    lengths = torch.tensor([300, 200, 37, 9, 1])
    mask = gap_mask(lengths, 300, 0.5, 15, torch.Generator().manual_seed(4))
    t = torch.arange(300)
    assert not (mask & (t[None] >= lengths[:, None])).any()
    assert mask.sum(1).tolist() == [round(0.5 * L) for L in lengths.tolist()]


def test_gap_mask_covers_every_frame_over_many_draws():
    """[2] every frame is sometimes hidden; edges less often, as only one span start covers frame 0."""
    mask = gap_mask(torch.full((400,), 300), 300, 0.5, 15, torch.Generator().manual_seed(5))
    rate = mask.float().mean(0)
    assert rate.min() > 0.02 and rate[100:200].min() > 0.4 and abs(rate.mean().item() - 0.5) < 1e-6


def test_visible_frames_keep_their_positions_and_restore_puts_them_back():
    """[2.2] positions are added before masking; ids_restore undoes the shuffle."""
    B, T, D = 4, 300, 16
    x = torch.randn(B, T, D) + M.sinusoidal_positions(T, D)
    mask = gap_mask(torch.full((B,), T), T, 0.5, 15, torch.Generator().manual_seed(6))
    padding = torch.zeros(B, T, dtype=torch.bool)
    x_visible, ids_restore, visible_padding = gather_visible(x, mask, padding)
    assert x_visible.shape == (B, T - 150, D) and visible_padding is None  # dense, no padding
    for b in range(B):  # the visible frames, in time order, with their own positions
        assert torch.equal(x_visible[b], x[b][~mask[b]])
    token = torch.full((1, 1, D), 7.0)
    full = restore_sequence(x_visible, ids_restore, visible_padding, token)
    assert torch.equal(full[~mask], x[~mask]) and (full[mask] == 7.0).all()


def test_restore_handles_clips_of_different_lengths():
    """[2.2] with padding, short clips' unused visible slots become mask tokens, order is restored."""
    B, T, D = 3, 60, 4
    x = torch.randn(B, T, D)
    padding = torch.arange(T)[None] >= torch.tensor([60, 40, 10])[:, None]
    mask = gap_mask((~padding).sum(1), T, 0.5, 5, torch.Generator().manual_seed(7))
    x_visible, ids_restore, visible_padding = gather_visible(x, mask, padding)
    assert x_visible.shape[1] == 30 and visible_padding.sum(1).tolist() == [0, 10, 25]
    full = restore_sequence(x_visible, ids_restore, visible_padding, torch.zeros(1, 1, D))
    seen = ~mask & ~padding
    assert torch.equal(full[seen], x[seen]) and (full[~seen] == 0).all()


def test_encoder_output_ignores_hidden_frames():
    """[2.2] the encoder never sees hidden frames: changing them changes no visible output."""
    cfg = make_config("tiny")
    net = EnCodecMAE(cfg).eval()
    feats = torch.randn(2, 300, 128)
    mask = gap_mask(torch.full((2,), 300), 300, 0.5, 15, torch.Generator().manual_seed(8))
    padding = torch.zeros(2, 300, dtype=torch.bool)
    altered = torch.where(mask[..., None], torch.randn_like(feats), feats)
    outs = []
    for f in (feats, altered):
        x = net.in_proj(f) + M.sinusoidal_positions(300, cfg.d_model)
        x_visible, _, vp = gather_visible(x, mask, padding)
        outs.append(net.encoder(x_visible, vp))
    assert torch.allclose(outs[0], outs[1], atol=1e-6)


# ---------------------------------------------------------------- loss [2.3]
def test_loss_equals_the_equation_term_by_term():
    """[2.3] the vectorised loss equals a naive loop over q, t and the batch."""
    torch.manual_seed(0)
    B, T, S, K = 2, 12, 3, 7
    logits = torch.randn(B, T, S, K)
    targets = torch.randint(0, K, (B, T, S))
    mask = torch.rand(B, T) < 0.5
    padding = torch.zeros(B, T, dtype=torch.bool)
    padding[1, 9:] = True
    gamma, delta = torch.tensor([0.5, 0.3, 0.2]), 0.9
    out = M.masked_token_loss(logits, targets, mask, padding, gamma, delta)
    hidden = [(b, t) for b in range(B) for t in range(T) if mask[b, t] and not padding[b, t]]
    shown = [(b, t) for b in range(B) for t in range(T) if not mask[b, t] and not padding[b, t]]
    alpha, beta = delta / len(hidden), (1 - delta) / len(shown)
    L = 0.0
    for q in range(S):
        C = lambda b, t: -torch.log_softmax(logits[b, t, q], -1)[targets[b, t, q]]
        L += gamma[q] * (alpha * sum(C(b, t) for b, t in hidden) + beta * sum(C(b, t) for b, t in shown))
    assert torch.allclose(out.loss, L, atol=1e-5)


def test_with_delta_one_and_equal_gamma_the_loss_is_ce_on_hidden_frames():
    """[2.3] delta = 1 and uniform gamma_q: plain cross-entropy over hidden frames, averaged over q."""
    torch.manual_seed(1)
    logits, targets = torch.randn(3, 20, 4, 16), torch.randint(0, 16, (3, 20, 4))
    mask = torch.rand(3, 20) < 0.5
    out = M.masked_token_loss(logits, targets, mask, torch.zeros(3, 20, dtype=torch.bool),
                              torch.full((4,), 0.25), 1.0)
    expected = F.cross_entropy(logits[mask].reshape(-1, 16), targets[mask].reshape(-1))
    assert torch.allclose(out.loss, expected, atol=1e-6)


def test_masked_accuracy_counts_hidden_frames_only():
    """[2.3] the logged masked accuracy is top-1 over hidden frames, per stream."""
    targets = torch.zeros(1, 4, 2, dtype=torch.long)
    logits = torch.zeros(1, 4, 2, 3)
    logits[0, :2, 0, 0] = 5  # stream 0 right on frames 0, 1
    logits[0, 2:, 0, 1] = 5  # and wrong on frames 2, 3
    mask = torch.tensor([[True, False, True, False]])
    out = M.masked_token_loss(logits, targets, mask, torch.zeros(1, 4, dtype=torch.bool),
                              torch.tensor([0.5, 0.5]), 0.9)
    assert out.masked_acc[0] == 0.5


def test_gamma_q_is_normalized_and_decreasing_for_residual_codebooks(codec):
    """[3.1] gamma_q is the mean quantization error per codebook, normalized to sum to 1."""
    from data import demo_clips
    gamma = M.estimate_gamma(codec, demo_clips(8, seconds=1.0, seed=11))
    assert gamma.shape == (8,) and abs(gamma.sum().item() - 1) < 1e-6 and (gamma > 0).all()
    assert gamma[0] > gamma[-1]  # residual stages explain less and less
    assert abs(sum(M.RELEASED_GAMMA_Q) - 1) < 1e-3  # the released default for pretrained EnCodec


def test_kmeans_stream_gets_weight_sum_of_gamma_q():
    """[2.3] the self-training stream Q+1 weighs sum_q gamma_q."""
    cfg = make_config("tiny", n_kmeans_streams=1)
    w = M.stream_weights(cfg)
    assert w.shape == (9,) and torch.allclose(w[8], torch.tensor(sum(cfg.gamma_q)))


# ---------------------------------------------------------------- architecture [2.2]
@pytest.mark.parametrize("n_kmeans_streams", [0, 1])
def test_head_predicts_K_logits_for_each_stream(n_kmeans_streams):
    """[2.2] the head outputs (B, T, S, 1024) with S = 8 codec streams (+1 after self-training)."""
    net = EnCodecMAE(make_config("tiny", n_kmeans_streams=n_kmeans_streams))
    h = torch.randn(2, 300, net.cfg.d_model)
    assert net.head(h).shape == (2, 300, 8 + n_kmeans_streams, 1024)


def test_adding_the_kmeans_stream_keeps_stage_one_weights():
    """[2.3] self-training starts from the stage-1 weights; only the new head rows are new."""
    net = EnCodecMAE(make_config("tiny"))
    new = M.add_kmeans_stream(net)
    assert new.cfg.n_streams == 9
    assert torch.equal(new.head.linear.weight[: 8 * 1024], net.head.linear.weight)
    assert torch.equal(new.encoder.layers[0].qkv.weight, net.encoder.layers[0].qkv.weight)


@pytest.mark.parametrize("size", ["small", "base", "large"])
def test_parameter_counts_match_table_1(size):
    """[Table 1] EnCodec encoder + input projection + MAE encoder within 5% of 51M / 94M / 269M."""
    n = M.count_parameters(make_config(size))
    assert abs(n / M.TABLE1_PARAMS[size] - 1) < 0.05, n


def test_config_refuses_inconsistent_values():
    """[2.3] gamma_q must have Q weights summing to 1; unknown sizes are refused."""
    with pytest.raises(AssertionError, match="gamma_q"):
        make_config("tiny", gamma_q=(0.5, 0.5))
    with pytest.raises(ValueError, match="unknown model size"):
        make_config("huge")
    assert len(make_config("tiny", Q=4).gamma_q) == 4


# ---------------------------------------------------------------- the codec [2.1]
def test_random_codec_is_deterministic_and_uses_many_codes(codec):
    """[2.1] the seeded random codec gives the same targets twice and many distinct codes per stream."""
    from data import demo_clips
    wav = demo_clips(8, seconds=1.0, seed=21)
    feats, codes = codec(wav)
    assert feats.shape == (8, 75, 128) and codes.shape == (8, 75, 8)
    M._RANDOM_CODECS.clear()  # rebuild it from the seed alone
    with pytest.warns(UserWarning):
        again = M.load_codec("random", seed=0)
    assert torch.equal(again(wav)[1], codes) and torch.allclose(again(wav)[0], feats)
    distinct = [codes[..., q].unique().numel() for q in range(8)]
    assert min(distinct) >= 100, distinct


def test_codec_frames_are_75_hz_for_any_length(codec):
    """[2.1] 24 kHz audio gives ceil(n / 320) frames, also for lengths that are not whole hops."""
    for n in (320, 321, 24000, 33333):
        feats, codes = codec(torch.randn(1, n) * 0.1)
        assert feats.shape[1] == codes.shape[1] == M.num_frames(n)


def test_offline_pretrained_codec_fails_loudly_with_the_alternatives(tmp_path):
    """[3.1] a missing local checkpoint is an error that names the file, never a random fallback."""
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        M.load_codec(str(tmp_path / "missing.th"))


# ---------------------------------------------------------------- learning and features
def test_tiny_model_overfits_one_batch(codec):
    """[2.3] on one fixed batch and mask, masked top-1 accuracy climbs far above chance (1/1024)."""
    from data import demo_clips
    torch.manual_seed(0)
    feats, codes = codec(demo_clips(4, seconds=2.0, seed=31))
    mask = gap_mask(torch.full((4,), 150), 150, 0.5, 15, torch.Generator().manual_seed(0))
    net = EnCodecMAE(make_config("tiny"))
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3)
    first = net(feats, codes, mask)
    for _ in range(40):
        out = net(feats, codes, mask)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert out.loss < 0.5 * first.loss
    assert out.masked_acc.mean() > 0.3, out.masked_acc  # chance is 0.001


def test_chunked_features_equal_the_concatenated_halves(codec):
    """[3.1] an 8-s clip is embedded as two 4-s chunks whose frames are concatenated."""
    from data import demo_clips
    net = EnCodecMAE(make_config("tiny")).eval()
    wav = demo_clips(1, seconds=8.0, seed=41)
    whole = M.embed_audio(net, codec, wav)
    halves = [net.embed(codec.features(h)) for h in wav.split(M.CROP_SAMPLES, dim=1)]
    assert whole.shape == (1, 600, net.cfg.d_model)
    assert torch.allclose(whole, torch.cat(halves, 1), atol=1e-5)
    tail = M.embed_audio(net, codec, wav[:, : M.CROP_SAMPLES + 5000])  # a partial last chunk
    assert tail.shape[1] == M.num_frames(M.CROP_SAMPLES + 5000)


# ---------------------------------------------------------------- training [3.1]
import json
import os
import subprocess
import sys

import train

TINY_RUN = ["--config", "tiny", "--encodec", "random", "--batch_size", "4", "--workers", "0",
            "--val_files", "2", "--gamma", "uniform", "--log_every", "1", "--val_every", "1000"]


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory, codec):
    """Ten short demo files and their codec cache, shared by the training tests."""
    from data import build_cache, write_demo_dataset
    root = tmp_path_factory.mktemp("demo")
    paths = write_demo_dataset(str(root / "audio"), n_files=10, seed=0, seconds=(4.0, 6.0))
    build_cache(codec, paths, str(root / "cache"))
    return str(root / "audio"), str(root / "cache")


def losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


def test_command_line_takes_every_config_field_and_refuses_unknown_ones():
    """[3.1] --field=value for any TrainConfig/ModelConfig field; typos are errors, not ignored."""
    cfg, mcfg = train.parse_args(["--config", "small", "--M_prop=0.3", "--steps", "7", "--data", "a", "b",
                                  "--resume", "--betas", "0.8,0.9"])
    assert (mcfg.n_enc_layers, mcfg.M_prop, cfg.steps, cfg.data, cfg.resume, cfg.betas) == \
        (5, 0.3, 7, ("a", "b"), True, (0.8, 0.9))
    with pytest.raises(SystemExit, match="unknown option --M_porp"):
        train.parse_args(["--M_porp=0.3"])
    with pytest.raises(SystemExit, match="not divisible"):
        train.derived(train.TrainConfig(batch_size=10, grad_accum=3), world=1)


def test_a_killed_run_resumes_bit_for_bit(demo_cache, tmp_path):
    """[3.1] stop after step 2, resume to step 4: the same losses as a run that never stopped."""
    audio, cache = demo_cache
    common = TINY_RUN + ["--data", audio, "--cache", cache, "--ckpt_every", "2"]
    train.main(common + ["--out", str(tmp_path / "straight"), "--steps", "4"])
    train.main(common + ["--out", str(tmp_path / "killed"), "--steps", "2"])
    (tmp_path / "killed" / "ckpt-00000003.pt.tmp").write_bytes(b"half a checkpoint")  # died mid-save
    train.main(common + ["--out", str(tmp_path / "killed"), "--steps", "4", "--resume"])
    straight, resumed = losses(tmp_path / "straight"), losses(tmp_path / "killed")
    assert straight == resumed and sorted(resumed) == [1, 2, 3, 4]


def test_checkpoint_round_trips_the_model(demo_cache, tmp_path):
    """[3.1] a checkpoint holds config, gamma_q and weights; loading it is strict and exact."""
    audio, cache = demo_cache
    train.main(TINY_RUN + ["--data", audio, "--cache", cache, "--out", str(tmp_path), "--steps", "1"])
    net, cfg, source = M.load_checkpoint_model(str(tmp_path / "ckpt-00000001.pt"))
    ckpt = torch.load(tmp_path / "ckpt-00000001.pt", weights_only=True)
    assert source == "random" and cfg == M.config_from_dict(ckpt["config"]) and ckpt["step"] == 1
    assert all(torch.equal(v, ckpt["model"][k]) for k, v in net.state_dict().items())
    assert ckpt["gamma_q"] == [0.125] * 8 and "optimizer" in ckpt


def test_a_diverging_run_stops_and_keeps_its_last_good_checkpoint(demo_cache, tmp_path):
    """[3.1] a non-finite loss stops the run with a clear message; saved checkpoints stay valid."""
    audio, cache = demo_cache
    with pytest.raises(SystemExit, match="loss is (nan|inf)"):
        train.main(TINY_RUN + ["--data", audio, "--cache", cache, "--out", str(tmp_path), "--steps", "20",
                               "--ckpt_every", "1", "--lr", "1e30"])
    for path in tmp_path.glob("ckpt-*.pt"):
        M.load_checkpoint_model(str(path))


def test_two_gloo_processes_match_one_process_on_the_full_batch(demo_cache, tmp_path):
    """[3.1] DDP over 2 CPU processes: the same losses as one process with the whole batch."""
    audio, cache = demo_cache
    args = TINY_RUN + ["--data", audio, "--cache", cache, "--steps", "2", "--ckpt_every", "100"]
    train.main(args + ["--out", str(tmp_path / "one")])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
                    "train.py", *args, "--out", str(tmp_path / "two")], check=True, env=env,
                   cwd=os.path.dirname(os.path.abspath(__file__)), capture_output=True)
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert one.keys() == two.keys() == {1, 2}
    assert all(abs(one[s] - two[s]) < 1e-4 for s in one), (one, two)


def test_tiny_model_learns_on_demo_data(demo_cache, tmp_path):
    """[2.3] on demo audio the loss falls and masked accuracy rises far above chance (1/1024)."""
    audio, cache = demo_cache
    train.main(TINY_RUN + ["--data", audio, "--cache", cache, "--out", str(tmp_path), "--steps", "30",
                           "--lr", "2e-3", "--batch_size", "8", "--log_every", "10"])
    with open(tmp_path / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert records[-1]["loss"] < records[0]["loss"] - 0.5
    assert max(records[-1]["masked_acc"]) > 0.02, records[-1]["masked_acc"]
