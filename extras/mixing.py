"""Weighted mixing of several --data sources (`train.py --data_weights`): not in the paper, which pools its three corpora."""
import numpy as np
from torch.utils.data import Dataset


class MixedDataset(Dataset):
    """Several datasets as one; with weights, dataset i fills the share w_i / sum(w) of an epoch."""

    def __init__(self, datasets, weights=None, seed=0):
        assert weights is None or len(weights) == len(datasets), "one weight per dataset"
        self.datasets, self.weights, self.seed = list(datasets), weights, seed
        self.set_epoch(0)

    n_skipped = property(lambda self: sum(d.n_skipped for d in self.datasets))

    def set_epoch(self, epoch):
        """Pass the epoch on and redraw which items of each dataset fill its share.

        Dataset i fills items [ends[i-1], ends[i]): whole passes in order, then a random part of
        one more pass. Only that part is stored, so memory follows the datasets, not the epoch.
        """
        self.sizes = np.array([len(d) for d in self.datasets], dtype=np.int64)
        counts = self.sizes if self.weights is None else np.array(
            [round(int(self.sizes.sum()) * w / sum(self.weights)) for w in self.weights], dtype=np.int64)
        rng = np.random.default_rng([self.seed, epoch])
        self.ends, self.whole = np.cumsum(counts), counts // self.sizes * self.sizes  # (S,) each
        self.part = [rng.permutation(size)[: count % size] for size, count in zip(self.sizes, counts)]
        for d in self.datasets:
            d.set_epoch(epoch)

    def __len__(self):
        return int(self.ends[-1])

    def locate(self, index):
        """(dataset, item of that dataset) behind an item of the mix."""
        i = int(np.searchsorted(self.ends, index, side="right"))  # the dataset filling this item
        j = index - (int(self.ends[i - 1]) if i else 0)  # its position within the share
        return i, int(j % self.sizes[i] if j < self.whole[i] else self.part[i][j - self.whole[i]])

    def __getitem__(self, index):
        i, inner = self.locate(index)
        return self.datasets[i][inner]
