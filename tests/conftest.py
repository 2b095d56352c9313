"""Shared fixtures: one tiny random checkpoint and one engine set per test session.

The checkpoint uses init std 0.3 (not 0.02) so the random model's answers vary from
position to position: token-exact comparisons between two paths can then fail.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from llada_export.checkpoint import load_checkpoint, random_checkpoint

TINY_STD = 0.3


def pytest_configure(config):
    """The eager oracles and the sampler run tiny ops: with torch's OpenMP threads competing for
    2 busy cores (pytest -n 2, ONNX Runtime's own threads) they slow down 5-10x."""
    torch.set_num_threads(1)
PRUNE_LAYER, KEEP = 2, 0.5


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    return random_checkpoint("tiny", tmp_path_factory.mktemp("ckpt") / "tiny", seed=0, init_std=TINY_STD)


@pytest.fixture(scope="session")
def tiny(tiny_ckpt):
    """(model fp32, tokenizer, config) loaded from the tiny checkpoint."""
    return load_checkpoint(tiny_ckpt, dtype=torch.float32)


@pytest.fixture(scope="session")
def engines(tiny_ckpt, tmp_path_factory):
    """ONNX Runtime engines: pruned (layer 2, keep 0.5) + unpruned baseline, G = 128, 384x384 bucket."""
    from llada_export.exporter.build import ExportOptions, export_engines

    out = tmp_path_factory.mktemp("engines") / "onnx"
    return export_engines(ExportOptions(
        model=str(tiny_ckpt), output=str(out), prune_layer=PRUNE_LAYER, keep=KEEP, baseline=True,
        gen_length=128, block_length=128, steps=128, max_prompt_tokens=192, image_size=(384, 384),
        progress=False))


def random_image(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="session")
def images():
    """Two image sizes that fit the 384x384 bucket of the tiny config (118 and 136 visual tokens)."""
    return {"380x250": random_image(380, 250, 1), "384x384": random_image(384, 384, 2)}


PROMPTS = {
    "short": "<image>\nWhat is here?",
    "long": "<image>\nDescribe the colours, the shapes and where each object is, then say which is largest.",
}


@pytest.fixture(scope="session")
def aoti_engines(tiny_ckpt, tmp_path_factory):
    """AOTInductor packages (CPU): pruned stages at layer 1, keep 0.35, G = 128 (serves every preset)."""
    import time

    from llada_export.exporter.build import ExportOptions, export_engines

    out = tmp_path_factory.mktemp("aoti") / "engines"
    t0 = time.perf_counter()
    export_engines(ExportOptions(model=str(tiny_ckpt), output=str(out), prune_layer=1, keep=0.35,
                                 backends=("aoti",), gen_length=128, block_length=128, steps=128,
                                 max_prompt_tokens=160, image_size=(384, 384), progress=False))
    print(f"AOTInductor export of the tiny model: {time.perf_counter() - t0:.1f} s")
    return out
