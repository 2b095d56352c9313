"""The FP8 GEMMs of one LLaDA-8B decoder layer at the row counts the engines run, against bf16 and the
weight-read floor: where an FP8 cached step's time goes in its linears.

For each row count (``--rows``: 128 = the cached step at batch 1, 1024 = at batch 8, 1461 = a pruned
prefill) and each fused linear of a layer (q|k|v, o, gate|up, down: one weight each, as the engines hold
them), each way of computing the product is captured ten times in a CUDA graph and timed with CUDA
events (median); a row gives the layer's four linears x the layers (32), milliseconds:

- ``bf16``: ``F.linear`` with bf16 weights (the native engines);
- ``scaled_mm row-wise`` / ``scaled_mm tensor-wise``: ``torch._scaled_mm`` on activations already in e4m3,
  the kernels alone (row-wise: an fp32 scale per row and per output channel; tensor-wise: one per operand);
- ``llada_fp8 row`` / ``llada_fp8 tensor``: the project's op (``llada_export/quant/fp8.py``) compiled by
  ``torch.compile`` as the engines compile it, the dynamic activation quantization included;
  (per tensor: the tensor's one scale repeated per row, the row-wise GEMM);
- ``tensor-wise GEMM + epilogue``: a per-tensor alternative tried on 2026-12-07 (``tensor_wise`` below: the
  tensor-wise GEMM, the weights' per-channel scales multiplying its bf16 output);
- the weight-read floors: the four weights' bytes (bf16, and e4m3) read once, x the layers
  (``tools/weight_floor.py``'s measure).

Each op's output is checked against the fp64 product of the same e4m3 values (``emulated_linear``): the
largest error relative to the output's largest magnitude. Writes ``<out>.json``, ``.md`` and ``.png``;
``--replot`` re-renders the last two from the JSON. On a CPU (a smoke run, ``--dims 256,512``) the op
emulates and the ``_scaled_mm`` rows may be unavailable.

    python tools/fp8_gemm_probe.py --out OUT/fp8_gemm_probe [--rows 128,1024,1461]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from llada_export.config import TextConfig  # noqa: E402
from llada_export.quant.fp8 import E4M3, E4M3_MAX, MIN_AMAX, _linear, emulated_linear, quantize_weight  # noqa: E402
from llada_export.report import grouped_bars, pyplot, save, write_report  # noqa: E402
from weight_floor import weight_read_floor  # noqa: E402

CUDA = torch.cuda.is_available()
ERR_WAYS = ("llada_fp8 row", "llada_fp8 tensor", "tensor-wise GEMM + epilogue")  # checked against fp64


def timed(fn, repeat: int, calls: int = 10) -> float:
    """Seconds per call of ``fn``: ``calls`` calls captured in one CUDA graph, the median of ``repeat``
    replays (CUDA events); on a CPU the wall clock's median of ``repeat`` calls."""
    fn()
    if not CUDA:
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3 / calls)
    return statistics.median(times)


def tensor_wise(x, w8, w_scale):
    """A per-tensor alternative to the op: one activation scale (the largest row's amax), cuBLAS's
    tensor-wise GEMM (one scale per operand), the weights' per-channel scales an epilogue on its bf16 output."""
    x2 = x.reshape(-1, x.shape[-1])  # [M, K]
    s = x2.float().abs().amax(dim=1, keepdim=True).amax(dim=0, keepdim=True).clamp(min=MIN_AMAX) / E4M3_MAX  # [1, 1]
    x8 = (x2.float() / s).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)  # [M, K]
    one = torch.ones((1, 1), dtype=torch.float32, device=x.device)
    y = torch._scaled_mm(x8, w8.t(), scale_a=s, scale_b=one, out_dtype=x.dtype)  # [M, N]
    return (y.float() * w_scale[None, :]).to(x.dtype)  # [M, N]


def linears(d: int, i: int) -> dict[str, tuple[int, int]]:
    """A decoder layer's fused linears as the engines hold them: name -> (N out, K in)."""
    return {"q|k|v": (3 * d, d), "o": (d, d), "gate|up": (2 * i, d), "down": (d, i)}


