"""The research-run layer of train.py (beside the paper): what a long run on a shared machine needs.

train.py enters it at named points (ResearchRun's methods; train.PaperRun has the same ones, doing
nothing, for when extras/ is deleted):
- start: a new run never mixes its files with another run's in --out; --resume continues from the
  newest checkpoint that loads, takes the flags left out from it and refuses a flag that would
  change what the run computes;
- check_stage2: stage 2 continues the stage-1 model on its codec, so a flag that differs is refused;
- folder: --out belongs to this run alone (an OS lock), a killed run's temporary files go, and on
  --resume its metrics past the checkpoint; SIGTERM, SIGUSR1 or Ctrl-C stop the run after the step
  in progress, saved;
- restore / check_finite / stop_signal / stopped: the optimizer state of a resumed run; a NaN or inf
  loss stops the run before a checkpoint holds it; the signal, agreed by all ranks; the exit line
  and status (128 + the signal).
"""
import contextlib
import dataclasses
import fcntl
import glob
import json
import os
import signal
import socket
import sys
import warnings

import torch
import torch.distributed as dist

import data as D
import model as M
from data import UsageError
from extras.cli import remove_temporaries

RESUME_KEYS = ("model", "config", "encodec", "optimizer", "scaler", "step", "train_config", "rng")
THIS_MACHINE = {"out", "device", "workers", "compile", "resume"}  # never taken from a checkpoint
# Fields that may differ between a run and its resumption: they do not change what it computes.
# A run folder may move (out), so may a cache (same frames), the file index and the stage-1 file.
RESUMABLE = {"steps", "log_every", "val_every", "ckpt_every", "keep_last", "workers", "device",
             "compile", "resume", "grad_accum", "out", "cache", "index", "init_from", "tensorboard"}


class ResearchRun:
    """The hooks train.py calls, in the order it calls them."""

    def __init__(self, rank, world, group):
        self.rank = rank
        self.world = world
        self.group = group  # train.wait_group(): a gloo group, so a CPU flag needs no GPU sync
        self.signals = []  # received: the loop stops after the step in progress

    def start(self, cfg, mcfg, given):
        """-> (cfg, mcfg, the checkpoint to resume or None), reading checkpoints only."""
        theirs = sorted(glob.glob(os.path.join(cfg.out, D.CHECKPOINTS)))
        history = theirs + glob.glob(os.path.join(cfg.out, "metrics.jsonl"))
        if not cfg.resume and history:  # a new run here would mix its files with another's
            newest = (theirs or history)[-1]  # the newest checkpoint, else the metrics
            raise UsageError(f"--out {cfg.out}: holds another run ({os.path.basename(newest)})"
                             "; add --resume to continue it, or choose a new --out (nothing there "
                             "is deleted)")
        if not cfg.resume:
            return cfg, mcfg, None
        ckpt = newest_checkpoint(theirs, self.rank)
        if ckpt is None:
            self.say(f"--resume: no checkpoint in {cfg.out} yet, starting from step 0")
            return cfg, mcfg, None
        old = {**ckpt["train_config"], **ckpt["config"]}
        now = {**dataclasses.asdict(cfg), **dataclasses.asdict(mcfg)}
        refuse_changes(given - RESUMABLE, old, now, "--resume", "leave these flags out to "
                       f"continue the run in {cfg.out}, or start a new run in another --out")
        names = {f.name for f in dataclasses.fields(cfg)}
        kept = {k: tuple(v) if isinstance(v, list) else v for k, v in ckpt["train_config"].items()
                if k in names and k not in given and k not in THIS_MACHINE}
        return dataclasses.replace(cfg, **kept), M.ModelConfig(**ckpt["config"]), ckpt

    def check_stage2(self, given, stage1, cfg, mcfg):
        """Stage 2 [2.3] continues the stage-1 model on its codec: a flag given otherwise is refused."""
        old = {**stage1["config"], "encodec": stage1["encodec"]}
        now = {**dataclasses.asdict(mcfg), **dataclasses.asdict(cfg)}
        refuse_changes(given, old, now, "--init_from",
                       "stage 2 continues the stage-1 model on its codec; leave these flags out")

    @contextlib.contextmanager
    def folder(self, cfg, step):
        """--out for this run alone, and stopping after the step when a signal comes."""
        with owned_folder(cfg, step) if self.rank == 0 else contextlib.nullcontext():
            with contextlib.ExitStack() as restore:  # the handlers before come back however we end
                for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
                    restore.callback(signal.signal, s, signal.signal(s, self.note))
                yield

    def note(self, signum, frame):
        """A stop signal: finish the step in progress; a second Ctrl-C stops at once."""
        if signum == signal.SIGINT and self.signals:
            raise KeyboardInterrupt(signum)
        self.signals.append(signum)

    def restore(self, ckpt, opt, scaler):
        """The optimizer, the loss scale and the RNG of a resumed checkpoint -> its step."""
        opt.load_state_dict(ckpt["optimizer"])
        if ckpt["scaler"]:  # {} from a CPU or bf16 run: an fp16 run starts its loss scale afresh
            scaler.load_state_dict(ckpt["scaler"])
        torch.set_rng_state(ckpt["rng"])
        return ckpt["step"]

    def check_finite(self, mean, step, n_steps, out):
        """Stop on a NaN or inf loss (the mean of the steps since the last log line), before a
        checkpoint could hold the model it made."""
        if not torch.isfinite(mean[0]):
            last = max(glob.glob(os.path.join(out, D.CHECKPOINTS)), default="none yet")
            raise SystemExit(f"loss is {mean[0].item()} in steps {step - n_steps + 1}-{step}: "
                             f"stopping. The last good checkpoint ({last}) is intact; try a lower "
                             "--lr or --clip_grad.")

    def stop_signal(self):
        """The signal any rank received (0: none), the same on every rank."""
        stop = torch.tensor([self.signals[-1] if self.signals else 0])
        if self.world > 1:
            dist.all_reduce(stop, op=dist.ReduceOp.MAX, group=self.group)
        return int(stop)

    def stopped(self, signum, step, out):
        """Preempted after `step`, which is saved: exit as a shell reports a signal's end."""
        if self.world > 1:
            dist.barrier(group=self.group)
        if self.rank == 0:
            print(f"train.py: stopped by {signal.Signals(signum).name} after step {step}, saved "
                  f"it; continue with: python train.py --resume --out {out}", file=sys.stderr,
                  flush=True)
        raise SystemExit(128 + signum)

    def say(self, text):
        if self.rank == 0:
            print(text, flush=True)


