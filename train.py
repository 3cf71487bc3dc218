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

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

import data
import demo
import model as M


@dataclass
class TrainConfig:
    data: tuple = ("demo",)          # audio folders, .txt file lists, or "demo" (synthetic) [3.1]
    data_weights: tuple = ()         # optional mixing weight per --data entry [3.1]
    cache: str = ""                  # codec cache folder: built (resumably) if incomplete, then read
    index: str = ""                  # file index (path, rate, length per file): built once if missing,
                                     # then only read; "" = runs/index/<sha1 of --data>.npz
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
    """--field=value / --field value for any TrainConfig or ModelConfig field, plus --config SIZE.

    Returns (cfg, mcfg, given); given names the fields set on this command line (--config sets
    its size's fields), the only ones a resumed run compares with its checkpoint.
    """
    groups = {f.name: (TrainConfig, f) for f in dataclasses.fields(TrainConfig)}
    groups.update({f.name: (M.ModelConfig, f) for f in dataclasses.fields(M.ModelConfig)})
    if "-h" in argv or "--help" in argv:
        options = "\n".join(f"  --{name}={f.default!r}" for name, (_, f) in groups.items())
        print(f"{__doc__}\n--config {'|'.join(M.SIZES)} (default base), then any of these "
              f"(defaults shown; meanings in train.py's TrainConfig and model.py's ModelConfig):\n{options}")
        raise SystemExit(0)
    size, values, given = "base", {TrainConfig: {}, M.ModelConfig: {}}, set()
    i = 0
    while i < len(argv):
        if not argv[i].startswith("--"):
            raise data.UsageError(f"unexpected argument {argv[i]!r}: options look like --field=value")
        name, _, inline = argv[i][2:].partition("=")
        name = name.replace("-", "_")
        args = [inline] if inline else []
        while not inline and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            args.append(argv[i + 1])
            i += 1
        i += 1
        if name == "config":
            if len(args) != 1 or args[0] not in M.SIZES:
                raise data.UsageError(f"--config {' '.join(args)!r}: choose one of {', '.join(M.SIZES)}")
            size = args[0]
            given |= set(M.SIZES[size])
            continue
        if name not in groups:
            raise data.UsageError(f"unknown option --{name}; options are --config and the fields of "
                                  "TrainConfig and ModelConfig (python train.py --help lists them)")
        cls, f = groups[name]
        values[cls][name] = convert(f, args)
        given.add(name)
    try:
        mcfg = M.make_config(size, **values[M.ModelConfig])
    except ValueError as err:  # the model's own checks name the field and its range
        raise data.UsageError(str(err)) from None
    return TrainConfig(**values[TrainConfig]), mcfg, given


def convert(f, args):
    """A flag's words -> the field's type: bools are bare flags, tuples take several values."""
    if f.type is bool:
        if args:
            raise data.UsageError(f"--{f.name} is a switch and takes no value")
        return True
    if not args:
        raise data.UsageError(f"--{f.name} needs a value")
    if f.type is not tuple and len(args) != 1:
        raise data.UsageError(f"--{f.name} takes one value, got {' '.join(args)}")
    words = [w for a in args for w in a.split(",") if w] if f.type is tuple else args
    item = (type(f.default[0]) if f.default else float) if f.type is tuple else f.type
    try:
        values = [item(w) for w in words]
    except ValueError:
        kind = "a number" if item is float else "an integer"
        raise data.UsageError(f"--{f.name} {' '.join(args)}: expected {kind}"
                              f"{' for each value' if f.type is tuple else ''}") from None
    return tuple(values) if f.type is tuple else values[0]


