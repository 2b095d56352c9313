"""Fidelity of the prefix KV cache and parallel decoding on the trained demo model, through ONNX Runtime engines.

One engine set (the demo's pruning: K 3, keep 0.5; the unpruned baseline; the cache graphs;
batch size ``--batch``) answers the first ``--n`` TEST questions of the procedural VQA task
for every cache refresh interval x parallel-decoding rule, pruned and unpruned, and, as the
reference, without the cache on the official fixed schedule ("exact"). Per setting:
accuracy (with its 95% interval), answers identical to the exact engines of the same path,
and forwards per answer. The response length is 16 slots (the longest the demo model was
trained for), so refresh intervals of 16 and more all mean "at the block start only".

    python tools/cache_sweep.py --n 300

Writes ``<out>.json``, ``<out>.md`` and ``<out>.png`` (default ``benchmarks/cache_sweep``).
"""

from __future__ import annotations

import argparse
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

from llada_export import vqa_task
from llada_export.checkpoint.loader import load_checkpoint
from llada_export.contract.pruning import PruneSettings
from llada_export.exporter.build import ExportOptions, export_engines
from llada_export.runtime.pipeline import Pipeline, Request
from llada_export.report import history_note, pyplot, save, write_report

REFRESHES = ["1", "4", "8", "16", "32", "never"]
RULES = ["none", "factor 1", "factor 0.5", "threshold 0.95", "threshold 0.9", "threshold 0.8", "threshold 0.7"]


def rule_kwargs(rule: str) -> dict:
    if rule == "none":  # the official fixed schedule (Pipeline's default is the factor rule)
        return {"fixed_schedule": True}
    name, value = rule.split()
    return {name: float(value)}


def evaluate(pipe: Pipeline, samples, images, gen_length: int, batch: int, **settings) -> dict:
    preds, forwards, t0 = [], [], time.perf_counter()
    for i in range(0, len(samples), batch):
        reqs = [Request(img, s.prompt) for s, img in zip(samples[i:i + batch], images[i:i + batch])]
        for r in pipe.generate_batch(reqs, gen_length=gen_length, block_length=gen_length, steps=gen_length,
                                     **settings):
            preds.append(r.text)
            forwards.append(r.forwards)
    out = vqa_task.accuracy_table([s.qtype for s in samples], [p.strip() == s.answer for p, s in zip(preds, samples)])
    out.update(predictions=preds, mean_forwards=sum(forwards) / len(forwards), seconds=time.perf_counter() - t0)
    return out


