"""Issue 23 item 5 in one table: tokens/s of pruned + cache and unpruned + cache at each batch size, from two
``tools/bench_gpu.py batch`` runs of one lease (``tools/gpu_lease.sh`` scaleall), and the largest batch each path
fits on the card, from the compiled engines' measured peaks.

The peak memory of a batch (``torch.cuda.max_memory_allocated`` over its requests, the weights included) grows
linearly with B; a least-squares line through the measured rows gives the bytes per request, and the largest
batch is the B whose line stays under the card's memory less the export's 5% headroom
(``llada_export/exporter/capacity.py``). That is an extrapolation past the largest batch run, said as such.

    python tools/bench_gpu_scale.py --pruned OUT/scaleall/pruned/bench_gpu_batch.json \
        --unpruned OUT/scaleall/unpruned/bench_gpu_batch.json --out benchmarks/bench_gpu_batch_scale_paths

writes ``<out>.json``, ``.md`` and ``.png``; ``--replot`` re-renders the last two from ``<out>.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from llada_export.exporter.capacity import HEADROOM  # noqa: E402
from llada_export.report import pyplot, save, write_report  # noqa: E402

PATHS = ("pruned+cache", "unpruned+cache")
TARGET_B8 = 2.2  # issue 23: tokens/s at B = 8 over B = 1, pruned + cache
DEFAULT_OUT = "bench_gpu_batch_scale_paths"  # the report's name in its reproduce line (JSON written before out_name)
TARGET_FIT = 2.0  # issue 23: pruned fits >= 2x the concurrent requests of unpruned


def fit_line(rows: list[dict]) -> tuple[float, float] | None:
    """(GiB at B = 0, GiB per request) of the least-squares line through the rows' peaks; None under two rows."""
    pts = [(r["batch_size"], r["peak_gib"]) for r in rows if r.get("peak_gib") == r.get("peak_gib")]  # NaN: CPU
    if len({b for b, _ in pts}) < 2:
        return None
    n, sx, sy = len(pts), sum(b for b, _ in pts), sum(g for _, g in pts)
    sxx, sxy = sum(b * b for b, _ in pts), sum(b * g for b, g in pts)
    slope = (n * sxy - sx * sy) / (n * sxx - sx * sx)
    return (sy - slope * sx) / n, slope


