"""``make demo`` / ``llada-demo``: the main job end to end on the bundled default.

The bundled default is the trained demo model (``assets/demo-model``: the official
LLaDA-V structure at 3.8 M parameters, fp32, trained by ``tools/train_demo.py`` on the
procedural shapes-and-digits VQA task of :mod:`llada_export.vqa_task`). The demo exports
it with LLaDA-FastV pruning (ONNX Runtime, CPU) plus the unpruned baseline, in a bucket
that takes every question of the task, answers one question of each of the task's five
types about the bundled image (``assets/demo.png``, a test image never seen in training)
with the pruned and the unpruned graphs, and prints the answers against the task's ground
truth, the kept-token count and the timings. It exits with status 1 if any answer is wrong.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

ASSETS = Path(__file__).parent / "assets"
DEMO_MODEL = ASSETS / "demo-model"
DEMO_IMAGE = ASSETS / "demo.png"  # vqa_task.sample("test", 22).image()
DEMO_IMAGE_SIZE = (384, 288)  # the task's image size: the bucket the demo exports
DEMO_SAMPLE = ("test", 22)
# (question type, what it asks about) of the questions about DEMO_IMAGE: one of each type. The
# ground truth comes from the task generator (vqa_task.derive_answer on the sample's scene).
DEMO_KINDS = (("colour", "square"), ("digit", None), ("count", "triangle"), ("top", None), ("left", None))
# The setting the demo exports, from benchmarks/prune_sweep.md (ONNX Runtime engines, 300 test
# questions): K 3 keeps the most accuracy over the keeps (the recommended K of
# benchmarks/attention_analysis.md), and keep 0.5 is its smallest keep within 95% of the
# unpruned accuracy (96.0% vs 99.0%, 49% fewer FLOPs per request).
DEMO_PRUNE_LAYER = 3
DEMO_KEEP = 0.5
DEMO_PRESET = "chartqa"


@dataclass
class DemoAnswer:
    question: str
    truth: str
    pruned: object  # runtime.pipeline.GenerationResult
    unpruned: object

    @property
    def right(self) -> tuple[bool, bool]:
        return self.pruned.text.strip() == self.truth, self.unpruned.text.strip() == self.truth


def demo_questions() -> list[tuple[str, str]]:
    """(question, ground truth) about the bundled image, one per question type."""
    from . import vqa_task

    scene = vqa_task.sample(*DEMO_SAMPLE).scene
    return [(vqa_task.question_text(t, a), vqa_task.derive_answer(scene, t, a)) for t, a in DEMO_KINDS]


def run_demo(workdir: str | Path, model: str | Path = DEMO_MODEL, prune_layer: int = DEMO_PRUNE_LAYER,
             keep: float = DEMO_KEEP, preset: str = DEMO_PRESET, progress: bool = True):
    """Export ``model`` (pruned + unpruned baseline, ONNX Runtime, the task's 384x288
    bucket with room for every question of the task) into ``workdir/engines`` and answer
    :func:`demo_questions` about :data:`DEMO_IMAGE` with both graphs. Returns (the Pipeline, a
    DemoAnswer per question)."""
    from . import vqa_task
    from .contract.pruning import PruneSettings
    from .exporter.build import ExportOptions, export_engines
    from .runtime.pipeline import Pipeline
    from .sampler import preset as get_preset
    from .tokenizer import load_tokenizer

    gen = get_preset(preset)
    engines = Path(workdir) / "engines"
    max_prompt = vqa_task.prompt_tokens(load_tokenizer(model))
    if progress:
        print(f"exporting {model} -> {engines} (prune layer {prune_layer}, keep {keep}, ONNX Runtime, "
              f"+ unpruned baseline)", flush=True)
    export_engines(ExportOptions(model=str(model), output=str(engines), prune=PruneSettings(prune_layer, keep),
                                 baseline=True, gen_length=gen.gen_length, block_length=gen.block_length,
                                 steps=gen.steps, max_prompt_tokens=max_prompt, image_size=DEMO_IMAGE_SIZE,
                                 overwrite=True, progress=progress))
    pipe = Pipeline.load(engines)
    pipe.warmup()  # first-run costs (session warm-up, allocations) stay out of the timings
    answers = [DemoAnswer(q, truth, pipe.generate(DEMO_IMAGE, q, preset=preset),
                          pipe.generate(DEMO_IMAGE, q, preset=preset, unpruned=True))
               for q, truth in demo_questions()]
    return pipe, answers


def main(argv: list[str] | None = None) -> int:
    from .cli.common import parser, user_errors

    p = parser("llada-demo", __doc__.split("\n\n")[1])
    p.add_argument("--workdir", default="out/demo", help="where the engines go (default: out/demo)")
    p.add_argument("--model", default=str(DEMO_MODEL),
                   help="checkpoint directory in the official layout (default: the bundled demo model)")
    p.add_argument("--prune-layer", type=int, default=DEMO_PRUNE_LAYER,
                   help=f"LM layer K where visual tokens are pruned (default {DEMO_PRUNE_LAYER})")
    p.add_argument("--keep", type=float, default=DEMO_KEEP,
                   help=f"fraction of visual tokens kept (default {DEMO_KEEP})")
    p.add_argument("--preset", default=DEMO_PRESET, help=f"sampler preset (default: {DEMO_PRESET})")
    args = p.parse_args(argv)
    with user_errors("llada-demo"):
        from .sampler import preset as get_preset

        gen = get_preset(args.preset)  # an unknown preset fails before the export
        pipe, answers = run_demo(args.workdir, args.model, args.prune_layer, args.keep, args.preset)
        layer = pipe.manifest.pruning.layer
        print(f"\nimage: {DEMO_IMAGE.name} ({DEMO_IMAGE_SIZE[0]}x{DEMO_IMAGE_SIZE[1]}), preset {args.preset} "
              f"(gen/block/steps {gen.gen_length}/{gen.block_length}/{gen.steps}; a request stops at its "
              f"<|eot_id|>, so it takes fewer steps), prune layer {layer}, keep {pipe.keep}")
        for a in answers:
            pr, fu = a.pruned, a.unpruned
            marks = ["right" if ok else "WRONG" for ok in a.right]
            print(f"\nQ: {a.question}   (ground truth: {a.truth})")
            print(f"  pruned   answer: {pr.text.strip()!r:10} {marks[0]:5} {pr.timings['total'] * 1e3:7.1f} ms "
                  f"(visual tokens {pr.n_visual} -> {len(pr.kept_visual or [])} at layer {layer}; stage A "
                  f"{pr.timings['stage_a_per_call'] * 1e3:.1f} ms, stage B "
                  f"{pr.timings.get('stage_b_per_call', 0.0) * 1e3:.2f} ms/step, {pr.forwards} steps)")
            print(f"  unpruned answer: {fu.text.strip()!r:10} {marks[1]:5} {fu.timings['total'] * 1e3:7.1f} ms "
                  f"({fu.timings['unpruned_per_call'] * 1e3:.2f} ms/step, {fu.forwards} steps)")
        n_right = sum(sum(a.right) for a in answers)
        step_b = [a.pruned.timings["stage_b_per_call"] for a in answers if "stage_b_per_call" in a.pruned.timings]
        step_full = [a.unpruned.timings["unpruned_per_call"] for a in answers]
        b, f = sum(step_b) / max(len(step_b), 1), sum(step_full) / len(step_full)
        print(f"\n{n_right}/{2 * len(answers)} answers right. Per denoising step: pruned stage B {b * 1e3:.1f} ms, "
              f"unpruned {f * 1e3:.1f} ms ({f / max(b, 1e-9):.2f}x) on this CPU. The project's README has the "
              "full-size GPU numbers.")
        if n_right < 2 * len(answers):
            print("llada-demo: error: an answer does not match the task's ground truth", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
