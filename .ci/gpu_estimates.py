"""The GPU arithmetic of docs/GPU.md, on a CPU (not the paper): FLOPs, bytes, activations, syncs, bf16 codes.

`python .ci/gpu_estimates.py` prints each figure docs/GPU.md quotes. Nothing is computed for real:
the 'meta' device gives shapes without values, so the base model at batch 128 costs seconds. The
host-device syncs of one training step are counted the way extras/tests/test_gpu_path.py refuses them.
"""
import collections
import os
import sys
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

if __package__ in (None, ""):  # run as a script: the core files sit in the folder above
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import data as D
import model as M
import train
from extras.bench import mae_flops
from extras.cache import CachedCrop

B, T, META = 128, M.CROP_FRAMES, torch.device("meta")


class SyncTally(TorchDispatchMode):
    """Counts, by line of model.py / train.py, what would make the host wait for a GPU ('meta' stands in)."""

    def __init__(self):
        super().__init__()
        self.seen = collections.Counter()

    def note(self, what):
        line = next((f"{os.path.basename(f.filename)}:{f.lineno}" for f in reversed(traceback.extract_stack())
                     if f.filename.endswith(("model.py", "train.py"))), "?")
        self.seen[f"{what} at {line}"] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs, aten = kwargs or {}, torch.ops.aten
        on_meta = any(isinstance(a, torch.Tensor) and a.device.type == "meta" for a in args)
        if func is aten._local_scalar_dense.default and on_meta:
            self.note("a value read")
            return 1 if not args[0].dtype.is_floating_point else 1.0
        if func is aten.index.Tensor and on_meta and any(i is not None and i.dtype == torch.bool for i in args[1]):
            self.note("a boolean index")
            return torch.zeros(0, *args[0].shape[len(args[1]):], dtype=args[0].dtype, device=META)
        if func is aten._to_copy.default:
            to = torch.device(kwargs.get("device") or args[0].device).type
            if args[0].device.type == "meta" and to == "cpu":
                self.note("a copy to the host")
                return torch.zeros(args[0].shape, dtype=kwargs.get("dtype") or args[0].dtype)
            if args[0].device.type == "cpu" and to == "meta" and not kwargs.get("non_blocking"):
                self.note("a blocking copy")
        return func(*args, **kwargs)


def sync_tally():
    """Syncs in one train_step of two micro-batches (one padded), stage 2 (its target check too)."""
    mcfg = M.make_config("tiny", n_kmeans_streams=1)
    model, batches = M.EnCodecMAE(mcfg).to(META), []
    for seed, lengths in enumerate([[300, 300], [300, 120]]):
        g, padding = torch.Generator().manual_seed(seed), torch.arange(T)[None] >= torch.tensor(lengths)[:, None]
        item = CachedCrop(torch.randn(2, T, 128, generator=g), torch.randint(0, 1024, (2, T, 8), generator=g),
                          padding, torch.randint(0, 1024, (2, T), generator=g).masked_fill(padding, -1))
        batches.append((item, M.gap_mask(torch.tensor(lengths), T, mcfg.M_prop, mcfg.M_gap, g)))
    autocast, scaler = train.autocast_for(torch.device("cpu"))
    with SyncTally() as tally:
        train.train_step(model, batches, None, mcfg, torch.optim.AdamW(model.parameters()), scaler, autocast, META, 1.0)
    print(f"host-device syncs in one training step: {sum(tally.seen.values())}")
    for what, n in tally.seen.most_common():
        print(f"  {n} x {what}")


def saved_activations(cfg):
    """Bytes saved for backward by the base model at batch 128, bf16 but for the loss (each storage once)."""
    positions = M.sinusoidal_positions
    M.sinusoidal_positions = lambda *a, **k: positions(*a, **k).bfloat16()  # as autocast's bf16 matmuls see them
    model, seen, kept = M.EnCodecMAE(cfg).to(META, torch.bfloat16), {}, []

    def pack(t):
        kept.append(t.untyped_storage())
        seen[id(kept[-1])] = kept[-1].nbytes(), t.dim() == 3 and t.shape[0] == B * cfg.n_heads and t.is_floating_point()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(torch.zeros(B, T, 128, device=META, dtype=torch.bfloat16), torch.zeros(B, T, 8, dtype=torch.long, device=META),
              M.gap_mask(torch.full((B,), T), T, cfg.M_prop, cfg.M_gap))
    M.sinusoidal_positions = positions
    total, math_kernel = sum(n for n, _ in seen.values()), sum(n for n, attn in seen.values() if attn)
    return total / 2 ** 30, math_kernel / 2 ** 30


def autocast_codes(codec):
    """Share of codes per codebook that match fp32 when the codec's encoder and RVQ run under bf16 autocast,
    as Codec.forward let them before model.codec_precision (4 demo clips)."""
    from extras.demo_signals import demo_clips
    wav = demo_clips(4, M.CROP_SECONDS, seed=3)
    codes = codec(wav)[1]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = codec.quantizer.encode(codec.encoder(wav[:, None]), M.FRAME_RATE, 6.0).permute(1, 2, 0)
    return (bf16 == codes).float().mean((0, 1))  # (8,)


def main():
    torch.set_num_threads(1)
    base = M.make_config("base")
    print(f"MAE step, base at batch {B} (mae_flops): {mae_flops(base, B) / 1e12:.2f} TFLOP")
    codec = D.load_codec("random")  # the pretrained codec's architecture, seeded weights: the same FLOPs
    with FlopCounterMode(display=False) as flops:
        codec(torch.zeros(1, M.CROP_SAMPLES))
    print(f"codec: {flops.get_total_flops() / 1e9:.2f} GFLOP per 4-s clip, {flops.get_total_flops() * B / 1e12:.2f} "
          f"TFLOP per step of {B} clips")
    match = autocast_codes(codec)
    print(f"codes matching fp32 under CPU bf16 autocast, per codebook: {match.min():.0%}-{match.max():.0%}")
    codec, written = codec.to(META), []
    for layer in (m for m in codec.encoder.modules() if not list(m.children())):
        layer.register_forward_hook(lambda m, i, out: written.append(sum(
            t.numel() * t.element_size() for t in (out if isinstance(out, tuple) else (out,)) if torch.is_tensor(t))))
    codec.raw_frames(torch.zeros(B, M.CROP_SAMPLES, device=META))
    print(f"codec: its layers write {sum(written) / 1e9:.1f} GB per step in fp32, so about {2 * sum(written) / 1e9:.0f} GB "
          "move if each is written once and read once")
    total, math_kernel = saved_activations(base)
    print(f"saved for backward: {total:.1f} GiB, of which {math_kernel:.1f} GiB are the fp32 copies and probabilities "
          f"of the math attention kernel that runs here (flash attention keeps neither): {total - math_kernel:.1f} GiB")
    logits, params = B * T * base.n_streams * base.K, sum(p.numel() for p in M.EnCodecMAE(base).parameters())
    print(f"logits: {2 * logits / 2 ** 30:.2f} GiB in bf16, {4 * logits / 2 ** 30:.2f} GiB per fp32 copy; "
          f"{params / 1e6:.0f}M parameters with grads and AdamW moments in fp32: {16 * params / 2 ** 30:.1f} GiB")
    sync_tally()


if __name__ == "__main__":
    main()
