"""Where the cached step's time goes: one decoder layer of the model at the cached step's shapes,
piece by piece, against the whole step and the weight-read floor (``tools/bench_gpu.py step``, and
inside ``engines``).

The pieces run the project's modules (``graphs/fused.py``'s fused layer of layer 0, ``graphs/llada.py``'s
RoPE, cache writer, norms, head and ``Head``'s fused sampler step) on B rows x G queries over P' + G
keys; on a GPU each piece is captured in its own CUDA graph and timed with CUDA events (median). The
attention is timed with every SDPA backend (``torch.nn.attention.sdpa_kernel``: flash, efficient,
cudnn, math), with the engines' boolean key mask and without it; the best one is named. The whole
step is ``LanguageModel.cached`` (fused projections, the cache written in place) + the fused sampler
head, eager kernels in one CUDA graph (the exported engine's number comes from ``engines``). On a CPU
(``--preset tiny``) everything runs eagerly: a smoke run, numbers meaningless.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llada_export.timing import median_seconds

BACKENDS = ("flash", "efficient", "cudnn", "math")


def timed(fn, repeat: int = 20) -> float:
    """Median seconds of ``fn`` replayed from a CUDA graph (CUDA events) on a GPU, eager elsewhere."""
    if not torch.cuda.is_available():
        return median_seconds(fn, repeat=repeat, warmup=1)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm up (lazy init, autotuning) outside the capture
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return median_seconds(graph.replay, repeat=repeat)


def _backend(name: str):
    from torch.nn.attention import SDPBackend

    return {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[name]


def attention_kernels(q, k, v, mask, repeat: int) -> list[dict]:
    """SDPA of q [B, H, G, hd] over k, v [B, H, P'+G, hd] per backend, with mask [B, 1, 1, P'+G] and without."""
    from torch.nn.attention import sdpa_kernel

    rows = []
    for name in BACKENDS:
        for masked in (True, False):
            m = mask if masked else None
            try:
                with sdpa_kernel([_backend(name)]):
                    ms = timed(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=m), repeat) * 1e3
                rows.append({"kernel": name, "key_mask": masked, "ms": ms})
            except Exception as e:  # noqa: BLE001 - a backend that does not take these inputs on this device
                rows.append({"kernel": name, "key_mask": masked, "error": f"{type(e).__name__}: {str(e)[:160]}"})
    # the engines' cached step: flash attention over zeroed padding, rescaled by its log-sum-exp (eager: the
    # rescale's few pointwise kernels unfused, where the engine's compiler fuses them into one)
    from llada_export.ops.padded_attention import attend_zero_padded, supported, zero_padding

    name = "flash, zeroed pads + rescale (the engines' cached step)"
    if supported(q):
        key_mask = mask[:, 0, 0, :]  # [B, P'+G]
        n_pad, kz, vz = (~key_mask).sum(-1), zero_padding(k, key_mask), zero_padding(v, key_mask)
        ms = timed(lambda: attend_zero_padded(q, kz, vz, n_pad), repeat) * 1e3
        got = attend_zero_padded(q, kz, vz, n_pad).float().transpose(1, 2)  # [B, H, G, hd]
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask)  # fp32, masked
        masked = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).float()  # this dtype, masked
        rows.append({"kernel": name, "key_mask": True, "ms": ms,
                     "max_abs_err_vs_fp32": (got - ref).abs().max().item(),
                     "masked_sdpa_max_abs_err_vs_fp32": (masked - ref).abs().max().item()})
    else:
        rows.append({"kernel": name, "key_mask": True, "error": "no kernel for these inputs on this device"})
    rows.append(cudnn_zero_padded(q, k, v, mask, repeat))
    return rows


def cudnn_attention_lse(q, k, v):
    """cuDNN's unmasked attention with its log-sum-exp: (out [B, Lq, H, hd], lse [B, H, Lq] fp32), the outputs of
    ``llada::attention_lse`` by another kernel (at batch 8 cuDNN without a mask took 0.084 ms a layer against
    flash's 0.144 over zeroed padding: ``benchmarks/bench_gpu_step_b8_1207.md``). Not in the engines: a candidate
    timed here, its error measured, before ``attention_lse`` would pick it by batch size."""
    out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, False, False)[:2]
    b, h, lq, _ = q.shape
    return out.transpose(1, 2).contiguous(), lse.float().reshape(b, h, lq)


def cudnn_zero_padded(q, k, v, mask, repeat: int) -> dict:
    """The candidate row: cuDNN over the zeroed padding, rescaled by its log-sum-exp as the engines rescale
    flash's (``padded_attention.rescale``), timed and compared with fp32 masked attention."""
    from llada_export.ops.padded_attention import rescale, zero_padding

    name = "cudnn, zeroed pads + rescale (candidate)"
    if q.device.type != "cuda":
        return {"kernel": name, "key_mask": True, "error": "cuDNN attention runs on CUDA only"}
    key_mask = mask[:, 0, 0, :]  # [B, P'+G]
    n_pad, kz, vz = (~key_mask).sum(-1), zero_padding(k, key_mask), zero_padding(v, key_mask)
    try:
        run = lambda: rescale(*cudnn_attention_lse(q, kz, vz), n_pad, q.dtype)  # noqa: E731
        got = run().float().transpose(1, 2)  # [B, H, G, hd]
        ms = timed(run, repeat) * 1e3
    except Exception as e:  # noqa: BLE001 - no cuDNN kernel for these inputs on this device / torch
        return {"kernel": name, "key_mask": True, "error": f"{type(e).__name__}: {str(e)[:160]}"}
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask)  # fp32, masked
    return {"kernel": name, "key_mask": True, "ms": ms, "max_abs_err_vs_fp32": (got - ref).abs().max().item()}


