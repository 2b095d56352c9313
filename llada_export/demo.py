"""``make demo``: the main job end to end on the bundled default.

The bundled default is the trained demo model (``assets/demo-model``: the official
LLaDA-V structure at 3.8 M parameters, fp32, trained by ``tools/train_demo.py`` on the
procedural shapes-and-digits VQA task of ``tools/vqa_task.py``; see
``benchmarks/demo_training.md``). The demo exports it with LLaDA-FastV pruning (ONNX
Runtime, CPU) plus the unpruned baseline, answers questions about the bundled image
(``assets/demo.png``, sample 22 of the task's test split, never seen in training) with
both graphs, and prints the answers against the task's ground truth, the kept-token
count and the timings.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

ASSETS = Path(__file__).parent / "assets"
DEMO_MODEL = ASSETS / "demo-model"
DEMO_IMAGE = ASSETS / "demo.png"  # tools/vqa_task.py: sample("test", 22).image()
DEMO_IMAGE_SIZE = (384, 288)  # the task's image size: the bucket the demo exports
# (question, ground truth) about DEMO_IMAGE; the answers are the task generator's
# (vqa_task.derive_answer on the sample's scene), checked by tests/test_demo.py.
DEMO_QUESTIONS = (
    ("What colour is the square?", "yellow"),  # the test sample's own question
    ("What digit is shown?", "4"),
)
DEMO_PROMPT = "<image>\n" + DEMO_QUESTIONS[0][0]
# The setting the demo exports, from benchmarks/prune_sweep.md (ONNX Runtime engines, 300 test
# questions): K 3 keeps the most accuracy over the keeps (the recommended K of
# benchmarks/attention_analysis.md), and keep 0.5 is its smallest keep within 95% of the
# unpruned accuracy (96.0% vs 99.0%, 49% fewer FLOPs per request).
DEMO_PRUNE_LAYER = 3
DEMO_KEEP = 0.5


@dataclass
class DemoAnswer:
    question: str
    truth: str
    pruned: object  # runtime.pipeline.GenerationResult
    unpruned: object

    @property
    def right(self) -> tuple[bool, bool]:
        return self.pruned.text.strip() == self.truth, self.unpruned.text.strip() == self.truth


def run_demo(workdir: str | Path, model: str | Path = DEMO_MODEL, prune_layer: int = DEMO_PRUNE_LAYER,
             keep: float = DEMO_KEEP, preset: str = "chartqa", progress: bool = True):
    """Export ``model`` (pruned + unpruned baseline, ONNX Runtime, the task's 384x288 bucket)
    into ``workdir/engines`` and answer :data:`DEMO_QUESTIONS` about :data:`DEMO_IMAGE` with
    both graphs. Returns (the loaded Pipeline, a DemoAnswer per question)."""
    from transformers import AutoTokenizer

    from .exporter.build import ExportOptions, export_engines
    from .runtime.pipeline import Pipeline
    from .runtime.sampler import PRESETS
    from .tokenizer import encode_prompt

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    gen = PRESETS[preset]
    engines = Path(workdir) / "engines"
    tok = AutoTokenizer.from_pretrained(str(model), local_files_only=True)
    prompts = ["<image>\n" + q for q, _ in DEMO_QUESTIONS]
    max_prompt = max(sum(len(part) for part in encode_prompt(tok, pr, has_image=True)) for pr in prompts)
    if progress:
        print(f"exporting {model} -> {engines} (prune layer {prune_layer}, keep {keep}, ONNX Runtime, "
              f"+ unpruned baseline)", flush=True)
    export_engines(ExportOptions(model=str(model), output=str(engines), prune_layer=prune_layer, keep=keep,
                                 baseline=True, gen_length=gen.gen_length, block_length=gen.block_length,
                                 steps=gen.steps, max_prompt_tokens=max_prompt, image_size=DEMO_IMAGE_SIZE,
                                 overwrite=True, progress=progress))
    pipe = Pipeline.load(engines)
    pipe.warmup()  # first-run costs (session warm-up, allocations) stay out of the timings
    answers = [DemoAnswer(q, truth, pipe.generate(DEMO_IMAGE, pr, preset=preset),
                          pipe.generate(DEMO_IMAGE, pr, preset=preset, unpruned=True))
               for (q, truth), pr in zip(DEMO_QUESTIONS, prompts)]
    return pipe, answers


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="llada-demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="build/demo", help="where the engines go (default: build/demo)")
    p.add_argument("--model", default=str(DEMO_MODEL),
                   help="checkpoint directory in the official layout (default: the bundled demo model)")
    p.add_argument("--prune-layer", type=int, default=DEMO_PRUNE_LAYER,
                   help=f"LM layer K where visual tokens are pruned (default {DEMO_PRUNE_LAYER})")
    p.add_argument("--keep", type=float, default=DEMO_KEEP,
                   help=f"fraction of visual tokens kept (default {DEMO_KEEP})")
    p.add_argument("--preset", default="chartqa", help="sampler preset (default: chartqa, 16/16/16)")
    args = p.parse_args(argv)
    try:
        pipe, answers = run_demo(args.workdir, args.model, args.prune_layer, args.keep, args.preset)
    except ValueError as e:
        p.error(str(e))
    layer = pipe.manifest["pruning"]["layer"]
    gen = pipe.manifest["generation"]
    print(f"\nimage: {DEMO_IMAGE.name} ({DEMO_IMAGE_SIZE[0]}x{DEMO_IMAGE_SIZE[1]}), preset {args.preset} "
          f"({gen['gen_length']}/{gen['block_length']}/{gen['steps']}), prune layer {layer}, keep {pipe.keep}")
    for a in answers:
        pr, fu = a.pruned, a.unpruned
        marks = ["right" if ok else "WRONG" for ok in a.right]
        print(f"\nQ: {a.question}   (ground truth: {a.truth})")
        print(f"  pruned   answer: {pr.text.strip()!r:10} {marks[0]:5} {pr.timings['total'] * 1e3:7.1f} ms "
              f"(visual tokens {pr.n_visual} -> {len(pr.kept_visual or [])} at layer {layer}; stage A "
              f"{pr.timings['stage_a'] * 1e3:.1f} ms, stage B {pr.timings['stage_b_per_step'] * 1e3:.2f} ms/step, "
              f"{len(pr.step_times)} steps)")
        print(f"  unpruned answer: {fu.text.strip()!r:10} {marks[1]:5} {fu.timings['total'] * 1e3:7.1f} ms "
              f"({fu.timings['full_per_step'] * 1e3:.2f} ms/step, {len(fu.step_times)} steps)")
    n_right = sum(sum(a.right) for a in answers)
    step_b = sum(a.pruned.timings["stage_b_per_step"] for a in answers) / len(answers)
    step_full = sum(a.unpruned.timings["full_per_step"] for a in answers) / len(answers)
    print(f"\n{n_right}/{2 * len(answers)} answers right. Per denoising step after the first: pruned "
          f"{step_b * 1e3:.1f} ms, unpruned {step_full * 1e3:.1f} ms ({step_full / max(step_b, 1e-9):.2f}x) on this CPU; "
          "benchmarks/ has the full-size GPU numbers.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
