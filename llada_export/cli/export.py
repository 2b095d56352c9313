"""``llada-export``: compile an LLaDA-V checkpoint into pruned engines."""

from __future__ import annotations

import argparse
import sys

from ..engines.registry import backend_names
from .checkpoint import parse_bytes
from .common import directory, parse_size, parser, positive_int, unit_interval, user_errors

DESCRIPTION = """\
Compile an LLaDA-V checkpoint (Hugging Face layout) into engines with LLaDA-FastV
visual-token pruning: stage A (step 1, prune at layer K), stage B (later steps on the
reduced sequence) and the vision graph; with --cache also the prefix-KV-cache graphs
(prefill + cached step) that Fast-dLLM-style decoding runs."""

EPILOG = """\
examples:
  llada-export --model ckpt/ --prune-layer 16 --keep 0.35 -o engines/
  llada-export --model ckpt/ --image-size 1024x768 --cache --dtype bfloat16 --device cuda \\
      --backend inductor --fuse-sampler --baseline -o engines/    (as benchmarked on the H200)
  llada-export --model ckpt/ --no-prune -o engines-baseline/
  llada-export --model ckpt/ --cache --batch-sizes 1,2,4,8 -o engines/    (a server's engines: each
      batch runs on the smallest size that holds it, one copy of the weights for all sizes)
  llada-export --model ckpt/ --cache --dtype bfloat16 --batch-sizes auto --device-memory 80GiB -o engines/
      (the powers of two up to the largest batch an 80 GiB card holds beside the weights)

The bucket (--max-prompt-tokens, --image-size / --max-visual-tokens, --gen-length,
--batch-size or --batch-sizes) fixes every graph's shapes; smaller prompts and images are padded and masked
at run time. By default the bucket takes every image (anyres bounds its visual tokens);
a smaller --image-size is faster. -o is written atomically; --overwrite replaces only an
engines directory llada-export wrote (or an empty one), never the checkpoint."""


