"""Several batch sizes in one engines directory (``llada-export --batch-sizes 1,2,4``): one copy of the
weights, each batch on the smallest size that holds it, answers equal to the eager oracles, and a manifest
whose sizes are as tamper-evident as the rest."""

from __future__ import annotations

import json
import shutil
import zipfile

import pytest

from helpers import four_requests
from llada_export.contract.manifest import MANIFEST, Manifest, ManifestError, file_table
from llada_export.contract.pruning import PruneSettings
from llada_export.reference import reference_generate
from llada_export.runtime.pipeline import Pipeline, Request, RequestError


@pytest.fixture(scope="module")
def pipe(multi_size_engines):
    return Pipeline.load(multi_size_engines, backend="onnxruntime")


def test_one_copy_of_the_weights(multi_size_engines, cache_engines):
    """ONNX: one shared weights file, the size of a single-size directory's (the session's batch-size-3
    engines of the same checkpoint); the graph files hold no weights. Inductor: one weights.safetensors, and
    the programs hold none (meta tensors mapped to it)."""
    multi = multi_size_engines
    m = json.loads((multi / MANIFEST).read_text())
    assert m["batch_sizes"] == [1, 2, 4] and m["bucket"]["batch_size"] == 4
    weights = (multi / "onnx" / "weights.bin").stat().st_size
    one = (cache_engines / "onnx" / "weights.bin").stat().st_size
    # the decoder weights once (+ each size's few batch-shaped constants of >= 1 KiB and the cache graphs' tables:
    # within 5% of the single-size directory's, which holds one size's)
    assert one <= weights < 1.05 * one
    onnx = sorted(p.name for p in (multi / "onnx").iterdir())
    assert onnx == sorted(["weights.bin", "vision.onnx"] + [f"{g}{s}.onnx" for g in ("stage_a", "stage_b", "prefill", "cached")
                                                            for s in ("", "@b1", "@b2")])
    for p in (multi / "onnx").glob("*.onnx"):  # graph structure and small constants only
        assert p.stat().st_size < weights / 4, p.name
    assert m["weights_file"] == "weights.safetensors" and (multi / "weights.safetensors").stat().st_size <= weights * 1.05
    for p in (multi / "programs").glob("*.pt2"):
        with zipfile.ZipFile(p) as z:
            held = sum(i.file_size for i in z.infolist() if "/data/weights/" in i.filename and not i.filename.endswith(".json"))
        assert held < 1024, p.name  # meta tensors (0 bytes) and a tiny buffer or two
    onnx_dir = sum(p.stat().st_size for p in [multi / MANIFEST, multi / "onnx"] + list((multi / "onnx").iterdir())
                   if p.is_file())
    assert onnx_dir < weights + 13 * 2**19  # 1 + 3 x 4 graphs of a few hundred KB (< 512 KiB) beside one weights file


def test_each_batch_runs_on_the_smallest_size_that_holds_it(pipe):
    assert pipe.batch_sizes == [1, 2, 4]
    assert [pipe.batch_size_for(n) for n in (1, 2, 3, 4)] == [1, 2, 4, 4]
    with pytest.raises(RequestError, match="at most 4 at once: re-export with a larger --batch-size"):
        pipe.batch_size_for(5)
    with pytest.raises(RequestError, match="at most 4 at once"):
        pipe.generate_batch(four_requests() + [Request(None, "hi")], preset="chartqa")
    (r,) = pipe.generate_batch(four_requests()[:1], preset="chartqa")
    assert r.timings["engine_batch_size"] == 1 and r.timings["batch_size"] == 1
    assert r.graph_calls and set(r.graph_calls) <= {"stage_a", "stage_b", "prefill", "cached"}


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_rows_equal_the_eager_oracles(pipe, tiny, n):
    """Row by row, at the size that holds n: the pruned path (stage A + stage B at this size) against the eager
    pruned oracle, the cached path (prefill + cached step at this size) against the eager cached oracle.
    (The oracles, not single-size engines of that size: what those would be compared with.)"""
    model, tok, _ = tiny
    reqs = four_requests()[:n]
    size = pipe.batch_size_for(n)
    got = pipe.generate_batch(reqs, preset="chartqa", cache=False)
    assert {r.timings["engine_batch_size"] for r in got} == {size}
    cached = pipe.generate_batch(reqs, preset="chartqa", cache=True, refresh=4)
    for rows, cache in ((got, False), (cached, True)):
        gen = pipe.generation_config(preset="chartqa", cache=cache, **({"refresh": 4} if cache else {}))
        for r, c in zip(reqs, rows):
            ref = reference_generate(model, tok, r.image, r.prompt, gen, PruneSettings(2, 0.5), seed=r.seed)
            assert c.ids == ref.ids and c.kept_visual == ref.kept_visual, (cache, r.prompt)
    assert len({tuple(r.ids) for r in cached}) == n  # the rows did not mix


