"""GPU benchmark: full-size LLaDA-V (random bf16 weights) on one GPU.

Parts (each fits one device call):

``engines`` random full-size weights built on the GPU, ``export_engines`` in-process (one bucket:
           the image size, prune layer and keep given; fused sampler; the prefix-cache graphs),
           the ``Pipeline`` (``--backend``, default inductor: compiled at export and load, CUDA
           graphs) per preset and per path: pruned exact (the official schedule), pruned + cache
           and the unpruned ones (``--paths``), with the cache paths at the official demo's
           Fast-dLLM setting (refresh 32, factor 1); each LM graph alone; the warm load of the
           engines in a fresh process from the compile cache saved at export. With
           ``--official official_gpu.json`` (``tools/official_gpu.py``, run in the same
           device session) the report gives the ratios to the official code.
           ``--weights native,fp8`` (fp8 = fp8-row; fp8-tensor): each weights variant per group,
           one after another from the same random weights (``--weights fp8`` engines: e4m3
           linears, ``llada_export/quant/fp8.py``), its engines deleted after measuring; the
           weight-read floor per variant and each cached step's ratio to it; a column per variant.
           ``--resume JSON`` keeps an earlier call's (group, variant) pairs (a second device call).
           The cached step's pieces (``step``) at the end unless ``--no-step-profile``.
``step``   the cached step piece by piece (``tools/step_profile.py``): one full-size decoder layer
           at B x 128 queries over P' + 128 keys (``--prefixes``, default 1333 pruned, 3691
           unpruned), each piece in a CUDA graph timed with CUDA events, every SDPA backend with
           and without the key mask, x layers + the head + the fused sampler step, against the
           whole step and the weight-read floor. No engines (a minute).
``batch``  throughput of the pruned + cache path at several batch sizes (one engine set each),
           requests of distinct images, latency per request beside it; row 0's answer against
           B = 1's. ``--resume`` continues a run that a device call's time limit cut short.
           ``--export-only`` (several processes side by side, each some sizes) then one ``--prebuilt``
           run: the compiles overlap, the timings stay one at a time (``tools/gpu_lease.sh`` scaleall).
           ``--multi 1,2,4,8``: also one directory of those sizes (``llada-export --batch-sizes``)
           and a lone request on it, against the batch-1 row's latency (``--batch-sizes`` holds 1).
``load``   (used by ``engines``) one load of an engines directory, its seconds as JSON.
``grid``   the eager PyTorch oracles (official algorithm vs LLaDA-FastV) over keep x K x image x
           preset, no engines (the H100 run of 2026-11-25).

Writes ``<out>/bench_gpu_<part>.json`` and ``.md`` and ``.png``; ``--replot`` re-renders them.
CPU smoke runs: ``--preset tiny`` (numbers meaningless; tests/test_bench_gpu.py).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

# The parts' runs: bench_gpu_grid.py (grid), bench_gpu_runs.py (engines, step, load), bench_gpu_batch.py
# (batch); shared: bench_gpu_common.py; the reports: bench_gpu_report.py and bench_gpu_report_engines.py.
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tools/ holds scripts, not a package
from bench_gpu_batch import export_only, run_batch  # noqa: E402
from bench_gpu_common import DEVICE, PATHS, WEIGHTS, build_model, request_images  # noqa: E402, F401  (bench_load.py)
from bench_gpu_grid import run_grid  # noqa: E402
from bench_gpu_report import markdown, plot  # noqa: E402
from bench_gpu_runs import run_engines, run_load, run_step  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", choices=("grid", "engines", "batch", "load", "step"))
    p.add_argument("--out", default="benchmarks", help="output directory (default: benchmarks)")
    p.add_argument("--images", default="1024x768", help="image sizes; engines and batch use the first")
    p.add_argument("--presets", default="mc,chartqa,demo", help="sampler presets (default: mc,chartqa,demo)")
    p.add_argument("--keeps", default="0.35", help="keep ratios (grid: all; engines, batch: the first)")
    p.add_argument("--layers", default="16", help="prune layers (grid: all; engines, batch: the first)")
    p.add_argument("--paths", default=None,
                   help="engines: the paths to time; batch: the first (default: all four / pruned+cache)")
    p.add_argument("--refresh", type=int, default=32, help="cache refresh interval (default: 32, the official demo's)")
    p.add_argument("--factor", type=float, default=1.0, help="parallel decoding factor (default: 1, the official demo's)")
    p.add_argument("--batch-sizes", default="1,2,4,8", help="batch: the batch sizes (default: 1,2,4,8)")
    p.add_argument("--official", help="engines: official_gpu.py's JSON from the same device session")
    p.add_argument("--preset", default="full", choices=("full", "tiny", "demo"),
                   help="model dimensions (default: full; tiny for a CPU smoke run)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: 0)")
    p.add_argument("--gen-length", type=int, default=128, help="bucket response slots (default: 128)")
    p.add_argument("--max-prompt-tokens", type=int, default=64, help="bucket text slots (default: 64)")
    p.add_argument("--prompt", default="<image>\nWhat is shown in this image? Answer briefly.")
    p.add_argument("--system", default="You are a helpful language and vision assistant.",
                   help="system prompt; short, so the stand-in tokenizer gives about the official text length (~60)")
    p.add_argument("--backend", default="inductor", help="engines backend (default: inductor)")
    p.add_argument("--no-compile", dest="compile", action="store_false",
                   help="inductor: run the programs' eager kernels from CUDA graphs (no compile time)")
    p.add_argument("--no-compile-cache", dest="compile_cache", action="store_false", default=None,
                   help="engines: do not compile at export and save the compile cache")
    p.add_argument("--no-warm-load", dest="warm_load", action="store_false", help="engines: skip the warm-load check")
    p.add_argument("--engines", help="load: the engines directory")
    p.add_argument("--workdir", default="/tmp/llada-bench", help="where the engines are written")
    p.add_argument("--multi", default=None, metavar="N,N,...",
                   help="batch: also a lone request on one directory of these batch sizes (llada-export --batch-sizes), "
                        "against the batch-1 row's latency")
    p.add_argument("--export-only", action="store_true",
                   help="batch: only export the engine sets of --batch-sizes into --workdir (kept where done), time "
                        "nothing; several such processes may run side by side, a --prebuilt run times their sets")
    p.add_argument("--prebuilt", action="store_true",
                   help="batch: time the engine sets --export-only runs wrote into --workdir, export none (a size "
                        "without its set is reported as not exported)")
    p.add_argument("--resume", help="batch: an earlier run's bench_gpu_batch.json; its batch sizes are kept, not rerun; "
                                    "engines: an earlier --weights run's JSON; its (group, weights) pairs are kept")
    p.add_argument("--weights", default="native",
                   help=f"engines: weights variants measured one after another ({', '.join(WEIGHTS)}; fp8 = fp8-row; "
                        "default: native)")
    p.add_argument("--cached-attention", choices=("flash", "masked"), default="flash",
                   help="the engines' cached step: flash attention over the zeroed padding (default) or the masked "
                        "kernel (llada-export --cached-attention), for a before/after on one machine")
    p.add_argument("--groups", default=None, metavar="GROUP,...",
                   help="engines: measure only these groups (pruned/native, pruned/fp8, unpruned/native, ...), "
                        "e.g. the ones a --resume'd report lacks (default: every path group x --weights)")
    p.add_argument("--step-profile", action=argparse.BooleanOptionalAction, default=True,
                   help="engines: also profile the cached step's pieces at --prefixes (default: on)")
    p.add_argument("--prefixes", default="1333,3691",
                   help="step, engines: cached prefix lengths P' profiled (default: 1333 pruned, 3691 unpruned)")
    p.add_argument("--graph-repeat", type=int, default=20, help="engines: timed calls of each graph alone (default: 20)")
    p.add_argument("--step-rows", type=int, default=1, help="step: batch rows B of the profiled step (default: 1)")
    p.add_argument("--repeat", type=int, default=2, help="timed requests per preset and path (after one untimed)")
    p.add_argument("--no-eager", action="store_true", help="(unused; kept for old command lines)")
    p.add_argument("--replot", action="store_true",
                   help="only rewrite bench_gpu_<part>.md and .png from the bench_gpu_<part>.json in --out")
    args = p.parse_args(argv)
    args.images = [tuple(int(v) for v in s.split("x")) for s in args.images.split(",")]
    args.presets = args.presets.split(",")
    args.keeps = [float(k) for k in args.keeps.split(",")]
    args.layers = [int(k) for k in args.layers.split(",")]
    args.paths = [q for q in (args.paths or ("pruned+cache" if args.part == "batch" else ",".join(PATHS))).split(",") if q]
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    args.multi = [int(b) for b in args.multi.split(",")] if args.multi else None
    args.weights = [w for w in args.weights.split(",") if w]
    args.groups = [g for g in args.groups.split(",") if g] if args.groups else None
    if args.groups and (bad := [g for g in args.groups if g.split("/")[0] not in ("pruned", "unpruned")
                                or g.partition("/")[2] not in WEIGHTS]):
        p.error(f"unknown --groups {bad}; a group is pruned/WEIGHTS or unpruned/WEIGHTS, WEIGHTS one of {', '.join(WEIGHTS)}")
    args.prefixes = [int(n) for n in args.prefixes.split(",") if n]
    if bad := [w for w in args.weights if w not in WEIGHTS]:
        p.error(f"unknown --weights {bad}; choose from {', '.join(WEIGHTS)}")
    bad = [q for q in args.paths if q not in PATHS]
    if bad:
        p.error(f"unknown path(s) {bad}; choose from {', '.join(PATHS)}")
    if args.part == "load":
        with torch.no_grad():
            run_load(args)
        return 0
    if (args.export_only or args.prebuilt) and args.part != "batch":
        p.error("--export-only and --prebuilt are options of the batch part")
    if args.export_only and args.prebuilt:
        p.error("--export-only exports the sets a --prebuilt run times: give one of them")
    if args.export_only:
        with torch.no_grad():
            return export_only(args)
    env = {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
           "torch": torch.__version__, "cuda": torch.version.cuda, "host": platform.node(),
           "date": time.strftime("%Y-%m-%d"),
           "gpu_memory_gib": torch.cuda.get_device_properties(0).total_memory / 2**30 if torch.cuda.is_available() else None}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def save(res: dict) -> None:  # also called part-way, so a run cut short keeps what it measured
        res["env"] = env
        res["model"] = {"preset": args.preset, "dtype": "bfloat16" if DEVICE == "cuda" else "float32",
                        "cached_attention": args.cached_attention}
        (out / f"bench_gpu_{args.part}.json").write_text(json.dumps(res, indent=2) + "\n")

    if args.replot:  # re-render the Markdown and the plot of an earlier run
        res = json.loads((out / f"bench_gpu_{args.part}.json").read_text())
        if res["part"] == "engines" and "settings" not in res and res.get("format") != 2:
            raise SystemExit("--replot: this JSON predates the engine grid (no 'settings'); rerun the benchmark")
        env = res["env"]
    else:
        with torch.no_grad():
            runs = {"grid": run_grid, "engines": run_engines, "batch": run_batch, "step": run_step}
            res = runs[args.part](args) if args.part == "grid" else runs[args.part](args, save)
        save(res)
    (out / f"bench_gpu_{args.part}.md").write_text(markdown(res, env))
    plot(res, out / f"bench_gpu_{args.part}.png")
    print(markdown(res, env))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