def build_parser() -> argparse.ArgumentParser:
    backends = backend_names()
    p = parser("llada-export", DESCRIPTION, EPILOG)
    p.add_argument("--model", required=True, type=directory, help="checkpoint directory (config.json, *.safetensors, tokenizer)")
    p.add_argument("-o", "--output", required=True, help="engines directory to write (written atomically)")
    g = p.add_argument_group("pruning")
    g.add_argument("--prune-layer", type=int, default=None,
                   help=f"layer K: layers < K see every visual token (default: {PRUNE_DEFAULTS['prune_layer']})")
    g.add_argument("--keep", type=unit_interval, default=None,
                   help=f"fraction of visual tokens kept, in (0, 1] (default: {PRUNE_DEFAULTS['keep']})")
    g.add_argument("--score-from", choices=("response", "text", "last"), default=None,
                   help="queries whose attention ranks visual tokens: masked response positions, all text, or the "
                   "last prompt token (default: response)")
    g.add_argument("--no-prune", action="store_true",
                   help="build unpruned engines instead (the pruning flags above and --baseline do not apply)")
    g.add_argument("--baseline", action="store_true",
                   help="also build the unpruned graphs beside the pruned ones (for --compare-unpruned)")
    c = p.add_argument_group("decoding")
    c.add_argument("--cache", action="store_true",
                   help="also build the prefix-KV-cache graphs (prefill + cached step; Fast-dLLM-style decoding)")
    c.add_argument("--cached-attention", choices=("flash", "masked"), default=None,
                   help="the torch backends' cached step: flash attention over the cache's zeroed padding, rescaled "
                   "by its log-sum-exp (flash, the default: the fastest on a GPU), or the masked kernel the eager "
                   "reference and ONNX use (masked: for a model whose queries score every real key far below 0, "
                   "where flash's rescale loses accuracy); needs --cache and a torch backend (inductor, aoti)")
    c.add_argument("--fuse-sampler", action="store_true",
                   help="put the greedy sampler step (argmax + its probability) inside the graphs, so a step returns "
                   "[B, G] tensors, not [B, G, vocab] logits; such engines serve temperature 0 only (default: off)")
    s = p.add_argument_group("shape bucket")
    s.add_argument("--max-prompt-tokens", type=positive_int, default=256,
                   help="prompt text tokens, chat template included (default: 256)")
    s.add_argument("--image-size", type=parse_size, default=None, metavar="WxH",
                   help="largest image the bucket serves; sets the visual tokens and vision batch (default: every "
                   "image size, the most visual tokens anyres can give)")
    s.add_argument("--max-visual-tokens", type=positive_int, default=None,
                   help="visual token slots (default: derived from --image-size)")
    s.add_argument("--gen-length", type=positive_int, default=128, help="response length (default: 128)")
    s.add_argument("--block-length", type=positive_int, default=None,
                   help="default sampler block length (default: --gen-length)")
    s.add_argument("--steps", type=positive_int, default=None, help="default denoising steps (default: --gen-length)")
    bs = s.add_mutually_exclusive_group()
    bs.add_argument("--batch-size", type=positive_int, default=None,
                    help="requests per graph call (static; default: 1); the same as --batch-sizes N")
    bs.add_argument("--batch-sizes", type=size_list, default=None, metavar="N,N,...|auto",
                    help="several static batch sizes in one directory, e.g. 1,2,4,8: the graphs of each size over "
                    "one copy of the weights; a batch runs on the smallest size that holds it, llada-serve batches "
                    "up to the largest. 'auto': the powers of two up to the largest batch of the decoding path "
                    "(pruned or not, with --cache or not) that fits the serving GPU's memory beside the weights, "
                    "less a 5%% headroom (the CUDA device's free memory at export, or --device-memory); the "
                    "manifest's notes record the arithmetic and the KV cache bytes per request")
    s.add_argument("--device-memory", type=parse_bytes, default=None, metavar="SIZE",
                   help="--batch-sizes auto: plan for a card of this much memory (e.g. 80GiB, 141GB) instead of the "
                   "export device's free memory; needed when exporting on cpu")
    b = p.add_argument_group("build")
    b.add_argument("--backend", choices=(*backends, "all"), default="onnxruntime",
                   help="engines to build: onnxruntime (ONNX), aoti (AOTInductor packages), inductor (torch.export "
                   "programs compiled with torch.compile when loaded; for CUDA machines whose AOTInductor loader "
                   "fails), tensorrt (needs the tensorrt package and a GPU) (default: onnxruntime)")
    b.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                   help="internal precision; graph inputs/outputs stay fp32, norms and RoPE fp32 (default: float32)")
    b.add_argument("--weights", choices=("native", "fp8"), default="native",
                   help="native: the linears in --dtype; fp8: e4m3 weights with one scale per output channel and "
                   "activations quantized to e4m3 at every call (onnxruntime, inductor, tensorrt backends) "
                   "(default: native)")
    b.add_argument("--fp8-activations", choices=("row", "tensor"), default=None,
                   help="--weights fp8: one dynamic activation scale per row (token) or per tensor; per tensor "
                   "couples the rows of a batch (default: row)")
    b.add_argument("--fp8-skip", nargs="+", default=None, metavar="PATTERN",
                   help="--weights fp8: linears that stay in --dtype, as module-name patterns of the checkpoint's "
                   "naming (fnmatch; a pattern also covers the modules under it), e.g. 'model.layers.0.*' "
                   "(default: model.vision_tower model.mm_projector lm_head; lm_head must stay)")
    b.add_argument("--device", default="cpu", help="device to trace and compile for: cpu, cuda or cuda:N (default: cpu)")
    b.add_argument("--compile-cache", action=argparse.BooleanOptionalAction, default=None,
                   help="inductor: compile every graph at export with torch.compile and save the compiler's cache, "
                   "so that torch.compile at load on a machine with the same torch, Triton and GPU hits it (Dynamo "
                   "still traces each graph); with --precompile it serves the fallback path only (default: on for "
                   "CUDA with --no-precompile; inductor builds only)")
    b.add_argument("--precompile", action=argparse.BooleanOptionalAction, default=None,
                   help="inductor: compile every graph at export with Inductor and save its kernels per graph "
                   "(programs/*.compiled.bin, programs/precompiled.json); a load on a machine with the same torch, "
                   "Triton and GPU runs them without Dynamo or torch.compile, elsewhere it compiles as without them "
                   "(default: on for CUDA; inductor builds only)")
    b.add_argument("--overwrite", action="store_true",
                   help="replace an existing engines directory written by llada-export")
    b.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    return p


