"""LLaDA-V checkpoint files in the official Hugging Face layout: safetensors I/O, key
validation, and the streaming writer.

A checkpoint directory holds ``config.json``, ``generation_config.json``, the weights
as ``model-0000X-of-0000N.safetensors`` shards with ``model.safetensors.index.json``
(or one ``model.safetensors``), and the tokenizer files.

Writing (:func:`save_checkpoint`) streams: tensors are produced one at a time and
written straight into their shard, so a random full-size checkpoint (8B parameters,
16 GB in bf16) never exists in memory as a whole. The directory is written through
:func:`~llada_export.outdir.atomic_output_dir`, so a failure never leaves a half-written
checkpoint behind and ``--overwrite`` only ever replaces a checkpoint this tool wrote.
Reading is :mod:`.loader`'s job.
"""

from __future__ import annotations

import copy
import json
import math
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from transformers import PreTrainedTokenizerBase

from .. import __version__
from ..config import LLaDAVConfig
from ..graphs.llava import LLaDAV
from ..outdir import atomic_output_dir, files_under, refuse_unlisted
from .constants import DEFAULT_MAX_SHARD_BYTES
from ..tokenizer import TokenizerError, special_tokens

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
VISION_LAYER_PREFIX = "model.vision_tower.vision_tower.vision_model.encoder.layers."
DECODER_LAYER_PREFIX = "model.layers."
SHOWN_PROBLEMS = 5  # key problems named in an error; the rest are counted
_MAX_HEADER_BYTES = 100 * 2**20
WRITER_KEY = "llada_export_writer"  # config.json field naming the tool that wrote the checkpoint

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


def expected_shapes(cfg: LLaDAVConfig, vision_layers: int | None = None) -> dict[str, tuple[int, ...]]:
    """Key -> shape of every checkpoint tensor the model expects."""
    return {k: tuple(v.shape) for k, v in meta_model(cfg, vision_layers).state_dict().items()}


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
        raise CheckpointError(f"{where}: the weights do not match the model: {first_few(problems)}")


def first_few(items: list[str], n: int = SHOWN_PROBLEMS) -> str:
    """The first ``n`` items and how many there are in all (a message stays one readable line)."""
    more = f"; ... ({len(items)} in all)" if len(items) > n else ""
    return "; ".join(items[:n]) + more


def check_decoder_layers(cfg: LLaDAVConfig, keys: Iterable[str], expected: Iterable[str], where: str) -> None:
    """config.json's ``num_hidden_layers`` must be the decoder layers the weights hold: say both counts
    and the first few tensors one side lacks (not every one of them)."""
    keys, expected = set(keys), set(expected)
    ids = sorted({int(n) for k in keys if k.startswith(DECODER_LAYER_PREFIX)
                  and (n := k[len(DECODER_LAYER_PREFIX):].split(".", 1)[0]).isdigit()})
    want = cfg.text.num_hidden_layers
    if len(ids) != want or (ids and ids[-1] != want - 1):
        held = f"{len(ids)} (layers {ids[0]}..{ids[-1]})" if ids and ids == list(range(ids[0], ids[-1] + 1)) \
            else f"{len(ids)} ({', '.join(map(str, ids[:8]))}{', ...' if len(ids) > 8 else ''})"
        missing = [f"missing {k}" for k in sorted(expected - keys, key=_layer_order)]
        extra = [f"unexpected {k}" for k in sorted(keys - expected, key=_layer_order)]
        raise CheckpointError(f"{where}: config.json says {want} decoder layers (num_hidden_layers) but the weights "
                              f"hold {held}: {first_few(missing + extra, 3)}; use the config.json that came with "
                              "these weights")


def _layer_order(key: str) -> tuple:
    """Keys in layer order (layer 10 after layer 9), the rest by name."""
    n = key[len(DECODER_LAYER_PREFIX):].split(".", 1)[0] if key.startswith(DECODER_LAYER_PREFIX) else ""
    return (int(n), key) if n.isdigit() else (-1, key)


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


def save_checkpoint(
    state: StateSource,
    cfg: LLaDAVConfig,
    tokenizer: PreTrainedTokenizerBase,
    out_dir: str | Path,
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
    progress: Callable[[int, int | None], None] | None = None,
    protect: Iterable[str | Path] = (),
    overwrite_flag: str = "overwrite=True",
) -> Path:
    """Write a checkpoint directory in the official Hugging Face layout.

    ``state`` is a state dict, a :class:`LazyState` (tensors made one at a time: the
    streaming path) or any iterable of ``(name, tensor)`` (buffered one shard at a time).
    For the first two, keys and shapes are checked against the model before anything is
    written. ``cfg.text.vocab_size == 0`` is filled with ``len(tokenizer)``.
    ``progress(shards_done, shards_total_or_None)`` is called after each shard. ``overwrite``
    replaces only an empty directory or one this tool wrote; ``protect``: paths the output
    must not be, contain or lie in (e.g. the checkpoint a model was loaded from). Returns the
    directory.
    """
    out_dir = Path(out_dir)
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, not {max_shard_bytes}")
    cfg = copy.deepcopy(cfg)
    if cfg.text.vocab_size == 0:
        cfg.text.vocab_size = len(tokenizer)
    if len(tokenizer) > cfg.text.vocab_size:
        raise CheckpointError(f"the tokenizer has {len(tokenizer)} tokens, more than vocab_size {cfg.text.vocab_size}")
    try:
        special_tokens(tokenizer)
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

    with atomic_output_dir(out_dir, overwrite=overwrite, owned=is_written_checkpoint, protect=protect,
                           what="checkpoint directory", flag=overwrite_flag) as tmp:
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

        gen = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        tokenizer.save_pretrained(str(tmp))
        _drop_load_time_keys(tmp / "tokenizer_config.json")
        config = cfg.to_dict()
        config["bos_token_id"] = tokenizer.bos_token_id
        config["eos_token_id"] = tokenizer.eos_token_id
        # the files written (config.json last): --overwrite refuses a directory holding others (the user's)
        written = sorted({*files_under(tmp), "config.json"})
        config[WRITER_KEY] = {"tool": "llada-export", "version": __version__, "files": written}
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out_dir


def is_written_checkpoint(path: Path) -> bool:
    """A checkpoint directory this tool wrote (``--overwrite`` may replace only those). One that also holds
    files the writer's record in config.json does not list (the user's own) is refused with an OutputDirError
    naming them, as replacing it would delete them (a record without a file list, from an older version,
    is taken as it was)."""
    try:
        writer = json.loads((Path(path) / "config.json").read_text())[WRITER_KEY]
    except (OSError, ValueError, TypeError, KeyError):
        return False
    listed = writer.get("files") if isinstance(writer, dict) else None
    if isinstance(listed, list):
        refuse_unlisted(Path(path), set(listed), "llada-checkpoint")
    return True


def _drop_load_time_keys(path: Path) -> None:
    """transformers 5 writes how a tokenizer was loaded (``is_local``, ``local_files_only``) back
    into ``tokenizer_config.json``; they describe this machine, not the checkpoint."""
    if not path.exists():
        return
    conf = json.loads(path.read_text())
    if [conf.pop(k) for k in ("is_local", "local_files_only") if k in conf]:
        path.write_text(json.dumps(conf, indent=2, ensure_ascii=False) + "\n")


