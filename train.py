"""Pretraining of EnCodecMAE, stage 1 and self-training stage 2: sections 2.3 and 3.1 of the paper.

CPU demo:  python train.py --config tiny --data demo --encodec random --cache runs/demo-cache --steps 300
One GPU:   python train.py --config base --data /audio/audioset /audio/fma --out runs/base
Two GPUs:  torchrun --nproc_per_node=2 train.py --config base --data ... --out runs/base
Stage 2:   python train.py ... --init_from runs/base/ckpt-00500000.pt --kmeans_store runs/km --steps 150000
Benchmark: python train.py --bench --config small --batch_size 8 --device cpu
Curves:    python train.py plot-curves OUT/metrics.jsonl [STAGE2/metrics.jsonl] --out curves.png
Reads audio folders, .txt lists or a codec cache (data.py); writes OUT/ckpt-*.pt, OUT/metrics.jsonl.
Every ModelConfig and TrainConfig field is a flag: --M_prop=0.3, --delta 1, --gamma uniform, ...
"""
import contextlib
import dataclasses
import glob
import json
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

import data
import demo
import model as M


@dataclass
class TrainConfig:
    data: tuple = ("demo",)          # audio folders, .txt file lists, or "demo" (synthetic) [3.1]
    data_weights: tuple = ()         # optional mixing weight per --data entry [3.1]
    cache: str = ""                  # codec cache folder: built (resumably) if incomplete, then read
    encodec: str = "pretrained"      # "pretrained", a local .th checkpoint, or "random" [2.1]
    out: str = "runs/encodecmae"     # checkpoints and metrics.jsonl
    steps: int = 500_000             # optimizer steps: 500k stage 1, 150k stage 2 [2.3, 3.1]
    batch_size: int = 128            # global batch, all GPUs and accumulation together [3.1]
    grad_accum: int = 1              # micro-batches per step on each GPU
    lr: float = 1e-4                 # constant learning rate [3.1]
    weight_decay: float = 0.05       # AdamW [3.1]
    betas: tuple = (0.9, 0.95)       # AdamW beta_1, beta_2 [3.1]
    clip_grad: float = 0.0           # gradient norm clipping; 0 = off (the paper does not clip)
    gamma: str = "auto"              # gamma_q: released | estimate | uniform; auto = released for
                                     # the pretrained codec, estimate otherwise [3.1]
    gamma_clips: int = 150           # clips for estimating gamma_q [3.1]
    init_from: str = ""              # stage 2: the stage-1 checkpoint to start from [2.3]
    kmeans_store: str = ""           # stage 2: k-means targets from kmeans.py, stream Q+1 [2.3]
    val_files: int = 16              # held-out files for the validation loss (fixed seed)
    val_every: int = 1000
    log_every: int = 50
    ckpt_every: int = 5000
    keep_last: int = 3               # checkpoints kept on disk
    workers: int = 4                 # DataLoader processes per GPU
    seed: int = 0
    device: str = "auto"             # auto = cuda if available, else cpu
    compile: bool = False            # torch.compile the model (opt-in)
    resume: bool = False             # continue from the newest checkpoint in --out
    bench: bool = False              # print the speed benchmark and exit


# ---------------------------------------------------------------- command line
def parse_args(argv):
    """--field=value / --field value for any TrainConfig or ModelConfig field, plus --config SIZE."""
    groups = {f.name: (TrainConfig, f) for f in dataclasses.fields(TrainConfig)}
    groups.update({f.name: (M.ModelConfig, f) for f in dataclasses.fields(M.ModelConfig)})
    if "-h" in argv or "--help" in argv:
        options = "\n".join(f"  --{name}={f.default!r}" for name, (_, f) in groups.items())
        print(f"{__doc__}\n--config {'|'.join(M.SIZES)} (default base), then any of these "
              f"(defaults shown; meanings in train.py's TrainConfig and model.py's ModelConfig):\n{options}")
        raise SystemExit(0)
    size, values = "base", {TrainConfig: {}, M.ModelConfig: {}}
    i = 0
    while i < len(argv):
        assert argv[i].startswith("--"), f"unexpected argument {argv[i]!r}"
        name, _, inline = argv[i][2:].partition("=")
        name = name.replace("-", "_")
        args = [inline] if inline else []
        while not inline and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            args.append(argv[i + 1])
            i += 1
        i += 1
        if name == "config":
            size = args[0]
            continue
        if name not in groups:
            raise SystemExit(f"unknown option --{name}; options are --config and the fields of "
                             "TrainConfig and ModelConfig (see train.py and model.py)")
        cls, f = groups[name]
        values[cls][name] = convert(f, args)
    return TrainConfig(**values[TrainConfig]), M.make_config(size, **values[M.ModelConfig])


