"""Ids of the special tokens the sampler and the graphs need (recorded in the manifest).

They are resolved from a tokenizer BY NAME (``tokenizer.special_tokens``); this type only
carries them, so the runtime and the sampler need no tokenizer to know them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class SpecialTokens:
    mask: int
    bos: int
    eos: int  # also pad
    start_header: int
    end_header: int
    eot: int

    @property
    def pad(self) -> int:
        return self.eos

    def suppressed(self) -> list[int]:
        """Ids the official sampler sets to -inf at masked positions ([eos, bos,
        start_header, end_header]); ``<|eot_id|>`` is not suppressed."""
        return [self.eos, self.bos, self.start_header, self.end_header]

    def to_dict(self) -> dict:
        return asdict(self) | {"suppressed": self.suppressed()}

    @classmethod
    def from_dict(cls, d: dict) -> "SpecialTokens":
        return cls(**{k: int(d[k]) for k in ("mask", "bos", "eos", "start_header", "end_header", "eot")})
