"""The graph set as data: every graph an engine set can hold, with its inputs, outputs,
the eager oracle it is tested against and the function that builds it.

The exporter, the runtime, ``llada-compare`` and the benchmarks iterate over
:data:`GRAPHS` instead of naming graphs. Adding a graph is one :func:`register_graph`
call: its :class:`GraphSpec` names the builder (``exporter``) and the oracle
(``reference``) as ``"module:function"`` strings (or callables), so this module imports
nothing above it.

Dimension names (resolved by :class:`Dims` from the bucket and the model config):

====== =====================================================================
B      requests per call (``--batch-size``; one build per size of ``--batch-sizes``, see :func:`sized_key`)
P, L   prefix slots (text + visual) and sequence slots (P + G), unpruned
Pr, Lr the same after pruning (text + ``k_static`` visual slots)
G      response slots (``--gen-length``)
N, S   crops per vision call, crop size in pixels; T tokens per crop
D, V   hidden size, vocabulary size
NL, H  decoder layers, key/value heads; HD head dim
====== =====================================================================
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

from ..config import LLaDAVConfig
from .bucket import Bucket

COMPUTE = "compute"  # dtype placeholder: the engines' --dtype (float32, bfloat16, float16)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dims: tuple[str, ...]
    dtype: str  # "float32" | "int64" | "bool" | COMPUTE
    fill: str = "zeros"  # example value for tracing: zeros | ones | arange | mask | k_static | visual
    state: bool = False  # a device-resident buffer the runtime hands over by reference (the KV cache)


@dataclass(frozen=True)
class TensorIO:
    """A tensor of one built graph: concrete shape and dtype (as the manifest records it)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    state: bool = False

    def to_dict(self) -> dict:
        d = {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}
        return d | ({"state": True} if self.state else {})

    @classmethod
    def from_dict(cls, d: dict) -> "TensorIO":
        return cls(d["name"], tuple(int(s) for s in d["shape"]), d["dtype"], bool(d.get("state", False)))


@dataclass(frozen=True)
class GraphIO:
    inputs: tuple[TensorIO, ...]
    outputs: tuple[TensorIO, ...]

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def to_dict(self) -> dict:
        return {"inputs": [t.to_dict() for t in self.inputs], "outputs": [t.to_dict() for t in self.outputs]}

    @classmethod
    def from_dict(cls, d: dict) -> "GraphIO":
        return cls(tuple(map(TensorIO.from_dict, d["inputs"])), tuple(map(TensorIO.from_dict, d["outputs"])))


@dataclass(frozen=True)
class Selection:
    """What an export asks for; each graph's ``when`` reads it."""

    prune: bool = True
    baseline: bool = False  # also the unpruned graphs beside the pruned ones
    cache: bool = False  # the prefix-KV-cache graphs

    @property
    def unpruned(self) -> bool:
        return not self.prune or self.baseline


@dataclass(frozen=True)
class GraphSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]  # after the denoiser head, if any
    when: Callable[[Selection], bool]
    build: str | Callable  # exporter: (BuildContext) -> torch.export.ExportedProgram
    oracle: str | Callable | None  # reference: (model, feeds, OracleContext) -> tuple of outputs
    denoiser: bool = True  # outputs start with the head: logits, or x0 + confidence (--fuse-sampler)
    doc: str = ""

    def io(self, dims: "Dims", fused: bool = False) -> GraphIO:
        head = (FUSED_HEAD if fused else LOGITS_HEAD) if self.denoiser else ()
        return GraphIO(tuple(dims.resolve(t) for t in self.inputs),
                       tuple(dims.resolve(t) for t in head + self.outputs))


@dataclass(frozen=True)
class Dims:
    values: dict[str, int]
    compute_dtype: str = "float32"

    @classmethod
    def of(cls, bucket: Bucket, cfg: LLaDAVConfig, compute_dtype: str = "float32") -> "Dims":
        t, v = cfg.text, cfg.vision
        return cls({
            "B": bucket.batch_size, "P": bucket.prefix_len, "L": bucket.seq_len, "Pr": bucket.reduced_prefix_len,
            "Lr": bucket.reduced_seq_len, "G": bucket.gen_length, "N": bucket.vision_batch,
            "S": v.image_size, "T": v.tokens_per_crop, "C": 3, "D": t.hidden_size, "V": t.vocab_size,
            "NL": t.num_hidden_layers, "H": t.num_key_value_heads, "HD": t.head_dim, "two": 2,
        }, compute_dtype)

    def resolve(self, t: TensorSpec) -> TensorIO:
        dtype = self.compute_dtype if t.dtype == COMPUTE else t.dtype
        return TensorIO(t.name, tuple(self.values[d] for d in t.dims), dtype, t.state)


