"""The engines part's reports (``tools/bench_gpu.py engines``): format 1 (the engine grid against issue 7's
anchor), format 2 (paths against the official code, issue 13's targets) and a column per ``--weights``
variant (issue 22's targets, the step profile)."""

from __future__ import annotations

from pathlib import Path

from llada_export.report import grouped_bars, pyplot, save

# siblings in tools/ (scripts, not a package): bench_gpu.py puts the folder on sys.path
from bench_gpu_common import ANCHOR_IMAGE, OFFICIAL, TARGET, WEIGHTS
from step_profile import markdown_profile


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
    grouped_bars(ax, presets, {label: [fn(p) for p in presets] for label, fn in series})
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
    grouped_bars(ax, presets, dict(series))
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
        lines += [f"Not measured in this run: weights {', '.join(missing)} (no complete group: left out with `--groups`, "
                  "or the run ended before it, e.g. at a device call's time limit; `--resume` with this JSON and "
                  "`--groups` measure the rest).", ""]
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
