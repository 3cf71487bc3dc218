"""Tests of the course kit (extras/course.py): a student copy, its grading, the grading tests' isolation."""
import ast
import os
import subprocess
import sys

import pytest

from extras import course

ROOT = course.ROOT


def run_course(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "extras", "course.py"), *args],
                          capture_output=True, text=True, cwd=ROOT)


def test_a_fresh_copy_fails_its_assignment_in_one_line_and_the_reference_body_passes_it(tmp_path):
    copy = tmp_path / "student"
    assert run_course("make", "--out", str(copy), "--only", "gap_mask").returncode == 0
    model = (copy / "model.py").read_text()
    assert 'raise NotImplementedError("assignment gap_mask: gap_mask")' in model
    assert "randperm" not in model.split("# >>> assignment gap_mask")[1].split("# <<<")[0]  # no hint left
    tests = (copy / "test_all.py").read_text()
    assert "def test_gap_mask_hides_exactly_M_prop_of_frames" in tests  # grading tests kept ...
    assert "randperm_draws_their_starts_reference" not in tests  # ... the check that holds the answer dropped
    assert (copy / "kmeans.py").read_text() == open(os.path.join(ROOT, "kmeans.py")).read()  # others untouched
    graded = run_course("grade", str(copy), "--only", "gap_mask")
    assert graded.returncode == 1
    assert graded.stdout.splitlines()[0].startswith("gap_mask   [2] 0/6 passed; fails: gap mask hides exactly")
    assert "(not implemented yet)" in graded.stdout and "0/1 assignments" in graded.stdout
    # Paste the reference body back: the assignment passes.
    ref = open(os.path.join(ROOT, "model.py")).read()
    body = lambda text: text.split("# >>> assignment gap_mask")[1].split("# <<< assignment gap_mask")[0]
    (copy / "model.py").write_text(model.replace(body(model), body(ref)))
    graded = run_course("grade", str(copy), "--only", "gap_mask")
    assert graded.returncode == 0, graded.stdout + graded.stderr
    assert "6/6 passed" in graded.stdout


def test_make_blanks_every_assignment_to_its_contract(tmp_path):
    """Every contract names a function between its markers; each body becomes the contract and a raise."""
    course.make(str(tmp_path / "all"), list(course.ASSIGNMENTS))
    for name, a in course.ASSIGNMENTS.items():
        tree = ast.parse((tmp_path / "all" / a.file).read_text())
        funcs = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
        for fn, contract in a.contracts.items():
            node = funcs[fn]
            assert ast.get_docstring(node) == ast.get_docstring(ast.parse(f'def f():\n    """{contract}\n    """').body[0])
            assert len(node.body) == 2 and isinstance(node.body[1], ast.Raise), fn


def test_grading_tests_exist_and_never_name_another_assignments_functions():
    """Isolation, read from the source: a grading test calls only its own assignment's functions."""
    tree = ast.parse(open(os.path.join(ROOT, "test_all.py")).read())
    tests = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    for name, a in course.ASSIGNMENTS.items():
        others = {f for other, b in course.ASSIGNMENTS.items() if other != name for f in b.contracts}
        for t in a.grading:
            used = {n.id for n in ast.walk(tests[t]) if isinstance(n, ast.Name)}
            used |= {n.attr for n in ast.walk(tests[t]) if isinstance(n, ast.Attribute)}
            assert not used & others, (t, used & others)
        assert not set(a.grading) & set(a.reference)


@pytest.mark.parametrize("args, message", [
    (["make", "--out", "{tmp}", "--only", "gap_mask,nope"], "--only nope: no such assignment"),
    (["make", "--out", "{full}"], "exists and is not empty"),
    (["grade", "{tmp}"], "no test_all.py there"),
])
def test_course_mistakes_are_one_line_and_exit_2(tmp_path, args, message):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("a student's work")
    out = run_course(*[a.format(tmp=tmp_path / "new", full=tmp_path / "full") for a in args])
    assert out.returncode == 2 and message in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert (tmp_path / "full" / "mine.txt").read_text() == "a student's work"
