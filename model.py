"""EnCodecMAE, the network and its loss: sections 2, 2.1, 2.2 and 2.3 of the paper (Fig. 1).

Top to bottom it follows the figure: frozen EnCodec encoder -> sinusoidal positions -> gap
masking -> encoder on the visible frames -> decoder with mask tokens -> per-codebook head ->
weighted cross-entropy -> features. Imported by every other file; it imports none of them.
`mask` is True where a frame is hidden, `padding` True where it is not real audio. Shapes:
B batch, T frames, N visible frames, D width, S target streams (Q codebooks, + k-means after
self-training), K entries per codebook. Table 1's parameter counts: `python extras/param_count.py`.
"""
import contextlib
import math
import warnings
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

SAMPLE_RATE = 24000                 # EnCodec 24 kHz model [2.1]
HOP = 320                           # samples per codec frame: 24000 / 320 = 75 Hz [2.1]
FRAME_RATE = SAMPLE_RATE // HOP
CROP_SECONDS = 4.0                  # training crops [3.1]
CROP_SAMPLES = int(CROP_SECONDS * SAMPLE_RATE)
CROP_FRAMES = CROP_SAMPLES // HOP   # T = 300
# The authors' released gamma_q for the pretrained codec [3.1]
RELEASED_GAMMA_Q = (0.2241, 0.1760, 0.1450, 0.1215, 0.1032, 0.0883, 0.0761, 0.0659)


def num_frames(n_samples):
    """Codec frames of n samples: the encoder pads the last hop, so a partial frame counts."""
    return math.ceil(n_samples / HOP)


# ---------------------------------------------------------------- configuration [2.2, 2.3, 3.1]
@dataclass
class ModelConfig:
    """Every hyperparameter of the network and its loss; the defaults are the paper's base model."""

    Q: int = 8                       # codec codebooks used as targets, 6 kbps [3.1]
    K: int = 1024                    # entries per codebook (and k-means clusters) [2.1, 2.3]
    d_codec: int = 128               # EnCodec encoder output width [2.1]
    d_model: int = 768               # transformer width D [2.2]
    n_enc_layers: int = 10           # 5 small, 10 base, 20 large [2.2]
    n_dec_layers: int = 2            # "only 2 layers in the decoder" [2.2]
    n_heads: int = 12                # attention heads (not in the paper; 64-d heads)
    ff_dim: int = 4096               # feed-forward width (not in the paper; gives Table 1's #Par)
    M_prop: float = 0.5              # proportion of frames hidden, M_prop [2, 3.1]
    M_gap: int = 15                  # frames hidden after each sampled start, M_gap, 200 ms [2]
    delta: float = 0.9               # weight of hidden vs visible frames in the loss, delta [2.3]
    gamma_q: tuple = RELEASED_GAMMA_Q  # per-codebook loss weights gamma_q, sum to 1 [2.3, 3.1]
    n_kmeans_streams: int = 0        # 1 after self-training: stream Q+1 [2.3]
    mask_mode: str = "drop"          # "drop" (MAE, the paper) or "token" (BERT-style) [2.2]
    input: str = "encodec"           # the MAE's input: encodec (the paper), mel or spec [4]

    @property
    def n_streams(self):
        """S, the target streams: Q codebooks, then the k-means streams of self-training."""
        return self.Q + self.n_kmeans_streams

    @property
    def d_input(self):
        """Width of the MAE's input frames: the codec's 128, or the filterbank's bins [4]."""
        return self.d_codec if self.input == "encodec" else INPUT_DIMS[self.input]

    def __post_init__(self):
        """Refuse an inconsistent config with a ValueError that names the field."""
        self.gamma_q = tuple(self.gamma_q)  # a checkpoint stores it as a list
        rules = [
            (1 <= self.Q <= 8, f"Q={self.Q}: the 6 kbps codec has 8 codebooks, so 1 <= Q <= 8"),
            (len(self.gamma_q) == self.Q, f"{len(self.gamma_q)} gamma_q weights for Q={self.Q}"),
            (abs(sum(self.gamma_q) - 1) < 1e-3, f"gamma_q must sum to 1, not {sum(self.gamma_q)}"),
            (self.d_model % self.n_heads == 0, f"d_model={self.d_model}: a multiple of n_heads"),
            (0 < self.M_prop < 1, f"M_prop={self.M_prop} must lie strictly between 0 and 1"),
            (self.M_gap >= 1, f"M_gap={self.M_gap} must be at least 1 frame"),
            (0 <= self.delta <= 1, f"delta={self.delta} must lie in [0, 1]"),
            (self.mask_mode in ("drop", "token"), "mask_mode must be drop or token"),
            (self.input in ("encodec", "mel", "spec"), "input must be encodec, mel or spec"),
        ]
        for ok, message in rules:
            if not ok:
                raise ValueError(f"model config: {message}")