def probe_rows(m: int, shapes: dict, dev: str, repeat: int) -> dict:
    """One row count: each way's ms per layer (its four linears) and each op's error."""
    dt = torch.bfloat16 if CUDA else torch.float32
    ms: dict[str, float] = {}
    err: dict[str, float] = {}
    for name, (n, k) in shapes.items():
        torch.manual_seed(0)
        x = torch.randn(m, k, device=dev, dtype=dt)  # [M, K]
        w = (torch.randn(n, k, device=dev) * 0.02).to(dt)  # [N, K]
        w8, ws = quantize_weight(w)  # [N, K] e4m3, [N] fp32
        xs = (x.float().abs().amax(1, keepdim=True) / E4M3_MAX)  # [M, 1]
        x8 = (x.float() / xs).to(E4M3)  # [M, K]
        one = torch.ones((1, 1), device=dev)
        ways = {
            "bf16": lambda: F.linear(x, w),
            "scaled_mm row-wise": lambda: torch._scaled_mm(x8, w8.t(), scale_a=xs, scale_b=ws.reshape(1, n),
                                                           out_dtype=dt),
            "scaled_mm tensor-wise": lambda: torch._scaled_mm(x8, w8.t(), scale_a=one, scale_b=one, out_dtype=dt),
            "llada_fp8 row": torch.compile(lambda: _linear(x, w8, ws, None, True)),
            "llada_fp8 tensor": torch.compile(lambda: _linear(x, w8, ws, None, False)),
            "tensor-wise GEMM + epilogue": torch.compile(lambda: tensor_wise(x, w8, ws)),
        }
        for way, fn in ways.items():
            try:
                t = timed(fn, repeat)
            except (RuntimeError, NotImplementedError) as e:  # e.g. no _scaled_mm on this device
                ms[way] = float("nan")
                err.setdefault("unavailable", {})[way] = str(e).splitlines()[0][:200]
                continue
            ms[way] = ms.get(way, 0.0) + t * 1e3
            if way != "bf16" and not way.startswith("scaled_mm"):
                want = emulated_linear(x, w8, ws, per_row=way == "llada_fp8 row")
                e = ((fn().double() - want).abs().max() / want.abs().max()).item()
                err[way] = max(err.get(way, 0.0), e)
        floors = {"floor bf16": [w], "floor e4m3": [w8.view(torch.uint8)]}
        for way, ts in floors.items():
            ms[way] = ms.get(way, 0.0) + weight_read_floor(ts, repeat=repeat)["ms"]
    return {"rows": m, "ms_per_layer": ms, "rel_err": err}


def markdown(res: dict) -> str:
    n = res["layers"]
    ways = list(res["runs"][0]["ms_per_layer"])
    lines = [f"# FP8 GEMMs of one decoder layer x {n} layers ({res['device_name']}, torch {res['torch']})", "",
             f"Hidden {res['dims'][0]}, intermediate {res['dims'][1]}: the fused q|k|v, o, gate|up and down linears; "
             f"milliseconds for the four x {n} layers, " + (
                 f"each way captured 10 times in a CUDA graph and timed with CUDA events (median of {res['repeat']})"
                 if res["device_name"] != "cpu" else f"the wall clock's median of {res['repeat']} (a CPU smoke run: "
                 "fp32 for bf16, the op emulated)") + ". `scaled_mm` rows: the kernel alone on e4m3 activations; "
             "`llada_fp8` rows: the project's op compiled, its dynamic activation quantization included; "
             "floors: the weights' bytes read once.", "",
             "| rows | " + " | ".join(ways) + " |", "| --- | " + " | ".join("---" for _ in ways) + " |"]
    for r in res["runs"]:
        lines.append(f"| {r['rows']} | " + " | ".join(f"{v * n:.3f}" for v in r["ms_per_layer"].values()) + " |")
    lines += ["", "Largest error of each op against the fp64 product of the same e4m3 values, relative to the "
              "output's largest magnitude:", "", "| rows | " + " | ".join(w for w in ways if w in ERR_WAYS)
              + " |", "| --- |" + " --- |" * sum(w in ERR_WAYS for w in ways)]
    for r in res["runs"]:
        lines.append(f"| {r['rows']} | " + " | ".join(f"{r['rel_err'].get(w, float('nan')):.2e}" for w in ways
                                                       if w in ERR_WAYS) + " |")
    if any("unavailable" in r["rel_err"] for r in res["runs"]):
        lines += ["", "Unavailable here: " + "; ".join(f"{w} ({e})" for w, e in
                                                       res["runs"][0]["rel_err"].get("unavailable", {}).items())]
    if res.get("note"):
        lines += ["", res["note"]]
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 3.2))
    grouped_bars(ax, [f"{r['rows']} rows" for r in res["runs"]],
                 {w: [r["ms_per_layer"][w] * res["layers"] for r in res["runs"]] for w in res["runs"][0]["ms_per_layer"]})
    ax.set_ylabel(f"ms, {res['layers']} layers' linears")
    ax.set_title(f"FP8 GEMMs, {res['device_name']}", fontsize=9)
    ax.legend(fontsize=6)
    save(fig, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cfg = TextConfig()
    p.add_argument("--rows", default="128,1024,1461", help="row counts, comma-separated")
    p.add_argument("--dims", default=f"{cfg.hidden_size},{cfg.intermediate_size}", help="hidden,intermediate")
    p.add_argument("--layers", type=int, default=cfg.num_hidden_layers, help="the per-layer times' multiplier")
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--out", required=True, help="output path without suffix")
    p.add_argument("--note", help="a paragraph on how the run was made (kept in the JSON)")
    p.add_argument("--replot", action="store_true", help="re-render <out>.md and .png from <out>.json")
    a = p.parse_args(argv)
    res = None  # None: write_report reads <out>.json back
    if not a.replot:
        d, i = (int(v) for v in a.dims.split(","))
        dev = "cuda" if CUDA else "cpu"
        res = {"host": platform.node(), "cpus": os.cpu_count(), "torch": torch.__version__, "repeat": a.repeat,
               "device_name": torch.cuda.get_device_name() if CUDA else "cpu", "dims": [d, i], "layers": a.layers,
               "runs": [probe_rows(int(m), linears(d, i), dev, a.repeat) for m in a.rows.split(",")],
               "note": a.note}
    write_report(Path(a.out), res, markdown, plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