def size_list(text: str) -> tuple[int, ...] | str:
    """``"1,2,4,8"`` -> (1, 2, 4, 8): positive integers, no repeats; ``"auto"`` stays ``"auto"``."""
    if text.strip().lower() == AUTO:
        return AUTO
    try:
        sizes = tuple(int(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: comma-separated positive integers, e.g. 1,2,4,8") from None
    if min(sizes) < 1 or len(set(sizes)) != len(sizes):
        raise argparse.ArgumentTypeError(f"{text!r}: positive integers without repeats, e.g. 1,2,4,8")
    return tuple(sorted(sizes))


AUTO = "auto"  # --batch-sizes auto
PRUNE_DEFAULTS = {"prune_layer": 16, "keep": 0.35, "score_from": "response"}


def check_flags(p: argparse.ArgumentParser, args: argparse.Namespace, backends: tuple[str, ...]) -> None:
    """Refuse flags that this combination would ignore (a usage error, exit 2), then fill the defaults."""
    if args.no_prune:
        given = [f"--{k.replace('_', '-')}" for k in PRUNE_DEFAULTS if getattr(args, k) is not None]
        given += ["--baseline"] if args.baseline else []
        if given:
            p.error(f"--no-prune builds unpruned engines only: {', '.join(given)} would be ignored; drop "
                    f"{'it' if len(given) == 1 else 'them'} or --no-prune")
    for k, v in PRUNE_DEFAULTS.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.device_memory is not None and args.batch_sizes != AUTO:
        p.error("--device-memory applies to --batch-sizes auto only")
    if args.weights != "fp8" and (args.fp8_activations is not None or args.fp8_skip is not None):
        p.error("--fp8-activations and --fp8-skip apply to --weights fp8 only")
    if args.cached_attention is not None and not (args.cache and {"inductor", "aoti"} & set(backends)):
        p.error("--cached-attention applies to the cached step of the torch backends: add --cache and --backend "
                "inductor, aoti or all")
    for name in ("precompile", "compile-cache"):  # inductor-only switches
        value = getattr(args, name.replace("-", "_"))
        if value is not None and "inductor" not in backends:
            p.error(f"--{'' if value else 'no-'}{name} applies to inductor builds only (--backend inductor or all); "
                    f"this builds {', '.join(backends)}")


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    backends = tuple(backend_names()) if args.backend == "all" else (args.backend,)
    check_flags(p, args, backends)
    with user_errors("llada-export"):
        from ..contract.manifest import Manifest
        from ..contract.pruning import PruneSettings
        from ..exporter.build import ExportOptions, export_engines
        from ..quant.fp8 import DEFAULT_SKIP, FP8Settings

        prune = None if args.no_prune else PruneSettings(args.prune_layer, args.keep, args.score_from)
        opts = ExportOptions(
            model=args.model, output=args.output, prune=prune, baseline=args.baseline, cache=args.cache,
            backends=backends, fuse_sampler=args.fuse_sampler, dtype=args.dtype, device=args.device,
            cached_attention=args.cached_attention or "flash",
            gen_length=args.gen_length, block_length=args.block_length, steps=args.steps,
            max_prompt_tokens=args.max_prompt_tokens, image_size=args.image_size,
            max_visual_tokens=args.max_visual_tokens, batch_sizes=() if args.batch_sizes == AUTO else args.batch_sizes or (args.batch_size or 1,),
            auto_batch=args.batch_sizes == AUTO, device_memory=args.device_memory,
            overwrite=args.overwrite,
            compile_cache=args.compile_cache, precompile=args.precompile, progress=not args.quiet, weights=args.weights,
            fp8=FP8Settings(args.fp8_activations or "row", tuple(args.fp8_skip or DEFAULT_SKIP)))
        out = export_engines(opts)
        m = Manifest.read(out, verify=False)
        built = ", ".join(f"{b} ({', '.join(m.keys_at(m.bucket.batch_size))})" for b in m.artifacts)
        sizes = f"; batch sizes {', '.join(map(str, m.sizes))}" if len(m.sizes) > 1 else ""
        print(f"wrote {out} in {m.export['seconds']:.1f} s: {built}{sizes}")
        gpu = f", peak GPU memory {m.export['peak_gpu_gib']} GiB" if m.export.get("peak_gpu_gib") is not None else ""
        print(f"peak host memory (RSS) {m.export['peak_host_rss_gib']} GiB{gpu}")
        for note in m.notes:
            print(f"note: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
