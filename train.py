"""Pretraining of EnCodecMAE, stage 1 and self-training stage 2: sections 2.3 and 3.1 of the paper.

CPU demo:  python train.py --config tiny --data demo --encodec random --steps 300 --out runs/demo
One GPU:   python train.py --config base --data /audio/audioset /audio/fma --out runs/base
Two GPUs:  torchrun --nproc_per_node=2 train.py --config base --data ... --out runs/base
Stage 2:   python train.py ... --init_from runs/base/ckpt-00500000.pt --kmeans_store runs/km
           --steps 150000
Reads audio folders or .txt lists (data.py), or a codec cache (--cache, extras/cache.py); writes
OUT/ckpt-*.pt and OUT/metrics.jsonl. Every ModelConfig and TrainConfig field is a flag:
--M_prop 0.3, --delta 1, --gamma uniform, ... (`python train.py --help` says what each does).
"""
import contextlib
import datetime
import functools
import glob
import inspect
import json
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, fields, replace

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

import data as D
import model as M
from data import UsageError, at_least



@dataclass
class TrainConfig:
    """Every setting of a run beside the model's; the defaults are the paper's [3.1]."""

    data: tuple = ("demo",)          # audio folders, .txt lists of files, or demo (synthetic) [3.1]
    data_weights: tuple = ()         # a mixing weight per --data entry (extras/mixing.py)
    cache: str = ""                  # codec cache folder, completed if needed (extras/cache.py)
    index: str = ""                  # file index, built if missing (extras/file_index.py)
    encodec: str = "pretrained"      # the frozen codec: pretrained, random or a .th file [2.1]
    out: str = "runs/encodecmae"     # folder of this run's checkpoints and metrics.jsonl
    steps: int = 500_000             # optimizer steps: 500k stage 1, 150k stage 2 [2.3, 3.1]
    batch_size: int = 128            # global batch: all GPUs and micro-batches together [3.1]
    grad_accum: int = 1              # micro-batches per step on each GPU (less memory)
    lr: float = 1e-4                 # learning rate, constant [3.1]
    weight_decay: float = 0.05       # AdamW weight decay [3.1]
    betas: tuple = (0.9, 0.95)       # AdamW beta_1 beta_2 [3.1]
    clip_grad: float = 0.0           # gradient norm clipping, 0 = off (the paper does not clip)
    gamma: str = "auto"              # gamma_q: auto (released if pretrained, else estimate) [3.1]
    gamma_clips: int = 150           # clips gamma_q is estimated on [3.1]
    init_from: str = ""              # stage 2: the stage-1 checkpoint to start from [2.3]
    kmeans_store: str = ""           # stage 2: kmeans.py's targets, stream Q+1 [2.3]
    val_files: int = 0               # files held out for a validation loss (extras/validation.py)
    val_every: int = 1000            # steps between validations
    log_every: int = 50              # steps between log lines (and metrics.jsonl records)
    ckpt_every: int = 5000           # steps between checkpoints
    keep_last: int = 3               # checkpoints kept on disk
    workers: int = 4                 # DataLoader processes per GPU
    seed: int = 0                    # crops, masks, initialization and file order
    device: str = "auto"             # cpu, cuda or cuda:N; auto: cuda if there is one
    compile: bool = False            # torch.compile the network (extras/compile.py)
    resume: bool = False             # continue the run in --out from its newest checkpoint
    tensorboard: bool = False        # also write TensorBoard scalars (extras/tensorboard.py)


# ---------------------------------------------------------------- the command line
TYPES = {"workers": at_least(0), "seed": at_least(0), "n_dec_layers": at_least(0),
         "n_kmeans_streams": at_least(0), "lr": at_least(1e-12, float),
         "weight_decay": at_least(0.0, float), "clip_grad": at_least(0.0, float),
         "betas": at_least(0.0, float, 0.999999), "data_weights": at_least(1e-12, float),
         "data": str, "encodec": D.encodec_source,
         "device": lambda t: t if t == "auto" else str(D.device(t))}
