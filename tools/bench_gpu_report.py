"""The reports of ``tools/bench_gpu.py``: the Markdown and the plot of each part (the engines part's in
``bench_gpu_report_engines.py``), from the part's JSON alone (``--replot``)."""

from __future__ import annotations

from pathlib import Path

from llada_export.report import pyplot, save

# siblings in tools/ (scripts, not a package): bench_gpu.py puts the folder on sys.path
from bench_gpu_batch import derive_batch
from bench_gpu_report_engines import (markdown_engines, markdown_engines_v1, markdown_variants,
                                      plot_engines, plot_engines_v1)
from step_profile import markdown_profile, plot_profile


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


def markdown_batch(res: dict) -> list[str]:
    res = derive_batch(res)
    st = res["setting"]
    lines = [f"Path {res['path']} ({'compiled' if res['compiled'] else 'eager kernels'} in CUDA graphs, "
             f"{res['backend']} backend), preset {st['preset']}, image {st['image']}, "
             + ("no pruning" if res["path"].startswith("unpruned") else f"K {st['prune_layer']}, keep {st['keep']}")
             + f", refresh {st['refresh']}, factor {st['factor']}; one engine set per batch size, a batch of "
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
    if res.get("not_exported"):
        lines += ["", f"Not measured (no engine set: the export was cut by the deadline or failed): B = "
                  f"{', '.join(map(str, res['not_exported']))}."]
    if res.get("prebuilt"):
        lines += ["", "The engine sets were exported by `--export-only` processes side by side before the timings "
                  "(`export s` per set in the JSON), then timed one at a time by one process."]
    if notes := [(r["batch_size"], n) for r in res["rows"] for n in r.get("export_notes", [])]:
        lines += ["", "The export's notes of what it did otherwise than asked:", ""]
        lines += [f"- B = {b}: {n}" for b, n in notes]
    b8 = next((r for r in res["rows"] if r["batch_size"] == 8 and r.get("speedup_vs_b1")), None)
    if b8:
        lines += ["", f"Target (issue 23; issue 14 asked 1.6x): B = 8 at >= 2.2x the tokens/s of B = 1: measured "
                  f"{b8['speedup_vs_b1']:.2f}x ({'met' if b8['speedup_vs_b1'] >= 2.2 else 'NOT met'})."]
        if b8["speedup_vs_b1"] < 2.2 and "tflop_per_s" in b8:
            lines += ["", compute_bound(res, b8)]
    if (m := res.get("multi")) and m.get("vs_b1_engines"):
        lines += ["", f"A lone request on one directory of batch sizes {m['batch_sizes']} (it ran on batch size "
                  f"{m['engine_batch_size']:g}): {m['seconds']:.3f} s, {m['vs_b1_engines']:.3f}x the batch-1 engines' "
                  f"latency (target within 10%: {'met' if m['vs_b1_engines'] <= 1.1 else 'NOT met'}); same answer as "
                  f"B = 1: {same_answer(m, res['rows'])}."]
    return lines


def compute_bound(res: dict, b8: dict) -> str:
    """What 2.2x at B = 8 asks of the GPU: the same FLOPs per token, so 2.2x B = 1's TFLOP/s over the whole
    request, against the measured matmul peak (B = 1 reads the weights once a step: bound by memory)."""
    b1 = next(r for r in res["rows"] if r["batch_size"] == 1)
    need = 2.2 * b1["tflop_per_s"] * b8["tflops"] / (8 * b1["tflops"])  # same work per request at B = 8
    peak = res["matmul_peak_tflops"]
    return (f"Why: B = 1 ran at {b1['tflop_per_s']:.0f} TFLOP/s ({100 * b1['tflop_per_s'] / peak:.0f}% of the measured "
            f"matmul peak; its cached step reads the weights for one row's block), B = 8 at {b8['tflop_per_s']:.0f} "
            f"({100 * b8['tflop_per_s'] / peak:.0f}%: bound by compute). 2.2x at B = 8 would take {need:.0f} TFLOP/s "
            f"over the whole request, {100 * need / peak:.0f}% of the peak measured by one large bf16 matmul.")


def same_answer(multi: dict, rows: list[dict]) -> str:
    """'yes', or how many of the answer's tokens differ from the batch-1 engines' (both ids are in the JSON)."""
    if multi["same_answer_as_b1"]:
        return "yes"
    b1 = next((r for r in rows if r["batch_size"] == 1 and "ids" in r), None)
    if b1 is None or "ids" not in multi:
        return "no"
    a, b = b1["ids"][0], multi["ids"][0]
    diff = [i for i, (x, y) in enumerate(zip(a, b)) if x != y]
    return (f"no, {len(diff)} of {len(a)} tokens differ, the first at position {diff[0]} (two engine sets compiled "
            "separately, random weights: see the README's note on bitwise reproducibility)") if diff else "no"


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
