"""The course kit: hand out the paper's core functions as assignments and grade them with one command.

    python extras/course.py make --out DIR [--only gap_mask,loss]   a student copy, those bodies removed
    python extras/course.py grade DIR [--only loss] [--timeout 20]  this repository's tests on DIR
    python extras/course.py list                                    the assignments and their grading tests

Each assignment is a group of functions between `# >>> assignment NAME` and `# <<< assignment NAME`
in the core files. `make` copies the repository (not .ci/, the developers' tools), replaces each
function body in the chosen groups with its contract (below: inputs, outputs, the paper's words, no
solution hints) and `raise NotImplementedError`, and drops the reference checks that would give the
solution away (tests that pin this implementation). `grade` takes from the student's copy only the
code between each assignment's markers (and imports added at the top of the file), puts it into a
temporary copy of THIS repository, and runs this repository's grading tests there, each with a time
limit: the copy's own test_all.py is never used. The grading tests call only their own assignment's
functions, on fixed inputs, and accept any correct implementation. docs/COURSE.md is the handout.
"""
import argparse
import ast
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import NamedTuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORE = ("model.py", "data.py", "train.py", "kmeans.py", "evaluate.py")
COPY_MARK = ".course-copy"  # make writes it into a copy: its assignments, the commit it came from
TIMEOUT = 20.0  # seconds per grading test's call; the slowest takes 1-2 s (docs/COURSE.md)
IMPORT_TIMEOUT = 60.0  # seconds to import the graded files (torch included) before any test runs


class Assignment(NamedTuple):
    file: str                 # where its functions are, between the markers
    section: str              # of the paper
    contracts: dict           # function -> the docstring the student gets
    grading: tuple            # test_all.py tests that grade it
    reference: tuple = ()     # test_all.py tests dropped from the copy: they pin the solution