def refuse_changes(given, old, now, flag, advice):
    """Flags given now that differ from what a checkpoint was trained with -> one UsageError."""
    changed = [k for k in sorted(given) if k in old and json.dumps(old[k]) != json.dumps(now[k])]
    if changed:
        what = ", ".join(f"--{k} {now[k]} (the checkpoint has {old[k]})" for k in changed)
        raise UsageError(f"{flag}: {what}; {advice}")


def newest_checkpoint(paths, rank=0):
    """The newest of a run's checkpoints (oldest first) that loads -> dict, naming each one it
    passes over; None if there are none yet, a UsageError if none of them loads."""
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
        names = ", ".join(map(os.path.basename, paths))
        raise UsageError(f"--resume: none of {names} in {os.path.dirname(paths[0])} loads (why: "
                         "above); nothing was changed: move them away, or start in another --out")
    return None


@contextlib.contextmanager
def owned_folder(cfg, step):
    """--out for this run alone: an OS lock on OUT/train.lock (our pid and host written in it),
    which the system releases however the run ends; a killed run's temporary files go, and on
    --resume its metrics past `step`."""
    with open(os.path.join(D.make_folder(cfg.out), "train.lock"), "a+") as lock:
        lock.seek(0)
        held = lock.read().strip()  # what the last run wrote: empty once it ended normally
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # on every host sharing the disk
        except BlockingIOError:
            raise UsageError(f"--out {cfg.out}: in use by {held or 'another run'} ({lock.name}); "
                             "wait for that run, or choose another --out") from None
        if held:
            warnings.warn(f"taking over the stale lock {lock.name} of {held}: that run is gone")
        lock.truncate(0)
        print(f"pid {os.getpid()} on {socket.gethostname()}", file=lock, flush=True)
        remove_temporaries(cfg.out, r"ckpt-\d{8}\.pt|metrics\.jsonl")
        if cfg.resume:
            trim_metrics(cfg.out, step)  # each step is logged once
        try:
            yield
        finally:  # an end the run saw (not a kill): the next run finds nothing to take over
            lock.truncate(0)


def trim_metrics(out, step):
    """Keep the metrics of steps up to `step` in OUT/metrics.jsonl (atomically; torn lines go)."""
    path = os.path.join(out, "metrics.jsonl")
    keep = []
    with open(path) if os.path.exists(path) else contextlib.nullcontext([]) as f:
        for line in f:
            with contextlib.suppress(json.JSONDecodeError, KeyError, TypeError):  # torn by a kill
                if json.loads(line)["step"] <= step:
                    keep.append(line)
    D.write_atomic(path, lambda f: f.write("".join(keep).encode()))
