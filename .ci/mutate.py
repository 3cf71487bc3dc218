"""Hand-made mutation check: break the code on purpose, one change at a time, and see a test fail.

Run: python .ci/mutate.py            (about 5 minutes on 2 CPU cores; --only WORD runs a subset)
Each mutant is (file, exact original snippet, mutated snippet, what it breaks, pytest -k expression
of the fast tests that should notice). For each, the tracked files are copied to a temporary folder,
the snippet is replaced there (it must occur exactly once, else the mutant is reported stale), and
`python -m pytest -q -x test_all.py extras/ -k EXPR` runs: a failing run kills the mutant, a passing one
lets it survive. Prints a markdown table and "N mutants, K killed, S survived"; exits 0.
"""
import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

os.environ["OMP_NUM_THREADS"] = "1"  # before torch loads: one thread per test run, as the suite uses

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

LOSS = ("masked_accuracy or loss_equals or loss_weights or loss_weighs or loss_counts or loss_shares or delta_one"
        " or micro_batch")

# ---------------------------------------------------------------- model.py
MODEL_MUTANTS = [
    ("model.py",
     "        x = self.in_proj(feats) + sinusoidal_positions(T, self.cfg.d_model, device)  # (B, T, D)\n"
     "        if self.cfg.mask_mode == \"drop\":  # N >= what gap_mask leaves of a full clip: one shape to compile\n"
     "            slots = T - min(round(self.cfg.M_prop * T), T - 1)\n"
     "            x_visible, ids_restore, visible_padding = gather_visible(x, mask, padding, slots)  # (B, N, D)\n",
     "        x = self.in_proj(feats)  # (B, T, D)\n"
     "        if self.cfg.mask_mode == \"drop\":  # N >= what gap_mask leaves of a full clip: one shape to compile\n"
     "            slots = T - min(round(self.cfg.M_prop * T), T - 1)\n"
     "            x_visible, ids_restore, visible_padding = gather_visible(x, mask, padding, slots)  # (B, N, D)\n"
     "            x_visible = x_visible + sinusoidal_positions(x_visible.shape[1], self.cfg.d_model, device)\n",
     "positions added after masking instead of before", "positions_are_added"),
    ("model.py", "    dropped = mask | padding  # (B, T)", "    dropped = padding  # (B, T)",
     "the encoder is given every frame, hidden ones included", "encoder_output"),
    ("model.py", "            h = self.encoder(x_visible, visible_padding)  # (B, N, D)",
     "            h = gather_visible(self.encoder(x, key_padding(padding, device)), mask, padding, slots)[0]",
     "the encoder attends over all frames, then keeps the visible outputs", "encoder_output"),
    ("model.py", "        masked_acc = (correct * hidden).sum((0, 1)) / n_hidden  # (S,)",
     "        masked_acc = correct.mean((0, 1))  # (S,)",
     "masked accuracy computed over all frames", "masked_accuracy"),
    ("model.py",
     "            residual = residual - book.dequantize(book.quantize(residual))  # what stage q leaves\n"
     "            total[q] += residual.norm(dim=1).sum().cpu()\n",
     "            total[q] += residual.norm(dim=1).sum().cpu()\n"
     "            residual = residual - book.dequantize(book.quantize(residual))  # what stage q leaves\n",
     "gamma_q measured on the residual entering each stage", "gamma_q_is_the_error"),
    ("model.py", "        residual = frames[real.to(frames.device)]  # (n, 128), the real frames only",
     "        residual = frames.reshape(-1, frames.shape[-1])  # (n, 128)",
     "gamma_q counts the padding's frames", "gamma_q_is_the_error"),
    ("model.py", "            h = self.encoder(x_visible, visible_padding)  # (B, N, D)",
     "            h = self.encoder(x_visible, None)  # (B, N, D)",
     "visible_padding not passed: short clips attend to unused slots", "encoder_output"),
    ("model.py", "visible_padding = torch.arange(N, device=mask.device)[None] >= n_visible[:, None]",
     "visible_padding = torch.arange(N, device=mask.device)[None] > n_visible[:, None]",
     "visible_padding misses the first unused slot", "gather_visible or encoder_output"),
    ("model.py", "keep = None if key_padding is None else ~key_padding[:, None, None, :]",
     "keep = None if key_padding is None else key_padding[:, None, None, :]",
     "attention keeps the padded keys and drops the real ones", "encoder_output or embed_layers"),
    ("model.py", "    alpha, beta = delta / n_hidden, (1 - delta) / n_shown",
     "    alpha, beta = (1 - delta) / n_hidden, delta / n_shown", "delta and 1 - delta swapped", LOSS),
    ("model.py", "    alpha, beta = delta / n_hidden, (1 - delta) / n_shown",
     "    alpha, beta = delta / n_shown, (1 - delta) / n_hidden", "hidden and visible frame counts swapped", LOSS),
    ("model.py",
     "    n_hidden, n_shown = (hidden.sum(), shown.sum()) if counts is None else counts  # |M|, T - |M|",
     "    n_hidden, n_shown = hidden.sum(), shown.sum()  # |M|, T - |M|",
     "counts taken per micro-batch, the whole batch's counts ignored", "micro_batch"),
    ("model.py", "    shown = to_device(~mask & ~padding, ce.device)[..., None].float()",
     "    shown = to_device(~mask, ce.device)[..., None].float()",
     "padded frames counted as visible in the loss", LOSS + " or padding_is_in_neither"),
    ("model.py", "    hidden = to_device(mask & ~padding, ce.device)[..., None].float()",
     "    hidden = to_device(mask, ce.device)[..., None].float()",
     "padded frames counted as hidden in the loss", LOSS + " or padding_is_in_neither"),
    ("model.py", "    loss = (gamma * (alpha * hidden_ce + beta * shown_ce)).sum()",
     "    loss = (alpha * hidden_ce + beta * shown_ce).mean()", "gamma_q ignored (equal weights)", LOSS),
    ("model.py", "self.gamma, self.cfg.delta, counts)", "self.gamma, 0.9, counts)",
     "forward ignores the configured delta", LOSS),
    ("model.py", "LossOut(loss, hidden_ce.detach() / n_hidden, shown_ce.detach() / n_shown, masked_acc)",
     "LossOut(loss, hidden_ce.detach() / n_shown, shown_ce.detach() / n_shown, masked_acc)",
     "logged masked loss divided by the visible count", LOSS),
    ("model.py", "    gamma = list(cfg.gamma_q) + [sum(cfg.gamma_q)] * cfg.n_kmeans_streams",
     "    gamma = list(cfg.gamma_q) + [cfg.gamma_q[0]] * cfg.n_kmeans_streams",
     "k-means stream weighted gamma_1 instead of sum(gamma_q)", "loss_weights"),
    ("model.py", "    gamma = list(cfg.gamma_q) + [sum(cfg.gamma_q)] * cfg.n_kmeans_streams",
     "    gamma = list(cfg.gamma_q) + [1.0] * cfg.n_kmeans_streams",
     "k-means stream weighted 1 (equivalent: gamma_q sums to 1)", "loss_weights"),
    ("model.py", "            self.mask_token = nn.Parameter(0.02 * torch.randn(1, 1, cfg.d_model))",
     "            self.register_buffer(\"mask_token\", torch.zeros(1, 1, cfg.d_model))",
     "mask token fixed at zero, not learned", "decoder_puts"),
    ("model.py", "    full = torch.cat([h, mask_token.expand(B, T - N, D)], dim=1)",
     "    full = torch.cat([h + mask_token, mask_token.expand(B, T - N, D)], dim=1)",
     "mask token added at visible positions too", "decoder_puts or gather_visible"),
    ("model.py", "        h = h + sinusoidal_positions(h.shape[1], h.shape[2], h.device)  # where each token sits",
     "        h = h  # where each token sits", "decoder gets no positions", "decoder_puts"),
    ("model.py",
     "            h = restore_sequence(h, ids_restore, visible_padding, self.mask_token)  # (B, T, D)\n"
     "        h = h + sinusoidal_positions(h.shape[1], h.shape[2], h.device)  # where each token sits\n",
     "            h = h + sinusoidal_positions(h.shape[1], h.shape[2], h.device)\n"
     "            h = restore_sequence(h, ids_restore, visible_padding, self.mask_token)  # (B, T, D)\n",
     "decoder positions added in shuffled order, before the restore", "decoder_puts"),
    ("model.py", "torch.stack([torch.sin(position * freq), torch.cos(position * freq)], -1)",
     "torch.stack([torch.sin(position * freq), torch.sin(position * freq)], -1)",
     "position table with sin in place of cos", "sinusoidal"),
    ("model.py", "            for t in range(start, min(start + M_gap, length)):",
     "            for t in range(start, min(start + M_gap + 1, length)):", "gaps of M_gap + 1 frames", "gap_mask"),
    ("model.py", "            for t in range(start, min(start + M_gap, length)):",
     "            for t in range(start, min(start + M_gap - 1, length)):", "gaps of M_gap - 1 frames", "gap_mask"),
    ("model.py", "torch.randperm(max(length - M_gap, 0) + 1, generator=generator)",
     "torch.randperm(length, generator=generator)",
     "spans may start too late and are cut short at the clip's end", "gap_mask"),
    ("model.py", "                if not row[t] and hidden < n_hidden:",
     "                if not row[t] and hidden <= n_hidden:", "one frame too many hidden", "gap_mask"),
    ("model.py", "min(round(M_prop * length), length - 1)",
     "min(int(M_prop * length), length - 1)", "hidden count truncated, not rounded", "gap_mask"),
    ("model.py",
     "        for start in torch.randperm(max(length - M_gap, 0) + 1, generator=generator).tolist():\n"
     "            for t in range(start, min(start + M_gap, length)):\n",
     "        for start in torch.randperm(max(T - M_gap, 0) + 1, generator=generator).tolist():\n"
     "            for t in range(start, min(start + M_gap, T)):\n",
     "spans drawn over the whole row: padding may be hidden", "gap_mask"),
    ("model.py", "min(round(M_prop * length), length - 1)",
     "min(round(M_prop * length), length)", "a short clip may be hidden whole", "every_clip_keeps_a_visible_frame"),
    ("model.py", "(x.dtype != dtype or tuple(x.shape) != shape)",
     "(tuple(x.shape) != shape)", "integer and float masks accepted", "non_bool"),
    ("model.py", "        return self.norm(x) if n_layers in (None, len(self.layers)) else x",
     "        return self.norm(x)", "intermediate layers come out layer-normed", "embed_layers"),
    ("model.py", "        return self.encoder(x, key_padding(padding, x.device), None if layer == -1 else layer)",
     "        return self.encoder(x, None, None if layer == -1 else layer)",
     "embed attends to padding", "embed_layers"),
    ("model.py", "state[name] = torch.cat([state[name], new.state_dict()[name][rows:].to(state[name].device)])",
     "state[name] = new.state_dict()[name]", "stage 2 forgets the stage-1 head", "adding_the_kmeans_stream"),
    ("model.py", "(0 < self.M_prop < 1, ", "(0 < self.M_prop <= 2, ", "M_prop above 1 accepted", "config_refuses"),
]

