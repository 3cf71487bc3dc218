"""Tests of the course kit (extras/course.py): a student copy, its grading, the grading tests' isolation."""
import ast
import os
import re
import subprocess
import sys

import pytest

from extras import course

ROOT = course.ROOT


def run_course(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "extras", "course.py"), *args],
                          capture_output=True, text=True, cwd=ROOT)


def between(text, name):
    """The text between an assignment's marker lines."""
    return text.split(f"# >>> assignment {name}\n")[1].split(f"# <<< assignment {name}")[0]


def put(copy, name, code):
    """Write `code` between NAME's markers in the student copy."""
    path = copy / course.ASSIGNMENTS[name].file
    text = path.read_text()
    path.write_text(text.replace(between(text, name), code))


def reference(name):
    return between(open(os.path.join(ROOT, course.ASSIGNMENTS[name].file)).read(), name)


def wrapped(function, signature, body, name=None):
    """The reference code of FUNCTION's assignment with FUNCTION renamed reference_FUNCTION, and a
    new FUNCTION (a student's answer) with this signature and body: it relies on names alone."""
    code = reference(name or function).replace(f"def {function}(", f"def reference_{function}(")
    assert f"def reference_{function}(" in code
    return code + f"\n\ndef {function}{signature}:" + body


def claim_lines(stdout, name):
    """The assignment's head line and its claim lines, as grade prints them."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"{name} "))
    block = [lines[start]]
    for line in lines[start + 1:]:
        if not line.startswith("    "):
            break
        block.append(line)
    return block


def test_a_fresh_copy_fails_its_assignment_in_one_line_and_the_reference_body_passes_it(tmp_path):
    copy = tmp_path / "student"
    assert run_course("make", "--out", str(copy), "--only", "gap_mask").returncode == 0
    model = (copy / "model.py").read_text()
    assert 'raise NotImplementedError("assignment gap_mask: gap_mask")' in model
    assert "randperm" not in between(model, "gap_mask")  # no hint left
    tests = (copy / "test_all.py").read_text()
    assert "def test_gap_mask_hides_exactly_M_prop_of_frames" in tests  # grading tests kept ...
    assert "randperm_draws_their_starts_reference" not in tests  # ... the check that holds the answer dropped
    assert (copy / "kmeans.py").read_text() == open(os.path.join(ROOT, "kmeans.py")).read()  # others untouched
    n = len(course.ASSIGNMENTS["gap_mask"].grading)
    graded = run_course("grade", str(copy), "--only", "gap_mask")
    assert graded.returncode == 1
    head = f"gap_mask   [2] 0/{n} passed: not implemented yet"
    assert claim_lines(graded.stdout, "gap_mask") == [head]
    assert "0/1 assignments" in graded.stdout
    put(copy, "gap_mask", reference("gap_mask"))  # the reference body pasted back: it passes
    graded = run_course("grade", str(copy), "--only", "gap_mask")
    assert graded.returncode == 0, graded.stdout + graded.stderr
    assert claim_lines(graded.stdout, "gap_mask") == [f"gap_mask   [2] {n}/{n} passed"]


def test_grade_runs_the_lecturers_tests_with_a_time_limit_per_test(tmp_path):
    """The copy's own test_all.py is not used (tests made to pass by `return` still fail), and an
    endless loop on one input times out that claim alone: the assignment's other claims and the
    other assignments are graded."""
    copy = tmp_path / "student"
    made = run_course("make", "--out", str(copy), "--only", "gap_mask,positions,loss")
    assert made.returncode == 0, made.stderr
    tests = (copy / "test_all.py").read_text()
    positions = course.ASSIGNMENTS["positions"].grading
    tampered = re.sub(r'(\ndef (test_\w+)\(.*\):\n    """[^"]*"""\n)',
                      lambda m: m.group(1) + ("    return\n" if m.group(2) in positions else ""),
                      tests)
    assert tampered.count("    return\n") - tests.count("    return\n") == len(positions)
    (copy / "test_all.py").write_text(tampered)
    put(copy, "gap_mask", wrapped("gap_mask", "(lengths, T, M_prop, M_gap, generator=None)", """
    while 37 in lengths.tolist():  # a student's bug: one input never ends
        pass
    return reference_gap_mask(lengths, T, M_prop, M_gap, generator)
"""))
    put(copy, "loss", reference("loss"))
    graded = run_course("grade", str(copy), "--only", "gap_mask,positions,loss", "--timeout", "5")
    assert graded.returncode == 1, graded.stdout + graded.stderr
    head = claim_lines(graded.stdout, "positions")[0]
    assert head.endswith(f"0/{len(positions)} passed: not implemented yet"), graded.stdout
    block = claim_lines(graded.stdout, "gap_mask")
    n = len(course.ASSIGNMENTS["gap_mask"].grading)
    assert block[0] == f"gap_mask   [2] {n - 1}/{n} passed", graded.stdout
    loop_line = 1 + next(i for i, line in enumerate((copy / "model.py").read_text().splitlines())
                         if "while 37 in lengths" in line)
    assert ("    TIMED OUT  gap mask never hides padding: no result after 5 s "
            f"(model.py line {loop_line}, in gap_mask)") in block, block
    assert sum(line.startswith("    passed     gap mask") for line in block) == n - 1, block
    assert claim_lines(graded.stdout, "loss") == ["loss       [2.3] 6/6 passed"]


