"""The AOTInductor backend: one compiled package (.pt2) per graph, for the export device.

Above 2 GB of weights (or ``--compiled-weights checkpoint``) the constants stay OUT of the
packages: every constant that is a checkpoint tensor is recorded as ``{constant fqn:
checkpoint key}`` in the manifest and loaded from the checkpoint at run time, once, shared
by all graphs; any other constant (a folded table) is saved beside the package in
``<graph>.constants.safetensors``. ``aoti_load_package`` segfaults on the lent H100/H200
machines (torch 2.11+cu130), so the CUDA path (and its CUDA-graph replay) is untested.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from .registry import Backend, WriteContext, register_backend


def write(ctx: WriteContext, graph: str, path: Path) -> list[Path]:
    from safetensors.torch import save_file

    from .torch_common import checkpoint_constants

    ep = ctx.options.get("inplace", {}).get(graph, ctx.programs[graph])  # the cached step writing its cache in place
    if ctx.weight_keys is None:
        _compile(ep, path, {})
        return [path]
    _compile(ep, path, {"aot_inductor.package_constants_in_so": False})
    mapping, extra = checkpoint_constants(ep, ctx.weight_keys)
    ctx.constants.setdefault(BACKEND.name, {})[graph] = mapping
    files = [path]
    if extra:
        side = path.with_suffix(".constants.safetensors")
        save_file({k: v.detach().cpu().contiguous() for k, v in extra.items()}, str(side))
        files.append(side)
    return files


def _compile(ep, path: Path, configs: dict) -> None:
    """``aoti_compile_and_package``, leaving Inductor's global config as it found it: torch fills
    ``aot_inductor.metadata`` in place and never resets it, and that dict is part of every later
    compile's cache key (an inductor compile cache saved after it would never be hit elsewhere)."""
    import copy

    import torch._inductor.config as inductor_config
    from torch._inductor import aoti_compile_and_package

    metadata = copy.deepcopy(inductor_config.aot_inductor.metadata)
    try:
        with warnings.catch_warnings():  # torch's own deprecation inside its pickling of the tree specs: noise
            warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
            aoti_compile_and_package(ep, package_path=str(path), inductor_configs=configs or None)
    finally:
        inductor_config.aot_inductor.metadata = metadata


def runner(path: Path, io, device: str = "cpu", constants=None, cuda_graph: bool | None = None):
    """``constants``: for packages built without their weights, {constant fqn: tensor on the device},
    loaded as user-managed (no copy), so graphs share one set of weights. ``cuda_graph``: replay the
    package's kernels from a CUDA graph (default off: the CUDA loader never ran on our GPUs)."""
    from torch._inductor import aoti_load_package

    from .torch_common import TorchRunner

    model = aoti_load_package(str(path))
    if constants is not None:
        wanted = model.get_constant_fqns()  # unused parameters (e.g. post_layernorm) are not constants
        missing = [k for k in wanted if k not in constants]
        if missing:
            raise RuntimeError(f"{path}: no weight for constants {missing[:5]}")
        model.load_constants({k: constants[k] for k in wanted}, check_full_update=True, user_managed=True)
    r = TorchRunner(model, io, device, cuda_graph)
    r.model = model
    return r


BACKEND = register_backend(Backend(
    name="aoti", folder="aoti", suffix=".pt2", write=write, runner=runner,
    description="AOTInductor packages (compiled for --device)", external_weights=True,
    priority={"cpu": 1, "cuda": 1}))
