"""Summaries of ``long_sweeps.py``'s raw results (render side): per setting and group (all, short,
long, each question type) exact match, F1, forwards, GFLOPs per answer as run, agreement with a
reference; per part the summary JSON; and the stated rules that pick the composed part's candidates
and its best setting."""

from __future__ import annotations

from llada_export import vqa_task
from long_sweeps_common import G, KINDS, REFRESHES, RULES, _balanced, cache_settings


def _groups(samples) -> dict[str, list[int]]:
    g: dict[str, list[int]] = {"all": list(range(len(samples)))}
    for i, s in enumerate(samples):
        g.setdefault(vqa_task.answer_length(s.qtype), []).append(i)
        g.setdefault(s.qtype, []).append(i)
    return g


def summarize_setting(samples, r: dict, per_call: dict, reference: list[str] | None = None) -> dict:
    """Per group (all, short, long, each type): exact, F1, forwards, tokens per forward, GFLOPs per
    answer (as run), and agreement with ``reference`` predictions."""
    from llada_export.flops import answer_flops

    preds = r["predictions"]
    n = len(preds)
    exact_hits = [p.strip() == s.answer for p, s in zip(preds, samples)]
    f1 = [vqa_task.answer_f1(p, s.answer) for p, s in zip(preds, samples)]
    fl = [answer_flops(per_call, {k: r["counts"][k][i] for k in KINDS}) for i in range(n)]
    out = {k: r.get(k) for k in ("name", "path", "block", "cache", "refresh", "rule")}
    out["groups"] = {}
    for g, idx in _groups(samples[:n]).items():
        m = len(idx)
        fw = sum(r["forwards"][i] for i in idx)
        row = {"n": m, "exact": sum(exact_hits[i] for i in idx) / m, "f1": sum(f1[i] for i in idx) / m,
               "forwards": fw / m, "tokens_per_forward": sum(r["ntok"][i] for i in idx) / max(1, fw),
               "gflops": sum(fl[i] for i in idx) / m / 1e9,
               "calls": {k: sum(r["counts"][k][i] for i in idx) / m for k in KINDS}}
        if reference is not None:
            row["agreement"] = sum(preds[i].strip() == reference[i].strip() for i in idx) / m
        out["groups"][g] = row
    lo, hi = vqa_task.wilson(sum(exact_hits), n)
    out["ci95"] = [lo, hi]
    out["seconds"] = r.get("seconds")
    return out


def _cells_ok(raw: dict) -> list[dict]:
    return [c for c in raw.get("cells", []) if "results" in c]


def _samples(c: dict):
    ev = c["eval"]
    return _balanced(ev["split"], ev["per_type"], tuple(ev.get("types") or vqa_task.QTYPES))


def _machine(raw: dict) -> dict:
    return raw.get("machine", {})


def summarize_main(raw: dict) -> dict:
    rows = []
    for c in _cells_ok(raw):
        samples = _samples(c)
        for r in c["results"]:
            rows.append(summarize_setting(samples, r, c["flops_per_call"][r["path"]]))
    return {"part": "main", "machine": _machine(raw), "args": raw.get("args"), "rows": rows,
            "text_only": raw.get("text_only"), "problems": _problems(raw)}


def summarize_prune(raw: dict) -> dict:
    rows, base = [], None
    cells = _cells_ok(raw)
    ref = next((c for c in cells if c["key"] == "unpruned"), None)
    ref_preds = ref["results"][0]["predictions"] if ref else None
    for c in cells:
        samples = _samples(c)
        r = c["results"][0]
        row = summarize_setting(samples, r, c["flops_per_call"][r["path"]], ref_preds)
        p = c["export"]["prune"]
        row.update(key=c["key"], layer=p[0] if p else None, keep=p[1] if p else 1.0, source=p[2] if p else None,
                   export_seconds=c.get("export_seconds"), k_static=c["bucket"]["k_static"])
        if p is None:
            base = row
        rows.append(row)
    att = next((c["analysis"] for c in raw.get("cells", []) if c.get("key") == "attention" and "analysis" in c), None)
    return {"part": "prune", "machine": _machine(raw), "args": raw.get("args"), "rows": rows, "baseline": base,
            "layers": raw.get("layers"), "keeps": raw.get("keeps"), "sources": raw.get("sources"),
            "attention": att, "problems": _problems(raw)}


def summarize_cache(raw: dict) -> dict:
    rows = []
    cells = _cells_ok(raw)
    exact_preds = {}
    for c in cells:
        for r in c["results"]:
            if not r["cache"] and r["rule"] == "none":
                exact_preds[(r["path"], r["block"])] = r["predictions"]
    for c in cells:
        samples = _samples(c)
        for r in c["results"]:
            ref = exact_preds.get((r["path"], G)) or exact_preds.get((r["path"], r["block"]))
            row = summarize_setting(samples, r, c["flops_per_call"][r["path"]], ref)
            rows.append(row)
    order = {n: i for i, n in enumerate(s["name"] for p in ("pruned", "unpruned")
                                        for s in cache_settings(p, raw.get("blocks", [G]), raw.get("refreshes", REFRESHES),
                                                                raw.get("rules", RULES)))}
    rows.sort(key=lambda r: order.get(r["name"], len(order)))
    return {"part": "cache", "machine": _machine(raw), "args": raw.get("args"), "rows": rows,
            "blocks": raw.get("blocks"), "refreshes": raw.get("refreshes"), "rules": raw.get("rules"),
            "prune": raw.get("prune"), "problems": _problems(raw)}


