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
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from llada_export.flops import request_flops
from llada_export.timing import matmul_peak, median_seconds, sync, wall_seconds
from llada_export.report import pyplot, save

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_profile import markdown_profile, plot_profile  # noqa: E402
from weight_floor import fp8_weights, linear_weights, weight_read_floor  # noqa: E402  (tools/ holds scripts, not a package)

# Official LLaDA-V on the H100, 1024x768, random bf16 weights (issue 7's anchor; format-1 reports only).
ANCHOR_IMAGE = "1024x768"  # the only image size the anchor was measured at
TARGET = {"image": ANCHOR_IMAGE, "prune_layer": 16, "keep": 0.35}  # the setting issue 7's targets are for
OFFICIAL = {"forward_3815_ms": 196.0, "mc": 0.42, "chartqa": 3.25, "demo": 26.5, "vision_7_crops_ms": 40.0,
            "peak_gib": 28.7}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: smoke runs with the tiny preset
WEIGHTS = {"native": {}, "fp8": {"activations": "row"}, "fp8-row": {"activations": "row"},
           "fp8-tensor": {"activations": "tensor"}}  # --weights: name -> FP8Settings fields (native: none)
PATHS = {"pruned": (True, False), "pruned+cache": (True, True), "unpruned": (False, False),
         "unpruned+cache": (False, True)}  # path -> (pruned, cache)


def reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")


def build_model(preset: str, seed: int = 0):
    """(model, config, tokenizer): random weights made on the device by the project's init rule."""
    from llada_export.config import PRESETS
    from llada_export.synthetic.tokenizer import build_tokenizer
    from llada_export.synthetic.weights import random_model

    cfg = PRESETS[preset]()
    tok = build_tokenizer("full" if preset == "full" else "tiny")
    cfg.text.vocab_size = cfg.text.vocab_size or len(tok)
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    cfg.torch_dtype = str(dtype).removeprefix("torch.")
    return random_model(cfg, DEVICE, dtype, seed), cfg, tok


def request_images(w: int, h: int, n: int) -> list[Image.Image]:
    return [Image.fromarray(np.random.default_rng(i).integers(0, 256, (h, w, 3), dtype=np.uint8)) for i in range(n)]


# ---------------------------------------------------------------------- grid (eager)
def run_grid(args) -> dict:
    from llada_export.contract.pruning import PruneSettings, num_kept
    from llada_export.graphs.anyres import grid_shape, preprocess
    from llada_export.reference import ReferenceDenoiser, embed_prompt, pruned_forward
    from llada_export.sampler import PRESETS, SamplerTrace, generate
    from llada_export.tokenizer import special_tokens

    t0 = time.perf_counter()
    peak = matmul_peak()
    dev = DEVICE
    model, cfg, tok = build_model(args.preset)
    sp = special_tokens(tok)
    setup_s = time.perf_counter() - t0
    rows, prompts = [], {}
    rng = np.random.default_rng(0)
    for size in args.images:
        w, h = size
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        cols, rws = grid_shape((w, h), cfg)
        crops = 1 + cols * rws
        pi = embed_prompt(model, tok, img, args.prompt, system=args.system)
        pixels = preprocess(img, cfg)[0].to(dev)
        t_vis = wall_seconds(lambda: model.encode_images(pixels), repeat=5)
        prompts[size] = (pi, t_vis, crops)

    def run(pi, gen, prune):
        den = ReferenceDenoiser(model, pi, sp.mask, prune)
        trace = SamplerTrace()
        if dev == "cuda":
            torch.cuda.reset_peak_memory_stats()
        sync()
        t = time.perf_counter()
        generate(den, gen, mask_id=sp.mask, eot_id=sp.eot, suppress_ids=sp.suppressed(), trace=trace,
                 device=dev, generators=[torch.Generator(device=dev).manual_seed(0)])
        sync()
        mem = torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else float("nan")
        return time.perf_counter() - t, trace.forwards, mem

    settings = [(None, 1.0)] + [(k, keep) for keep in args.keeps for k in args.layers]
    for size, (pi, t_vis, crops) in prompts.items():
        p, nv = pi.length, pi.n_visual
        for layer, keep in settings:
            for pname in args.presets:
                gen = PRESETS[pname]
                g = gen.gen_length
                resp = torch.full((1, g), sp.mask, device=dev)
                pos = torch.arange(p + g, device=dev)[None]
                if layer is None:
                    t_a = t_b = wall_seconds(lambda: model.denoise(pi.embeds, resp, pos))
                    red = p + g
                else:
                    k = num_kept(keep, nv)
                    vmask = torch.cat([pi.visual_mask, torch.zeros(1, g, dtype=torch.bool, device=dev)], 1)
                    st = PruneSettings(layer, keep)
                    t_a = wall_seconds(lambda: pruned_forward(model, pi.embeds, resp, pos, torch.ones_like(vmask), vmask,
                                                       torch.tensor([k], device=dev), st, k, sp.mask))
                    red = p + g - nv + k
                    red_prefix = pi.embeds[:, : red - g]
                    t_b = wall_seconds(lambda: model.denoise(red_prefix, resp, torch.arange(red, device=dev)[None]))
                measure = pname != "demo" or layer in (None, 16)
                if measure:
                    total, fwd, mem = run(pi, gen, None if layer is None else PruneSettings(layer, keep))
                    total += t_vis
                else:  # demo preset at K != 16: stage B dominates and does not depend on K
                    total, fwd, mem = t_vis + t_a + (gen.steps - 1) * t_b, gen.steps, float("nan")
                fl = request_flops(cfg, p, nv, gen, layer, keep, crops)
                rows.append({
                    "image": f"{size[0]}x{size[1]}", "preset": pname, "prune_layer": layer, "keep": keep,
                    "visual_tokens": nv, "text_tokens": p - nv, "length": p + g, "reduced_length": red,
                    "latency_s": total, "measured": measure, "forwards": fwd, "vision_ms": t_vis * 1e3,
                    "stage_a_ms": t_a * 1e3, "stage_b_ms": t_b * 1e3, "tokens_per_s": g / total,
                    "tflops": fl["total"] / 1e12, "tflop_per_s": fl["total"] / total / 1e12,
                    "share_of_peak": fl["total"] / total / peak, "stage_b_share_of_peak": fl["stage_b"] / t_b / peak,
                    "peak_gib": mem})
                print(json.dumps(rows[-1]), flush=True)
    return {"part": "grid", "matmul_peak_tflops": peak / 1e12, "setup_s": setup_s, "rows": rows,
            "official_anchor": OFFICIAL}




