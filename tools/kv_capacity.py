"""KV cache bytes per request and the largest batch that fits a GPU, pruned against unpruned.

Arithmetic on the shapes (``llada_export/exporter/capacity.py``, the same that ``llada-export
--batch-sizes auto`` and the export's memory check use): full-size LLaDA-V (LLaDA-8B + SigLIP),
a 1024x768 image (3627 visual slots) in a 64-slot prompt bucket, G 128, K 16, keep 0.35, bf16,
for an 80 GB H100 (79.1 GiB usable) and a 141 GB H200. Writes ``<out>.json``, ``.md``, ``.png``.

``--measure`` (CUDA): random full-size bf16 weights on the GPU, then per path and batch size
the request state the runtime holds (the KV cache buffer and the prefix embeddings, allocated
with their engine shapes) and the eager prefill and in-place cached step over it, with
``torch.cuda.max_memory_allocated`` beside the model's prediction; the predicted largest batch
is tried too (an out-of-memory is recorded, not raised). On a CPU it runs as a smoke test
(``--preset tiny``) and records no peaks.

    python tools/kv_capacity.py                                   # the model, benchmarks/kv_capacity.*
    PYTHONPATH=. python tools/kv_capacity.py --measure --out OUT/kv_capacity_h100   # on the GPU
    python tools/kv_capacity.py --replot                          # re-render .md / .png from the JSON
"""

from __future__ import annotations

import argparse
import time

from llada_export.config import PRESETS
from llada_export.contract.bucket import Bucket
from llada_export.contract.pruning import PruneSettings
from llada_export.exporter.capacity import HEADROOM, KV_OUT_COPIES, headroom_bytes, kv_bytes, path_capacity
from llada_export.graphs.anyres import grid_shape, visual_token_count
from llada_export.report import pyplot, save, write_report

GIB = 2**30
# usable memory per card (bytes): the H100's as the brief measured it (mem_get_info's total less the CUDA
# context); the H200's nominal 143771 MiB less the same ~0.5 GiB (--measure records the real figure)
DEVICES = {"H100 80GB": int(79.1 * GIB), "H200 141GB": int(139.9 * GIB)}
PATHS = ("pruned", "unpruned")


def bucket_for(cfg, image: tuple[int, int], prompt_tokens: int, gen_length: int, prune: PruneSettings) -> Bucket:
    """The engines' bucket for one image size, as ``llada-export --image-size`` plans it."""
    v = visual_token_count(*image, cfg)
    cols, rows = grid_shape(image, cfg)
    return Bucket(prompt_tokens, v, gen_length, 1 + cols * rows, prune.k_static(v), 1)


def model_table(args) -> dict:
    """The arithmetic: per path its KV bytes per request, each graph's bytes per request, the largest
    batch per device (pruned and unpruned, with the cache) and the ratio."""
    cfg = PRESETS[args.preset]()
    cfg.text.vocab_size = cfg.text.vocab_size or 126464
    prune = PruneSettings(args.layer, args.keep)
    bucket = bucket_for(cfg, args.image, args.prompt_tokens, args.gen_length, prune)
    caps = {p: path_capacity(p, bucket, cfg, args.dtype, cache=True, fused=args.fused, prune=prune) for p in PATHS}
    devices = {}
    for name, mem in DEVICES.items():
        head = headroom_bytes(mem)
        fit = {p: caps[p].largest_batch(mem, head) for p in PATHS}
        devices[name] = {"bytes": mem, "headroom_bytes": head, "largest_batch": fit,
                         "ratio": round(fit["pruned"] / fit["unpruned"], 2) if fit["unpruned"] else None}
    return {
        "setting": {"preset": args.preset, "image": f"{args.image[0]}x{args.image[1]}", "prompt_tokens": args.prompt_tokens,
                    "visual_tokens": bucket.max_visual_tokens, "k_static": bucket.k_static, "gen_length": args.gen_length,
                    "prune_layer": args.layer, "keep": args.keep, "dtype": args.dtype, "fused_sampler": args.fused,
                    "headroom_fraction": HEADROOM, "prefill_cache_copies": KV_OUT_COPIES},
        "kv_bytes_per_position": kv_bytes(cfg, 1, args.dtype),
        "paths": {p: c.to_dict() for p, c in caps.items()},
        "devices": devices,
    }