# Model sizes as in section 2.2 (tiny is ours, for CPU demos and tests).
SIZES = {
    #         encoder layers     width           heads          feed-forward
    "tiny":  dict(n_enc_layers=2, d_model=128, n_heads=4, ff_dim=512, n_dec_layers=1),
    "small": dict(n_enc_layers=5, d_model=768, n_heads=12, ff_dim=4096),
    "base":  dict(n_enc_layers=10, d_model=768, n_heads=12, ff_dim=4096),
    # Deviation: 16 heads at D = 1024 (the authors keep 12); the paper does not say.
    "large": dict(n_enc_layers=20, d_model=1024, n_heads=16, ff_dim=4096),
}


def make_config(size="base", **overrides):
    """A size from SIZES plus overrides; a changed Q takes the first Q released gamma_q,
    renormalized to sum to 1."""
    if size not in SIZES:
        raise ValueError(f"unknown model size {size!r}; choose one of {sorted(SIZES)}")
    if "Q" in overrides and "gamma_q" not in overrides:
        head = RELEASED_GAMMA_Q[: overrides["Q"]]
        overrides["gamma_q"] = tuple(g / sum(head) for g in head)
    return ModelConfig(**{**SIZES[size], **overrides})


# ---------------------------------------------------------------- 2.1 EnCodec: inputs and targets
class Codec(nn.Module):
    """The frozen EnCodec encoder and its residual vector quantizer [2.1]: 128-d frames at 75 Hz
    (the MAE's input) and 8 codes per frame (its targets), from one encoder pass."""

    n_q = 8    # 6 kbps = 8 codebooks of 10 bits at 75 Hz [3.1]
    dim = 128  # the encoder's output width

    def __init__(self, encodec_model, source):
        super().__init__()
        self.encoder = encodec_model.encoder
        self.quantizer = encodec_model.quantizer
        self.source = source  # "pretrained", a checkpoint path or "random": stored with every run
        self.requires_grad_(False).eval()  # frozen [3.1]

    @torch.no_grad()
    def raw_frames(self, wav):
        """(B, n) mono at 24 kHz -> the encoder's output (B, 128, T), as the quantizer takes it."""
        assert wav.dim() == 2, f"codec takes (B, n_samples) mono at 24 kHz, not {tuple(wav.shape)}"
        with codec_precision(wav.device):
            return self.encoder(wav[:, None].float())

    def features(self, wav):
        """The MAE's input frames: (B, n) -> (B, T, 128)."""
        return self.raw_frames(wav).transpose(1, 2)

    @torch.no_grad()
    def forward(self, wav):
        """One encoder pass gives both the inputs and the targets [2, Fig. 1]:
        (B, n) -> frames (B, T, 128), codes (B, T, 8)."""
        emb = self.raw_frames(wav)  # (B, 128, T)
        with codec_precision(wav.device):
            codes = self.quantizer.encode(emb, FRAME_RATE, 6.0)  # (8, B, T)
        assert codes.shape[-1] == emb.shape[-1] == num_frames(wav.shape[-1])
        return emb.transpose(1, 2), codes.permute(1, 2, 0).long()


