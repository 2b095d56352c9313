"""Worker side of ``long_sweeps.py``: one cell per call (``run_cell``) in a worker process (or the
driver's, with ``--workers 0``): export or reuse its engine set, load it, evaluate its settings while
counting the graph each row's forward used, share visual features with the other workers."""

from __future__ import annotations

import os
import shutil
import time
import traceback
from pathlib import Path

import torch

from llada_export import vqa_task
from long_sweeps_common import G, KINDS, _tool

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