@torch.no_grad()
def profile_step(model, lm, cfg, tok, prefix: int, rows: int = 1, gen: int = 128, repeat: int = 20,
                 floor: dict | None = None) -> dict:
    """One shape (``rows`` x ``gen`` queries over ``prefix`` + ``gen`` keys): every piece of layer 0 of
    ``lm`` (``graphs.fused.fuse_projections(model.language)``: the engines' fused projections) and the
    whole cached step; ``floor`` (``weight_floor.weight_read_floor``) gives each GEMM's weight-read time
    at the floor's bandwidth."""
    from llada_export.graphs.llada import Head, apply_rope, attention_mask, cache_writer
    from llada_export.tokenizer import special_tokens

    layer, dev, dtype = lm.layers[0], model.lm_head.weight.device, model.lm_head.weight.dtype
    attn, mlp = layer.self_attn, layer.mlp
    b, g, length = rows, gen, prefix + gen
    h_, kv_, hd = attn.n_heads, attn.n_kv, attn.head_dim
    n_layers = len(lm.layers)
    sp = special_tokens(tok)
    head = Head((sp.suppressed(), sp.mask), cfg.text.vocab_size, dev)
    gen_rng = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(b, g, cfg.text.hidden_size, device=dev, dtype=dtype, generator=gen_rng)  # [B, G, D]
    kv = torch.randn(n_layers, 2, b, kv_, length, hd, device=dev, dtype=dtype, generator=gen_rng)  # the cache
    key_mask = torch.ones(b, length, dtype=torch.bool, device=dev)
    key_mask[:, prefix - 3: prefix] = False  # a few padded prompt slots, as in a bucket
    mask = attention_mask(key_mask)  # [B, 1, 1, P'+G]
    pos = torch.arange(prefix, length, device=dev)[None].expand(b, g)  # [B, G]
    ids = torch.full((b, g), sp.mask, dtype=torch.long, device=dev)
    block_start = torch.zeros(b, dtype=torch.long, device=dev)
    fresh = torch.ones(b, g, dtype=torch.bool, device=dev)
    cos, sin = lm.rotary(pos)  # [B, G, hd]
    hn = layer.input_layernorm(x)
    q, k, v = attn._project(hn)  # [B, G, H*hd], [B, G, n_kv*hd] x2
    qh, kh, vh = attn._heads(q, h_), attn._heads(k, kv_), attn._heads(v, kv_)  # [B, n, G, hd]
    write = cache_writer(kv, 0, g)
    keys, values = write(kh, vh)  # [B, n_kv, P'+G, hd] views of the cache
    kr, vr = attn._repeat(keys), attn._repeat(values)  # [B, H, P'+G, hd]
    o = F.scaled_dot_product_attention(apply_rope(qh, cos, sin), kr, vr, attn_mask=mask)  # [B, H, G, hd]
    o2 = o.transpose(1, 2).reshape(b, g, h_ * hd)  # [B, G, H*hd]
    gate, up = mlp._gate_up(hn)  # [B, G, I] x2
    act = F.silu(gate) * up
    logits = lm.head(x)  # [B, G, V] fp32

    att = attention_kernels(apply_rope(qh, cos, sin), kr, vr, mask, repeat)
    ok = [r for r in att if "ms" in r]
    best = min(ok, key=lambda r: r["ms"]) if ok else None
    best_masked = min((r for r in ok if r["key_mask"]), key=lambda r: r["ms"], default=None)

    def wbytes(*linears) -> int:
        return sum(m.weight.numel() * m.weight.element_size() for m in linears)

    pieces = [  # (name, fn, weight bytes read, per layer?)
        ("input + post-attention RMSNorm (+ residual adds)",
         lambda: (layer.input_layernorm(x), layer.post_attention_layernorm(x + x)), 0),
        ("fused q|k|v GEMM", lambda: attn.qkv_proj(hn), wbytes(attn.qkv_proj)),
        ("RoPE (q and k)", lambda: (apply_rope(qh, cos, sin), apply_rope(kh, cos, sin)), 0),
        ("cache write (where(fresh) + in-place index_put_)",
         lambda: write(torch.where(fresh[:, None, :, None], kh, kv[0, 0, :, :, prefix:]), vh), 0),
        (f"attention ({best_masked['kernel']}, key mask)" if best_masked else "attention (default SDPA, key mask)",
         None, 0),
        ("o_proj GEMM", lambda: attn.o_proj(o2), wbytes(attn.o_proj)),
        ("fused gate|up GEMM", lambda: mlp.gate_up_proj(hn), wbytes(mlp.gate_up_proj)),
        ("SiLU(gate) * up", lambda: F.silu(gate) * up, 0),
        ("down GEMM", lambda: mlp.down_proj(act), wbytes(mlp.down_proj)),
    ]
    out_pieces = []
    for name, fn, nbytes in pieces:
        if fn is None:
            ms = best_masked["ms"] if best_masked else timed(
                lambda: F.scaled_dot_product_attention(apply_rope(qh, cos, sin), kr, vr, attn_mask=mask), repeat) * 1e3
        else:
            ms = timed(fn, repeat) * 1e3
        out_pieces.append({"piece": name, "per_layer_ms": ms, "layers": n_layers, "ms": ms * n_layers,
                           "weight_gb": nbytes * n_layers / 1e9})
    once = [("embed the response ids", lambda: lm.embed_tokens(ids), 0),
            ("final norm + lm_head (fp32 logits)", lambda: lm.head(x), wbytes(lm.lm_head)),
            ("fused sampler step (suppress, max, logsumexp)", lambda: head(logits, ids), 0)]
    for name, fn, nbytes in once:
        ms = timed(fn, repeat) * 1e3
        out_pieces.append({"piece": name, "per_layer_ms": None, "layers": 1, "ms": ms, "weight_gb": nbytes / 1e9})
    n_pad = (~key_mask).sum(-1)  # [B]: the step's attention without the mask (ops.padded_attention)
    layer_ms = timed(lambda: layer.forward_cached(x, cos, sin, mask, kv[0, 0], kv[0, 1], fresh, write, n_pad),
                     repeat) * 1e3
    step_ms = timed(lambda: head(lm.cached(ids, pos, key_mask, kv, block_start, inplace=True), ids), repeat) * 1e3
    res = {"prefix": prefix, "rows": b, "queries": g, "keys": length, "layers": n_layers, "pieces": out_pieces,
           "attention_kernels": att, "best_attention": best, "best_attention_with_key_mask": best_masked,
           "layer_ms": layer_ms, "sum_of_pieces_ms": sum(p["ms"] for p in out_pieces),
           "step_ms": step_ms, "step_method": "LanguageModel.cached (fused, in place) + fused sampler head, eager "
                                              "kernels" + (" in one CUDA graph" if dev.type == "cuda" else "")}
    if floor:
        bw = floor["gb"] / floor["ms"]  # GB per ms
        for p in out_pieces:
            p["floor_ms"] = p["weight_gb"] / bw
            p["above_floor_ms"] = p["ms"] - p["floor_ms"]
        res["floor_ms"] = floor["ms"]
        res["step_vs_floor"] = step_ms / floor["ms"]
    return res


