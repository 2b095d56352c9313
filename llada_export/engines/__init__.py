"""Backends: one module each (``onnxruntime``, ``aoti``, ``inductor``, ``tensorrt``), registered in
:mod:`.registry`, which is import-light (the CLIs read the names for ``--help``)."""

from .registry import BACKENDS, Backend, BackendError, backend_names, get_backend, register_backend

__all__ = ["BACKENDS", "Backend", "BackendError", "backend_names", "get_backend", "register_backend"]
