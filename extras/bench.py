"""Speed benchmarks (not the paper): a training step, k-means, the loader. Each prints a markdown table.

`python extras/bench.py train --config small --batch_size 8 --device cpu` (any train.py flag):
where a training step's time goes. `python extras/bench.py kmeans`: our k-means against
scikit-learn and faiss where installed. `python extras/bench.py loader`: crops per CPU-second of
one DataLoader worker, by format and rate. Compare figures only within one sitting (machines
drift by 40%).
"""
import math
import os
import sys
import time

import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

if __package__ in (None, ""):  # run as a script: the core files sit in the folder above
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import data as D
import kmeans
import model as M
import train


# ---------------------------------------------------------------- a training step
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
    return [(B * T, mcfg.d_input, D)] + block(N) + [(B * N, D, D)] + block(T) + [(B * T, D, S * K)]


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
    # input projection, encoder on N frames, decoder projection (before the mask tokens go in:
    # N frames), decoder on T, head
    forward = (2 * T * mcfg.d_input * D + mcfg.n_enc_layers * layer(N) + 2 * N * D * D
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


def loader_rate(dataset, B, workers, n_batches=4):
    """Crops per second that a DataLoader with `workers` processes delivers, as training loads them,
    timed after its first batch (which includes starting the workers)."""
    loader = iter(DataLoader(dataset, batch_size=B, sampler=[i % len(dataset) for i in range(B * n_batches)],
                             num_workers=workers))
    next(loader)
    t = time.perf_counter()
    for _ in loader:
        pass
    return B * (n_batches - 1) / (time.perf_counter() - t)


# Dense bf16 tensor-core peaks (no 2:4 sparsity) in TFLOP/s, by a part of the name torch reports,
# most specific first: NVIDIA's datasheets (H100 SXM / PCIe / NVL, H200, A100, L40S, L4, A10) and,
# for GeForce cards, the architecture whitepapers' bf16 rate with fp32 accumulation (Ampere, Ada).
BF16_PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.5), ("H100", 989.4), ("H200", 989.4),
                    ("A100", 312.0), ("L40S", 362.1), ("L4", 121.0), ("A10", 125.0),
                    ("RTX 4090", 165.2), ("RTX 3090", 71.0))


def vendor_peak(device_name, override=None):
    """(the device's dense bf16 peak in FLOP/s, where it comes from), or (None, why not)."""
    if override:
        return override * 1e12, f"{override:g} TFLOP/s as given by --peak_tflops"
    for part, tflops in BF16_PEAK_TFLOPS:
        if part in device_name:
            return tflops * 1e12, f"{device_name}: {tflops:g} TFLOP/s dense bf16 (vendor)"
    return None, f"{device_name}: no vendor bf16 peak known; give one with --peak_tflops"


