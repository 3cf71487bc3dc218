"""`--input mel|spec`: Kaldi filterbank frames as the MAE's input, the paper's future work (section 4).

"Analyze the effect of the input and target representations": the authors' v2 models do it
(mel256-ec-*, spec-ec-base), feeding the MAE a Kaldi filterbank in place of the codec's frames and
keeping the codec's 8 RVQ codes as targets. model.input_frames enters here for cfg.input mel or spec;
ModelConfig.input and model.INPUT_DIMS (the widths) stay in model.py.
"""
import math

import torch
import torch.nn.functional as F

SAMPLE_RATE = 24000  # model.SAMPLE_RATE and HOP: model.py imports this file, so not the reverse
HOP = 320
# Their configs/features/mel.gin: 26.56-ms Hanning windows (637 samples) every 13.28 ms, which
# Kaldi's int() makes 318 samples (75.47 Hz, not 75); no energy term (so htk_compat, which only
# moves it, changes nothing), no dither.
MEL_KALDI = dict(sample_frequency=SAMPLE_RATE, frame_length=26.56, frame_shift=13.28,
                 window_type="hanning", dither=0.0, htk_compat=True, use_energy=False,
                 num_mel_bins=256, low_freq=20.0, high_freq=0.0)  # 20 Hz to Nyquist
# Deviation: their configs/features/spec.gin is empty, so spec takes mel.gin's framing, and
# its (mean, std) were measured on the realistic demo corpus (.ci/frontend_stats.py), where the
# mel statistics come out at (-6.02, 4.89), theirs being (-6.12, 4.82).
SPEC_KALDI = dict(sample_frequency=SAMPLE_RATE, frame_length=26.56, frame_shift=13.28,
                  window_type="hanning", dither=0.0)
NORM_STATS = {"mel": (-6.12, 4.82), "spec": (-6.91, 4.95)}  # (mean, std): x -> (x - mean) / std


@torch.no_grad()
def filterbank_frames(wav, kind):
    """The MAE's input for kind "mel" or "spec" [4]: (B, n) at 24 kHz -> (B, num_frames(n), bins),
    each clip's Kaldi features normalized as the authors' v2 Mel/SpectrogramProcessor does.
    Deviation: T = num_frames(n), so every input frame has its 8 codec targets: the tail is
    zero-padded until Kaldi yields T frames (as the codec pads its last hop) and later frames are
    dropped; theirs keep Kaldi's 1 + (n - 637) // 318 and crop the longer side's end in the loss."""
    from torchaudio.compliance import kaldi
    if kind == "mel":
        fn = kaldi.fbank
        args = MEL_KALDI
    else:
        fn = kaldi.spectrogram
        args = SPEC_KALDI
    T = math.ceil(wav.shape[1] / HOP)  # model.num_frames: the codec's frames of the same audio
    window = int(SAMPLE_RATE * args["frame_length"] * 0.001)  # 637, Kaldi's arithmetic
    shift = int(SAMPLE_RATE * args["frame_shift"] * 0.001)  # 318: frame t starts at 318 t
    missing = max(0, window + shift * max(T - 1, 0) - wav.shape[1])
    wav = F.pad(wav.float(), (0, missing))
    with torch.autocast(wav.device.type, enabled=False):  # fp32: fp16 mel energies would round
        feats = torch.stack([fn(w[None], **args)[:T] for w in wav])  # (B, T, bins)
    mean, std = NORM_STATS[kind]
    return (feats - mean) / std
