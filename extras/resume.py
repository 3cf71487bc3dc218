"""`train.py --resume` (beside the paper): a run continues from the newest checkpoint in its folder that loads.

Flags left out come from that checkpoint, a flag that would change what the run computes is refused,
and metrics.jsonl is cut back to the checkpoint's step, so each step is logged once. A folder whose
checkpoints all fail to load is refused: a fresh run there would cut the stopped run's history away.
"""
import contextlib
import dataclasses
import json
import os

import torch

import data as D
import model as M
from data import UsageError

RESUME_KEYS = ("model", "config", "encodec", "optimizer", "scaler", "step", "train_config", "rng")
THIS_MACHINE = {"out", "device", "workers", "compile", "resume", "bench"}  # never taken from a checkpoint
# Fields that may differ between a run and its resumption: they do not change what it computes.
# A run folder may move (out), so may a cache (same frames), the file index and the stage-1 file.
RESUMABLE = {"steps", "log_every", "val_every", "ckpt_every", "keep_last", "workers", "device",
             "compile", "resume", "grad_accum", "out", "cache", "index", "init_from", "bench", "tensorboard"}


def newest_checkpoint(paths, rank=0):
    """The newest of a run's checkpoints (oldest first) that loads -> dict, naming each one it passes over;
    None if there are none yet, a UsageError if none of them loads."""
    for path in paths[::-1]:
        try:
            ckpt = D.load_checkpoint(path, RESUME_KEYS)[1]
            if rank == 0:
                print(f"resuming from {path} at step {ckpt['step']}", flush=True)
            return ckpt
        except ValueError as err:
            if rank == 0:
                print(f"--resume: {err}; passing over it to the previous one", flush=True)
    if paths:
        raise UsageError(f"--resume: none of {', '.join(map(os.path.basename, paths))} in {os.path.dirname(paths[0])} "
                         "loads (why: above); nothing was changed: move them away, or start in another --out")
    return None


def resume_point(cfg, mcfg, given, paths, refuse_changes, rank=0):
    """-> (cfg, mcfg, checkpoint) as the run was trained, or (cfg, mcfg, None) before its first checkpoint;
    refuse_changes(given, old, now, flag, advice) is train.py's check of the flags given now."""
    ckpt = newest_checkpoint(paths, rank)
    if ckpt is None:
        if rank == 0:
            print(f"--resume: no checkpoint in {cfg.out} yet, starting from step 0", flush=True)
        return cfg, mcfg, None
    refuse_changes(given - RESUMABLE, {**ckpt["train_config"], **ckpt["config"]}, {**dataclasses.asdict(cfg),
                   **dataclasses.asdict(mcfg)}, "--resume", f"leave these flags out to continue the run in {cfg.out}, "
                   "or start a new run in another --out")
    fields = {f.name for f in dataclasses.fields(cfg)}
    kept = {k: tuple(v) if isinstance(v, list) else v for k, v in ckpt["train_config"].items()
            if k in fields and k not in given and k not in THIS_MACHINE}
    return dataclasses.replace(cfg, **kept), M.ModelConfig(**ckpt["config"]), ckpt


def restore_state(ckpt, opt, scaler):
    """The optimizer, the loss scale and the RNG of a resumed checkpoint, so the run continues exactly."""
    opt.load_state_dict(ckpt["optimizer"])
    if ckpt["scaler"]:  # {} from a CPU or bf16 run: an fp16 run starts its loss scale afresh
        scaler.load_state_dict(ckpt["scaler"])
    torch.set_rng_state(ckpt["rng"])


def trim_metrics(out, step):
    """Keep the metrics of steps up to `step` in OUT/metrics.jsonl (atomically; torn lines dropped)."""
    path, keep = os.path.join(out, "metrics.jsonl"), []
    with open(path) if os.path.exists(path) else contextlib.nullcontext([]) as f:
        for line in f:
            with contextlib.suppress(json.JSONDecodeError, KeyError, TypeError):  # a line torn by the kill
                keep += [line] if json.loads(line)["step"] <= step else []
    D.write_atomic(path, lambda f: f.write("".join(keep).encode()))