# ---------------------------------------------------------------- kmeans.py
KM = "kmeans_recovers or kmeans_inertia or reseeds or lloyd_st or plus_plus or chunked_distances"
KMEANS_MUTANTS = [
    ("kmeans.py", "c = torch.where(empty[:, None], c, sums / counts.clamp_min(1)[:, None])",
     "c = torch.where(empty[:, None], c, sums / (counts + 1)[:, None])",
     "centroid update divides by n + 1", KM),
    ("kmeans.py", "            worst = dist.topk(int(empty.sum())).indices",
     "            worst = (-dist).topk(int(empty.sum())).indices",
     "empty clusters re-seeded on the best-served points", KM),
    ("kmeans.py", "            worst = dist.topk(int(empty.sum())).indices",
     "            worst = dist.argmax().repeat(int(empty.sum()))",
     "all empty clusters re-seeded on one point", KM),
    ("kmeans.py", "        if empty.any():", "        if False:", "empty clusters never re-seeded", KM),
    ("kmeans.py", "        cand = torch.searchsorted(cumulative, u.to(x.device)).clamp_max(sample_size - 1)",
     "        cand = torch.randint(sample_size, (n_trials,), generator=generator).to(x.device)",
     "k-means++ candidates drawn uniformly, not by D^2", "plus_plus"),
    ("kmeans.py", "        best = int(potential.double().sum(0).argmin())",
     "        best = int(potential.double().sum(0).argmax())", "k-means++ keeps the worst candidate", "plus_plus"),
    ("kmeans.py", "        closest = potential[:, best].contiguous()", "        closest = closest",
     "k-means++ distances never updated", "plus_plus"),
    ("kmeans.py", "    return KMeansResult(c + mean, history)", "    return KMeansResult(c, history)",
     "centroids returned in centred coordinates", KM),
    ("kmeans.py", "history.append((x_sq - 2 * (c64 * sums).sum()", "history.append((x_sq + 2 * (c64 * sums).sum()",
     "inertia formula sign error", KM),
    ("kmeans.py", "scores = torch.addmm(c_sq, xb.to(dtype), c_t, alpha=-2.0)",
     "scores = torch.addmm(c_sq, xb.to(dtype), c_t, alpha=-1.0)", "distance expansion off by a factor", KM),
    ("kmeans.py", "        if len(history) > 1 and history[-2] - history[-1] <= tol * history[-2]:",
     "        if len(history) > 1 and history[-2] - history[-1] <= tol:",
     "stopping tolerance absolute instead of relative", KM),
    ("kmeans.py", "    if args.layer != -1 and not 1 <= args.layer <= cfg.n_enc_layers:",
     "    if args.layer > cfg.n_enc_layers:", "--layer -2 accepted", "kmeans_command"),
    ("kmeans.py", "            warn_skipped(path, err, bad)\n        progress.update(",
     "            raise\n        progress.update(", "an unreadable file ends the run", "kmeans_skips"),
    ("kmeans.py", "    if path not in bad:\n        warnings.warn(", "    if True:\n        warnings.warn(",
     "a bad file is warned about at every stage", "kmeans_skips"),
]