def check_flags(cfg, world):
    """Every flag in its range, before any expensive setup: a mistake costs one line, not a codec load."""
    finite = lambda x: x == x and abs(x) != float("inf")
    rules = [
        ("steps", cfg.steps >= 1, "an integer >= 1"),
        ("batch_size", cfg.batch_size >= 1, "an integer >= 1"),
        ("grad_accum", cfg.grad_accum >= 1, "an integer >= 1"),
        ("lr", finite(cfg.lr) and cfg.lr > 0, "a number > 0"),
        ("weight_decay", finite(cfg.weight_decay) and cfg.weight_decay >= 0, "a number >= 0"),
        ("betas", len(cfg.betas) == 2 and all(0 <= b < 1 for b in cfg.betas), "two numbers in [0, 1)"),
        ("clip_grad", finite(cfg.clip_grad) and cfg.clip_grad >= 0, "a number >= 0 (0 = off)"),
        ("gamma", cfg.gamma in ("auto", "released", "estimate", "uniform"),
         "one of auto, released, estimate, uniform"),
        ("gamma_clips", cfg.gamma_clips >= 1, "an integer >= 1"),
        ("val_files", cfg.val_files >= 1, "an integer >= 1"),
        ("val_every", cfg.val_every >= 1, "an integer >= 1"),
        ("log_every", cfg.log_every >= 1, "an integer >= 1"),
        ("ckpt_every", cfg.ckpt_every >= 1, "an integer >= 1"),
        ("keep_last", cfg.keep_last >= 1, "an integer >= 1 (checkpoints kept on disk)"),
        ("workers", cfg.workers >= 0, "an integer >= 0"),
        ("seed", cfg.seed >= 0, "an integer >= 0"),
        ("data_weights", not cfg.data_weights or (len(cfg.data_weights) == len(cfg.data)
                                                   and all(w > 0 for w in cfg.data_weights)),
         f"one weight > 0 per --data entry ({len(cfg.data)})"),
        ("batch_size", cfg.batch_size % (world * cfg.grad_accum) == 0,
         f"divisible by {world} GPUs x --grad_accum {cfg.grad_accum}"),
        ("init_from", not cfg.init_from or cfg.kmeans_store, "given with --kmeans_store (from kmeans.py)"),
        ("kmeans_store", not cfg.kmeans_store or os.path.isfile(os.path.join(cfg.kmeans_store, "index.json")),
         "a folder written by kmeans.py (with index.json)"),
    ]
    for name, ok, allowed in rules:
        if not ok:
            value = getattr(cfg, name)
            shown = ",".join(map(str, value)) if isinstance(value, tuple) else value
            raise data.UsageError(f"--{name} {shown}: must be {allowed}")
    if cfg.device != "auto":
        data.check_device(cfg.device)
    data.check_encodec(cfg.encodec)
    for src in cfg.data:
        data.check_data_source(src)
    if cfg.index and os.path.exists(cfg.index):
        data.check_index(cfg.index, cfg.data)


def derived(cfg, world):
    """Numbers that follow from the config, computed once and printed."""
    return dict(micro_batch=cfg.batch_size // (world * cfg.grad_accum), frames_per_crop=M.CROP_FRAMES,
                audio_seconds_per_step=cfg.batch_size * M.CROP_SECONDS)


