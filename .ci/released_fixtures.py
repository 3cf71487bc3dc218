"""Developer tool (needs the authors' environment): their code makes the released fixtures.

`build` (tiny random models in their formats + their embeddings) and `fullsize` need their package
(gin, ginpipe, Lightning; docs/RELEASED.md shows the venv):
  VENV/bin/python .ci/released_fixtures.py build --v1 AUTHORS/encodecmae-v1 \
      --v2 AUTHORS/encodecmae-head
  VENV/bin/python .ci/released_fixtures.py fullsize --v1 ... --v2 ...   (full-size random models)
`check` needs only this project: `python .ci/released_fixtures.py check` prints our max abs diff
per kind and layer. `gin-syntax [N]` (gin only): our gin parser and gin's own on N damaged copies
of each fixture config. `refusals --v2 ...`: their load_model and ours on damaged v2 files.
`build` writes extras/tests/fixtures/released/<kind>.pt (v2) or <kind>/{model.pt,config.gin,imports}
(v1), and <kind>.expected.pt. What the tests read of them (paths, clips, the damaged files) is
extras/tests/released_cases.py.
"""
import argparse
import hashlib
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from .ci/: the repository's modules sit above
    sys.path.insert(0, str(ROOT))

from extras.tests import released_cases  # noqa: E402
from extras.tests.released_cases import (CODEC_SEED, FIXTURES, fixture_clips,  # noqa: E402
                                         fixture_path)

WEIGHT_SEED = 7
TINY = ["NUM_DECODER_LAYERS=1", "NUM_TARGET_TOKENS=16"]  # + ff_dim=64 for encoder and decoder (below)
WAV = ["datasets/audioset-unbalanced-24k.gin", "datasets/fma-large-24k.gin", "datasets/librilight-6k-24k.gin"]
# The repo's configs/features/spec.gin is EMPTY: this is our reconstruction, mel.gin with the spectrogram.
SPEC_GIN = """
encodecmae.tasks.data.DictDataset:
    out_cols=['wav','wav_features']
    preprocessor=@encodecmae.tasks.features.SequentialProcessor
encodecmae.tasks.features.SequentialProcessor:
    processors=[@encodecmae.tasks.features.ReadAudioProcessor, @encodecmae.tasks.features.SpectrogramProcessor]
encodecmae.tasks.features.ReadAudioProcessor:
    key_in = 'filename'
    key_out = 'wav'
    max_length = %MAX_AUDIO_DURATION
encodecmae.tasks.features.SpectrogramProcessor:
    key_in = 'wav'
    key_out = 'wav_features'
    sample_frequency=24000
    frame_shift=13.28
    frame_length=26.56
    window_type='hanning'
    dither=0.0
    norm_stats=[-2.5, 3.1]
encodecmae.models.encoders.WavEncoder:
    encoder = @torch.nn.Identity
    post_net = @wav_encoder_proj/torch.nn.Linear
    hop_length = 320
    fs = 24000
    key_in = 'wav_features'
    key_out = 'wav_features'
wav_encoder_proj/torch.nn.Linear:
    in_features = 513
    out_features = %MODEL_DIM
encodecmae.models.targets.EncodecQuantizer:
    key_in = 'wav'
    use_encodec_encoder = True
"""
ST_V2 = ["ST_CHECKPOINT='none'", "ST_DATASET_DIR='/nonexistent'"]
ST_V1 = ["tasks.models.EncodecMAE.n_extra_targets=1", "SELFTRAIN_CHECKPOINT='none'", "SELFTRAINING_DATADIR='/x'"]
# kind: (version, config files under configs/ (or literal text), --mods, config text as gin.config_str() writes it?)
KINDS = {
    "encodecmae-small": ("v1", ["base/unsupervised_pretrain.gin", "models/encodecmae.gin", *WAV,
                                "features/wav_only.gin"], ["NUM_ENCODER_LAYERS=2", "MODEL_DIM=36"], True),
    "encodecmae-large-st": ("v1", ["base/self-train.gin", "models/encodecmae.gin",
                                   "models/selftrain_8q_weight_by_variance.gin"],
                            ["NUM_ENCODER_LAYERS=3", "MODEL_DIM=40", *ST_V1], True),
    "ec-ec-base": ("v2", ["base/unsupervised_pretrain.gin", "models/encodecmae.gin", *WAV, "features/wav_only.gin"],
                   ["NUM_ENCODER_LAYERS=3", "MODEL_DIM=36"], False),
    "mel256-ec-base_st": ("v2", ["base/self-train.gin", "models/encodecmae.gin", "features/mel.gin", "features/st.gin"],
                          ["NUM_ENCODER_LAYERS=3", "MODEL_DIM=36", *ST_V2], True),
    "mel256-ec-large": ("v2", ["base/unsupervised_pretrain.gin", "models/encodecmae.gin", *WAV, "features/mel.gin"],
                        ["NUM_ENCODER_LAYERS=3", "MODEL_DIM=40"], True),
    "spec-ec-base": ("v2", ["base/unsupervised_pretrain.gin", "models/encodecmae.gin", *WAV, SPEC_GIN],
                     ["NUM_ENCODER_LAYERS=2", "MODEL_DIM=36", "NUM_ENCODER_HEADS=4"], False),
}
assert {k: v[0] for k, v in KINDS.items()} == released_cases.KINDS, "the tests' kinds are these"
FULL = {  # full-size random models for `fullsize`: (fixture kind whose configs they use, --mods)
    "encodecmae-base (v1)": ("encodecmae-small", ["NUM_ENCODER_LAYERS=10", "MODEL_DIM=768"]),
    "mel256-ec-base (v2)": ("mel256-ec-large", ["NUM_ENCODER_LAYERS=10", "MODEL_DIM=768"]),
    "encodecmae-large (v1)": ("encodecmae-small", ["NUM_ENCODER_LAYERS=20", "MODEL_DIM=1024"]),
}


