"""Artifact writers: ONNX (torch.onnx dynamo exporter), AOTInductor packages, ExportedProgram archives
(the Inductor backend, compiled at load time), TensorRT plans."""

from __future__ import annotations

import importlib.util
import logging
import warnings
from pathlib import Path

import onnx
import torch

ONNX_SINGLE_FILE_LIMIT = 2 * 1024**3  # protobuf limit: larger models use external data


def program_bytes(ep: torch.export.ExportedProgram) -> int:
    return sum(t.numel() * t.element_size() for t in ep.state_dict.values()) + sum(
        t.numel() * t.element_size() for t in ep.constants.values() if isinstance(t, torch.Tensor))


def write_onnx(ep: torch.export.ExportedProgram, path: Path, inputs: tuple[str, ...], outputs: tuple[str, ...]) -> list[Path]:
    """Export to ONNX, check it, return the files written (the .onnx and its external data, if any)."""
    external = program_bytes(ep) >= ONNX_SINGLE_FILE_LIMIT
    # torch.onnx logs one warning per torchvision op it cannot register: noise for these graphs.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.onnx.export(ep, (), str(path), dynamo=True, input_names=list(inputs), output_names=list(outputs),
                          external_data=external, optimize=True, verbose=False)
    if external:
        onnx.checker.check_model(str(path))  # path form: handles external data and > 2 GB
    else:
        onnx.checker.check_model(onnx.load(str(path)))
    return sorted(p for p in path.parent.iterdir() if p.name == path.name or p.name.startswith(path.name + "."))


def checkpoint_constants(ep: torch.export.ExportedProgram, weight_keys: dict[int, str]
                         ) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """Split a program's constants into those that are checkpoint tensors ({constant fqn:
    checkpoint key}, found by data_ptr) and the rest ({fqn: tensor}, e.g. folded tables)."""
    consts = {**ep.state_dict, **{k: v for k, v in ep.constants.items() if isinstance(v, torch.Tensor)}}
    mapping, extra = {}, {}
    for fqn, t in consts.items():
        key = weight_keys.get(t.data_ptr()) if t.numel() else None
        if key is not None:
            mapping[fqn] = key
        else:
            extra[fqn] = t
    extra_bytes = sum(t.numel() * t.element_size() for t in extra.values())
    if extra_bytes > 64 * 1024**2:
        raise RuntimeError(f"{extra_bytes / 1e9:.2f} GB of graph constants are not checkpoint tensors; "
                           "refusing to duplicate the weights beside the graph")
    return mapping, extra


def write_aoti(ep: torch.export.ExportedProgram, path: Path, weight_keys: dict[int, str] | None = None
               ) -> tuple[list[Path], dict[str, str] | None]:
    """Compile an AOTInductor package (.pt2) for the program's device.

    With ``weight_keys`` (data_ptr of each checkpoint tensor -> its checkpoint key) the
    constants stay OUT of the package: every constant that is a checkpoint tensor is
    recorded as ``{constant fqn: checkpoint key}`` (returned) and loaded from the checkpoint
    at run time, shared by all graphs; any other constant (e.g. a folded table) is saved
    beside the package in ``<name>.constants.safetensors``.
    """
    from safetensors.torch import save_file
    from torch._inductor import aoti_compile_and_package

    if weight_keys is None:
        aoti_compile_and_package(ep, package_path=str(path))
        return [path], None
    aoti_compile_and_package(ep, package_path=str(path),
                             inductor_configs={"aot_inductor.package_constants_in_so": False})
    mapping, extra = checkpoint_constants(ep, weight_keys)
    files = [path]
    if extra:
        side = path.with_suffix(".constants.safetensors")
        save_file({k: v.detach().cpu().contiguous() for k, v in extra.items()}, str(side))
        files.append(side)
    return files, mapping


def write_program(ep: torch.export.ExportedProgram, path: Path, weight_keys: dict[int, str] | None = None
                  ) -> tuple[list[Path], dict[str, str] | None]:
    """Save the ExportedProgram itself (``torch.export.save``) for the Inductor backend, which
    compiles it with ``torch.compile`` when the engines are loaded.

    With ``weight_keys`` the checkpoint tensors are saved as meta tensors (shape and dtype
    only) and mapped to their checkpoint keys (returned), as for :func:`write_aoti`; the
    other constants (RoPE frequencies, folded tables) stay in the archive.
    """
    if weight_keys is None:
        torch.export.save(ep, str(path))
        return [path], None
    mapping, _ = checkpoint_constants(ep, weight_keys)
    tables = [ep.state_dict, ep.constants]
    saved = [dict(t) for t in tables]
    try:  # swap the mapped tensors for meta tensors while saving (no copy of the program)
        for table in tables:
            for fqn, t in list(table.items()):
                if fqn in mapping and isinstance(t, torch.Tensor):
                    m = torch.empty_like(t, device="meta")
                    table[fqn] = torch.nn.Parameter(m, requires_grad=False) if isinstance(t, torch.nn.Parameter) else m
        torch.export.save(ep, str(path))
    finally:
        for table, orig in zip(tables, saved):
            table.update(orig)
    return [path], mapping


def tensorrt_status() -> str | None:
    """None when TensorRT engines can be built here, else the reason they cannot."""
    if importlib.util.find_spec("tensorrt") is None:
        return "the 'tensorrt' Python package is not installed (pip install 'llada-export[gpu]' on a CUDA machine)"
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible"
    try:
        import tensorrt  # noqa: F401
    except Exception as e:  # a stub wheel without the builder libraries
        return f"tensorrt cannot be imported ({e})"
    return None


def write_tensorrt(onnx_path: Path, path: Path, shapes: dict[str, tuple[int, ...]]) -> list[Path]:
    """Build a TensorRT plan from an ONNX file with a static optimization profile.

    Uses Polygraphy's loaders (TensorRT 10/11 API): the network is parsed from file so
    external weights resolve; TensorRT 11 networks are strongly typed, so precision
    comes from the ONNX graph itself (norms and RoPE tables are fp32 there).
    """
    import tensorrt as trt
    from polygraphy.backend.trt import (CreateConfig, Profile, engine_from_network, network_from_onnx_path,
                                        save_engine)

    flags = [trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED] if hasattr(
        trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED") else []
    network = network_from_onnx_path(str(onnx_path), flags=flags)
    profile = Profile()
    for name, shape in shapes.items():
        profile.add(name, min=shape, opt=shape, max=shape)
    engine = engine_from_network(network, config=CreateConfig(profiles=[profile]))
    save_engine(engine, str(path))
    return [path]
