"""llada-compare: Polygraphy comparisons per graph and end-to-end agreement."""

from __future__ import annotations

import copy
import json
import runpy
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
from helpers import cli_here
from onnx import numpy_helper
from polygraphy.comparator import RunResults

from llada_export.contract.manifest import MANIFEST, file_table


def _compare(capfd, engines, ckpt, report, *extra) -> subprocess.CompletedProcess:
    """``llada-compare`` in this process (helpers.cli_here: its exit status, stdout and stderr, native code's
    output and the warnings a fresh interpreter would print included); test_compare_engines' interrupted run
    is a real process."""
    from llada_export.cli.compare import main

    return cli_here(main, "llada-compare", capfd, "--engines", str(engines), "--model", str(ckpt), "--report",
                    str(report), "--presets", "mc,chartqa", *extra)


def _rehash(root):
    m = json.loads((root / MANIFEST).read_text())
    m["files"] = {k: {"sha256": v.sha256, "bytes": v.bytes}
                  for k, v in file_table(root, [root / k for k in m["files"]]).items()}
    (root / MANIFEST).write_text(json.dumps(m))


def test_compare_passes_for_onnxruntime_and_polygraphy_command_reproduces(engines, tiny_ckpt, tmp_path, capfd):
    r = _compare(capfd, engines, tiny_ckpt, tmp_path / "report.json", "--save-dir", str(tmp_path / "pg"))
    assert r.returncode == 0, r.stdout + r.stderr
    rep = json.loads((tmp_path / "report.json").read_text())
    assert rep["passed"] and (tmp_path / "report.md").is_file()
    graphs = {(g["backend"], g["graph"]) for g in rep["graphs"]}
    assert graphs == {("onnxruntime", n) for n in ("vision", "stage_a", "stage_b", "unpruned")}
    for g in rep["graphs"]:
        for out, s in g["stats"].items():
            assert {"max_abs", "mean_abs", "median_abs", "p99_abs", "max_rel"} <= set(s)
            assert s["passed"] and s["max_abs"] <= g["tolerances"][out]["atol"]  # fp32: within atol everywhere
    stage_a = next(g for g in rep["graphs"] if g["graph"] == "stage_a")
    assert stage_a["tolerances"]["kept_index"] == stage_a["tolerances"]["kept_alive"] == {"atol": 0.0, "rtol": 0.0}
    assert stage_a["stats"]["kept_index"]["max_abs"] == 0  # fp32: the same kept set
    assert rep["agreement"] and all(a["engine_vs_reference_exact"] for a in rep["agreement"])
    assert all(a["kept_overlap"] == 1.0 for a in rep["agreement"])  # fp32: the same tokens kept
    assert "passes on" in (tmp_path / "report.md").read_text()
    assert "invalid value encountered" not in r.stderr
    # The printed polygraphy command, run by hand, passes; it judges the kept SET like llada-compare:
    # a dead slot of the static top-k (this bucket holds 9: 118 of 136 visual slots are real) may point
    # anywhere, a kept position that differs fails.
    cmd = next(g["polygraphy_command"] for g in rep["graphs"] if g["graph"] == "stage_a")
    assert cmd in r.stdout
    argv = shlex.split(cmd)
    argv[0] = str(shutil.which("polygraphy", path=str(Path(sys.executable).parent)))
    ref_path = tmp_path / "pg" / "onnxruntime_stage_a_reference_outputs.json"
    ref = RunResults.load(str(ref_path))
    outs = ref[0][1][0]
    index, alive = outs["kept_index"].copy(), outs["kept_alive"].astype(bool)
    assert (~alive).any() and alive.any()
    index[~alive] = 7  # a dead slot pointing at another position
    outs["kept_index"] = index
    ref.save(str(ref_path))
    pg = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert pg.returncode == 0 and "PASSED" in pg.stdout + pg.stderr, pg.stdout + pg.stderr
    # ... with the check its script defines, which a kept position that differs fails
    script = argv[argv.index("--compare-func-script") + 1]
    check = runpy.run_path(script)
    same = check["postprocess_outputs"](RunResults.load(str(ref_path))[0][1][0])
    moved = copy.deepcopy(same)
    moved["kept_index"][0, 0] += 1  # the first kept position of row 0
    assert all(check["compare_outputs"](same, copy.deepcopy(same)).values())
    assert not check["compare_outputs"](same, moved)["kept_index"]


