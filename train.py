"""Pretraining of EnCodecMAE, stage 1 and self-training stage 2: sections 2.3 and 3.1 of the paper.

CPU demo:  python train.py --config tiny --data demo --encodec random --steps 300 --out runs/demo
One GPU:   python train.py --config base --data /audio/audioset /audio/fma --out runs/base
Two GPUs:  torchrun --nproc_per_node=2 train.py --config base --data ... --out runs/base
Stage 2:   python train.py ... --init_from runs/base/ckpt-00500000.pt --kmeans_store runs/km --steps 150000
Reads audio folders or .txt lists (data.py), or a codec cache (--cache, extras/cache.py); writes
OUT/ckpt-*.pt and OUT/metrics.jsonl. Every ModelConfig and TrainConfig field is a flag:
--M_prop 0.3, --delta 1, --gamma uniform, ... (`python train.py --help` lists them).
"""
import contextlib
import datetime
import fcntl
import functools
import glob
import json
import os
import signal
import socket
import sys
import time
import warnings
from dataclasses import asdict, dataclass, fields, replace

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

import data as D
import model as M
from data import UsageError, at_least

CHECKPOINTS = "ckpt-" + "[0-9]" * 8 + ".pt"  # exactly the names save_checkpoint gives: no other file is ours
STOP = []  # the signals received: the loop stops after the step in progress, keeping it in a checkpoint


@dataclass
class TrainConfig:
    data: tuple = ("demo",)          # audio folders, .txt file lists, or "demo" (synthetic) [3.1]
    data_weights: tuple = ()         # optional mixing weight per --data entry (extras/mixing.py)
    cache: str = ""                  # codec cache folder (extras/cache.py): completed if needed, then read
    index: str = ""                  # file index (extras/file_index.py), built if missing; "" = read every header
    encodec: str = "pretrained"      # "pretrained", a local .th checkpoint, or "random" [2.1]
    out: str = "runs/encodecmae"     # checkpoints and metrics.jsonl
    steps: int = 500_000             # optimizer steps: 500k stage 1, 150k stage 2 [2.3, 3.1]
    batch_size: int = 128            # global batch, all GPUs and accumulation together [3.1]
    grad_accum: int = 1              # micro-batches per step on each GPU
    lr: float = 1e-4                 # constant learning rate [3.1]
    weight_decay: float = 0.05       # AdamW [3.1]
    betas: tuple = (0.9, 0.95)       # AdamW beta_1, beta_2 [3.1]
    clip_grad: float = 0.0           # gradient norm clipping; 0 = off (the paper does not clip)
    gamma: str = "auto"              # gamma_q: released|estimate|uniform; auto: released for pretrained, else estimate
    gamma_clips: int = 150           # clips for estimating gamma_q [3.1]
    init_from: str = ""              # stage 2: the stage-1 checkpoint to start from [2.3]
    kmeans_store: str = ""           # stage 2: k-means targets from kmeans.py, stream Q+1 [2.3]
    val_files: int = 0               # held-out files for a validation loss (not in the paper; extras/validation.py)
    val_every: int = 1000
    log_every: int = 50
    ckpt_every: int = 5000
    keep_last: int = 3               # checkpoints kept on disk
    workers: int = 4                 # DataLoader processes per GPU
    seed: int = 0
    device: str = "auto"             # auto = cuda if available, else cpu
    compile: bool = False            # torch.compile the model (opt-in)
    resume: bool = False             # continue from the newest checkpoint in --out
    bench: bool = False              # print the speed benchmark and exit (extras/bench.py)
    tensorboard: bool = False        # also log the metrics as TensorBoard scalars (extras/tensorboard.py)


# ---------------------------------------------------------------- command line
TYPES = {"workers": at_least(0), "seed": at_least(0), "n_dec_layers": at_least(0), "n_kmeans_streams": at_least(0),
         "lr": at_least(1e-12, float), "weight_decay": at_least(0.0, float), "clip_grad": at_least(0.0, float),
         "betas": at_least(0.0, float, 0.999999), "data_weights": at_least(1e-12, float), "data": D.data_source,
         "encodec": D.encodec_source, "device": lambda text: text if text == "auto" else str(D.device(text))}
CHOICES = {"gamma": ("auto", "released", "estimate", "uniform"), "mask_mode": ("drop", "token")}