# ---------------------------------------------------------------- checkpoints: stage 1 for stage 2, resume
def read_checkpoint(path, flag, keys=("model", "config", "encodec")):
    """A train.py checkpoint as a dict, or a UsageError naming the flag, the file and the problem."""
    if not os.path.isfile(path):
        raise data.UsageError(f"{flag} {path}: no such file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, not a torch file, foreign pickles: the file, not the code
        raise data.UsageError(f"{flag} {path}: not a readable checkpoint, truncated or another kind "
                              f"of file ({type(err).__name__} from torch.load)") from None
    missing = [k for k in keys if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise data.UsageError(f"{flag} {path}: not a train.py checkpoint (no {', '.join(missing)})")
    try:
        M.config_from_dict(ckpt["config"])
    except (ValueError, TypeError) as err:
        raise data.UsageError(f"{flag} {path}: its model config is unusable ({err})") from None
    return ckpt


def load_checkpoint_model(path, flag="--checkpoint"):
    """A trained EnCodecMAE from a train.py checkpoint: (model, cfg, codec source). Strict."""
    ckpt = read_checkpoint(path, flag)
    cfg = M.config_from_dict(ckpt["config"])
    model = M.EnCodecMAE(cfg)
    model.load_state_dict(ckpt["model"])
    return model.eval(), cfg, ckpt["encodec"]


RESUME_KEYS = ("model", "config", "encodec", "optimizer", "scaler", "step", "train_config", "rng")


def newest_checkpoint(out, rank=0):
    """The newest checkpoint in out that loads -> (path, dict), naming any it had to pass over."""
    for path in sorted(glob.glob(os.path.join(out, "ckpt-*.pt")), reverse=True):
        try:
            return path, read_checkpoint(path, "--resume", RESUME_KEYS)
        except data.UsageError as err:
            print0(rank, f"{err}; passing over it to the previous one")
    return None, None


# Fields that may differ between a run and its resumption: they do not change what it computes.
# A run folder may move (out), so may a cache (same frames), the file index and the stage-1
# file (read only at the start of stage 2).
RESUMABLE = {"steps", "log_every", "val_every", "ckpt_every", "keep_last", "workers", "device",
             "compile", "resume", "grad_accum", "out", "cache", "index", "init_from", "bench"}


# Fields about this machine and this invocation: a resumed run never takes them from the checkpoint.
THIS_MACHINE = {"out", "device", "workers", "compile", "resume", "bench"}


def refuse_changes(given, old, now, flag, advice):
    """Flags given now that differ from what a checkpoint was trained with -> one UsageError."""
    same = lambda a, b: json.dumps(a) == json.dumps(b)  # tuples and lists alike
    changed = [k for k in sorted(given) if k not in RESUMABLE and k in old and not same(old[k], now[k])]
    if changed:
        what = ", ".join(f"--{k} {now[k]} (the checkpoint has {old[k]})" for k in changed)
        raise data.UsageError(f"{flag}: {what}; {advice}")


def resume_config(ckpt, cfg, mcfg, given):
    """The stopped run's configs; a flag given now that would change the run is refused [3.1]."""
    refuse_changes(given, {**ckpt["train_config"], **ckpt["config"]}, {**asdict(cfg), **asdict(mcfg)},
                   "--resume", f"leave these flags out to continue the run in {cfg.out}, "
                   "or start a new run in another --out")
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    kept = {k: tuple(v) if fields[k].type is tuple else v for k, v in ckpt["train_config"].items()
            if k in fields and k not in given and k not in THIS_MACHINE}
    return dataclasses.replace(cfg, **kept), M.config_from_dict(ckpt["config"])


def stage_two_codec(stage1, cfg, given):
    """Stage 2 predicts targets of the codec stage 1 was trained with: the same codec, or a refusal."""
    source = stage1["encodec"]
    if cfg.encodec == source:
        return cfg
    if "encodec" in given:
        raise data.UsageError(f"--encodec {cfg.encodec}: the stage-1 checkpoint {cfg.init_from} was trained "
                              f"with the codec {source!r}, and stage 2 must use it; leave --encodec out")
    return dataclasses.replace(cfg, encodec=source)


def trim_metrics(out, step):
    """Keep the metrics of steps up to `step`: a killed run logged past its last checkpoint."""
    path = os.path.join(out, "metrics.jsonl")
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()
    keep = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            pass  # a line torn by the kill
    if len(keep) < len(lines):
        data.write_atomic(path, lambda f: f.write("".join(keep).encode()))


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
    """Indexed audio files -> held-out split -> raw crops or cached crops, with masks [3.1].

    The file index (path, sample rate, length of every file) is built once, by rank 0, and then
    only loaded: a start reads no audio header, whatever the number of files.
    """
    index = cfg.index or data.default_index(cfg.data)
    if rank == 0:
        if "demo" in cfg.data:
            data.list_audio(["demo"])  # rank 0 writes ./demo_audio once; kmeans.py finds the same files
        print(f"file index {index} (rebuild: python data.py index --data {' '.join(cfg.data)} "
              f"--out {index})", flush=True)
        data.ensure_index(cfg.data, index)
    barrier()
    files, skipped = data.read_index(index, cfg.data)
    groups = ([np.flatnonzero(files.source == s) for s in range(len(cfg.data))] if cfg.data_weights
              else [np.arange(len(files))])  # file positions of each mixed source
    splits = [data.readable_holdout(files, g, cfg.val_files, cfg.seed) for g in groups]
    if cfg.cache and rank == 0:
        data.build_cache(codec, files.paths.take(np.concatenate([i for s in splits for i in s])).tolist(), cfg.cache)
    barrier()

    def crops(positions, seed, n_skipped=0):
        store, chosen = cfg.kmeans_store or None, files.take(positions, n_skipped)
        if cfg.cache:
            return data.CachedCropDataset(cfg.cache, seed=seed, extra_store=store, paths=chosen.paths)
        return data.CropDataset(chosen, seed=seed, extra_store=store)
    n_skipped = [sum(skipped)] if not cfg.data_weights else skipped
    train = [crops(train, cfg.seed, k) for (train, _), k in zip(splits, n_skipped)]
    train = data.mix_datasets(train, cfg.data_weights or None, cfg.seed) if cfg.data_weights else train[0]
    valid = crops(np.concatenate([valid for _, valid in splits]), cfg.seed + 1)
    train_files = files.take(np.concatenate([train for train, _ in splits]))
    return MaskedCrops(train, mcfg, cfg.seed), MaskedCrops(valid, mcfg, cfg.seed + 1), train_files


def epoch_plan(n_items, cfg, micro_batch, rank, world, epoch, first_step):
    """This rank's micro-batches for the steps of one epoch from first_step on: [[indices, ...], ...].

    Step s takes the window [s * B, (s + 1) * B) of the epoch's permutation (B the global batch)
    and rank r every world-th item of it, so a step's items never depend on the number of GPUs.
    """
    order = np.random.default_rng([cfg.seed, epoch]).permutation(n_items)  # (seed, epoch) jointly
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
        raise data.UsageError(f"--batch_size {cfg.batch_size}: more than the {len(dataset)} training crops")
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
        if not (extra[~padding] >= 0).all():  # python -O must not remove this check
            raise ValueError("frames without k-means targets: the --kmeans_store does not match "
                             "these files (rerun kmeans.py on them)")
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
    crops = data.CropDataset(paths, seed=cfg.seed)
    pick = torch.randperm(len(crops), generator=torch.Generator().manual_seed(cfg.seed))[: cfg.gamma_clips]
    picked = [crops[int(i)] for i in pick]
    wav = torch.stack([c.wav for c in picked]).to(device)  # (n, CROP_SAMPLES)
    lengths = torch.stack([(~c.padding).sum() * M.HOP for c in picked])  # (n,) real samples, whole frames
    gamma = M.estimate_gamma(codec, wav, mcfg.Q, lengths=lengths)  # the zero padding of short crops left out
    return tuple(round(float(g), 6) for g in gamma / gamma.sum())


def save_checkpoint(cfg, step, model, opt, scaler, mcfg, codec):
    """Atomically (fsync'd temporary file, then rename) write everything a resume needs; keep the last K."""
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
             "step": step, "config": asdict(mcfg), "train_config": asdict(cfg), "encodec": codec.source,
             "gamma_q": list(mcfg.gamma_q), "rng": torch.get_rng_state()}
    path = os.path.join(cfg.out, f"ckpt-{step:08d}.pt")
    data.write_atomic(path, lambda f: torch.save(state, f))  # never half a checkpoint under this name
    for old in sorted(glob.glob(os.path.join(cfg.out, "ckpt-*.pt")))[: -cfg.keep_last]:
        os.remove(old)
    return path


# ---------------------------------------------------------------- one optimizer step
def train_step(ddp_model, batches, codec, mcfg, cfg, opt, scaler, autocast, device):
    """Accumulate over this rank's micro-batches (DDP syncs only on the last), then step [3.1].

    |M| and T are counted over the whole batch, every micro-batch of every GPU [2.3]: each
    micro-batch then contributes its share of L, and the shares add up to the batch's loss.
    Returns the step's statistics for the whole batch:
    [loss, masked loss (S), unmasked loss (S), masked accuracy (S)].
    """
    counts = count_frames(batches).to(device)
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
        stats = stats + torch.cat([out.loss.detach()[None], out.masked_loss, out.unmasked_loss,
                                   out.masked_acc]).float()
    if world > 1:
        dist.all_reduce(stats)  # every GPU's shares add up to the batch's figures
    if not torch.isfinite(stats[0]):  # stop before the step: the model and last checkpoint stay good
        return stats
    if cfg.clip_grad:  # Deviation only when switched on: the paper does not clip
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(ddp_model.parameters(), cfg.clip_grad)
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)
    return stats


