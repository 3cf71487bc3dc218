"""Tests of the GPU path, on the CPU (docs/GPU.md): precision, host-device syncs, compile, DDP, the cache build.

No GPU is needed: the 'meta' device stands in for one where a value must never be read (it holds
none), CUDA queries are monkeypatched where a choice depends on them, and gloo stands in for NCCL.
"""
import collections
import contextlib
import datetime
import functools
import multiprocessing
import os
import socket
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

import data as D
import model as M
import train
from extras import bench, cache, random_codec
from extras import cli as extras_cli
from extras import compile as extras_compile
from extras import demo_audio as demo
from extras import demo_signals
from model import SAMPLE_RATE, gap_mask, make_config
from test_all import TINY_RUN, losses, short_cache, tone, write  # noqa: F401

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def codec():
    """The seeded random codec (a copy; built once per process: test_all's fixture checks its warning)."""
    with pytest.warns(UserWarning) if not random_codec._BUILT else contextlib.nullcontext():
        return D.load_codec("random")


# ---------------------------------------------------------------- precision [3.1]
def test_the_codec_gives_fp32_frames_and_codes_under_bf16_autocast(codec):
    """[2.1, 3.1] validation runs under autocast: the frozen codec must still compute training's targets."""
    wav = demo_signals.demo_clips(2, 1.0, seed=3)  # (2, 24000)
    feats, codes = codec(wav)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        feats_ac, codes_ac = codec(wav)
    assert feats_ac.dtype == torch.float32 and torch.equal(feats_ac, feats) and torch.equal(codes_ac, codes)


def test_the_codec_runs_without_tf32_and_gives_the_setting_back(codec, monkeypatch):
    """[2.1] cuDNN's TF32 (on by default on Ampere and newer) is off inside the codec's encoder and
    quantizer, so the fp32 codec is fp32 on a GPU too; the MAE's setting comes back after."""
    seen = []
    conv = next(m for m in codec.encoder.modules() if isinstance(m, torch.nn.Conv1d))
    conv.register_forward_hook(lambda *args: seen.append(("encoder", torch.backends.cudnn.allow_tf32)))
    encode = codec.quantizer.encode
    monkeypatch.setattr(codec.quantizer, "encode", lambda *args: (
        seen.append(("quantizer", torch.backends.cudnn.allow_tf32)), encode(*args))[1])
    wav = demo_signals.demo_clips(1, 0.5, seed=4)  # (1, 12000)
    for mae_setting in (True, False):
        torch.backends.cudnn.allow_tf32 = mae_setting
        codec(wav)
        codec.features(wav)
        assert torch.backends.cudnn.allow_tf32 is mae_setting  # the MAE's own choice, back
    torch.backends.cudnn.allow_tf32 = True  # torch's default
    assert seen == [("encoder", False), ("quantizer", False), ("encoder", False)] * 2, seen