def parse_args(argv):
    """--field value for each TrainConfig or ModelConfig field, --config SIZE -> (cfg, mcfg, the fields given)."""
    p = D.Parser(prog="train.py", description=__doc__, allow_abbrev=False,
                 formatter_class=D.argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=list(M.SIZES), help="model size [2.2] (default base)")
    for f in fields(TrainConfig) + fields(M.ModelConfig):
        kind = type(f.default)
        item = TYPES.get(f.name, at_least(1) if kind is int else float if kind is tuple else kind)  # ints: >= 1
        if kind is bool:
            p.add_argument(f"--{f.name}", action="store_true", default=None, help="(off)")
        else:  # several values of a tuple: spaced or comma-separated
            p.add_argument(f"--{f.name}", nargs="+" if kind is tuple else None, choices=CHOICES.get(f.name),
                           type=(lambda t, item=item: [item(w) for w in t.split(",") if w]) if kind is tuple else item,
                           help=repr(f.default))
    args = {k: tuple(x for part in v for x in part) if isinstance(v, list) else v
            for k, v in vars(p.parse_args(argv)).items() if v is not None}
    size = args.pop("config", None)
    model_fields = {k: v for k, v in args.items() if k in M.ModelConfig.__dataclass_fields__}
    try:
        mcfg = M.make_config(size or "base", **model_fields)
    except ValueError as err:  # the model's own checks name the field and its range
        raise UsageError(str(err)) from None
    given = set(args) | (set(M.SIZES[size]) if size else set())
    return TrainConfig(**{k: v for k, v in args.items() if k not in model_fields}), mcfg, given


def check_run(cfg, world):
    """What argparse cannot see field by field, before any expensive setup: one line, exit 2."""
    rules = [("batch_size", cfg.batch_size % (world * cfg.grad_accum) == 0,
              f"divisible by {world} GPUs x --grad_accum {cfg.grad_accum}"),
             ("betas", len(cfg.betas) == 2, "two numbers in [0, 1)"),
             ("data_weights", len(cfg.data_weights) in (0, len(cfg.data)), "one weight per --data entry"),
             ("init_from", not cfg.init_from or cfg.kmeans_store, "given with --kmeans_store (from kmeans.py)"),
             ("kmeans_store", not cfg.kmeans_store or os.path.isfile(os.path.join(cfg.kmeans_store, "index.json")),
              "a folder written by kmeans.py (with index.json)")]
    for name, ok, allowed in rules:
        if not ok:
            raise UsageError(f"--{name} {getattr(cfg, name)}: must be {allowed}")
    if cfg.index and os.path.exists(cfg.index):
        from extras.file_index import check_index
        check_index(cfg.index, cfg.data)
    if cfg.tensorboard:
        import extras.tensorboard  # noqa: F401 (without the package: one line now, not after the setup)


# ---------------------------------------------------------------- checkpoints: stage 1 for stage 2, resume
def refuse_changes(given, old, now, flag, advice):
    """Flags given now that differ from what a checkpoint was trained with -> one UsageError."""
    changed = [k for k in sorted(given) if k in old and json.dumps(old[k]) != json.dumps(now[k])]  # tuples = lists
    if changed:
        what = ", ".join(f"--{k} {now[k]} (the checkpoint has {old[k]})" for k in changed)
        raise UsageError(f"{flag}: {what}; {advice}")


def starting_point(cfg, mcfg, given, rank):
    """-> (cfg, mcfg, resume checkpoint or None, stage-1 checkpoint or None), reading only checkpoints. A resumed
    run takes its configs from its checkpoint (extras/resume.py), stage 2 the stage-1 model config and codec [2.3]."""
    theirs = sorted(glob.glob(os.path.join(cfg.out, CHECKPOINTS)))
    if not cfg.resume and theirs + glob.glob(os.path.join(cfg.out, "metrics.jsonl")):  # a new run would mix files
        raise UsageError(f"--out {cfg.out}: holds another run ({os.path.basename((theirs or ['metrics.jsonl'])[-1])}"
                         "); add --resume to continue it, or choose a new --out (nothing there is deleted)")
    ckpt = None
    if cfg.resume:
        from extras.resume import resume_point
        cfg, mcfg, ckpt = resume_point(cfg, mcfg, given, theirs, refuse_changes, rank)
    if ckpt is not None or not cfg.init_from:
        return cfg, mcfg, ckpt, None
    try:
        stage1 = D.load_checkpoint(cfg.init_from)[1]
    except ValueError as err:
        raise UsageError(f"--init_from {err}") from None
    refuse_changes(given, {**stage1["config"], "encodec": stage1["encodec"]}, {**asdict(mcfg), **asdict(cfg)},
                   "--init_from", "stage 2 continues the stage-1 model on its codec; leave these flags out")
    old = M.ModelConfig(**stage1["config"])  # the start line prints it, with S = Q + 1 streams
    mcfg = replace(old, n_kmeans_streams=old.n_kmeans_streams + 1)
    return replace(cfg, encodec=stage1["encodec"]), mcfg, None, stage1


