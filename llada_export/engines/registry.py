"""Backends as data: one :class:`Backend` object per backend, one file each, registered here.

A backend says where its artifacts go (``folder``/<graph><suffix>), how to write one from a
``torch.export`` program (``write``), how to run one (``runner``), and what it can do
(CUDA-graph replay, needs a GPU, weights left in the checkpoint, which device it prefers).
The exporter, the runtime, ``llada-compare`` and the CLIs read this registry and never
name a backend. Adding one is one :func:`register_backend` call in its own module,
listed in :data:`BUILTIN`.

This module is import-light (no torch, no onnxruntime): the CLIs read the names for
``--help``; the backend modules import their heavy libraries inside their functions.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

BUILTIN = ("onnxruntime", "aoti", "inductor", "tensorrt")  # modules of this package, one backend each


class BackendError(ValueError):
    """An unknown backend, or one that cannot be used here."""


class Runner(Protocol):
    """One graph, loaded: named torch tensors in, named torch tensors out.

    Inputs marked ``state`` in the graph's I/O (the KV cache) are handed over by reference;
    outputs marked ``state`` may be returned without a copy (valid until the runner's next
    call), so a cache never leaves the device between steps."""

    inputs: list[str]
    outputs: list[str]

    def run(self, feeds: dict[str, Any]) -> dict[str, Any]: ...


@dataclass
class WriteContext:
    """What a writer gets besides the program: where to write, and the shared state of the build."""

    root: Path  # the engines directory being written
    device: str
    dtype: str
    weight_keys: dict[int, str] | None = None  # data_ptr -> checkpoint key (compiled weights left out)
    programs: dict[str, Any] = field(default_factory=dict)  # graph -> ExportedProgram
    io: dict[str, Any] = field(default_factory=dict)  # graph -> GraphIO
    artifacts: dict[str, dict[str, str]] = field(default_factory=dict)  # backend -> graph -> relative path
    constants: dict[str, dict[str, dict[str, str]]] = field(default_factory=dict)  # backend -> graph -> {fqn: key}
    files: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    shared: dict[str, Any] = field(default_factory=dict)  # per-backend build state (e.g. ONNX shared weights)
    weights: dict[str, Any] = field(default_factory=dict)  # checkpoint key -> tensor (the model's state)
    options: dict[str, Any] = field(default_factory=dict)  # export options a backend reads (compile_cache)
    compile_cache: dict[str, str] = field(default_factory=dict)  # backend -> saved compiler artifacts
    precompiled: dict[str, str] = field(default_factory=dict)  # backend -> index of its precompiled kernels

    def path(self, backend: "Backend", graph: str) -> Path:
        d = self.root / backend.folder
        d.mkdir(exist_ok=True)
        return d / f"{graph}{backend.suffix}"

    def ensure(self, backend: str, graph: str) -> Path:
        """The artifact of ``graph`` for ``backend``, written now if it is not yet (TensorRT builds
        from the ONNX file)."""
        if graph not in self.artifacts.get(backend, {}):
            write_artifact(self, get_backend(backend), graph)
        return self.root / self.artifacts[backend][graph]


def write_artifact(ctx: WriteContext, backend: "Backend", graph: str) -> None:
    path = ctx.path(backend, graph)
    files = backend.write(ctx, graph, path)
    ctx.files += files
    ctx.artifacts.setdefault(backend.name, {})[graph] = str(path.relative_to(ctx.root))


@dataclass(frozen=True)
class Backend:
    name: str
    folder: str  # artifact folder inside the engines directory
    suffix: str  # artifact file suffix
    write: Callable[[WriteContext, str, Path], list[Path]]  # (ctx, graph, path) -> files written
    runner: Callable[..., Runner]  # (path, io: GraphIO, device, *, constants=None, cuda_graph=None)
    description: str
    devices: tuple[str, ...] = ("cpu", "cuda")
    cuda_graphs: bool = False  # replays graphs from CUDA graphs on CUDA by default
    needs_gpu: bool = False
    session_threads: bool = False  # the runner takes threads= (its own CPU thread pool, beside torch's)
    external_weights: bool = False  # artifacts can leave their weights in the checkpoint
    priority: dict[str, int] = field(default_factory=dict)  # device type -> rank when Pipeline.load picks one
    available: Callable[[], str | None] = lambda: None  # None, or why it cannot build / run here
    polygraphy_runner: Callable[[Path, str], Any] | None = None  # native Polygraphy runner for llada-compare
    polygraphy_cli: str | None = None  # "polygraphy run FILE <flag>" repeats a comparison by hand
    finalize: Callable[[WriteContext], list[Path]] | None = None  # after every graph is written (compile cache)
    load_cache: Callable[[Path, str], str] | None = None  # (blob, device), before the runners are made
    # (artifact, graph, GraphIO, Bucket) -> what in the artifact differs from the manifest, or None; read
    # without the weights, at every Pipeline.load (check_artifacts below)
    check_artifact: Callable[[Path, str, Any, Any], str | None] | None = None


BACKENDS: dict[str, Backend] = {}


def register_backend(backend: Backend) -> Backend:
    """Add a backend (a later registration of the same name replaces it)."""
    BACKENDS[backend.name] = backend
    return backend


def unregister_backend(name: str) -> None:
    BACKENDS.pop(name, None)


def load_builtin() -> dict[str, Backend]:
    for mod in BUILTIN:
        if mod not in BACKENDS:
            importlib.import_module(f"{__package__}.{mod}")
    return BACKENDS


def backend_names() -> list[str]:
    """Every registered backend's name (the built-in ones first)."""
    return list(load_builtin())


