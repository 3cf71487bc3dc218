"""Demo audio for teaching and tests (not part of the paper): synthetic and real-source clips, tasks.

`--data demo` (train.py, kmeans.py) writes and reads the synthetic pretraining set (notes, chords,
noise bursts, chirps, vowels; kind and pitch in each name); `python extras/demo_audio.py tasks --out
TASKS` writes three small synthetic tasks in the HEAR layout for `evaluate.py`; both need only numpy,
torch, soundfile and torchaudio (encodec brings it). `python extras/demo_audio.py real --out DIR`
writes pretraining audio and three harder tasks whose test instruments and voices are unseen, from
sampled GM instruments and espeak-ng voices (apt-get install fluidsynth fluid-soundfont-gm espeak-ng).
Every clip is deterministic for its seed, so the truth behind every label is known exactly.
"""
import io
import json
import os
import random
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the core files sit in the folder above
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import soundfile as sf
import torch

from data import Parser, UsageError, at_least, run_cli
from extras.demo_signals import KINDS, synth_clip
from model import SAMPLE_RATE


# ---------------------------------------------------------------- labelled demo tasks, HEAR layout
def write_task(out, name, clips, multilabel, kfold, seconds, rate=48000):
    """clips: {split: [(wav (n,) at 24 kHz, labels)]} -> a HEAR task folder with 16-bit wavs."""
    import torchaudio.functional as AF  # torchaudio comes with encodec
    path = Path(out) / name
    vocab = sorted({label for items in clips.values() for _, labels in items for label in labels})
    for split, items in clips.items():
        (path / str(rate) / split).mkdir(parents=True, exist_ok=True)
        entries = {}
        for i, (wav, labels) in enumerate(items):
            entries[f"{split}_{i:04d}.wav"] = labels
            up = AF.resample(wav, SAMPLE_RATE, rate)  # HEAR's rates exclude 24 kHz: 48 kHz by default
            sf.write(path / str(rate) / split / f"{split}_{i:04d}.wav", up.numpy(), rate, subtype="PCM_16")
        (path / f"{split}.json").write_text(json.dumps(entries, indent=1))
    (path / "labelvocabulary.csv").write_text("idx,label\n" + "".join(f"{i},{v}\n" for i, v in enumerate(vocab)))
    meta = dict(task_name=name, version="demo", embedding_type="scene", sample_duration=seconds,
                prediction_type="multilabel" if multilabel else "multiclass",
                split_mode="new_split_kfold" if kfold else "trainvaltest", splits=list(clips),
                evaluation=["mAP"] if multilabel else ["top1_acc"])
    (path / "task_metadata.json").write_text(json.dumps(meta, indent=1))
    return path


