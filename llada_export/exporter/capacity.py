"""Memory per request and the largest batch that fits a device: arithmetic on the shapes, no allocation.

One source of truth for the export's memory check (``build.check_memory``), ``llada-export
--batch-sizes auto`` and ``tools/kv_capacity.py``. Every number comes from the graph set's
tensor shapes (``contract.graphset``) at batch size 1, the model config and the dtype:

- **KV cache** (``kv``): the ``kv_cache`` state of the cache graphs, ``layers x 2 x n_kv x
  head_dim x positions x dtype bytes`` per request, positions = ``P' + G`` pruned, ``P + G``
  unpruned. The runtime holds it between calls.
- **held inputs**: the ``prefix_embeds`` a request keeps for its whole generation (fp32, full
  length; the pruned path also the reduced ones).
- **one call** of each graph, per request: its other inputs and outputs (logits, ids, masks; a
  prefill's new cache, which replaces the held one only when the call returns, and the layers' K/V
  it stacks into that cache, alive beside it while it stacks), plus one layer's
  activations (hidden states and the MLP's two projections, ``2 x 4 x rows x (D + I)`` bytes,
  rows = positions the graph computes) and, for stage A, the layer-K attention scores it
  materialises to rank the visual tokens (logits and probabilities, fp32, ``2 x H x Lq x L x 4``;
  Lq = G for ``score_from="response"``, else L).

A batch of B requests then needs ``weights + B x (kv + held) + max(vision call, B x largest
call)`` plus a headroom (allocator fragmentation, CUDA graph pools, library workspaces; a
fraction of the device). It is a model: ``tools/kv_capacity.py --measure`` sets it beside what
CUDA allocates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from ..checkpoint.io import expected_shapes
from ..config import LLaDAVConfig
from ..contract.bucket import Bucket
from ..contract.graphset import (PRUNED_PATH, STAGE_A, UNPRUNED_PATH, Dims, GraphSpec, Selection, TensorIO,
                                 graphs_for)
from ..contract.pruning import PruneSettings

ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "bool": 1}
HEADROOM = 0.05  # of the device's memory, kept free when sizing serving batches
HELD = "prefix_embeds"  # inputs a request keeps between calls (with the kv_cache state)
# A graph that returns a cache holds it twice at its peak: the layers' K/V and the cache they are stacked into.
# The eager prefill on an H100 peaked 6-8% below this count and 29-35% above the count of one copy
# (benchmarks/kv_capacity_h100.md); ONNX Runtime's Concat keeps its inputs alike; Inductor may write some
# layers into the output directly, so for it this errs on the safe side.
KV_OUT_COPIES = 2


def tensor_bytes(t: TensorIO) -> int:
    return math.prod(t.shape) * ITEMSIZE[t.dtype]


def weight_bytes(cfg: LLaDAVConfig, dtype: str) -> int:
    """Bytes of every checkpoint tensor in ``dtype`` (one copy, as the engines load them)."""
    return sum(map(math.prod, expected_shapes(cfg).values())) * ITEMSIZE[dtype]


@dataclass(frozen=True)
class GraphMemory:
    """One graph's memory, per request (``per_request`` False: the vision graph, per call)."""

    name: str
    rows: int  # positions the graph computes (sequence, or G for a cached step, crops x tokens for vision)
    io: int  # inputs and outputs, the kv_cache state and the held prefix_embeds excluded
    held: int  # its prefix_embeds input (the request keeps them)
    kv: int  # its kv_cache input or output (0: none)
    kv_out: bool  # the kv_cache is an output: a new cache beside the held one until the call returns
    activations: int  # one layer's transients, and stage A's attention scores
    per_request: bool = True

    @property
    def call(self) -> int:
        """One call alone (as the export's tracing examples allocate it): everything."""
        return self.io + self.held + self.kv + self.activations

    @property
    def transient(self) -> int:
        """What the call needs beyond what the request holds anyway (its cache, its prefix)."""
        return self.io + self.activations + (KV_OUT_COPIES * self.kv if self.kv_out else 0)


def graph_memory(spec: GraphSpec, bucket: Bucket, cfg: LLaDAVConfig, dtype: str, fused: bool = False,
                 prune: PruneSettings | None = None) -> GraphMemory:
    """``spec``'s memory at ``bucket`` (read per request: build it at batch size 1)."""
    io = spec.io(Dims.of(bucket, cfg, dtype), fused)
    kv = sum(tensor_bytes(t) for t in io.inputs + io.outputs if t.state)
    held = sum(tensor_bytes(t) for t in io.inputs if t.name == HELD)
    plain = sum(tensor_bytes(t) for t in io.inputs + io.outputs if not t.state) - held
    if spec.denoiser:  # rows computed per request: the position ids [B, L] ([B, G] response rows for a cached step)
        pos = next(t for t in io.inputs if t.name == "position_ids")
        width, rows = cfg.text.hidden_size + cfg.text.intermediate_size, math.prod(pos.shape) // bucket.batch_size
    else:  # vision: N crops of T tokens
        width, rows = cfg.vision.hidden_size + cfg.vision.intermediate_size, bucket.vision_batch * cfg.vision.tokens_per_crop
    act = 2 * 4 * rows * width * (bucket.batch_size if spec.denoiser else 1)
    if spec.name == STAGE_A:  # the scores of layer K: [B, H, Lq, L] logits and probabilities, fp32
        lq = bucket.gen_length if prune is None or prune.score_from == "response" else bucket.seq_len
        act += 2 * 4 * bucket.batch_size * cfg.text.num_attention_heads * lq * bucket.seq_len
    return GraphMemory(spec.name, rows, plain, held, kv, any(t.state for t in io.outputs), act,
                       per_request=spec.denoiser)


