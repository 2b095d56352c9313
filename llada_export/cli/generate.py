"""``llada-generate``: answer a question about an image with exported engines."""

from __future__ import annotations

import argparse
import json
import sys

from ..engines.registry import backend_names
from .common import cli_prompt, directory, image_file, parser, positive_int, refresh_value, seed_value, setting_number, user_errors

DESCRIPTION = """\
Generate an answer with LLaDA-V engines built by llada-export: vision -> stage A (prune)
-> stage B, or the prefix KV cache, for the remaining steps, with the official sampler."""

EPILOG = """\
examples:
  llada-generate --engines engines/ --image photo.jpg --prompt "What is shown?"
  llada-generate --engines engines/ --image chart.png --prompt "What is the maximum?" --preset chartqa
  llada-generate --engines engines/ --image photo.jpg --prompt "Describe it." --factor 1 --refresh 32
  llada-generate --engines engines/ --image photo.jpg --prompt "Describe it." --compare-unpruned --json
  llada-generate --engines engines/ --image photo.jpg --prompt "Describe it." --stream
  llada-generate --server http://127.0.0.1:8000 --image photo.jpg --prompt "What is shown?" --stream

The image goes first unless the prompt places it with <image> ("<image>\\n" + question, as
the official demo writes it); a typed \\n in --prompt is a newline. With --cache (the default
when the engines have the cache graphs) the prefix K/V are reused between refreshes (every
forward by default: --refresh 32 is the official demo's, faster); --factor / --threshold commit
several tokens per step (Fast-dLLM parallel decoding; --threshold 0.9 unless a rule or
--fixed-schedule is given)."""


def build_parser() -> argparse.ArgumentParser:
    p = parser("llada-generate", DESCRIPTION, EPILOG)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--engines", type=directory, help="engines directory written by llada-export")
    where.add_argument("--server", metavar="URL",
                       help="ask a running llada-serve instead (e.g. http://127.0.0.1:8000; the openai client's base_url, "
                       "http://127.0.0.1:8000/v1, names the same server)")
    p.add_argument("--image", type=image_file, help="image file (any format Pillow reads); omit for a text-only prompt")
    p.add_argument("--prompt", required=True, type=cli_prompt,
                   help="user message; <image> marks where the image goes (default: first)")
    p.add_argument("--preset", choices=("mc", "chartqa", "docvqa", "mathvista", "mathverse", "demo"),
                   help="official sampler preset (gen_length/block_length/steps); flags below override it")
    p.add_argument("--gen-length", type=positive_int, help="response length (default: the engines' --gen-length)")
    p.add_argument("--block-length", type=positive_int, help="sampler block length (default: the engines' value)")
    p.add_argument("--steps", type=positive_int, help="denoising steps (default: the engines' value)")
    p.add_argument("--temperature", type=setting_number("temperature", low=0.0), default=0.0,
                   help="0 = greedy; > 0 Gumbel-max sampling (default: 0)")
    p.add_argument("--remasking", choices=("low_confidence", "random"), default="low_confidence",
                   help="which positions to commit each step (default: low_confidence)")
    p.add_argument("--cfg-scale", type=setting_number("cfg_scale", low=0.0), default=0.0,
                   help="classifier-free guidance scale (default: 0; needs --no-cache)")
    p.add_argument("--seed", type=seed_value, default=0,
                   help="seed for temperature / random remasking, 0 to 2**63 - 1 (default: 0)")
    add_decoding_flags(p)
    p.add_argument("--backend", choices=backend_names(),
                   help="backend to run (default: the fastest one built that runs here)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: what the engines were built for)")
    p.add_argument("--weights", metavar="DIR", type=directory,
                   help="checkpoint to load the weights from, for aoti / inductor engines exported without them "
                   "(default: the checkpoint recorded in the manifest)")
    p.add_argument("--compare-unpruned", action="store_true",
                   help="also run the unpruned graph from the same directory and print the speed-up")
    p.add_argument("--stream", action="store_true",
                   help="print the answer as it is committed: its prefix with no mask left, as it grows (block by "
                   "block with --block-length < --gen-length); with --server too (stream: true)")
    p.add_argument("--json", action="store_true",
                   help="print the full result as JSON: the answer, its ids, finish reason (stop / length), the "
                   "settings that produced it, kept tokens, timings")
    return p


def add_decoding_flags(p: argparse.ArgumentParser) -> None:
    """--cache / --no-cache, --refresh, --factor / --threshold (shared with llada-compare)."""
    g = p.add_argument_group("prefix cache and parallel decoding")
    c = g.add_mutually_exclusive_group()
    c.add_argument("--cache", dest="cache", action="store_true", default=None,
                   help="use the prefix KV cache (default: when the engines have its graphs)")
    c.add_argument("--no-cache", dest="cache", action="store_false", help="recompute the prefix every step")
    g.add_argument("--refresh", type=refresh_value, default=argparse.SUPPRESS, metavar="N|never",
                   help="with the cache: forwards between refreshes within a block; never = only at block "
                   "starts (default: 1, every forward: longer intervals cost long answers in our sweep; the official "
                   "demo's 32 is faster)")
    r = g.add_mutually_exclusive_group()
    r.add_argument("--factor", type=setting_number("factor", low=0.0, low_open=True), metavar="F",
                   help="parallel decoding, the official LLaDA-V Fast-dLLM hook's rule (its demo's threshold=1 "
                   "is --factor 1): commit the top k, k the first rank with confidence < 1 - F/(k+2)")
    r.add_argument("--fixed-schedule", action="store_true",
                   help="no parallel decoding: the official fixed schedule, steps / blocks tokens per forward "
                   "(the exact reference; slower)")
    r.add_argument("--threshold", type=setting_number("threshold", low=0.0, high=1.0, low_open=True), metavar="T",
                   help="parallel decoding, Fast-dLLM's threshold rule: commit every masked token of the block "
                   "with confidence >= T (at least one); default: --threshold 0.9 unless --factor or "
                   "--fixed-schedule")