def record_layers(kind):
    """Their layer indices we record: the final output, the first layer, and in v1 layer L-1 (not the final)."""
    n_layers = int(next(m for m in KINDS[kind][2] if m.startswith("NUM_ENCODER_LAYERS=")).split("=")[1])
    return (-1, 0, n_layers - 1) if KINDS[kind][0] == "v1" else (-1, 0)


# ---------------------------------------------------------------- inside the authors' environment
def codec_sha256(state_dict):
    """The hash extras/released.py checks after rebuilding the codec from CODEC_SEED."""
    h = hashlib.sha256()
    for k, v in state_dict.items():
        h.update(k.encode() + v.contiguous().numpy().tobytes())
    return h.hexdigest()


def seeded_codec():
    """Their code calls EncodecModel.encodec_model_24khz() (a download): give it a seeded random one."""
    from encodec import EncodecModel
    original = EncodecModel.encodec_model_24khz

    def random_codec(pretrained=True, repository=None):
        with torch.random.fork_rng():
            torch.manual_seed(CODEC_SEED)
            return original(pretrained=False)
    EncodecModel.encodec_model_24khz = staticmethod(random_codec)


def their_config(version, repo, files, mods, tiny=True):
    """Parse their config files the way ginpipe's training run does -> (raw text, config_str(), imports)."""
    import gin
    from ginpipe.core import State, gin_configure_externals, gin_parse_with_flags
    cfg_dir = Path(repo) / "encodecmae" / "configs"
    texts = [f if "\n" in f else (cfg_dir / f).read_text() for f in files]
    # st.gin adds LoadNumpyProcessor, which their extract_features_from_array would call and crash on
    texts = ["\n".join(l for l in t.splitlines() if "LoadNumpyProcessor]" not in l) for t in texts]
    prefix = "tasks.models" if version == "v1" else "encodecmae.models"
    if tiny:
        mods = TINY + [f"{s}/{prefix}.transformers.TransformerEncoder.ff_dim=64" for s in ("encoder", "decoder")] + mods
    mods += (["encodecmae.hub.get_model.model=@tasks.models.EncodecMAE"] if version == "v1" else
             ["encodecmae.hub.get_model.model=@encodecmae.models.EncodecMAE",
              "encodecmae.hub.get_model.processor=@encodecmae.tasks.features.SequentialProcessor"])
    flags = {"module_list": [str(cfg_dir / "imports")], "config_str": texts, "mods": mods,
             "project_name": "fixtures", "experiment_name": "released"}  # ginpipe's default name is the clock
    gin.clear_config()
    gin_configure_externals(flags)
    state = gin_parse_with_flags(State(flags=flags), flags)
    out = state.config_str, gin.config_str(), flags["module_list_str"]
    gin.clear_config()
    return out


