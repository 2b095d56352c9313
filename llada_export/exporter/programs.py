"""torch.export programs for every graph of the graph set (one builder per graph, named there).

The denoiser and the prefill forward are each traced ONCE with a symbolic prefix length;
stage A is the traced denoiser rewritten by the FX pruning pass, stage B and the unpruned
graph are the same program re-exported at static shapes (the prefill graphs likewise); the
cached-step graphs are exported directly (their only length is static).

Every denoiser graph is built from ONE fused copy of the language model
(``graphs.fused.fuse_projections``: q/k/v and gate/up as one GEMM each), made once per build so
that all graphs hold the same fused tensors (one copy in the ONNX weights file, one checkpoint
mapping). The cached-step graphs come in two programs: the functional one (ONNX) and
``inplace`` (the torch backends), which writes the fresh K/V into its ``kv_cache`` input instead
of concatenating the whole cache every layer (``BuildContext.variants``, see ``INPLACE``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..contract.bucket import Bucket
from ..contract.graphset import GRAPHS, Dims, GraphIO, example_value
from ..contract.pruning import PruneSettings
from ..contract.tokens import SpecialTokens
from ..graphs.fused import fuse_projections, share_storage
from ..graphs.llada import CachedGraph, DenoiserGraph, Head, LanguageModel, PrefillGraph
from ..graphs.llava import LLaDAV
from ..graphs.vision import VisionGraph
from ..passes.prune import insert_pruning


@dataclass
class BuildContext:
    """What every builder needs: the model, the bucket, the settings; traced programs memoized."""

    model: LLaDAV
    bucket: Bucket
    dims: Dims
    tokens: SpecialTokens
    prune: PruneSettings | None
    fused: bool
    device: torch.device
    # the model is the build's own: its q/k/v and gate/up weights become views of the fused ones (one copy in
    # memory). Off for a caller's model (export_engines(loaded=...)), whose tensors the caller may hold apart
    share_storage: bool = False
    unmasked_cache: bool = True  # the in-place cached step attends without the mask (ops/padded_attention)
    _traced: dict[str, torch.export.ExportedProgram] = field(default_factory=dict)
    _language: LanguageModel | None = None
    # other programs of a graph, by variant (INPLACE: the cached step writing into its kv_cache input)
    variants: dict[str, dict[str, torch.export.ExportedProgram]] = field(default_factory=dict)
    _examples: dict[str, tuple[torch.Tensor, ...]] = field(default_factory=dict)

    @property
    def fused_language(self) -> LanguageModel | None:
        """The fused language model if a graph was built from it, else None."""
        return self._language

    @property
    def language(self) -> LanguageModel:
        """The language model every denoiser graph traces: the model's, projections fused (made once). With
        ``share_storage`` the model's own q/k/v and gate/up weights become views of the fused ones: the build
        holds one copy of the weights, not the checkpoint's plus the fused."""
        if self._language is None:
            self._language = fuse_projections(self.model.language)
            if self.share_storage:
                share_storage(self.model.language, self._language)
        return self._language

    def head(self) -> Head:
        return Head((self.tokens.suppressed(), self.tokens.mask) if self.fused else None,
                    self.model.config.text.vocab_size, self.device)

    def io(self, graph: str) -> GraphIO:
        return GRAPHS[graph].io(self.dims, self.fused)

    def fill(self) -> dict:
        """What the example inputs need besides shapes (``contract.graphset.example_value``)."""
        return dict(mask_id=self.tokens.mask, k_static=self.bucket.k_static, n_visual=self.bucket.max_visual_tokens)

    def examples(self, graph: str) -> tuple[torch.Tensor, ...]:
        """The example inputs of ``graph``, made once: every program traced from them keeps them
        (``ExportedProgram.example_inputs``), so the cached step's two programs (functional, in place) and the
        precompile share one example KV cache (30 GiB unpruned at B = 16) instead of holding one each."""
        if graph not in self._examples:
            spec = GRAPHS[graph]
            extra = dict(device=self.device, **self.fill())
            self._examples[graph] = tuple(example_value(t, s, extra)
                                          for t, s in zip(spec.io(self.dims, self.fused).inputs, spec.inputs))
        return self._examples[graph]

    def traced(self, kind: str) -> torch.export.ExportedProgram:
        """The denoiser (``"denoiser"``) or the prefill forward (``"prefill"``) with a symbolic prefix
        length P (sequence length P + G), traced once."""
        if kind not in self._traced:
            cls = PrefillGraph if kind == "prefill" else DenoiserGraph
            module = cls(self.language, self.head())
            g = self.bucket.gen_length
            p = torch.export.Dim("prefix", min=2, max=max(self.bucket.prefix_len, 4))
            shapes = ({1: p}, None, {1: p + g}, {1: p + g})
            with torch.no_grad():
                self._traced[kind] = torch.export.export(module, self.examples("unpruned"), dynamic_shapes=shapes)
        return self._traced[kind]

    def static(self, kind: str, graph: str) -> torch.export.ExportedProgram:
        """The traced ``kind`` re-exported at the static shapes of ``graph``."""
        with torch.no_grad():
            return torch.export.export(self.traced(kind).module(), self.examples(graph))