def decoding_settings(args: argparse.Namespace) -> dict:
    return dict(cache=args.cache, refresh=getattr(args, "refresh", "default"), factor=args.factor,
                threshold=args.threshold, fixed_schedule=args.fixed_schedule)


LOCAL_ONLY = ("backend", "device", "weights", "compare_unpruned")


def ask_server(args: argparse.Namespace) -> int:
    """--server: the same request through llada-serve's HTTP API (retried on a server-side failure)."""
    from ..serve.client import Client

    refresh = getattr(args, "refresh", "default")
    fields = dict(max_tokens=args.gen_length, steps=args.steps, block_length=args.block_length, preset=args.preset,
                  temperature=args.temperature, remasking=args.remasking, cfg_scale=args.cfg_scale, seed=args.seed,
                  cache=args.cache, factor=args.factor, threshold=args.threshold,
                  **({"fixed_schedule": True} if args.fixed_schedule else {}),
                  **({} if refresh == "default" else {"refresh": "never" if refresh is None else refresh}))
    if args.stream:
        for piece in Client(args.server).chat_stream(args.prompt, args.image, **fields):
            print(piece, end="", flush=True)
        print(flush=True)
        return 0
    reply = Client(args.server).chat(args.prompt, args.image, **fields)
    print(json.dumps(reply, indent=2) if args.json else reply["choices"][0]["message"]["content"], flush=True)
    return 0


def printer(pipe):
    """``on_step`` for Pipeline.generate that prints the answer's committed prefix as it grows, and the
    function that prints the rest of the final answer."""
    from ..serve.stream import RowStreams, TextStream
    from ..tokenizer import decode_answer

    text = TextStream(lambda ids: decode_answer(pipe.tokenizer, ids))

    def push(ids: list[int]) -> None:
        print(text.feed(ids), end="", flush=True)

    def finish(answer: str) -> None:
        print(text.finish(answer), flush=True)

    return RowStreams([push], pipe.tokens.mask, pipe.tokens.eot), finish


def timing_line(res, pipe) -> str:
    """One line for stderr after a plain answer: how long it took, and where the time went."""
    t = res.timings
    return (f"llada-generate: {len(res.ids)} tokens ({res.finish_reason}) in {t['total']:.2f} s: vision "
            f"{t['vision']:.2f} s, {res.forwards} forwards {t['denoise']:.2f} s ({pipe.backend} on {pipe.device})")


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.server is not None:
        given = [f"--{k.replace('_', '-')}" for k in LOCAL_ONLY if getattr(args, k) not in (None, False)]
        if given:
            p.error(f"{', '.join(given)}: for local engines (--engines) only, not with --server")
    if args.stream and args.json:
        p.error("--stream and --json: pick one (--json prints the whole result once it is done)")
    with user_errors("llada-generate"):
        if args.server is not None:
            return ask_server(args)
        from ..runtime.pipeline import Pipeline

        pipe = Pipeline.load(args.engines, backend=args.backend, device=args.device, weights_from=args.weights)
        if args.compare_unpruned and not pipe.pruned:
            raise ValueError(f"--compare-unpruned: {args.engines} holds unpruned engines only (exported with "
                             "--no-prune): there is no pruned answer to compare")
        kw = dict(gen_length=args.gen_length, steps=args.steps, block_length=args.block_length,
                  temperature=args.temperature, remasking=args.remasking, cfg_scale=args.cfg_scale,
                  preset=args.preset, seed=args.seed, **decoding_settings(args))
        on_step, finish = printer(pipe) if args.stream else (None, None)
        res = pipe.generate(args.image, args.prompt, on_step=on_step, **kw)
        base = pipe.generate(args.image, args.prompt, unpruned=True, **kw) if args.compare_unpruned else None
        if args.json:
            # with the engines, the image and the prompt, result.settings reproduce the answer
            out = {"engines": args.engines, "backend": pipe.backend, "device": pipe.device, "image": args.image,
                   "prompt": args.prompt, "result": res.to_dict()}
            if base is not None:
                out["unpruned"] = base.to_dict()
                out["speedup"] = base.timings["total"] / res.timings["total"]
            print(json.dumps(out, indent=2), flush=True)
            return 0
        finish(res.text) if finish else print(res.text, flush=True)
        print(timing_line(res, pipe), file=sys.stderr, flush=True)
        if base is not None:
            kept = len(res.kept_visual) if res.kept_visual is not None else res.n_visual
            print(f"\n[pruned]   {res.timings['total'] * 1e3:.1f} ms, kept {kept}/{res.n_visual} visual tokens")
            print(f"[unpruned] {base.timings['total'] * 1e3:.1f} ms: {base.text}")
            print(f"speed-up: {base.timings['total'] / res.timings['total']:.2f}x, same answer: {base.ids == res.ids}",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
