"""Self-training targets, section 2.3: k-means (k = 1024) on last-layer embeddings, then stream Q+1.

Run: python kmeans.py --checkpoint STAGE1.pt --data DIR --out STORE   (or --cache CACHE_DIR)
It embeds --n-clips random 4-s clips with the checkpoint's model and codec (no masking), fits
k-means on a random sample of their frames, and quantizes every file at 75 Hz into STORE:
centroids.pt, index.json (file -> .npy name, frame count) and one int16 .npy of cluster ids
per file, aligned frame for frame with the codec frames (T = ceil(n_samples / 320)).
Plain torch, CPU or GPU; `python extras/bench.py kmeans` times it against scikit-learn and faiss.
"""
import hashlib
import json
import math
import os
import time
import warnings
from typing import NamedTuple

import numpy as np
import torch

import data as D
from data import AudioError, UsageError, at_least, write_atomic
from model import CROP_FRAMES, CROP_SAMPLES, embed_audio, num_frames


# ---------------------------------------------------------------- k-means (plain torch)
class KMeansResult(NamedTuple):
    """The fitted centroids and how the fit went."""

    centroids: torch.Tensor      # (K, D) float32
    inertia_history: list        # sum of squared distances at each assignment step, non-increasing


@torch.no_grad()
def nearest_centroid(x, centroids, chunk_size=4096, bf16=False):
    """Index of the nearest centroid (N,) int64 and the squared distance to it (N,) float32.

    ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2, and ||x||^2 does not move the argmin, so one matmul
    per chunk of points ranks every centroid; memory stays at chunk_size x K whatever N is. bf16
    runs that matmul 2-3x faster (GPUs, AVX512-BF16 CPUs) on ~3 significant digits: near-ties may
    differ.
    """
    dtype = torch.bfloat16 if bf16 else torch.float32
    c_sq = centroids.square().sum(1).to(dtype)  # (K,)
    c_t = centroids.T.to(dtype)  # (D, K)
    labels = torch.empty(len(x), dtype=torch.int64, device=x.device)
    dist = torch.empty(len(x), dtype=torch.float32, device=x.device)
    for i in range(0, len(x), chunk_size):
        xb = x[i:i + chunk_size]  # (C, D)
        scores = torch.addmm(c_sq, xb.to(dtype), c_t, alpha=-2.0)  # (C, K) ||c||^2 - 2 x.c
        best, labels[i:i + chunk_size] = scores.min(1)
        dist[i:i + chunk_size] = (best.float() + xb.square().sum(1)).clamp_min(0.0)  # rounding < 0
    return labels, dist


def assign(x, centroids, chunk_size=4096):
    """Cluster id of each row of x (N, D): (N,) int64."""
    return nearest_centroid(x, centroids.to(x.device, torch.float32), chunk_size)[0]


# >>> assignment kmeans
@torch.no_grad()
def init_centroids(x, k, generator, sample_size=None):
    """Greedy k-means++ (Arthur & Vassilvitskii 2007, as in scikit-learn): K rows of x (K, D).

    Each new centroid is the best (largest drop in inertia) of 2 + log(k) candidates drawn in
    proportion to the squared distance to the nearest centroid so far. The K sequential steps each
    read every point, so we seed from sample_size random points (8 * k; mini-batch k-means uses
    3 * k), not all N. Draws come from the CPU generator: a seed gives the same start on any device.
    """
    if not 1 <= k <= len(x):
        raise ValueError(f"k-means needs 1 <= k <= points: k={k}, {len(x)} points")
    sample_size = min(len(x), sample_size or 8 * k)
    pool = x[torch.randperm(len(x), generator=generator)[:sample_size].to(x.device)]  # (P, D)
    pool_sq = pool.square().sum(1)  # (P,)
    n_trials = 2 + int(math.log(k))
    ids = [int(torch.randint(sample_size, (1,), generator=generator))]
    closest = (pool_sq - 2 * pool @ pool[ids[0]] + pool_sq[ids[0]]).clamp_min(0.0)  # (P,)
    for _ in range(1, k):
        cumulative = closest.double().cumsum(0)  # (P,)
        u = torch.rand(n_trials, generator=generator, dtype=torch.float64) * cumulative[-1].item()
        cand = torch.searchsorted(cumulative, u.to(x.device)).clamp_max(sample_size - 1)  # (n,)
        d = (pool_sq[:, None] - 2 * pool @ pool[cand].T + pool_sq[cand]).clamp_min(0.0)  # (P, n)
        potential = torch.minimum(closest[:, None], d)  # (P, n): n = n_trials
        best = int(potential.double().sum(0).argmin())
        closest = potential[:, best].contiguous()
        ids.append(int(cand[best]))
    return pool[ids].clone()  # (K, D)