# ---------------------------------------------------------------------- --measure
def measure(args, res: dict) -> dict:
    """Allocate what the model counts and run the eager prefill / cached step over it."""
    import torch

    from llada_export.synthetic.weights import random_model

    cuda = torch.cuda.is_available()
    dev, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    if not cuda and args.preset == "full":
        raise SystemExit("kv_capacity.py: --measure of the full-size model needs a CUDA GPU (use --preset tiny for a "
                         "CPU smoke run)")
    cfg = PRESETS[args.preset]()
    cfg.text.vocab_size = cfg.text.vocab_size or 126464
    t0 = time.perf_counter()
    model = random_model(cfg, dev, dtype, seed=0)
    lm = model.language
    torch.cuda.synchronize() if cuda else None
    out = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
           "load_s": round(time.perf_counter() - t0, 1), "runs": []}
    if cuda:
        free, total = torch.cuda.mem_get_info()
        out |= {"weights_allocated": torch.cuda.memory_allocated(), "mem_get_info": [free, total]}
    usable = out["mem_get_info"][0] + out["weights_allocated"] if cuda else None  # what the engines could use
    prune = PruneSettings(args.layer, args.keep)
    bucket = bucket_for(cfg, args.image, args.prompt_tokens, args.gen_length, prune)
    for path in PATHS:
        cap = path_capacity(path, bucket, cfg, args.dtype, cache=True, fused=args.fused, prune=prune)
        fit = cap.largest_batch(usable, headroom_bytes(usable)) if usable else None
        out.setdefault("predicted_largest_batch", {})[path] = fit
        for b in sorted({*args.batches, *([fit] if fit else [])}):
            run = {"path": path, "batch": b, "positions": cap.kv_positions}
            try:
                run |= _run_once(lm, cfg, cap, b, args.gen_length, dev, dtype)
            except torch.OutOfMemoryError as e:
                run |= {"ok": False, "error": "out of memory: " + str(e).splitlines()[0][:160]}
            out["runs"].append(run)
            print(run, flush=True)
    return out


def _run_once(lm, cfg, cap, b: int, g: int, dev: str, dtype) -> dict:
    """One batch of ``b`` requests of ``cap``'s path: the held cache and prefix, a prefill over them
    (its new cache copied into the held one, as a refresh), then one in-place cached step."""
    import torch

    cuda, t, length = dev == "cuda", cfg.text, cap.kv_positions
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if cuda else 0
    kv = torch.empty(t.num_hidden_layers, 2, b, t.num_key_value_heads, length, t.head_dim, dtype=dtype,
                     device=dev)  # [NL, 2, B, n_kv, P + G, hd]: the held cache
    embeds = torch.randn(b, length - g, t.hidden_size, device=dev)  # [B, P, D] fp32
    ids = torch.zeros(b, g, dtype=torch.long, device=dev)  # [B, G]
    pos = torch.arange(length, device=dev).expand(b, length)  # [B, P + G]
    mask = torch.ones(b, length, dtype=torch.bool, device=dev)  # [B, P + G]
    run = {"kv_buffer_bytes": kv.numel() * kv.element_size()}
    with torch.no_grad():
        logits, new = lm.prefill(embeds, ids, pos, mask)  # [B, G, V], a new [NL, 2, B, n_kv, P + G, hd]
        if cuda:
            run["prefill_peak"] = torch.cuda.max_memory_allocated() - base
        kv.copy_(new)
        del logits, new
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        lm.cached(ids, pos[:, -g:], mask, kv, torch.zeros(b, dtype=torch.long, device=dev), inplace=True)
        if cuda:
            run["cached_peak"] = torch.cuda.max_memory_allocated() - base
    held = b * (cap.kv + cap.held)
    prefill = max(m.transient for m in cap.graphs.values() if m.kv_out)
    cached = next(m.transient for m in cap.graphs.values() if m.kv and not m.kv_out)
    return run | {"predicted_prefill": held + b * prefill, "predicted_cached": held + b * cached, "ok": True}


# ---------------------------------------------------------------------- report
def _gib(n: float) -> str:
    return f"{n / GIB:.2f}"