# ---------------------------------------------------------------- evaluate.py (kept by its own owner)
EVALUATE_MUTANTS = [
    ("evaluate.py", "return (scores.argmax(1) == Y.argmax(1)).sum().item() / len(Y)",
     "return (scores.argmin(1) == Y.argmax(1)).sum().item() / len(Y)",
     "top-1 accuracy takes the lowest score", "naive_references"),
    ("evaluate.py", "last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]",
     "last = np.arange(len(s))",
     "mAP: tied scores get separate thresholds", "naive_references"),
    ("evaluate.py", "aps.append(float(np.sum(np.diff(np.r_[0.0, recall]) * precision)))",
     "aps += [float(np.sum(np.diff(np.r_[0.0, recall]) * precision))] * bool(tp[-1])",
     "mAP skips classes with no positive clip", "naive_references"),
    ("evaluate.py", "ts = (torch.arange(T, device=audio.device, dtype=torch.float64) + 0.5)",
     "ts = (torch.arange(T, device=audio.device, dtype=torch.float64) + 0.0)",
     "HEAR timestamps at frame starts, half a frame early", "hear_api"),
    ("evaluate.py", "return max(1, (2 * n_samples * SAMPLE_RATE + HOP * rate) // (2 * HOP * rate))",
     "return max(1, (n_samples * SAMPLE_RATE) // (HOP * rate))",
     "the last frame centred inside the audio is dropped", "hear_api"),
    ("evaluate.py", 'return frames[:, :None if getattr(upstream, "pool_all_frames", False) else real_frames(n, rate)]',
     "return frames[:, 0:1]",
     "scene embedding = the first frame", "hear_api or embed_command"),
    ("evaluate.py", "else real_frames(n, rate)].float().mean(1)",
     "else None].float().mean(1)",
     "scene embedding also pools the frame centred past the end", "hear_api or embed_command"),
    ("evaluate.py", "for t, v in zip(folds, folds[1:] + folds[:1])]",
     "for t, v in zip(folds, folds[-1:] + folds[:-1])]",
     "k-fold validates on the previous fold instead of the next", "kfold"),
    ("evaluate.py", 'mean, n = float(np.mean([f["test_score"] for f in folds])), ',
     'mean, n = folds[0]["test_score"], ',
     "the task score is the first fold's, not the mean over folds", "kfold or hear_tasks_run"),
    ("evaluate.py", "if score > best:  # strict",
     "if score >= best:  # strict",
     "a later tie replaces the first best validation", "first_best"),
    ("evaluate.py", "    probe.load_state_dict(best_state)\n",
     "",
     "the last weights are returned, not the best validated", "first_best"),
    ("evaluate.py", "best_state, best_epoch, waited = score, copy.deepcopy(probe.state_dict()), epoch, 0",
     "best_state, best_epoch, waited = score, probe.state_dict(), epoch, 0",
     "the best weights are kept by reference, so training overwrites them", "first_best"),
    ("evaluate.py", " and not (epoch + 1 == cfg.max_epochs and best_state is None)",
     "",
     "bug: --max-epochs below the validation interval has no weights to return", "first_best"),
    ("evaluate.py", "Y[i, [task.vocab[label] for label in labels]] = 1",
     "Y[(i + 1) % len(files), [task.vocab[label] for label in labels]] = 1",
     "labels shifted by one clip against the embeddings", "hear_tasks_run"),
    ("evaluate.py", "data[u.name][split] = (X, Y[kept])",
     "data[u.name][split] = (X, Y[: len(kept)])",
     "a skipped clip drops the last label row, not its own", "unreadable_hear"),
    ("evaluate.py", '    for j in sorted(bad):\n        warnings.warn(f"skipping {bad[j]}")\n',
     "",
     "unreadable HEAR clips are dropped without a warning", "unreadable_hear"),
    ("evaluate.py", 'p.add_argument("--max-epochs", type=at_least(1), default=500)',
     'p.add_argument("--max-epochs", type=int, default=500)',
     "--max-epochs 0 is not refused up front", "bad_evaluate_command_lines"),
    ("evaluate.py", "if layer != -1 and not (1 if file == spec else 0) <= layer <= depth:",
     "if layer != -1 and not 0 <= layer <= depth:",
     "--layer 0 is not refused", "bad_evaluate_command_lines"),
]