# ---------------------------------------------------------------------- several batch sizes
SIZE_MARK = "@b"  # "stage_b@b2": graph stage_b built at batch size 2 (a directory's largest size keeps plain names)


def sized_key(name: str, batch: int, largest: int) -> str:
    """The manifest key (and artifact file stem) of graph ``name`` built at batch size ``batch`` in a
    directory whose largest size is ``largest``: the plain name at the largest size, ``name@bN`` below."""
    return name if batch == largest else f"{name}{SIZE_MARK}{batch}"


def split_key(key: str) -> tuple[str, int | None]:
    """``"stage_b@b2"`` -> ``("stage_b", 2)``; a plain name -> ``(name, None)`` (the largest size, or a
    graph without a batch dimension). ValueError for a malformed size."""
    name, mark, size = key.partition(SIZE_MARK)
    if not mark:
        return key, None
    if not size.isdigit() or int(size) < 1 or str(int(size)) != size:
        raise ValueError(f"graph key {key!r}: the batch size after {SIZE_MARK!r} must be a positive integer")
    return name, int(size)


def batched(spec: "GraphSpec") -> bool:
    """Whether ``spec``'s graph has a batch dimension (one build per batch size); the vision graph has not."""
    return any("B" in t.dims for t in spec.inputs + spec.outputs)


def resolve(ref: str | Callable | None) -> Callable | None:
    """``"package.module:function"`` -> the function (imported on first use)."""
    if ref is None or callable(ref):
        return ref
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


# ---------------------------------------------------------------------- the built-in graphs
def _t(name: str, dims: str, dtype: str, fill: str = "zeros", state: bool = False) -> TensorSpec:
    return TensorSpec(name, tuple(dims.split()), dtype, fill, state)


LOGITS_HEAD = (_t("logits", "B G V", "float32"),)
FUSED_HEAD = (_t("x0", "B G", "int64"), _t("confidence", "B G", "float32"))


def _denoiser_inputs(p: str, l: str) -> tuple[TensorSpec, ...]:
    return (_t("prefix_embeds", f"B {p} D", "float32"), _t("response_ids", "B G", "int64", "mask"),
            _t("position_ids", f"B {l}", "int64", "arange"), _t("key_mask", f"B {l}", "bool", "ones"))


def _cached_inputs(l: str) -> tuple[TensorSpec, ...]:
    return (_t("response_ids", "B G", "int64", "mask"), _t("position_ids", "B G", "int64", "arange"),
            _t("key_mask", f"B {l}", "bool", "ones"), _t("kv_cache", f"NL two B H {l} HD", COMPUTE, state=True),
            _t("block_start", "B", "int64"))


def _kv(l: str) -> TensorSpec:
    return _t("kv_cache", f"NL two B H {l} HD", COMPUTE, state=True)


GRAPHS: dict[str, GraphSpec] = {}


def register_graph(spec: GraphSpec) -> GraphSpec:
    """Add a graph to the set (a later registration of the same name replaces it)."""
    GRAPHS[spec.name] = spec
    return spec


def unregister_graph(name: str) -> None:
    GRAPHS.pop(name, None)


def graphs_for(sel: Selection) -> list[GraphSpec]:
    return [g for g in GRAPHS.values() if g.when(sel)]


_B, _R = "llada_export.exporter.programs:", "llada_export.reference:"
VISION, STAGE_A, STAGE_B, UNPRUNED = "vision", "stage_a", "stage_b", "unpruned"
PREFILL, CACHED, UNPRUNED_PREFILL, UNPRUNED_CACHED = "prefill", "cached", "unpruned_prefill", "unpruned_cached"

