"""The LLaDA language model (LLaMA layout, bidirectional attention), export-friendly.

Everything takes explicit position ids (pruned sequences keep their original ids) and
an optional boolean key mask (padding slots of a static bucket never receive
attention). Norms and RoPE tables are computed in fp32 whatever the weight dtype.
Module names give the official LLaDA-V state-dict keys.

The prefix KV cache is part of the model, not a graph rewrite: :meth:`LanguageModel.prefill`
is the forward that also returns every layer's K/V, :meth:`LanguageModel.cached` runs only the
response rows against them. They share every line with the plain forward except the
attention's key/value source, so the eager model, the eager cached reference and the exported
cache graphs are one implementation (a pass over the traced graph could not express a forward
whose queries and keys have different lengths any simpler). The graph modules at the end
(``DenoiserGraph``, ``PrefillGraph``, ``CachedGraph``) give each exported graph its signature.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TextConfig
from ..sampler import fused_prediction
from ..ops import padded_attention
from ..ops.padded_attention import attend_zero_padded, zero_padding


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """Half-split RoPE tables, cos/sin in fp32, from explicit position ids."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids.float()[..., None] * self.inv_freq  # [B, L, hd/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [B, L, hd]
        return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x [B, H, L, hd]; cos/sin [B, L, hd] fp32
    xf = x.float()
    cos, sin = cos[:, None], sin[:, None]  # [B, 1, L, hd]
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)

    def _heads(self, x: torch.Tensor, n: int) -> torch.Tensor:
        b, l, _ = x.shape
        return x.view(b, l, n, self.head_dim).transpose(1, 2)  # [B, n, L, hd]

    def _repeat(self, t: torch.Tensor) -> torch.Tensor:
        # [B, n_kv, L, hd] -> [B, H, L, hd] (grouped-query attention; LLaDA-8B has n_kv == H)
        return t if self.n_kv == self.n_heads else t.repeat_interleave(self.n_heads // self.n_kv, dim=1)

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # x [B, L, D] -> q [B, L, H*hd], k, v [B, L, n_kv*hd]
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def _qk(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q, k, _ = self._project(x)
        return apply_rope(self._heads(q, self.n_heads), cos, sin), apply_rope(self._heads(k, self.n_kv), cos, sin)

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [B, H, L, hd] and k [B, n_kv, L, hd] after RoPE, v [B, n_kv, L, hd] (what a KV cache holds)."""
        q, k, v = self._project(x)
        q = apply_rope(self._heads(q, self.n_heads), cos, sin)  # [B, H, L, hd]
        return q, apply_rope(self._heads(k, self.n_kv), cos, sin), self._heads(v, self.n_kv)  # [B, n_kv, L, hd] x2

    def query_key(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q [B, H, L, hd] and k [B, H, L, hd] after RoPE (k repeated to H heads): the pruning scores' input."""
        q, k = self._qk(x, cos, sin)
        return q, self._repeat(k)

    def attend(self, q, k, v, mask: torch.Tensor | None) -> torch.Tensor:
        # q [B, H, Lq, hd]; k, v [B, n_kv, Lk, hd]; mask [B, 1, 1, Lk] bool (True = attend) or None
        b, _, lq, _ = q.shape
        o = F.scaled_dot_product_attention(q, self._repeat(k), self._repeat(v), attn_mask=mask, is_causal=False)
        return self.o_proj(o.transpose(1, 2).reshape(b, lq, self.n_heads * self.head_dim))  # [B, Lq, D]

    def forward(self, x, cos, sin, mask: torch.Tensor | None) -> torch.Tensor:
        # x [B, L, D]; mask [B, 1, 1, L] bool (True = attend) or None
        q, k, v = self.qkv(x, cos, sin)
        return self.attend(q, k, v, mask)

    def forward_kv(self, x, cos, sin, mask):
        """As ``forward``, also returning this layer's k, v [B, n_kv, L, hd] (after RoPE)."""
        q, k, v = self.qkv(x, cos, sin)
        return self.attend(q, k, v, mask), k, v

    def forward_cached(self, x, cos, sin, mask, k_cache, v_cache, fresh, write=None, n_pad=None):
        """Response rows only: x [B, G, D], cos/sin [B, G, hd]; k_cache, v_cache [B, n_kv, P + G, hd]
        from the last refresh; fresh [B, G] bool: response slots whose K/V are recomputed now (the
        current block and after); the others (earlier blocks) and the prefix come from the cache.

        ``write=None`` (the eager oracle, the ONNX graphs: ONNX has no in-place ops) concatenates
        [prefix ; response slots] into new keys/values every layer. With ``write`` (the torch
        backends; see :func:`cache_writer`) the response slots ``where(fresh, new, cached)`` are
        written into the cache buffer and the layer attends over the buffer itself: no copy of the
        prefix. Both read the same values as long as the slots before ``block_start`` still hold the
        last refresh's K/V, which holds because the sampler refreshes a row's cache at the first
        forward of every block (``block_start`` is constant between two refreshes): a cached step
        only changes slots >= ``block_start``, which the next cached step recomputes anyway.

        The written cache also keeps K = V = 0 in its masked response slots (the prefill zeroes the masked
        prefix slots), so that with ``n_pad`` [B] (masked keys per row) and a kernel for it the layer attends
        without the mask (:mod:`llada_export.ops.padded_attention`)."""
        q, k, v = self.qkv(x, cos, sin)  # [B, H, G, hd], [B, n_kv, G, hd] x2
        p = k_cache.shape[2] - x.shape[1]
        f = fresh[:, None, :, None]  # [B, 1, G, 1]
        k = torch.where(f, k, k_cache[:, :, p:])  # [B, n_kv, G, hd]
        v = torch.where(f, v, v_cache[:, :, p:])
        if write is not None:
            if n_pad is None or not padded_attention.supported(q):
                return self.attend(q, *write(k, v), mask)
            response_mask = mask[:, 0, 0, p:]  # [B, G]
            keys, values = write(zero_padding(k, response_mask), zero_padding(v, response_mask))
            o = attend_zero_padded(q, self._repeat(keys), self._repeat(values), n_pad)  # [B, G, H, hd]
            return self.o_proj(o.reshape(x.shape[0], x.shape[1], self.n_heads * self.head_dim))
        keys = torch.cat([k_cache[:, :, :p], k], dim=2)  # [B, n_kv, P + G, hd]
        values = torch.cat([v_cache[:, :, :p], v], dim=2)
        return self.attend(q, keys, values, mask)


def cache_writer(kv_cache: torch.Tensor, layer: int, g: int):
    """``write(k, v)`` for :meth:`Attention.forward_cached`: puts k, v [B, n_kv, G, hd] into the last G
    slots of ``kv_cache[layer]`` ([layers, 2, B, n_kv, P + G, hd]) in place and returns that layer's
    (keys, values) [B, n_kv, P + G, hd], views of the buffer. One ``index_put_`` on the whole buffer
    (not ``copy_`` into a view): Inductor turns it into a kernel writing into the graph input, where
    a view's scatter made it materialise the whole cache again at every layer."""
    _, _, b, n_kv, length, _ = kv_cache.shape
    dev = kv_cache.device
    index = (torch.full((1, 1, 1, 1), layer, dtype=torch.long, device=dev),
             torch.arange(2, device=dev).view(2, 1, 1, 1),  # K, V
             torch.arange(b, device=dev).view(1, b, 1, 1),
             torch.arange(n_kv, device=dev).view(1, 1, n_kv, 1),
             torch.arange(length - g, length, device=dev).view(1, 1, 1, g))  # broadcast to [2, B, n_kv, G]

    def write(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kv_cache.index_put_(index, torch.stack([k, v]))  # [2, B, n_kv, G, hd] into the buffer
        return kv_cache[layer, 0], kv_cache[layer, 1]

    return write


class MLP(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def _gate_up(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.gate_proj(x), self.up_proj(x)  # [B, L, I] x2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self._gate_up(x)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward_kv(self, x, cos, sin, mask):
        a, k, v = self.self_attn.forward_kv(self.input_layernorm(x), cos, sin, mask)
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x)), k, v

    def forward_cached(self, x, cos, sin, mask, k_cache, v_cache, fresh, write=None, n_pad=None):
        x = x + self.self_attn.forward_cached(self.input_layernorm(x), cos, sin, mask, k_cache, v_cache, fresh, write,
                                              n_pad)
        return x + self.mlp(self.post_attention_layernorm(x))


def attention_mask(key_mask: torch.Tensor | None) -> torch.Tensor | None:
    """[B, L] bool key mask -> [B, 1, 1, L] SDPA mask (True = attend)."""
    return None if key_mask is None else key_mask.bool()[:, None, None, :]


class LanguageModel(nn.Module):
    """The text side of LLaDA-V as one module: what the sampler calls every step and
    the exporter traces. It *shares* its submodules with :class:`~.llava.LLaDAV`
    (no copy of the weights); module paths are ``embed_tokens``, ``layers.N``, ``norm``,
    ``lm_head``, so the FX pass finds layer K at ``layers.K``.
    """

    def __init__(self, embed_tokens: nn.Embedding, layers: nn.ModuleList, norm: RMSNorm, lm_head: nn.Linear,
                 cfg: TextConfig):
        super().__init__()
        self.embed_tokens, self.layers, self.norm, self.lm_head = embed_tokens, layers, norm, lm_head
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta).to(lm_head.weight.device)

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm + lm_head, logits in fp32."""
        return self.lm_head(self.norm(h)).float()

    def _inputs(self, prefix_embeds, response_ids, position_ids, key_mask):
        x = torch.cat([prefix_embeds.to(self.dtype), self.embed_tokens(response_ids)], dim=1)  # [B, L, D]
        cos, sin = self.rotary(position_ids)  # [B, L, hd] fp32
        return x, cos, sin, attention_mask(key_mask)  # mask [B, 1, 1, L] or None

    def forward(
        self,
        prefix_embeds: torch.Tensor,  # [B, P, D] (any float dtype)
        response_ids: torch.Tensor,  # [B, G] int64
        position_ids: torch.Tensor,  # [B, P + G] int64
        key_mask: torch.Tensor | None = None,  # [B, P + G] bool, True = real token
    ) -> torch.Tensor:
        """One denoising forward over [prefix | response]; logits [B, G, V] fp32."""
        g = response_ids.shape[1]
        x, cos, sin, mask = self._inputs(prefix_embeds, response_ids, position_ids, key_mask)
        for layer in self.layers:
            x = layer(x, cos, sin, mask)
        return self.head(x[:, -g:])  # [B, G, V]

    def prefill(self, prefix_embeds, response_ids, position_ids, key_mask=None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward`` that also returns every layer's K and V after RoPE over the whole sequence:
        (logits [B, G, V] fp32, kv [layers, 2, B, n_kv, P + G, hd] in the weights' dtype). The masked slots
        of kv hold zeros (what the cached step's attention without a mask needs: :mod:`llada_export.ops.padded_attention`)."""
        g = response_ids.shape[1]
        x, cos, sin, mask = self._inputs(prefix_embeds, response_ids, position_ids, key_mask)
        kvs, real = [], None if key_mask is None else key_mask.bool()  # real: [B, L]
        for layer in self.layers:
            x, k, v = layer.forward_kv(x, cos, sin, mask)
            if real is not None:
                k, v = zero_padding(k, real), zero_padding(v, real)
            kvs.append(torch.stack([k, v]))  # [2, B, n_kv, L, hd]
        return self.head(x[:, -g:]), torch.stack(kvs)

    def cached(
        self,
        response_ids: torch.Tensor,  # [B, G] int64
        position_ids: torch.Tensor,  # [B, G] int64: the response's position ids
        key_mask: torch.Tensor,  # [B, P + G] bool: prefix and response keys
        kv_cache: torch.Tensor,  # [layers, 2, B, n_kv, P + G, hd] from the last refresh (prefill)
        block_start: torch.Tensor,  # [B] int64: response slots < block_start take their K/V from the cache
        inplace: bool = False,
        unmasked: bool = True,
    ) -> torch.Tensor:
        """A cached step: only the G response rows go through the layers; each layer attends over
        [cached prefix K/V ; cached K/V of earlier blocks ; fresh K/V of the current block and after].
        Logits [B, G, V] fp32. ``inplace``: the fresh K/V are written into ``kv_cache``'s response
        slots in place (:func:`cache_writer`; :meth:`Attention.forward_cached` says why that reads
        the same values), and with ``unmasked`` the layers attend without the key mask where a kernel for that
        exists (:mod:`llada_export.ops.padded_attention`: ``kv_cache`` must then come from :meth:`prefill`, zeros in
        its masked slots)."""
        g = response_ids.shape[1]
        x = self.embed_tokens(response_ids)  # [B, G, D]
        cos, sin = self.rotary(position_ids)  # [B, G, hd]
        fresh = torch.arange(g, device=response_ids.device)[None, :] >= block_start[:, None]  # [B, G]
        mask = attention_mask(key_mask)  # [B, 1, 1, P + G]
        n_pad = (~key_mask.bool()).sum(-1) if inplace and unmasked else None  # [B] masked keys per row
        for i, layer in enumerate(self.layers):
            write = cache_writer(kv_cache, i, g) if inplace else None
            x = layer.forward_cached(x, cos, sin, mask, kv_cache[i, 0], kv_cache[i, 1], fresh, write, n_pad)
        return self.head(x)  # [B, G, V]


class Head(nn.Module):
    """A graph's output head: logits [B, G, V] fp32, or with the sampler's greedy step fused in
    (x0 [B, G] int64, confidence [B, G] fp32), so a step copies two small tensors instead of the
    logits. The fused head serves temperature 0 / low_confidence only."""

    def __init__(self, fused: tuple[list[int], int] | None = None, vocab: int = 0, device=None):
        super().__init__()
        self.fused = fused  # (suppressed ids, mask id) or None
        if fused is not None:  # the suppressed ids as a [V] mask buffer: a graph constant on the device
            mask = torch.zeros(vocab, dtype=torch.bool, device=device)
            mask[list(fused[0])] = True
            self.register_buffer("suppress_mask", mask, persistent=False)

    def forward(self, logits: torch.Tensor, response_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.fused is None:
            return (logits,)
        return fused_prediction(logits, response_ids, *self.fused, suppress_mask=self.suppress_mask)


class DenoiserGraph(nn.Module):
    """What stage A (after the pruning pass), stage B and the unpruned graph compute."""

    def __init__(self, lm: LanguageModel, head: Head):
        super().__init__()
        self.lm, self.out = lm, head

    def forward(self, prefix_embeds, response_ids, position_ids, key_mask):
        return self.out(self.lm(prefix_embeds, response_ids, position_ids, key_mask), response_ids)


class PrefillGraph(DenoiserGraph):
    """The denoiser that also returns the KV cache [layers, 2, B, n_kv, L, hd]."""

    def forward(self, prefix_embeds, response_ids, position_ids, key_mask):
        logits, kv = self.lm.prefill(prefix_embeds, response_ids, position_ids, key_mask)
        return self.out(logits, response_ids) + (kv,)


class CachedGraph(DenoiserGraph):
    """The cached step (see :meth:`LanguageModel.cached`). ``inplace``: the graph writes the fresh
    K/V into its ``kv_cache`` input (torch backends); else it leaves it untouched (ONNX)."""

    def __init__(self, lm: LanguageModel, head: Head, inplace: bool = False, unmasked: bool = True):
        super().__init__(lm, head)
        self.inplace, self.unmasked = inplace, unmasked

    def forward(self, response_ids, position_ids, key_mask, kv_cache, block_start):
        logits = self.lm.cached(response_ids, position_ids, key_mask, kv_cache, block_start, self.inplace,
                                self.unmasked)
        return self.out(logits, response_ids)
