"""The layout: the core files import downwards only, and extras/ only inside the option that needs it."""
import json
import math
import os
import re
import subprocess
import sys
from dataclasses import asdict

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import data as D
import evaluate as E
import kmeans
import model as M
import train
from extras import cache, file_index, random_codec
from extras import demo_audio as demo
from model import CROP_FRAMES, CROP_SAMPLES, HOP, SAMPLE_RATE, gap_mask, make_config, num_frames
from test_all import (TINY_RUN, codec, demo_cache, losses, short_cache, stage_one, three_sounds_task,  # noqa: F401
                      tiny_checkpoint, tone, write)

torch.set_num_threads(1)


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BELOW = {"model": set(), "data": {"model"}, "train": {"model", "data"}, "kmeans": {"model", "data"},
         "evaluate": {"model", "data"}}  # what each core file may import of the others


def test_core_files_import_downwards_and_extras_only_inside_an_option():
    """model <- data <- train, kmeans, evaluate; none imports train; `extras` never at the top of a file."""
    import ast
    for name, allowed in BELOW.items():
        tree = ast.parse(open(os.path.join(ROOT, f"{name}.py")).read())
        modules = lambda nodes: {m.split(".")[0] for n in nodes for m in (
            [a.name for a in n.names] if isinstance(n, ast.Import) else [n.module] if isinstance(n, ast.ImportFrom)
            and n.module else [])}
        everywhere, top = modules(ast.walk(tree)), modules(tree.body)
        assert everywhere & set(BELOW) <= allowed, f"{name}.py imports {sorted(everywhere & set(BELOW) - allowed)}"
        assert "extras" not in top, f"{name}.py imports extras when it loads, not inside the option needing it"


def repository_imports():
    """{file: {files it imports}} for every .py file of the repository, lazy imports included."""
    import ast
    files = [os.path.relpath(os.path.join(d, n), ROOT) for d, _, names in os.walk(ROOT)
             if ".git" not in d for n in names if n.endswith(".py")]
    graph = {}
    for path in files:
        found = set()
        for node in ast.walk(ast.parse(open(os.path.join(ROOT, path)).read())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            for name in names:
                target = name.replace(".", "/") + ".py"
                if target in files and target != path:
                    found.add(target)
        graph[path] = found
    return graph


def test_no_two_files_of_the_repository_import_each_other_in_a_circle():
    """Imports run one way: no file reaches itself through the imports of others, lazy ones too."""
    graph = repository_imports()
    assert "extras/run.py" in graph["train.py"] and "data.py" in graph["extras/cache.py"]  # it sees
    for start in graph:  # a depth-first walk from every file: the first circle found is named
        stack = [(start, [start])]
        seen = set()
        while stack:
            path, trail = stack.pop()
            for nxt in graph[path]:
                assert nxt != start, "an import circle: " + " -> ".join(trail + [nxt])
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, trail + [nxt]))


def test_the_paper_run_has_every_hook_of_the_research_run():
    """train.PaperRun (extras/ deleted) answers every hook train.py calls on extras/run.py's run."""
    import inspect
    from extras.run import ResearchRun
    called = set(re.findall(r"\brun\.(\w+)\(", inspect.getsource(train)))
    assert called and called <= set(dir(ResearchRun))
    assert called - {"restore", "stopped"} <= set(dir(train.PaperRun))  # those two need a resume, a signal


