"""Developer tool: breaks extras/released.py and the code it serves, one way at a time.

`python .ci/released_mutations.py`: the unmutated copy must pass first; then each mutation is
applied to a copy of the repository's code in a temporary folder (the fixtures linked, not copied),
extras/tests/test_released.py runs there, and a markdown table of the failing tests is printed. A
mutation no test notices is marked "SURVIVES"; the exit status is 1 if one does.
"""
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RELEASED = "extras/released.py"  # what a mutation (text, replacement) changes unless it names one
TESTS = "extras/tests/test_released.py"
SPLIT = "y.view(B, T, d, self.n_heads).permute(0, 3, 1, 2)"
MERGE = "out.permute(0, 2, 3, 1).reshape(B, T, self.d_v * self.n_heads)"
EVALUATE = "evaluate.py"
HEAR_FRAMES = "model.upstream.frames(resample_24k(audio, model.sample_rate))  # (B, T', D) at 75 Hz"
SKIP_LINE = """found = []
            while self.tok.type not in (tokenize.NEWLINE, tokenize.ENDMARKER):
                self.advance()"""
MUTATIONS = [  # (what breaks, [(text in released.py, replacement) or (file, text, replacement)])
    # their network and extractor
    ("ResiDual without final_norm on x1", [("x0 + self.final_norm(x1)", "x0 + x1")]),
    ("one FF block per layer (un-shared)", [
        ("TransformerLayer(a, ff) for",
         "TransformerLayer(a, __import__('copy').deepcopy(ff)) for")]),
    ("positions without their learned scale", [("return x + self.scale * pe", "return x + pe")]),
    ("heads laid out d-major (the usual layout)", [
        (SPLIT, "y.view(B, T, self.n_heads, d).transpose(1, 2)"),
        (MERGE, "out.transpose(1, 2).reshape(B, T, self.d_v * self.n_heads)")]),
    ("-inf instead of their -1e9 on padded keys", [
        ("logits + key_pad[:, None, None, :] * self.mask_value",
         "logits.masked_fill(key_pad[:, None, None, :], float('-inf'))")]),
    ("no key padding mask", [(">= n_valid // self.arch.hop", ">= 10**9")]),
    ("v2 counts each chunk's true length (their bug fixed)", [
        ('piece.shape[1] if a.version == "v1" else min(n_file, a.chunk)', "piece.shape[1]")]),
    ("v2 keeps tails of <= 2048 samples", [("min_len=2048", "min_len=0")]),
    ("v1 layer L-1 = final output, as in v2", [
        ('if a.version == "v2":\n                inner[-1]',
         'if True:\n                inner[-1]')]),
    ("filterbank not normalized", [
        ("return (feats - self.stats[0]) / self.stats[1]", "return feats")]),
    ("12 heads assumed, config not read", [
        ('n_heads = get("MultiHeadAttention", "num_heads")', "n_heads = 12")]),
    ("batch: padding mask on row 0 only (their v1 batch)", [
        ("key_pad.expand(x.shape[0], -1)",
         "torch.stack([key_pad] + [key_pad & False] * (x.shape[0] - 1))")]),
    ("no check that FF copies are one block", [
        ("if any(not torch.equal(", "if False and any(not torch.equal(")]),
    # long files, a piece at a time
    ("pieces not told the file's length (v2 masks a frame)", [
        (EVALUATE, "upstream.frames(wav, file_samples=n)", "upstream.frames(wav)")]),
    ("a v2 piece too short for a chunk raises", [
        ("if not pieces and min(n_file, a.chunk) <= a.min_len:", "if not pieces:")]),
    ("embed_file reads the whole file at once", [
        (EVALUATE, "read_audio(path, start, EMBED_SEGMENT)", "read_audio(path, start)"),
        (EVALUATE, "for start in range(0, n, EMBED_SEGMENT):",
         "for start in range(0, min(n, 1)):")]),
    # one rate per object, their HEAR protocol
    ("the released upstream declares 48000 (HEAR's rate)", [
        ("sample_rate = SAMPLE_RATE  # what frames() takes", "sample_rate = 48000  #")]),
    ("the HEAR model declares 24000 (their wrapper's rate)", [
        (EVALUATE, "sample_rate = 48000  # HEAR's rule", "sample_rate = SAMPLE_RATE  #")]),
    ("the HEAR model does not resample", [
        (EVALUATE, HEAR_FRAMES, "model.upstream.frames(audio)")]),
    ("timestamps in seconds (their wrapper's unit)", [
        ("* (1000.0 / FRAME_RATE)", "* (1.0 / FRAME_RATE)")]),
    ("scene = max over frames", [("return frames.mean(dim=1)", "return frames.amax(dim=1)")]),
    # files their loader refuses
    ("a v2 file without 'imports' loads", [
        ("if key not in ckpt:  #", "if key not in ckpt and key == 'config':  #"),
        ("if not isinstance(ckpt[key], str):", "if not isinstance(ckpt.get(key, ''), str):")]),
    ("get_model.model not checked", [
        ('wanted = [("get_model", "model", "EncodecMAE"),\n              (', "wanted = [(")]),
    ("the parser skips a line it cannot read", [
        ("self.fail(f\"expected '=' or ':' after {key!r}\")", SKIP_LINE)]),
    ("our train.py checkpoints not recognised", [
        ('{"model", "config", "encodec"} <= ckpt.keys()', "False")]),
    # messages that say what is wrong
    ("an undefined macro reads as None", [
        ("return resolve(macros[value], macros, seen + (value,))",
         "return resolve(macros.get(value), macros, seen + (value,))")]),
    ("torch's own text for an unreadable file", [
        ('raise ValueError(f"{path}: {unreadable(path, err)}")',
         'raise ValueError(f"{path}: {err}")')]),
    ("torch's warning on bytes that start like a pickle", [
        ('warnings.filterwarnings("ignore", message="Detected pickle protocol")', "pass")]),
    ("a missing num_heads reported as a design", [("if n_heads is None:", "if False:")]),
    ("a missing reference reported as a design", [("    if ref is None:\n", "    if False:\n")]),
    ("v2 without 'config' told it is neither v1 nor v2", [
        ('if "wav_encoder.post_net.weight" not in sd:',
         'if "wav_encoder.post_net.weight" not in sd or "config" not in ckpt:')]),
    ("the config's file not named", [
        ("cfg = GinConfig(text, gin_path if version == \"v1\" else f\"{path} (its 'config')\")",
         'cfg = GinConfig(text, "config")')]),
    # the codec and the cache key
    ("key without size and mtime", [
        ('|{os.path.getsize(path)}-{os.path.getmtime(path):.6f}|', "|")]),
    ("seeded codec not checked against its hash", [
        ('if h.hexdigest() != ckpt.get("codec_sha256"):', "if False:")]),
]