def train_benchmark(cfg, mcfg, device, peak_tflops=None):
    """Where a training step's time goes, as a run with these flags spends it: codec, MAE forward and
    backward (compiled with --compile), optimizer, each with its data ready on the device; apart,
    the crops per second that --workers loader processes deliver, from raw audio and from a cache.
    MFU: against the matmul peak measured here, and against the vendor's dense bf16 peak."""
    import resource
    import tempfile
    from extras.cache import CachedCropDataset, build_cache
    from extras.demo_signals import demo_clips, write_demo_dataset
    from extras.compile import compile_network
    B = cfg.batch_size
    autocast, _ = train.autocast_for(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    codec = D.load_codec(cfg.encodec).to(device)
    wav = demo_clips(B, M.CROP_SECONDS, seed=cfg.seed).to(device)  # (B, 96000)
    t_codec = timed(lambda: codec(wav), device)
    feats, codes = codec(wav)
    t_front = 0.0  # a filterbank input [4]: its frames, on top of the codec's pass for the targets
    if mcfg.input != "encodec":
        t_front = timed(lambda: M.input_frames(mcfg, codec, wav), device)
        feats = M.input_frames(mcfg, codec, wav)
    mask = M.gap_mask(torch.full((B,), M.CROP_FRAMES), M.CROP_FRAMES, mcfg.M_prop, mcfg.M_gap)  # on the CPU, as in training
    model = M.EnCodecMAE(mcfg).to(device)
    if cfg.compile:  # the warm-up run of `timed` compiles it
        compile_network(model)
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
    with tempfile.TemporaryDirectory() as tmp:  # demo files and their cache, loaded as training loads them
        paths = write_demo_dataset(os.path.join(tmp, "audio"), n_files=2, seed=cfg.seed, seconds=(4.5, 4.5))
        build_cache(codec, paths, os.path.join(tmp, "cache"), log_every=1e9)
        raw = loader_rate(train.MaskedCrops(D.CropDataset(paths, seed=cfg.seed), mcfg, cfg.seed), B, cfg.workers)
        from_cache = CachedCropDataset(os.path.join(tmp, "cache"), seed=cfg.seed, input_kind=mcfg.input)
        cached = loader_rate(train.MaskedCrops(from_cache, mcfg, cfg.seed), B, cfg.workers)
    flops, rows = mae_flops(mcfg, B), []
    memory = (torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda"
              else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20)
    for name, step, rate in (("raw audio", t_codec + t_front + t_mae + t_opt, raw), ("cache", t_mae + t_opt, cached)):
        # workers load the next batches while the GPU steps; with none, loading and stepping take turns
        run = max(step, B / rate) if cfg.workers else step + B / rate
        rows += [(f"loader, {name}", f"{rate:.0f} crops/s with --workers {cfg.workers} = {rate / B:.2f} steps/s"),
                 (f"step, {name}, data ready", f"{step:.3f} s = {1 / step:.2f} steps/s, {B / step:.1f} clips/s"),
                 (f"run, {name}", f"{1 / run:.2f} steps/s ({'loader' if B / rate > step else 'step'}-bound)")]
    rows = [("matmul peak (measured)", f"{peak / 1e9:.0f} GFLOP/s ({dtype}); {how}"),
            ("codec, on the fly", f"{t_codec:.3f} s/step ({t_codec / (t_codec + t_front + t_mae + t_opt):.0%} of a "
                                  "raw-audio step)"),
            (f"input frames ({mcfg.input})", f"{t_front:.3f} s/step on the fly" if t_front else "the codec's"),
            ("MAE forward+backward", f"{t_mae:.3f} s, {flops / 1e12:.2f} TFLOP by mae_flops ({flops / t_mae / 1e9:.0f} "
                                     f"GFLOP/s, {flops / t_mae / peak:.0%} of the matmul peak)"),
            ("optimizer step", f"{t_opt:.3f} s")] + rows
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    vendor, source = vendor_peak(name, peak_tflops)
    if vendor is not None:
        rows.insert(3, ("MFU (vendor peak)", f"{flops / t_mae / vendor:.1%} of {source}"))
    elif device.type == "cuda":
        rows.insert(3, ("MFU (vendor peak)", source))
    rows.append(("peak memory", f"{memory:.2f} GiB ({'GPU allocated' if device.type == 'cuda' else 'process RSS'})"))
    print(f"benchmark: {mcfg.n_enc_layers}-layer D={mcfg.d_model} model, batch {B}, {device}, compile "
          f"{'on' if cfg.compile else 'off'}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    for name, value in rows:
        print(f"| {name} | {value} |")


# ---------------------------------------------------------------- k-means
def kmeans_benchmark(n=100_000, dim=768, k=1024, iters=10, threads=2, seed=0, device="cpu", repeats=2):
    """Ours vs scikit-learn and faiss: same start, same Lloyd iterations; best wall time of repeats."""
    init_centroids, lloyd, nearest_centroid = kmeans.init_centroids, kmeans.lloyd, kmeans.nearest_centroid
    torch.set_num_threads(threads)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=generator)  # (N, D) random "embeddings"
    start = init_centroids(x, k, generator)  # (K, D) k-means++, shared by every method
    x_dev, x_np, start_np = x.to(device), x.numpy(), start.numpy()
    methods = {f"ours fp32 ({device})": lambda: lloyd(x_dev, start, iters, tol=0.0).centroids,
               f"ours bf16 matmul ({device})": lambda: lloyd(x_dev, start, iters, tol=0.0, bf16=True).centroids}
    try:
        from sklearn.cluster import KMeans
        from threadpoolctl import threadpool_limits

        def sklearn_fit():  # note: it ends with one more label pass, iters + 1 distance passes
            with threadpool_limits(threads):
                return KMeans(k, init=start_np, n_init=1, max_iter=iters, tol=0.0,
                              algorithm="lloyd").fit(x_np).cluster_centers_
        methods["scikit-learn KMeans lloyd (cpu)"] = sklearn_fit
    except ImportError:
        print("scikit-learn is not installed: skipped (pip install scikit-learn)")
    try:
        import faiss
        faiss.omp_set_num_threads(threads)

        def faiss_fit():
            km = faiss.Kmeans(dim, k, niter=iters, seed=seed, max_points_per_centroid=n)  # all points
            km.train(x_np, init_centroids=start_np)
            return km.centroids
        methods["faiss Kmeans (cpu)"] = faiss_fit
    except ImportError:
        print("faiss is not installed: skipped (pip install faiss-cpu)")
    seconds, cpu_seconds, inertia = {}, {}, {}
    for _ in range(repeats):  # interleaved, so a busy moment of a shared machine hits every method
        for name, run in methods.items():
            t0, cpu0 = time.perf_counter(), time.process_time()
            centroids = torch.as_tensor(run()).to(device)
            if x_dev.is_cuda:
                torch.cuda.synchronize()
            if time.perf_counter() - t0 < seconds.get(name, math.inf):
                seconds[name], cpu_seconds[name] = time.perf_counter() - t0, time.process_time() - cpu0
            inertia[name] = nearest_centroid(x_dev, centroids)[1].double().sum().item()
    print(f"N={n} D={dim} K={k}, {iters} Lloyd iterations from one k-means++ start, {threads} threads "
          f"({os.cpu_count()} CPUs), best of {repeats}")
    print("| method | wall s | s / iteration | CPU s | final inertia | wall / ours fp32 | inertia / ours fp32 |")
    print("|---|---|---|---|---|---|---|")
    ref = next(iter(methods))
    for name in methods:
        print(f"| {name} | {seconds[name]:.1f} | {seconds[name] / iters:.2f} | {cpu_seconds[name]:.1f} | "
              f"{inertia[name]:.6g} | {seconds[name] / seconds[ref]:.2f} | {inertia[name] / inertia[ref]:.5f} |")
    return seconds, inertia


# ---------------------------------------------------------------- loader benchmark
BENCH_FORMATS = (("wav", "PCM_16"), ("flac", "PCM_16"), ("ogg", "VORBIS"), ("mp3", "MPEG_LAYER_III"))
GPU_CROPS_PER_S = 1920  # 15 steps/s x 128 crops: what one fast GPU takes [3.1]


def bench_signal(seconds, rate, seed):
    """Music-like test audio (n,): a new harmonic note every 0.5 s over soft noise, so lossy codecs
    and flac work as hard as on real recordings (a pure tone or silence would flatter them)."""
    rng, t = np.random.default_rng(seed), np.arange(round(seconds * rate)) / rate
    f0 = 110 * 2 ** (rng.integers(0, 36, int(2 * seconds) + 1) / 12)[(2 * t).astype(int)]  # (n,) Hz
    phase = 2 * np.pi * np.cumsum(f0) / rate
    x = sum(np.sin(k * phase) / k for k in range(1, 6)) * np.exp(-3 * (t % 0.5))
    x = x + 0.05 * np.convolve(rng.standard_normal(len(t)), np.ones(8) / 8, "same")
    return 0.3 * x / np.abs(x).max()


def crops_per_second(dataset, seconds):
    """Crops one process reads per second of its own CPU time (so other programs on a shared machine
    do not count), over random items for about `seconds` of CPU."""
    order = np.random.default_rng(0).permutation(len(dataset))
    dataset[int(order[0])]  # warm-up: imports, resampling kernels
    n, t0 = 0, time.process_time()
    while time.process_time() - t0 < seconds or n < 3:
        dataset[int(order[n % len(order)])]
        n += 1
    return n / (time.process_time() - t0)


def loader(out_dir, seconds=30.0, n_files=2, per_case=2.0, encodec="random"):
    """Print crops per CPU-second of one DataLoader worker (one thread) per format and rate, raw and
    cached, and the workers (cores) that feed one GPU taking GPU_CROPS_PER_S."""
    torch.set_num_threads(1)  # as in a DataLoader worker
    os.makedirs(out_dir, exist_ok=True)
    print(f"bench: {n_files} files of {seconds:.0f} s per case, 4-s crops, 1 thread, CPU time, in {out_dir}\n"
          f"| source | rate | crops/s per worker (core) | workers for {GPU_CROPS_PER_S} crops/s |\n|---|---|---|---|")
    row = lambda name, rate, r: print(f"| {name} | {rate} | {r:.0f} | {math.ceil(GPU_CROPS_PER_S / r)} |", flush=True)
    for ext, subtype in BENCH_FORMATS:
        if ext.upper() not in sf.available_formats():
            print(f"| {ext} | - | not supported by this libsndfile | - |")
            continue
        for rate in (16000, 44100, 48000):
            paths = [os.path.join(out_dir, f"{ext}{rate}-{i}.{ext}") for i in range(n_files)]
            for i, path in enumerate(paths):
                if not os.path.exists(path):
                    sf.write(path, bench_signal(seconds, rate, i), rate, subtype=subtype)
            row(ext, rate, crops_per_second(D.CropDataset(paths), per_case))
    cache = os.path.join(out_dir, "cache")
    from extras.cache import CachedCropDataset, build_cache
    build_cache(D.load_codec(encodec), [os.path.join(out_dir, "wav16000-0.wav")], cache, log_every=1e9)
    row(f"cache ({encodec} codec)", "75 Hz", crops_per_second(CachedCropDataset(cache), per_case))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train"]:  # every train.py flag, parsed and checked as train.py does
        extra = D.Parser(prog="extras/bench.py train", add_help=False)
        extra.add_argument("--peak_tflops", type=D.at_least(1e-3, float),
                           help="the GPU's dense bf16 peak, if the table does not know it")
        known, rest = extra.parse_known_args(argv[1:])
        cfg, mcfg, _ = train.parse_args(rest)
        train.check_config(cfg, 1)
        device = train.setup_distributed(cfg)[2]
        return train_benchmark(cfg, mcfg, device, known.peak_tflops)
    parser = D.Parser(prog="extras/bench.py", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("train", help="where a training step's time goes (then any train.py flag)")
    p = sub.add_parser("kmeans", help="our k-means against scikit-learn and faiss")
    p.add_argument("--n", type=D.at_least(1), default=100_000, help="points")
    p.add_argument("--dim", type=D.at_least(1), default=768, help="their dimension")
    p.add_argument("--k", type=D.at_least(1), default=1024, help="clusters")
    p.add_argument("--iters", type=D.at_least(1), default=10, help="Lloyd iterations")
    p.add_argument("--threads", type=D.at_least(1), default=torch.get_num_threads(), help="CPU threads")
    p.add_argument("--seed", type=D.at_least(0), default=0, help="points and k-means++ start")
    p.add_argument("--device", type=D.device, default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda or cuda:N")
    p.add_argument("--repeats", type=D.at_least(1), default=2, help="runs per method (best kept)")
    p = sub.add_parser("loader", help="crops/s of one loader worker per format and rate")
    p.add_argument("--out", default=os.path.join("runs", "bench"), help="folder for the test files")
    p.add_argument("--seconds", type=D.at_least(4.0, float), default=30.0, help="length of each test file")
    p.add_argument("--per-case", type=D.at_least(0.1, float), default=2.0, help="seconds of reading per case")
    p.add_argument("--encodec", type=D.encodec_source, default="random", help="codec for the cached case")
    args = parser.parse_args(argv)
    if args.command == "kmeans":
        return kmeans_benchmark(args.n, args.dim, args.k, args.iters, args.threads, args.seed,
                                args.device, args.repeats)
    loader(args.out, args.seconds, per_case=args.per_case, encodec=args.encodec)


if __name__ == "__main__":
    D.run_cli(main)
