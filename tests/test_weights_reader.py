"""How the compiled graphs' weights file is read (``runtime/weights.read_weights``): fastsafetensors
(threaded reads through pinned buffers, issue 22's load time) against safetensors' ``load_file``, the
oracle; and the cases where the fast reader must not be used."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from llada_export.runtime.pipeline import Pipeline
from llada_export.runtime.weights import READER_ENV, read_weights

from helpers import four_requests


@pytest.fixture
def small_file(tmp_path):
    """Tensors of several dtypes and odd sizes (offsets not aligned to the next tensor's element size)."""
    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(33, 7, generator=g).to(torch.bfloat16), "b": torch.randn(5, generator=g),
               "c": torch.randint(-9, 9, (3, 3), generator=g, dtype=torch.int64),
               "d": torch.randn(4, 4, generator=g).to(torch.float8_e4m3fn)}
    path = tmp_path / "w.safetensors"
    save_file(tensors, str(path))
    return path


def test_fastsafetensors_reads_what_load_file_reads(small_file, monkeypatch):
    pytest.importorskip("fastsafetensors", reason="no fastsafetensors wheel for this platform (pyproject.toml)")
    monkeypatch.setenv(READER_ENV, "fastsafetensors")
    got, reader = read_weights(small_file, "cpu", {"a", "b", "c", "d"})
    want = load_file(str(small_file))
    assert reader == "fastsafetensors" and got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape
        assert torch.equal(got[k].view(torch.uint8), want[k].view(torch.uint8)), k


def test_a_file_with_tensors_the_graphs_drop_is_read_tensor_by_tensor(small_file, monkeypatch):
    """fastsafetensors' tensors share one buffer: a tensor bind_constants drops (a part of a fused weight, in
    engines whose file holds the parts) would free nothing. auto then reads with load_file; asking for
    fastsafetensors is refused, naming such a tensor."""
    monkeypatch.setenv(READER_ENV, "fastsafetensors")
    with pytest.raises(ValueError, match=r"cannot read .*w\.safetensors: 1 of its tensors \(e\.g\. d\) are not bound"):
        read_weights(small_file, "cpu", {"a", "b", "c"})
    monkeypatch.setenv(READER_ENV, "auto")
    got, reader = read_weights(small_file, "cpu", {"a", "b", "c"})
    assert reader == "safetensors" and set(got) == {"a", "b", "c", "d"}


def test_a_reader_that_does_not_exist_is_named(small_file, monkeypatch):
    monkeypatch.setenv(READER_ENV, "fast")
    with pytest.raises(ValueError, match="LLADA_WEIGHTS_READER='fast': expected one of auto, safetensors, fastsafetensors"):
        read_weights(small_file, "cpu", {"a"})


@pytest.mark.parametrize("env", ["LLADA_WEIGHTS_READER", "LLADA_TOKENIZER"])
def test_a_bad_choice_in_the_environment_is_refused_by_engines_that_would_not_use_it(cache_engines, monkeypatch, env):
    """ONNX engines read no weights file, so LLADA_WEIGHTS_READER=fast loaded them without a word (and failed only
    on the user's Inductor engines later); every load names a bad value first, before any work."""
    monkeypatch.setenv(env, "fast")
    with pytest.raises(ValueError, match=f"{env}='fast': expected one of auto, "):
        Pipeline.load(cache_engines, backend="onnxruntime", verify=False)
    monkeypatch.delenv(env)
    assert Pipeline.load(cache_engines, backend="onnxruntime", verify=False).weights_reader is None


def test_engines_read_by_fastsafetensors_answer_as_by_load_file(multi_size_engines, monkeypatch):
    """The Inductor engines' weights.safetensors holds the fused tensors the graphs bind (no parts to drop),
    so fastsafetensors may read it; the answers are the same token ids as with load_file."""
    pytest.importorskip("fastsafetensors", reason="no fastsafetensors wheel for this platform (pyproject.toml)")
    answers = {}
    for reader in ("safetensors", "fastsafetensors"):
        monkeypatch.setenv(READER_ENV, reader)
        pipe = Pipeline.load(multi_size_engines, backend="inductor", warmup=False,
                             runner_options={"compile": False})
        assert pipe.weights_reader == reader and pipe.load_times["weights_read"] >= 0
        answers[reader] = [r.ids for r in pipe.generate_batch(four_requests()[:3], preset="chartqa", cache=True)]
    assert answers["safetensors"] == answers["fastsafetensors"]
