"""Smoke runs of ``tools/bench_gpu.py`` on the CPU with the tiny preset (numbers meaningless; what the
GPU run computes and writes): ``step`` (the cached step's pieces) and ``engines --weights native,fp8``
(a column per weights variant, the floor per variant, engines deleted after measuring)."""

from __future__ import annotations

import filecmp
import importlib.util
import json
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "tools" / "bench_gpu.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def replots_identically(bench, out: Path, part: str) -> bool:
    shutil.copy(out / f"bench_gpu_{part}.md", out / "first.md")
    assert bench.main([part, "--replot", "--out", str(out)]) == 0
    return filecmp.cmp(out / f"bench_gpu_{part}.md", out / "first.md", shallow=False)


def test_step_profile_smoke(bench, tmp_path):
    assert bench.main(["step", "--preset", "tiny", "--prefixes", "24", "--gen-length", "16", "--out",
                       str(tmp_path)]) == 0
    res = json.loads((tmp_path / "bench_gpu_step.json").read_text())
    prof = res["step_profile"]
    (s,) = prof["shapes"]
    assert (s["prefix"], s["queries"], s["keys"], s["rows"]) == (24, 16, 40, 1)
    names = [p["piece"] for p in s["pieces"]]
    for want in ("fused q|k|v GEMM", "RoPE", "cache write", "attention", "o_proj GEMM", "fused gate|up GEMM",
                 "SiLU", "down GEMM", "lm_head", "fused sampler step"):
        assert any(want in n for n in names), want
    # the pieces read every weight the floor reads: the layers' linears (x layers) and the LM head, once
    assert sum(p["weight_gb"] for p in s["pieces"]) == pytest.approx(prof["floor"]["gb"], rel=1e-9)
    ok = [r for r in s["attention_kernels"] if "ms" in r]
    assert {"math"} <= {r["kernel"] for r in ok}  # math runs everywhere; the others where the device has them
    [cand] = [r for r in s["attention_kernels"] if r["kernel"].startswith("cudnn, zeroed pads")]
    assert cand["error"] == "cuDNN attention runs on CUDA only"  # this CPU run: the candidate says why it has no time
    assert s["best_attention"]["ms"] == min(r["ms"] for r in ok)
    assert s["step_vs_floor"] == pytest.approx(s["step_ms"] / prof["floor"]["ms"])
    md = (tmp_path / "bench_gpu_step.md").read_text()
    assert "Best attention kernel:" in md and (tmp_path / "bench_gpu_step.png").exists()
    assert replots_identically(bench, tmp_path, "step")


