"""The compiled graphs' weights at load: one copy, whatever the checkpoint's layout.

Engines whose compiled graphs (aoti, inductor) leave their weights in the checkpoint map each graph
constant to a checkpoint key (``manifest.constants_from_checkpoint``); a fused projection's key
``cat(a,b,c)`` names the tensors it concatenates (``graphs.fused``). :func:`bind_constants` gives each
graph its tensors, building every fused tensor once, and drops each source tensor as soon as no
remaining key needs it: a q/k/v or gate/up weight that only feeds a fused copy is freed right after
that copy is made, so the runtime holds one copy of the weights (not the checkpoint's plus the fused
ones) and its peak is that plus one fused tensor.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ..graphs.fused import resolve_weight
from ..rules import env_choice, shorten

log = logging.getLogger("llada_export")


def parts_of(key: str) -> list[str]:
    """The checkpoint keys a derived ``cat(a,b,...)`` key concatenates (``[key]`` for a plain key)."""
    return key[4:-1].split(",") if key.startswith("cat(") and key.endswith(")") else [key]


def bind_constants(mappings: dict[str, dict[str, str]], weights: dict[str, torch.Tensor], owned: bool
                   ) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """({graph: {fqn: tensor}}, {key: tensor} of every key the graphs use) from ``mappings`` ({graph:
    {fqn: checkpoint key}}) and ``weights`` (by checkpoint key). ``owned``: ``weights`` is the loader's
    own table and is emptied (its tensors that no graph uses are freed); otherwise it is left as the
    caller gave it (tensors the caller keeps stay alive: that memory is the caller's)."""
    keys = sorted({k for m in mappings.values() for k in m.values()})
    table = weights if owned else dict(weights)
    uses = Counter(p for k in keys if k not in table for p in parts_of(k))  # parts still to be concatenated
    used: dict[str, torch.Tensor] = {}
    for key in keys:
        if key in table:
            used[key] = table[key]
            continue
        used[key] = resolve_weight(table, key)
        table.pop(key)
        for p in parts_of(key):
            uses[p] -= 1
            if not uses[p] and p not in keys:  # only the fused copies needed it
                table.pop(p, None)
    if owned:
        table.clear()
    return {g: {fqn: used[k] for fqn, k in m.items()} for g, m in mappings.items()}, used


def held_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views and shared tensors counted once)."""
    seen = {}
    for t in tensors:
        s = t.untyped_storage()
        seen[(t.device, s.data_ptr())] = s.nbytes()
    return sum(seen.values())


READER_ENV = "LLADA_WEIGHTS_READER"  # auto | safetensors | fastsafetensors: how read_weights reads the file
READERS = ("auto", "safetensors", "fastsafetensors")


def reader_choice() -> str:
    """``LLADA_WEIGHTS_READER``'s value (default auto); ValueError for one that names no reader (checked at every
    ``Pipeline.load``, also of engines that read no weights file, so that a typo is not ignored)."""
    return env_choice(READER_ENV, READERS)


def read_weights(path: Path, device: str, uses: set[str]) -> tuple[dict[str, torch.Tensor], str]:
    """(the tensors of the safetensors file ``path`` on ``device``, the reader that read them).

    fastsafetensors (threads reading the file through pinned bounce buffers, the copies to the GPU
    overlapped; the library vLLM's ``--load-format fastsafetensors`` uses) where it is installed, the
    device is a GPU and every tensor in the file is one in ``uses`` (the keys the graphs bind as they are):
    its tensors share one device buffer, so one that :func:`bind_constants` dropped (a part of a fused
    weight, in engines exported before the file held the fused tensors) would free nothing. Otherwise
    safetensors' ``load_file`` (one tensor at a time, from pageable memory). The environment variable
    ``LLADA_WEIGHTS_READER`` picks one: ``safetensors``, or ``fastsafetensors`` (also on the CPU).
    fastsafetensors reads through the page cache here unless ``FASTSAFETENSORS_ODIRECT=1`` (its own
    variable; its default is O_DIRECT on local disks)."""
    reader = reader_choice()
    dev = torch.device(device)
    if reader == "fastsafetensors" or (reader == "auto" and dev.type == "cuda"):
        with safe_open(str(path), framework="pt") as f:
            extra = sorted(set(f.keys()) - uses)
        why = (f"{len(extra)} of its tensors (e.g. {extra[0]}) are not bound by these graphs as they are (parts "
               "of fused weights, or another backend's) and would stay in memory" if extra else None)
        try:
            from fastsafetensors import fastsafe_open
        except ImportError as e:
            why = why or f"fastsafetensors is not installed ({e})"
        if why is None:
            if dev.type == "cuda" and dev.index is None:
                dev = torch.device("cuda", torch.cuda.current_device())
            # buffered reads (through the page cache) unless the caller chose: a server restarted on the same
            # host reads the file at memory speed (H100 host: 0.7 s for 16.9 GB, against 9.0 s with O_DIRECT)
            os.environ.setdefault("FASTSAFETENSORS_ODIRECT", "0")
            try:
                with fastsafe_open(str(path), device=str(dev), nogds=True) as f:
                    return {k: f.get_tensor(k) for k in f.keys()}, "fastsafetensors"
            except Exception as e:  # e.g. no libcudart.so on the library path (it dlopens the CUDA runtime)
                if reader == "fastsafetensors":
                    raise
                why = f"fastsafetensors failed ({type(e).__name__}: {shorten(str(e), 300)})"
                log.warning("%s: %s; reading it with safetensors' load_file", path, why)
        elif reader == "fastsafetensors":
            raise ValueError(f"{READER_ENV}=fastsafetensors cannot read {path}: {why}")
    return load_file(str(path), device=device), "safetensors"
