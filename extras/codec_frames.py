"""evaluate.py --codec-cache: keep the frozen codec's frames of task clips, so later evaluations skip the audio and the codec.

Later runs with the same codec and clips (other checkpoints, layers, ECMAE-R seeds) read the kept
frames instead, most of the cost of an evaluation (float32: 38 KB per second of audio).
"""
from itertools import groupby

import numpy as np
import torch

from data import write_atomic


def read_codec_frames(path, source, paths):
    """Codec frames kept by an earlier run for the same codec and clips -> (frames (sum T, 128),
    offsets (N + 1,), samples (N,), {clip: why skipped}), or None."""
    if not path.exists():
        return None
    with np.load(path) as z:
        if str(z["codec"]) != source or z["files"].tolist() != [str(p) for p in paths]:
            return None
        skipped = dict(zip(z["skipped_at"].tolist(), z["skipped"].tolist()))
        return z["frames"], z["offsets"], z["samples"], skipped


def kept_batches(keep, codec, paths, batch_size, bad, fresh):
    """evaluate.codec_batches' batches, from `keep` (.npz) when it holds this codec's frames of these
    clips; else the `fresh` batches, whose frames are stored in `keep` once they are all seen."""
    device = next(codec.parameters()).device
    cached = read_codec_frames(keep, codec.source, paths)
    if cached is not None:
        frames, offsets, samples, skipped = cached
        bad.update(skipped)
        order = sorted((j for j in range(len(paths)) if j not in skipped), key=lambda j: samples[j])
        for n, same in groupby(order, key=lambda j: samples[j]):
            same = list(same)
            for at in range(0, len(same), batch_size):
                part = same[at: at + batch_size]
                yield part, int(n), torch.stack([torch.from_numpy(frames[offsets[j]: offsets[j + 1]])
                                                 for j in part]).to(device)
        return
    kept = {}  # clip -> (samples, frames (T, 128))
    for same, n, feats in fresh:
        kept.update((j, (n, f.float().cpu().numpy())) for j, f in zip(same, feats))
        yield same, n, feats
    none = (0, np.zeros((0, codec.dim), np.float32))  # a skipped clip: no frames
    clips = [kept.get(j, none) for j in range(len(paths))]
    keep.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(keep, lambda f: np.savez(
        f, codec=np.array(codec.source), files=np.array([str(p) for p in paths]),
        frames=np.concatenate([c[1] for c in clips]), offsets=np.cumsum([0] + [len(c[1]) for c in clips]),
        samples=np.array([c[0] for c in clips], dtype=np.int64),
        skipped_at=np.array(sorted(bad), dtype=np.int64), skipped=np.array([bad[j] for j in sorted(bad)], dtype=str)))
