"""The ONNX Runtime backend: ONNX graphs (torch.onnx dynamo exporter) sharing one weights file.

Writer: ``torch.onnx.export(program, dynamo=True)``, checked with ``onnx.checker``; then
every initializer of at least 1 KiB moves into ``onnx/weights.bin``, stored once however
many graphs use it (stage A, stage B, the cache graphs and the unpruned graphs all hold
the same decoder weights), so the directory holds the weights once, not once per graph.

Runner: an ``InferenceSession`` (CPU, or CUDA with onnxruntime-gpu: IO binding keeps
tensors on the device, the KV cache is bound by pointer in and out); thread spinning
off, since sessions alternate.
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from pathlib import Path
from typing import Any

from .registry import Backend, BackendError, WriteContext, register_backend

ONNX_SINGLE_FILE_LIMIT = 2 * 1024**3  # protobuf limit: larger graphs are exported with external data
SHARED_WEIGHTS = "weights.bin"  # in the onnx/ folder, beside the graphs
MIN_EXTERNAL_BYTES = 1024
_DATA_FIELDS = ("raw_data", "float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data")


def program_bytes(ep) -> int:
    import torch

    return sum(t.numel() * t.element_size() for t in ep.state_dict.values()) + sum(
        t.numel() * t.element_size() for t in ep.constants.values() if isinstance(t, torch.Tensor))


def write(ctx: WriteContext, graph: str, path: Path) -> list[Path]:
    import onnx
    import torch

    from ..quant.fp8 import ONNX_TRANSLATIONS
    from .torch_caches import install

    install()  # onnxscript's torchlib table once per process, not once per graph (torch_caches.py)
    ep, io = ctx.programs[graph], ctx.io[graph]
    external = program_bytes(ep) >= ONNX_SINGLE_FILE_LIMIT
    # torch.onnx logs one warning per torchvision op it cannot register: noise for these graphs.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(ep, (), str(path), dynamo=True, input_names=io.input_names, output_names=io.output_names,
                          external_data=external, optimize=True, verbose=False,
                          custom_translation_table=ONNX_TRANSLATIONS)  # FP8 linears -> Q/DQ + MatMul
    onnx.checker.check_model(str(path))  # path form: handles external data and > 2 GB
    weights = share_weights(ctx, path)
    onnx.checker.check_model(str(path))
    return [path, weights]


def share_weights(ctx: WriteContext, path: Path) -> Path:
    """Move ``path``'s initializers of >= 1 KiB into the directory's one weights file, each distinct
    tensor stored once (by content), one tensor in memory at a time; returns that file."""
    import onnx

    state = ctx.shared.setdefault("onnx_weights", {"index": {}, "size": 0})
    shared = path.parent / SHARED_WEIGHTS
    model = onnx.load(str(path), load_external_data=False)
    own_files: set[Path] = set()
    with open(shared, "ab") as out:
        for t in model.graph.initializer:
            data, src = _tensor_bytes(t, path.parent)
            if src is not None:
                own_files.add(src)
            if len(data) < MIN_EXTERNAL_BYTES:
                if src is not None:  # small tensor exported externally: keep it inline
                    del t.external_data[:]
                    t.data_location = onnx.TensorProto.DEFAULT
                    t.raw_data = data
                continue
            key = hashlib.blake2b(data, digest_size=20).digest()
            if key not in state["index"]:
                out.write(data)
                state["index"][key] = (state["size"], len(data))
                state["size"] += len(data)
            offset, length = state["index"][key]
            for f in _DATA_FIELDS:
                t.ClearField(f)
            del t.external_data[:]
            for k, v in (("location", SHARED_WEIGHTS), ("offset", str(offset)), ("length", str(length))):
                entry = t.external_data.add()
                entry.key, entry.value = k, v
            t.data_location = onnx.TensorProto.EXTERNAL
    onnx.save_model(model, str(path))
    for f in own_files:
        if f != shared and f.exists():
            f.unlink()
    return shared


def _tensor_bytes(t, folder: Path) -> tuple[bytes, Path | None]:
    """An initializer's raw bytes, from the graph or from its external data file."""
    import onnx
    from onnx import numpy_helper

    if t.data_location != onnx.TensorProto.EXTERNAL:
        return (t.raw_data if t.HasField("raw_data") else numpy_helper.to_array(t).tobytes()), None
    info = {e.key: e.value for e in t.external_data}
    src = folder / info["location"]
    with open(src, "rb") as f:
        f.seek(int(info.get("offset", 0)))
        return f.read(int(info["length"])) if "length" in info else f.read(), src