def test_engines_per_weights_variant_smoke(bench, tmp_path):
    work = tmp_path / "engines"
    assert bench.main(["engines", "--preset", "tiny", "--images", "64x64", "--layers", "2", "--presets", "mc",
                       "--paths", "unpruned+cache", "--weights", "native,fp8", "--no-compile", "--no-compile-cache",
                       "--no-warm-load", "--no-step-profile", "--repeat", "1", "--graph-repeat", "2",
                       "--gen-length", "32", "--out", str(tmp_path), "--workdir", str(work)]) == 0
    res = json.loads((tmp_path / "bench_gpu_engines.json").read_text())
    assert res["weights"] == ["native", "fp8"]
    assert [(r["path"], r["weights"]) for r in res["rows"]] == [("unpruned+cache", "native"), ("unpruned+cache", "fp8")]
    assert list(res["groups"]) == ["unpruned/native", "unpruned/fp8"]
    for w in ("native", "fp8"):
        g = res["graphs"][w]["unpruned_cached"]
        assert g["vs_floor"] == pytest.approx(g["ms"] / res["weight_floor"][w]["ms"])
    # the fp8 floor reads the layers' linears at 1 byte an element (4 here: fp32 on the CPU), the head unchanged
    assert res["weight_floor"]["fp8"]["gb"] < res["weight_floor"]["native"]["gb"]
    assert res["weight_floor"]["fp8"]["tensors"] == res["weight_floor"]["native"]["tensors"]
    assert not any(work.iterdir()) if work.exists() else True  # each variant's engines deleted after measuring
    md = (tmp_path / "bench_gpu_engines.md").read_text()
    assert "| graph | sequence | native | fp8 |" in md and "unpruned+cache native | unpruned+cache fp8" in md
    assert replots_identically(bench, tmp_path, "engines")

    # --resume (a second device call): complete groups are kept, a group cut short is measured again
    del res["groups"]["unpruned/fp8"]["complete"]
    (tmp_path / "earlier.json").write_text(json.dumps(res))
    assert bench.main(["engines", "--preset", "tiny", "--images", "64x64", "--layers", "2", "--presets", "mc",
                       "--paths", "unpruned+cache", "--weights", "native", "--no-compile", "--no-compile-cache",
                       "--no-warm-load", "--no-step-profile", "--repeat", "1", "--graph-repeat", "2",
                       "--gen-length", "32", "--out", str(tmp_path), "--workdir", str(work),
                       "--resume", str(tmp_path / "earlier.json")]) == 0
    again = json.loads((tmp_path / "bench_gpu_engines.json").read_text())
    assert again["groups"]["unpruned/native"] == res["groups"]["unpruned/native"]
    assert again["groups"]["unpruned/fp8"]["export_s"] != res["groups"]["unpruned/fp8"]["export_s"]
    assert again["groups"]["unpruned/fp8"]["complete"]
    assert [(r["path"], r["weights"]) for r in again["rows"]] == [("unpruned+cache", "native"), ("unpruned+cache", "fp8")]
    assert again["earlier"]["groups"] == ["unpruned/native"]

    # --groups: only the groups asked for are measured (here none: native is kept, fp8 not asked for), and
    # the report names the weights variant it lacks
    del again["groups"]["unpruned/fp8"]["complete"]
    (tmp_path / "earlier.json").write_text(json.dumps(again))
    assert bench.main(["engines", "--preset", "tiny", "--images", "64x64", "--layers", "2", "--presets", "mc",
                       "--paths", "unpruned+cache", "--weights", "native", "--groups", "unpruned/native",
                       "--no-compile", "--no-warm-load", "--no-step-profile", "--gen-length", "32",
                       "--out", str(tmp_path), "--workdir", str(work), "--resume", str(tmp_path / "earlier.json")]) == 0
    third = json.loads((tmp_path / "bench_gpu_engines.json").read_text())
    assert list(third["groups"]) == ["unpruned/native"] and {r["weights"] for r in third["rows"]} == {"native"}
    assert "Not measured in this run: weights fp8" in (tmp_path / "bench_gpu_engines.md").read_text()
    with pytest.raises(SystemExit):
        bench.main(["engines", "--groups", "pruned/int4", "--out", str(tmp_path)])


def test_batch_sizes_exported_side_by_side_then_timed(bench, tmp_path):
    """``batch --export-only`` writes the engine sets and times nothing; ``--prebuilt`` times those sets without
    exporting (their files untouched) and reports a size whose set is missing instead of exporting it."""
    common = ["batch", "--preset", "tiny", "--images", "64x64", "--layers", "2", "--presets", "mc", "--gen-length",
              "32", "--no-compile", "--repeat", "1", "--workdir", str(tmp_path / "work"), "--out", str(tmp_path)]
    assert bench.main([*common, "--batch-sizes", "1,2", "--export-only"]) == 0
    sets = sorted(p.name for p in (tmp_path / "work").iterdir())
    assert sets == ["engines_pruned_cache_b1", "engines_pruned_cache_b2"]
    assert not (tmp_path / "bench_gpu_batch.json").exists()
    manifests = {s: (tmp_path / "work" / s / "manifest.json").stat().st_mtime_ns for s in sets}
    exported = {s: json.loads((tmp_path / "work" / s / "bench_export.json").read_text())["export_s"] for s in sets}
    assert bench.main([*common, "--batch-sizes", "1,2,4", "--prebuilt"]) == 0
    assert {s: (tmp_path / "work" / s / "manifest.json").stat().st_mtime_ns for s in sets} == manifests
    res = json.loads((tmp_path / "bench_gpu_batch.json").read_text())
    assert [r["batch_size"] for r in res["rows"]] == [1, 2] and res["not_exported"] == [4]
    assert [r["export_s"] for r in res["rows"]] == [exported[s] for s in sets]
    assert res["rows"][1]["row0_same_as_b1"] is not None and res["rows"][1]["timings"]["engine_batch_size"] == 2
    assert not (tmp_path / "work" / "engines_pruned_cache_b4").exists()
    assert "Not measured (no engine set: the export was cut by the deadline or failed): B = 4." in \
        (tmp_path / "bench_gpu_batch.md").read_text()