@contextlib.contextmanager
def codec_precision(device):
    """The frozen codec in true fp32, whatever the MAE around it uses: outside any autocast (under
    bf16 autocast only 35-48% of its codes matched fp32: docs/GPU.md) and without TF32, which cuDNN
    applies to fp32 convolutions and LSTMs on Ampere and newer GPUs by default; both come back as
    they were. On a CPU, denormals are flushed: the LSTM makes them, 3x slower on x86, and flushing
    changes nothing measurable (8 s of audio: 3.7 s -> 1.2 s on a 2-core CPU)."""
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    if device.type == "cpu":
        torch.set_flush_denormal(True)
    try:
        with torch.autocast("cuda" if device.type == "cuda" else "cpu", enabled=False):
            yield
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
        if device.type == "cpu":
            torch.set_flush_denormal(False)


def build_encodec(pretrained, state=None):
    """The codec package's 24 kHz model, its weights from torch hub or `state`, with its weight norm
    folded into plain weights (frozen: g * v / |v| is a constant)."""
    from encodec import EncodecModel
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the package's old-style weight norm
        model = EncodecModel.encodec_model_24khz(pretrained=pretrained)
        if state is not None:
            model.load_state_dict(state)
        for module in model.encoder.modules():
            if hasattr(module, "weight_g"):
                torch.nn.utils.remove_weight_norm(module)
    return model


# The paper's future work [4]: a Kaldi filterbank in place of the codec's frames as the MAE's
# input, the codec's codes still the targets (extras/filterbank.py, the authors' v2 models). Input
# width per kind; spec: 637-sample windows padded to a 1024-point FFT give 513 bins.
INPUT_DIMS = {"encodec": Codec.dim, "mel": 256, "spec": 513}


def input_frames(cfg, codec, wav):
    """The MAE's input frames of (B, n) audio: the codec encoder's (the paper; its codes are the
    targets either way), or a filterbank's for cfg.input mel or spec [4] -> (B, T, d_input)."""
    if cfg.input == "encodec":
        return codec.features(wav)
    from extras.filterbank import filterbank_frames  # --input mel or spec
    return filterbank_frames(wav, cfg.input)


# >>> assignment gamma
@torch.no_grad()
def estimate_gamma(codec, clips, Q=8, batch=8, lengths=None):
    """gamma_q: mean quantization error of codebook q over the clips, normalized to sum to 1 [3.1].
    The error of stage q is the norm of what it leaves unexplained, |r_q - e_q(r_q)|, r_q the
    residual entering it: errors shrink stage by stage, so early codebooks weigh more. clips (B, n)
    at 24 kHz; lengths (B,) real samples per clip (default n): frames past them are left out."""
    if lengths is None:
        lengths = torch.full((len(clips),), clips.shape[1])
    total = torch.zeros(Q)
    n_frames = 0
    for part, part_lengths in zip(clips.split(batch), lengths.split(batch)):  # 150 at once: too big
        frames = codec.raw_frames(part).transpose(1, 2)  # (b, T, 128)
        n_real = torch.ceil(part_lengths / HOP)  # (b,) num_frames of each clip's real samples
        real = torch.arange(frames.shape[1]) < n_real[:, None]  # (b, T)
        residual = frames[real.to(frames.device)]  # (n, 128), the real frames only
        for q, layer in enumerate(codec.quantizer.vq.layers[:Q]):
            book = layer._codebook
            residual = residual - book.dequantize(book.quantize(residual))  # what stage q leaves
            total[q] += residual.norm(dim=1).sum().cpu()
        n_frames += len(residual)
    errors = total / n_frames  # (Q,)
    return errors / errors.sum()
# <<< assignment gamma


# ---------------------------------------------------------------- 2. masking (M_prop, M_gap)
# >>> assignment gap_mask
def gap_mask(lengths, T, M_prop, M_gap, generator=None):
    """Hide exactly round(M_prop * length) frames of each clip, in gaps of M_gap frames [2].

    Span starts are drawn without replacement and the M_gap frames after each are hidden until
    enough are; the last span is trimmed. Whole 200-ms gaps stop the model from just interpolating
    neighbours. Padding (t >= length) is never hidden; one frame always stays visible (attention
    over none: NaN on a GPU), so padding-only clips are refused.
    lengths (B,) -> mask (B, T), True = hidden.
    Deviation: starts without replacement, as the paper says; the authors' loop may draw one twice.
    """
    mask = torch.zeros(len(lengths), T, dtype=torch.bool)
    for b, length in enumerate(lengths.tolist()):
        if length < 1:
            raise ValueError(f"clip {b} is padding only: no frame would be left for the encoder")
        n_hidden = min(round(M_prop * length), length - 1)
        row = [False] * T
        hidden = 0
        starts = torch.randperm(max(length - M_gap, 0) + 1, generator=generator).tolist()
        for start in starts:
            for t in range(start, min(start + M_gap, length)):
                if not row[t] and hidden < n_hidden:
                    row[t] = True
                    hidden += 1
            if hidden == n_hidden:
                break
        mask[b] = torch.tensor(row)
    return mask.to(lengths.device)
