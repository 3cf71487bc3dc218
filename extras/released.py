"""Serves the authors' RELEASED EnCodecMAE checkpoints (v1 and v2) with torch/encodec/torchaudio only.

`load_released("mel256-ec-base.pt").frames(wav24k[None])` -> (1, T, D) frames at 75 Hz, equal to
what the authors' `extract_features_from_array` returns for that clip (docs/RELEASED.md). Their
network is not the paper's (ResiDual norms, one feed-forward block shared by every layer, their own
head layout), so it lives here, with their key layout, and model.py stays the paper's.
Reads a v1 `model.pt` (+ the `config.gin` beside it) or a v2 `<name>.pt`; writes nothing.
`python extras/released.py info PATH` prints what a file holds (--help: its options).
"""
import ast
import io
import math
import os
import re
import sys
import tokenize
import warnings
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

SAMPLE_RATE = 24000  # every released model reads 24 kHz audio
FRAME_RATE = 75  # their HEAR wrapper's `embedding_rate`: 75 frames per second


# ---------------------------------------------------------------- the gin text inside their files
class Ref(str):
    """A gin reference such as @encoder/encodecmae.models.transformers.MultiHeadAttention."""

    scope = property(lambda self: self.split("/")[0] if "/" in self else "")


class Macro(str):
    """A gin macro such as %MODEL_DIM: looked up when a value that holds it is read."""


class GinError(ValueError):
    """A statement gin's own parser refuses too (their loader stops there)."""


SKIPPED = (tokenize.COMMENT, tokenize.NL)  # what gin skips between tokens (NL: inside brackets)
CLOSING = {"[": "]", "(": ")", "{": "}"}
NAMED = {tokenize.ENDMARKER: "the end of the text", tokenize.NEWLINE: "the end of the line",
         tokenize.NL: "the end of the line", tokenize.INDENT: "an indent",
         tokenize.DEDENT: "a dedent"}