def convert(f, args):
    """A flag's words -> the field's type: bools are bare flags, tuples take several values."""
    if f.type is bool:
        if args:
            raise SystemExit(f"--{f.name} is a switch and takes no value")
        return True
    if not args:
        raise SystemExit(f"--{f.name} needs a value")
    if f.type is tuple:
        words = [w for a in args for w in a.split(",") if w]
        item = type(f.default[0]) if f.default else float
        return tuple(item(w) for w in words)
    if len(args) != 1:
        raise SystemExit(f"--{f.name} takes one value, got {args}")
    return f.type(args[0])


def derived(cfg, world):
    """Numbers that follow from the config, computed once and printed."""
    per_step = cfg.batch_size // (world * cfg.grad_accum)
    if per_step * world * cfg.grad_accum != cfg.batch_size:
        raise SystemExit(f"--batch_size {cfg.batch_size} is not divisible by {world} GPUs x "
                         f"{cfg.grad_accum} accumulation steps")
    return dict(micro_batch=per_step, frames_per_crop=M.CROP_FRAMES,
                audio_seconds_per_step=cfg.batch_size * M.CROP_SECONDS)


# ---------------------------------------------------------------- ranks and device
def setup_distributed(cfg):
    """torchrun sets WORLD_SIZE: NCCL on GPUs, gloo on CPU. Returns (rank, world, device)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank, local = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    name = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(f"cuda:{local}" if name == "cuda" else name)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def autocast_for(device):
    """bf16 autocast on GPUs that have it, fp16 + GradScaler on older GPUs, fp32 on CPU [3.1]."""
    if device.type != "cuda":
        return contextlib.nullcontext(), torch.amp.GradScaler("cpu", enabled=False)
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    return torch.autocast("cuda", dtype=dtype), scaler


# ---------------------------------------------------------------- data
class MaskedCrops(Dataset):
    """Crops plus their gap masks [2]. A clip's mask is drawn from a generator seeded by
    (seed, epoch, index), so it does not depend on the GPU count, the accumulation or a resume."""

    def __init__(self, crops, cfg, seed):
        self.crops, self.cfg, self.seed, self.epoch = crops, cfg, seed, 0

    def set_epoch(self, epoch):
        self.epoch = epoch
        self.crops.set_epoch(epoch)

    def __len__(self):
        return len(self.crops)

    def __getitem__(self, index):
        item = self.crops[index]
        g = torch.Generator().manual_seed(hash((self.seed, self.epoch, index)) % 2 ** 62)  # ints: a fixed hash
        length = (~item.padding).sum()[None]  # (1,)
        mask = M.gap_mask(length, len(item.padding), self.cfg.M_prop, self.cfg.M_gap, g)[0]  # (T,)
        return item, mask


def build_datasets(cfg, mcfg, codec, rank):
    """Audio files -> held-out split -> raw crops or cached crops, with masks [3.1]."""
    if rank == 0 and "demo" in cfg.data:
        data.list_audio(["demo"])  # rank 0 writes ./demo_audio once; kmeans.py finds the same files
    barrier()
    sources = [[s] for s in cfg.data] if cfg.data_weights else [list(cfg.data)]
    splits = [data.split_holdout(data.list_audio(s), cfg.val_files, cfg.seed) for s in sources]
    if cfg.cache and rank == 0:
        data.build_cache(codec, [p for train, valid in splits for p in train + valid], cfg.cache)
    barrier()

    def crops(paths, seed):
        store = cfg.kmeans_store or None
        if cfg.cache:
            return data.CachedCropDataset(cfg.cache, seed=seed, extra_store=store, paths=paths)
        return data.CropDataset(paths, seed=seed, extra_store=store)
    train = [crops(train, cfg.seed) for train, _ in splits]
    train = data.mix_datasets(train, cfg.data_weights or None, cfg.seed) if cfg.data_weights else train[0]
    valid = crops([p for _, valid in splits for p in valid], cfg.seed + 1)
    train_paths = [p for train_paths, _ in splits for p in train_paths]
    return MaskedCrops(train, mcfg, cfg.seed), MaskedCrops(valid, mcfg, cfg.seed + 1), train_paths


def epoch_plan(n_items, cfg, micro_batch, rank, world, epoch, first_step):
    """This rank's micro-batches for the steps of one epoch from first_step on: [[indices, ...], ...].

    Step s takes the window [s * B, (s + 1) * B) of the epoch's permutation (B the global batch)
    and rank r every world-th item of it, so a step's items never depend on the number of GPUs.
    """
    order = torch.randperm(n_items, generator=torch.Generator().manual_seed(cfg.seed + epoch))
    plan = []
    for s in range(first_step, n_items // cfg.batch_size):
        mine = order[s * cfg.batch_size: (s + 1) * cfg.batch_size][rank::world].tolist()
        plan.append([mine[m: m + micro_batch] for m in range(0, len(mine), micro_batch)])
    return plan


def step_batches(dataset, cfg, micro_batch, rank, world, start_step):
    """Yield this rank's loaded micro-batches for every optimizer step from start_step on.

    The data position is just the step: a resumed run rebuilds the same plan and skips ahead.
    """
    steps_per_epoch = len(dataset) // cfg.batch_size
    if steps_per_epoch == 0:
        raise SystemExit(f"{len(dataset)} training crops are fewer than one batch of {cfg.batch_size}")
    step = start_step
    while True:
        epoch, first = divmod(step, steps_per_epoch)
        plan = epoch_plan(len(dataset), cfg, micro_batch, rank, world, epoch, first)
        dataset.set_epoch(epoch)
        loader = iter(DataLoader(dataset, batch_sampler=[mb for s in plan for mb in s],
                                 num_workers=cfg.workers, pin_memory=torch.cuda.is_available()))
        for per_step in plan:
            yield [next(loader) for _ in per_step]
            step += 1


def barrier():
    if dist.is_initialized():
        dist.barrier()


def inputs_and_targets(batch, codec, mcfg, device):
    """A micro-batch -> feats, targets, mask, padding on the device; raw audio goes through the codec.

    Targets are the first Q codec codebooks, then the k-means stream in stage 2 [2.3].
    """
    item, mask = batch
    if isinstance(item, data.Crop):
        feats, codes = codec(item.wav.to(device, non_blocking=True))  # (B, T, 128), (B, T, 8)
    else:
        feats, codes = item.feats.to(device, non_blocking=True), item.codes.to(device, non_blocking=True)
    padding = item.padding.to(device)
    targets = codes[..., : mcfg.Q]  # (B, T, Q)
    if mcfg.n_kmeans_streams:
        extra = item.extra.to(device)
        assert (extra[~padding] >= 0).all(), "frames without k-means targets: check --kmeans_store"
        targets = torch.cat([targets, extra.clamp(min=0)[..., None]], dim=-1)  # (B, T, Q + 1)
    return feats, targets, mask.to(device), padding


# ---------------------------------------------------------------- model: fresh, stage 2, or resumed
def choose_gamma(cfg, mcfg, codec, paths, device):
    """gamma_q [3.1]: the released values, uniform weights, or estimated on gamma_clips random crops."""
    mode = cfg.gamma if cfg.gamma != "auto" else ("estimate" if codec.source == "random" else "released")
    if mode == "released":
        return mcfg.gamma_q  # make_config already holds the released values (first Q, renormalized)
    if mode == "uniform":
        return (1.0 / mcfg.Q,) * mcfg.Q
    if mode != "estimate":
        raise SystemExit(f"--gamma {cfg.gamma!r}: choose auto, released, estimate or uniform")
    crops = data.CropDataset(paths, seed=cfg.seed)
    pick = torch.randperm(len(crops), generator=torch.Generator().manual_seed(cfg.seed))[: cfg.gamma_clips]
    wav = torch.stack([crops[int(i)].wav for i in pick]).to(device)  # (n, CROP_SAMPLES)
    gamma = M.estimate_gamma(codec, wav, mcfg.Q)
    return tuple(round(float(g), 6) for g in gamma / gamma.sum())


def newest_checkpoint(out):
    paths = sorted(glob.glob(os.path.join(out, "ckpt-*.pt")))
    return paths[-1] if paths else None


# Fields that may differ between a run and its resumption.
RESUMABLE = {"steps", "log_every", "val_every", "ckpt_every", "keep_last", "workers", "device",
             "compile", "resume", "grad_accum"}


def check_resume(ckpt, cfg, mcfg):
    """A resumed run must be the run that was stopped: same model and same recipe."""
    same = lambda a, b: json.dumps(a) == json.dumps(b)  # tuples and lists alike
    old = ckpt["train_config"]
    changed = [k for k, v in asdict(cfg).items() if k not in RESUMABLE and not same(old[k], v)]
    model_changed = [k for k, v in asdict(mcfg).items() if k != "gamma_q" and not same(ckpt["config"][k], v)]
    if changed or model_changed:
        raise SystemExit(f"--resume: the checkpoint was written with other settings {changed + model_changed}; "
                         "rerun the original command with --resume (or use another --out)")


def save_checkpoint(cfg, step, model, opt, scaler, mcfg, codec):
    """Atomically (temporary file, then rename) write everything a resume needs; keep the last K."""
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
             "step": step, "config": asdict(mcfg), "train_config": asdict(cfg), "encodec": codec.source,
             "gamma_q": list(mcfg.gamma_q), "rng": torch.get_rng_state()}
    path = os.path.join(cfg.out, f"ckpt-{step:08d}.pt")
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)  # a crash mid-write never leaves a half checkpoint under this name
    for old in sorted(glob.glob(os.path.join(cfg.out, "ckpt-*.pt")))[: -cfg.keep_last]:
        os.remove(old)
    return path


# ---------------------------------------------------------------- one optimizer step
def train_step(ddp_model, batches, codec, mcfg, cfg, opt, scaler, autocast, device):
    """Accumulate over this rank's micro-batches (DDP syncs only on the last), then step [3.1].

    Returns the step's statistics, averaged over micro-batches and GPUs:
    [loss, masked loss (S), unmasked loss (S), masked accuracy (S)].
    """
    stats = 0
    for m, batch in enumerate(batches):
        feats, targets, mask, padding = inputs_and_targets(batch, codec, mcfg, device)
        sync = m == len(batches) - 1 or not isinstance(ddp_model, torch.nn.parallel.DistributedDataParallel)
        with contextlib.nullcontext() if sync else ddp_model.no_sync():
            with autocast:
                out = ddp_model(feats, targets, mask, padding)
            scaler.scale(out.loss / len(batches)).backward()
        stats = stats + torch.cat([out.loss.detach()[None], out.masked_loss, out.unmasked_loss,
                                   out.masked_acc]).float() / len(batches)
    if dist.is_initialized():
        dist.all_reduce(stats)
        stats /= dist.get_world_size()
    if not torch.isfinite(stats[0]):  # stop before the step: the model and last checkpoint stay good
        return stats
    if cfg.clip_grad:  # Deviation only when switched on: the paper does not clip
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(ddp_model.parameters(), cfg.clip_grad)
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)
    return stats


@torch.no_grad()
def validate(model, dataset, codec, mcfg, device, micro_batch, autocast):
    """Loss and masked accuracy on the held-out files: fixed crops, fixed masks."""
    dataset.set_epoch(0)
    totals = []
    for batch in DataLoader(dataset, batch_size=micro_batch, num_workers=0):
        with autocast:
            out = model(*inputs_and_targets(batch, codec, mcfg, device))
        totals.append(torch.stack([out.loss.float(), out.masked_acc.float().mean()]))
    return torch.stack(totals).mean(0).tolist()


def log_line(step, cfg, s, S, rate, val):
    """What a student watches: loss, masked accuracy per stream, speed and the ETA."""
    acc = " ".join(f"{a:.2f}" for a in s[1 + 2 * S:].tolist())
    eta = (cfg.steps - step) / max(rate, 1e-9)
    audio_h = rate * cfg.batch_size * M.CROP_SECONDS / 3600
    text = (f"step {step}/{cfg.steps} | loss {s[0]:.4f} | masked acc/stream {acc} | "
            f"{rate:.2f} steps/s | {audio_h:.4f} h audio/s | ETA {eta / 3600:.2f} h")
    if val is not None:
        text += f" | val loss {val[0]:.4f} acc {val[1]:.3f}"
    return text, audio_h


# ---------------------------------------------------------------- the run
def build_model(cfg, mcfg, codec, train_paths, device, rank):
    """Fresh (gamma_q chosen), stage 2 from a stage-1 checkpoint, or resumed -> (model, mcfg, ckpt)."""
    ckpt = None
    if cfg.resume:
        path = newest_checkpoint(cfg.out)
        if path:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
            check_resume(ckpt, cfg, mcfg)
            mcfg = M.config_from_dict(ckpt["config"])
            print0(rank, f"resuming from {path} at step {ckpt['step']}")
        else:
            print0(rank, f"--resume: no checkpoint in {cfg.out} yet, starting from step 0")
    if ckpt is None and cfg.init_from:  # stage 2: stage-1 weights plus a k-means stream [2.3]
        if not cfg.kmeans_store:
            raise SystemExit("--init_from (self-training) needs --kmeans_store from kmeans.py")
        stage1, mcfg, _ = M.load_checkpoint_model(cfg.init_from)
        model = M.add_kmeans_stream(stage1)
        mcfg = model.cfg
        print0(rank, f"stage 2 from {cfg.init_from}: model config taken from it, S = {mcfg.n_streams}")
    else:
        if ckpt is None:
            mcfg = dataclasses.replace(mcfg, gamma_q=choose_gamma(cfg, mcfg, codec, train_paths, device))
        model = M.EnCodecMAE(mcfg)
        if ckpt is not None:
            model.load_state_dict(ckpt["model"])  # strict
    return model.to(device), mcfg, ckpt


def print0(rank, *args):
    if rank == 0:
        print(*args, flush=True)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["plot-curves"]:
        if len(argv) < 4 or argv[-2] != "--out":
            raise data.UsageError("usage: python train.py plot-curves METRICS.jsonl [METRICS.jsonl ...] --out FIG.png")
        return plot_curves(argv[1:-2], argv[-1])
    cfg, mcfg = parse_args(argv)
    rank, world, device = setup_distributed(cfg)
    if cfg.bench:
        return benchmark(cfg, mcfg, device)
    extra = derived(cfg, world)
    os.makedirs(cfg.out, exist_ok=True)
    torch.manual_seed(cfg.seed)
    codec = data.load_codec(cfg.encodec).to(device)  # the random codec's seed stays 0: evaluate.py rebuilds it

    train_set, val_set, train_paths = build_datasets(cfg, mcfg, codec, rank)
    skipped = train_set.crops.n_skipped
    model, mcfg, ckpt = build_model(cfg, mcfg, codec, train_paths, device, rank)
    train_set.cfg = val_set.cfg = mcfg
    print0(rank, f"model {json.dumps(asdict(mcfg))}\ntrain {json.dumps(asdict(cfg))}\n"
                 f"derived {json.dumps(extra)} | world {world} | device {device} | "
                 f"{len(train_set)} training crops, {skipped} unreadable files skipped | gamma_q {mcfg.gamma_q}")

    ddp_model = model
    if cfg.compile:
        ddp_model = torch.compile(ddp_model)
    if world > 1:
        ddp_model = torch.nn.parallel.DistributedDataParallel(ddp_model, device_ids=[device] if device.type == "cuda" else None)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    autocast, scaler = autocast_for(device)
    step = 0
    if ckpt is not None:
        opt.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        torch.set_rng_state(ckpt["rng"])
        step = ckpt["step"]
    run_loop(cfg, mcfg, ddp_model, model, opt, scaler, autocast, codec, train_set, val_set,
             step, extra["micro_batch"], rank, world, device)
    if dist.is_initialized():
        dist.destroy_process_group()


def run_loop(cfg, mcfg, ddp_model, model, opt, scaler, autocast, codec, train_set, val_set,
             step, micro_batch, rank, world, device):
    """The loop of section 3.1: constant lr, accumulate, step, log, validate, checkpoint."""
    batches = step_batches(train_set, cfg, micro_batch, rank, world, step)
    metrics = open(os.path.join(cfg.out, "metrics.jsonl"), "a") if rank == 0 else None
    window, t0, S = [], time.time(), mcfg.n_streams
    while step < cfg.steps:
        stats = train_step(ddp_model, next(batches), codec, mcfg, cfg, opt, scaler, autocast, device)
        if not torch.isfinite(stats[0]):
            last = newest_checkpoint(cfg.out)
            raise SystemExit(f"loss is {stats[0].item()} at step {step + 1}: stopping. The last good "
                             f"checkpoint ({last or 'none yet'}) is intact; try a lower --lr or --clip_grad.")
        step += 1
        window.append(stats.cpu())
        val = None
        if rank == 0 and (step % cfg.val_every == 0 or step == cfg.steps) and len(val_set):
            val = validate(model, val_set, codec, mcfg, device, micro_batch, autocast)
        if rank == 0 and (step % cfg.log_every == 0 or step == cfg.steps or val is not None):
            s, rate = torch.stack(window).mean(0), len(window) / (time.time() - t0)
            text, audio_h = log_line(step, cfg, s, S, rate, val)
            print(text, flush=True)
            record = {"step": step, "loss": s[0].item(), "masked_loss": s[1: 1 + S].tolist(),
                      "unmasked_loss": s[1 + S: 1 + 2 * S].tolist(), "masked_acc": s[1 + 2 * S:].tolist(),
                      "steps_per_s": rate, "audio_hours_per_s": audio_h, "time": time.time()}
            if val is not None:
                record.update(val_loss=val[0], val_masked_acc=val[1])
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
            window, t0 = [], time.time()
        if rank == 0 and (step % cfg.ckpt_every == 0 or step == cfg.steps):
            print(f"saved {save_checkpoint(cfg, step, model, opt, scaler, mcfg, codec)}", flush=True)
    barrier()


# ---------------------------------------------------------------- training curves
def plot_curves(metrics_files, out):
    """Training curves from train.py's metrics.jsonl files (stage 1, then stage 2, one after the other):
    loss and masked accuracy per stream against steps. matplotlib is needed for this only."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise data.UsageError("plot-curves needs matplotlib (pip install matplotlib); nothing else does") from err
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    offset = 0
    for n, path in enumerate(metrics_files):
        with open(path) as f:
            records = [json.loads(line) for line in f]
        steps = [offset + r["step"] for r in records]
        ax_loss.plot(steps, [r["loss"] for r in records], color=f"C{n}", label=f"stage {n + 1}: training loss L")
        val = [(offset + r["step"], r["val_loss"]) for r in records if "val_loss" in r]
        if val:
            ax_loss.plot(*zip(*val), "o--", color=f"C{n}", label=f"stage {n + 1}: held-out loss")
        for q in range(len(records[0]["masked_acc"])):
            ax_acc.plot(steps, [r["masked_acc"][q] for r in records], color=plt.cm.viridis(q / 8),
                        ls="-" if n == 0 else "--", label=f"stream {q + 1}" if n == 0 or q == 8 else None)
        offset = steps[-1]
        ax_loss.axvline(offset, color="grey", lw=0.5)
    ax_loss.set(xlabel="step", ylabel="weighted loss", title="loss (stage 1, then stage 2)")
    ax_acc.set(xlabel="step", ylabel="masked top-1 accuracy", title="masked accuracy per stream (9 = k-means)")
    ax_loss.legend(fontsize=7)
    ax_acc.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


