"""pytest setup for the whole suite: it runs on the CPU, in fp32, even on a GPU machine (docs/GPU.md).

Loaded before any test module when pytest is given extras/ (the suite's command names it). An
assignment, not setdefault: a machine that exports CUDA_VISIBLE_DEVICES=0 must not hand its GPU
to --device auto, nor to the subprocesses (torchrun, the CLI tests), which inherit this setting.
"""
import os

os.environ["CUDA_VISIBLE_DEVICES"] = ""