def test_compare_passes_for_aoti(aoti_engines, tiny_ckpt, tmp_path, capfd):
    r = _compare(capfd, aoti_engines, tiny_ckpt, tmp_path / "report.json", "--presets", "mc")
    assert r.returncode == 0, r.stdout + r.stderr
    rep = json.loads((tmp_path / "report.json").read_text())
    assert {g["backend"] for g in rep["graphs"]} == {"aoti"}
    assert {g["graph"] for g in rep["graphs"]} == {"vision", "stage_a", "stage_b"}


def test_compare_fails_on_a_perturbed_engine(engines, tiny_ckpt, tmp_path, capfd):
    bad = tmp_path / "engines"
    shutil.copytree(engines, bad)
    path = bad / "onnx" / "stage_b.onnx"
    model = onnx.load(str(path))  # with its weights from the shared weights.bin
    init = max(model.graph.initializer, key=lambda t: np.prod(t.dims))  # the largest weight
    arr = numpy_helper.to_array(init).copy()
    arr *= 1.05
    init.CopyFrom(numpy_helper.from_array(arr, init.name))  # now inline in stage_b.onnx: the others keep theirs
    onnx.save(model, str(path))
    # A consistent directory (hashes updated): only the comparison can catch the wrong weights.
    _rehash(bad)
    r = _compare(capfd, bad, tiny_ckpt, tmp_path / "report.json")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "stage_b output 'logits'" in r.stderr
    rep = json.loads((tmp_path / "report.json").read_text())
    failed = {(g["graph"]) for g in rep["graphs"] if not g["passed"]}
    assert failed == {"stage_b"}


def test_compare_refuses_a_checkpoint_of_another_model(engines, tmp_path, capfd):
    """Exit 2 (a usage error), not 1 (a failed comparison), naming what differs."""
    from llada_export.synthetic.weights import random_checkpoint

    other = random_checkpoint("demo", tmp_path / "other")
    r = _compare(capfd, engines, other, tmp_path / "report.json")
    assert r.returncode == 2, r.stdout + r.stderr
    assert "is not the checkpoint" in r.stderr and "hidden_size" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_compare_refuses_output_paths_before_it_runs(engines, tiny_ckpt, tmp_path, capfd):
    """Exit 2 with one line, before anything is compared: a report in a folder that does not exist (the run's
    results would be lost at its end), a report named .md (its summary would overwrite it), a --save-dir that is
    a file, the engines or the checkpoint directory (nothing is written into them)."""
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    before = sorted(p.name for p in engines.rglob("*")), sorted(p.name for p in tiny_ckpt.rglob("*"))
    cases = [(tmp_path / "nodir" / "r.json", [], "does not exist"), (tmp_path / "r.md", [], "give"),
             (tmp_path / "r.json", ["--save-dir", str(a_file)], "is a file"),
             (tmp_path / "r.json", ["--save-dir", str(engines)], "inside the engines directory"),
             (tmp_path / "r.json", ["--save-dir", str(tiny_ckpt / "pg")], "inside the checkpoint directory")]
    for report, extra, message in cases:
        r = _compare(capfd, engines, tiny_ckpt, report, *extra)
        assert r.returncode == 2 and message in r.stderr, (report, extra, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
        if extra:  # the report asked for says why (a bad --report path: nothing written)
            assert message in json.loads(report.read_text())["error"]
            report.unlink()
        assert sorted(p.name for p in tmp_path.iterdir() if p.suffix in (".json", ".md")) == ["r.md"] * bool(extra)
        (tmp_path / "r.md").unlink(missing_ok=True)
    assert (sorted(p.name for p in engines.rglob("*")), sorted(p.name for p in tiny_ckpt.rglob("*"))) == before


def test_compare_cache_graphs_and_cached_generation(cache_engines, tiny_ckpt, tmp_path, capfd):
    """Every cache graph against its oracle, and cached generation (refresh 4, factor 1) token-exact."""
    r = _compare(capfd, cache_engines, tiny_ckpt, tmp_path / "report.json", "--presets", "chartqa", "--refresh", "4",
                 "--factor", "1")
    assert r.returncode == 0, r.stdout + r.stderr
    rep = json.loads((tmp_path / "report.json").read_text())
    assert {g["graph"] for g in rep["graphs"]} == {"vision", "stage_a", "stage_b", "unpruned", "prefill", "cached",
                                                   "unpruned_prefill", "unpruned_cached"}
    assert all(g["passed"] for g in rep["graphs"])
    assert rep["agreement"] and all(a["engine_vs_reference_exact"] for a in rep["agreement"])
    assert all("factor 1.0, cache refresh 4" in a["settings"] for a in rep["agreement"])