CHOICES = {"gamma": ("auto", "released", "estimate", "uniform"), "mask_mode": ("drop", "token"),
           "input": ("encodec", "mel", "spec")}


def field_help(cls):
    """Each field's trailing comment in the dataclass's source: the --help text of its flag."""
    found = re.finditer(r"^\s+(\w+): .*?#\s*(.+)$", inspect.getsource(cls), re.M)
    return {m[1]: m[2] for m in found}


def parse_args(argv):
    """--field value for each TrainConfig and ModelConfig field, --config SIZE -> (cfg, mcfg, the
    fields given). A tuple takes several values, spaced or comma-separated."""
    p = D.Parser(prog="train.py", description=__doc__, allow_abbrev=False,
                 formatter_class=D.argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", choices=list(M.SIZES), help="model size [2.2] (default: base)")
    helps = {**field_help(TrainConfig), **field_help(M.ModelConfig)}
    for f in fields(TrainConfig) + fields(M.ModelConfig):
        kind = type(f.default)
        text = f"{helps[f.name]} (default: {f.default})"
        if kind is bool:
            p.add_argument(f"--{f.name}", action="store_true", default=None, help=helps[f.name])
            continue
        item = TYPES.get(f.name, at_least(1) if kind is int else float if kind is tuple else kind)
        if kind is tuple:
            p.add_argument(f"--{f.name}", nargs="+", help=text,
                           type=lambda t, item=item: [item(w) for w in t.split(",") if w])
        else:
            p.add_argument(f"--{f.name}", type=item, choices=CHOICES.get(f.name), help=text)
    given = {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None}
    for k, v in given.items():
        if isinstance(v, list):  # ["0.9", "0.95"] and ["0.9,0.95"] alike
            given[k] = tuple(x for part in v for x in part)
    size = given.pop("config", None)
    model_fields = {k: v for k, v in given.items() if k in M.ModelConfig.__dataclass_fields__}
    try:
        mcfg = M.make_config(size or "base", **model_fields)
    except ValueError as err:  # the model's own checks name the field and its range
        raise UsageError(str(err)) from None
    cfg = TrainConfig(**{k: v for k, v in given.items() if k not in model_fields})
    return cfg, mcfg, set(given) | (set(M.SIZES[size]) if size else set())


def check_config(cfg, world):
    """What argparse cannot see flag by flag, before any expensive setup: one line, exit 2."""
    store_ok = not cfg.kmeans_store or os.path.isfile(os.path.join(cfg.kmeans_store, "index.json"))
    rules = [("batch_size", cfg.batch_size % (world * cfg.grad_accum) == 0,
              f"divisible by {world} GPUs x --grad_accum {cfg.grad_accum}"),
             ("betas", len(cfg.betas) == 2, "two numbers in [0, 1)"),
             ("data_weights", len(cfg.data_weights) in (0, len(cfg.data)), "a weight per --data"),
             ("init_from", not cfg.init_from or cfg.kmeans_store, "given with --kmeans_store"),
             ("kmeans_store", store_ok, "a folder written by kmeans.py (with index.json)")]
    for name, ok, allowed in rules:
        if not ok:
            raise UsageError(f"--{name} {getattr(cfg, name)}: must be {allowed}")
    if cfg.index and os.path.exists(cfg.index):
        from extras.file_index import check_index
        check_index(cfg.index, cfg.data)
    if cfg.tensorboard:
        import extras.tensorboard  # noqa: F401 (without the package: one line now, not later)


# ---------------------------------------------------------------- data [3.1]
class MaskedCrops(Dataset):
    """Crops plus gap masks [2], drawn per clip from (seed, epoch, index) alone: no GPU count,
    accumulation or resume changes a mask."""

    def __init__(self, crops, cfg, seed):
        self.crops = crops
        self.cfg = cfg
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch
        self.crops.set_epoch(epoch)

    def __len__(self):
        return len(self.crops)

    def __getitem__(self, index):
        item = self.crops[index]
        seed = hash((self.seed, self.epoch, index)) % 2 ** 62  # ints hash the same in every process
        g = torch.Generator().manual_seed(seed)
        length = (~item.padding).sum()[None]  # (1,)
        mask = M.gap_mask(length, len(item.padding), self.cfg.M_prop, self.cfg.M_gap, g)[0]  # (T,)
        return item, mask


def read_files(cfg, rank):
    """The audio files of --data -> (Files, the --data entry of each (F,), unreadable count);
    with --index, from the file index (extras/file_index.py)."""
    if cfg.index:
        from extras.file_index import ensure_index
        return ensure_index(cfg.data, cfg.index, rank, barrier)
    try:
        scans = [D.scan_audio(D.list_audio([s])) for s in cfg.data]
    except (ValueError, FileNotFoundError) as err:
        raise UsageError(f"--data: {err}") from None
    source = np.repeat(np.arange(len(scans)), [len(files.paths) for files, _ in scans])
    files = D.Files(*map(np.concatenate, zip(*(files for files, _ in scans))))
    return files, source, sum(len(skipped) for _, skipped in scans)


def build_datasets(cfg, mcfg, codec, rank, files=None):
    """Audio files -> raw crops (or cached ones, --cache) with masks [3.1]; --val_files holds
    files out, --data_weights mixes the sources -> (training set, validation set, their files)."""
    files, source, n_bad = read_files(cfg, rank) if files is None else files
    if cfg.val_files or cfg.data_weights:  # extras/validation.py, extras/mixing.py
        from extras.validation import split_sources
        return split_sources(cfg, mcfg, codec, rank, files, source, n_bad, MaskedCrops, barrier)
    if cfg.cache:  # the codec once per file: its frames and codes stored (extras/cache.py)
        from extras.cache import cached_crops
        paths = list(map(os.fsdecode, files.paths))
        crops = cached_crops(codec, paths, cfg, rank, barrier, mcfg.input)(files, seed=cfg.seed)
    else:
        crops = D.CropDataset(files, cfg.seed, cfg.kmeans_store or None, n_skipped=n_bad)
    return MaskedCrops(crops, mcfg, cfg.seed), None, files


def epoch_plan(n_items, cfg, micro_batch, rank, world, epoch, first_step):
    """This rank's micro-batches for the steps of one epoch from first_step on. Rank r takes every
    world-th item of a step's window of the global batch: no step's items depend on the GPUs."""
    order = np.random.default_rng([cfg.seed, epoch]).permutation(n_items)  # (seed, epoch) jointly
    plan = []
    for s in range(first_step, n_items // cfg.batch_size):
        mine = order[s * cfg.batch_size: (s + 1) * cfg.batch_size][rank::world].tolist()
        plan.append([mine[m: m + micro_batch] for m in range(0, len(mine), micro_batch)])
    return plan


def step_batches(dataset, cfg, micro_batch, rank, world, start_step):
    """This rank's micro-batches, step by step from start_step (a resumed run skips ahead)."""
    steps_per_epoch = len(dataset) // cfg.batch_size
    if steps_per_epoch == 0:
        raise UsageError(f"--batch_size {cfg.batch_size}: more than the {len(dataset)} training "
                         "crops")
    step = start_step
    while True:
        epoch, first = divmod(step, steps_per_epoch)
        plan = epoch_plan(len(dataset), cfg, micro_batch, rank, world, epoch, first)
        dataset.set_epoch(epoch)
        sampler = [micro for per_step in plan for micro in per_step]
        loader = iter(DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.workers,
                                 pin_memory=torch.cuda.is_available()))
        for per_step in plan:
            yield [next(loader) for _ in per_step]
            step += 1


def inputs_and_targets(batch, codec, mcfg, device):
    """A micro-batch -> the MAE's inputs and targets on the device (raw audio through the codec;
    cached crops carry both), mask and padding left on the CPU, where the model reads them.
    Targets: the Q codebooks, then the k-means stream of stage 2 [2.3]."""
    item, mask = batch
    if isinstance(item, D.Crop):
        wav = item.wav.to(device, non_blocking=True)  # (B, n)
        feats, codes = codec(wav)  # (B, T, 128), (B, T, 8)
        if mcfg.input != "encodec":  # a filterbank's frames in, the codec's codes out [4]
            feats = M.input_frames(mcfg, codec, wav)  # (B, T, bins)
    else:
        feats = item.feats.to(device, non_blocking=True)  # (B, T, d_input)
        codes = item.codes.to(device, non_blocking=True)  # (B, T, 8)
    targets = codes[..., : mcfg.Q]  # (B, T, Q)
    if mcfg.n_kmeans_streams:
        if not (item.extra[~item.padding] >= 0).all():  # on the CPU; not an assert: python -O
            raise ValueError("frames without k-means targets: the --kmeans_store does not match "
                             "these files (rerun kmeans.py on them)")
        labels = item.extra.clip(0).to(device, non_blocking=True)  # (B, T)
        targets = torch.cat([targets, labels[..., None]], -1)  # (B, T, S)
    return feats, targets, mask, item.padding


# ---------------------------------------------------------------- gamma_q of a fresh model [3.1]
def choose_gamma(cfg, mcfg, codec, files, device):
    """gamma_q [3.1]: the released values, uniform weights, or estimated on gamma_clips crops."""
    mode = cfg.gamma
    if mode == "auto":
        mode = "estimate" if codec.source == "random" else "released"
    if mode == "released":  # make_config holds them (the first Q, renormalized)
        return mcfg.gamma_q
    if mode == "uniform":
        return (1.0 / mcfg.Q,) * mcfg.Q
    crops = D.CropDataset(files, seed=cfg.seed)
    order = torch.randperm(len(crops), generator=torch.Generator().manual_seed(cfg.seed))
    picked = [crops[int(i)] for i in order[: cfg.gamma_clips]]
    lengths = torch.stack([(~c.padding).sum() * M.HOP for c in picked])  # real samples of each
    wav = torch.stack([c.wav for c in picked]).to(device)
    gamma = M.estimate_gamma(codec, wav, mcfg.Q, lengths=lengths)
    return tuple(round(float(g), 6) for g in gamma / gamma.sum())


# ---------------------------------------------------------------- one optimizer step [2.3, 3.1]
def count_frames(batches):
    """(|M|, T - |M|): hidden and shown frames of some micro-batches, padding in neither [2.3]."""
    counts = [torch.stack([(mask & ~item.padding).sum(), (~mask & ~item.padding).sum()])
              for item, mask in batches]
    return sum(counts)


def train_step(ddp_model, batches, codec, mcfg, opt, scaler, autocast, device, clip_grad):
    """Accumulate over this rank's micro-batches (DDP syncs only on the last), then step [3.1].
    |M| and T are counted over the whole batch, every micro-batch of every GPU [2.3], so the
    shares of L add up to the batch's loss.
    -> [loss, masked loss (S), unmasked loss (S), masked accuracy (S)]."""
    counts = count_frames(batches).to(device, non_blocking=True)
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world > 1:
        dist.all_reduce(counts)  # two integers: cheap
    stats = 0
    for m, batch in enumerate(batches):
        feats, targets, mask, padding = inputs_and_targets(batch, codec, mcfg, device)
        last = m == len(batches) - 1
        is_ddp = isinstance(ddp_model, torch.nn.parallel.DistributedDataParallel)
        with contextlib.nullcontext() if last or not is_ddp else ddp_model.no_sync():
            with autocast:
                out = ddp_model(feats, targets, mask, padding, counts=tuple(counts))
            scaler.scale(out.loss * world).backward()  # DDP averages over GPUs: the shares add
        parts = [out.loss.detach()[None], out.masked_loss, out.unmasked_loss, out.masked_acc]
        stats = stats + torch.cat(parts).float()
    if world > 1:
        dist.all_reduce(stats)  # every GPU's shares add up to the batch's figures
    if clip_grad:  # Deviation only when switched on: the paper does not clip
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(ddp_model.parameters(), clip_grad)
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)
    return stats


