"""The Inductor backend: the torch.export programs themselves (``programs/*.pt2``), compiled by
``torch.compile`` when the engines are loaded, then replayed from CUDA graphs on CUDA.

The same code generator as AOTInductor, for machines whose AOTInductor loader fails (the
lent H200s). With the weights left in the checkpoint the archives hold meta tensors for
them (shape and dtype only), mapped to checkpoint keys in the manifest.

Compile cache: with ``--compile-cache`` (the default on CUDA with ``--no-precompile``) the export
compiles every graph once, exactly as a load does, and saves what the compiler produced
(``torch.compiler.save_cache_artifacts``: Inductor's graph entries with their Triton
kernels, AOTAutograd's entries) as ``programs/compile_cache.bin``, with the versions it
holds for in ``compile_cache.json``. ``Pipeline.load`` on a machine with the same torch,
Triton and GPU loads it first (``load_cache_artifacts``), so compiling the graphs becomes
cache hits; on another machine it is ignored and the graphs compile as without it. Dynamo
still traces each graph at load (it has no cache). On a CPU the blob holds no compiled C++
kernels, so the gain there is small.

Precompiled kernels: with ``--precompile`` (the default on CUDA) the export also compiles each
program's own graph with ``torch._inductor.standalone_compile`` and saves the kernels per graph
(``engines/precompiled.py``); the runner then loads them without Dynamo or ``torch.compile`` and
falls back to the path above, with one log line, where they are absent or were built elsewhere.
"""

from __future__ import annotations

from pathlib import Path

from .registry import Backend, WriteContext, register_backend
from .torch_caches import install as install_torch_caches


def write(ctx: WriteContext, graph: str, path: Path) -> list[Path]:
    import torch

    from .torch_common import checkpoint_constants

    ep = ctx.options.get("inplace", {}).get(graph, ctx.programs[graph])  # the cached step writing its cache in place
    if ctx.weight_keys is None:
        save_program(ep, path)
        return [path]
    mapping, _ = checkpoint_constants(ep, ctx.weight_keys)
    ctx.constants.setdefault(BACKEND.name, {})[graph] = mapping
    tables = [ep.state_dict, ep.constants]
    saved = [dict(t) for t in tables]
    try:  # swap the mapped tensors for meta tensors while saving (no copy of the program)
        for table in tables:
            for fqn, t in list(table.items()):
                if fqn in mapping and isinstance(t, torch.Tensor):
                    m = torch.empty_like(t, device="meta")
                    table[fqn] = torch.nn.Parameter(m, requires_grad=False) if isinstance(t, torch.nn.Parameter) else m
        save_program(ep, path)
    finally:
        for table, orig in zip(tables, saved):
            table.update(orig)
    return [path]


def save_program(ep, path: Path) -> None:
    """``torch.export.save`` without the program's example inputs: torch keeps the ones it was traced
    with and saves them in the archive, and ``torch.export.load`` reads them back onto their device.
    For the cached step they hold the example KV cache (full size, pruned: 0.77 GB per request, on the
    GPU at load); nothing here uses them once the program is saved."""
    import torch

    example, ep.example_inputs = ep.example_inputs, None
    try:
        torch.export.save(ep, str(path))
    finally:
        ep.example_inputs = example


CACHE_BLOB, CACHE_INFO = "compile_cache.bin", "compile_cache.json"


def cache_key(device: str) -> dict:
    """What a saved compile cache is valid for (a mismatch would be a silent recompile). Inductor's
    C++ kernels for the CPU specialise on ``torch.get_num_threads()``, so there the count is part of it."""
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    key = {"torch": torch.__version__, "triton": triton_version, "gpu": gpu}
    if not device.startswith("cuda"):
        key["cpu_threads"] = torch.get_num_threads()
    return key


def example_feeds(ctx: WriteContext, graph: str) -> dict:
    """Blank inputs of ``graph`` (a key: stage_b@b2 at another batch size) on the export device."""
    from ..contract.graphset import GRAPHS, example_value, split_key

    io, extra = ctx.io[graph], {"device": ctx.device, **ctx.options["example_fill"]}
    return {t.name: example_value(t, spec, extra) for t, spec in zip(io.inputs, GRAPHS[split_key(graph)[0]].inputs)}


def finalize(ctx: WriteContext) -> list[Path]:
    """``precompile``: Inductor's kernels of every graph, saved per graph (``engines/precompiled.py``).
    ``compile_cache``: compile every graph as ``Pipeline.load`` will (the saved archive, the weights swapped
    in), one call each on blank inputs, and save the compiler's cache artifacts beside the programs."""
    files = precompile_all(ctx) if ctx.options.get("precompile") else []
    return files + save_compile_cache(ctx) if ctx.options.get("compile_cache") else files