# <<< assignment gap_mask


# ---------------------------------------------------------------- 2.2 positions, dropping frames
# >>> assignment positions
def sinusoidal_positions(T, D, device=None):
    """The transformer's fixed sin/cos table (T, D): sin on even columns, cos on odd ones."""
    position = torch.arange(T, device=device, dtype=torch.float32)[:, None]  # (T, 1)
    freq = torch.exp(torch.arange(0, D, 2, device=device) * (-math.log(10000.0) / D))  # (D / 2,)
    angles = position * freq  # (T, D / 2)
    return torch.stack([torch.sin(angles), torch.cos(angles)], -1).flatten(1)  # (T, D)


def gather_visible(x, mask, padding, min_slots=0):
    """Drop the hidden frames: x (B, T, D) -> x_visible (B, N, D), MAE style [2.2].

    A stable sort of the hide flags lists visible frames first, in time order (ids_shuffle);
    sorting it again gives its inverse, ids_restore, which puts frames back. visible_padding
    (B, N) marks unused slots (None if there are none), N >= min_slots."""
    dropped = mask | padding  # (B, T)
    ids_shuffle = dropped.int().argsort(dim=1, stable=True)  # (B, T)
    ids_restore = ids_shuffle.argsort(dim=1)  # (B, T)
    n_visible = (~dropped).sum(1)  # (B,)
    N = max(int(n_visible.max()), min_slots)
    visible_padding = torch.arange(N, device=mask.device)[None] >= n_visible[:, None]  # (B, N)
    if not visible_padding.any():
        visible_padding = None  # a dense batch: attention without a mask takes its fastest kernels
    # Training draws the masks on the CPU (train.MaskedCrops): reading N above made no GPU wait,
    # and these index copies start without one.
    ids_keep = to_device(ids_shuffle[:, :N], x.device)  # (B, N)
    ids_restore = to_device(ids_restore, x.device)
    visible_padding = to_device(visible_padding, x.device)
    x_visible = x.gather(1, ids_keep[..., None].expand(-1, -1, x.shape[-1]))  # (B, N, D)
    return x_visible, ids_restore, visible_padding


def restore_sequence(h, ids_restore, visible_padding, mask_token):
    """Put the encoded visible frames back in place and a shared mask token everywhere else."""
    B, N, D = h.shape
    T = ids_restore.shape[1]
    if visible_padding is not None:
        h = torch.where(visible_padding[..., None], mask_token, h)  # unused slots hold tokens too
    full = torch.cat([h, mask_token.expand(B, T - N, D)], dim=1)  # (B, T, D), in shuffled order
    return full.gather(1, ids_restore[..., None].expand(-1, -1, D))  # (B, T, D), in time order
# <<< assignment positions


def key_padding(padding, device):
    """The attention's key mask on `device`, or None when no clip is padded (the fast kernels)."""
    if padding is None or not padding.any():
        return None
    return to_device(padding, device)


def to_device(t, device):
    """A copy to `device` that does not make the host wait for the GPU; None stays None. Host
    memory is pinned first: from pageable memory the CUDA driver may wait for the stream."""
    if t is not None and device.type == "cuda" and t.device.type == "cpu" and not t.is_pinned():
        t = t.pin_memory()
    return None if t is None else t.to(device, non_blocking=True)


