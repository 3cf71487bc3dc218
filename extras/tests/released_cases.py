"""Serves extras/tests/test_released.py (and .ci/released_fixtures.py): the released fixtures.

The fixtures in extras/tests/fixtures/released/ were written by the authors' own code
(`.ci/released_fixtures.py build`, docs/RELEASED.md); this module only says where they lie and
regenerates the fixed clips their embeddings were recorded on: the tests need no authors' package.
"""
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent.parent
FIXTURES = ROOT / "extras" / "tests" / "fixtures" / "released"
CODEC_SEED = 1234  # the fixtures' random EnCodec is this seed, not 30 MB of weights
KINDS = {  # kind -> release: v1 (tag v.1.0.0, model.pt + config.gin) or v2 (HEAD, one <name>.pt)
    "encodecmae-small": "v1",
    "encodecmae-large-st": "v1",
    "ec-ec-base": "v2",
    "mel256-ec-base_st": "v2",
    "mel256-ec-large": "v2",
    "spec-ec-base": "v2",
}


def fixture_clips():
    """Five fixed clips at 24 kHz: 1.3 s (a part chunk), 2.0 s (150 whole frames), 5.3 s (a 4-s
    chunk + a part), 4.05 s (a 1200-sample tail v2 skips), 200 samples (v1 only: one frame, every
    key padding, where their -1e9 and a -inf differ). Tones with a slow tremolo, seeded noise."""
    rng = np.random.default_rng(20240523)
    clips = []
    for n, f0 in ((31200, 220.0), (48000, 440.0), (127200, 330.0), (97200, 880.0), (200, 660.0)):
        t = np.arange(n) / 24000.0
        tone = 0.3 * np.sin(2 * np.pi * f0 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 1.5 * t))
        clips.append((tone + 0.05 * rng.standard_normal(n)).astype(np.float32))
    return clips


def fixture_path(kind):
    """Where the committed file of a kind lies (v1: model.pt with config.gin beside it)."""
    return FIXTURES / kind / "model.pt" if KINDS[kind] == "v1" else FIXTURES / f"{kind}.pt"


def v2_variants():
    """{what: the v2 fixture (gin.config_str() form) with one thing their loader refuses, or one
    that misled our messages}; .ci/released_fixtures.py refusals runs their loader on each."""
    ckpt = torch.load(fixture_path("mel256-ec-base_st"), weights_only=True)
    cfg = ckpt["config"]
    heads = "encoder/MultiHeadAttention.num_heads = %NUM_ENCODER_HEADS"
    model = "get_model.model = @encodecmae.models.EncodecMAE"
    return {
        "no imports": {k: v for k, v in ckpt.items() if k != "imports"},
        "unknown model class": dict(ckpt, config=cfg.replace(model, model + "X")),
        "a line that is not gin": dict(ckpt, config=cfg + "\nthis is not gin\n"),
        "== for =": dict(ckpt, config=cfg.replace("MODEL_DIM = 36", "MODEL_DIM == 36")),
        "no config": {k: v for k, v in ckpt.items() if k != "config"},
        "config as bytes": dict(ckpt, config=cfg.encode()),
        "empty config": dict(ckpt, config=""),
        "renamed num_heads": dict(ckpt, config=cfg.replace(heads, heads.replace("num_", "n_"))),
        "undefined macro": dict(ckpt, config=cfg.replace(heads, heads.replace("_ENCODER", "_X"))),
    }


def v2_variant(what):
    return v2_variants()[what]
