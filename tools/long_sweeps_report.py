"""Reports of ``long_sweeps.py``: Markdown tables and plots per part, and ``render``, which writes
``vqa2_<part>.json`` (summaries), ``.md`` and ``.png`` from ``run``'s raw JSONs, or re-renders the
Markdown and PNG from committed summaries (``--replot``)."""

from __future__ import annotations

import json
from pathlib import Path

from llada_export import vqa_task
from llada_export.report import pyplot, save, write_report
from long_sweeps_common import G, RULES, _tool
from long_sweeps_summary import (pick_cache_settings, summarize_batch, summarize_cache, summarize_composed,
                                 summarize_main, summarize_prune)

NAMES = {"main": "vqa2_main", "prune": "vqa2_prune_sweep", "attention": "vqa2_attention", "cache": "vqa2_cache_sweep",
         "composed": "vqa2_composed", "batch": "vqa2_batch_invariance"}


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}"


def _header(s: dict, title: str) -> list[str]:
    m = s.get("machine") or {}
    a = s.get("args") or {}
    lines = [f"# {title}", "",
             f"- demo model v2 (`{a.get('ckpt', '?')}`), task v2 test split (`vqa_task.balanced_split`), "
             f"gen length {G}; engines: {a.get('backend', '?')} on {a.get('device', '?')} "
             f"({m.get('gpu') or m.get('cpu') or '?'}; host `{m.get('host', '?')}`, torch {m.get('torch', '?')}), "
             f"batch {a.get('batch', '?')}, fused sampler, no compile cache"
             + (", eager kernels replayed from CUDA graphs (`compile: False`)" if a.get("backend") == "inductor" else ""),
             "- exact = exact match after stripping; F1 = token F1 (`vqa_task.answer_f1`); short = "
             f"{', '.join(vqa_task.SHORT_TYPES)}; long = {', '.join(vqa_task.LONG_TYPES)}",
             "- GFLOPs per answer as run: vision once + each forward of the answer's row priced by the graph it "
             "used (stage A, full, prefill, cached; `llada_export.flops.graph_flops` for the bucket)"]
    if s.get("problems"):
        lines.append("- not measured: " + "; ".join(s["problems"]))
    return lines + [""]


def _type_cols(row: dict) -> list[str]:
    return [t for t in vqa_task.QTYPES if t in row["groups"]]


def md_main(s: dict) -> str:
    lines = _header(s, "Main accuracy: exact engines on the task-v2 demo model")
    if not s["rows"]:
        return "\n".join(lines + ["No results."]) + "\n"
    types = _type_cols(s["rows"][0])
    lines += ["Exact match % (F1 %) per question type; forwards and GFLOPs per answer.", "",
              "| engines | all | short | long | " + " | ".join(types) + " | forwards | tokens/forward | GFLOPs |",
              "|---|---|---|---|" + "---|" * len(types) + "---|---|---|"]
    for r in s["rows"]:
        g = r["groups"]
        lines.append(f"| {r['name']} | {_pct(g['all']['exact'])} | {_pct(g.get('short', {}).get('exact'))} | "
                     f"{_pct(g.get('long', {}).get('exact'))} | "
                     + " | ".join(f"{_pct(g[t]['exact'])} ({_pct(g[t]['f1'])})" for t in types)
                     + f" | {g['all']['forwards']:.1f} | {g['all']['tokens_per_forward']:.2f} | {g['all']['gflops']:.2f} |")
    t = s.get("text_only")
    if t:
        lines.append("| text-only baseline | " + _pct(t["overall"]) + " | | | "
                     + " | ".join(_pct(t["per_type"].get(x)) for x in types) + " | | | |")
    n = s["rows"][0]["groups"]["all"]["n"]
    lines += ["", f"{n} questions ({s['rows'][0]['groups'][types[0]]['n']} per type). Text-only baseline: the most "
              "frequent answer of each question on these same samples (an upper bound for a guess without the image)."]
    return "\n".join(lines) + "\n"


