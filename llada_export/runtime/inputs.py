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
"""

from __future__ import annotations

from ..rules import SEED_LIMIT, GenerationError, check_number, check_refresh, check_seed  # noqa: F401 (the rule's home)
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


__all__ = ["SEED_LIMIT", "GenerationError", "PromptError", "check_number", "check_prompt", "check_refresh",
           "check_seed", "check_text"]
