"""`train.py --resume` beside loading the checkpoint (not the paper): the run folder's metrics.jsonl is cut back to it.

A killed run logged steps past its last checkpoint; the resumed run logs them again, so each step
is logged once (test_all.py's resume test reads the file).
"""
import contextlib
import json
import os

import data as D


def trim_metrics(out, step):
    """Keep the metrics of steps up to `step` in OUT/metrics.jsonl (atomically; torn lines dropped)."""
    path, keep = os.path.join(out, "metrics.jsonl"), []
    with open(path) if os.path.exists(path) else contextlib.nullcontext([]) as f:
        for line in f:
            with contextlib.suppress(json.JSONDecodeError, KeyError, TypeError):  # a line torn by the kill
                keep += [line] if json.loads(line)["step"] <= step else []
    D.write_atomic(path, lambda f: f.write("".join(keep).encode()))
