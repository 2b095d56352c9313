"""``tools/bench_gpu.py grid``: the eager PyTorch oracles (official algorithm vs LLaDA-FastV) over keep x K x
image x preset, no engines."""

from __future__ import annotations

import json
import time

import numpy as np
import torch
from PIL import Image

from llada_export.flops import request_flops
from llada_export.timing import matmul_peak, sync, wall_seconds

# siblings in tools/ (scripts, not a package): bench_gpu.py puts the folder on sys.path
from bench_gpu_common import DEVICE, OFFICIAL, build_model


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