def test_inductor_sizes_share_one_set_of_tensors(multi_size_engines, pipe):
    """The Inductor graphs (their own eager kernels: no compile time) load their weights once from the
    directory's weights file, and answer as the ONNX graphs at each size."""
    ind = Pipeline.load(multi_size_engines, backend="inductor", runner_options={"compile": False}, warmup=False)
    assert ind.batch_sizes == [1, 2, 4]
    for n in (1, 3):
        got = ind.generate_batch(four_requests()[:n], preset="chartqa")
        want = pipe.generate_batch(four_requests()[:n], preset="chartqa")
        assert [r.ids for r in got] == [r.ids for r in want] and got[0].timings["engine_batch_size"] == (1, 4)[n > 1]


def test_warmup_runs_every_size(multi_size_engines):
    p = Pipeline.load(multi_size_engines, backend="onnxruntime")
    calls = []
    for size, runners in p.sized_runners.items():
        for name, r in runners.items():
            run = r.run
            r.run = lambda feeds, run=run, name=name, size=size: calls.append((size, name)) or run(feeds)
    p.warmup()
    assert {s for s, _ in calls} == {1, 2, 4}


# ---------------------------------------------------------------------- tamper evidence across sizes
@pytest.fixture
def copy(multi_size_engines, tmp_path):
    dst = tmp_path / "engines"
    shutil.copytree(multi_size_engines, dst)
    return dst


def edit(root, fn, rehash: bool = False) -> None:
    """Edit the manifest, then (as a careful forger would) rehash the file table and reseal its digest."""
    from llada_export.contract.manifest import content_digest

    path = root / MANIFEST
    m = json.loads(path.read_text())
    fn(m)
    if rehash:
        m["files"] = {k: {"sha256": f.sha256, "bytes": f.bytes}
                      for k, f in file_table(root, [root / k for k in m["files"]]).items()}
    m["content_sha256"] = content_digest(m)
    path.write_text(json.dumps(m))


def _swap(m, a, b):
    m["artifacts"]["onnxruntime"][a], m["artifacts"]["onnxruntime"][b] = \
        m["artifacts"]["onnxruntime"][b], m["artifacts"]["onnxruntime"][a]


def _drop(m, key):
    del m["graphs"][key]
    for a in m["artifacts"].values():
        a.pop(key, None)


def _shape(m, key, batch):
    for t in m["graphs"][key]["inputs"] + m["graphs"][key]["outputs"]:
        if t["name"] != "kv_cache":
            t["shape"][0] = batch


EDITS = {
    "sizes without their graphs": (lambda m: m.__setitem__("batch_sizes", [1, 2, 3, 4]), "at batch size 3 are"),
    "sizes not ending at the bucket": (lambda m: m.__setitem__("batch_sizes", [1, 2]), "must ascend"),
    "sizes out of order": (lambda m: m.__setitem__("batch_sizes", [2, 1, 4]), "must ascend"),
    "a size of no graphs": (lambda m: m["graphs"].__setitem__("stage_b@b3", m["graphs"]["stage_b@b2"]),
                            "batch size not in batch_sizes"),
    "a size missing a graph": (lambda m: _drop(m, "cached@b1"), r"at batch size 1 are .*every size has the same"),
    "vision per size": (lambda m: m["graphs"].__setitem__("vision@b2", m["graphs"]["vision"]), "built once"),
    "a graph's I/O at another size": (lambda m: _shape(m, "stage_b@b2", 1), r"graph stage_b@b2: prefix_embeds \[1,"),
    "graphs of two sizes swapped": (lambda m: _swap(m, "stage_b@b1", "stage_b@b2"), "a file of another graph"),
    "the weights file": (lambda m: m.__setitem__("weights_file", "nowhere.safetensors"), "not in the file table"),
    "sizes in a format-4 manifest": (lambda m: m.__setitem__("format_version", 4), "in a format-4 manifest"),
}


@pytest.mark.parametrize("name", list(EDITS))
def test_edits_across_sizes_are_refused(copy, name):
    fn, match = EDITS[name]
    edit(copy, fn)
    with pytest.raises(ManifestError, match=match):
        Pipeline.load(copy, backend="onnxruntime", warmup=False)


def test_a_graph_file_of_another_size_is_caught_in_the_file(copy):
    """stage_b@b2.onnx replaced by the size-1 graph, the file table rehashed and the manifest resealed:
    the graph's own input shapes give it away."""
    shutil.copy(copy / "onnx" / "stage_b@b1.onnx", copy / "onnx" / "stage_b@b2.onnx")
    edit(copy, lambda m: None, rehash=True)
    with pytest.raises(ManifestError, match=r"stage_b@b2.onnx: its input is prefix_embeds \[1, "):
        Pipeline.load(copy, backend="onnxruntime", warmup=False)