def test_gpus_that_only_emulate_bf16_get_fp16_with_a_grad_scaler(monkeypatch):
    """[3.1] bf16 where the GPU has bf16 units (Ampere on); a T4 or V100 only emulates it: fp16 + GradScaler."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for native, dtype in ((False, torch.float16), (True, torch.bfloat16)):  # a T4, then an A100
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: native or including_emulation)
        autocast, scaler = train.autocast_for(torch.device("cuda"))
        assert autocast.fast_dtype == dtype and scaler.is_enabled() == (dtype == torch.float16)


def test_a_cpu_or_bf16_checkpoint_resumes_into_an_fp16_grad_scaler(short_cache, tmp_path, monkeypatch):  # noqa: F811
    """[3.1] its scaler state is {} (a disabled scaler): an fp16 run resumes with a fresh loss scale."""
    audio, cache_dir = short_cache
    args = TINY_RUN + ["--data", audio, "--cache", cache_dir, "--out", str(tmp_path), "--ckpt_every", "1", "--steps", "3"]
    train.main(args)
    straight = losses(tmp_path)
    for step in (2, 3):
        os.remove(tmp_path / f"ckpt-0000000{step}.pt")
    assert torch.load(tmp_path / "ckpt-00000001.pt", weights_only=True)["scaler"] == {}
    fp16 = lambda device: (contextlib.nullcontext(), torch.amp.GradScaler("cpu", enabled=True))  # an older GPU's
    monkeypatch.setattr(train, "autocast_for", fp16)
    train.main(args + ["--resume"])
    assert torch.load(tmp_path / "ckpt-00000003.pt", weights_only=True)["scaler"]["scale"] == 2.0 ** 16
    assert all(abs(losses(tmp_path)[s] - straight[s]) < 1e-6 for s in straight)  # scaling by 2^16 is exact


# ---------------------------------------------------------------- no host-device sync in the hot loop
class NoSync(TorchDispatchMode):
    """Fails on what would make the host wait for the GPU, 'meta' standing in for it: reading a value
    (.item(), bool(), int(), a boolean index's size), a copy to the host, or a blocking copy to it."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs, aten = kwargs or {}, torch.ops.aten
        on_device = [a.device.type == "meta" for a in args if isinstance(a, torch.Tensor)]
        if func in (aten._local_scalar_dense.default, aten.nonzero.default) and any(on_device):
            raise AssertionError(f"{func}: reads a value on the device")
        if func is aten.index.Tensor and any(on_device) and any(i is not None and i.dtype == torch.bool for i in args[1]):
            raise AssertionError("a boolean index on the device: its size is a value read")
        if func is aten._to_copy.default:
            to = torch.device(kwargs.get("device") or args[0].device).type
            assert not (args[0].device.type == "meta" and to == "cpu"), "a copy from the device to the host"
            assert not (args[0].device.type == "cpu" and to == "meta" and not kwargs.get("non_blocking")), \
                "a blocking copy to the device (it waits for the GPU's queue)"
        return func(*args, **kwargs)


def cached_batch(mcfg, lengths, seed, T=M.CROP_FRAMES):
    """A micro-batch as the loader gives it, on the CPU: CachedCrop (feats, codes, padding, extra) and masks."""
    g = torch.Generator().manual_seed(seed)
    padding = torch.arange(T)[None] >= torch.tensor(lengths)[:, None]  # (B, T)
    item = cache.CachedCrop(torch.randn(len(lengths), T, 128, generator=g),
                            torch.randint(0, 1024, (len(lengths), T, 8), generator=g), padding,
                            torch.randint(0, 1024, (len(lengths), T), generator=g).masked_fill(padding, -1))
    return item, gap_mask(torch.tensor(lengths), T, mcfg.M_prop, mcfg.M_gap, g)


def test_a_training_step_never_waits_for_the_device(codec):
    """[3.1] train_step (codec, forward, loss, backward, clipping, AdamW) reads no value on the device."""
    meta, cpu = torch.device("meta"), torch.device("cpu")
    autocast, scaler = train.autocast_for(cpu)
    mcfg = make_config("tiny", n_kmeans_streams=1)  # stage 2: its target check too
    model = M.EnCodecMAE(mcfg).to(meta)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batches = [cached_batch(mcfg, [300, 300], 0), cached_batch(mcfg, [300, 120], 1)]  # dense, then padded
    with NoSync():
        stats = train.train_step(model, batches, None, mcfg, opt, scaler, autocast, meta, clip_grad=1.0)
    assert stats.device == meta and stats.shape == (1 + 3 * mcfg.n_streams,)
    mcfg = make_config("tiny")  # raw audio: the codec runs on the device as well
    model, wav = M.EnCodecMAE(mcfg).to(meta), demo_signals.demo_clips(1, 1.0)  # (1, 24000)
    crop, codec = D.Crop(wav, torch.zeros(1, 75, dtype=torch.bool), torch.full((1, 75), -1)), D.load_codec("random")
    codec.to(meta)  # a copy (load_codec gives one each call)
    with NoSync():
        train.train_step(model, [(crop, gap_mask(torch.tensor([75]), 75, 0.5, 15))], codec, mcfg,
                         torch.optim.AdamW(model.parameters()), scaler, autocast, meta, clip_grad=0.0)


def test_a_loss_gone_non_finite_between_log_steps_stops_the_run_before_any_checkpoint(short_cache, tmp_path):  # noqa: F811
    """[3.1] read at log and checkpoint steps only, a NaN still stops the run and never reaches a checkpoint."""
    audio, cache_dir = short_cache
    with pytest.raises(SystemExit, match=r"loss is (nan|inf) in steps 1-4: stopping. The last good checkpoint \(none"):
        train.main(TINY_RUN + ["--data", audio, "--cache", cache_dir, "--out", str(tmp_path), "--steps", "8",
                               "--log_every", "4", "--ckpt_every", "4", "--lr", "1e30"])
    assert not list(tmp_path.glob("ckpt-*.pt"))


def test_the_compiled_network_has_no_graph_break_and_compiles_once_per_padding_switch():
    """[3.1] --compile: padded and dense micro-batches in turn, 6 steps: one graph each, no break."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    graphs = collections.Counter()

    def backend(gm, example_inputs):  # dynamo's "eager" backend, counting the graphs it is handed
        graphs[gm.code.count("key_padding") > 0 or gm.code.count("visible_padding") > 0] += 1
        return gm.forward
    mcfg = make_config("tiny")
    model = extras_compile.compile_network(M.EnCodecMAE(mcfg), backend=backend)
    opt, (autocast, scaler) = torch.optim.AdamW(model.parameters()), train.autocast_for(torch.device("cpu"))
    for seed, lengths in enumerate([[300, 300], [300, 200], [300, 300], [250, 100], [300, 300], [300, 37]]):
        train.train_step(model, [cached_batch(mcfg, lengths, seed)], None, mcfg, opt, scaler, autocast,
                         torch.device("cpu"), 0.0)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 5  # encoder and decoder: dense and padded; head: one
    torch._dynamo.reset()


def test_the_benchmark_compiles_with_compile_and_times_the_loader_apart(capsys, monkeypatch):
    """bench.py train measures a run's step: --compile honoured, the loader's crops/s with --workers beside the step."""
    compiled = []
    monkeypatch.setattr(extras_compile, "compile_network", lambda model: compiled.append(model))
    monkeypatch.setattr(bench, "timed", lambda fn, device, reps=3: (fn(), 0.5)[1])  # one run, a fixed time
    monkeypatch.setattr(bench, "gemm_peak", lambda shapes, device, dtype, reps=5: 1e12)
    cfg, mcfg, _ = train.parse_args(["--config", "tiny", "--encodec", "random", "--batch_size", "2",
                                     "--workers", "0", "--compile"])
    bench.train_benchmark(cfg, mcfg, torch.device("cpu"))
    out = capsys.readouterr().out
    assert len(compiled) == 1 and "compile on" in out
    for name in ("raw audio", "cache"):
        assert f"| loader, {name} |" in out and f"| step, {name}, data ready |" in out and f"| run, {name} |" in out
    assert "crops/s with --workers 0" in out and "TFLOP by mae_flops" in out
    assert "| step, cache, data ready | 1.000 s" in out and "| step, raw audio, data ready | 1.500 s" in out
    assert "MFU (vendor peak)" not in out  # a CPU: no vendor peak unless one is given
    bench.train_benchmark(cfg, mcfg, torch.device("cpu"), peak_tflops=1.0)
    flops = bench.mae_flops(mcfg, 2)
    assert f"| MFU (vendor peak) | {flops / 0.5 / 1e12:.1%} of 1 TFLOP/s as given" in capsys.readouterr().out


def test_the_vendor_bf16_peak_is_found_by_the_name_torch_reports():
    """MFU against the figure people compare: the GPU's dense bf16 peak, the more specific name first."""
    assert bench.vendor_peak("NVIDIA H100 80GB HBM3")[0] == 989.4e12  # SXM
    assert bench.vendor_peak("NVIDIA H100 PCIe")[0] == 756e12
    assert bench.vendor_peak("NVIDIA A100-SXM4-80GB")[0] == 312e12
    assert bench.vendor_peak("NVIDIA GeForce RTX 3090")[0] == 71e12
    assert bench.vendor_peak("Some Future GPU")[0] is None
    assert bench.vendor_peak("NVIDIA H100 80GB HBM3", override=500.0)[0] == 500e12


def test_mae_flops_of_the_base_model_at_batch_128():
    """[2.2, 3.1] the step's arithmetic: 16.0 TFLOP (docs/GPU.md derives the GPU estimate from it)."""
    assert round(bench.mae_flops(make_config("base"), 128) / 1e12, 1) == 16.0


def test_mae_flops_counts_what_a_training_step_computes():
    """[2.2] mae_flops equals PyTorch's own FLOP count of a base step's forward and backward (its
    matmuls and attention) within 0.2%: the decoder's projection runs on the N visible frames."""
    from torch.utils.flop_counter import FlopCounterMode
    mcfg, B, T = make_config("base"), 2, M.CROP_FRAMES
    model = M.EnCodecMAE(mcfg).to("meta")
    mask = gap_mask(torch.full((B,), T), T, mcfg.M_prop, mcfg.M_gap)  # on the CPU, as in training
    feats = torch.zeros(B, T, 128, device="meta")
    targets = torch.zeros(B, T, mcfg.Q, dtype=torch.long, device="meta")
    with FlopCounterMode(display=False) as counter:
        model(feats, targets, mask).loss.backward()
    counted = counter.get_total_flops()
    assert abs(bench.mae_flops(mcfg, B) / counted - 1) < 0.002, (bench.mae_flops(mcfg, B), counted)


# ---------------------------------------------------------------- DDP and devices
def wait_behind_rank_zero(rank, port, result):
    """One of two gloo ranks whose collectives time out after 2 s (NCCL's 10 minutes, scaled down):
    rank 0 takes 4 s (building the index or the cache), then both meet at train.barrier()."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    dist.init_process_group = functools.partial(dist.init_process_group, timeout=datetime.timedelta(seconds=2))
    try:
        train.setup_distributed(train.TrainConfig(device="cpu"))
        time.sleep(4 if rank == 0 else 0)
        train.barrier()
        result.put((rank, "ok"))
        dist.destroy_process_group()
    except Exception as err:  # reported to the test, not lost in the child
        result.put((rank, f"{type(err).__name__}: {str(err)[:200]}"))


def test_the_other_ranks_outwait_rank_zero_building_past_the_collective_timeout():
    """[3.1] two GPUs: rank 1 waits at the barrier while rank 0 alone builds the file index or cache."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("fork")  # torch is imported already: a fork starts in no time
    result = ctx.Queue()
    ranks = [ctx.Process(target=wait_behind_rank_zero, args=(r, port, result)) for r in (0, 1)]
    for p in ranks:
        p.start()
    outcome = dict(result.get(timeout=60) for _ in ranks)
    for p in ranks:
        p.join(10)
        p.kill()
    assert outcome == {0: "ok", 1: "ok"}, outcome


def test_each_rank_takes_its_own_gpu_whatever_device_is_named(monkeypatch):
    """[3.1] torchrun with --device cuda:0: rank r of a machine trains on cuda:LOCAL_RANK, over NCCL."""
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(device))
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: calls.append(backend))
    monkeypatch.setattr(train, "wait_group", lambda: None, raising=False)
    for name in ("cuda:0", "cuda", "auto"):
        monkeypatch.setenv("WORLD_SIZE", "2"), monkeypatch.setenv("RANK", "3"), monkeypatch.setenv("LOCAL_RANK", "1")
        assert train.setup_distributed(train.TrainConfig(device=name)) == (3, 2, torch.device("cuda", 1))
        assert calls[-2:] == [torch.device("cuda", 1), "nccl"]
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var)
    assert train.setup_distributed(train.TrainConfig(device="cuda:1"))[2] == torch.device("cuda", 1)  # one GPU


