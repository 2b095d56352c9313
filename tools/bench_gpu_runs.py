"""``tools/bench_gpu.py engines``, ``step`` and ``load``: export and load one engine set, time its requests
and each LM graph alone, the weight-read floor, the warm load in a fresh process, the cached step's pieces.
The helpers that export, load and time an engine set serve ``bench_gpu_batch.py`` too."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from llada_export.flops import request_flops
from llada_export.timing import matmul_peak, median_seconds, sync

# siblings in tools/ (scripts, not a package): bench_gpu.py puts the folder on sys.path
from bench_gpu_common import DEVICE, PATHS, WEIGHTS, build_model, peak_gib, request_images, reset_peak
from weight_floor import fp8_weights, linear_weights, weight_read_floor


def export_opts(args, out: Path, pruned: bool, cache: bool, batch_size: int = 1, compile_cache: bool | None = None,
                weights: str = "native"):
    """The options of one engine set; ``weights`` a ``WEIGHTS`` name (``fp8*``: ``--weights fp8`` engines)."""
    from llada_export.contract.pruning import PruneSettings
    from llada_export.exporter.build import ExportOptions
    from llada_export.quant.fp8 import FP8Settings

    w, h = args.images[0]
    quant = {} if weights == "native" else {"weights": "fp8", "fp8": FP8Settings(**WEIGHTS[weights])}
    return ExportOptions(**quant,model=f"random {args.preset} (bench_gpu, seed {args.seed})", output=str(out),
                         prune=PruneSettings(args.layers[0], args.keeps[0]) if pruned else None, cache=cache,
                         fuse_sampler=True, backends=(args.backend,), compiled_weights="checkpoint",
                         dtype="bfloat16" if DEVICE == "cuda" else "float32", device=DEVICE,
                         gen_length=args.gen_length, max_prompt_tokens=args.max_prompt_tokens, image_size=(w, h),
                         batch_size=batch_size, compile_cache=compile_cache, overwrite=True, progress=False,
                         cached_attention=getattr(args, "cached_attention", "flash"),
                         precompile=None if args.compile else False)  # --no-compile: nothing compiled at export


def load_engines(args, out: Path, weights: dict | None, warmup: bool = True):
    """``Pipeline.load`` of the engines at ``out`` on the random ``weights`` (None: the directory's own);
    ``--no-compile``: the programs' eager kernels from CUDA graphs."""
    from llada_export.runtime.pipeline import Pipeline

    return Pipeline.load(out, backend=args.backend, device=DEVICE, weights=weights, warmup=warmup,
                         runner_options=None if args.compile else {"compile": False})


def settings_of(args, cache: bool) -> dict:
    if not cache:  # the exact path: no cache, the official fixed schedule
        return dict(cache=False, fixed_schedule=True)
    return dict(cache=True, refresh=args.refresh, factor=args.factor, fixed_schedule=args.factor is None)


def time_requests(pipe, images, args, preset: str, pruned: bool, cache: bool) -> dict:
    """One untimed batch, then ``--repeat`` timed ones: medians of the timings, the forwards, FLOPs."""
    from llada_export.runtime.pipeline import Request

    reqs = [Request(img, args.prompt, args.system) for img in images]
    kw = dict(preset=preset, unpruned=not pruned, **settings_of(args, cache))
    runs = []
    for i in range(args.repeat + 1):
        reset_peak()
        t0 = time.perf_counter()
        out = pipe.generate_batch(reqs, **kw)
        if i:
            runs.append(out)
        else:
            first_s = time.perf_counter() - t0  # with a lazy load: compiles and captures the graphs it runs
    first = runs[0][0]
    med = {k: v if isinstance(v, list) else statistics.median(r[0].timings[k] for r in runs)
           for k, v in first.timings.items()}  # engine_batch_sizes: a list
    gen = pipe.generation_config(**kw)
    b, n_vis = pipe.bucket, first.n_visual
    cached = sum(v for k, v in first.graph_calls.items() if k.partition("@")[0].endswith("cached"))  # @bN: narrowed
    fl = request_flops(pipe.config, b.max_text_tokens + n_vis, n_vis, gen, args.layers[0] if pruned else None,
                       args.keeps[0], b.vision_batch, forwards=first.forwards, cached_forwards=cached)
    seconds = med["total"]
    return {"preset": preset, "path": ("pruned" if pruned else "unpruned") + ("+cache" if cache else ""),
            "batch_size": len(reqs), "seconds": seconds, "all_seconds": [r[0].timings["total"] for r in runs],
            "forwards": first.forwards, "graph_calls": first.graph_calls, "timings": med,
            "tokens_per_s": len(reqs) * gen.gen_length / seconds, "tflops": fl["total"] / 1e12 * len(reqs),
            "tflop_per_s": fl["total"] * len(reqs) / seconds / 1e12, "peak_gib": peak_gib(),
            "answer_tokens": len(first.ids), "settings": gen.describe(), "first_batch_s": first_s,
            "ids": [list(map(int, r.ids)) for r in runs[0]]}


def graph_times(pipe, image, args, peak: float) -> dict:
    """Each LM graph alone from its CUDA graph (CUDA events, median of 20) on a real request's inputs."""
    from llada_export.contract.layout import reduce_inputs
    from llada_export.runtime.pipeline import Request

    x, _ = pipe._layout([Request(image, args.prompt, args.system)], pipe.bucket.gen_length)
    resp = torch.full((x.batch, pipe.bucket.gen_length), pipe.tokens.mask, dtype=torch.long, device=pipe.device)
    feeds, out = {}, {}
    if "stage_a" in pipe.runners:
        feeds["stage_a"] = x.stage_a_feeds(resp, pipe.keep)
        a = pipe.run("stage_a", **feeds["stage_a"])
        red = reduce_inputs(x, a["kept_index"], a["kept_alive"])
        feeds["stage_b"] = feeds["prefill"] = red.denoiser_feeds(resp)
        if "prefill" in pipe.runners:
            kv = pipe.run("prefill", **feeds["prefill"])["kv_cache"]
            feeds["cached"] = red.cached_feeds(resp, kv, torch.zeros(x.batch, dtype=torch.long, device=pipe.device))
    feeds["unpruned"] = feeds["unpruned_prefill"] = x.denoiser_feeds(resp)
    if "unpruned_prefill" in pipe.runners:
        kv = pipe.run("unpruned_prefill", **feeds["unpruned_prefill"])["kv_cache"]
        feeds["unpruned_cached"] = x.cached_feeds(resp, kv, torch.zeros(x.batch, dtype=torch.long, device=pipe.device))
    cfg, g = pipe.config, pipe.bucket.gen_length
    from llada_export.flops import lm_flops

    n_layers = cfg.text.num_hidden_layers
    for name, f in feeds.items():
        if name not in pipe.runners:
            continue
        runner = pipe.runners[name]
        args_ = [f[k] for k in runner.inputs]
        seconds = median_seconds(lambda: runner.call(*args_), repeat=getattr(args, "graph_repeat", 20))
        length = (pipe.bucket.reduced_seq_len if name in ("stage_b", "prefill", "cached") else pipe.bucket.seq_len)
        flops = (lm_flops(cfg, g, n_layers, g, keys=length) if name.endswith("cached")
                 else lm_flops(cfg, length, n_layers, g))
        out[name] = {"ms": seconds * 1e3, "tflop": flops / 1e12, "share_of_peak": flops / seconds / peak,
                     "sequence": length}
        print(name, json.dumps(out[name]), flush=True)
    return out


def add_floor(res: dict, model, weights: str = "native") -> None:
    """The weight-read floor (``tools/weight_floor.py``: every linear weight of the layers and the LM
    head read once; ``fp8*``: the layers' as 1-byte tensors), measured once per weights variant in this
    run, and each cached step's ms / floor ms beside it (``res["weights"]``: floors and graphs per variant)."""
    per_variant = "weights" in res
    floors = res.setdefault("weight_floor", {}) if per_variant else res
    key = weights if per_variant else "weight_floor"
    if key not in floors:
        floors[key] = weight_read_floor((linear_weights if weights == "native" else fp8_weights)(model))
        print("weight_floor", weights, json.dumps(floors[key]), flush=True)
    for name, g in (res["graphs"].get(weights, {}) if per_variant else res["graphs"]).items():
        if name.endswith("cached"):
            g["vs_floor"] = g["ms"] / floors[key]["ms"]


def warm_load(engines: Path, args) -> dict:
    """``Pipeline.load`` (+ warm-up) of ``engines`` in two fresh processes sharing one Inductor cache folder,
    empty for the first: ``cold`` is the first load (the kernels saved at export, or the compile cache saved
    there), the returned figures the second (``warm``: what a serving host pays on a restart). The weights
    are made again on the GPU first (same seed; not timed: a host would read them from the checkpoint)."""
    runs = []
    with tempfile.TemporaryDirectory(prefix="inductor_cache_") as cache_dir:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache_dir, "TRITON_CACHE_DIR": f"{cache_dir}/triton"}
        cmd = [sys.executable, str(Path(__file__).with_name("bench_gpu.py")), "load", "--engines", str(engines),
               "--preset", args.preset, "--seed", str(args.seed), "--backend", args.backend]
        for _ in range(2):
            r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
            if r.returncode:
                return {"error": r.stderr[-2000:], **({"cold": runs[0]} if runs else {})}
            runs.append(json.loads(r.stdout.strip().splitlines()[-1]))
    return {**runs[1], "cold": runs[0]}