def build_vision(ctx: BuildContext) -> torch.export.ExportedProgram:
    m = ctx.model.model
    with torch.no_grad():
        return torch.export.export(VisionGraph(m.vision_tower, m.mm_projector, torch.float32), ctx.examples("vision"))


def build_stage_a(ctx: BuildContext) -> torch.export.ExportedProgram:
    gm = insert_pruning(ctx.traced("denoiser"), ctx.prune, n_visual_slots=ctx.bucket.max_visual_tokens,
                        k_static=ctx.bucket.k_static, mask_id=ctx.tokens.mask)
    with torch.no_grad():
        return torch.export.export(gm, ctx.examples("stage_a"))


def build_stage_b(ctx: BuildContext) -> torch.export.ExportedProgram:
    return ctx.static("denoiser", "stage_b")


def build_unpruned(ctx: BuildContext) -> torch.export.ExportedProgram:
    return ctx.static("denoiser", "unpruned")


def build_prefill(ctx: BuildContext) -> torch.export.ExportedProgram:
    return ctx.static("prefill", "prefill")


def build_unpruned_prefill(ctx: BuildContext) -> torch.export.ExportedProgram:
    return ctx.static("prefill", "unpruned_prefill")


INPLACE = "inplace"  # the variant of a cached-step program that the torch backends (aoti, inductor) write


def _cached(ctx: BuildContext, graph: str) -> torch.export.ExportedProgram:
    """The functional program (returned) and the in-place one (``ctx.variants[INPLACE][graph]``)."""
    with torch.no_grad():
        inplace = torch.export.export(CachedGraph(ctx.language, ctx.head(), inplace=True, unmasked=ctx.unmasked_cache),
                                      ctx.examples(graph))
        ctx.variants.setdefault(INPLACE, {})[graph] = inplace
        return torch.export.export(CachedGraph(ctx.language, ctx.head()), ctx.examples(graph))



def build_cached(ctx: BuildContext) -> torch.export.ExportedProgram:
    return _cached(ctx, "cached")


def build_unpruned_cached(ctx: BuildContext) -> torch.export.ExportedProgram:
    return _cached(ctx, "unpruned_cached")


def user_input_values(ep: torch.export.ExportedProgram) -> list:
    """The fake values (shape, dtype) of a program's user inputs, in order."""
    specs = [s for s in ep.graph_signature.input_specs if s.kind == torch.export.graph_signature.InputKind.USER_INPUT]
    nodes = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    return [nodes[s.arg.name].meta["val"] for s in specs]


def check_program(ep: torch.export.ExportedProgram, io: GraphIO, graph: str) -> None:
    """The program's inputs must be what the graph set says (a mismatch is a bug in a builder)."""
    got = [(tuple(v.shape), str(v.dtype).removeprefix("torch.")) for v in user_input_values(ep)]
    want = [(t.shape, t.dtype) for t in io.inputs]
    if got != want:
        raise RuntimeError(f"internal: graph {graph} was built with inputs {got}, the graph set says {want}")
