"""The errors a tuning command reports in one line, without a traceback.

`python -m tuning` prints a `TuningError` as `python -m tuning: error: ...`
and exits non-zero; any other exception is a bug and keeps its traceback.
`Parser` gives the command line's own mistakes the same one-line shape.
"""

import argparse
import os
import shlex
import signal
import sys
import unicodedata


class TuningError(Exception):
    """A problem the user can act on; its message is one line that says how."""


SCRIPT = "adam-plus-tune"  # the console script pyproject.toml installs


def command():
    """The command the user typed: `adam-plus-tune` when run through the
    console script, else `python -m tuning`."""
    name = os.path.basename(sys.argv[0]) if sys.argv else ""
    return SCRIPT if name == SCRIPT else "python -m tuning"


def quoted(text):
    """`text` (a path, an argument) as a message shows it: as the shell
    reads it back (`shlex.quote`), control characters escaped.

    Without control characters: `shlex.quote` (`run` stays `run`, `a b`
    becomes `'a b'`). With them (a newline, an escape sequence): bash's
    `$'...'` quoting, each control character written as `\\n`, `\\x1b`,
    `\\u0085`, so that a message is one line, a terminal shows what is
    there rather than obeying it, and the text pastes back into a shell.
    """
    text = str(text)
    if not any(unicodedata.category(c) == "Cc" for c in text):
        return shlex.quote(text)
    return "$'" + "".join(_ESCAPES.get(c) or (
        (f"\\x{ord(c):02x}" if ord(c) < 0x80 else f"\\u{ord(c):04x}")
        if unicodedata.category(c) == "Cc" else c) for c in text) + "'"


_ESCAPES = {"\\": "\\\\", "'": "\\'", "\n": "\\n", "\t": "\\t",
            "\r": "\\r"}


class Parser(argparse.ArgumentParser):
    """An `argparse.ArgumentParser` whose errors are one line, and whose
    help shows every option's default."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _DefaultsHelp)
        # No abbreviations: the launcher passes its command line on to the
        # chief and workers less its own options, found by their full
        # names (`--work 2` reaching a child would launch again).
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message):
        """Prints `<prog>: error: <message>` and exits with status 2."""
        self.exit(2, f"{self.prog}: error: {message}\n")


def folder_path(text):
    """An argparse type: a non-empty folder path without NUL."""
    if not text.strip() or "\0" in text:
        raise argparse.ArgumentTypeError(
            f"must be a folder path, got {text!r}")
    return text


class _DefaultsHelp(argparse.RawDescriptionHelpFormatter):
    """Appends "(default: ...)" to options whose help does not state it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.option_strings and "default" not in text and (
            action.default is not argparse.SUPPRESS
        ):
            text += " (default: %(default)s)"
        return text


class Stopped(KeyboardInterrupt):
    """A stop signal (SIGTERM, SIGHUP) taken like Ctrl-C; `signum` says
    which."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


_interrupts = []


def catch_interrupts():
    """Makes Ctrl-C stick until the command stops.

    Python raises KeyboardInterrupt wherever the main thread is, and a
    garbage-collection callback or `__del__` swallows it ("Exception
    ignored in ..."). With this handler the interrupt is also recorded (and
    such a swallowed one not printed), and `check_interrupt()` (called after
    every batch and trial) raises it again.
    """
    def handler(signum, frame):
        _interrupts.append(signum)
        raise KeyboardInterrupt

    def unraisable(info, default=sys.unraisablehook):
        if not isinstance(info.exc_value, KeyboardInterrupt):
            default(info)  # a swallowed interrupt is raised again instead

    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, handler)
        sys.unraisablehook = unraisable


def check_interrupt():
    """Raises KeyboardInterrupt if Ctrl-C was pressed (and swallowed)."""
    if _interrupts:
        raise KeyboardInterrupt
