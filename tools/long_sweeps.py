"""Issue 21's sweeps on the task-v2 demo model (short and long answers), in one command.

Parts, run in this order, each with its own time budget (``--budget part=seconds``):

- ``main``: exact unpruned engines and the demo's pruned engines on ``--main-per-type`` test
  questions per type (``vqa_task.balanced_split``), gen = block = steps = 32, with the
  text-only baseline of the same questions;
- ``prune``: K x keep x score source (``--layers``, ``--keeps``, ``--sources``), one engine set
  per cell (vision + stage A + stage B only), the exact schedule; and the attention analysis
  (``tools/attention_analysis.py``) on the long question types;
- ``cache``: prefix cache refresh x parallel rule (``--refreshes``, ``--rules``), pruned and
  unpruned, block 32 and block 8 (``--blocks``), on one engine set with the cache graphs, with
  the exact engines (no cache, fixed schedule) of each path and block as the reference;
- ``composed``: the cheapest pruning settings of ``prune`` x the cheapest cache settings of
  ``cache`` that stay within 1 point of their references on long answers, built together
  (pruning + cache graphs) and run against exact unpruned; the best one by the rule in
  :func:`choose_composed`;
- ``batch``: the same questions through bfloat16 engines (``--batch-dtype``) at batch 1 and
  batch 8: differing answers and tokens.

Every answer's FLOPs are counted as it ran: the denoiser of each batch is observed (which
graph each row's forward used: stage A, full, prefill or cached) and priced by
``llada_export.flops.graph_flops`` for the engines' bucket, plus the vision graph once.

Run (on the GPU: inductor engines exported for CUDA, fp32, no compile cache, loaded with
``runner_options={"compile": False}``; cells run in ``--workers`` processes, each keeping the
visual features it computed in ``<workdir>/vision`` for the others)::

    python tools/long_sweeps.py run --ckpt out/demo-v2 --out $OUT --backend inductor --device cuda \
        --workers 8 --batch 128 2>$OUT/stderr.txt

On one H100 (16 cores) with the default grids (36 pruning cells, 164 cache settings, 100
questions per type, 300 for the main table) the parts take about 50 / 95 / 90 / 35 / 60 s
(estimated from a 20-per-type run of the bundled model and a 100-per-type run of part of the
pruning grid); the default budgets (``--budget``) stop starting new cells after 75 / 110 / 120 /
50 / 60 s.

writes ``$OUT/<part>.json`` (raw: every prediction and per-row graph counts) and
``$OUT/log.txt``. Then, here::

    python tools/long_sweeps.py render --from DIR --out benchmarks

writes ``benchmarks/vqa2_<part>.json`` (summaries), ``.md`` and ``.png``; ``render --replot``
re-renders the Markdown and PNG from those summaries.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import shutil
import socket
import sys
import tempfile
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from llada_export import vqa_task  # noqa: E402
from llada_export.report import pyplot, save, write_report  # noqa: E402

PARTS = ("main", "prune", "cache", "composed", "batch")
G = 32  # vqa_task.GEN_LENGTH: the evaluation's response length
RULES = ["none", "factor 0.5", "factor 1", "factor 2", "threshold 0.95", "threshold 0.9", "threshold 0.8",
         "threshold 0.7"]
REFRESHES = ["1", "2", "4", "8", "16", "32", "never"]
KINDS = ("stage_a", "full", "prefill", "cached")  # graph kinds a row's forward can use
DEFAULT_BUDGET = {"main": 75, "prune": 110, "cache": 120, "composed": 50, "batch": 60}  # seconds: ~7 min in all
NAMES = {"main": "vqa2_main", "prune": "vqa2_prune_sweep", "attention": "vqa2_attention", "cache": "vqa2_cache_sweep",
         "composed": "vqa2_composed", "batch": "vqa2_batch_invariance"}


# ====================================================================== worker side
_W: dict = {}  # per process: options, loaded model per dtype, evaluation sets, visual features


def _init_worker(common: dict) -> None:
    _W.clear()
    _W.update(common=common, loaded={}, sets={}, vision={})
    torch.set_num_threads(common["threads"])


class _Counting:
    """While active, ``Pipeline.generate_batch`` builds its denoiser from a subclass of
    ``runtime.pipeline.EngineDenoiser`` that also counts, per row, the graph kind of each forward the
    row was active in (stage A, full, prefill or cached: the decisions ``_forward`` makes); ``made``
    holds the denoisers built meanwhile. The runtime's class is put back on exit."""

    def __enter__(self) -> list:
        from llada_export.runtime import pipeline as pipeline_mod

        self.mod, self.base = pipeline_mod, pipeline_mod.EngineDenoiser
        made: list = []

        class CountingDenoiser(self.base):
            def __init__(self, *a, **kw):
                super().__init__(*a, **kw)
                self.row_counts = [dict.fromkeys(KINDS, 0) for _ in range(self.x.batch)]
                made.append(self)

            def _forward(self, response_ids, step, uncond):
                active = step.active_rows
                if self.path.first is not None and self.reduced is None:
                    kinds = ["stage_a"] * len(active)
                elif uncond or not self.cache:
                    kinds = ["full"] * len(active)
                else:
                    kinds = ["prefill" if (not v or r) else "cached" for v, r in zip(self.valid, step.refresh_rows)]
                for row, (a, kind) in enumerate(zip(active, kinds)):
                    if a:  # self.rows: the starting row of each row (a narrowed batch runs fewer)
                        self.row_counts[self.rows[row]][kind] += 1
                return super()._forward(response_ids, step, uncond)

        pipeline_mod.EngineDenoiser = CountingDenoiser
        return made

    def __exit__(self, *exc) -> None:
        self.mod.EngineDenoiser = self.base


