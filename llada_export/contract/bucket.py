"""Static shape buckets: one engine set serves every request that fits.

Bucket sequence layout of each of the B rows (prefix then response; P = T + V slots):

    [text before <image> | V visual slots (real, then padding) | text after | text padding | G response]

Real tokens get the position ids they would have without padding (0..n-1, response
after them); padding slots are masked keys. Stage A keeps every non-visual slot and
``k_static`` visual slots, so the reduced prefix has ``T + k_static`` slots. Unpruned
engines have ``k_static == V``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields


class BucketError(ValueError):
    """Bucket dimensions that cannot be built."""


@dataclass(frozen=True)
class Bucket:
    max_text_tokens: int  # T: prompt text tokens (before + after the image, template included)
    max_visual_tokens: int  # V: visual slots
    gen_length: int  # G
    vision_batch: int  # crops per vision-graph call
    k_static: int | None = None  # visual slots kept by stage A (None: unpruned, = V)
    batch_size: int = 1  # B: requests per graph call

    def __post_init__(self) -> None:
        if self.k_static is None:
            object.__setattr__(self, "k_static", self.max_visual_tokens)
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise BucketError(f"bucket field {f.name} must be an integer, got {v!r}")
        if min(self.max_text_tokens, self.gen_length, self.vision_batch, self.batch_size) < 1:
            raise BucketError(f"bucket dimensions must be positive: {self}")
        if self.max_visual_tokens < 0 or not (self.max_visual_tokens == 0 or 1 <= self.k_static <= self.max_visual_tokens):
            raise BucketError(f"k_static {self.k_static} must be in 1..{self.max_visual_tokens}")

    @property
    def prefix_len(self) -> int:  # P
        return self.max_text_tokens + self.max_visual_tokens

    @property
    def seq_len(self) -> int:  # L
        return self.prefix_len + self.gen_length

    @property
    def reduced_prefix_len(self) -> int:  # P'
        return self.max_text_tokens + self.k_static

    @property
    def reduced_seq_len(self) -> int:  # L'
        return self.reduced_prefix_len + self.gen_length

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Bucket":
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})
