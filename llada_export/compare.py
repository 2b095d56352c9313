"""Accuracy of an engines directory against the eager PyTorch model, with Polygraphy.

Per graph of the graph set (vision, stage A, stage B, the cache graphs, the unpruned graphs)
the eager oracle the graph names and the engine run on the same real inputs (from an image
and a prompt) through Polygraphy's ``Comparator``; ``CompareFunc.simple`` checks per-output
tolerances (fp32 tight, fp16/bf16 looser; integer outputs exact) and gives the error
statistics. Stage A's kept tokens are judged as a set (:func:`kept_set`, :class:`KeptSetCompare`):
the static top-k's surplus slots (``kept_alive`` false) point at arbitrary padded positions
that the eager oracle and an engine may choose differently, so they are not compared. The
inputs and the reference outputs are saved so that ``polygraphy run <graph>.onnx --onnxrt
--load-inputs ... --load-outputs ...`` repeats the check from the command line (for stage A
with the same set comparison, from a script written beside them).

What cannot run is refused before any comparison (:func:`plan_compare`): a backend not built,
a user's prompt or image that does not fit the bucket, an unknown preset. Built-in prompts and
presets that do not fit are skipped, and the report says so. A run that fails leaves no
Polygraphy files behind unless ``save_dir`` was given.

End to end, over a set of prompts: token agreement engine vs eager (same pruning, same
cache and parallel settings; exact in fp32), pruned vs unpruned (the pruning's own
effect), and the kept-index overlap.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import time
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from polygraphy.backend.base import BaseRunner
from polygraphy.common import TensorMetadata
from polygraphy.comparator import Comparator, IterationResult, RunResults, SimpleCompareFunc
from polygraphy.json import save_json
from polygraphy.logger import G_LOGGER

from .checkpoint.loader import load_checkpoint
from .contract.graphset import GRAPHS, resolve
from .contract.layout import layout_bucket, reduce_inputs
from .engines.registry import get_backend
from .graphs.anyres import preprocess
from .reference import OracleContext, reference_generate
from .rules import shorten
from .runtime.pipeline import Pipeline, Request
from .sampler import GenerationConfig
from .sampler import preset as get_preset

ASSETS = Path(__file__).parent / "assets"
BUNDLED = [
    (ASSETS / "demo.png", "What colour is the circle?"),
    (ASSETS / "demo.png", "How many shapes are there? Answer with a number."),
]
# (atol, rtol) per engine dtype, relative to the largest reference magnitude of each output.
TOLERANCES = {"float32": (1e-4, 1e-4), "float16": (2e-2, 2e-2), "bfloat16": (5e-2, 5e-2),
              # e4m3 (3 mantissa bits: up to 6.25% rounding per operand of every quantized linear), against the
              # unquantized oracle: errors of a few % of each output's scale, more where layers compound them
              "fp8": (0.15, 0.15)}
# Fraction of a row's kept visual tokens that may differ from the eager oracle's (near-ties in the
# layer-K scores flip in low precision; fp32 keeps exactly the same set).
KEPT_TOLERANCE = {"float32": 0.0, "float16": 0.1, "bfloat16": 0.2, "fp8": 0.3}
INTEGER_DTYPES = {"int64", "bool"}
KEPT = ("kept_index", "kept_alive")  # stage A's outputs, compared as a set (kept_set)


class CompareError(ValueError):
    """The engines and the checkpoint cannot be compared (another model, a missing tokenizer, a
    prompt that does not fit the bucket, a backend not built)."""


def kept_set(result):
    """Polygraphy post-process step (``IterationResult -> IterationResult``, in place): stage A's
    ``kept_index`` [B, L'] / ``kept_alive`` [B, L'] as the SET of kept positions. ``kept_index``
    becomes the alive positions ascending then -1, ``kept_alive`` True for as many slots. The
    surplus (dead) slots of the static top-k point at arbitrary padded positions that two correct
    implementations pick differently; they are dropped. Idempotent; other results pass through."""
    if not all(k in result for k in KEPT):
        return result
    index, alive = np.asarray(result["kept_index"]), np.asarray(result["kept_alive"]).astype(bool)
    out_index = np.full_like(index, -1)  # [B, L']
    out_alive = np.zeros_like(alive)  # [B, L']
    for row in range(index.shape[0]):
        kept = np.sort(index[row][alive[row]])
        out_index[row, : len(kept)] = kept
        out_alive[row, : len(kept)] = True
    result["kept_index"], result["kept_alive"] = out_index, out_alive
    return result


def kept_missing(ref_index: np.ndarray, out_index: np.ndarray) -> np.ndarray:
    """Per row [B]: kept positions of the reference (after :func:`kept_set`) the engine lacks."""
    return np.array([len(set(r[r >= 0].tolist()) - set(o[o >= 0].tolist())) for r, o in zip(ref_index, out_index)])


@dataclass
class KeptSetCompare:
    """Polygraphy compare function: ``SimpleCompareFunc`` (elementwise atol OR rtol) for every
    output, except ``kept_index`` (after :func:`kept_set`), which passes where no row lacks more
    than ``kept_diff`` of the reference's kept positions. ``polygraphy run --compare-func-script``
    loads it from the script :func:`compare_graph` writes, so the command repeats this check."""

    atol: dict[str, float]
    rtol: dict[str, float]
    kept_diff: int = 0

    def __call__(self, ref: IterationResult, out: IterationResult):
        simple = SimpleCompareFunc(atol=self.atol, rtol=self.rtol, check_error_stat="elemwise", error_quantile=0.99)
        with np.errstate(divide="ignore", invalid="ignore"):  # Polygraphy's relative error of exact zeros
            res = simple(_without(ref, "kept_index"), _without(out, "kept_index"))
        if "kept_index" in ref and "kept_index" in out:
            res["kept_index"] = bool(kept_missing(ref["kept_index"], out["kept_index"]).max() <= self.kept_diff)
        return res


def _without(result: IterationResult, name: str) -> IterationResult:
    return IterationResult({k: v for k, v in result.items() if k != name}, result.runtime, result.runner_name)


class EagerRunner(BaseRunner):
    """An eager PyTorch function as a Polygraphy runner (numpy feed dict in, numpy outputs out)."""

    def __init__(self, fn, inputs: dict[str, np.ndarray], outputs: list[str], name: str):
        super().__init__(name=name, prefix="pytorch")
        self.fn, self.outputs = fn, outputs
        self.meta = TensorMetadata()
        for k, v in inputs.items():
            self.meta.add(k, v.dtype, v.shape)

    def activate_impl(self):
        pass

    def deactivate_impl(self):
        pass

    def get_input_metadata_impl(self):
        return self.meta

    def infer_impl(self, feed_dict):
        t0 = time.perf_counter()
        with torch.no_grad():
            outs = self.fn(**{k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feed_dict.items()})
        outs = outs if isinstance(outs, (tuple, list)) else (outs,)
        res = OrderedDict((n, np.ascontiguousarray(_np(o))) for n, o in zip(self.outputs, outs))
        self.inference_time = time.perf_counter() - t0
        return res


class EngineRunner(EagerRunner):
    """A llada-export runner (AOTInductor, Inductor, TensorRT) behind Polygraphy's runner interface."""

    def __init__(self, runner, inputs, name):
        def fn(**feeds):
            out = runner.run(feeds)
            return tuple(out[k] for k in runner.outputs)

        super().__init__(fn, inputs, list(runner.outputs), name)