ASSIGNMENTS = {
    "gap_mask": Assignment("model.py", "2", {
        "gap_mask": """Which frames to hide, per clip [2]: "a proportion M_prop of the embeddings is randomly
    masked, sampling the starting indices for the mask without replacement, and masking the subsequent
    M_gap time steps for every sampled index": exactly min(round(M_prop * length), length - 1)
    frames of each clip (Python's round: halves to even; one frame always stays visible, so a
    1-frame clip hides none), in spans of M_gap that lie inside the clip (starts 0..max(0,
    length - M_gap); spans may overlap; the last one is trimmed to hit the count).

    lengths (B,) int: real frames of each clip (>= 1); frames t >= length are padding and never hidden.
    T: frames per row of the mask. M_prop (float in [0, 1]), M_gap (int >= 1).
    generator: a torch.Generator; every random draw comes from it (same seed, same masks).
    Returns mask (B, T) bool (dtype torch.bool), True = hidden, on lengths' device.""",
    }, grading=("test_gap_mask_hides_exactly_M_prop_of_frames",
                "test_gap_mask_keeps_one_frame_of_each_clip_visible",
                "test_gap_mask_hides_contiguous_gaps_of_M_gap_frames",
                "test_gap_mask_differs_between_examples_and_follows_the_seed", "test_gap_mask_never_hides_padding",
                "test_gap_mask_covers_every_frame_over_many_draws", "test_gap_mask_scatters_gaps_from_random_starts"),
        reference=("test_gap_mask_hides_spans_in_the_order_randperm_draws_their_starts_reference",)),
    "positions": Assignment("model.py", "2.2", {
        "sinusoidal_positions": """The transformer's fixed positional table [2.2] (T, D) float32 on `device`:
    PE(t, 2i) = sin(t / 10000^(2i/D)), PE(t, 2i+1) = cos(t / 10000^(2i/D)). D is even.""",
        "gather_visible": """Drop the hidden frames before the encoder, MAE style [2.2].

    x (B, T, D); mask (B, T) bool, True = hidden; padding (B, T) bool, True = past the clip's end.
    A frame is visible when neither hidden nor padding. Returns (x_visible, ids_restore, visible_padding):
    x_visible (B, N, D): each clip's visible frames in time order in its first slots, N = max(the most
      visible frames of a clip, min_slots); unused slots hold anything;
    ids_restore (B, T) long: whatever restore_sequence needs to put frames back in time order;
    visible_padding (B, N) bool, True = unused slot, or None when no slot is unused.
    All three on x's device.""",
        "restore_sequence": """Undo gather_visible for the decoder [2.2]: h (B, N, D) encoded slots, ids_restore and
    visible_padding from gather_visible, mask_token (1, 1, D). Returns (B, T, D) in time order: each visible
    frame's encoding at its own time, mask_token at every other time (hidden frames and padding).""",
    }, grading=("test_sinusoidal_positions_follow_the_transformer_formula",
                "test_gather_visible_and_restore_sequence_round_trip", "test_positions_are_added_before_masking",
                "test_encoder_output_ignores_hidden_and_padded_frames",
                "test_decoder_puts_one_learned_mask_token_at_hidden_positions_with_their_positions")),
    "loss": Assignment("model.py", "2.3", {
        "masked_token_loss": """The weighted loss [2.3]:
    L = sum_q gamma_q [ alpha sum_{t in M} C(y_q(t), z_q(t)) + beta sum_{t not in M} C(y_q(t), z_q(t)) ],
    alpha = delta / |M|, beta = (1 - delta) / (T - |M|), C the cross-entropy of the logits y against
    the target token z. |M| (hidden frames) and T - |M| (visible frames) are counted over the whole
    batch; padding frames are in neither set.

    logits (B, T, S, K); targets (B, T, S) long; mask, padding (B, T) bool; gamma (S,); delta float.
    counts: None, or (|M|, T - |M|) of a larger batch this one is part of; then use those counts, so
      that the parts' results add up to the whole batch's.
    Returns LossOut(loss, masked_loss, unmasked_loss, masked_acc): L (a scalar with gradient); per
    stream (S,), without gradient: sum of C over M / |M|, sum of C over not-M / (T - |M|), and the
    top-1 accuracy of the logits over M (correct hidden frames / |M|). Count 0 is taken as 1.""",
    }, grading=("test_loss_weighs_hidden_frames_by_delta_and_visible_ones_by_one_minus_delta",
                "test_loss_counts_M_over_the_whole_batch_and_weighs_each_stream_by_gamma_q",
                "test_padding_is_in_neither_set_of_the_loss",
                "test_with_delta_one_and_equal_gamma_the_loss_is_ce_on_hidden_frames",
                "test_masked_accuracy_counts_hidden_frames_only",
                "test_loss_shares_of_a_split_batch_add_up_with_the_whole_batchs_counts"),
        reference=("test_loss_equals_the_equation_term_by_term",)),
    "gamma": Assignment("model.py", "3.1", {
        "estimate_gamma": """gamma_q from the codec's quantization error [3.1]: "the mean quantization error of each
    codebook", normalized so the Q weights sum to 1.

    codec: codec.raw_frames(wav (b, n)) -> (b, C, T) frames before quantization (C = codec.dim, 128 for
    EnCodec); stage q's codebook is codec.quantizer.vq.layers[q]._codebook, with .quantize(r (n, C)) ->
    codes and .dequantize(codes) -> (n, C), e_q(r) its nearest entry. Stage q quantizes the residual
    r_q left by the stages before it: r_1 = the frame, r_(q+1) = r_q - e_q(r_q). Stage q's error is
    the mean of the L2 norm |r_q - e_q(r_q)| over all real frames of all clips together (one mean,
    not a mean per clip). clips (B, n) at 24 kHz; lengths (B,) real samples per clip (None: all n);
    only a clip's first ceil(length / HOP) frames are real (a partial last hop is a real frame), the
    others are left out. Runs `batch` clips at a time.
    Returns (Q,) float32, positive, summing to 1.""",
    }, grading=("test_gamma_q_is_the_error_each_stage_leaves_on_real_frames",
                "test_gamma_q_is_normalized_and_decreasing_for_residual_codebooks")),
    "kmeans": Assignment("kmeans.py", "2.3", {
        "init_centroids": """k-means++ seeding [2.3] (Arthur & Vassilvitskii 2007): the first centroid a uniformly drawn
    row, each next one a row drawn with probability proportional to its squared distance to the nearest
    centroid chosen so far (either variant: one draw per step, or the best of a few draws).

    x (N, D) float; k (1 <= k <= N, else ValueError); generator: a CPU torch.Generator, every draw from it.
    sample_size: None, or seed from that many randomly drawn rows instead of all N (a speed-up).
    Returns (k, D): k rows of x.""",
        "lloyd": """Lloyd's algorithm from `centroids` (K, D) on the points x (N, D) [2.3]: assign each point to its
    nearest centroid, move each centroid to the mean of its points, repeat.

    Step i logs the inertia (sum of squared distances of the points to their assigned centroid) of its
    assignment, before it moves the centroids: inertia_history[0] is the start's. Stops after n_iter
    steps, or after the first step i >= 1 with history[i-1] - history[i] <= tol * history[i-1].
    chunk_size: points per distance computation (memory); bf16: may rank distances in bfloat16.
    Returns KMeansResult(centroids (K, D) float32 after the last step, inertia_history list of floats).""",
    }, grading=("test_kmeans_recovers_well_separated_gaussian_clusters", "test_kmeans_inertia_never_increases",
                "test_lloyd_stops_once_inertia_improves_by_less_than_tol",
                "test_a_lloyd_step_moves_each_centroid_to_the_mean_of_its_points",
                "test_kmeans_plus_plus_seeds_one_centroid_in_each_separated_cluster_and_beats_random_rows",
                "test_kmeans_is_deterministic_for_a_seed")),
    "probe": Assignment("evaluate.py", "3.2", {
        "top1_accuracy": """Share of clips whose highest score is their label: scores (N, C),
    Y (N, C) one-hot -> float. A tie for a clip's highest score may go to any of the tied classes
    (the grading tests hold none).""",
        "mean_average_precision": """Macro mean average precision, as scikit-learn's average_precision_score [3.2]:
    per class, AP = sum over score thresholds of (R_k - R_{k-1}) P_k, clips with equal scores sharing one
    threshold; a class without a positive clip scores 0 and still counts in the mean.
    scores (N, C), Y (N, C) in {0, 1} -> float.""",
        "train_probe": """Train one probe (HEAR protocol [3.2]) on frozen embeddings X (N, D), Y (N, C) one-hot or
    multi-hot, validated on Xv, Yv.

    Seed torch's generator with `seed` if given. probe = make_probe(D, C, cfg); Adam(lr=cfg.lr);
    cross-entropy, or BCE-with-logits when task.multilabel; cfg.batch_size clips per step, shuffled each
    epoch. Epochs are numbered from 0; after epoch e with (e + 1) % cfg.check_every == 0 score the
    validation set with METRICS[task.metric](predict(probe, Xv, task.multilabel), Yv), and if no epoch
    was scored by the last one (cfg.max_epochs), score that one. Keep the weights of the first best score
    (a later equal score does not replace it); stop after cfg.patience scorings in a row without
    improvement (counted in scorings, not epochs; an equal score is no improvement) or after
    cfg.max_epochs. Returns (probe holding the best weights, best score, its epoch).""",
    }, grading=("test_probe_is_near_perfect_when_separable_and_chance_on_shuffled_labels",
                "test_accuracy_and_mAP_match_naive_references_with_ties_and_empty_classes",
                ("test_probe_returns_its_first_best_validated_weights_even_below_one_"
                 "validation_interval"),
                "test_probe_stops_after_patience_validations_without_improvement")),
}