register_graph(GraphSpec(
    VISION, (_t("pixel_values", "N C S S", "float32"),), (_t("features", "N T D", "float32"),),
    when=lambda s: True, build=_B + "build_vision", oracle=_R + "oracle_vision", denoiser=False,
    doc="SigLIP tower + projector on a fixed batch of crops"))
register_graph(GraphSpec(
    STAGE_A, _denoiser_inputs("P", "L") + (_t("visual_mask", "B L", "bool", "visual"),
                                           _t("num_keep", "B", "int64", "k_static")),
    (_t("kept_index", "B Lr", "int64"), _t("kept_alive", "B Lr", "bool")),
    when=lambda s: s.prune, build=_B + "build_stage_a", oracle=_R + "oracle_stage_a",
    doc="step 1: layers < K on the full sequence, top-k visual tokens at layer K, the rest reduced"))
register_graph(GraphSpec(
    STAGE_B, _denoiser_inputs("Pr", "Lr"), (), when=lambda s: s.prune, build=_B + "build_stage_b",
    oracle=_R + "oracle_denoiser", doc="every later step on the reduced sequence"))
register_graph(GraphSpec(
    UNPRUNED, _denoiser_inputs("P", "L"), (), when=lambda s: s.unpruned, build=_B + "build_unpruned",
    oracle=_R + "oracle_denoiser", doc="the unpruned denoiser (every step on the full sequence)"))
register_graph(GraphSpec(
    PREFILL, _denoiser_inputs("Pr", "Lr"), (_kv("Lr"),), when=lambda s: s.prune and s.cache,
    build=_B + "build_prefill", oracle=_R + "oracle_prefill",
    doc="stage B that also returns every layer's K/V (after RoPE): fills the prefix cache"))
register_graph(GraphSpec(
    CACHED, _cached_inputs("Lr"), (), when=lambda s: s.prune and s.cache, build=_B + "build_cached",
    oracle=_R + "oracle_cached", doc="only the G response rows; keys = cached prefix (+ earlier blocks) + fresh"))
register_graph(GraphSpec(
    UNPRUNED_PREFILL, _denoiser_inputs("P", "L"), (_kv("L"),), when=lambda s: s.unpruned and s.cache,
    build=_B + "build_unpruned_prefill", oracle=_R + "oracle_prefill", doc="prefill at the unpruned length"))
register_graph(GraphSpec(
    UNPRUNED_CACHED, _cached_inputs("L"), (), when=lambda s: s.unpruned and s.cache,
    build=_B + "build_unpruned_cached", oracle=_R + "oracle_cached", doc="cached step at the unpruned length"))


@dataclass(frozen=True)
class DecodePath:
    """The graphs one generation mode runs: ``first`` at step 1 (pruning) if any, ``full``
    for an uncached step (or a cache refresh without a cache), ``prefill`` / ``cached`` with
    the prefix cache."""

    first: str | None
    full: str
    prefill: str
    cached: str


PRUNED_PATH = DecodePath(STAGE_A, STAGE_B, PREFILL, CACHED)
UNPRUNED_PATH = DecodePath(None, UNPRUNED, UNPRUNED_PREFILL, UNPRUNED_CACHED)


def example_value(t: TensorIO, spec: TensorSpec, extra: dict[str, Any]) -> Any:
    """An example tensor for tracing (``extra``: mask_id, k_static, n_visual, device)."""
    import torch

    dtype = {"float32": torch.float32, "int64": torch.int64, "bool": torch.bool, "bfloat16": torch.bfloat16,
             "float16": torch.float16}[t.dtype]
    dev, shape = extra["device"], t.shape
    if spec.fill == "mask":
        return torch.full(shape, extra["mask_id"], dtype=dtype, device=dev)
    if spec.fill == "ones":
        return torch.ones(shape, dtype=dtype, device=dev)
    if spec.fill == "arange":
        return torch.arange(shape[-1], device=dev).expand(shape).to(dtype).contiguous()
    if spec.fill == "k_static":
        return torch.full(shape, extra["k_static"], dtype=dtype, device=dev)
    if spec.fill == "visual":
        out = torch.zeros(shape, dtype=dtype, device=dev)
        out[..., : extra["n_visual"]] = True
        return out
    return torch.zeros(shape, dtype=dtype, device=dev)