def save_checkpoint(cfg, step, model, opt, scaler, mcfg, codec):
    """Atomically (fsync'd temporary file, then rename) write everything a resume needs; keep the last K."""
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
             "step": step, "config": asdict(mcfg), "train_config": asdict(cfg), "encodec": codec.source,
             "gamma_q": list(mcfg.gamma_q), "rng": torch.get_rng_state()}
    path = os.path.join(cfg.out, f"ckpt-{step:08d}.pt")
    D.write_atomic(path, lambda f: torch.save(state, f))  # never half a checkpoint under this name
    older = [p for p in sorted(glob.glob(os.path.join(cfg.out, CHECKPOINTS))) if p < path]  # a newer one is
    for old in older[: len(older) + 1 - cfg.keep_last]:  # torn (resumed before it): overwritten in its turn
        os.remove(old)
    return path


# ---------------------------------------------------------------- the run folder, and stopping in time
@contextlib.contextmanager
def owned_folder(cfg, step):
    """--out for this run alone: an OS lock on OUT/train.lock (our pid and host written in it) that the system
    releases however the run ends; a killed run's temporary files go, and on --resume its metrics past `step`."""
    with open(os.path.join(D.make_folder(cfg.out), "train.lock"), "a+") as lock:
        lock.seek(0)
        held = lock.read().strip()  # what the last run wrote: empty once it ended normally
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # one lock per folder, on every host sharing the disk
        except BlockingIOError:
            raise UsageError(f"--out {cfg.out}: in use by {held or 'another run'} ({lock.name}); wait for that run, "
                             "or choose another --out") from None
        if held:
            warnings.warn(f"taking over the stale lock {lock.name} of {held}: that run is gone")
        lock.truncate(0)
        print(f"pid {os.getpid()} on {socket.gethostname()}", file=lock, flush=True)
        D.remove_temporaries(cfg.out, r"ckpt-\d{8}\.pt|metrics\.jsonl")
        if cfg.resume:
            from extras.resume import trim_metrics
            trim_metrics(cfg.out, step)  # each step is logged once
        try:
            yield
        finally:  # an end the run saw (not a kill): the next run finds nothing to take over
            lock.truncate(0)


def stop_after_the_step(signum, frame):
    """SIGTERM, SIGUSR1 (schedulers send them before a kill) or Ctrl-C; a second Ctrl-C stops at once."""
    if signum == signal.SIGINT and STOP:
        raise KeyboardInterrupt(signum)
    STOP.append(signum)


def log_metrics(cfg, step, s, S, rate, val, board):
    """The line a student watches (loss, masked accuracy per stream, speed, ETA), also a record in metrics.jsonl."""
    path, audio_h = os.path.join(cfg.out, "metrics.jsonl"), rate * cfg.batch_size * M.CROP_SECONDS / 3600
    text = (f"step {step}/{cfg.steps} | loss {s[0]:.4f} | masked acc/stream "
            f"{' '.join(f'{a:.2f}' for a in s[1 + 2 * S:].tolist())} | {rate:.2f} steps/s | {audio_h:.4f} h audio/s"
            f" | ETA {(cfg.steps - step) / max(rate, 1e-9) / 3600:.2f} h")
    record = {"step": step, "loss": s[0].item(), "masked_loss": s[1: 1 + S].tolist(),
              "unmasked_loss": s[1 + S: 1 + 2 * S].tolist(), "masked_acc": s[1 + 2 * S:].tolist(),
              "steps_per_s": rate, "audio_hours_per_s": audio_h, "time": time.time()}
    if val is not None:
        text += f" | val loss {val[0]:.4f} acc {val[1]:.3f}"
        record.update(val_loss=val[0], val_masked_acc=val[1])
    print(text, flush=True)
    try:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as err:  # a full disk: the checkpoints so far are intact
        raise UsageError(f"cannot write {path}: {err.strerror}; free space, then continue with --resume "
                         f"--out {os.path.dirname(path)}") from None
    if board:
        board(record)


