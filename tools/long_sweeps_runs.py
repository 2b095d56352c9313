"""Driver side of ``long_sweeps.py``: the ``Runner`` that runs cells in worker processes within a time
budget per part, and each part's cells (``part_main``, ``part_prune``, ``part_cache``, ``part_composed``,
``part_batch``), returning its raw results."""

from __future__ import annotations

import shutil
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

from llada_export import vqa_task
from long_sweeps_common import G, _balanced, _split_args, cache_settings, cell, exact, setting
from long_sweeps_summary import pick_cache_settings, pick_prunings, summarize_cache, summarize_prune
from long_sweeps_worker import _init_worker, run_cell


class Runner:
    """Runs cells in ``workers`` spawned processes (0: in this process), with a time budget per part."""

    def __init__(self, common: dict, workers: int, log):
        self.common, self.workers, self.log = common, workers, log
        self.pool, self.broken = None, False
        if workers > 0:
            import multiprocessing as mp

            self.pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                                            initargs=(common,))
        else:
            _init_worker(common)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)

    def run(self, cells: list[dict], budget: float, part: str) -> list[dict]:
        """Every cell's result, in the order given; cells not started within ``budget`` seconds are
        returned as skipped."""
        t0 = time.perf_counter()
        done: dict[int, dict] = {}
        if self.pool is None:
            for i, c in enumerate(cells):
                if time.perf_counter() - t0 > budget:
                    done[i] = {"key": c["key"], "part": part, "skipped": "time budget"}
                    continue
                done[i] = run_cell(c)
                self._report(part, done[i], t0)
        else:
            futs = {self.pool.submit(run_cell, c): i for i, c in enumerate(cells)}
            pending = set(futs)
            while pending:
                left = budget - (time.perf_counter() - t0)
                timeout = None if left == float("inf") else max(left, 0.0)
                finished, pending = wait(pending, timeout=timeout, return_when=FIRST_COMPLETED)
                for f in finished:
                    done[futs[f]] = self._result(f, cells[futs[f]], part)
                    if done[futs[f]] is not None:
                        self._report(part, done[futs[f]], t0)
                if time.perf_counter() - t0 > budget and pending:
                    n = sum(f.cancel() for f in pending)
                    self.log(f"{part}: time budget {budget:.0f} s spent: {n} cells not started, "
                             f"{len(pending) - n} running are awaited")
                    budget = float("inf")
            for f, i in futs.items():
                if f.cancelled():
                    done[i] = {"key": cells[i]["key"], "part": part, "skipped": "time budget"}
            if self.broken:  # a worker died (a crash, not a Python error): a fresh pool for the next part
                self.close()
                self.__init__(self.common, self.workers, self.log)
        return [done[i] for i in range(len(cells))]

    def _result(self, f, c: dict, part: str) -> dict | None:
        if f.cancelled():
            return None
        try:
            return f.result()
        except Exception as e:  # noqa: BLE001 - the worker process died (BrokenProcessPool)
            self.broken = True
            return {"key": c["key"], "part": part, "error": f"{type(e).__name__}: {e}"}

    def _report(self, part: str, r: dict, t0: float) -> None:
        if "error" in r:
            self.log(f"{part}: {r['key']}: ERROR {r['error']}\n{r.get('traceback', '')}")
            return
        bits = [f"{k.split('_')[0]} {r[k]:.1f} s" for k in ("export_seconds", "load_seconds") if k in r]
        if "gpu_peak_gib" in r:
            bits.append(f"GPU peak {r['gpu_peak_gib']} GiB")
        for s in r.get("results", [])[:3]:
            samples = _balanced(*_split_args(r, s))
            acc = vqa_task.score(samples, s["predictions"]).get("per_length", {})
            bits.append(f"{s['name']}: " + " ".join(f"{k} {v:.1%}" for k, v in acc.items())
                        + f", {sum(s['forwards']) / len(s['forwards']):.1f} fwd, {s['seconds']:.1f} s")
        if len(r.get("results", [])) > 3:
            bits.append(f"... {len(r['results'])} settings")
        self.log(f"{part}: {r['key']} ({r.get('seconds', 0):.1f} s, pid {r.get('pid')}): " + "; ".join(bits))


def _attach_eval(results: list[dict], cells: list[dict]) -> list[dict]:
    for r, c in zip(results, cells):
        r.setdefault("eval", c["eval"])
        r.setdefault("export", c.get("export"))
    return results