def md_prune(s: dict) -> str:
    lines = _header(s, "Pruning sweep on long and short answers (K x keep x score source)")
    base = s["baseline"]
    if base is None:
        return "\n".join(lines + ["No unpruned reference."]) + "\n"
    rows = sorted([r for r in s["rows"] if r["layer"] is not None],
                  key=lambda r: (r["layer"], -r["keep"], str(r["source"])))
    types = _type_cols(base)
    bg = base["groups"]
    lines += [f"Exact schedule (gen = block = steps = {G}). Unpruned: short {_pct(bg.get('short', {}).get('exact'))}%, "
              f"long {_pct(bg.get('long', {}).get('exact'))}% exact, {bg['all']['gflops']:.2f} GFLOPs per answer.", "",
              "| K | keep | source | short | long | long F1 | same as unpruned | " + " | ".join(types)
              + " | forwards | GFLOPs | FLOPs saved |",
              "|---|---|---|---|---|---|---|" + "---|" * len(types) + "---|---|---|"]
    for r in [base] + rows:
        g = r["groups"]
        saved = 1 - g["all"]["gflops"] / bg["all"]["gflops"]
        lines.append(f"| {r['layer'] if r['layer'] is not None else '-'} | {r['keep']} | {r['source'] or '-'} | "
                     f"{_pct(g.get('short', {}).get('exact'))} | {_pct(g.get('long', {}).get('exact'))} | "
                     f"{_pct(g.get('long', {}).get('f1'))} | {_pct(g['all'].get('agreement'))} | "
                     + " | ".join(_pct(g[t]["exact"]) for t in types)
                     + f" | {g['all']['forwards']:.1f} | {g['all']['gflops']:.2f} | {100 * saved:.0f}% |")
    lines += ["", "## Where long answers break before short ones", ""] + _breaks(base, rows)
    lines += ["", "## Pruning alone: the target", ""] + _prune_target(base, rows)
    if s.get("attention"):
        lines += ["", "## Attention analysis on long answers", "",
                  f"See `{NAMES['attention']}.md` ({s['attention']['n']} long-answer questions)."]
    return "\n".join(lines) + "\n"


def _rel(r: dict, base: dict, kind: str) -> float | None:
    b = base["groups"].get(kind, {}).get("exact")
    v = r["groups"].get(kind, {}).get("exact")
    return None if not b or v is None else v / b


def _breaks(base: dict, rows: list[dict]) -> list[str]:
    """From the data: per (K, source), the largest keep at which long answers fall below 95% of their
    unpruned exact match, the same for short answers, and each cell's relative accuracy long vs short."""
    out = []
    for key in sorted({(r["layer"], r["source"]) for r in rows}):
        rs = sorted([r for r in rows if (r["layer"], r["source"]) == key], key=lambda r: -r["keep"])
        rel = [(r["keep"], _rel(r, base, "long") or 0.0, _rel(r, base, "short") or 0.0) for r in rs]
        lk = next((k for k, lo, _ in rel if lo < 0.95), None)
        sk = next((k for k, _, sh in rel if sh < 0.95), None)
        when = ("long answers hold" if lk is None else "before short ones" if sk is None or sk < lk
                else "together with short ones" if sk == lk else "after short ones")
        cells = ", ".join(f"keep {k}: long {100 * lo:.0f}% / short {100 * sh:.0f}%" for k, lo, sh in rel)
        brk = (f"long break at keep {lk}, short at " + (f"keep {sk}" if sk is not None else "none tested")
               if lk is not None else f"long answers hold >= 95% down to keep {rel[-1][0]}")
        out.append(f"- K={key[0]}, {key[1]}: {brk}: **{when}** (of unpruned: {cells}).")
    n = len(rows)
    worse = sum((_rel(r, base, "long") or 0.0) < (_rel(r, base, "short") or 0.0) for r in rows)
    before = sum("**before short ones**" in x for x in out)
    out.append(f"- Long answers break at a larger keep than short ones in {before} of {len(out)} (K, source) series "
               f"(break = below 95% of the unpruned exact match), and lose a larger share of their unpruned accuracy "
               f"than short ones in {worse} of {n} pruned cells.")
    return out


