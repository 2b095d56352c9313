"""Load time of full-size Inductor engines (issue 22 item 3: a warm ``Pipeline.load`` in at most 20 s).

Parts (each fits one device call; the machine must stay warm between them, the engines live in --engines):

``export``   random full-size weights made on the GPU (``tools/bench_gpu.py``'s ``build_model``, same seed),
             exported in-process for the Inductor backend with the pruned + prefix-cache graphs, the weights
             in the directory (``weights.safetensors``: a fresh process reads them as a serving host would),
             Inductor's kernels saved per graph (``--precompile``) and, unless ``--no-compile-cache``, the
             compile cache of today's ``torch.compile`` path beside them.
``measure``  ``Pipeline.load`` (with its warm-up: every graph run once, CUDA graphs captured) in fresh
             processes, per mode: ``precompiled`` (the saved kernels, no Dynamo) and ``compile``
             (``torch.compile`` from the saved compile cache, today's path); each ``cold`` (empty Inductor
             and Triton caches, the page cache dropped where the machine lets us) then ``warm`` (a second
             fresh process on the caches the cold one filled). Each load then answers one request, whose
             token ids are compared between the modes. Writes ``<out>/bench_load.json`` and ``.md``.
``--readers`` measures each way of reading the weights file (``LLADA_WEIGHTS_READER``: fastsafetensors, with
             O_DIRECT or buffered reads, or safetensors' ``load_file``); ``--profile`` adds one load under cProfile.
``load``     (used by ``measure``) one load in this process, its numbers as one JSON line (with the seconds
             per stage of the load, ``Pipeline.load_times``).
``collect``  a report from ``load`` parts' JSON lines (``--loads NAME=FILE ...``): warm loads only.
``render``   re-renders ``<out>/bench_load.md`` from ``<out>/bench_load.json``.

    python tools/bench_load.py export --engines /tmp/load_engines
    python tools/bench_load.py measure --engines /tmp/load_engines --out benchmarks/
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gpu import DEVICE, build_model, request_images  # noqa: E402  the same weights and images
from llada_export.report import write_report  # noqa: E402

EXPORTED = "bench_load_export.json"  # written into the engines by ``export``: the image size and its figures
DEFAULT_IMAGE = (1024, 768)
TARGET_S = 20.0  # issue 22: a warm load of the full-size engines
MODES = {"precompiled": None, "compile": {"precompiled": None}}  # mode -> Pipeline.load's runner_options
STAGES = ("verify", "weights_read", "weights", "graphs", "warmup", "verify_wait")  # Pipeline.load_times
# --readers: how the weights file is read (runtime/weights.read_weights), by the environment of the load process
READERS = {"auto": {}, "safetensors": {"LLADA_WEIGHTS_READER": "safetensors"},
           "fastsafetensors": {"LLADA_WEIGHTS_READER": "fastsafetensors"},  # O_DIRECT reads (its default)
           "fastsafetensors-buffered": {"LLADA_WEIGHTS_READER": "fastsafetensors", "FASTSAFETENSORS_ODIRECT": "0"}}
PROFILE_LINES = 40  # --profile: the load's functions with the most cumulative time


def run_export(args) -> dict:
    from llada_export.contract.manifest import Manifest
    from llada_export.contract.pruning import PruneSettings
    from llada_export.exporter.build import ExportOptions, export_engines

    t0 = time.perf_counter()
    model, cfg, tok = build_model(args.preset, args.seed)
    built = time.perf_counter() - t0
    w, h = args.image or DEFAULT_IMAGE
    opts = ExportOptions(model=f"random {args.preset} (bench_load, seed {args.seed})", output=str(args.engines),
                         prune=PruneSettings(args.prune_layer, args.keep), cache=True, fuse_sampler=True,
                         backends=("inductor",), compiled_weights="shared",
                         dtype="bfloat16" if DEVICE == "cuda" else "float32", device=DEVICE,
                         gen_length=args.gen_length, max_prompt_tokens=args.max_prompt_tokens, image_size=(w, h),
                         compile_cache=args.compile_cache, precompile=True, overwrite=True, progress=False)
    (Path(args.engines) / EXPORTED).unlink(missing_ok=True)  # ours: --overwrite refuses files it did not write
    t0 = time.perf_counter()
    export_engines(opts, loaded=(model, tok, cfg))
    m = Manifest.read(args.engines, verify=False)
    out = {"model_build_s": built, "export_s": time.perf_counter() - t0, "precompiled": m.precompiled,
           "compile_cache": m.compile_cache, "notes": m.notes,
           "bytes": {k: f.bytes for k, f in m.files.items() if k.startswith("programs/") or k.endswith(".safetensors")}}
    (Path(args.engines) / EXPORTED).write_text(json.dumps({"image": [w, h], **out}) + "\n")  # measure reads its image
    print(json.dumps(out), flush=True)
    return out


def request_size(args) -> tuple[int, int]:
    """The request image of a load: ``--image``, else the size the engines were exported for (``EXPORTED``)."""
    if args.image is not None:
        return args.image
    info = Path(args.engines) / EXPORTED
    if not info.is_file():
        raise SystemExit(f"{args.engines}: no {EXPORTED} (not exported by this tool): give --image WxH")
    return tuple(json.loads(info.read_text())["image"])


def run_load(args) -> None:
    from torch._dynamo.utils import counters

    from llada_export.runtime.pipeline import Pipeline

    if DEVICE == "cuda":
        torch.cuda.synchronize()
    tunings = count_autotuning()
    prof = None
    if args.profile:
        import cProfile

        prof = cProfile.Profile()
        prof.enable()
    t0 = time.perf_counter()
    pipe = Pipeline.load(args.engines, backend="inductor", device=DEVICE, runner_options=MODES[args.mode])
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    profile = None
    if prof is not None:
        import io
        import pstats

        prof.disable()
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(PROFILE_LINES)
        profile = text.getvalue().strip().split("\n")
    res = pipe.generate(request_images(*request_size(args), 1)[0], "Describe the image.", preset="chartqa", cache=True,
                        factor=1.0)
    print(json.dumps({"seconds": seconds, "precompiled": pipe.precompiled, "compile_cache": pipe.compile_cache,
                      "dynamo_graphs": counters["stats"]["unique_graphs"],
                      "aot_autograd_runs": counters["aot_autograd"]["total"],
                      "fxgraph_cache_hit": counters["inductor"]["fxgraph_cache_hit"],
                      "fxgraph_cache_miss": counters["inductor"]["fxgraph_cache_miss"],
                      "graphs": len(pipe.sized_runners_all()), "ids": res.ids, "stages": pipe.load_times,
                      "weights_reader": pipe.weights_reader, "tokenizer": pipe.tokenizer_kind, "profile": profile,
                      "autotune_benchmarks": tunings[0], "best_config_files": best_configs(),
                      "gpu_peak_gib": torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else None}),
          flush=True)


def count_autotuning() -> list[int]:
    """A counter of the Triton kernels Inductor benchmarks in this process (``CachingAutotuner.benchmark_all_configs``:
    a kernel of several configurations whose best one was not found in the autotune cache): a warm load that
    benchmarks again may pick another configuration (another reduction order) than the load before it."""
    from torch._inductor.runtime import triton_heuristics as th

    count = [0]
    original = th.CachingAutotuner.benchmark_all_configs

    def counted(self, *a, **kw):
        count[0] += 1
        return original(self, *a, **kw)

    th.CachingAutotuner.benchmark_all_configs = counted
    return count


def best_configs() -> int | None:
    """The autotune results saved in Inductor's cache directory (``*.best_config``)."""
    root = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    return sum(1 for _ in Path(root).rglob("*.best_config")) if root and Path(root).is_dir() else None


