"""`python evaluate.py --heareval-embeddings DIR`: our probes on embeddings heareval's own runner wrote, to compare probes alone.

DIR is heareval's embeddings/<module> folder: one folder per task, holding the task's metadata and,
per split, <split>.embeddings.npy (a raw float32 memmap), <split>.embedding-dimensions.json and
<split>.target-labels.pkl. evaluate.py reads them here instead of embedding audio.
"""
import json
import pickle

import numpy as np
import torch


def read_heareval_split(task, split):
    """A split that heareval's embedding runner wrote (its memmap and pickled labels) -> (X (N, D), Y (N, C))."""
    n, D = json.loads((task.path / f"{split}.embedding-dimensions.json").read_text())
    X = np.memmap(task.path / f"{split}.embeddings.npy", dtype=np.float32, mode="r", shape=(n, D))
    with open(task.path / f"{split}.target-labels.pkl", "rb") as f:
        labels = pickle.load(f)  # heareval's own file; only read it from a run you trust
    Y = torch.zeros(n, len(task.vocab))  # (N, C)
    for i, clip_labels in enumerate(labels):
        Y[i, [task.vocab[str(label)] for label in clip_labels]] = 1
    return torch.tensor(np.array(X)), Y