def randomize(model):
    """Seeded random values for every non-codec parameter, so each one moves the embeddings."""
    g = torch.Generator().manual_seed(WEIGHT_SEED)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(("wav_encoder.model.", "wav_encoder.encoder.model.", "target_encoder.")):
                continue
            r = torch.randn(p.shape, generator=g)
            if name.endswith("scale"):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            elif p.ndim == 1 and "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * r)
            elif p.ndim == 1:
                p.copy_(0.1 * r)
            else:
                p.copy_(r / p.shape[1] ** 0.5)


def their_model(version, repo, kind, text, imports, out_dir):
    """Build their model from the config, randomize, save it in THEIR format, load it with THEIR load_model."""
    import gin
    from ginpipe.core import gin_configure_externals
    import encodecmae.hub as hub
    gin.clear_config()
    gin_configure_externals({"module_list_str": imports})
    gin.parse_config(text)
    model = hub.get_model()() if version == "v1" else hub.get_model()[0]()
    gin.clear_config()
    randomize(model)
    sd = model.state_dict()
    if version == "v1":  # Lightning-style {'state_dict'} + config.gin + imports, as lpepino/encodecmae-<size>
        (out_dir / kind).mkdir(parents=True, exist_ok=True)
        files = {"model.pt": out_dir / kind / "model.pt", "config.gin": out_dir / kind / "config.gin",
                 "imports": out_dir / kind / "imports"}
        torch.save({"state_dict": sd}, files["model.pt"])
        files["config.gin"].write_text(text)
        files["imports"].write_text(imports)
        hub.hf_hub_download = lambda repo_id, filename: str(files[filename])
        theirs = hub.load_model(kind.split("-", 1)[1], device="cpu")
        theirs.visible_encoder.compile = False  # as their HEAR wrapper does (no torch.compile on CPU)
    else:  # {'state_dict', 'config', 'imports'}, as lpepino/encodecmae-v2/<name>.pt
        torch.save({"state_dict": sd, "config": text, "imports": imports}, out_dir / f"{kind}.pt")
        hub.get_available_models = lambda: [kind]
        hub.hf_hub_download = lambda repo_id, filename: str(out_dir / filename)
        theirs = hub.load_model(kind, device="cpu")
    return theirs.eval(), sd


def feature_params(model, version):
    """Their parameter count of the feature path (shared FF once), codec excluded."""
    names = ["feat_projector", "positional_encoder"] if version == "v1" else ["wav_encoder.post_net",
                                                                                "masker.positional_encoder"]
    names += ["visible_encoder.encoder_layers", "visible_encoder.final_norm"]
    return sum(p.numel() for p in {id(p): p for n in names for p in model.get_submodule(n).parameters()}.values())