# ---------------------------------------------------------------- 2.2 the transformer
class Block(nn.Module):
    """A pre-norm transformer layer, attention by scaled_dot_product_attention.

    Deviation: plain pre-norm (the authors use ResiDual normalization, which the paper does not
    mention). Deviation: a feed-forward block per layer (the authors' code shares one across
    depth, which Table 1's 51M / 94M / 269M rule out)."""

    def __init__(self, D, n_heads, ff_dim):
        super().__init__()
        self.n_heads = n_heads
        self.norm1 = nn.LayerNorm(D)
        self.qkv = nn.Linear(D, 3 * D)
        self.out = nn.Linear(D, D)
        self.norm2 = nn.LayerNorm(D)
        self.ff = nn.Sequential(nn.Linear(D, ff_dim), nn.GELU(), nn.Linear(ff_dim, D))

    def forward(self, x, key_padding=None):
        B, N, D = x.shape
        qkv = self.qkv(self.norm1(x)).view(B, N, 3, self.n_heads, D // self.n_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, heads, N, D / heads)
        keep = None if key_padding is None else ~key_padding[:, None, None, :]  # (B, 1, 1, N)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)  # (B, heads, N, D / heads)
        x = x + self.out(a.transpose(1, 2).reshape(B, N, D))
        return x + self.ff(self.norm2(x))


def blocks(cfg, n):
    """n transformer layers of the model's width."""
    return nn.ModuleList(Block(cfg.d_model, cfg.n_heads, cfg.ff_dim) for _ in range(n))


class Encoder(nn.Module):
    """The MAE encoder: a stack of blocks over the visible frames and a final norm."""

    def __init__(self, cfg):
        super().__init__()
        self.layers = blocks(cfg, cfg.n_enc_layers)
        self.norm = nn.LayerNorm(cfg.d_model)

    def forward(self, x, key_padding=None, n_layers=None):
        """Run the first n_layers (all by default); only the full stack ends with the norm."""
        for layer in self.layers[:n_layers]:
            x = layer(x, key_padding)
        if n_layers in (None, len(self.layers)):
            return self.norm(x)
        return x


class Decoder(nn.Module):
    """Lightweight decoder: Linear(D, D), mask tokens, positions again, 2 blocks [2.2]."""

    def __init__(self, cfg):
        super().__init__()
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        if cfg.mask_mode == "drop":  # the "token" ablation masks inside the encoder instead
            # Deviation: a learned shared mask token, as the paper says; the authors' leave zeros.
            self.mask_token = nn.Parameter(0.02 * torch.randn(1, 1, cfg.d_model))
        self.layers = blocks(cfg, cfg.n_dec_layers)
        self.norm = nn.LayerNorm(cfg.d_model)

    def forward(self, h, ids_restore, visible_padding, key_padding):
        h = self.proj(h)  # (B, N, D)
        if ids_restore is not None:  # "drop" mode: re-insert the hidden positions
            h = restore_sequence(h, ids_restore, visible_padding, self.mask_token)  # (B, T, D)
        h = h + sinusoidal_positions(h.shape[1], h.shape[2], h.device)  # where each token sits
        for layer in self.layers:
            h = layer(h, key_padding)
        return self.norm(h)


class Head(nn.Module):
    """Linear(D -> S x K): logits over the K entries of each of the S target streams [2.2]."""

    def __init__(self, D, S, K):
        super().__init__()
        self.S = S
        self.K = K
        self.linear = nn.Linear(D, S * K)

    def forward(self, h):
        return self.linear(h).unflatten(-1, (self.S, self.K))  # (B, T, S, K)


# ---------------------------------------------------------------- 2.3 the weighted loss
class LossOut(NamedTuple):
    """The loss L and the figures a student watches, per target stream."""

    loss: torch.Tensor            # () the weighted loss L
    masked_loss: torch.Tensor     # (S,) mean CE over hidden frames, per stream
    unmasked_loss: torch.Tensor   # (S,) mean CE over visible frames, per stream
    masked_acc: torch.Tensor      # (S,) top-1 accuracy over hidden frames, per stream


def stream_weights(cfg):
    """gamma_q for the Q codec streams, then sum(gamma_q) for each k-means stream [2.3]."""
    gamma = list(cfg.gamma_q) + [sum(cfg.gamma_q)] * cfg.n_kmeans_streams
    return torch.tensor(gamma, dtype=torch.float32)  # (S,)


# >>> assignment loss
def masked_token_loss(logits, targets, mask, padding, gamma, delta, counts=None):
    """L = sum_q gamma_q [alpha sum_{t in M} C + beta sum_{t not in M} C] [2.3], alpha = delta / |M|
    and beta = (1 - delta) / (T - |M|), |M| and T counted over the whole batch; padding is in
    neither set. A micro-batch (or one GPU's part) passes counts = (|M|, T - |M|) of the whole
    batch and returns its share of L and of the logged figures: the shares add up.
    logits (B, T, S, K), targets (B, T, S), mask and padding (B, T) bool, gamma (S,) -> LossOut."""
    B, T, S, K = logits.shape
    ce = F.cross_entropy(logits.reshape(-1, K).float(), targets.reshape(-1), reduction="none")
    ce = ce.view(B, T, S)  # C(y_q(t), z_q(t))
    hidden = to_device(mask & ~padding, ce.device)[..., None].float()  # (B, T, 1), the set M
    shown = to_device(~mask & ~padding, ce.device)[..., None].float()  # (B, T, 1), the rest
    if counts is None:  # this is the whole batch
        counts = (hidden.sum(), shown.sum())
    n_hidden = torch.as_tensor(counts[0], device=ce.device).float().clamp(min=1)  # |M|
    n_shown = torch.as_tensor(counts[1], device=ce.device).float().clamp(min=1)  # T - |M|
    alpha = delta / n_hidden
    beta = (1 - delta) / n_shown
    hidden_ce = (ce * hidden).sum((0, 1))  # (S,) summed over M
    shown_ce = (ce * shown).sum((0, 1))  # (S,) summed over the visible frames
    loss = (gamma * (alpha * hidden_ce + beta * shown_ce)).sum()
    with torch.no_grad():
        correct = (logits.argmax(-1) == targets).float()  # (B, T, S)
        masked_acc = (correct * hidden).sum((0, 1)) / n_hidden  # (S,)
    return LossOut(loss, hidden_ce.detach() / n_hidden, shown_ce.detach() / n_shown, masked_acc)
# <<< assignment loss


# ---------------------------------------------------------------- the model, Fig. 1
class EnCodecMAE(nn.Module):
    """The masked autoencoder of Fig. 1: input frames -> Linear(d_input, D) + positions -> drop the
    hidden frames -> encoder -> decoder with mask tokens -> head -> the weighted loss. `embed`
    is the feature extractor used after pretraining (no masking, no decoder) [3.1, 3.2]."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.in_proj = nn.Linear(cfg.d_input, cfg.d_model)  # input frames -> D
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.head = Head(cfg.d_model, cfg.n_streams, cfg.K)
        if cfg.mask_mode == "token":  # BERT-style ablation: hidden frames become a token
            self.enc_mask_token = nn.Parameter(0.02 * torch.randn(1, 1, cfg.d_model))
        self.register_buffer("gamma", stream_weights(cfg), persistent=False)
        self.apply(init_weights)

    def forward(self, feats, targets, mask, padding=None, counts=None):
        """feats (B, T, d_input), targets (B, T, S), mask and padding (B, T) -> LossOut [Fig. 1].
        feats and targets come from one codec pass (`Codec.forward`, or the cache; feats from a
        filterbank for input mel or spec); the mask from `gap_mask`. counts: (|M|, T - |M|) of
        the whole batch when this is a micro-batch [2.3]."""
        check_inputs(feats, targets, mask, padding, self.cfg)
        T = mask.shape[1]
        device = feats.device
        if padding is None:
            padding = torch.zeros_like(mask)
        x = self.in_proj(feats) + sinusoidal_positions(T, self.cfg.d_model, device)  # (B, T, D)
        if self.cfg.mask_mode == "drop":
            # N never falls below what gap_mask leaves of a full clip: one shape to compile.
            slots = T - min(round(self.cfg.M_prop * T), T - 1)
            x_visible, ids_restore, visible_padding = gather_visible(x, mask, padding, slots)
            h = self.encoder(x_visible, visible_padding)  # (B, N, D)
        else:
            hide = to_device(mask, device)[..., None]  # (B, T, 1)
            x = torch.where(hide, self.enc_mask_token, x)  # (B, T, D)
            ids_restore = None
            visible_padding = None
            h = self.encoder(x, key_padding(padding, device))  # (B, T, D)
        h = self.decoder(h, ids_restore, visible_padding, key_padding(padding, device))  # (B, T, D)
        logits = self.head(h)  # (B, T, S, K)
        return masked_token_loss(logits, targets, mask, padding, self.gamma, self.cfg.delta, counts)

    def embed(self, feats, padding=None, layer=-1):
        """Frame features (B, T, D), no masking: encoder layer `layer`'s output (-1: the last,
        after the final norm) [3.1]."""
        check_inputs(feats, None, None, padding, self.cfg)
        if layer != -1 and not 1 <= layer <= self.cfg.n_enc_layers:
            raise ValueError(f"layer={layer}: use -1 (last, normed) or 1..{self.cfg.n_enc_layers}")
        positions = sinusoidal_positions(feats.shape[1], self.cfg.d_model, feats.device)
        x = self.in_proj(feats) + positions  # (B, T, D)
        n_layers = None if layer == -1 else layer
        return self.encoder(x, key_padding(padding, x.device), n_layers)


def init_weights(module):
    """Xavier-uniform Linear weights, zero biases, LayerNorm (1, 0), as in the authors' release."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def check_inputs(feats, targets, mask, padding, cfg):
    """Refuse inputs that do not fit with a TypeError, from shapes and dtypes alone (no value is
    read: the GPU never waits). Masks must be bool: 0/1 integers would index frames instead."""
    B, T = feats.shape[:2]
    expected = [("feats", feats, (B, T, cfg.d_input), feats.dtype),
                ("mask", mask, (B, T), torch.bool),
                ("padding", padding, (B, T), torch.bool),
                ("targets", targets, (B, T, cfg.n_streams), torch.int64)]
    for name, x, shape, dtype in expected:
        if x is not None and (x.dtype != dtype or tuple(x.shape) != shape):
            raise TypeError(f"{name} {x.dtype} {tuple(x.shape)}: expected {dtype} of shape {shape}")