# ---------------------------------------------------------------- benchmark
def timed(fn, device, reps=3):
    """Median wall time of fn() over reps runs, after one warm-up run."""
    times = []
    for _ in range(reps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return sorted(times[1:])[len(times[1:]) // 2]


def matmul_peak(device, dtype):
    """The device's measured matmul throughput (FLOP/s): the yardstick for utilization."""
    n = 4096 if device.type == "cuda" else 2048
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in "ab")
    return 2 * n ** 3 / timed(lambda: a @ b, device, reps=5)


def mae_flops(mcfg, B, T=M.CROP_FRAMES):
    """Model FLOPs of one training step (forward + backward = 3 x forward) [2.2]."""
    D, F, S, K = mcfg.d_model, mcfg.ff_dim, mcfg.n_streams, mcfg.K
    N = T - round(mcfg.M_prop * T) if mcfg.mask_mode == "drop" else T
    layer = lambda n: 2 * n * (4 * D * D + 2 * D * F) + 4 * n * n * D  # linears + attention
    forward = (2 * T * mcfg.d_codec * D + mcfg.n_enc_layers * layer(N) + 2 * T * D * D
               + mcfg.n_dec_layers * layer(T) + 2 * T * D * S * K)
    return 3 * B * forward


def benchmark(cfg, mcfg, device):
    """Where a training step's time goes: codec, MAE forward/backward, optimizer, cached data."""
    import resource
    import tempfile
    B = cfg.batch_size
    autocast, _ = autocast_for(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    peak = matmul_peak(device, dtype)
    codec = data.load_codec(cfg.encodec).to(device)
    wav = demo.demo_clips(B, M.CROP_SECONDS, seed=cfg.seed).to(device)  # (B, 96000)
    t_codec = timed(lambda: codec(wav), device)
    feats, codes = codec(wav)
    mask = M.gap_mask(torch.full((B,), M.CROP_FRAMES, device=device), M.CROP_FRAMES, mcfg.M_prop, mcfg.M_gap)
    model = M.EnCodecMAE(mcfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)

    def forward_backward():
        with autocast:
            loss = model(feats, codes[..., : mcfg.Q], mask).loss
        loss.backward()
    t_mae = timed(forward_backward, device)
    t_opt = timed(opt.step, device)
    with tempfile.TemporaryDirectory() as tmp:  # a small cache, read as training reads it
        paths = demo.write_demo_dataset(os.path.join(tmp, "audio"), n_files=4, seed=cfg.seed, seconds=(8.0, 8.0))
        data.build_cache(codec, paths, os.path.join(tmp, "cache"))
        crops = MaskedCrops(data.CachedCropDataset(os.path.join(tmp, "cache"), seed=cfg.seed), mcfg, cfg.seed)
        loader = DataLoader(crops, batch_size=B, sampler=[i % len(crops) for i in range(B)], num_workers=0)
        t_data = timed(lambda: next(iter(loader)), torch.device("cpu"))
    step_cache, step_raw = t_mae + t_opt + t_data, t_codec + t_mae + t_opt
    flops = mae_flops(mcfg, B)
    memory = (torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda"
              else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20)
    rows = [("matmul peak (measured)", f"{peak / 1e9:.0f} GFLOP/s ({dtype})"),
            ("codec, on the fly", f"{t_codec:.3f} s/step ({t_codec / step_raw:.0%} of a raw-audio step)"),
            ("MAE forward+backward", f"{t_mae:.3f} s ({flops / t_mae / 1e9:.0f} GFLOP/s, "
                                     f"{flops / t_mae / peak:.0%} of the matmul peak)"),
            ("optimizer step", f"{t_opt:.3f} s"),
            ("data, from the cache", f"{t_data:.4f} s/step ({t_data / step_cache:.1%} of a cached step)"),
            ("step, raw audio", f"{step_raw:.3f} s = {1 / step_raw:.2f} steps/s, {B / step_raw:.1f} clips/s"),
            ("step, cache", f"{step_cache:.3f} s = {1 / step_cache:.2f} steps/s, {B / step_cache:.1f} clips/s"),
            ("peak memory", f"{memory:.2f} GiB ({'GPU allocated' if device.type == 'cuda' else 'process RSS'})")]
    print(f"benchmark: {mcfg.n_enc_layers}-layer D={mcfg.d_model} model, batch {B}, {device}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    for name, value in rows:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    data.run_cli(main)
