"""GPU benchmark: full-size LLaDA-V (random bf16 weights) on one GPU, unpruned vs LLaDA-FastV.

Two parts, each fits one device call:

``grid``   the eager PyTorch reference that mirrors the official implementation (full sequence
           every step, SDPA, bf16) against the eager pruned model, over keep x prune layer x
           image size x preset; per setting: end-to-end latency, vision / stage A / stage B
           per step, tokens/s, analytic FLOPs, FLOP/s and share of the measured bf16 matmul
           peak, peak GPU memory. The model is built on the GPU directly (no checkpoint).
``engines`` the engines written by ``llada-export`` (AOTInductor, CUDA) for one bucket: the
           pruned pipeline and the unpruned graph of the same directory, per preset, plus the
           export's own wall time and peak memory if ``--export-log`` is given.

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
OFFICIAL = {"forward_3815_ms": 196.0, "mc": 0.42, "chartqa": 3.25, "demo": 26.5, "vision_7_crops_ms": 40.0,
            "peak_gib": 28.7}


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


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


# ---------------------------------------------------------------------- engines (AOTInductor)
def run_engines(args) -> dict:
    from llada_export.runtime.pipeline import Pipeline

    peak = matmul_peak()
    t0 = time.perf_counter()
    pipe = Pipeline.load(args.engines, backend=args.backend, device="cuda", verify=False)
    load_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    w, h = args.images[0]
    img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    rows = []
    for pname in args.presets:
        for unpruned in (False, True):
            if unpruned and not pipe.has_unpruned:
                continue
            pipe.generate(img, args.prompt, preset=pname, unpruned=unpruned, system=args.system)  # warm-up
            torch.cuda.reset_peak_memory_stats()
            ts = []
            for _ in range(args.repeat):
                r = pipe.generate(img, args.prompt, preset=pname, unpruned=unpruned, system=args.system)
                ts.append(r.timings)
            med = {k: statistics.median(t[k] for t in ts) for k in ts[0]}
            rows.append({"preset": pname, "unpruned": unpruned, "timings": med, "n_visual": r.n_visual,
                         "kept": len(r.kept_visual) if r.kept_visual is not None else r.n_visual,
                         "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
                         "speedup_vs_official": OFFICIAL[pname] / med["total"] if pname in OFFICIAL else None})
            print(json.dumps(rows[-1]), flush=True)
    out = {"part": "engines", "matmul_peak_tflops": peak / 1e12, "load_s": load_s, "rows": rows,
           "manifest": {k: pipe.manifest[k] for k in ("bucket", "pruning", "dtype", "fused_sampler")},
           "backend": pipe.backend, "official_anchor": OFFICIAL}
    m = pipe.manifest
    out["export"] = {"seconds": m.get("export_seconds"), "peak_host_rss_gib": m.get("export_peak_host_rss_gib"),
                     "peak_gpu_gib": m.get("export_peak_gpu_gib"), "weights": m.get("weights")}
    return out


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
        m = res["manifest"]
        lines += [f"Engines: {res['backend']}, dtype {m['dtype']}, fused sampler {m['fused_sampler']}, pruning "
                  f"{m['pruning']}, bucket {m['bucket']}.", "",
                  "| preset | graph | total s | vision ms | stage A ms | stage B ms/step | full ms/step | kept | "
                  "peak GiB | x official |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in res["rows"]:
            t = r["timings"]
            lines.append(f"| {r['preset']} | {'unpruned' if r['unpruned'] else 'pruned'} | {t['total']:.3f} | "
                         f"{t['vision'] * 1e3:.1f} | {t.get('stage_a', float('nan')) * 1e3:.1f} | "
                         f"{t.get('stage_b_per_step', float('nan')) * 1e3:.2f} | "
                         f"{t.get('full_per_step', float('nan')) * 1e3:.2f} | {r['kept']}/{r['n_visual']} | "
                         f"{r['peak_gib']:.1f} | {r['speedup_vs_official'] or float('nan'):.2f} |")
        if "export" in res:
            lines += ["", f"Export: {json.dumps(res['export'])}"]
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
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
    p.add_argument("--engines", help="engines directory (part engines)")
    p.add_argument("--backend", default="aoti")
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args(argv)
    args.images = [tuple(int(v) for v in s.split("x")) for s in args.images.split(",")]
    args.presets = args.presets.split(",")
    args.keeps = [float(k) for k in args.keeps.split(",")]
    args.layers = [int(k) for k in args.layers.split(",")]
    env = {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu", "torch": torch.__version__, "cuda": torch.version.cuda,
           "host": platform.node(), "date": time.strftime("%Y-%m-%d")}
    with torch.no_grad():
        res = run_grid(args) if args.part == "grid" else run_engines(args)
    res["env"] = env
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"bench_gpu_{args.part}.json").write_text(json.dumps(res, indent=2) + "\n")
    (out / f"bench_gpu_{args.part}.md").write_text(markdown(res, env))
    if args.part == "grid":
        plot(res, out / "bench_gpu_grid.png")
    print(markdown(res, env))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