class UsageError(Exception):
    """A user's mistake: one line, exit status 2."""


def region(lines, name):
    """The line numbers (1-based, inclusive) between an assignment's markers."""
    marks = [i + 1 for i, line in enumerate(lines) if line.strip() in (f"# >>> assignment {name}",
                                                                       f"# <<< assignment {name}")]
    if len(marks) != 2:
        raise UsageError(f"assignment {name}: expected one '# >>> assignment {name}' and one '# <<<' line")
    return marks


def blank(source, name, contracts):
    """The source with each function between NAME's markers reduced to its contract and NotImplementedError."""
    lines = source.splitlines(keepends=True)
    first, last = region(lines, name)
    funcs = [n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef) and first < n.lineno < last]
    if sorted(f.name for f in funcs) != sorted(contracts):
        raise UsageError(f"assignment {name}: functions {[f.name for f in funcs]}, contracts for {sorted(contracts)}")
    for f in sorted(funcs, key=lambda f: -f.lineno):  # from the bottom: earlier line numbers stay valid
        indent = " " * (f.body[0].col_offset)
        body = [f'{indent}"""{contracts[f.name]}\n{indent}"""\n',
                f'{indent}raise NotImplementedError("assignment {name}: {f.name}")\n']
        lines[f.body[0].lineno - 1:f.end_lineno] = body
    return "".join(lines)


