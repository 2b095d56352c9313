"""Random LLaDA-V weights: one init rule, streamed to a checkpoint or filled in on a device.

Init rule (:func:`init_kind`): norm weights (RMSNorm, LayerNorm) are ones, norm biases
zeros; every other tensor (matrices, embeddings, linear biases, ``image_newline``) is
normal(0, init_std), 0.02 by default (the official initializer_range). Tests use a larger
std so that a random model's answers vary from position to position and comparisons can
fail.

- :func:`random_state` / :func:`random_checkpoint`: values drawn in float32 on the CPU (in
  chunks of 2**24) from a generator seeded with ``seed`` and the tensor's name, then cast,
  so a tensor's values do not depend on the order or on the sharding; written one tensor
  at a time (the full preset never exists in memory as a whole).
- :func:`random_model`: the same rule drawn on a device (a full-size model on a GPU in
  seconds, for benchmarks without a checkpoint on disk); other values than the CPU stream.
"""

from __future__ import annotations

import math
import zlib
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..checkpoint.constants import DEFAULT_MAX_SHARD_BYTES, INIT_STD
from ..checkpoint.io import LazyState, TensorSpec, dtype_name, is_written_checkpoint, meta_model, parse_dtype, save_checkpoint
from ..config import PRESETS, LLaDAVConfig
from ..graphs.llada import RMSNorm
from ..graphs.llava import LLaDAV
from ..outdir import check_output_dir
from .tokenizer import build_tokenizer

_INIT_CHUNK = 2**24  # elements drawn at a time by the CPU stream


def _norm_tensor_names(model: nn.Module) -> set[str]:
    names = set()
    for mname, mod in model.named_modules():
        if isinstance(mod, (RMSNorm, nn.LayerNorm)):
            names.update(f"{mname}.{p}" for p, _ in mod.named_parameters(recurse=False))
    return names


def init_kind(name: str, norms: set[str]) -> str:
    """``"ones"``, ``"zeros"`` or ``"normal"`` for the tensor ``name`` (``norms``: norm parameters)."""
    if name in norms:
        return "ones" if name.endswith(".weight") else "zeros"
    return "normal"


def check_init_std(init_std: float) -> None:
    if isinstance(init_std, bool) or not isinstance(init_std, (int, float)) or not (math.isfinite(init_std)
                                                                                   and init_std > 0):
        raise ValueError(f"init_std must be a finite number > 0, got {init_std!r}")


def random_state(cfg: LLaDAVConfig, seed: int = 0, dtype: torch.dtype = torch.float32,
                 vision_layers: int | None = None, init_std: float = INIT_STD) -> LazyState:
    """Random weights for ``cfg``, made lazily tensor by tensor on the CPU (see the module docstring)."""
    check_init_std(init_std)
    model = meta_model(cfg, vision_layers)
    norms = _norm_tensor_names(model)
    specs = [TensorSpec(k, tuple(v.shape), dtype) for k, v in model.state_dict().items()]

    def make(spec: TensorSpec) -> torch.Tensor:
        kind = init_kind(spec.name, norms)
        if kind != "normal":
            return torch.full(spec.shape, 1.0 if kind == "ones" else 0.0, dtype=spec.dtype)
        gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(spec.name.encode())) % 2**63)
        out = torch.empty(spec.shape, dtype=spec.dtype)
        flat = out.view(-1)
        for start in range(0, flat.numel(), _INIT_CHUNK):  # fp32 draws in chunks: no fp32 copy of big tensors
            chunk = flat[start:start + _INIT_CHUNK]
            chunk.copy_(torch.empty(chunk.numel(), dtype=torch.float32).normal_(0.0, init_std, generator=gen))
        return out

    return LazyState(specs, make)


@torch.no_grad()
def random_model(cfg: LLaDAVConfig, device: str | torch.device, dtype: torch.dtype, seed: int = 0,
                 init_std: float = INIT_STD) -> LLaDAV:
    """The model with random weights made on ``device`` by the same rule (eval mode, no grad)."""
    check_init_std(init_std)
    from ..checkpoint.loader import materialize_buffers, set_tensor

    dev = torch.device(device)
    model = meta_model(cfg)
    norms = _norm_tensor_names(model)
    gen = torch.Generator(device=dev).manual_seed(seed)
    for name, p in list(model.named_parameters()):
        t = torch.empty(p.shape, dtype=dtype, device=dev)
        kind = init_kind(name, norms)
        t.fill_(1.0) if kind == "ones" else t.zero_() if kind == "zeros" else t.normal_(0.0, init_std, generator=gen)
        set_tensor(model, name, t)
    materialize_buffers(model, cfg, dev)
    return model.eval().requires_grad_(False)


def random_checkpoint(
    preset: str,
    out_dir: str | Path,
    seed: int = 0,
    dtype: torch.dtype | str | None = None,
    add_bos: bool = False,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: Callable[[int, int | None], None] | None = None,
    init_std: float = INIT_STD,
    overwrite_flag: str = "overwrite=True",
) -> Path:
    """Write a random-weight checkpoint of a preset (``"tiny"``, ``"demo"`` or ``"full"``).

    ``dtype`` defaults to bfloat16 for full and float32 otherwise. The tokenizer is the
    stand-in of the same kind (:func:`~llada_export.synthetic.tokenizer.build_tokenizer`);
    the small presets' vocab size comes from it. The vision tower holds
    ``num_hidden_layers - 1`` layers, like official checkpoints. Tensors are generated and
    written one at a time.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r} (choose from {', '.join(PRESETS)})")
    check_init_std(init_std)
    dt = parse_dtype(dtype if dtype is not None else ("bfloat16" if preset == "full" else "float32"))
    check_output_dir(out_dir, overwrite=overwrite, owned=is_written_checkpoint, what="checkpoint directory",
                     flag=overwrite_flag)
    cfg = PRESETS[preset]()
    tokenizer = build_tokenizer("full" if preset == "full" else "tiny", add_bos=add_bos)
    if cfg.text.vocab_size == 0:
        cfg.text.vocab_size = len(tokenizer)
    cfg.torch_dtype = dtype_name(dt)
    state = random_state(cfg, seed, dt, init_std=init_std)
    return save_checkpoint(state, cfg, tokenizer, out_dir, max_shard_bytes=max_shard_bytes,
                           overwrite=overwrite, progress=progress, overwrite_flag=overwrite_flag)