def graph_memories(selection: Selection, bucket: Bucket, cfg: LLaDAVConfig, dtype: str, fused: bool = False,
                   prune: PruneSettings | None = None) -> dict[str, GraphMemory]:
    """Every selected graph's memory at ``bucket``'s batch size."""
    return {s.name: graph_memory(s, bucket, cfg, dtype, fused, prune) for s in graphs_for(selection)}


def largest_call(selection: Selection, bucket: Bucket, cfg: LLaDAVConfig, dtype: str, fused: bool = False,
                 prune: PruneSettings | None = None) -> tuple[str, int]:
    """The graph whose one call at ``bucket``'s batch size needs the most memory, and those bytes."""
    mems = graph_memories(selection, bucket, cfg, dtype, fused, prune)
    worst = max(mems.values(), key=lambda m: m.call)
    return worst.name, worst.call


@dataclass(frozen=True)
class PathCapacity:
    """What one request of a decoding path needs on the device, and how many fit."""

    path: str  # "pruned" | "unpruned"
    cache: bool
    kv_positions: int  # cache slots per request: P' + G pruned, P + G unpruned (0 without cache)
    kv: int  # KV cache bytes per request
    held: int  # prefix embeddings a request keeps (bytes)
    graphs: dict[str, GraphMemory]  # the path's graphs, per request
    vision: int  # one vision call (per call, not per request)
    weights: int

    @property
    def peak_graph(self) -> str:
        return max(self.graphs.values(), key=lambda m: m.transient).name

    @property
    def per_request(self) -> int:
        """Held (KV, prefix) + the largest call's transients, per request."""
        return self.kv + self.held + self.graphs[self.peak_graph].transient

    def need(self, batch: int, headroom: int = 0) -> int:
        """Bytes for a batch of ``batch`` requests, weights and headroom included."""
        g = self.graphs[self.peak_graph].transient
        return self.weights + headroom + batch * (self.kv + self.held) + max(self.vision, batch * g)

    def largest_batch(self, memory: int, headroom: int = 0) -> int:
        """The largest batch whose ``need`` fits ``memory`` bytes (0: not even one request)."""
        if self.need(1, headroom) > memory:
            return 0
        lo, hi = 1, 2
        while self.need(hi, headroom) <= memory:  # need grows with the batch: double, then bisect
            lo, hi = hi, hi * 2
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if self.need(mid, headroom) <= memory else (lo, mid)
        return lo

    def to_dict(self, memory: int | None = None, headroom: int = 0) -> dict:
        d = {"path": self.path, "cache": self.cache, "kv_positions": self.kv_positions, "kv_bytes": self.kv,
             "held_bytes": self.held, "weights_bytes": self.weights, "vision_call_bytes": self.vision,
             "peak_graph": self.peak_graph, "per_request_bytes": self.per_request,
             "graphs": {n: {"rows": m.rows, "io_bytes": m.io, "held_bytes": m.held, "kv_bytes": m.kv,
                            "activation_bytes": m.activations, "transient_bytes": m.transient}
                        for n, m in self.graphs.items()}}
        if memory is not None:
            d |= {"device_bytes": memory, "headroom_bytes": headroom,
                  "largest_batch": self.largest_batch(memory, headroom)}
        return d


def path_capacity(path: str, bucket: Bucket, cfg: LLaDAVConfig, dtype: str, *, cache: bool = True,
                  fused: bool = False, prune: PruneSettings | None = None) -> PathCapacity:
    """The ``"pruned"`` (needs ``prune``) or ``"unpruned"`` decoding path's memory. ``bucket`` is
    planned for the pruned engines (``k_static``); the unpruned path reads its full-length graphs."""
    if path not in ("pruned", "unpruned"):
        raise ValueError(f"path must be 'pruned' or 'unpruned', got {path!r}")
    if path == "pruned" and prune is None:
        raise ValueError("the pruned path needs the pruning settings")
    one = replace(bucket, batch_size=1)
    sel = Selection(prune=path == "pruned", baseline=False, cache=cache)
    mems = graph_memories(sel, one, cfg, dtype, fused, prune)
    names = PRUNED_PATH if path == "pruned" else UNPRUNED_PATH
    wanted = [names.first, names.full] + ([names.prefill, names.cached] if cache else [])
    graphs = {n: mems[n] for n in wanted if n is not None}
    positions = (one.reduced_seq_len if path == "pruned" else one.seq_len) if cache else 0
    held = one.prefix_len * cfg.text.hidden_size * 4 + (one.reduced_prefix_len * cfg.text.hidden_size * 4
                                                        if path == "pruned" else 0)
    kv = max((m.kv for m in graphs.values()), default=0)
    return PathCapacity(path, cache, positions, kv, held, graphs, mems["vision"].call, weight_bytes(cfg, dtype))


def kv_bytes(cfg: LLaDAVConfig, positions: int, dtype: str) -> int:
    """``layers x 2 x n_kv x head_dim x positions x dtype bytes``: one request's cache, by the formula
    (``path_capacity`` reads the same from the graphs' ``kv_cache`` shapes)."""
    t = cfg.text
    return t.num_hidden_layers * 2 * t.num_key_value_heads * t.head_dim * positions * ITEMSIZE[dtype]


def headroom_bytes(memory: int, fraction: float = HEADROOM) -> int:
    return int(memory * fraction)


def powers_of_two(largest: int) -> tuple[int, ...]:
    """The powers of two up to ``largest``: 1, 2, 4, ... (empty below 1)."""
    return tuple(2**i for i in range(largest.bit_length())) if largest >= 1 else ()