def test_grade_shows_each_failures_cause_and_the_line_of_a_syntax_or_import_error(tmp_path):
    """A syntax error names its file and line; so does an error while importing; a wrong answer's
    claim says what was expected and what came back; each time the other assignments are graded."""
    copy = tmp_path / "student"
    assert run_course("make", "--out", str(copy), "--only", "gap_mask,kmeans,probe").returncode == 0
    put(copy, "gap_mask", reference("gap_mask") + "def broken(:\n")
    put(copy, "probe", reference("probe") + "NAMES = undefined_name\n")
    signature = "(x, centroids, n_iter=100, tol=1e-4, chunk_size=4096, bf16=False)"
    put(copy, "kmeans", wrapped("lloyd", signature, """
    result = reference_lloyd(x, centroids, n_iter, tol, chunk_size, bf16)
    return KMeansResult(result.centroids + 0.5, result.inertia_history)  # a bug: 0.5 off
""", "kmeans"))
    graded = run_course("grade", str(copy), "--only", "gap_mask,kmeans,probe")
    syntax_line = 1 + (copy / "model.py").read_text().splitlines().index("def broken(:")
    name_line = 1 + (copy / "evaluate.py").read_text().splitlines().index("NAMES = undefined_name")
    assert claim_lines(graded.stdout, "gap_mask")[0].endswith(
        f"passed: cannot grade: model.py line {syntax_line}: SyntaxError: invalid syntax"), \
        graded.stdout
    assert claim_lines(graded.stdout, "probe")[0].endswith(
        "cannot grade: it does not import: NameError: name 'undefined_name' is not defined "
        f"(evaluate.py line {name_line}, in <module>)"), graded.stdout
    failed = [x for x in claim_lines(graded.stdout, "kmeans") if x.startswith("    FAILED")]
    step = [line for line in failed if "a lloyd step moves each centroid to the mean" in line]
    assert step and "expected" in step[0] and "got" in step[0], failed


def test_every_grading_assertion_says_what_it_expected_and_what_came_back():
    """Each assert of a grading test (and of the helpers it calls) carries a message: pytest's own
    cuts the failing clause short. No grading test uses an assertion helper of torch or numpy, whose
    report runs over many lines."""
    tree = ast.parse(open(os.path.join(ROOT, "test_all.py")).read())
    functions = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    for name, a in course.ASSIGNMENTS.items():
        for t in a.grading:
            nodes = list(ast.walk(functions[t]))
            calls = [n for n in nodes if isinstance(n, ast.Call)]
            called = {n.func.id for n in calls if isinstance(n.func, ast.Name)}
            nodes += [x for h in called & set(functions) for x in ast.walk(functions[h])]
            bare = [n.lineno for n in nodes if isinstance(n, ast.Assert) and n.msg is None]
            assert not bare, f"{t}: assert without a message at test_all.py lines {bare}"
            uses = {ast.unparse(n.func) for n in calls}
            helpers = {u for u in uses if u.endswith(("assert_close", "assert_allclose", "_equal"))}
            assert not helpers, (t, helpers)


def reference_lines():
    """(assignment, line) for every non-trivial line of every assignment's reference functions
    (bodies, docstrings left out): 24 characters or more once the comment is cut, spaces collapsed.
    """
    found = []
    for name, a in course.ASSIGNMENTS.items():
        text = open(os.path.join(ROOT, a.file)).read()
        lines = text.splitlines()
        first, last = course.region(lines, name)
        for f in ast.parse(text).body:
            if isinstance(f, ast.FunctionDef) and first < f.lineno < last:
                body = f.body[1:] if ast.get_docstring(f) is not None else f.body
                for line in lines[body[0].lineno - 1:f.end_lineno]:
                    code = " ".join(line.split("  #")[0].split())
                    if len(code) >= 24:
                        found.append((name, code))
    return found


def test_a_student_copy_holds_no_line_of_any_reference_solution(tmp_path):
    """No file of a fresh copy of all six assignments (code, docs, tests) holds a reference line."""
    copy = tmp_path / "student"
    course.make(str(copy), list(course.ASSIGNMENTS))
    wanted = reference_lines()
    per_assignment = [sum(name == n for n, _ in wanted) for name in course.ASSIGNMENTS]
    assert min(per_assignment) >= 5, per_assignment  # not an empty search: 10-28 lines each today
    leaks = []
    for folder, _, files in os.walk(copy):
        for file in files:
            path = os.path.join(folder, file)
            try:
                text = open(path, encoding="utf-8").read()
            except UnicodeDecodeError:
                continue  # binary (model weights)
            flat = [" ".join(line.split()) for line in text.splitlines()]
            for name, code in wanted:
                leaks += [f"{name}: {code!r} in {os.path.relpath(path, copy)}:{i + 1}"
                          for i, line in enumerate(flat) if code in line]
    assert not leaks, "\n".join(leaks)


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
    (["grade", "{tmp}"], "no such folder"),
    (["grade", "{full}"], "no evaluate.py or kmeans.py or model.py there"),
    (["grade", ".", "--timeout", "0"], "give a number of seconds above 0"),
])
def test_course_mistakes_are_one_line_and_exit_2(tmp_path, args, message):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("a student's work")
    out = run_course(*[a.format(tmp=tmp_path / "new", full=tmp_path / "full") for a in args])
    assert out.returncode == 2 and message in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert (tmp_path / "full" / "mine.txt").read_text() == "a student's work"
