"""The one rule for the numbers a request carries: sampler settings, seeds, the cache refresh.

The bottom of the package (it imports none of it), so the sampler, the runtime, the CLIs and the
server all check with it; :mod:`llada_export.runtime.inputs` adds the prompt rules and re-exports
these. Each check returns the value it accepts and raises :class:`GenerationError` (a
``ValueError``) with a one-line message naming the field.

- numbers (temperature, cfg scale, factor, threshold): real numbers, finite (``inf`` and ``nan``
  are refused, not read as "no limit" or "greedy"), within the field's range;
- seed: an integer with 0 <= seed < 2**63 (what every torch generator takes);
- refresh: a positive integer, or ``None`` / ``"never"`` (refresh at block starts only).
"""

from __future__ import annotations

import math
import numbers
import os
import re

SEED_LIMIT = 2**63  # seeds are 0 .. 2**63 - 1
ECHO_LIMIT = 80  # characters of a caller's value an error message repeats


def shorten(text: str, limit: int = ECHO_LIMIT) -> str:
    """``text`` as an error message repeats it: whole up to ``limit`` characters, else its first ``limit``
    and its length (a prompt, a ``data:`` URL or a bad value can be kilobytes; the message stays one line)."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def is_url(text: object) -> bool:
    """``text`` looks like a URL (``scheme://...`` or a ``data:`` URL) rather than a file name: images are read
    from local files, so such a name that is no file is refused as a URL (the runtime and the HTTP client)."""
    return isinstance(text, str) and re.match(r"[A-Za-z][A-Za-z0-9+.-]*://|data:", text) is not None


PATH_ECHO_LIMIT = 240  # a path is repeated whole up to this; a longer one keeps its end (the file's name)


def shorten_path(path: object, limit: int = PATH_ECHO_LIMIT) -> str:
    """A file path as an error message repeats it: whole up to ``limit`` characters (real paths), else its
    last ``limit`` characters with its length: the end names the file, the part the reader needs."""
    text = str(path)
    return text if len(text) <= limit else f"...{text[-limit:]} ({len(text)} characters)"


def env_choice(var: str, choices: tuple[str, ...]) -> str:
    """The environment variable ``var``'s value, one of ``choices`` (the first, e.g. "auto", when it is unset or
    empty); ValueError naming the variable and the choices for any other value."""
    value = os.environ.get(var) or choices[0]
    if value not in choices:
        raise ValueError(f"{var}={value!r}: expected one of {', '.join(choices)}")
    return value


class GenerationError(ValueError):
    """Generation settings that cannot be used (or not together)."""


def check_number(value: object, name: str, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False) -> float:
    """A finite real number in [low, high] (``low_open``: (low, high]); ``name`` goes in the message."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise GenerationError(f"{name} must be a number, got {shorten(repr(value))}")
    try:
        v = float(value)
    except OverflowError:  # an integer beyond float's range, e.g. 10**400
        raise GenerationError(f"{name} must be a finite number, got an integer of {len(str(value))} digits") from None
    if not math.isfinite(v):
        raise GenerationError(f"{name} must be a finite number, got {v}")
    if low is not None and (v <= low if low_open else v < low):
        if high is not None:
            raise GenerationError(f"{name} must be in {'(' if low_open else '['}{low:g}, {high:g}], got {v:g}")
        raise GenerationError(f"{name} must be {'>' if low_open else '>='} {low:g}, got {v:g}")
    if high is not None and v > high:
        raise GenerationError(f"{name} must be in {'(' if low_open else '['}{low:g}, {high:g}], got {v:g}")
    return v


def check_seed(value: object, name: str = "seed") -> int:
    """An integer seed, 0 <= seed < 2**63."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise GenerationError(f"{name} must be an integer from 0 to 2**63 - 1, got {shorten(repr(value))}")
    v = int(value)
    if not 0 <= v < SEED_LIMIT:
        raise GenerationError(f"{name} must be from 0 to 2**63 - 1 ({SEED_LIMIT - 1}), got {shorten(str(v))}")
    return v


def check_refresh(value: object) -> int | None:
    """Forwards between prefix-cache refreshes within a block: a positive integer, or None / "never"
    (only at block starts)."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "never"):
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise GenerationError(f"refresh must be a positive integer or 'never' (None), got {shorten(repr(value))}")
    return int(value)
