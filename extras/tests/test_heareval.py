"""Tests of `python extras/heareval.py --embeddings DIR`: evaluate.py's probes on heareval's embedding files."""
import json
import pickle

import numpy as np
import torch

import evaluate as E
from extras import demo_audio as demo
from extras import heareval


def test_heareval_embedding_files_are_probed_with_our_grid(tmp_path):
    """[3.2] heareval's memmap + pickled labels go through the same probes and Table 1 as our embeddings."""
    rng = np.random.default_rng(0)
    labels = {s: [[str(i % 2)] for i in range(8)] for s in ("train", "valid", "test")}
    root = tmp_path / "embeddings" / "module"
    task = demo.write_task(root, "t", {s: [(torch.zeros(240), y) for y in ys] for s, ys in labels.items()},
                           False, False, 0.01)
    data = {}
    for split, ys in labels.items():
        X = (rng.standard_normal((len(ys), 4)) + 3 * np.array([[int(y[0])] for y in ys])).astype(np.float32)
        X.tofile(task / f"{split}.embeddings.npy")  # heareval writes a raw np.memmap under this name
        (task / f"{split}.embedding-dimensions.json").write_text(json.dumps(list(X.shape)))
        (task / f"{split}.target-labels.pkl").write_bytes(pickle.dumps(ys))
        data[split] = (torch.from_numpy(X), torch.eye(2)[[int(y[0]) for y in ys]])
    results = heareval.main(["--embeddings", str(root), "--grid-points", "2", "--max-epochs", "30",
                             "--device", "cpu", "--out", str(tmp_path / "out")])
    want = E.probe_task(data, E.read_task(task), E.hear_grid(2, max_epochs=30))
    assert list(results) == ["module"] and results["module"]["t"]["n_test"] == 8
    assert results["module"]["t"]["test"] == want["test"] and results["module"]["t"]["grid"] == want["grid"]
