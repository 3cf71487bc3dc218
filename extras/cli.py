"""Command-line helpers the extras tools share (progress lines, a --data check, temporaries).

The core's own (one-line errors, argparse types, atomic writes) are at the end of data.py, so the
paper's path runs with extras/ deleted. This file imports nothing of the repository.
"""
import argparse
import os
import re
import time


class Progress:
    """A line at most every `every` seconds and at the end: share done, speed, ETA. Work found
    done (a resumed run) counts as done but not as speed."""

    def __init__(self, stage, total, every=10.0, unit=None):
        self.stage = stage
        self.total = total
        self.every = every
        self.unit = unit
        self.done = 0
        self.resumed = 0
        self.t0 = time.time()
        self.last = self.t0

    def update(self, amount, detail, resumed=False):
        now = time.time()
        self.done += amount
        if resumed:
            self.resumed += amount
        if now - self.last < self.every and self.done < self.total:
            return
        self.last = now
        speed = (self.done - self.resumed) / max(now - self.t0, 1e-9)
        rate = f", {speed:.1f}{self.unit}" if self.unit else ""
        eta = (self.total - self.done) / max(speed, 1e-9)
        print(f"{self.stage}: {detail}, {self.done / max(self.total, 1e-9):.1%} in "
              f"{now - self.t0:.0f} s{rate}, ETA {eta:.0f} s", flush=True)


def data_source(text):
    """An argparse type: "demo", a .txt list of paths, or a readable folder."""
    if not (text == "demo" or (text.endswith(".txt") and os.path.isfile(text)) or os.path.isdir(text)):
        raise argparse.ArgumentTypeError(f"{text}: no such folder or .txt list (or use demo)")
    if os.path.isdir(text) and not os.access(text, os.R_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"{text}: permission denied (the folder cannot be read)")
    return text


def remove_temporaries(folder, names):
    """Delete exactly the `{name}.tmp{pid}` files a killed data.write_atomic left, for the names
    matching the regular expression `names`."""
    for entry in os.listdir(folder):
        if re.fullmatch(rf"(?:{names})\.tmp\d+", entry):
            os.remove(os.path.join(folder, entry))