def count_frames(batches):
    """(|M|, T - |M|): hidden and shown frames of some micro-batches, padding in neither [2.3]."""
    counts = torch.zeros(2, dtype=torch.int64)
    for item, mask in batches:
        real = ~item.padding
        counts += torch.stack([(mask & real).sum(), (~mask & real).sum()])
    return counts


@torch.no_grad()
def validate(model, dataset, codec, mcfg, device, micro_batch, autocast):
    """Loss and masked accuracy on the held-out files: fixed crops, fixed masks, and |M| and T
    counted over the whole held-out set, so the figures do not depend on the micro-batch size."""
    dataset.set_epoch(0)
    loader = lambda: DataLoader(dataset, batch_size=micro_batch, num_workers=0)
    counts = tuple(count_frames(loader()).to(device))  # a first, cheap pass: crops and masks only
    total = 0
    for batch in loader():
        with autocast:
            out = model(*inputs_and_targets(batch, codec, mcfg, device), counts=counts)
        total = total + torch.cat([out.loss.float()[None], out.masked_acc.float()])  # shares add up
    return [total[0].item(), total[1:].mean().item()]


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
def build_model(cfg, mcfg, ckpt, stage1, codec, train_paths, device):
    """Resumed, stage 2 from the stage-1 weights, or fresh with gamma_q chosen -> (model, mcfg)."""
    if ckpt is not None:
        model = M.EnCodecMAE(mcfg)
        model.load_state_dict(ckpt["model"])  # strict
    elif stage1 is not None:  # self-training: stage-1 weights plus a k-means stream [2.3]
        model = M.EnCodecMAE(M.config_from_dict(stage1["config"]))
        model.load_state_dict(stage1["model"])  # strict
        model = M.add_kmeans_stream(model)
    else:
        mcfg = dataclasses.replace(mcfg, gamma_q=choose_gamma(cfg, mcfg, codec, train_paths, device))
        model = M.EnCodecMAE(mcfg)
    return model.to(device), model.cfg


