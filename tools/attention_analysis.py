"""Where does the demo LLaDA-V look at the image? Per-layer visual attention and top-k stability.

For the first ``--n`` TEST questions of the procedural VQA task, with the eager fp32 model
and the official sampler of the trainer's evaluation (gen = block = steps = 8, temperature
0, low-confidence remasking, the training system prompt and ``"<image>\\n" + question``):

1. **visual attention share per layer** at denoising step 1: of the attention mass that the
   still-masked response query positions give, the share that lands on visual tokens
   (mean over heads, masked queries and questions). Probabilities are computed explicitly
   from each layer's q and k after RoPE (``Attention.query_key``) by the pruning's own
   ``visual_scores`` with the ``response`` query weights (``graphs/pruning.py``).
2. **top-k stability across denoising steps** at each layer K of ``--layers``: the visual
   tokens are ranked as LLaDA-FastV ranks them (attention received from the masked
   response positions, mean over heads and queries); S_t is the top-k set at step t
   (k = round(keep * n_visual) for each ``--keeps``) and the overlap |S_1 & S_t| / k says
   whether the set chosen once at step 1 would still be chosen later.

The trajectory is the reference sampler's own (``llada_export.sampler.generate``):
the denoiser wrapper records the response ids of every step and computes, on the full
(unpruned) sequence of that step, both the logits the sampler uses and the attention
statistics, in one pass through the layers (the logits are those of ``ReferenceDenoiser``).

    python tools/attention_analysis.py --n 100    # the bundled demo model

Writes ``<out>.json``, ``<out>.md`` and ``<out>.png`` (default ``benchmarks/attention_analysis``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from llada_export import vqa_task
from llada_export.checkpoint.loader import load_checkpoint
from llada_export.contract.pruning import num_kept
from llada_export.graphs.anyres import assemble
from llada_export.graphs.pruning import query_weights, visual_scores
from llada_export.reference import embed_prompt
from llada_export.sampler import GenerationConfig, generate
from llada_export.tokenizer import DEFAULT_SYSTEM_PROMPT, special_tokens
from llada_export.vqa_task import patch_labels
from llada_export.report import history_note, pyplot, save, write_report

GEN_LENGTH = vqa_task.GEN_LENGTH


class RecordingDenoiser:
    """The unpruned reference denoiser, run layer by layer so that each step also records,
    per layer, the attention of the masked response queries (mean over heads)."""

    fused = False

    def __init__(self, model, prompt, mask_id: int):
        self.model, self.prompt, self.mask_id = model, prompt, mask_id
        self.steps: list[dict] = []  # per call: ids [G], share [n_layers], scores [n_layers, n_visual]

    @torch.no_grad()
    def __call__(self, response_ids: torch.Tensor, step=None, *, uncond: bool = False) -> torch.Tensor:
        assert not uncond, "CFG is off in the evaluated settings"
        lm = self.model.language
        prefix = self.prompt.embeds  # [1, P, D]
        g = response_ids.shape[1]
        p = prefix.shape[1]
        pos = torch.arange(p + g, device=prefix.device)[None]  # [1, L]
        vis = self.prompt.visual_mask[0]  # [P] bool
        vis_cols = torch.cat([vis, torch.zeros(g, dtype=torch.bool, device=vis.device)])  # [L]
        key = torch.ones(1, p + g, dtype=torch.bool, device=prefix.device)  # unpadded: every key real
        w = query_weights("response", key, vis_cols[None], response_ids, pos, self.mask_id)  # [1, L]
        x = torch.cat([prefix.to(lm.dtype), lm.embed_tokens(response_ids)], dim=1)  # [1, L, D]
        cos, sin = lm.rotary(pos)
        shares, scores = [], []
        for layer in lm.layers:
            q, k = layer.self_attn.query_key(layer.input_layernorm(x), cos, sin)  # [1, H, L, hd]
            sc = visual_scores(q, k, key, w, g)[0]  # [L]: attention received, as the FastV ranking uses it
            shares.append(float(sc[vis_cols].sum()))
            scores.append(sc[vis_cols])  # [n_visual]
            x = layer(x, cos, sin, None)
        self.steps.append({"ids": response_ids[0].clone(), "share": shares, "scores": torch.stack(scores).cpu()})
        return lm.head(x[:, -g:])  # [1, G, V]


def object_tokens(scene: vqa_task.Scene, cfg) -> torch.Tensor:
    """[n_visual] bool: the visual tokens that show an object (a shape or the digit), from the
    scene's label maps cut like the crops (``vqa_task.patch_labels``) and put through the same
    anyres assembly as the features (the newline tokens are never objects)."""
    shape_lab = torch.from_numpy(patch_labels(scene, cfg)[0].astype("float32"))  # [N, T] label ids
    obj = (shape_lab > 0).float()[..., None]  # [N, T, 1]
    tokens = assemble(obj, (scene.width, scene.height), cfg, torch.full((1,), -1.0))  # [n_visual, 1]
    return tokens[:, 0] > 0.5


def analyse_sample(model, tokenizer, cfg, sample, gen: GenerationConfig, layers: list[int], keeps: list[float],
                   system: str = DEFAULT_SYSTEM_PROMPT) -> dict:
    sp = special_tokens(tokenizer)
    inputs = embed_prompt(model, tokenizer, sample.image(), sample.prompt, system)
    den = RecordingDenoiser(model, inputs, sp.mask)
    (ids,) = generate(den, gen, mask_id=sp.mask, eot_id=sp.eot, suppress_ids=sp.suppressed(),
                      device=inputs.embeds.device)
    text = tokenizer.decode(ids.tolist(), skip_special_tokens=True)
    n_vis = inputs.n_visual
    # what the step-1 selection at each layer keeps of the objects (every layer, every keep)
    obj = object_tokens(sample.scene, cfg)  # [n_visual]
    n_obj = int(obj.sum())
    if obj.numel() != n_vis:
        raise RuntimeError(f"object map has {obj.numel()} tokens, the prompt {n_vis}")
    recall = {str(keep): [float(obj[sc.topk(num_kept(keep, n_vis)).indices].sum()) / max(1, n_obj)
                          for sc in den.steps[0]["scores"]]  # [n_layers]
              for keep in keeps}
    overlap: dict[str, dict[str, list[float]]] = {}
    for layer in layers:
        for keep in keeps:
            k = num_kept(keep, n_vis)
            s1 = set(den.steps[0]["scores"][layer].topk(k).indices.tolist())
            overlap.setdefault(str(layer), {})[str(keep)] = [
                len(s1 & set(st["scores"][layer].topk(k).indices.tolist())) / k for st in den.steps]
    return {
        "index": sample.index, "qtype": sample.qtype, "answer": sample.answer, "prediction": text,
        "correct": text.strip() == sample.answer, "n_visual": n_vis, "seq_len": inputs.length + gen.gen_length,
        "steps": len(den.steps),
        "share_by_step": [st["share"] for st in den.steps],  # [steps][n_layers]
        "overlap": overlap,  # K -> keep -> [steps] (step 1 first, = 1.0)
        "object_tokens": n_obj,
        "object_recall": recall,  # keep -> [n_layers]: share of the object tokens in step 1's top-k
    }


def run_analysis(ckpt: str | Path, n: int, layers: list[int], keeps: list[float], gen_length: int = GEN_LENGTH,
                 split: str = "test", progress: bool = True, types: list[str] | None = None,
                 device: str = "cpu") -> dict:
    """``types``: only these question types, ``n // len(types)`` of each (``vqa_task.balanced_split``);
    default: the first ``n`` questions of the split. ``device``: where the eager model runs."""
    torch.set_num_threads(1)  # small eager ops: a second OpenMP thread on 2 busy cores slows them down
    t0 = time.perf_counter()
    model, tokenizer, cfg = load_checkpoint(ckpt, dtype=torch.float32, device=device)
    n_layers = cfg.text.num_hidden_layers
    bad = [k for k in layers if not 0 <= k < n_layers]
    if bad:
        raise SystemExit(f"--layers {bad}: the model has layers 0..{n_layers - 1}")
    gen = GenerationConfig(gen_length, gen_length, gen_length).validate()
    per_q = []
    samples = (vqa_task.balanced_split(split, max(1, n // len(types)), types) if types
               else vqa_task.make_split(split, n))
    n = len(samples)
    for s in samples:
        per_q.append(analyse_sample(model, tokenizer, cfg, s, gen, layers, keeps))
        if progress and len(per_q) % 10 == 0:
            print(f"{len(per_q)}/{n} questions ({time.perf_counter() - t0:.0f} s)", flush=True)

    share1 = [sum(q["share_by_step"][0][i] for q in per_q) / len(per_q) for i in range(n_layers)]
    uniform = sum(q["n_visual"] / (q["seq_len"]) for q in per_q) / len(per_q)  # share if attention were uniform
    share_all = [sum(sum(st[i] for st in q["share_by_step"]) / q["steps"] for q in per_q) / len(per_q)
                 for i in range(n_layers)]
    max_steps = max(q["steps"] for q in per_q)
    stability: dict[str, dict[str, dict]] = {}
    for layer in layers:
        for keep in keeps:
            by_t = []
            for t in range(max_steps):
                vals = [q["overlap"][str(layer)][str(keep)][t] for q in per_q if q["steps"] > t]
                by_t.append({"step": t + 1, "mean": sum(vals) / len(vals), "min": min(vals), "n": len(vals)})
            later = [v for q in per_q for v in q["overlap"][str(layer)][str(keep)][1:]]
            last = [q["overlap"][str(layer)][str(keep)][-1] for q in per_q if q["steps"] > 1]
            stability.setdefault(str(layer), {})[str(keep)] = {
                "k": num_kept(keep, per_q[0]["n_visual"]), "by_step": by_t,
                "mean_later_steps": sum(later) / len(later) if later else 1.0,
                "mean_last_step": sum(last) / len(last) if last else 1.0}

    # Recommendation: among the candidate layers, the one whose step-1 choice stays most
    # stable (averaged over keeps), ties to the larger visual share; cross-checked with the
    # accuracy sweep when its JSON is there.
    def stab(layer):
        return sum(stability[str(layer)][str(kp)]["mean_later_steps"] for kp in keeps) / len(keeps)

    recall = {str(kp): [sum(q["object_recall"][str(kp)][i] for q in per_q) / len(per_q) for i in range(n_layers)]
              for kp in keeps}
    chance = {str(kp): num_kept(kp, per_q[0]["n_visual"]) / per_q[0]["n_visual"] for kp in keeps}

    recall_mean = [sum(recall[str(kp)][i] for kp in keeps) / len(keeps) for i in range(n_layers)]

    # Recommendation from the attention alone: the candidate layer whose step-1 top-k keeps the
    # most of the objects (averaged over keeps), ties to the more stable selection.
    rec = max(layers, key=lambda L: (round(recall_mean[L], 3), stab(L)))
    peak = max(range(n_layers), key=lambda i: share1[i])
    return {
        "checkpoint": str(ckpt), "split": split, "n": n, "n_layers": n_layers, "hidden_size": cfg.text.hidden_size,
        "types": list(types) if types else None, "device": device,
        "generation": {"gen_length": gen.gen_length, "block_length": gen.block_length, "steps": gen.steps},
        "layers": layers, "keeps": keeps,
        "accuracy": sum(q["correct"] for q in per_q) / len(per_q),
        "visual_share_step1": share1,
        "visual_share_all_steps": share_all,
        "uniform_visual_share": uniform,
        "peak_layer": peak,
        "stability": stability,
        "stability_mean": {str(L): stab(L) for L in layers},
        "object_recall_step1": recall,  # keep -> [n_layers]
        "object_recall_mean": recall_mean,  # [n_layers]: mean over keeps
        "object_recall_chance": chance,  # keep -> k / n_visual (a random selection)
        "object_token_share": sum(q["object_tokens"] / q["n_visual"] for q in per_q) / len(per_q),
        "recommended_layer": rec,
        "mean_steps": sum(q["steps"] for q in per_q) / len(per_q),
        "per_question": per_q,
        "seconds": time.perf_counter() - t0,
    }


def markdown(res: dict, sweep: dict | None = None) -> str:
    nl, share = res["n_layers"], res["visual_share_step1"]
    late = [i for i in range(nl) if i >= nl // 2]
    early = [i for i in range(nl) if i < nl // 2]
    late_mean = sum(share[i] for i in late) / len(late)
    early_mean = sum(share[i] for i in early) / len(early)
    lines = [
        "# Visual attention of the demo LLaDA-V: per-layer share and top-k stability" + history_note(res),
        "",
        f"**Caveat:** the demo model is tiny ({nl} LM layers, hidden {res['hidden_size']}; LLaDA-8B has 32 "
        f"layers of 4096) and trained on one synthetic task ({res['accuracy']:.0%} right on these {res['n']} "
        f"questions), so its attention pattern is a hint of what the 8B LLaDA-V does, not evidence.",
        "",
        f"- {res['n']} test questions, eager fp32, official sampler gen = block = steps = "
        f"{res['generation']['gen_length']} (its actual trajectory, {res['mean_steps']:.1f} steps per question on "
        f"average: it stops once the answer and its `<|eot_id|>` are committed); attention probabilities "
        f"recomputed explicitly from q, k after RoPE, on the full unpruned sequence of each step; "
        f"{res['seconds']:.0f} s on CPU.",
        f"- share = attention mass the still-masked response queries give to the "
        f"{res['per_question'][0]['n_visual']} visual tokens (mean over heads, queries, questions); "
        f"uniform attention would give {res['uniform_visual_share']:.1%}.",
        "",
        f"- object recall = share of the visual tokens that show an object (a shape or the digit: "
        f"{res['object_token_share']:.0%} of the visual tokens on average) that step 1's top-k at that layer "
        f"keeps; a random selection keeps k / n of them ("
        + ", ".join(f"{c:.0%} at keep {kp}" for kp, c in res["object_recall_chance"].items()) + ").",
        "",
        "| layer | visual share, step 1 | all steps | object recall, step 1 (keep " + "/".join(map(str, res["keeps"]))
        + ") | overlap with later steps at K (keep " + "/".join(map(str, res["keeps"])) + ") |",
        "|---|---|---|---|---|",
    ]
    for i in range(nl):
        st = res["stability"].get(str(i))
        ov = " / ".join(f"{st[str(kp)]['mean_later_steps']:.2f}" for kp in res["keeps"]) if st else ""
        rc = " / ".join(f"{res['object_recall_step1'][str(kp)][i]:.0%}" for kp in res["keeps"])
        lines.append(f"| {i} | {share[i]:.1%} | {res['visual_share_all_steps'][i]:.1%} | {rc} | {ov} |")
    mean_share = sum(share) / nl
    rel = "less" if mean_share < res["uniform_visual_share"] - 0.02 else (
        "more" if mean_share > res["uniform_visual_share"] + 0.02 else "about as much")
    lines += [
        "",
        "Overlap = |S_1 & S_t| / k between the top-k visual set of step 1 and that of each later step t "
        "(mean over later steps and questions); per-step values are in the JSON and the right panel of the PNG. "
        "Later steps have fewer masked queries to average (one token is committed per step), so part of the "
        "decay is that noisier ranking, not only a real shift of attention; the step-t rows also cover only "
        "the questions still running at step t.",
        "",
        f"Averaged over layers the response queries give the image {mean_share:.0%} of their attention, {rel} "
        f"than the {res['uniform_visual_share']:.0%} that uniform attention would give (the visual tokens are "
        f"most of the sequence). The share alone does not say where inside the image the attention goes: "
        f"object recall does.",
        "",
        "## Findings",
        "",
        f"- Peak visual share at layer {res['peak_layer']} ({share[res['peak_layer']]:.1%}); mean share "
        f"layers {early[0]}-{early[-1]}: {early_mean:.1%}, layers {late[0]}-{late[-1]}: {late_mean:.1%}.",
    ]
    match = late_mean > early_mean and res["peak_layer"] >= nl // 2 - 1
    lines.append(
        "- LLaDA-FastV reports that LLaDA-V aggregates cross-modal information mostly in middle-to-late layers. "
        + ("By visual share the demo model's pattern is **consistent** with that: the response queries attend to "
           "the image most in the middle-to-late layers." if match else
           "By visual share the demo model's pattern **does not clearly match**: its response queries attend to "
           "the image as much or more in the early layers.")
        + f" With {nl} layers this is weak evidence about the 32-layer model.")
    recall_mean = res["object_recall_mean"]
    best_recall = max(range(nl), key=lambda L: recall_mean[L])
    lines.append("- Object recall of step 1's top-k (mean over keeps): "
                 + ", ".join(f"layer {L}: {v:.0%}" for L, v in enumerate(recall_mean))
                 + f"; highest at layer {best_recall}.")
    stab_txt = ", ".join(f"K={L}: {v:.2f}" for L, v in res["stability_mean"].items())
    lines.append(f"- Top-k stability (mean overlap over keeps and later steps): {stab_txt}.")
    rec = res["recommended_layer"]
    lines.append(f"- From the attention alone: K={rec} (the highest object recall among the candidate layers "
                 f"{res['layers']}, ties to the more stable selection).")
    if sweep is not None and sweep.get("results"):
        by_layer = {}
        for r in sweep["results"][1:]:
            by_layer.setdefault(r["layer"], []).append(r["overall"])
        mean_acc = {L: sum(v) / len(v) for L, v in by_layer.items()}
        acc_txt = ", ".join(f"K={L}: {v:.1%}" for L, v in sorted(mean_acc.items()))
        lines.append(f"- Cross-check with `benchmarks/prune_sweep.json` (n={sweep['n']} test questions, ONNX Runtime "
                     f"engines; mean over keeps {', '.join(map(str, sweep['keeps']))}): accuracy {acc_txt} "
                     f"(unpruned {sweep['results'][0]['overall']:.1%}).")
        best_acc = max(mean_acc, key=lambda L: mean_acc[L])
        lines.append(f"- **Recommended K for the demo model: {best_acc}**, the layer whose pruning keeps the most "
                     f"accuracy in the sweep; "
                     + ("the attention analysis points to the same layer." if best_acc == rec else
                        f"the attention analysis alone would pick K={rec}.")
                     + f" Its relative depth is {best_acc / nl:.2f} (layer {best_acc} of 0..{nl - 1}); "
                     f"LLaDA-FastV's default for LLaDA-V, K 16 of 32 layers, is at 0.50.")
        if sweep.get("best_95"):
            b95 = sweep["best_95"]
            lines.append(f"- Best setting keeping >= 95% of the unpruned accuracy (sweep): {b95['setting']}, "
                         f"{b95['flops_reduction']:.0%} fewer FLOPs per request.")
    lines += ["", f"Reproduce: `python tools/attention_analysis.py --ckpt {res['checkpoint']} --n {res['n']} "
              f"--layers {' '.join(map(str, res['layers']))} --keeps {' '.join(map(str, res['keeps']))}`"]
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    plt = pyplot()

    fig, (a, c, b) = plt.subplots(1, 3, figsize=(16, 4.2))
    nl = res["n_layers"]
    a.bar(range(nl), res["visual_share_step1"], color="tab:blue", label="step 1")
    a.plot(range(nl), res["visual_share_all_steps"], "ko-", ms=4, label="mean over steps")
    a.axhline(res["uniform_visual_share"], color="grey", ls="--", lw=0.8, label="uniform attention")
    a.set_xlabel("layer")
    a.set_ylabel("attention share on visual tokens")
    a.set_title("masked response queries -> visual tokens")
    a.legend(fontsize=8)
    for j, kp in enumerate(res["keeps"]):
        col = f"C{j}"
        c.plot(range(nl), res["object_recall_step1"][str(kp)], "o-", color=col, ms=4, label=f"keep {kp}")
        c.axhline(res["object_recall_chance"][str(kp)], color=col, ls=":", lw=0.8)
    c.set_xlabel("layer")
    c.set_ylabel("object tokens kept / object tokens")
    c.set_ylim(0, 1.05)
    c.set_title("step-1 top-k: object recall (dotted: random)")
    c.legend(fontsize=8)
    for L in res["layers"]:
        for kp in res["keeps"]:
            bs = res["stability"][str(L)][str(kp)]["by_step"]
            b.plot([x["step"] for x in bs], [x["mean"] for x in bs], "o-", ms=3, label=f"K={L} keep={kp}")
    b.set_xlabel("denoising step t")
    b.set_ylabel("|S_1 & S_t| / k")
    b.set_ylim(0, 1.05)
    b.set_title("top-k visual set stability vs step 1")
    b.legend(fontsize=7, ncol=2)
    fig.suptitle(f"demo LLaDA-V, {res['n']} test questions", fontsize=10)
    save(fig, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default="llada_export/assets/demo-model", help="checkpoint (default: the bundled demo model)")
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--out", default="benchmarks/attention_analysis", help="output path without extension")
    p.add_argument("--layers", type=int, nargs="+", default=[1, 3, 5])
    p.add_argument("--keeps", type=float, nargs="+", default=[0.35, 0.1])
    p.add_argument("--gen-length", type=int, default=GEN_LENGTH)
    p.add_argument("--sweep", default="benchmarks/prune_sweep.json", help="sweep results to cross-check, if present")
    p.add_argument("--replot", action="store_true", help="only rewrite <out>.md and <out>.png from <out>.json")
    args = p.parse_args(argv)
    sweep = json.loads(Path(args.sweep).read_text()) if Path(args.sweep).exists() else None
    res = None if args.replot else run_analysis(args.ckpt, args.n, args.layers, args.keeps, args.gen_length)
    write_report(args.out, res, lambda r: markdown(r, sweep), plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
