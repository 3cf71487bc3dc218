"""`kmeans.py --cache`: section 2.3's self-training targets from the codec cache (extras/cache.py), not the audio.

The cache holds every file's frozen-EnCodec frames, so kmeans.py reads those instead of the audio
and the model embeds them in the same 4-s windows as model.embed_audio cuts raw audio into.
"""
import os

import numpy as np
import torch

from data import AudioError, UsageError
from extras.cache import changed_since, read_manifest, read_meta
from model import CROP_FRAMES


def read_cache_source(cache_dir, codec_source):
    """The cached files, sorted by path -> (audio paths, frames per file (F,), their .feats.npy);
    a UsageError if the cache is empty or holds another codec's frames than the checkpoint's."""
    cached_with = read_meta(cache_dir).get("codec")
    if cached_with != codec_source:
        raise UsageError(f"{cache_dir} holds frames of codec {cached_with!r}, but the checkpoint was trained "
                         f"on {codec_source!r}: rebuild the cache with that codec")
    entries = read_manifest(cache_dir)
    stale = changed_since(entries)
    if stale:  # its frames are of the old audio, and so would its labels be
        raise UsageError(f"{stale[0]} changed since it was cached ({len(stale)} files changed): run "
                         f"`python extras/cache.py --data ... --out {cache_dir}` to encode them again")
    entries = sorted(entries.values(), key=lambda e: e["path"])
    if not entries:
        raise UsageError(f"{cache_dir}: empty or missing cache manifest (run `python extras/cache.py`)")
    return ([e["path"] for e in entries], np.array([e["frames"] for e in entries]),
            [os.path.join(cache_dir, e["id"] + ".feats.npy") for e in entries])


@torch.no_grad()
def embed_cached(model, feats_file, path, chunk=None, layer=-1):
    """Frame embeddings (T, D) of the cached file of `path`, or of its 4-s chunk `chunk`, unmasked [2.3]."""
    try:
        feats = np.load(feats_file, mmap_mode="r")  # (T, 128) fp16
    except (OSError, ValueError) as err:  # a cache file deleted or cut short since the build
        raise AudioError(f"{path}: unreadable cached frames {feats_file} ({err})") from err
    if chunk is not None:
        feats = feats[chunk * CROP_FRAMES:(chunk + 1) * CROP_FRAMES]
    feats = torch.from_numpy(feats.astype(np.float32)).to(next(model.parameters()).device)  # (T, 128)
    # The model sees the cached frames in the same 4-s windows as embed_audio gives it.
    return torch.cat([model.embed(w[None], layer=layer)[0] for w in feats.split(CROP_FRAMES)])  # (T, D)