# ---------------------------------------------------------------- ranks and device
def setup_distributed(cfg):
    """torchrun sets WORLD_SIZE: NCCL on GPUs, gloo on CPU; rank r takes GPU LOCAL_RANK -> (rank, world, device)."""
    world, rank, local = (int(os.environ.get(k, d)) for k, d in (("WORLD_SIZE", 1), ("RANK", 0), ("LOCAL_RANK", 0)))
    device = torch.device(cfg.device if cfg.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        device = torch.device("cuda", local if world > 1 else device.index or 0)
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        wait_group()  # made by every rank now, together
    return rank, world, device


@functools.cache
def wait_group():
    """barrier()'s group: rank 0 alone builds the file index and codec cache (hours), past NCCL's 10-minute timeout."""
    return dist.new_group(backend="gloo", timeout=datetime.timedelta(days=7))


def barrier():
    if dist.is_initialized():
        dist.barrier(group=wait_group())


def autocast_for(device):
    """bf16 autocast on GPUs with bf16 units (Ampere on), else fp16 + GradScaler: emulated bf16 is slow; CPU fp32."""
    if device.type != "cuda":
        return contextlib.nullcontext(), torch.amp.GradScaler("cpu", enabled=False)
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    return torch.autocast("cuda", dtype=dtype), torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)


# ---------------------------------------------------------------- data
class MaskedCrops(Dataset):
    """Crops plus gap masks [2], seeded by (seed, epoch, index): no GPU count, accumulation or resume changes one."""

    def __init__(self, crops, cfg, seed):
        self.crops, self.cfg, self.seed, self.epoch = crops, cfg, seed, 0

    def set_epoch(self, epoch):
        self.epoch = epoch
        self.crops.set_epoch(epoch)

    __len__ = lambda self: len(self.crops)

    def __getitem__(self, index):
        item = self.crops[index]
        g = torch.Generator().manual_seed(hash((self.seed, self.epoch, index)) % 2 ** 62)  # ints: a fixed hash
        length = (~item.padding).sum()[None]  # (1,)
        mask = M.gap_mask(length, len(item.padding), self.cfg.M_prop, self.cfg.M_gap, g)[0]  # (T,)
        return item, mask


def read_files(cfg, rank):
    """The audio files of --data -> (Files, each one's --data entry (F,), unreadable count), or --index's file index."""
    if cfg.index:
        from extras.file_index import ensure_index
        return ensure_index(cfg.data, cfg.index, rank)
    try:
        scans = [D.scan_audio(D.list_audio([s])) for s in cfg.data]
    except (ValueError, FileNotFoundError) as err:
        raise UsageError(f"--data: {err}") from None
    source = np.repeat(np.arange(len(scans)), [len(files.paths) for files, _ in scans])
    return D.Files(*map(np.concatenate, zip(*(files for files, _ in scans)))), source, sum(len(s) for _, s in scans)


