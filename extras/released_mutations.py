"""Serves extras/tests/test_released.py: breaks extras/released.py one way at a time and lists which tests notice.

`python -m extras.released_mutations` (about 4 minutes on 2 cores): each mutation is applied to a copy of
extras/ in a temporary folder (the fixtures linked, not copied), the test file runs there, and a
markdown table of the failing tests is printed. A mutation no test notices is marked "SURVIVES".
"""
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SPLIT = "y.view(B, T, d, self.n_heads).permute(0, 3, 1, 2)"
MERGE = "out.permute(0, 2, 3, 1).reshape(B, T, self.d_v * self.n_heads)"
MUTATIONS = [  # (what breaks, [(text in released.py, replacement)])
    ("ResiDual without final_norm on x1", [("x0 + self.final_norm(x1)", "x0 + x1")]),
    ("one FF block per layer (un-shared)", [("TransformerLayer(a, ff) for",
                                             "TransformerLayer(a, __import__('copy').deepcopy(ff)) for")]),
    ("positions without their learned scale", [("return x + self.scale * pe", "return x + pe")]),
    ("heads laid out d-major (the usual layout)", [
        (SPLIT, "y.view(B, T, self.n_heads, d).transpose(1, 2)"),
        (MERGE, "out.transpose(1, 2).reshape(B, T, self.d_v * self.n_heads)")]),
    ("-inf instead of their -1e9 on padded keys", [("logits + key_pad[:, None, None, :] * self.mask_value",
                                                   "logits.masked_fill(key_pad[:, None, None, :], float('-inf'))")]),
    ("no key padding mask", [(">= n_valid // self.arch.hop", ">= 10**9")]),
    ("v2 counts each chunk's true length (their bug fixed)", [
        ('piece.shape[1] if a.version == "v1" else min(n, a.chunk)', "piece.shape[1]")]),
    ("v2 keeps tails of <= 2048 samples", [("min_len=2048", "min_len=0")]),
    ("v1 layer L-1 = final output, as in v2", [
        ('if a.version == "v2":\n                inner[-1]', 'if True:\n                inner[-1]')]),
    ("filterbank not normalized", [("return (feats - self.stats[0]) / self.stats[1]", "return feats")]),
    ("12 heads assumed, config not read", [('n_heads = get("MultiHeadAttention", "num_heads")', "n_heads = 12")]),
    ("batch: padding mask on row 0 only (their v1 batch)", [
        ("key_pad.expand(x.shape[0], -1)", "torch.stack([key_pad] + [key_pad & False] * (x.shape[0] - 1))")]),
    ("timestamps in seconds (their wrapper's unit)", [("* (1000.0 / FRAME_RATE)", "* (1.0 / FRAME_RATE)")]),
    ("scene = max over frames", [("return frames.mean(dim=1)", "return frames.amax(dim=1)")]),
    ("declares 24000 Hz (their wrapper's rate)", [("sample_rate = HEAR_RATE  #", "sample_rate = SAMPLE_RATE  #")]),
    ("no check that FF copies are one block", [("if any(not torch.equal(", "if False and any(not torch.equal(")]),
    ("our train.py checkpoints not recognised", [('{"model", "config", "encodec"} <= ckpt.keys()', "False")]),
    ("key without size and mtime", [('|{os.path.getsize(path)}-{os.path.getmtime(path):.6f}|', "|")]),
    ("seeded codec not checked against its hash", [('if h.hexdigest() != ckpt.get("codec_sha256"):', "if False:")]),
]


def run(mutation):
    """Apply one mutation in a scratch copy of extras/ -> sorted names of the failing tests."""
    with tempfile.TemporaryDirectory(prefix="released-mut-") as tmp:
        extras = Path(tmp) / "extras"
        extras.mkdir()
        for f in ("__init__.py", "released.py", "released_fixtures.py", "test_released.py"):
            shutil.copy(ROOT / "extras" / f, extras / f)
        os.symlink(ROOT / "extras" / "fixtures", extras / "fixtures")
        src = (extras / "released.py").read_text()
        for old, new in mutation:
            if src.count(old) != 1:
                raise SystemExit(f"mutation anchor not found once in released.py: {old!r}")
            src = src.replace(old, new)
        (extras / "released.py").write_text(src)
        res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:warnings", "-p", "no:cacheprovider",
                              "--tb=no", "-rf", "extras/tests/test_released.py"], cwd=tmp, capture_output=True, text=True)
        return sorted(set(re.findall(r"^FAILED extras/tests/test_released.py::(\w+)", res.stdout, re.M)))


def main():
    print("| mutation of extras/released.py | tests that fail |\n|---|---|")
    survivors = 0
    for what, mutation in MUTATIONS:
        failed = run(mutation)
        survivors += not failed
        print(f"| {what} | {', '.join(failed) or 'SURVIVES'} |", flush=True)
    print(f"{len(MUTATIONS) - survivors} of {len(MUTATIONS)} mutations caught")


if __name__ == "__main__":
    main()
