"""Static shape buckets: one engine set serves every request that fits.

Bucket sequence layout (prefix then response; P = T + V slots):

    [text before <image> | V visual slots (real, then padding) | text after | text padding | G response]

Real tokens get the position ids they would have without padding (0..n-1, response
after them); padding slots are masked keys. Stage A keeps every non-visual slot and
``k_static`` visual slots, so stage B's reduced prefix has ``T + k_static`` slots.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..graphs.pruning import num_kept


@dataclass(frozen=True)
class Bucket:
    max_text_tokens: int  # T: prompt text tokens (before + after the image, template included)
    max_visual_tokens: int  # V: visual slots
    gen_length: int  # G
    vision_batch: int  # crops per vision-engine call
    keep: float = 1.0
    prune: bool = True

    @property
    def prefix_len(self) -> int:
        return self.max_text_tokens + self.max_visual_tokens

    @property
    def seq_len(self) -> int:
        return self.prefix_len + self.gen_length

    @property
    def k_static(self) -> int:
        return num_kept(self.keep, self.max_visual_tokens) if self.prune else self.max_visual_tokens

    @property
    def reduced_prefix_len(self) -> int:
        return self.max_text_tokens + self.k_static

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(prefix_len=self.prefix_len, seq_len=self.seq_len, k_static=self.k_static,
                 reduced_prefix_len=self.reduced_prefix_len)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Bucket":
        return cls(**{k: d[k] for k in ("max_text_tokens", "max_visual_tokens", "gen_length", "vision_batch",
                                         "keep", "prune")})
