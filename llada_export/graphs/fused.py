"""Fused projections for the exported graphs: q/k/v as one linear, gate/up as one.

A cached step at batch 1 reads every weight once for 128 rows, so it is bound by the weight
reads and by the number of GEMM launches: one [H*hd + 2*n_kv*hd, D] GEMM instead of three and
one [2*I, D] instead of two. :func:`fuse_projections` returns a :class:`LanguageModel` whose
layers compute exactly what the eager layers compute, from fused COPIES of the weights; the
checkpoint layout and the eager model (the oracle) are untouched, and everything else (the
embeddings, norms, o_proj, down_proj, lm_head) is shared, not copied. Module paths stay
``layers.N.self_attn`` / ``layers.N.mlp`` so the FX pruning pass still finds layer K.

:data:`FUSED_SOURCES` names, for each fused weight, the weights it concatenates (module paths
under the language model), so a build that leaves its weights in the checkpoint can map a fused
constant to its parts (``fused_weights``).
"""

from __future__ import annotations

import torch
from torch import nn

from .llada import MLP, Attention, DecoderLayer, LanguageModel

FUSED_SOURCES = {  # fused linear -> the linears it stacks along its output dim, in order
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
}


def _stacked(linears: list[nn.Linear]) -> nn.Linear:
    w = torch.cat([m.weight.detach() for m in linears], dim=0)  # [sum(out), in]
    out = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
    out.weight = nn.Parameter(w, requires_grad=False)
    return out


class FusedAttention(Attention):
    """:class:`Attention` with q/k/v from one GEMM (``qkv_proj``); o_proj shared with the source."""

    def __init__(self, src: Attention):
        nn.Module.__init__(self)
        self.n_heads, self.n_kv, self.head_dim = src.n_heads, src.n_kv, src.head_dim
        self.qkv_proj = _stacked([src.q_proj, src.k_proj, src.v_proj])  # [(H + 2 n_kv) hd, D]
        self.o_proj = src.o_proj

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q_w, kv_w = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        q, k, v = self.qkv_proj(x).split([q_w, kv_w, kv_w], dim=-1)  # [B, L, H*hd], [B, L, n_kv*hd] x2
        return q, k, v


class FusedMLP(MLP):
    """:class:`MLP` with gate/up from one GEMM (``gate_up_proj``); down_proj shared with the source."""

    def __init__(self, src: MLP):
        nn.Module.__init__(self)
        self.gate_up_proj = _stacked([src.gate_proj, src.up_proj])  # [2 I, D]
        self.down_proj = src.down_proj

    def _gate_up(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # [B, L, I] x2
        return gate, up


def _fused_layer(src: DecoderLayer) -> DecoderLayer:
    layer = DecoderLayer.__new__(DecoderLayer)
    nn.Module.__init__(layer)
    layer.self_attn, layer.mlp = FusedAttention(src.self_attn), FusedMLP(src.mlp)
    layer.input_layernorm, layer.post_attention_layernorm = src.input_layernorm, src.post_attention_layernorm
    return layer


def fuse_projections(lm: LanguageModel) -> LanguageModel:
    """A language model computing what ``lm`` computes with fused q/k/v and gate/up weights (new
    tensors, made once: build it once per export and give it to every denoiser graph so that all
    graphs hold the same fused tensors); every other module is ``lm``'s own."""
    fused = LanguageModel.__new__(LanguageModel)
    nn.Module.__init__(fused)
    fused.embed_tokens, fused.norm, fused.lm_head, fused.rotary = lm.embed_tokens, lm.norm, lm.lm_head, lm.rotary
    fused.layers = nn.ModuleList(_fused_layer(layer) for layer in lm.layers)
    return fused.train(lm.training)


def share_storage(lm: LanguageModel, fused: LanguageModel) -> None:
    """Make ``lm``'s q/k/v and gate/up weights views of ``fused``'s (its :func:`fuse_projections`): the same
    values, one copy in memory instead of two (the export holds the model and the fused graphs' weights
    at once). ``lm`` computes exactly what it did; its state dict's tensors then share storage."""
    for src, dst in zip(lm.layers, fused.layers):
        for name, parts in FUSED_SOURCES.items():
            rows = 0
            for part in parts:
                linear = src.get_submodule(part)
                n = linear.weight.shape[0]
                view = dst.get_submodule(name).weight.detach()[rows: rows + n]  # [n, in], contiguous
                linear.weight = nn.Parameter(view, requires_grad=linear.weight.requires_grad)
                rows += n


def fused_weights(fused: LanguageModel, prefix: str) -> dict[str, torch.Tensor]:
    """{key: fused weight}, the key naming the checkpoint tensors it concatenates: ``cat(a,b,c)``
    with ``a`` = ``{prefix}layers.N.self_attn.q_proj.weight`` ... (``prefix``: where the layers sit in
    the checkpoint, ``model.`` for LLaDA-V); :func:`resolve_weight` rebuilds it from a checkpoint."""
    out = {}
    for i, layer in enumerate(fused.layers):
        for name, parts in FUSED_SOURCES.items():
            key = "cat(" + ",".join(f"{prefix}layers.{i}.{p}.weight" for p in parts) + ")"
            out[key] = layer.get_submodule(name).weight
    return out


def resolve_weight(weights: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    """``weights[key]``, where a ``cat(a,b,...)`` key is the concatenation of the named tensors along
    dim 0, made once and memoized in ``weights`` (all graphs then share that one tensor)."""
    if key not in weights and key.startswith("cat(") and key.endswith(")"):
        weights[key] = torch.cat([weights[k] for k in key[4:-1].split(",")], dim=0)
    return weights[key]