def test_scale_report_fits_the_peaks_and_pairs_the_paths(bench, tmp_path):
    """``tools/bench_gpu_scale.py``: both paths' rows side by side by batch size, and the largest batch from a
    line through the measured peaks (here on a line by construction: 26 GiB + 0.9 GiB per request; an 80 GiB
    card less 5% holds (76 - 26) / 0.9 = 55.6, so 55)."""
    spec = importlib.util.spec_from_file_location("bench_gpu_scale", ROOT / "tools" / "bench_gpu_scale.py")
    scale = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scale)
    env = {"gpu": "card", "torch": "t", "cuda": "c", "host": "h", "date": "d"}
    setting = {"preset": "demo", "image": "1024x768", "prune_layer": 16, "keep": 0.35, "refresh": 32, "factor": 1.0}

    def run(path, rows):
        return {"part": "batch", "path": path, "env": env, "setting": setting,
                "rows": [{"batch_size": b, "seconds": s, "tokens_per_s": 128 * b / s, "peak_gib": g,
                          "timings": {"cached_per_call": 0.008}} for b, s, g in rows]}

    files = {}
    for name, path, rows in (("p", "pruned+cache", [(1, 1.0, 26.9), (8, 4.0, 33.2), (16, 8.0, 40.4)]),
                             ("u", "unpruned+cache", [(1, 2.0, 28.0), (8, 10.0, 50.0)])):
        files[name] = tmp_path / f"{name}.json"
        files[name].write_text(json.dumps(run(path, rows)))
    assert scale.main(["--pruned", str(files["p"]), "--unpruned", str(files["u"]), "--card-gib", "80",
                       "--out", str(tmp_path / "scale")]) == 0
    res = json.loads((tmp_path / "scale.json").read_text())
    p, u = res["paths"]["pruned+cache"], res["paths"]["unpruned+cache"]
    assert p["gib_at_0"] == pytest.approx(26.0) and p["gib_per_request"] == pytest.approx(0.9)
    assert p["largest_batch"] == 55 and u["largest_batch"] == int((76 - (28 - 22 / 7)) // (22 / 7))  # two points: their line
    assert res["fit_ratio"] == pytest.approx(55 / u["largest_batch"])
    assert [r["x_b1"] for r in p["rows"]] == pytest.approx([1.0, 2.0, 2.0])
    md = (tmp_path / "scale.md").read_text()
    assert "| 8 | 4.000 | 256.0 | 2.00 | 33.2 | 10.000 | 102.4 | 1.60 | 50.0 | 2.50 |" in md
    assert "| 16 | 8.000 | 256.0 | 2.00 | 40.4 | - | - | - | - | - |" in md
    assert "2.2x B = 1: 2.00x (NOT met)" in md and (tmp_path / "scale.png").exists()
    with pytest.raises(SystemExit):  # the files swapped: refused by their path, nothing written over
        scale.main(["--pruned", str(files["u"]), "--unpruned", str(files["p"]), "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x.json").exists()