def summarize_composed(raw: dict) -> dict:
    rows = []
    cells = _cells_ok(raw)
    ref = next((c for c in cells if c["key"] == "unpruned exact"), None)
    ref_preds = ref["results"][0]["predictions"] if ref else None
    for c in cells:
        samples = _samples(c)
        for r in c["results"]:
            row = summarize_setting(samples, r, c["flops_per_call"][r["path"]], ref_preds)
            row.update(prune=c["export"]["prune"], key=c["key"])
            rows.append(row)
    best = choose_composed(rows)
    return {"part": "composed", "machine": _machine(raw), "args": raw.get("args"), "rows": rows, "best": best,
            "prunings": raw.get("prunings"), "cache_settings": raw.get("cache_settings"), "problems": _problems(raw)}


def summarize_batch(raw: dict) -> dict:
    cells = {c["export"]["batch"]: c for c in _cells_ok(raw)}
    sizes = sorted(cells)
    out = {"part": "batch", "machine": _machine(raw), "args": raw.get("args"), "dtype": raw.get("dtype"),
           "batch_sizes": sizes, "rows": [], "problems": _problems(raw)}
    if len(sizes) < 2:
        return out
    a, b = cells[sizes[0]], cells[sizes[-1]]
    samples = _samples(a)
    for ra, rb in zip(a["results"], b["results"]):
        ids_a, ids_b = ra["ids"], rb["ids"]
        diff_answers = sum(x != y for x, y in zip(ids_a, ids_b))
        diff_tokens = sum(sum(p != q for p, q in zip(x + [-1] * (G - len(x)), y + [-1] * (G - len(y))))
                          for x, y in zip(ids_a, ids_b))
        total_tokens = sum(max(len(x), len(y)) + 1 for x, y in zip(ids_a, ids_b))
        per_len = {}
        for g, idx in _groups(samples).items():
            if g in ("short", "long"):
                per_len[g] = sum(ids_a[i] != ids_b[i] for i in idx)
        sa = summarize_setting(samples, ra, a["flops_per_call"][ra["path"]])
        sb = summarize_setting(samples, rb, b["flops_per_call"][rb["path"]])
        out["rows"].append({"name": ra["name"], "n": len(ids_a), "differing_answers": diff_answers,
                            "differing_answers_by_length": per_len, "differing_tokens": diff_tokens,
                            "compared_tokens": total_tokens,
                            "exact": {str(sizes[0]): sa["groups"]["all"]["exact"], str(sizes[-1]): sb["groups"]["all"]["exact"]},
                            "exact_long": {str(sizes[0]): sa["groups"].get("long", {}).get("exact"),
                                           str(sizes[-1]): sb["groups"].get("long", {}).get("exact")}})
    return out


def _problems(raw: dict) -> list[str]:
    return [f"{c['key']}: {c.get('error') or c.get('skipped')}" for c in raw.get("cells", [])
            if "error" in c or "skipped" in c]


# ---------------------------------------------------------------------- choices (stated rules)
def _long(row: dict, field: str = "exact") -> float:
    g = row["groups"].get("long") or row["groups"]["all"]
    return g[field]


def pick_prunings(s: dict, top: int) -> list[list]:
    """The ``top`` pruning settings with the fewest FLOPs per answer whose long-answer exact match is
    within 1 point of the unpruned engines'; if none is, the ``top`` most accurate on long answers."""
    base = s["baseline"]
    rows = [r for r in s["rows"] if r["layer"] is not None]
    if not rows or base is None:
        return []
    ok = sorted((r for r in rows if _long(r) >= _long(base) - 0.01), key=lambda r: r["groups"]["all"]["gflops"])
    if not ok:
        ok = sorted(rows, key=lambda r: -_long(r))
    return [[r["layer"], r["keep"], r["source"]] for r in ok[:top]]


def pick_cache_settings(s: dict, top: int) -> list[dict]:
    """The ``top`` cached settings of the pruned path with the fewest FLOPs per answer whose long-answer
    exact match is within 1 point of the exact pruned engines (no cache, fixed schedule, block 32)."""
    rows = [r for r in s["rows"] if r["path"] == "pruned"]
    ref = next((r for r in rows if not r["cache"] and r["block"] == G), None)
    if ref is None:
        return []
    ok = sorted((r for r in rows if r["cache"] and _long(r) >= _long(ref) - 0.01),
                key=lambda r: r["groups"]["all"]["gflops"])
    return [{"block": r["block"], "refresh": r["refresh"], "rule": r["rule"]} for r in ok[:top]]


def choose_composed(rows: list[dict]) -> dict | None:
    """Best composed setting: the fewest FLOPs per answer among the cached pruned settings whose
    long-answer exact match is within 1 point of the exact unpruned engines'; ratios against them."""
    ref = next((r for r in rows if r["path"] == "unpruned"), None)
    cand = [r for r in rows if r["path"] == "pruned" and r["cache"]]
    if ref is None or not cand:
        return None
    ok = [r for r in cand if _long(r) >= _long(ref) - 0.01]
    within = bool(ok)
    best = min(ok, key=lambda r: r["groups"]["all"]["gflops"]) if ok else max(cand, key=_long)
    ga, gr = best["groups"]["all"], ref["groups"]["all"]
    return {"name": best["name"], "prune": best["prune"], "within_1_point": within,
            "exact": {k: best["groups"][k]["exact"] for k in ("all", "short", "long") if k in best["groups"]},
            "reference_exact": {k: ref["groups"][k]["exact"] for k in ("all", "short", "long") if k in ref["groups"]},
            "forwards": ga["forwards"], "reference_forwards": gr["forwards"],
            "gflops": ga["gflops"], "reference_gflops": gr["gflops"],
            "forwards_ratio": gr["forwards"] / ga["forwards"], "flops_ratio": gr["gflops"] / ga["gflops"]}
