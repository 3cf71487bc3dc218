"""The mean and std of the raw (unnormalized) mel and spec filterbanks on a corpus (developers' tool).

    python .ci/frontend_stats.py runs/real/corpus [--crops 120]

extras/filterbank.py's NORM_STATS keeps the authors' mel statistics (their configs/features/mel.gin) and, since their
spec.gin is empty, spec statistics measured by this command on the realistic demo corpus
(`python extras/demo_audio.py real`); it prints both, measured over the real frames of random crops.
"""
import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data as D  # noqa: E402
import model as M  # noqa: E402
from extras import filterbank  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("corpus", help="an audio folder")
    p.add_argument("--crops", type=int, default=120, help="random 4-s crops measured")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    crops = D.CropDataset(D.list_audio(args.corpus), seed=args.seed)
    picked = np.random.default_rng(args.seed).permutation(len(crops))[: args.crops]
    wav = torch.stack([crops[int(i)].wav for i in picked])  # (n, 96000)
    padding = torch.stack([crops[int(i)].padding for i in picked])  # (n, 300)
    for kind in ("mel", "spec"):
        mean, std = filterbank.NORM_STATS[kind]
        raw = (filterbank.filterbank_frames(wav, kind) * std + mean)[~padding]  # (frames, bins), unnormalized
        print(f"{kind}: raw mean {raw.mean():.2f} std {raw.std():.2f} over {len(raw)} frames of "
              f"{len(picked)} crops (filterbank.NORM_STATS: {filterbank.NORM_STATS[kind]})")


if __name__ == "__main__":
    main()
