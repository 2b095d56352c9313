"""llada-export: deployment compiler for LLaDA-V with LLaDA-FastV visual-token pruning.

The public API, imported on first use (so ``import llada_export`` and the CLIs stay fast)::

    from llada_export import Pipeline, export_engines, ExportOptions, PruneSettings, GenerationConfig
"""

from __future__ import annotations

import importlib

__version__ = "0.2.0"

_API = {
    "Pipeline": "llada_export.runtime.pipeline",
    "Request": "llada_export.runtime.pipeline",
    "GenerationResult": "llada_export.runtime.pipeline",
    "RequestError": "llada_export.contract.layout",
    "export_engines": "llada_export.exporter.build",
    "ExportOptions": "llada_export.exporter.build",
    "ExportError": "llada_export.exporter.build",
    "PruneSettings": "llada_export.contract.pruning",
    "GenerationConfig": "llada_export.sampler",
    "Manifest": "llada_export.contract.manifest",
    "load_checkpoint": "llada_export.checkpoint.loader",
    "random_checkpoint": "llada_export.synthetic.weights",
    "visual_token_count": "llada_export.graphs.anyres",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'llada_export' has no attribute {name!r}")