# ---------------------------------------------------------------------- engines
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
        cmd = [sys.executable, __file__, "load", "--engines", str(engines), "--preset", args.preset, "--seed",
               str(args.seed), "--backend", args.backend]
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


def run_batch(args, save) -> dict:
    """Throughput of the pruned + cache path (or ``--paths``' first) at each batch size: one engine set
    per size, ``B`` requests of distinct images per batch (row 0's image is the same at every size, so
    its answer is compared with B = 1's). The engines load lazily: the first, untimed batch compiles
    the graphs the path runs (``first_batch_s``), not the others. ``--resume`` keeps the rows of an
    earlier run's JSON (an earlier device call) and measures the missing sizes."""
    from llada_export.exporter.build import export_engines

    path = args.paths[0]
    pruned, cache = PATHS[path]
    setting = {"image": "x".join(map(str, args.images[0])), "prune_layer": args.layers[0], "keep": args.keeps[0],
               "refresh": args.refresh, "factor": args.factor, "preset": args.presets[0]}
    res: dict = {"part": "batch", "backend": args.backend, "compiled": args.compile, "path": path, "rows": [],
                 "setting": setting}
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
        out = Path(args.workdir) / f"engines_b{b}"
        t0 = time.perf_counter()
        export_engines(export_opts(args, out, pruned, cache, batch_size=b, compile_cache=False),
                       loaded=(model, tok, cfg))
        export_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        pipe = load_engines(args, out, weights, warmup=False)
        load_s = time.perf_counter() - t0
        row = time_requests(pipe, request_images(*args.images[0], b), args, args.presets[0], pruned, cache)
        row.update(export_s=export_s, load_s=load_s, latency_s=row["seconds"])
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


def derive_batch(res: dict) -> dict:
    """Each row's tokens/s against B = 1's and whether its row 0 answered as B = 1 did (from the measured
    rows; also for a JSON that a device call's limit cut before the run's end)."""
    base = next((r for r in res["rows"] if r["batch_size"] == 1), None)
    for row in res["rows"]:
        row["speedup_vs_b1"] = row["tokens_per_s"] / base["tokens_per_s"] if base else None
        row["row0_same_as_b1"] = row["ids"][0] == base["ids"][0] if base else None
    return res


