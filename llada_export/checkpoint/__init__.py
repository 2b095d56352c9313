"""LLaDA-V checkpoints in the official Hugging Face layout: :mod:`.io` (safetensors files, key
validation, the streaming writer) and :mod:`.loader` (the validating loader). Random
checkpoints are :mod:`llada_export.synthetic`'s job. The names below import on first use."""

from __future__ import annotations

import importlib

_API = {"CheckpointError": ".io", "save_checkpoint": ".io", "load_checkpoint": ".loader", "read_config": ".loader"}
__all__ = list(_API)


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(_API[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