def run_load(args) -> None:
    from torch._dynamo.utils import counters

    from llada_export.runtime.pipeline import Pipeline

    model, _, _ = build_model(args.preset, args.seed)
    weights = dict(model.state_dict())
    sync()
    t0 = time.perf_counter()
    pipe = Pipeline.load(args.engines, backend=args.backend, device=DEVICE, weights=weights)
    sync()
    print(json.dumps({"seconds": time.perf_counter() - t0, "compile_cache": pipe.compile_cache,
                      "precompiled": pipe.precompiled,
                      "fxgraph_cache_hit": counters["inductor"]["fxgraph_cache_hit"],
                      "fxgraph_cache_miss": counters["inductor"]["fxgraph_cache_miss"],
                      "graphs": len(pipe.runners)}), flush=True)


def run_engines(args, save) -> dict:
    """Per group (pruned / unpruned engines) and per ``--weights`` variant: export with one set of random
    weights, load, time the presets x paths and each graph alone, measure the variant's weight-read
    floor, then delete the engines (disk). ``--resume``: an earlier call's JSON, its (group, variant)
    pairs kept; ``--step-profile``: the cached step's pieces (``tools/step_profile.py``) at the end."""
    import shutil

    from llada_export.contract.manifest import Manifest
    from llada_export.exporter.build import export_engines

    res: dict = {"part": "engines", "format": 2, "backend": args.backend, "weights": args.weights,
                 "graph_repeat": args.graph_repeat, "rows": [],
                 "groups": {}, "graphs": {}, "weight_floor": {},
                 "setting": {"image": "x".join(map(str, args.images[0])), "prune_layer": args.layers[0],
                             "keep": args.keeps[0], "refresh": args.refresh, "factor": args.factor,
                             "gen_length": args.gen_length, "max_prompt_tokens": args.max_prompt_tokens}}
    if args.resume:
        old = json.loads(Path(args.resume).read_text())
        if "weights" not in old or old["setting"] != res["setting"]:
            raise SystemExit(f"--resume {args.resume}: another setting or a report without --weights; rerun whole")
        done = [g for g, info in old["groups"].items() if info.get("complete")]  # a group cut short is redone
        res["groups"] = {g: old["groups"][g] for g in done}
        res["rows"] = [r for r in old["rows"] if f"{r['path'].split('+')[0]}/{r['weights']}" in done]
        for k in ("graphs", "weight_floor", "official", "step_profile"):
            if k in old:
                res[k] = old[k]
        res["weights"] = list(dict.fromkeys(old["weights"] + args.weights))
        res["earlier"] = {"env": old["env"], "groups": done}
    if args.official:
        res["official"] = json.loads(Path(args.official).read_text())
    res["matmul_peak_tflops"] = peak = matmul_peak() / 1e12
    t0 = time.perf_counter()
    model, cfg, tok = build_model(args.preset, args.seed)
    res["model_build_s"] = time.perf_counter() - t0
    state = dict(model.state_dict())
    image = request_images(*args.images[0], 1)
    for pruned in (True, False):
        paths = [p for p in args.paths if PATHS[p][0] == pruned]
        if not paths:
            continue
        cache = any(PATHS[p][1] for p in paths)
        for variant in res["weights"]:  # --resume: the earlier call's variants and these
            group = f"{'pruned' if pruned else 'unpruned'}/{variant}"
            if group in res["groups"] or (args.groups and group not in args.groups):
                continue  # measured by the --resume'd call, or not asked for (--groups)
            out = Path(args.workdir) / f"engines_{group.replace('/', '_')}"
            reset_peak()
            t0 = time.perf_counter()
            export_engines(export_opts(args, out, pruned, cache, compile_cache=args.compile_cache, weights=variant),
                           loaded=(model, tok, cfg))
            info = {"export_s": time.perf_counter() - t0, "export_peak_gpu_gib": peak_gib(),
                    "notes": Manifest.read(out, verify=False).notes}
            t0 = time.perf_counter()
            pipe = load_engines(args, out, state if variant == "native" else None)  # fp8: the directory's file
            info["load_in_process_s"] = time.perf_counter() - t0
            info["compile_cache"] = pipe.compile_cache
            print(group, json.dumps(info), flush=True)
            res["groups"][group] = info
            save(res)
            for preset in args.presets:
                for path in paths:
                    row = time_requests(pipe, image, args, preset, pruned, PATHS[path][1])
                    row["weights"] = variant
                    res["rows"].append(row)
                    print(json.dumps(row), flush=True)
                    save(res)
            if DEVICE == "cuda":  # the sampler step from its CUDA graph gives the eager sampler's tokens
                kw = dict(preset=args.presets[-1], unpruned=not pruned, **settings_of(args, cache))
                a = pipe.generate(image[0], args.prompt, system=args.system, **kw)
                pipe.step_graph = False
                b = pipe.generate(image[0], args.prompt, system=args.system, **kw)
                pipe.step_graph = None
                info["step_graph_check"] = {"preset": args.presets[-1], "same_ids": a.ids == b.ids,
                                            "graph": a.timings["sampler_step_graph"],
                                            "eager_total_s": b.timings["total"], "graph_total_s": a.timings["total"]}
                print(group, "step graph check", json.dumps(info["step_graph_check"]), flush=True)
            res["graphs"].setdefault(variant, {}).update(graph_times(pipe, image[0], args, peak * 1e12))
            add_floor(res, model, variant)
            del pipe
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if args.warm_load and args.compile_cache is not False and args.compile and variant == "native":
                info["warm_load"] = warm_load(out, args)
                print(group, "warm load", json.dumps(info["warm_load"]), flush=True)
            shutil.rmtree(out, ignore_errors=True)  # one variant's engines on disk at a time
            info["complete"] = True
            save(res)
    if args.step_profile and "step_profile" not in res:
        res["step_profile"] = run_profile(args, model, cfg, tok)
    return res