def drop_tests(source, names):
    """test_all.py without the named test functions (decorators included)."""
    lines = source.splitlines(keepends=True)
    nodes = {n.name: n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef)}
    for n in sorted((nodes[t] for t in names), key=lambda n: -n.lineno):
        start = min([d.lineno for d in n.decorator_list] + [n.lineno])
        lines[start - 1:n.end_lineno + 1] = []
    return "".join(lines)


def choose(only):
    names = list(ASSIGNMENTS) if not only else [s.strip() for s in only.split(",") if s.strip()]
    unknown = [n for n in names if n not in ASSIGNMENTS]
    if unknown:
        raise UsageError(f"--only {','.join(unknown)}: no such assignment; there are {', '.join(ASSIGNMENTS)}")
    return names


def tracked_files(root=ROOT):
    """The repository's files: git's list when it is a clone, else every file but runs/ and caches."""
    try:
        out = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True,
                             check=True).stdout
        return [p for p in out.splitlines() if os.path.isfile(os.path.join(root, p))]
    except (OSError, subprocess.CalledProcessError):
        skip = {".git", "runs", "__pycache__", ".pytest_cache"}
        return [os.path.relpath(os.path.join(d, f), root) for d, dirs, files in os.walk(root)
                if not dirs.__setitem__(slice(None), [x for x in dirs if x not in skip]) for f in files]


def commit(root=ROOT):
    """The repository's git commit, or None outside a clone."""
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                              text=True)
    except OSError:
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def in_copy(path):
    """Whether `make` copies this file: not .ci/, the developers' tools (the trial's solutions, the
    mutation check's quotes of the reference), and not the lecturer's own marker of a copy."""
    return not path.startswith(".ci/") and path != COPY_MARK


def make(out, names):
    """Copy the repository to `out` with the chosen assignments blanked and their reference checks dropped."""
    if os.path.exists(out) and os.listdir(out):
        raise UsageError(f"--out {out}: exists and is not empty; give a new folder (nothing is overwritten)")
    files = [p for p in tracked_files() if in_copy(p)]
    texts = {}
    for name in names:
        a = ASSIGNMENTS[name]
        texts[a.file] = blank(texts.get(a.file) or open(os.path.join(ROOT, a.file)).read(), name, a.contracts)
    tests = drop_tests(open(os.path.join(ROOT, "test_all.py")).read(),
                       [t for n in names for t in ASSIGNMENTS[n].reference])
    texts["test_all.py"] = tests
    texts[COPY_MARK] = json.dumps({"assignments": names, "made_from_commit": commit()}) + "\n"
    for path in files + [COPY_MARK]:
        dest = os.path.join(out, path)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        if path in texts:
            with open(dest, "w") as f:
                f.write(texts[path])
        else:
            shutil.copy2(os.path.join(ROOT, path), dest)
    print(f"wrote a student copy to {out}: {', '.join(names)} to implement; "
          f"grade with: python extras/course.py grade {out}")