def _loaded(dtype: str):
    from llada_export.checkpoint.loader import load_checkpoint

    c = _W["common"]
    if dtype not in _W["loaded"]:
        _W["loaded"][dtype] = load_checkpoint(c["ckpt"], dtype=dtype, device=c["device"])
    return _W["loaded"][dtype]


def _eval_set(spec: dict):
    """(samples, images) of ``balanced_split(split, per_type, types)``, made once per process."""
    key = (spec["split"], spec["per_type"], tuple(spec.get("types") or vqa_task.QTYPES))
    if key not in _W["sets"]:
        samples = vqa_task.balanced_split(key[0], key[1], key[2])
        _W["sets"][key] = (samples, [s.image() for s in samples])
    return _W["sets"][key]


def _export(cell: dict, out: Path) -> tuple[Path, float]:
    from llada_export.contract.pruning import PruneSettings
    from llada_export.exporter.build import ExportOptions, export_engines

    c, e = _W["common"], cell["export"]
    loaded = _loaded(e["dtype"])
    prune = PruneSettings(int(e["prune"][0]), float(e["prune"][1]), e["prune"][2]) if e["prune"] else None
    t0 = time.perf_counter()
    export_engines(ExportOptions(
        model=c["ckpt"], output=str(out), prune=prune, baseline=e.get("baseline", False) and prune is not None,
        cache=e.get("cache", False), fuse_sampler=True, backends=(c["backend"],), dtype=e["dtype"], device=c["device"],
        gen_length=G, max_prompt_tokens=vqa_task.prompt_tokens(loaded[1]), image_size=(vqa_task.WIDTH, vqa_task.HEIGHT),
        batch_size=e["batch"], compile_cache=False, overwrite=True, progress=False), loaded=loaded)
    return out, time.perf_counter() - t0


def _load(path: Path, dtype: str):
    from llada_export.runtime.pipeline import Pipeline

    c = _W["common"]
    weights = dict(_loaded(dtype)[0].state_dict()) if c["backend"] in ("inductor", "aoti") else None
    opts = {"compile": False} if c["backend"] == "inductor" else None
    # warm-up (CUDA-graph capture) only on CUDA: on the CPU there is nothing to capture or compile
    return Pipeline.load(path, backend=c["backend"], device=c["device"], weights=weights, runner_options=opts,
                         warmup=c["device"] == "cuda")


def _pipe(path: Path, cell: dict):
    """The loaded engines: shared engine sets (``cell["engines"]``, e.g. the cache sweep's, split into
    many small cells) stay loaded in this process for its next cell; others are loaded each time."""
    held = _W.setdefault("pipes", {})
    if cell.get("engines") and str(path) in held:
        return held[str(path)]
    held.clear()
    pipe = _load(path, cell["export"]["dtype"])
    if cell.get("engines"):
        held[str(path)] = pipe
    return pipe


