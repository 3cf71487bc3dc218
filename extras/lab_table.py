"""A lab's table (for lecturers, beside section 3.2): mean and standard errors over seeds, per task.

    python extras/lab_table.py EVAL_DIR [EVAL_DIR ...] [--rename OLD=NEW ...]

Reads the results.json of each `evaluate.py --out EVAL_DIR` run and groups upstreams whose names
differ only in a `-s<seed>` part (runs/mel-s0/..., runs/mel-s1/...), or that carry the same name in
several runs (ECMAE-R:tiny evaluated with --seed 0, 1, 2). Each cell is the mean test accuracy over
the group's seeds, ± the standard error of that mean over seeds (run to run), and in brackets the
test set's own binomial standard error at that accuracy, which repeats on the same clips do not
shrink. Two rows differ beyond noise when their gap exceeds twice the root of the summed squares
of both kinds of error of both rows.
"""
import argparse
import json
import math
import os
import re
import sys
from collections import defaultdict


def group_name(name, renames):
    """An upstream's row: its name without the seed part, then renamed."""
    row = re.sub(r"-s\d+(?=/|$)", "", name)
    for old, new in renames:
        row = row.replace(old, new)
    return row


def read_groups(folders, renames):
    """{row: {task: [(score, n_test), ...]}} over the results.json files of the folders."""
    rows = defaultdict(lambda: defaultdict(list))
    for folder in folders:
        path = os.path.join(folder, "results.json")
        if not os.path.isfile(path):
            raise SystemExit(f"{path}: no such file (an evaluate.py --out folder?)")
        with open(path) as f:
            results = json.load(f)["results"]
        for name, tasks in results.items():
            for task, r in tasks.items():
                rows[group_name(name, renames)][task].append((r["test"], r["n_test"]))
    return rows


def cell(scores):
    """(mean, SE over seeds or None for one seed, the test set's binomial SE) of a row's scores."""
    values = [s for s, _ in scores]
    mean = sum(values) / len(values)
    spread = None
    if len(values) > 1:
        var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
        spread = math.sqrt(var / len(values))
    n_test = scores[0][1]
    return mean, spread, math.sqrt(mean * (1 - mean) / n_test)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folders", nargs="+", help="evaluate.py --out folders")
    p.add_argument("--rename", action="append", default=[], metavar="OLD=NEW",
                   help="replace OLD by NEW in the row names; repeat")
    args = p.parse_args(argv)
    renames = [tuple(r.split("=", 1)) for r in args.rename if "=" in r]
    rows = read_groups(args.folders, renames)
    tasks = sorted({t for row in rows.values() for t in row})
    print("| upstream | seeds | " + " | ".join(tasks) + " |")
    print("|---" * (len(tasks) + 2) + "|")
    for name, row in rows.items():
        seeds = max(len(row[t]) for t in tasks if t in row)
        cells = []
        for t in tasks:
            if t not in row:
                cells.append("-")
                continue
            mean, spread, test_se = cell(row[t])
            seed_part = f" ± {100 * spread:.1f}" if spread is not None else ""
            cells.append(f"{100 * mean:.1f}{seed_part} [{100 * test_se:.1f}]")
        print(f"| {name} | {seeds} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    sys.exit(main())