@dataclass
class GraphReport:
    graph: str
    backend: str
    passed: bool
    tolerances: dict[str, dict[str, float]]
    stats: dict[str, dict[str, float]]
    polygraphy_command: str | None = None


@dataclass
class CompareReport:
    engines: str
    checkpoint: str
    dtype: str
    graphs: list[GraphReport] = field(default_factory=list)
    agreement: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what was skipped or removed, and why
    error: str | None = None  # why the comparison could not run

    @property
    def passed(self) -> bool:
        return self.error is None and all(g.passed for g in self.graphs) and all(
            a["engine_vs_reference_exact"] or not a["strict"] for a in self.agreement)

    def to_dict(self) -> dict:
        return {"engines": self.engines, "checkpoint": self.checkpoint, "dtype": self.dtype, "passed": self.passed,
                "error": self.error, "notes": self.notes, "graphs": [g.__dict__ for g in self.graphs],
                "agreement": self.agreement}

    def markdown(self) -> str:
        lines = [f"# llada-compare: {'PASS' if self.passed else 'FAIL'}", "",
                 f"engines `{self.engines}` vs eager PyTorch on `{self.checkpoint}` (engine dtype {self.dtype})", ""]
        if self.error:
            lines += [f"**Could not compare**: {self.error}", ""]
        if self.notes:
            lines += ["## Notes", "", *(f"- {n}" for n in self.notes), ""]
        lines += ["An output passes where every element is within atol OR within rtol of the reference "
                  "(Polygraphy's rule); `passes on` says which held for the worst element. `kept_index` is "
                  "compared as the set of kept positions where `kept_alive` (the static top-k's dead slots are "
                  "not compared): its abs errors count the reference's kept positions a row of the engine lacks, "
                  "its atol how many may.", "",
                  "| backend | graph | output | max abs | mean abs | median abs | p99 abs | max rel | atol | rtol | "
                  "passes on | ok |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for g in self.graphs:
            for out, s in g.stats.items():
                t = g.tolerances[out]
                on = ("exact" if s["max_abs"] == 0 else "atol" if s["max_abs"] <= t["atol"] else
                      "rtol" if s["max_rel"] <= t["rtol"] else "elementwise atol/rtol" if s["passed"] else "-")
                lines.append(f"| {g.backend} | {g.graph} | {out} | {s['max_abs']:.3g} | {s['mean_abs']:.3g} | "
                             f"{s['median_abs']:.3g} | {s['p99_abs']:.3g} | {s['max_rel']:.3g} | {t['atol']:.3g} | "
                             f"{t['rtol']:.3g} | {on} | {'yes' if s['passed'] else '**NO**'} |")
        lines += ["", "## End-to-end agreement", "",
                  "| backend | prompt | settings | engine = eager | token agreement pruned vs unpruned | "
                  "kept-index overlap | answer |", "| --- | --- | --- | --- | --- | --- | --- |"]
        for a in self.agreement:
            lines.append(f"| {a['backend']} | {a['prompt']!r} | {a['settings']} | {a['engine_vs_reference_exact']} | "
                         f"{a['pruned_vs_unpruned_agreement']:.2f} | {a['kept_overlap']:.2f} | {a['answer']!r} |")
        cmds = [g.polygraphy_command for g in self.graphs if g.polygraphy_command]
        if cmds:
            lines += ["", "## Reproduce with Polygraphy", "", "```", *cmds, "```"]
        return "\n".join(lines) + "\n"


def check_same_model(pipe: Pipeline, cfg, checkpoint) -> None:
    """Refuse a checkpoint of another model, naming the first config fields that differ."""
    if cfg.hash() == pipe.manifest.config_hash:
        return
    mine, theirs = _flat(cfg.to_dict()), _flat(pipe.manifest.config)
    diff = [k for k in sorted(set(mine) | set(theirs)) if mine.get(k) != theirs.get(k)]
    # each field once, its two values cut (image_grid_pinpoints alone is hundreds of characters)
    shown = "; ".join(f"{k} {shorten(repr(mine.get(k)), 40)} vs {shorten(repr(theirs.get(k)), 40)}" for k in diff[:3])
    more = f"; and {', '.join(diff[3:])}" if len(diff) > 3 else ""
    raise CompareError(f"{checkpoint} is not the checkpoint {pipe.root} was exported from (config, checkpoint vs "
                       f"engines: {shown or 'hash only'}{more}); pass the checkpoint the engines came from")


def _flat(d: dict, prefix: str = "") -> dict:
    """A config dict with its nested dicts' fields as ``outer.inner`` keys."""
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def feed_pool(pipe: Pipeline, model, image, prompt: str, ctx: OracleContext) -> list[dict[str, torch.Tensor]]:
    """Real inputs for every graph kind from one image and prompt: vision, full-length denoiser and
    stage A, reduced-length denoiser (from the eager model's own pruning decision), cached steps.
    A graph takes the first feed dict whose names and shapes it reads."""
    b = pipe.bucket
    pixels, size = preprocess(image, pipe.config)  # [N, 3, S, S]
    vis = torch.zeros(b.vision_batch, *pixels.shape[1:])
    vis[: min(len(pixels), b.vision_batch)] = pixels[: b.vision_batch]
    parts, _ = pipe.prepare(Request(image, prompt), b.gen_length, pixels=(pixels, size))
    x = layout_bucket(b, [parts], b.gen_length)
    x = replace(x, prefix_embeds=x.prefix_embeds.cpu(), position_ids=x.position_ids.cpu(),
                key_mask=x.key_mask.cpu(), visual_mask=x.visual_mask.cpu(), active=x.active.cpu())
    g = b.gen_length
    resp = torch.full((x.batch, g), pipe.tokens.mask)
    stage_a = x.stage_a_feeds(resp, pipe.keep)
    logits = model.denoise(**x.denoiser_feeds(resp))  # [B, G, V]: a later step commits the first half
    later = resp.clone()
    later[:, : g // 2] = logits[:, : g // 2].argmax(-1)
    pool = [{"pixel_values": vis}, stage_a, x.denoiser_feeds(later)]
    seqs = [x]
    if pipe.pruned:
        index, alive = resolve(GRAPHS["stage_a"].oracle)(model, stage_a, ctx)[-2:]
        seqs.append(reduce_inputs(x, index, alive))
        pool.append(seqs[-1].denoiser_feeds(later))
    block = pipe.manifest.generation["block_length"]
    block_start = torch.full((x.batch,), block if block < g else 0, dtype=torch.long)
    cur = later.clone()
    cur[:, g // 2: g // 2 + max(1, g // 8)] = logits[:, g // 2: g // 2 + max(1, g // 8)].argmax(-1)
    for s in seqs:  # a cached step: the cache from `later`, a few more tokens committed since
        _, kv = model.language.prefill(**s.denoiser_feeds(later))
        pool.append(s.cached_feeds(cur, kv, block_start))
    return pool


def feeds_for(io, pool: list[dict[str, torch.Tensor]]) -> dict[str, np.ndarray] | None:
    for feeds in pool:
        if all(t.name in feeds and tuple(feeds[t.name].shape) == t.shape for t in io.inputs):
            return {t.name: _np(feeds[t.name]) for t in io.inputs}
    return None


def _np(t: torch.Tensor) -> np.ndarray:
    return (t.float() if t.dtype in (torch.bfloat16, torch.float16) else t).detach().cpu().numpy()


def _stats(ref: np.ndarray, out: np.ndarray) -> dict[str, float]:
    d = np.abs(ref.astype(np.float64) - out.astype(np.float64))
    rel = d / np.maximum(np.abs(ref.astype(np.float64)), 1e-6)
    return {"max_abs": float(d.max()), "mean_abs": float(d.mean()), "median_abs": float(np.median(d)),
            "p90_abs": float(np.quantile(d, 0.9)), "p99_abs": float(np.quantile(d, 0.99)), "max_rel": float(rel.max()),
            "mean_rel": float(rel.mean())}


def tolerances(io, ref_out: dict[str, np.ndarray], feeds: dict[str, np.ndarray], dtype: str
               ) -> dict[str, dict[str, float]]:
    """Per output {atol, rtol}: floats relative to the reference's largest magnitude, integers exact,
    ``kept_index`` the number of a row's kept visual tokens that may differ (KEPT_TOLERANCE)."""
    a, r = TOLERANCES[dtype]
    tol = {t.name: ({"atol": 0.0, "rtol": 0.0} if t.dtype in INTEGER_DTYPES else
                    {"atol": a * max(1.0, float(np.abs(ref_out[t.name]).max())), "rtol": r}) for t in io.outputs}
    if "kept_index" in tol and "num_keep" in feeds:
        real = (feeds["visual_mask"].astype(bool) & feeds["key_mask"].astype(bool)).sum(1)  # [B]
        kept_visual = int(np.minimum(feeds["num_keep"], real).max())
        tol["kept_index"]["atol"] = float(int(KEPT_TOLERANCE[dtype] * kept_visual))
    return tol


def _kept_stats(ref_index: np.ndarray, out_index: np.ndarray) -> dict[str, float]:
    """kept_index statistics: per row, the reference's kept positions the engine lacks."""
    d = kept_missing(ref_index, out_index).astype(np.float64)  # [B]
    rel = d / np.maximum((ref_index >= 0).sum(1), 1)
    return {"max_abs": float(d.max()), "mean_abs": float(d.mean()), "median_abs": float(np.median(d)),
            "p90_abs": float(np.quantile(d, 0.9)), "p99_abs": float(np.quantile(d, 0.99)), "max_rel": float(rel.max()),
            "mean_rel": float(rel.mean())}


CHECK_SCRIPT = '''"""llada-compare's check of {backend} {name}, for polygraphy run --postprocess-func-script and
--compare-func-script: stage A's kept tokens compared as a set, every other output within atol OR rtol."""
from llada_export.compare import KeptSetCompare
from llada_export.compare import kept_set as postprocess_outputs  # noqa: F401

compare_outputs = KeptSetCompare(atol={atol!r}, rtol={rtol!r}, kept_diff={kept_diff})
'''


def compare_graph(name: str, backend: str, engine_runner: BaseRunner, ref_fn, feeds: dict[str, np.ndarray],
                  io, dtype: str, save_dir: Path, engine_path: Path) -> GraphReport:
    outputs = io.output_names
    ref_runner = EagerRunner(ref_fn, feeds, outputs, name=f"pytorch-{name}")
    results = Comparator.run([ref_runner, engine_runner], data_loader=[feeds], warm_up=0)
    Comparator.postprocess(results, kept_set)  # in place: stage A's kept slots as a set
    ref_out, eng_out = results[0][1][0], results[1][1][0]
    tol = tolerances(io, ref_out, feeds, dtype)
    func = KeptSetCompare({o: t["atol"] for o, t in tol.items()}, {o: t["rtol"] for o, t in tol.items()},
                          int(tol["kept_index"]["atol"]) if "kept_index" in tol else 0)
    acc = Comparator.compare_accuracy(results, compare_func=func)
    per_out = acc[0][(results[0][0], results[1][0])][0]  # one compare func, one iteration: output -> result
    stats = {}
    for o in outputs:
        s = (_kept_stats if o == "kept_index" else _stats)(ref_out[o], eng_out[o])
        s["passed"] = bool(per_out[o])
        stats[o] = s
    cmd = None
    cli = get_backend(backend).polygraphy_cli
    if cli:
        inp, outp = save_dir / f"{backend}_{name}_inputs.json", save_dir / f"{backend}_{name}_reference_outputs.json"
        try:
            save_dir.mkdir(parents=True, exist_ok=True)
            save_json([feeds], str(inp))
            RunResults([results[0]]).save(str(outp))
        except OSError as e:  # a full disk's write() names no file: say which folder, and what to do
            raise CompareError(f"cannot write the Polygraphy files to {save_dir}: {e.strerror or e}; free some space "
                               "or pass another --save-dir") from e
        cmd = (f"polygraphy run {shlex.quote(str(engine_path))} {cli} --load-inputs {shlex.quote(str(inp))} "
               f"--load-outputs {shlex.quote(str(outp))} ")
        if "kept_index" in tol:  # the same post-process and compare function as here
            script = save_dir / f"{backend}_{name}_check.py"
            script.write_text(CHECK_SCRIPT.format(backend=backend, name=name, atol=func.atol, rtol=func.rtol,
                                                  kept_diff=func.kept_diff))
            cmd += (f"--postprocess-func-script {shlex.quote(str(script))} "
                    f"--compare-func-script {shlex.quote(str(script))}")
        else:
            atol = " ".join(f"{o}:{t['atol']:.6g}" for o, t in tol.items())
            rtol = " ".join(f"{o}:{t['rtol']:.6g}" for o, t in tol.items())
            cmd += f"--atol {atol} --rtol {rtol}"
    return GraphReport(name, backend, all(s["passed"] for s in stats.values()), tol, stats, cmd)


@dataclass
class Plan:
    """What a comparison runs, all checked before it runs anything (CompareError otherwise)."""

    pipes: dict[str, Pipeline]  # backend -> its engines, loaded
    prompts: list[tuple]  # (image, prompt) that fit the bucket; the first feeds the per-graph checks
    presets: list[tuple[str | None, GenerationConfig]]  # (preset, its settings) of the end-to-end check
    notes: list[str] = field(default_factory=list)


def plan_compare(first: Pipeline, prompts: list[tuple] | None, backends: list[str] | None,
                 presets: tuple[str, ...], settings: dict) -> Plan:
    """Refuse what cannot run (a backend not built, a user's prompt or image that does not fit the
    bucket, an unknown preset or setting); skip, and note, built-in prompts and presets that do
    not fit these engines. ``prompts`` None: the built-in ones; given, they replace them."""
    plan = Plan({}, [], [])
    for backend in backends or first.manifest.backends:
        plan.pipes[backend] = (first if backend == first.backend else
                               Pipeline.load(first.root, backend=backend, verify=False))
    for image, prompt in prompts or BUNDLED:
        try:
            first.check(Request(image, prompt), first.bucket.gen_length)
        except ValueError as e:
            if prompts:
                raise CompareError(f"prompt {shorten(repr(prompt))} with image {shorten(repr(str(image)))}: "
                                   f"{e}") from None
            plan.notes.append(f"built-in prompt {prompt!r} skipped: {e}")
            continue
        plan.prompts.append((image, prompt))
    if not plan.prompts:
        raise CompareError(f"no built-in prompt fits {first.root} ({'; '.join(plan.notes)}); "
                           "pass a shorter one with --image and --prompt")
    g = first.bucket.gen_length
    for name in presets:
        want = get_preset(name).gen_length  # an unknown preset: a usage error
        if want > g:
            plan.notes.append(f"preset {name} skipped: its gen length {want} exceeds the engines' {g}")
            continue
        plan.presets.append((name, first.generation_config(preset=name, **settings)))
    if presets and not plan.presets:
        plan.presets.append((None, first.generation_config(**settings)))
        plan.notes.append("no preset fits: the end-to-end check uses the engines' own gen/block/steps")
    return plan


POLYGRAPHY_FILES = ("_inputs.json", "_reference_outputs.json", "_check.py")


def _files(save_dir: Path, backends) -> list[Path]:
    """The Polygraphy files of ``backends`` in ``save_dir``."""
    return [f for backend in backends for f in save_dir.glob(f"{backend}_*") if f.name.endswith(POLYGRAPHY_FILES)]


def _discard(save_dir: Path, created: bool, backends) -> None:
    """Remove the Polygraphy files of this run: the whole directory where this run created it."""
    if created:
        shutil.rmtree(save_dir, ignore_errors=True)
        return
    for f in _files(save_dir, backends):
        f.unlink(missing_ok=True)


def _set_aside(save_dir: Path, backends) -> Path | None:
    """An earlier run's files of ``backends`` moved into a hidden folder of ``save_dir`` (put back if this run
    fails or is interrupted, dropped once it has written its own); None where there are none."""
    files = _files(save_dir, backends) if save_dir.is_dir() else []
    if not files:
        return None
    backup = save_dir / f".previous-{os.getpid()}"
    backup.mkdir(exist_ok=True)
    for f in files:
        f.rename(backup / f.name)
    return backup


def _put_back(backup: Path | None, save_dir: Path) -> None:
    if backup is not None:
        for f in backup.iterdir():
            f.rename(save_dir / f.name)
        backup.rmdir()


def check_save_dir(save_dir: Path, engines: Path, checkpoint: Path) -> None:
    """Refuse a --save-dir that is a file, or the engines or checkpoint directory or inside one."""
    if save_dir.exists() and not save_dir.is_dir():
        raise CompareError(f"--save-dir {save_dir} is a file: give a folder for the Polygraphy files")
    check_outside("--save-dir", save_dir, engines, checkpoint, "folder")


def check_outside(flag: str, path: Path, engines: Path, checkpoint: Path, what: str) -> None:
    """Refuse an output ``path`` (``flag``'s) that is the engines or checkpoint directory or inside one: a
    report named manifest.json or config.json there would replace the file the directory is read by."""
    where = Path(path).resolve()
    for name, d in (("engines", engines), ("checkpoint", checkpoint)):
        d = Path(d).resolve()
        if where == d or d in where.parents:
            raise CompareError(f"{flag} {path} is inside the {name} directory {d}, which llada-compare does "
                               f"not write to: give another {what}")


def run_compare(engines: str | Path, checkpoint: str | Path, prompts: list[tuple] | None = None,
                backends: list[str] | None = None, save_dir: str | Path | None = None,
                presets: tuple[str, ...] = ("mc", "chartqa"), verbose: bool = False,
                settings: dict | None = None, report: CompareReport | None = None) -> CompareReport:
    """``prompts``: (image, prompt) pairs that replace the built-in ones (built-ins that do not fit
    the bucket are skipped, and the report says so). ``settings``: sampler settings for the
    end-to-end check (cache, refresh, factor, threshold). ``save_dir``: where the Polygraphy files
    go (default ``<engines>-compare/``, removed again when the comparison fails); a run that
    raises leaves none of its files. ``report``: filled in place, so that a caller can write what
    was done when it raises."""
    G_LOGGER.module_severity = G_LOGGER.INFO if verbose else G_LOGGER.ERROR
    engines = Path(engines)
    if save_dir is not None:
        check_save_dir(Path(save_dir), engines, Path(checkpoint))
    report = report if report is not None else CompareReport(str(engines), str(checkpoint), "")
    first = Pipeline.load(engines)
    m = first.manifest
    report.dtype = m.dtype if m.quantization is None else f"{m.dtype}, {m.weights_format} weights"
    model, tok, cfg = load_checkpoint(checkpoint, dtype=torch.float32)
    check_same_model(first, cfg, checkpoint)
    if tok is None:
        raise CompareError(f"{checkpoint} has no tokenizer files; the end-to-end check encodes prompts")
    ctx = OracleContext(m.tokens, m.pruning, m.bucket.k_static, m.fused_sampler)
    plan = plan_compare(first, prompts, backends, presets, dict(settings or {}))
    report.notes += plan.notes
    if len(first.batch_sizes) > 1:
        report.notes.append(f"these engines hold batch sizes {', '.join(map(str, first.batch_sizes))}: each graph is "
                            f"compared at batch size {m.bucket.batch_size} (the largest); the end-to-end answers run "
                            f"one request each, on batch size {first.batch_size_for(1)}")
    keep_files = save_dir is not None
    save_dir = Path(save_dir) if save_dir else engines.parent / f"{engines.name}-compare"
    created = not save_dir.exists()
    earlier = None if created else _set_aside(save_dir, plan.pipes)  # an interrupted run leaves them as they were
    try:
        for pipe in plan.pipes.values():
            compare_graphs(report, pipe, model, plan.prompts[0], ctx, save_dir)
            agreement(report, pipe, model, tok, plan)
    except BaseException:
        _discard(save_dir, created, plan.pipes)
        _put_back(earlier, save_dir)
        raise
    if earlier is not None:
        shutil.rmtree(earlier, ignore_errors=True)
    if not report.passed and not keep_files:
        _discard(save_dir, created, plan.pipes)
        for g in report.graphs:
            g.polygraphy_command = None
        report.notes.append(f"the Polygraphy files of this failed run were removed from {save_dir}; pass "
                            "--save-dir to keep them and get the commands that repeat each check")
    return report


def compare_graphs(report: CompareReport, pipe: Pipeline, model, first_prompt: tuple, ctx: OracleContext,
                   save_dir: Path) -> None:
    """Every graph of ``pipe``'s backend against its eager oracle on real inputs from one prompt."""
    m, backend = pipe.manifest, pipe.backend
    image, prompt = first_prompt
    pool = feed_pool(pipe, model, image, prompt, ctx)
    b = get_backend(backend)
    for name, rel in m.artifacts[backend].items():
        spec, io, path = GRAPHS.get(name), m.graphs[name], pipe.root / rel
        feeds = feeds_for(io, pool)
        if spec is None or spec.oracle is None or feeds is None:
            continue  # a graph this version cannot build inputs or an oracle for
        oracle = resolve(spec.oracle)
        ref_fn = lambda oracle=oracle, **kw: oracle(model, kw, ctx)  # noqa: E731
        runner = (b.polygraphy_runner(path, f"{backend}-{name}") if b.polygraphy_runner else
                  EngineRunner(pipe.runners[name], feeds, name=f"{backend}-{name}"))
        report.graphs.append(compare_graph(name, backend, runner, ref_fn, feeds, io, m.weights_format, save_dir, path))


def agreement(report: CompareReport, pipe: Pipeline, model, tok, plan: Plan) -> None:
    """End to end, per prompt and preset: engine vs eager (same pruning and settings), pruned vs
    unpruned, and the kept-index overlap."""
    m = pipe.manifest
    for image, prompt in plan.prompts:
        for pname, gen in plan.presets:
            eng = pipe.generate_batch([Request(image, prompt)], config=gen)[0]
            ref = reference_generate(model, tok, image, prompt, gen, m.pruning)
            unp = reference_generate(model, tok, image, prompt, gen) if m.pruning else ref
            n = max(len(ref.ids), len(unp.ids), 1)
            agree = sum(a == b for a, b in zip(ref.ids, unp.ids)) / n
            ek, rk = set(eng.kept_visual or []), set(ref.kept_visual or [])
            overlap = len(ek & rk) / max(len(ek | rk), 1) if m.pruning else 1.0
            label = pname or "engines"
            report.agreement.append({
                "backend": pipe.backend, "prompt": prompt, "image": str(image), "preset": label,
                "settings": f"{label} {gen.describe()}",
                "engine_vs_reference_exact": eng.ids == ref.ids, "strict": m.weights_format == "float32",
                "pruned_vs_unpruned_agreement": agree, "pruned_vs_unpruned_exact": ref.ids == unp.ids,
                "kept_overlap": overlap, "answer": eng.text})


REPORT_KEYS = {"engines", "checkpoint", "dtype", "passed", "graphs", "agreement"}  # CompareReport.to_dict's


def is_report(path: Path) -> bool:
    """Whether ``path`` is a report :func:`write_report` wrote (its JSON, or its Markdown summary)."""
    try:
        with open(path, encoding="utf-8") as f:
            if path.suffix == ".md":
                return f.readline().startswith("# llada-compare: ")
            d = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(d, dict) and REPORT_KEYS <= d.keys()


def write_report(report: CompareReport, path: str | Path) -> tuple[Path, Path]:
    """The report as JSON at ``path`` and as Markdown beside it, each written whole (a temporary file renamed)."""
    path = Path(path)
    md = path.with_suffix(".md")
    for f, text in ((path, json.dumps(report.to_dict(), indent=2) + "\n"), (md, report.markdown())):
        tmp = f.with_name(f".{f.name}.partial")
        try:
            tmp.write_text(text)
            os.replace(tmp, f)
        finally:
            tmp.unlink(missing_ok=True)
    return path, md