def claims(test_file):
    """test name -> its claim in words (the test's name says it)."""
    tree = ast.parse(open(test_file).read())
    return {n.name: n.name.removeprefix("test_").replace("_", " ") for n in tree.body if isinstance(n, ast.FunctionDef)}


# ---------------------------------------------------------------- grading: the lecturer's tests
class Ungradable(Exception):
    """An assignment whose code cannot be graded (no file or markers, a syntax error): one line."""


def top_names(nodes, imports=False):
    """The names these module-level statements bind: definitions, assignments, imports if asked."""
    names = set()
    for n in nodes:
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(n.name)
        elif isinstance(n, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = n.targets if isinstance(n, ast.Assign) else [n.target]
            names |= {x.id for t in targets for x in ast.walk(t) if isinstance(x, ast.Name)}
        elif imports and isinstance(n, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in n.names}
    return names


def outside(tree, spans):
    """The module-level statements of `tree` outside every (first, last) marker span."""
    return [n for n in tree.body if not any(first < n.lineno < last for first, last in spans)]


def student_region(folder, file, name, lecturer):
    """(the student's lines between NAME's markers, the line number of the first), or Ungradable."""
    path = os.path.join(folder, file)
    if not os.path.isfile(path):
        raise Ungradable(f"no {file} in {folder}")
    lines = open(path).read().splitlines(keepends=True)
    try:
        first, last = region(lines, name)
    except UsageError:
        raise Ungradable(f"{file} needs one '# >>> assignment {name}' line and one "
                         f"'# <<< assignment {name}' line around the code") from None
    code = lines[first:last - 1]
    try:
        tree = ast.parse("".join(code))
    except SyntaxError as e:
        raise Ungradable(f"{file} line {first + (e.lineno or 1)}: SyntaxError: {e.msg}") from None
    span = region(lecturer.splitlines(), name)
    clash = top_names(tree.body) & top_names(outside(ast.parse(lecturer), [span]), imports=True)
    if clash:  # it would replace a helper the tests rely on (kmeans.assign, say)
        raise Ungradable(f"the code between the markers redefines {', '.join(sorted(clash))}, "
                         f"which {file} defines outside the assignment: rename it")
    return code, first + 1


def added_imports(folder, file, lecturer, notes):
    """The imports the student added at the top of FILE (names the lecturer's file does not bind),
    carried into the graded file. Definitions outside the markers are not: a note says so."""
    try:
        text = open(os.path.join(folder, file)).read()
        tree = ast.parse(text)
    except (OSError, SyntaxError):
        return []
    lines = text.splitlines()
    marks = lambda n: sum(line.strip() in (f"# >>> assignment {n}", f"# <<< assignment {n}")
                          for line in lines)
    spans = [region(lines, n) for n in ASSIGNMENTS if ASSIGNMENTS[n].file == file and marks(n) == 2]
    theirs = top_names(ast.parse(lecturer).body, imports=True)
    mine = outside(tree, spans)
    extra = sorted(top_names(mine) - theirs)
    if extra:
        notes.append(f"note: {file} defines {', '.join(extra)} outside the assignment markers; "
                     f"grading takes only the code between them (and imports added at the top): "
                     f"move {extra[0]} between them")
    added = [n for n in mine if isinstance(n, (ast.Import, ast.ImportFrom))
             and not top_names([n], imports=True) <= theirs]
    return [ast.get_source_segment(text, n) + "\n" for n in added]


def graded_tree(folder, names, work, notes, forced):
    """Write into `work` the lecturer's files (core files, test_all.py, extras/*.py) with, between
    each graded assignment's markers, the student's code from `folder` (blanked where it cannot be
    graded).

    Returns (regions, ungradable). regions maps each graded file's path in `work` to a list of
    [first line, last line, the student's first line, assignment, file] per pasted region, so that a
    traceback's line is shown as the student's; ungradable maps an assignment to why it cannot be
    graded (`forced`: those found out while running, whose code is blanked as well)."""
    keep = set(CORE) | {"test_all.py"}
    extras = lambda p: p.startswith("extras/") and p.count("/") == 1 and p.endswith(".py")
    for path in tracked_files():
        if path in keep or extras(path):
            os.makedirs(os.path.dirname(os.path.join(work, path)) or work, exist_ok=True)
            shutil.copy(os.path.join(ROOT, path), os.path.join(work, path))
    with open(os.path.join(work, "pytest.ini"), "w") as f:
        f.write("[pytest]\n")  # the root is `work`: no configuration or conftest.py from elsewhere
    regions, ungradable = {}, dict(forced)
    for file in sorted({ASSIGNMENTS[n].file for n in names}):
        lecturer = open(os.path.join(ROOT, file)).read()
        imports = added_imports(folder, file, lecturer, notes)
        code = {}
        for name in (n for n in names if ASSIGNMENTS[n].file == file):
            try:
                if name in forced:
                    raise Ungradable(forced[name])
                code[name] = student_region(folder, file, name, lecturer)
            except Ungradable as e:
                ungradable[name] = str(e)
                blanked = blank(lecturer, name, ASSIGNMENTS[name].contracts)
                blanked = blanked.splitlines(keepends=True)
                first, last = region(blanked, name)
                code[name] = (blanked[first:last - 1], None)
        out, spans, skipping = [], [], None
        for line in lecturer.splitlines(keepends=True):
            mark = line.strip()
            if skipping:  # the lecturer's own code between the markers
                if mark == f"# <<< assignment {skipping}":
                    out.append(line)
                    skipping = None
                continue
            out.append(line)
            name = mark.removeprefix("# >>> assignment ")
            if mark.startswith("# >>> assignment ") and name in code:
                lines, student_first = code[name]
                if imports and student_first:
                    out += imports  # at the top of the first graded region: module level there too
                    imports = []
                if student_first:
                    spans.append([len(out) + 1, len(out) + len(lines), student_first, name, file])
                out += lines
                skipping = name
        with open(os.path.join(work, file), "w") as f:
            f.write("".join(out))
        regions[os.path.realpath(os.path.join(work, file))] = spans
    return regions, ungradable


def locate(regions, filename, lineno, function=None):
    """(where, assignment) when a graded file's line lies in a student's pasted code, named by the
    student's file and line; else None. Used here and by extras/course_plugin.py."""
    for first, last, student_first, name, file in regions.get(os.path.realpath(filename), []):
        if first <= lineno <= last:
            where = f"{file} line {lineno - first + student_first}"
            return where + (f", in {function}" if function else ""), name
    return None


def stack_place(regions, path):
    """Where a timed-out process was, from faulthandler's dump: (where, assignment) or None."""
    try:
        dump = open(path).read()
    except OSError:
        return None
    for filename, lineno, function in re.findall(r'File "(.*)", line (\d+) in (\S+)', dump):
        found = locate(regions, filename, int(lineno), function)  # the most recent frame first
        if found:
            return found
    return None


def run_tests(work, tests, regions, modules, timeout):
    """One pytest process on `tests` in `work`, watched: (events, stack dump path, output tail)."""
    events, stacks = os.path.join(work, "events.jsonl"), os.path.join(work, "stacks.txt")
    for path in (events, stacks):
        open(path, "w").close()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1",
           "COURSE_EVENTS": events, "COURSE_STACKS": stacks, "COURSE_TIMEOUT": str(timeout),
           "COURSE_IMPORT_TIMEOUT": str(IMPORT_TIMEOUT), "COURSE_REGIONS": json.dumps(regions),
           "COURSE_MODULES": ",".join(modules)}
    cmd = [sys.executable, "-m", "pytest", "-q", "--tb=no", "-p", "no:cacheprovider",
           "-p", "extras.course_plugin", *[f"test_all.py::{t}" for t in tests]]
    with open(os.path.join(work, "pytest.log"), "w+") as log:
        proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:  # faulthandler ends a test past its limit from inside; this is the backstop
            while proc.poll() is None:
                time.sleep(0.1)
                if time.time() - os.path.getmtime(events) > max(timeout, IMPORT_TIMEOUT) + 120:
                    proc.kill()
        finally:  # grade itself stopped (Ctrl-C): no test process left behind
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        log.seek(0)
        tail = log.read()[-2000:]
    return [json.loads(line) for line in open(events) if line.strip()], stacks, tail


