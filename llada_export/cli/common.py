"""Shared CLI plumbing: argument types, ``--version``, and user errors as one line on stderr, exit 2.

Import-light on purpose (``--help`` must be fast): nothing here imports torch.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import math
import os
import signal
import sys

from .. import __version__
from ..outdir import TERMINATING, Terminated
from ..rules import shorten, shorten_path
from ..runtime.inputs import check_number, check_prompt, check_refresh, check_seed


def parse_size(text: str) -> tuple[int, int]:
    """``"1024x768"`` -> (1024, 768)."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
        if w <= 0 or h <= 0:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT like 1024x768, got {shorten(repr(text))}") from None
    return w, h


def positive_int(text: str) -> int:
    """An integer >= 1 (0 is refused, not read as "the default")."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {shorten(repr(text))}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer (1 or more), got {v}")
    return v


def _number(text: str, ok, what: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number {what}, got {shorten(repr(text))}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a finite number {what}, got {shorten(repr(text))}")
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


def _rule(check, parse, *args, **kw):
    """An argparse type that parses the text and applies a check of ``runtime.inputs`` (the rule the
    Python API and the HTTP server apply too), its message as the usage error."""

    def convert(text: str):
        try:
            return check(parse(text), *args, **kw)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return convert


def _to_float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"expected a number, got {shorten(repr(text))}") from None


def _to_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"expected an integer, got {shorten(repr(text))}") from None


def setting_number(name: str, **bounds):
    """A sampler number (``--temperature``, ``--cfg-scale``, ...): finite, in ``bounds`` (see
    :func:`~llada_export.runtime.inputs.check_number`)."""
    return _rule(check_number, _to_float, name, **bounds)


def seed_value(text: str) -> int:
    """``--seed``: an integer from 0 to 2**63 - 1, as everywhere."""
    return _rule(check_seed, _to_int)(text)


def refresh_value(text: str) -> int | None:
    """``--refresh N`` (forwards between cache refreshes in a block) or ``never`` (block starts only)."""
    return _rule(check_refresh, lambda t: t if t.strip().lower() == "never" else _to_int(t))(text)


def cli_prompt(text: str) -> str:
    """A prompt as typed in a shell: ``"<image>\\nWhat is shown?"`` in bash is a literal backslash-n,
    which is read as the newline the user meant (a prompt never needs a literal backslash-n). Checked
    as every prompt is: UTF-8 text (an undecodable byte of the argument is refused), not empty."""
    return _rule(check_prompt, lambda t: t.replace("\\n", "\n"))(text)


def directory(text: str) -> str:
    """A directory flag (--engines, --model, --weights): an empty path is refused, not read as the current
    directory (whose name the later messages gave, as if the user had typed '.')."""
    if not text.strip():
        raise argparse.ArgumentTypeError("empty path: give a directory")
    return text


def image_file(text: str) -> str:
    """``--image``: a path (whether it is there and an image is checked where it is read); a directory is
    refused at once, by name."""
    if not text.strip():
        raise argparse.ArgumentTypeError("empty path: give an image file, or leave --image out for a text-only prompt")
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{shorten_path(text)}: is a directory, not an image file")
    return text


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
    """ValueError / OSError (all our user-facing errors derive from them) -> one line, exit 2 (text that
    standard output's encoding cannot hold: what, and how to get UTF-8 output);
    Ctrl-C, SIGTERM and SIGHUP (the terminal or SSH session closed) -> "interrupted" (exit 130 / 143 /
    129) after the cleanup ran; a signal the process ignores (``nohup``) stays ignored; a closed stdout
    (``| head``) ends quietly."""
    previous = {sig: h for sig in TERMINATING if (h := signal.getsignal(sig)) is not None and h != signal.SIG_IGN}

    def terminate(signum, frame):  # cleans up like Ctrl-C
        raise Terminated(signum)

    for sig in previous:
        signal.signal(sig, terminate)
    try:
        yield
    except BrokenPipeError:
        _quiet_stdout()
        raise SystemExit(0) from None
    except (ValueError, OSError) as e:
        msg = _cannot_print(e) or " ".join(str(e).split())  # one line
        print(f"{prog}: error: {msg}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt as e:
        if sys.stderr.isatty():
            sys.stderr.write("\n")  # off the progress bar's line
        print(f"{prog}: interrupted", file=sys.stderr)
        raise SystemExit(128 + e.signum if isinstance(e, Terminated) else 130) from None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _cannot_print(e: Exception) -> str | None:
    """For a UnicodeEncodeError of standard output's own encoding (PYTHONIOENCODING=ascii, a Latin-1 locale):
    what could not be printed and how to get UTF-8 output (Python said only "'ascii' codec can't encode
    characters in position 2-3: ordinal not in range(128)")."""
    enc = getattr(sys.stdout, "encoding", None) or ""
    if not isinstance(e, UnicodeEncodeError) or not enc or codecs.lookup(e.encoding).name != codecs.lookup(enc).name:
        return None
    return (f"cannot print {e.object[e.start:e.end]!r}: standard output's encoding is {enc}; set "
            "PYTHONIOENCODING=utf-8 (or a UTF-8 locale, e.g. LANG=C.UTF-8) and run it again")


def _quiet_stdout() -> None:
    """After a broken pipe: point stdout at /dev/null so the interpreter's final flush is silent."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
