"""The course kit: hand out the paper's core functions as assignments and grade them with one command.

    python extras/course.py make --out DIR [--only gap_mask,loss]   a student copy, those bodies removed
    python extras/course.py grade DIR [--only loss]                 one line per assignment, exit 0 if all pass
    python extras/course.py list                                    the assignments and their grading tests

Each assignment is a group of functions between `# >>> assignment NAME` and `# <<< assignment NAME`
in the core files. `make` copies the repository, replaces each function body in the chosen groups
with its contract (below: inputs, outputs, the paper's words, no solution hints) and
`raise NotImplementedError`, and drops the reference checks that would give the solution away
(tests that pin this implementation). The grading tests call only their own assignment's functions,
on fixed inputs, and accept any correct implementation. docs/COURSE.md is the handout.
"""
import argparse
import ast
import os
import re
import shutil
import subprocess
import sys
from typing import NamedTuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
    M_gap time steps for every sampled index": exactly round(M_prop * length) frames of each clip (Python's
    round: halves to even), in spans of M_gap that lie inside the clip (starts 0..max(0, length - M_gap); spans
    may overlap; the last one is trimmed to hit the count).

    lengths (B,) int: real frames of each clip (>= 1); frames t >= length are padding and never hidden.
    T: frames per row of the mask. M_prop (float in [0, 1]), M_gap (int >= 1).
    generator: a torch.Generator; every random draw comes from it (same seed, same masks).
    Returns mask (B, T) bool, True = hidden, on lengths' device. Keep at least one frame of each clip
    visible: hide min(round(M_prop * length), length - 1).""",
    }, grading=("test_gap_mask_hides_exactly_M_prop_of_frames", "test_gap_mask_hides_contiguous_gaps_of_M_gap_frames",
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
    codes and .dequantize(codes) -> (n, C). Stage q quantizes the residual r_q left by the stages before it (r_1 = the frame);
    its error is the L2 norm |r_q - e_q(r_q)|, averaged over frames.
    clips (B, n) at 24 kHz; lengths (B,) real samples per clip (None: all n); only a clip's first
    ceil(length / HOP) frames are real, the others are left out. Runs `batch` clips at a time.
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
        "top1_accuracy": """Share of clips whose highest score is their label: scores (N, C), Y (N, C) one-hot -> float.""",
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
    (a later equal score does not replace it); stop after cfg.patience scorings without improvement or
    after cfg.max_epochs. Returns (probe holding the best weights, best score, its epoch).""",
    }, grading=("test_probe_is_near_perfect_when_separable_and_chance_on_shuffled_labels",
                "test_accuracy_and_mAP_match_naive_references_with_ties_and_empty_classes",
                "test_probe_returns_its_first_best_validated_weights_even_below_one_validation_interval")),
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


def tracked_files():
    """The repository's files: git's list when it is a clone, else every file but runs/ and caches."""
    try:
        out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        return [p for p in out.splitlines() if os.path.isfile(os.path.join(ROOT, p))]
    except (OSError, subprocess.CalledProcessError):
        skip = {".git", "runs", "__pycache__", ".pytest_cache"}
        return [os.path.relpath(os.path.join(d, f), ROOT) for d, dirs, files in os.walk(ROOT)
                if not dirs.__setitem__(slice(None), [x for x in dirs if x not in skip]) for f in files]


def make(out, names):
    """Copy the repository to `out` with the chosen assignments blanked and their reference checks dropped."""
    if os.path.exists(out) and os.listdir(out):
        raise UsageError(f"--out {out}: exists and is not empty; give a new folder (nothing is overwritten)")
    files = tracked_files()
    texts = {}
    for name in names:
        a = ASSIGNMENTS[name]
        texts[a.file] = blank(texts.get(a.file) or open(os.path.join(ROOT, a.file)).read(), name, a.contracts)
    tests = drop_tests(open(os.path.join(ROOT, "test_all.py")).read(),
                       [t for n in names for t in ASSIGNMENTS[n].reference])
    texts["test_all.py"] = tests
    for path in files:
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


def grade(folder, names):
    """Run the chosen assignments' grading tests in `folder`; one line each and a total. True if all pass."""
    test_file = os.path.join(folder, "test_all.py")
    if not os.path.isfile(test_file):
        raise UsageError(f"{folder}: no test_all.py there; give the folder `make` wrote (or . for this repository)")
    words = claims(test_file)
    ids = [f"test_all.py::{t}" for n in names for t in ASSIGNMENTS[n].grading]
    missing = [i for i in ids if i.split("::")[1] not in words]
    if missing:
        raise UsageError(f"{folder}/test_all.py lacks the grading tests {', '.join(m.split('::')[1] for m in missing)}")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1", "COLUMNS": "400"}  # untruncated
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "--tb=no", "-p", "no:cacheprovider", *ids],
                         cwd=folder, capture_output=True, text=True, env=env)
    results = {}  # test name -> None (passed) or the short reason
    for line in run.stdout.splitlines():
        m = re.match(r"(PASSED|FAILED|ERROR) test_all\.py::(\w+)(\[[^\]]*\])?(?: - (.*))?$", line)
        if m and results.get(m.group(2)) is None:
            results[m.group(2)] = None if m.group(1) == "PASSED" else (m.group(4) or m.group(1).lower())
    passed_all, total, total_passed = True, 0, 0
    for name in names:
        tests = ASSIGNMENTS[name].grading
        failed = [t for t in tests if results.get(t, "did not run") is not None]
        total, total_passed = total + len(tests), total_passed + len(tests) - len(failed)
        line = f"{name:<10} [{ASSIGNMENTS[name].section}] {len(tests) - len(failed)}/{len(tests)} passed"
        if failed:
            passed_all = False
            reason = results.get(failed[0]) or "did not run"
            reason = "not implemented yet" if "NotImplementedError" in reason else reason
            line += f"; fails: {words[failed[0]]} ({reason[:120]})"
        print(line)
    print(f"total      {total_passed}/{total} grading tests passed, "
          f"{sum(all(results.get(t, 1) is None for t in ASSIGNMENTS[n].grading) for n in names)}/{len(names)} assignments")
    if not results:  # pytest itself failed (a syntax error in the copy, say): show why
        print(run.stdout[-2000:] + run.stderr[-2000:], file=sys.stderr)
    return passed_all


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("make", help="write a student copy")
    m.add_argument("--out", required=True, help="the student copy's folder (new or empty)")
    m.add_argument("--only", help="comma-separated assignments (default: all)")
    g = sub.add_parser("grade", help="grade a copy (or . for this repository)")
    g.add_argument("folder", help="a student copy (from make), or . for the reference")
    g.add_argument("--only", help="comma-separated assignments (default: all)")
    sub.add_parser("list", help="the assignments and their grading tests")
    args = p.parse_args(argv)
    try:
        if args.command == "list":
            for name, a in ASSIGNMENTS.items():
                print(f"{name} [{a.section}] {a.file}: {', '.join(a.contracts)}; {len(a.grading)} grading tests")
            return 0
        names = choose(args.only)
        if args.command == "make":
            make(args.out, names)
            return 0
        return 0 if grade(args.folder, names) else 1
    except UsageError as e:
        print(f"course.py: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