def build_datasets(cfg, mcfg, codec, rank, files=None):
    """Audio files -> fixed held-out split -> raw crops (or cached ones, --cache), with masks [3.1]."""
    files, source, n_bad = read_files(cfg, rank) if files is None else files
    groups = ([np.flatnonzero(source == s) for s in range(len(cfg.data))] if cfg.data_weights
              else [np.arange(len(files.paths))])  # file positions of each mixed source
    splits = [(g, g[:0]) for g in groups]  # (train, held-out) file positions of each source
    if cfg.val_files:
        from extras.validation import readable_holdout
        splits = [readable_holdout(files, g, cfg.val_files, cfg.seed) for g in groups]
    crops = functools.partial(D.CropDataset, extra_store=cfg.kmeans_store or None)
    if cfg.cache:  # the codec once per file: stored frames and codes (a deviation, extras/cache.py)
        from extras.cache import cached_crops
        crops = cached_crops(codec, [files.path(i) for s in splits for part in s for i in part], cfg, rank, barrier)
    train = [crops(files.take(t), seed=cfg.seed, n_skipped=n_bad if i == 0 else 0) for i, (t, _) in enumerate(splits)]
    if cfg.data_weights:
        from extras.mixing import MixedDataset
        train = [MixedDataset(train, cfg.data_weights, cfg.seed)]
    held_out = np.concatenate([v for _, v in splits])
    valid = MaskedCrops(crops(files.take(held_out), seed=cfg.seed + 1), mcfg, cfg.seed + 1) if len(held_out) else None
    return MaskedCrops(train[0], mcfg, cfg.seed), valid, files.take(np.concatenate([t for t, _ in splits]))


def epoch_plan(n_items, cfg, micro_batch, rank, world, epoch, first_step):
    """This rank's micro-batches for the steps of one epoch from first_step on: [[indices, ...], ...]. Rank r
    takes every world-th item of step s's window of the global batch, so no step's items depend on the GPU count."""
    order = np.random.default_rng([cfg.seed, epoch]).permutation(n_items)  # (seed, epoch) jointly
    plan = []
    for s in range(first_step, n_items // cfg.batch_size):
        mine = order[s * cfg.batch_size: (s + 1) * cfg.batch_size][rank::world].tolist()
        plan.append([mine[m: m + micro_batch] for m in range(0, len(mine), micro_batch)])
    return plan


def step_batches(dataset, cfg, micro_batch, rank, world, start_step):
    """This rank's micro-batches, step by step from start_step: a resumed run rebuilds the plan and skips ahead."""
    steps_per_epoch = len(dataset) // cfg.batch_size
    if steps_per_epoch == 0:
        raise UsageError(f"--batch_size {cfg.batch_size}: more than the {len(dataset)} training crops")
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


def inputs_and_targets(batch, codec, mcfg, device):
    """A micro-batch -> feats, targets on the device by non-blocking copies (raw audio through the codec), mask
    and padding on the CPU (the model reads them there). Targets: Q codebooks, then the k-means stream [2.3]."""
    item, mask = batch
    if isinstance(item, D.Crop):
        feats, codes = codec(item.wav.to(device, non_blocking=True))  # (B, T, 128), (B, T, 8)
    else:  # cached frames and codes
        feats, codes = item.feats.to(device, non_blocking=True), item.codes.to(device, non_blocking=True)
    targets = codes[..., : mcfg.Q]  # (B, T, Q)
    if mcfg.n_kmeans_streams:
        if not (item.extra[~item.padding] >= 0).all():  # on the CPU; python -O must not remove this check
            raise ValueError("frames without k-means targets: the --kmeans_store does not match "
                             "these files (rerun kmeans.py on them)")
        targets = torch.cat([targets, item.extra.clip(0).to(device, non_blocking=True)[..., None]], -1)  # (B, T, S)
    return feats, targets, mask, item.padding


# ---------------------------------------------------------------- gamma_q of a fresh model [3.1]
def choose_gamma(cfg, mcfg, codec, files, device):
    """gamma_q [3.1]: the released values, uniform weights, or estimated on gamma_clips random crops."""
    mode = cfg.gamma if cfg.gamma != "auto" else ("estimate" if codec.source == "random" else "released")
    if mode != "estimate":  # make_config holds the released values (first Q, renormalized)
        return mcfg.gamma_q if mode == "released" else (1.0 / mcfg.Q,) * mcfg.Q
    crops = D.CropDataset(files, seed=cfg.seed)
    picked = [crops[int(i)] for i in torch.randperm(len(crops), generator=torch.Generator().manual_seed(cfg.seed))
              [: cfg.gamma_clips]]
    lengths = torch.stack([(~c.padding).sum() * M.HOP for c in picked])  # (n,) real samples: padding left out
    gamma = M.estimate_gamma(codec, torch.stack([c.wav for c in picked]).to(device), mcfg.Q, lengths=lengths)
    return tuple(round(float(g), 6) for g in gamma / gamma.sum())


# ---------------------------------------------------------------- one optimizer step
def train_step(ddp_model, batches, codec, mcfg, opt, scaler, autocast, device, clip_grad):
    """Accumulate over this rank's micro-batches (DDP syncs only on the last), then step [3.1].
    |M| and T are counted over the whole batch, every micro-batch of every GPU [2.3], so the shares
    of L add up to the batch's loss. -> [loss, masked loss (S), unmasked loss (S), masked acc (S)]."""
    counts = count_frames(batches).to(device, non_blocking=True)
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world > 1:
        dist.all_reduce(counts)  # two integers: cheap
    stats = 0
    for m, batch in enumerate(batches):
        feats, targets, mask, padding = inputs_and_targets(batch, codec, mcfg, device)
        sync = m == len(batches) - 1 or not isinstance(ddp_model, torch.nn.parallel.DistributedDataParallel)
        with contextlib.nullcontext() if sync else ddp_model.no_sync():
            with autocast:
                out = ddp_model(feats, targets, mask, padding, counts=tuple(counts))
            scaler.scale(out.loss * world).backward()  # DDP averages gradients over GPUs; shares add
        stats = stats + torch.cat([out.loss.detach()[None], out.masked_loss, out.unmasked_loss, out.masked_acc]).float()
    if world > 1:
        dist.all_reduce(stats)  # every GPU's shares add up to the batch's figures
    if clip_grad:  # Deviation only when switched on: the paper does not clip
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(ddp_model.parameters(), clip_grad)
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)
    return stats


