"""A seeded random EnCodec for tests and offline smoke runs (`--encodec random`); its targets are NOT the paper's.

With random weights the codec package's codebooks are all zeros (they are k-means-initialised on
the codec's first training batch), so every target would be 0, and the random encoder's output
is nearly constant (a fixed per-dimension pattern dominates the part that depends on the input).
So, calibrated on varied synthetic audio: each conv is rescaled to unit output variance (LSUV),
every RVQ stage is filled from the residuals that audio leaves, and the 128-d frames are
standardized per dimension. A random codec stays a weak front end: it tests the machinery only.
"""
import copy
import warnings

import torch
from torch import nn

import model as M

_BUILT = {}  # seed -> codec on the CPU: building one costs seconds; callers get copies


def random_codec(seed=0):
    """A fresh copy of the seeded random codec (a caller may move its copy to a GPU)."""
    if seed not in _BUILT:
        warnings.warn("--encodec random: a seeded random codec; its inputs and targets are NOT the "
                      "paper's (smoke tests and teaching only).", stacklevel=3)
        from extras.demo_signals import demo_clips
        _BUILT[seed] = build(seed, demo_clips(24, seconds=1.0, seed=seed))  # (24, 24000) varied audio
    return copy.deepcopy(_BUILT[seed])


class RandomCodec(M.Codec):
    """model.Codec whose frames are standardized per dimension (the real codec's are used as they are)."""

    def __init__(self, encodec_model):
        super().__init__(encodec_model, "random")
        self.register_buffer("feat_mean", torch.zeros(self.dim))
        self.register_buffer("feat_std", torch.ones(self.dim))

    def features(self, wav):
        return (super().features(wav) - self.feat_mean) / self.feat_std  # (B, T, 128)

    def forward(self, wav):
        feats, codes = super().forward(wav)  # the codes come from the raw frames, as in EnCodec
        return (feats - self.feat_mean) / self.feat_std, codes


@torch.no_grad()
def build(seed, audio):
    """The recipe above, calibrated on `audio` (B, n), varied 24 kHz clips -> RandomCodec."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        codec = RandomCodec(M.build_encodec(pretrained=False))
        generator = torch.Generator().manual_seed(seed)
        unit_variance_convs(codec.encoder, audio[:8])
        emb = codec.raw_frames(audio).transpose(1, 2).reshape(-1, codec.dim)  # (B * T, 128)
        fill_codebooks(codec.quantizer, emb, codec.n_q, generator)
        codec.feat_mean.copy_(emb.mean(0))
        codec.feat_std.copy_(emb.std(0).clamp(min=1e-5))
    return codec


@torch.no_grad()
def unit_variance_convs(encoder, audio):
    """LSUV-style init: each conv, in forward order, is rescaled so its output has unit variance."""
    def rescale(conv, inputs, output):
        std = output.std().clamp(min=1e-8)
        conv.weight.div_(std)
        if conv.bias is not None:
            conv.bias.div_(std)
        return output / std  # later layers see the rescaled output in this same pass
    hooks = [m.register_forward_hook(rescale) for m in encoder.modules() if isinstance(m, nn.Conv1d)]
    with M.codec_precision(audio.device):
        encoder(audio[:, None])
    for hook in hooks:
        hook.remove()


@torch.no_grad()
def fill_codebooks(quantizer, emb, n_q, generator):
    """Residual VQ init from data: stage q's entries are built from residuals of stages 1..q-1.

    Each entry is the midpoint of two random residuals. Deviation: the residuals themselves plus
    jitter make every picked frame's residual drop to ~0, and the later stages collapse (measured
    on 8 clips: 280 -> 57 distinct codes from stage 1 to 8; with midpoints 276-382 in every stage).
    """
    residual = emb  # (N, 128)
    for layer in quantizer.vq.layers[:n_q]:
        book = layer._codebook
        a, b = (torch.randperm(len(residual), generator=generator)[: book.codebook_size] for _ in "ab")
        book.embed.copy_(0.5 * (residual[a] + residual[b]))
        book.inited.fill_(1)
        residual = residual - book.decode(book.encode(residual))  # what stage q leaves to the next
