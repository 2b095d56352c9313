"""Accuracy vs compute of LLaDA-FastV pruning on the procedural VQA task, through ONNX Runtime engines.

For the unpruned model and every (prune layer K, keep) pair, exports one engine set
(``export_engines``, a bucket fitted to the task: 384x288 images, the longest task prompt,
``gen_length`` = the trainer's response length) and answers the first ``--n`` questions of
the TEST split with the official sampler settings of the trainer's evaluation
(gen = block = steps = response length, temperature 0, low-confidence remasking), the
same system prompt and ``"<image>\\n" + question`` prompt as training, and the trainer's
answer check (``prediction.strip() == answer``). FLOPs per request come from the
analytic model of ``llada_export.flops``.

    python tools/prune_sweep.py --n 300    # the bundled demo model

Writes ``<out>.json``, ``<out>.md`` and ``<out>.png`` (default ``benchmarks/prune_sweep``).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

from llada_export import vqa_task
from llada_export.checkpoint.loader import load_checkpoint
from llada_export.contract.pruning import PruneSettings, num_kept
from llada_export.exporter.build import ExportOptions, export_engines, plan_bucket
from llada_export.flops import request_flops
from llada_export.runtime.pipeline import Pipeline
from llada_export.sampler import GenerationConfig
from llada_export.report import history_note, pyplot, save, write_report

GEN_LENGTH = vqa_task.GEN_LENGTH
IMAGE_SIZE = (vqa_task.WIDTH, vqa_task.HEIGHT)


# ---------------------------------------------------------------------- helpers
class VisualCache:
    """Visual embeddings per sample from the first pipeline's vision engine: every engine set
    holds the same vision graph, so later pipelines reuse them instead of re-running it."""

    def __init__(self):
        self.store: dict[int, torch.Tensor] = {}

    def install(self, pipe: Pipeline, key_of) -> None:
        orig = pipe.encode_image

        def encode_image(image, pixels=None):
            key = key_of(image)
            if key not in self.store:
                self.store[key] = orig(image, pixels)[0]
            return self.store[key], 0.0

        pipe.encode_image = encode_image  # instance attribute: Pipeline.generate calls self.encode_image


def evaluate(pipe: Pipeline, samples, images, gen: GenerationConfig, unpruned: bool, cache: VisualCache | None) -> dict:
    ids = {id(img): s.index for s, img in zip(samples, images)}
    if cache is not None:
        cache.install(pipe, lambda img: ids[id(img)])
    preds, hits, steps, kept = [], [], [], []
    t0 = time.perf_counter()
    for s, img in zip(samples, images):
        r = pipe.generate(img, s.prompt, gen_length=gen.gen_length, block_length=gen.block_length, steps=gen.steps,
                          unpruned=unpruned, fixed_schedule=True)
        preds.append(r.text)
        hits.append(r.text.strip() == s.answer)
        steps.append(r.forwards)
        if r.kept_visual is not None:
            kept.append(len(r.kept_visual))
    seconds = time.perf_counter() - t0
    out = vqa_task.accuracy_table([s.qtype for s in samples], hits)
    out.update(seconds=seconds, seconds_per_question=seconds / max(1, len(samples)),
               mean_steps=sum(steps) / max(1, len(steps)), predictions=preds)
    if kept:
        out["kept_visual"] = sum(kept) / len(kept)
    return out


def flops_for(cfg, bucket, gen: GenerationConfig, layer: int | None, keep: float) -> dict:
    """Analytic FLOPs of one request filling the bucket (llada_export.flops), all `steps` steps."""
    f = request_flops(cfg, bucket.prefix_len, bucket.max_visual_tokens, gen, layer, keep, bucket.vision_batch)
    return {k: float(v) for k, v in f.items()}


# ---------------------------------------------------------------------- sweep
def run_sweep(ckpt: str | Path, n: int, layers: list[int], keeps: list[float], gen_length: int = GEN_LENGTH,
              split: str = "test", fuse_sampler: bool = True, workdir: str | Path | None = None,
              progress: bool = True) -> dict:
    torch.set_num_threads(min(2, torch.get_num_threads()))
    t_start = time.perf_counter()
    own_tmp = workdir is None
    work = Path(tempfile.mkdtemp(prefix="prune_sweep_") if own_tmp else workdir)
    work.mkdir(parents=True, exist_ok=True)
    try:
        ck = Path(ckpt)
        _, tokenizer, cfg = load_checkpoint(ck, dtype=torch.float32)
        n_layers = cfg.text.num_hidden_layers
        bad = [k for k in layers if not 0 <= k < n_layers]
        if bad:
            raise SystemExit(f"--layers {bad}: the model has layers 0..{n_layers - 1}")
        gen = GenerationConfig(gen_length, gen_length, gen_length).validate()
        mpt = vqa_task.prompt_tokens(tokenizer)
        samples = vqa_task.make_split(split, n)
        images = [s.image() for s in samples]
        cache = VisualCache()

        def opts(out: Path, layer: int, keep: float, baseline: bool) -> ExportOptions:
            return ExportOptions(model=str(ck), output=str(out), prune=PruneSettings(layer, keep), baseline=baseline,
                                 fuse_sampler=fuse_sampler, backends=("onnxruntime",), dtype="float32",
                                 device="cpu", gen_length=gen.gen_length, block_length=gen.block_length,
                                 steps=gen.steps, max_prompt_tokens=mpt, image_size=IMAGE_SIZE,
                                 overwrite=True, progress=False)

        bucket = plan_bucket(opts(work / "x", layers[0], keeps[0], False), cfg)
        results = []
        export_seconds = 0.0
        first = True
        for layer in layers:
            for keep in keeps:
                out = work / f"engines_K{layer}_keep{keep}"
                t0 = time.perf_counter()
                export_engines(opts(out, layer, keep, baseline=first))
                t_exp = time.perf_counter() - t0
                export_seconds += t_exp
                pipe = Pipeline.load(out, backend="onnxruntime", device="cpu")
                if first:
                    r = evaluate(pipe, samples, images, gen, unpruned=True, cache=cache)
                    r.update(setting="unpruned", layer=None, keep=1.0, k=bucket.max_visual_tokens,
                             flops=flops_for(cfg, bucket, gen, None, 1.0))
                    results.append(r)
                    if progress:
                        print(f"unpruned: acc {r['overall']:.3f} ({r['seconds']:.0f} s)", flush=True)
                    first = False
                r = evaluate(pipe, samples, images, gen, unpruned=False, cache=cache)
                r.update(setting=f"K={layer} keep={keep}", layer=layer, keep=keep,
                         k=num_kept(keep, bucket.max_visual_tokens), export_seconds=t_exp,
                         flops=flops_for(cfg, bucket, gen, layer, keep))
                results.append(r)
                if progress:
                    print(f"K={layer} keep={keep}: acc {r['overall']:.3f} export {t_exp:.0f} s, "
                          f"eval {r['seconds']:.0f} s", flush=True)
                del pipe
                shutil.rmtree(out, ignore_errors=True)
    finally:
        if own_tmp:
            shutil.rmtree(work, ignore_errors=True)

    base = results[0]
    for r in results:
        r["flops_reduction"] = 1.0 - r["flops"]["total"] / base["flops"]["total"]
        r["relative_accuracy"] = r["overall"] / base["overall"] if base["overall"] else float("nan")
    ok = [r for r in results[1:] if r["overall"] >= 0.95 * base["overall"]]
    best = max(ok, key=lambda r: r["flops_reduction"]) if ok else None
    return {
        "checkpoint": str(ckpt),
        "split": split,
        "n": n,
        "generation": {"gen_length": gen.gen_length, "block_length": gen.block_length, "steps": gen.steps,
                       "temperature": gen.temperature, "remasking": gen.remasking},
        "bucket": bucket.to_dict() | {"image_size": list(IMAGE_SIZE)},
        "backend": "onnxruntime (CPU, fp32)" + (", fused sampler" if fuse_sampler else ""),
        "layers": layers,
        "keeps": keeps,
        "n_layers": n_layers,
        "text_only_baseline": vqa_task.text_only_baseline(split, 2000)["overall"],
        "results": results,
        "best_95": None if best is None else {"setting": best["setting"], "layer": best["layer"], "keep": best["keep"],
                                              "accuracy": best["overall"], "relative_accuracy": best["relative_accuracy"],
                                              "flops_reduction": best["flops_reduction"]},
        "export_seconds": export_seconds,
        "seconds": time.perf_counter() - t_start,
        "env": {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                "machine": platform.machine()},
    }


# ---------------------------------------------------------------------- reports
def add_agreement(res: dict) -> None:
    """Paired measures against the unpruned engines on the same questions: the share with the
    same answer, and how many questions each setting turns from right to wrong (lost) and from
    wrong to right (gained). Less noisy than comparing two accuracies. A result that has them keeps
    them: the answers are those of the task version it ran on (task v2 drew other test questions)."""
    if all(k in r for r in res["results"] for k in ("agreement_with_unpruned", "lost", "gained")):
        return
    base = res["results"][0]["predictions"]
    answers = [s.answer for s in vqa_task.make_split(res["split"], res["n"])]
    base_ok = [p.strip() == a for p, a in zip(base, answers)]
    for r in res["results"]:
        ok = [p.strip() == a for p, a in zip(r["predictions"], answers)]
        r["agreement_with_unpruned"] = sum(a.strip() == b.strip() for a, b in zip(r["predictions"], base)) / max(1, len(base))
        r["lost"] = sum(b and not o for b, o in zip(base_ok, ok))
        r["gained"] = sum(o and not b for b, o in zip(base_ok, ok))


def markdown(res: dict) -> str:
    base = res["results"][0]
    add_agreement(res)
    types = sorted(base["per_type"])
    n = res["n"]
    lo, hi = base["ci95"]
    text_only = res.get("text_only_baseline")
    lines = [
        "# LLaDA-FastV pruning sweep on the procedural VQA task (ONNX Runtime engines, CPU)" + history_note(res),
        "",
        f"- checkpoint `{res['checkpoint']}`, split `{res['split']}` (first {n} questions); unpruned accuracy "
        f"{base['overall']:.1%} (95% Wilson interval [{lo:.1%}, {hi:.1%}]), text-only baseline "
        f"({res['split']}[:2000]): " + (f"{text_only:.1%}" if text_only is not None else "n/a"),
        f"- engines: {res['backend']}; one `export_engines` per (K, keep); bucket: image "
        f"{res['bucket']['image_size'][0]}x{res['bucket']['image_size'][1]}, "
        f"{res['bucket']['max_visual_tokens']} visual tokens, {res['bucket']['max_text_tokens']} prompt tokens, "
        f"G = {res['bucket']['gen_length']}; the model has {res['n_layers']} LM layers (0..{res['n_layers'] - 1})",
        f"- sampler: gen = block = steps = {res['generation']['gen_length']}, temperature 0, low-confidence "
        f"remasking, stop at the first committed `<|eot_id|>` (the trainer's evaluation settings); "
        f"answer check `prediction.strip() == answer`",
        f"- FLOPs: analytic (`llada_export.flops.request_flops`) for a request filling the bucket and all "
        f"{res['generation']['steps']} steps (vision included); the sampler stops earlier when the answer "
        f"and its `<|eot_id|>` are committed, see 'steps'",
        "- lost / gained: questions the setting turns from right to wrong / wrong to right against the "
        "unpruned engines (paired, on the same questions)",
        f"- total time {res['seconds']:.0f} s (exports {res['export_seconds']:.0f} s) on "
        f"{res['env']['threads']} CPU threads",
        "",
        "| setting | k visual | accuracy | 95% CI | rel. to unpruned | lost / gained | same answer as unpruned | "
        "GFLOPs/request | FLOPs saved | " + " | ".join(types) + " | steps | s/question |",
        "|---|---|---|---|---|---|---|---|---|" + "---|" * len(types) + "---|---|",
    ]
    for r in res["results"]:
        lo, hi = r["ci95"]
        lines.append(
            f"| {r['setting']} | {r['k']} | {r['overall']:.1%} | [{lo:.0%}, {hi:.0%}] | "
            f"{r['relative_accuracy']:.1%} | {r['lost']} / {r['gained']} | {r['agreement_with_unpruned']:.0%} | "
            f"{r['flops']['total'] / 1e9:.1f} | {r['flops_reduction']:.0%} | "
            + " | ".join(f"{r['per_type'].get(t, float('nan')):.0%}" for t in types)
            + f" | {r['mean_steps']:.1f} | {r['seconds_per_question']:.2f} |")
    lines.append("")
    lines.append("Per-type n: " + ", ".join(f"{t} {c}" for t, c in base["per_type_n"].items()) + ".")
    lines.append("")
    b = res["best_95"]
    if b:
        lines.append(f"**Best setting keeping >= 95% of the unpruned accuracy: {b['setting']}** "
                     f"({b['accuracy']:.1%} vs {base['overall']:.1%} unpruned, {b['relative_accuracy']:.1%}), "
                     f"**{b['flops_reduction']:.0%} fewer FLOPs per request**.")
    else:
        lines.append("No pruned setting kept >= 95% of the unpruned accuracy.")
    lines.append("")
    lines.append("Per prune layer, the smallest keep that holds >= 95% of the unpruned accuracy:")
    lines.append("")
    for layer in res["layers"]:
        rs = [r for r in res["results"] if r["layer"] == layer]
        ok = [r for r in rs if r["overall"] >= 0.95 * base["overall"]]
        worst = min(rs, key=lambda r: r["overall"])
        if ok:
            r = min(ok, key=lambda r: r["keep"])
            lines.append(f"- K={layer}: keep {r['keep']} ({r['overall']:.1%}, {r['flops_reduction']:.0%} fewer FLOPs, "
                         f"{r['lost']} lost / {r['gained']} gained); lowest accuracy over the keeps "
                         f"{worst['overall']:.1%} (keep {worst['keep']})")
        else:
            lines.append(f"- K={layer}: none (best {max(r['overall'] for r in rs):.1%})")
    lines.append("")
    lines.append(f"Reproduce: `python tools/prune_sweep.py --ckpt {res['checkpoint']} --n "
                 f"{n} --layers {' '.join(map(str, res['layers']))} --keeps {' '.join(map(str, res['keeps']))}`")
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    plt = pyplot()

    base = res["results"][0]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for layer in res["layers"]:
        rs = sorted([r for r in res["results"] if r["layer"] == layer], key=lambda r: r["flops"]["total"])
        ax.plot([r["flops"]["total"] / 1e9 for r in rs], [r["overall"] for r in rs], "o-", label=f"K={layer}")
        for r in rs:
            ax.annotate(f"{r['keep']}", (r["flops"]["total"] / 1e9, r["overall"]), fontsize=7,
                        textcoords="offset points", xytext=(3, 3))
    lo, hi = base["ci95"]
    x0 = base["flops"]["total"] / 1e9
    ax.errorbar([x0], [base["overall"]], yerr=[[base["overall"] - lo], [hi - base["overall"]]], fmt="k*",
                markersize=12, capsize=4, label="unpruned (95% CI)")
    ax.axhline(0.95 * base["overall"], color="grey", ls="--", lw=0.8, label="95% of unpruned")
    if res.get("text_only_baseline") is not None:
        ax.axhline(res["text_only_baseline"], color="red", ls=":", lw=0.8, label="text-only baseline")
    ax.set_xlabel("GFLOPs per request (analytic)")
    ax.set_ylabel(f"test accuracy (n={res['n']})")
    ax.set_title("demo model, ONNX Runtime engines: accuracy vs FLOPs", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    save(fig, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default="llada_export/assets/demo-model", help="checkpoint (default: the bundled demo model)")
    p.add_argument("--n", type=int, default=150, help="test questions")
    p.add_argument("--out", default="benchmarks/prune_sweep", help="output path without extension")
    p.add_argument("--layers", type=int, nargs="+", default=[1, 3, 5])
    p.add_argument("--keeps", type=float, nargs="+", default=[0.75, 0.5, 0.35, 0.25, 0.1])
    p.add_argument("--gen-length", type=int, default=GEN_LENGTH)
    p.add_argument("--no-fuse-sampler", action="store_true")
    p.add_argument("--workdir", default=None, help="where engines are built (default: a temporary directory)")
    p.add_argument("--replot", action="store_true", help="only rewrite <out>.md and <out>.png from <out>.json")
    args = p.parse_args(argv)
    out = Path(args.out)
    if args.replot:  # recomputes the agreement column of an older JSON
        res = json.loads(out.with_suffix(".json").read_text())
    else:
        res = run_sweep(args.ckpt, args.n, args.layers, args.keeps, args.gen_length,
                        fuse_sampler=not args.no_fuse_sampler, workdir=args.workdir)
    add_agreement(res)
    write_report(out, res, markdown, plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