def markdown_profile(prof: dict, engines_cached_ms: dict | None = None) -> list[str]:
    """Tables for ``bench_gpu``'s reports: per shape, the pieces x layers against the step and the floor."""
    lines = ["", "## Where the cached step's time goes (one layer's pieces x layers, CUDA graphs, CUDA events)", "",
             prof.get("note", ""), ""]
    for s in prof["shapes"]:
        fl = s.get("floor_ms")
        lines += [f"### {s['rows']} x {s['queries']} queries over {s['prefix']} + {s['queries']} keys", "",
                  "| piece | ms per layer | x layers ms | weights GB | at floor bandwidth ms | above floor ms | share of step |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for p in s["pieces"]:
            per = "-" if p["per_layer_ms"] is None else f"{p['per_layer_ms']:.4f}"
            lines.append(f"| {p['piece']} | {per} | {p['ms']:.3f} | {p['weight_gb']:.2f} | "
                         f"{p.get('floor_ms', float('nan')):.3f} | {p.get('above_floor_ms', float('nan')):.3f} | "
                         f"{100 * p['ms'] / s['step_ms']:.0f}% |")
        lines += ["", f"Sum of the pieces {s['sum_of_pieces_ms']:.2f} ms; one whole layer (forward_cached) "
                  f"{s['layer_ms']:.3f} ms x {s['layers']} = {s['layer_ms'] * s['layers']:.2f} ms; the whole step "
                  f"({s['step_method']}) {s['step_ms']:.2f} ms" + (f" = {s['step_vs_floor']:.2f}x the weight-read "
                                                                    f"floor {fl:.2f} ms" if fl else "") +
                  (f"; the exported engine's cached graph {engines_cached_ms[s['prefix']]:.2f} ms"
                   if engines_cached_ms and s["prefix"] in engines_cached_ms else "") + ".", ""]
        if fl:
            gemm = sum(p["above_floor_ms"] for p in s["pieces"] if p["weight_gb"] > 0)
            rest = sum(p["ms"] for p in s["pieces"] if p["weight_gb"] == 0)
            lines += [f"Between the floor and the step ({s['step_ms'] - fl:.2f} ms): the GEMMs and the head above "
                      f"their weight reads {gemm:.2f} ms, the pieces that read no weights {rest:.2f} ms, outside every "
                      f"piece (the whole step minus the sum of the pieces) {s['step_ms'] - s['sum_of_pieces_ms']:.2f} ms.",
                      ""]
        lines += [
                  f"Attention kernels (SDPA backends, {s['queries']} queries over the cached prefix):", "",
                  "| backend | key mask | ms per layer |", "| --- | --- | --- |"]
        for r in s["attention_kernels"]:
            lines.append(f"| {r['kernel']} | {'yes' if r['key_mask'] else 'no'} | "
                         + (f"{r['ms']:.4f} |" if "ms" in r else f"unavailable: {r['error'][:80]} |"))
        for r in s["attention_kernels"]:
            if "max_abs_err_vs_fp32" in r:
                masked = r.get("masked_sdpa_max_abs_err_vs_fp32")
                lines += ["", f"{r['kernel']}: largest difference from fp32 masked attention "
                          f"{r['max_abs_err_vs_fp32']:.2e}" + (f", against {masked:.2e} for masked SDPA in the same "
                                                               "dtype." if masked is not None else ".")]
        if s["best_attention"]:
            bst, bm = s["best_attention"], s["best_attention_with_key_mask"]
            lines += ["", f"Best attention kernel: {bst['kernel']} ({'with' if bst['key_mask'] else 'without'} the key "
                      f"mask, {bst['ms']:.4f} ms per layer)" + (f"; with the key mask: {bm['kernel']} "
                                                                 f"({bm['ms']:.4f} ms)." if bm else "."), ""]
    return lines


def plot_profile(prof: dict, path) -> None:
    """Stacked bars per shape: each piece's ms (x layers), beside the whole step and the floor."""
    from llada_export.report import pyplot, save

    plt = pyplot()

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, s in enumerate(prof["shapes"]):
        bottom = 0.0
        for j, p in enumerate(s["pieces"]):
            ax.bar(i, p["ms"], 0.5, bottom=bottom, color=plt.cm.tab20(j % 20), label=p["piece"] if i == 0 else None)
            bottom += p["ms"]
        ax.plot([i - 0.3, i + 0.3], [s["step_ms"]] * 2, "k-", lw=2, label="whole step" if i == 0 else None)
        if "floor_ms" in s:
            ax.plot([i - 0.3, i + 0.3], [s["floor_ms"]] * 2, "r--", lw=2, label="weight-read floor" if i == 0 else None)
    ax.set_xticks(range(len(prof["shapes"])), [f"P' {s['prefix']}, {s['rows']} x {s['queries']}" for s in prof["shapes"]])
    ax.set_ylabel("ms per cached step")
    ax.set_title("Cached step: pieces x layers vs the whole step and the floor", fontsize=9)
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1, 1))
    save(fig, path)