def copy_notes(folder):
    """Notes on the tests' source: a student copy's course.py, a copy made at another commit."""
    notes = []
    if os.path.isfile(os.path.join(ROOT, COPY_MARK)):
        notes.append("note: this course.py is a student copy's: its tests are the copy's own (a "
                     "self-check); the lecturer grades with the course.py of their own repository")
    try:
        made = json.load(open(os.path.join(folder, COPY_MARK)))["made_from_commit"]
    except (OSError, ValueError, KeyError, TypeError):
        made = None
    now = commit()
    if made and now and made != now:
        notes.append(f"note: the copy was made at commit {made[:10]}; the tests are at {now[:10]}")
    return notes


def grade(folder, names, timeout=TIMEOUT):
    """Run the lecturer's grading tests of the chosen assignments on the student's code in `folder`,
    each test's call limited to `timeout` seconds; a block per assignment and a total.
    True if all pass."""
    if not os.path.isdir(folder):
        raise UsageError(f"{folder}: no such folder; give the folder `make` wrote (or . for this "
                         f"repository)")
    files = sorted({ASSIGNMENTS[n].file for n in names})
    if not any(os.path.isfile(os.path.join(folder, f)) for f in files):
        raise UsageError(f"{folder}: no {' or '.join(files)} there; give the folder `make` wrote "
                         f"(or . for this repository)")
    words = claims(os.path.join(ROOT, "test_all.py"))
    missing = [t for n in names for t in ASSIGNMENTS[n].grading if t not in words]
    if missing:
        raise UsageError(f"{ROOT}/test_all.py lacks the grading tests {', '.join(missing)}")
    notes = copy_notes(folder)
    results, forced = {}, {}  # test -> (passed, cause, where); assignment -> why it stopped the run
    modules = [f.removesuffix(".py") for f in files]
    with tempfile.TemporaryDirectory(prefix="course-grade-") as work:
        regions, ungradable = graded_tree(folder, names, work, notes, forced)
        print(f"grading the code in {os.path.abspath(folder)} with the tests of {ROOT} "
              f"({timeout:g} s per test)", flush=True)
        for note in notes:
            print(note, flush=True)
        while True:
            pending = [t for n in names if n not in ungradable for t in ASSIGNMENTS[n].grading
                       if t not in results]
            if not pending:
                break
            events, stacks, tail = run_tests(work, pending, regions, modules, timeout)
            progress, running = len(results) + len(forced), None
            for e in events:
                if e["event"] == "start":
                    running = e["test"]
                elif e["event"] == "result":
                    running = None
                    if results.get(e["test"], (True,))[0]:  # the first failure stays
                        passed = e["outcome"] == "passed"
                        results[e["test"]] = (passed, e.get("cause"), e.get("where"))
                elif e["event"] == "import_error":
                    if e.get("assignment") is None:  # not the student's code: the lecturer's
                        raise UsageError(f"{e['module']}.py of {ROOT} does not import: "
                                         f"{e['cause']}")
                    forced[e["assignment"]] = f"it does not import: {e['cause']} ({e['where']})"
            place = stack_place(regions, stacks)
            if running is not None:  # the process ended inside this test: its time limit
                why = f"timed out: no result after {timeout:g} s"
                results[running] = (False, why, place and place[0])
            elif not events and place:  # it ended while importing the student's code
                forced[place[1]] = f"importing it ran past {IMPORT_TIMEOUT:g} s (at {place[0]})"
            if len(results) + len(forced) == progress:  # nothing learnt: say why and stop
                why = (tail.strip().splitlines() or ["no output"])[-1]
                if not results:  # not one test ran: pytest itself failed
                    raise UsageError(f"pytest did not run the grading tests: {why}")
                results.update({t: (False, f"did not run: {why}", None) for t in pending})
            regions, ungradable = graded_tree(folder, names, work, [], forced)  # forced: blanked
    return report(names, results, ungradable, words)