def make_demo_tasks(out, clips=120, seconds=2.0, seed=0):
    """Three synthetic tasks: sound kind (5-fold), pitch of a note (train/valid/test), mixtures
    of kinds (multilabel, mAP). Labels come from synth_clip, so the truth is known exactly."""
    rng = random.Random(seed)
    kinds = [rng.choice(KINDS) for _ in range(clips)]
    wavs = [synth_clip(k, seconds, [seed, 1, i]) for i, k in enumerate(kinds)]
    folds = {f"fold{i:02d}": [(w, [k]) for j, (w, k) in enumerate(zip(wavs, kinds)) if j % 5 == i]
             for i in range(5)}
    paths = [write_task(out, "demo-kind", folds, False, True, seconds)]
    pitches = [rng.choice(range(48, 72, 3)) for _ in range(clips)]  # 8 pitch classes, C3..A4
    notes = [(synth_clip("note", seconds, [seed, 2, i], pitch=p), [str(p)]) for i, p in enumerate(pitches)]
    tvt = lambda items: dict(train=items[: len(items) * 3 // 5], valid=items[len(items) * 3 // 5:
                             len(items) * 4 // 5], test=items[len(items) * 4 // 5:])
    paths.append(write_task(out, "demo-pitch", tvt(notes), False, False, seconds))
    mixtures = [sorted(rng.sample(KINDS, rng.randint(1, 3))) for _ in range(clips)]  # 1-3 kinds each
    mixes = [(sum(synth_clip(k, seconds, [seed, 3, i, j]) for j, k in enumerate(present)), present)
             for i, present in enumerate(mixtures)]
    mixes = [(0.5 * wav / wav.abs().max(), present) for wav, present in mixes]
    paths.append(write_task(out, "demo-mix", tvt(mixes), True, False, seconds))
    return paths


# ---------------------------------------------------------------- real sound sources (optional)
# Sampled General MIDI instruments (fluidsynth playing the FluidR3 soundfont) and synthesized
# speech (espeak-ng: about a hundred voice variants, dozens of languages). Labels are known
# exactly, as for the synthetic set, but the sounds are recorded instrument samples and many
# voices. Needs the Debian packages fluidsynth, fluid-soundfont-gm and espeak-ng.
SOUNDFONT = "/usr/share/sounds/sf2/FluidR3_GM.sf2"
APT = "apt-get install fluidsynth fluid-soundfont-gm espeak-ng"
GM_FAMILIES = ("piano", "chromatic_percussion", "organ", "guitar", "bass", "strings", "ensemble", "brass",
               "reed", "pipe", "synth_lead", "synth_pad", "synth_effects", "ethnic", "percussive",
               "sound_effects")  # General MIDI program p (0-127) belongs to family p // 8
# espeak-ng 1.51's voice variants; numbered variants of one name sound alike, so a group is one
# speaker for the splits and never spans two of them ("Mr serious" is left out: a space in its name).
VOICE_GROUPS = (
    "adam", "Alex", "Alicia", "Andrea", "Andy AnxiousAndy", "anika anikaRobot", "Annie", "announcer",
    "antonio", "aunty", "belinda", "benjamin", "boris", "caleb", "croak", "david", "Demonic", "Denis",
    "Diogo", "ed", "edward edward2", "f1", "f2", "f3", "f4", "f5", "fast", "Gene Gene2", "grandma",
    "grandpa", "gustave", "Henrique", "Hugo", "iven iven2 iven3 iven4", "Jacky", "john", "kaukovalta",
    "klatt klatt2 klatt3 klatt4 klatt5 klatt6", "Lee", "linda", "m1", "m2", "m3", "m4", "m5", "m6",
    "m7", "m8", "marcelo", "Marco", "Mario", "max", "Michael", "michel", "miguel", "Mike", "Nguyen",
    "norbert", "pablo", "paul", "pedro", "quincy", "RicishayMax RicishayMax2 RicishayMax3", "rob",
    "robert", "robosoft robosoft2 robosoft3 robosoft4 robosoft5 robosoft6 robosoft7 robosoft8",
    "sandro", "shelby", "steph steph2 steph3", "Storm", "travis", "Tweaky", "UniRobot", "victor",
    "whisper whisperf", "zac")
KEYWORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go", "zero", "one")
ENGLISHES = ("en-us", "en", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-us-nyc")  # keyword accents
LANGUAGES = ("en-us", "de", "fr", "es", "it", "pt", "nl", "pl")  # the spoken-language classes
PRETRAIN_LANGUAGES = LANGUAGES + ("sv", "fi", "cs", "hu", "tr", "id", "ro", "sw")  # Latin script
AMBIENCES = ("rain", "wind", "hum", "room")
# Pretraining file kinds, cycled: 30% music, 30% speech, 10% ambience, 30% mixtures.
CORPUS_KINDS = ("music", "speech", "music", "speech", "music", "speech", "ambience",
                "speech+music", "music+ambience", "babble+ambience")


def missing_sources():
    """What the real sound sources lack here: [] or one phrase per missing part, naming its package."""
    missing = []
    if shutil.which("fluidsynth") is None:
        missing.append("the fluidsynth program (Debian package fluidsynth)")
    if not os.path.exists(SOUNDFONT):
        missing.append(f"the soundfont {SOUNDFONT} (Debian package fluid-soundfont-gm)")
    if shutil.which("espeak-ng") is None:
        return missing + ["the espeak-ng program (Debian package espeak-ng)"]
    listed = subprocess.run(["espeak-ng", "--voices=variant"], capture_output=True, text=True).stdout
    installed = {word[3:] for word in listed.split() if word.startswith("!v/")}
    absent = [v for group in VOICE_GROUPS for v in group.split() if v not in installed]
    if absent:  # espeak-ng would fall back to its default voice without a word, merging speakers
        missing.append(f"espeak-ng voice variants {', '.join(absent[:5])} (espeak-ng 1.51 has them)")
    return missing


def require_sources():
    """Raise FileNotFoundError naming the Debian packages unless every real source is installed."""
    missing = missing_sources()
    if missing:
        raise FileNotFoundError(f"real demo sources missing: {'; '.join(missing)}; install with: {APT}")


def program_split(seed):
    """GM programs by split: in each of the 16 families a seeded 5 train, 1 valid and 2 test programs."""
    split = dict(train=[], valid=[], test=[])
    for family in range(len(GM_FAMILIES)):
        programs = (8 * family + np.random.default_rng([seed, 7, family]).permutation(8)).tolist()
        split["train"] += sorted(programs[:5])
        split["valid"] += programs[5:6]
        split["test"] += sorted(programs[6:])
    return split


def voice_split(seed):
    """espeak-ng voice variants by split: whole VOICE_GROUPS, seeded: 16 groups test, 8 valid, rest train."""
    order = np.random.default_rng([seed, 8]).permutation(len(VOICE_GROUPS))
    groups = [VOICE_GROUPS[i].split() for i in order]
    return dict(train=sum(groups[24:], []), valid=sum(groups[16:24], []), test=sum(groups[:16], []))


# ------------------------------------------------ music: MIDI written by hand, rendered by fluidsynth
def midi_bytes(events):
    """A type-0 standard MIDI file from events (ms, status, data...); one tick is one millisecond."""
    def vlq(n):  # MIDI's variable-length number: 7 bits a byte, high bit set on all but the last
        out = [n & 0x7F]
        while n > 0x7F:
            n >>= 7
            out.append(0x80 | (n & 0x7F))
        return bytes(reversed(out))
    track, now = bytearray(b"\x00\xff\x51\x03" + (1000000).to_bytes(3, "big")), 0  # 1 s a quarter
    for ms, *message in sorted(events, key=lambda e: e[0]):  # stable: same-time events keep their order
        track += vlq(ms - now) + bytes(message)
        now = ms
    track += b"\x00\xff\x2f\x00"  # end of track
    return b"MThd" + struct.pack(">IHHH", 6, 0, 1, 1000) + b"MTrk" + struct.pack(">I", len(track)) + track


def note(events, channel, pitch, start, stop, velocity):
    """Append one note (note-on at start, note-off at stop, in ms) on a MIDI channel."""
    events += [(round(start), 0x90 | channel, int(pitch), int(velocity)),
               (round(stop), 0x80 | channel, int(pitch), 0)]


def render_midi(clips, gap=1.0):
    """Render clips [(seconds, events)] in ONE fluidsynth run -> [(n,) float32 at 24 kHz, peak 0.5].

    Clips play one after another, each ended by all-sound-off and `gap` s of silence so release
    and reverb tails die out. Loading the soundfont (148 MB; only the samples a clip plays, with
    dynamic sample loading) is most of the cost, so it happens once a batch, not once a clip."""
    events, starts, t = [], [], 0
    for seconds, clip_events in clips:
        starts.append(t)
        events += [(t + ms, *message) for ms, *message in clip_events]
        end = t + round(1000 * seconds)
        events += [(end, 0xB0 | ch, cc, 0) for ch in range(16) for cc in (120, 121)]  # sound off, reset
        t = end + round(1000 * gap)
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "in.mid").write_bytes(midi_bytes(events))
        run = subprocess.run(["fluidsynth", "-ni", "-q", "-o", "synth.dynamic-sample-loading=1", "-g", "0.5",
                              "-r", str(SAMPLE_RATE), "-O", "float", "-T", "wav", "-F", f"{tmp}/out.wav",
                              SOUNDFONT, f"{tmp}/in.mid"],
                             capture_output=True, text=True)
        if run.returncode != 0:
            raise RuntimeError(f"fluidsynth failed ({run.returncode}): {run.stderr.strip()[-300:]}")
        wav = sf.read(f"{tmp}/out.wav", dtype="float32", always_2d=True)[0].mean(1)  # stereo -> mono
    wav = np.pad(wav, (0, max(0, t * SAMPLE_RATE // 1000 - len(wav))))
    return [peak_half(wav[start * SAMPLE_RATE // 1000:][: round(seconds * SAMPLE_RATE)])
            for start, (seconds, _) in zip(starts, clips)]


def peak_half(x):
    """x scaled to peak 0.5 (silence stays silence), float32, as synth_clip's clips."""
    return (0.5 * x / max(float(np.abs(x).max()), 1e-9)).astype(np.float32)


def instrument_events(program, seconds, rng):
    """One instrument-family clip: a held note, a triad or a run of 3-6 notes, MIDI pitches 36-86,
    the same pitch range for every program so that pitch does not give the family away."""
    events, end = [(0, 0xC0, program), (0, 0xB0, 7, 100)], 1000 * seconds * rng.uniform(0.6, 0.9)
    base, velocity, style = int(rng.integers(48, 80)), int(rng.integers(50, 121)), int(rng.integers(3))
    if style == 0:
        note(events, 0, base, 0, end, velocity)
    elif style == 1:
        for step in (0, int(rng.choice([3, 4])), 7):  # minor or major triad
            note(events, 0, base + step, 0, end, velocity)
    else:
        n = int(rng.integers(3, 7))
        pitches = base + np.cumsum(rng.choice([-2, -1, 1, 2, 3], n)).clip(-12, 6)
        for k, pitch in enumerate(pitches):
            note(events, 0, pitch, k * end / n, (k + 1) * end / n, velocity)
    return events


def music_events(seconds, programs, rng, drums):
    """A short piece (ms events): melody, then chords, then bass on channels 0, 1, 2 (as many as
    `programs`), a chord a bar on a major or minor scale at 70-160 bpm; drums on channel 9."""
    beat, end = 60000 / rng.uniform(70, 160), 1000 * seconds - 200
    scale = np.array([(0, 2, 4, 5, 7, 9, 11), (0, 2, 3, 5, 7, 8, 10)][int(rng.integers(2))])
    root = int(rng.integers(12))
    pitch = lambda degree: 48 + root + scale[degree % 7] + 12 * (degree // 7)  # scale degree -> MIDI
    events = [(0, 0xC0 | ch, int(p)) for ch, p in enumerate(programs)]
    events += [(0, 0xB0 | ch, 7, int(rng.integers(70, 111))) for ch in range(len(programs))]
    for bar in np.arange(0, end, 4 * beat):
        chord = int(rng.choice([0, 3, 4, 5]))  # I, IV, V, vi
        for ch, degrees in ((1, (chord, chord + 2, chord + 4)), (2, (chord - 14,))):
            for degree in degrees if ch < len(programs) else ():
                note(events, ch, pitch(degree), bar, min(bar + 4 * beat, end), rng.integers(50, 90))
    t, degree = 0.0, int(rng.integers(7, 14))
    while t < end:  # the melody: a random walk on the scale
        length = float(rng.choice([0.5, 1, 1, 2])) * beat
        note(events, 0, pitch(degree), t, min(t + length, end), rng.integers(60, 120))
        t, degree = t + length, int(np.clip(degree + rng.integers(-2, 3), 4, 18))
    for k in np.arange(0, end / (beat / 2) - 1) if drums else ():  # kick, snare, hi-hat on eighths
        for drum in ((36,) if k % 4 == 0 else (38,) if k % 4 == 2 else ()) + (42,):
            note(events, 9, drum, k * beat / 2, k * beat / 2 + 100, rng.integers(60, 110))
    return events


# ------------------------------------------------ speech (espeak-ng) and ambience (shaped noise)
def speak(text, voice, lang, pitch=50, speed=160):
    """espeak-ng saying `text` in `lang` with voice variant `voice` -> (n,) float32 at 24 kHz."""
    import torchaudio.functional as AF  # torchaudio comes with encodec
    run = subprocess.run(["espeak-ng", "-v", f"{lang}+{voice}", "-p", str(int(pitch)), "-s", str(int(speed)),
                          "--stdout", text], capture_output=True)
    if run.returncode != 0:
        raise RuntimeError(f"espeak-ng failed ({run.returncode}): {run.stderr.decode()[-300:]}")
    wav, rate = sf.read(io.BytesIO(run.stdout), dtype="float32")
    return AF.resample(torch.from_numpy(wav), rate, SAMPLE_RATE).numpy()


def trim(x, floor=0.01):
    """x without its leading and trailing near-silence (below floor times the peak)."""
    loud = np.flatnonzero(np.abs(x) > floor * np.abs(x).max())
    return x[loud[0]: loud[-1] + 1] if len(loud) else x


def pseudo_sentence(rng):
    """4-10 made-up words (consonant-vowel syllables, read by each language's rules) and numbers."""
    words = [str(rng.integers(1, 1000)) if rng.random() < 0.2 else
             "".join(rng.choice(list("bdfgklmnprstvz")) + rng.choice(list("aeiou"))
                     for _ in range(rng.integers(1, 4))) for _ in range(rng.integers(4, 11))]
    return " ".join(words) + str(rng.choice([".", ".", "?", "!"]))


def ambience(kind, n, rng):
    """A stationary background (n,) at peak 0.5: rain, wind, mains hum or room tone (shaped noise)."""
    t, freqs = np.arange(n) / SAMPLE_RATE, np.fft.rfftfreq(n, 1 / SAMPLE_RATE) + 1.0
    noise = np.fft.rfft(rng.standard_normal(n))
    if kind == "rain":  # bright hiss plus drops: sparse clicks, each a 2-ms decaying burst
        drops = (rng.random(n) < rng.uniform(20, 200) / SAMPLE_RATE) * rng.standard_normal(n)
        x = np.fft.irfft(noise * (freqs / 4000) ** 0.3, n)
        x = x + np.convolve(drops, np.exp(-np.arange(96) / 48), "same")
    elif kind == "wind":  # low-passed noise whose loudness drifts over seconds
        x = np.fft.irfft(noise / (1 + freqs / rng.uniform(150, 600)) ** 2, n)
        x *= 1.2 + np.sin(2 * np.pi * rng.uniform(0.1, 0.5) * t + rng.uniform(0, 6)) + 0.5 * np.sin(1.3 * t)
    elif kind == "hum":  # mains hum (50 or 60 Hz and its harmonics) over fan noise
        mains = rng.choice([50, 60])
        x = sum(rng.uniform(0, 1) / k * np.sin(2 * np.pi * k * mains * t + rng.uniform(0, 6))
                for k in range(1, 9))
        x = x + 0.3 * np.fft.irfft(noise / np.sqrt(freqs), n) * np.sqrt(n) / np.sqrt(np.sum(1 / freqs))
    elif kind == "room":  # pink noise with one broad resonance, like a ventilated room
        bump = np.exp(-0.5 * (np.log(freqs / rng.uniform(200, 2000)) / 0.5) ** 2)
        x = np.fft.irfft(noise / np.sqrt(freqs) * (1 + 3 * bump), n)
    else:
        raise ValueError(f"unknown ambience {kind!r}; choose from {AMBIENCES}")
    return peak_half(x)


def mix(parts_db):
    """Sum of parts [(x, level in dB)] after scaling each to unit RMS, at peak 0.5."""
    n = min(len(x) for x, _ in parts_db)
    return peak_half(sum(x[:n] / max(float(np.sqrt(np.mean(x[:n] ** 2))), 1e-9) * 10 ** (db / 20)
                         for x, db in parts_db))


# ------------------------------------------------ the pretraining corpus
def plan_corpus_file(kind, seconds, rng, programs, voices):
    """The recipe of one pretraining file: music (seconds, events) or None, and what it holds."""
    info = dict(kind=kind, seconds=round(seconds, 3))
    if "music" not in kind:
        return None, info
    info["programs"] = sorted(int(p) for p in rng.choice(programs, int(rng.integers(1, 4)), replace=False))
    drums = bool(rng.random() < 0.4)
    info["drums"] = drums
    return (seconds, music_events(seconds, info["programs"], rng, drums)), info


def speech_stream(seconds, rng, voices, info):
    """Pseudo-sentences in one voice and language with short pauses, filling `seconds` (n,)."""
    voice, lang = str(rng.choice(voices)), str(rng.choice(PRETRAIN_LANGUAGES))
    pitch, speed = rng.integers(20, 81), rng.integers(120, 201)
    info.setdefault("voices", []).append(voice)
    info.setdefault("languages", []).append(lang)
    parts, n = [], round(seconds * SAMPLE_RATE)
    while sum(map(len, parts)) < n:
        parts += [speak(pseudo_sentence(rng), voice, lang, pitch, speed),
                  np.zeros(int(rng.uniform(0.1, 0.8) * SAMPLE_RATE), np.float32)]
    return np.concatenate(parts)[:n]


def corpus_audio(kind, seconds, rng, voices, music, info):
    """The audio (n,) of one pretraining file: its parts, background ones 3-20 dB down."""
    n = round(seconds * SAMPLE_RATE)
    parts = []
    for k, part in enumerate(kind.split("+")):
        level = 0.0 if k == 0 else -rng.uniform(3, 20)
        if part == "music":
            parts.append((music, level))
        elif part == "speech":
            parts.append((speech_stream(seconds, rng, voices, info), level))
        elif part == "babble":  # a crowd: 4-6 talkers at once
            crowd = sum(speech_stream(seconds, rng, voices, info) for _ in range(rng.integers(4, 7)))
            parts.append((crowd, level))
        else:
            info["ambience"] = str(rng.choice(AMBIENCES))
            parts.append((ambience(info["ambience"], n, rng), level))
    return mix(parts)


def write_real_corpus(out_dir, hours=1.5, seed=0, seconds=(6.0, 20.0), batch=24):
    """Write pretraining audio from the real sources: 16-bit wavs of 6-20 s cycling through
    CORPUS_KINDS (music from the TRAIN programs of program_split(seed), speech in 16 languages by
    the TRAIN voices of voice_split(seed), ambience, mixtures), so the tasks' valid and test
    instruments and voices are never heard in pretraining. Files are written until `hours` of
    audio; corpus.json lists each file's kind, programs, voices and languages. -> paths."""
    require_sources()
    programs, voices = program_split(seed)["train"], voice_split(seed)["train"]
    os.makedirs(out_dir, exist_ok=True)
    plans, total = [], 0.0
    while total < 3600 * hours:  # file i depends on (seed, i) and on the music batch it renders in
        i = len(plans)
        rng = np.random.default_rng([seed, i, 3])
        kind, seconds_i = CORPUS_KINDS[i % len(CORPUS_KINDS)], rng.uniform(*seconds)
        plans.append((kind, seconds_i, rng, *plan_corpus_file(kind, seconds_i, rng, programs, voices)))
        total += seconds_i
    manifest, paths = {}, []
    for first in range(0, len(plans), batch):
        chunk = plans[first: first + batch]
        rendered = iter(render_midi([music for *_, music, _ in chunk if music is not None]))
        for i, (kind, seconds_i, rng, music, info) in enumerate(chunk, first):
            wav = corpus_audio(kind, seconds_i, rng, voices, None if music is None else next(rendered), info)
            name = f"r{seed}_{i:04d}_{kind.replace('+', '-')}_{round(seconds_i * 1000)}ms.wav"
            sf.write(os.path.join(out_dir, name + ".tmp"), wav, SAMPLE_RATE, subtype="PCM_16", format="WAV")
            os.replace(os.path.join(out_dir, name + ".tmp"), os.path.join(out_dir, name))
            manifest[name] = info
            paths.append(os.path.join(out_dir, name))
    Path(out_dir, "corpus.json").write_text(json.dumps(manifest, indent=1))
    return paths


# ------------------------------------------------ labelled tasks from the real sources, HEAR layout
def place(x, n, rng):
    """x at a random offset in n samples of silence (a random n-sample stretch if x is longer)."""
    out, start = np.zeros(n, np.float32), int(rng.integers(0, abs(n - len(x)) + 1))
    if len(x) <= n:
        out[start: start + len(x)] = x
        return out
    return x[start: start + n]


def instrument_clips(split, programs, n, seconds, seed):
    """n instrument-family clips of one split, programs in turn: [(wav, [family])], [program]."""
    chosen = [programs[i % len(programs)] for i in range(n)]
    clips = [(seconds, instrument_events(p, seconds, np.random.default_rng([seed, 20, split, i])))
             for i, p in enumerate(chosen)]
    wavs = sum((render_midi(clips[k: k + 64]) for k in range(0, n, 64)), [])
    return [(torch.from_numpy(w), [GM_FAMILIES[p // 8]]) for w, p in zip(wavs, chosen)], chosen


def spoken_clip(text, voice, lang, seconds, rng):
    """espeak-ng saying text (random pitch and speed) at a random offset over ambience 5-30 dB down."""
    speech = trim(speak(text, voice, lang, rng.integers(20, 81), rng.integers(120, 201)))
    n = round(seconds * SAMPLE_RATE)
    background = ambience(str(rng.choice(AMBIENCES)), n, rng)
    return torch.from_numpy(mix([(place(speech, n, rng), 0.0), (background, -rng.uniform(5, 30))]))


def keyword_clips(split, voices, n, seconds, seed):
    """n keyword clips of one split: KEYWORDS[i % 12] said by voice (i // 12) % len(voices) in
    one of six English accents: [(wav, [keyword])], [voice]."""
    clips, chosen = [], []
    for i in range(n):
        rng, voice = np.random.default_rng([seed, 21, split, i]), voices[(i // len(KEYWORDS)) % len(voices)]
        word = KEYWORDS[i % len(KEYWORDS)]
        clips.append((spoken_clip(word, voice, str(rng.choice(ENGLISHES)), seconds, rng), [word]))
        chosen.append(voice)
    return clips, chosen


def language_clips(split, voices, n, seconds, seed):
    """n spoken-language clips of one split: three numbers (1-9999, said as words) in
    LANGUAGES[i % 8] by voice (i // 8) % len(voices): [(wav, [language])], [voice]."""
    clips, chosen = [], []
    for i in range(n):
        rng, voice = np.random.default_rng([seed, 22, split, i]), voices[(i // len(LANGUAGES)) % len(voices)]
        lang, text = LANGUAGES[i % len(LANGUAGES)], " ".join(str(rng.integers(1, 10000)) for _ in range(3))
        clips.append((spoken_clip(text, voice, lang, seconds, rng), [lang]))
        chosen.append(voice)
    return clips, chosen


def make_real_tasks(out, seed=0, clips=(720, 240, 480), seconds=(2.0, 1.5, 3.0)):
    """Three tasks from the real sources (HEAR layout, train/valid/test with `clips` clips each):

    instrument-family: 16 GM families, clips of programs in turn; the programs are split by
        program_split(seed) (per family 5 train, 1 valid, 2 test), so test instruments are unseen;
    spoken-keyword: 12 KEYWORDS, every voice says every word in turn;
    spoken-language: 8 LANGUAGES saying three numbers, every voice speaks every language;
        both spoken tasks split voices by voice_split(seed), so test voices are unseen.
    Pretraining (write_real_corpus with the same seed) uses only train programs and voices.
    Clip lengths are `seconds` per task; sources.json maps {split: {file: program or voice}}."""
    require_sources()
    programs, voices = program_split(seed), voice_split(seed)
    makers = (("instrument-family", instrument_clips, programs), ("spoken-keyword", keyword_clips, voices),
              ("spoken-language", language_clips, voices))
    paths = []
    for (name, maker, by_split), secs in zip(makers, seconds):
        items, sources = {}, {}
        for s, (split, n) in enumerate(zip(("train", "valid", "test"), clips)):
            items[split], chosen = maker(s, by_split[split], n, secs, seed)
            sources[split] = {f"{split}_{i:04d}.wav": c for i, c in enumerate(chosen)}  # write_task's names
        paths.append(write_task(out, name, items, False, False, secs))
        (paths[-1] / "sources.json").write_text(json.dumps(sources, indent=1))
    return paths


def build_real_demo(out, hours=1.5, clips=(720, 240, 480), seed=0):
    """`python extras/demo_audio.py real`: OUT/corpus (pretraining audio) and OUT/tasks, with timings."""
    start = time.time()
    if hours > 0:
        paths = write_real_corpus(Path(out) / "corpus", hours, seed)
        print(f"wrote {len(paths)} pretraining files ({hours} h) to {Path(out) / 'corpus'} "
              f"in {time.time() - start:.0f} s")
    start = time.time()
    for path in make_real_tasks(Path(out) / "tasks", seed, clips):
        print(f"wrote {path}")
    print(f"tasks ({' + '.join(map(str, clips))} clips each) in {time.time() - start:.0f} s")


def main(argv=None):
    parser = Parser(prog="extras/demo_audio.py", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    tasks = sub.add_parser("tasks", help="three labelled synthetic tasks in the HEAR layout")
    tasks.add_argument("--out", required=True, help="folder of the task folders")
    tasks.add_argument("--clips", type=at_least(5), default=120, help="clips per task")
    tasks.add_argument("--seconds", type=at_least(0.05, float), default=2.0, help="length of each clip")
    tasks.add_argument("--seed", type=at_least(0), default=0, help="the clips and their labels")
    real = sub.add_parser("real", help="pretraining audio and three tasks from sampled instruments and "
                          "espeak-ng voices (needs fluidsynth, fluid-soundfont-gm, espeak-ng)")
    real.add_argument("--out", required=True, help="writes OUT/corpus and OUT/tasks")
    real.add_argument("--hours", type=at_least(0.0, float), default=1.5, help="pretraining audio (0: tasks only)")
    real.add_argument("--clips", type=at_least(1), nargs=3, default=[720, 240, 480],
                      metavar=("TRAIN", "VALID", "TEST"), help="clips per split of each task")
    real.add_argument("--seed", type=at_least(0), default=0, help="the sounds and the program and voice splits")
    args = parser.parse_args(argv)
    if args.command == "tasks":
        for path in make_demo_tasks(args.out, args.clips, args.seconds, args.seed):
            print(f"wrote {path}")
        return
    if missing_sources():
        raise UsageError(f"the real demo needs {'; '.join(missing_sources())}; install with: {APT}")
    build_real_demo(args.out, args.hours, args.clips, args.seed)


if __name__ == "__main__":
    run_cli(main)
