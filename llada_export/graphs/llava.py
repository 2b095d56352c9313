"""LLaDA-V: vision tower + projector + LLaDA language model, with official key names.

``LLaDAV.language`` is the text denoiser the sampler calls at every step and the
exporter traces: prefix embeddings (text and visual, already spliced) + response token
ids -> logits for the response positions only.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import LLaDAVConfig
from .llada import DecoderLayer, LanguageModel, RMSNorm
from .vision import VisionGraph, VisionTower, build_projector


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

    # ------------------------------------------------------------------ vision
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Crops [N, 3, S, S] -> projected features [N, T, D] (T tokens per crop)."""
        return VisionGraph(self.model.vision_tower, self.model.mm_projector)(pixel_values)  # [N, T, D]

    # ------------------------------------------------------------------ text
    @property
    def language(self) -> LanguageModel:
        """The text denoiser (shares this model's weights; not a registered submodule)."""
        lm = self.__dict__.get("_language")
        if lm is None or lm.lm_head is not self.lm_head or lm.rotary.inv_freq.device != self.lm_head.weight.device:
            m = self.model
            lm = LanguageModel(m.embed_tokens, m.layers, m.norm, self.lm_head, self.config.text)
            self.__dict__["_language"] = lm
        return lm

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(ids)  # [..., D]

    def denoise(self, prefix_embeds, response_ids, position_ids, key_mask=None) -> torch.Tensor:
        """See :meth:`LanguageModel.forward`: logits [B, G, V] fp32 for the response."""
        return self.language(prefix_embeds, response_ids, position_ids, key_mask)
