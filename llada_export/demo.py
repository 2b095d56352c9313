"""``make demo`` / ``llada-demo``: the main job end to end on the bundled default.

The bundled default is the trained demo model (``assets/demo-model``: the official
LLaDA-V structure at 3.8 M parameters, fp32, trained by ``tools/train_demo.py`` on the
procedural shapes-and-digits VQA task of :mod:`llada_export.vqa_task`, whose answers are
one token (short types) or whole phrases of 3 to 22 tokens (long types)). The demo exports
it once (ONNX Runtime, CPU): LLaDA-FastV pruning with the prefix-cache graphs, plus the
unpruned baseline, in a bucket that takes every question of the task. It asks short and
long questions about the bundled image (``assets/demo.png``, a test image never seen in
training) two ways: the exact unpruned engines on the official fixed schedule (one token
per forward), and the product's fast path (pruned, prefix cache, parallel decoding). It
prints each answer against the task's ground truth with its forwards, tokens per forward
and time, and exits with status 1 if any answer is wrong.
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
DEMO_IMAGE = ASSETS / "demo.png"  # demo_sample().image()
DEMO_IMAGE_SIZE = (384, 288)  # the task's image size: the bucket the demo exports
DEMO_SAMPLE = {"split": "test", "index": 5, "qtype": "describe"}  # a test scene of 3 shapes and a digit
# (question type, what it asks about) of the questions about DEMO_IMAGE: two short, two long. The
# ground truth comes from the task generator (vqa_task.derive_answer on the sample's scene).
DEMO_KINDS = (("digit", None), ("left", None), ("describe", None), ("list", None))
# The pruning the demo exports (benchmarks/vqa2_prune_sweep.md, the demo model v2): keep 0.5 loses
# long answers (52-58% exact against 97-100% unpruned); keep 0.75 at K 3 holds them best (92%).
DEMO_PRUNE_LAYER = 3
DEMO_KEEP = 0.75
DEMO_GEN_LENGTH = 32  # the task's evaluation length (vqa_task.GEN_LENGTH): one block, 32 steps
# The fast path's sampler settings: the official Fast-dLLM demo's (the prefix cache refreshed every 32
# forwards and at block starts, the factor rule at 1), the speed setting of benchmarks/vqa2_cache_sweep.md;
# the product's default (threshold 0.9, refresh 1) is the accuracy-first one (README, "Defaults").
DEMO_FAST = {"cache": True, "refresh": 32, "factor": 1.0}


@dataclass
class DemoAnswer:
    question: str
    truth: str
    long: bool  # a long-answer question type
    exact: object  # runtime.pipeline.GenerationResult: unpruned engines, fixed schedule, no cache
    fast: object  # pruned + prefix cache + parallel decoding

    @property
    def right(self) -> tuple[bool, bool]:
        return self.exact.text.strip() == self.truth, self.fast.text.strip() == self.truth


def tokens_per_forward(result) -> float:
    """Answer tokens (the closing <|eot_id|> included) committed per forward of the request's row."""
    n = len(result.ids) + (result.finish_reason == "stop")
    return n / max(1, result.forwards)


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
def demo_sample():
    """The task sample whose image is :data:`DEMO_IMAGE`."""
    from . import vqa_task

    return vqa_task.sample(**DEMO_SAMPLE)


def demo_questions() -> list[tuple[str, str]]:
    """(question, ground truth) about the bundled image: :data:`DEMO_KINDS`."""
    from . import vqa_task

    scene = demo_sample().scene
    return [(vqa_task.question_text(t, a), vqa_task.derive_answer(scene, t, a)) for t, a in DEMO_KINDS]


def demo_export_options(workdir: str | Path, model: str | Path = DEMO_MODEL, prune_layer: int = DEMO_PRUNE_LAYER,
                        keep: float = DEMO_KEEP, gen_length: int = DEMO_GEN_LENGTH, progress: bool = True):
    """The ExportOptions of the demo's engines: ``workdir/engines``, pruned with the prefix-cache graphs
    + the unpruned baseline, ONNX Runtime, the task's 384x288 bucket with room for every question of
    the task, one block of ``gen_length``."""
    from . import vqa_task
    from .contract.pruning import PruneSettings
    from .exporter.build import ExportOptions
    from .tokenizer import load_tokenizer

    return ExportOptions(model=str(model), output=str(Path(workdir) / "engines"), prune=PruneSettings(prune_layer, keep),
                         baseline=True, cache=True, gen_length=gen_length, block_length=gen_length, steps=gen_length,
                         max_prompt_tokens=vqa_task.prompt_tokens(load_tokenizer(model)), image_size=DEMO_IMAGE_SIZE,
                         overwrite=True, progress=progress)


