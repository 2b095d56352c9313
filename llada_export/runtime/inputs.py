"""One rule for what a request may carry, for every door: the Python API (:class:`~.pipeline.Pipeline`
checks its requests and settings with it), ``llada-generate`` (its flag types) and ``llada-serve``
(through the pipeline, or by importing these checks). Torch-free, so a CLI can check its flags
while it parses them.

Each check returns the value it accepts and raises a ``ValueError`` subclass whose one-line message
names the field: :class:`GenerationError` for sampler settings and seeds (those checks live in
:mod:`llada_export.rules`, the bottom of the package, so the sampler uses them too; they are
re-exported here), :class:`PromptError` (from :mod:`llada_export.tokenizer`) for prompt texts.

- prompt: text (``str``) that encodes as UTF-8 (no undecodable byte, no lone surrogate) and holds
  something besides whitespace and the ``<image>`` marker; a system prompt may be empty.
- history (a conversation's earlier turns): (role, text) pairs, role system, user or assistant.
- gen_length, steps, block_length: positive integers of any integer type (numpy's too); a seed likewise.
- ``cancel`` (``generate_batch``): one callable returning one flag (True / False) per request
  (:func:`checked_cancel`); ``on_step`` and ``on_finish``: callables or None (:func:`checked_callback`).
- in a batch, a request's refusal names it: ``requests[i]: ...`` (:func:`in_batch`).
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Sequence
from typing import Callable

from ..rules import SEED_LIMIT, GenerationError, check_number, check_refresh, check_seed, shorten  # noqa: F401
from ..tokenizer import IMAGE_TOKEN, PromptError


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


HISTORY_ROLES = ("system", "user", "assistant")  # the chat template's roles for earlier turns


def check_history(history: object) -> tuple[tuple[str, str], ...]:
    """A conversation's earlier turns: (role, text) pairs, role one of :data:`HISTORY_ROLES`, text UTF-8
    (may be empty); returned as a tuple of tuples."""
    if isinstance(history, (str, bytes)) or not isinstance(history, Iterable):
        raise PromptError(f"history must be a list of (role, text) pairs, got a {type(history).__name__}")
    turns = []
    for i, turn in enumerate(history):
        if isinstance(turn, (str, bytes)) or not isinstance(turn, Sequence) or len(turn) != 2:
            raise PromptError(f"history[{i}] must be a (role, text) pair, e.g. ('assistant', 'Red.'), got "
                              f"{shorten(repr(turn))}")
        role, text = turn
        if role not in HISTORY_ROLES:
            raise PromptError(f"history[{i}] has role {shorten(repr(role))}; the chat roles are "
                              f"{', '.join(HISTORY_ROLES)}")
        turns.append((role, check_text(text, f"history[{i}] ({role})")))
    return tuple(turns)


def check_size(value: object, name: str) -> int | None:
    """A length or count setting (gen_length, steps, block_length): None (the default) or a positive integer
    of any integer type (numpy's too), returned as ``int``."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise GenerationError(f"{name} must be a positive integer, got {shorten(repr(value))}")
    return int(value)


__all__ = ["SEED_LIMIT", "GenerationError", "PromptError", "check_history", "check_number", "check_prompt",
           "check_refresh", "check_seed", "check_size", "check_text"]


def checked_cancel(cancel, n: int) -> Callable[[], list[bool]] | None:
    """``generate_batch``'s ``cancel``, checked: a callable (TypeError up front), whose every call returns one
    flag per request (ValueError at the first call that does not: a shorter list left rows running)."""
    if cancel is None:
        return None
    if not callable(cancel):
        raise TypeError(f"cancel must be one callable that returns a list of {n} flag(s), one per request, "
                        f"got a {type(cancel).__name__}; e.g. cancel=lambda: [False] * {n}")

    def flags() -> list[bool]:
        got = cancel()
        if isinstance(got, (str, bytes)) or not hasattr(got, "__len__") or len(got) != n:
            what = f"{len(got)} flag(s)" if hasattr(got, "__len__") and not isinstance(got, (str, bytes)) \
                else f"a {type(got).__name__}"
            raise ValueError(f"cancel() returned {what} for {n} request(s): return a list of {n} booleans, "
                             "one per request in order (True stops that request)")
        got = list(got)
        for i, flag in enumerate(got):  # a string 'false' or None was read by its truth: 'false' cancelled
            if not _is_flag(flag):
                raise ValueError(f"cancel() returned {shorten(repr(flag))} for request {i}: return True or False "
                                 "for each request (True stops that request)")
        return got
    return flags


def _is_flag(flag) -> bool:
    """True, False, 0, 1, or a numpy or torch boolean scalar (an element of a boolean mask)."""
    if isinstance(flag, numbers.Integral):
        return flag in (0, 1)
    return str(getattr(flag, "dtype", "")) in ("bool", "torch.bool") and getattr(flag, "ndim", 1) == 0


def checked_callback(fn, name: str, example: str) -> Callable | None:
    """``on_step`` / ``on_finish``, checked up front: None or a callable (a TypeError naming the argument, not
    Python's bare "'int' object is not callable" after the vision graph and the first forward had run)."""
    if fn is not None and not callable(fn):
        raise TypeError(f"{name} must be a callable or None, got a {type(fn).__name__}; e.g. {name}={example}")
    return fn


def in_batch(e: ValueError, i: int, n: int) -> ValueError:
    """Request ``i``'s refusal ``e``, with ``requests[i]: `` in front in a batch of ``n`` > 1 (which request)."""
    return e if n == 1 else type(e)(f"requests[{i}]: {e}")
