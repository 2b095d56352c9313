"""GPU benchmark: full-size LLaDA-V (random bf16 weights) on one GPU, unpruned vs LLaDA-FastV.

Two parts, each fits one device call:

``grid``   the eager PyTorch reference that mirrors the official implementation (full sequence
           every step, SDPA, bf16) against the eager pruned model, over keep x prune layer x
           image size x preset; per setting: end-to-end latency, vision / stage A / stage B
           per step, tokens/s, analytic FLOPs, FLOP/s and share of the measured bf16 matmul
           peak, peak GPU memory. The model is built on the GPU directly (no checkpoint).
``engines`` random full-size weights built on the GPU, ``export_engines`` in-process (one bucket:
           first image size, first prune layer and keep; fused sampler; unpruned baseline graph),
           the ``Pipeline`` (``--backend``, default inductor: compiled at load, CUDA graphs),
           per preset the pruned and the unpruned engines, each LM graph alone with and
           without its CUDA graph, and the eager baseline with the same weights, in one run.

Writes ``<out>/bench_gpu_<part>.json`` and ``.md`` (and a PNG for the grid).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

# Official LLaDA-V on the H100, 1024x768, random bf16 weights (issue 7's anchor).
ANCHOR_IMAGE = "1024x768"  # the only image size the anchor was measured at
TARGET = {"image": ANCHOR_IMAGE, "prune_layer": 16, "keep": 0.35}  # the setting issue 7's targets are for
OFFICIAL = {"forward_3815_ms": 196.0, "mc": 0.42, "chartqa": 3.25, "demo": 26.5, "vision_7_crops_ms": 40.0,
            "peak_gib": 28.7}


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: smoke runs with the tiny preset


def reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")


def timed(fn, repeat=3, warmup=1):
    for _ in range(warmup):
        fn()
    sync()
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def matmul_peak(n=8192, dtype=torch.bfloat16) -> float:
    if not torch.cuda.is_available():
        n, dtype = 1024, torch.float32  # CPU smoke runs
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    a, b = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
    t = timed(lambda: a @ b, repeat=10, warmup=3)
    return 2 * n**3 / t


# ---------------------------------------------------------------------- analytic FLOPs
def lm_flops(cfg, length: int, layers: int, logits_rows: int = 0) -> float:
    """Multiply-adds x2 of `layers` decoder layers over `length` tokens (+ lm_head rows)."""
    t = cfg.text
    d, i = t.hidden_size, t.intermediate_size
    per_layer = 2 * length * (4 * d * d + 3 * d * i) + 4 * length * length * d
    return layers * per_layer + 2 * logits_rows * d * t.vocab_size


def vision_flops(cfg, crops: int) -> float:
    v = cfg.vision
    n, c, i, layers = v.tokens_per_crop, v.hidden_size, v.intermediate_size, v.num_hidden_layers - 1
    tower = layers * (2 * n * (4 * c * c + 2 * c * i) + 4 * n * n * c) + 2 * n * 3 * v.patch_size**2 * c
    proj = 2 * n * (c * cfg.text.hidden_size + cfg.text.hidden_size**2)
    return crops * (tower + proj)


def request_flops(cfg, prefix: int, n_vis: int, gen, layer: int | None, keep: float, crops: int) -> dict:
    from llada_export.graphs.pruning import num_kept

    g, n_layers = gen.gen_length, cfg.text.num_hidden_layers
    length = prefix + g
    if layer is None:
        step1 = rest = lm_flops(cfg, length, n_layers, g)
        red = length
    else:
        red = length - n_vis + num_kept(keep, n_vis)
        step1 = lm_flops(cfg, length, layer, 0) + lm_flops(cfg, red, n_layers - layer, g) + 4 * g * length * cfg.text.hidden_size
        rest = lm_flops(cfg, red, n_layers, g)
    total = vision_flops(cfg, crops) + step1 + (gen.steps - 1) * rest
    return {"total": total, "stage_a": step1, "stage_b": rest, "reduced_length": red, "length": length}


# ---------------------------------------------------------------------- grid (eager)
def random_model(preset: str, device: str):
    from llada_export.config import PRESETS
    from llada_export.graphs.llava import LLaDAV
    from llada_export.tokenizer import build_tokenizer

    cfg = PRESETS[preset]()
    tok = build_tokenizer("full" if preset == "full" else "tiny")
    cfg.text.vocab_size = cfg.text.vocab_size or len(tok)
    torch.set_default_dtype(torch.bfloat16 if device == "cuda" else torch.float32)
    with torch.device(device):
        model = LLaDAV(cfg)
    torch.set_default_dtype(torch.float32)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            elif p.dim() == 1:
                p.zero_() if "newline" not in name else p.normal_(0, 0.02, generator=gen)
            else:
                p.normal_(0, 0.02, generator=gen)
    return model.eval().requires_grad_(False), cfg, tok


def run_grid(args) -> dict:
    from llada_export.reference import (PrunedReferenceDenoiser, PruneSettings, ReferenceDenoiser, build_prompt,
                                        pruned_forward)
    from llada_export.graphs.anyres import grid_shape
    from llada_export.graphs.pruning import num_kept
    from llada_export.runtime.sampler import PRESETS, SamplerTrace, generate
    from llada_export.tokenizer import SpecialTokens

    t0 = time.perf_counter()
    peak = matmul_peak()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model, cfg, tok = random_model(args.preset, dev)
    sp = SpecialTokens.from_tokenizer(tok)
    setup_s = time.perf_counter() - t0
    rows, prompts = [], {}
    rng = np.random.default_rng(0)
    for size in args.images:
        w, h = size
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        cols, rws = grid_shape((w, h), cfg)
        crops = 1 + cols * rws
        pi = build_prompt(model, tok, img, args.prompt, system=args.system)
        from llada_export.graphs.anyres import preprocess

        pixels = preprocess(img, cfg)[0].to(dev)
        t_vis = timed(lambda: model.encode_images(pixels), repeat=5)
        prompts[size] = (pi, t_vis, crops)

    def run(pi, gen, prune):
        den = ReferenceDenoiser(model, pi, sp.mask) if prune is None else PrunedReferenceDenoiser(model, pi, prune, sp.mask)
        trace = SamplerTrace()
        if dev == "cuda":
            torch.cuda.reset_peak_memory_stats()
        sync()
        t = time.perf_counter()
        generate(den, gen, mask_id=sp.mask, eot_id=sp.eot, suppress_ids=sp.suppressed(), trace=trace,
                 device=dev, generator=torch.Generator(device=dev).manual_seed(0))
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
                    t_a = t_b = timed(lambda: model.denoise(pi.embeds, resp, pos))
                    red = p + g
                else:
                    k = num_kept(keep, nv)
                    vmask = torch.cat([pi.visual_mask, torch.zeros(1, g, dtype=torch.bool, device=dev)], 1)
                    st = PruneSettings(layer, keep)
                    t_a = timed(lambda: pruned_forward(model, pi.embeds, resp, pos, torch.ones_like(vmask), vmask,
                                                       torch.tensor([k], device=dev), st, k, sp.mask))
                    red = p + g - nv + k
                    red_prefix = pi.embeds[:, : red - g]
                    t_b = timed(lambda: model.denoise(red_prefix, resp, torch.arange(red, device=dev)[None]))
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
def eager_request(model, tok, img, prompt: str, system: str, gen, prune) -> dict:
    """One request through the eager oracle (unpruned: the official algorithm; or LLaDA-FastV),
    vision included; seconds, forwards, peak GPU memory."""
    from llada_export.reference import PrunedReferenceDenoiser, ReferenceDenoiser, build_prompt
    from llada_export.runtime.sampler import SamplerTrace, generate
    from llada_export.tokenizer import SpecialTokens

    sp = SpecialTokens.from_tokenizer(tok)
    dev = model.lm_head.weight.device
    reset_peak()
    sync()
    t0 = time.perf_counter()
    pi = build_prompt(model, tok, img, prompt, system=system)
    sync()
    t_vis = time.perf_counter() - t0
    den = ReferenceDenoiser(model, pi, sp.mask) if prune is None else PrunedReferenceDenoiser(model, pi, prune, sp.mask)
    trace = SamplerTrace()
    generate(den, gen, mask_id=sp.mask, eot_id=sp.eot, suppress_ids=sp.suppressed(), trace=trace, device=dev,
             generator=torch.Generator(device=dev).manual_seed(0))
    sync()
    return {"latency_s": time.perf_counter() - t0, "vision_and_prompt_s": t_vis, "forwards": trace.forwards,
            "peak_gib": peak_gib(), "visual_tokens": pi.n_visual,
            "text_tokens": pi.length - pi.n_visual}


def graph_ms(runner, feeds: dict, repeat: int = 20) -> dict:
    """A graph alone, CUDA events: replayed from its CUDA graph, and (if it has one) the
    compiled function it was captured from, called directly."""
    from llada_export.engines.runners import CudaGraphCall

    args = [feeds[k] for k in runner.inputs]
    call = runner.call
    graphed = isinstance(call, CudaGraphCall)
    out = {"cuda_graph_ms" if graphed else "ms": median_event_ms(lambda: call(*args), repeat)}
    if graphed:
        out["no_cuda_graph_ms"] = median_event_ms(lambda: call.fn(*args), repeat)
    return out


def median_event_ms(fn, repeat: int) -> float:
    from gpu_probe import bench

    if not torch.cuda.is_available():
        return 1e3 * timed(fn, repeat=repeat, warmup=1)
    return 1e3 * bench(fn, repeat=repeat)


def run_engines(args, save=lambda res: None) -> dict:
    """Random full-size bf16 weights on the GPU -> per image size and pruning setting (keep x
    prune layer): export_engines in-process (no checkpoint on disk: the weights are handed to
    the pipeline) -> Pipeline (compile + warm-up; Inductor's cache reuses a graph already
    compiled in this process, e.g. the vision and unpruned graphs, or stage B for another
    layer) -> per preset the pruned engines (and, once per image, the unpruned ones) and each
    LM graph alone; then per image the eager baseline with the same weights."""
    from llada_export.reference import PruneSettings
    from llada_export.runtime.sampler import PRESETS

    rows: list[dict] = []
    # the main setting: the target setting where the lists hold it
    tags = ["x".join(map(str, wh)) for wh in args.images]
    main = {"image": TARGET["image"] if TARGET["image"] in tags else tags[0],
            "prune_layer": TARGET["prune_layer"] if TARGET["prune_layer"] in args.layers else args.layers[0],
            "keep": TARGET["keep"] if TARGET["keep"] in args.keeps else args.keeps[0]}
    res: dict = {"part": "engines", "backend": args.backend, "official_anchor": OFFICIAL, "rows": rows,
                 "settings": [], "main": main}
    res["matmul_peak_tflops"] = peak = matmul_peak() / 1e12
    t0 = time.perf_counter()
    model, cfg, tok = random_model(args.preset, DEVICE)
    res["model_build_s"] = time.perf_counter() - t0
    for w, h in args.images:
        tag = f"{w}x{h}"
        img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8))
        first = True
        for keep in args.keeps:
            for layer in args.layers:
                setting = engine_setting(args, model, cfg, tok, img, tag, layer, keep, peak, first, rows, save, res)
                res["settings"].append(setting)
                save(res)
                first = False
        if not args.no_eager:  # the eager oracles, same weights / image / prompt, the main pruning setting
            if DEVICE == "cuda":
                torch.cuda.empty_cache()
            # one untimed request per path first: the 1024x768 run of 2026-12-01 had none (its first
            # eager row, mc unpruned 0.72 s, includes one-time CUDA / cuBLAS initialisation), the
            # 384x384 run warmed the unpruned path only (its eager pruned mc row, 0.28 s, is cold)
            for prune in (None, PruneSettings(main["prune_layer"], main["keep"])):
                eager_request(model, tok, img, args.prompt, args.system, PRESETS["mc"], prune)
            for pname in args.presets:
                for prune in (None, PruneSettings(main["prune_layer"], main["keep"])):
                    er = eager_request(model, tok, img, args.prompt, args.system, PRESETS[pname], prune)
                    rows.append({"kind": "eager", "image": tag, "preset": pname, "unpruned": prune is None,
                                 "prune_layer": None if prune is None else prune.layer,
                                 "keep": 1.0 if prune is None else prune.keep, **er,
                                 "speedup_vs_official": OFFICIAL[pname] / er["latency_s"]})
                    print(json.dumps(rows[-1]), flush=True)
                    save(res)
    return res


def engine_setting(args, model, cfg, tok, img, tag: str, layer: int, keep: float, peak: float, with_unpruned: bool,
                   rows: list, save, res: dict) -> dict:
    """One image size and pruning setting: export, load (compile), time the presets and the graphs."""
    import resource

    from llada_export.exporter.build import ExportOptions, export_engines
    from llada_export.graphs.anyres import grid_shape
    from llada_export.runtime.pipeline import Pipeline
    from llada_export.runtime.sampler import PRESETS

    w, h = img.size
    opts = ExportOptions(model=f"random {args.preset} (bench_gpu)", output=str(Path(args.workdir) / "engines"),
                         prune_layer=layer, keep=keep, baseline=with_unpruned, fuse_sampler=True,
                         backends=(args.backend,), compiled_weights="checkpoint",
                         dtype="bfloat16" if DEVICE == "cuda" else "float32", device=DEVICE, gen_length=128,
                         block_length=128, steps=128, max_prompt_tokens=64, image_size=(w, h), overwrite=True)
    setting: dict = {"image": tag, "prune_layer": layer, "keep": keep}
    reset_peak()
    t0 = time.perf_counter()
    out = export_engines(opts, loaded=(model, tok, cfg))
    setting["export"] = {"seconds": time.perf_counter() - t0, "peak_gpu_gib": peak_gib(),
                         "peak_host_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    print(tag, layer, keep, "export", json.dumps(setting["export"]), flush=True)
    t0 = time.perf_counter()
    pipe = Pipeline.load(out, backend=args.backend, device=DEVICE, weights=dict(model.state_dict()))
    setting["load_and_compile_s"] = time.perf_counter() - t0
    print(f"loaded + compiled + warmed up in {setting['load_and_compile_s']:.1f} s", flush=True)
    setting["manifest"] = {k: pipe.manifest[k] for k in ("bucket", "pruning", "dtype", "fused_sampler")}
    b = pipe.bucket
    cols, rws = grid_shape((w, h), cfg)
    for pname in args.presets:
        gen = PRESETS[pname]
        for unpruned in (False, True) if with_unpruned else (False,):
            ts = []
            for i in range(args.repeat + 1):  # the first run warms this preset's path up
                reset_peak()
                r = pipe.generate(img, args.prompt, preset=pname, unpruned=unpruned, system=args.system)
                if i:
                    ts.append(r.timings)
            med = {k: statistics.median(t[k] for t in ts) for k in ts[0]}
            fl = request_flops(cfg, b.prefix_len, b.max_visual_tokens, gen, None if unpruned else layer, keep,
                               1 + cols * rws)
            rows.append({"kind": "engines", "image": tag, "preset": pname, "unpruned": unpruned,
                         "prune_layer": None if unpruned else layer, "keep": 1.0 if unpruned else keep,
                         "timings": med, "steps": len(r.step_times), "n_visual": r.n_visual,
                         "kept": len(r.kept_visual) if r.kept_visual is not None else r.n_visual,
                         "latency_s": med["total"], "tokens_per_s": gen.gen_length / med["total"],
                         "tflops": fl["total"] / 1e12, "tflop_per_s": fl["total"] / med["total"] / 1e12,
                         "share_of_peak": fl["total"] / med["total"] / (peak * 1e12),
                         "peak_gib": peak_gib(), "speedup_vs_official": OFFICIAL[pname] / med["total"]})
            print(json.dumps(rows[-1]), flush=True)
            save(res)
    # each LM graph alone (CUDA events), with and without its CUDA graph
    x, _ = pipe.build_inputs(img, args.prompt, b.gen_length, args.system)
    resp = torch.full((1, b.gen_length), pipe.tokens["mask"], dtype=torch.long, device=DEVICE)
    feeds = dict(prefix_embeds=x.prefix_embeds, response_ids=resp, position_ids=x.position_ids, key_mask=x.key_mask)
    n_keep = torch.tensor([b.k_static], device=DEVICE)
    a_out = pipe.run("stage_a", **feeds, visual_mask=x.visual_mask, num_keep=n_keep)
    idx = a_out["kept_index"][0]
    p_red = idx.shape[0] - b.gen_length
    feeds_b = dict(prefix_embeds=x.prefix_embeds[:, idx[:p_red]].contiguous(), response_ids=resp,
                   position_ids=x.position_ids[:, idx].contiguous(), key_mask=a_out["kept_alive"].bool())
    n_layers = cfg.text.num_hidden_layers
    graphs = {"stage_a": (dict(feeds, visual_mask=x.visual_mask, num_keep=n_keep),
                          request_flops(cfg, b.prefix_len, b.max_visual_tokens, PRESETS["mc"], layer, keep, 0)["stage_a"]),
              "stage_b": (feeds_b, lm_flops(cfg, b.reduced_prefix_len + b.gen_length, n_layers, b.gen_length))}
    if with_unpruned:
        graphs["full"] = (feeds, lm_flops(cfg, b.prefix_len + b.gen_length, n_layers, b.gen_length))
    setting["graphs"] = {}
    for name, (f, flops) in graphs.items():
        g = graph_ms(pipe.runners[name], f)
        best = g.get("cuda_graph_ms", g.get("ms"))
        g.update(tflops=flops / 1e12, share_of_peak=flops / (best / 1e3) / (peak * 1e12))
        setting["graphs"][name] = g
        print(name, json.dumps(g), flush=True)
    del pipe
    return setting


# ---------------------------------------------------------------------- reports
def markdown(res: dict, env: dict) -> str:
    lines = [f"# GPU benchmark ({res['part']})", "",
             f"Machine: {env['gpu']}, torch {env['torch']}, CUDA {env['cuda']}; measured bf16 matmul peak "
             f"{res['matmul_peak_tflops']:.0f} TFLOP/s. Random bf16 weights, full LLaDA-V dimensions.", ""]
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
    else:
        lines += markdown_engines(res)
    return "\n".join(lines) + "\n"


def primary_setting(res: dict) -> dict:
    """The main setting's record (``run_engines``: the issue's target where measured)."""
    key = tuple(res["main"][k] for k in ("image", "prune_layer", "keep"))
    return next(st for st in res["settings"] if (st["image"], st["prune_layer"], st["keep"]) == key)


def main_rows(res: dict, st: dict, kind: str) -> dict:
    """{(preset, unpruned): row} of ``kind`` ("engines" / "eager") for setting ``st``: its pruned
    rows and the unpruned rows of its image."""
    return {(r["preset"], r["unpruned"]): r for r in res["rows"] if r["kind"] == kind and r["image"] == st["image"]
            and (r["unpruned"] or (r["prune_layer"], r["keep"]) == (st["prune_layer"], st["keep"]))}


def markdown_engines(res: dict) -> list[str]:
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
    if res["part"] == "engines":
        return plot_engines(res, path)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_engines(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", choices=("grid", "engines"))
    p.add_argument("--out", default="benchmarks", help="output directory (default: benchmarks)")
    p.add_argument("--images", default="384x384,1024x768", help="image sizes (default: 384x384,1024x768)")
    p.add_argument("--presets", default="mc,chartqa,demo", help="sampler presets (default: mc,chartqa,demo)")
    p.add_argument("--keeps", default="1.0,0.5,0.35,0.25", help="keep ratios for the grid")
    p.add_argument("--layers", default="8,16,24", help="prune layers for the grid")
    p.add_argument("--preset", default="full", choices=("full", "tiny", "demo"),
                   help="model dimensions for the grid (default: full; tiny for a CPU smoke run)")
    p.add_argument("--prompt", default="<image>\nWhat is shown in this image? Answer briefly.")
    p.add_argument("--system", default="You are a helpful language and vision assistant.",
                   help="system prompt; short, so the stand-in tokenizer gives about the official text length (~60)")
    p.add_argument("--backend", default="inductor", help="engines backend (part engines; default: inductor)")
    p.add_argument("--workdir", default="/tmp/llada-bench", help="where the engines are written (part engines)")
    p.add_argument("--repeat", type=int, default=2, help="timed requests per preset and path (part engines)")
    p.add_argument("--no-eager", action="store_true", help="skip the eager baseline (part engines)")
    p.add_argument("--replot", action="store_true",
                   help="only rewrite bench_gpu_<part>.md and .png from the bench_gpu_<part>.json in --out "
                        "(runs of this version)")
    args = p.parse_args(argv)
    args.images = [tuple(int(v) for v in s.split("x")) for s in args.images.split(",")]
    args.presets = args.presets.split(",")
    args.keeps = [float(k) for k in args.keeps.split(",")]
    args.layers = [int(k) for k in args.layers.split(",")]
    env = {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu", "torch": torch.__version__, "cuda": torch.version.cuda,
           "host": platform.node(), "date": time.strftime("%Y-%m-%d")}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def save(res: dict) -> None:  # also called part-way, so a run cut short keeps what it measured
        res["env"] = env
        (out / f"bench_gpu_{args.part}.json").write_text(json.dumps(res, indent=2) + "\n")

    if args.replot:  # re-render the Markdown and the plot of an earlier run
        res = json.loads((out / f"bench_gpu_{args.part}.json").read_text())
        if res["part"] == "engines" and "settings" not in res:
            raise SystemExit("--replot: this JSON predates the engine grid (no 'settings'); rerun the benchmark")
        env = res["env"]
    else:
        with torch.no_grad():
            res = run_grid(args) if args.part == "grid" else run_engines(args, save)
        save(res)
    (out / f"bench_gpu_{args.part}.md").write_text(markdown(res, env))
    plot(res, out / f"bench_gpu_{args.part}.png")
    print(markdown(res, env))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
