"""``llada-generate``: answer a question about an image with exported engines."""

from __future__ import annotations

import argparse
import json
import sys

from ..engines import BACKENDS
from .common import user_errors

EPILOG = """\
examples:
  llada-generate --engines engines/ --image photo.jpg --prompt "<image>\\nWhat is shown?"
  llada-generate --engines engines/ --image chart.png --prompt "<image>\\nWhat is the maximum?" --preset chartqa
  llada-generate --engines engines/ --image photo.jpg --prompt "<image>\\nDescribe it." --compare-unpruned --json

Put <image> in the prompt where the image goes (the official demo uses "<image>\\n" + question)."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llada-generate", description="Generate an answer with LLaDA-V engines built by "
                                "llada-export: vision -> stage A (prune) -> stage B x (steps - 1), official sampler.",
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engines", required=True, help="engines directory written by llada-export")
    p.add_argument("--image", help="image file (any format Pillow reads); omit for a text-only prompt")
    p.add_argument("--prompt", required=True, help="user message; must contain <image> when --image is given")
    p.add_argument("--preset", choices=("mc", "chartqa", "docvqa", "mathvista", "mathverse", "demo"),
                   help="official sampler preset (gen_length/block_length/steps); flags below override it")
    p.add_argument("--gen-length", type=int, help="response length (default: the engines' --gen-length)")
    p.add_argument("--block-length", type=int, help="sampler block length (default: the engines' value)")
    p.add_argument("--steps", type=int, help="denoising steps (default: the engines' value)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; > 0 Gumbel-max sampling (default: 0)")
    p.add_argument("--remasking", choices=("low_confidence", "random"), default="low_confidence",
                   help="which positions to commit each step (default: low_confidence)")
    p.add_argument("--cfg-scale", type=float, default=0.0, help="classifier-free guidance scale (default: 0)")
    p.add_argument("--seed", type=int, default=0, help="seed for temperature / random remasking (default: 0)")
    p.add_argument("--backend", choices=BACKENDS,
                   help="backend to run (default: the fastest one built that runs here)")
    p.add_argument("--device", help="cpu or cuda (default: what the engines were built for)")
    p.add_argument("--weights", metavar="DIR",
                   help="checkpoint to load the weights from, for aoti / inductor engines exported without them "
                   "(default: the checkpoint recorded in the manifest)")
    p.add_argument("--compare-unpruned", action="store_true",
                   help="also run the unpruned graph from the same directory and print the speed-up")
    p.add_argument("--json", action="store_true", help="print the full result (ids, kept tokens, timings) as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with user_errors("llada-generate"):
        from ..runtime.pipeline import Pipeline

        pipe = Pipeline.load(args.engines, backend=args.backend, device=args.device, weights_from=args.weights)
        kw = dict(gen_length=args.gen_length, steps=args.steps, block_length=args.block_length,
                  temperature=args.temperature, remasking=args.remasking, cfg_scale=args.cfg_scale,
                  preset=args.preset, seed=args.seed)
        res = pipe.generate(args.image, args.prompt, **kw)
        base = pipe.generate(args.image, args.prompt, unpruned=True, **kw) if args.compare_unpruned else None
        if args.json:
            out = {"backend": pipe.backend, "device": pipe.device, "result": res.to_dict()}
            if base is not None:
                out["unpruned"] = base.to_dict()
                out["speedup"] = base.timings["total"] / res.timings["total"]
            print(json.dumps(out, indent=2))
            return 0
        print(res.text)
        if base is not None:
            kept = len(res.kept_visual) if res.kept_visual is not None else res.n_visual
            print(f"\n[pruned]   {res.timings['total'] * 1e3:.1f} ms, kept {kept}/{res.n_visual} visual tokens")
            print(f"[unpruned] {base.timings['total'] * 1e3:.1f} ms: {base.text}")
            print(f"speed-up: {base.timings['total'] / res.timings['total']:.2f}x, "
                  f"same answer: {base.ids == res.ids}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
