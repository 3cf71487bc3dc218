"""Downstream evaluation, section 3.2: frozen embeddings, HEAR tasks, MLP probes, Table 1.

python evaluate.py --tasks-dir TASKS --upstream EC --upstream ECMAE-R:base --upstream ckpt.pt
reads HEAR 2021 task folders, writes OUT/embeddings/<upstream>/<task>/<split>.npz (reused on a
rerun) and OUT/results.json (every grid point's validation score, every fold's test score), and
prints Table 1 with standard errors. It is also a HEAR module (`hear-validator evaluate --model
ckpt.pt`). `embed_file(load_upstream(spec), path)` embeds one file; `python extras/embed.py` a
folder of them.
"""
import copy
import csv
import json
import math
import os
import random
import re
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from itertools import groupby
from pathlib import Path

import numpy as np
import torch
from torch import nn

import data as D
from data import AudioError, UsageError, at_least, probe_audio, read_audio, resample_24k
from data import write_atomic
from model import CROP_FRAMES, CROP_SAMPLES, HOP, SAMPLE_RATE, SIZES, EnCodecMAE
from model import codec_embed_audio, embed_audio, make_config

EMBED_SEGMENT = 15 * CROP_SAMPLES  # embed_file reads a minute at a time: whole 4-s chunks


# ---------------------------------------------------------------- 3.2 upstreams: frozen embeddings
class Upstream(nn.Module):
    """A frozen upstream: 24-kHz audio in, frames at 75 Hz out, scene embedding = their mean [3.2].
    The HEAR module wraps it in a HearModel, which takes 48-kHz audio."""

    sample_rate = SAMPLE_RATE  # what frames() takes (HearModel.sample_rate is HEAR's 48000)

    def __init__(self, name, codec, mae=None, layer=-1, key=""):
        super().__init__()
        self.name = name
        self.codec = codec  # None for a model with a filterbank input [4]: it needs no codec
        self.mae = mae
        self.layer = layer
        self.key = key  # what its embedding cache is kept under
        width = int(codec.dim if mae is None else mae.cfg.d_model)
        self.scene_embedding_size = self.timestamp_embedding_size = width
        self.eval()

    @torch.no_grad()
    def frames(self, wav, file_samples=None):
        """wav (B, n) at 24 kHz -> (B, T, D) frames at 75 Hz, each 4-s chunk embedded alone [3.2].
        A piece of a longer file (file_samples, embed_pieces) gives the same frames: a chunk never
        sees the rest of the file."""
        if self.codec is None:  # a filterbank input [4]: 4-s chunks of audio, as embed_audio cuts
            return self.finite(embed_audio(self.mae, None, wav, layer=self.layer))
        return self.frames_from_codec(codec_embed_audio(self.codec, wav))

    @torch.no_grad()
    def frames_from_codec(self, feats):
        """Codec frames (B, T, 128) -> (B, T, D), each 300-frame (4-s) piece alone, as
        model.embed_audio cuts audio."""
        if self.mae is None:  # EC: the codec encoder's own frames (Table 1, first row)
            return feats
        pieces = [self.mae.embed(p, layer=self.layer) for p in feats.split(CROP_FRAMES, 1)]
        return self.finite(torch.cat(pieces, 1))  # (B, T, D)

    def finite(self, frames):
        """read_audio refuses NaN and huge samples: NaN embeddings mean the model is broken."""
        if not torch.isfinite(frames).all():
            raise ValueError(f"{self.name}: NaN/inf embeddings")
        return frames


