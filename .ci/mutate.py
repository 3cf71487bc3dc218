"""Hand-made mutation check: break the code on purpose, one change at a time, and see a test fail.

Run: python .ci/mutate.py   (about 9 minutes on 2 shared CPU cores; --only WORD runs a subset)
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
     "        if self.cfg.mask_mode == \"drop\":\n"
     "            # N never falls below what gap_mask leaves of a full clip: one shape to"
     " compile.\n"
     "            slots = T - min(round(self.cfg.M_prop * T), T - 1)\n"
     "            x_visible, ids_restore, visible_padding = gather_visible(x, mask, padding,"
     " slots)\n",
     "        x = self.in_proj(feats)  # (B, T, D)\n"
     "        if self.cfg.mask_mode == \"drop\":\n"
     "            slots = T - min(round(self.cfg.M_prop * T), T - 1)\n"
     "            x_visible, ids_restore, visible_padding = gather_visible(x, mask, padding,"
     " slots)\n"
     "            positions = sinusoidal_positions(x_visible.shape[1], self.cfg.d_model, device)\n"
     "            x_visible = x_visible + positions\n",
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
    ("model.py", "    alpha = delta / n_hidden\n    beta = (1 - delta) / n_shown\n",
     "    alpha = (1 - delta) / n_hidden\n    beta = delta / n_shown\n",
     "delta and 1 - delta swapped", LOSS),
    ("model.py", "    alpha = delta / n_hidden\n    beta = (1 - delta) / n_shown\n",
     "    alpha = delta / n_shown\n    beta = (1 - delta) / n_hidden\n",
     "hidden and visible frame counts swapped", LOSS),
    ("model.py", "    if counts is None:  # this is the whole batch\n",
     "    if True:  # this is the whole batch\n",
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
    ("model.py", "torch.stack([torch.sin(angles), torch.cos(angles)], -1)",
     "torch.stack([torch.sin(angles), torch.sin(angles)], -1)",
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
     "        starts = torch.randperm(max(length - M_gap, 0) + 1, generator=generator).tolist()\n"
     "        for start in starts:\n"
     "            for t in range(start, min(start + M_gap, length)):\n",
     "        starts = torch.randperm(max(T - M_gap, 0) + 1, generator=generator).tolist()\n"
     "        for start in starts:\n"
     "            for t in range(start, min(start + M_gap, T)):\n",
     "spans drawn over the whole row: padding may be hidden", "gap_mask"),
    ("model.py", "min(round(M_prop * length), length - 1)",
     "min(round(M_prop * length), length)", "a short clip may be hidden whole", "every_clip_keeps_a_visible_frame"),
    ("model.py", "(x.dtype != dtype or tuple(x.shape) != shape)",
     "(tuple(x.shape) != shape)", "integer and float masks accepted", "non_bool"),
    ("model.py", "        if n_layers in (None, len(self.layers)):\n",
     "        if True:\n", "intermediate layers come out layer-normed", "embed_layers"),
    ("model.py", "        return self.encoder(x, key_padding(padding, x.device), n_layers)",
     "        return self.encoder(x, None, n_layers)",
     "embed attends to padding", "embed_layers"),
    ("model.py", "        state[name] = torch.cat([state[name], fresh])",
     "        state[name] = new.state_dict()[name]", "stage 2 forgets the stage-1 head",
     "adding_the_kmeans_stream"),
    ("model.py", "(0 < self.M_prop < 1, ", "(0 < self.M_prop <= 2, ", "M_prop above 1 accepted", "config_refuses"),
]

# ---------------------------------------------------------------- the input choice [4]
FRONT = "mel_and_spec_inputs_equal"
INPUT_MUTANTS = [
    ("extras/filterbank.py", 'window_type="hanning", dither=0.0, htk_compat=True',
     'window_type="hamming", dither=0.0, htk_compat=True',
     "mel frames windowed by Hamming, not Hanning", FRONT),
    ("extras/filterbank.py", 'NORM_STATS = {"mel": (-6.12, 4.82), ',
     'NORM_STATS = {"mel": (-6.02, 4.89), ',
     "mel normalized by the demo corpus' statistics, not the authors'", FRONT),
    ("extras/filterbank.py", "frame_shift=13.28,\n                 window_type=",
     "frame_shift=13.3334,\n                 window_type=",
     "mel hop of 320 samples (frame_shift 13.3334 ms), not Kaldi's 318", FRONT),
    ("extras/filterbank.py", "    wav = F.pad(wav.float(), (0, missing))",
     "    wav = F.pad(wav.float(), (missing, 0))",
     "the filterbank's padding at the front of the clip, not its end", FRONT),
    ("extras/filterbank.py", "fn(w[None], **args)[:T] for w in wav", "fn(w[None], **args) for w in wav",
     "Kaldi's extra frames past T kept (no crop to the codec's frame count)", FRONT),
    ("extras/filterbank.py", "low_freq=20.0, high_freq=0.0", "low_freq=0.0, high_freq=0.0",
     "mel bins from 0 Hz, not 20 Hz", FRONT),
    ("extras/filterbank.py", '    if kind == "mel":\n        fn = kaldi.fbank',
     '    if kind != "mel":\n        fn = kaldi.fbank',
     "mel and spec swapped", FRONT),
    ("train.py", '        if mcfg.input != "encodec":  # a filterbank',
     '        if False:  # a filterbank',
     "a mel model fed the codec's frames from raw audio", "filterbank_input_trains"),
    ("extras/cache.py", "os.fsdecode(self.audio[f]), start * HOP, T * HOP)",
     "os.fsdecode(self.audio[f]), start, T * HOP)",
     "a cached crop's filterbank read from sample `start`, not `start * HOP`",
     "cached_filterbank_crops"),
    ("evaluate.py", '    if mae is None or mae.cfg.input == "encodec":  # a filterbank input',
     "    if True:  # a filterbank input",
     "load_upstream loads a codec for a filterbank model", "filterbank_model_embeds"),
]

# ---------------------------------------------------------------- the GPU path, on the CPU
GPU_MUTANTS = [
    ("model.py", "    torch.backends.cudnn.allow_tf32 = False\n",
     "    torch.backends.cudnn.allow_tf32 = tf32\n",
     "the codec runs with cuDNN's TF32 left on", "tf32"),
    ("extras/bench.py", "mcfg.n_enc_layers * layer(N) + 2 * N * D * D",
     "mcfg.n_enc_layers * layer(N) + 2 * T * D * D",
     "mae_flops counts the decoder projection on T frames, not N", "mae_flops"),
]

# ---------------------------------------------------------------- faults (docs/BAD_INPUT.md)
FAULT_MUTANTS = [
    ("extras/cache.py", "        if size != npy_bytes(shape, dtype):",
     "        if False:",
     "a cache array cut short passes for done (sizes not checked)", "arrays_were_deleted"),
    ("data.py", "        except Exception as err:  # not a torch file, or weights of another model",
     "        except torch.serialization.pickle.UnpicklingError as err:",
     "--encodec weights of another model end in a traceback", "codec_weights_file_of_another"),
    ("data.py", "    if paths and not kept:  # a store made on other data",
     "    if False:  # a store made on other data",
     "a k-means store labelling none of --data is not refused", "store_of_other_audio"),
    ("kmeans.py", 'name = f"{D.file_id(path)}.{of_centroids}.npy"',
     'name = f"{D.file_id(path)}.npy"',
     "label files named without the centroids' hash: older labels reused",
     "labels_of_older_centroids"),
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
    ("kmeans.py", "inertia = x_sq - 2 * (c64 * sums).sum()",
     "inertia = x_sq + 2 * (c64 * sums).sum()",
     "inertia formula sign error", KM),
    ("kmeans.py", "scores = torch.addmm(c_sq, xb.to(dtype), c_t, alpha=-2.0)",
     "scores = torch.addmm(c_sq, xb.to(dtype), c_t, alpha=-1.0)", "distance expansion off by a factor", KM),
    ("kmeans.py", "        if len(history) > 1 and history[-2] - history[-1] <= tol * history[-2]:",
     "        if len(history) > 1 and history[-2] - history[-1] <= tol:",
     "stopping tolerance absolute instead of relative", KM),
    ("kmeans.py", "    if args.layer != -1 and not 1 <= args.layer <= cfg.n_enc_layers:",
     "    if args.layer > cfg.n_enc_layers:", "--layer -2 accepted", "kmeans_command"),
    ("kmeans.py", "        except AudioError as err:\n            warn_skipped(path, err, bad)\n",
     "        except AudioError as err:\n            raise\n",
     "an unreadable file ends the run", "kmeans_skips"),
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
    ("evaluate.py", "centres = torch.arange(T, device=audio.device, dtype=torch.float64) + 0.5",
     "centres = torch.arange(T, device=audio.device, dtype=torch.float64) + 0.0",
     "HEAR timestamps at frame starts, half a frame early", "hear_api"),
    ("evaluate.py", "return max(1, (2 * n_samples * SAMPLE_RATE + HOP * rate) // (2 * HOP * rate))",
     "return max(1, (n_samples * SAMPLE_RATE) // (HOP * rate))",
     "the last frame centred inside the audio is dropped", "hear_api"),
    ("evaluate.py", "    return frames.float().mean(1)\n",
     "    return frames[:, 0].float()\n",
     "scene embedding = the first frame", "hear_api or embed_command"),
    ("evaluate.py", "        frames = frames[:, :real_frames(n, rate)]\n",
     "        frames = frames[:, :None]\n",
     "scene embedding also pools the frame centred past the end", "hear_api or embed_command"),
    ("evaluate.py", "pairs = zip(folds, folds[1:] + folds[:1])",
     "pairs = zip(folds, folds[-1:] + folds[:-1])",
     "k-fold validates on the previous fold instead of the next", "kfold"),
    ("evaluate.py", 'mean = float(np.mean([f["test_score"] for f in folds]))',
     'mean = folds[0]["test_score"]',
     "the task score is the first fold's, not the mean over folds", "kfold or hear_tasks_run"),
    ("evaluate.py", "if score > best:  # strict",
     "if score >= best:  # strict",
     "a later tie replaces the first best validation", "first_best"),
    ("evaluate.py", "    probe.load_state_dict(best_state)\n",
     "",
     "the last weights are returned, not the best validated", "first_best"),
    ("evaluate.py", "            best_state = copy.deepcopy(probe.state_dict())",
     "            best_state = probe.state_dict()",
     "the best weights are kept by reference, so training overwrites them", "first_best"),
    ("evaluate.py", "        last_chance = epoch + 1 == cfg.max_epochs and best_state is None",
     "        last_chance = False",
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
    ("evaluate.py", 'p.add_argument("--max-epochs", type=at_least(1), default=500,',
     'p.add_argument("--max-epochs", type=int, default=500,',
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
    ("extras/run.py", "            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)",
     "            pass", "a second run on a folder in use is not refused", "second_run_on_one_folder"),
    ("extras/run.py", "        finally:  # an end the run saw (not a kill)"
     ": the next run finds nothing to take over\n"
     "            lock.truncate(0)\n",
     "        finally:  # an end the run saw (not a kill)"
     ": the next run finds nothing to take over\n"
     "            pass\n",
     "a run that ended normally leaves its note, so the next run warns of a stale lock",
     "second_run_on_one_folder"),
    ("extras/run.py", 'if json.loads(line)["step"] <= step:',
     'if json.loads(line)["step"] <= step or True:',
     "resume keeps the metrics past the checkpoint: steps logged twice", "killed_run_resumes"),
    ("extras/run.py", "    for path in paths[::-1]:", "    for path in paths[-1:]:",
     "resume stops at a torn newest checkpoint instead of passing over it", "killed_run_resumes"),
    ("extras/run.py", "        if not cfg.resume and history:  # a new run here",
     "        if False:  # a new run here",
     "a new run into a folder holding another run is not refused", "new_run_refuses"),
    ("extras/run.py", "        return int(stop)", "        return 0",
     "the stop signal agreed over ranks is always 0: a signal never stops the run",
     "ctrl_c_while"),
]

MUTANTS = (MODEL_MUTANTS + INPUT_MUTANTS + GPU_MUTANTS + KMEANS_MUTANTS + EVALUATE_MUTANTS
           + FAULT_MUTANTS + EXTRAS_MUTANTS)


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
