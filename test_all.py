"""The paper's claims as tests, section by section (2, 2.1, 2.2, 2.3, 3.1, 3.2), then one end-to-end test per stage.

Run: python -m pytest -q -n 2 test_all.py extras/   (CPU, a few minutes, no downloads: the seeded random
codec stands in for EnCodec's pretrained weights, and clips are short). The tests of what the paper
does not need (demo audio, codec cache, file index, bad input, benchmarks) live in extras/.
"""
import json
import math
import os
import socket
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
from extras import cache, random_codec
from extras import embed as embed_tool
from extras import demo_audio as demo
from extras import demo_signals
from model import (CROP_FRAMES, CROP_SAMPLES, HOP, SAMPLE_RATE, EnCodecMAE, gap_mask, gather_visible,
                   make_config, num_frames, restore_sequence)

# One thread: small tensors gain nothing from a second one, and on a busy 2-core machine two
# OpenMP threads were measured 30x slower (0.07 s -> 2.2 s per tiny training step).
torch.set_num_threads(1)
# Tests run on the CPU even on a GPU machine, in fp32, whatever the machine has.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")


@pytest.fixture(scope="module")
def codec():
    random_codec._BUILT.clear()
    with pytest.warns(UserWarning, match="NOT the paper's"):  # it says so, once
        return D.load_codec("random")


# ---------------------------------------------------------------- 2. masking (M_prop, M_gap)
def runs_of(row):
    """The lengths of the runs of hidden frames in one mask row, in order."""
    runs, n = [], 0
    for v in row + [False]:
        if v:
            n += 1
        elif n:
            runs.append(n)
            n = 0
    return runs


def test_gap_mask_hides_exactly_M_prop_of_frames():
    """[2] every clip hides exactly round(M_prop * T) frames (Python's round: 150.5 -> 150, 149.5 ->
    150), in a (B, T) bool mask."""
    g = torch.Generator().manual_seed(0)
    for T, M_prop, M_gap in [(300, 0.5, 15), (301, 0.5, 15), (299, 0.5, 15), (300, 0.3, 5),
                             (64, 0.8, 10)]:
        mask = gap_mask(torch.full((16,), T), T, M_prop, M_gap, g)
        assert mask.shape == (16, T), f"expected a mask of shape (16, {T}), got {tuple(mask.shape)}"
        assert mask.dtype == torch.bool, f"expected a bool mask, got {mask.dtype}"
        counts = mask.sum(1).tolist()
        assert counts == [round(M_prop * T)] * 16, (
            f"T={T}, M_prop={M_prop}: expected {round(M_prop * T)} hidden frames per clip, got "
            f"{counts}")


def test_gap_mask_keeps_one_frame_of_each_clip_visible():
    """[2] a clip keeps at least one frame for the encoder: min(round(M_prop * length), length - 1)
    hidden, also where the rounded count would be the whole clip (a 1-frame clip at M_prop 0.8)."""
    lengths = torch.tensor([1, 2, 3, 5, 40])
    for M_prop, M_gap in [(0.8, 15), (1.0, 1), (0.9, 2)]:
        mask = gap_mask(lengths, 40, M_prop, M_gap, torch.Generator().manual_seed(10))
        expected = [min(round(M_prop * n), n - 1) for n in lengths.tolist()]
        got = mask.sum(1).tolist()
        assert got == expected, (
            f"clips of {lengths.tolist()} frames at M_prop {M_prop}: expected {expected} hidden, "
            f"got {got}")


def test_gap_mask_hides_contiguous_gaps_of_M_gap_frames():
    """[2] hidden frames come in runs of at least M_gap, except one trimmed span per clip."""
    g = torch.Generator().manual_seed(1)
    M_gap = 15
    mask = gap_mask(torch.full((32,), 300), 300, 0.5, M_gap, g)
    for row in mask.tolist():
        runs = runs_of(row)
        assert sum(r < M_gap for r in runs) <= 1, \
            f"expected at most one run shorter than M_gap = {M_gap} per clip, got the runs {runs}"


def test_gap_mask_differs_between_examples_and_follows_the_seed():
    """[2] each example gets its own mask; the same generator seed gives the same masks."""
    masks = gap_mask(torch.full((8,), 300), 300, 0.5, 15, torch.Generator().manual_seed(3))
    distinct = len({tuple(m.tolist()) for m in masks})
    assert distinct == 8, f"expected 8 different masks for 8 clips, got {distinct}"
    again = gap_mask(torch.full((8,), 300), 300, 0.5, 15, torch.Generator().manual_seed(3))
    differ = (masks != again).any(1).sum().item()
    assert differ == 0, (
        f"expected the same masks from the same seed, got {differ} of 8 clips different")


def test_gap_mask_never_hides_padding():
    """[2] padded frames of short clips are never hidden; real frames hide round(M_prop * length)."""
    lengths = torch.tensor([300, 200, 37, 9, 1])
    mask = gap_mask(lengths, 300, 0.5, 15, torch.Generator().manual_seed(4))
    t = torch.arange(300)
    hidden_padding = (mask & (t[None] >= lengths[:, None])).sum(1).tolist()
    assert hidden_padding == [0] * 5, (
        f"clips of {lengths.tolist()} frames in rows of 300: expected no padding frame hidden, "
        f"got {hidden_padding} hidden")
    expected = [round(0.5 * n) for n in lengths.tolist()]
    assert mask.sum(1).tolist() == expected, (
        f"expected {expected} hidden, got {mask.sum(1).tolist()}")


def test_gap_mask_covers_every_frame_over_many_draws():
    """[2] every frame is sometimes hidden; edges less often, as only one span start covers frame 0."""
    mask = gap_mask(torch.full((400,), 300), 300, 0.5, 15, torch.Generator().manual_seed(5))
    rate = mask.float().mean(0)
    assert rate.min() > 0.02, f"expected every frame hidden in over 2% of 400 clips, got frame " \
                              f"{rate.argmin().item()} in {rate.min().item():.1%}"
    assert rate[100:200].min() > 0.4, (
        "expected frames 100-199 hidden in over 40% of clips, got "
        f"{rate[100:200].min().item():.1%} at frame {100 + rate[100:200].argmin().item()}")
    assert abs(rate.mean().item() - 0.5) < 1e-6, (
        f"expected half the frames hidden, got {rate.mean().item():.4f}")


def test_gap_mask_scatters_gaps_from_random_starts():
    """[2] gaps start at random frames, not in one block or a fixed pattern: clips hold several runs,
    and how many varies (overlapping spans merge)."""
    mask = gap_mask(torch.full((64,), 300), 300, 0.5, 15, torch.Generator().manual_seed(2))
    n_runs = [len(runs_of(row)) for row in mask.tolist()]
    assert sum(n_runs) / 64 >= 3 and len(set(n_runs)) >= 3, (
        "expected 3 or more runs of hidden frames per clip on average, their number varying (3 "
        f"or more different counts), got {n_runs}")


def test_gap_mask_hides_spans_in_the_order_randperm_draws_their_starts_reference():
    """[2] reference check of this implementation (its RNG stream): each clip's starts come from one
    torch.randperm draw, the spans after them are hidden in that order, the last one trimmed."""
    rng = np.random.default_rng(0)
    for trial in range(150):
        T, M_gap = int(rng.integers(1, 70)), int(rng.integers(1, 20))
        M_prop = float(rng.choice([0.05, 0.15, 0.25, 0.35, 0.5, 0.65, 0.8, 0.95]))
        lengths = torch.from_numpy(rng.integers(1, T + 1, size=3))
        mask = gap_mask(lengths, T, M_prop, M_gap, torch.Generator().manual_seed(trial))
        g = torch.Generator().manual_seed(trial)  # the same draws, clip after clip
        for b, length in enumerate(lengths.tolist()):
            n, hidden = min(round(M_prop * length), length - 1), []
            for s in torch.randperm(max(length - M_gap, 0) + 1, generator=g).tolist():
                hidden += [t for t in range(s, min(s + M_gap, length)) if t not in hidden]
            expected = torch.zeros(T, dtype=torch.bool)
            expected[hidden[:n]] = True
            assert torch.equal(mask[b], expected), (T, M_gap, M_prop, length)


# ---------------------------------------------------------------- 2.1 EnCodec: inputs and targets
def test_codec_frames_are_75_hz_for_any_length(codec):
    """[2.1] 24 kHz audio gives ceil(n / 320) frames, also for lengths that are not whole hops."""
    for n in (320, 321, 24000, 33333):
        feats, codes = codec(torch.randn(1, n) * 0.1)
        assert feats.shape[1] == codes.shape[1] == M.num_frames(n)


def test_offline_pretrained_codec_fails_loudly_with_the_alternatives(tmp_path):
    """[3.1] a missing local checkpoint is an error that names the file, never a random fallback."""
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        D.load_codec(str(tmp_path / "missing.th"))


# ---------------------------------------------------------------- 2.2 the masked autoencoder
def fixed_mask(lengths, T, M_prop=0.5, seed=0):
    """A stored mask for the tests of other functions: round(M_prop * length) real frames hidden at random."""
    g, mask = torch.Generator().manual_seed(seed), torch.zeros(len(lengths), T, dtype=torch.bool)
    for b, n in enumerate(lengths.tolist()):
        mask[b, torch.randperm(n, generator=g)[:round(M_prop * n)]] = True
    return mask


@pytest.fixture
def logits_out(monkeypatch):
    """forward returns the head's logits: these tests do not run the loss (another assignment)."""
    monkeypatch.setattr(M, "masked_token_loss", lambda logits, *rest: logits)


def encoder_io(net, *args):
    """Run net.forward and capture what its encoder receives and returns (forward hook)."""
    seen = {}
    hook = net.encoder.register_forward_hook(lambda m, inputs, out: seen.update(x=inputs[0], h=out))
    out = net(*args)
    hook.remove()
    return out, seen["x"], seen["h"]


def test_positions_are_added_before_masking(logits_out):
    """[2.2] each visible frame enters the encoder as embed sees it at its own time, not its slot."""
    torch.manual_seed(0)
    net = EnCodecMAE(make_config("tiny")).eval()
    feats, targets = torch.randn(2, 60, 128), torch.randint(0, 1024, (2, 60, 8))
    mask = fixed_mask(torch.full((2,), 60), 60, seed=6)
    _, x_visible, _ = encoder_io(net, feats, targets, mask)  # (2, 30, D)
    with torch.no_grad():
        seen = {}
        hook = net.encoder.register_forward_hook(lambda m, inputs, out: seen.update(x=inputs[0]))
        net.embed(feats)  # no masking: every frame at its own time
        hook.remove()
    for b in range(2):
        want = seen["x"][b][~mask[b]]  # (30, D) each visible frame as embed sees it at its own time
        assert x_visible[b].shape == want.shape, (
            f"clip {b}: expected the encoder to get {tuple(want.shape)} (its visible frames), got "
            f"{tuple(x_visible[b].shape)}")
        diff = (x_visible[b] - want).abs().max().item()
        assert diff == 0, (
            f"clip {b}: expected each visible frame with its own time's position, as embed gives "
            f"it, got values off by up to {diff:.3g}")
    # The same visible content at other times gives another encoder output.
    early, late = torch.arange(60) >= 30, torch.arange(60) < 30  # hide the second or the first half
    moved = torch.cat([feats[:, 30:], feats[:, :30]], 1)  # the first half now sits at t = 30..59
    _, _, h_early = encoder_io(net, feats, targets, early[None].expand(2, -1))
    _, _, h_late = encoder_io(net, moved, targets, late[None].expand(2, -1))
    diff = (h_early - h_late).abs().max().item()
    assert diff > 1e-3, (
        "expected the same frames at other times to encode differently, got a change of "
        f"{diff:.3g}")


