"""``Pipeline.load`` refuses damaged or foreign engines directories before opening any session."""

from __future__ import annotations

import json
import shutil

import pytest

from helpers import PROMPTS, cli_here
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
    assert pipe.generate(images["384x384"], PROMPTS["short"], fixed_schedule=True, preset="mc").ids


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


# ---------------------------------------------------------------------- tamper evidence
def reseal(m) -> None:
    """What a careful hand edit would add: the content digest recomputed for the edited content."""
    from llada_export.contract.manifest import content_digest

    m["content_sha256"] = content_digest(m)


def regraph(m) -> None:
    """Rewrite every graph's I/O from the (edited) bucket, as the exporter would have: a manifest
    consistent with itself, no longer with its graph files."""
    from llada_export.config import LLaDAVConfig
    from llada_export.contract.bucket import Bucket
    from llada_export.contract.graphset import GRAPHS, Dims

    dims = Dims.of(Bucket.from_dict(m["bucket"]), LLaDAVConfig.from_dict(m["config"]), m["dtype"])
    m["graphs"] = {n: GRAPHS[n].io(dims, m["fused_sampler"]).to_dict() for n in m["graphs"]}


def _input_shape(m):
    m["graphs"]["stage_a"]["inputs"][0]["shape"][1] += 1


def _keep(m):
    m["pruning"]["keep"] = 0.9


def _text_tokens(m):
    m["bucket"]["max_text_tokens"] *= 2


@pytest.mark.parametrize("sealed", [False, True], ids=["as-edited", "resealed"])
@pytest.mark.parametrize("edit, match", [
    (_input_shape, r"graph stage_a: prefix_embeds \[1, \d+, \d+\] float32, the bucket and config give"),
    (_keep, r"bucket.k_static \d+ is not what pruning.keep 0.9 gives"),
    (_text_tokens, r"graph \w+: prefix_embeds .* the bucket and config give"),
], ids=["graph-input-shape", "pruning-keep", "bucket-text-tokens"])
def test_edited_manifest_is_refused(copy, no_sessions, edit, match, sealed):
    """The edits of issue 20 (a graph's input shape, pruning.keep, bucket.max_text_tokens) ran, kept the
    old number of tokens or ended in an ONNX Runtime traceback: refused at load, naming the field, with
    or without the content digest recomputed."""
    edit_manifest(copy, lambda m: (edit(m), sealed and reseal(m)))
    msg = load_fails(copy, no_sessions, match)
    assert "edited manifest; re-run llada-export" in msg and "\n" not in msg


def test_edit_that_keeps_the_fields_consistent_is_caught_by_the_digest(copy, no_sessions):
    """pruning.keep 0.5 -> 0.502 keeps k_static (68 of 136 slots) but changes how many tokens a smaller
    image keeps: only the content digest written at export can tell."""
    edit_manifest(copy, lambda m: m["pruning"].__setitem__("keep", m["pruning"]["keep"] + 0.002))
    load_fails(copy, no_sessions, "edited after export")


@pytest.mark.parametrize("edit", [_keep, _text_tokens], ids=["keep-and-k_static", "text-tokens"])
def test_consistent_rewrite_is_caught_by_the_graph_files(copy, edit):
    """Bucket, k_static and every graph's I/O rewritten consistently and the digest recomputed: the ONNX
    graphs themselves (read without their weights) disagree."""
    from llada_export.contract.pruning import num_kept

    def rewrite(m):
        edit(m)
        if m["pruning"]["keep"] == 0.9:
            m["bucket"]["k_static"] = num_kept(0.9, m["bucket"]["max_visual_tokens"])
        regraph(m)
        reseal(m)

    edit_manifest(copy, rewrite)
    with pytest.raises(ManifestError, match=r"onnx/stage_a.onnx: its (input|output) is \w+ \[.*the manifest says"):
        Pipeline.load(copy, backend="onnxruntime")


def test_stage_a_with_another_static_top_k_is_refused(copy):
    """A stage A graph whose TopK constant was changed (file table re-hashed, shapes intact): refused,
    naming both numbers."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from llada_export.contract.manifest import Manifest

    m = Manifest.read(copy)
    path = copy / m.artifacts["onnxruntime"]["stage_a"]
    proto = onnx.load(str(path), load_external_data=False)
    (topk,) = [n for n in proto.graph.node if n.op_type == "TopK"]
    consts = [n for n in proto.graph.node if n.op_type == "Constant" and n.output[0] == topk.input[1]]
    inits = [t for t in proto.graph.initializer if t.name == topk.input[1]]
    t = consts[0].attribute[0].t if consts else inits[0]
    k = numpy_helper.to_array(t)
    t.CopyFrom(numpy_helper.from_array(np.asarray(k - 1, dtype=k.dtype), t.name))
    onnx.save_model(proto, str(path))

    def rehash(d):
        d["files"] = {k: {"sha256": v.sha256, "bytes": v.bytes}
                      for k, v in file_table(copy, [copy / k for k in d["files"]]).items()}

    edit_manifest(copy, rehash)
    k_static = m.bucket.k_static
    with pytest.raises(ManifestError, match=f"its static top-k keeps {k_static - 1} visual tokens, the manifest "
                                            f"says bucket.k_static {k_static}"):
        Pipeline.load(copy, backend="onnxruntime")


def test_cli_refuses_an_edited_manifest_in_one_line(copy, capfd):
    """llada-generate's main in this process (helpers.cli_here: what a fresh process would show)."""
    from llada_export.cli.generate import main

    edit_manifest(copy, _keep)
    r = cli_here(main, "llada-generate", capfd, "--engines", str(copy), "--prompt", "What is here?")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "pruning.keep 0.9" in r.stderr