class OrtRunner:
    def __init__(self, path: Path, io, device: str = "cpu", constants=None, cuda_graph=None,
                 threads: int | None = None):
        import onnxruntime as ort
        import torch

        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = so.inter_op_num_threads = threads
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.add_session_config_entry("session.inter_op.allow_spinning", "0")
        self.device = torch.device(device)
        providers = ["CUDAExecutionProvider"] if self.device.type == "cuda" else ["CPUExecutionProvider"]
        if self.device.type == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
            raise RuntimeError("onnxruntime has no CUDA execution provider here; install onnxruntime-gpu")
        try:
            self.session = ort.InferenceSession(str(path), so, providers=providers)
        except Exception as e:  # onnxruntime's own exception types
            if self.device.type == "cpu" and "bfloat16" in str(e):
                raise BackendError(
                    f"{path.name}: ONNX Runtime's CPU provider has no bfloat16 kernel for this graph; run these "
                    "engines on a GPU (onnxruntime-gpu, --device cuda), or export --dtype float32 or float16 for "
                    "the CPU") from None
            raise
        self.io, self.inputs, self.outputs = io, io.input_names, io.output_names
        self._state_out: dict[str, Any] = {}

    def run(self, feeds: dict[str, Any]) -> dict[str, Any]:
        import numpy as np
        import torch

        if self.device.type == "cuda":
            return self._run_bound(feeds)
        arrays = {k: np.ascontiguousarray(feeds[k].detach().cpu().numpy()) for k in self.inputs}
        res = self.session.run(self.outputs, arrays)
        return {k: torch.from_numpy(v) for k, v in zip(self.outputs, res)}

    def _run_bound(self, feeds: dict[str, Any]) -> dict[str, Any]:
        """CUDA EP with IO binding: inputs by pointer; state outputs (the KV cache) into a buffer kept
        by the runner, so the cache never leaves the device. Written against the documented API;
        not run here (no onnxruntime-gpu on the lent GPU machines)."""
        import torch

        binding = self.session.io_binding()
        idx = self.device.index or 0
        for k in self.inputs:
            t = feeds[k].contiguous()
            binding.bind_input(k, "cuda", idx, _np_dtype(t.dtype), tuple(t.shape), t.data_ptr())
        for spec in self.io.outputs:
            if spec.state:
                buf = self._state_out.get(spec.name)
                if buf is None:
                    buf = self._state_out[spec.name] = torch.empty(spec.shape, dtype=_torch_dtype(spec.dtype),
                                                                   device=self.device)
                binding.bind_output(spec.name, "cuda", idx, _np_dtype(buf.dtype), tuple(buf.shape), buf.data_ptr())
            else:
                binding.bind_output(spec.name, "cuda", idx)
        self.session.run_with_iobinding(binding)
        outs = dict(zip(self.outputs, binding.get_outputs()))
        return {k: self._state_out[k] if k in self._state_out else torch.from_dlpack(v.to_dlpack())
                for k, v in outs.items()}


def _np_dtype(dtype):
    import numpy as np
    import torch

    return {torch.float32: np.float32, torch.int64: np.int64, torch.bool: np.bool_, torch.float16: np.float16}[dtype]


def _torch_dtype(name: str):
    import torch

    return getattr(torch, name)


_ONNX_DTYPES = {1: "float32", 7: "int64", 9: "bool", 10: "float16", 16: "bfloat16"}  # TensorProto elem types


def check_artifact(path: Path, graph: str, io, bucket) -> str | None:
    """What in the ONNX graph differs from the manifest's I/O (names, static shapes, dtypes) and, for
    stage A, from its static top-k; the graph is read without its weights (they are external)."""
    import itertools

    import onnx
    from onnx import numpy_helper

    def fmt(t) -> str:
        return "nothing" if t is None else f"{t[0]} {list(t[1])} {t[2]}"

    model = onnx.load(str(path), load_external_data=False)
    for kind, have, want in (("input", model.graph.input, io.inputs), ("output", model.graph.output, io.outputs)):
        got = [(v.name, tuple(d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim),
                _ONNX_DTYPES.get(v.type.tensor_type.elem_type, "?")) for v in have]
        expect = [(t.name, tuple(t.shape), t.dtype) for t in want]
        for g, e in itertools.zip_longest(got, expect):
            if g != e:
                return f"its {kind} is {fmt(g)}, the manifest says {fmt(e)}"
    if graph == "stage_a" and bucket.max_visual_tokens:
        consts = {t.name: t for t in model.graph.initializer}
        consts |= {n.output[0]: n.attribute[0].t for n in model.graph.node if n.op_type == "Constant" and n.attribute}
        ks = sorted({int(numpy_helper.to_array(consts[n.input[1]]).reshape(-1)[0])
                     for n in model.graph.node if n.op_type == "TopK" and len(n.input) > 1 and n.input[1] in consts})
        if ks != [bucket.k_static]:
            return (f"its static top-k keeps {ks[0] if len(ks) == 1 else ks or 'no constant number of'} visual "
                    f"tokens, the manifest says bucket.k_static {bucket.k_static}")
    return None


def polygraphy_runner(path: Path, name: str):
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

    return OnnxrtRunner(SessionFromOnnx(str(path), providers=["CPUExecutionProvider"]), name=name)


BACKEND = register_backend(Backend(
    name="onnxruntime", folder="onnx", suffix=".onnx", write=write, runner=OrtRunner,
    description="ONNX graphs for ONNX Runtime (CPU; CUDA with onnxruntime-gpu), one shared weights file",
    priority={"cpu": 0, "cuda": 3}, session_threads=True, polygraphy_runner=polygraphy_runner, polygraphy_cli="--onnxrt",
    check_artifact=check_artifact))