class GinParser:
    """Gin's grammar on Python's tokens, read as gin reads a file: statements `KEY = VALUE`,
    blocks `SELECTOR:` of indented `param = VALUE` lines, imports. Values: Python literals,
    @references, %macros, and lists, tuples and dicts of them. Else a GinError naming the line."""

    def __init__(self, text):
        self.tokens = tokenize.generate_tokens(io.StringIO(text).readline)  # lazily, as gin
        self.lines = text.splitlines()
        self.tok = None
        self.advance()

    def is_op(self, strings):
        return self.tok.type == tokenize.OP and self.tok.string in strings

    def fail(self, what):
        """A GinError at the current token: its line and text, and a hint at the text's end."""
        row = min(self.tok.start[0], len(self.lines))
        line = self.lines[row - 1].strip()[:60] if row else ""
        # the end of the text, or of a last line without its newline: a file cut short?
        ends = self.tok.type == tokenize.ENDMARKER or (
            self.tok.type == tokenize.NEWLINE and not self.tok.string)
        cut = " (the text ends there: cut short?)" if ends else ""
        raise GinError(f"line {row}: {what}" + (f" in {line!r}" if line else "") + cut)

    def found(self):
        """The current token as a message names it."""
        return NAMED.get(self.tok.type, repr(self.tok.string))

    def advance(self, skip=()):
        """Move to the next token, past those of the types in `skip`."""
        try:
            self.tok = next(self.tokens)
            while self.tok.type in skip:
                self.tok = next(self.tokens)
        except tokenize.TokenError as err:  # a bracket or triple-quoted string open at the end
            raise GinError(f"line {err.args[1][0]}: {err.args[0]}") from None
        except SyntaxError as err:  # IndentationError: dedented to no level above
            raise GinError(f"line {err.lineno}: {err.msg}") from None

    def expect(self, string, skip=()):
        if self.tok.string != string:
            self.fail(f"expected {string!r}, found {self.found()}")
        self.advance(skip)

    def selector(self, periods_in_scope):
        """NAME(/NAME)*(.NAME)* without spaces -> its text; a reference's scope may hold periods."""
        if self.tok.type != tokenize.NAME:
            self.fail(f"expected a name, found {self.found()}")
        text, end = self.tok.string, self.tok.end
        self.advance()
        while self.is_op("./") and self.tok.start == end:
            sep, end = self.tok.string, self.tok.end
            self.advance()
            if self.tok.type != tokenize.NAME or self.tok.start != end:
                self.fail(f"a name broken after {text + sep!r}")
            text += sep + self.tok.string
            end = self.tok.end
            self.advance()
        if not periods_in_scope and "." in text.rpartition("/")[0]:
            self.fail(f"a period in the scope of {text!r}")
        return text

    def value(self):
        """One value -> Python, Ref or Macro (inside lists, tuples, dicts); then the next token."""
        if self.is_op(CLOSING):
            return self.container()
        if self.is_op("@%"):
            return self.reference()
        return self.literal()

    def container(self):
        """[...], (...) or {...}: (x) without a comma is x, as in gin."""
        opening = self.tok.string
        self.advance(SKIPPED)
        items, comma = [], False
        while not self.is_op(CLOSING[opening]):
            if self.tok.type == tokenize.ENDMARKER:
                self.fail(f"{opening!r} never closed")
            item = self.value()
            if opening == "{":
                self.expect(":", SKIPPED)
                item = (item, self.value())
            items.append(item)
            if self.is_op(","):
                comma = True
                self.advance(SKIPPED)
            elif not self.is_op(CLOSING[opening]):
                self.fail(f"expected ',' or {CLOSING[opening]!r}, found {self.found()}")
        self.advance(SKIPPED)
        if opening == "[":
            return items
        if opening == "(":
            return items[0] if len(items) == 1 and not comma else tuple(items)
        try:
            return dict(items)
        except TypeError:  # a list as a key
            self.fail("a dict key that is not hashable")

    def reference(self):
        """@scope/name or @name() (a call: the same reference here), or %MACRO."""
        sign = self.tok.string
        self.advance()
        name = self.selector(periods_in_scope=True)
        if sign == "@" and self.is_op("("):
            self.advance()
            self.expect(")")
        while self.tok.type in SKIPPED:
            self.advance()
        return Ref(name) if sign == "@" else Macro(name)

    def literal(self):
        """A number (a leading minus allowed), a string (adjacent ones join), True, False, None."""
        text = ""
        if self.is_op("-"):
            text = "-"
            self.advance(SKIPPED)
            if self.is_op("@%"):  # gin drops a minus before a reference or a macro: so do we
                return self.reference()
        if self.tok.type not in (tokenize.NAME, tokenize.NUMBER, tokenize.STRING):
            self.fail(f"expected a value, found {self.found()}")
        while True:
            text += self.tok.string
            was_string = self.tok.type == tokenize.STRING
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                self.fail(f"{text!r} is not a value gin reads")
            self.advance(SKIPPED)
            if not (was_string and self.tok.type == tokenize.STRING):
                return value

    def block(self, key):
        """After `key:`, its indented `param = value` lines -> [(key.param, value)]."""
        self.advance((tokenize.COMMENT,))
        if self.tok.type != tokenize.NEWLINE:
            self.fail(f"expected the end of the line after {key}:")
        self.advance(SKIPPED)
        if self.tok.type != tokenize.INDENT:
            self.fail(f"the block {key}: has no indented lines")
        self.advance(SKIPPED)
        found = []
        while self.tok.type not in (tokenize.DEDENT, tokenize.ENDMARKER):
            if self.tok.type != tokenize.NAME:
                self.fail(f"expected a parameter name in the block {key}:, found {self.found()}")
            param = self.tok.string
            self.advance()
            self.expect("=")
            found.append((f"{key}.{param}", self.value()))
            if self.tok.type not in (tokenize.NEWLINE, tokenize.ENDMARKER):
                self.fail("expected the end of the line")
            self.advance(SKIPPED)
        return found

    def statement(self):
        """One statement (the current token starts it) -> [(key, value)]; imports give []."""
        key = self.selector(periods_in_scope=False)
        if self.tok.string == "=":
            self.advance()
            found = [(key, self.value())]
        elif self.tok.string == ":":
            found = self.block(key)
        elif key in ("import", "from"):  # gin imports a module; their 'imports' list does it
            while self.tok.type not in (tokenize.NEWLINE, tokenize.ENDMARKER):
                self.advance()
            found = []
        elif key == "include":
            self.fail("includes another file, which a released checkpoint cannot carry")
        else:
            self.fail(f"expected '=' or ':' after {key!r}")
        if self.tok.type not in (tokenize.NEWLINE, tokenize.DEDENT, tokenize.ENDMARKER):
            self.fail("expected the end of the line")
        if self.tok.type != tokenize.ENDMARKER:
            self.advance()
        return found

    def statements(self):
        """-> (macros {name: value}, bindings [(scope, configurable, param, value)]), file order."""
        macros, bindings = {}, []
        while True:
            while self.tok.type in SKIPPED + (tokenize.INDENT, tokenize.DEDENT):
                self.advance()
            if self.tok.type == tokenize.ENDMARKER:
                return macros, bindings
            for key, value in self.statement():
                scope, _, path = key.rpartition("/")
                if "." not in path:  # MODEL_DIM = 36: a macro
                    macros[key] = value
                    continue
                configurable, _, param = path.rpartition(".")
                bindings.append((scope, configurable, param, value))


def parse_gin(text):
    """Their config text (gin.config_str() or the authors' block syntax) -> (macros, bindings).

    bindings: (scope, configurable, param, value) in file order; a later binding wins, as in gin.
    As strict as gin's parser (a line it refuses is a GinError; their loader stops there too).
    What gin would import or find in its registry is not checked here; check_entry() checks the
    classes their load_model builds.
    """
    return GinParser(text).statements()


def resolve(value, macros, seen=()):
    """A parsed value with its %macros replaced by what they hold (KeyError: undefined macro)."""
    if isinstance(value, Macro):
        if value in seen:
            raise GinError(f"macro %{value} refers to itself")
        return resolve(macros[value], macros, seen + (value,))
    if isinstance(value, (list, tuple)):
        return type(value)(resolve(v, macros, seen) for v in value)
    if isinstance(value, dict):
        return {resolve(k, macros, seen): resolve(v, macros, seen) for k, v in value.items()}
    return value