def test_sinusoidal_positions_follow_the_transformer_formula():
    """[2.2] PE(t, 2i) = sin(t / 10000^(2i/D)), PE(t, 2i+1) = cos(t / 10000^(2i/D))."""
    pe = M.sinusoidal_positions(50, 8)
    assert pe.shape == (50, 8) and pe.dtype == torch.float32, \
        f"expected a (50, 8) float32 table, got {tuple(pe.shape)} {pe.dtype}"
    for t, i in [(0, 0), (1, 0), (7, 1), (49, 3)]:
        angle = t / 10000 ** (2 * i / 8)
        got = (pe[t, 2 * i].item(), pe[t, 2 * i + 1].item())
        assert abs(got[0] - np.sin(angle)) < 1e-5 and abs(got[1] - np.cos(angle)) < 1e-5, (
            f"D=8, t={t}: expected PE[t, {2 * i}], PE[t, {2 * i + 1}] = sin, cos of {angle:.6g} = "
            f"{np.sin(angle):.6f}, {np.cos(angle):.6f}, got {got[0]:.6f}, {got[1]:.6f}")


def test_gather_visible_and_restore_sequence_round_trip():
    """[2.2] visible frames come out in time order; ids_restore puts them back, tokens elsewhere."""
    B, T, D = 3, 60, 4
    x = torch.randn(B, T, D)
    padding = torch.arange(T)[None] >= torch.tensor([60, 40, 10])[:, None]
    mask = fixed_mask((~padding).sum(1), T, seed=7)
    x_visible, ids_restore, visible_padding = gather_visible(x, mask, padding)  # 30, 20, 5 visible
    assert x_visible.shape == (B, 30, D), (
        f"expected x_visible of shape {(B, 30, D)}, got {tuple(x_visible.shape)}")
    unused = None if visible_padding is None else visible_padding.sum(1).tolist()
    assert unused == [0, 10, 25], (
        f"expected visible_padding marking [0, 10, 25] unused slots, got {unused}")
    seen = ~mask & ~padding
    for b in range(B):
        got, want = x_visible[b][~visible_padding[b]], x[b][seen[b]]
        assert torch.equal(got, want), (
            f"clip {b}: expected its {len(want)} visible frames in time order in the first slots, "
            "got other values")
    full = restore_sequence(x_visible, ids_restore, visible_padding, torch.full((1, 1, D), 7.0))
    assert full.shape == (B, T, D), (
        f"expected restore_sequence to give {(B, T, D)}, got {tuple(full.shape)}")
    wrong = (full[seen] != x[seen]).any(-1).sum().item()
    assert wrong == 0, (
        f"expected every visible frame back at its own time, got {wrong} of {int(seen.sum())} "
        "elsewhere")
    not_token = (full[~seen] != 7.0).any(-1).sum().item()
    assert not_token == 0, (
        f"expected the mask token (7.0) at every hidden and padded time, got {not_token} of "
        f"{int((~seen).sum())} times holding something else")
    dense = gather_visible(x[:1], mask[:1], padding[:1])
    assert dense[0].shape == (1, 30, D), (
        f"one clip, 30 visible: expected (1, 30, {D}), got {tuple(dense[0].shape)}")
    # no attention mask
    assert dense[2] is None, (
        f"no unused slot: expected visible_padding None, got {dense[2]}")
    wide = gather_visible(x, mask, padding, min_slots=45)  # at least min_slots slots, the extra ones unused
    unused = None if wide[2] is None else wide[2].sum(1).tolist()
    assert wide[0].shape[1] == 45 and unused == [15, 25, 40], (
        f"min_slots=45: expected 45 slots with [15, 25, 40] unused, got {wide[0].shape[1]} with "
        f"{unused} unused")


def test_encoder_output_ignores_hidden_and_padded_frames(logits_out):
    """[2.2] the encoder never sees hidden or padded frames: changing them changes nothing."""
    torch.manual_seed(8)
    net = EnCodecMAE(make_config("tiny")).eval()
    feats, targets = torch.randn(2, 60, 128), torch.randint(0, 1024, (2, 60, 8))
    padding = torch.arange(60)[None] >= torch.tensor([60, 37])[:, None]  # clip 1 is short
    mask = fixed_mask((~padding).sum(1), 60, seed=8)
    unseen = mask | padding
    altered = torch.where(unseen[..., None], 10 * torch.randn_like(feats), feats)
    out, x, h = encoder_io(net, feats, targets, mask, padding)
    out2, x2, h2 = encoder_io(net, altered, targets, mask, padding)
    n_visible = int((~unseen).sum(1).max())
    assert x.shape[1] == n_visible, (
        f"expected the encoder to get the {n_visible} visible frames' slots, got {x.shape[1]}")
    real = (torch.arange(x.shape[1])[None] < (~unseen).sum(1)[:, None])[..., None]  # (2, N, 1) used slots
    changes = [(x * real - x2 * real).abs().max().item(), (h * real - h2 * real).abs().max().item(),
               (out - out2).abs().max().item()]  # the encoder's input and output, all the logits
    assert changes[0] == 0 and max(changes[1:]) < 1e-5, (
        "new values at hidden and padded frames: expected no change, got the encoder input, "
        f"output and logits off by up to {', '.join(f'{c:.3g}' for c in changes)}")


def test_decoder_puts_one_learned_mask_token_at_hidden_positions_with_their_positions(logits_out):
    """[2.2] hidden positions get the same learned token plus their own position; visible ones keep h."""
    torch.manual_seed(9)
    net = EnCodecMAE(make_config("tiny")).eval()
    feats, targets = torch.randn(1, 60, 128), torch.randint(0, 1024, (1, 60, 8))
    mask = fixed_mask(torch.tensor([60]), 60, seed=9)
    seen = {}
    hook = net.decoder.layers[0].register_forward_pre_hook(lambda m, inputs: seen.update(h=inputs[0]))
    logits = net(feats, targets, mask)
    logits.square().sum().backward()
    h = seen["h"][0]  # (T, D) the decoder's first block input
    grad = net.decoder.mask_token.grad
    assert grad is not None and grad.abs().sum() > 0, (
        "expected gradients to reach the mask token, got none")
    assert any(p is net.decoder.mask_token for p in net.parameters()), (
        "expected the mask token to be a parameter")
    with torch.no_grad():
        net.decoder.mask_token.add_(1.0)
        net(feats, targets, mask)
    hook.remove()
    change = seen["h"][0] - h  # (T, D)
    off = (change[mask[0]] - 1).abs().max().item()
    assert off < 1e-5, (
        "mask token + 1: expected every hidden position's input to grow by 1, got one off by "
        f"{off:.3g}")
    moved = change[~mask[0]].abs().max().item()
    assert moved == 0, (
        f"mask token + 1: expected no change at visible positions, got one of {moved:.3g}")
    pos = M.sinusoidal_positions(60, net.cfg.d_model)
    hidden = mask[0].nonzero()[:, 0]
    a, b = hidden[0], hidden[-1]  # two hidden frames differ only by their positions
    off = ((h[a] - h[b]) - (pos[a] - pos[b])).abs().max().item()
    assert off < 1e-5, (
        f"hidden frames {a.item()} and {b.item()}: expected inputs differing by their positions "
        f"alone, got a difference off by {off:.3g}")


@pytest.mark.parametrize("n_kmeans_streams", [0, 1])
def test_head_predicts_K_logits_for_each_stream(n_kmeans_streams):
    """[2.2] the head outputs (B, T, S, 1024) with S = 8 codec streams (+1 after self-training)."""
    net = EnCodecMAE(make_config("tiny", n_kmeans_streams=n_kmeans_streams))
    h = torch.randn(2, 300, net.cfg.d_model)
    assert net.head(h).shape == (2, 300, 8 + n_kmeans_streams, 1024)


def test_non_bool_masks_and_misshapen_padding_are_refused():
    """[2.2] mask and padding must be bool (B, T): 0/1 integers would index frames, not select them."""
    net = EnCodecMAE(make_config("tiny"))
    feats, targets = torch.randn(2, 30, 128), torch.randint(0, 1024, (2, 30, 8))
    mask = gap_mask(torch.full((2,), 30), 30, 0.5, 5, torch.Generator().manual_seed(0))
    for bad in (mask.to(torch.uint8), mask.long(), mask.float()):
        with pytest.raises(TypeError, match="mask .*: expected torch.bool"):
            net(feats, targets, bad)
    with pytest.raises(TypeError, match=r"padding torch.bool \(2, 31\)"):
        net(feats, targets, mask, torch.zeros(2, 31, dtype=torch.bool))
    with pytest.raises(TypeError, match="padding torch.float32"):
        net.embed(feats, torch.zeros(2, 30))
    with pytest.raises(TypeError, match=r"mask torch.bool \(2, 20\)"):
        net(feats, targets, mask[:, :20])
    with pytest.raises(TypeError, match="expected torch.int64"):
        net(feats, targets.int(), mask)
    with pytest.raises(ValueError, match="layer=3"):
        net.embed(feats, layer=3)


@pytest.mark.parametrize("overrides", [dict(mask_mode="token"), dict(Q=4), dict(M_prop=0.3, M_gap=5, delta=1.0)])
def test_ablation_switches_train(overrides):
    """[2.2, 3.1] BERT-style token masking, fewer codebooks, other M_prop/M_gap/delta: a step runs."""
    cfg = make_config("tiny", **overrides)
    net = EnCodecMAE(cfg)
    feats, targets = torch.randn(2, 300, 128), torch.randint(0, 1024, (2, 300, cfg.Q))
    mask = gap_mask(torch.full((2,), 300), 300, cfg.M_prop, cfg.M_gap, torch.Generator().manual_seed(0))
    out = net(feats, targets, mask)
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.masked_acc.shape == (cfg.Q,)
    assert mask.sum(1).tolist() == [round(cfg.M_prop * 300)] * 2
    assert all(p.grad is not None for p in net.parameters())  # no dead weights (DDP would refuse them)


@pytest.mark.parametrize("size", ["small", "base", "large"])
def test_parameter_counts_match_table_1(size):
    """[Table 1] EnCodec encoder + input projection + MAE encoder within 5% of 51M / 94M / 269M."""
    from extras.param_count import TABLE1_PARAMS, count_parameters  # moved out of model.py (its line budget)
    n = count_parameters(make_config(size))
    assert abs(n / TABLE1_PARAMS[size] - 1) < 0.05, n


def test_config_refuses_inconsistent_values():
    """[2.3] gamma_q must have Q weights summing to 1, M_prop in (0, 1), ...: a ValueError naming it."""
    for bad, field in [(dict(gamma_q=(0.5, 0.5)), "gamma_q"), (dict(Q=9), "Q=9"), (dict(M_prop=1.5), "M_prop"),
                       (dict(M_gap=0), "M_gap"), (dict(delta=-0.1), "delta"), (dict(n_heads=3), "n_heads"),
                       (dict(mask_mode="bert"), "mask_mode")]:
        with pytest.raises(ValueError, match=field):
            make_config("tiny", **bad)
    with pytest.raises(ValueError, match="unknown model size"):
        make_config("huge")
    with pytest.raises(TypeError, match="dropout"):
        M.ModelConfig(**{**asdict(make_config("tiny")), "dropout": 0.1})
    with pytest.raises(ValueError, match="M_prop"):
        M.ModelConfig(**{**asdict(make_config("tiny")), "M_prop": 0.0})
    assert len(make_config("tiny", Q=4).gamma_q) == 4


# ---------------------------------------------------------------- 2.3 the loss
def fmt(t):
    """A tensor's values, rounded, for a failing test's message."""
    values = torch.as_tensor(t).detach().double().tolist()
    return [round(v, 4) for v in values] if isinstance(values, list) else round(values, 4)


def frame_logits(ce, K=4):
    """Logits (..., K) whose cross-entropy against target 0 is exactly `ce` (...): the test sets C per frame."""
    ce = torch.as_tensor(ce, dtype=torch.float64)
    # target logit 0, the K - 1 others equal to l: C = log(1 + (K - 1) e^l), so l = log((e^C - 1) / (K - 1))
    other = torch.log(torch.expm1(ce).clamp_min(1e-30) / (K - 1))
    return torch.cat([torch.zeros_like(ce)[..., None], other[..., None].expand(*ce.shape, K - 1)], -1).float()