@torch.no_grad()
def lloyd(x, centroids, n_iter=100, tol=1e-4, chunk_size=4096, bf16=False):
    """Lloyd steps from `centroids` until inertia improves by less than tol (relative).

    The update is one index_add_ of the points into their cluster's row, no loop. An empty cluster
    is re-seeded on the point worst served by its centroid, whose distance drops to 0: inertia
    cannot rise. -> KMeansResult
    """
    mean = x.float().mean(0)  # k-means ignores a shift; centred data loses less to rounding
    x = x.float() - mean  # (N, D)
    c = centroids.to(x.device, torch.float32) - mean  # (K, D)
    x_sq = sum(xb.double().square().sum() for xb in x.split(chunk_size))
    history = []
    for _ in range(n_iter):
        labels, dist = nearest_centroid(x, c, chunk_size, bf16)  # (N,), (N,)
        counts = torch.bincount(labels, minlength=len(c))  # (K,)
        sums = torch.zeros_like(c).index_add_(0, labels, x)  # (K, D)
        # Inertia of this assignment from the cluster sums, exact whatever precision ranked it:
        # sum_i ||x_i - c_a(i)||^2 = sum_i ||x_i||^2 - 2 sum_j c_j . S_j + sum_j n_j ||c_j||^2.
        c64 = c.double()
        inertia = x_sq - 2 * (c64 * sums).sum() + counts.double() @ c64.square().sum(1)
        history.append(inertia.item())
        empty = counts == 0
        c = torch.where(empty[:, None], c, sums / counts.clamp_min(1)[:, None])
        if empty.any():
            worst = dist.topk(int(empty.sum())).indices  # distinct points, worst served first
            c[empty] = x[worst]
        if len(history) > 1 and history[-2] - history[-1] <= tol * history[-2]:
            break
    return KMeansResult(c + mean, history)
# <<< assignment kmeans


def fit(x, k=1024, n_iter=100, tol=1e-4, seed=0, chunk_size=4096, bf16=False):
    """k-means on the rows of x (N, D): k-means++ start, then Lloyd steps. Deterministic for a seed
    on CPU; on CUDA, index_add_ sums in a varying order (last-bit changes)."""
    start = init_centroids(x.float(), k, torch.Generator().manual_seed(seed))
    return lloyd(x, start, n_iter, tol, chunk_size, bf16)


def save(path, centroids, meta):
    """Write {"centroids": (K, D), "meta": dict} atomically."""
    state = {"centroids": centroids.detach().cpu().float(), "meta": dict(meta)}
    write_atomic(path, lambda f: torch.save(state, f))


