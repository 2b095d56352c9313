"""Accuracy of an engines directory against the eager PyTorch model, with Polygraphy.

Per graph (vision, stage A, stage B, the unpruned ``full`` graph) the eager reference and
the engine run on the same real inputs (from an image and a prompt) through Polygraphy's
``Comparator``; ``CompareFunc.simple`` checks per-output tolerances (fp32 tight, fp16/bf16
looser; integer outputs exact) and gives the error statistics. The inputs and the
reference outputs are saved so that ``polygraphy run <graph>.onnx --onnxrt --load-inputs
... --load-outputs ...`` repeats the check from the command line.

End to end, over a set of prompts: token agreement engine vs eager (same pruning; exact in
fp32), pruned vs unpruned (the pruning's own effect), and the kept-index overlap.
"""

from __future__ import annotations

import json
import shlex
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from polygraphy.backend.base import BaseRunner
from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
from polygraphy.common import TensorMetadata
from polygraphy.comparator import Comparator, CompareFunc, RunResults
from polygraphy.json import save_json
from polygraphy.logger import G_LOGGER

from .checkpoint import load_checkpoint
from .graphs.pruning import num_kept
from .reference import PruneSettings, pruned_forward, reference_generate
from .runtime.pipeline import Pipeline
from .runtime.sampler import preset as get_preset
from .tokenizer import DEFAULT_SYSTEM_PROMPT, encode_prompt

BUNDLED = [
    (Path(__file__).parent / "assets" / "demo.png", "<image>\nWhat colour is the circle?"),
    (Path(__file__).parent / "assets" / "demo.png", "<image>\nHow many shapes are there? Answer with a number."),
]
# (atol, rtol) per engine dtype, relative to the largest reference magnitude of each output.
TOLERANCES = {"float32": (1e-4, 1e-4), "float16": (2e-2, 2e-2), "bfloat16": (5e-2, 5e-2)}
INTEGER_OUTPUTS = {"kept_index", "kept_alive"}


class TorchRunner(BaseRunner):
    """The eager reference as a Polygraphy runner (numpy feed dict in, numpy outputs out)."""

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
        res = OrderedDict((n, o.detach().cpu().numpy()) for n, o in zip(self.outputs, outs))
        self.inference_time = time.perf_counter() - t0
        return res


