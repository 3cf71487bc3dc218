"""Training curves for the docs and for students: loss and masked accuracy per stream from train.py's metrics.jsonl.

`python extras/plot_curves.py OUT/metrics.jsonl [STAGE2/metrics.jsonl] --out curves.png` (stage 1,
then stage 2, one after the other). matplotlib is needed for this only.
"""
import json
import os
import sys

if __package__ in (None, ""):  # run as a script: the core files sit in the folder above
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import data as D


def plot_curves(metrics_files, out):
    """Training curves from train.py's metrics.jsonl files (stage 1, then stage 2, one after the other):
    loss and masked accuracy per stream against steps. matplotlib is needed for this only."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise D.UsageError("plot-curves needs matplotlib (pip install matplotlib); nothing else does") from err
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    offset = 0
    for n, path in enumerate(metrics_files):
        with open(path) as f:
            records = [json.loads(line) for line in f]
        steps = [offset + r["step"] for r in records]
        ax_loss.plot(steps, [r["loss"] for r in records], color=f"C{n}", label=f"stage {n + 1}: training loss L")
        val = [(offset + r["step"], r["val_loss"]) for r in records if "val_loss" in r]
        if val:
            ax_loss.plot(*zip(*val), "o--", color=f"C{n}", label=f"stage {n + 1}: held-out loss")
        for q in range(len(records[0]["masked_acc"])):
            ax_acc.plot(steps, [r["masked_acc"][q] for r in records], color=plt.cm.viridis(q / 8),
                        ls="-" if n == 0 else "--", label=f"stream {q + 1}" if n == 0 or q == 8 else None)
        offset = steps[-1]
        ax_loss.axvline(offset, color="grey", lw=0.5)
    ax_loss.set(xlabel="step", ylabel="weighted loss", title="loss (stage 1, then stage 2)")
    ax_acc.set(xlabel="step", ylabel="masked top-1 accuracy", title="masked accuracy per stream (9 = k-means)")
    ax_loss.legend(fontsize=7)
    ax_acc.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")




def main(argv=None):
    parser = D.Parser(prog="extras/plot_curves.py", description=__doc__.splitlines()[0])
    parser.add_argument("metrics", nargs="+", help="metrics.jsonl of stage 1 (then of stage 2)")
    parser.add_argument("--out", required=True, help="the figure (.png)")
    args = parser.parse_args(argv)
    for path in args.metrics:
        if not os.path.isfile(path):
            raise D.UsageError(f"{path}: no such metrics file")
    plot_curves(args.metrics, args.out)


if __name__ == "__main__":
    D.run_cli(main)