def test_loss_weighs_hidden_frames_by_delta_and_visible_ones_by_one_minus_delta():
    """[2.3] alpha = delta / |M|, beta = (1 - delta) / (T - |M|): with C = c_M on every hidden frame and c_V on
    every visible one, L = sum_q gamma_q (delta c_M + (1 - delta) c_V), whatever the masks."""
    g = torch.Generator().manual_seed(0)
    for trial, delta in enumerate((0.9, 0.5, 0.0, 1.0)):
        mask = torch.rand(3, 20, generator=g) < 0.2 + 0.2 * trial
        padding = torch.zeros(3, 20, dtype=torch.bool)
        ce = torch.where(mask, 2.0, 0.5)[..., None].expand(3, 20, 2)  # (B, T, S): c_M = 2.0, c_V = 0.5
        out = M.masked_token_loss(frame_logits(ce), torch.zeros(3, 20, 2, dtype=torch.long), mask, padding,
                                  torch.tensor([0.7, 0.3]), delta)
        expected = delta * 2.0 + (1 - delta) * 0.5
        assert out.loss.item() == pytest.approx(expected, abs=1e-5), (
            f"delta {delta}, C = 2 on hidden and 0.5 on visible frames: expected L = "
            f"{expected:.4f}, got {fmt(out.loss)}")
        assert fmt(out.masked_loss) == [2.0, 2.0] and fmt(out.unmasked_loss) == [0.5, 0.5], \
            f"expected masked_loss [2.0, 2.0] and unmasked_loss [0.5, 0.5] per stream, got " \
            f"{fmt(out.masked_loss)} and {fmt(out.unmasked_loss)}"
    # An empty set's count 0 is taken as 1 (its sum is 0): no NaN, the other set's term alone.
    for hidden, expected in ((False, 0.1 * 0.5), (True, 0.9 * 2.0)):
        mask = torch.full((3, 20), hidden)
        ce = torch.where(mask, 2.0, 0.5)[..., None].expand(3, 20, 2)
        out = M.masked_token_loss(frame_logits(ce), torch.zeros(3, 20, 2, dtype=torch.long), mask,
                                  torch.zeros(3, 20, dtype=torch.bool), torch.tensor([0.7, 0.3]),
                                  0.9)
        assert out.loss.item() == pytest.approx(expected, abs=1e-5), (
            f"{'every' if hidden else 'no'} frame hidden, delta 0.9 (count 0 taken as 1): "
            f"expected L = {expected:.4f}, got {fmt(out.loss)}")


def test_loss_counts_M_over_the_whole_batch_and_weighs_each_stream_by_gamma_q():
    """[2.3] |M| and T - |M| are counted over the whole batch, not per clip; stream q weighs gamma_q."""
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[0, :1], mask[1, :3] = True, True  # clip 0 hides 1 frame, clip 1 hides 3
    ce = torch.zeros(2, 8, 2)
    ce[0, 0], ce[0, 1:] = 4.0, 1.0  # clip 0: its hidden frame costs 4, its visible ones 1; clip 1 costs 0
    ce[:, :, 1] *= 3  # stream 1 costs three times as much
    out = M.masked_token_loss(frame_logits(ce), torch.zeros(2, 8, 2, dtype=torch.long), mask,
                              torch.zeros(2, 8, dtype=torch.bool), torch.tensor([0.6, 0.4]), 0.9)
    hidden_mean, visible_mean = 4.0 / 4, 7 * 1.0 / 12  # over the batch's 4 hidden and 12 visible frames
    expected = (0.6 + 0.4 * 3) * (0.9 * hidden_mean + 0.1 * visible_mean)
    # per clip: 0.9 * (4 + 0) / 2 = 1.8, not 0.9
    assert out.loss.item() == pytest.approx(expected, abs=1e-5), (
        f"clips hiding 1 and 3 of 8 frames: expected L = {expected:.4f} with |M| = 4 and T - |M| "
        f"= 12 counted over the batch, got {fmt(out.loss)}")


def test_padding_is_in_neither_set_of_the_loss():
    """[2.3] frames past a clip's end count neither as hidden nor as visible, whatever their logits."""
    mask, padding = torch.zeros(2, 10, dtype=torch.bool), torch.zeros(2, 10, dtype=torch.bool)
    mask[:, :4], padding[1, 6:] = True, True  # clip 1: frames 6-9 are padding (one marked hidden as well)
    mask[1, 8] = True
    ce = torch.full((2, 10, 1), 1.0)
    ce[1, 6:] = 50.0  # the padding's logits are far off
    out = M.masked_token_loss(frame_logits(ce), torch.zeros(2, 10, 1, dtype=torch.long), mask, padding,
                              torch.tensor([1.0]), 0.9)
    assert out.loss.item() == pytest.approx(1.0, abs=1e-5), \
        f"C = 1 on every real frame, 50 on padding: expected L = 1.0, got {fmt(out.loss)}"


def test_loss_equals_the_equation_term_by_term():
    """[2.3] reference check: the vectorised loss equals a naive loop over q, t and the batch."""
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
    assert abs(out.loss.item() - expected.item()) < 1e-6, (
        f"expected L = the mean cross-entropy over hidden frames, {expected.item():.6f}, got "
        f"{out.loss.item():.6f}")


def test_masked_accuracy_counts_hidden_frames_only():
    """[2.3] the logged masked accuracy is top-1 over hidden, real frames, per stream."""
    targets = torch.zeros(1, 6, 2, dtype=torch.long)
    logits = torch.zeros(1, 6, 2, 3)
    logits[..., 1] = 5  # wrong everywhere ...
    logits[0, [0, 1, 5], 0, :] = torch.tensor([5.0, 0, 0])  # ... except stream 0 on frames 0, 1, 5
    mask = torch.tensor([[True, True, True, False, False, True]])  # frame 5 is hidden but padding
    padding = torch.tensor([[False, False, False, False, False, True]])
    out = M.masked_token_loss(logits, targets, mask, padding, torch.tensor([0.5, 0.5]), 0.9)
    assert fmt(out.masked_acc) == fmt([2 / 3, 0.0]), \
        f"expected masked_acc {fmt([2 / 3, 0.0])} (2 of 3 hidden real frames right on stream 0), " \
        f"got {fmt(out.masked_acc)}"  # all frames: 3/6, 0


def test_loss_weights_come_from_the_config():
    """[2.3] forward's loss is sum_q gamma_q (delta CE_M + (1 - delta) CE_not_M), k-means stream sum(gamma_q)."""
    torch.manual_seed(2)
    cfg = make_config("tiny", Q=3, gamma_q=(0.6, 0.3, 0.1), delta=0.7, n_kmeans_streams=1)
    net = EnCodecMAE(cfg)
    feats, targets = torch.randn(2, 40, 128), torch.randint(0, 1024, (2, 40, 4))
    mask = gap_mask(torch.full((2,), 40), 40, 0.3, 5, torch.Generator().manual_seed(2))  # |M| != T - |M|
    out = net(feats, targets, mask)
    gamma = torch.tensor([0.6, 0.3, 0.1, 1.0])
    expected = (gamma * (0.7 * out.masked_loss + 0.3 * out.unmasked_loss)).sum()
    assert torch.allclose(out.loss, expected, atol=1e-6)
    assert torch.allclose(M.stream_weights(make_config("tiny", Q=2, gamma_q=(0.7, 0.3), n_kmeans_streams=2)),
                          torch.tensor([0.7, 0.3, 1.0, 1.0]))


def test_loss_shares_of_a_split_batch_add_up_with_the_whole_batchs_counts():
    """[2.3] passed counts = (|M|, T - |M|) of the whole batch, each part returns its share: they add up."""
    g = torch.Generator().manual_seed(4)
    logits, targets = 3 * torch.randn(4, 16, 2, 5, generator=g), torch.randint(0, 5, (4, 16, 2), generator=g)
    mask, padding = torch.rand(4, 16, generator=g) < 0.5, torch.arange(16)[None] >= torch.tensor([16, 9, 16, 5])[:, None]
    args = (torch.tensor([0.8, 0.2]), 0.9)
    whole = M.masked_token_loss(logits, targets, mask, padding, *args)
    counts = (int((mask & ~padding).sum()), int((~mask & ~padding).sum()))
    parts = [M.masked_token_loss(logits[i:i + 2], targets[i:i + 2], mask[i:i + 2], padding[i:i + 2], *args, counts)
             for i in (0, 2)]
    for field in ("loss", "masked_loss", "unmasked_loss", "masked_acc"):
        total, want = getattr(parts[0], field) + getattr(parts[1], field), getattr(whole, field)
        assert torch.allclose(total, want, atol=1e-5), (
            f"counts {counts} passed: expected the halves' {field} to add up to the whole batch's "
            f"{fmt(want)}, got {fmt(total)}")


def test_micro_batch_losses_add_up_to_the_whole_batch():
    """[2.3] |M| and T - |M| of the whole batch: two one-clip calls sum to the two-clip loss."""
    torch.manual_seed(3)
    net = EnCodecMAE(make_config("tiny")).eval()
    net.head.linear.weight.data *= 30  # confident logits: per-frame losses far apart
    feats, targets = torch.randn(2, 60, 128), torch.randint(0, 1024, (2, 60, 8))
    padding = torch.arange(60)[None] >= torch.tensor([60, 23])[:, None]  # clip 1 is short
    mask = gap_mask((~padding).sum(1), 60, 0.5, 5, torch.Generator().manual_seed(3))
    whole = net(feats, targets, mask, padding)
    counts = (int((mask & ~padding).sum()), int((~mask & ~padding).sum()))  # |M|, T - |M|
    parts = [net(feats[i:i + 1], targets[i:i + 1], mask[i:i + 1], padding[i:i + 1], counts) for i in (0, 1)]
    for field in ("loss", "masked_loss", "unmasked_loss", "masked_acc"):
        total = getattr(parts[0], field) + getattr(parts[1], field)
        assert torch.allclose(total, getattr(whole, field), atol=1e-5), field
    per_call = [net(feats[i:i + 1], targets[i:i + 1], mask[i:i + 1], padding[i:i + 1]) for i in (0, 1)]
    assert abs(per_call[0].loss + per_call[1].loss - 2 * whole.loss) > 1e-3  # counts matter here


def stub_codec():
    """A codec of 2-wide frames (the first two samples of each hop) and three small codebooks."""
    from types import SimpleNamespace
    from encodec.quantization.core_vq import EuclideanCodebook
    entries = [[(0, 0), (10, 0), (0, 10)], [(0, 0), (3, 4), (-3, 4), (0, -5)],
               [(0, 0), (1, 0), (0, 1), (-1, 0)]]
    books = []
    for stage in entries:
        book = EuclideanCodebook(2, len(stage))
        book.embed.copy_(torch.tensor(stage, dtype=torch.float32))
        books.append(SimpleNamespace(_codebook=book))

    def raw_frames(wav):  # (b, n) -> (b, 2, ceil(n / HOP))
        hops = F.pad(wav, (0, -wav.shape[1] % HOP)).view(len(wav), -1, HOP)
        return hops[:, :, :2].transpose(1, 2)
    quantizer = SimpleNamespace(vq=SimpleNamespace(layers=books))
    return SimpleNamespace(dim=2, raw_frames=raw_frames, quantizer=quantizer)


