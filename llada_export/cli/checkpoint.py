"""``llada-checkpoint``: write a random-weight LLaDA-V checkpoint (official HF layout).

    llada-checkpoint --preset tiny -o ckpt/tiny
    llada-checkpoint --preset full -o ckpt/full          # 8B parameters, ~16 GB bf16
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path

from ..checkpoint.constants import DEFAULT_MAX_SHARD_BYTES, INIT_STD
from ..config import PRESETS
from .common import parser, seed_value, user_errors

DESCRIPTION = """\
Write a random-weight LLaDA-V checkpoint in the official Hugging Face layout (config.json,
generation_config.json, sharded safetensors + index, tokenizer files). Tensors are generated
and written one at a time, so the full preset needs little memory."""

PROG = "llada-checkpoint"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_bytes(text: str) -> int:
    """``"5GB"``, ``"200MiB"``, ``"123456"`` -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS:
        raise argparse.ArgumentTypeError(f"invalid size {text!r} (e.g. 5GB, 500MB, 2GiB or a byte count)")
    n = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if n <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive, not {text!r}")
    return n


def init_std(text: str) -> float:
    """A finite standard deviation > 0."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = parser(PROG, DESCRIPTION)
    p.add_argument("--preset", choices=sorted(PRESETS),
                   help="model size: 'tiny' (a few MB, for tests), 'demo' (the demo model's structure, 15 MB, "
                   "random weights) or 'full' (real LLaDA-V dimensions, 8B parameters); required (or as PRESET)")
    p.add_argument("preset_arg", nargs="?", choices=sorted(PRESETS), metavar="PRESET",
                   help="the same as --preset (llada-checkpoint tiny -o DIR)")
    p.add_argument("-o", "--output", required=True, type=Path, metavar="DIR",
                   help="checkpoint directory to create; required")
    p.add_argument("--seed", type=seed_value, default=0, help="random seed of the weights, 0 to 2**63 - 1 (default: 0)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="weight dtype (default: bfloat16 for full, float32 for tiny)")
    p.add_argument("--init-std", type=init_std, default=INIT_STD,
                   help=f"std of the random normal init of matrices and embeddings (default: {INIT_STD})")
    p.add_argument("--auto-bos", action="store_true",
                   help="write a tokenizer that prepends BOS itself (default: off, like the official "
                   "LLaDA-V tokenizer, whose BOS comes only from the chat template)")
    p.add_argument("--max-shard-size", type=parse_bytes, default=DEFAULT_MAX_SHARD_BYTES, metavar="SIZE",
                   help="largest safetensors shard, e.g. 5GB, 500MB (default: 5GB)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace DIR if it holds a checkpoint llada-checkpoint wrote (default: refuse)")
    return p


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def human_size(n: int) -> str:
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.preset and args.preset_arg and args.preset != args.preset_arg:
        p.error(f"two presets: --preset {args.preset} and {args.preset_arg}; give one")
    args.preset = args.preset or args.preset_arg
    if args.preset is None:
        p.error(f"a preset is required: --preset {{{','.join(sorted(PRESETS))}}} (or the name alone)")
    bars: list = []  # made at the first shard, so an early error prints no bar

    def progress(done: int, total: int | None) -> None:
        if not bars:
            from tqdm import tqdm

            bars.append(tqdm(total=total, unit="shard", desc="writing shards"))
        bars[0].update(done - bars[0].n)

    try:
        with user_errors(PROG):  # the writer removes its temporary directory on any failure
            from ..synthetic.weights import random_checkpoint

            out = random_checkpoint(
                args.preset, args.output, seed=args.seed, dtype=args.dtype, add_bos=args.auto_bos,
                overwrite=args.overwrite, max_shard_bytes=args.max_shard_size, progress=progress,
                init_std=args.init_std, overwrite_flag="--overwrite",
            )
    finally:
        for bar in bars:
            bar.close()
    n_shards = len(list(out.glob("model-*-of-*.safetensors")))
    print(f"wrote {out} ({n_shards} shard{'s' if n_shards != 1 else ''}, {human_size(_dir_size(out))})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
