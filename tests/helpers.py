"""Shared test helpers (imported by the tests; the fixtures are in conftest.py)."""

from __future__ import annotations

import numpy as np
from PIL import Image

TINY_STD = 0.3  # init std of the tiny checkpoints: a random model whose answers vary, so comparisons can fail
PRUNE_LAYER, KEEP = 2, 0.5  # the session engines' pruning

PROMPTS = {
    "short": "<image>\nWhat is here?",
    "long": "<image>\nDescribe the colours, the shapes and where each object is, then say which is largest.",
}


def random_image(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def four_requests() -> list:
    """Four different requests (two image sizes, a text-only one) that fit conftest's multi_size_engines."""
    from llada_export.runtime.pipeline import Request

    return [Request(random_image(380, 250, 1), "<image>\nWhat colour is it?"),
            Request(random_image(384, 288, 9), "<image>\nWhat is here?"),
            Request(None, "Name three colours."),
            Request(random_image(300, 200, 3), "<image>\nWhat is here?", seed=5)]


def export(ckpt, out, **kw):
    """``export_engines`` of ``ckpt`` into ``out`` with the test defaults: prune at layer 2, keep 0.5,
    192 prompt tokens, a 384x384 bucket, no progress bars."""
    from llada_export.contract.pruning import PruneSettings
    from llada_export.exporter.build import ExportOptions, export_engines

    kw.setdefault("prune", PruneSettings(PRUNE_LAYER, KEEP))
    kw.setdefault("max_prompt_tokens", 192)
    kw.setdefault("image_size", (384, 384))
    return export_engines(ExportOptions(model=str(ckpt), output=str(out), progress=False, **kw))


def load_tool(name: str):
    """A script of tools/ as a module (tools/ holds scripts, not a package)."""
    import importlib.util
    import sys
    from pathlib import Path

    if name in sys.modules:
        return sys.modules[name]
    path = Path(__file__).resolve().parents[1] / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def fixed(settings: dict) -> dict:
    """Sampler settings with the official fixed schedule made explicit when they name no parallel rule
    (Pipeline's default is the factor rule; the eager references default to the fixed schedule)."""
    named = settings.get("factor") is not None or settings.get("threshold") is not None
    return {**settings, **({} if named else {"fixed_schedule": True})}