def test_gamma_q_is_the_error_each_stage_leaves_on_real_frames():
    """[3.1] gamma_q ~ the mean over real frames of |r_q - e_q(r_q)|, r_q the residual entering
    stage q (r_1 = the frame, r_(q+1) = r_q - e_q(r_q)); a clip's partial last frame is real,
    padding is not."""
    frames = [[(10, 0), (13, 4), (3, 4), (2, 9)], [(0, 6), (8, 7)]]  # clip 1's 2nd: a partial hop
    clips = torch.zeros(2, 4 * HOP)
    for b, clip in enumerate(frames):
        for t, (x, y) in enumerate(clip):
            clips[b, t * HOP], clips[b, t * HOP + 1] = x, y
    clips[1, 2 * HOP:] = 5.0  # past clip 1's end (2 * HOP - 5 samples): frames (5, 5), left out
    # Worked by hand, frame by frame: the nearest entry of each stage and what it leaves.
    #   frame    stage 1: entry -> leaves    stage 2: entry -> leaves    stage 3: entry -> leaves
    #   (10, 0)  (10, 0)  (0, 0)             (0, 0)   (0, 0)             (0, 0)  (0, 0)
    #   (13, 4)  (10, 0)  (3, 4)             (3, 4)   (0, 0)             (0, 0)  (0, 0)
    #   (3, 4)   (0, 0)   (3, 4)             (3, 4)   (0, 0)             (0, 0)  (0, 0)
    #   (2, 9)   (0, 10)  (2, -1)            (0, 0)   (2, -1)            (1, 0)  (1, -1)
    #   (0, 6)   (0, 10)  (0, -4)            (0, -5)  (0, 1)             (0, 1)  (0, 0)
    #   (8, 7)   (10, 0)  (-2, 7)            (-3, 4)  (1, 3)             (0, 1)  (1, 2)
    left = [[(0, 0), (3, 4), (3, 4), (2, -1), (0, -4), (-2, 7)],
            [(0, 0), (0, 0), (0, 0), (2, -1), (0, 1), (1, 3)],
            [(0, 0), (0, 0), (0, 0), (1, -1), (0, 0), (1, 2)]]
    errors = [[math.hypot(*r) for r in stage] for stage in left]  # the L2 norm of what is left
    mean = [sum(e) / 6 for e in errors]
    expected = [m / sum(mean) for m in mean]
    for batch in (1, 2):
        lengths = torch.tensor([4 * HOP, 2 * HOP - 5])
        gamma = M.estimate_gamma(stub_codec(), clips, Q=3, batch=batch, lengths=lengths)
        assert gamma.shape == (3,) and abs(gamma - torch.tensor(expected)).max() < 1e-4, (
            f"batch={batch}: expected {fmt(expected)} (errors averaged over the 6 real frames of "
            f"both clips, then normalized), got {fmt(gamma)}")
    mean = [sum(e[:4]) / 4 for e in errors]  # clip 0 alone, lengths None: all its samples are real
    expected = [m / sum(mean) for m in mean]
    gamma = M.estimate_gamma(stub_codec(), clips[:1], Q=3)
    assert abs(gamma - torch.tensor(expected)).max() < 1e-4, \
        f"clip 0 alone, lengths None: expected {fmt(expected)}, got {fmt(gamma)}"


def test_gamma_q_is_normalized_and_decreasing_for_residual_codebooks(codec):
    """[3.1] on the codec, gamma_q sums to 1 and falls from the first residual stage to the last."""
    gamma = M.estimate_gamma(codec, demo_signals.demo_clips(8, seconds=1.0, seed=11))
    assert gamma.shape == (8,), f"expected 8 weights, got shape {tuple(gamma.shape)}"
    assert abs(gamma.sum().item() - 1) < 1e-6 and (gamma > 0).all(), \
        f"expected positive weights summing to 1, got {fmt(gamma)} (sum {gamma.sum().item():.6f})"
    assert gamma[0] > gamma[-1], (
        f"expected the first stage's weight above the last's, got {fmt(gamma)}")
    assert abs(sum(M.RELEASED_GAMMA_Q) - 1) < 1e-3, "expected the released gamma_q to sum to 1"


def test_tiny_model_overfits_one_batch(codec):
    """[2.3] on one fixed batch and mask, masked top-1 accuracy climbs far above chance (1/1024)."""
    torch.manual_seed(0)
    feats, codes = codec(demo_signals.demo_clips(2, seconds=2.0, seed=31))
    mask = gap_mask(torch.full((2,), 150), 150, 0.5, 15, torch.Generator().manual_seed(0))
    net = EnCodecMAE(make_config("tiny"))
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    first = net(feats, codes, mask)
    for _ in range(25):
        out = net(feats, codes, mask)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert out.loss < 0.5 * first.loss
    assert out.masked_acc.mean() > 0.3, out.masked_acc  # chance is 0.001


# ---------------------------------------------------------------- 2.3 self-training: k-means and stream Q+1
def test_kmeans_recovers_well_separated_gaussian_clusters():
    """[2.3] k-means finds the centres of well-separated Gaussian clusters (up to a permutation)."""
    g = torch.Generator().manual_seed(0)
    centres = 20 * torch.randn(8, 16, generator=g)  # (8, 16), pairwise far apart
    x = centres.repeat(200, 1) + torch.randn(1600, 16, generator=g)  # (1600, 16), unit noise
    result = kmeans.fit(x, k=8, seed=0)
    match = kmeans.assign(centres, result.centroids)  # fitted centroid nearest each true centre
    assert sorted(match.tolist()) == list(range(8)), (
        "expected one centroid near each of the 8 true centres, got the nearest centroids "
        f"{match.tolist()}")
    off = (result.centroids[match] - centres).norm(dim=1).max().item()
    assert off < 0.5, (
        f"expected each centroid within 0.5 of its true centre, got one {off:.3g} away")


def test_kmeans_inertia_never_increases():
    """[2.3] every Lloyd step (and every re-seeding) lowers or keeps the inertia."""
    x = torch.randn(3000, 8, generator=torch.Generator().manual_seed(1))  # no structure: many steps
    history = kmeans.fit(x, k=64, n_iter=40, tol=0.0, seed=0).inertia_history
    assert len(history) > 10, (
        f"tol=0: expected more than 10 steps on unstructured data, got {len(history)}")
    rises = [(i, a, b) for i, (a, b) in enumerate(zip(history, history[1:])) if b > a * (1 + 1e-6)]
    assert not rises, (
        f"expected the inertia never to rise, got step {rises[0][0] + 1}: {rises[0][1]:.6g} -> "
        f"{rises[0][2]:.6g}")


def test_lloyd_stops_once_inertia_improves_by_less_than_tol():
    """[2.3] Lloyd steps continue while inertia drops by more than tol (relative), then stop."""
    x = torch.randn(2000, 4, generator=torch.Generator().manual_seed(8))
    start = kmeans.init_centroids(x, 16, torch.Generator().manual_seed(0))
    history = kmeans.lloyd(x, start, n_iter=100, tol=0.01).inertia_history
    drops = [round((a - b) / a, 4) for a, b in zip(history, history[1:])]
    assert 2 <= len(history) < 100 and drops[-1] <= 0.01 and all(d > 0.01 for d in drops[:-1]), (
        "tol=0.01: expected steps while the relative drop exceeds 0.01 and a stop right after "
        f"the first that does not, got the drops {drops}")


def test_kmeans_reseeds_empty_clusters_on_the_worst_served_points():
    """[2.3] centroids far from all data get no points and move to the worst-served points, one each."""
    x = torch.randn(500, 4, generator=torch.Generator().manual_seed(2))
    start = torch.cat([x[:5], torch.full((1, 4), 1e3), torch.full((1, 4), -1e3)])  # 5 and 6 are empty
    dist = torch.cdist(x.double(), start[:5].double()).min(1).values  # (500,) to the served centroids
    one_step = kmeans.lloyd(x, start, n_iter=1)
    worst = dist.topk(2).indices
    torch.testing.assert_close(one_step.centroids[5:], x[worst])
    result = kmeans.lloyd(x, start, n_iter=20)
    assert (torch.bincount(kmeans.assign(x, result.centroids), minlength=7) > 0).all()


def test_a_lloyd_step_moves_each_centroid_to_the_mean_of_its_points():
    """[2.3] one Lloyd step: the mean of each cluster's points; the logged inertia is the start's."""
    g = torch.Generator().manual_seed(6)
    x, start = torch.randn(300, 3, generator=g) + 5, torch.randn(4, 3, generator=g) + 5
    d2 = torch.cdist(x.double(), start.double()) ** 2  # (300, 4) brute force
    labels = d2.argmin(1)
    step = kmeans.lloyd(x, start, n_iter=1)
    for j in range(4):
        want = x[labels == j].mean(0)
        assert (step.centroids[j] - want).abs().max() < 1e-4, (
            f"centroid {j}: expected the mean of its {int((labels == j).sum())} points, "
            f"{fmt(want)}, got {fmt(step.centroids[j])}")
    start_inertia = d2.min(1).values.sum().item()
    assert abs(step.inertia_history[0] / start_inertia - 1) < 1e-6, (
        f"expected inertia_history[0] = the start's inertia {start_inertia:.6g}, got "
        f"{fmt(step.inertia_history)}")


def test_kmeans_plus_plus_seeds_one_centroid_in_each_separated_cluster_and_beats_random_rows():
    """[2.3] k-means++: draws proportional to D^2 usually find every far cluster; its start beats random rows."""
    g = torch.Generator().manual_seed(7)
    centres = 20 * torch.randn(16, 8, generator=g)
    x = centres.repeat(50, 1) + torch.randn(800, 8, generator=g)  # 16 tight, far-apart clusters
    # Seeds whose start has one centroid in each of the 16 clusters: the greedy variant 20 of 20, one draw
    # per step about 2 in 3 (13 expected, fewer than 7 about once in 1,000), draws by D instead of D^2 1 in 8.
    hits = sum(kmeans.assign(centres, kmeans.init_centroids(x, 16, torch.Generator().manual_seed(seed)))
               .unique().numel() == 16 for seed in range(20))
    assert hits >= 7, (
        "expected a centroid in every one of 16 far clusters for 7 or more of 20 seeds, got "
        f"{hits}")
    y = torch.randn(2000, 2, generator=g)  # no structure: only the greedy D^2 choice helps
    inertia = lambda c: kmeans.nearest_centroid(y, c)[1].sum().item()
    plus = sum(inertia(kmeans.init_centroids(y, 32, torch.Generator().manual_seed(s))) for s in range(3))
    rows = sum(inertia(y[torch.randperm(2000, generator=torch.Generator().manual_seed(s))[:32]]) for s in range(3))
    assert plus < 0.7 * rows, (
        f"expected the k-means++ start's inertia below 0.7 x random rows' ({rows:.1f}), got "
        f"{plus:.1f}")


def test_chunked_distances_give_the_brute_force_assignment():
    """[2.3] assignments do not depend on the chunk size and equal torch.cdist's argmin."""
    g = torch.Generator().manual_seed(3)
    x, c = torch.randn(1000, 32, generator=g), torch.randn(50, 32, generator=g)
    brute = torch.cdist(x.double(), c.double())  # (1000, 50) in float64
    whole, dist = kmeans.nearest_centroid(x, c, chunk_size=len(x))
    for chunk_size in (7, 128, 999):
        assert torch.equal(kmeans.nearest_centroid(x, c, chunk_size)[0], whole)
    assert torch.equal(whole, brute.argmin(1))
    torch.testing.assert_close(dist.double(), brute.min(1).values ** 2, rtol=1e-4, atol=1e-3)


def test_bf16_distances_keep_the_inertia():
    """[2.3] ranking centroids with a bfloat16 matmul changes the inertia by far less than 1%."""
    x = torch.randn(4000, 64, generator=torch.Generator().manual_seed(4))
    start = kmeans.init_centroids(x, 128, torch.Generator().manual_seed(0))
    exact = kmeans.lloyd(x, start, n_iter=5, tol=0.0).inertia_history
    fast = kmeans.lloyd(x, start, n_iter=5, tol=0.0, bf16=True).inertia_history
    assert abs(fast[-1] / exact[-1] - 1) < 1e-3


def test_kmeans_is_deterministic_for_a_seed():
    """[2.3] the same seed gives the same centroids and inertia; another seed does not."""
    x = torch.randn(2000, 16, generator=torch.Generator().manual_seed(5))
    a, b = kmeans.fit(x, k=32, seed=7), kmeans.fit(x, k=32, seed=7)
    assert torch.equal(a.centroids, b.centroids) and a.inertia_history == b.inertia_history, \
        "seed 7 twice: expected the same centroids and inertia, got different ones"
    assert not torch.equal(kmeans.fit(x, k=32, seed=8).centroids, a.centroids), \
        "seeds 7 and 8: expected different centroids, got the same"


def test_centroids_save_load_round_trip(tmp_path):
    """[2.3] saved centroids and their metadata load back unchanged."""
    centroids = torch.randn(16, 8)
    path = str(tmp_path / "centroids.pt")
    kmeans.save(path, centroids, {"k": 16, "layer": -1, "inertia_history": [3.0, 2.0]})
    loaded, meta = kmeans.load(path)
    assert torch.equal(loaded, centroids) and meta == {"k": 16, "layer": -1, "inertia_history": [3.0, 2.0]}
    assert os.listdir(tmp_path) == ["centroids.pt"]  # no temporary file left behind