def get_backend(name: str) -> Backend:
    backends = load_builtin()
    if name not in backends:
        raise BackendError(f"unknown backend {name!r}; choose from {', '.join(backends)}")
    return backends[name]


def pick_backend(built: list[str], device_type: str) -> str | None:
    """The backend ``Pipeline.load`` uses when none is named: the best-ranked built one that runs here."""
    ranked = [(get_backend(b).priority.get(device_type, 99), i, b) for i, b in enumerate(built)
              if b in load_builtin() and device_type in get_backend(b).devices and get_backend(b).available() is None]
    return min(ranked)[2] if ranked else None


def check_artifacts(manifest, root: Path, backend: str) -> None:
    """The artifacts of ``backend`` in ``root`` must be what ``manifest`` describes (their I/O shapes and
    dtypes, stage A's static top-k; every batch size's), read from the graph files without their weights; ManifestError
    otherwise. Backends without a ``check_artifact`` are not read (the manifest's hashes still hold)."""
    from ..contract.graphset import split_key
    from ..contract.manifest import ManifestError

    check_precompiled(manifest, root, backend)
    check = get_backend(backend).check_artifact
    if check is None:
        return
    for key, rel in manifest.artifacts.get(backend, {}).items():  # every batch size's graphs, each at its size
        name, bucket = split_key(key)[0], manifest.bucket_at(manifest.size_of(key))
        if problem := check(Path(root) / rel, name, manifest.graphs[key], bucket):
            raise ManifestError(f"{Path(root) / rel}: {problem} (edited manifest or replaced graph; re-run "
                                "llada-export)")


def check_precompiled(manifest, root: Path, backend: str) -> None:
    """The index of ``backend``'s precompiled kernels (``manifest.precompiled``; its SHA-256 is checked with
    the file table) may name only graphs of the manifest and files of its file table; ManifestError otherwise."""
    import json

    from ..contract.manifest import ManifestError

    rel = (manifest.precompiled or {}).get(backend)
    if rel is None:
        return
    index = Path(root) / rel
    folder = str(Path(rel).parent)
    for key, entry in json.loads(index.read_text()).get("graphs", {}).items():
        files = [entry.get("artifact"), entry.get("constants")]
        if key not in manifest.artifacts.get(backend, {}) or any(
                f is not None and f"{folder}/{f}" not in manifest.files for f in files):
            raise ManifestError(f"{index}: its entry {key} names a graph or a file the manifest does not list "
                                "(edited index or manifest; re-run llada-export)")
