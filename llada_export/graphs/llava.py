"""LLaDA-V: vision tower + projector + LLaDA language model, with official key names.

``LLaDAV.denoise`` is the language-side forward the sampler calls at every step and the
exporter traces: prefix embeddings (text and visual, already spliced) + response token
ids -> logits for the response positions only.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import LLaDAVConfig
from .llada import DecoderLayer, RMSNorm, RotaryEmbedding, attention_mask
from .vision import VisionTower, build_projector


class Backbone(nn.Module):
    """``model.*``: embeddings, decoder layers, final norm, and the multimodal parts."""

    def __init__(self, cfg: LLaDAVConfig, vision_layers: int | None = None):
        super().__init__()
        t = cfg.text
        self.embed_tokens = nn.Embedding(t.vocab_size, t.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(t) for _ in range(t.num_hidden_layers))
        self.norm = RMSNorm(t.hidden_size, t.rms_norm_eps)
        self.vision_tower = VisionTower(cfg.vision, vision_layers)
        self.mm_projector = build_projector(cfg)
        self.image_newline = nn.Parameter(torch.zeros(t.hidden_size))


class LLaDAV(nn.Module):
    def __init__(self, cfg: LLaDAVConfig, vision_layers: int | None = None):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg, vision_layers)
        self.lm_head = nn.Linear(cfg.text.hidden_size, cfg.text.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(cfg.text.head_dim, cfg.text.rope_theta)

    # ------------------------------------------------------------------ vision
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Crops [N, 3, S, S] -> projected features [N, T, D] (T tokens per crop)."""
        dtype = self.model.mm_projector[0].weight.dtype
        feats = self.model.vision_tower(pixel_values.to(dtype))  # [N, T, C]
        return self.model.mm_projector(feats)  # [N, T, D]

    # ------------------------------------------------------------------ text
    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(ids)  # [..., D]

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm + lm_head, logits in fp32."""
        return self.lm_head(self.model.norm(h)).float()

    def denoise(
        self,
        prefix_embeds: torch.Tensor,  # [B, P, D]
        response_ids: torch.Tensor,  # [B, G] int64
        position_ids: torch.Tensor,  # [B, P + G] int64
        key_mask: torch.Tensor | None = None,  # [B, P + G] bool, True = real token
    ) -> torch.Tensor:
        """One denoising forward over [prefix | response]; logits [B, G, V] fp32."""
        g = response_ids.shape[1]
        x = torch.cat([prefix_embeds.to(self.dtype), self.embed(response_ids)], dim=1)  # [B, L, D]
        cos, sin = self.rotary(position_ids)  # [B, L, hd] fp32
        mask = attention_mask(key_mask)  # [B, 1, 1, L] or None
        for layer in self.model.layers:
            x = layer(x, cos, sin, mask)
        return self.head(x[:, -g:])  # [B, G, V]


class Denoiser(nn.Module):
    """Export wrapper: the unpruned denoiser with graph I/O in fp32 / int64 / bool."""

    def __init__(self, model: LLaDAV):
        super().__init__()
        self.model = model

    def forward(self, prefix_embeds, response_ids, position_ids, key_mask):
        return self.model.denoise(prefix_embeds, response_ids, position_ids, key_mask)