@pytest.fixture(scope="module")
def stage_one(tmp_path_factory):
    """A tiny untrained "stage 1" checkpoint on the random codec, and two clips: 2 s and 5 s."""
    root = tmp_path_factory.mktemp("selftrain")
    os.makedirs(root / "audio")
    paths = []
    for i, (kind, seconds) in enumerate([("note", 2.0), ("chord", 5.0)]):
        paths.append(str(root / "audio" / f"{i}_{kind}.wav"))
        sf.write(paths[-1], demo_signals.synth_clip(kind, seconds, i).numpy(), M.SAMPLE_RATE)
    torch.manual_seed(0)
    cfg = M.make_config("tiny")
    checkpoint = str(root / "stage1.pt")
    torch.save({"model": M.EnCodecMAE(cfg).state_dict(), "config": asdict(cfg), "encodec": "random",
                "step": 0}, checkpoint)
    return root, paths, checkpoint


def test_store_labels_every_audio_frame_and_the_crops_read_them(stage_one):
    """[2.3] one label per 75-Hz frame of each file (T = ceil(n / 320)), read back by CropDataset."""
    root, paths, checkpoint = stage_one
    store = str(root / "store_audio")
    kmeans.main(["--checkpoint", checkpoint, "--data", str(root / "audio"), "--out", store,
                 "--k", "8", "--n-clips", "3", "--n-frames", "300"])
    net = D.load_checkpoint(checkpoint)[0]
    codec = D.load_codec("random")
    centroids, meta = kmeans.load(os.path.join(store, "centroids.pt"))
    assert centroids.shape == (8, 128) and meta["n_clips"] == 3
    with open(os.path.join(store, "index.json")) as f:
        index = json.load(f)
    for path in paths:
        entry = index[os.path.abspath(path)]
        labels = np.load(os.path.join(store, entry["npy"]))
        assert labels.dtype == np.int16 and labels.shape == (entry["frames"],)
        assert entry["frames"] == -(-sf.info(path).frames // M.HOP)  # T = ceil(n / 320) at 24 kHz
        emb = M.embed_audio(net, codec, D.read_audio(path)[None])[0]  # (T, D), 4-s chunks
        assert torch.equal(torch.from_numpy(labels).long(), kmeans.assign(emb, centroids))
    crop = D.CropDataset(paths[:1], extra_store=store)[0]  # the 2-s file: its crop starts at 0
    labels = np.load(os.path.join(store, index[os.path.abspath(paths[0])]["npy"]))
    assert torch.equal(crop.extra[~crop.padding], torch.from_numpy(labels).long())
    assert (crop.extra[crop.padding] == -1).all()


def test_adding_the_kmeans_stream_keeps_stage_one_weights():
    """[2.3] self-training starts from the stage-1 weights; only the new head rows are new."""
    net = EnCodecMAE(make_config("tiny"))
    new = M.add_kmeans_stream(net)
    assert new.cfg.n_streams == 9
    assert torch.equal(new.head.linear.weight[: 8 * 1024], net.head.linear.weight)
    assert torch.equal(new.encoder.layers[0].qkv.weight, net.encoder.layers[0].qkv.weight)


def test_kmeans_store_labels_line_up_with_crop_frames(tmp_path):
    """[2.3] stored k-means targets are cut at the crop's frames; a frame-count mismatch fails."""
    paths = [write(tmp_path, "a.wav", np.arange(10 * SAMPLE_RATE) / 2 ** 20, subtype="FLOAT"),
             write(tmp_path, "b.wav", tone(2.0))]
    store = tmp_path / "store"
    store.mkdir()
    for i, (path, T) in enumerate(zip(paths, (750, 150))):
        np.save(store / f"{i}.npy", (np.arange(T) % 1024).astype(np.int16))
    (store / "index.json").write_text(json.dumps({p: {"npy": f"{i}.npy", "frames": T}
                                                  for i, (p, T) in enumerate(zip(paths, (750, 150)))}))
    ds = D.CropDataset(paths, extra_store=str(store))
    for i in range(len(ds)):
        crop = ds[i]
        first = round(crop.wav[0].item() * 2 ** 20) // HOP if i < 3 else 0
        real = (~crop.padding).sum()
        assert torch.equal(crop.extra[:real], torch.arange(first, first + real) % 1024)
        assert (crop.extra[real:] == -1).all()
    np.save(store / "1.npy", np.zeros(149, np.int16))
    with pytest.raises(D.UsageError, match="149 labels for 150 frames"):
        D.CropDataset(paths, extra_store=str(store))[3]


# ---------------------------------------------------------------- 3.1 data: audio, 4-s crops
def tone(seconds, rate=SAMPLE_RATE, freq=440.0, channels=1):
    t = np.arange(round(seconds * rate)) / rate
    x = 0.5 * np.sin(2 * np.pi * freq * t)
    return np.stack([x * (c + 1) / channels for c in range(channels)], 1) if channels > 1 else x


def write(tmp_path, name, x, rate=SAMPLE_RATE, subtype=None):
    path = str(tmp_path / name)
    sf.write(path, x, rate, subtype=subtype)
    return path


def test_read_audio_handles_mono_stereo_8bit_and_float(tmp_path):
    """[3.1] every format becomes mono float32 at 24 kHz; stereo is the mean of its channels."""
    mono = D.read_audio(write(tmp_path, "mono.wav", tone(1.0)))
    stereo = D.read_audio(write(tmp_path, "stereo.flac", tone(1.0, channels=2)))
    u8 = D.read_audio(write(tmp_path, "u8.wav", tone(1.0), subtype="PCM_U8"))
    flt = D.read_audio(write(tmp_path, "float.wav", tone(1.0), subtype="FLOAT"))
    assert all(x.dtype == torch.float32 and x.shape == (24000,) for x in (mono, stereo, u8, flt))
    expected = 0.75 * torch.from_numpy(tone(1.0)).float()  # (0.5 x + 1.0 x) / 2
    assert torch.allclose(stereo, expected, atol=1e-3)
    assert torch.allclose(u8, flt, atol=1 / 64) and torch.allclose(mono, flt, atol=1e-4)


def test_integer_audio_reads_exactly_as_libsndfile_scales_it(tmp_path):
    """[3.1] 8-, 16- and 24-bit files, read as integers for speed, give libsndfile's float values."""
    x = np.random.default_rng(0).uniform(-1, 1, (5000, 2))
    for name, subtype in [("u8.wav", "PCM_U8"), ("s16.wav", "PCM_16"), ("s16.flac", "PCM_16"),
                          ("s24.flac", "PCM_24"), ("s32.wav", "PCM_32")]:
        path = write(tmp_path, name, x, subtype=subtype)
        assert torch.equal(D.read_audio(path), torch.from_numpy(sf.read(path, dtype="float32")[0].mean(1))), name


def test_other_sample_rates_are_resampled_to_24k_keeping_duration_and_pitch(tmp_path):
    """[3.1] 16 kHz and 44.1 kHz files come out at 24 kHz with the same duration and frequency."""
    for rate in (16000, 44100):
        wav = D.read_audio(write(tmp_path, f"r{rate}.wav", tone(2.5, rate, freq=1000.0), rate, "FLOAT"))
        assert wav.shape == (60000,)
        spectrum = torch.fft.rfft(wav).abs()
        assert abs(spectrum.argmax().item() * SAMPLE_RATE / len(wav) - 1000) < 1


def test_partial_reads_equal_slices_of_the_whole_file(tmp_path):
    """[3.1] reading only a crop (wav at 3 rates, mp3) equals reading the file and slicing it."""
    rng = np.random.default_rng(0)
    for rate, name in ((24000, "a.wav"), (44100, "b.wav"), (16000, "c.wav"), (24000, "d.mp3")):
        subtype = None if name.endswith("mp3") else "FLOAT"
        path = write(tmp_path, name, 0.1 * rng.standard_normal(3 * rate), rate, subtype)
        whole = D.read_audio(path)  # an mp3 decoder needs a warm-up after a seek: read_audio pre-rolls
        for start in (0, 320, 20480, 70000):
            part = D.read_audio(path, start, 1000)
            assert torch.allclose(part, whole[start: start + 1000], atol=1e-6), (name, start)


def test_list_audio_walks_folders_and_reads_relative_file_lists(tmp_path):
    """[3.1] datasets come from folders (recursive, sorted) and .txt lists relative to the list."""
    (tmp_path / "a" / "b").mkdir(parents=True)
    paths = [write(tmp_path / "a", "2.wav", tone(0.1)), write(tmp_path / "a" / "b", "1.flac", tone(0.1))]
    (tmp_path / "a" / "notes.txt").write_text("ignored")
    assert D.list_audio(tmp_path / "a") == sorted(paths)
    (tmp_path / "list.txt").write_text("# a comment\na/2.wav\n\n" + paths[1] + "\n")
    assert D.list_audio([str(tmp_path / "list.txt")]) == [str(tmp_path / "a" / "2.wav"), paths[1]]
    with pytest.raises(FileNotFoundError, match="missing"):
        D.list_audio([str(tmp_path / "missing")])
    (tmp_path / "a" / "x.wav").mkdir()  # a folder named like audio: searched, and said so
    with pytest.warns(UserWarning, match="x.wav: a folder named like an audio file"):
        assert D.list_audio(tmp_path / "a") == sorted(paths)


def test_short_clips_are_padded_with_a_frame_mask(tmp_path):
    """[3.1] a clip shorter than 4 s is zero-padded and its padded frames are marked True."""
    ds = D.CropDataset([write(tmp_path, "short.wav", tone(1.5))])
    crop = ds[0]
    assert len(ds) == 1 and crop.wav.shape == (CROP_SAMPLES,) and crop.padding.shape == (CROP_FRAMES,)
    assert crop.wav[36000:].abs().max() == 0 and crop.wav[:36000].abs().max() > 0.4
    assert crop.padding.sum() == CROP_FRAMES - num_frames(36000) and not crop.padding[:113].any()
    assert (crop.extra == -1).all()


def test_long_files_are_visited_in_proportion_to_length_at_hop_aligned_starts(tmp_path):
    """[3.1] a 30-s file counts ceil(30 / 4) = 8 crops per epoch, each starting on a codec hop."""
    ramp = np.arange(30 * SAMPLE_RATE) / 2 ** 20  # a sample's value encodes its index, exact in float32
    ds = D.CropDataset([write(tmp_path, "long.wav", ramp, subtype="FLOAT"),
                        write(tmp_path, "four.wav", tone(4.0))])
    assert len(ds) == 9 and list(ds.file_of(np.arange(9))).count(0) == 8
    starts = [round(ds[i].wav[0].item() * 2 ** 20) for i in range(8)]
    assert all(s % HOP == 0 and s + CROP_SAMPLES <= len(ramp) for s in starts) and len(set(starts)) > 4
    assert not ds[0].padding.any()
    assert torch.allclose(ds[8].wav, torch.from_numpy(tone(4.0)).float(), atol=1e-4)


def test_crops_are_deterministic_given_seed_epoch_and_index(tmp_path):
    """[3.1] the same (seed, epoch, index) gives the same crop; a new epoch or seed gives new crops."""
    paths = [write(tmp_path, "noise.wav", np.random.default_rng(0).uniform(-0.5, 0.5, 20 * SAMPLE_RATE))]
    a, b, c = D.CropDataset(paths, seed=1), D.CropDataset(paths, seed=1), D.CropDataset(paths, seed=2)
    crops = lambda ds: torch.stack([ds[i].wav[:HOP] for i in range(len(ds))])  # noqa: E731
    assert torch.equal(crops(a), crops(b)) and not torch.equal(crops(a), crops(c))
    b.set_epoch(1)
    assert not torch.equal(crops(a), crops(b))


def test_default_collate_batches_crops_as_named_tuples(tmp_path):
    """[3.1] torch's default collate keeps the Crop fields, batch-first."""
    ds = D.CropDataset([write(tmp_path, "a.wav", tone(9.0))])
    batch = next(iter(DataLoader(ds, batch_size=3)))
    assert isinstance(batch, D.Crop) and batch.wav.shape == (3, CROP_SAMPLES)
    assert batch.padding.shape == batch.extra.shape == (3, CROP_FRAMES)
    assert batch.padding.dtype == torch.bool and batch.extra.dtype == torch.int64


# ---------------------------------------------------------------- 3.1 pretraining
TINY_RUN = ["--config", "tiny", "--encodec", "random", "--batch_size", "4", "--workers", "0",
            "--val_files", "2", "--gamma", "uniform", "--log_every", "1", "--val_every", "1000"]


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory, codec):
    """Ten short demo files and their codec cache, shared by the training tests."""
    root = tmp_path_factory.mktemp("demo")
    paths = demo_signals.write_demo_dataset(str(root / "audio"), n_files=10, seed=0, seconds=(4.0, 6.0))
    cache.build_cache(codec, paths, str(root / "cache"))
    return str(root / "audio"), str(root / "cache")


