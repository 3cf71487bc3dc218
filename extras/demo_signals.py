"""The synthetic demo audio (`--data demo`, and the random codec's calibration clips): not the paper.

Seeded notes, chords, noise bursts, chirps and vowels at 24 kHz, kind and pitch in each file's
name; needs only numpy, torch and soundfile. extras/demo_audio.py writes labelled tasks from them
and from real sources. Imported by data.py (`--data demo`), so it imports nothing but model.py.
"""
import os

import numpy as np
import soundfile as sf
import torch

from model import SAMPLE_RATE


# ---------------------------------------------------------------- synthetic demo audio
KINDS = ("note", "chord", "noise_burst", "chirp", "formant")
VOWELS = ((730, 1090, 2440), (270, 2290, 3010), (300, 870, 2240), (530, 1840, 2480), (570, 840, 2410))


def envelope(n, rng):
    """An ADSR envelope (n,) for one event: attack, decay to a sustain level, release."""
    dur = n / SAMPLE_RATE
    on = rng.uniform(0, 0.1) * dur
    length = rng.uniform(0.7, 1.0) * (dur - on)
    a, d, r = length * rng.uniform([0.01, 0.05, 0.1], [0.1, 0.3, 0.4])  # attack, decay, release
    knots = on + np.array([0, a, a + d, max(a + d, length - r), length])
    s = rng.uniform(0.3, 0.9)
    return np.interp(np.arange(n) / SAMPLE_RATE, knots, [0, 1, s, s, 0], left=0, right=0)


def harmonic(f0, n, rng, amps=None):
    """A harmonic tone (n,) with slight vibrato: partials k * f0 below 11 kHz, amplitudes k**-tilt."""
    k = np.arange(1, max(2, int(11000 / f0)))[:, None]  # (H, 1)
    amps = k ** -rng.uniform(0.8, 2.0) if amps is None else amps(k * f0) / k
    # One period in a wavetable, read at the tone's phase: cost O(n) whatever the number of partials.
    spectrum = np.zeros(2049, complex)
    spectrum[k[:, 0]] = -2048j * amps[:, 0] * np.exp(2j * np.pi * rng.uniform(size=len(k)))
    table = np.fft.irfft(spectrum, 4096)  # sum_k amps_k sin(2 pi k j / 4096 + phase_k)
    grid, table = np.arange(4097) / 4096, np.append(table, table[0])  # (4097,) closed period
    t, rate = np.arange(n) / SAMPLE_RATE, rng.uniform(4, 7)
    cycles = f0 * (t + 0.003 * (1 - np.cos(2 * np.pi * rate * t)) / (2 * np.pi * rate))  # (n,)
    return np.interp(cycles % 1.0, grid, table)


def synth_clip(kind, seconds, seed, pitch=None):
    """One deterministic synthetic clip (n,) at 24 kHz, peak 0.5; `kind` (and `pitch`) is its label."""
    rng = np.random.default_rng(seed)
    n = round(seconds * SAMPLE_RATE)
    f0 = 440.0 * 2 ** (((rng.integers(40, 85) if pitch is None else pitch) - 69) / 12)  # MIDI -> Hz
    t = np.arange(n) / SAMPLE_RATE
    if kind == "note":
        x = harmonic(f0, n, rng) * envelope(n, rng)
    elif kind == "chord":
        third = rng.choice([3, 4])  # minor or major triad, plus the octave
        x = sum(harmonic(f0 * 2 ** (s / 12), n, rng) for s in (0, third, 7, 12)) * envelope(n, rng)
    elif kind == "noise_burst":  # band-passed noise around 4 f0 with sharp attacks and decays
        spec = np.fft.rfft(rng.standard_normal(n))
        freqs = np.fft.rfftfreq(n, 1 / SAMPLE_RATE) + 1.0
        band = np.exp(-0.5 * (np.log(freqs / (4 * f0)) / rng.uniform(0.2, 1.0)) ** 2)  # (n // 2 + 1,)
        x = np.fft.irfft(spec * band, n)
        onsets = np.sort(rng.uniform(0, seconds * 0.8, rng.integers(1, 5)))[:, None]  # (bursts, 1)
        x = x * (np.exp(-(t - onsets) / rng.uniform(0.05, 0.5)) * (t >= onsets)).sum(0)
    elif kind == "chirp":  # a glide over +-1..3 octaves with two harmonics
        octaves = rng.uniform(1, 3) * rng.choice([-1, 1])
        cycles = np.cumsum(f0 * 2 ** (octaves * t / seconds)) / SAMPLE_RATE
        x = (np.sin(2 * np.pi * cycles) + 0.3 * np.sin(4 * np.pi * cycles)) * envelope(n, rng)
    elif kind == "formant":  # a vowel: a glottal pulse train shaped by three formant resonances
        formants = np.array(VOWELS[rng.integers(len(VOWELS))])[:, None, None]  # (3, 1, 1)
        x = harmonic(f0 / 2, n, rng, amps=lambda f: (1 / (1 + ((f - formants) / 80.0) ** 2)).sum(0))
        x = x * envelope(n, rng)
    else:
        raise ValueError(f"unknown synthetic kind {kind!r}; choose from {KINDS}")
    x = x + 1e-3 * np.abs(x).max() * rng.standard_normal(n)  # a faint noise floor, as in recordings
    return torch.from_numpy(0.5 * x / max(np.abs(x).max(), 1e-9)).float()  # (n,)


def demo_clips(n, seconds=4.0, seed=0):
    """n varied synthetic clips (n, samples), cycling through KINDS with random pitches."""
    return torch.stack([synth_clip(KINDS[i % len(KINDS)], seconds, [seed, i]) for i in range(n)])


def write_demo_dataset(out_dir, n_files=64, seed=0, seconds=(1.5, 12.0)):
    """Write the demo set as 16-bit wavs of varied lengths (kind and pitch in the name) -> paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for i in range(n_files):  # file i depends on (seed, i) only, so a bigger set extends a smaller one
        kind, rng = KINDS[i % len(KINDS)], np.random.default_rng([seed, i, 1])
        seconds_i, pitch = rng.uniform(*seconds), int(rng.integers(40, 85))
        name = f"s{seed}_{i:04d}_{kind}_p{pitch}_{round(seconds_i * 1000)}ms.wav"
        path = os.path.join(out_dir, name)
        if not os.path.exists(path):  # deterministic, so a finished file is already right
            wav = synth_clip(kind, seconds_i, [seed, i], pitch=pitch).numpy()
            sf.write(f"{path}.tmp{os.getpid()}", wav, SAMPLE_RATE, subtype="PCM_16", format="WAV")
            os.replace(f"{path}.tmp{os.getpid()}", path)  # two DDP ranks may write the same file
        paths.append(path)
    return paths