def run_sweep(ckpt: str | Path, n: int, refreshes: list[str], rules: list[str], gen_length: int = 16,
              batch: int = 10, layer: int = 3, keep: float = 0.5, progress: bool = True) -> dict:
    torch.set_num_threads(min(2, torch.get_num_threads()))
    t_start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="cache_sweep_"))
    try:
        _, tokenizer, _ = load_checkpoint(ckpt)
        out = export_engines(ExportOptions(
            model=str(ckpt), output=str(work / "engines"), prune=PruneSettings(layer, keep), baseline=True, cache=True,
            fuse_sampler=True, gen_length=gen_length, max_prompt_tokens=vqa_task.prompt_tokens(tokenizer),
            image_size=(vqa_task.WIDTH, vqa_task.HEIGHT), batch_size=batch, progress=False))
        pipe = Pipeline.load(out)
        samples = vqa_task.make_split("test", n)
        images = [s.image() for s in samples]
        vision: dict[int, torch.Tensor] = {}  # every setting sees the same images: encode each once
        encode = pipe.encode_image

        def cached_encode(image, pixels=None):
            key = id(image)
            if key not in vision:
                vision[key] = encode(image, pixels)[0]
            return vision[key], 0.0

        pipe.encode_image = cached_encode
        results = []
        for unpruned in (False, True):
            path = "unpruned" if unpruned else "pruned"
            exact = evaluate(pipe, samples, images, gen_length, batch, unpruned=unpruned, cache=False)
            exact.update(path=path, refresh=None, rule="none", cache=False)
            results.append(exact)
            if progress:
                print(f"{path} exact: acc {exact['overall']:.3f}, {exact['mean_forwards']:.2f} forwards", flush=True)
            for rule in rules:
                done: dict[str, dict] = {}
                for refresh in refreshes:
                    # one block of gen_length: a refresh interval >= gen_length refreshes only at the block
                    # start, the same computation as "never": run it once
                    key = "never" if refresh == "never" or int(refresh) >= gen_length else refresh
                    if key not in done:
                        done[key] = evaluate(pipe, samples, images, gen_length, batch, unpruned=unpruned, cache=True,
                                             refresh=None if key == "never" else int(key), **rule_kwargs(rule))
                    r = dict(done[key], path=path, refresh=refresh, rule=rule, cache=True, same_as=key)
                    results.append(r)
                    if progress:
                        print(f"{path} refresh {refresh} {rule}: acc {r['overall']:.3f}, "
                              f"{r['mean_forwards']:.2f} forwards ({r['seconds']:.0f} s)", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    res = {"checkpoint": str(ckpt), "split": "test", "n": n, "gen_length": gen_length, "batch": batch,
           "pruning": {"layer": layer, "keep": keep}, "backend": "onnxruntime (CPU, fp32), fused sampler",
           "refreshes": refreshes, "rules": rules, "results": results, "seconds": time.perf_counter() - t_start,
           "env": {"python": platform.python_version(), "torch": torch.__version__, "machine": platform.machine()}}
    add_agreement(res)
    return res


def add_agreement(res: dict) -> None:
    """Answers identical to the exact (uncached, fixed-schedule) engines of the same path."""
    exact = {r["path"]: r["predictions"] for r in res["results"] if not r["cache"]}
    for r in res["results"]:
        base = exact[r["path"]]
        r["agreement_with_exact"] = sum(a.strip() == b.strip() for a, b in zip(r["predictions"], base)) / len(base)


def choose(res: dict) -> dict:
    """The fewest forwards per answer among the cached settings of the pruned path whose accuracy is
    within 1 point of the exact pruned engines (ties: higher agreement, then earlier in the table)."""
    exact = next(r for r in res["results"] if r["path"] == "pruned" and not r["cache"])
    ok = [r for r in res["results"] if r["path"] == "pruned" and r["cache"] and r["overall"] >= exact["overall"] - 0.01]
    best = min(ok, key=lambda r: (r["mean_forwards"], -r["agreement_with_exact"])) if ok else None
    return {"exact": exact, "best": best}


def markdown(res: dict) -> str:
    c = choose(res)
    ex, best = c["exact"], c["best"]
    lines = ["# Prefix cache and parallel decoding: fidelity on the demo model" + history_note(res), "",
             f"{res['n']} test questions of the procedural VQA task, ONNX Runtime engines on this CPU "
             f"({res['backend']}), pruning at layer {res['pruning']['layer']}, keep {res['pruning']['keep']}, "
             f"{res['gen_length']} response slots (one block), batches of {res['batch']}. Exact = no cache, the "
             "official fixed schedule (one token per step). `factor f` = the official LLaDA-V Fast-dLLM hook's rule "
             "(its demo's threshold=1 is factor 1); `threshold t` = Fast-dLLM's confidence threshold; refresh N = "
             "the cache refreshed every N forwards and at the block start (never: at the block start only; with one "
             f"block of {res['gen_length']}, refresh >= {res['gen_length']} is never).", ""]
    for path in ("pruned", "unpruned"):
        rows = [r for r in res["results"] if r["path"] == path]
        e = next(r for r in rows if not r["cache"])
        lines += [f"## {path}: exact {100 * e['overall']:.1f}% ({e['mean_forwards']:.2f} forwards per answer)", "",
                  "accuracy % / answers identical to exact % / forwards per answer:", "",
                  "| rule | " + " | ".join(f"refresh {x}" for x in res["refreshes"]) + " |",
                  "| --- | " + " | ".join("---" for _ in res["refreshes"]) + " |"]
        for rule in res["rules"]:
            cells = []
            for refresh in res["refreshes"]:
                r = next(r for r in rows if r["cache"] and r["rule"] == rule and r["refresh"] == refresh)
                cells.append(f"{100 * r['overall']:.1f} / {100 * r['agreement_with_exact']:.0f} / "
                             f"{r['mean_forwards']:.2f}")
            lines.append(f"| {rule} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Choice", ""]
    if best is not None:
        lines.append(f"Fewest forwards within 1 point of the exact pruned engines ({100 * ex['overall']:.1f}%, "
                     f"{ex['mean_forwards']:.2f} forwards): refresh {best['refresh']}, {best['rule']}: "
                     f"{100 * best['overall']:.1f}%, {best['mean_forwards']:.2f} forwards per answer "
                     f"({ex['mean_forwards'] / best['mean_forwards']:.1f}x fewer), "
                     f"{100 * best['agreement_with_exact']:.0f}% of the answers identical.")
    else:
        lines.append("No cached setting stays within 1 point of the exact pruned engines.")
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    colors = {rule: f"C{i}" for i, rule in enumerate(res["rules"])}
    for r in res["results"]:
        marker = "o" if r["path"] == "pruned" else "s"
        if not r["cache"]:
            ax.scatter(r["mean_forwards"], 100 * r["overall"], marker=marker, s=80, facecolors="none",
                       edgecolors="black", label=f"{r['path']} exact")
        else:
            ax.scatter(r["mean_forwards"], 100 * r["overall"], marker=marker, s=18, color=colors[r["rule"]],
                       alpha=0.7, label=f"{r['rule']}" if r["path"] == "pruned" and r["refresh"] == "1" else None)
    ax.set_xlabel("forwards per answer")
    ax.set_ylabel(f"test accuracy % (n={res['n']})")
    ax.set_title("demo model: prefix cache x parallel decoding (o pruned, s unpruned)", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    save(fig, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default="llada_export/assets/demo-model", help="checkpoint (default: the bundled demo model)")
    p.add_argument("--n", type=int, default=300, help="test questions (default: 300)")
    p.add_argument("--out", default="benchmarks/cache_sweep", help="output path without extension")
    p.add_argument("--refreshes", nargs="+", default=REFRESHES)
    p.add_argument("--rules", nargs="+", default=RULES)
    p.add_argument("--gen-length", type=int, default=16)
    p.add_argument("--batch", type=int, default=10, help="engines' batch size (default: 10)")
    p.add_argument("--replot", action="store_true", help="only rewrite <out>.md and <out>.png from <out>.json")
    args = p.parse_args(argv)
    res = None if args.replot else run_sweep(args.ckpt, args.n, args.refreshes, args.rules, args.gen_length,
                                             args.batch)
    write_report(args.out, res, markdown, plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