# ---------------------------------------------------------------- train.py and extras/
EXTRAS_MUTANTS = [
    ("extras/embed.py", 'done = lambda dest: os.path.exists(f"{dest}.npy")',
     'done = lambda dest: False and os.path.exists(f"{dest}.npy")',
     "embed re-embeds files already written (no resume)", "embed_command"),
    ("extras/embed.py", "plan += [(p, Path(out) / p.relative_to(src.absolute())) for p in found]",
     "plan += [(p, Path(out) / p.name) for p in found]",
     "embed flattens the folder tree instead of mirroring it", "embed_command"),
    ("train.py", "            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)",
     "            pass", "a second run on a folder in use is not refused", "second_run_on_one_folder"),
    ("train.py", "        finally:  # an end the run saw (not a kill): the next run finds nothing to take over\n"
     "            lock.truncate(0)\n",
     "        finally:  # an end the run saw (not a kill): the next run finds nothing to take over\n"
     "            pass\n",
     "a run that ended normally leaves its note, so the next run warns of a stale lock",
     "second_run_on_one_folder"),
    ("extras/resume.py", 'keep += [line] if json.loads(line)["step"] <= step else []',
     "keep += [line]", "resume keeps the metrics past the checkpoint: steps logged twice", "killed_run_resumes"),
    ("extras/resume.py", "    for path in paths[::-1]:", "    for path in paths[-1:]:",
     "resume stops at a torn newest checkpoint instead of passing over it", "killed_run_resumes"),
]