def count_frames(batches):
    """(|M|, T - |M|): hidden and shown frames of some micro-batches, padding in neither [2.3]."""
    return sum(torch.stack([(mask & ~item.padding).sum(), (~mask & ~item.padding).sum()]) for item, mask in batches)


# ---------------------------------------------------------------- the run
def main(argv=None):
    """Parse and check every flag -> resume point -> ranks and device -> data -> model -> loop."""
    cfg, mcfg, given = parse_args(sys.argv[1:] if argv is None else argv)
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    check_run(cfg, world)
    if cfg.bench:
        from extras.bench import train_benchmark
        return train_benchmark(cfg, mcfg, setup_distributed(cfg)[2])
    cfg, mcfg, ckpt, stage1 = starting_point(cfg, mcfg, given, rank)
    check_run(cfg, world)  # a resumed config comes from the checkpoint: its paths may have gone
    rank, world, device = setup_distributed(cfg)
    extra = dict(micro_batch=cfg.batch_size // (world * cfg.grad_accum), frames_per_crop=M.CROP_FRAMES,
                 audio_seconds_per_step=cfg.batch_size * M.CROP_SECONDS)  # derived once, printed
    files = read_files(cfg, rank)  # before any setup: a --data mistake costs one line
    with owned_folder(cfg, ckpt["step"] if ckpt else 0) if rank == 0 else contextlib.nullcontext():
        pretrain(cfg, mcfg, ckpt, stage1, files, extra, rank, world, device)
    if dist.is_initialized():
        dist.destroy_process_group()


def pretrain(cfg, mcfg, ckpt, stage1, files, extra, rank, world, device):
    """Codec -> data -> model (fresh, stage 2 or resumed) -> optimizer -> the loop, in a folder this run owns."""
    torch.manual_seed(cfg.seed)
    codec = D.load_codec(cfg.encodec).to(device)
    train_set, val_set, train_files = build_datasets(cfg, mcfg, codec, rank, files)  # masks need M_prop, M_gap only
    if ckpt is None and stage1 is None:
        model = M.EnCodecMAE(replace(mcfg, gamma_q=choose_gamma(cfg, mcfg, codec, train_files, device)))
    else:  # resumed, or stage 2: the stage-1 weights plus a k-means stream [2.3]
        model = M.EnCodecMAE(M.ModelConfig(**(ckpt or stage1)["config"]))
        model.load_state_dict((ckpt or stage1)["model"])  # strict
        model = model if ckpt is not None else M.add_kmeans_stream(model)
    model, mcfg = model.to(device), model.cfg
    if rank == 0:
        skipped = train_set.crops.n_skipped + (val_set.crops.n_skipped if val_set else 0)
        print(f"model {json.dumps(asdict(mcfg))}\ntrain {json.dumps(asdict(cfg))}\nderived {json.dumps(extra)} | world "
              f"{world} | device {device} | {len(train_set)} training crops, {skipped} unreadable files skipped | "
              f"gamma_q {mcfg.gamma_q}", flush=True)
    if cfg.compile:  # the network, not the mask bookkeeping around it (extras/compile.py)
        from extras.compile import compile_network
        compile_network(model)
    # No device_ids: DDP would copy every input to the GPU, the masks too, which stay on the CPU.
    ddp_model = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    autocast, scaler = autocast_for(device)
    if ckpt is not None:  # --resume: the optimizer, the loss scale and the RNG continue exactly
        from extras.resume import restore_state
        restore_state(ckpt, opt, scaler)
    STOP.clear()
    with contextlib.ExitStack() as restore:  # the handlers before ours come back however the loop ends
        for s in D.STOP_SIGNALS:
            restore.callback(signal.signal, s, signal.signal(s, stop_after_the_step))
        run_loop(cfg, mcfg, ddp_model, model, opt, scaler, autocast, codec, train_set, val_set,
                 ckpt["step"] if ckpt else 0, extra["micro_batch"], rank, world, device)