def print0(rank, *args):
    if rank == 0:
        print(*args, flush=True)


def starting_point(cfg, mcfg, given, rank):
    """Where the run starts -> (cfg, mcfg, resume checkpoint or None, stage-1 checkpoint or None).

    Only checkpoints are read here (no codec, no data), so a wrong flag still costs one line.
    """
    ckpt = stage1 = None
    if cfg.resume:
        path, ckpt = newest_checkpoint(cfg.out, rank)
        if ckpt is None:
            print0(rank, f"--resume: no checkpoint in {cfg.out} yet, starting from step 0")
        else:
            cfg, mcfg = resume_config(ckpt, cfg, mcfg, given)
            print0(rank, f"resuming from {path} at step {ckpt['step']}")
    if ckpt is None and cfg.init_from:
        stage1 = read_checkpoint(cfg.init_from, "--init_from")
        cfg = stage_two_codec(stage1, cfg, given)
        refuse_changes(given, stage1["config"], asdict(mcfg), "--init_from",
                       "stage 2 continues the stage-1 model; leave these flags out")
        old = M.config_from_dict(stage1["config"])
        mcfg = dataclasses.replace(old, n_kmeans_streams=old.n_kmeans_streams + 1)
        print0(rank, f"stage 2 from {cfg.init_from}: its model config and codec {cfg.encodec!r}, "
                     f"S = {mcfg.n_streams} streams")
    return cfg, mcfg, ckpt, stage1


