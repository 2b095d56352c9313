"""Shared fixtures: one tiny random checkpoint and the engine sets the tests share, per session.

The checkpoint uses init std 0.3 (not 0.02) so the random model's answers vary from
position to position: token-exact comparisons between two paths can then fail.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from helpers import TINY_STD, compile_cache_exports, export, random_image
from llada_export.checkpoint.loader import load_checkpoint
from llada_export.contract.pruning import PruneSettings
from llada_export.engines.torch_caches import install as install_torch_caches
from llada_export.synthetic.weights import random_checkpoint


# Approximate seconds of the test files that take more than ~10 s (make test on 2 cores, 2026-12-07, in this
# order, from one full run; the shared fixtures' exports counted where they are first needed). Under
# `--dist loadfile` pytest-xdist hands out whole files, by default those with the most tests first, which
# left heavy files of few tests (test_demo, test_warmup, test_bench_gpu) to the end of the run: one worker
# ran them while the other idled. LongestFirst hands out these files longest first, the others after them
# in xdist's order; only the order changes (a file still runs whole, on one worker, its module fixtures made
# once: the serving tests' Ray cluster).
FILE_SECONDS = {
    "test_serve": 248, "test_export": 245, "test_batch_sizes": 105, "test_demo": 98, "test_compare_engines": 73,
    "test_cache": 57, "test_bench_gpu": 54, "test_fused_cache": 52, "test_analysis_tools": 38, "test_fused": 36,
    "test_pipeline": 34, "test_fp8": 34, "test_compare_seeds": 33, "test_qa_inputs": 30, "test_architecture": 29,
    "test_capacity": 27, "test_serve_cli": 27, "test_cli": 22, "test_weights_reader": 17, "test_precompiled": 17,
    "test_narrow": 14, "test_reports": 14, "test_batch": 13, "test_padded_attention": 12, "test_compare": 12,
    "test_light_tokenizer": 8, "test_prune_pass": 8, "test_vqa_task": 6, "test_outdir": 4, "test_cancel": 4,
    "test_qa_robust": 3, "test_warmup": 2, "test_serve_api": 1, "test_qa_messages": 1, "test_tools_official": 1,
}


@pytest.hookimpl(tryfirst=True, optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """``--dist loadfile`` with the files of FILE_SECONDS handed out longest first."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    if not hasattr(LoadFileScheduling, "_assign_work_unit"):  # xdist's internals (3.8) changed: its own order
        return None

    class LongestFirst(LoadFileScheduling):
        ordered = False

        def _assign_work_unit(self, node):
            if not self.ordered and hasattr(self.workqueue, "move_to_end"):  # complete at the first assignment
                self.ordered = True
                for scope in sorted(self.workqueue, key=lambda s: -FILE_SECONDS.get(Path(s.split("::")[0]).stem, 0)):
                    self.workqueue.move_to_end(scope)  # sorted() is stable: xdist's order among equals
            super()._assign_work_unit(node)

    return LongestFirst(config, log)


def pytest_configure(config):
    """The eager oracles and the sampler run tiny ops: with torch's OpenMP threads competing for
    2 busy cores (pytest -n 2, ONNX Runtime's own threads) they slow down 5-10x."""
    torch.set_num_threads(1)
    if os.environ.get("PYTEST_XDIST_WORKER") or not getattr(config.option, "numprocesses", None):  # runs tests
        install_torch_caches()  # also done by the exporter and the loaders; here once for the in-process tests


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """Tools run in-process (prune_sweep, train_demo) set torch's thread count for their own runs; put
    it back so that no test depends on which ran before it in the same worker (Inductor's CPU kernels,
    and so its compile cache, specialise on the count)."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def shared(tmp_path_factory, name: str, build):
    """A directory built once per test run, not once per pytest-xdist worker (the workers share the
    parent of their base temp dirs; the first to take the lock builds, the others wait and reuse it).
    Tests treat it as read-only, as they treat any session fixture."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    out, done = root / "shared" / name, root / "shared" / f"{name}.done"
    out.parent.mkdir(exist_ok=True)
    with FileLock(str(root / "shared" / f"{name}.lock")):
        if not done.exists():
            built = build(out)
            done.write_text(str(built))
    return Path(done.read_text())


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    return shared(tmp_path_factory, "tiny", lambda out: random_checkpoint("tiny", out, seed=0, init_std=TINY_STD))


