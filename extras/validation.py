"""Held-out validation of the pretraining loss (`train.py --val_files N`): not in the paper, a check a researcher watches.

N files are held out of training (a fixed seeded choice, each readable); every --val_every steps, and at
the end, train.py prints their loss and masked accuracy on fixed crops and fixed masks. With
--data_weights the held-out files come from each source, and the sources are mixed (extras/mixing.py).
"""
import functools
import warnings

import numpy as np
import torch
from torch.utils.data import DataLoader

import data as D
from model import CROP_SAMPLES


def split_sources(cfg, mcfg, codec, rank, files, source, n_bad, masked_crops, barrier):
    """train.build_datasets with --val_files or --data_weights: each source's files split into
    training and held-out ones, crops of each (cached with --cache), the sources mixed
    -> (training set, validation set or None, training files). masked_crops: train.MaskedCrops."""
    if cfg.data_weights:  # file positions of each mixed source
        groups = [np.flatnonzero(source == s) for s in range(len(cfg.data))]
    else:
        groups = [np.arange(len(files.paths))]
    splits = [(g, g[:0]) for g in groups]  # (train, held-out) file positions of each source
    if cfg.val_files:
        splits = [readable_holdout(files, g, cfg.val_files, cfg.seed) for g in groups]
    crops = functools.partial(D.CropDataset, extra_store=cfg.kmeans_store or None)
    if cfg.cache:
        from extras.cache import cached_crops
        paths = [files.path(i) for s in splits for part in s for i in part]
        crops = cached_crops(codec, paths, cfg, rank, barrier, mcfg.input)
    train = [crops(files.take(t), seed=cfg.seed, n_skipped=n_bad if i == 0 else 0)
             for i, (t, _) in enumerate(splits)]
    if cfg.data_weights:
        from extras.mixing import MixedDataset
        train = [MixedDataset(train, cfg.data_weights, cfg.seed)]
    held_out = np.concatenate([v for _, v in splits])
    valid = None
    if len(held_out):
        valid = masked_crops(crops(files.take(held_out), seed=cfg.seed + 1), mcfg, cfg.seed + 1)
    kept = np.concatenate([t for t, _ in splits])
    return masked_crops(train[0], mcfg, cfg.seed), valid, files.take(kept)


def readable_holdout(files, group, n_files, seed=0):
    """A fixed validation subset of n_files of the files at positions `group` -> (train, valid) positions.
    Held-out files are ones whose first 4 s read (validation crops are fixed, so a held-out file that
    fails would fail every validation): one that fails is named in a warning and replaced."""
    while 0 < n_files < len(group):
        valid = np.isin(np.arange(len(group)), np.random.default_rng(seed).permutation(len(group))[:n_files])
        bad = []
        for f in group[valid]:
            try:
                D.read_audio(files.path(f), 0, CROP_SAMPLES, (files.rates[f], files.frames[f]))
            except D.AudioError as err:
                warnings.warn(f"skipping {err}", stacklevel=2)
                bad.append(f)
        if not bad:
            return group[~valid], group[valid]
        group = np.setdiff1d(group, bad)
    raise D.UsageError(f"--val_files {n_files}: must be below the {len(group)} readable files of the data")


@torch.no_grad()
def validate(model, dataset, inputs_and_targets, count_frames, device, micro_batch, autocast):
    """Loss and masked accuracy on the held-out files: fixed crops, fixed masks, and |M| and T
    counted over the whole held-out set, so the figures do not depend on the micro-batch size."""
    dataset.set_epoch(0)
    loader = lambda: DataLoader(dataset, batch_size=micro_batch, num_workers=0)
    counts = tuple(count_frames(loader()).to(device))  # a first, cheap pass: crops and masks only
    total = 0
    for batch in loader():
        with autocast:  # the codec runs in fp32 all the same (model.codec_precision)
            out = model(*inputs_and_targets(batch), counts=counts)
        total = total + torch.cat([out.loss.float()[None], out.masked_acc.float()])  # shares add up
    return [total[0].item(), total[1:].mean().item()]