def _share_vision(pipe, samples, images) -> None:
    """Every engine set of one dtype holds the same vision graph: encode each image once per process
    (the evaluation sets, and so their images, live as long as the process: their ids are stable)."""
    index = _W.setdefault("image_index", {})
    index.update({id(img): s.index for s, img in zip(samples, images)})
    _load_shared_vision(pipe.device)
    if getattr(pipe, "shared_vision", False):
        return
    store, new, orig, dtype = _W["vision"], _W.setdefault("vision_new", {}), pipe.encode_image, pipe.manifest.dtype

    def encode_image(image, pixels=None):
        i = index.get(id(image))
        if i is None:  # not an evaluation image: nothing to share
            return orig(image, pixels)
        if (dtype, i) not in store:
            store[(dtype, i)] = new[(dtype, i)] = orig(image, pixels)[0]
        return store[(dtype, i)], 0.0

    pipe.encode_image = encode_image
    pipe.shared_vision = True


def _vision_dir() -> Path:
    return Path(_W["common"]["workdir"]) / "vision"


def _save_shared_vision() -> None:
    """Visual features this process computed, for the other workers (preprocessing and encoding an
    image costs more than answering it): one file per save, written under a temporary name first."""
    new = _W.get("vision_new")
    if not new:
        return
    d = _vision_dir()
    d.mkdir(exist_ok=True)
    name = f"{os.getpid()}-{len(_W.setdefault('vision_files', set()))}-{time.time_ns()}.pt"
    torch.save({f"{k[0]}:{k[1]}": v.cpu() for k, v in new.items()}, d / (name + ".tmp"))
    os.replace(d / (name + ".tmp"), d / name)
    _W["vision_files"].add(name)
    new.clear()


def _load_shared_vision(device: str) -> None:
    d = _vision_dir()
    seen = _W.setdefault("vision_files", set())
    for f in sorted(d.glob("*.pt")) if d.is_dir() else []:
        if f.name in seen:
            continue
        seen.add(f.name)
        for key, v in torch.load(f, map_location=device).items():
            dtype, i = key.split(":")
            _W["vision"].setdefault((dtype, int(i)), v)


def gen_kwargs(s: dict) -> dict:
    """A setting (block, cache, refresh, rule) as Pipeline.generate_batch's keywords."""
    g = s.get("gen", G)
    kw = {"gen_length": g, "block_length": s["block"], "steps": g, "cache": bool(s["cache"])}
    if s["cache"]:
        kw["refresh"] = "never" if s["refresh"] in (None, "never") else int(s["refresh"])
    if s["rule"] != "none":
        name, value = s["rule"].split()
        kw[name] = float(value)
    else:  # Pipeline's default is the factor rule: "none" is the official fixed schedule
        kw["fixed_schedule"] = True
    return kw


def evaluate(pipe, samples, images, batch: int, setting: dict, want_ids: bool = False) -> dict:
    """One setting over the samples, ``batch`` requests per call: predictions, answer tokens, forwards
    and per-kind graph calls of every row."""
    from llada_export.runtime.pipeline import Request

    kw = gen_kwargs(setting)
    out = {"predictions": [], "ntok": [], "forwards": [], "counts": {k: [] for k in KINDS}, "batch_calls": {}}
    if want_ids:
        out["ids"] = []
    t0 = time.perf_counter()
    for i in range(0, len(samples), batch):
        reqs = [Request(img, s.prompt) for s, img in zip(samples[i:i + batch], images[i:i + batch])]
        with _Counting() as made:
            rs = pipe.generate_batch(reqs, unpruned=setting["path"] == "unpruned", **kw)
        (den,) = made
        for row, r in enumerate(rs):
            out["predictions"].append(r.text)
            out["ntok"].append(len(r.ids) + (r.finish_reason == "stop"))  # the answer and its <|eot_id|>
            out["forwards"].append(r.forwards)
            for k in KINDS:
                out["counts"][k].append(den.row_counts[row][k])
            if want_ids:
                out["ids"].append(r.ids)
        for name, n in rs[0].graph_calls.items():
            out["batch_calls"][name] = out["batch_calls"].get(name, 0) + n
    out["seconds"] = time.perf_counter() - t0
    return out