# ---------------------------------------------------------------- checkpoints: stage 2, resume
def starting_point(cfg, mcfg, given, run):
    """-> (cfg, mcfg, the checkpoint to resume or None, the stage-1 checkpoint or None), reading
    checkpoints only. Stage 2 takes the stage-1 model config and codec, plus one stream [2.3]."""
    cfg, mcfg, ckpt = run.start(cfg, mcfg, given)  # --resume: its checkpoint and its flags
    if ckpt is not None or not cfg.init_from:
        return cfg, mcfg, ckpt, None
    try:
        stage1 = D.load_checkpoint(cfg.init_from)[1]
    except ValueError as err:
        raise UsageError(f"--init_from {err}") from None
    run.check_stage2(given, stage1, cfg, mcfg)
    old = M.ModelConfig(**stage1["config"])  # the start line prints it, with S = Q + 1 streams
    mcfg = replace(old, n_kmeans_streams=old.n_kmeans_streams + 1)
    return replace(cfg, encodec=stage1["encodec"]), mcfg, None, stage1


def save_checkpoint(cfg, step, model, opt, scaler, mcfg, codec):
    """Write everything a resume needs, atomically (a temporary file, fsync'd, then renamed);
    keep the last --keep_last."""
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(),
             "scaler": scaler.state_dict(), "step": step, "config": asdict(mcfg),
             "train_config": asdict(cfg), "encodec": codec.source, "gamma_q": list(mcfg.gamma_q),
             "rng": torch.get_rng_state()}
    path = os.path.join(cfg.out, f"ckpt-{step:08d}.pt")
    D.write_atomic(path, lambda f: torch.save(state, f))  # never half a checkpoint under this name
    # A checkpoint newer than this one was left by a run resumed before it: overwritten in its turn.
    older = [p for p in sorted(glob.glob(os.path.join(cfg.out, D.CHECKPOINTS))) if p < path]
    for old in older[: len(older) + 1 - cfg.keep_last]:
        os.remove(old)
    return path