def build_one(kind, repo, mods_extra=None, out_dir=None):
    """One kind inside their environment: write the fixture and their embeddings (or full-size files)."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    seeded_codec()
    version_k, files, mods, canonical = KINDS[kind]
    full = mods_extra is not None
    mods = mods + (mods_extra or [])
    raw, config_str, imports = their_config(version_k, repo, files, mods, tiny=not full)
    text = config_str if canonical or version_k == "v1" else raw
    tmp = Path(out_dir) if full else Path(tempfile.mkdtemp(prefix="released-"))
    t0 = time.time()
    theirs, sd = their_model(version_k, repo, kind, text, imports, tmp)
    t_build = time.time() - t0
    layers = (-1, 0) if full else record_layers(kind)
    clip_ids = [2] if full else [0, 1, 2, 3, 4] if version_k == "v1" else [0, 1, 2, 3]
    clips = [fixture_clips()[j] for j in clip_ids]
    out, t0 = {}, time.time()
    for j, clip in enumerate(clips):
        for layer in layers:
            y = theirs.extract_features_from_array(torch.from_numpy(clip)[None], layer=layer)
            out[f"{clip_ids[j]}/{layer}"] = torch.from_numpy(np.ascontiguousarray(y[0]))  # (T, D)
    t_run = time.time() - t0
    last = None  # v2: is their layer L-1 the final output, as we read their code?
    if KINDS[kind][0] == "v2" and not full:
        n_layers = int(next(m for m in mods if m.startswith("NUM_ENCODER_LAYERS=")).split("=")[1])
        y = theirs.extract_features_from_array(torch.from_numpy(clips[2])[None], layer=n_layers - 1)
        last = float(np.abs(y[0] - out["2/-1"].numpy()).max())
    batch = {}
    for j in (0, 1) if not full else ():  # their batched call on two copies of a clip, rows vs the single call
        y = theirs.extract_features_from_array(torch.from_numpy(np.stack([clips[j]] * 2)), layer=-1)
        batch[f"clip{j}"] = [float(np.abs(y[b] - out[f"{j}/-1"].numpy()).max()) for b in (0, 1)]
    commit = subprocess.run(["git", "-C", repo, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    expected = {"kind": kind, "version": version_k, "layers": layers, "clip_ids": clip_ids,
                "out": out, "n_params": feature_params(theirs, version_k), "authors_commit": commit, "batch": batch,
                "v2_layer_L-1_minus_final": last}
    seconds = {"build_save_load": round(t_build, 1), "extract": round(t_run, 1)}
    if full:  # the times go with full-size runs only: a fixture must come out byte for byte the same
        torch.save(dict(expected, seconds=seconds), tmp / f"{kind}.expected.pt")
        return
    codec = theirs.wav_encoder.model if version_k == "v1" else getattr(theirs.wav_encoder.encoder, "model", None)
    keep = {k: v for k, v in sd.items()
            if not k.startswith(("wav_encoder.model.", "wav_encoder.encoder.model.", "target_encoder."))}
    fixture = {"state_dict": keep} if version_k == "v1" else {"state_dict": keep, "config": text, "imports": imports}
    if codec is not None:
        fixture.update(codec_seed=CODEC_SEED, codec_sha256=codec_sha256(codec.state_dict()))
    FIXTURES.mkdir(parents=True, exist_ok=True)
    if version_k == "v1":
        (FIXTURES / kind).mkdir(exist_ok=True)
        for name in ("config.gin", "imports"):
            (FIXTURES / kind / name).write_text((tmp / kind / name).read_text())
    torch.save(fixture, fixture_path(kind))
    torch.save(expected, FIXTURES / f"{kind}.expected.pt")
    print(json.dumps({"kind": kind, "their_batch_rows_vs_single_max_abs": batch, "n_params": expected["n_params"],
                      "v2_layer_L-1_minus_final": last, "seconds": seconds}))


# ---------------------------------------------------------------- our side (no authors' package)
def compare(kind, path=None, expected=None):
    """Our loader on a kind's file -> ({layer: max abs diff over the recorded clips}, our model)."""
    from extras.released import load_released
    exp = torch.load(expected or FIXTURES / f"{kind}.expected.pt", weights_only=True)
    m = load_released(path or fixture_path(kind))
    diffs = {layer: 0.0 for layer in exp["layers"]}
    for j in exp["clip_ids"]:
        ours = m.all_layers(torch.from_numpy(fixture_clips()[j])[None])
        for layer in exp["layers"]:
            theirs = exp["out"][f"{j}/{layer}"]
            mine = ours[layer if layer == -1 else layer % m.arch.n_layers][0]
            if mine.shape != theirs.shape:
                raise AssertionError(f"{kind} clip {j} layer {layer}: ours {tuple(mine.shape)}, "
                                     f"theirs {tuple(theirs.shape)}")
            diffs[layer] = max(diffs[layer], float((mine - theirs).abs().max()))
    return diffs, m