def markdown(res: dict) -> str:
    s, pr, un = res["setting"], res["paths"]["pruned"], res["paths"]["unpruned"]
    lines = [
        "# KV cache per request and the largest batch that fits", "",
        f"Full-size LLaDA-V shapes ({s['preset']} preset), {s['image']} image ({s['visual_tokens']} visual slots, "
        f"{s['k_static']} kept at K {s['prune_layer']}, keep {s['keep']}), {s['prompt_tokens']} prompt slots, "
        f"G {s['gen_length']}, {s['dtype']}, with the prefix KV cache"
        f"{', fused sampler' if s['fused_sampler'] else ', logits out'}.", "",
        "**This is a model, not a measurement**: arithmetic on the engines' tensor shapes "
        "(`llada_export/exporter/capacity.py`, the same that `llada-export --batch-sizes auto` and the export's "
        "memory check use). A batch of B requests needs weights + B x (KV cache + prefix embeddings) + "
        f"max(one vision call, B x the largest call's transients) + a headroom of {s['headroom_fraction']:.0%} of "
        "the card.", "",
        "| path | KV positions | KV cache / request | prefix embeds (MiB) | peak call | per request (GiB) |",
        "| --- | ---: | ---: | ---: | --- | ---: |",
    ]
    for name, p in res["paths"].items():
        lines.append(f"| {name} + cache | {p['kv_positions']} | {p['kv_bytes'] / 1e9:.2f} GB ({_gib(p['kv_bytes'])} GiB) | {p['held_bytes'] / 2**20:.1f} "
                     f"| {p['peak_graph']} | {_gib(p['per_request_bytes'])} |")
    lines += ["", f"KV cache: {res['kv_bytes_per_position']} bytes per position (layers x 2 x KV heads x head dim x "
              f"dtype bytes); weights {_gib(pr['weights_bytes'])} GiB; one vision call {pr['vision_call_bytes'] / 2**20:.0f} MiB.",
              "", "| card | usable (GiB) | headroom (GiB) | largest batch, pruned | largest batch, unpruned | pruned / unpruned |",
              "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, d in res["devices"].items():
        lb = d["largest_batch"]
        lines.append(f"| {name} | {_gib(d['bytes'])} | {_gib(d['headroom_bytes'])} | **{lb['pruned']}** | "
                     f"{lb['unpruned']} | **{d['ratio']}x** |")
    copies = s.get("prefill_cache_copies", 1)  # reports written before the model counted the stacked layers: 1
    lines += ["", "Bytes per request of one call of each graph (the KV cache and prefix the request holds excluded; "
              "a prefill's transients include the new cache it returns beside the held one" +
              (", and the layers' K/V it stacks into that cache, alive beside it while it stacks):" if copies == 2
               else "):"), "",
              "| graph | rows computed | inputs + outputs (MiB) | activations (MiB) | transient (MiB) |",
              "| --- | ---: | ---: | ---: | ---: |"]
    for p in (pr, un):
        for g, m in p["graphs"].items():
            lines.append(f"| {g} | {m['rows']} | {m['io_bytes'] / 2**20:.1f} | {m['activation_bytes'] / 2**20:.1f} | "
                         f"{m['transient_bytes'] / 2**20:.1f} |")
    lines += ["", "Activations: one layer's hidden states and MLP projections (2 x 4 bytes x rows x (hidden + "
              "intermediate)); stage A adds the layer-K attention scores it materialises (logits and probabilities, "
              "fp32, heads x G queries x the full length).", "",
              "What a GPU run must confirm (`--measure`): the cache buffer's bytes as allocated; the peak of a "
              "prefill over a held cache (the model counts the new cache beside the old one, as the runtime "
              "replaces it only when the call returns) and of the in-place cached step; that the predicted largest "
              "batch runs without running out of memory; the headroom the compiled engines (CUDA graph pools, "
              "workspaces) need on top."]
    if m := res.get("measured"):
        lines += ["", f"## Measured on {m['device']} (torch {m['torch']}, eager prefill and cached step, random "
                  "weights)", ""]
        if "weights_allocated" in m:
            lines.append(f"Weights allocated {_gib(m['weights_allocated'])} GiB (model: {_gib(pr['weights_bytes'])}); "
                         f"mem_get_info after loading: {_gib(m['mem_get_info'][0])} free of {_gib(m['mem_get_info'][1])} GiB.")
            lines.append("")
        eager = any("predicted_prefill_eager" in r for r in m["runs"])  # a run of the one-copy model
        lines += [f"| path | batch | cache buffer (GiB) | prefill peak / model{' / model + eager copy' if eager else ''} "
                  "(GiB) | cached peak / model (GiB) | ok |", "| --- | ---: | ---: | ---: | ---: | --- |"]
        for r in m["runs"]:
            pk = (" / ".join(_gib(r[k]) for k in ("prefill_peak", "predicted_prefill", "predicted_prefill_eager")
                             if k in r) if "prefill_peak" in r else "-")
            ck = (f"{_gib(r['cached_peak'])} / {_gib(r['predicted_cached'])}" if "cached_peak" in r else "-")
            buf = _gib(r["kv_buffer_bytes"]) if "kv_buffer_bytes" in r else "-"
            lines.append(f"| {r['path']} | {r['batch']} | {buf} | {pk} | {ck} | {'yes' if r['ok'] else r['error']} |")
        lines += ["", "Peaks are above the weights (allocated before each run). " + (
                  "The eager prefill stacks every layer's "
                  "K/V and then the layers, one cache copy more than the model counts (Inductor may write the layers "
                  "into the output buffer directly; unverified): its third figure adds that copy, so the largest batch "
                  "the model predicts can run out of memory here and still fit the engines; `tools/bench_gpu.py "
                  "batch` at that size is the check on the engines. " if eager else
                  "The model counts a prefill's new cache twice beside the held one (the layers' K/V and the cache "
                  "they are stacked into), as the eager prefill holds them. ") +
                  "The model's prediction counts the "
                  "held cache and prefix and the call's transients (no headroom). Predicted largest batch on this "
                  f"card (its free memory after loading plus the weights, less {s['headroom_fraction']:.0%}): "
                  f"{m.get('predicted_largest_batch')}."]
    lines += ["", "Reproduce: `python tools/kv_capacity.py` (the model); on a GPU `python tools/kv_capacity.py "
              "--measure --out OUT/kv_capacity`."]
    return "\n".join(lines) + "\n"


def plot(res: dict, path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    names = list(res["paths"])
    kv = [res["paths"][p]["kv_bytes"] / GIB for p in names]
    per = [res["paths"][p]["per_request_bytes"] / GIB for p in names]
    x = range(len(names))
    ax[0].bar([i - 0.2 for i in x], kv, 0.4, label="KV cache")
    ax[0].bar([i + 0.2 for i in x], per, 0.4, label="per request (peak)")
    ax[0].set_xticks(list(x), [f"{n} + cache" for n in names])
    ax[0].set_ylabel("GiB per request")
    ax[0].legend()
    cards = list(res["devices"])
    for j, p in enumerate(names):
        ax[1].bar([i + (j - 0.5) * 0.4 for i in range(len(cards))],
                  [res["devices"][c]["largest_batch"][p] for c in cards], 0.4, label=p)
    ax[1].set_xticks(range(len(cards)), cards)
    ax[1].set_ylabel("largest batch (model)")
    ax[1].legend()
    fig.suptitle(f"KV capacity, {res['setting']['image']}, {res['setting']['dtype']} (arithmetic on the shapes)")
    save(fig, path)


def main(argv: list[str] | None = None) -> int:
    from llada_export.cli.common import parse_size

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/kv_capacity", help="output path without extension")
    p.add_argument("--preset", choices=sorted(PRESETS), default="full", help="model shapes (default: full)")
    p.add_argument("--image", type=parse_size, default=(1024, 768), help="image size WxH (default: 1024x768)")
    p.add_argument("--prompt-tokens", type=int, default=64, help="bucket text slots (default: 64, as bench_gpu)")
    p.add_argument("--gen-length", type=int, default=128, help="response slots G (default: 128)")
    p.add_argument("--layer", type=int, default=16, help="pruning layer K (default: 16)")
    p.add_argument("--keep", type=float, default=0.35, help="visual tokens kept (default: 0.35)")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    p.add_argument("--fused", action="store_true", help="engines with the fused sampler (no logits output)")
    p.add_argument("--measure", action="store_true", help="also allocate and run on this machine's GPU (see above)")
    p.add_argument("--batches", type=lambda s: [int(v) for v in s.split(",")], default=[1, 2, 4],
                   help="--measure: batch sizes to run besides the predicted largest (default: 1,2,4)")
    p.add_argument("--replot", action="store_true", help="only rewrite <out>.md and <out>.png from <out>.json")
    args = p.parse_args(argv)
    res = None
    if not args.replot:
        res = model_table(args)
        if args.measure:
            res["measured"] = measure(args, res)
    write_report(args.out, res, markdown, plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