def run_profile(args, model, cfg, tok) -> dict:
    """``tools/step_profile.py`` at each ``--prefixes`` length, the bf16 floor measured here too."""
    from llada_export.graphs.fused import fuse_projections
    from step_profile import profile_step

    lm = fuse_projections(model.language)  # fused copies of q/k/v and gate/up, as the engines hold them
    floor = weight_read_floor(linear_weights(model))
    prof = {"floor": floor, "shapes": [], "note": (
        f"Layer 0 of the model (fused q|k|v and gate|up, {'bf16' if DEVICE == 'cuda' else 'fp32'}), eager kernels "
        f"each in its own CUDA graph; 'at floor bandwidth' = the piece's weight bytes at the floor's "
        f"{floor['tb_per_s']:.2f} TB/s; the rest of a piece's time is above the floor.")}
    for prefix in args.prefixes:
        s = profile_step(model, lm, cfg, tok, prefix, rows=args.step_rows, gen=args.gen_length, floor=floor)
        prof["shapes"].append(s)
        print("step_profile", prefix, json.dumps({k: v for k, v in s.items() if k not in ("pieces",)}), flush=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return prof


def run_step(args, save) -> dict:
    """The ``step`` part: the cached step's pieces alone (no engines)."""
    res: dict = {"part": "step", "matmul_peak_tflops": matmul_peak() / 1e12}
    model, cfg, tok = build_model(args.preset, args.seed)
    res["step_profile"] = run_profile(args, model, cfg, tok)
    return res
