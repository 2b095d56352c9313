"""The LLaDA language model (LLaMA layout, bidirectional attention), export-friendly.

Everything takes explicit position ids (pruned sequences keep their original ids) and
an optional boolean key mask (padding slots of a static bucket never receive
attention). Norms and RoPE tables are computed in fp32 whatever the weight dtype.
Module names give the official LLaDA-V state-dict keys.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TextConfig


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

    def query_key(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q [B, H, L, hd] and k [B, H, L, hd] after RoPE (k repeated to H heads)."""
        q = apply_rope(self._heads(self.q_proj(x), self.n_heads), cos, sin)
        k = apply_rope(self._heads(self.k_proj(x), self.n_kv), cos, sin)
        if self.n_kv != self.n_heads:
            k = k.repeat_interleave(self.n_heads // self.n_kv, dim=1)
        return q, k

    def forward(self, x, cos, sin, mask: torch.Tensor | None) -> torch.Tensor:
        # x [B, L, D]; mask [B, 1, 1, L] bool (True = attend) or None
        b, l, _ = x.shape
        q, k = self.query_key(x, cos, sin)
        v = self._heads(self.v_proj(x), self.n_kv)
        if self.n_kv != self.n_heads:
            v = v.repeat_interleave(self.n_heads // self.n_kv, dim=1)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=False)  # [B, H, L, hd]
        return self.o_proj(o.transpose(1, 2).reshape(b, l, self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


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

    def forward(
        self,
        prefix_embeds: torch.Tensor,  # [B, P, D] (any float dtype)
        response_ids: torch.Tensor,  # [B, G] int64
        position_ids: torch.Tensor,  # [B, P + G] int64
        key_mask: torch.Tensor | None = None,  # [B, P + G] bool, True = real token
    ) -> torch.Tensor:
        """One denoising forward over [prefix | response]; logits [B, G, V] fp32."""
        g = response_ids.shape[1]
        x = torch.cat([prefix_embeds.to(self.dtype), self.embed_tokens(response_ids)], dim=1)  # [B, L, D]
        cos, sin = self.rotary(position_ids)  # [B, L, hd] fp32
        mask = attention_mask(key_mask)  # [B, 1, 1, L] or None
        for layer in self.layers:
            x = layer(x, cos, sin, mask)
        return self.head(x[:, -g:])  # [B, G, V]


class FusedDenoiser(nn.Module):
    """The denoiser with the sampler's greedy step fused in: outputs (x0 [B, G] int64,
    confidence [B, G] fp32) instead of logits [B, G, V], so a step copies two small
    tensors instead of the whole logits. Serves temperature 0 / low_confidence only."""

    def __init__(self, lm: LanguageModel, suppress_ids: list[int], mask_id: int):
        super().__init__()
        self.lm, self.suppress_ids, self.mask_id = lm, list(suppress_ids), mask_id

    def forward(self, prefix_embeds, response_ids, position_ids, key_mask):
        from ..runtime.sampler import fused_prediction

        logits = self.lm(prefix_embeds, response_ids, position_ids, key_mask)  # [B, G, V]
        return fused_prediction(logits, response_ids, self.suppress_ids, self.mask_id)