def main(argv=None):
    """Parse and check every flag -> resume point -> ranks and device -> data -> model -> loop."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["plot-curves"]:
        if len(argv) < 4 or argv[-2] != "--out":
            raise data.UsageError("usage: python train.py plot-curves METRICS.jsonl [METRICS.jsonl ...] --out FIG.png")
        return plot_curves(argv[1:-2], argv[-1])
    cfg, mcfg, given = parse_args(argv)
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    check_flags(cfg, world)
    if cfg.bench:
        return benchmark(cfg, mcfg, setup_distributed(cfg)[2])
    cfg, mcfg, ckpt, stage1 = starting_point(cfg, mcfg, given, rank)
    check_flags(cfg, world)  # a resumed config comes from the checkpoint: its paths may have gone
    rank, world, device = setup_distributed(cfg)
    extra = derived(cfg, world)
    os.makedirs(cfg.out, exist_ok=True)
    if rank == 0 and cfg.resume:
        trim_metrics(cfg.out, ckpt["step"] if ckpt else 0)  # each step is logged once
    torch.manual_seed(cfg.seed)
    codec = data.load_codec(cfg.encodec).to(device)  # the random codec's seed stays 0: evaluate.py rebuilds it

    train_set, val_set, train_paths = build_datasets(cfg, mcfg, codec, rank)
    skipped = train_set.crops.n_skipped + val_set.crops.n_skipped  # both splits
    model, mcfg = build_model(cfg, mcfg, ckpt, stage1, codec, train_paths, device)
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
            last = max(glob.glob(os.path.join(cfg.out, "ckpt-*.pt")), default=None)
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


def gemm_shapes(mcfg, B, T=M.CROP_FRAMES):
    """(rows, in, out) of each distinct matrix product in a training step's forward pass [2.2]."""
    D, F, S, K = mcfg.d_model, mcfg.ff_dim, mcfg.n_streams, mcfg.K
    N = T - round(mcfg.M_prop * T) if mcfg.mask_mode == "drop" else T
    block = lambda n: [(B * n, D, 3 * D), (B * n, D, D), (B * n, D, F), (B * n, F, D)]
    return [(B * T, mcfg.d_codec, D)] + block(N) + [(B * N, D, D)] + block(T) + [(B * T, D, S * K)]


def gemm_peak(shapes, device, dtype, reps=5):
    """The device's matmul throughput (FLOP/s) on the step's own GEMM shapes: best of reps runs.

    The best run, not the median: noise (another process, a clock dip) only ever slows a run
    down, so the fastest run is the closest to what the hardware can do on these shapes.
    """
    pairs = [(torch.randn(m, k, device=device, dtype=dtype), torch.randn(n, k, device=device, dtype=dtype))
             for m, k, n in shapes]
    run = lambda: [F.linear(x, w) for x, w in pairs]  # the kernels nn.Linear calls
    run()  # warm-up
    best = min(timed(run, device, reps=1) for _ in range(reps))
    return sum(2 * m * k * n for m, k, n in shapes) / best


def mae_flops(mcfg, B, T=M.CROP_FRAMES):
    """Model FLOPs of one training step (forward + backward = 3 x forward) [2.2]."""
    D, F, S, K = mcfg.d_model, mcfg.ff_dim, mcfg.n_streams, mcfg.K
    N = T - round(mcfg.M_prop * T) if mcfg.mask_mode == "drop" else T
    layer = lambda n: 2 * n * (4 * D * D + 2 * D * F) + 4 * n * n * D  # linears + attention
    forward = (2 * T * mcfg.d_codec * D + mcfg.n_enc_layers * layer(N) + 2 * T * D * D
               + mcfg.n_dec_layers * layer(T) + 2 * T * D * S * K)
    return 3 * B * forward


def utilization_peak(achieved, peaks, remeasure, n_shapes):
    """The yardstick for utilization and how it was taken; never below what the step achieved.

    A step faster than the measured peak means the peak was measured badly (noise): measure
    again, and if the step still wins, its own rate is the honest peak (100%).
    """
    how = (f"best of 5 runs of the step's {n_shapes} GEMM shapes, before and after timing the step"
           f" ({peaks[0] / 1e9:.0f} and {peaks[1] / 1e9:.0f})")
    peak = max(peaks)
    if achieved > peak:
        again = remeasure()
        how += f"; the step beat it, re-measured best of 10: {again / 1e9:.0f}"
        peak = max(peak, again)
    if achieved > peak:
        how += "; the step still beat it, so its own rate is the peak"
        peak = achieved
    return peak, how


def benchmark(cfg, mcfg, device):
    """Where a training step's time goes: codec, MAE forward/backward, optimizer, cached data."""
    import resource
    import tempfile
    B = cfg.batch_size
    autocast, _ = autocast_for(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
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
    shapes = gemm_shapes(mcfg, B)
    peak_before = gemm_peak(shapes, device, dtype)
    t_mae = timed(forward_backward, device)
    peak, how = utilization_peak(mae_flops(mcfg, B) / t_mae, [peak_before, gemm_peak(shapes, device, dtype)],
                                 lambda: gemm_peak(shapes, device, dtype, reps=10), len(shapes))
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
    rows = [("matmul peak (measured)", f"{peak / 1e9:.0f} GFLOP/s ({dtype}); {how}"),
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