def report(names, results, ungradable, words):
    """Print a line per assignment (and where it did not pass, a line per claim) and the total."""
    passed_all, total, total_passed, done = True, 0, 0, 0
    for name in names:
        tests = ASSIGNMENTS[name].grading
        ok = [t for t in tests if name not in ungradable and results.get(t, (False,))[0]]
        total, total_passed = total + len(tests), total_passed + len(ok)
        head = f"{name:<10} [{ASSIGNMENTS[name].section}] {len(ok)}/{len(tests)} passed"
        causes = {results.get(t, (False, "did not run", None))[1] for t in tests}
        if name in ungradable:
            print(f"{head}: cannot grade: {ungradable[name]}")
        elif len(ok) == len(tests):
            print(head)
            done += 1
        elif not ok and causes == {"not implemented yet"}:
            print(f"{head}: not implemented yet")
        else:
            print(head)
            for t in tests:
                good, cause, where = results.get(t, (False, "did not run", None))
                if good:
                    print(f"    passed     {words[t]}")
                    continue
                kind = "TIMED OUT" if cause.startswith("timed out") else "FAILED"
                cause = cause.removeprefix("timed out: ")[:400]
                print(f"    {kind:<10} {words[t]}: {cause}" + (f" ({where})" if where else ""))
        passed_all = passed_all and len(ok) == len(tests)
    print(f"total      {total_passed}/{total} grading tests passed, "
          f"{done}/{len(names)} assignments")
    return passed_all