def real_frames(n_samples, rate=SAMPLE_RATE):
    """Frames centred inside n_samples of audio at `rate` (at least one) [HEAR]: the codec's last
    frame can sit past the end, on padding, but HEAR's timestamps stay inside, and the scene
    embedding pools these."""
    return max(1, (2 * n_samples * SAMPLE_RATE + HOP * rate) // (2 * HOP * rate))


def load_upstream(spec, encodec=None, layer=-1, seed=0, device="cpu"):
    """"EC", "ECMAE-R:<size>[:<input>]" (random init, seeded; input encodec, mel or spec), a
    train.py checkpoint path, or "released:PATH" (the authors' released models: their network,
    extras/released.py; their HEAR wrapper pools all frames)."""
    if spec.startswith("released:"):
        from extras.released import load_released
        return load_released(spec.split(":", 1)[1], layer, device, encodec)
    source = encodec or "pretrained"  # never a silent random codec: ask for "random"
    mae = None
    key = f"seed{seed}"
    if spec.startswith("ECMAE-R:"):
        size, _, kind = spec.split(":", 1)[1].partition(":")
        torch.manual_seed(seed)  # ECMAE-R: the same random MAE on every run (Table 1, row 2)
        mae = EnCodecMAE(make_config(size, input=kind or "encodec"))
    elif spec != "EC":
        mae, ckpt = D.load_checkpoint(spec)  # a ValueError naming the file and what is wrong
        source = encodec or ckpt["encodec"]  # the codec it was trained on, unless told otherwise
        codec_fed = mae.cfg.input == "encodec"
        if codec_fed and (source == "random") != (ckpt["encodec"] == "random"):
            raise ValueError(f"{spec} was trained on codec {ckpt['encodec']!r}, not {source!r}")
        key = f"{os.path.getsize(spec)}-{int(os.path.getmtime(spec))}"  # a rewritten file re-embeds
    if mae is not None and not (layer == -1 or 1 <= layer <= mae.cfg.n_enc_layers):
        raise ValueError(f"--layer {layer}: choose -1 (last) or 1..{mae.cfg.n_enc_layers}")
    name = spec if layer == -1 or mae is None else f"{spec}@layer{layer}"
    codec = None
    if mae is None or mae.cfg.input == "encodec":  # a filterbank input needs no codec [4]
        codec = D.load_codec(source)
    else:
        source = mae.cfg.input
    # "real-frames": the scene embedding pools frames centred inside the audio (older caches: all)
    key = f"{name}|{source}|{key}|real-frames"
    return Upstream(name, codec, mae, layer, key=key).to(device)


# ---------------------------------------------------------------- HEAR tasks
@dataclass
class Task:
    """A HEAR task folder, as far as a scene-level probe needs it."""

    name: str
    path: Path
    multilabel: bool  # prediction_type "multilabel" (FSD50K) or "multiclass"
    metric: str  # the first of metadata["evaluation"]: the primary score
    vocab: dict  # label -> column
    folds: list  # [(train splits, valid splits, test splits)]
    audio_dir: Path  # the sample-rate folder we read (None: the task has no audio)

    @property
    def splits(self):  # every split its folds name, sorted
        return sorted({s for fold in self.folds for part in fold for s in part})


def read_task(path):
    """A HEAR 2021 task folder -> Task, with clear errors for what we cannot evaluate."""
    path = Path(path)
    meta = json.loads((path / "task_metadata.json").read_text())
    kind = (meta["embedding_type"], meta["prediction_type"])
    if kind not in (("scene", "multiclass"), ("scene", "multilabel")):
        raise ValueError(f"{path}: only scene-level multiclass or multilabel tasks (Table 1), "
                         f"not {kind}")
    metric = meta["evaluation"][0]
    if metric not in METRICS:
        raise ValueError(f"{path}: primary score {metric!r} unsupported; have {sorted(METRICS)}")
    with open(path / "labelvocabulary.csv", newline="") as f:
        vocab = {str(r["label"]): int(r["idx"]) for r in csv.DictReader(f)}
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise ValueError(f"{path}/labelvocabulary.csv: idx must be 0..n-1, once each")
    rates = sorted(int(p.name) for p in path.iterdir() if p.is_dir() and p.name.isdigit())
    audio_dir = None
    if rates:  # 24 kHz needs no resampling, 48 kHz resamples 2:1; otherwise the richest folder
        preferred = [r for r in (SAMPLE_RATE, HearModel.sample_rate) if r in rates]
        audio_dir = path / str(preferred[0] if preferred else rates[-1])
    multilabel = meta["prediction_type"] == "multilabel"
    return Task(meta["task_name"], path, multilabel, metric, vocab, kfold_splits(meta), audio_dir)


def kfold_splits(meta):
    """HEAR's rule: split i tests on fold i, validates on fold i+1 (mod k), trains on the rest."""
    if meta["split_mode"] == "trainvaltest":
        return [(["train"], ["valid"], ["test"])]
    folds = sorted(meta["splits"])
    if len(folds) < 3:
        raise ValueError(f"{meta['task_name']}: k-fold needs at least 3 folds, got {folds}")
    pairs = zip(folds, folds[1:] + folds[:1])  # (test, valid)
    return [([f for f in folds if f not in (t, v)], [v], [t]) for t, v in pairs]


def read_split(task, split):
    """<split>.json -> sorted file names and multi-hot labels Y (N, C)."""
    json_path = task.path / f"{split}.json"
    entries = json.loads(json_path.read_text())
    if not entries:
        raise ValueError(f"{json_path}: the split is empty")
    files = sorted(entries)
    Y = torch.zeros(len(files), len(task.vocab))  # (N, C)
    for i, name in enumerate(files):
        labels = [str(label) for label in entries[name]]
        for label in sorted(set(labels) - set(task.vocab)):  # the first unknown label, if any
            raise ValueError(f"{json_path}: label {label!r} of {name} is not in "
                             "labelvocabulary.csv")
        if not task.multilabel and len(labels) != 1:
            raise ValueError(f"{json_path}: {name} has {len(labels)} labels in a multiclass task")
        Y[i, [task.vocab[label] for label in labels]] = 1
    return files, Y


# ---------------------------------------------------------------- 3.2 scene embeddings of a split
def slug(text):
    """A safe folder name for an upstream, a codec or a task."""
    return re.sub(r"[^A-Za-z0-9_.=-]+", "-", text).strip("-")[-80:]


def read_cache(path, key, files):
    """Cached (X (N', D), kept) of this upstream on these files, else None; it names the files
    skipped again."""
    try:
        stored = np.load(path) if path.exists() else None
        if stored is None or str(stored["key"]) != key or stored["files"].tolist() != files:
            return None
    except Exception as err:  # zero bytes, cut short, garbled: a cache, so it is embedded again
        warnings.warn(f"{path}: a damaged embedding cache ({type(err).__name__}); embedding the "
                      "split again")
        return None
    for reason in stored["skipped"].tolist():
        warnings.warn(f"skipping {reason}")
    return torch.from_numpy(stored["X"]), stored["kept"].tolist()


def pooled(upstream, frames, n, rate=SAMPLE_RATE):
    """The scene embedding of clips of n samples at `rate` [3.2]: the mean of the frames centred
    inside the audio (the authors' released models: of all frames, as their HEAR wrapper)
    -> (B, D) float32."""
    if not getattr(upstream, "pool_all_frames", False):
        frames = frames[:, :real_frames(n, rate)]
    return frames.float().mean(1)


@torch.no_grad()
def codec_batches(codec, paths, batch_size, bad):
    """(clip indices, samples at 24 kHz, codec frames (B, T, 128), or with codec None the audio
    (B, n) for an upstream with its own front end) of a split, batch_size clips at a time,
    unpadded (an embedding never depends on other clips; HEAR cuts a task's clips to one length);
    failures go to `bad`."""
    device = next(codec.parameters()).device if codec is not None else None
    for at in range(0, len(paths), batch_size):
        wavs = {}  # clip -> (n,) at 24 kHz
        for j in range(at, min(at + batch_size, len(paths))):
            try:
                if not paths[j].is_file():
                    raise AudioError(f"{paths[j]}: named in {paths[j].parent.name}.json but "
                                     "missing")
                wavs[j] = read_audio(paths[j])
            except AudioError as err:
                bad[j] = str(err)
        def length(j):
            return len(wavs[j])
        for n, same in groupby(sorted(wavs, key=length), key=length):
            same = list(same)
            wav = torch.stack([wavs[j] for j in same])  # (B, n)
            if codec is not None:
                wav = codec_embed_audio(codec, wav.to(device))  # (B, T, 128)
            yield same, n, wav


@torch.no_grad()
def embed_split(upstreams, task, split, files, cache_dir, batch_size=16, codec_cache=None):
    """Scene embeddings of a split by each upstream, cached per (upstream, task, split)
    -> [(X (N', D), kept)], kept indexing `files` (the label rows to keep); an unreadable file is
    named once and skipped. The frozen codec is most of the cost: upstreams on one codec share its
    pass, and --codec-cache keeps its frames."""
    caches = [Path(cache_dir) / slug(u.key) / slug(task.name) / f"{split}.npz" for u in upstreams]
    out = [read_cache(c, u.key, files) for c, u in zip(caches, upstreams)]
    todo = [i for i, cached in enumerate(out) if cached is None]
    if not todo:
        return out
    if task.audio_dir is None:
        raise FileNotFoundError(f"{task.path}: no <sample_rate>/ audio folder")
    paths = [task.audio_dir / split / name for name in files]
    bad = {}  # file index -> why it is skipped
    X = {i: torch.zeros(len(paths), upstreams[i].scene_embedding_size) for i in todo}  # (N, D)
    def source(u):  # an upstream with its own front end (no codec) makes a pass of its own
        return u.codec.source if u.codec is not None else u.key
    for key in dict.fromkeys(source(upstreams[i]) for i in todo):  # one codec pass per codec
        users = [i for i in todo if source(upstreams[i]) == key]
        codec = upstreams[users[0]].codec
        batches = codec_batches(codec, paths, batch_size, bad)
        if codec_cache is not None and codec is not None:  # an earlier run's frames, or kept
            from extras.codec_frames import kept_batches
            keep = Path(codec_cache) / slug(key) / slug(task.name) / f"{split}.npz"
            batches = kept_batches(keep, codec, paths, batch_size, bad, batches)
        for same, n, feats in batches:
            for i in users:
                u = upstreams[i]
                if codec is None:  # its own front end (a filterbank, the authors' models): audio
                    frames = u.frames(feats)
                else:
                    frames = u.frames_from_codec(feats)
                X[i][same] = pooled(u, frames, n).cpu()
    for j in sorted(bad):
        warnings.warn(f"skipping {bad[j]}")
    kept = [j for j in range(len(paths)) if j not in bad]
    if not kept:
        raise ValueError(f"{task.path}/{split}: no file of the split could be embedded")
    reasons = np.array([bad[j] for j in sorted(bad)], dtype=str)
    for i in todo:
        out[i] = (X[i][kept], kept)
        D.make_folder(caches[i].parent)
        arrays = dict(X=out[i][0].numpy(), kept=np.array(kept, dtype=np.int64), skipped=reasons,
                      files=np.array(files), key=np.array(upstreams[i].key))
        write_atomic(caches[i], lambda f: np.savez(f, **arrays))
    return out


# ---------------------------------------------------------------- probes: heareval's MLP grid
@dataclass
class ProbeConfig:
    """One point of heareval's probe grid."""

    hidden_layers: int = 1          # 0 = linear probe; HEAR grid {1, 2}
    lr: float = 1e-3                # Adam, no weight decay; HEAR grid {3.2e-3, 1e-3, 3.2e-4, 1e-4}
    init: str = "xavier_uniform"    # HEAR grid {xavier_uniform, xavier_normal}
    hidden_dim: int = 1024          # fixed in HEAR's grid
    dropout: float = 0.1            # after each hidden layer's BatchNorm
    batch_size: int = 1024          # clips per step
    max_epochs: int = 500           # at most
    check_every: int = 3            # epochs between validations
    patience: int = 20              # validations without improvement before stopping


def hear_grid(points=8, linear=False, seed=42, **fixed):
    """heareval's 16 points in scikit-learn ParameterGrid order, shuffled, first `points`.
    heareval seeds Python's random with 42 first; seeded with s, it searches random.Random(s)'s
    points, as --probe-seed s."""
    lrs = (3.2e-3, 1e-3, 3.2e-4, 1e-4)
    inits = ("xavier_uniform", "xavier_normal")
    if linear:  # the linear probe only searches the learning rate
        return [ProbeConfig(hidden_layers=0, lr=lr, **fixed) for lr in lrs]
    grid = [ProbeConfig(h, lr, init, **fixed) for h in (1, 2) for init in inits for lr in lrs]
    random.Random(seed).shuffle(grid)  # the same 8 points heareval's seed_everything(seed) picks
    return grid[:points]


def make_probe(D, C, cfg):
    """Linear -> BatchNorm1d -> Dropout -> ReLU per hidden layer, then Linear; Xavier gains as
    heareval."""
    init = getattr(nn.init, cfg.init + "_")
    layers = []
    width = D
    gain = 1.0  # on the input: the embedding's activation is unknown
    for _ in range(cfg.hidden_layers):
        linear = nn.Linear(width, cfg.hidden_dim)
        init(linear.weight, gain=gain)
        layers += [linear, nn.BatchNorm1d(cfg.hidden_dim), nn.Dropout(cfg.dropout), nn.ReLU()]
        width = cfg.hidden_dim
        gain = math.sqrt(2)  # later layers follow a ReLU
    out = nn.Linear(width, C)
    init(out.weight, gain=gain)
    return nn.Sequential(*layers, out)


@torch.no_grad()
def predict(probe, X, multilabel):
    """The probe's scores (N, C): sigmoids for a multilabel task, a softmax otherwise."""
    logits = probe.eval()(X)
    return torch.sigmoid(logits) if multilabel else torch.softmax(logits, 1)  # (N, C)


# ---------------------------------------------------------------- metrics (heareval's), the probe
# >>> assignment probe
def top1_accuracy(scores, Y):
    """Share of clips whose highest score is their label."""
    return (scores.argmax(1) == Y.argmax(1)).sum().item() / len(Y)


def mean_average_precision(scores, Y):
    """Macro mAP as scikit-learn's average_precision_score: sum over thresholds of
    (R_k - R_k-1) P_k; ties share a threshold, a class with no positive scores 0 (scikit-learn's
    convention)."""
    aps = []
    for s, y in zip(scores.T.double().numpy(), Y.T.numpy() > 0):
        order = np.argsort(-s, kind="mergesort")
        s = s[order]
        y = y[order]
        last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # last clip of each distinct score
        tp = np.cumsum(y)[last]
        recall = tp / max(tp[-1], 1)  # no positive: recall 0, AP 0
        precision = tp / (last + 1)
        aps.append(float(np.sum(np.diff(np.r_[0.0, recall]) * precision)))
    return float(np.mean(aps))


METRICS = {"top1_acc": top1_accuracy, "pitch_acc": top1_accuracy, "mAP": mean_average_precision}


def train_probe(X, Y, Xv, Yv, task, cfg, seed=None):
    """Adam, validated every check_every epochs, keeping the best weights. Init, dropout and
    shuffling draw on torch's global generator: seeded here if `seed` is given, else as probe_task
    (and heareval) left it."""
    if seed is not None:
        torch.manual_seed(seed)
    probe = make_probe(X.shape[1], Y.shape[1], cfg).to(X.device)
    optimizer = torch.optim.Adam(probe.parameters(), lr=cfg.lr, fused=True)  # one kernel per step
    loss_fn = nn.BCEWithLogitsLoss() if task.multilabel else nn.CrossEntropyLoss()
    target = Y if task.multilabel else Y.argmax(1)
    # Deviation: heareval feeds the training clips in a fixed order; we reshuffle every epoch, in
    # near-equal batches so BatchNorm never sees a lone clip (the same if a split fits in a batch).
    n_batches = math.ceil(len(X) / cfg.batch_size)
    best = -math.inf
    best_state = None
    best_epoch = -1
    waited = 0  # validations since the last improvement
    for epoch in range(cfg.max_epochs):
        probe.train()
        for idx in torch.randperm(len(X)).to(X.device).tensor_split(n_batches):
            loss = loss_fn(probe(X[idx]), target[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        # Every check_every epochs, skipping the tail as heareval; a shorter run once, at its end.
        last_chance = epoch + 1 == cfg.max_epochs and best_state is None
        if (epoch + 1) % cfg.check_every and not last_chance:
            continue
        score = METRICS[task.metric](predict(probe, Xv, task.multilabel).cpu(), Yv.cpu())
        if score > best:  # strict, as heareval's checkpoint and early-stopping callbacks
            best = score
            best_state = copy.deepcopy(probe.state_dict())
            best_epoch = epoch
            waited = 0
        else:
            waited += 1
            if waited >= cfg.patience:
                break
    probe.load_state_dict(best_state)
    return probe, best, best_epoch
# <<< assignment probe


def probe_task(data, task, grid, device="cpu", seed=42):
    """HEAR protocol: grid on the first split, winner retrained on the others, mean test score
    [3.2]. One seed per task, then one stream, as heareval's runner: grid points start from
    independent inits."""
    def joined(splits, i):  # the embeddings (i = 0) or labels (i = 1) of some splits
        return torch.cat([data[s][i] for s in splits]).to(device)

    def fit(train, valid, cfg):
        return train_probe(joined(train, 0), joined(train, 1), joined(valid, 0), joined(valid, 1),
                           task, cfg)

    torch.manual_seed(seed)
    searched = [(cfg, *fit(*task.folds[0][:2], cfg)) for cfg in grid]
    winner = max(searched, key=lambda r: r[2])  # the first best, as a stable sort keeps it
    folds = []
    for i, (train, valid, test) in enumerate(task.folds):
        if i == 0:
            _, probe, valid_score, epoch = winner
        else:
            probe, valid_score, epoch = fit(train, valid, winner[0])
        Yt = joined(test, 1).cpu()
        scores = predict(probe, joined(test, 0), task.multilabel).cpu()  # (N, C)
        test_score = METRICS[task.metric](scores, Yt)
        folds.append(dict(test=test, valid=valid_score, epoch=epoch, test_score=test_score,
                          n_test=len(Yt)))
    mean = float(np.mean([f["test_score"] for f in folds]))
    n = sum(f["n_test"] for f in folds)
    # The binomial SE of an accuracy over all test clips (none for mAP): upstreams less than
    # 2.8 SE apart tie here.
    se = math.sqrt(mean * (1 - mean) / n) if METRICS[task.metric] is top1_accuracy else None
    grid_scores = [dict(config=asdict(c), valid=v, epoch=e) for c, _, v, e in searched]
    return dict(metric=task.metric, test=mean, se=se, n_test=n, best=asdict(winner[0]),
                folds=folds, grid=grid_scores)


# ---------------------------------------------------------------- Table 1
def format_table(results, tasks):
    """Upstreams as rows, tasks as columns; mAP as .xxx, accuracy in percent ± its SE."""
    lines = ["| upstream | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
    for name, row in results.items():
        cells = []
        for r in (row[t] for t in tasks):
            if r["metric"] == "mAP":
                cells.append(f"{r['test']:.3f}".lstrip("0"))
            elif r.get("se") is not None:
                cells.append(f"{100 * r['test']:.1f} ± {100 * r['se']:.1f}")
            else:
                cells.append(f"{100 * r['test']:.1f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def evaluate(args):
    """Every upstream on every task: embed (cached), probe, write results.json, print the table."""
    D.make_folder(args.out)  # a file in its place or a read-only folder: one line before any work
    grid = hear_grid(args.grid_points, args.probe == "linear", args.probe_seed,
                     max_epochs=args.max_epochs)
    upstreams = [open_upstream(spec, args) for spec in args.upstream]
    results = {}
    skipped = set()
    cache = Path(args.out, "embeddings")
    for task in args.tasks:
        start = time.time()
        data = {u.name: {} for u in upstreams}
        for split in task.splits:
            files, Y = read_split(task, split)
            Xs = embed_split(upstreams, task, split, files, cache, args.batch_size,
                             args.codec_cache)
            for u, (X, kept) in zip(upstreams, Xs):
                data[u.name][split] = (X, Y[kept])  # a skipped file takes its label row with it
                gone = set(range(len(files))) - set(kept)
                skipped.update(f"{task.name}/{split}/{files[j]}" for j in gone)
        embed_s = time.time() - start
        threads = torch.get_num_threads()
        torch.set_num_threads(args.probe_threads)  # 2 shared cores: small matmuls ran 10x slower
        for name in data:
            start = time.time()
            row = probe_task(data[name], task, grid, args.device, args.probe_seed)
            probe_s = time.time() - start
            results.setdefault(name, {})[task.name] = dict(row, probe=args.probe, embed_s=embed_s,
                                                           probe_s=probe_s)
            print(f"{name} {task.name}: {task.metric} {row['test']:.4f} (embedding, all upstreams: "
                  f"{embed_s:.1f} s; probes: {probe_s:.1f} s)", flush=True)
        torch.set_num_threads(threads)
    table = format_table(results, [t.name for t in args.tasks])
    record = dict(table=table, results=results, skipped=sorted(skipped))
    text = json.dumps(record, indent=1).encode()
    write_atomic(Path(args.out, "results.json"), lambda f: f.write(text))
    print(table)
    if skipped:
        print(f"{len(skipped)} audio files skipped (named in the warnings above and in "
              "results.json)")
    return results


# ---------------------------------------------------------------- the HEAR module, embed_file
class HearModel(nn.Module):
    """The HEAR module's model: an upstream behind HEAR's rate. HEAR allows 16000, 22050, 32000,
    44100 and 48000 Hz, not the codec's 24000: it declares 48000, resamples 2:1 for its upstream."""

    sample_rate = 48000  # HEAR's rule: get_*_embeddings take this; upstream.frames() takes 24000

    def __init__(self, upstream):
        super().__init__()
        self.upstream = upstream
        width = int(upstream.timestamp_embedding_size)
        self.scene_embedding_size = self.timestamp_embedding_size = width
        self.eval()  # frozen, as its upstream


def load_model(model_file_path="", **kwargs):
    """HEAR: a HearModel of a checkpoint path, "EC", "ECMAE-R:<size>" or "released:PATH" (empty:
    $ENCODECMAE_UPSTREAM, else ECMAE-R:base). The codec: kwarg encodec, else $ENCODECMAE_ENCODEC,
    else load_upstream's: never a silent random one. Its .upstream is load_upstream's (24 kHz)."""
    kwargs.setdefault("encodec", os.environ.get("ENCODECMAE_ENCODEC") or None)
    spec = model_file_path or os.environ.get("ENCODECMAE_UPSTREAM", "ECMAE-R:base")
    return HearModel(load_upstream(spec, **kwargs))


def get_timestamp_embeddings(audio, model):
    """HEAR: (n_sounds, n) at 48 kHz -> frames (n_sounds, T, D) float32, centres (n_sounds, T)
    in ms."""
    frames = model.upstream.frames(resample_24k(audio, model.sample_rate))  # (B, T', D) at 75 Hz
    T = real_frames(audio.shape[1], model.sample_rate)  # frames centred inside the audio
    centres = torch.arange(T, device=audio.device, dtype=torch.float64) + 0.5
    ts = centres * (1000 * HOP / SAMPLE_RATE)  # (T,) ms
    return frames[:, :T].float().contiguous(), ts.float().expand(len(audio), T)  # (B, T, D), (B, T)


def get_scene_embeddings(audio, model):
    """HEAR: (n_sounds, n) at 48 kHz -> (n_sounds, D) float32, the mean of the real frames [3.2]."""
    frames = model.upstream.frames(resample_24k(audio, model.sample_rate))  # (B, T', D)
    return pooled(model.upstream, frames, audio.shape[1], model.sample_rate)


def embed_file(upstream, path):
    """An audio file of any length, rate or channels -> frames (T, D) float32 at 75 Hz [3.1]."""
    return torch.cat(list(embed_pieces(upstream, path)))  # (T, D)


@torch.no_grad()
def embed_pieces(upstream, path):
    """The frames of a file, a minute of audio at a time -> (T_piece, D) float32 each. Segments
    are whole 4-s chunks and each is told the file's length (the authors' v2 models count it in
    every chunk), so the frames are those of the file embedded at once; memory is bounded by the
    piece."""
    device = next(upstream.parameters()).device
    n = probe_audio(path)
    for start in range(0, n, EMBED_SEGMENT):  # a file that reads short raises AudioError
        wav = read_audio(path, start, EMBED_SEGMENT)[None].to(device)  # (1, n_piece)
        yield upstream.frames(wav, file_samples=n)[0].float().cpu()


# ---------------------------------------------------------------- the command line
def parse_args(argv):
    p = D.Parser(prog="evaluate.py", description=__doc__,
                 formatter_class=D.argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks-dir", required=True, help="folder of HEAR task folders [3.2]")
    p.add_argument("--task", action="append", help="a task folder name; repeat (default: all)")
    p.add_argument("--upstream", action="append", required=True,
                   help="EC, ECMAE-R:<size>[:mel|:spec], a checkpoint or released:FILE; repeat")
    upstream_args(p)
    p.add_argument("--probe", choices=("mlp", "linear"), default="mlp",
                   help="HEAR's MLP grid [3.2], or a linear probe")
    p.add_argument("--grid-points", type=at_least(1, int, 16), default=8,
                   help="grid points searched (heareval keeps 8 of its 16)")
    p.add_argument("--max-epochs", type=at_least(1), default=500, help="at most, per probe")
    p.add_argument("--probe-seed", type=int, default=42,
                   help="probe init, shuffle and the grid points picked (heareval: 42)")
    p.add_argument("--batch-size", type=at_least(1), default=16, help="clips per embedding batch")
    p.add_argument("--probe-threads", type=at_least(1), default=1,
                   help="CPU threads while training probes")
    p.add_argument("--codec-cache", help="keep the codec's frames of the clips here: later runs "
                   "skip audio and codec (extras/codec_frames.py)")
    p.add_argument("--out", default="eval_out", help="embeddings and results.json go here")
    args = p.parse_args(argv)
    args.tasks = read_tasks(Path(args.tasks_dir), args.task)  # before any model loads
    for spec in args.upstream:
        check_upstream(spec, args.layer)
    frames_dir = args.codec_cache
    if frames_dir and os.path.exists(frames_dir) and not os.path.isdir(frames_dir):
        raise UsageError(f"--codec-cache {args.codec_cache}: exists and is not a folder")
    return args


def read_tasks(root, names):
    """The tasks asked for (default: all in root), every split read, so a task we cannot
    evaluate (a label outside the vocabulary, an empty split) is one line now."""
    if not root.is_dir():
        raise UsageError(f"--tasks-dir {root}: no such folder")
    found = sorted(p.name for p in root.iterdir() if (p / "task_metadata.json").is_file())
    if not found:
        raise UsageError(f"--tasks-dir {root}: no task folders in it (folders with a "
                         "task_metadata.json)")
    tasks = []
    for name in names or found:
        if name not in found:
            raise UsageError(f"--task {name}: no task folder of that name in {root} (have: "
                             f"{', '.join(found)})")
        try:
            tasks.append(read_task(root / name))
            for split in tasks[-1].splits:
                read_split(tasks[-1], split)
        except (ValueError, KeyError, OSError) as err:
            raise UsageError(f"{root / name}: cannot evaluate this task ({type(err).__name__}: "
                             f"{err})") from None
    return tasks


def upstream_args(p):
    """The flags that choose an upstream, the evaluation's and `embed`'s."""
    p.add_argument("--encodec", type=D.encodec_source,
                   help="pretrained | random | PATH (default: pretrained, or the checkpoint's)")
    p.add_argument("--layer", type=int, default=-1,
                   help="encoder layer of the features (-1: the last [3.1])")
    p.add_argument("--seed", type=int, default=0, help="seed of the ECMAE-R random init")
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    p.add_argument("--device", type=D.device, default=default_device, help="cpu, cuda or cuda:N")


def check_upstream(spec, layer):
    """EC, ECMAE-R:<size>[:<input>], a file or released:FILE, and a --layer it has, before a model
    loads."""
    size = None
    kind = ""
    if spec.startswith("ECMAE-R:"):
        size, _, kind = spec.split(":", 1)[1].partition(":")
    file = spec.removeprefix("released:")
    known = size in SIZES and kind in ("", "encodec", "mel", "spec")
    a_file = size is None and spec != "EC"
    if (size is not None and not known) or (a_file and not os.path.isfile(file)):
        raise UsageError(f"--upstream {spec}: not EC, ECMAE-R:<{'|'.join(SIZES)}>[:mel|:spec], an "
                         "existing checkpoint file or released:FILE")
    depth = SIZES[size]["n_enc_layers"] if size else math.inf  # a checkpoint's: checked as it loads
    if layer != -1 and not (1 if file == spec else 0) <= layer <= depth:  # the authors count from 0
        bound = depth if size else "the encoder depth"
        raise UsageError(f"--layer {layer}: choose -1 (the last) or 1..{bound}")


def open_upstream(spec, args):
    """load_upstream; a checkpoint that does not fit (its depth, its codec): the user's mistake."""
    try:
        return load_upstream(spec, args.encodec, args.layer, args.seed, args.device)
    except (ValueError, FileNotFoundError) as err:
        raise UsageError(str(err)) from None


def main(argv=None):
    """Every upstream on every task (the folder tool, `embed`, is python extras/embed.py)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["embed"]:  # where it used to be
        raise UsageError("embedding a folder is `python extras/embed.py --upstream ... --out EMB "
                         "AUDIO...`; in Python: evaluate.embed_file(load_upstream(spec), path)")
    return evaluate(parse_args(argv))


if __name__ == "__main__":
    D.run_cli(main)