def check():
    """Print our max abs diff per kind and layer; exit 1 if one is over 1e-5."""
    worst = 0.0
    print("| kind | version | front end | D | heads | layers | layer -1 | layer 0 | layer L-1 (v1) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for kind in KINDS:
        d, m = compare(kind)
        worst = max(worst, *d.values())
        a = m.arch
        print(f"| {kind} | {a.version} | {a.front} | {a.d_model} | {a.n_heads}x{a.d_qk} | {a.n_layers} | "
              + " | ".join(f"{v:.1e}" for v in d.values()) + " |" * (4 - len(d)))
    print(f"worst: {worst:.2e} (tolerance 1e-5)")
    return 0 if worst <= 1e-5 else 1


def spawn(kind, repo, *extra):
    """Run build_one in a child whose sys.path has THEIR package (v1 and v2 are both `encodecmae`)."""
    env = dict(os.environ, PYTHONPATH=f"{repo}{os.pathsep}{ROOT}")
    subprocess.run([sys.executable, str(Path(__file__).resolve()), "_one", kind, repo, *extra],
                   cwd=ROOT, env=env, check=True)


def fullsize(repos):
    """Full-size random models in their code vs our loader on one 6.5-s clip; prints diffs and times."""
    for label, (kind, mods) in FULL.items():
        with tempfile.TemporaryDirectory(prefix="released-full-") as tmp:
            t0 = time.time()
            spawn(kind, repos[KINDS[kind][0]], tmp, json.dumps(mods))
            t_theirs = time.time() - t0
            path = Path(tmp) / (f"{kind}/model.pt" if KINDS[kind][0] == "v1" else f"{kind}.pt")
            exp = torch.load(Path(tmp) / f"{kind}.expected.pt", weights_only=True)
            t0 = time.time()
            d, _ = compare(kind, path, Path(tmp) / f"{kind}.expected.pt")
            print(f"{label}: {path.stat().st_size / 1e6:.0f} MB file, their feature-path params {exp['n_params']:,}; "
                  f"max abs diff layer -1 {d[-1]:.1e}, layer 0 {d[0]:.1e}; their child process {t_theirs:.0f} s "
                  f"(extract {exp['seconds']['extract']} s), our load + extract {time.time() - t0:.1f} s", flush=True)


def gin_syntax(per_config=500, seed=0):
    """Our gin parser (extras/released.py) against gin's own on damaged copies of the fixtures'
    configs: each cut, a character dropped, added or swapped, a line dropped or doubled. Gin's
    parser reads syntax only here (references and macros are not looked up). Prints the tally;
    returns 1 if the two disagree on any copy."""
    from gin import config_parser
    from extras.released import GinError, parse_gin

    class Delegate(config_parser.ParserDelegate):
        """References and macros as placeholders: the syntax alone decides."""

        def configurable_reference(self, scoped_name, evaluate):
            return scoped_name

        def macro(self, scoped_name):
            return scoped_name

    def gin_reads(text):
        try:
            list(config_parser.ConfigParser(text, Delegate()))
            return True
        except Exception:  # gin's SyntaxError, and the tokenizer's errors it lets through
            return False

    def ours_reads(text):
        try:
            parse_gin(text)
            return True, ""
        except GinError as err:
            return False, str(err)

    rng = random.Random(seed)
    chars = list("=:()[]{},'\"#@%$.-/+ \n\t\\x1")
    tally, disagree = {}, []
    for kind in KINDS:
        path = fixture_path(kind)
        text = (path.with_name("config.gin").read_text() if KINDS[kind][0] == "v1" else
                torch.load(path, weights_only=True)["config"])
        for _ in range(per_config):
            how = rng.choice(["cut", "drop", "add", "swap", "drop line", "double line"])
            i = rng.randrange(len(text))
            lines = text.splitlines(True)
            j = rng.randrange(len(lines))
            damaged = {"cut": lambda: text[:i], "drop": lambda: text[:i] + text[i + 1:],
                       "add": lambda: text[:i] + rng.choice(chars) + text[i:],
                       "swap": lambda: text[:i] + text[i + 1:i + 2] + text[i:i + 1] + text[i + 2:],
                       "drop line": lambda: "".join(lines[:j] + lines[j + 1:]),
                       "double line": lambda: "".join(lines[:j + 1] + lines[j:])}[how]()
            (ours, why), line = ours_reads(damaged), damaged[:i].count("\n")
            verdict = (gin_reads(damaged), ours)
            tally[verdict] = tally.get(verdict, 0) + 1
            if verdict[0] != verdict[1]:
                disagree.append((kind, how, verdict, why or damaged.splitlines()[line][:80]))
    for (g, o), n in sorted(tally.items()):
        print(f"gin {'reads' if g else 'refuses'}, ours {'reads' if o else 'refuses'}: {n}")
    for kind, how, (g, o), why in disagree[:10]:
        print(f"disagree: {kind}, {how}: gin {'reads' if g else 'refuses'}; ours: {why}")
    return 1 if disagree else 0


def their_refusals():
    """Inside their environment: each of released_cases.v2_variants() through THEIR load_model ->
    one JSON line {what: "loads" or their exception's first line}."""
    seeded_codec()
    import encodecmae.hub as hub
    from extras.tests.released_cases import v2_variants
    out = {}
    with tempfile.TemporaryDirectory(prefix="released-refusals-") as tmp:
        hub.get_available_models = lambda: ["variant"]
        hub.hf_hub_download = lambda repo_id, filename: str(Path(tmp) / filename)
        for what, ckpt in v2_variants().items():
            torch.save(ckpt, Path(tmp) / "variant.pt")
            try:
                hub.load_model("variant", device="cpu")
                out[what] = "loads"
            except Exception as err:  # whatever their code raises, as a user would see it
                first = (str(err).strip().splitlines() or [""])[0]
                out[what] = f"{type(err).__name__}: {first[:90]}"
    print(json.dumps(out))


def refusals(repo):
    """Their load_model (a child with their package) and ours on each damaged v2 file: a table."""
    from extras.released import load_released
    from extras.tests.released_cases import v2_variants
    env = dict(os.environ, PYTHONPATH=f"{repo}{os.pathsep}{ROOT}")
    child = subprocess.run([sys.executable, str(Path(__file__).resolve()), "_refusals"], cwd=ROOT,
                           env=env, check=True, capture_output=True, text=True)
    theirs = json.loads(child.stdout.strip().splitlines()[-1])
    print("| file | their load_model | ours |\n|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="released-refusals-") as tmp:
        path = Path(tmp) / "variant.pt"
        for what, ckpt in v2_variants().items():
            torch.save(ckpt, path)
            try:
                load_released(path)
                ours = "loads"
            except ValueError as err:
                ours = str(err).replace(str(path), "FILE")
            print(f"| {what} | {theirs[what]} | {ours} |")
    return 0


def main(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("command", choices=["build", "check", "fullsize", "gin-syntax", "refusals", "_one",
                                        "_refusals"])
    p.add_argument("rest", nargs="*")
    p.add_argument("--v1", help="their repository checked out at tag v.1.0.0")
    p.add_argument("--v2", help="their repository at HEAD (encodecmae/hub.py)")
    args = p.parse_args(argv)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    if args.command == "check":
        return check()
    if args.command == "gin-syntax":  # needs gin only (their venv): `gin-syntax [N per config]`
        return gin_syntax(*map(int, args.rest[:1]))
    if args.command == "_refusals":
        their_refusals()
        return 0
    if args.command == "refusals":
        if not args.v2:
            p.error("refusals runs the authors' load_model: give --v2 (their checkout at HEAD)")
        return refusals(args.v2)
    repos = {"v1": args.v1, "v2": args.v2}
    if args.command != "_one" and not (args.v1 and args.v2):
        p.error(f"{args.command} runs the authors' code: give --v1 and --v2 (their two checkouts)")
    if args.command == "_one":
        kind, repo, *full = args.rest
        build_one(kind, repo, mods_extra=json.loads(full[1]) if full else None, out_dir=full[0] if full else None)
        return 0
    if args.command == "fullsize":
        fullsize(repos)
        return 0
    for kind in KINDS:
        spawn(kind, repos[KINDS[kind][0]])
    return check()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