def seconds(text):
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text}: give a number of seconds above 0")
    return value


class Parser(argparse.ArgumentParser):
    """argparse, with a mistake reported in one line (UsageError) instead of the usage block."""

    def error(self, message):
        raise UsageError(message)


def main(argv=None):
    p = Parser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("make", help="write a student copy")
    m.add_argument("--out", required=True, help="the student copy's folder (new or empty)")
    m.add_argument("--only", help="comma-separated assignments (default: all)")
    g = sub.add_parser("grade", help="grade a copy (or . for this repository) with this "
                                     "repository's tests")
    g.add_argument("folder", help="a student copy (from make), or . for the reference")
    g.add_argument("--only", help="comma-separated assignments (default: all)")
    g.add_argument("--timeout", type=seconds, default=TIMEOUT,
                   help=f"seconds a grading test's call may run (default {TIMEOUT:g})")
    sub.add_parser("list", help="the assignments and their grading tests")
    try:
        args = p.parse_args(argv)
        if args.command == "list":
            for name, a in ASSIGNMENTS.items():
                print(f"{name} [{a.section}] {a.file}: {', '.join(a.contracts)}; {len(a.grading)} grading tests")
            return 0
        names = choose(args.only)
        if args.command == "make":
            make(args.out, names)
            return 0
        return 0 if grade(args.folder, names, args.timeout) else 1
    except UsageError as e:
        print(f"course.py: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