def run_loop(cfg, mcfg, ddp_model, model, opt, scaler, autocast, codec, train_set, val_set,
             step, micro_batch, rank, world, device):
    """The loop of section 3.1: constant lr, accumulate, step, log, validate, checkpoint. The GPU is
    waited for only where the statistics are read: at log, validation and checkpoint steps."""
    batches, board = step_batches(train_set, cfg, micro_batch, rank, world, step), None
    if rank == 0 and cfg.tensorboard:  # the same records as TensorBoard scalars (extras/tensorboard.py)
        from extras.tensorboard import scalar_writer
        board = scalar_writer(cfg.out, step)
    window, n_steps, t0 = 0, 0, time.time()
    while step < cfg.steps:  # the learning rate stays 1e-4 throughout [3.1]
        window = window + train_step(ddp_model, next(batches), codec, mcfg, opt, scaler, autocast, device,
                                     cfg.clip_grad)  # summed on the device since the last log line
        step, n_steps, end = step + 1, n_steps + 1, step + 1 == cfg.steps
        stop = torch.tensor([STOP[-1] if STOP else 0])  # a signal to any rank stops them all, read on the CPU
        if world > 1:
            dist.all_reduce(stop, op=dist.ReduceOp.MAX, group=wait_group())
        val_now = val_set is not None and (step % cfg.val_every == 0 or end)
        log_now, ckpt_now = step % cfg.log_every == 0 or end or val_now, step % cfg.ckpt_every == 0 or end or stop > 0
        stats = window.cpu() / n_steps if log_now or ckpt_now else None  # on every rank: all stop together
        if stats is not None and not torch.isfinite(stats[0]):  # so no checkpoint ever holds it
            last = max(glob.glob(os.path.join(cfg.out, "ckpt-*.pt")), default=None)
            raise SystemExit(f"loss is {stats[0].item()} in steps {step - n_steps + 1}-{step}: stopping. The last "
                             f"good checkpoint ({last or 'none yet'}) is intact; try a lower --lr or --clip_grad.")
        val = None
        if rank == 0 and val_now:  # the held-out loss, --val_files (extras/validation.py)
            from extras.validation import validate
            val = validate(model, val_set, lambda batch: inputs_and_targets(batch, codec, mcfg, device), count_frames,
                           device, micro_batch, autocast)
        if rank == 0 and log_now:
            log_metrics(cfg, step, stats, mcfg.n_streams, n_steps / (time.time() - t0), val, board)
        if log_now:
            window, n_steps, t0 = 0, 0, time.time()  # each log line averages the steps since the last one
        if rank == 0 and ckpt_now:
            print(f"saved {save_checkpoint(cfg, step, model, opt, scaler, mcfg, codec)}", flush=True)
        if stop:  # preempted: this step is in its checkpoint; exit as a shell reports a process a signal stopped
            barrier()
            if rank == 0:
                print(f"train.py: stopped by {signal.Signals(int(stop)).name} after step {step}, saved it; continue "
                      f"with: python train.py --resume --out {cfg.out}", file=sys.stderr, flush=True)
            raise SystemExit(128 + int(stop))
    barrier()


if __name__ == "__main__":
    D.run_cli(main)