class GinConfig:
    """Looks up what gin would pass to one parameter of one configurable in a scope."""

    def __init__(self, text, where):
        self.where = where  # the file (and the part of it) the text came from, for messages
        try:
            self.macros, self.bindings = parse_gin(text)
        except GinError as err:
            raise ValueError(f"{where}, {err}: gin refuses it too (their loader stops there); "
                             "the config is damaged: download the file again") from None

    def get(self, name, param, scopes=(), *, default=None):
        """`name` is 'Class' or 'module.Class'; a binding in one of `scopes` beats an unscoped one."""
        found = {}
        for scope, conf, p, value in self.bindings:
            a, b = "." + conf, "." + name
            if p != param or not (a.endswith(b) or b.endswith(a)) or (scope and scope not in scopes):
                continue
            try:
                found[1 if scope else 0] = resolve(value, self.macros)
            except KeyError as err:
                raise ValueError(f"{self.where}: {conf}.{param} uses the macro %{err.args[0]}, "
                                 "which it never defines (cut short?): their loader fails on it "
                                 "too; download the file again") from None
            except GinError as err:
                raise ValueError(f"{self.where}: {conf}.{param}: {err}") from None
        return found.get(1, found.get(0, default))


# ---------------------------------------------------------------- what a file holds
class Arch(NamedTuple):
    """Everything the network and its front end need, read from the gin text and tensor shapes."""

    version: str  # "v1" (tag v.1.0.0, the paper's models) or "v2" (HEAD, encodecmae/hub.py)
    front: str  # "encodec" (codec frames), "mel" (Kaldi fbank) or "spec" (Kaldi spectrogram)
    d_model: int  # D
    n_layers: int  # encoder transformer layers
    n_heads: int  # 12 in every release, even at D = 1024 (85-d heads, 1020-d projections)
    d_qk: int  # per-head query/key width
    d_v: int  # per-head value width
    ff_dim: int  # the ONE feed-forward block's hidden width
    feat_dim: int  # front-end width: 128 codec dims or the number of filterbank bins
    chunk: int  # samples per chunk: their extractor embeds each 4-s piece alone
    hop: int  # samples per frame in their padding-mask arithmetic (320)
    min_len: int  # v2 skips chunks of at most this many samples (2048); v1 keeps all (0)
    front_kwargs: dict  # torchaudio.compliance.kaldi arguments (mel, spec)
    norm_stats: tuple  # (mean, std) for the filterbank
    codec_scale: float  # their EncodecEncoder.scale
    att_scale: float  # their attention's logit scale (d_qk ** -0.5 unless the config says otherwise)
    mask_value: float  # added to padded keys' logits (-1e9, not -inf)


V1_TO_V2 = (("wav_encoder.model.", "wav_encoder.encoder.model."), ("feat_projector.", "wav_encoder.post_net."),
            ("positional_encoder.scale", "masker.positional_encoder.scale"))
MEL_ARGS = ("frame_length", "frame_shift", "high_freq", "htk_compat", "low_freq", "num_mel_bins",
            "sample_frequency", "window_type", "use_energy")  # what their MelspectrogramProcessor passes
SPEC_ARGS = ("frame_length", "frame_shift", "sample_frequency", "window_type", "dither")
MEL_DEFAULTS = dict(frame_length=25, frame_shift=10, high_freq=0, htk_compat=False, low_freq=20, num_mel_bins=23,
                    sample_frequency=16000, window_type="povey", use_energy=False, dither=0.0)


def v1_to_v2(sd):
    """The authors' own v1 -> v2 key map (mrpep/encodecmae-to-wav, helpers.py), for the keys we read."""
    out = {}
    for k, v in sd.items():
        for old, new in V1_TO_V2:
            if k.startswith(old):
                k = new + k[len(old):]
                break
        out[k] = v
    return out


