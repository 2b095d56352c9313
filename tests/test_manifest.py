"""``Pipeline.load`` refuses damaged or foreign engines directories before opening any session."""

from __future__ import annotations

import json
import shutil

import pytest

from helpers import PROMPTS
from llada_export.contract.manifest import MANIFEST, ManifestError, file_table
from llada_export.engines.registry import BACKENDS, load_builtin
from llada_export.runtime.pipeline import Pipeline


@pytest.fixture
def copy(engines, tmp_path):
    dst = tmp_path / "engines"
    shutil.copytree(engines, dst)
    return dst


@pytest.fixture
def no_sessions(monkeypatch):
    """Fail the test if any backend runner would be made (i.e. inference could start)."""
    import dataclasses

    opened = []

    def refuse(path, *args, **kwargs):
        opened.append(path)
        raise AssertionError(f"a session was opened for {path} before the engines were validated")

    for name, b in list(load_builtin().items()):
        monkeypatch.setitem(BACKENDS, name, dataclasses.replace(b, runner=refuse))
    return opened


def edit_manifest(root, fn) -> None:
    """Edit the manifest and re-hash nothing: what a damaged or hand-edited directory looks like."""
    path = root / MANIFEST
    m = json.loads(path.read_text())
    fn(m)
    path.write_text(json.dumps(m))


def load_fails(root, no_sessions, match: str, **kw) -> str:
    with pytest.raises(ManifestError, match=match) as e:
        Pipeline.load(root, **kw)
    assert not no_sessions
    return str(e.value)


def test_pristine_copy_loads_and_runs(copy, images):
    pipe = Pipeline.load(copy, backend="onnxruntime")
    assert pipe.generate(images["384x384"], PROMPTS["short"], preset="mc").ids


@pytest.mark.parametrize("rel", ["onnx/stage_b.onnx", "onnx/weights.bin", "text_embeddings.safetensors"])
def test_altered_artifact(copy, no_sessions, rel):
    f = copy / rel
    data = bytearray(f.read_bytes())
    size = len(data)
    data[size // 2] ^= 0xFF  # same size, different bytes
    f.write_bytes(bytes(data))
    assert f.stat().st_size == size
    msg = load_fails(copy, no_sessions, "SHA-256")
    assert rel in msg and "altered" in msg


@pytest.mark.parametrize("rel", ["onnx/stage_a.onnx", "onnx/unpruned.onnx"])
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


def test_no_such_directory(tmp_path, no_sessions):
    msg = load_fails(tmp_path / "nope", no_sessions, "no such engines directory")
    assert "llada-export -o" in msg


def test_artifact_pointing_at_another_graph(copy, no_sessions):
    """The artifacts mapping is checked against the file table: stage_b pointed at the (listed,
    intact) vision graph is refused before any session opens."""
    edit_manifest(copy, lambda m: m["artifacts"]["onnxruntime"].__setitem__("stage_b", "onnx/vision.onnx"))
    load_fails(copy, no_sessions, "a file of another graph")


def test_artifact_pointing_at_a_missing_file(copy, no_sessions):
    edit_manifest(copy, lambda m: m["artifacts"]["onnxruntime"].__setitem__("stage_b", "onnx/stage_b_old.onnx"))
    load_fails(copy, no_sessions, "not in the manifest's file table")


def test_artifact_of_an_undescribed_graph(copy, no_sessions):
    def add(m):
        m["artifacts"]["onnxruntime"]["mystery"] = "onnx/stage_b.onnx"

    edit_manifest(copy, add)
    load_fails(copy, no_sessions, "names a graph the manifest does not describe")


def test_missing_field(copy, no_sessions):
    edit_manifest(copy, lambda m: m.pop("bucket"))
    load_fails(copy, no_sessions, "field 'bucket' is missing")


def test_file_table_rehash_keeps_a_consistent_copy_loadable(copy):
    """The tampering tests above fail for the reason they name: the same edit with a correct
    mapping and a re-hashed table loads."""
    def rehash(m):
        m["files"] = {k: {"sha256": v.sha256, "bytes": v.bytes}
                      for k, v in file_table(copy, [copy / k for k in m["files"]]).items()}

    edit_manifest(copy, rehash)
    assert Pipeline.load(copy, backend="onnxruntime").backend == "onnxruntime"


@pytest.mark.parametrize("backend", ["aoti", "tensorrt"])
def test_backend_not_built(copy, no_sessions, backend):
    msg = load_fails(copy, no_sessions, f"--backend {backend}", backend=backend)
    assert "not built" in msg and "onnxruntime" in msg
