"""SigLIP vision tower + ``mlp2x_gelu`` projector, built from transformers' SigLIP blocks.

The official tower deletes the last encoder layer at load and takes the output of the
last remaining layer *before* ``post_layernorm`` (which stays in the checkpoint,
loaded and unused). The container nesting reproduces the official key names
``model.vision_tower.vision_tower.vision_model.*`` whatever the transformers version.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import SiglipVisionConfig
from transformers.models.siglip.modeling_siglip import SiglipEncoder, SiglipVisionEmbeddings

from ..config import LLaDAVConfig, VisionConfig


def siglip_config(v: VisionConfig, num_layers: int) -> SiglipVisionConfig:
    cfg = SiglipVisionConfig(
        hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, num_hidden_layers=num_layers,
        num_attention_heads=v.num_attention_heads, image_size=v.image_size, patch_size=v.patch_size,
        layer_norm_eps=v.layer_norm_eps, hidden_act=v.hidden_act, vision_use_head=False,
    )
    cfg._attn_implementation = "sdpa"
    return cfg


class SiglipTransformer(nn.Module):
    def __init__(self, cfg: SiglipVisionConfig):
        super().__init__()
        self.embeddings = SiglipVisionEmbeddings(cfg)
        self.encoder = SiglipEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)  # loaded, unused


class SiglipTower(nn.Module):
    def __init__(self, cfg: SiglipVisionConfig):
        super().__init__()
        self.vision_model = SiglipTransformer(cfg)


class VisionTower(nn.Module):
    """``model.vision_tower``: the truncated tower (``num_layers`` = kept layers)."""

    def __init__(self, v: VisionConfig, num_layers: int | None = None):
        super().__init__()
        n = v.num_hidden_layers - 1 if num_layers is None else num_layers
        self.vision_tower = SiglipTower(siglip_config(v, n))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # pixel_values [N, 3, S, S] -> features [N, T, C] (before post_layernorm)
        vm = self.vision_tower.vision_model
        h = vm.embeddings(pixel_values)
        return vm.encoder(inputs_embeds=h).last_hidden_state


class VisionGraph(nn.Module):
    """Tower + projector: crops [N, 3, S, S] -> projected features [N, T, D]. The one implementation
    behind ``LLaDAV.encode_images`` and the exported vision graph (``out_dtype`` fp32 there)."""

    def __init__(self, tower: VisionTower, projector: nn.Sequential, out_dtype: torch.dtype | None = None):
        super().__init__()
        self.tower, self.projector, self.out_dtype = tower, projector, out_dtype

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # the patch embedding's dtype: a convolution, never quantized (--weights fp8 may quantize the projector)
        dtype = self.tower.vision_tower.vision_model.embeddings.patch_embedding.weight.dtype
        feats = self.projector(self.tower(pixel_values.to(dtype)))  # [N, T, D]
        return feats if self.out_dtype is None else feats.to(self.out_dtype)


def build_projector(cfg: LLaDAVConfig) -> nn.Sequential:
    """``mlp2x_gelu``: Linear(C, D), exact GELU, Linear(D, D) -> keys mm_projector.0 / .2"""
    d = cfg.text.hidden_size
    return nn.Sequential(nn.Linear(cfg.vision.hidden_size, d), nn.GELU(), nn.Linear(d, d))
