"""Loading an LLaDA-V checkpoint in the official Hugging Face layout, validated first.

:func:`load_checkpoint` validates everything it can before reading any weight: every
shard exists, every safetensors header parses and its data length matches the file
size, the keys equal what the model expects (vision layers counted from the keys:
official checkpoints hold 26 of SigLIP's 27 layers; a 27-layer checkpoint has its last
layer dropped, as the official loader does), and the shapes match. The model is then
built on the meta device and filled tensor by tensor from memory-mapped files, so two
full copies of the weights never coexist.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import PreTrainedTokenizerBase
from transformers.models.siglip.modeling_siglip import SiglipVisionEmbeddings

from ..config import ConfigError, LLaDAVConfig
from ..graphs.llada import RotaryEmbedding
from ..graphs.llava import LLaDAV
from ..tokenizer import TokenizerError, has_tokenizer_files, load_tokenizer, special_tokens
from .io import (INDEX_NAME, SINGLE_NAME, CheckpointError, _check_against_model, check_decoder_layers,
                 expected_shapes, meta_model, parse_dtype, read_safetensors_header, resolve_vision_layers)


def read_config(ckpt_dir: str | Path) -> LLaDAVConfig:
    """The checkpoint's config (errors name the file)."""
    ckpt_dir = Path(ckpt_dir)
    try:
        cfg = LLaDAVConfig.from_json(ckpt_dir)
    except ConfigError as e:
        msg = str(e)
        raise ConfigError(msg if str(ckpt_dir) in msg else f"{ckpt_dir / 'config.json'}: {msg}") from e
    if cfg.text.vocab_size <= 0:
        raise ConfigError(f"{ckpt_dir / 'config.json'}: vocab_size {cfg.text.vocab_size} is not positive")
    return cfg


