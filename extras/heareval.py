"""`python extras/heareval.py --embeddings DIR`: our probes on heareval's own embedding files, to compare probes alone.

DIR is heareval's embeddings/<module> folder: one folder per task with the task's metadata and, per
split, <split>.embeddings.npy (a raw float32 memmap), <split>.embedding-dimensions.json and
<split>.target-labels.pkl. The grid, the probes, OUT/results.json and the table are evaluate.py's.
"""
import json
import os
import pickle
import sys
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):  # run as a script: the core files sit in the folder above
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import data as D
import evaluate as E
from data import UsageError, at_least


def read_heareval_split(task, split):
    """A split that heareval's embedding runner wrote (its memmap and pickled labels) -> (X (N, D), Y (N, C))."""
    n, D = json.loads((task.path / f"{split}.embedding-dimensions.json").read_text())
    X = np.memmap(task.path / f"{split}.embeddings.npy", dtype=np.float32, mode="r", shape=(n, D))
    with open(task.path / f"{split}.target-labels.pkl", "rb") as f:
        labels = pickle.load(f)  # heareval's own file; only read it from a run you trust
    Y = torch.zeros(n, len(task.vocab))  # (N, C)
    for i, clip_labels in enumerate(labels):
        Y[i, [task.vocab[str(label)] for label in clip_labels]] = 1
    return torch.tensor(np.array(X)), Y


def main(argv=None):
    p = D.Parser(prog="extras/heareval.py", description=__doc__.splitlines()[0])
    p.add_argument("--embeddings", required=True, help="heareval's embeddings/<module> folder")
    p.add_argument("--task", action="append", help="a task folder name (default: all)")
    p.add_argument("--probe", choices=("mlp", "linear"), default="mlp", help="the probe: HEAR's MLP grid, or linear")
    p.add_argument("--grid-points", type=at_least(1, int, 16), default=8, help="heareval keeps 8 of its 16 points")
    p.add_argument("--max-epochs", type=at_least(1), default=500, help="at most this many probe epochs")
    p.add_argument("--probe-seed", type=int, default=42, help="probe init, shuffle, the 8 grid points (heareval: 42)")
    p.add_argument("--probe-threads", type=at_least(1), default=1, help="CPU threads while training probes")
    p.add_argument("--device", type=D.device, default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda or cuda:N")
    p.add_argument("--out", default="eval_out", help="embeddings and results.json go here")
    args = p.parse_args(argv)
    root = Path(args.embeddings)
    names = args.task or sorted(t.name for t in root.glob("*") if (t / "task_metadata.json").is_file())
    if not names:
        raise UsageError(f"--embeddings {root}: no task folders in it (folders with a task_metadata.json)")
    try:
        tasks = [E.read_task(root / name) for name in names]
    except (ValueError, KeyError, OSError) as err:
        raise UsageError(f"--embeddings {root}: a task we cannot evaluate ({type(err).__name__}: {err})") from None
    grid = E.hear_grid(args.grid_points, args.probe == "linear", args.probe_seed, max_epochs=args.max_epochs)
    torch.set_num_threads(args.probe_threads)
    results = {root.name: {}}
    for task in tasks:
        row = E.probe_task({s: read_heareval_split(task, s) for s in task.splits}, task, grid, args.device,
                           args.probe_seed)
        results[root.name][task.name] = dict(row, probe=args.probe)
        print(f"{root.name} {task.name}: {task.metric} {row['test']:.4f}", flush=True)
    table = E.format_table(results, [t.name for t in tasks])
    os.makedirs(args.out, exist_ok=True)
    text = json.dumps(dict(table=table, results=results), indent=1).encode()
    D.write_atomic(Path(args.out, "results.json"), lambda f: f.write(text))
    print(table)
    return results


if __name__ == "__main__":
    D.run_cli(main)
