"""The sampler's view of an engine set: one batched denoiser per generation.

Pruned: stage A at the first step (it decides which visual tokens each row keeps), then the
reduced layout (``contract.layout.reduce_inputs``) for every later step. With the prefix
cache, a step is a prefill (the full (reduced) sequence, which also writes the cache) when a
row's cache is empty or due for a refresh, else a cached step (only the response rows). The
cache is the prefill graph's output buffer: on CUDA-graph backends it stays on the device and
is handed to the cached graph by reference, no copy per step. A batch whose rows disagree
(one refreshes, another not) runs both graphs that step and keeps each row's own result, so
a row's answer never depends on the other rows.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from ..contract.graphset import PRUNED_PATH, UNPRUNED_PATH
from ..contract.layout import BucketInputs, kept_visual_positions, reduce_inputs
from ..sampler import StepInfo

if TYPE_CHECKING:
    from .pipeline import Pipeline


class EngineDenoiser:
    def __init__(self, pipe: "Pipeline", x: BucketInputs, unpruned: bool, cache: bool):
        self.pipe, self.x, self.cache = pipe, x, cache
        self.path = UNPRUNED_PATH if unpruned else PRUNED_PATH
        self.reduced: BucketInputs | None = None  # after stage A
        self.kv: torch.Tensor | None = None  # [layers, 2, B, n_kv, L', hd], the prefill graph's output
        self.valid = torch.zeros(x.batch, dtype=torch.bool, device=x.key_mask.device)  # rows with a filled cache
        self._resp: torch.Tensor | None = None
        self.calls: list[tuple[str, float]] = []  # (graph, seconds) per forward

    @property
    def fused(self) -> bool:
        return self.pipe.manifest.fused_sampler

    def _response(self, ids: torch.Tensor) -> torch.Tensor:
        if self._resp is None:  # one buffer for all steps; slots past gen_length stay masked
            self._resp = torch.full((self.x.batch, self.pipe.bucket.gen_length), self.pipe.tokens.mask,
                                    dtype=torch.long, device=self.x.key_mask.device)
        self._resp[:, : ids.shape[1]] = ids
        return self._resp

    def __call__(self, response_ids: torch.Tensor, step: StepInfo, *, uncond: bool = False) -> torch.Tensor:
        return self._forward(response_ids, step, uncond)["logits"][:, : self.x.gen_length].float()  # [B, g, V]

    def predict(self, response_ids: torch.Tensor, step: StepInfo) -> tuple[torch.Tensor, torch.Tensor]:
        out = self._forward(response_ids, step, False)
        g = self.x.gen_length
        return out["x0"][:, :g], out["confidence"][:, :g].float()  # [B, g], [B, g]

    def _run(self, graph: str, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        t0 = time.perf_counter()
        out = self.pipe.run(graph, **feeds)
        if self.x.key_mask.is_cuda:
            torch.cuda.synchronize(self.x.key_mask.device)  # honest per-graph times (the sampler syncs anyway)
        self.calls.append((graph, time.perf_counter() - t0))
        return out

    def _forward(self, response_ids: torch.Tensor, step: StepInfo, uncond: bool) -> dict[str, torch.Tensor]:
        resp = self._response(response_ids)
        if self.path.first is not None and self.reduced is None:
            if uncond:
                raise RuntimeError("the conditional forward of step 1 decides the pruning; call it first")
            out = self._run(self.path.first, self.x.stage_a_feeds(resp, self.pipe.keep))
            self.reduced = reduce_inputs(self.x, out["kept_index"], out["kept_alive"])
            return out
        seq = self.reduced if self.reduced is not None else self.x
        if uncond:
            masked = self.pipe.mask_embed.expand_as(seq.prefix_embeds[0])[None].expand_as(seq.prefix_embeds)
            return self._run(self.path.full, seq.denoiser_feeds(resp) | {"prefix_embeds": masked.contiguous()})
        if not self.cache:
            return self._run(self.path.full, seq.denoiser_feeds(resp))
        need = (~self.valid | step.refresh.to(self.valid.device)) & step.active.to(self.valid.device)
        n_need, n_active = int(need.sum()), int(step.active.sum())
        if n_need == 0:
            return self._run(self.path.cached, seq.cached_feeds(resp, self.kv, step.block_start))
        if n_need == n_active:
            out = self._run(self.path.prefill, seq.denoiser_feeds(resp))
            self.kv = out["kv_cache"]
            self.valid[:] = True
            return out
        # rows disagree: the cached rows step with their old cache, the others refresh theirs
        cached = self._run(self.path.cached, seq.cached_feeds(resp, self.kv, step.block_start))
        keep = (~need).nonzero().flatten()
        saved = self.kv.index_select(2, keep)
        out = self._run(self.path.prefill, seq.denoiser_feeds(resp))
        self.kv = out["kv_cache"]
        self.kv.index_copy_(2, keep, saved)
        self.valid |= need
        return {k: torch.where(need.view(-1, *([1] * (v.dim() - 1))), out[k], v) for k, v in cached.items()}

    def kept_visual(self, row: int) -> list[int] | None:
        """Kept visual tokens of ``row`` as positions in its unpadded prompt (= their position ids)."""
        return None if self.reduced is None else kept_visual_positions(self.reduced, row)