def _prune_target(base: dict, rows: list[dict]) -> list[str]:
    bl = base["groups"]["all"]["gflops"]
    ok = [r for r in rows if (_rel(r, base, "long") or 0) >= 0.95]
    hit = [r for r in ok if 1 - r["groups"]["all"]["gflops"] / bl >= 0.40]
    if hit:
        b = min(hit, key=lambda r: r["groups"]["all"]["gflops"])
        return [f"Target met: K={b['layer']} keep {b['keep']} source {b['source']} keeps "
                f"{_pct(_rel(b, base, 'long'))}% of the unpruned long-answer accuracy with "
                f"{100 * (1 - b['groups']['all']['gflops'] / bl):.0f}% fewer FLOPs per answer."]
    if not ok:
        return ["No pruned setting keeps >= 95% of the unpruned long-answer accuracy."]
    b = min(ok, key=lambda r: r["groups"]["all"]["gflops"])
    return [f"Target (>= 95% of unpruned on long answers at >= 40% fewer FLOPs) not met; the measured frontier: "
            f"K={b['layer']} keep {b['keep']} source {b['source']}, {_pct(_rel(b, base, 'long'))}% at "
            f"{100 * (1 - b['groups']['all']['gflops'] / bl):.0f}% fewer FLOPs."]


def md_cache(s: dict) -> str:
    lines = _header(s, "Prefix cache x parallel decoding on long and short answers")
    p = s.get("prune")
    lines += [f"Pruned path: K={p[0]}, keep {p[1]}, source {p[2]}. Exact = no cache, fixed schedule (one token per "
              "forward); agreement = answers identical to the exact engines of the same path at block 32. Refresh "
              "N = the cache refreshed every N forwards and at each block start (never: block starts only; a refresh "
              ">= the block length is never). Cells: long exact % / agreement % / forwards / tokens per forward / "
              "GFLOPs per answer; short exact % below.", ""] if p else []
    for path in ("pruned", "unpruned"):
        for block in s.get("blocks") or [G]:
            rows = [r for r in s["rows"] if r["path"] == path and r["block"] == block]
            ex = next((r for r in rows if not r["cache"]), None)
            if ex is None:
                continue
            e = ex["groups"]
            lines += [f"## {path}, block {block}: exact long {_pct(e.get('long', {}).get('exact'))}%, short "
                      f"{_pct(e.get('short', {}).get('exact'))}%, {e['all']['forwards']:.1f} forwards, "
                      f"{e['all']['gflops']:.2f} GFLOPs", ""]
            refreshes = list(dict.fromkeys(r["refresh"] for r in rows if r["cache"]))
            lines += ["| rule | " + " | ".join(f"refresh {x}" for x in refreshes) + " |",
                      "|---|" + "---|" * len(refreshes)]
            for rule in s.get("rules") or RULES:
                cells = []
                for x in refreshes:
                    r = next((r for r in rows if r["cache"] and r["rule"] == rule and r["refresh"] == x), None)
                    if r is None:
                        cells.append("-")
                        continue
                    g = r["groups"]
                    lg = g.get("long", g["all"])
                    cells.append(f"{_pct(lg['exact'])} / {_pct(g['all'].get('agreement'))} / {g['all']['forwards']:.1f} / "
                                 f"{g['all']['tokens_per_forward']:.2f} / {g['all']['gflops']:.2f}<br>short "
                                 f"{_pct(g.get('short', {}).get('exact'))}")
                lines.append(f"| {rule} | " + " | ".join(cells) + " |")
            lines.append("")
    picks = pick_cache_settings(s, 3)
    lines += ["## Cheapest settings within 1 point of exact (pruned path, long answers)", ""]
    lines += [f"- block {c['block']}, refresh {c['refresh']}, {c['rule']}" for c in picks] or ["- none"]
    return "\n".join(lines) + "\n"