class EngineRunner(TorchRunner):
    """A llada-export runner (AOTInductor, TensorRT) behind Polygraphy's runner interface."""

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

    @property
    def passed(self) -> bool:
        return all(g.passed for g in self.graphs) and all(a["engine_vs_reference_exact"] or not a["strict"]
                                                          for a in self.agreement)

    def to_dict(self) -> dict:
        return {"engines": self.engines, "checkpoint": self.checkpoint, "dtype": self.dtype, "passed": self.passed,
                "graphs": [g.__dict__ for g in self.graphs], "agreement": self.agreement}

    def markdown(self) -> str:
        lines = [f"# llada-compare: {'PASS' if self.passed else 'FAIL'}", "",
                 f"engines `{self.engines}` vs eager PyTorch on `{self.checkpoint}` (engine dtype {self.dtype})", "",
                 "| backend | graph | output | max abs | mean abs | median abs | p99 abs | max rel | atol | rtol | ok |",
                 "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for g in self.graphs:
            for out, s in g.stats.items():
                t = g.tolerances[out]
                lines.append(f"| {g.backend} | {g.graph} | {out} | {s['max_abs']:.3g} | {s['mean_abs']:.3g} | "
                             f"{s['median_abs']:.3g} | {s['p99_abs']:.3g} | {s['max_rel']:.3g} | {t['atol']:.3g} | "
                             f"{t['rtol']:.3g} | {'yes' if s['passed'] else '**NO**'} |")
        lines += ["", "## End-to-end agreement", "",
                  "| backend | prompt | preset | engine = eager (pruned) | token agreement pruned vs unpruned | "
                  "kept-index overlap | answer |", "| --- | --- | --- | --- | --- | --- | --- |"]
        for a in self.agreement:
            lines.append(f"| {a['backend']} | {a['prompt']!r} | {a['preset']} | {a['engine_vs_reference_exact']} | "
                         f"{a['pruned_vs_unpruned_agreement']:.2f} | {a['kept_overlap']:.2f} | {a['answer']!r} |")
        cmds = [g.polygraphy_command for g in self.graphs if g.polygraphy_command]
        if cmds:
            lines += ["", "## Reproduce with Polygraphy", "", "```", *cmds, "```"]
        return "\n".join(lines) + "\n"


def graph_inputs(pipe: Pipeline, image, prompt: str, model, mask_id: int) -> dict[str, dict[str, np.ndarray]]:
    """Real inputs for every graph of the engines, from one image and prompt."""
    b = pipe.bucket
    from .graphs.anyres import load_image, preprocess
    pixels, _ = preprocess(load_image(image), pipe.config)
    vis_in = torch.zeros(b.vision_batch, *pixels.shape[1:])
    vis_in[: min(len(pixels), b.vision_batch)] = pixels[: b.vision_batch]
    before, _ = encode_prompt(pipe.tokenizer, prompt, has_image=image is not None)
    x, _ = pipe.build_inputs(image, prompt, b.gen_length, DEFAULT_SYSTEM_PROMPT)
    x.prefix_embeds, x.position_ids = x.prefix_embeds.cpu(), x.position_ids.cpu()
    x.key_mask, x.visual_mask = x.key_mask.cpu(), x.visual_mask.cpu()
    resp = torch.full((1, b.gen_length), mask_id)
    feeds = {"vision": {"pixel_values": vis_in}}
    den = dict(prefix_embeds=x.prefix_embeds, response_ids=resp, position_ids=x.position_ids, key_mask=x.key_mask)
    if "full" in pipe.manifest["graphs"]:
        feeds["full"] = dict(den)
    if pipe.pruned:
        n_keep = torch.tensor([num_kept(pipe.keep, x.n_visual)])
        feeds["stage_a"] = dict(den, visual_mask=x.visual_mask, num_keep=n_keep)
        with torch.no_grad():  # stage B's inputs follow from the reference's pruning decision
            _, index, alive = _stage_a_ref(pipe, model, mask_id)(**feeds["stage_a"])
        p_red = index.shape[1] - b.gen_length
        resp_b = resp.clone()  # half the response committed, as in a later step
        committed = torch.tensor(before[: b.gen_length // 2], dtype=torch.long)
        resp_b[0, : len(committed)] = committed
        feeds["stage_b"] = dict(prefix_embeds=x.prefix_embeds[:, index[0, :p_red]].contiguous(), response_ids=resp_b,
                                position_ids=x.position_ids[:, index[0]].contiguous(), key_mask=alive)
    return {g: {k: v.numpy() for k, v in f.items()} for g, f in feeds.items()}


def _stage_a_ref(pipe: Pipeline, model, mask_id: int):
    pr = pipe.manifest["pruning"]
    settings = PruneSettings(pr["layer"], pr["keep"], pr["score_from"])

    def fn(prefix_embeds, response_ids, position_ids, key_mask, visual_mask, num_keep):
        return pruned_forward(model, prefix_embeds, response_ids, position_ids, key_mask, visual_mask, num_keep,
                              settings, pr["k_static"], mask_id)

    return fn


def reference_fns(pipe: Pipeline, model, mask_id: int) -> dict:
    return {"vision": lambda pixel_values: model.encode_images(pixel_values),
            "stage_a": _stage_a_ref(pipe, model, mask_id),
            "stage_b": lambda **kw: model.denoise(**kw), "full": lambda **kw: model.denoise(**kw)}


def _stats(ref: np.ndarray, out: np.ndarray) -> dict[str, float]:
    d = np.abs(ref.astype(np.float64) - out.astype(np.float64))
    rel = d / np.maximum(np.abs(ref.astype(np.float64)), 1e-6)
    return {"max_abs": float(d.max()), "mean_abs": float(d.mean()), "median_abs": float(np.median(d)),
            "p90_abs": float(np.quantile(d, 0.9)), "p99_abs": float(np.quantile(d, 0.99)), "max_rel": float(rel.max()),
            "mean_rel": float(rel.mean())}


def compare_graph(name: str, backend: str, engine_runner: BaseRunner, ref_fn, feeds: dict[str, np.ndarray],
                  outputs: list[str], dtype: str, save_dir: Path, engine_path: Path) -> GraphReport:
    ref_runner = TorchRunner(ref_fn, feeds, outputs, name=f"pytorch-{name}")
    results = Comparator.run([ref_runner, engine_runner], data_loader=[feeds], warm_up=0)
    ref_out = results[0][1][0]
    a, r = TOLERANCES[dtype]
    tol = {o: ({"atol": 0.0, "rtol": 0.0} if o in INTEGER_OUTPUTS else
               {"atol": a * max(1.0, float(np.abs(ref_out[o]).max())), "rtol": r}) for o in outputs}
    func = CompareFunc.simple(atol={o: t["atol"] for o, t in tol.items()},
                              rtol={o: t["rtol"] for o, t in tol.items()}, check_error_stat="elemwise",
                              error_quantile=0.99)
    acc = Comparator.compare_accuracy(results, compare_func=func)
    per_out = acc[0][(results[0][0], results[1][0])][0]  # one compare func, one iteration: output -> result
    stats = {}
    for o in outputs:
        s = _stats(ref_out[o], results[1][1][0][o])
        s["passed"] = bool(per_out[o])
        stats[o] = s
    cmd = None
    if engine_path.suffix == ".onnx":
        save_dir.mkdir(parents=True, exist_ok=True)
        inp, outp = save_dir / f"{backend}_{name}_inputs.json", save_dir / f"{backend}_{name}_reference_outputs.json"
        save_json([feeds], str(inp))
        RunResults([results[0]]).save(str(outp))
        atol = " ".join(f"{o}:{t['atol']:.6g}" for o, t in tol.items())
        rtol = " ".join(f"{o}:{t['rtol']:.6g}" for o, t in tol.items())
        cmd = (f"polygraphy run {shlex.quote(str(engine_path))} --onnxrt --load-inputs {shlex.quote(str(inp))} "
               f"--load-outputs {shlex.quote(str(outp))} --atol {atol} --rtol {rtol}")
    return GraphReport(name, backend, all(s["passed"] for s in stats.values()), tol, stats, cmd)


def run_compare(engines: str | Path, checkpoint: str | Path, prompts: list[tuple] | None = None,
                backends: list[str] | None = None, save_dir: str | Path | None = None,
                presets: tuple[str, ...] = ("mc", "chartqa"), verbose: bool = False) -> CompareReport:
    G_LOGGER.module_severity = G_LOGGER.INFO if verbose else G_LOGGER.ERROR
    engines = Path(engines)
    model, tok, _ = load_checkpoint(checkpoint, dtype=torch.float32)
    first = Pipeline.load(engines)
    dtype = first.manifest["dtype"]
    mask_id = first.tokens["mask"]
    report = CompareReport(str(engines), str(checkpoint), dtype)
    prompts = prompts or BUNDLED
    save_dir = Path(save_dir) if save_dir else engines.parent / f"{engines.name}-compare"
    for backend in backends or list(first.manifest["artifacts"]):
        pipe = first if backend == first.backend else Pipeline.load(engines, backend=backend, verify=False)
        image, prompt = prompts[0]
        feeds = graph_inputs(pipe, image, prompt, model, mask_id)
        refs = reference_fns(pipe, model, mask_id)
        for name, rel in pipe.manifest["artifacts"][backend].items():
            g = pipe.manifest["graphs"][name]
            path = engines / rel
            if backend == "onnxruntime":
                runner = OnnxrtRunner(SessionFromOnnx(str(path), providers=["CPUExecutionProvider"]),
                                      name=f"onnxrt-{name}")
            else:
                runner = EngineRunner(pipe.runners[name], feeds[name], name=f"{backend}-{name}")
            report.graphs.append(compare_graph(name, backend, runner, refs[name], feeds[name], g["outputs"], dtype,
                                               save_dir, path))
        for image, prompt in prompts:
            for pname in presets:
                gen = get_preset(pname)
                if gen.gen_length > pipe.bucket.gen_length:
                    continue
                eng = pipe.generate(image, prompt, preset=pname)
                pr = pipe.manifest["pruning"]
                prune = PruneSettings(pr["layer"], pr["keep"], pr["score_from"]) if pipe.pruned else None
                ref = reference_generate(model, tok, image, prompt, gen, prune)
                unp = reference_generate(model, tok, image, prompt, gen) if prune else ref
                n = max(len(ref.ids), len(unp.ids), 1)
                agree = sum(a == b for a, b in zip(ref.ids, unp.ids)) / n
                ek, rk = set(eng.kept_visual or []), set(ref.kept_visual or [])
                overlap = len(ek & rk) / max(len(ek | rk), 1) if prune else 1.0
                report.agreement.append({
                    "backend": backend, "prompt": prompt, "image": str(image), "preset": pname,
                    "engine_vs_reference_exact": eng.ids == ref.ids, "strict": dtype == "float32",
                    "pruned_vs_unpruned_agreement": agree, "pruned_vs_unpruned_exact": ref.ids == unp.ids,
                    "kept_overlap": overlap, "answer": eng.text})
    return report


def write_report(report: CompareReport, path: str | Path) -> tuple[Path, Path]:
    path = Path(path)
    path.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    md = path.with_suffix(".md")
    md.write_text(report.markdown())
    return path, md
