"""Shared fixtures: one tiny random checkpoint and the engine sets the tests share, per session.

The checkpoint uses init std 0.3 (not 0.02) so the random model's answers vary from
position to position: token-exact comparisons between two paths can then fail.
"""

from __future__ import annotations

import time

import pytest
import torch

from helpers import TINY_STD, export, random_image
from llada_export.checkpoint.loader import load_checkpoint
from llada_export.contract.pruning import PruneSettings
from llada_export.synthetic.weights import random_checkpoint


def pytest_configure(config):
    """The eager oracles and the sampler run tiny ops: with torch's OpenMP threads competing for
    2 busy cores (pytest -n 2, ONNX Runtime's own threads) they slow down 5-10x."""
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """Tools run in-process (prune_sweep, train_demo) set torch's thread count for their own runs; put
    it back so that no test depends on which ran before it in the same worker (Inductor's CPU kernels,
    and so its compile cache, specialise on the count)."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


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
    return export(tiny_ckpt, tmp_path_factory.mktemp("engines") / "onnx", baseline=True, gen_length=128)


@pytest.fixture(scope="session")
def cache_engines(tiny_ckpt, tmp_path_factory):
    """ONNX Runtime engines with the prefix-cache graphs, pruned (layer 2, keep 0.5) + unpruned, G = 16,
    batch size 3."""
    return export(tiny_ckpt, tmp_path_factory.mktemp("cache") / "onnx", baseline=True, cache=True, gen_length=16,
                  batch_size=3)


@pytest.fixture(scope="session")
def images():
    """Two image sizes that fit the 384x384 bucket of the tiny config (118 and 136 visual tokens)."""
    return {"380x250": random_image(380, 250, 1), "384x384": random_image(384, 384, 2)}


@pytest.fixture(scope="session")
def aoti_engines(tiny_ckpt, tmp_path_factory):
    """AOTInductor packages (CPU): pruned stages at layer 1, keep 0.35, G = 128 (serves every preset)."""
    t0 = time.perf_counter()
    out = export(tiny_ckpt, tmp_path_factory.mktemp("aoti") / "engines", prune=PruneSettings(1, 0.35),
                 backends=("aoti",), gen_length=128, max_prompt_tokens=160)
    print(f"AOTInductor export of the tiny model: {time.perf_counter() - t0:.1f} s")
    return out
