"""Table 1's #Par (a check beside the paper): `python extras/param_count.py` prints ours beside 51M / 94M / 269M.

Table 1 counts the feature extractor: EnCodec's encoder (the 'EC' row's 7.4M), the input projection
and the MAE encoder; the decoder and head are left out (they are dropped after pretraining).
"""
import argparse
import os
import sys

import torch

if __package__ in (None, ""):  # run as a script: the core files sit in the folder above
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import model as M

TABLE1_PARAMS = {"small": 51e6, "base": 94e6, "large": 269e6}


def count_parameters(cfg):
    """Feature-extractor parameters as Table 1 counts them: EnCodec encoder + input proj + encoder."""
    with torch.device("meta"):
        codec, model = M.build_encodec(pretrained=False).encoder, M.EnCodecMAE(cfg)
    return sum(p.numel() for part in (codec, model.in_proj, model.encoder) for p in part.parameters())


def print_table1():
    print("| size | ours (M) | Table 1 (M) |\n|---|---|---|")
    for size, paper in TABLE1_PARAMS.items():
        print(f"| {size} | {count_parameters(M.make_config(size)) / 1e6:.1f} | {paper / 1e6:.0f} |")


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()  # --help, nothing else
    print_table1()