@pytest.fixture(scope="module")
def short_cache(tmp_path_factory, codec):
    """Six clips shorter than a crop (1-3.5 s), so every crop is padded, each by a different amount."""
    root = tmp_path_factory.mktemp("short")
    os.makedirs(root / "audio")
    paths = [str(root / "audio" / f"{i}.wav") for i in range(6)]
    for i, path in enumerate(paths):
        sf.write(path, demo_signals.synth_clip(("note", "chord", "chirp")[i % 3], 1.0 + 0.5 * i, i).numpy(), SAMPLE_RATE)
    cache.build_cache(codec, paths, str(root / "cache"))
    return str(root / "audio"), str(root / "cache")


def losses(out, key="loss"):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return {r["step"]: r[key] for r in map(json.loads, f) if key in r}


def test_command_line_takes_every_config_field_and_refuses_unknown_ones(tmp_path):
    """[3.1] --field=value for any TrainConfig/ModelConfig field; typos are errors, not ignored."""
    a, b = str(tmp_path), "demo"
    cfg, mcfg, given = train.parse_args(["--config", "small", "--M_prop=0.3", "--steps", "7", "--data", a, b,
                                         "--resume", "--betas", "0.8,0.9", "--data_weights", "1", "2"])
    assert (mcfg.n_enc_layers, mcfg.M_prop, cfg.steps, cfg.data, cfg.resume, cfg.betas, cfg.data_weights) == \
        (5, 0.3, 7, (a, b), True, (0.8, 0.9), (1.0, 2.0))
    assert {"n_enc_layers", "M_prop", "steps", "data", "resume", "betas"} <= given and "lr" not in given
    assert train.parse_args(["--betas", "0.8", "0.9"])[0].betas == (0.8, 0.9)
    with pytest.raises(D.UsageError, match="unrecognized arguments: --M_porp"):
        train.parse_args(["--M_porp=0.3"])
    with pytest.raises(SystemExit) as done:  # --help lists every field and exits cleanly
        train.parse_args(["--help"])
    assert done.value.code == 0


def test_a_killed_run_resumes_bit_for_bit(demo_cache, tmp_path, capsys):
    """[3.1] killed at step 3, its checkpoint torn, folder moved: resumes from step 2 exactly, logs once."""
    audio, cache = demo_cache
    common = TINY_RUN + ["--data", audio, "--cache", cache, "--ckpt_every", "2"]
    train.main(common + ["--out", str(tmp_path / "straight"), "--steps", "3"])
    train.main(common + ["--out", str(tmp_path / "killed"), "--steps", "3"])
    torn = tmp_path / "killed" / "ckpt-00000003.pt"  # the disk filled up while it was written
    torn.write_bytes(torn.read_bytes()[:5000])
    (tmp_path / "killed" / "ckpt-00000004.pt.tmp1").write_bytes(b"half a checkpoint")  # died mid-save
    os.rename(tmp_path / "killed", tmp_path / "moved")
    capsys.readouterr()
    train.main(common + ["--out", str(tmp_path / "moved"), "--steps", "3", "--resume"])
    out = capsys.readouterr().out
    assert "ckpt-00000003.pt: not a readable checkpoint" in out and "resuming from" in out and "at step 2" in out
    with open(tmp_path / "moved" / "metrics.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2, 3]  # each step once
    assert losses(tmp_path / "straight") == losses(tmp_path / "moved")
    assert not (tmp_path / "killed").exists()  # written where the run is now, the torn file replaced
    assert torch.load(tmp_path / "moved" / "ckpt-00000003.pt", weights_only=True)["step"] == 3
    with pytest.raises(D.UsageError, match=r"--resume: --lr 0.001 \(the checkpoint has 0.0001\)"):
        train.main(common + ["--out", str(tmp_path / "moved"), "--steps", "5", "--resume", "--lr", "1e-3"])


def test_micro_batches_and_gpus_count_M_and_T_over_the_whole_batch(short_cache, tmp_path):
    """[2.3] padded clips: two micro-batches of 1 give the losses of one batch of 2, validation too."""
    audio, cache = short_cache
    args = TINY_RUN + ["--data", audio, "--cache", cache, "--steps", "2", "--batch_size", "2", "--val_every", "1"]
    train.main(args + ["--out", str(tmp_path / "whole")])
    train.main(args + ["--out", str(tmp_path / "micro"), "--grad_accum", "2"])
    for key in ("loss", "val_loss"):
        whole, micro = losses(tmp_path / "whole", key), losses(tmp_path / "micro", key)
        assert whole.keys() == micro.keys() == {1, 2}
        assert all(abs(whole[s] - micro[s]) < 2e-5 for s in whole), (key, whole, micro)


def test_training_reads_raw_audio_through_the_codec_and_mixes_weighted_sources(demo_cache, tmp_path):
    """[3.1] without a cache the codec runs on each crop; several --data sources mix by weight."""
    audio, _ = demo_cache
    train.main(TINY_RUN + ["--data", audio, "--out", str(tmp_path / "raw"), "--steps", "1"])
    other = demo_signals.write_demo_dataset(str(tmp_path / "other"), n_files=3, seed=5, seconds=(4.0, 4.5))
    train.main(TINY_RUN + ["--data", audio, os.path.dirname(other[0]), "--data_weights", "1", "3",
                           "--val_files", "1", "--out", str(tmp_path / "mixed"), "--steps", "1"])
    for run in ("raw", "mixed"):
        assert 6.5 < losses(tmp_path / run)[1] < 7.5  # about ln(1024) at the start


def test_checkpoint_round_trips_the_model(demo_cache, tmp_path, monkeypatch):
    """[3.1] a checkpoint holds config, gamma_q and weights, is fsync'd before its rename, loads exactly."""
    audio, cache = demo_cache
    events, fsync, replace = [], os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(os.path.basename(b)), replace(a, b))[1])
    train.main(TINY_RUN + ["--data", audio, "--cache", cache, "--out", str(tmp_path), "--steps", "1"])
    assert events[events.index("ckpt-00000001.pt") - 1] == "fsync"  # on disk before it has its name
    net, loaded = D.load_checkpoint(str(tmp_path / "ckpt-00000001.pt"))
    cfg, source = net.cfg, loaded["encodec"]
    ckpt = torch.load(tmp_path / "ckpt-00000001.pt", weights_only=True)
    assert source == "random" and cfg == M.ModelConfig(**ckpt["config"]) and ckpt["step"] == 1
    assert all(torch.equal(v, ckpt["model"][k]) for k, v in net.state_dict().items())
    assert ckpt["gamma_q"] == [0.125] * 8 and "optimizer" in ckpt


def test_a_diverging_run_stops_and_keeps_its_last_good_checkpoint(demo_cache, tmp_path):
    """[3.1] a non-finite loss stops the run with a clear message; saved checkpoints stay valid."""
    audio, cache = demo_cache
    with pytest.raises(SystemExit, match="loss is (nan|inf)"):
        train.main(TINY_RUN + ["--data", audio, "--cache", cache, "--out", str(tmp_path), "--steps", "20",
                               "--ckpt_every", "1", "--lr", "1e30"])
    for path in tmp_path.glob("ckpt-*.pt"):
        D.load_checkpoint(str(path))


def test_two_gloo_processes_match_one_process_on_the_full_batch(short_cache, tmp_path):
    """[2.3, 3.1] DDP over 2 CPU processes, padded clips: the same losses as one process."""
    audio, cache = short_cache
    args = TINY_RUN + ["--data", audio, "--cache", cache, "--steps", "2", "--ckpt_every", "100"]
    train.main(args + ["--out", str(tmp_path / "one")])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with socket.socket() as s:  # a free port: a fixed one clashes with any other run of this test
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
                    "train.py", *args, "--out", str(tmp_path / "two")], check=True, env=env,
                   cwd=os.path.dirname(os.path.abspath(__file__)), capture_output=True)
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert one.keys() == two.keys() == {1, 2}
    assert all(abs(one[s] - two[s]) < 1e-4 for s in one), (one, two)


def test_epoch_order_depends_on_seed_and_epoch_jointly():
    """[3.1] the data order of seed 1's first epoch is not seed 0's second epoch (no seed + epoch)."""
    plan = lambda seed, epoch: train.epoch_plan(64, train.TrainConfig(seed=seed, batch_size=8), 8, 0, 1, epoch, 0)
    assert plan(1, 0) != plan(0, 1) and plan(2, 0) != plan(1, 1) and plan(0, 0) != plan(0, 1)
    assert sorted(i for step in plan(1, 0) for mb in step for i in mb) == list(range(64))


def test_estimated_gamma_leaves_out_the_padding_of_short_crops(codec, tmp_path):
    """[3.1] gamma_q estimated on padded crops of a 2-s clip equals gamma_q of the clip alone."""
    (tmp_path / "audio").mkdir()
    for i in range(3):  # three copies: whichever is held out, the estimate sees this clip only
        sf.write(tmp_path / "audio" / f"{i}.wav", demo_signals.synth_clip("chord", 2.0, 3).numpy(), SAMPLE_RATE)
    train.main(TINY_RUN + ["--data", str(tmp_path / "audio"), "--gamma", "estimate", "--val_files", "1",
                           "--batch_size", "1", "--steps", "1", "--out", str(tmp_path / "run")])
    gamma = torch.load(tmp_path / "run" / "ckpt-00000001.pt", weights_only=True)["gamma_q"]
    alone = M.estimate_gamma(codec, D.read_audio(tmp_path / "audio" / "0.wav")[None], 8)
    assert np.allclose(gamma, alone, atol=5e-5), (gamma, alone)  # padding moves it by ~5e-4


# ---------------------------------------------------------------- 3.1 features: last layer, 4-s chunks
def test_embed_layers_count_from_the_input_and_padding_is_ignored():
    """[3.1] embed(layer=k) is block k's output (only the full stack is normed); padding changes nothing."""
    torch.manual_seed(4)
    net = EnCodecMAE(make_config("tiny")).eval()
    feats = torch.randn(2, 40, 128)
    with torch.no_grad():
        last, top, first = net.embed(feats), net.embed(feats, layer=2), net.embed(feats, layer=1)
        assert torch.equal(last, top) and not torch.allclose(first, top, atol=1e-2)
        assert first.std(-1).sub(1).abs().max() > 0.1  # block 1's raw output is not layer-normed
        padding = torch.arange(40)[None] >= torch.tensor([40, 25])[:, None]
        padded = net.embed(torch.where(padding[..., None], 100.0, feats), padding)
        assert torch.allclose(padded[1, :25], net.embed(feats[1:, :25])[0], atol=1e-5)


def test_chunked_features_equal_the_concatenated_halves(codec):
    """[3.1] an 8-s clip is embedded as two 4-s chunks whose frames are concatenated."""
    net = EnCodecMAE(make_config("tiny")).eval()
    wav = demo_signals.demo_clips(1, seconds=8.0, seed=41)
    whole = M.embed_audio(net, codec, wav)
    halves = [net.embed(codec.features(h)) for h in wav.split(M.CROP_SAMPLES, dim=1)]
    assert whole.shape == (1, 600, net.cfg.d_model)
    assert torch.allclose(whole, torch.cat(halves, 1), atol=1e-5)
    tail = M.embed_audio(net, codec, wav[:, : M.CROP_SAMPLES + 5000])  # a partial last chunk
    assert tail.shape[1] == M.num_frames(M.CROP_SAMPLES + 5000)


