"""``tools/bench_gpu.py batch``: throughput of one path at several batch sizes (one engine set each), a
lone request on one directory of several sizes (``--multi``), each row against B = 1."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch

from llada_export.timing import matmul_peak

# siblings in tools/ (scripts, not a package): bench_gpu.py puts the folder on sys.path
from bench_gpu_common import PATHS, build_model, request_images
from bench_gpu_runs import export_opts, load_engines, time_requests


def run_batch(args, save) -> dict:
    """Throughput of the pruned + cache path (or ``--paths``' first) at each batch size: one engine set
    per size, ``B`` requests of distinct images per batch (row 0's image is the same at every size, so
    its answer is compared with B = 1's). The engines load lazily: the first, untimed batch compiles
    the graphs the path runs (``first_batch_s``), not the others. ``--resume`` keeps the rows of an
    earlier run's JSON (an earlier device call) and measures the missing sizes. ``--prebuilt``: the engine
    sets come from ``--export-only`` runs (``export_only``), a size without one is listed in ``not_exported``."""
    path = args.paths[0]
    pruned, cache = PATHS[path]
    setting = {"image": "x".join(map(str, args.images[0])), "prune_layer": args.layers[0], "keep": args.keeps[0],
               "refresh": args.refresh, "factor": args.factor, "preset": args.presets[0]}
    res: dict = {"part": "batch", "backend": args.backend, "compiled": args.compile, "path": path, "rows": [],
                 "setting": setting, "prebuilt": args.prebuilt}
    if args.resume:
        old = json.loads(Path(args.resume).read_text())
        if (old["path"], old["setting"], old["compiled"]) != (path, setting, args.compile):
            raise SystemExit(f"--resume {args.resume}: measured another path or setting")
        res["rows"] = [r for r in old["rows"] if r["batch_size"] in args.batch_sizes]
        res["earlier"] = {"env": old["env"], "batch_sizes": [r["batch_size"] for r in res["rows"]]}
    res["matmul_peak_tflops"] = matmul_peak() / 1e12
    model, cfg, tok = build_model(args.preset, args.seed)
    weights = dict(model.state_dict())
    for b in args.batch_sizes:
        if any(r["batch_size"] == b for r in res["rows"]):
            continue
        out = engines_dir(args, path, b)
        if args.prebuilt:  # engines of a --export-only run (another process): not exported here
            if not (out / EXPORTED).is_file():
                print(f"batch size {b}: no engines at {out} (its --export-only run did not finish): not measured",
                      flush=True)
                res.setdefault("not_exported", []).append(b)
                save(res)
                continue
            export_s = json.loads((out / EXPORTED).read_text())["export_s"]
        else:
            export_s = export_size(args, model, tok, cfg, pruned, cache, b)
        t0 = time.perf_counter()
        pipe = load_engines(args, out, weights, warmup=False)
        load_s = time.perf_counter() - t0
        row = time_requests(pipe, request_images(*args.images[0], b), args, args.presets[0], pruned, cache)
        row.update(export_s=export_s, load_s=load_s, latency_s=row["seconds"], export_notes=export_notes(out))
        res["rows"].append(row)
        res["rows"].sort(key=lambda r: r["batch_size"])
        print(json.dumps({k: v for k, v in row.items() if k != "ids"}), flush=True)
        save(res)
        del pipe
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    base = next((r for r in res["rows"] if r["batch_size"] == 1), None)
    if args.multi:
        res["multi"] = time_multi(args, model, tok, cfg, weights, pruned, cache, base)
        save(res)
    return derive_batch(res)


EXPORTED = "bench_export.json"  # written into an engine set when its export finished: {"export_s": ...}


def engines_dir(args, path: str, b: int) -> Path:
    return Path(args.workdir) / f"engines_{path.replace('+', '_')}_b{b}"


def export_size(args, model, tok, cfg, pruned: bool, cache: bool, b: int) -> float:
    """Export the engine set of batch size ``b`` (precompiled kernels, no compile cache); its seconds, also
    written into the set (``EXPORTED``) for a ``--prebuilt`` run."""
    from llada_export.exporter.build import export_engines

    out = engines_dir(args, args.paths[0], b)
    (out / EXPORTED).unlink(missing_ok=True)  # ours, not the export's: --overwrite refuses files it did not write
    t0 = time.perf_counter()
    export_engines(export_opts(args, out, pruned, cache, batch_size=b, compile_cache=False), loaded=(model, tok, cfg))
    export_s = time.perf_counter() - t0
    (out / EXPORTED).write_text(json.dumps({"export_s": export_s, "host": platform.node()}) + "\n")
    return export_s


def export_only(args) -> int:
    """``--export-only``: the engine sets of ``--batch-sizes`` for ``--paths``' first path, nothing timed; a set
    already exported (``EXPORTED`` present) is kept. Several such processes, each with its own sizes, export
    side by side (the compiler works on the CPU); one ``--prebuilt`` run then times them one after another."""
    pruned, cache = PATHS[args.paths[0]]
    model, cfg, tok = build_model(args.preset, args.seed)
    for b in args.batch_sizes:
        if (engines_dir(args, args.paths[0], b) / EXPORTED).is_file():
            print(f"batch size {b}: already exported", flush=True)
            continue
        export_s = export_size(args, model, tok, cfg, pruned, cache, b)
        print(json.dumps({"path": args.paths[0], "batch_size": b, "export_s": export_s}), flush=True)
    return 0


def export_notes(out: Path) -> list[str]:
    """The export's notes that say something went otherwise than asked (a graph not precompiled, and why):
    the engines stay on the device machine, so the report keeps them."""
    notes = json.loads((out / "manifest.json").read_text()).get("notes", [])
    return [n for n in notes if "not " in n]


def derive_batch(res: dict) -> dict:
    """Each row's tokens/s against B = 1's and whether its row 0 answered as B = 1 did (from the measured
    rows; also for a JSON that a device call's limit cut before the run's end)."""
    base = next((r for r in res["rows"] if r["batch_size"] == 1), None)
    for row in res["rows"]:
        row["speedup_vs_b1"] = row["tokens_per_s"] / base["tokens_per_s"] if base else None
        row["row0_same_as_b1"] = row["ids"][0] == base["ids"][0] if base else None
    return res


def time_multi(args, model, tok, cfg, weights, pruned: bool, cache: bool, base: dict | None) -> dict:
    """A lone request on one directory of the ``--multi`` sizes (it runs the smallest size's graphs there)."""
    from dataclasses import replace

    from llada_export.exporter.build import export_engines

    out = Path(args.workdir) / "engines_multi"
    opts = export_opts(args, out, pruned, cache, batch_size=max(args.multi), compile_cache=False)
    export_engines(replace(opts, batch_sizes=tuple(args.multi)), loaded=(model, tok, cfg))
    pipe = load_engines(args, out, weights, warmup=False)
    row = time_requests(pipe, request_images(*args.images[0], 1), args, args.presets[0], pruned, cache)
    row.update(batch_sizes=pipe.batch_sizes, engine_batch_size=row["timings"]["engine_batch_size"],
               vs_b1_engines=row["seconds"] / base["seconds"] if base else None,
               same_answer_as_b1=row["ids"][0] == base["ids"][0] if base else None)
    print("multi", json.dumps({k: v for k, v in row.items() if k != "ids"}), flush=True)
    del pipe
    return row