def test_a_version_4_directory_of_one_size_still_loads(cache_engines, tmp_path):
    """What llada-export wrote before --batch-sizes (format 4: no batch_sizes, no weights_file) loads
    and answers as before (a copy of the session's batch-size-3 engines)."""
    dst = tmp_path / "old"
    shutil.copytree(cache_engines, dst)
    edit(dst, lambda m: [m.pop("batch_sizes"), m.pop("weights_file"), m.__setitem__("format_version", 4)])
    old, new = Pipeline.load(dst), Pipeline.load(cache_engines)
    assert old.batch_sizes == [3] and old.manifest.format_version == 4
    assert [r.ids for r in old.generate_batch(four_requests()[:2], preset="chartqa")] == \
        [r.ids for r in new.generate_batch(four_requests()[:2], preset="chartqa")]
    with pytest.raises(RequestError, match="at most 3 at once"):
        old.generate_batch(four_requests(), preset="chartqa")


def test_cli_batch_size_and_batch_sizes(tiny_ckpt, tmp_path, capsys):
    from llada_export.cli.export import main

    for argv, match in ((["--batch-size", "2", "--batch-sizes", "1,2"], "not allowed with argument"),
                        (["--batch-sizes", "1,x"], "comma-separated positive integers"),
                        (["--batch-sizes", "2,2"], "without repeats")):
        with pytest.raises(SystemExit) as e:
            main(["--model", str(tiny_ckpt), "-o", str(tmp_path / "e"), *argv])
        assert e.value.code == 2 and match in capsys.readouterr().err


def test_llada_compare_compares_one_size_and_says_which(multi_size_engines, tiny_ckpt, tmp_path):
    from llada_export.compare import run_compare

    rep = run_compare(multi_size_engines, tiny_ckpt, backends=["onnxruntime"], presets=("chartqa",), save_dir=tmp_path / "pg")
    assert rep.passed, rep.to_dict()
    (note,) = [n for n in rep.notes if "batch sizes 1, 2, 4" in n]
    assert "compared at batch size 4 (the largest)" in note and "on batch size 1" in note
    assert {g.graph for g in rep.graphs} == {"vision", "stage_a", "stage_b", "prefill", "cached"}
    assert rep.agreement and all(a["engine_vs_reference_exact"] for a in rep.agreement)


def _flip(path, at: int) -> None:
    """One byte of ``path`` changed in place, the size kept (what a bit flip on disk or a careless edit does)."""
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def test_the_weights_file_is_hashed_while_the_load_goes_on(multi_size_engines, copy):
    """The compiled graphs' weights.safetensors (16 GB at full size: about 10 s of SHA-256) is hashed beside
    the load, not before it (issue 22's load time), and still refused when altered: in its tensor bytes (the
    load itself succeeds, then the hash says no) or in its header (the load fails, and the hash is what is said).
    Program archives are checked before anything is read: a .pt2 can hold pickles."""
    good = Pipeline.load(multi_size_engines, backend="inductor", warmup=False)
    stages = {k for k in good.load_times if ":" not in k}
    assert stages == {"verify", "weights_read", "weights", "graphs", "verify_wait"}
    parts = {k for k in good.load_times if ":" in k}  # within weights and graphs: what took the seconds
    assert parts == {"weights:tokenizer", "weights:embeddings"} | {f"graphs:{g}" for g in good.manifest.artifacts["inductor"]}
    assert all(s >= 0 for s in good.load_times.values())
    weights = copy / "weights.safetensors"
    _flip(weights, weights.stat().st_size - 3)  # the last tensor's bytes
    with pytest.raises(ManifestError, match="weights.safetensors does not match its SHA-256 .*re-run llada-export"):
        Pipeline.load(copy, backend="inductor", warmup=False)
    _flip(weights, weights.stat().st_size - 3)  # put back
    _flip(weights, 12)  # inside the JSON header: safetensors cannot read it
    with pytest.raises(ManifestError, match="weights.safetensors does not match its SHA-256") as e:
        Pipeline.load(copy, backend="inductor", warmup=False)
    assert e.value.__cause__ is not None  # the reader's own error, kept as the cause
    with pytest.raises(ValueError, match="only data files"):
        Manifest.read(copy, verify=False).verify(copy, defer=["programs/cached.pt2"])


def test_a_refusal_does_not_wait_for_the_weights_hash(copy, monkeypatch):
    """A load refused for what it was asked (a backend not built) says so at once and stops the weights' hash
    it started (a slow hash stands in for 16.9 GB): no waiting for a check nobody will read."""
    import time

    from llada_export.contract import manifest as mf

    real = mf.sha256

    def slow(path, *a, stop=None, **kw):
        if str(path).endswith("weights.safetensors"):
            for _ in range(200):  # up to 10 s, unless stopped
                if stop is not None and stop.is_set():
                    return None
                time.sleep(0.05)
        return real(path, *a, stop=stop, **kw)

    monkeypatch.setattr(mf, "sha256", slow)
    t0 = time.perf_counter()
    with pytest.raises(ManifestError, match="backend 'aoti' was not built"):
        Pipeline.load(copy, backend="aoti", warmup=False)
    assert time.perf_counter() - t0 < 5
