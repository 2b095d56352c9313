"""One rule for what a request may carry, for every door: the Python API (:class:`~.pipeline.Pipeline`
checks its requests and settings with it), ``llada-generate`` (its flag types) and ``llada-serve``
(through the pipeline, or by importing these checks). Torch-free, so a CLI can check its flags
while it parses them.

Each check returns the value it accepts and raises a ``ValueError`` subclass whose one-line message
names the field: :class:`GenerationError` for sampler settings and seeds, :class:`PromptError`
(from :mod:`llada_export.tokenizer`) for prompt texts.

- numbers (temperature, cfg scale, factor, threshold): real numbers, finite (``inf`` and ``nan``
  are refused, not read as "no limit" or "greedy"), within the field's range;
- seed: an integer with 0 <= seed < 2**63 (what every torch generator takes);
- refresh: a positive integer, or ``None`` / ``"never"`` (refresh at block starts only);
- prompt: text (``str``) that encodes as UTF-8 (no undecodable byte, no lone surrogate) and holds
  something besides whitespace and the ``<image>`` marker; a system prompt may be empty.
"""

from __future__ import annotations

import math
import numbers

from ..tokenizer import IMAGE_TOKEN, PromptError

SEED_LIMIT = 2**63  # seeds are 0 .. 2**63 - 1


class GenerationError(ValueError):
    """Generation settings that cannot be used (or not together)."""


def check_number(value: object, name: str, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False) -> float:
    """A finite real number in [low, high] (``low_open``: (low, high]); ``name`` goes in the message."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise GenerationError(f"{name} must be a number, got {value!r}")
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
        raise GenerationError(f"{name} must be an integer from 0 to 2**63 - 1, got {value!r}")
    v = int(value)
    if not 0 <= v < SEED_LIMIT:
        raise GenerationError(f"{name} must be from 0 to 2**63 - 1 ({SEED_LIMIT - 1}), got {v}")
    return v


def check_refresh(value: object) -> int | None:
    """Forwards between prefix-cache refreshes within a block: a positive integer, or None / "never"
    (only at block starts)."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "never"):
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise GenerationError(f"refresh must be a positive integer or 'never' (None), got {value!r}")
    return int(value)


def check_text(value: object, name: str = "prompt") -> str:
    """Text that encodes as UTF-8: a ``str`` without lone surrogates (what an undecodable byte of a
    command-line argument becomes)."""
    if not isinstance(value, str):
        raise PromptError(f"{name} must be a string, got {'None' if value is None else type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = value[e.start]
        what = f"the byte 0x{ord(bad) - 0xDC00:02x}" if 0xDC80 <= ord(bad) <= 0xDCFF else f"a lone surrogate {bad!r}"
        raise PromptError(f"{name} is not valid UTF-8 text: {what} at character {e.start}; pass UTF-8 text") from None
    return value


def check_prompt(value: object, name: str = "prompt") -> str:
    """A user prompt: UTF-8 text with something besides whitespace and ``<image>``."""
    text = check_text(value, name)
    if not text.replace(IMAGE_TOKEN, "").strip():
        raise PromptError(f"{name} is empty: ask a question about the image (or give a text prompt)")
    return text


__all__ = ["SEED_LIMIT", "GenerationError", "PromptError", "check_number", "check_prompt", "check_refresh",
           "check_seed", "check_text"]