@pytest.fixture(scope="session")
def tiny(tiny_ckpt):
    """(model fp32, tokenizer, config) loaded from the tiny checkpoint."""
    return load_checkpoint(tiny_ckpt, dtype=torch.float32)


@pytest.fixture(scope="session")
def engines(tiny_ckpt, tmp_path_factory):
    """ONNX Runtime engines: pruned (layer 2, keep 0.5) + unpruned baseline, G = 128, 384x384 bucket."""
    return shared(tmp_path_factory, "engines", lambda out: export(tiny_ckpt, out, baseline=True, gen_length=128))


@pytest.fixture(scope="session")
def cache_engines(tiny_ckpt, tmp_path_factory):
    """ONNX Runtime engines with the prefix-cache graphs, pruned (layer 2, keep 0.5) + unpruned, G = 16,
    batch size 3."""
    return shared(tmp_path_factory, "cache_engines", lambda out: export(
        tiny_ckpt, out, baseline=True, cache=True, gen_length=16, batch_size=3))


@pytest.fixture(scope="session")
def bf16_onnx_engines(tiny_ckpt, tmp_path_factory):
    """ONNX Runtime engines in bfloat16 exported on this CPU (which cannot run them), G = 8: test_pipeline's
    and test_qa_inputs' refusals."""
    return shared(tmp_path_factory, "bf16_onnx", lambda out: export(
        tiny_ckpt, out, dtype="bfloat16", gen_length=8, max_prompt_tokens=160))


@pytest.fixture(scope="session")
def images():
    """Two image sizes that fit the 384x384 bucket of the tiny config (118 and 136 visual tokens)."""
    return {"380x250": random_image(380, 250, 1), "384x384": random_image(384, 384, 2)}


@pytest.fixture(scope="session")
def aoti_engines(tiny_ckpt, tmp_path_factory):
    """AOTInductor packages (CPU): pruned stages at layer 1, keep 0.35, G = 128 (serves every preset)."""
    return shared(tmp_path_factory, "aoti_engines", lambda out: export(
        tiny_ckpt, out, prune=PruneSettings(1, 0.35), backends=("aoti",), gen_length=128, max_prompt_tokens=160))


@pytest.fixture(scope="session")
def demo_cache_engines(tmp_path_factory):
    """The demo model's engines with make demo's pruning (K 3, keep 0.75) and the prefix cache, G = 16,
    batch size 4, the task's bucket (test_serve's server; test_cache's trained-model checks at G = 8)."""
    from llada_export import vqa_task
    from llada_export.demo import DEMO_IMAGE_SIZE, DEMO_KEEP, DEMO_MODEL, DEMO_PRUNE_LAYER
    from llada_export.tokenizer import load_tokenizer

    return shared(tmp_path_factory, "demo_cache_engines", lambda out: export(
        DEMO_MODEL, out, prune=PruneSettings(DEMO_PRUNE_LAYER, DEMO_KEEP), cache=True, gen_length=16,
        block_length=16, steps=16, max_prompt_tokens=vqa_task.prompt_tokens(load_tokenizer(DEMO_MODEL)),
        image_size=DEMO_IMAGE_SIZE, batch_size=4))


@pytest.fixture(scope="session")
def multi_size_engines(tiny_ckpt, tmp_path_factory):
    """Pruned + cache graphs at batch sizes 1, 2 and 4, for ONNX Runtime and Inductor, in a small bucket
    (``--image-size 384x288``: 118 visual slots, fewer than the 136 of warmup's 64x64 blank image; 112 prompt
    tokens; 16 response tokens): test_batch_sizes' directory, test_narrow's, test_warmup's (a bucket smaller
    than a 64px image) and test_compare_engines' (a built-in prompt that does not fit)."""
    return shared(tmp_path_factory, "batch_sizes_124", lambda out: export(
        tiny_ckpt, out, cache=True, batch_sizes=(1, 2, 4), backends=("onnxruntime", "inductor"),
        image_size=(384, 288), gen_length=16, max_prompt_tokens=112))


@pytest.fixture(scope="session")
def compile_cache_engines(tiny_ckpt, tmp_path_factory):
    """``helpers.compile_cache_exports``: two unpruned Inductor exports with the compile cache made in one
    process (``g8/``, ``g16/``) and what a fresh process loading ``g16/`` found (``load.json``): the compile-cache
    checks of test_export and test_compile_cache_unpruned."""
    return shared(tmp_path_factory, "compile_cache", lambda out: compile_cache_exports(tiny_ckpt, out))
