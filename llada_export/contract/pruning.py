"""LLaDA-FastV pruning settings: one type, validated in one place, from the CLI to the manifest.

``PruneSettings(layer=K, keep=0.35, score_from="response")``: in the first denoising step,
at decoder layer K, rank the visual tokens by the attention they receive from the
``score_from`` queries and keep ``round(keep * n_visual)`` of them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

SCORE_SOURCES = ("response", "text", "last")
"""Which query positions' attention ranks the visual tokens:

- ``response``: the still-masked response positions (RedVTP; our default),
- ``text``: every real non-visual position (prompt text and response),
- ``last``: the last real prompt token (FastV's choice for autoregressive models).
"""


class PruneSettingsError(ValueError):
    """Pruning settings that cannot be used (layer out of range, keep outside (0, 1], ...)."""


def num_kept(keep: float, n_visual: int) -> int:
    """k = round(keep * n_visual), at least one token (round half away from zero)."""
    if not 0.0 < keep <= 1.0:
        raise PruneSettingsError(f"keep must be in (0, 1], got {keep}")
    return max(1, min(n_visual, int(math.floor(keep * n_visual + 0.5))))


@dataclass(frozen=True)
class PruneSettings:
    layer: int  # K: layers < K see every visual token
    keep: float  # fraction of the visual tokens kept
    score_from: str = "response"

    def validate(self, n_layers: int | None = None) -> "PruneSettings":
        """Check the settings (and the layer against a model of ``n_layers`` decoder layers)."""
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0:
            raise PruneSettingsError(f"prune layer must be an integer >= 0, got {self.layer!r}")
        if n_layers is not None and self.layer >= n_layers:
            raise PruneSettingsError(
                f"prune layer {self.layer} is out of range: the model has layers 0..{n_layers - 1}")
        if not isinstance(self.keep, (int, float)) or not 0.0 < self.keep <= 1.0:
            raise PruneSettingsError(f"keep must be in (0, 1], got {self.keep!r}")
        if self.score_from not in SCORE_SOURCES:
            raise PruneSettingsError(
                f"score source must be one of {', '.join(SCORE_SOURCES)}, got {self.score_from!r}")
        return self

    def k_static(self, n_visual_slots: int) -> int:
        """Visual slots an engine keeps for a bucket of ``n_visual_slots``."""
        return num_kept(self.keep, n_visual_slots)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PruneSettings":
        return cls(int(d["layer"]), float(d["keep"]), str(d.get("score_from", "response"))).validate()
