"""``Pipeline.load`` refuses damaged or foreign engines directories before opening any session."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import PROMPTS
from llada_export.exporter.manifest import ManifestError
from llada_export.runtime import pipeline as pipeline_mod
from llada_export.runtime.pipeline import Pipeline


@pytest.fixture
def copy(engines, tmp_path):
    dst = tmp_path / "engines"
    shutil.copytree(engines, dst)
    return dst


@pytest.fixture
def no_sessions(monkeypatch):
    """Fail the test if any backend session would be opened (i.e. inference could start)."""
    opened = []

    def refuse(path, *args, **kwargs):
        opened.append(path)
        raise AssertionError(f"a session was opened for {path} before the engines were validated")

    for name in list(pipeline_mod.RUNNERS):
        monkeypatch.setitem(pipeline_mod.RUNNERS, name, refuse)
    return opened


def load_fails(root, no_sessions, match: str, **kw) -> str:
    with pytest.raises(ManifestError, match=match) as e:
        Pipeline.load(root, **kw)
    assert not no_sessions
    return str(e.value)


def test_pristine_copy_loads_and_runs(copy, images):
    pipe = Pipeline.load(copy, backend="onnxruntime")
    assert pipe.generate(images["384x384"], PROMPTS["short"], preset="mc").ids


@pytest.mark.parametrize("rel", ["onnx/stage_b.onnx", "onnx/vision.onnx", "text_embeddings.safetensors"])
def test_altered_artifact(copy, no_sessions, rel):
    f = copy / rel
    data = bytearray(f.read_bytes())
    size = len(data)
    data[size // 2] ^= 0xFF  # same size, different bytes
    f.write_bytes(bytes(data))
    assert f.stat().st_size == size
    msg = load_fails(copy, no_sessions, "SHA-256")
    assert rel in msg and "altered" in msg


@pytest.mark.parametrize("rel", ["onnx/stage_a.onnx", "onnx/full.onnx"])
def test_truncated_artifact(copy, no_sessions, rel):
    f = copy / rel
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 3])
    msg = load_fails(copy, no_sessions, "truncated")
    assert rel in msg and str(len(data)) in msg


@pytest.mark.parametrize("rel", ["onnx/stage_a.onnx", "tokenizer/tokenizer.json"])
def test_deleted_artifact(copy, no_sessions, rel):
    (copy / rel).unlink()
    msg = load_fails(copy, no_sessions, "missing")
    assert rel in msg


def test_incompatible_format_version(copy, no_sessions):
    path = copy / "manifest.json"
    m = json.loads(path.read_text())
    m["format_version"] = m["format_version"] + 1
    m["tool_version"] = "99.0.0"
    path.write_text(json.dumps(m))
    msg = load_fails(copy, no_sessions, "format version")
    assert "99.0.0" in msg and "re-export" in msg


def test_manifest_not_json(copy, no_sessions):
    (copy / "manifest.json").write_text('{"format": "llada-export/engines", "format_version": 1,')
    msg = load_fails(copy, no_sessions, "not valid JSON")
    assert "manifest.json" in msg


def test_no_manifest(copy, no_sessions):
    (copy / "manifest.json").unlink()
    load_fails(copy, no_sessions, "no manifest.json")


@pytest.mark.parametrize("backend", ["aoti", "tensorrt"])
def test_backend_not_built(copy, no_sessions, backend):
    msg = load_fails(copy, no_sessions, f"--backend {backend}", backend=backend)
    assert "not built" in msg and "onnxruntime" in msg
