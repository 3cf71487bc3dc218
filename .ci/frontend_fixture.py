"""Writes extras/tests/fixtures/authors_v2_front_end.pt: the AUTHORS' v2 mel and spec outputs.

A developer's tool. It runs their MelspectrogramProcessor and SpectrogramProcessor (their file
encodecmae/tasks/features/__init__.py, loaded from a clone of their repository) with the arguments
of their configs/features/mel.gin (spec, their spec.gin being empty: mel.gin's framing and the
statistics of extras/filterbank.py's NORM_STATS) on the clips of extras/tests/test_input.py, keeping some frames.
  git clone /work/.mirror/habla-liaa+encodecmae/repo AUTHORS
  python -m venv --system-site-packages VENV && VENV/bin/pip install loguru
  VENV/bin/python .ci/frontend_fixture.py --authors AUTHORS
"""
import argparse
import ast
import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import torch
import torchaudio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import model as M  # noqa: E402
from extras import filterbank  # noqa: E402


def test_module():
    """extras/tests/test_input.py, by path (extras/tests is not a package): its clips and names."""
    spec = importlib.util.spec_from_file_location("test_input", ROOT / "extras/tests/test_input.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def their_features(authors):
    """Their features module alone (their package's __init__ imports Lightning, gin, the hub)."""
    path = Path(authors) / "encodecmae" / "tasks" / "features" / "__init__.py"
    spec = importlib.util.spec_from_file_location("their_features", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def gin_block(text, configurable):
    """`configurable:` followed by indented `key = value` lines -> {key: value}, macros resolved."""
    macros = {}
    args = {}
    inside = False
    for line in text.splitlines():
        line = line.split("#")[0].rstrip()
        if not line.strip():
            continue
        if not line[0].isspace() and "=" in line and ":" not in line:
            key, value = line.split("=", 1)
            macros[key.strip()] = ast.literal_eval(value.strip())
        if not line[0].isspace():
            inside = line.strip() == configurable + ":"
            continue
        if inside:
            key, value = (s.strip() for s in line.split("=", 1))
            args[key] = macros[value[1:]] if value.startswith("%") else ast.literal_eval(value)
    return args


def frames_kept(T):
    """About 16 frames spread over the clip plus their last two (where ours may pad after)."""
    step = math.ceil(T / 16)
    return sorted(set(range(0, T, step)) | {T - 2, T - 1})


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--authors", required=True, help="a clone of habla-liaa/encodecmae")
    args = parser.parse_args()
    feats = their_features(args.authors)
    mel_gin = (Path(args.authors) / "encodecmae/configs/features/mel.gin").read_text()
    mel_args = gin_block(mel_gin, "encodecmae.tasks.features.MelspectrogramProcessor")
    framing = ("key_in", "key_out", "frame_length", "frame_shift", "sample_frequency",
               "window_type", "dither")
    spec_args = {k: v for k, v in mel_args.items() if k in framing}
    spec_args["norm_stats"] = list(filterbank.NORM_STATS["spec"])
    processors = {"mel": feats.MelspectrogramProcessor(**mel_args),
                  "spec": feats.SpectrogramProcessor(**spec_args)}
    tests = test_module()
    clips = []
    for clip in tests.fixture_clips():
        outs = {kind: torch.from_numpy(processor({"wav": clip.copy()})["wav_features"])
                for kind, processor in processors.items()}  # (T, bins) each
        T = len(outs["mel"])
        assert len(outs["spec"]) == T
        record = {"n": len(clip), "sha256": tests.sha(clip), "T": T}
        record["frames"] = torch.tensor(frames_kept(T))
        for kind, out in outs.items():
            record[kind] = out[record["frames"]].clone()
        clips.append(record)
        print(f"{len(clip)} samples: their {record['T']} frames, kept {len(record['frames'])}")
    commit = subprocess.run(["git", "-C", args.authors, "rev-parse", "HEAD"], capture_output=True,
                            text=True, check=True).stdout.strip()
    fixture = {"clips": clips, "mel_args": repr(mel_args), "spec_args": repr(spec_args),
               "authors_commit": commit, "torchaudio": torchaudio.__version__}
    out = ROOT / "extras" / "tests" / "fixtures" / "authors_v2_front_end.pt"
    out.parent.mkdir(exist_ok=True)
    tmp = out.with_suffix(".tmp")
    torch.save(fixture, tmp)
    os.replace(tmp, out)  # atomic
    print(f"wrote {out.relative_to(ROOT)} ({out.stat().st_size} bytes), authors at {commit[:7]}")
    print("mel", mel_args)
    print("spec", spec_args)


if __name__ == "__main__":
    main()
