"""Shared CLI plumbing: user errors become one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import contextlib
import sys


def parse_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
        if w <= 0 or h <= 0:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT like 1024x768, got {text!r}") from None
    return w, h


@contextlib.contextmanager
def user_errors(prog: str):
    """ValueError / OSError (all our user-facing errors derive from them) -> one line, exit 2."""
    try:
        yield
    except (ValueError, OSError) as e:
        msg = " ".join(str(e).split())  # one line
        print(f"{prog}: error: {msg}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
