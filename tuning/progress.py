"""Progress over a search's trials or a confirmation's runs.

On a terminal, Keras's `Progbar` (a bar redrawn in place, with its ETA). In
a log (stdout not a terminal), one plain line per step: Keras's bar writes
carriage returns, backspaces and colour codes whatever the output is.
"""

import sys
import time


def make(total, unit):
    """A progress display over `total` steps (`unit`: "trial", "run");
    `add(1)` after each step."""
    if sys.stdout.isatty():
        return _Bar(total, unit)
    return Lines(total, unit)


class _Bar:
    """Keras's `Progbar`; the next output starts on a new line."""

    def __init__(self, total, unit):
        import keras

        self.bar = keras.utils.Progbar(total, unit_name=unit)

    def add(self, n):
        self.bar.add(n)
        print(flush=True)


class Lines:
    """One plain line per step: done/total, elapsed time and ETA."""

    def __init__(self, total, unit):
        self.total, self.unit, self.done = total, unit, 0
        self.start = time.monotonic()

    def add(self, n):
        self.done += n
        elapsed = time.monotonic() - self.start
        left = elapsed / self.done * (self.total - self.done)
        print(f"progress: {self.done}/{self.total} {self.unit}s, "
              f"{_clock(elapsed)} elapsed, ETA {_clock(left)}", flush=True)


def _clock(seconds):
    """h:mm:ss."""
    seconds = round(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
