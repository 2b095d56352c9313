"""Shared CLI plumbing: argument types, ``--version``, and user errors as one line on stderr, exit 2.

Import-light on purpose (``--help`` must be fast): nothing here imports torch.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys

from .. import __version__
from ..outdir import Terminated


def parse_size(text: str) -> tuple[int, int]:
    """``"1024x768"`` -> (1024, 768)."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
        if w <= 0 or h <= 0:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT like 1024x768, got {text!r}") from None
    return w, h


def positive_int(text: str) -> int:
    """An integer >= 1 (0 is refused, not read as "the default")."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer (1 or more), got {v}")
    return v


def _number(text: str, ok, what: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number {what}, got {text!r}") from None
    if not ok(v):
        raise argparse.ArgumentTypeError(f"must be {what}, got {v}")
    return v


def unit_interval(text: str) -> float:
    """A fraction in (0, 1]."""
    return _number(text, lambda v: 0.0 < v <= 1.0, "in (0, 1]")


def positive_float(text: str) -> float:
    return _number(text, lambda v: v > 0, "> 0")


def non_negative_float(text: str) -> float:
    return _number(text, lambda v: v >= 0, ">= 0")


def refresh_value(text: str) -> int | None:
    """``--refresh N`` (forwards between cache refreshes in a block) or ``never`` (block starts only)."""
    if text.strip().lower() == "never":
        return None
    return positive_int(text)


def cli_prompt(text: str) -> str:
    """A prompt as typed in a shell: ``"<image>\\nWhat is shown?"`` in bash is a literal backslash-n,
    which is read as the newline the user meant (a prompt never needs a literal backslash-n)."""
    return text.replace("\\n", "\n")


class Parser(argparse.ArgumentParser):
    """Usage errors as one line, like every other error of these tools (the usage is in --help)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def parser(prog: str, description: str, epilog: str = "") -> argparse.ArgumentParser:
    """An ArgumentParser whose description and epilog keep their line breaks, with ``--version``."""
    p = Parser(prog=prog, description=description, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__} (llada-export)")
    return p


@contextlib.contextmanager
def user_errors(prog: str):
    """ValueError / OSError (all our user-facing errors derive from them) -> one line, exit 2;
    Ctrl-C and SIGTERM -> "interrupted" (exit 130 / 143) after the cleanup ran; a closed stdout
    (``| head``) ends quietly."""
    previous = signal.getsignal(signal.SIGTERM)

    def terminate(signum, frame):  # SIGTERM cleans up like Ctrl-C
        raise Terminated()

    signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    except BrokenPipeError:
        _quiet_stdout()
        raise SystemExit(0) from None
    except (ValueError, OSError) as e:
        msg = " ".join(str(e).split())  # one line
        print(f"{prog}: error: {msg}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt as e:
        if sys.stderr.isatty():
            sys.stderr.write("\n")  # off the progress bar's line
        print(f"{prog}: interrupted", file=sys.stderr)
        raise SystemExit(143 if isinstance(e, Terminated) else 130) from None
    finally:
        signal.signal(signal.SIGTERM, previous)


def _quiet_stdout() -> None:
    """After a broken pipe: point stdout at /dev/null so the interpreter's final flush is silent."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
