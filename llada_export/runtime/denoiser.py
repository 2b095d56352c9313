"""The sampler's view of an engine set: one batched denoiser per generation.

Pruned: stage A at the first step (it decides which visual tokens each row keeps), then the
reduced layout (``contract.layout.reduce_inputs``) for every later step. With the prefix
cache, a step is a prefill (the full (reduced) sequence, which also writes the cache) when a
row's cache is empty or due for a refresh, else a cached step (only the response rows). The
cache is the prefill graph's output buffer: on CUDA-graph backends it stays on the device and
is handed to the cached graph by reference, no copy per step. A batch whose rows disagree
(one refreshes, another not) runs both graphs that step and keeps each row's own result, so
a row's answer never depends on the other rows.

On the torch backends the cached graph writes the fresh K/V of the current block into that
buffer in place (``graphs.llada.cache_writer``). That reads what the concatenating form (ONNX,
the eager reference) reads because a row's cache is refreshed at the first forward of each of
its blocks (the sampler's ``refresh`` hint), so the slots before ``block_start`` that a cached
step reads are always the last refresh's, never an earlier cached step's.

A batch whose running rows fit a smaller built batch size (``--batch-sizes``) moves to that size's
graphs between two forwards (:meth:`EngineDenoiser.narrow`, called by the sampler): every per-row
state (inputs, reduced layout, cache) keeps only those rows. Graph calls made after that are named
``graph@bN`` in :attr:`EngineDenoiser.calls`.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from ..contract.graphset import PRUNED_PATH, SIZE_MARK, UNPRUNED_PATH
from ..contract.layout import BucketInputs, kept_visual_positions, reduce_inputs, take_rows
from ..sampler import StepInfo

if TYPE_CHECKING:
    from .pipeline import Pipeline


class EngineDenoiser:
    """``pipe``: the pipeline at the batch's size (``Pipeline.at_size``); ``narrow``: let the sampler move
    the batch to a smaller built size once its running rows fit one (:meth:`narrow`)."""

    def __init__(self, pipe: "Pipeline", x: BucketInputs, unpruned: bool, cache: bool, narrow: bool = True):
        self.pipe, self.x, self.cache, self.narrowing = pipe, x, cache, narrow
        self.sizes = [x.batch]  # the batch sizes this generation ran on, in order
        self.rows: list[int | None] = list(range(x.batch))  # the starting row of each row now (None: padding)
        self._kept: dict[int, list[int]] = {}  # kept visual positions of rows narrowed away, by starting row
        self._mark = ""  # appended to graph names once narrowed (``@bN``)
        self.path = UNPRUNED_PATH if unpruned else PRUNED_PATH
        self.reduced: BucketInputs | None = None  # after stage A
        self.kv: torch.Tensor | None = None  # [layers, 2, B, n_kv, L', hd], the prefill graph's output
        self.valid = [False] * x.batch  # rows with a filled cache
        self._resp: torch.Tensor | None = None
        self._calls: list[tuple[str, object, object]] = []  # (graph, start, end): CUDA events or perf_counter

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
        if self.x.key_mask.is_cuda:  # timed with CUDA events: no host sync per call
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = self.pipe.run(graph, **feeds)
            end.record()
        else:
            start = time.perf_counter()
            out = self.pipe.run(graph, **feeds)
            end = time.perf_counter()
        self._calls.append((graph + self._mark, start, end))
        return out

    @property
    def calls(self) -> list[tuple[str, float]]:
        """(graph, seconds) of every forward so far (reading CUDA events waits for the last one)."""
        if self._calls and not isinstance(self._calls[-1][1], float):
            self._calls[-1][2].synchronize()
            return [(g, a.elapsed_time(b) / 1e3) for g, a, b in self._calls]
        return [(g, b - a) for g, a, b in self._calls]

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
        need = [(not v or r) and a for v, r, a in zip(self.valid, step.refresh_rows, step.active_rows)]
        if not any(need):
            return self._run(self.path.cached, seq.cached_feeds(resp, self.kv, step.block_start))
        if need == step.active_rows:
            out = self._run(self.path.prefill, seq.denoiser_feeds(resp))
            self.kv = out["kv_cache"]
            self.valid = [True] * len(self.valid)
            return out
        # rows disagree: the cached rows step with their old cache, the others refresh theirs
        cached = self._run(self.path.cached, seq.cached_feeds(resp, self.kv, step.block_start))
        dev = self.kv.device
        keep = torch.tensor([i for i, n in enumerate(need) if not n], device=dev)
        saved = self.kv.index_select(2, keep)
        out = self._run(self.path.prefill, seq.denoiser_feeds(resp))
        self.kv = out["kv_cache"]
        self.kv.index_copy_(2, keep, saved)
        self.valid = [v or n for v, n in zip(self.valid, need)]
        rows = torch.tensor(need, device=dev)
        return {k: torch.where(rows.view(-1, *([1] * (v.dim() - 1))), out[k], v) for k, v in cached.items()}

    def narrow(self, rows: list[int]) -> int | None:
        """Keep only ``rows`` (indices of the current batch, ascending) on the smallest built batch size
        below the current one that holds them, padded with inactive copies of the first; the graphs of that
        size run from the next forward on. Returns that size, or None (narrowing off, or no smaller size
        holds them): nothing changed then."""
        fits = [n for n in self.pipe.batch_sizes if len(rows) <= n < self.x.batch] if self.narrowing else []
        if not rows or not fits:
            return None
        size = fits[0]
        pad = rows + [rows[0]] * (size - len(rows))
        if self.reduced is not None:
            self._kept.update({self.rows[i]: kept_visual_positions(self.reduced, i)
                               for i in range(self.x.batch) if self.rows[i] is not None})
            self.reduced = take_rows(self.reduced, rows, size)
        self.x = take_rows(self.x, rows, size)
        if self.kv is not None:  # [layers, 2, b', n_kv, L', hd]: a new tensor, which a CUDA-graph runner copies
            # into its captured cache buffer at each cached step until the next prefill gives back that buffer
            self.kv = self.kv.index_select(2, torch.tensor(pad, device=self.kv.device))
        self.valid = [self.valid[i] for i in pad]
        self.rows = [self.rows[i] for i in rows] + [None] * (size - len(rows))
        self.pipe, self._resp, self._mark = self.pipe.at_size(size), None, f"{SIZE_MARK}{size}"
        self.sizes.append(size)
        return size

    def kept_visual(self, row: int) -> list[int] | None:
        """Kept visual tokens of starting row ``row`` as positions in its unpadded prompt (= their position ids);
        None before stage A ran, or for a row that left the batch before it ran."""
        if row in self._kept:
            return self._kept[row]
        return None if self.reduced is None or row not in self.rows else kept_visual_positions(
            self.reduced, self.rows.index(row))