# ---------------------------------------------------------------------- parts
def part_main(run: Runner, a, budget: float) -> dict:
    ev = {"split": "test", "per_type": a.main_per_type}
    exp = {"baseline": False, "cache": False, "dtype": a.dtype, "batch": a.batch}
    cells = [cell("main", "unpruned", exp | {"prune": None}, [exact("unpruned")], ev),
             cell("main", "pruned", exp | {"prune": a.demo_prune}, [exact("pruned")], ev)]
    res = _attach_eval(run.run(cells, budget, "main"), cells)
    samples = vqa_task.balanced_split("test", a.main_per_type)
    return {"cells": res, "text_only": vqa_task.text_only_baseline(samples)}


def part_prune(run: Runner, a, budget: float) -> dict:
    ev = {"split": "test", "per_type": a.per_type}
    base = {"cache": False, "dtype": a.dtype, "batch": a.batch, "baseline": False}
    cells = []
    if a.attention_n:  # the longest cell: first
        cells.append({"part": "prune", "key": "attention", "task": "attention", "eval": ev, "export": None,
                      "attention": {"n": a.attention_n, "layers": a.attention_layers or a.layers,
                                    "keeps": a.attention_keeps, "types": list(vqa_task.LONG_TYPES)}})
    cells.append(cell("prune", "unpruned", base | {"prune": None}, [exact("unpruned")], ev))
    for layer in a.layers:
        for keep in a.keeps:
            for src in a.sources:
                cells.append(cell("prune", f"K={layer} keep={keep} src={src}", base | {"prune": [layer, keep, src]},
                                  [exact("pruned")], ev))
    res = _attach_eval(run.run(cells, budget, "prune"), cells)
    return {"cells": res, "layers": a.layers, "keeps": a.keeps, "sources": a.sources}


def part_cache(run: Runner, a, budget: float) -> dict:
    t0 = time.perf_counter()
    ev = {"split": "test", "per_type": a.per_type}
    exp = {"prune": a.demo_prune, "baseline": True, "cache": True, "dtype": a.dtype, "batch": a.batch}
    (built,) = run.run([cell("cache", "cache engines", exp, [], ev, keep_engines=True)], budget, "cache")
    if "engines" not in built:
        return {"cells": [built]}
    settings = [s for p in ("pruned", "unpruned") for s in cache_settings(p, a.blocks, a.refreshes, a.rules)]
    settings.sort(key=lambda s: s["cache"])  # the exact references first: a cut budget keeps them
    chunks = [settings[i:i + a.cache_chunk] for i in range(0, len(settings), a.cache_chunk)]
    cells = [cell("cache", f"cache chunk {i}", exp, ch, ev, engines=built["engines"]) for i, ch in enumerate(chunks) if ch]
    res = _attach_eval(run.run(cells, budget - (time.perf_counter() - t0), "cache"), cells)
    shutil.rmtree(built["engines"], ignore_errors=True)
    return {"cells": [built | {"eval": ev, "export": exp}] + res, "blocks": a.blocks, "refreshes": a.refreshes,
            "rules": a.rules, "prune": a.demo_prune}


def part_composed(run: Runner, a, budget: float, prune_raw: dict | None, cache_raw: dict | None) -> dict:
    ev = {"split": "test", "per_type": a.per_type}
    if not prune_raw or not cache_raw:
        return {"error": "needs the prune and cache parts"}
    prunes = pick_prunings(summarize_prune(prune_raw), a.composed_top)
    caches = pick_cache_settings(summarize_cache(cache_raw), a.composed_top)
    base = {"cache": True, "dtype": a.dtype, "batch": a.batch, "baseline": False}
    cells = [cell("composed", "unpruned exact", {"prune": None, "cache": False, "dtype": a.dtype, "batch": a.batch},
                  [exact("unpruned")], ev)]
    for p in prunes:
        sets = [exact("pruned")] + [setting(f"pruned block {c['block']} refresh {c['refresh']} {c['rule']}", "pruned",
                                            c["block"], True, c["refresh"], c["rule"]) for c in caches]
        cells.append(cell("composed", f"K={p[0]} keep={p[1]} src={p[2]}", base | {"prune": p}, sets, ev))
    res = _attach_eval(run.run(cells, budget, "composed"), cells)
    return {"cells": res, "prunings": prunes, "cache_settings": caches}


def part_batch(run: Runner, a, budget: float) -> dict:
    ev = {"split": "test", "per_type": a.batch_per_type}
    sets = [exact("pruned"), exact("unpruned"),
            setting("pruned block 32 refresh 8 threshold 0.9", "pruned", G, True, "8", "threshold 0.9")]
    cells = [cell("batch", f"batch {b}", {"prune": a.demo_prune, "baseline": True, "cache": True,
                                          "dtype": a.batch_dtype, "batch": b}, sets, ev, ids=True, share_vision=False)
             for b in a.batch_sizes]
    res = _attach_eval(run.run(cells, budget, "batch"), cells)
    return {"cells": res, "dtype": a.batch_dtype, "batch_sizes": a.batch_sizes}
