#!/usr/bin/env python
"""CPU benchmark of the pruned engines (ONNX Runtime, fp32) against the unpruned graph.

Writes a random-weight checkpoint (the tiny preset's structure, by default widened to
hidden 256 x 8 layers with patch-32 vision crops so that a 1024x768 image gives 704
visual tokens, most of the sequence, as in the real model), exports one engines
directory per ``--keep`` value (each with the unpruned baseline graph beside the pruned
stage A / stage B graphs, so both paths are timed on the same machine in the same run),
answers one request per repeat with both paths (interleaved, after warm-up runs) and
writes the medians to ``<out>/cpu_ort.json`` and ``<out>/cpu_ort.md``.

Random weights: the answers are meaningless; what is measured is the cost per stage.
Timings on a shared machine are noisy: the pruned and unpruned runs are interleaved so
that both see the same load, and the median over ``--repeats`` is reported.

    .venv/bin/python tools/bench_cpu.py                  # the default (about 3-4 minutes on 2 cores)
    .venv/bin/python tools/bench_cpu.py --hidden 64 --layers 4 --patch 48 --repeats 2   # quick
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from llada_export.cli.common import parse_size

DEFAULT_KEEPS = (1.0, 0.5, 0.35)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=["tiny"],
                   help="base model structure; the options below override its sizes (default: tiny)")
    p.add_argument("--hidden", type=int, default=256, help="text hidden size (default 256; tiny: 64)")
    p.add_argument("--layers", type=int, default=8, help="text layers (default 8; tiny: 4)")
    p.add_argument("--heads", type=int, default=None, help="attention heads (default: hidden / 64, at least 1)")
    p.add_argument("--intermediate", type=int, default=None, help="MLP size (default: 2.75 x hidden)")
    p.add_argument("--patch", type=int, default=32,
                   help="vision patch size on 384 px crops (default 32: 12x12 tokens per crop; tiny: 48)")
    p.add_argument("--image-size", type=parse_size, default=(1024, 768),
                   help="bucket image size WxH; the request image has this size (default 1024x768)")
    p.add_argument("--max-prompt-tokens", type=int, default=128, help="text slots of the bucket (default 128)")
    p.add_argument("--prune-layer", type=int, default=None, help="pruning layer K (default: layers / 2)")
    p.add_argument("--keep", type=float, nargs="+", default=list(DEFAULT_KEEPS),
                   help="keep ratios, one engines directory each (default: 1.0 0.5 0.35)")
    p.add_argument("--gen-preset", default="chartqa", help="sampler preset of the request (default chartqa: 16/16/16)")
    p.add_argument("--image", default=None,
                   help="request image (default: the bundled demo image resized to --image-size)")
    p.add_argument("--prompt", default="<image>\nWhat is the highest value in the chart?")
    p.add_argument("--warmup", type=int, default=1, help="warm-up requests per path (default 1)")
    p.add_argument("--repeats", type=int, default=3, help="timed requests per path; medians reported (default 3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init-std", type=float, default=0.3, help="random init std (default 0.3, as the tests)")
    p.add_argument("--torch-threads", type=int, default=1,
                   help="torch intra-op threads for the sampler and preprocessing (default 1: the engines use ONNX "
                        "Runtime's own threads; torch's OpenMP threads competing with them slow the tiny sampler ops)")
    p.add_argument("--fuse-sampler", action="store_true", help="export with --fuse-sampler (argmax in the graphs)")
    p.add_argument("--workdir", default="build/bench_cpu", help="checkpoint and engines (default build/bench_cpu)")
    p.add_argument("--out", default="benchmarks", help="where cpu_ort.json / cpu_ort.md go (default benchmarks)")
    p.add_argument("--replot", action="store_true", help="only rewrite cpu_ort.md from cpu_ort.json in --out")
    p.add_argument("--keep-workdir", action="store_true", help="do not delete the workdir at the end")
    args = p.parse_args(argv)
    for k in args.keep:
        if not 0.0 < k <= 1.0:
            p.error(f"--keep values must be in (0, 1], got {k}")
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    return args


def make_config(args):
    from llada_export.config import PRESETS

    cfg = PRESETS[args.preset]()
    t = cfg.text
    t.hidden_size = args.hidden
    t.num_hidden_layers = args.layers
    t.num_attention_heads = t.num_key_value_heads = args.heads or max(1, args.hidden // 64)
    t.intermediate_size = args.intermediate or int(round(2.75 * args.hidden / 32)) * 32
    if t.hidden_size % t.num_attention_heads or (t.hidden_size // t.num_attention_heads) % 2:
        raise SystemExit(f"--hidden {t.hidden_size} must split into {t.num_attention_heads} heads of even size")
    if cfg.vision.image_size % args.patch:
        raise SystemExit(f"--patch {args.patch} must divide the crop size {cfg.vision.image_size}")
    cfg.vision.patch_size = args.patch
    cfg.torch_dtype = "float32"
    return cfg


def write_checkpoint(cfg, out: Path, seed: int, init_std: float) -> Path:
    import torch

    from llada_export.checkpoint.io import save_checkpoint
    from llada_export.synthetic.tokenizer import build_tokenizer
    from llada_export.synthetic.weights import random_state

    tok = build_tokenizer("tiny")
    if cfg.text.vocab_size == 0:
        cfg.text.vocab_size = len(tok)
    return save_checkpoint(random_state(cfg, seed, torch.float32, init_std=init_std), cfg, tok, out, overwrite=True)


def request_image(args):
    from PIL import Image

    if args.image:
        return Image.open(args.image).convert("RGB")
    from llada_export.demo import DEMO_IMAGE

    return Image.open(DEMO_IMAGE).convert("RGB").resize(args.image_size, Image.BICUBIC)


def machine_info() -> dict:
    import onnxruntime
    import torch

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
        "torch_threads": torch.get_num_threads(),
        "onnxruntime_threads": "default (intra-op pool = one per core, spinning off)",
        "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def med(xs: list[float]) -> float:
    return float(statistics.median(xs))


def bench_one(engines: Path, image, args) -> dict:
    from llada_export.runtime.pipeline import Pipeline

    pipe = Pipeline.load(engines, backend="onnxruntime")

    def run(unpruned: bool):
        return pipe.generate(image, args.prompt, preset=args.gen_preset, unpruned=unpruned, fixed_schedule=True)

    for _ in range(args.warmup):
        run(False)
        run(True)
    pruned, full = [], []
    for i in range(args.repeats):  # interleaved, alternating which goes first, so both see the same load
        order = (False, True) if i % 2 == 0 else (True, False)
        for u in order:
            (full if u else pruned).append(run(u))
    r0, f0 = pruned[0], full[0]
    t = {k: med([r.timings[k] for r in pruned])
         for k in ("vision", "prepare", "stage_a_per_call", "stage_b_per_call", "sampler_overhead", "total")}
    tf = {k: med([r.timings[k] for r in full])
          for k in ("vision", "prepare", "unpruned_per_call", "sampler_overhead", "total")}
    t["stage_a"], t["stage_b_per_step"], tf["full_per_step"] = (t["stage_a_per_call"], t["stage_b_per_call"],
                                                               tf["unpruned_per_call"])
    steps = r0.forwards
    return {
        "keep": pipe.keep,
        "prune_layer": pipe.manifest.pruning.layer,
        "n_visual": r0.n_visual,
        "kept_visual": len(r0.kept_visual or []),
        "bucket": pipe.manifest.bucket.to_dict(),
        "forwards": steps,
        "vision_s": t["vision"],
        "stage_a_s": t["stage_a"],
        "stage_b_per_step_s": t["stage_b_per_step"],
        "prepare_s": t["prepare"],
        "sampler_overhead_s": t["sampler_overhead"],
        "total_s": t["total"],
        "unpruned_vision_s": tf["vision"],
        "unpruned_prepare_s": tf["prepare"],
        "unpruned_sampler_overhead_s": tf["sampler_overhead"],
        "unpruned_per_step_s": tf["full_per_step"],
        "unpruned_total_s": tf["total"],
        "speedup_total": tf["total"] / t["total"],
        "speedup_per_step": tf["full_per_step"] / t["stage_b_per_step"],
        "best_total_s": min(r.timings["total"] for r in pruned),
        "best_unpruned_total_s": min(r.timings["total"] for r in full),
        "best_stage_b_per_step_s": min(r.timings["stage_b_per_call"] for r in pruned),
        "best_unpruned_per_step_s": min(r.timings["unpruned_per_call"] for r in full),
        "totals_s": [r.timings["total"] for r in pruned],
        "unpruned_totals_s": [r.timings["total"] for r in full],
        "same_answer_as_unpruned": r0.ids == f0.ids,
        "answer_tokens": len(r0.ids),
    }


def write_markdown(report: dict, path: Path) -> None:
    m, c = report["machine"], report["model"]
    lines = [
        "# CPU benchmark: pruned engines vs the unpruned graph (ONNX Runtime, fp32)",
        "",
        f"Written by `tools/bench_cpu.py` on {report['date']}; command: `{report['command']}`.",
        "",
        f"- Machine: {m['platform']}; {m['cpu'] or 'cpu'}; {m['cpus_usable']} usable CPU cores "
        f"({m['cpu_count']} reported); Python {m['python']}, torch {m['torch']} ({m['torch_threads']} thread(s), "
        f"sampler and preprocessing), onnxruntime {m['onnxruntime']} (default threads, the engines); "
        f"load average at start {', '.join(f'{x:.2f}' for x in m['loadavg_start'] or [])}.",
        f"- Model: random weights, text hidden {c['hidden']}, {c['layers']} layers, {c['heads']} heads, MLP "
        f"{c['intermediate']}, vocab {c['vocab']}; vision {c['vision_layers']} layers, hidden {c['vision_hidden']}, "
        f"patch {c['patch']} on {c['crop']} px crops ({c['tokens_per_crop']} tokens per crop).",
        f"- Bucket: image {report['image_size'][0]}x{report['image_size'][1]}, {report['bucket']['max_visual_tokens']} "
        f"visual + {report['bucket']['max_text_tokens']} text slots, G = {report['bucket']['gen_length']}; request: "
        f"preset `{report['gen_preset']}` ({report['gen']}), {report['n_visual']} visual tokens.",
        f"- Medians of {report['repeats']} requests per path after {report['warmup']} warm-up(s); pruned and unpruned "
        "requests interleaved. Times in ms; 'per step' = one denoiser forward.",
        "",
        "| keep | layer K | kept / visual | vision | stage A | stage B / step | total | unpruned / step | "
        "unpruned total | speed-up (total) | speed-up (per step) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['keep']:g} | {r['prune_layer']} | {r['kept_visual']} / {r['n_visual']} | "
            f"{r['vision_s'] * 1e3:.1f} | "
            f"{r['stage_a_s'] * 1e3:.1f} | {r['stage_b_per_step_s'] * 1e3:.1f} | {r['total_s'] * 1e3:.0f} | "
            f"{r['unpruned_per_step_s'] * 1e3:.1f} | {r['unpruned_total_s'] * 1e3:.0f} | "
            f"{r['speedup_total']:.2f}x | {r['speedup_per_step']:.2f}x |")
    lines += [
        "",
        f"Best of the {report['repeats']} requests (less sensitive to other load on a shared machine):",
        "",
        "| keep | stage B / step | unpruned / step | total | unpruned total | speed-up (total) |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['keep']:g} | {r['best_stage_b_per_step_s'] * 1e3:.1f} | {r['best_unpruned_per_step_s'] * 1e3:.1f} | "
            f"{r['best_total_s'] * 1e3:.0f} | {r['best_unpruned_total_s'] * 1e3:.0f} | "
            f"{r['best_unpruned_total_s'] / r['best_total_s']:.2f}x |")
    le = m.get("loadavg_end")
    lines += ["", f"Load average at the end: {', '.join(f'{x:.2f}' for x in le or [])} (on {m['cpus_usable']} cores; "
              "above the core count means other processes competed for the CPU during the run).", ""]
    if report["warnings"]:
        lines += ["Warnings:", ""] + [f"- {w}" for w in report["warnings"]] + [""]
    lines += [
        "keep 1.0 keeps every visual token: its stage A / stage B run the same sequence length as the unpruned "
        "graph, so its speed-up measures the pruning machinery's overhead (about 1.0x expected). Random weights: the "
        "answers are meaningless; the test suite compares the paths token by token against the eager oracles.",
        "",
    ]
    path.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.replot:
        out = Path(args.out)
        write_markdown(json.loads((out / "cpu_ort.json").read_text()), out / "cpu_ort.md")
        return 0
    t_start = time.perf_counter()
    import torch

    torch.set_num_threads(args.torch_threads)
    from llada_export.contract.pruning import PruneSettings
    from llada_export.exporter.build import ExportOptions, export_engines
    from llada_export.sampler import preset as get_preset

    work, out = Path(args.workdir), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    cfg = make_config(args)
    gen = get_preset(args.gen_preset)
    k_layer = args.prune_layer if args.prune_layer is not None else cfg.text.num_hidden_layers // 2
    machine = machine_info()

    t0 = time.perf_counter()
    ckpt = write_checkpoint(cfg, work / "checkpoint", args.seed, args.init_std)
    print(f"checkpoint: {ckpt} ({time.perf_counter() - t0:.1f} s)", flush=True)
    image = request_image(args)

    results, warnings, export_s = [], [], {}
    for keep in args.keep:
        eng = work / f"engines_keep{keep:g}"
        t0 = time.perf_counter()
        extra = {"fuse_sampler": True} if args.fuse_sampler else {}
        export_engines(ExportOptions(
            model=str(ckpt), output=str(eng), prune=PruneSettings(k_layer, keep), baseline=True,
            gen_length=gen.gen_length, block_length=gen.block_length, steps=gen.steps,
            max_prompt_tokens=args.max_prompt_tokens, image_size=tuple(args.image_size), overwrite=True,
            progress=False, **extra))
        export_s[f"{keep:g}"] = time.perf_counter() - t0
        print(f"keep {keep:g}: exported in {export_s[f'{keep:g}']:.1f} s; timing ...", flush=True)
        r = bench_one(eng, image, args)
        r["export_s"] = export_s[f"{keep:g}"]
        results.append(r)
        print(f"  kept {r['kept_visual']}/{r['n_visual']}  vision {r['vision_s'] * 1e3:.1f} ms  stage A "
              f"{r['stage_a_s'] * 1e3:.1f} ms  stage B {r['stage_b_per_step_s'] * 1e3:.1f} ms/step  total "
              f"{r['total_s'] * 1e3:.0f} ms  |  unpruned {r['unpruned_per_step_s'] * 1e3:.1f} ms/step, total "
              f"{r['unpruned_total_s'] * 1e3:.0f} ms  |  speed-up {r['speedup_total']:.2f}x", flush=True)
        if keep < 1.0 and r["total_s"] >= r["unpruned_total_s"]:
            w = (f"keep {keep:g}: the pruned path ({r['total_s'] * 1e3:.0f} ms) was NOT faster than the unpruned "
                 f"graph ({r['unpruned_total_s'] * 1e3:.0f} ms) in this run")
            warnings.append(w)
            print(f"WARNING: {w}", flush=True)
        if keep == 1.0 and abs(r["speedup_total"] - 1.0) > 0.15:
            w = (f"keep 1.0 does the same work as the unpruned graph, yet their totals differ by "
                 f"{r['speedup_total']:.2f}x: timings in this run are noisy (other load on the machine?)")
            warnings.append(w)
            print(f"WARNING: {w}", flush=True)
        if keep == 1.0 and not r["same_answer_as_unpruned"]:
            w = "keep 1.0: the pruned path's answer differs from the unpruned graph's"
            warnings.append(w)
            print(f"WARNING: {w}", flush=True)

    b0 = results[0]["bucket"]
    machine["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": " ".join(["tools/bench_cpu.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine,
        "model": {"base_preset": args.preset, "hidden": cfg.text.hidden_size, "layers": cfg.text.num_hidden_layers,
                  "heads": cfg.text.num_attention_heads, "intermediate": cfg.text.intermediate_size,
                  "vocab": cfg.text.vocab_size, "vision_layers": cfg.vision.num_hidden_layers - 1,
                  "vision_hidden": cfg.vision.hidden_size, "patch": cfg.vision.patch_size,
                  "crop": cfg.vision.image_size, "tokens_per_crop": cfg.vision.tokens_per_crop,
                  "init_std": args.init_std, "seed": args.seed},
        "image_size": list(args.image_size),
        "bucket": {k: b0[k] for k in ("max_text_tokens", "max_visual_tokens", "gen_length", "prefix_len")},
        "n_visual": results[0]["n_visual"],
        "gen_preset": args.gen_preset,
        "gen": f"gen_length {gen.gen_length}, block_length {gen.block_length}, steps {gen.steps}",
        "prompt": args.prompt,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "fuse_sampler": args.fuse_sampler,
        "results": results,
        "warnings": warnings,
        "wall_s": None,
    }
    if not args.keep_workdir:
        shutil.rmtree(work, ignore_errors=True)
    report["wall_s"] = time.perf_counter() - t_start
    (out / "cpu_ort.json").write_text(json.dumps(report, indent=2) + "\n")
    write_markdown(report, out / "cpu_ort.md")
    print(f"wrote {out / 'cpu_ort.json'} and {out / 'cpu_ort.md'} ({report['wall_s']:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