def test_each_random_codec_is_a_copy_so_moving_one_leaves_the_others(codec):
    """[2.1] load_codec("random") hands out copies: one moved to a GPU (here 'meta') moves no other."""
    a, b = D.load_codec("random"), D.load_codec("random")
    a.to("meta")
    assert all(p.device.type == "cpu" for p in list(b.parameters()) + list(codec.parameters()))
    assert all(torch.equal(x, y) for x, y in zip(b.state_dict().values(), codec.state_dict().values()))


def test_the_suite_runs_on_the_cpu_even_on_a_gpu_machine():
    """Tests use --device auto: GPUs are hidden from them and from every subprocess (extras/tests/conftest.py)."""
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "" and not torch.cuda.is_available()
    assert train.parse_args(TINY_RUN)[0].device == "auto"  # so that setting is what keeps them on the CPU


# ---------------------------------------------------------------- the clips that reach the encoder
def test_every_clip_keeps_a_visible_frame_and_padding_only_clips_are_refused(tmp_path):
    """[2] clips of 1-4 frames at M_prop = 0.9 keep a frame for the encoder; the shortest file's crop too."""
    lengths = torch.tensor([1, 2, 3, 4])
    mask = gap_mask(lengths, 4, 0.9, 15, torch.Generator().manual_seed(0))
    assert (~mask & (torch.arange(4) < lengths[:, None])).sum(1).tolist() == [1, 1, 1, 1]
    with pytest.raises(ValueError, match="clip 1 is padding only"):
        gap_mask(torch.tensor([3, 0]), 4, 0.5, 15)
    path = write(tmp_path, "one_sample.wav", np.full(1, 0.5))  # files have at least one sample (read_header)
    item, mask = train.MaskedCrops(D.CropDataset([path]), make_config("tiny", M_prop=0.9), 0)[0]
    assert (~item.padding).sum() == 1 and (~mask & ~item.padding).sum() == 1


