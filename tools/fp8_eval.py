"""FP8 weights against the unquantized model: ``vqa`` (the bundled demo model's accuracy on the VQA
test split, fp8 vs the native dtype, eager, on --device) and ``logits`` (random full-size weights
made on the GPU: per graph kind, the top-1 agreement and KL of fp8 logits against bf16).

    python tools/fp8_eval.py vqa --device cuda --per-type 25 [--activations row|tensor]
    python tools/fp8_eval.py logits --device cuda --preset full [--activations row|tensor]
    python tools/fp8_eval.py time --preset full [--presets demo,chartqa]   # on a GPU: bench_gpu engines
    python tools/fp8_eval.py render --from A.json B.json --out benchmarks/fp8_vqa --machine ... --command ...
    python tools/fp8_eval.py render --from ROW.json TENSOR.json --out benchmarks/fp8_logits ...

``time``: a shorthand for ``tools/bench_gpu.py engines --paths pruned+cache --weights VARIANTS``
(the one implementation of the loop: engines exported native (bf16 on CUDA) and with ``--weights
fp8`` per-row and per-tensor, one after another, each graph alone, whole requests per preset, the
weight-read floor per variant); the report lands in ``--workdir`` as ``bench_gpu_engines.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llada_export.quant.fp8 import FP8Settings, quantized_copy  # noqa: E402


def run_vqa(args) -> dict:
    from llada_export import vqa_task
    from llada_export.checkpoint.loader import load_checkpoint
    from llada_export.demo import DEMO_MODEL
    from llada_export.reference import reference_generate
    from llada_export.sampler import GenerationConfig

    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model, tok, _ = load_checkpoint(args.model or DEMO_MODEL, dtype=dtype, device=torch.device(args.device))
    q, rec = quantized_copy(model, FP8Settings(args.activations))
    samples = vqa_task.balanced_split("test", args.per_type)
    gen = GenerationConfig(args.gen_length, args.gen_length, args.gen_length)
    out = {"device": args.device, "dtype": str(dtype), "activations": args.activations, "n": len(samples),
           "quantized_linears": len(rec.quantized)}
    for name, m in (("native", model), ("fp8", q)):
        with torch.no_grad():
            preds = [reference_generate(m, tok, s.image(), s.prompt, gen).text for s in samples]
        out[name] = vqa_task.score(samples, preds)
        out[f"{name}_predictions"] = preds
    out["differ"] = [(s.prompt, a, b) for s, a, b in zip(samples, out["native_predictions"], out["fp8_predictions"])
                     if a != b]
    return out


def agreement(a: torch.Tensor, b: torch.Tensor) -> dict:
    """[N, V] reference and fp8 logits: top-1 agreement, mean KL(ref || fp8), mean cosine."""
    a, b = a.double(), b.double()
    kl = torch.nn.functional.kl_div(b.log_softmax(-1), a.log_softmax(-1), log_target=True, reduction="none").sum(-1)
    return {"top1": float((a.argmax(-1) == b.argmax(-1)).double().mean()), "kl_mean": float(kl.mean()),
            "kl_max": float(kl.max()),
            "cosine_mean": float(torch.nn.functional.cosine_similarity(a, b, dim=-1).mean())}


def run_logits(args) -> dict:
    """Per graph kind on random full-size weights: the unpruned denoiser (stage B / unpruned graphs), the
    pruned step 1 (stage A), and the cached step after a prefill; masked response, one random image."""
    from llada_export.config import PRESETS
    from llada_export.reference import ReferenceDenoiser, embed_prompt
    from llada_export.contract.pruning import PruneSettings
    from llada_export.synthetic.tokenizer import build_tokenizer
    from llada_export.synthetic.weights import random_model
    from llada_export.tokenizer import special_tokens
    from PIL import Image
    import numpy as np

    cfg = PRESETS[args.preset]()  # as tools/bench_gpu.py builds it: random weights made on the device
    tok = build_tokenizer("full" if args.preset == "full" else "tiny")
    cfg.text.vocab_size = cfg.text.vocab_size or len(tok)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    cfg.torch_dtype = str(dtype).removeprefix("torch.")
    model = random_model(cfg, args.device, dtype, args.seed)
    q, rec = quantized_copy(model, FP8Settings(args.activations))
    mask = special_tokens(tok).mask
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (args.height, args.width, 3), dtype=np.uint8))
    ids = torch.full((1, args.gen_length), mask, device=args.device)
    res = {"preset": args.preset, "device": args.device, "activations": args.activations,
           "quantized_linears": len(rec.quantized), "graphs": {}}
    kinds = {"unpruned / stage_b": dict(prune=None, cache=False),
             "stage_a": dict(prune=PruneSettings(args.prune_layer, args.keep), cache=False),
             "cached": dict(prune=None, cache=True)}
    for kind, kw in kinds.items():
        outs = []
        for m in (model, q):
            with torch.no_grad():
                den = ReferenceDenoiser(m, embed_prompt(m, tok, img, args.prompt), mask, **kw)
                logits = den(ids)
                if kind == "cached":  # the first call is the prefill; the second a cached step
                    logits = den(ids)
            outs.append(logits[0].float().cpu())
        res["graphs"][kind] = agreement(*outs)
        print(kind, json.dumps(res["graphs"][kind]), flush=True)
    return res


def run_time(args) -> dict:
    """``tools/bench_gpu.py engines`` on the pruned + cache path with ``--weights`` = ``--variants`` (one
    implementation of the loop): its JSON (``<workdir>/bench_gpu_engines.json``) returned."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_gpu", Path(__file__).with_name("bench_gpu.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = Path(args.workdir)
    argv = ["engines", "--preset", args.preset, "--seed", str(args.seed), "--images", f"{args.width}x{args.height}",
            "--layers", str(args.prune_layer), "--keeps", str(args.keep),  # bench_gpu's bucket: 128 response slots
            "--prompt", args.prompt, "--presets", args.presets, "--paths", "pruned+cache",
            "--weights", args.variants, "--out", str(out), "--workdir", str(out / "engines"),
            "--no-warm-load", "--no-step-profile"]
    if bench.main(argv):
        raise SystemExit("bench_gpu.py engines failed")
    return json.loads((out / "bench_gpu_engines.json").read_text())


def vqa_markdown(res: dict) -> str:
    """The vqa runs of ``render`` as a table: exact match per question type, native vs fp8."""
    runs = res["runs"]
    types = sorted(runs[0]["native"]["per_type"])
    head = "| activations | weights | all | short | long | " + " | ".join(types) + " | answers that differ |"
    rows = [head, "|" + "---|" * (len(types) + 6)]
    for r in runs:
        for w in ("native", "fp8"):
            a = r[w]
            cells = [f"{100 * a['per_type'][t]:.1f}" for t in types]
            differ = str(len(r["differ"])) if w == "fp8" else ""
            rows.append(f"| {r['activations']} | {w if w == 'fp8' else r['dtype']} | {100 * a['overall']:.1f} | "
                        f"{100 * a['per_length']['short']:.1f} | {100 * a['per_length']['long']:.1f} | "
                        + " | ".join(cells) + f" | {differ} |")
    m = res["machine"]
    return (f"# FP8 weights on the demo model: VQA accuracy against {runs[0]['dtype']}\n\n"
            f"- machine: {m}; eager models (`reference_generate`), the bundled demo model v2, task v2 test split "
            f"(`vqa_task.balanced_split`), {runs[0]['n']} questions, gen = block = steps = 32, fixed schedule\n"
            f"- fp8: e4m3 weights with a scale per output channel, activations scaled per row or per tensor "
            f"(`llada_export/quant/fp8.py`), {runs[0]['quantized_linears']} linears quantized (vision tower, "
            f"projector and lm_head kept)\n\n" + "\n".join(rows) + "\n\n"
            f"Reproduce: {res['command']}\n")


def vqa_plot(res: dict, path: Path) -> None:
    from llada_export.report import pyplot, save

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    labels, vals = [], []
    for r in res["runs"]:
        for w in ("native", "fp8"):
            labels.append(f"{r['dtype'] if w == 'native' else 'fp8'}\n({r['activations']} scales)")
            vals.append(100 * r[w]["overall"])
    ax.bar(range(len(vals)), vals, color=["#777", "#c33"] * len(res["runs"]))
    ax.set_xticks(range(len(vals)), labels)
    ax.set_ylim(min(vals) - 5, 100)
    ax.set_ylabel("exact match %")
    ax.set_title("demo model v2, test split: native vs FP8 weights")
    save(fig, path)


def logits_markdown(res: dict) -> str:
    """The logits runs of ``render`` as a table: per graph kind and activation granularity, fp8 vs native."""
    runs = res["runs"]
    rows = ["| activations | graph | top-1 agreement | KL mean | KL max | cosine mean |", "|---|---|---|---|---|---|"]
    for r in runs:
        for kind, g in r["graphs"].items():
            rows.append(f"| {r['activations']} | {kind} | {100 * g['top1']:.1f}% | {g['kl_mean']:.4f} | "
                        f"{g['kl_max']:.4f} | {g['cosine_mean']:.4f} |")
    return (f"# FP8 weights on full-size random weights: logits against {'bf16' if runs[0]['device'] == 'cuda' else 'fp32'}\n\n"
            f"- machine: {res['machine']}; random {runs[0]['preset']} LLaDA-V weights made on the device (seed 0), "
            f"one random 1024x768 image, a fully masked response; eager models (`ReferenceDenoiser`), "
            f"{runs[0]['quantized_linears']} linears quantized (vision tower, projector and lm_head kept); "
            "per response position: top-1 agreement, KL(native || fp8), cosine of the logit vectors\n"
            "- random weights give near-uniform, near-tied logits (a top-1 flips on tiny differences), so KL and "
            "cosine say more here than top-1; the trained demo model's answers are the accuracy measure "
            "(`fp8_vqa.md`)\n\n" + "\n".join(rows) + f"\n\nReproduce: {res['command']}\n")


def render(args) -> int:
    """Combine ``vqa`` or ``logits`` JSON results (--from) into <out>.json / .md (/ .png for vqa)
    (--replot: from <out>.json); which kind, the results say."""
    from llada_export.report import write_report

    if args.replot:
        res = json.loads(Path(args.out).with_suffix(".json").read_text())
    else:
        runs = [json.loads(Path(f).read_text()) for f in args.src]
        res = {"runs": [{k: v for k, v in r.items() if "predictions" not in k} for r in runs],
               "machine": args.machine, "command": args.command}
    logits = "graphs" in res["runs"][0]  # run_logits' results; run_vqa's have per-type scores
    write_report(args.out, res, logits_markdown if logits else vqa_markdown, None if logits else vqa_plot)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", choices=("vqa", "logits", "time", "render"))
    p.add_argument("--device", default="cpu", help="cpu or cuda (bf16 on cuda, fp32 on cpu)")
    p.add_argument("--activations", choices=("row", "tensor"), default="row")
    p.add_argument("--model", default=None, help="vqa: checkpoint (default: the bundled demo model)")
    p.add_argument("--per-type", type=int, default=8, help="vqa: test questions per question type")
    p.add_argument("--gen-length", type=int, default=32)
    p.add_argument("--preset", default="full", help="logits: config preset of the random weights")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--height", type=int, default=768)
    p.add_argument("--prompt", default="<image>\nDescribe the image in detail.")
    p.add_argument("--prune-layer", type=int, default=16)
    p.add_argument("--keep", type=float, default=0.35)
    p.add_argument("--presets", default="demo,chartqa", help="time: sampler presets timed end to end")
    p.add_argument("--variants", default="native,fp8-row,fp8-tensor",
                   help="time: which engine sets, one after another (native, fp8-row, fp8-tensor)")
    p.add_argument("--workdir", default="/tmp/llada-fp8",
                   help="time: where the engines (removed after each variant) and bench_gpu_engines.* are written")
    p.add_argument("--json", default=None, help="write the result here")
    p.add_argument("--from", dest="src", nargs="*", default=[], help="render: vqa JSON results to combine")
    p.add_argument("--out", default="benchmarks/fp8_vqa", help="render: report path without suffix")
    p.add_argument("--machine", default="", help="render: the machine the results came from, in words")
    p.add_argument("--command", default="", help="render: the command that produced them")
    p.add_argument("--replot", action="store_true", help="render: re-render <out>.md/.png from <out>.json")
    args = p.parse_args(argv)
    if args.part == "render":
        return render(args)
    res = {"vqa": run_vqa, "logits": run_logits, "time": run_time}[args.part](args)
    text = json.dumps(res, indent=1)
    if args.json:
        Path(args.json).write_text(text)
    print(json.dumps({k: v for k, v in res.items() if "predictions" not in k}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