def combine(runs: dict[str, dict], card_gib: float | None) -> dict:
    """The report's JSON: both paths' rows by batch size, the ratios, the fitted memory and largest batch."""
    envs = {p: r["env"] for p, r in runs.items()}
    hosts = {(e["gpu"], e["host"], e["date"]) for e in envs.values()}
    card = card_gib or next((e.get("gpu_memory_gib") for e in envs.values() if e.get("gpu_memory_gib")), None)
    res = {"env": envs[PATHS[0]], "one_machine": len(hosts) == 1, "hosts": sorted(map(list, hosts)),
           "setting": runs[PATHS[0]]["setting"], "model": runs[PATHS[0]].get("model", {}), "card_gib": card,
           "headroom": HEADROOM, "paths": {}}
    for path, run in runs.items():
        rows = sorted(run["rows"], key=lambda r: r["batch_size"])
        base = next((r for r in rows if r["batch_size"] == 1), None)
        line = fit_line(rows)
        largest = None
        if line and card and line[1] > 0:  # a flat or falling line (noise, or one size twice) says nothing
            largest = int((card * (1 - HEADROOM) - line[0]) // line[1])
        res["paths"][path] = {
            "rows": [{"batch_size": r["batch_size"], "seconds": r["seconds"], "tokens_per_s": r["tokens_per_s"],
                      "x_b1": r["tokens_per_s"] / base["tokens_per_s"] if base else None,
                      "tflop_per_s": r.get("tflop_per_s"), "peak_gib": r["peak_gib"], "export_s": r.get("export_s"),
                      "per_call_ms": {k[:-9]: v * 1e3 for k, v in r["timings"].items() if k.endswith("_per_call")}}
                     for r in rows],
            "not_exported": run.get("not_exported", []), "matmul_peak_tflops": run.get("matmul_peak_tflops"),
            "gib_at_0": line[0] if line else None, "gib_per_request": line[1] if line else None,
            "largest_batch": largest, "largest_run": max((r["batch_size"] for r in rows), default=None)}
    p, u = (res["paths"].get(k) for k in PATHS)
    if p and u and p["largest_batch"] and u["largest_batch"]:
        res["fit_ratio"] = p["largest_batch"] / u["largest_batch"]
    return res


def weights_line(res: dict) -> str:
    m = res.get("model", {})
    if m.get("preset", "full") == "full":
        return f"Random {m.get('dtype', 'bfloat16').replace('bfloat16', 'bf16')} weights, full LLaDA-V dimensions"
    return f"Random {m.get('dtype')} weights, the '{m.get('preset')}' preset's dimensions (a smoke run)"


def markdown(res: dict) -> str:
    e, st = res["env"], res["setting"]
    lines = ["# Batch scale, pruned + cache against unpruned + cache (issue 23 item 5)", "",
             f"Machine: {e['gpu']}, torch {e['torch']}, CUDA {e['cuda']}, host {e['host']}, {e['date']}"
             + ("" if res["one_machine"] else f" (NOT one machine: {res['hosts']})") + f". {weights_line(res)}, preset {st['preset']}, image {st['image']}, K {st['prune_layer']}, keep {st['keep']} "
             f"(pruned), refresh {st['refresh']}, factor {st['factor']}; one compiled engine set (inductor, CUDA "
             "graphs) per path and batch size, a batch of B requests of distinct images; seconds: median of the timed "
             "batches after one untimed.", "",
             "| B | pruned + cache s | tokens/s | x B=1 | peak GiB | unpruned + cache s | tokens/s | x B=1 | peak GiB "
             "| pruned / unpruned tokens/s |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    by = {path: {r["batch_size"]: r for r in d["rows"]} for path, d in res["paths"].items()}
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    for b in sorted({b for rows in by.values() for b in rows}):
        p, u = (by.get(k, {}).get(b) for k in PATHS)
        cells = []
        for r in (p, u):
            cells += ["-"] * 4 if r is None else [f"{r['seconds']:.3f}", f"{r['tokens_per_s']:.1f}",
                                                   fmt(r["x_b1"], ".2f"), f"{r['peak_gib']:.1f}"]
        ratio = fmt(p["tokens_per_s"] / u["tokens_per_s"] if p and u else None, ".2f")
        lines.append(f"| {b} | " + " | ".join(cells) + f" | {ratio} |")
    for path, d in res["paths"].items():
        if d["not_exported"]:
            lines += ["", f"{path}: B = {', '.join(map(str, d['not_exported']))} not measured (no engine set: its "
                      "export was cut by the deadline or failed)."]
    lines += ["", "Per call (ms), each path at each B:", ""]
    for path, d in res["paths"].items():
        lines += [f"- {path}: " + "; ".join(f"B {r['batch_size']}: " + ", ".join(f"{k} {v:.2f}" for k, v in
                                                                              r["per_call_ms"].items())
                                           for r in d["rows"])]
    p = res["paths"].get(PATHS[0], {})
    b8 = next((r for r in p.get("rows", []) if r["batch_size"] == 8), None)
    if b8 and b8["x_b1"]:
        lines += ["", f"**Target: pruned + cache tokens/s at B = 8 >= {TARGET_B8}x B = 1: {b8['x_b1']:.2f}x "
                  f"({'met' if b8['x_b1'] >= TARGET_B8 else 'NOT met'}).**"]
        best = max(p["rows"], key=lambda r: r["tokens_per_s"])
        lines += [f"The most tokens/s: B = {best['batch_size']}, {best['tokens_per_s']:.1f} ({best['x_b1']:.2f}x B = 1)."]
    if res["card_gib"]:
        lines += ["", f"**Largest batch on this card** ({res['card_gib']:.1f} GiB, less the export's "
                  f"{100 * res['headroom']:.0f}% headroom), from a least-squares line through the measured peaks "
                  "(weights included; an extrapolation past the largest batch run). The benchmark process also "
                  "holds its random model's unfused q/k/v and gate/up weights (9.0 GiB) beside the engines' "
                  "fused copies; a server loading a checkpoint frees them (`runtime/weights.py`), so its line starts "
                  "lower and these largest batches are conservative:", "",
                  "| path | GiB at B = 0 | GiB per request | largest batch run | largest batch by the line |",
                  "| --- | --- | --- | --- | --- |"]
        for path, d in res["paths"].items():
            lines.append(f"| {path} | {fmt(d['gib_at_0'], '.2f')} | {fmt(d['gib_per_request'], '.3f')} | "
                         f"{d['largest_run']} | {fmt(d['largest_batch'], 'd')} |")
        if "fit_ratio" in res:
            lines += ["", f"**Target: pruned fits >= {TARGET_FIT:.0f}x the concurrent requests of unpruned: "
                      f"{res['fit_ratio']:.2f}x ({'met' if res['fit_ratio'] >= TARGET_FIT else 'NOT met'}).**"]
    if res.get("note"):
        lines += ["", res["note"]]
    lines += ["", "Reproduce: `bash tools/gpu_lease.sh start scaleall` on the GPU machine, then "
              "`python tools/bench_gpu_scale.py --pruned OUT/scaleall/pruned/bench_gpu_batch.json --unpruned "
              f"OUT/scaleall/unpruned/bench_gpu_batch.json --out benchmarks/{res.get('out_name', DEFAULT_OUT)}`."]
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    plt = pyplot()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for color, (name, d) in zip(("tab:blue", "tab:orange"), res["paths"].items()):  # one colour per path
        b = [r["batch_size"] for r in d["rows"]]
        ax.plot(b, [r["tokens_per_s"] for r in d["rows"]], "o-", color=color, label=name)
        ax2.plot(b, [r["peak_gib"] for r in d["rows"]], "o", color=color, label=f"{name} measured")
        if d["gib_per_request"] and d["largest_batch"]:
            xs = [0, d["largest_batch"]]
            ax2.plot(xs, [d["gib_at_0"] + d["gib_per_request"] * x for x in xs], "--", color=color, lw=1,
                     label=f"{name} line")
    ax.set_xlabel("batch size")
    ax.set_ylabel("tokens/s")
    ax.set_title(f"tokens/s, {res['env']['gpu']}", fontsize=9)
    ax.legend(fontsize=7)
    if res["card_gib"]:
        ax2.axhline(res["card_gib"] * (1 - res["headroom"]), color="gray", lw=1, label="card less headroom")
    ax2.set_xlabel("batch size")
    ax2.set_ylabel("peak GiB (weights included)")
    ax2.set_title("peak memory per batch", fontsize=9)
    ax2.legend(fontsize=7)
    save(fig, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pruned", help="bench_gpu.py batch JSON of --paths pruned+cache")
    p.add_argument("--unpruned", help="bench_gpu.py batch JSON of --paths unpruned+cache (same lease)")
    p.add_argument("--card-gib", type=float, help="the card's memory (default: from the JSON's env)")
    p.add_argument("--note", help="a paragraph on how the two runs were made (kept in the JSON)")
    p.add_argument("--out", required=True, help="output path without suffix")
    p.add_argument("--replot", action="store_true", help="re-render <out>.md and .png from <out>.json")
    a = p.parse_args(argv)
    out, res = Path(a.out), None  # None (--replot): write_report reads <out>.json back
    if not a.replot:
        if not (a.pruned and a.unpruned):
            p.error("give --pruned and --unpruned (or --replot)")
        runs = {}
        for path, f in zip(PATHS, (a.pruned, a.unpruned)):
            run = json.loads(Path(f).read_text())
            if run.get("part") != "batch" or run.get("path") != path:
                p.error(f"{f}: not a bench_gpu.py batch run of {path} (it is {run.get('part')} {run.get('path')})")
            runs[path] = run
        res = combine(runs, a.card_gib)
        res["note"] = a.note
        res["out_name"] = out.name
    write_report(out, res, markdown, plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