# ---------------------------------------------------------------- the codec cache on a GPU
class OneByOne(torch.nn.Module):
    """The codec run clip by clip: its output cannot depend on its batch-mates, not even by rounding."""

    def __init__(self, codec):
        super().__init__()
        self.codec, self.source = codec, codec.source

    def forward(self, wav):
        return tuple(torch.cat(x) for x in zip(*(self.codec(w[None]) for w in wav)))


def test_the_cache_batches_equal_pieces_across_files_and_matches_chunk_by_chunk_encoding(codec, tmp_path, monkeypatch):
    """[3.1] the frames and codes of encoding each chunk alone; pieces read on their own, in workers."""
    seconds = [2.5, 0.6, 2.5, 1.3, 0.31]
    paths = [write(tmp_path, f"{i}.wav", demo_signals.demo_clips(1, s, seed=i)[0].numpy(), subtype="FLOAT")
             for i, s in enumerate(seconds)]
    lengths = np.array([round(s * SAMPLE_RATE) for s in seconds])
    plan = cache.piece_batches(lengths, SAMPLE_RATE, 3 * SAMPLE_RATE)  # 1-s chunks, 3 s a batch
    assert all(len({n for _, _, n in b}) == 1 for b in plan)  # a batch holds pieces of one length
    assert sorted(p for b in plan for p in b) == sorted((f, s, min(SAMPLE_RATE, int(n) - s))
                                                        for f, n in enumerate(lengths) for s in range(0, n, SAMPLE_RATE))
    assert any(len({f for f, _, _ in b}) > 1 for b in plan)  # equal pieces of several files share a batch
    cache.build_cache(OneByOne(codec), paths, tmp_path / "cache", batch_seconds=3.0, chunk_seconds=1.0, workers=1)
    entries = cache.read_manifest(tmp_path / "cache")
    for path in paths:
        chunks = [codec(c[None]) for c in D.read_audio(path).split(SAMPLE_RATE)]  # each chunk alone
        feats, codes = (torch.cat(x, 1)[0] for x in zip(*chunks))
        base = os.path.join(tmp_path / "cache", entries[os.path.abspath(path)]["id"])
        assert np.array_equal(np.load(base + ".codes.npy"), codes.short().numpy())  # bit for bit
        assert np.array_equal(np.load(base + ".feats.npy"), feats.half().numpy())
    wav = demo_signals.demo_clips(3, 1.0, seed=0)  # a batch only rounds differently: frames agree to 1e-5
    (feats, codes), (feats_1, codes_1) = codec(wav), OneByOne(codec)(wav)
    assert (feats - feats_1).abs().max() < 1e-5 and (codes == codes_1).float().mean() > 0.99  # near-ties flip
    events, read = [], D.read_audio  # a long file: read in pieces, progress shown before it is stored
    monkeypatch.setattr(D, "read_audio", lambda path, start=0, frames=None, header=None: (
        events.append(("read", frames)), read(path, start, frames, header))[1])
    monkeypatch.setattr(cache, "store_entry", lambda *args: events.append(("stored",)) or {})
    monkeypatch.setattr(extras_cli.Progress, "update", lambda self, *args: events.append(("progress",)))
    cache.build_cache(codec, [write(tmp_path, "long.wav", tone(5.0))], tmp_path / "long", 2.0, 1.0, 0.0)
    assert events.index(("progress",)) < events.index(("stored",)) and ("read", None) not in events
    assert max(n for e, *n in events if e == "read" for n in n) == SAMPLE_RATE