def read_checkpoint(path):
    """A released file -> (version, state_dict in v2 keys, gin text, the whole dict); ValueError otherwise."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    try:
        with warnings.catch_warnings():  # bytes that start like a pickle: torch warns, then fails
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # random bytes, a truncated download, a pickle of arbitrary objects
        raise ValueError(f"{path}: {unreadable(path, err)}") from None
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path}: holds a {type(ckpt).__name__}, not the authors' checkpoint dict")
    if {"model", "config", "encodec"} <= ckpt.keys():
        raise ValueError(f"{path}: one of this project's train.py checkpoints (keys model/config/encodec), "
                         "not a released model: load it as --upstream PATH")
    sd = ckpt.get("state_dict")
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: a dict with keys {sorted(map(str, ckpt))[:5]}, no 'state_dict': "
                         "not a released model")
    if "feat_projector.weight" in sd:
        return "v1", v1_to_v2(sd), None, ckpt  # v1 keeps its config.gin beside model.pt
    if "wav_encoder.post_net.weight" not in sd:
        raise ValueError(f"{path}: its state_dict has neither feat_projector (v1) nor "
                         f"wav_encoder.post_net (v2) (first key {next(iter(sd), None)!r}): "
                         "not a released EnCodecMAE")
    for key, what in (("config", "the gin text their loader parses"),
                      ("imports", "the module list their loader reads first")):
        if key not in ckpt:  # their load_model fails too (KeyError)
            raise ValueError(f"{path}: a v2 state_dict without {key!r} ({what}; their load_model "
                             "fails on it too): download the file again")
        if not isinstance(ckpt[key], str):
            raise ValueError(f"{path}: its {key!r} is {type(ckpt[key]).__name__}, not the text "
                             "(str) their loader reads: download the file again")
    return "v2", sd, ckpt["config"], ckpt


def unreadable(path, err):
    """What torch.load's failure on a file means, in one line (torch's own text is pages long)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:  # permission denied, a disk error
        return f"cannot be read ({e.strerror or e})"
    if size == 0:
        return "an empty file (0 bytes): download it again"
    found = re.search(r"GLOBAL ([\w.]+)", str(err))
    if found:  # weights_only refuses a pickled object: loading it would run its code
        return (f"it pickles {found.group(1)} besides tensors, which is refused unread (loading "
                "it would run code): use the authors' original file")
    if head.startswith(b"PK\x03\x04"):  # torch.save's zip archive, cut short or damaged
        return f"a torch zip archive cut short or damaged ({size:,} bytes): download it again"
    return f"not a torch checkpoint ({size:,} bytes, starting {head!r}): download it again"


def _name(ref):
    return str(ref).split("/")[-1] if ref is not None else "None"


def _refuse(where, what):
    raise ValueError(f"{where}: {what}: not a released EnCodecMAE design this loader serves")