# ---------------------------------------------------------------- logging
def log_metrics(cfg, step, stats, S, rate, val, board):
    """The line a student watches (loss, masked accuracy per stream, speed, ETA), and the same
    figures as a record in metrics.jsonl."""
    path = os.path.join(cfg.out, "metrics.jsonl")
    audio_h = rate * cfg.batch_size * M.CROP_SECONDS / 3600
    acc = stats[1 + 2 * S:]
    text = (f"step {step}/{cfg.steps} | loss {stats[0]:.4f} | masked acc/stream "
            f"{' '.join(f'{a:.2f}' for a in acc.tolist())} | {rate:.2f} steps/s | "
            f"{audio_h:.4f} h audio/s | ETA {(cfg.steps - step) / max(rate, 1e-9) / 3600:.2f} h")
    record = {"step": step, "loss": stats[0].item(), "masked_loss": stats[1: 1 + S].tolist(),
              "unmasked_loss": stats[1 + S: 1 + 2 * S].tolist(), "masked_acc": acc.tolist(),
              "steps_per_s": rate, "audio_hours_per_s": audio_h, "time": time.time()}
    if val is not None:
        text += f" | val loss {val[0]:.4f} acc {val[1]:.3f}"
        record.update(val_loss=val[0], val_masked_acc=val[1])
    print(text, flush=True)
    try:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as err:  # a full disk: the checkpoints so far are intact
        raise UsageError(f"cannot write {path}: {err.strerror}; free space, then continue with "
                         f"--resume --out {cfg.out}") from None
    if board:
        board(record)