def copy_code(tmp):
    """The repository's code into tmp: the root's .py files, extras/ (its tests' fixtures linked)."""
    for f in ROOT.glob("*.py"):
        shutil.copy(f, tmp / f.name)
    ignore = shutil.ignore_patterns("fixtures", "__pycache__")
    shutil.copytree(ROOT / "extras", tmp / "extras", ignore=ignore)
    os.symlink(ROOT / "extras" / "tests" / "fixtures", tmp / "extras" / "tests" / "fixtures")


def run(mutation):
    """Apply one mutation in a scratch copy -> (pytest's exit status, failing tests, its output)."""
    with tempfile.TemporaryDirectory(prefix="released-mut-") as tmp:
        tmp = Path(tmp)
        copy_code(tmp)
        for file, old, new in mutation:
            src = (tmp / file).read_text()
            if src.count(old) != 1:
                raise SystemExit(f"mutation anchor not found once in {file}: {old!r}")
            (tmp / file).write_text(src.replace(old, new))
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(tmp))
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:warnings", "-p", "no:cacheprovider",
               "--tb=no", "-rf", TESTS]
        res = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, env=env)
        failed = re.findall(rf"^(?:FAILED|ERROR) {re.escape(TESTS)}::(\w+)", res.stdout, re.M)
        return res.returncode, sorted(set(failed)), res.stdout


def main():
    status, failed, out = run([])
    if status != 0:
        raise SystemExit(f"the unmutated copy fails (exit {status}): {failed}\n{out[-2000:]}")
    print("| mutation | tests that fail |\n|---|---|")
    survivors = 0
    for what, mutation in MUTATIONS:
        status, failed, out = run([(RELEASED, *m) if len(m) == 2 else m for m in mutation])
        if status not in (0, 1):  # 2-5: pytest could not run them (an import error): no verdict
            raise SystemExit(f"{what}: pytest exit {status}\n{out[-2000:]}")
        survivors += not failed
        print(f"| {what} | {', '.join(failed) or 'SURVIVES'} |", flush=True)
    print(f"{len(MUTATIONS) - survivors} of {len(MUTATIONS)} mutations caught")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