def transformer_arch(sd, cfg, where):
    """Heads from the gin text (shapes cannot tell 12 x 64 from 8 x 96), all widths from the shapes."""
    need = ["wav_encoder.post_net.weight", "masker.positional_encoder.scale"] + [
        f"visible_encoder.encoder_layers.0.{k}.weight" for k in ("att_layer.wq", "att_layer.wv", "ff_layer.0")]
    if any(k not in sd for k in need):
        _refuse(where, f"no {next(k for k in need if k not in sd)!r} in its state_dict")
    vis = cfg.get("EncodecMAE", "visible_encoder")  # @encoder/...TransformerEncoder: gin scope "encoder"
    scopes = (vis.scope,) if isinstance(vis, Ref) else ()
    att = required(cfg, "transformers.TransformerEncoder", "attention_layer", "MultiHeadAttention",
                   scopes)
    scopes += (att.scope,)
    get = lambda name, param, default=None: cfg.get(name, param, scopes, default=default)  # noqa: E731
    for param, want in (("norm_type", "ResiDual"), ("ff_layer", None), ("pre_net", None),
                        ("positional_encoder", None), ("init_values", None)):
        if get("transformers.TransformerEncoder", param, want) != want:
            _refuse(where, f"encoder {param} = {get('transformers.TransformerEncoder', param)!r}")
    n_heads = get("MultiHeadAttention", "num_heads")
    n_layers = len({k.split(".")[2] for k in sd if k.startswith("visible_encoder.encoder_layers.")})
    qk, v = (sd[f"visible_encoder.encoder_layers.0.att_layer.{w}.weight"].shape[0] for w in ("wq", "wv"))
    if n_heads is None:  # their gin refuses a renamed parameter; MultiHeadAttention needs this
        raise ValueError(f"{cfg.where}: gives the encoder's MultiHeadAttention no num_heads (a "
                         "line renamed or cut off?): their loader fails on it too; download the "
                         "file again")
    if type(n_heads) is not int or n_heads < 1 or qk % n_heads or v % n_heads:
        _refuse(cfg.where, f"{qk}-d queries for {n_heads!r} heads")
    ff_dim = sd["visible_encoder.encoder_layers.0.ff_layer.0.weight"].shape[0]
    return dict(d_model=int(sd["wav_encoder.post_net.weight"].shape[0]), n_layers=n_layers, n_heads=n_heads,
                d_qk=qk // n_heads, d_v=v // n_heads, ff_dim=int(ff_dim),
                att_scale=float(get("MultiHeadAttention", "att_scale") or (qk // n_heads) ** -0.5),
                mask_value=float(get("MultiHeadAttention", "mask_value", -1e9)))


def front_arch(version, feat_dim, cfg, where):
    """The front end and the chunking of their extractor, from the gin text."""
    out = dict(front="encodec", feat_dim=int(feat_dim), chunk=4 * SAMPLE_RATE, hop=320, min_len=0, front_kwargs={},
               norm_stats=(0.0, 1.0), codec_scale=float(cfg.get("EncodecEncoder", "scale", default=1.0)))
    if version == "v1":  # EncodecMAE.wav_encoder = EncodecEncoder; extract_features_from_array(chunk_size=4)
        if not _name(cfg.get("EncodecMAE", "wav_encoder")).endswith("EncodecEncoder"):
            _refuse(where, f"wav_encoder {cfg.get('EncodecMAE', 'wav_encoder')!r}")
    else:  # WavEncoder(encoder, post_net) after a SequentialProcessor; chunks of ReadAudioProcessor.max_length s
        encoder = _name(cfg.get("WavEncoder", "encoder")).split(".")[-1]
        steps = [_name(p).split(".")[-1] for p in cfg.get("SequentialProcessor", "processors", default=[])]
        # Deviation: LoadNumpyProcessor (st.gin) only loads training targets; their extractor would call it and crash.
        steps = tuple(s for s in steps if s != "LoadNumpyProcessor")
        fronts = {("EncodecEncoder", ("ReadAudioProcessor",)): "encodec",
                  ("Identity", ("ReadAudioProcessor", "MelspectrogramProcessor")): "mel",
                  ("Identity", ("ReadAudioProcessor", "SpectrogramProcessor")): "spec"}
        out["front"] = fronts.get((encoder, steps))
        if out["front"] is None or cfg.get("WavEncoder", "pre_net") is not None:
            _refuse(where, f"wav encoder {encoder!r} after processors {list(steps)}")
        seconds, fs = cfg.get("ReadAudioProcessor", "max_length"), cfg.get("WavEncoder", "fs", default=SAMPLE_RATE)
        if not isinstance(seconds, (int, float)) or fs != SAMPLE_RATE:
            _refuse(where, f"chunks of {seconds!r} s at {fs} Hz")
        out.update(chunk=int(fs * seconds), min_len=2048, hop=cfg.get("WavEncoder", "hop_length", default=320))
        if out["front"] != "encodec":
            proc, names = (("MelspectrogramProcessor", MEL_ARGS) if out["front"] == "mel" else
                           ("SpectrogramProcessor", SPEC_ARGS))
            out["front_kwargs"] = {a: cfg.get(proc, a, default=MEL_DEFAULTS[a]) for a in names}
            out["norm_stats"] = tuple(float(s) for s in cfg.get(proc, "norm_stats", default=[0, 1]))
            if out["front_kwargs"]["sample_frequency"] != SAMPLE_RATE:
                _refuse(where, f"a filterbank at {out['front_kwargs']['sample_frequency']} Hz")
    bins = out["front_kwargs"].get("num_mel_bins", 128)
    if out["front"] in ("encodec", "mel") and feat_dim != bins:
        _refuse(where, f"{bins}-d {out['front']} frames into a {feat_dim}-d projection")
    return out


def check_entry(version, cfg):
    """What their load_model builds: get_model.model (v2: and .processor), and its encoder class."""
    wanted = [("get_model", "model", "EncodecMAE"),
              ("EncodecMAE", "visible_encoder", "TransformerEncoder")]
    if version == "v2":  # their extractor reads its chunk length from processor._processors[0]
        wanted.insert(1, ("get_model", "processor", "SequentialProcessor"))
    for conf, param, cls in wanted:
        required(cfg, conf, param, cls)


def required(cfg, conf, param, cls, scopes=()):
    """The @reference to their class `cls` that conf.param must hold (missing: a damaged config)."""
    ref = cfg.get(conf, param, scopes)
    if ref is None:
        raise ValueError(f"{cfg.where}: binds no {conf}.{param} (an empty config, or one cut "
                         "short?): their load_model cannot build the model without it either; "
                         "download the file again")
    if not isinstance(ref, Ref) or _name(ref).split(".")[-1] != cls:
        _refuse(cfg.where, f"{conf}.{param} = {'@' * isinstance(ref, Ref)}{ref!s}, not their {cls}")
    return ref


def describe(version, sd, cfg, where):
    """(version, v2-keyed state_dict, GinConfig) -> Arch; ValueError for any design we do not serve."""
    check_entry(version, cfg)
    net = transformer_arch(sd, cfg, where)
    front = front_arch(version, sd["wav_encoder.post_net.weight"].shape[1], cfg, where)
    return Arch(version=version, **net, **front)


# ---------------------------------------------------------------- their network, their key names
class MultiHeadAttention(nn.Module):
    """Their attention: bias-free projections, and a head layout where the head index runs fastest."""

    def __init__(self, a: Arch):
        super().__init__()
        self.n_heads, self.d_qk, self.d_v = a.n_heads, a.d_qk, a.d_v
        self.scale, self.mask_value = a.att_scale, a.mask_value
        self.wq = nn.Linear(a.d_model, a.d_qk * a.n_heads, bias=False)
        self.wk = nn.Linear(a.d_model, a.d_qk * a.n_heads, bias=False)
        self.wv = nn.Linear(a.d_model, a.d_v * a.n_heads, bias=False)
        self.wo = nn.Linear(a.d_v * a.n_heads, a.d_model, bias=False)

    def forward(self, x, key_pad):
        """x (B, T, D), key_pad (B, T) True = padding -> (B, T, D)."""
        B, T, _ = x.shape
        # Channel c of a projection is (c // H)-th dim of head c % H: view (.., d, H), not (.., H, d).
        split = lambda y, d: y.view(B, T, d, self.n_heads).permute(0, 3, 1, 2)  # noqa: E731  (B, H, T, d)
        q, k, v = split(self.wq(x), self.d_qk), split(self.wk(x), self.d_qk), split(self.wv(x), self.d_v)
        logits = q @ k.transpose(-2, -1) * self.scale  # (B, H, T, T)
        logits = logits + key_pad[:, None, None, :] * self.mask_value  # their additive mask, not -inf
        out = logits.softmax(-1) @ v  # (B, H, T, d_v)
        return self.wo(out.permute(0, 2, 3, 1).reshape(B, T, self.d_v * self.n_heads))  # (B, T, D)


class TransformerLayer(nn.Module):
    """One ResiDual layer (Xie et al. 2023): a post-norm stream x0 and an un-normalized sum x1."""

    def __init__(self, a: Arch, ff_layer):
        super().__init__()
        self.att_layer = MultiHeadAttention(a)
        self.ff_layer = ff_layer  # the same module in every layer: their weights are shared across depth
        self.norm1, self.norm2 = nn.LayerNorm(a.d_model), nn.LayerNorm(a.d_model)

    def forward(self, x0, x1, key_pad):
        a = self.att_layer(x0, key_pad)
        x0, x1 = self.norm1(x0 + a), x1 + a
        f = self.ff_layer(x0)
        return self.norm2(x0 + f), x1 + f  # (B, T, D) each


class TransformerEncoder(nn.Module):
    """Their visible encoder; its output is x0 + final_norm(x1) of the last layer."""

    def __init__(self, a: Arch):
        super().__init__()
        ff = nn.Sequential(nn.Linear(a.d_model, a.ff_dim), nn.ReLU(), nn.Linear(a.ff_dim, a.d_model))
        self.encoder_layers = nn.ModuleList(TransformerLayer(a, ff) for _ in range(a.n_layers))
        self.final_norm = nn.LayerNorm(a.d_model)

    def forward(self, x, key_pad):
        """x (B, T, D) -> ([x0 after each layer], final output), each (B, T, D)."""
        x0 = x1 = x
        inner = []
        for layer in self.encoder_layers:
            x0, x1 = layer(x0, x1, key_pad)
            inner.append(x0)
        return inner, x0 + self.final_norm(x1)


class SinusoidalPositionalEmbeddings(nn.Module):
    """Sin on even, cos on odd dims, times a learned scalar `scale`."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(1.0))

    def forward(self, x):
        T, D = x.shape[1:]
        pos = torch.arange(T, device=x.device, dtype=torch.float)[:, None]  # (T, 1)
        div = torch.exp(torch.arange(0, D, 2, device=x.device, dtype=torch.float) * -(math.log(10000.0) / D))
        pe = torch.zeros(T, D, device=x.device)
        pe[:, 0::2], pe[:, 1::2] = torch.sin(pos * div), torch.cos(pos * div)
        return x + self.scale * pe  # (B, T, D)


class Positions(nn.Module):
    """Their masker at inference: it only adds the positions (no frame is hidden)."""

    def __init__(self):
        super().__init__()
        self.positional_encoder = SinusoidalPositionalEmbeddings()


class CodecEncoder(nn.Module):
    """Their EncodecEncoder: the frozen EnCodec 24 kHz encoder, (B, n) -> (B, T, 128) * scale."""

    def __init__(self, scale):
        super().__init__()
        from encodec import EncodecModel
        self.model, self.scale = EncodecModel.encodec_model_24khz(pretrained=False).encoder, scale

    def forward(self, wav):
        return self.model(wav[:, None]).transpose(1, 2) * self.scale  # (B, T, 128)


class Filterbank(nn.Module):
    """Their Mel/SpectrogramProcessor: Kaldi features per clip, then (x - mean) / std."""

    def __init__(self, a: Arch):
        super().__init__()
        self.kind, self.kwargs, self.stats = a.front, a.front_kwargs, a.norm_stats

    def forward(self, wav):
        from torchaudio.compliance import kaldi
        fn = kaldi.fbank if self.kind == "mel" else kaldi.spectrogram
        feats = torch.stack([fn(w[None], **self.kwargs) for w in wav])  # (B, T, bins)
        return (feats - self.stats[0]) / self.stats[1]


class WavEncoder(nn.Module):
    """Their WavEncoder: front end, then post_net = Linear(feat_dim -> D) (v1's feat_projector)."""

    def __init__(self, a: Arch):
        super().__init__()
        self.encoder = CodecEncoder(a.codec_scale) if a.front == "encodec" else Filterbank(a)
        self.post_net = nn.Linear(a.feat_dim, a.d_model)


class ReleasedEnCodecMAE(nn.Module):
    """The feature path of their EncodecMAE; state_dict keys are their v2 keys."""

    sample_rate = SAMPLE_RATE  # what frames() takes (evaluate.HearModel declares HEAR's 48000)
    pool_all_frames = True  # evaluate.pooled: their HEAR wrapper's scene embedding is the mean of all frames

    def __init__(self, a: Arch, layer=-1):
        super().__init__()
        self.arch, self.layer, self.codec = a, layer, None
        self.wav_encoder, self.masker, self.visible_encoder = WavEncoder(a), Positions(), TransformerEncoder(a)
        self.scene_embedding_size = self.timestamp_embedding_size = int(a.d_model)
        self.name = self.key = ""

    def chunk_layers(self, wav, n_valid):
        """One chunk (B, L) whose first n_valid samples count as audio -> ([inner], final), (B, T, D)."""
        x = self.wav_encoder.post_net(self.wav_encoder.encoder(wav))  # (B, T, D)
        x = self.masker.positional_encoder(x)
        key_pad = torch.arange(x.shape[1], device=x.device) >= n_valid // self.arch.hop  # (T,)
        return self.visible_encoder(x, key_pad.expand(x.shape[0], -1))

    @torch.no_grad()
    def all_layers(self, wav, file_samples=None):
        """wav (B, n) at 24 kHz -> {layer: (B, T, D)} for their layer indices 0..L-1 and -1.

        As their extract_features_from_array does for ONE clip: 4-s chunks embedded alone, frames
        concatenated, padded frames kept. v1 hides (as attention keys) the frames past the chunk's own
        length; v2 counts min(n, 4 s) samples in every chunk (its list comprehension reuses `i`, so
        later chunks count as whole) and skips chunks of <= 2048 samples.
        file_samples: wav is a piece, cut on a chunk boundary, of a file this long
        (evaluate.embed_pieces): v2's n is the whole file's, so the pieces give the file's frames.
        Deviation: every row gets that single-clip answer; their batched call hides frames of row 0
        only (v1) or counts n - b samples for row b (v2), so its rows differ from single calls.
        """
        a = self.arch
        wav = wav.to(self.wav_encoder.post_net.weight.device, torch.float32)
        n = wav.shape[1]
        n_file = n if file_samples is None else file_samples
        pieces = []
        for start in range(0, n, a.chunk):
            piece = wav[:, start:start + a.chunk]
            if piece.shape[1] <= a.min_len:
                continue
            n_valid = piece.shape[1] if a.version == "v1" else min(n_file, a.chunk)
            inner, final = self.chunk_layers(piece, n_valid)
            if a.version == "v2":
                inner[-1] = final  # postnorm_last_activation=True: their last layer IS the final output
            pieces.append(inner + [final])
        if not pieces and min(n_file, a.chunk) <= a.min_len:
            raise ValueError(f"{self.name}: {n} samples give no chunk over {a.min_len} samples "
                             "(their extractor fails too)")
        if not pieces:  # a longer file's short tail: v2 skips it, as the whole file's last chunk
            pieces = [[wav.new_zeros(len(wav), 0, a.d_model)] * (a.n_layers + 1)]
        out = [torch.cat(p, dim=1) for p in zip(*pieces)]  # (B, T, D) each
        return {**dict(enumerate(out[:-1])), -1: out[-1]}

    def frames(self, wav, layer=None, file_samples=None):
        """wav (B, n) float32 mono at 24 kHz -> (B, T, D) frames at 75 Hz from `layer` (default:
        load's); file_samples: wav is a piece of a file this long, cut on a 4-s boundary."""
        layer = check_layer(self.layer if layer is None else layer, self.arch.n_layers)
        return self.all_layers(wav, file_samples)[layer]


def check_layer(layer, n_layers):
    """Their index -> a key of all_layers(): -1 stays (final output), -k counts from the end."""
    if not (isinstance(layer, int) and -n_layers <= layer < n_layers):
        raise ValueError(f"layer {layer!r}: their layers count 0..{n_layers - 1}; -1 is the final output")
    return layer if layer == -1 else layer % n_layers


# ---------------------------------------------------------------- loading
def _codec_from(source):
    """A full EnCodec 24 kHz state_dict (the 'encoder.*' part is used) from "pretrained" or a local .th."""
    from encodec import EncodecModel
    if source == "pretrained":
        try:
            return EncodecModel.encodec_model_24khz(pretrained=True).state_dict()
        except Exception as err:
            raise ValueError(f"pretrained EnCodec could not be fetched ({type(err).__name__}); "
                             "pass encodec=PATH of a local encodec_24khz-*.th") from None
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"encodec={source}: not a readable EnCodec checkpoint ({type(err).__name__})") from None


def _seeded_codec(ckpt):
    """Our fixtures store the random codec as a seed: rebuild it and check it against its recorded hash."""
    import hashlib
    from encodec import EncodecModel
    with torch.random.fork_rng():
        torch.manual_seed(int(ckpt["codec_seed"]))
        enc = EncodecModel.encodec_model_24khz(pretrained=False).encoder.state_dict()
    h = hashlib.sha256()
    for k, v in enc.items():
        h.update(k.encode() + v.contiguous().numpy().tobytes())
    if h.hexdigest() != ckpt.get("codec_sha256"):
        raise ValueError(f"codec seed {ckpt['codec_seed']}: this torch builds another random codec than the fixture's")
    return enc


def their_weights(sd, ckpt, wanted, encodec, where):
    """The tensors of our network from their state_dict, the codec from the file, a seed or encodec=."""
    strays = [k for k in sd if k.startswith(("wav_encoder.", "masker.", "visible_encoder.encoder_layers.",
                                             "visible_encoder.final_norm.")) and k not in wanted]
    if strays:
        raise ValueError(f"{where}: tensor {strays[0]!r} has no place in their network (first of {len(strays)})")
    ff = [k for k in sd if ".ff_layer." in k and k.startswith("visible_encoder.encoder_layers.")]
    if any(not torch.equal(sd[k], sd["visible_encoder.encoder_layers.0." + k.split(".", 3)[3]]) for k in ff):
        raise ValueError(f"{where}: its layers hold different feed-forward weights, not their one shared block")
    weights = {k: sd[k] for k in wanted if k in sd}
    codec_keys = [k for k in wanted if k.startswith("wav_encoder.encoder.model.")]
    has_codec = all(k in sd for k in codec_keys)
    if not codec_keys and encodec is not None:
        raise ValueError(f"{where}: a filterbank model: its frames need no EnCodec; drop encodec={encodec!r}")
    if codec_keys and has_codec and encodec is not None:
        raise ValueError(f"{where}: holds its own EnCodec weights; drop encodec={encodec!r}")
    source = "file" if codec_keys else None
    if codec_keys and not has_codec:  # our fixtures keep a seed; a stripped file needs encodec=
        if encodec is None and "codec_seed" not in ckpt:
            raise ValueError(f"{where}: holds no EnCodec weights; "
                             "pass encodec='pretrained' or a local encodec_24khz-*.th")
        enc = _seeded_codec(ckpt) if encodec is None else {
            k[len("encoder."):]: v for k, v in _codec_from(encodec).items() if k.startswith("encoder.")}
        weights.update({"wav_encoder.encoder.model." + k: v for k, v in enc.items()})
        source = f"seed{ckpt['codec_seed']}" if encodec is None else str(encodec)
    missing = sorted(set(wanted) - set(weights))
    if missing:
        raise ValueError(f"{where}: lacks {missing[0]!r} (and {len(missing) - 1} more tensors) of their network")
    return weights, source


def load_released(path, layer=-1, device="cpu", encodec=None, config=None):
    """A released v1 model.pt or v2 <name>.pt -> ReleasedEnCodecMAE (eval mode) on `device`.

    layer: their counting, 0..L-1 or -1 (final output); negative indices count from the end.
    encodec: only for EnCodec-input files without codec weights ("pretrained" or a local .th path).
    config: a v1 config.gin elsewhere than beside model.pt.
    """
    path = Path(path)
    version, sd, text, ckpt = read_checkpoint(path)
    if version == "v1":
        gin_path = Path(config) if config else path.with_name("config.gin")
        if not gin_path.is_file():
            raise ValueError(f"{path}: a v1 model.pt needs its config.gin (heads, codec scale) "
                             "beside it or config=PATH")
        try:
            text = gin_path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"{gin_path}: not text, so not their config.gin: download it "
                             "again") from None
    cfg = GinConfig(text, gin_path if version == "v1" else f"{path} (its 'config')")
    a = describe(version, sd, cfg, path)
    check_layer(layer, a.n_layers)
    with torch.random.fork_rng():  # building modules draws random numbers; leave the caller's generator alone
        model = ReleasedEnCodecMAE(a, layer)
    weights, source = their_weights(sd, ckpt, model.state_dict(), encodec, path)
    model.load_state_dict(weights, strict=True)
    stem = path.parent.name if path.stem == "model" else path.stem  # v1 files are all model.pt
    model.name = f"released:{stem}" + ("" if layer == -1 else f"@layer{layer}")
    model.key = f"{model.name}|{os.path.getsize(path)}-{os.path.getmtime(path):.6f}|codec={source}"
    return model.eval().to(device)


# ---------------------------------------------------------------- their HEAR wrapper's protocol
def released_timestamps(n_frames, n_sounds=1):
    """(n_sounds, n_frames) float32 timestamps of their HEAR wrapper: frame centres (i + 0.5) / 75 s.

    Deviation: in milliseconds, as HEAR asks; their wrapper returns the same centres in seconds.
    """
    t = (torch.arange(n_frames, dtype=torch.float64) + 0.5) * (1000.0 / FRAME_RATE)
    return t.float().expand(n_sounds, -1).clone()


def released_scene(frames):
    """(B, T, D) -> (B, D): the mean over ALL frames their extractor returns, as their wrapper pools."""
    return frames.mean(dim=1)


def main(argv=None):
    """`info PATH`: one line per fact about a released file; a bad file is one line, exit 2."""
    import data as D  # one-line errors for the command line (data.run_cli)
    p = D.Parser(prog="extras/released.py", description=__doc__.splitlines()[0])
    commands = p.add_subparsers(dest="command", required=True)
    info = commands.add_parser("info", help="what a released file holds: version, sizes, params")
    info.add_argument("path", help="a v2 <name>.pt, or a v1 model.pt with its config.gin beside it")
    args = p.parse_args(argv)
    try:
        m = load_released(args.path)
    except ValueError as err:
        raise D.UsageError(str(err)) from None
    a = m.arch
    print(f"{m.name}: {a.version}, {a.front} front end ({a.feat_dim}-d), D={a.d_model}, "
          f"{a.n_layers} layers, {a.n_heads} heads of {a.d_qk}, shared FF {a.ff_dim}, "
          f"chunks of {a.chunk} samples")
    n_params = sum(p.numel() for p in m.parameters())
    print(f"parameters (feature path, shared FF counted once): {n_params:,}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # core files
    import data
    data.run_cli(main)
