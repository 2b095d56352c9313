"""The committed benchmark and sweep reports re-render byte-identical from their JSON (the code that
renders them is the code that is committed)."""

from __future__ import annotations

import filecmp
import re
import shutil
import runpy
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"

CASES = [  # (tool, its JSON, the report it renders, the command line that re-renders it into OUT)
    ("bench_gpu.py", "bench_gpu_grid.json", "bench_gpu_grid.md", ["grid", "--replot", "--out", "{out}"]),
    ("bench_gpu.py", "bench_gpu_engines_384x384.json", "bench_gpu_engines_384x384.md",
     ["engines", "--replot", "--out", "{out}"]),
    ("bench_gpu.py", "bench_gpu_engines_cache.json", "bench_gpu_engines_cache.md",
     ["engines", "--replot", "--out", "{out}"]),
    ("bench_gpu.py", "bench_gpu_engines_cache_run1.json", "bench_gpu_engines_cache_run1.md",
     ["engines", "--replot", "--out", "{out}"]),
    ("prune_sweep.py", "prune_sweep.json", "prune_sweep.md", ["--replot", "--out", "{out}/prune_sweep"]),
    ("attention_analysis.py", "attention_analysis.json", "attention_analysis.md",
     ["--replot", "--out", "{out}/attention_analysis", "--sweep", str(BENCH / "prune_sweep.json")]),
    ("cache_sweep.py", "cache_sweep.json", "cache_sweep.md", ["--replot", "--out", "{out}/cache_sweep"]),
    ("load_test.py", "load_test.json", "load_test.md", ["--engines", "-", "--replot", "--out", "{out}/load_test"]),
    ("load_test.py", "load_test_before_fix.json", "load_test_before_fix.md",
     ["--engines", "-", "--replot", "--out", "{out}/load_test_before_fix"]),
    ("load_test.py", "load_test_gpu.json", "load_test_gpu.md",
     ["--engines", "-", "--replot", "--out", "{out}/load_test_gpu"]),
    ("load_test.py", "load_test_stream.json", "load_test_stream.md",
     ["--engines", "-", "--replot", "--out", "{out}/load_test_stream"]),
    # llada-serve --max-queued 8 / 64 (the default) / 1000 under the same flood (CPU, 2026-12-07), and 1000 with the
    # admission gate before its waiters had futures of their own (two runs)
    *[("load_test.py", f"load_test_overload_{q}.json", f"load_test_overload_{q}.md",
       ["--engines", "-", "--replot", "--out", f"{{out}}/load_test_overload_{q}"])
      for q in ("q8", "q64", "q1000", "q1000_oldgate1", "q1000_oldgate2")],
    ("bench_gpu.py", "bench_gpu_batch.json", "bench_gpu_batch.md", ["batch", "--replot", "--out", "{out}"]),
    ("bench_cpu.py", "cpu_ort.json", "cpu_ort.md", ["--replot", "--out", "{out}"]),
    ("gpu_probe.py", "gpu_probe.json", "gpu_probe.md", ["--replot", "--out", "{out}"]),
    ("fp8_eval.py", "fp8_vqa.json", "fp8_vqa.md", ["render", "--replot", "--out", "{out}/fp8_vqa"]),
    ("kv_capacity.py", "kv_capacity.json", "kv_capacity.md", ["--replot", "--out", "{out}/kv_capacity"]),
    # issue 22's H100 run of 2026-12-06: fused projections + in-place cache write, the step's pieces, FP8 logits
    ("bench_gpu.py", "bench_gpu_engines_fused.json", "bench_gpu_engines_fused.md",
     ["engines", "--replot", "--out", "{out}"]),
    ("bench_gpu.py", "bench_gpu_step.json", "bench_gpu_step.md", ["step", "--replot", "--out", "{out}"]),
    ("bench_gpu.py", "bench_gpu_step_b8.json", "bench_gpu_step_b8.md", ["step", "--replot", "--out", "{out}"]),
    ("fp8_eval.py", "fp8_logits.json", "fp8_logits.md", ["render", "--replot", "--out", "{out}/fp8_logits"]),
    # issues 22 / 23, H100 lease of 2026-12-06 evening: FP8 engines next to the official code, batch 1 vs 8
    ("bench_gpu.py", "bench_gpu_engines_fp8.json", "bench_gpu_engines_fp8.md", ["engines", "--replot", "--out", "{out}"]),
    ("bench_gpu.py", "bench_gpu_batch_fused.json", "bench_gpu_batch_fused.md", ["batch", "--replot", "--out", "{out}"]),
    # issue 23, H100 lease of 2026-12-06 night: a lone request on a 1,2,4,8 directory, KV bytes measured, the load test
    ("bench_gpu.py", "bench_gpu_batch_multi.json", "bench_gpu_batch_multi.md", ["batch", "--replot", "--out", "{out}"]),
    ("kv_capacity.py", "kv_capacity_h100.json", "kv_capacity_h100.md", ["--replot", "--out", "{out}/kv_capacity_h100"]),
    ("load_test.py", "load_test_gpu_stream.json", "load_test_gpu_stream.md",
     ["--engines", "-", "--replot", "--out", "{out}/load_test_gpu_stream"]),
    # issue 23, H100 lease of 2026-12-06 23:18: pruned + cache at B = 1, 8, 16, unpruned + cache at B = 1
    ("bench_gpu.py", "bench_gpu_batch_scale.json", "bench_gpu_batch_scale.md", ["batch", "--replot", "--out", "{out}"]),
    ("bench_gpu.py", "bench_gpu_batch_scale_unpruned.json", "bench_gpu_batch_scale_unpruned.md",
     ["batch", "--replot", "--out", "{out}"]),
    # the same two runs side by side, with the largest batch from the compiled engines' peaks (bench_gpu_scale.py)
    ("bench_gpu_scale.py", "bench_gpu_batch_scale_paths.json", "bench_gpu_batch_scale_paths.md",
     ["--replot", "--out", "{out}/bench_gpu_batch_scale_paths"]),
    # H100 lease of 2026-12-07 07:05: the load that reads the weights from disk; both paths at B = 1 and 8
    ("bench_load.py", "bench_load.json", "bench_load.md", ["render", "--out", "{out}"]),
    ("bench_gpu.py", "bench_gpu_batch_scale8_pruned.json", "bench_gpu_batch_scale8_pruned.md",
     ["batch", "--replot", "--out", "{out}"]),
    ("bench_gpu.py", "bench_gpu_batch_scale8_unpruned.json", "bench_gpu_batch_scale8_unpruned.md",
     ["batch", "--replot", "--out", "{out}"]),
    ("bench_gpu_scale.py", "bench_gpu_batch_scale8_paths.json", "bench_gpu_batch_scale8_paths.md",
     ["--replot", "--out", "{out}/bench_gpu_batch_scale8_paths"]),
    # the same day, 08:51: the weights file's read and hash rates on the H100 host (tools/weight_read_probe.py)
    ("weight_read_probe.py", "weight_read_probe.json", "weight_read_probe.md",
     ["--replot", "--out", "{out}/weight_read_probe"]),
    # H100 lease of 2026-12-07 09:38: the weights file's readers, the official code beside our bf16 engines, B = 1
    ("bench_load.py", "bench_load_readers.json", "bench_load_readers.md",
     ["render", "--out", "{out}", "--name", "bench_load_readers"]),
    # the same day, 10:15 (the lease's last minutes): one warm load per reader with the load's stages
    ("bench_load.py", "bench_load_quick.json", "bench_load_quick.md",
     ["render", "--out", "{out}", "--name", "bench_load_quick"]),
    ("bench_gpu.py", "bench_gpu_engines_1207.json", "bench_gpu_engines_1207.md", ["engines", "--replot", "--out", "{out}"]),
    ("bench_gpu.py", "bench_gpu_batch_1207_pruned.json", "bench_gpu_batch_1207_pruned.md",
     ["batch", "--replot", "--out", "{out}"]),
    ("bench_gpu.py", "bench_gpu_batch_1207_unpruned.json", "bench_gpu_batch_1207_unpruned.md",
     ["batch", "--replot", "--out", "{out}"]),
    # H100 lease of 2026-12-07 12:30: the cold and warm loads with the light tokenizer; unpruned + cache at B = 16
    ("bench_load.py", "bench_load_light.json", "bench_load_light.md", ["render", "--out", "{out}", "--name", "bench_load_light"]),
    ("bench_gpu.py", "bench_gpu_batch_1207_unpruned16.json", "bench_gpu_batch_1207_unpruned16.md",
     ["batch", "--replot", "--out", "{out}"]),
    # H100 leases of 2026-12-07 15:18 and 15:53: the cached step attending without the mask
    ("bench_gpu.py", "bench_gpu_step_1207.json", "bench_gpu_step_1207.md", ["step", "--replot", "--out", "{out}"]),
    ("bench_gpu.py", "bench_gpu_engines_1207_flash.json", "bench_gpu_engines_1207_flash.md",
     ["engines", "--replot", "--out", "{out}"]),
    # this project's CPU machine: an image's preprocessing before and since the normalisation moved to the device
    ("preprocess_probe.py", "preprocess_probe_cpu.json", "preprocess_probe_cpu.md",
     ["--replot", "--out", "{out}/preprocess_probe_cpu"]),
    # H100 lease of 2026-12-07 17:33 (another host): bf16 pruned / unpruned + cache and FP8 per-tensor in one report,
    # pruned + cache at B = 8, the cached step's pieces at B = 8, the preprocessing on the GPU
    ("bench_gpu.py", "bench_gpu_engines_1207_all.json", "bench_gpu_engines_1207_all.md",
     ["engines", "--replot", "--out", "{out}"]),
    ("bench_gpu.py", "bench_gpu_batch_1207_b8.json", "bench_gpu_batch_1207_b8.md", ["batch", "--replot", "--out", "{out}"]),
    ("bench_gpu.py", "bench_gpu_step_b8_1207.json", "bench_gpu_step_b8_1207.md", ["step", "--replot", "--out", "{out}"]),
    ("preprocess_probe.py", "preprocess_probe_gpu.json", "preprocess_probe_gpu.md",
     ["--replot", "--out", "{out}/preprocess_probe_gpu"]),
    # a fresh H100 at 18:02: a layer's FP8 GEMMs every way at 128, 1024 and 1461 rows
    ("fp8_gemm_probe.py", "fp8_gemm_probe.json", "fp8_gemm_probe.md", ["--replot", "--out", "{out}/fp8_gemm_probe"]),
    # H100 lease of 2026-12-07 23:21: the official code timed three times beside bf16 and FP8 per-row pruned + cache,
    # the cached step's pieces at B = 8 with cuDNN over the zeroed padding, loads of engines exported with Inductor's
    # reduction configurations filtered to one
    ("bench_gpu.py", "bench_gpu_engines_1207_late.json", "bench_gpu_engines_1207_late.md",
     ["engines", "--replot", "--out", "{out}"]),
    ("bench_gpu.py", "bench_gpu_step_b8_1207_late.json", "bench_gpu_step_b8_1207_late.md",
     ["step", "--replot", "--out", "{out}"]),
    ("bench_load.py", "bench_load_det.json", "bench_load_det.md", ["render", "--out", "{out}", "--name", "bench_load_det"]),
]
# issue 21's reports (tools/long_sweeps.py render), once a GPU run's summaries are committed
CASES += [("long_sweeps.py", f"vqa2_{part}.json", f"vqa2_{part}.md", ["render", "--replot", "--out", "{out}"])
          for part in ("main", "prune_sweep", "attention", "cache_sweep", "composed", "batch_invariance")
          if (BENCH / f"vqa2_{part}.json").exists()]