def add_kmeans_stream(model):
    """Self-training [2.3]: the model with one more target stream, its head rows freshly drawn."""
    new = EnCodecMAE(replace(model.cfg, n_kmeans_streams=model.cfg.n_kmeans_streams + 1))
    state = model.state_dict()
    rows = model.head.linear.out_features
    for name in ("head.linear.weight", "head.linear.bias"):  # codec rows keep what stage 1 learned
        fresh = new.state_dict()[name][rows:].to(state[name].device)
        state[name] = torch.cat([state[name], fresh])
    new.load_state_dict(state)  # strict: every other weight carries over unchanged
    return new.to(model.head.linear.weight.device)


# ---------------------------------------------------------------- 3.1-3.2 features downstream
@torch.no_grad()
def chunked_frames(fn, wav, chunk_samples=CROP_SAMPLES, max_batch=32):
    """Cut audio into 4-s chunks, map fn over them in batches, concatenate frames in time [3.1]."""
    B, n = wav.shape
    n_full = n // chunk_samples
    pieces = []
    if n_full:
        chunks = wav[:, : n_full * chunk_samples].reshape(B * n_full, chunk_samples)
        out = torch.cat([fn(c) for c in chunks.split(max_batch)])  # (B * n_full, 300, D)
        pieces.append(out.reshape(B, n_full * out.shape[1], out.shape[2]))
    if n > n_full * chunk_samples:
        pieces.append(fn(wav[:, n_full * chunk_samples:]))  # the shorter last chunk
    return torch.cat(pieces, dim=1)  # (B, num_frames(n), D)


def embed_audio(model, codec, wav, chunk_samples=CROP_SAMPLES, layer=-1):
    """EnCodecMAE frame embeddings (B, T, D) at 75 Hz for audio of any length [3.1, 3.2]."""
    def embed(chunk):
        return model.embed(input_frames(model.cfg, codec, chunk), layer=layer)
    return chunked_frames(embed, wav, chunk_samples)


def codec_embed_audio(codec, wav, chunk_samples=CROP_SAMPLES):
    """The EC baseline of Table 1: EnCodec's own encoder frames (B, T, 128)."""
    return chunked_frames(codec.features, wav, chunk_samples)