def test_chunked_embedding_equals_concatenated_chunks():
    """[3.2] audio longer than 4 s is cut into 4-s chunks, each embedded alone, frames concatenated."""
    model = E.load_upstream("ECMAE-R:tiny", encodec="random")
    wav = torch.randn(1, int(4.5 * 24000)) * 0.1  # one full 4-s chunk and a shorter one
    frames = model.frames(wav)
    pieces = torch.cat([model.frames(wav[:, s:s + 96000]) for s in range(0, wav.shape[1], 96000)], 1)
    assert frames.shape == (1, M.num_frames(wav.shape[1]), 128)
    assert torch.allclose(frames, pieces, atol=1e-5)
    assert torch.allclose(frames, M.embed_audio(model.mae, model.codec, wav), atol=1e-5)


# ---------------------------------------------------------------- 3.2 downstream evaluation
def separable_data(n=240, D=16, C=4, seed=0):
    """Tight Gaussian clusters around C far-apart centres: linearly separable in practice."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % C
    X = 4 * torch.randn(C, D, generator=g)[labels] + torch.randn(n, D, generator=g)  # (n, D)
    return X, torch.nn.functional.one_hot(labels, C).float()


def tiny_checkpoint(path, **config_changes):
    """A checkpoint dict in train.py's format for a freshly initialised tiny model."""
    torch.manual_seed(0)
    cfg = M.make_config("tiny")
    ckpt = {"model": M.EnCodecMAE(cfg).state_dict(), "config": {**asdict(cfg), **config_changes},
            "encodec": "random", "step": 0, "gamma_q": list(cfg.gamma_q)}
    torch.save(ckpt, path)
    return str(path)


def test_probe_is_near_perfect_when_separable_and_chance_on_shuffled_labels():
    """[3.2] the MLP and linear probes learn a separable task; shuffled labels give chance."""
    X, Y = separable_data()
    task = E.Task("t", None, False, "top1_acc", {}, [], None)
    for hidden_layers in (0, 1):
        cfg = E.ProbeConfig(hidden_layers=hidden_layers, lr=1e-2, hidden_dim=128, max_epochs=60)
        probe, valid, _ = E.train_probe(X[:160], Y[:160], X[160:200], Y[160:200], task, cfg, seed=0)
        accuracy = E.top1_accuracy(E.predict(probe, X[200:], False), Y[200:])
        # 38 of 40 in float32
        assert accuracy >= 0.95 - 1e-6, (
            f"{hidden_layers} hidden layers, a separable task: expected a test accuracy of 0.95 "
            f"or more, got {accuracy:.3f}")
    Y_shuffled = Y[torch.randperm(len(Y), generator=torch.Generator().manual_seed(1))]
    cfg = E.ProbeConfig(hidden_layers=1, lr=3.2e-3, hidden_dim=128, max_epochs=60)
    probe, _, _ = E.train_probe(X[:160], Y_shuffled[:160], X[160:200], Y_shuffled[160:200], task, cfg, seed=0)
    accuracy = E.top1_accuracy(E.predict(probe, X[200:], False), Y_shuffled[200:])
    assert accuracy < 0.5, f"shuffled labels: expected about chance (0.25), got {accuracy:.3f}"


def test_accuracy_and_mAP_match_naive_references_with_ties_and_empty_classes():
    """[3.2] top-1 and macro mAP as scikit-learn's average_precision_score: tied scores share one
    threshold; a class without positives scores 0 and still counts in the mean (its convention)."""
    g = torch.Generator().manual_seed(0)
    scores = (torch.rand(60, 6, generator=g) * 6).round() / 6  # 7 distinct values: many ties
    Y = (torch.rand(60, 6, generator=g) < 0.3).float()
    Y[:, 5] = 0  # class 5 has no positive clip
    naive_aps = []
    for s, y in zip(scores.T.tolist(), Y.T.tolist()):
        # AP = mean over positives of the precision among all clips scoring at least as high
        precisions = [sum(yj for sj, yj in zip(s, y) if sj >= si) / sum(sj >= si for sj in s)
                      for si, yi in zip(s, y) if yi]
        naive_aps.append(sum(precisions) / len(precisions) if precisions else 0.0)
    got = E.mean_average_precision(scores, Y)
    assert got == pytest.approx(sum(naive_aps) / 6, abs=1e-6), (
        "6 classes with tied scores, class 5 without positives: expected mAP "
        f"{sum(naive_aps) / 6:.6f} (per class {fmt(naive_aps)}), got {got:.6f}")
    # scikit-learn 1.9 gives 0.583333 for this tie (the two top clips share one threshold)
    tie = E.mean_average_precision(torch.tensor([[0.5], [0.5], [0.2]]), torch.tensor([[1.0], [0], [1]]))
    assert tie == pytest.approx(7 / 12), (
        "scores 0.5, 0.5, 0.2 for labels 1, 0, 1: expected AP 7/12 = 0.583333 (the tie is one "
        f"threshold), got {tie:.6f}")
    # Accuracy on scores without ties (the contract leaves the tie rule open).
    scores = torch.rand(60, 6, generator=g)
    Y1 = torch.nn.functional.one_hot(torch.randint(0, 6, (60,), generator=g), 6).float()
    rows = scores.tolist()
    # none: any tie rule
    assert all(sorted(r)[-1] > sorted(r)[-2] for r in rows), (
        "the test's scores hold a tie")
    naive_acc = sum(int(r.index(max(r)) == y.index(1.0)) for r, y in zip(rows, Y1.tolist())) / 60
    got = E.top1_accuracy(scores, Y1)
    assert got == pytest.approx(naive_acc, abs=1e-6), (
        f"expected top-1 accuracy {naive_acc:.6f} ({round(naive_acc * 60)} of 60), got {got:.6f}")


def test_probe_returns_its_first_best_validated_weights_even_below_one_validation_interval():
    """[3.2, HEAR] validation every 3 epochs keeps the first best weights; a run of 2 epochs (below the
    interval) validates at its last epoch instead of failing with no weights to return."""
    X, Y = separable_data()
    Y_shuffled = Y[torch.randperm(len(Y), generator=torch.Generator().manual_seed(1))]
    task = E.Task("t", None, False, "top1_acc", {}, [], None)
    for max_epochs, labels in ((2, Y), (30, Y), (30, Y_shuffled)):
        cfg = E.ProbeConfig(hidden_layers=1, lr=1e-2, hidden_dim=64, max_epochs=max_epochs)
        probe, best, epoch = E.train_probe(X[:160], labels[:160], X[160:200], labels[160:200], task, cfg, seed=0)
        now = E.top1_accuracy(E.predict(probe, X[160:200], False), labels[160:200])
        assert now == pytest.approx(best, abs=1e-6), (
            f"max_epochs {max_epochs}: expected the returned probe to score the returned best "
            f"{best:.4f}, got {now:.4f}")
        if max_epochs == 2:
            assert epoch == 1, (
                f"2 epochs, validation every 3: expected the score of epoch 1, got epoch {epoch}")
        elif labels is Y:  # perfect within the first few validations; later ties must not replace it
            assert best == 1.0 and epoch % 3 == 2 and epoch <= 8, (
                "a separable task, validation every 3 epochs: expected best 1.0 at epoch 2, 5 or "
                f"8 (the first perfect score), got {best} at epoch {epoch}")


def test_probe_stops_after_patience_validations_without_improvement():
    """[3.2, HEAR] patience counts validations, not epochs: with validation every 2 epochs and
    patience 3, the probe stops at the third validation after its best; an equal score is none."""
    X, Y = separable_data(n=80)
    script = [0.5, 0.4, 0.6, 0.55, 0.6, 0.58, 0.9, 0.95, 0.97, 0.99]  # of validations 1, 2, ...
    seen = []  # the predictions each validation scored

    def scripted(scores, labels):
        seen.append(scores.detach().clone())
        return script[min(len(seen), len(script)) - 1]
    task = E.Task("t", None, False, "scripted", {}, [], None)
    cfg = E.ProbeConfig(hidden_layers=1, hidden_dim=16, lr=1e-2, max_epochs=40, check_every=2,
                        patience=3)
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(E.METRICS, "scripted", scripted)
        probe, best, epoch = E.train_probe(X[:60], Y[:60], X[60:], Y[60:], task, cfg, seed=0)
    # Validations after epochs 1, 3, 5, 7, 9, 11: the best, 0.6, comes at epoch 5 (the third);
    # 0.55, 0.6 (equal) and 0.58 make three without improvement: it stops before a seventh's 0.9.
    assert len(seen) == 6, (
        "expected 6 validations (the best at the 3rd, then 3 without improvement), got "
        f"{len(seen)}")
    assert (best, epoch) == (0.6, 5), (
        f"expected the best score 0.6 at epoch 5, got {best} at epoch {epoch}")
    now = E.predict(probe, X[60:], False)
    off = (now - seen[2]).abs().max().item()
    assert off < 1e-6, (
        "expected the returned probe to predict as at its best validation, got predictions off "
        f"by up to {off:.3g}")


def test_kfold_bookkeeping_and_mean_over_folds():
    """[3.2] split i tests on fold i, validates on fold i+1 mod k, trains on the rest; mean of folds."""
    meta = {"task_name": "t", "split_mode": "new_split_kfold", "splits": ["fold02", "fold00", "fold01", "fold03"]}
    folds = E.kfold_splits(meta)
    assert folds[0] == (["fold02", "fold03"], ["fold01"], ["fold00"])
    assert folds[3] == (["fold01", "fold02"], ["fold00"], ["fold03"])
    for trains, valid, test in folds:
        assert sorted(trains + valid + test) == ["fold00", "fold01", "fold02", "fold03"]
    assert E.kfold_splits({"split_mode": "trainvaltest"}) == [(["train"], ["valid"], ["test"])]
    X, Y = separable_data(n=200)
    data = {f"fold0{i}": (X[i::4], Y[i::4]) for i in range(4)}
    task = E.Task("t", None, False, "top1_acc", {}, folds, None)
    grid = E.hear_grid(2, hidden_dim=64, max_epochs=9)
    result = E.probe_task(data, task, grid)
    assert [f["test"] for f in result["folds"]] == [["fold00"], ["fold01"], ["fold02"], ["fold03"]]
    assert len(result["grid"]) == 2 and result["best"] in [g["config"] for g in result["grid"]]
    assert result["test"] == pytest.approx(sum(f["test_score"] for f in result["folds"]) / 4)


def test_hear_grid_is_heareval_default_grid():
    """[3.2] 16 points (layers x lr x init), heareval's seed-42 shuffle keeps 8; width 1024, 500 epochs."""
    full = E.hear_grid(16)
    assert len({(c.hidden_layers, c.lr, c.init) for c in full}) == 16
    assert E.hear_grid()[:8] == full[:8] and len(E.hear_grid()) == 8
    # heareval 2021.1.3's log, its runner seeded with 43: the points it searched, in order
    logged_43 = [(2, "u", 1e-3), (2, "u", 3.2e-3), (2, "n", 1e-3), (1, "u", 3.2e-3),
                 (1, "n", 3.2e-4), (1, "u", 1e-4), (2, "n", 3.2e-4), (2, "u", 3.2e-4)]
    assert [(c.hidden_layers, c.init[7], c.lr) for c in E.hear_grid(seed=43)] == logged_43
    assert {(c.hidden_dim, c.max_epochs, c.check_every, c.patience, c.batch_size) for c in full} == {
        (1024, 500, 3, 20, 1024)}
    probe = E.make_probe(16, 3, full[0])
    kinds = [type(m).__name__ for m in probe][:4]
    assert kinds == ["Linear", "BatchNorm1d", "Dropout", "ReLU"]