def precompile_all(ctx: WriteContext) -> list[Path]:
    """Each graph's program (the in-memory one, with its weights) compiled by Inductor and saved; a graph
    that cannot be saved so is left to ``torch.compile`` at load, with a note."""
    from . import precompiled

    entries, files = {}, []
    for graph, rel in ctx.artifacts.get(BACKEND.name, {}).items():
        ep = ctx.options.get("inplace", {}).get(graph, ctx.programs[graph])  # what write() saved
        out = (ctx.root / rel).with_name(f"{graph}{precompiled.SUFFIX}")
        # the program's own example inputs where it kept them (no second example KV cache on the device)
        kept = ep.example_inputs
        feeds = list(kept[0]) if kept is not None and not kept[1] else list(example_feeds(ctx, graph).values())
        try:
            entries[graph], written = precompiled.precompile(
                ep, feeds, out, ctx.constants.get(BACKEND.name, {}).get(graph))
        except (RuntimeError, ValueError, AssertionError) as e:
            why = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            ctx.notes.append(f"{BACKEND.name}: {graph} not precompiled ({why}); it compiles with torch.compile at load")
            continue
        files += written
        if patches := entries[graph].get("config_patches"):
            ctx.notes.append(f"{BACKEND.name}: {graph}'s kernels compiled with {patches}: autotuning them at compile "
                             "time ran out of GPU memory (its random copies of the inputs, the KV cache among them); "
                             "they are tuned at their first run instead, in the loading process's warm-up (minutes "
                             "for a large batch: 357 s for unpruned + cache at B = 16 on an H100)")
    if entries:
        files.append(precompiled.write_index(ctx.root / BACKEND.folder, ctx.device, entries))
        ctx.precompiled[BACKEND.name] = f"{BACKEND.folder}/{precompiled.INDEX}"
        ctx.notes.append(f"{BACKEND.name}: Inductor's kernels of {len(entries)} graphs saved at export "
                         f"({ctx.precompiled[BACKEND.name]}): Pipeline.load runs them without Dynamo")
    return files


def save_compile_cache(ctx: WriteContext) -> list[Path]:
    """Compile every graph and save exactly the artifacts of these graphs. The recording is fresh: torch's
    record is per process and incremental (an artifact recorded before, e.g. by an earlier export's vision
    graph, is left out of later saves, and ``load_cache_artifacts`` keeps only the last save's artifacts of
    each kind), so a second export in one process would save a cache lacking the graphs it shares with the
    first (unpruned engines after pruned ones: the vision graph recompiled at every load)."""
    import json

    import torch

    with fresh_cache_record():
        for graph, rel in ctx.artifacts.get(BACKEND.name, {}).items():
            mapping = ctx.constants.get(BACKEND.name, {}).get(graph)
            constants = {fqn: ctx.weights[key] for fqn, key in mapping.items()} if mapping else None
            r = runner(ctx.root / rel, ctx.io[graph], ctx.device, constants=constants, cuda_graph=False)
            with torch.no_grad():
                r.run(example_feeds(ctx, graph))
        saved = torch.compiler.save_cache_artifacts()
    if saved is None:
        ctx.notes.append("the compiler produced no cache artifacts: Pipeline.load will compile the graphs")
        return []
    blob, _info = saved
    folder = ctx.root / BACKEND.folder
    (folder / CACHE_BLOB).write_bytes(blob)
    (folder / CACHE_INFO).write_text(json.dumps(cache_key(ctx.device), indent=2) + "\n")
    ctx.compile_cache[BACKEND.name] = f"{BACKEND.folder}/{CACHE_BLOB}"
    return [folder / CACHE_BLOB, folder / CACHE_INFO]


def fresh_cache_record():
    """A context in which torch records compiler cache artifacts afresh (none seen before in this process);
    the process's own record comes back after it. Where torch has no such context (it is private API), the
    process's record is cleared instead."""
    import contextlib

    from torch.compiler._cache import CacheArtifactManager

    fresh = getattr(CacheArtifactManager, "with_fresh_cache", None)
    if fresh is not None:
        return fresh()
    CacheArtifactManager.clear()
    return contextlib.nullcontext()


def load_cache(blob: Path, device: str) -> str:
    """Load a saved compile cache if it was made for this machine's torch, Triton and GPU (and on the
    CPU, torch's thread count); says what it did."""
    import json

    import torch

    saved = json.loads(blob.with_name(CACHE_INFO).read_text())
    here = cache_key(device)
    if saved != here:
        diff = ", ".join(f"{k} {saved.get(k)} (here {here.get(k)})" for k in {**saved, **here} if saved.get(k) != here.get(k))
        return f"ignored: made for another machine ({diff}); the graphs compile from scratch"
    torch.compiler.load_cache_artifacts(blob.read_bytes())
    return "loaded"