# ---------------------------------------------------------------- ranks and device
def setup_distributed(cfg):
    """torchrun sets WORLD_SIZE: NCCL on GPUs, gloo on CPUs; rank r takes GPU LOCAL_RANK
    -> (rank, world, device)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    local = int(os.environ.get("LOCAL_RANK", 0))
    if cfg.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(cfg.device)
    if device.type == "cuda":
        device = torch.device("cuda", local if world > 1 else device.index or 0)
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        wait_group()  # made by every rank now, together
    return rank, world, device


@functools.cache
def wait_group():
    """A gloo group for barrier() and the stop signal: rank 0 alone builds the file index and the
    codec cache (hours, past NCCL's 10-minute timeout), and a CPU flag needs no GPU sync."""
    return dist.new_group(backend="gloo", timeout=datetime.timedelta(days=7))


def barrier():
    if dist.is_initialized():
        dist.barrier(group=wait_group())


def autocast_for(device):
    """bf16 autocast on GPUs with bf16 units (Ampere on), else fp16 + GradScaler (emulated bf16 is
    slow); fp32 on a CPU."""
    if device.type != "cuda":
        return contextlib.nullcontext(), torch.amp.GradScaler("cpu", enabled=False)
    bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
    dtype = torch.bfloat16 if bf16 else torch.float16
    return torch.autocast("cuda", dtype=dtype), torch.amp.GradScaler("cuda", enabled=not bf16)


# ---------------------------------------------------------------- the run
def main(argv=None):
    """Configuration -> starting point -> ranks and device -> data -> model -> the loop."""
    cfg, mcfg, given = parse_args(sys.argv[1:] if argv is None else argv)
    world = int(os.environ.get("WORLD_SIZE", 1))
    check_config(cfg, world)
    run = research_run(int(os.environ.get("RANK", 0)), world)  # extras/run.py
    cfg, mcfg, ckpt, stage1 = starting_point(cfg, mcfg, given, run)
    check_config(cfg, world)  # a resumed config comes from the checkpoint: its paths may have gone
    rank, world, device = setup_distributed(cfg)
    run.group = wait_group() if world > 1 else None
    files = read_files(cfg, rank)  # before any other setup: a --data mistake costs one line
    if cfg.kmeans_store:  # stage 2: a store of other audio is one line now, not after the setup
        D.load_frame_store(cfg.kmeans_store, list(map(os.fsdecode, files[0].paths)), warn=False)
    with run.folder(cfg, ckpt["step"] if ckpt else 0):  # --out for this run alone
        train(cfg, mcfg, ckpt, stage1, files, run, rank, world, device)
    if dist.is_initialized():
        dist.destroy_process_group()


def research_run(rank, world):
    """What a long research run needs beyond the paper, entered at the named points below: the
    run folder's lock, preemption signals, --resume and its checks, the stop on a NaN loss
    (extras/run.py). With extras/ deleted, PaperRun: the paper's loop alone."""
    try:
        from extras.run import ResearchRun
    except ModuleNotFoundError as err:
        if err.name not in ("extras", "extras.run"):
            raise
        print("train.py: no extras/run.py: no run lock, preemption, --resume or stop on a NaN loss",
              file=sys.stderr)
        return PaperRun()
    return ResearchRun(rank, world, None)


class PaperRun:
    """The hooks of extras/run.py's ResearchRun, doing nothing: the paper's path alone."""

    group = None

    def start(self, cfg, mcfg, given):
        if cfg.resume:
            raise UsageError("--resume needs extras/run.py (the research-run layer)")
        return cfg, mcfg, None

    def check_stage2(self, given, stage1, cfg, mcfg):
        pass

    def folder(self, cfg, step):
        D.make_folder(cfg.out)
        return contextlib.nullcontext()

    def check_finite(self, mean, step, n_steps, out):
        pass

    def stop_signal(self):
        return 0


def build_model(cfg, mcfg, ckpt, stage1, codec, train_files, device):
    """A fresh model with gamma_q chosen now [3.1], a resumed one, or stage 2: the stage-1
    weights plus a k-means stream [2.3]."""
    if ckpt is None and stage1 is None:
        gamma_q = choose_gamma(cfg, mcfg, codec, train_files, device)
        return M.EnCodecMAE(replace(mcfg, gamma_q=gamma_q)).to(device)
    start = ckpt or stage1
    model = M.EnCodecMAE(M.ModelConfig(**start["config"]))
    model.load_state_dict(start["model"])  # strict
    if ckpt is None:
        model = M.add_kmeans_stream(model)
    return model.to(device)


def train(cfg, mcfg, ckpt, stage1, files, run, rank, world, device):
    """Data, model, optimizer, then the loop of section 3.1."""
    torch.manual_seed(cfg.seed)
    micro_batch = cfg.batch_size // (world * cfg.grad_accum)
    codec = D.load_codec(cfg.encodec).to(device)
    train_set, val_set, train_files = build_datasets(cfg, mcfg, codec, rank, files)
    model = build_model(cfg, mcfg, ckpt, stage1, codec, train_files, device)
    mcfg = model.cfg
    if rank == 0:
        print_start(cfg, mcfg, train_set, val_set, micro_batch, world, device)
    if cfg.compile:  # the network, not the mask bookkeeping around it (extras/compile.py)
        from extras.compile import compile_network
        compile_network(model)
    # No device_ids: DDP would copy every input to the GPU, the masks too, which stay on the CPU.
    ddp_model = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.betas,
                            weight_decay=cfg.weight_decay)
    autocast, scaler = autocast_for(device)
    step = 0
    if ckpt is not None:  # --resume: the optimizer, the loss scale and the RNG continue exactly
        step = run.restore(ckpt, opt, scaler)
    board = None
    if rank == 0 and cfg.tensorboard:  # the same records as TensorBoard scalars
        from extras.tensorboard import scalar_writer
        board = scalar_writer(cfg.out, step)
    # ---------------------------------------------------------------- the loop [3.1]
    batches = step_batches(train_set, cfg, micro_batch, rank, world, step)
    window = 0  # the step statistics, summed on the device since the last log line
    n_steps = 0
    t0 = time.time()
    while step < cfg.steps:  # the learning rate stays 1e-4 throughout [3.1]
        window = window + train_step(ddp_model, next(batches), codec, mcfg, opt, scaler, autocast,
                                     device, cfg.clip_grad)
        step += 1
        n_steps += 1
        stop = run.stop_signal()  # SIGTERM (or another) to any rank stops all after this step
        end = step == cfg.steps
        val_now = val_set is not None and (step % cfg.val_every == 0 or end)
        log_now = step % cfg.log_every == 0 or end or val_now
        save_now = step % cfg.ckpt_every == 0 or end or stop
        if not (log_now or save_now):
            continue  # the host waits for the GPU at log and checkpoint steps only
        mean = window.cpu() / n_steps
        run.check_finite(mean, step, n_steps, cfg.out)  # before any checkpoint could hold it
        if rank == 0 and log_now:
            val = None
            if val_now:  # the held-out loss (extras/validation.py)
                from extras.validation import validate
                inputs = functools.partial(inputs_and_targets, codec=codec, mcfg=mcfg,
                                           device=device)
                val = validate(model, val_set, inputs, count_frames, device, micro_batch,
                               autocast)
            log_metrics(cfg, step, mean, mcfg.n_streams, n_steps / (time.time() - t0), val, board)
        if log_now:  # each log line averages the steps since the last one
            window = 0
            n_steps = 0
            t0 = time.time()
        if rank == 0 and save_now:
            path = save_checkpoint(cfg, step, model, opt, scaler, mcfg, codec)
            print(f"saved {path}", flush=True)
        if stop:  # preempted: this step is in its checkpoint
            run.stopped(stop, step, cfg.out)
    barrier()


def print_start(cfg, mcfg, train_set, val_set, micro_batch, world, device):
    """The resolved configs, the derived numbers and the data, printed once at the start."""
    derived = dict(micro_batch=micro_batch, frames_per_crop=M.CROP_FRAMES,
                   audio_seconds_per_step=cfg.batch_size * M.CROP_SECONDS)
    skipped = train_set.crops.n_skipped + (val_set.crops.n_skipped if val_set else 0)
    print(f"model {json.dumps(asdict(mcfg))}\ntrain {json.dumps(asdict(cfg))}\nderived "
          f"{json.dumps(derived)} | world {world} | device {device} | {len(train_set)} training "
          f"crops, {skipped} unreadable files skipped | gamma_q {mcfg.gamma_q}", flush=True)


if __name__ == "__main__":
    D.run_cli(main)