def check_tokenizer_files(ckpt_dir: Path) -> None:
    """A tokenizer_config.json without the vocabulary it needs: name the missing file (transformers
    would say it cannot convert a slow tokenizer without sentencepiece or tiktoken)."""
    if not any((ckpt_dir / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise CheckpointError(f"{ckpt_dir}: no tokenizer.json beside tokenizer_config.json (LLaDA-V's tokenizer "
                              "is that file); copy it from the model's release")


def checkpoint_tokenizer(ckpt_dir: str | Path, cfg: LLaDAVConfig) -> PreTrainedTokenizerBase:
    """The checkpoint's tokenizer, checked (its files, its special tokens, its size against the vocab)."""
    ckpt_dir = Path(ckpt_dir)
    check_tokenizer_files(ckpt_dir)
    return _load_tokenizer(ckpt_dir, cfg)


def _load_tokenizer(ckpt_dir: Path, cfg: LLaDAVConfig) -> PreTrainedTokenizerBase:
    try:
        tokenizer = load_tokenizer(ckpt_dir)
    except (OSError, ValueError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{ckpt_dir}: cannot load the tokenizer ({e})") from e
    try:
        special_tokens(tokenizer)
    except TokenizerError as e:
        raise CheckpointError(f"{ckpt_dir}: {e}") from e
    if len(tokenizer) > cfg.text.vocab_size:
        raise CheckpointError(f"{ckpt_dir}: the tokenizer has {len(tokenizer)} tokens, "
                              f"more than vocab_size {cfg.text.vocab_size} in config.json")
    return tokenizer


def _weight_files(ckpt_dir: Path) -> tuple[list[str], dict[str, str] | None]:
    """Shard file names, and the index's weight map (None for a single file)."""
    index_path = ckpt_dir / INDEX_NAME
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text())
            weight_map = index["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index_path}: unreadable index ({e})") from e
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (ckpt_dir / f).is_file()]
        if missing:
            details = ", ".join(f"{f} ({sum(v == f for v in weight_map.values())} tensors)" for f in missing)
            raise CheckpointError(f"{ckpt_dir}: missing weight file(s) listed in {INDEX_NAME}: {details}")
        return files, weight_map
    if (ckpt_dir / SINGLE_NAME).is_file():
        return [SINGLE_NAME], None
    raise CheckpointError(f"{ckpt_dir}: no {INDEX_NAME} or {SINGLE_NAME} (no weights)")


def materialize_buffers(model: nn.Module, cfg: LLaDAVConfig, device: torch.device) -> None:
    """Recompute the non-persistent buffers (not in checkpoints) left on the meta device."""
    for mname, mod in model.named_modules():
        for bname, buf in list(mod.named_buffers(recurse=False)):
            if not buf.is_meta:
                continue
            if isinstance(mod, SiglipVisionEmbeddings) and bname == "position_ids":
                new = torch.arange(mod.num_positions, device=device).expand((1, -1))
            elif isinstance(mod, RotaryEmbedding) and bname == "inv_freq":
                new = RotaryEmbedding(2 * buf.shape[0], cfg.text.rope_theta).inv_freq.to(device)
            else:
                raise CheckpointError(f"internal: buffer {mname}.{bname} is not in the checkpoint "
                                      "and has no known initialiser")
            setattr(mod, bname, new)


def set_tensor(model: nn.Module, key: str, t: torch.Tensor) -> None:
    mname, _, attr = key.rpartition(".")
    mod = model.get_submodule(mname)
    if attr in dict(mod.named_parameters(recurse=False)):
        setattr(mod, attr, nn.Parameter(t, requires_grad=False))
    else:
        setattr(mod, attr, t)


def load_checkpoint(
    ckpt_dir: str | Path,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device = "cpu",
    require_tokenizer: bool = False,
) -> tuple[LLaDAV, PreTrainedTokenizerBase | None, LLaDAVConfig]:
    """Load ``(model, tokenizer, cfg)`` from a checkpoint directory, validated first.

    ``dtype=None`` uses the config's ``torch_dtype``. The model is in eval mode, its
    parameters do not require grad. The tokenizer is None when the directory has no
    tokenizer files (the model, the vision tower and the sampler need none; whatever must
    encode text says so) unless ``require_tokenizer``. Raises :class:`CheckpointError`
    (files, keys, shapes, truncation; messages name the file and the key) or
    :class:`~llada_export.config.ConfigError` (config.json missing or foreign)."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise CheckpointError(f"{ckpt_dir}: " + ("a file, not a checkpoint directory" if ckpt_dir.exists()
                                                 else "no such checkpoint directory"))
    cfg = read_config(ckpt_dir)
    dt = parse_dtype(dtype if dtype is not None else cfg.torch_dtype)
    device = torch.device(device)

    tokenizer = checkpoint_tokenizer(ckpt_dir, cfg) if has_tokenizer_files(ckpt_dir) else None
    if tokenizer is None and require_tokenizer:
        raise CheckpointError(f"{ckpt_dir}: no tokenizer files (tokenizer.json / tokenizer_config.json); "
                              "the special token ids and the prompt encoding come from them")

    # Validate every file, key and shape before reading any weight.
    files, index = _weight_files(ckpt_dir)
    headers = {f: read_safetensors_header(ckpt_dir / f) for f in files}
    found: dict[str, tuple[str, tuple[int, ...]]] = {}
    for fname, infos in headers.items():
        for k, info in infos.items():
            if k in found:
                raise CheckpointError(f"{ckpt_dir}: tensor {k} is in both {found[k][0]} and {fname}")
            found[k] = (fname, info.shape)
    layers, ignored = resolve_vision_layers(cfg, found, str(ckpt_dir))
    expected = expected_shapes(cfg, layers)
    check_decoder_layers(cfg, found, expected, str(ckpt_dir))
    _check_against_model(
        str(ckpt_dir),
        {k: v for k, v in found.items() if k not in ignored},
        expected,
        None if index is None else {k: v for k, v in index.items() if k not in ignored},
    )

    # Build on meta, then fill tensor by tensor from the memory-mapped files.
    model = meta_model(cfg, layers)
    for fname in files:
        with safe_open(str(ckpt_dir / fname), framework="pt", device="cpu") as f:
            for k in f.keys():
                if k in ignored:
                    continue
                set_tensor(model, k, f.get_tensor(k).to(device=device, dtype=dt))
    materialize_buffers(model, cfg, device)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(f"{ckpt_dir}: internal: tensors left unloaded: {', '.join(left[:5])}")
    model.eval()
    return model, tokenizer, cfg
