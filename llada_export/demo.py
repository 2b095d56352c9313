"""``make demo``: the main job end to end on the bundled default.

Until the trained demo model ships (it answers real questions), the bundled default is
the tiny random-weight checkpoint, written deterministically on first use: export it
with pruning (ONNX Runtime, CPU) plus the unpruned baseline, answer a question about
the bundled image with both, and print the answers, the kept-token count and timings.
Random weights answer nonsense; what the demo shows is the machinery and its speed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ASSETS = Path(__file__).parent / "assets"
DEMO_IMAGE = ASSETS / "demo.png"
DEMO_PROMPT = "<image>\nWhat colour is the circle?"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="llada-demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="build/demo", help="where the checkpoint and engines go (default: build/demo)")
    p.add_argument("--preset", default="chartqa", help="sampler preset (default: chartqa, 16/16/16)")
    args = p.parse_args(argv)

    from .checkpoint import random_checkpoint
    from .exporter.build import ExportOptions, export_engines
    from .runtime.pipeline import Pipeline
    from .runtime.sampler import PRESETS

    work = Path(args.workdir)
    ckpt, engines = work / "tiny-checkpoint", work / "engines"
    if not (ckpt / "config.json").exists():
        print(f"writing the bundled default checkpoint (tiny, random weights, seed 0) to {ckpt}")
        random_checkpoint("tiny", ckpt, seed=0, overwrite=True)
    gen = PRESETS[args.preset]
    print(f"exporting {ckpt} -> {engines} (prune layer 2, keep 0.35, ONNX Runtime, + unpruned baseline)")
    export_engines(ExportOptions(model=str(ckpt), output=str(engines), prune_layer=2, keep=0.35, baseline=True,
                                 gen_length=gen.gen_length, block_length=gen.block_length, steps=gen.steps,
                                 max_prompt_tokens=192, image_size=(384, 384), overwrite=True))
    pipe = Pipeline.load(engines)
    pruned = pipe.generate(DEMO_IMAGE, DEMO_PROMPT, preset=args.preset)
    full = pipe.generate(DEMO_IMAGE, DEMO_PROMPT, preset=args.preset, unpruned=True)
    t_p, t_f = pruned.timings["total"], full.timings["total"]
    print(f"\nimage: {DEMO_IMAGE.name}   prompt: {DEMO_PROMPT!r}   preset: {args.preset}")
    print(f"pruned   answer: {pruned.text!r}")
    print(f"unpruned answer: {full.text!r}")
    print(f"visual tokens: {pruned.n_visual}, kept {len(pruned.kept_visual or [])} "
          f"(keep {pipe.keep}, layer {pipe.manifest['pruning']['layer']})")
    print(f"time: pruned {t_p * 1e3:.1f} ms (stage A {pruned.timings['stage_a'] * 1e3:.1f} ms, stage B "
          f"{pruned.timings['stage_b_per_step'] * 1e3:.2f} ms/step), unpruned {t_f * 1e3:.1f} ms "
          f"({full.timings['full_per_step'] * 1e3:.2f} ms/step): {t_f / t_p:.2f}x")
    print("note: the bundled default has random weights until the trained demo model ships, so the answers "
          "are not meaningful; the two paths are compared token by token in the test suite.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
