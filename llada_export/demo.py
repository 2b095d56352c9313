"""``make demo`` / ``llada-demo``: the main job end to end on the bundled default.

The bundled default is the trained demo model (``assets/demo-model``: the official
LLaDA-V structure at 3.8 M parameters, fp32, trained by ``tools/train_demo.py`` on the
procedural shapes-and-digits VQA task of :mod:`llada_export.vqa_task`). The demo exports
it with LLaDA-FastV pruning (ONNX Runtime, CPU) plus the unpruned baseline, in a bucket
that takes every question of the task, answers one question of each of the task's five
types about the bundled image (``assets/demo.png``, a test image never seen in training)
with the pruned and the unpruned graphs, and prints the answers against the task's ground
truth, the kept-token count and the timings. It exits with status 1 if any answer is wrong.
Engines already in the workdir that were built from the same checkpoint and settings are
reused (``--rebuild`` exports them again).
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from dataclasses import asdict, dataclass, replace
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


# ---------------------------------------------------------------------- reuse of matching engines
BUILD_NOTE = "llada-demo build: "  # the manifest note that records what the engines were built from
PER_RUN_OPTIONS = ("output", "overwrite", "progress", "notes")  # export options that do not shape the engines
LABELS = {"model": "checkpoint path", "checkpoint_sha256": "checkpoint (its files changed)",
          "prune": "pruning setting", "tool_version": "llada-export version"}  # record key -> words


def tree_digest(root: Path) -> str:
    """SHA-256 over the files under ``root`` (relative names and contents)."""
    h = hashlib.sha256()
    for f in sorted(p for p in Path(root).rglob("*") if p.is_file()):
        h.update(str(f.relative_to(root)).encode() + b"\0")
        with open(f, "rb") as fh:
            while block := fh.read(1 << 22):
                h.update(block)
    return h.hexdigest()


def build_record(opts) -> dict:
    """What engines exported with ``opts`` (an ExportOptions) are built from: the checkpoint (path and
    a digest of its files), every option that shapes the engines, and the tool's version (a changed
    exporter of the same version is not detected: ``--rebuild``)."""
    from . import __version__

    rec = {k: v for k, v in asdict(opts).items() if k not in PER_RUN_OPTIONS}
    rec["model"] = str(Path(opts.model).resolve())
    rec["checkpoint_sha256"] = tree_digest(Path(opts.model))
    rec["tool_version"] = __version__
    return json.loads(json.dumps(rec, default=str))  # tuples -> lists: as read back from the manifest


def recorded_build(engines: Path) -> dict | None:
    """The build record in the manifest of ``engines`` (None: none there); raises ManifestError for a
    missing, damaged or altered directory (every file is checked against its SHA-256)."""
    from .contract.manifest import Manifest

    m = Manifest.read(engines)
    return next((json.loads(n[len(BUILD_NOTE):]) for n in m.notes if n.startswith(BUILD_NOTE)), None)


def export_reason(engines: Path, want: dict, rebuild: bool = False) -> str | None:
    """Why the engines in ``engines`` are not reused for the build ``want``; None: they are."""
    from .contract.manifest import ManifestError

    if rebuild:
        return "--rebuild"
    if not Path(engines).exists():
        return "none there yet"
    try:
        have = recorded_build(Path(engines))
    except ManifestError as e:
        return f"the ones there are unusable: {e}"
    return build_changes(have, want)


def build_changes(have: dict | None, want: dict) -> str | None:
    """What differs between the recorded build ``have`` and ``want``, in words; None: nothing."""
    if have is None:
        return "the ones there were not built by llada-demo"
    changed = sorted(LABELS.get(k, k) for k in want.keys() | have.keys() if want.get(k) != have.get(k))
    return f"the ones there were built with a different {', '.join(changed)}" if changed else None


def describe_build(rec: dict) -> str:
    prune = rec.get("prune")
    what = f"prune layer {prune['layer']}, keep {prune['keep']}" if prune else "unpruned"
    return (f"{rec['model']}, checkpoint sha256 {rec['checkpoint_sha256'][:12]}, {what}"
            f"{' + unpruned baseline' if rec.get('baseline') else ''}, {', '.join(rec['backends'])}, "
            f"gen length {rec['gen_length']}")


def export_or_reuse(opts, rebuild: bool = False, say=print) -> bool:
    """Export ``opts`` (an ExportOptions) into ``opts.output`` unless the engines already there were
    built from the same checkpoint contents and options by the same llada-export version (their
    manifest records it) and ``rebuild`` is off. Says which it does and why; returns True when it exported."""
    from .exporter.build import export_engines

    engines, want = Path(opts.output), build_record(opts)
    why = export_reason(engines, want, rebuild)
    if why is None:
        say(f"reusing engines in {engines} (built from {describe_build(want)}; --rebuild exports them again)")
        return False
    say(f"exporting {describe_build(want)} -> {engines} ({why})")
    export_engines(replace(opts, overwrite=True, notes=[*opts.notes, BUILD_NOTE + json.dumps(want, sort_keys=True)]))
    return True


def plain(doc: str) -> str:
    """A docstring paragraph as plain text for --help: RST literals and roles without their markup."""
    return re.sub(r"(:\w+:)?`+([^`]+)`+", r"\2", doc)


# ---------------------------------------------------------------------- the demo
def demo_questions() -> list[tuple[str, str]]:
    """(question, ground truth) about the bundled image, one per question type."""
    from . import vqa_task

    scene = vqa_task.sample(*DEMO_SAMPLE).scene
    return [(vqa_task.question_text(t, a), vqa_task.derive_answer(scene, t, a)) for t, a in DEMO_KINDS]


def demo_export_options(workdir: str | Path, model: str | Path = DEMO_MODEL, prune_layer: int = DEMO_PRUNE_LAYER,
                        keep: float = DEMO_KEEP, preset: str = DEMO_PRESET, progress: bool = True):
    """The ExportOptions of the demo's engines: ``workdir/engines``, pruned + unpruned baseline, ONNX
    Runtime, the task's 384x288 bucket with room for every question of the task."""
    from . import vqa_task
    from .contract.pruning import PruneSettings
    from .exporter.build import ExportOptions
    from .sampler import preset as get_preset
    from .tokenizer import load_tokenizer

    gen = get_preset(preset)
    return ExportOptions(model=str(model), output=str(Path(workdir) / "engines"), prune=PruneSettings(prune_layer, keep),
                         baseline=True, gen_length=gen.gen_length, block_length=gen.block_length, steps=gen.steps,
                         max_prompt_tokens=vqa_task.prompt_tokens(load_tokenizer(model)), image_size=DEMO_IMAGE_SIZE,
                         overwrite=True, progress=progress)