def _flops_per_call(pipe, cell: dict) -> dict:
    from llada_export.flops import graph_flops

    b, cfg, e = pipe.bucket, pipe.config, cell["export"]
    paths = {}
    if e["prune"]:
        layer, keep, src = e["prune"]
        paths["pruned"] = graph_flops(cfg, b.prefix_len, b.max_visual_tokens, b.gen_length, int(layer), float(keep),
                                      b.vision_batch, src)
    if not e["prune"] or e.get("baseline"):
        paths["unpruned"] = graph_flops(cfg, b.prefix_len, b.max_visual_tokens, b.gen_length, None, 1.0,
                                        b.vision_batch)
    return paths


def run_cell(cell: dict) -> dict:
    """Export (or reuse) one engine set, load it, evaluate its settings. Returns what it measured;
    an error is returned as text, so one failed cell does not stop a sweep."""
    t0 = time.perf_counter()
    res = {"key": cell["key"], "part": cell["part"], "pid": os.getpid(), "eval": cell["eval"],
           "export": cell.get("export")}
    try:
        if cell.get("task") == "attention":
            return res | _attention(cell) | {"seconds": time.perf_counter() - t0}
        work = Path(_W["common"]["workdir"])
        path, res["export_seconds"] = (Path(cell["engines"]), 0.0) if cell.get("engines") else \
            _export(cell, work / cell["key"].replace(" ", "_").replace("=", ""))
        if not cell["settings"]:
            return res | {"engines": str(path), "seconds": time.perf_counter() - t0}
        t1 = time.perf_counter()
        pipe = _pipe(path, cell)
        res["load_seconds"] = time.perf_counter() - t1
        samples, images = _eval_set(cell["eval"])
        if cell.get("share_vision", True):
            _share_vision(pipe, samples, images)
        res["bucket"] = pipe.bucket.to_dict()
        res["flops_per_call"] = _flops_per_call(pipe, cell)
        res["results"] = [dict(s, **evaluate(pipe, samples, images, cell["export"]["batch"], s, cell.get("ids", False)))
                          for s in cell["settings"]]
        _save_shared_vision()
        del pipe
        if not cell.get("engines") and not cell.get("keep_engines"):
            shutil.rmtree(path, ignore_errors=True)
    except (Exception, SystemExit) as e:  # noqa: BLE001 - reported in the results and the log
        res["error"] = f"{type(e).__name__}: {e}"
        res["traceback"] = traceback.format_exc(limit=6)
    res["seconds"] = time.perf_counter() - t0
    if torch.cuda.is_available() and _W["common"]["device"] == "cuda":  # this worker's peak so far
        res["gpu_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return res


def _attention(cell: dict) -> dict:
    aa = _tool("attention_analysis")
    c, a = _W["common"], cell["attention"]
    return {"analysis": aa.run_analysis(c["ckpt"], a["n"], a["layers"], a["keeps"], G, types=a["types"],
                                        device=c["device"], progress=False)}


def _tool(name: str):
    import importlib.util

    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


# ====================================================================== driver side
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


def _split_args(r: dict, s: dict) -> tuple:
    return r["eval"]["split"], r["eval"]["per_type"], tuple(r["eval"].get("types") or vqa_task.QTYPES)


@functools.lru_cache(maxsize=16)
def _balanced(split: str, per_type: int, types: tuple) -> list:
    return vqa_task.balanced_split(split, per_type, types)


def parse_prune(text: str) -> list:
    k, keep, src = text.split()
    return [int(k), float(keep), src]


def setting(name: str, path: str, block: int = G, cache: bool = False, refresh=None, rule: str = "none",
            gen: int = G) -> dict:
    """One generation setting: response length ``gen`` in blocks of ``block``, the fixed schedule (one
    token per forward) unless ``rule`` is a parallel rule; the prefix cache refreshed every ``refresh``
    forwards ("never": at block starts only)."""
    return {"name": name, "path": path, "block": block, "cache": cache, "refresh": refresh, "rule": rule, "gen": gen}


def exact(path: str, block: int = G) -> dict:
    return setting(f"{path} exact" + (f" block {block}" if block != G else ""), path, block)


def cell(part: str, key: str, export: dict, settings: list[dict], eval_spec: dict, **kw) -> dict:
    return {"part": part, "key": key, "export": export, "settings": settings, "eval": eval_spec} | kw


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


def cache_settings(path: str, blocks: list[int], refreshes: list[str], rules: list[str]) -> list[dict]:
    """Exact (no cache, fixed schedule) per block, then every cached setting; a refresh interval of the
    block length or more refreshes at block starts only, the same computation as "never": run once."""
    out = []
    for block in blocks:
        out.append(exact(path, block))
        for rule in rules:
            seen = set()
            for refresh in refreshes:
                key = "never" if refresh == "never" or int(refresh) >= block else refresh
                if key in seen:
                    continue
                seen.add(key)
                out.append(setting(f"{path} block {block} refresh {key} {rule}", path, block, True, key, rule))
    return out


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


# ====================================================================== summaries (render side)
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


# ---------------------------------------------------------------------- Markdown and plots
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


# ====================================================================== command line
def machine_info(device: str) -> dict:
    info = {"host": socket.gethostname(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count()}
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def parse_budget(items: list[str]) -> dict[str, float]:
    out = dict(DEFAULT_BUDGET)
    for it in items or []:
        part, _, sec = it.partition("=")
        if part not in PARTS or not sec:
            raise SystemExit(f"--budget {it!r}: use PART=SECONDS with PART one of {', '.join(PARTS)}")
        out[part] = float(sec)
    return out


def run_all(a) -> int:
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    log_file = (out / "log.txt").open("a")
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        line = f"[{time.perf_counter() - t_start:7.1f} s] {msg}"
        print(line, flush=True)
        log_file.write(line + "\n")
        log_file.flush()

    budget = parse_budget(a.budget)
    check_layers(a)
    work = Path(a.workdir or tempfile.mkdtemp(prefix="long_sweeps_"))
    work.mkdir(parents=True, exist_ok=True)
    common = {"ckpt": str(Path(a.ckpt).resolve()), "backend": a.backend, "device": a.device, "workdir": str(work),
              "threads": a.threads}
    args = {k: v for k, v in vars(a).items() if k not in ("func",)}
    machine = machine_info(a.device)
    log(f"start: parts {', '.join(a.parts)}; {a.workers} workers; machine {machine}")
    runner = Runner(common, a.workers, log)
    raws: dict[str, dict] = {}
    try:
        for part in a.parts:
            t0 = time.perf_counter()
            log(f"{part}: start (budget {budget[part]:.0f} s)")
            if part == "main":
                raw = part_main(runner, a, budget[part])
            elif part == "prune":
                raw = part_prune(runner, a, budget[part])
            elif part == "cache":
                raw = part_cache(runner, a, budget[part])
            elif part == "composed":
                prev = {p: raws.get(p) or _read(out / f"{p}.json") for p in ("prune", "cache")}
                raw = part_composed(runner, a, budget[part], prev["prune"], prev["cache"])
            else:
                raw = part_batch(runner, a, budget[part])
            raw.update(part=part, args=args, machine=machine, seconds=time.perf_counter() - t0)
            raws[part] = raw
            (out / f"{part}.json").write_text(json.dumps(raw))
            cells = raw.get("cells", [])
            bad = sum("error" in c for c in cells)
            cut = sum("skipped" in c for c in cells)
            log(f"{part}: done in {raw['seconds']:.1f} s -> {out / (part + '.json')} ({len(cells) - bad - cut} cells "
                f"measured, {bad} failed, {cut} cut by the time budget)")
    finally:
        runner.close()
        if not a.workdir:
            shutil.rmtree(work, ignore_errors=True)
    log(f"all done in {time.perf_counter() - t_start:.1f} s")
    log_file.close()
    return 0


def check_layers(a) -> None:
    """Prune layers of the grid, the demo's and the attention analysis' must exist in the checkpoint."""
    n = json.loads((Path(a.ckpt) / "config.json").read_text())["num_hidden_layers"]
    asked = {a.demo_prune[0]} if set(a.parts) & {"main", "cache", "batch"} else set()
    if "prune" in a.parts:
        asked |= set(a.layers) | (set(a.attention_layers or []) if a.attention_n else set())
    if bad := sorted(k for k in asked if not 0 <= k < n):
        raise SystemExit(f"prune layers {bad} do not exist: {a.ckpt} has layers 0..{n - 1} "
                         "(--layers, --demo-prune, --attention-layers)")


def _read(p: Path) -> dict | None:
    return json.loads(p.read_text()) if p.exists() else None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run the sweeps, writing raw JSONs into --out")
    r.add_argument("--ckpt", default="llada_export/assets/demo-model")
    r.add_argument("--out", required=True, help="directory for <part>.json and log.txt")
    r.add_argument("--backend", choices=("onnxruntime", "inductor"), default="onnxruntime")
    r.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    r.add_argument("--dtype", default="float32", help="engines' dtype of every part but batch (default float32)")
    r.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    r.add_argument("--budget", nargs="*", default=[], metavar="PART=SECONDS",
                   help=f"time budget per part: cells not started by then are skipped (default "
                        f"{' '.join(f'{k}={v}' for k, v in DEFAULT_BUDGET.items())})")
    r.add_argument("--workers", type=int, default=0, help="worker processes (0: in this process)")
    r.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    r.add_argument("--batch", type=int, default=64, help="engines' batch size (every part but batch)")
    r.add_argument("--per-type", type=int, default=100, help="test questions per type (prune, cache, composed)")
    r.add_argument("--main-per-type", type=int, default=300, help="test questions per type of the main table")
    r.add_argument("--demo-prune", type=parse_prune, default=[3, 0.5, "response"], metavar="'K KEEP SOURCE'",
                   help="the demo's pruning (main, cache, batch parts; default '3 0.5 response')")
    r.add_argument("--layers", type=int, nargs="+", default=[1, 3, 5])
    r.add_argument("--keeps", type=float, nargs="+", default=[0.75, 0.5, 0.25, 0.1])
    r.add_argument("--sources", nargs="+", choices=("response", "text", "last"), default=["response", "text", "last"])
    r.add_argument("--attention-n", type=int, default=60, help="long-answer questions of the attention analysis (0: skip)")
    r.add_argument("--attention-layers", type=int, nargs="*", default=None, help="default: --layers")
    r.add_argument("--attention-keeps", type=float, nargs="+", default=[0.25, 0.1])
    r.add_argument("--blocks", type=int, nargs="+", default=[32, 8])
    r.add_argument("--refreshes", nargs="+", default=REFRESHES)
    r.add_argument("--rules", nargs="+", default=RULES, help="'none', 'factor F', 'threshold T' (quote each)")
    r.add_argument("--cache-chunk", type=int, default=4,
                   help="cache settings per cell (the engines stay loaded in each worker between cells)")
    r.add_argument("--composed-top", type=int, default=3, help="candidates from each of prune and cache")
    r.add_argument("--batch-sizes", type=int, nargs=2, default=[1, 8])
    r.add_argument("--batch-dtype", default="bfloat16")
    r.add_argument("--batch-per-type", type=int, default=50, help="test questions per type of the batch part")
    r.add_argument("--workdir", default=None, help="where engines are built (default: a temporary directory)")
    r.set_defaults(func=run_all)
    d = sub.add_parser("render", help="summaries, Markdown and PNG from run's JSONs")
    d.add_argument("--from", dest="src", default=None, help="directory of run's <part>.json")
    d.add_argument("--out", default="benchmarks", help="where vqa2_*.json/.md/.png go (default benchmarks)")
    d.add_argument("--replot", action="store_true", help="re-render .md and .png from the summaries in --out")
    d.set_defaults(func=lambda a: (render(Path(a.src or a.out), Path(a.out), a.replot), 0)[1])
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if a.cmd == "render" and not a.replot and not a.src:
        raise SystemExit("render: give --from DIR (run's output) or --replot")
    if a.cmd == "run":
        return _checked_run(a)
    return a.func(a)


def _checked_run(a) -> int:
    bad = [r for r in a.rules if r != "none" and (len(r.split()) != 2 or r.split()[0] not in ("factor", "threshold"))]
    if bad:
        raise SystemExit(f"--rules {bad}: use 'none', 'factor F' or 'threshold T'")
    if a.device == "cuda" and a.backend == "onnxruntime":
        raise SystemExit("--device cuda needs --backend inductor here (no onnxruntime-gpu)")
    return a.func(a)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