def test_the_paper_path_loads_with_extras_deleted(tmp_path):
    """The five core files alone import, train.py --help prints, and an option that needs extras/ is one
    line naming the missing file: extras/ is optional."""
    import shutil
    for name in BELOW:
        shutil.copy(os.path.join(ROOT, f"{name}.py"), tmp_path)
    env = {**os.environ, "PYTHONPATH": ""}
    done = subprocess.run([sys.executable, "-c", "import model, data, train, kmeans, evaluate"], cwd=tmp_path,
                          capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    done = subprocess.run([sys.executable, "train.py", "--help"], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert done.returncode == 0 and "--M_prop" in done.stdout, done.stderr
    done = subprocess.run([sys.executable, "train.py", "--data", "demo", "--out", "o"], cwd=tmp_path,
                          capture_output=True, text=True, env=env)  # the demo audio is extras/'s
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert last == "train.py: error: this option needs extras/demo_signals.py, which is not here (extras/ deleted?)"


def test_the_paper_path_runs_with_extras_deleted(tmp_path):
    """Stage 1, k-means, stage 2 and an embedding, with the five core files alone and a codec given as a
    weights file (--encodec PATH, the offline path to EnCodec's real weights; here untrained ones)."""
    import shutil
    from encodec import EncodecModel
    for name in BELOW:
        shutil.copy(os.path.join(ROOT, f"{name}.py"), tmp_path)
    torch.manual_seed(0)
    torch.save(EncodecModel.encodec_model_24khz(pretrained=False).state_dict(), tmp_path / "codec.th")
    (tmp_path / "wavs").mkdir()
    for i in range(4):
        sf.write(tmp_path / "wavs" / f"{i}.wav", np.random.default_rng(i).normal(0, 0.1, 36000), 24000)
    env = {**os.environ, "PYTHONPATH": "", "OMP_NUM_THREADS": "1"}
    run = ["--config", "tiny", "--data", "wavs", "--encodec", "codec.th", "--batch_size", "2", "--workers", "0",
           "--gamma", "estimate", "--gamma_clips", "2", "--log_every", "1"]
    for cmd in (["train.py", *run, "--out", "s1", "--steps", "2"],
                ["kmeans.py", "--checkpoint", "s1/ckpt-00000002.pt", "--data", "wavs", "--out", "km", "--k", "2",
                 "--n-clips", "4", "--n-frames", "100"],
                ["train.py", *run, "--out", "s2", "--steps", "1", "--init_from", "s1/ckpt-00000002.pt",
                 "--kmeans_store", "km"],
                ["-c", "import evaluate; print(*evaluate.embed_file(evaluate.load_upstream('s2/ckpt-00000001.pt',"
                       " encodec='codec.th'), 'wavs/0.wav').shape)"]):
        done = subprocess.run([sys.executable, *cmd], cwd=tmp_path, capture_output=True, text=True, env=env)
        assert done.returncode == 0, (cmd, done.stderr[-2000:])
    assert done.stdout.split() == ["113", "128"]  # 1.5 s at 75 Hz, tiny's width


def test_the_root_holds_the_eight_files_and_three_folders():
    """The repository's root: README.md, requirements.txt, the five core files, test_all.py, .ci/, extras/, docs/."""
    done = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip("not a git checkout")
    top = {line.split("/")[0] for line in done.stdout.splitlines()}
    allowed = {"README.md", "requirements.txt", "test_all.py", ".ci", ".gitignore", "extras", "docs"}
    assert top <= allowed | {f"{n}.py" for n in BELOW}, sorted(top - allowed - {f"{n}.py" for n in BELOW})


def test_the_core_files_are_plain_code():
    """The five core files: no line over 100 columns, a docstring on every class, and no tuple
    assigned to a tuple (one assignment per line; unpacking a function's result is allowed)."""
    import ast
    for name in BELOW:
        text = open(os.path.join(ROOT, f"{name}.py")).read()
        for number, line in enumerate(text.splitlines(), 1):
            assert len(line) <= 100, f"{name}.py:{number} has {len(line)} columns"
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef):
                assert ast.get_docstring(node), f"{name}.py:{node.lineno} class {node.name} has no docstring"
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Tuple):
                packed = [t for t in node.targets if isinstance(t, ast.Tuple)]
                assert not packed, f"{name}.py:{node.lineno} assigns several names in one line"


def test_extras_top_holds_the_users_files_and_its_tests_apart():
    """extras/: modules that users, lecturers and researchers run or import, no test file and no
    test data among them (those live in extras/tests/, developer tools in .ci/); each module
    opens with a docstring (the place to say what it serves)."""
    done = subprocess.run(["git", "ls-files", "extras"], cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip("not a git checkout")
    top = {line.split("/")[1] for line in done.stdout.splitlines()}
    folders = {name for name in top if not name.endswith(".py")}
    assert folders == {"tests"}, sorted(folders)
    tests = sorted(name for name in top if name.startswith(("test_", "conftest")))
    assert not tests, tests
    for name in sorted(top - folders):
        text = open(os.path.join(ROOT, "extras", name)).read()
        assert name == "__init__.py" or text.startswith('"""'), f"extras/{name} has no docstring"
