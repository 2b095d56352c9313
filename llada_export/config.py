"""Configuration of an LLaDA-V checkpoint, read from its official ``config.json``.

The official config (model_type ``llava_llada``) is a flat LLaMA-style dict plus the
``mm_*`` fields of LLaVA-OneVision. It names the vision tower by hub id and carries no
vision dimensions; the official code then builds the default SigLIP so400m tower. Our
own checkpoints (tiny, demo) write an explicit ``vision_config`` block, which wins.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """The checkpoint's config.json is missing, foreign or inconsistent."""


@dataclass
class TextConfig:
    """LLaDA-8B language model (LLaMA layout, bidirectional attention)."""

    vocab_size: int = 126464
    hidden_size: int = 4096
    intermediate_size: int = 12288
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    max_position_embeddings: int = 16384

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass
class VisionConfig:
    """SigLIP vision tower. ``num_hidden_layers`` is the un-truncated tower (the
    official code deletes the last layer at load, so checkpoints hold one fewer)."""

    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    image_size: int = 384
    patch_size: int = 14
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def tokens_per_crop(self) -> int:
        return self.patches_per_side**2


@dataclass
class LLaDAVConfig:
    text: TextConfig = field(default_factory=TextConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    mm_vision_tower: str = "google/siglip2-so400m-patch14-384"
    mm_hidden_size: int = 1152
    mm_projector_type: str = "mlp2x_gelu"
    mm_vision_select_layer: int = -2
    mm_vision_select_feature: str = "patch"
    image_aspect_ratio: str = "anyres_max_4"
    mm_patch_merge_type: str = "spatial_unpad"
    # Grid pinpoints as (width, height) pixel pairs, normalised from either official form.
    image_grid_pinpoints: list[tuple[int, int]] = field(default_factory=list)
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    tokenizer_model_max_length: int | None = 8192
    torch_dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        if not self.image_grid_pinpoints:
            s = self.vision.image_size
            self.image_grid_pinpoints = [(i * s, j * s) for i in range(1, 7) for j in range(1, 7)]

    # ------------------------------------------------------------------ derived
    @property
    def anyres_max_crops(self) -> int:
        m = re.match(r"anyres_max_(\d+)", self.image_aspect_ratio)
        if not m:
            raise ConfigError(f"image_aspect_ratio {self.image_aspect_ratio!r} is not supported (expected anyres_max_N)")
        return int(m.group(1))

    # ------------------------------------------------------------------ I/O
    @classmethod
    def from_dict(cls, d: dict[str, Any], base_dir: str | Path | None = None) -> "LLaDAVConfig":
        """``base_dir``: the checkpoint directory (a relative ``mm_vision_tower`` path is tried there)."""
        mt = d.get("model_type")
        if mt != "llava_llada":
            raise ConfigError(
                f"config.json has model_type {mt!r}; llada-export needs an LLaDA-V checkpoint (model_type 'llava_llada')"
            )
        text_fields = {f.name for f in dataclasses.fields(TextConfig)}
        text = TextConfig(**{k: d[k] for k in text_fields if k in d and d[k] is not None})
        vd = d.get("vision_config") or local_tower_config(d.get("mm_vision_tower"), base_dir) or {}
        vision_fields = {f.name for f in dataclasses.fields(VisionConfig)}
        vision = VisionConfig(**{k: vd[k] for k in vision_fields if k in vd})
        if "mm_hidden_size" in d and d["mm_hidden_size"] != vision.hidden_size:
            raise ConfigError(
                f"mm_hidden_size {d['mm_hidden_size']} does not match the vision tower width {vision.hidden_size}"
            )
        kw: dict[str, Any] = dict(text=text, vision=vision)
        for k in (
            "mm_vision_tower", "mm_hidden_size", "mm_projector_type", "mm_vision_select_layer",
            "mm_vision_select_feature", "image_aspect_ratio", "mm_patch_merge_type",
            "tokenizer_model_max_length", "torch_dtype",
        ):
            if d.get(k) is not None:
                kw[k] = d[k]
        if "image_mean" in vd:
            kw["image_mean"] = tuple(vd["image_mean"])
        if "image_std" in vd:
            kw["image_std"] = tuple(vd["image_std"])
        if d.get("image_grid_pinpoints") is not None:
            kw["image_grid_pinpoints"] = parse_grid_pinpoints(d["image_grid_pinpoints"], vision.image_size)
        cfg = cls(**kw)
        if cfg.mm_projector_type != "mlp2x_gelu":
            raise ConfigError(f"mm_projector_type {cfg.mm_projector_type!r} is not supported (only mlp2x_gelu)")
        if "unpad" not in cfg.mm_patch_merge_type:
            raise ConfigError(f"mm_patch_merge_type {cfg.mm_patch_merge_type!r} is not supported (only spatial_unpad)")
        cfg.anyres_max_crops  # validates image_aspect_ratio
        return cfg

    @classmethod
    def from_json(cls, path: str | Path) -> "LLaDAVConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            if (path.parent / "manifest.json").is_file():  # the other kind of directory
                raise ConfigError(f"{path.parent} is an engines directory (it holds manifest.json), not a checkpoint: "
                                  "pass the checkpoint directory (config.json, *.safetensors) the engines came from")
            raise ConfigError(f"{path}: no config.json (is this a Hugging Face checkpoint directory?)")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from e
        return cls.from_dict(d, path.parent)

    def to_dict(self) -> dict[str, Any]:
        """The official flat layout plus an explicit ``vision_config`` block."""
        t = dataclasses.asdict(self.text)
        d: dict[str, Any] = {
            "architectures": ["LlavaLLaDAModelLM"],
            "model_type": "llava_llada",
            **t,
            "hidden_act": "silu",
            "attention_bias": False,
            "tie_word_embeddings": False,
            "rope_scaling": None,
            "pretraining_tp": 1,
            "use_cache": False,
            "torch_dtype": self.torch_dtype,
            "mm_vision_tower": self.mm_vision_tower,
            "mm_hidden_size": self.vision.hidden_size,
            "mm_projector_type": self.mm_projector_type,
            "mm_vision_select_layer": self.mm_vision_select_layer,
            "mm_vision_select_feature": self.mm_vision_select_feature,
            "image_aspect_ratio": self.image_aspect_ratio,
            "mm_patch_merge_type": self.mm_patch_merge_type,
            "mm_newline_position": "one_token",
            "mm_spatial_pool_mode": "bilinear",
            "use_mm_proj": True,
            "image_crop_resolution": None,
            "image_split_resolution": None,
            "image_grid_pinpoints": [list(p) for p in self.image_grid_pinpoints],
            "tokenizer_model_max_length": self.tokenizer_model_max_length,
            "vision_config": {
                "model_type": "siglip_vision_model",
                **dataclasses.asdict(self.vision),
                "image_mean": list(self.image_mean),
                "image_std": list(self.image_std),
            },
        }
        return d

    def hash(self) -> str:
        """SHA-256 of the canonical JSON form (for manifests)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()


def local_tower_config(tower: Any, base_dir: str | Path | None) -> dict[str, Any] | None:
    """The vision dimensions of a local SigLIP directory named by ``mm_vision_tower`` (as the
    official loader reads it with ``from_pretrained``): its config.json, or that file's
    ``vision_config`` block for a full SigLIP model. None when the name is a hub id."""
    if not isinstance(tower, str) or not tower:
        return None
    candidates = [Path(tower)] if Path(tower).is_absolute() else [Path(base_dir) / tower] if base_dir else []
    candidates.append(Path(tower))  # relative to the working directory, as the official code
    for cand in candidates:
        f = cand / "config.json"
        if f.is_file():
            try:
                d = json.loads(f.read_text())
            except json.JSONDecodeError as e:
                raise ConfigError(f"{f}: the vision tower's config is not valid JSON ({e})") from e
            d = d.get("vision_config") or d
            if "hidden_size" not in d:
                raise ConfigError(f"{f}: the vision tower's config has no hidden_size")
            return d
    return None


def parse_grid_pinpoints(value: Any, crop_size: int) -> list[tuple[int, int]]:
    """Accept ``"(1x1),...,(6x6)"`` (a range, as the official code reads it), a Python
    literal string of pixel pairs, or an explicit list of pixel pairs."""
    if isinstance(value, str) and "x" in value:
        matches = re.findall(r"\((\d+)x(\d+)\)", value)
        if not matches:
            raise ConfigError(f"cannot parse image_grid_pinpoints {value!r}")
        (a0, b0), (a1, b1) = map(int, matches[0]), map(int, matches[-1])
        return [(i * crop_size, j * crop_size) for i in range(a0, a1 + 1) for j in range(b0, b1 + 1)]
    if isinstance(value, str):
        value = ast.literal_eval(value)
    try:
        return [(int(w), int(h)) for w, h in value]
    except (TypeError, ValueError) as e:
        raise ConfigError(f"cannot parse image_grid_pinpoints {value!r}") from e


# ---------------------------------------------------------------------- presets
def full_config() -> LLaDAVConfig:
    """The real LLaDA-V dimensions (LLaDA-8B + SigLIP so400m/14 at 384)."""
    return LLaDAVConfig()


def tiny_config() -> LLaDAVConfig:
    """Same structure, a few MB: for tests. Crops stay 384 px so the anyres arithmetic
    (and visual token counts) match the real model; patch 48 gives 8x8 tokens per crop."""
    return LLaDAVConfig(
        text=TextConfig(
            vocab_size=0,  # filled in from the tokenizer by the checkpoint writer
            hidden_size=64, intermediate_size=160, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096,
        ),
        vision=VisionConfig(
            hidden_size=48, intermediate_size=96, num_hidden_layers=3,
            num_attention_heads=4, image_size=384, patch_size=48,
        ),
        mm_hidden_size=48,
        torch_dtype="float32",
    )


def demo_config() -> LLaDAVConfig:
    """The trained demo model (``tools/train_demo.py``): same structure, ~15 MB in fp32.

    192 px crops with patch 16 (12x12 tokens per crop), grid pinpoints scaled to the crop
    size (i*192 x j*192); the vision config names 5 layers, of which 4 are stored and
    used (the official convention). Text: 6 layers, hidden 192, head_dim 32."""
    return LLaDAVConfig(
        text=TextConfig(
            vocab_size=0,  # filled in from the tokenizer ("tiny") by the checkpoint writer
            hidden_size=192, intermediate_size=512, num_hidden_layers=6,
            num_attention_heads=6, num_key_value_heads=6, max_position_embeddings=4096,
        ),
        vision=VisionConfig(
            hidden_size=128, intermediate_size=512, num_hidden_layers=5,
            num_attention_heads=4, image_size=192, patch_size=16,
        ),
        mm_hidden_size=128,
        torch_dtype="float32",
    )


PRESETS = {"full": full_config, "tiny": tiny_config, "demo": demo_config}