def run_demo(workdir: str | Path, model: str | Path = DEMO_MODEL, prune_layer: int = DEMO_PRUNE_LAYER,
             keep: float = DEMO_KEEP, preset: str = DEMO_PRESET, progress: bool = True, rebuild: bool = False):
    """Export ``model`` (:func:`demo_export_options`) into ``workdir/engines``, or reuse the
    engines there if they were built from the same (:func:`export_or_reuse`), and answer
    :func:`demo_questions` about :data:`DEMO_IMAGE` with both graphs. Returns (the Pipeline, a
    DemoAnswer per question)."""
    from .runtime.pipeline import Pipeline

    opts = demo_export_options(workdir, model, prune_layer, keep, preset, progress)
    export_or_reuse(opts, rebuild, say=lambda m: print(m, flush=True) if progress else None)
    pipe = Pipeline.load(opts.output)
    pipe.warmup()  # first-run costs (session warm-up, allocations) stay out of the timings
    answers = [DemoAnswer(q, truth, pipe.generate(DEMO_IMAGE, q, preset=preset),
                          pipe.generate(DEMO_IMAGE, q, preset=preset, unpruned=True))
               for q, truth in demo_questions()]
    return pipe, answers


def main(argv: list[str] | None = None) -> int:
    from .cli.common import parser, user_errors

    p = parser("llada-demo", plain(__doc__.split("\n\n")[1]))
    p.add_argument("--workdir", default="out/demo",
                   help="where the engines go (default: out/demo); engines there built from the same checkpoint "
                        "and settings are reused")
    p.add_argument("--rebuild", action="store_true", help="export the engines again even if matching ones exist (say, after changing the "
                        "exporter's code)")
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
        pipe, answers = run_demo(args.workdir, args.model, args.prune_layer, args.keep, args.preset,
                                 rebuild=args.rebuild)
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