def runner(path: Path, io, device: str = "cpu", constants=None, cuda_graph: bool | None = None,
           compile: bool = True, precompiled: Path | None = None):
    """An ExportedProgram archive compiled with ``torch.compile`` (static shapes, whole graph); the
    compilation happens at the first call, which ``Pipeline.warmup`` makes at load time.
    ``constants``: {fqn: tensor} for archives saved with their checkpoint weights left out.
    ``cuda_graph`` (default: on for CUDA, measured on the H200): replay from a CUDA graph.
    ``compile=False``: the program's own (eager) kernels, captured in the CUDA graph; no compile time.
    ``precompiled``: the index of the kernels saved at export (``--precompile``): where it has this graph's,
    built for this machine, they run as they are (no Dynamo, no compile); else the path above, logged."""
    import torch

    from ..quant import fp8  # noqa: F401  registers llada_fp8::linear, which FP8 programs hold
    from .torch_common import TorchRunner

    status = None
    if compile and precompiled is None and path.parent not in _SAID_NONE:
        _SAID_NONE.add(path.parent)
        from .precompiled import log

        log.info("%s: no precompiled kernels (export with --precompile): the graphs compile with torch.compile",
                 path.parent)
    if compile and precompiled is not None:
        fn, status = load_precompiled(precompiled, path, device, constants)
        if fn is not None:
            r = TorchRunner(fn, io, device, cuda_graph, graphs_by_default=True)
            r.module, r.precompiled = None, status
            return r
    install_torch_caches()  # the schema's type hints resolved once per process, not per node (torch_caches.py)
    ep = torch.export.load(str(path))
    for table in (ep.state_dict, ep.constants):
        for fqn, t in list(table.items()):
            if not isinstance(t, torch.Tensor) or t.device.type != "meta":
                continue
            if constants is None or fqn not in constants:
                raise RuntimeError(f"{path}: the archive holds no weight for {fqn!r} and none was given "
                                   "(engines exported with their weights in the checkpoint)")
            w = constants[fqn]
            table[fqn] = torch.nn.Parameter(w, requires_grad=False) if isinstance(t, torch.nn.Parameter) else w
    module = ep.module()
    fn = torch.compile(module, dynamic=False, fullgraph=True) if compile else module
    r = TorchRunner(fn, io, device, cuda_graph, graphs_by_default=True)
    r.module, r.precompiled = module, status
    return r


_SAID_NONE: set[Path] = set()  # folders whose "no precompiled kernels" was logged


def load_precompiled(index: Path, path: Path, device: str, constants) -> tuple:
    """(fn, "loaded") from the saved kernels of the archive ``path``'s graph, or (None, why not), logged."""
    from . import precompiled

    key = path.name.split(".", 1)[0]  # the graph key (stage_b@b2)
    try:
        fn, status = precompiled.load(index, key, path, device, constants)
    except Exception as e:  # noqa: BLE001  a damaged or foreign artifact: the archive still compiles
        fn, status = None, f"loading them failed ({type(e).__name__}: {str(e).strip()[:200]})"
    if fn is None and not status.startswith("built for another machine"):  # that one is logged once per index
        precompiled.log.warning("%s: precompiled kernels not used: %s; compiling with torch.compile", path, status)
    return fn, status


_SCALARS = {"FLOAT": "float32", "LONG": "int64", "BOOL": "bool", "HALF": "float16", "BFLOAT16": "bfloat16"}


def check_artifact(path: Path, graph: str, io, bucket) -> str | None:
    """What in the archive's program differs from the manifest's I/O (shapes and dtypes of the user
    inputs and outputs, in order), read from its serialized graph (``models/model.json``), no weights."""
    import itertools
    import json
    import zipfile

    from torch._export.serde.schema import ScalarType

    with zipfile.ZipFile(path) as z:
        name = next((n for n in z.namelist() if n.endswith("/models/model.json")), None)
        if name is None:
            return "it holds no serialized program (models/model.json)"
        gm = json.loads(z.read(name))["graph_module"]
    values, sig = gm["graph"]["tensor_values"], gm["signature"]

    def described(spec: dict, kind: str) -> tuple | None:
        arg = spec.get(kind, {}).get("arg", {}).get("as_tensor")
        if arg is None:
            return None
        v = values[arg["name"]]
        dims = tuple(d.get("as_int", -1) for d in v["sizes"])
        return dims, _SCALARS.get(ScalarType(v["dtype"]).name, "?")

    for kind, specs, want in (("input", sig["input_specs"], io.inputs), ("output", sig["output_specs"], io.outputs)):
        got = [d for s in specs if (d := described(s, f"user_{kind}")) is not None]
        for g, t in itertools.zip_longest(got, want):
            if t is None or g != (tuple(t.shape), t.dtype):
                return (f"its {kind}s are {[(list(x[0]), x[1]) for x in got]}, the manifest says "
                        f"{[(list(x.shape), x.dtype) for x in want]}")
    return None


BACKEND = register_backend(Backend(
    name="inductor", folder="programs", suffix=".pt2", write=write, runner=runner,
    description="torch.export programs compiled with torch.compile when loaded, CUDA-graph replay",
    cuda_graphs=True, external_weights=True, priority={"cpu": 2, "cuda": 2}, finalize=finalize,
    load_cache=load_cache, check_artifact=check_artifact))