def test_hear_api_shapes_dtypes_and_timestamps():
    """[3.2, HEAR] arbitrary lengths at 48 kHz: frames at 75 Hz centred at (t + 0.5) / 75 s inside
    the audio, none missing at the end; the scene embedding is the mean of those frames."""
    for spec, cases in [("ECMAE-R:tiny", [(1, 1.07), (2, 1.98), (1, 4.0), (1, 2.74)]), ("EC", [(2, 1.07)])]:
        model = E.load_model(spec, encodec="random")
        assert type(model.sample_rate) is int and model.sample_rate == 48000
        assert model.upstream.sample_rate == 24000  # what its frames() take: one rate per object
        width = model.timestamp_embedding_size
        assert type(width) is int and type(model.scene_embedding_size) is int
        with torch.no_grad():
            for n_sounds, seconds in cases:  # the validator's lengths, white noise
                audio = torch.rand(n_sounds, int(seconds * 48000)) * 2 - 1
                emb, ts = E.get_timestamp_embeddings(audio, model)
                assert emb.dtype == torch.float32 and emb.shape[::2] == (n_sounds, width)
                assert ts.shape == emb.shape[:2] and torch.isfinite(emb).all()
                centres = [(t + 0.5) * 1000 / 75 for t in range(int(seconds * 75) + 2)]
                assert torch.allclose(ts[0].double(), torch.tensor(centres[: ts.shape[1]], dtype=torch.float64))
                assert ts.max() <= 1000 * seconds < ts.max() + 1000 / 75  # inside, and none missing
                scene = E.get_scene_embeddings(audio, model)
                assert scene.shape == (n_sounds, width) and scene.dtype == torch.float32
                assert torch.allclose(scene, emb.mean(1), atol=1e-5)
        if spec == "EC":  # EC's frames are the codec's own, at 24 kHz
            wav = torch.stack([D.resample_24k(a, 48000) for a in audio])
            codec_frames = M.codec_embed_audio(model.upstream.codec, wav)  # its upstream's, 24 kHz
            assert torch.allclose(emb, codec_frames[:, : emb.shape[1]], atol=1e-5)


def three_sounds_task(root, clips_per_fold=6):
    """A 5-fold task any upstream separates: a tone, loud noise and near-silence (chance: 1/3)."""
    g = torch.Generator().manual_seed(0)
    t = torch.arange(12000) / 24000  # 0.5 s at 24 kHz
    sound = {"tone": lambda i: 0.3 * torch.sin(2 * torch.pi * (300 + 20 * i) * t),
             "noise": lambda i: 0.3 * torch.randn(12000, generator=g),
             "hush": lambda i: 0.003 * torch.randn(12000, generator=g)}
    kinds = [list(sound)[i % 3] for i in torch.randperm(5 * clips_per_fold, generator=g).tolist()]  # no pattern
    folds = {f"fold{f:02d}": [(sound[k](i), [k]) for i, k in enumerate(kinds) if i % 5 == f] for f in range(5)}
    return demo.write_task(root, "three-sounds", folds, False, True, 0.5)


# ---------------------------------------------------------------- end to end, one test per stage
def test_tiny_model_learns_on_demo_data(demo_cache, tmp_path):
    """[2.3] on demo audio the loss falls and masked accuracy rises far above chance (1/1024)."""
    audio, cache = demo_cache
    train.main(TINY_RUN + ["--data", audio, "--cache", cache, "--out", str(tmp_path), "--steps", "30",
                           "--lr", "2e-3", "--batch_size", "8", "--log_every", "10"])
    with open(tmp_path / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert records[-1]["loss"] < records[0]["loss"] - 0.5
    assert max(records[-1]["masked_acc"]) > 0.02, records[-1]["masked_acc"]


def test_stage_one_then_kmeans_then_stage_two_runs_end_to_end(demo_cache, tmp_path):
    """[2.3] stage 1 -> kmeans.py -> stage 2 on stage 1's codec, resumable: the model predicts 9 streams."""
    audio, cache = demo_cache
    train.main(TINY_RUN + ["--data", audio, "--cache", cache, "--out", str(tmp_path / "s1"), "--steps", "2"])
    kmeans.main(["--checkpoint", str(tmp_path / "s1" / "ckpt-00000002.pt"), "--cache", cache,
                 "--out", str(tmp_path / "km"), "--k", "16", "--n-frames", "2000"])
    stage2 = [a for a in TINY_RUN if a not in ("--encodec", "random")] + [  # the codec comes from stage 1
        "--data", audio, "--cache", cache, "--out", str(tmp_path / "s2"),
        "--init_from", str(tmp_path / "s1" / "ckpt-00000002.pt"), "--kmeans_store", str(tmp_path / "km")]
    train.main(stage2 + ["--steps", "2"])
    train.main(stage2 + ["--steps", "3", "--resume"])
    net, loaded = D.load_checkpoint(str(tmp_path / "s2" / "ckpt-00000003.pt"))
    cfg, source = net.cfg, loaded["encodec"]
    assert source == "random" and cfg.n_streams == 9 and net.head.linear.out_features == 9 * 1024
    with open(tmp_path / "s2" / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records] == [1, 2, 3] and len(records[0]["masked_acc"]) == 9
    with pytest.raises(D.UsageError, match=r"--init_from: --encodec pretrained \(the checkpoint has random\)"):
        train.main(stage2 + ["--steps", "2", "--encodec", "pretrained", "--out", str(tmp_path / "other")])
    with pytest.raises(D.UsageError, match=r"--resume: --encodec pretrained \(the checkpoint has random\)"):
        train.main(stage2 + ["--steps", "4", "--encodec", "pretrained", "--resume"])


def test_hear_tasks_run_end_to_end_for_EC_ECMAE_R_and_a_checkpoint(tmp_path, capsys):
    """[3.2, Table 1] HEAR-layout tasks -> cached embeddings -> probes -> Table 1 and results.json:
    a separable task scores far above chance, folds rotate, a rerun reuses the cached embeddings."""
    three_sounds_task(tmp_path / "tasks")
    demo.make_demo_tasks(tmp_path / "tasks", clips=20, seconds=0.5)
    ckpt = tiny_checkpoint(tmp_path / "tiny.pt")
    argv = ["--tasks-dir", str(tmp_path / "tasks"), "--task", "three-sounds", "--task", "demo-mix",
            "--upstream", "EC", "--upstream", "ECMAE-R:tiny", "--upstream", ckpt, "--encodec", "random",
            "--grid-points", "2", "--max-epochs", "6", "--out", str(tmp_path / "out")]
    results = E.main(argv)
    assert list(results) == ["EC", "ECMAE-R:tiny", ckpt]
    table = capsys.readouterr().out
    assert "| upstream | three-sounds | demo-mix |" in table
    saved = json.loads((tmp_path / "out" / "results.json").read_text())["results"]
    sounds = saved["EC"]["three-sounds"]
    assert sounds["metric"] == "top1_acc" and sounds["test"] >= 0.75  # chance is 1/3
    assert sounds["n_test"] == 30 and sounds["se"] == pytest.approx(math.sqrt(sounds["test"] * (1 - sounds["test"]) / 30))
    assert (f"| EC | {100 * sounds['test']:.1f} ± {100 * sounds['se']:.1f} | "  # accuracy ± its SE, mAP alone
            f"{saved['EC']['demo-mix']['test']:.3f}".replace("| 0.", "| .") + " |") in table
    assert [f["test"] for f in sounds["folds"]] == [[f"fold{i:02d}"] for i in range(5)]
    assert sounds["test"] == pytest.approx(np.mean([f["test_score"] for f in sounds["folds"]]))
    assert sounds["best"] == max(sounds["grid"], key=lambda g: g["valid"])["config"]
    assert sounds["folds"][0]["valid"] == max(g["valid"] for g in sounds["grid"])  # fold 0 ran the grid
    mix = saved["EC"]["demo-mix"]
    assert mix["metric"] == "mAP" and len(mix["grid"]) == 2 and len(mix["folds"]) == 1
    caches = sorted((tmp_path / "out" / "embeddings").rglob("*.npz"))
    assert len(caches) == 3 * (5 + 3)  # per upstream: 5 folds + train/valid/test
    # A cached scene embedding is the HEAR module's for the same 48-kHz file (row order = file order).
    fold = np.load(next(c for c in caches if "EC-random" in str(c) and "fold01" in c.name))
    wav, rate = sf.read(tmp_path / "tasks" / "three-sounds" / "48000" / "fold01" / fold["files"][2], dtype="float32")
    hear = E.get_scene_embeddings(torch.from_numpy(wav)[None], E.load_model("EC", encodec="random"))
    assert rate == 48000 and np.allclose(fold["X"][2], hear[0].numpy(), atol=1e-4)
    stamps = [os.path.getmtime(c) for c in caches]
    again = E.main(argv)  # a rerun reads the cache and gives the same scores
    assert [os.path.getmtime(c) for c in caches] == stamps
    assert again["EC"]["three-sounds"]["test"] == results["EC"]["three-sounds"]["test"]


def test_embed_command_writes_embed_audio_frames_mirrors_folders_resumes_and_skips_bad_files(
        tmp_path, capsys, monkeypatch):
    """[3.2] `evaluate.py embed`: each file's 75-Hz frames equal model.embed_audio on it (read in
    segments of whole 4-s chunks), any length/rate/channels; the tree is mirrored; reruns resume."""
    src = tmp_path / "audio"
    (src / "sub").mkdir(parents=True)
    sf.write(src / "short.wav", 0.1 * np.random.default_rng(0).standard_normal(7000).astype("float32"), 24000)
    sf.write(src / "long.flac", 0.1 * np.random.default_rng(1).standard_normal(int(4.5 * 24000)), 24000)
    stereo = 0.1 * np.random.default_rng(2).standard_normal((int(1.1 * 44100), 2))
    sf.write(src / "sub" / "stereo.wav", stereo.astype("float32"), 44100)
    (src / "sub" / "broken.wav").write_bytes(b"RIFF" + os.urandom(100))
    ckpt = tiny_checkpoint(tmp_path / "tiny.pt")
    monkeypatch.setattr(E, "EMBED_SEGMENT", CROP_SAMPLES)  # long.flac: two reads, 4 s then 0.5 s
    argv = ["--upstream", ckpt, "--out", str(tmp_path / "emb"), "--scene", "--log-every", "0", str(src)]
    with pytest.warns(UserWarning, match="broken.wav") as caught:
        skipped = embed_tool.main(argv)
    assert [path for path, _ in skipped] == [src / "sub" / "broken.wav"]
    assert len([w for w in caught if "skipping" in str(w.message)]) == 1
    out = capsys.readouterr().out
    assert "embed: 3/3 files" in out and "x real time, ETA 0 s" in out and "1 skipped" in out
    mae = D.load_checkpoint(ckpt)[0]
    codec = D.load_codec("random")
    for name in ("short.wav", "long.flac", "sub/stereo.wav"):
        wav = D.read_audio(src / name)
        want = M.embed_audio(mae, codec, wav[None])[0]  # (T, D)
        frames = np.load(tmp_path / "emb" / f"{name}.npy")
        assert frames.dtype == np.float32 and frames.shape == (M.num_frames(len(wav)), 128)
        assert np.allclose(frames, want.numpy(), atol=1e-4)
        inside = sum(1 for t in range(len(want)) if (t + 0.5) * HOP <= len(wav))  # centres inside
        assert np.allclose(np.load(tmp_path / "emb" / f"{name}.scene.npy"), want[:inside].mean(0), atol=1e-4)
    frames = E.embed_file(E.load_upstream(ckpt), src / "long.flac")  # the README's snippet: one (T, D) tensor
    assert frames.dtype == torch.float32 and np.allclose(frames.numpy(), np.load(tmp_path / "emb" / "long.flac.npy"))
    written = {p: os.path.getmtime(p) for p in (tmp_path / "emb").rglob("*.npy")}
    assert len(written) == 6
    with pytest.warns(UserWarning, match="broken.wav"):
        embed_tool.main(argv)  # done files are skipped, the bad one is named again
    assert {p: os.path.getmtime(p) for p in (tmp_path / "emb").rglob("*.npy")} == written
    assert "3 already done" in capsys.readouterr().out
    with pytest.raises(D.UsageError, match="another upstream"):  # a resumed folder keeps one upstream
        embed_tool.main(["--upstream", "EC", "--encodec", "random", "--out", str(tmp_path / "emb"), str(src)])
