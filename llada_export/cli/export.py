"""``llada-export``: compile an LLaDA-V checkpoint into pruned engines."""

from __future__ import annotations

import argparse
import sys

from ..engines import BACKENDS
from .common import parse_size, user_errors

EPILOG = """\
examples:
  llada-export --model ckpt/ --prune-layer 16 --keep 0.35 -o engines/
  llada-export --model ckpt/ --image-size 1024x768 --dtype bfloat16 --device cuda --backend aoti -o engines/
  llada-export --model ckpt/ --image-size 1024x768 --max-prompt-tokens 64 --dtype bfloat16 --device cuda
      --backend inductor --fuse-sampler --baseline -o engines/    (as benchmarked on the H200)
  llada-export --model ckpt/ --no-prune -o engines-baseline/

The bucket (--max-prompt-tokens, --image-size / --max-visual-tokens, --gen-length) fixes
every graph's shapes; smaller prompts and images are padded and masked at run time."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="llada-export", description="Compile an LLaDA-V checkpoint (Hugging Face layout) into engines with "
        "LLaDA-FastV visual-token pruning: stage A (step 1, prune at layer K) and stage B (later steps, reduced "
        "sequence), plus the vision graph.", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint directory (config.json, *.safetensors, tokenizer)")
    p.add_argument("-o", "--output", required=True, help="engines directory to write (written atomically)")
    g = p.add_argument_group("pruning")
    g.add_argument("--prune-layer", type=int, default=16, help="layer K: layers < K see every visual token (default: 16)")
    g.add_argument("--keep", type=float, default=0.35, help="fraction of visual tokens kept, in (0, 1] (default: 0.35)")
    g.add_argument("--score-from", choices=("response", "text", "last"), default="response",
                   help="queries whose attention ranks visual tokens: masked response positions, all text, or the "
                   "last prompt token (default: response)")
    g.add_argument("--no-prune", action="store_true", help="build unpruned baseline engines instead")
    g.add_argument("--baseline", action="store_true",
                   help="also build the unpruned denoiser beside the pruned stages (for --compare-unpruned)")
    s = p.add_argument_group("shape bucket")
    s.add_argument("--max-prompt-tokens", type=int, default=256,
                   help="prompt text tokens, chat template included (default: 256)")
    s.add_argument("--image-size", type=parse_size, default=(384, 384), metavar="WxH",
                   help="largest image the bucket serves; sets the visual tokens and vision batch (default: 384x384)")
    s.add_argument("--max-visual-tokens", type=int, default=None,
                   help="visual token slots (default: derived from --image-size)")
    s.add_argument("--gen-length", type=int, default=128, help="response length (default: 128)")
    s.add_argument("--block-length", type=int, default=None, help="sampler block length (default: --gen-length)")
    s.add_argument("--steps", type=int, default=None, help="default denoising steps (default: --gen-length)")
    g.add_argument("--fuse-sampler", action="store_true",
                   help="put the greedy sampler step (argmax + its probability) inside the graphs, so a step returns "
                   "[G] tensors, not [G, vocab] logits; such engines serve temperature 0 only (default: off)")
    b = p.add_argument_group("build")
    b.add_argument("--backend", choices=(*BACKENDS, "all"), default="onnxruntime",
                   help="engines to build: onnxruntime (ONNX), aoti (AOTInductor packages), inductor (torch.export "
                   "programs compiled with torch.compile when loaded; for CUDA machines whose AOTInductor loader "
                   "fails), tensorrt (needs the tensorrt package and a GPU) (default: onnxruntime)")
    b.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                   help="internal precision; graph inputs/outputs stay fp32, norms and RoPE fp32 (default: float32)")
    b.add_argument("--device", default="cpu", help="device to trace and compile for: cpu or cuda (default: cpu)")
    b.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    b.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with user_errors("llada-export"):
        from ..exporter.build import ExportOptions, export_engines

        backends = BACKENDS if args.backend == "all" else (args.backend,)
        opts = ExportOptions(
            model=args.model, output=args.output, prune_layer=args.prune_layer, keep=args.keep,
            score_from=args.score_from, prune=not args.no_prune, baseline=args.baseline, backends=backends,
            fuse_sampler=args.fuse_sampler,
            dtype=args.dtype, device=args.device, gen_length=args.gen_length,
            block_length=args.block_length or args.gen_length, steps=args.steps or args.gen_length,
            max_prompt_tokens=args.max_prompt_tokens, image_size=args.image_size,
            max_visual_tokens=args.max_visual_tokens, overwrite=args.overwrite, progress=not args.quiet)
        out = export_engines(opts)
        from ..exporter.manifest import read_manifest

        m = read_manifest(out, verify=False)
        built = ", ".join(f"{b} ({', '.join(g)})" for b, g in m["artifacts"].items())
        print(f"wrote {out} in {m['export_seconds']:.1f} s: {built}")
        gpu = f", peak GPU memory {m['export_peak_gpu_gib']} GiB" if m.get("export_peak_gpu_gib") is not None else ""
        print(f"peak host memory (RSS) {m['export_peak_host_rss_gib']} GiB{gpu}")
        for note in m["notes"]:
            print(f"note: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