MUTANTS = MODEL_MUTANTS + KMEANS_MUTANTS + EVALUATE_MUTANTS + EXTRAS_MUTANTS


def tracked_files():
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [p for p in out.splitlines() if os.path.isfile(os.path.join(ROOT, p))]


def copy_tree(files, dest):
    for rel in files:
        os.makedirs(os.path.dirname(os.path.join(dest, rel)) or dest, exist_ok=True)
        shutil.copy2(os.path.join(ROOT, rel), os.path.join(dest, rel))


def pytest_args(expr):
    return ["-q", "-x", "-p", "no:cacheprovider", "test_all.py", "extras/", "-k", expr]


def run_tests(folder, expr, timeout):
    """'passed', 'failed', 'timeout' or 'no tests' (pytest's status 5) for `pytest -k expr` in folder.

    Where the OS can fork, a child of this process runs pytest: torch is imported once, here, and
    every child imports the project's (mutated) files afresh. Elsewhere, a new interpreter each time.
    """
    if not hasattr(os, "fork"):
        cmd = [sys.executable, "-m", "pytest"] + pytest_args(expr)
        try:
            code = subprocess.run(cmd, cwd=folder, capture_output=True, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            return "timeout"
        return {0: "passed", 5: "no tests"}.get(code, "failed")
    pid = os.fork()
    if pid == 0:  # the child: quiet, in the mutated copy, never returns
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1), os.dup2(null, 2)
        os.chdir(folder)
        sys.path.insert(0, folder)
        import pytest
        os._exit(int(pytest.main(pytest_args(expr))))
    deadline = time.time() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return {0: "passed", 5: "no tests"}.get(os.waitstatus_to_exitcode(status), "failed")
        if time.time() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return "timeout"
        time.sleep(0.05)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default="", help="run the mutants whose description contains this word")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per test run")
    args = p.parse_args(argv)
    import torch  # noqa: F401  loaded once; the forked test runs share it
    files = tracked_files()
    mutants = [m for m in MUTANTS if args.only in m[3]]
    rows, t0 = [], time.time()
    with tempfile.TemporaryDirectory() as tmp:
        base = os.path.join(tmp, "base")
        copy_tree(files, base)
        expr = " or ".join(sorted({f"({m[4]})" for m in mutants}))
        if run_tests(base, expr, 4 * args.timeout) != "passed":  # else a "kill" would mean nothing
            print(f"the unmutated code fails its own tests (-k {expr!r}): fix that first")
            return 1
        for i, (name, original, mutated, what, tests) in enumerate(mutants):
            folder = os.path.join(tmp, f"m{i}")
            copy_tree(files, folder)
            path = os.path.join(folder, name)
            with open(path) as f:
                text = f.read()
            if text.count(original) != 1:
                verdict = f"stale ({text.count(original)} matches)"
            else:
                with open(path, "w") as f:
                    f.write(text.replace(original, mutated))
                verdict = {"failed": "killed", "timeout": "killed (timeout)", "passed": "SURVIVED",
                           "no tests": "stale (-k matches no test)"}[run_tests(folder, tests, args.timeout)]
            shutil.rmtree(folder)
            rows.append((name, what, tests, verdict))
            print(f"[{i + 1}/{len(mutants)} {time.time() - t0:.0f} s] {name}: {what}: {verdict}", flush=True)
    print("\n| file | mutant | tests run (-k) | result |\n|---|---|---|---|")
    for name, what, tests, verdict in rows:
        print(f"| {name} | {what.replace('|', '/')} | `{tests}` | {verdict} |")
    killed = sum(v.startswith("killed") for *_, v in rows)
    survived = sum(v == "SURVIVED" for *_, v in rows)
    stale = len(rows) - killed - survived
    print(f"\n{len(rows)} mutants, {killed} killed, {survived} survived"
          + (f", {stale} stale" if stale else "") + f" ({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
