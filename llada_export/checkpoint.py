"""Reading and writing LLaDA-V checkpoints in the official Hugging Face layout.

A checkpoint directory holds ``config.json``, ``generation_config.json``, the weights
as ``model-0000X-of-0000N.safetensors`` shards with ``model.safetensors.index.json``
(or one ``model.safetensors``), and the tokenizer files.

Writing (:func:`save_checkpoint`, :func:`random_checkpoint`) streams: tensors are
produced one at a time and written straight into their shard, so a random full-size
checkpoint (8B parameters, 16 GB in bf16) never exists in memory as a whole. The
directory is assembled under a temporary sibling name and renamed at the end, so a
failure never leaves a half-written checkpoint behind.

Loading (:func:`load_checkpoint`) validates everything it can before reading any
weight: every shard exists, every safetensors header parses and its data length
matches the file size, the keys equal what the model expects (vision layers counted
from the keys: official checkpoints hold 26 of SigLIP's 27 layers; a 27-layer
checkpoint has its last layer dropped, as the official loader does), and the shapes
match. The model is then built on the meta device and filled tensor by tensor from
memory-mapped files, so two full copies of the weights never coexist.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import shutil
import struct
import secrets
import warnings
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoTokenizer, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging
from transformers.models.siglip.modeling_siglip import SiglipVisionEmbeddings

from .config import PRESETS, ConfigError, LLaDAVConfig
from .graphs.llada import RMSNorm, RotaryEmbedding
from .graphs.llava import LLaDAV
from .tokenizer import SpecialTokens, TokenizerError, build_tokenizer

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # Hugging Face's classic "5GB"
INIT_STD = 0.02  # std of the random normal init (the official initializer_range)
_INIT_CHUNK = 2**24  # elements drawn at a time by the random init
VISION_LAYER_PREFIX = "model.vision_tower.vision_tower.vision_model.encoder.layers."
_MAX_HEADER_BYTES = 100 * 2**20

# torch dtype <-> safetensors dtype string
_ST_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}
_TORCH_DTYPES = {v: k for k, v in _ST_DTYPES.items()}

T = TypeVar("T")


class CheckpointError(ValueError):
    """A checkpoint directory is missing, incomplete, corrupt or does not fit the model."""


# ---------------------------------------------------------------------- tensor specs
@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and dtype of one tensor, known before the tensor exists."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass
class LazyState:
    """A state dict whose tensors are made on demand, one at a time.

    Iterating yields ``(name, tensor)`` in ``specs`` order; the writer also uses
    ``specs`` to plan shards and validate keys before any tensor is made.
    """

    specs: list[TensorSpec]
    make: Callable[[TensorSpec], torch.Tensor]

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for spec in self.specs:
            yield spec.name, self.make(spec)

    def __len__(self) -> int:
        return len(self.specs)


StateSource = Mapping[str, torch.Tensor] | LazyState | Iterable[tuple[str, torch.Tensor]]


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """``"bfloat16"`` / ``"torch.bfloat16"`` / ``torch.bfloat16`` -> a floating torch dtype."""
    if isinstance(name, torch.dtype):
        return name
    dt = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dt, torch.dtype) or not dt.is_floating_point:
        raise ValueError(f"unknown floating-point dtype {name!r} (use float32, bfloat16 or float16)")
    return dt


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def meta_model(cfg: LLaDAVConfig, vision_layers: int | None = None) -> LLaDAV:
    """The model on the meta device: shapes and module types, no storage."""
    with torch.device("meta"):
        return LLaDAV(cfg, vision_layers)


def state_dict_from_model(model: nn.Module) -> dict[str, torch.Tensor]:
    """The persistent tensors of ``model`` (what a checkpoint holds), detached."""
    return {k: v.detach() for k, v in model.state_dict().items()}


def expected_shapes(cfg: LLaDAVConfig, vision_layers: int | None = None) -> dict[str, tuple[int, ...]]:
    """Key -> shape of every checkpoint tensor the model expects."""
    return {k: tuple(v.shape) for k, v in meta_model(cfg, vision_layers).state_dict().items()}


def _norm_tensor_names(model: nn.Module) -> set[str]:
    names = set()
    for mname, mod in model.named_modules():
        if isinstance(mod, (RMSNorm, nn.LayerNorm)):
            names.update(f"{mname}.{p}" for p, _ in mod.named_parameters(recurse=False))
    return names


def random_state(cfg: LLaDAVConfig, seed: int = 0, dtype: torch.dtype = torch.float32,
                 vision_layers: int | None = None, init_std: float = INIT_STD) -> LazyState:
    """Random weights for ``cfg``, made lazily tensor by tensor.

    Init rule: norm weights (RMSNorm, LayerNorm) are ones, norm biases zeros; every other
    tensor (matrices, embeddings, linear biases, ``image_newline``) is normal(0, init_std),
    0.02 by default (the official initializer_range). Tests use a larger std so that a
    random model's answers vary from position to position and comparisons can fail.
    Values are drawn in float32 (in chunks of 2**24) from a ``torch.Generator`` seeded
    with ``seed`` and the tensor's name, then cast: a tensor's values do not depend on
    the order or on how the checkpoint is sharded.
    """
    model = meta_model(cfg, vision_layers)
    norms = _norm_tensor_names(model)
    specs = [TensorSpec(k, tuple(v.shape), dtype) for k, v in model.state_dict().items()]

    def make(spec: TensorSpec) -> torch.Tensor:
        if spec.name in norms:
            fill = 1.0 if spec.name.endswith(".weight") else 0.0
            return torch.full(spec.shape, fill, dtype=spec.dtype)
        gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(spec.name.encode())) % 2**63)
        out = torch.empty(spec.shape, dtype=spec.dtype)
        flat = out.view(-1)
        for start in range(0, flat.numel(), _INIT_CHUNK):  # fp32 draws in chunks: no fp32 copy of big tensors
            chunk = flat[start:start + _INIT_CHUNK]
            chunk.copy_(torch.empty(chunk.numel(), dtype=torch.float32).normal_(0.0, init_std, generator=gen))
        return out

    return LazyState(specs, make)


# ---------------------------------------------------------------------- safetensors I/O
def _write_safetensors(path: Path, items: list[tuple[TensorSpec, Callable[[], torch.Tensor]]]) -> int:
    """Write one safetensors file, making each tensor only when its turn comes.

    The header is computed from the specs, so at most one tensor is in memory at a
    time; tensor bytes are written without an extra copy. Returns the data bytes."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for spec, _ in items:
        if spec.dtype not in _ST_DTYPES:
            raise CheckpointError(f"{path.name}: {spec.name}: dtype {spec.dtype} cannot be stored in safetensors")
        header[spec.name] = {"dtype": _ST_DTYPES[spec.dtype], "shape": list(spec.shape),
                             "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)  # align the data section to 8 bytes, as safetensors does
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for spec, make in items:
            t = make().detach()
            if t.dtype != spec.dtype or tuple(t.shape) != spec.shape:
                raise CheckpointError(
                    f"{path.name}: {spec.name}: producer made {dtype_name(t.dtype)}{list(t.shape)}, "
                    f"announced {dtype_name(spec.dtype)}{list(spec.shape)}"
                )
            t = t.to("cpu").contiguous()
            f.write(t.reshape(-1).view(torch.uint8).numpy())
            del t
    return offset


@dataclass(frozen=True)
class TensorInfo:
    """One entry of a safetensors header."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and check a safetensors header without reading any tensor data.

    Raises :class:`CheckpointError` naming the file if the header is unreadable, a
    tensor's byte range disagrees with its dtype and shape, or the file is shorter
    (truncated) or longer than the header says."""
    size = path.stat().st_size
    if size < 8:
        raise CheckpointError(f"{path}: {size} bytes, too short for a safetensors file (truncated?)")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > min(size - 8, _MAX_HEADER_BYTES):
            raise CheckpointError(f"{path}: header length {n} does not fit in a file of {size} bytes "
                                  "(truncated or not a safetensors file)")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable safetensors header ({e})") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: unreadable safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    infos: dict[str, TensorInfo] = {}
    for key, e in header.items():
        try:
            info = TensorInfo(e["dtype"], tuple(int(s) for s in e["shape"]), *map(int, e["data_offsets"]))
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"{path}: {key}: malformed header entry {e!r}") from err
        if info.dtype not in _TORCH_DTYPES:
            raise CheckpointError(f"{path}: {key}: unsupported dtype {info.dtype!r}")
        want = math.prod(info.shape) * _TORCH_DTYPES[info.dtype].itemsize
        if info.end - info.begin != want:
            raise CheckpointError(f"{path}: {key}: byte range {info.begin}..{info.end} does not fit "
                                  f"{info.dtype}{list(info.shape)} ({want} bytes)")
        infos[key] = info
    pos = 0
    for key, info in sorted(infos.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        if info.begin != pos:
            raise CheckpointError(f"{path}: {key}: data starts at byte {info.begin}, expected {pos} "
                                  "(overlapping or gapped tensors)")
        pos = info.end
    have = size - 8 - n
    if have < pos:
        raise CheckpointError(f"{path}: truncated: the header describes {pos} bytes of tensor data "
                              f"but the file holds only {have}")
    if have > pos:
        raise CheckpointError(f"{path}: {have - pos} unexpected bytes after the tensor data")
    return infos


# ---------------------------------------------------------------------- validation
def _vision_layer_ids(keys: Iterable[str]) -> set[int]:
    ids = set()
    for k in keys:
        if k.startswith(VISION_LAYER_PREFIX):
            n = k[len(VISION_LAYER_PREFIX):].split(".", 1)[0]
            if n.isdigit():
                ids.add(int(n))
    return ids


def resolve_vision_layers(cfg: LLaDAVConfig, keys: Iterable[str], where: str) -> tuple[int, set[str]]:
    """How many vision encoder layers to build, and which keys to ignore.

    Keys holding ``num_hidden_layers - 1`` layers are used as they are (official
    checkpoints); exactly ``num_hidden_layers`` layers: the last one is dropped, as the
    official loader does, and its keys are ignored. Anything else is an error."""
    keys = list(keys)
    full = cfg.vision.num_hidden_layers
    ids = _vision_layer_ids(keys)
    n = max(ids) + 1 if ids else 0
    if n == full - 1:
        return n, set()
    if n == full:
        drop = f"{VISION_LAYER_PREFIX}{full - 1}."
        return full - 1, {k for k in keys if k.startswith(drop)}
    raise CheckpointError(
        f"{where}: the weights hold {n} vision encoder layers but the config says the tower has "
        f"{full} (num_hidden_layers); expected {full - 1} (official: last layer deleted) or {full}"
    )


def _check_against_model(
    where: str,
    found: dict[str, tuple[str, tuple[int, ...]]],  # key -> (file, shape)
    expected: dict[str, tuple[int, ...]],
    index: dict[str, str] | None,
) -> None:
    """Raise one CheckpointError listing every missing, unexpected or misshapen tensor."""
    problems = []
    for k in expected:
        if k not in found:
            hint = f"the index puts it in {index[k]}" if index and k in index else "in no file"
            problems.append(f"missing tensor {k} ({hint})")
    for k, (fname, shape) in found.items():
        if k not in expected:
            problems.append(f"{fname}: unexpected tensor {k}")
        elif tuple(shape) != tuple(expected[k]):
            problems.append(f"{fname}: {k} has shape {list(shape)}, expected {list(expected[k])}")
    if index is not None:
        for k, fname in index.items():
            if k in found and found[k][0] != fname:
                problems.append(f"{INDEX_NAME}: puts {k} in {fname} but it is in {found[k][0]}")
            elif k not in found and k not in expected:
                problems.append(f"{INDEX_NAME}: lists {k} in {fname}, which does not hold it")
        for k, (fname, _) in found.items():
            if k not in index and k in expected:
                problems.append(f"{fname}: {k} is not listed in {INDEX_NAME}")
    if problems:
        shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
        raise CheckpointError(f"{where}: the weights do not match the model:\n  " + "\n  ".join(shown))


# ---------------------------------------------------------------------- writing
def _pack(items: Iterable[T], size: Callable[[T], int], max_bytes: int) -> Iterator[list[T]]:
    """Greedy shard packing: start a new shard when the next item would overflow this
    one (an item larger than ``max_bytes`` gets a shard of its own)."""
    shard: list[T] = []
    total = 0
    for it in items:
        s = size(it)
        if shard and total + s > max_bytes:
            yield shard
            shard, total = [], 0
        shard.append(it)
        total += s
    if shard:
        yield shard


def shard_name(i: int, n: int) -> str:
    return f"model-{i:05d}-of-{n:05d}.safetensors"


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() or out_dir.is_symlink():
        if not out_dir.is_dir():
            raise CheckpointError(f"{out_dir} exists and is not a directory")
        if any(out_dir.iterdir()) and not overwrite:
            raise CheckpointError(f"{out_dir} exists and is not empty (pass --overwrite / overwrite=True to replace it)")


def _sibling(out_dir: Path, tag: str) -> Path:
    """A fresh hidden sibling path of ``out_dir`` (same filesystem, so rename is atomic)."""
    return out_dir.parent / f".{out_dir.name}.{secrets.token_hex(4)}.{tag}"


def _replace_dir(tmp: Path, out_dir: Path) -> None:
    """Move the finished ``tmp`` to ``out_dir``, replacing an old directory there."""
    if not out_dir.exists():
        tmp.rename(out_dir)
        return
    old = _sibling(out_dir, "old")
    out_dir.rename(old)
    try:
        tmp.rename(out_dir)
    except BaseException:
        old.rename(out_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(
    state: StateSource,
    cfg: LLaDAVConfig,
    tokenizer: PreTrainedTokenizerBase,
    out_dir: str | Path,
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
    progress: Callable[[int, int | None], None] | None = None,
) -> Path:
    """Write a checkpoint directory in the official Hugging Face layout.

    ``state`` is a state dict, a :class:`LazyState` (tensors made one at a time: the
    streaming path) or any iterable of ``(name, tensor)`` (buffered one shard at a time).
    For the first two, keys and shapes are checked against the model before anything is
    written. ``cfg.text.vocab_size == 0`` is filled with ``len(tokenizer)``.
    ``progress(shards_done, shards_total_or_None)`` is called after each shard.
    Returns the directory.
    """
    out_dir = Path(out_dir)
    _check_out_dir(out_dir, overwrite)
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, not {max_shard_bytes}")
    cfg = copy.deepcopy(cfg)
    if cfg.text.vocab_size == 0:
        cfg.text.vocab_size = len(tokenizer)
    if len(tokenizer) > cfg.text.vocab_size:
        raise CheckpointError(f"the tokenizer has {len(tokenizer)} tokens, more than vocab_size {cfg.text.vocab_size}")
    try:
        SpecialTokens.from_tokenizer(tokenizer)
    except TokenizerError as e:
        raise CheckpointError(str(e)) from e

    if isinstance(state, Mapping):
        tensors = dict(state)
        state = LazyState([TensorSpec(k, tuple(v.shape), v.dtype) for k, v in tensors.items()],
                          lambda spec: tensors[spec.name])
    if isinstance(state, LazyState):
        names = [s.name for s in state.specs]
        layers, ignored = resolve_vision_layers(cfg, names, "state")
        expected = expected_shapes(cfg, layers)
        expected.update({s.name: s.shape for s in state.specs if s.name in ignored})
        _check_against_model("state", {s.name: ("state", s.shape) for s in state.specs}, expected, None)
        lazy = state
        shards: Iterable[list[tuple[TensorSpec, Callable[[], torch.Tensor]]]] = _pack(
            ((s, (lambda s=s: lazy.make(s))) for s in lazy.specs), lambda it: it[0].nbytes, max_shard_bytes)
        total: int | None = sum(1 for _ in _pack(lazy.specs, lambda s: s.nbytes, max_shard_bytes))
    else:
        def _entries() -> Iterator[tuple[TensorSpec, Callable[[], torch.Tensor]]]:
            for name, t in state:
                yield TensorSpec(name, tuple(t.shape), t.dtype), (lambda t=t: t)
        shards = _pack(_entries(), lambda it: it[0].nbytes, max_shard_bytes)
        total = None

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(out_dir, "partial")
    tmp.mkdir()  # honours the umask, unlike tempfile.mkdtemp
    try:
        files: list[tuple[Path, list[str]]] = []
        total_size = 0
        seen: set[str] = set()
        for i, shard in enumerate(shards, 1):
            for spec, _ in shard:
                if spec.name in seen:
                    raise CheckpointError(f"tensor {spec.name} is produced twice")
                seen.add(spec.name)
            path = tmp / f"shard-{i:05d}.partial"
            total_size += _write_safetensors(path, shard)
            files.append((path, [spec.name for spec, _ in shard]))
            if progress is not None:
                progress(i, total)
        if not files:
            raise CheckpointError("no tensors to write")
        weight_map = {}
        for i, (path, keys) in enumerate(files, 1):
            name = shard_name(i, len(files))
            path.rename(tmp / name)
            weight_map.update({k: name for k in keys})
        index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")

        config = cfg.to_dict()
        config["bos_token_id"] = tokenizer.bos_token_id
        config["eos_token_id"] = tokenizer.eos_token_id
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        gen = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        tokenizer.save_pretrained(str(tmp))
        _drop_load_time_keys(tmp / "tokenizer_config.json")
        _check_out_dir(out_dir, overwrite)  # it may have appeared meanwhile
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _drop_load_time_keys(path: Path) -> None:
    """transformers 5 writes how a tokenizer was loaded (``is_local``, ``local_files_only``) back
    into ``tokenizer_config.json``; they describe this machine, not the checkpoint."""
    if not path.exists():
        return
    conf = json.loads(path.read_text())
    if [conf.pop(k) for k in ("is_local", "local_files_only") if k in conf]:
        path.write_text(json.dumps(conf, indent=2, ensure_ascii=False) + "\n")


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
) -> Path:
    """Write a random-weight checkpoint of a preset (``"tiny"`` or ``"full"``).

    ``dtype`` defaults to bfloat16 for full and float32 for tiny. The tokenizer is the
    stand-in of the same kind (:func:`~llada_export.tokenizer.build_tokenizer`); the
    tiny vocab size comes from it. The vision tower holds ``num_hidden_layers - 1``
    layers, like official checkpoints. Tensors are generated and written one at a time.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r} (choose from {', '.join(PRESETS)})")
    dt = parse_dtype(dtype if dtype is not None else ("bfloat16" if preset == "full" else "float32"))
    _check_out_dir(Path(out_dir), overwrite)
    cfg = PRESETS[preset]()
    tokenizer = build_tokenizer("full" if preset == "full" else "tiny", add_bos=add_bos)
    if cfg.text.vocab_size == 0:
        cfg.text.vocab_size = len(tokenizer)
    cfg.torch_dtype = dtype_name(dt)
    state = random_state(cfg, seed, dt, init_std=init_std)
    return save_checkpoint(state, cfg, tokenizer, out_dir, max_shard_bytes=max_shard_bytes,
                           overwrite=overwrite, progress=progress)


# ---------------------------------------------------------------------- loading
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


def _materialize_buffers(model: nn.Module, cfg: LLaDAVConfig, device: torch.device) -> None:
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


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """AutoTokenizer also parses config.json, which transformers does not know
    (model_type llava_llada): silence its warnings about that, restoring the level."""
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        hf_logging.set_verbosity(level)


def _set_tensor(model: nn.Module, key: str, t: torch.Tensor) -> None:
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
) -> tuple[LLaDAV, PreTrainedTokenizerBase, LLaDAVConfig]:
    """Load ``(model, tokenizer, cfg)`` from a checkpoint directory, validated first.

    ``dtype=None`` uses the config's ``torch_dtype``. The model is in eval mode, its
    parameters do not require grad. Raises :class:`CheckpointError` (files, keys,
    shapes, truncation; messages name the file and the key) or
    :class:`~llada_export.config.ConfigError` (config.json missing or foreign)."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise CheckpointError(f"{ckpt_dir}: no such checkpoint directory")
    try:
        cfg = LLaDAVConfig.from_json(ckpt_dir)
    except ConfigError as e:
        msg = str(e)
        raise ConfigError(msg if str(ckpt_dir) in msg else f"{ckpt_dir / 'config.json'}: {msg}") from e
    if cfg.text.vocab_size <= 0:
        raise ConfigError(f"{ckpt_dir / 'config.json'}: vocab_size {cfg.text.vocab_size} is not positive")
    dt = parse_dtype(dtype if dtype is not None else cfg.torch_dtype)
    device = torch.device(device)

    # Tokenizer first: cheap, and a checkpoint without a usable one is useless.
    try:
        with _quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(str(ckpt_dir), local_files_only=True)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{ckpt_dir}: cannot load the tokenizer ({e})") from e
    try:
        SpecialTokens.from_tokenizer(tokenizer)
    except TokenizerError as e:
        raise CheckpointError(f"{ckpt_dir}: {e}") from e
    if len(tokenizer) > cfg.text.vocab_size:
        raise CheckpointError(f"{ckpt_dir}: the tokenizer has {len(tokenizer)} tokens, "
                              f"more than vocab_size {cfg.text.vocab_size} in config.json")

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
                _set_tensor(model, k, f.get_tensor(k).to(device=device, dtype=dt))
    _materialize_buffers(model, cfg, device)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(f"{ckpt_dir}: internal: tensors left unloaded: {', '.join(left[:5])}")
    model.eval()
    return model, tokenizer, cfg
