"""What every part of ``tools/bench_gpu.py`` shares: the device, the ``--weights`` variants and the
paths, issue 7's anchor (format-1 reports), and the random model and request images."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

# Official LLaDA-V on the H100, 1024x768, random bf16 weights (issue 7's anchor; format-1 reports only).
ANCHOR_IMAGE = "1024x768"  # the only image size the anchor was measured at
TARGET = {"image": ANCHOR_IMAGE, "prune_layer": 16, "keep": 0.35}  # the setting issue 7's targets are for
OFFICIAL = {"forward_3815_ms": 196.0, "mc": 0.42, "chartqa": 3.25, "demo": 26.5, "vision_7_crops_ms": 40.0,
            "peak_gib": 28.7}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: smoke runs with the tiny preset
WEIGHTS = {"native": {}, "fp8": {"activations": "row"}, "fp8-row": {"activations": "row"},
           "fp8-tensor": {"activations": "tensor"}}  # --weights: name -> FP8Settings fields (native: none)
PATHS = {"pruned": (True, False), "pruned+cache": (True, True), "unpruned": (False, False),
         "unpruned+cache": (False, True)}  # path -> (pruned, cache)


def reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")


def build_model(preset: str, seed: int = 0):
    """(model, config, tokenizer): random weights made on the device by the project's init rule."""
    from llada_export.config import PRESETS
    from llada_export.synthetic.tokenizer import build_tokenizer
    from llada_export.synthetic.weights import random_model

    cfg = PRESETS[preset]()
    tok = build_tokenizer("full" if preset == "full" else "tiny")
    cfg.text.vocab_size = cfg.text.vocab_size or len(tok)
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    cfg.torch_dtype = str(dtype).removeprefix("torch.")
    return random_model(cfg, DEVICE, dtype, seed), cfg, tok


def request_images(w: int, h: int, n: int) -> list[Image.Image]:
    return [Image.fromarray(np.random.default_rng(i).integers(0, 256, (h, w, 3), dtype=np.uint8)) for i in range(n)]
