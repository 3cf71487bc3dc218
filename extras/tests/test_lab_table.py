"""Tests of extras/lab_table.py: a lab's rows grouped over seeds, with both standard errors."""
import json
import math

from extras import lab_table


def results(folder, scores):
    """An evaluate.py results.json with the given {upstream: {task: accuracy}} on 400 test clips."""
    folder.mkdir()
    body = {name: {task: {"test": acc, "n_test": 400, "metric": "top1_acc"} for task, acc in row.items()}
            for name, row in scores.items()}
    (folder / "results.json").write_text(json.dumps({"table": "", "results": body, "skipped": []}))
    return str(folder)


def test_seeds_are_grouped_and_each_cell_has_its_mean_and_both_errors(tmp_path, capsys):
    """Runs differing only in -s<seed>, and one name over several runs, make one row: the mean, its
    SE over seeds, the test set's binomial SE."""
    a = results(tmp_path / "a", {"runs/mel-s0/ckpt.pt": {"kw": 0.6}, "ECMAE-R:tiny": {"kw": 0.3}})
    b = results(tmp_path / "b", {"runs/mel-s1/ckpt.pt": {"kw": 0.7}, "ECMAE-R:tiny": {"kw": 0.3}})
    lab_table.main([a, b, "--rename", "runs/mel/ckpt.pt=mel"])
    out = capsys.readouterr().out
    spread = math.sqrt(0.005 / 2)  # the sample variance of 0.6 and 0.7 over 2 seeds
    assert f"| mel | 2 | 65.0 ± {100 * spread:.1f} [{100 * math.sqrt(0.65 * 0.35 / 400):.1f}] |" in out
    assert "| ECMAE-R:tiny | 2 | 30.0 ± 0.0 [2.3] |" in out
