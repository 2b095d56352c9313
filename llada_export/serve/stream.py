"""Streaming a diffusion model's answer: its committed prefix, as text, as it grows.

The sampler commits tokens out of order; what a reader can be given is the answer's *committed
prefix*, the longest prefix with no mask left (with block_length < gen_length it grows block by
block). :func:`committed_prefix` reads it from a ``StepEvent``'s ids; :class:`TextStream` turns
successive prefixes into text deltas whose concatenation is the final answer, cut at the first
``stop`` string (text that may begin a stop string is held back until it is known not to).
Used by ``llada-serve`` (``stream: true``) and ``llada-generate --stream``; no Ray, no HTTP here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence


def committed_prefix(row: Sequence[int], mask_id: int, eot_id: int) -> tuple[list[int], bool]:
    """(the answer's ids up to its first mask, cut before its first ``<|eot_id|>``; whether the answer
    ended there, at that ``<|eot_id|>``)."""
    row = list(row)
    k = row.index(mask_id) if mask_id in row else len(row)
    prefix = row[:k]
    if eot_id in prefix:
        return prefix[: prefix.index(eot_id)], True
    return prefix, False


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """``text`` up to the first occurrence of any ``stop`` string (excluded), and whether one occurred."""
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


def held_back(text: str, stop: Sequence[str]) -> int:
    """How many characters at the end of ``text`` could be the start of a stop string."""
    return max((k for s in stop for k in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:k])),
               default=0)


@dataclass
class TextStream:
    """Successive committed prefixes (ids) -> text deltas. ``decode``: ids -> text (the pipeline's
    ``decode_answer``, which never ends in a partial UTF-8 character). A delta is given only when the
    new text extends what was sent (a detokenizer may rewrite a text's end as tokens follow)."""

    decode: Callable[[list[int]], str]
    stop: Sequence[str] = ()
    sent: str = ""
    n_ids: int = -1  # length of the last prefix seen
    stopped: bool = False  # a stop string was found: nothing more is sent
    stop_tokens: int | None = None  # the prefix tokens that held the text up to the stop string

    def feed(self, ids: list[int]) -> str:
        """The delta for a new committed prefix ("" when nothing new can be sent)."""
        if self.stopped or len(ids) == self.n_ids:
            return ""
        self.n_ids = len(ids)
        text, hit = cut_at_stop(self.decode(ids), self.stop)
        if hit:
            self.stopped, self.stop_tokens = True, len(ids)
        else:
            text = text[: len(text) - held_back(text, self.stop)]
        return self._extend(text)

    def finish(self, text: str) -> str:
        """The last delta, for the final answer ``text`` (after which the sent text is that answer,
        cut at a stop string)."""
        if self.stopped:
            return ""
        text, self.stopped = cut_at_stop(text, self.stop)
        return self._extend(text)

    def _extend(self, text: str) -> str:
        if len(text) <= len(self.sent) or not text.startswith(self.sent):
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta


def answer_with_stop(decode: Callable[[list[int]], str], ids: list[int], text: str,
                     stop: Sequence[str]) -> tuple[str, int, bool]:
    """A finished answer (``ids``, decoded ``text``) cut at its first stop string: (text, the tokens of the
    answer up to the stop string included (all of them without one), whether a stop string cut it)."""
    cut, hit = cut_at_stop(text, stop)
    if not hit:
        return text, len(ids), False
    need = len(cut) + min(len(s) for s in stop if text.startswith(s, len(cut)))
    lo, hi = 1, len(ids)  # the fewest tokens whose text reaches the end of the stop string
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if len(decode(ids[:mid])) >= need else (mid + 1, hi)
    return cut, lo, True


@dataclass
class RowStreams:
    """The sampler's ``on_step`` callback for a batch: each streaming row's committed prefix, handed to
    its ``push`` (called on the sampler's thread) whenever it grew. ``push``: one per batch row, None
    for rows nobody streams."""

    push: list[Callable[[list[int]], None] | None]
    mask_id: int
    eot_id: int
    seen: list[int] = field(default_factory=list)

    def __call__(self, event) -> None:
        if not self.seen:
            self.seen = [-1] * len(self.push)
        ids = event.ids.cpu().tolist()  # [B, G], one read-back per step (only when a row streams)
        for i, push in enumerate(self.push):
            if push is None:
                continue
            prefix, _ = committed_prefix(ids[i], self.mask_id, self.eot_id)
            if len(prefix) != self.seen[i]:
                self.seen[i] = len(prefix)
                push(prefix)
