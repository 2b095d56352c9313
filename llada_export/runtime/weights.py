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

from collections import Counter

import torch

from ..graphs.fused import resolve_weight


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