def load(path):
    """(centroids (K, D), meta) as written by save; a damaged file is a UsageError saying so."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        return state["centroids"], state["meta"]
    except Exception as err:  # cut short, or not ours: the file, not the code
        raise UsageError(f"{path}: not a centroid file written by kmeans.py "
                         f"({type(err).__name__}); delete it to fit k-means again, or choose "
                         "another --out") from None


def digest(tensors):
    """A short hash of named tensors' values: a checkpoint replaced under the same name, or
    labels of other centroids, are noticed."""
    h = hashlib.sha1()
    for name, w in sorted(tensors.items()):
        raw = w.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy()
        h.update(name.encode() + raw.tobytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------- 2.3 self-training targets
class Source(NamedTuple):
    """The pretraining set, as raw audio files or as the codec cache (extras/cache_targets.py)."""

    paths: list              # absolute audio paths: the keys of the target store
    lengths: np.ndarray      # (files,) samples (raw audio) or frames (cache)
    feats_files: list = None  # cached (T, 128) frames of each file; None for raw audio
    skipped: tuple = ()      # files whose header could not be read (already warned about)


def open_source(data=None, cache_dir=None, codec_source=None):
    """Raw audio (folders, .txt lists, demo), or the cache in cache_dir of codec codec_source."""
    if cache_dir is not None:
        from extras.cache_targets import read_cache_source
        return Source(*read_cache_source(cache_dir, codec_source))
    try:
        files, skipped = D.scan_audio(D.list_audio(data))
    except (ValueError, FileNotFoundError) as err:
        raise UsageError(f"--data: {err}") from None
    paths = [os.path.abspath(os.fsdecode(p)) for p in files.paths]
    return Source(paths, files.lengths, skipped=tuple(p for p, _ in skipped))


def sample_clips(source, n_clips, seed):
    """n_clips random 4-s clips (file, chunk) on each file's 4-s grid, long files weighing more.

    Deviation: the paper embeds 10k whole "audio signals"; we take one 4-s chunk each, the grid
    the quantization uses, so k-means is fit on exactly the vectors it will label and long files
    (LibriLight books) cost no more than AudioSet clips.
    """
    crop = CROP_SAMPLES if source.feats_files is None else CROP_FRAMES
    file_of_item = np.repeat(np.arange(len(source.paths)), D.visits_per_file(source.lengths, crop))
    items = np.random.default_rng(seed).permutation(len(file_of_item))[:n_clips]
    first_item = np.searchsorted(file_of_item, file_of_item[items])  # each file's first chunk
    return [(int(f), int(c)) for f, c in zip(file_of_item[items], items - first_item)]


@torch.no_grad()
def embed_file(model, codec, source, f, chunk=None, layer=-1):
    """Frame embeddings (T, D) of file f, or of its 4-s chunk `chunk`, unmasked [2.3, 3.1]."""
    if source.feats_files is not None and model.cfg.input == "encodec":  # --cache: stored frames
        from extras.cache_targets import embed_cached
        return embed_cached(model, source.feats_files[f], source.paths[f], chunk, layer)
    start = 0 if chunk is None else chunk * CROP_SAMPLES  # the 4-s grid, in frames for the cache
    size = None if chunk is None else CROP_SAMPLES
    wav = D.read_audio(source.paths[f], start, size)  # (n,); a file that reads short: AudioError
    wav = wav[None].to(next(model.parameters()).device)  # (1, n)
    return embed_audio(model, codec, wav, layer=layer)[0]  # (T, D)


def collect_frames(model, codec, source, clips, n_frames, layer, seed, bad):
    """Embed each clip and keep n_frames / clips random frames of it -> the k-means training set
    (N, D) and the number of clips it comes from; a file that cannot be read is named, skipped."""
    per_clip = math.ceil(n_frames / len(clips))
    generator = torch.Generator().manual_seed(seed)
    frames = []
    t0 = time.time()
    for i, (f, chunk) in enumerate(clips):
        try:
            emb = embed_file(model, codec, source, f, chunk, layer)  # (T, D)
        except AudioError as err:
            warn_skipped(source.paths[f], err, bad)
            continue
        keep = torch.randperm(len(emb), generator=generator)[:per_clip].to(emb.device)
        frames.append(emb[keep])
        progress("embed", f"{i + 1}/{len(clips)} clips", i, len(clips), t0)
    if not frames:
        raise AudioError(f"none of the {len(clips)} sampled clips could be read")
    return torch.cat(frames)[:n_frames], len(frames)  # (N, D), clips used


def progress(stage, detail, i, n, t0):
    """A progress line after item i of n at each tenth of the work: what is done, the ETA."""
    if (i + 1) % max(1, n // 10) == 0 or i + 1 == n:
        elapsed = time.time() - t0
        eta = elapsed * (n - i - 1) / (i + 1)
        share = (i + 1) / n
        print(f"{stage}: {detail}, {share:.0%} in {elapsed:.0f} s, ETA {eta:.0f} s", flush=True)


def warn_skipped(path, err, bad):
    """One warning per bad file (err names it and why); `bad` collects the files for the count."""
    if path not in bad:
        warnings.warn(f"skipping {err}", stacklevel=2)
    bad.add(path)


def quantize_dataset(model, codec, source, centroids, store_dir, layer=-1, bad=None):
    """Label every frame of every file with its nearest centroid: STORE/<id>.<centroids>.npy int16.

    Resumable: a file whose .npy exists is done (each is written atomically); its name carries the
    centroids' hash, so labels of other centroids are never reused. index.json, {audio path: {"npy":
    name, "frames": T}} as data.load_frame_store reads it, comes last. A file that cannot be read is
    named once (also if the fit met it), counted and left out of index.json.
    """
    centroids = centroids.to(next(model.parameters()).device)
    of_centroids = digest({"centroids": centroids})
    index = {}
    bad = set() if bad is None else bad
    t0 = time.time()
    for f, path in enumerate(source.paths):
        name = f"{D.file_id(path)}.{of_centroids}.npy"  # stable across runs of these centroids
        out = os.path.join(store_dir, name)
        T = num_frames(source.lengths[f]) if source.feats_files is None else int(source.lengths[f])
        try:
            if not os.path.exists(out):
                labels = assign(embed_file(model, codec, source, f, layer=layer), centroids)  # (T,)
                if len(labels) != T:  # a cache file whose length is not the manifest's
                    raise AudioError(f"{path}: {len(labels)} frames where the scan found {T}")
                labels = labels.cpu().numpy().astype(np.int16)
                write_atomic(out, lambda fh: np.save(fh, labels))
            index[path] = {"npy": name, "frames": T}
        except AudioError as err:
            warn_skipped(path, err, bad)
        progress("quantize", f"{f + 1}/{len(source.paths)} files", f, len(source.paths), t0)
    text = json.dumps(index).encode()
    write_atomic(os.path.join(store_dir, "index.json"), lambda fh: fh.write(text))
    note = " (see warnings; they are not in index.json)" if bad else ""
    print(f"quantize: labelled {len(index)} files, skipped {len(bad)} unreadable files{note}")
    return index


def build_targets(checkpoint, store_dir, data=None, cache_dir=None, n_clips=10000, n_frames=100000,
                  k=1024, layer=-1, n_iter=100, tol=1e-4, seed=0, device="cpu", bf16=False):
    """Section 2.3 end to end: clips -> embeddings -> frames -> k-means -> labels for every file."""
    model, ckpt = D.load_checkpoint(checkpoint)
    model = model.to(device)
    codec_source = ckpt["encodec"]
    source = open_source(data, cache_dir, codec_source)  # first: a bad --data costs nothing
    D.make_folder(store_dir)
    codec = None  # the cache holds the codec's frames; a filterbank input needs none [4]
    if cache_dir is None and model.cfg.input == "encodec":
        codec = D.load_codec(codec_source).to(device)
    bad = set(source.skipped)  # unreadable files, each named once, counted at the end
    meta = {"checkpoint": os.path.abspath(checkpoint), "weights": digest(model.state_dict()),
            "layer": layer, "k": k, "codec": codec_source}
    path = os.path.join(store_dir, "centroids.pt")
    if os.path.exists(path):  # resuming: never mix labels of two different fits
        centroids, old = load(path)
        changed = [key for key in meta if old.get(key) != meta[key]]
        if changed:  # "weights": the checkpoint was replaced (retrained in place, say)
            raise UsageError(f"{path} was fit with other {', '.join(changed)} than now "
                             f"({checkpoint} changed since, or the flags did): use another --out, "
                             f"or delete {store_dir} to fit again")
        print(f"reusing {path} ({len(centroids)} centroids)")
    else:
        clips = sample_clips(source, n_clips, seed)
        frames, n_used = collect_frames(model, codec, source, clips, n_frames, layer, seed, bad)
        centroids, history = fit(frames, k, n_iter, tol, seed, bf16=bf16)  # KMeansResult
        print(f"k-means: {len(frames)} frames from {n_used} clips, k={k}, {len(history)} "
              f"iterations, inertia per frame {history[0] / len(frames):.4g} -> "
              f"{history[-1] / len(frames):.4g}")
        save(path, centroids, dict(meta, n_clips=n_used, n_frames=len(frames), seed=seed,
                                   inertia_history=history))
    return quantize_dataset(model, codec, source, centroids, store_dir, layer, bad)


def parse_args(argv):
    p = D.Parser(prog="kmeans.py", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", help="stage-1 model whose last layer is embedded [2.3] "
                   "(for large: the self-trained base)")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--data", nargs="+", help="audio folders, .txt lists of files, or demo")
    source.add_argument("--cache", help="the codec cache of `python extras/cache.py`, not audio")
    p.add_argument("--out", help="the target store folder (a rerun completes it)")
    p.add_argument("--n-clips", type=at_least(1), default=10000, help="4-s clips embedded [2.3]")
    p.add_argument("--n-frames", type=at_least(1), default=100000,
                   help="frames sampled from them for the fit [2.3]")
    p.add_argument("--k", type=at_least(1), default=1024, help="clusters [2.3]")
    p.add_argument("--layer", type=int, default=-1,
                   help="encoder layer embedded (-1: the last, normed; or 1..layers) [2.3]")
    p.add_argument("--n-iter", type=at_least(1), default=100, help="at most this many Lloyd steps")
    p.add_argument("--tol", type=at_least(0.0, float), default=1e-4,
                   help="stop when inertia improves less than this (relative)")
    p.add_argument("--seed", type=at_least(0), default=0, help="clips, frames, k-means++ start")
    p.add_argument("--bf16", action="store_true",
                   help="bf16 distance matmul in the fit: faster, near-ties may differ")
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    p.add_argument("--device", type=D.device, default=default_device, help="cpu, cuda or cuda:N")
    p.add_argument("--threads", type=at_least(1), default=torch.get_num_threads(),
                   help="CPU threads")
    args = p.parse_args(argv)
    if not (args.checkpoint and args.out and (args.data or args.cache)):
        raise UsageError("self-training targets need --checkpoint, --out and one of --data or "
                         "--cache")
    if args.n_frames < args.k:
        raise UsageError(f"--n-frames {args.n_frames}: k-means needs at least --k {args.k} frames")
    if args.cache and not os.path.isfile(os.path.join(args.cache, "cache.json")):
        raise UsageError(f"--cache {args.cache}: not a codec cache (no cache.json; run "
                         "`python extras/cache.py`)")
    try:
        cfg = D.load_checkpoint(args.checkpoint)[0].cfg
    except ValueError as err:
        raise UsageError(f"--checkpoint {err}") from None
    if args.k > cfg.K:
        raise UsageError(f"--k {args.k}: the model's head has K={cfg.K} classes per stream, "
                         f"so 1..{cfg.K}")
    if args.layer != -1 and not 1 <= args.layer <= cfg.n_enc_layers:
        raise UsageError(f"--layer {args.layer}: use -1 (last, normed) or 1..{cfg.n_enc_layers}")
    return args


def run(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    build_targets(args.checkpoint, args.out, args.data, args.cache, args.n_clips, args.n_frames,
                  args.k, args.layer, args.n_iter, args.tol, args.seed, args.device, args.bf16)


def main(argv=None):
    """The command line: a user's mistake is one line on stderr and exit status 2."""
    D.run_cli(run, argv)


if __name__ == "__main__":
    main()