def md_composed(s: dict) -> str:
    lines = _header(s, "The best composed setting (pruning + cache + parallel rule) against exact unpruned")
    lines += ["Rule: among the cheapest pruning settings of the pruning sweep that stay within 1 point of unpruned on "
              "long answers, combined with the cheapest cached parallel settings of the cache sweep that stay within "
              "1 point of the exact pruned engines, the one with the fewest FLOPs per answer whose long-answer exact "
              "match is within 1 point of exact unpruned engines (if none is, the most accurate on long answers).", "",
              "| engines | setting | all | short | long | long F1 | same as exact unpruned | forwards | tokens/forward "
              "| GFLOPs |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in s["rows"]:
        g = r["groups"]
        lines.append(f"| {r['key']} | {r['name']} | {_pct(g['all']['exact'])} | {_pct(g.get('short', {}).get('exact'))} "
                     f"| {_pct(g.get('long', {}).get('exact'))} | {_pct(g.get('long', {}).get('f1'))} | "
                     f"{_pct(g['all'].get('agreement'))} | {g['all']['forwards']:.1f} | "
                     f"{g['all']['tokens_per_forward']:.2f} | {g['all']['gflops']:.2f} |")
    b = s.get("best")
    lines.append("")
    if b:
        lines.append(f"**Best: {b['name']} on K={b['prune'][0]} keep {b['prune'][1]} source {b['prune'][2]}**"
                     + ("" if b["within_1_point"] else " (none within 1 point: the most accurate)")
                     + f": long {_pct(b['exact'].get('long'))}% vs {_pct(b['reference_exact'].get('long'))}% exact "
                     f"unpruned, short {_pct(b['exact'].get('short'))}% vs {_pct(b['reference_exact'].get('short'))}%; "
                     f"{b['forwards']:.1f} vs {b['reference_forwards']:.1f} forwards per answer "
                     f"(**{b['forwards_ratio']:.1f}x fewer**), {b['gflops']:.2f} vs {b['reference_gflops']:.2f} GFLOPs "
                     f"per answer (**{b['flops_ratio']:.1f}x fewer**). Targets: within 1 point on long answers, >= 3x "
                     "fewer forwards, >= 4x fewer FLOPs.")
    else:
        lines.append("No composed setting was measured.")
    return "\n".join(lines) + "\n"


def md_batch(s: dict) -> str:
    lines = _header(s, f"Batch invariance of the {s.get('dtype')} engines: batch "
                       + " vs ".join(map(str, s.get("batch_sizes") or [])))
    lines += ["Same questions, same engines' settings; only the batch size of the export differs. A differing "
              "answer: any token differs; tokens compared position by position up to the longer answer and its "
              "<|eot_id|>.", "",
              "| setting | questions | differing answers | short / long | differing tokens | exact % per batch size |",
              "|---|---|---|---|---|---|"]
    for r in s["rows"]:
        bl = r["differing_answers_by_length"]
        lines.append(f"| {r['name']} | {r['n']} | {r['differing_answers']} ({100 * r['differing_answers'] / r['n']:.1f}%) "
                     f"| {bl.get('short', 0)} / {bl.get('long', 0)} | {r['differing_tokens']} of {r['compared_tokens']} "
                     f"({100 * r['differing_tokens'] / max(1, r['compared_tokens']):.2f}%) | "
                     + ", ".join(f"B={k}: {_pct(v)}" for k, v in r["exact"].items()) + " |")
    return "\n".join(lines) + "\n"


def plot_main(s: dict, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    if s["rows"]:
        types = _type_cols(s["rows"][0])
        w = 0.8 / (len(s["rows"]) + 1)
        for j, r in enumerate(s["rows"]):
            ax.bar([i + j * w for i in range(len(types))], [100 * r["groups"][t]["exact"] for t in types], w, label=r["name"])
        if s.get("text_only"):
            j = len(s["rows"])
            ax.bar([i + j * w for i in range(len(types))], [100 * s["text_only"]["per_type"].get(t, 0) for t in types], w,
                   label="text-only baseline", color="grey")
        ax.set_xticks([i + 0.4 - w / 2 for i in range(len(types))], types)
    ax.set_ylabel("exact match %")
    ax.legend(fontsize=8)
    ax.set_title("task-v2 demo model: exact match per question type", fontsize=10)
    save(fig, path)


def plot_prune(s: dict, path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    base = s["baseline"]
    for ax, kind in zip(axes, ("short", "long")):
        if base is None:
            continue
        for (layer, src) in sorted({(r["layer"], r["source"]) for r in s["rows"] if r["layer"] is not None}):
            rs = sorted([r for r in s["rows"] if (r["layer"], r["source"]) == (layer, src)],
                        key=lambda r: r["groups"]["all"]["gflops"])
            ax.plot([r["groups"]["all"]["gflops"] for r in rs], [100 * r["groups"].get(kind, r["groups"]["all"])["exact"]
                                                                   for r in rs], "o-", ms=3, label=f"K={layer} {src}")
        bg = base["groups"]
        ax.plot([bg["all"]["gflops"]], [100 * bg.get(kind, bg["all"])["exact"]], "k*", ms=12, label="unpruned")
        ax.set_title(f"{kind} answers", fontsize=10)
        ax.set_xlabel("GFLOPs per answer (as run)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("exact match %")
    axes[1].legend(fontsize=7, ncol=2)
    save(fig, path)


def plot_cache(s: dict, path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    rules = s.get("rules") or RULES
    for ax, block in zip(axes, (s.get("blocks") or [G])[:2]):
        for r in s["rows"]:
            if r["block"] != block:
                continue
            lg = r["groups"].get("long", r["groups"]["all"])
            marker = "o" if r["path"] == "pruned" else "s"
            color = "black" if not r["cache"] else f"C{rules.index(r['rule']) % 10}" if r["rule"] in rules else "grey"
            ax.scatter(r["groups"]["all"]["forwards"], 100 * lg["exact"], marker=marker, s=40 if not r["cache"] else 14,
                       color=color, alpha=0.7)
        for i, rule in enumerate(rules):
            ax.scatter([], [], color=f"C{i % 10}", label=rule, s=14)
        ax.set_title(f"block {block} (o pruned, s unpruned, black: exact)", fontsize=10)
        ax.set_xlabel("forwards per answer")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("long-answer exact match %")
    axes[-1].legend(fontsize=7)
    save(fig, path)


def plot_composed(s: dict, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in s["rows"]:
        g = r["groups"]
        ax.scatter(g["all"]["gflops"], 100 * g.get("long", g["all"])["exact"],
                   marker="*" if r["path"] == "unpruned" else "o", s=80 if r["path"] == "unpruned" else 20)
    b = s.get("best")
    if b:
        ax.scatter([b["gflops"]], [100 * b["exact"].get("long", b["exact"]["all"])], s=160, facecolors="none",
                   edgecolors="red", label=f"best: {b['name']}")
        ax.legend(fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("GFLOPs per answer (as run)")
    ax.set_ylabel("long-answer exact match %")
    ax.grid(alpha=0.3)
    save(fig, path)


def plot_batch(s: dict, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = [r["name"] for r in s["rows"]]
    ax.barh(names, [100 * r["differing_answers"] / max(1, r["n"]) for r in s["rows"]])
    ax.set_xlabel("% answers that differ between batch sizes")
    save(fig, path)


RENDER = {"main": (summarize_main, md_main, plot_main), "prune": (summarize_prune, md_prune, plot_prune),
          "cache": (summarize_cache, md_cache, plot_cache), "composed": (summarize_composed, md_composed, plot_composed),
          "batch": (summarize_batch, md_batch, plot_batch)}


def render(src: Path, out: Path, replot: bool = False) -> list[Path]:
    """Summaries + Markdown + PNG of every part found in ``src`` (raw JSONs of ``run``), into ``out``;
    ``replot``: from the summaries already in ``out``."""
    written = []
    att = out / NAMES["attention"]
    if replot and att.with_suffix(".json").exists():
        aa = _tool("attention_analysis")
        write_report(att, None, aa.markdown, aa.plot)
        written.append(att)
    for part, (summarize, md, plot) in RENDER.items():
        name = out / NAMES[part]
        if replot:
            if not name.with_suffix(".json").exists():
                continue
            write_report(name, None, md, plot)
        else:
            raw_path = src / f"{part}.json"
            if not raw_path.exists():
                continue
            s = summarize(json.loads(raw_path.read_text()))
            if part == "prune" and s.get("attention"):
                att = s.pop("attention")
                aa = _tool("attention_analysis")
                write_report(out / NAMES["attention"], att, aa.markdown, aa.plot)
                s["attention"] = {"n": att["n"], "file": NAMES["attention"]}
                written.append(out / NAMES["attention"])
            write_report(name, s, md, plot)
        written.append(name)
    return written