def drop_page_cache() -> bool:
    """Drop the OS page cache (the weights file then comes from disk); False where not allowed."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def one_load(args, mode: str, caches: Path, reader: str = "auto", profile: bool = False,
             threads: str = "default") -> dict:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(caches / "inductor"),
           "TRITON_CACHE_DIR": str(caches / "triton"), **READERS[reader],
           **({} if threads == "default" else {"TORCHINDUCTOR_COMPILE_THREADS": threads})}
    cmd = [sys.executable, __file__, "load", "--engines", str(args.engines), "--mode", mode,
           "--image", "x".join(map(str, request_size(args)))] + (["--profile"] if profile else [])
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    wall = time.perf_counter() - t0
    if r.returncode:
        return {"error": r.stderr[-2000:], "process_s": wall}
    return json.loads(r.stdout.strip().splitlines()[-1]) | {"process_s": wall}


def run_measure(args) -> dict:
    device = torch.cuda.get_device_name() if DEVICE == "cuda" else platform.processor() or "cpu"
    res = {"part": "load", "engines": str(args.engines), "preset": args.preset, "device": device,
           "torch": torch.__version__, "target_s": TARGET_S, "modes": {}, "note": args.note}
    shown = lambda r: json.dumps({k: v for k, v in r.items() if k not in ("ids", "profile")})  # noqa: E731
    for mode in args.modes:
        for reader, threads in [(r, t) for r in args.readers for t in args.compile_threads]:
            name = mode + ("" if args.readers == ["auto"] else f", reader {reader}") + \
                ("" if args.compile_threads == ["default"] else f", compile threads {threads}")
            with tempfile.TemporaryDirectory(prefix=f"bench_load_{mode}_") as tmp:
                row = {"cold_page_cache_dropped": drop_page_cache(), "reader": reader, "compile_threads": threads}
                row["cold"] = one_load(args, mode, Path(tmp), reader, threads=threads)
                print(name, "cold", shown(row["cold"]), flush=True)
                row["warm"] = one_load(args, mode, Path(tmp), reader, threads=threads)
                print(name, "warm", shown(row["warm"]), flush=True)
                if args.profile and not res.get("profile"):  # a third load, under cProfile (slower: not timed)
                    prof = one_load(args, mode, Path(tmp), reader, profile=True, threads=threads)
                    res["profile"] = {"load": name, "seconds": prof.get("seconds"),
                                      "lines": prof.get("profile") or [prof.get("error", "")]}
            res["modes"][name] = row
    return write_report(Path(args.out) / args.name, same_answers(res), markdown, None)


def run_collect(args) -> dict:
    """A report from ``load`` parts run one after the other in fresh processes on caches already filled (by the
    export): each a warm load, in the order given (the first process on a machine also warms the OS's caches
    of the Python and kernel files)."""
    res = {"part": "load", "engines": str(args.engines), "preset": args.preset, "torch": args.torch or torch.__version__,
           "device": args.device_name or (torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"),
           "target_s": TARGET_S, "modes": {}, "note": args.note}
    for item in args.loads:
        name, _, path = item.partition("=")
        res["modes"][name] = {"warm": json.loads(Path(path).read_text().strip().splitlines()[-1])}
    return write_report(Path(args.out) / args.name, same_answers(res), markdown, None)


def same_answers(res: dict) -> dict:
    """``res`` with ``same_ids``: whether every row's warm load answered the same token ids (None: fewer than two
    answered; a load that failed has none)."""
    ids = {m: r["warm"]["ids"] for m, r in res["modes"].items() if "ids" in r["warm"]}
    return res | {"same_ids": len({json.dumps(v) for v in ids.values()}) == 1 if len(ids) > 1 else None}


def markdown(res: dict) -> str:
    lines = [f"# Load of {res['preset']}-size Inductor engines ({res['device']}, torch {res['torch']})", "",
             "`Pipeline.load` with its warm-up (every graph once, CUDA graphs captured), each in a fresh process; "
             "cold: empty Inductor / Triton caches; warm: a second process on the caches the cold one filled. "
             f"Target: warm <= {res['target_s']:.0f} s.", "",
             "| mode | cold s | warm s | warm target | kernels | Dynamo graphs / AOTAutograd runs (warm) | "
             "FX cache hit / miss (warm) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for mode, r in res["modes"].items():
        c, w = r.get("cold") or {}, r["warm"]  # collect: no cold load
        if "error" in c or "error" in w:
            lines.append(f"| {mode} | {c.get('seconds', 'error')} | {w.get('seconds', 'error')} | - | - | - | - |")
            continue
        ok = "met" if w["seconds"] <= res["target_s"] else "missed"
        cold = f"{c['seconds']:.1f}" if "seconds" in c else "-"
        lines.append(f"| {mode} | {cold} | {w['seconds']:.1f} | {ok} | {w['precompiled']} | "
                     f"{w['dynamo_graphs']} / {w['aot_autograd_runs']} | "
                     f"{w['fxgraph_cache_hit']} / {w['fxgraph_cache_miss']} |")
    same = {True: "yes", False: "NO", None: "- (fewer than two modes answered)"}[res.get("same_ids")]
    lines += ["", f"Same answer (token ids) in every mode: {same}.", ""]
    dropped = {m: r.get("cold_page_cache_dropped") for m, r in res["modes"].items()}
    said = {True: "yes", False: "no (not allowed here)", None: "no cold load"}
    lines += ["The OS page cache was dropped before each cold load: " +
              ", ".join(f"{m} {said[d]}" for m, d in dropped.items()) +
              ". Process s: the fresh process's wall time (imports, the load, one chartqa request).", "",
              "| mode | cold process s | warm process s | weights file read by |", "| --- | --- | --- | --- |"]
    sec = lambda d: f"{d['process_s']:.1f}" if "process_s" in (d or {}) else "-"  # noqa: E731
    lines += [f"| {m} | {sec(r.get('cold'))} | {sec(r['warm'])} | "
              f"{r['warm'].get('weights_reader') or '-'} |" for m, r in res["modes"].items()]
    staged = {(m, k): r[k]["stages"] for m, r in res["modes"].items() for k in ("cold", "warm")
              if "stages" in (r.get(k) or {})}
    if staged:  # Pipeline.load_times: where the seconds went
        lines += ["", "Seconds per stage of `Pipeline.load` (`load_times`): verify = the SHA-256 of every file but "
                  "the weights file, whose hash runs beside the rest (verify_wait = what was left of it at the "
                  "end); weights = the tokenizer, the embedding table and the weights onto the device (of which "
                  "weights_read = reading the weights file, by the reader the row names) and bound to the graphs; graphs = "
                  "opening the programs and their saved kernels; warmup = every graph once, CUDA graphs captured.",
                  "", "| mode | load | " + " | ".join(STAGES) + " |",
                  "| --- | --- | " + " | ".join("---" for _ in STAGES) + " |"]
        lines += [f"| {m} | {k} | " + " | ".join(f"{t[s]:.2f}" if s in t else "-" for s in STAGES) + " |"
                  for (m, k), t in staged.items()]
        parts = {(m, k): {s: v for s, v in t.items() if ":" in s} for (m, k), t in staged.items()}
        if any(parts.values()):  # the finer stages (weights:tokenizer, graphs:<graph>, ...)
            lines += ["", "Within the stages (seconds):", "", "| mode | load | parts |", "| --- | --- | --- |"]
            lines += [f"| {m} | {k} | " + ", ".join(f"{s} {v:.2f}" for s, v in p.items()) + " |"
                      for (m, k), p in parts.items()]
    else:
        lines += ["", "No seconds per stage (this run predates `Pipeline.load_times`)."]
    tuned = {(m, k): r[k] for m, r in res["modes"].items() for k in ("cold", "warm")
             if "autotune_benchmarks" in (r.get(k) or {})}
    if tuned:
        lines += ["", "Tokenizer (light: tokenizers + jinja2, no transformers import); Triton kernels benchmarked in "
                  "the process (load and one request: `benchmark_all_configs` calls, a kernel of several "
                  "configurations with no saved best one); `*.best_config` files in the Inductor cache afterwards:", "",
                  "| mode | load | tokenizer | kernels benchmarked | best_config files |", "| --- | --- | --- | --- | --- |"]
        lines += [f"| {m} | {k} | {d.get('tokenizer')} | {d['autotune_benchmarks']} | {d.get('best_config_files')} |"
                  for (m, k), d in tuned.items()]
    if res.get("profile"):
        pr = res["profile"]
        lines += ["", f"`Pipeline.load` of {pr['load']} (warm) under cProfile ({pr['seconds'] or 0:.1f} s with the "
                  f"profiler), the {PROFILE_LINES} functions with the most cumulative time:", "", "```",
                  *pr["lines"], "```"]
    if res.get("note"):
        lines += ["", res["note"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", choices=("export", "measure", "load", "render", "collect"))
    p.add_argument("--engines", type=Path, default=Path("/tmp/bench_load_engines"), help="the engines directory")
    p.add_argument("--out", default="benchmarks",
                   help="measure: where NAME.json / .md go (default: benchmarks); render: re-renders "
                        "OUT/NAME.md from OUT/NAME.json")
    p.add_argument("--preset", default="full" if DEVICE == "cuda" else "tiny",
                   help="model size (default: full on CUDA, tiny on the CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image", type=lambda s: tuple(map(int, s.split("x"))), default=None,
                   help="WxH: export: the bucket's image size (default 1024x768); measure / load: the request's "
                        "(default: the size the engines were exported for)")
    p.add_argument("--prune-layer", type=int, default=16)
    p.add_argument("--keep", type=float, default=0.35)
    p.add_argument("--gen-length", type=int, default=128)
    p.add_argument("--max-prompt-tokens", type=int, default=128)
    p.add_argument("--no-compile-cache", dest="compile_cache", action="store_false",
                   help="export: save no compile cache (the compile mode then compiles from scratch)")
    p.add_argument("--modes", nargs="+", choices=tuple(MODES), default=list(MODES))
    p.add_argument("--mode", choices=tuple(MODES), default="precompiled", help="load: which path")
    p.add_argument("--readers", nargs="+", choices=tuple(READERS), default=["auto"],
                   help="measure: how the weights file is read, each a cold and a warm load (auto: fastsafetensors "
                        "on a GPU; fastsafetensors: with O_DIRECT reads, its default; -buffered: through the page cache)")
    p.add_argument("--compile-threads", nargs="+", default=["default"],
                   help="measure: TORCHINDUCTOR_COMPILE_THREADS of the load processes, each a cold and a warm load "
                        "(default: Inductor's own; 1: the saved kernels loaded in-process, no compile workers)")
    p.add_argument("--profile", action="store_true",
                   help="measure: one more warm load of the first mode and reader under cProfile, its top functions "
                        "in the report; load: this load under cProfile")
    p.add_argument("--timeout", type=int, default=540, help="seconds per load process")
    p.add_argument("--loads", nargs="+", default=[], metavar="NAME=FILE",
                   help="collect: the JSON lines of load parts run in turn (their rows, in this order)")
    p.add_argument("--device-name", help="collect: the GPU the loads ran on (default: this machine's)")
    p.add_argument("--torch", help="collect: the torch version the loads ran with (default: this one)")
    p.add_argument("--name", default="bench_load", help="measure / render: the report's file name, without suffix")
    p.add_argument("--note", help="measure / render: a paragraph on how the run was made (kept in the JSON)")
    args = p.parse_args(argv)
    if args.part == "export":
        run_export(args)
    elif args.part == "load":
        run_load(args)
    elif args.part == "collect":
        run_collect(args)
    elif args.part == "render":
        report = Path(args.out) / args.name
        res = None  # write_report reads the JSON back, unless the note is replaced (then written again)
        if args.note is not None:
            res = json.loads(report.with_suffix(".json").read_text()) | {"note": args.note}
        write_report(report, res, markdown, None)
    else:
        run_measure(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