def run_demo(workdir: str | Path, model: str | Path = DEMO_MODEL, prune_layer: int = DEMO_PRUNE_LAYER,
             keep: float = DEMO_KEEP, gen_length: int = DEMO_GEN_LENGTH, progress: bool = True, rebuild: bool = False,
             fast: dict | None = None):
    """Export ``model`` (:func:`demo_export_options`) into ``workdir/engines``, or reuse the
    engines there if they were built from the same (:func:`export_or_reuse`), and answer
    :func:`demo_questions` about :data:`DEMO_IMAGE` the exact way (unpruned, fixed schedule, no
    cache) and the fast way (pruned, ``fast`` sampler settings: default :data:`DEMO_FAST`).
    Returns (the Pipeline, a DemoAnswer per question)."""
    from . import vqa_task
    from .runtime.pipeline import Pipeline

    opts = demo_export_options(workdir, model, prune_layer, keep, gen_length, progress)
    export_or_reuse(opts, rebuild, say=lambda m: print(m, flush=True) if progress else None)
    pipe = Pipeline.load(opts.output)
    pipe.warmup()  # first-run costs (session warm-up, allocations) stay out of the timings
    sched = dict(gen_length=gen_length, block_length=gen_length, steps=gen_length)
    exact = dict(unpruned=True, cache=False, fixed_schedule=True)  # the reference: one token per forward
    long_qs = {vqa_task.question_text(t, a) for t, a in DEMO_KINDS if t in vqa_task.LONG_TYPES}
    answers = [DemoAnswer(q, truth, q in long_qs, pipe.generate(DEMO_IMAGE, q, **exact, **sched),
                          pipe.generate(DEMO_IMAGE, q, **sched, **(DEMO_FAST if fast is None else fast)))
               for q, truth in demo_questions()]
    return pipe, answers


def describe_fast(settings: dict) -> str:
    rule = (f"factor {settings['factor']:g}" if settings.get("factor") is not None else
            f"threshold {settings['threshold']:g}" if settings.get("threshold") is not None else "fixed schedule")
    refresh = settings.get("refresh")
    return f"prefix cache (refresh {'at block starts only' if refresh is None else f'every {refresh} forwards'}), {rule}"


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
    p.add_argument("--gen-length", type=int, default=DEMO_GEN_LENGTH,
                   help=f"response length, one block, as many steps (default {DEMO_GEN_LENGTH})")
    args = p.parse_args(argv)
    with user_errors("llada-demo"):
        if args.gen_length < 1:
            raise ValueError(f"--gen-length must be a positive integer, got {args.gen_length}")
        pipe, answers = run_demo(args.workdir, args.model, args.prune_layer, args.keep, args.gen_length,
                                 rebuild=args.rebuild)
        layer = pipe.manifest.pruning.layer
        print(f"\nimage: {DEMO_IMAGE.name} ({DEMO_IMAGE_SIZE[0]}x{DEMO_IMAGE_SIZE[1]}), {args.gen_length} response "
              f"slots in one block.\n  exact: unpruned engines, official fixed schedule ({args.gen_length} steps: one "
              f"token per forward; a request stops at its <|eot_id|>), no cache\n  fast:  pruned at layer {layer} "
              f"(keep {pipe.keep}) + {describe_fast(answers[0].fast.settings)}")
        for a in answers:
            marks = ["right" if ok else "WRONG" for ok in a.right]
            print(f"\nQ: {a.question}   ({'long' if a.long else 'short'} answer; ground truth: {a.truth!r})")
            for name, r, mark in (("exact", a.exact, marks[0]), ("fast", a.fast, marks[1])):
                print(f"  {name:5} {r.text.strip()!r} {mark}: {r.forwards} forwards, "
                      f"{tokens_per_forward(r):.2f} tokens/forward, {r.timings['total'] * 1e3:.0f} ms")
        n_right = sum(sum(a.right) for a in answers)
        fw = [sum(getattr(a, k).forwards for a in answers) for k in ("exact", "fast")]
        t = [sum(getattr(a, k).timings["total"] for a in answers) for k in ("exact", "fast")]
        print(f"\n{n_right}/{2 * len(answers)} answers right. All questions: exact {fw[0]} forwards in "
              f"{t[0]:.2f} s, fast {fw[1]} forwards in {t[1]:.2f} s ({fw[0] / max(fw[1], 1):.1f}x fewer forwards, "
              f"{t[0] / max(t[1], 1e-9):.1f}x faster on this CPU). The project's README has the sweeps behind "
              "these settings and the full-size GPU numbers.")
        if n_right < 2 * len(answers):
            print("llada-demo: error: an answer does not match the task's ground truth", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