# ---------------------------------------------------------------------- reports
def markdown(res: dict, env: dict) -> str:
    lines = [f"# GPU benchmark ({res['part']})", "",
             f"Machine: {env['gpu']}, torch {env['torch']}, CUDA {env['cuda']}; measured bf16 matmul peak "
             f"{res['matmul_peak_tflops']:.0f} TFLOP/s. " + model_line(res), ""]
    if res["part"] == "grid":
        lines += ["Baseline = eager PyTorch reference (full sequence every step, SDPA, bf16); pruned = eager "
                  "LLaDA-FastV reference. `measured` = whole request timed; otherwise vision + stage A + "
                  "(steps-1) x stage B from timed parts.", "",
                  "| image | preset | K | keep | tokens (L -> L') | latency s | vision ms | stage A ms | stage B ms/step | "
                  "tok/s | TFLOPs | TFLOP/s | % peak | stage B % peak | peak GiB | measured |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in res["rows"]:
            lines.append(
                f"| {r['image']} | {r['preset']} | {r['prune_layer'] if r['prune_layer'] is not None else '-'} | "
                f"{r['keep']} | {r['length']} -> {r['reduced_length']} | {r['latency_s']:.3f} | {r['vision_ms']:.1f} | "
                f"{r['stage_a_ms']:.1f} | {r['stage_b_ms']:.1f} | {r['tokens_per_s']:.1f} | {r['tflops']:.1f} | "
                f"{r['tflop_per_s']:.0f} | {100 * r['share_of_peak']:.0f} | {100 * r['stage_b_share_of_peak']:.0f} | "
                f"{r['peak_gib']:.1f} | {'yes' if r['measured'] else 'composed'} |")
    elif res["part"] == "batch":
        lines += markdown_batch(res)
    elif res["part"] == "step":
        lines += markdown_profile(res["step_profile"])
    elif "weights" in res:  # engines per --weights variant
        lines += markdown_variants(res)
    elif res.get("format") == 2:
        lines += markdown_engines(res)
    else:
        lines += markdown_engines_v1(res)
    return "\n".join(lines) + "\n"


def model_line(res: dict) -> str:
    """What the weights were (reports before the ``model`` field: full size, bf16)."""
    m = res.get("model", {"preset": "full", "dtype": "bfloat16"})
    dims = "full LLaDA-V dimensions" if m["preset"] == "full" else f"the {m['preset']!r} preset's dimensions (a smoke run)"
    return f"Random {'bf16' if m['dtype'] == 'bfloat16' else m['dtype']} weights, {dims}."


def primary_setting(res: dict) -> dict:
    """The main setting's record (``run_engines``: the issue's target where measured)."""
    key = tuple(res["main"][k] for k in ("image", "prune_layer", "keep"))
    return next(st for st in res["settings"] if (st["image"], st["prune_layer"], st["keep"]) == key)


def main_rows(res: dict, st: dict, kind: str) -> dict:
    """{(preset, unpruned): row} of ``kind`` ("engines" / "eager") for setting ``st``: its pruned
    rows and the unpruned rows of its image."""
    return {(r["preset"], r["unpruned"]): r for r in res["rows"] if r["kind"] == kind and r["image"] == st["image"]
            and (r["unpruned"] or (r["prune_layer"], r["keep"]) == (st["prune_layer"], st["keep"]))}


def markdown_engines_v1(res: dict) -> list[str]:
    st = primary_setting(res)
    m, image = st["manifest"], st["image"]
    eng, eag = main_rows(res, st, "engines"), main_rows(res, st, "eager")
    presets = list(dict.fromkeys(r["preset"] for r in res["rows"]))
    pr, bk = m["pruning"], m["bucket"]
    lines = [f"Engines: {res['backend']} (torch.export programs compiled with Inductor, CUDA graphs), dtype {m['dtype']}, "
             f"fused sampler {m['fused_sampler']}. Main setting: image {image}, pruning at layer {pr['layer']}, keep "
             f"{pr['keep']} (k = {pr['k_static']}); bucket {bk['max_text_tokens']} text + {bk['max_visual_tokens']} "
             f"visual + {bk['gen_length']} response tokens. Eager = the PyTorch oracles with the same weights "
             "(unpruned: the official algorithm, full sequence every step, SDPA, bf16).", "",
             "## End to end (seconds per request)", "",
             "| preset | official (H100 anchor) | eager unpruned | eager pruned | engines unpruned | engines pruned | "
             "x official | x own unpruned engines |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    nan = float("nan")
    anchored = image == ANCHOR_IMAGE

    def vs_official(preset: str, seconds: float, img: str = image) -> str:
        return f"{OFFICIAL[preset] / seconds:.1f}" if img == ANCHOR_IMAGE else "n/a"

    if not anchored:
        lines[-2:-2] = [f"The official anchor was measured at {ANCHOR_IMAGE} only: its column is that figure, not "
                        f"a measurement at {image}, so no 'x official' ratio is given.", ""]
    for p in presets:
        ep, eu = eng.get((p, False)), eng.get((p, True))
        lines.append(f"| {p} | {OFFICIAL[p]:.2f}{'' if anchored else ' (' + ANCHOR_IMAGE + ')'} | "
                     f"{eag.get((p, True), {}).get('latency_s', nan):.3f} | "
                     f"{eag.get((p, False), {}).get('latency_s', nan):.3f} | {eu['latency_s']:.3f} | "
                     f"{ep['latency_s']:.3f} | {vs_official(p, ep['latency_s'])} | "
                     f"{eu['latency_s'] / ep['latency_s']:.2f} |")
    lines += ["", "## Engines per stage", "",
              "| preset | graph | steps | total s | vision ms | stage A ms | stage B ms/step | full ms/step | "
              "sampler overhead ms | tok/s | TFLOPs | TFLOP/s | % peak | peak GiB |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for (p, unpruned), r in eng.items():
        t = r["timings"]
        lines.append(f"| {p} | {'unpruned' if unpruned else 'pruned'} | {r['steps']} | {t['total']:.3f} | "
                     f"{t['vision'] * 1e3:.1f} | {t.get('stage_a', nan) * 1e3:.1f} | "
                     f"{t.get('stage_b_per_step', nan) * 1e3:.2f} | {t.get('full_per_step', nan) * 1e3:.2f} | "
                     f"{t['sampler_overhead'] * 1e3:.1f} | {r['tokens_per_s']:.1f} | {r['tflops']:.1f} | "
                     f"{r['tflop_per_s']:.0f} | {100 * r['share_of_peak']:.0f} | {r['peak_gib']:.1f} |")
    lines += ["", "## Each LM graph alone (CUDA events, median of 20)", "",
              "| graph | CUDA graph ms | without CUDA graph ms | TFLOP | % of measured peak |", "| --- | --- | --- | --- | --- |"]
    for name, g in st.get("graphs", {}).items():
        lines.append(f"| {name} | {g.get('cuda_graph_ms', g.get('ms', nan)):.2f} | {g.get('no_cuda_graph_ms', nan):.2f} | "
                     f"{g['tflops']:.2f} | {100 * g['share_of_peak']:.0f} |")
    d_p, d_u = eng.get(("demo", False)), eng.get(("demo", True))
    target_setting = all(st[k] == v for k, v in TARGET.items())
    if d_p and d_u:
        checks = []
        if anchored:
            checks.append(("demo >= 5x official", OFFICIAL["demo"] / d_p["latency_s"], 5.0))
            for p, target in (("chartqa", 4.0), ("mc", 2.0)):
                if (p, False) in eng:
                    checks.append((f"{p} >= {target:.0f}x official", OFFICIAL[p] / eng[(p, False)]["latency_s"], target))
        checks += [("demo pruned >= 2.5x own unpruned engines", d_u["latency_s"] / d_p["latency_s"], 2.5),
                   ("demo FLOPs reduction >= 60%", 1 - d_p["tflops"] / d_u["tflops"], 0.60)]
        if "stage_b" in st.get("graphs", {}):
            checks.append(("stage B >= 70% of measured bf16 peak", st["graphs"]["stage_b"]["share_of_peak"], 0.70))
        lines += ["", "## Targets (issue 7)", ""]
        if not target_setting:
            lines += [f"The targets are set for {TARGET['image']}, K {TARGET['prune_layer']}, keep {TARGET['keep']}; "
                      f"this run's main setting is {image}, "
                      f"K {st['prune_layer']}, keep {st['keep']}, so the rows below are for reference, not the "
                      f"target check.", ""]
        lines += ["| target | measured | met |", "| --- | --- | --- |"]
        lines += [f"| {n} | {v:.2f} | {'yes' if v >= t else 'NO'} |" for n, v, t in checks]
    if len(res["settings"]) > 1:
        unp = {(r["image"], r["preset"]): r for r in res["rows"] if r["kind"] == "engines" and r["unpruned"]}
        lines += ["", "## Grid: pruned engines per setting", "",
                  "| image | K | keep | preset | latency s | stage A ms | stage B ms/step | TFLOPs | % peak | "
                  "x official | x unpruned engines |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in res["rows"]:
            if r["kind"] != "engines" or r["unpruned"]:
                continue
            u = unp.get((r["image"], r["preset"]), {}).get("latency_s", nan)
            lines.append(f"| {r['image']} | {r['prune_layer']} | {r['keep']} | {r['preset']} | {r['latency_s']:.3f} | "
                         f"{r['timings']['stage_a'] * 1e3:.1f} | {r['timings']['stage_b_per_step'] * 1e3:.2f} | "
                         f"{r['tflops']:.1f} | {100 * r['share_of_peak']:.0f} | "
                         f"{vs_official(r['preset'], r['latency_s'], r['image'])} | {u / r['latency_s']:.2f} |")
    lines += [""] + [f"Setting {x['image']} K {x['prune_layer']} keep {x['keep']}: in-process export (trace, FX pass, "
                     f"archives written) {x['export']['seconds']:.1f} s, peak GPU {x['export']['peak_gpu_gib']:.1f} GiB; "
                     f"load + compile + warm-up {x['load_and_compile_s']:.1f} s." for x in res["settings"]]
    return lines


def plot(res: dict, path: Path) -> None:
    if res["part"] == "step":
        return plot_profile(res["step_profile"], path)
    if res["part"] == "engines" and "weights" in res:
        return plot_engines(res, path)
    if res["part"] == "engines":
        return plot_engines(res, path) if res.get("format") == 2 else plot_engines_v1(res, path)
    if res["part"] == "batch":
        return plot_batch(res, path)
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for image in sorted({r["image"] for r in res["rows"]}):
        for preset in ("demo", "chartqa"):
            pts = [(r["tflops"], r["latency_s"], r) for r in res["rows"] if r["image"] == image and r["preset"] == preset
                   and r["prune_layer"] in (None, 16)]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"{image} {preset} (K=16)")
                for x, y, r in pts:
                    ax.annotate("full" if r["prune_layer"] is None else f"{r['keep']}", (x, y), fontsize=7)
    ax.set_xlabel("TFLOPs per request")
    ax.set_ylabel("latency (s)")
    ax.set_title("LLaDA-V full size, eager bf16 on one GPU: latency vs FLOPs")
    ax.legend(fontsize=7)
    save(fig, path)


def plot_engines_v1(res: dict, path: Path) -> None:
    plt = pyplot()

    st = primary_setting(res)
    presets = list(dict.fromkeys(r["preset"] for r in res["rows"]))
    series = [("official (H100 anchor)", lambda p: OFFICIAL[p])] if st["image"] == ANCHOR_IMAGE else []
    for kind, unpruned, label in (("eager", True, "eager unpruned"), ("eager", False, "eager pruned"),
                                  ("engines", True, "engines unpruned"), ("engines", False, "engines pruned")):
        vals = {p: r["latency_s"] for (p, u), r in main_rows(res, st, kind).items() if u == unpruned}
        if vals:
            series.append((label, lambda p, v=vals: v.get(p, float("nan"))))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    width = 0.8 / len(series)
    for i, (label, fn) in enumerate(series):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(presets))]
        ax.bar(xs, [fn(p) for p in presets], width, label=label)
    ax.set_xticks(range(len(presets)), presets)
    ax.set_yscale("log")
    ax.set_ylabel("seconds per request (log)")
    ax.set_title(f"LLaDA-V full size, {res['env']['gpu']}: K {st['prune_layer']}, keep {st['keep']}, {st['image']}")
    ax.legend(fontsize=7)
    save(fig, path)




# ---------------------------------------------------------------------- reports (format 2)
def _official(res: dict, mode: str, preset: str) -> float | None:
    o = res.get("official", {}).get("presets", {}).get(mode, {}).get(preset)
    return None if o is None else o["median_s"]


def markdown_engines(res: dict) -> list[str]:
    st, nan = res["setting"], float("nan")
    rows = {(r["preset"], r["path"]): r for r in res["rows"]}
    presets = list(dict.fromkeys(r["preset"] for r in res["rows"]))
    paths = list(dict.fromkeys(r["path"] for r in res["rows"]))
    has_official = "official" in res
    lines = [f"Engines: {res['backend']} (torch.export programs compiled with Inductor, CUDA graphs), bf16, fused "
             f"sampler; image {st['image']}, pruning at layer {st['prune_layer']}, keep {st['keep']}; bucket "
             f"{st['max_prompt_tokens']} text + the image's visual tokens + {st['gen_length']} response slots. "
             f"Exact = the official schedule (one token per step, every step a full forward); +cache = the "
             f"prefix KV cache refreshed every {st['refresh']} forwards and at block starts, with factor "
             f"{st['factor']} parallel decoding (the official demo's Fast-dLLM setting).", ""]
    if has_official:
        v = res["official"].get("versions", {})
        lines += [f"Official columns: `tools/official_gpu.py` in the same device session "
                  f"(transformers {v.get('transformers')}, {v.get('gpu')}); fast_dllm = the official repo's "
                  "Fast-dLLM hook as its generate_demo.py registers it (refresh 32, threshold 1)."
                  + (f" Source: {res['official_source']}." if res.get("official_source") else ""), ""]
    head = (["official vanilla", "official + Fast-dLLM"] if has_official else []) + paths
    lines += ["## End to end (seconds per request)", "", "| preset | " + " | ".join(head) + " |",
              "| --- | " + " | ".join("---" for _ in head) + " |"]
    for p in presets:
        cells = ([f"{_official(res, 'vanilla', p) or nan:.3f}", f"{_official(res, 'fast_dllm', p) or nan:.3f}"]
                 if has_official else [])
        cells += [f"{rows[(p, path)]['seconds']:.3f}" if (p, path) in rows else "-" for path in paths]
        lines.append(f"| {p} | " + " | ".join(cells) + " |")
    if has_official:
        lines += ["", "## Ratios (official seconds / ours, same session)", "",
                  "| preset | path | x official vanilla | x official + Fast-dLLM | forwards (ours) | "
                  "forwards (official Fast-dLLM) |", "| --- | --- | --- | --- | --- | --- |"]
        for (p, path), r in rows.items():
            van, fast = _official(res, "vanilla", p), _official(res, "fast_dllm", p)
            of = res["official"]["presets"].get("fast_dllm", {}).get(p, {}).get("forwards", "-")
            lines.append(f"| {p} | {path} | {van / r['seconds'] if van else nan:.2f} | "
                         f"{fast / r['seconds'] if fast else nan:.2f} | {r['forwards']} | {of} |")
    lines += ["", "## Per path and preset", "",
              "| preset | path | forwards | graph calls | vision ms | per call ms | sampler overhead ms | tok/s | "
              "TFLOPs | TFLOP/s | peak GiB |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for (p, path), r in rows.items():
        t = r["timings"]
        calls = ", ".join(f"{k} {v}" for k, v in r["graph_calls"].items())
        per = ", ".join(f"{k[:-9]} {t[k] * 1e3:.2f}" for k in t if k.endswith("_per_call"))
        lines.append(f"| {p} | {path} | {r['forwards']} | {calls} | {t['vision'] * 1e3:.1f} | {per} | "
                     f"{t['sampler_overhead'] * 1e3:.1f} | {r['tokens_per_s']:.1f} | {r['tflops']:.1f} | "
                     f"{r['tflop_per_s']:.0f} | {r['peak_gib']:.1f} |")
    lines += ["", "## Each LM graph alone (CUDA graph, CUDA events, median of 20)", "",
              "| graph | sequence | ms | TFLOP | % of measured peak |", "| --- | --- | --- | --- | --- |"]
    for name, g in res["graphs"].items():
        lines.append(f"| {name} | {g['sequence']} | {g['ms']:.2f} | {g['tflop']:.2f} | {100 * g['share_of_peak']:.0f} |")
    if fl := res.get("weight_floor"):
        lines += ["", f"Weight-read floor, measured in this run ({fl['method']}): {fl['gb']:.2f} GB of linear weights "
                  f"(the layers' and the LM head's, {fl['tensors']} tensors) in {fl['ms']:.2f} ms, "
                  f"{fl['tb_per_s']:.2f} TB/s. Cached step / floor: " + (", ".join(
                      f"{n} {g['ms']:.2f} ms = {g['vs_floor']:.2f}x" for n, g in res["graphs"].items()
                      if "vs_floor" in g) or "no cached graph timed") + "."]
    lines += ["", "## Export and load", ""]
    for group, info in res["groups"].items():
        wl = info.get("warm_load", {})
        lines.append(f"- {group}: in-process export {info['export_s']:.1f} s (peak GPU {info['export_peak_gpu_gib']:.1f} "
                     f"GiB; {'; '.join(info.get('notes', [])) or 'no notes'}); load in the exporting process "
                     f"{info['load_in_process_s']:.1f} s; " + (
                         f"warm load in a fresh process from the saved compile cache {wl['seconds']:.1f} s "
                         f"({wl['compile_cache']}, {wl['fxgraph_cache_hit']} Inductor cache hits, "
                         f"{wl['fxgraph_cache_miss']} misses)" if "seconds" in wl else
                         f"warm load not measured ({wl.get('error', 'off')[-300:]})"))
    lines += markdown_targets(res, rows)
    return lines


def markdown_targets(res: dict, rows: dict) -> list[str]:
    """Issue 13's targets, where this run measured what they need."""
    checks = []
    demo, chart = rows.get(("demo", "pruned+cache")), rows.get(("chartqa", "pruned+cache"))
    van = {p: _official(res, "vanilla", p) for p in ("demo", "chartqa")}
    fast = {p: _official(res, "fast_dllm", p) for p in ("demo", "chartqa")}
    if demo:
        checks.append(("demo pruned + cache <= 1.2 s", demo["seconds"], 1.2, "<="))
        if van["demo"]:
            checks += [("demo >= 18x official vanilla", van["demo"] / demo["seconds"], 18, ">="),
                       ("demo >= 4.8x official Fast-dLLM", fast["demo"] / demo["seconds"], 4.8, ">=")]
        if ("demo", "unpruned+cache") in rows:
            checks.append(("demo pruned + cache >= 1.5x unpruned + cache",
                           rows[("demo", "unpruned+cache")]["seconds"] / demo["seconds"], 1.5, ">="))
    if chart:
        checks.append(("chartqa pruned + cache <= 0.30 s", chart["seconds"], 0.30, "<="))
        if van["chartqa"]:
            checks += [("chartqa >= 10x official vanilla", van["chartqa"] / chart["seconds"], 10, ">="),
                       ("chartqa >= 2.6x official Fast-dLLM", fast["chartqa"] / chart["seconds"], 2.6, ">=")]
    if "cached" in res["graphs"]:
        checks.append(("cached step, pruned prefix <= 7.5 ms", res["graphs"]["cached"]["ms"], 7.5, "<="))
        if "vs_floor" in res["graphs"]["cached"]:
            checks.append(("cached step <= 1.25x the weight-read floor (issue 22)", res["graphs"]["cached"]["vs_floor"],
                           1.25, "<="))
    wl = res["groups"].get("pruned", {}).get("warm_load", {})
    if "seconds" in wl:
        checks.append(("warm Pipeline.load <= 20 s", wl["seconds"], 20, "<="))
    if not checks:
        return []
    lines = ["", "## Targets (issue 13)", "", "| target | measured | met |", "| --- | --- | --- |"]
    for name, v, t, op in checks:
        ok = v <= t if op == "<=" else v >= t
        lines.append(f"| {name} | {v:.3f} | {'yes' if ok else 'NO'} |")
    return lines


def plot_engines(res: dict, path: Path) -> None:
    plt = pyplot()

    presets = list(dict.fromkeys(r["preset"] for r in res["rows"]))
    series = []
    if "official" in res:
        for mode, label in (("vanilla", "official vanilla"), ("fast_dllm", "official + Fast-dLLM")):
            series.append((label, [_official(res, mode, p) or float("nan") for p in presets]))
    key = (lambda r: f"{r['path']} {r['weights']}") if "weights" in res else (lambda r: r["path"])  # a bar per variant
    for name in dict.fromkeys(map(key, res["rows"])):
        vals = {r["preset"]: r["seconds"] for r in res["rows"] if key(r) == name}
        series.append((f"ours: {name}", [vals.get(p, float("nan")) for p in presets]))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    width = 0.8 / len(series)
    for i, (label, vals) in enumerate(series):
        ax.bar([j + (i - (len(series) - 1) / 2) * width for j in range(len(presets))], vals, width, label=label)
    ax.set_xticks(range(len(presets)), presets)
    ax.set_yscale("log")
    ax.set_ylabel("seconds per request (log)")
    st = res["setting"]
    ax.set_title(f"LLaDA-V full size, {res['env']['gpu']}: K {st['prune_layer']}, keep {st['keep']}, {st['image']}")
    ax.legend(fontsize=7)
    save(fig, path)


# ---------------------------------------------------------------------- reports (engines per --weights variant)
def markdown_variants(res: dict) -> list[str]:
    """A column per weights variant: end to end per preset and path, each graph alone, the floors and each
    cached step's ratio to its floor; the targets on the native rows; the step profile if measured."""
    st, nan, ws = res["setting"], float("nan"), res["weights"]
    rows = {(r["preset"], r["path"], r["weights"]): r for r in res["rows"]}

    def kind(w: str) -> str:
        fp8 = WEIGHTS.get(w)
        return f"e4m3 linears, {fp8['activations']} activation scales" if fp8 else res.get("model", {}).get("dtype", "?")

    presets = list(dict.fromkeys(r["preset"] for r in res["rows"]))
    paths = list(dict.fromkeys(r["path"] for r in res["rows"]))
    lines = [f"Engines: {res['backend']}, fused sampler, random weights; image {st['image']}, pruning at layer "
             f"{st['prune_layer']}, keep {st['keep']}; +cache = refresh {st['refresh']}, factor {st['factor']}. "
             "Weights variants (one set of random weights, exported once per variant, measured back to back): "
             + ", ".join(f"{w} ({kind(w)})" for w in ws) + ".", ""]
    if "earlier" in res:
        e = res["earlier"]["env"]
        lines += [f"Groups {', '.join(res['earlier']['groups'])} were measured in an earlier device call "
                  f"({e['gpu']}, host {e['host']}, {e['date']}); the others on host {res['env']['host']}.", ""]
    if missing := [w for w in ws if not any(g.endswith(f"/{w}") for g in res["groups"])]:
        lines += [f"Not measured: weights {', '.join(missing)} (no complete group: the run ended before it, e.g. at "
                  "a device call's time limit; `--resume` with this JSON measures the rest).", ""]
    has_official = "official" in res
    head = (["official vanilla", "official + Fast-dLLM"] if has_official else []) + [
        f"{path} {w}" for path in paths for w in ws]
    lines += ["## End to end (seconds per request)", "", "| preset | " + " | ".join(head) + " |",
              "| --- | " + " | ".join("---" for _ in head) + " |"]
    for p in presets:
        cells = ([f"{_official(res, 'vanilla', p) or nan:.3f}", f"{_official(res, 'fast_dllm', p) or nan:.3f}"]
                 if has_official else [])
        cells += [f"{rows[(p, path, w)]['seconds']:.3f}" if (p, path, w) in rows else "-" for path in paths for w in ws]
        lines.append(f"| {p} | " + " | ".join(cells) + " |")
    lines += ["", "## Per path, preset and weights", "",
              "| preset | path | weights | forwards | per call ms | sampler overhead ms | tok/s | peak GiB |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for (p, path, w), r in rows.items():
        t = r["timings"]
        per = ", ".join(f"{k[:-9]} {t[k] * 1e3:.2f}" for k in t if k.endswith("_per_call"))
        lines.append(f"| {p} | {path} | {w} | {r['forwards']} | {per} | {t['sampler_overhead'] * 1e3:.1f} | "
                     f"{r['tokens_per_s']:.1f} | {r['peak_gib']:.1f} |")
    names = list(dict.fromkeys(n for w in ws for n in res["graphs"].get(w, {})))
    lines += ["", f"## Each LM graph alone (CUDA graph, CUDA events, median of {res.get('graph_repeat', 20)}): ms "
              "(x the weight-read floor)", "",
              "| graph | sequence | " + " | ".join(ws) + " |", "| --- | --- | " + " | ".join("---" for _ in ws) + " |"]
    for n in names:
        gs = [res["graphs"].get(w, {}).get(n) for w in ws]
        seq = next(g["sequence"] for g in gs if g)
        lines.append(f"| {n} | {seq} | " + " | ".join(
            "-" if g is None else f"{g['ms']:.2f}" + (f" ({g['vs_floor']:.2f}x)" if "vs_floor" in g else "")
            for g in gs) + " |")
    lines += ["", "Weight-read floor per variant, measured in this run (`tools/weight_floor.py`: the layers' linear "
              "weights, 1 byte each for fp8, and the unquantized LM head, each read once):", ""]
    lines += [f"- {w}: {fl['gb']:.2f} GB in {fl['ms']:.2f} ms ({fl['tb_per_s']:.2f} TB/s; {fl['method']})"
              for w, fl in res["weight_floor"].items()]
    lines += ["", "## Export and load", ""]
    for group, info in res["groups"].items():
        wl = info.get("warm_load", {})
        lines.append(f"- {group}: export {info['export_s']:.1f} s (peak GPU {info['export_peak_gpu_gib']:.1f} GiB); "
                     f"load in the exporting process {info['load_in_process_s']:.1f} s" +
                     (f"; load in a fresh process {wl['cold']['seconds']:.1f} s cold (empty Inductor and Triton caches), "
                      f"{wl['seconds']:.1f} s warm (kernels {wl.get('precompiled', '?')})" if "cold" in wl else
                      f"; warm load in a fresh process {wl['seconds']:.1f} s" if "seconds" in wl else ""))
    lines += markdown_variant_targets(res, rows)
    if "step_profile" in res:
        seq = {g["sequence"] - st["gen_length"]: g["ms"] for g in (res["graphs"].get("native", {}).get(n)
                                                                   for n in ("cached", "unpruned_cached")) if g}
        lines += markdown_profile(res["step_profile"], seq)
    return lines


def markdown_variant_targets(res: dict, rows: dict) -> list[str]:
    """Issue 22's targets where this run measured them (bf16 = native, FP8 = the best fp8 variant)."""
    checks = []
    for w in res["weights"]:
        fp8 = w != "native"
        g = res["graphs"].get(w, {}).get("cached")
        if g and not fp8:
            checks.append(("cached step, pruned, bf16 <= 1.25x the floor", g.get("vs_floor", float("nan")), 1.25, w, "<="))
        if g and fp8:
            checks.append(("cached step, pruned, FP8 <= 4.0 ms", g["ms"], 4.0, w, "<="))
        for preset, bf16, f8 in (("demo", 1.0, 0.8), ("chartqa", 0.22, 0.18)):
            r = rows.get((preset, "pruned+cache", w))
            if r:
                checks.append((f"{preset} pruned + cache <= {f8 if fp8 else bf16} s", r["seconds"], f8 if fp8 else bf16, w, "<="))
        d, u = rows.get(("demo", "pruned+cache", w)), rows.get(("demo", "unpruned+cache", w))
        if d and u:
            checks.append(("demo pruned + cache >= 1.5x unpruned + cache", u["seconds"] / d["seconds"], 1.5, w, ">="))
        hook, vanilla = _official(res, "fast_dllm", "demo"), _official(res, "vanilla", "demo")
        if d and hook:
            checks.append((f"demo pruned + cache >= {7.5 if fp8 else 6.0}x the official Fast-dLLM hook",
                           hook / d["seconds"], 7.5 if fp8 else 6.0, w, ">="))
        if d and vanilla and not fp8:
            checks.append(("demo pruned + cache >= 23x official vanilla", vanilla / d["seconds"], 23.0, w, ">="))
    wl = res["groups"].get("pruned/native", {}).get("warm_load", {})
    if "seconds" in wl:
        checks.append(("warm Pipeline.load (fresh process) <= 20 s", wl["seconds"], 20.0, "native", "<="))
    if not checks:
        return []
    lines = ["", "## Targets (issue 22)", "", "| target | weights | measured | met |", "| --- | --- | --- | --- |"]
    for name, v, t, w, op in checks:
        lines.append(f"| {name} | {w} | {v:.3f} | {'yes' if (v <= t if op == '<=' else v >= t) else 'NO'} |")
    return lines


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


def markdown_batch(res: dict) -> list[str]:
    res = derive_batch(res)
    st = res["setting"]
    lines = [f"Path {res['path']} ({'compiled' if res['compiled'] else 'eager kernels'} in CUDA graphs, "
             f"{res['backend']} backend), preset {st['preset']}, image {st['image']}, K {st['prune_layer']}, keep "
             f"{st['keep']}, refresh {st['refresh']}, factor {st['factor']}; one engine set per batch size, a batch of "
             "B requests of distinct images; throughput counts every request's response slots. Seconds: median of "
             "the timed batches after one untimed (which compiles the graphs: `first batch s`).", ""]
    if "earlier" in res:
        e = res["earlier"]["env"]
        lines += [f"Batch sizes {res['earlier']['batch_sizes']} were measured in an earlier device call of the same "
                  f"session ({e['gpu']}, host {e['host']}, {e['date']}); the others on host {res['env']['host']}.", ""]
    lines += ["| batch size | seconds per batch (= latency per request) | tokens/s | x B=1 | forwards | per call ms | "
              "sampler overhead ms | first batch s | peak GiB | row 0 = B=1's answer |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    for r in res["rows"]:
        t = r["timings"]
        per = ", ".join(f"{k[:-9]} {t[k] * 1e3:.2f}" for k in t if k.endswith("_per_call"))
        same = {None: "-", True: "yes", False: "no"}[r.get("row0_same_as_b1")]
        lines.append(f"| {r['batch_size']} | {r['seconds']:.3f} | {r['tokens_per_s']:.1f} | "
                     f"{fmt(r.get('speedup_vs_b1'), '.2f')} | {r['forwards']} | {per} | "
                     f"{t.get('sampler_overhead', float('nan')) * 1e3:.1f} | {fmt(r.get('first_batch_s'), '.1f')} | "
                     f"{r['peak_gib']:.1f} | {same} |")
    b8 = next((r for r in res["rows"] if r["batch_size"] == 8 and r.get("speedup_vs_b1")), None)
    if b8:
        lines += ["", f"Target (issue 23; issue 14 asked 1.6x): B = 8 at >= 2.2x the tokens/s of B = 1: measured "
                  f"{b8['speedup_vs_b1']:.2f}x ({'met' if b8['speedup_vs_b1'] >= 2.2 else 'NOT met'})."]
    if (m := res.get("multi")) and m.get("vs_b1_engines"):
        lines += ["", f"A lone request on one directory of batch sizes {m['batch_sizes']} (it ran on batch size "
                  f"{m['engine_batch_size']}): {m['seconds']:.3f} s, {m['vs_b1_engines']:.3f}x the batch-1 engines' "
                  f"latency (target within 10%: {'met' if m['vs_b1_engines'] <= 1.1 else 'NOT met'}); same answer as "
                  f"B = 1: {'yes' if m['same_answer_as_b1'] else 'no'}."]
    return lines


def plot_batch(res: dict, path: Path) -> None:
    plt = pyplot()

    b = [r["batch_size"] for r in res["rows"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(b, [r["tokens_per_s"] for r in res["rows"]], "o-", label="tokens/s")
    ax.set_xlabel("batch size")
    ax.set_ylabel("tokens/s")
    ax2 = ax.twinx()
    ax2.plot(b, [r["seconds"] for r in res["rows"]], "s--", color="tab:red", label="latency per request (s)")
    ax2.set_ylabel("latency per request (s)")
    ax.set_title(f"{res['path']} throughput vs batch size, {res['env']['gpu']}", fontsize=9)
    (h1, l1), (h2, l2) = ax.get_legend_handles_labels(), ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="center right")
    save(fig, path)


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
    p.add_argument("--resume", help="batch: an earlier run's bench_gpu_batch.json; its batch sizes are kept, not rerun; "
                                    "engines: an earlier --weights run's JSON; its (group, weights) pairs are kept")
    p.add_argument("--weights", default="native",
                   help=f"engines: weights variants measured one after another ({', '.join(WEIGHTS)}; fp8 = fp8-row; "
                        "default: native)")
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
    env = {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
           "torch": torch.__version__, "cuda": torch.version.cuda, "host": platform.node(),
           "date": time.strftime("%Y-%m-%d")}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def save(res: dict) -> None:  # also called part-way, so a run cut short keeps what it measured
        res["env"] = env
        res["model"] = {"preset": args.preset, "dtype": "bfloat16" if DEVICE == "cuda" else "float32"}
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