@pytest.mark.parametrize("tool, js, md, argv", CASES, ids=[c[2] for c in CASES])
def test_committed_report_rerenders_identically(tmp_path, monkeypatch, capsys, tool, js, md, argv):
    """The tool run as a script (``python tools/TOOL ARGV`` from the repository root: its top level and its
    ``__main__`` block) in this process, without a fresh interpreter's seconds of imports for each report;
    what the script changes of the process (argv, sys.path, the environment) is put back after it."""
    part = argv[0] if tool == "bench_gpu.py" else None
    name = f"bench_gpu_{part}" if part else Path(js).stem  # the file name the tool reads back
    shutil.copy(BENCH / js, tmp_path / f"{name}.json")
    script = str(ROOT / "tools" / tool)
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", [script, *[a.format(out=tmp_path) for a in argv]])
    monkeypatch.setattr(sys, "path", [str(ROOT / "tools"), *sys.path])  # as python puts the script's folder first
    monkeypatch.delenv("PYTHONUNBUFFERED", raising=False)  # long_sweeps sets it
    with pytest.raises(SystemExit) as done:
        runpy.run_path(script, run_name="__main__")
    assert done.value.code in (0, None), capsys.readouterr().err  # SystemExit(None) exits 0
    assert filecmp.cmp(tmp_path / f"{name}.md", BENCH / md, shallow=False)


def test_docs_refer_only_to_what_the_repository_holds():
    """The README, the committed reports and the tools name no path outside the repository (a user has no
    ../shared), and every repository path the README names in backticks exists (globs: some file)."""
    docs = [ROOT / "README.md", *sorted(BENCH.glob("*.md")), *sorted((ROOT / "tools").glob("*.py"))]
    outside = [f"{d.relative_to(ROOT)}:{i}" for d in docs for i, line in enumerate(d.read_text().splitlines(), 1)
               if re.search(r"\.\./\w", line)]
    assert not outside, outside
    named = re.findall(r"`((?:tools|benchmarks|llada_export|tests)/[^`\s]*)`", (ROOT / "README.md").read_text())
    assert "tools/official_gpu.py" in named
    missing = [p for p in named if not list(ROOT.glob(p))]
    assert not missing, missing
