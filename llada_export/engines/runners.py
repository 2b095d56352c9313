"""Backend runners with one small interface: named torch tensors in, named torch tensors out.

- :class:`OrtRunner`: ONNX Runtime (CPU, or CUDA with onnxruntime-gpu and IO binding so
  tensors stay on the device); thread spinning off, since sessions alternate.
- :class:`AotiRunner`: an AOTInductor package (.pt2) on CPU or CUDA.
- :class:`InductorRunner`: an ExportedProgram archive compiled with ``torch.compile``
  (Inductor, the code generator behind AOTInductor) when it is loaded; for machines where
  AOTInductor packages cannot be loaded.
- :class:`CudaGraphCall`: replays a captured CUDA graph of a torch runner (static shapes:
  inputs are copied into the captured buffers, no launch overhead, no allocations).
- :class:`TrtRunner`: a TensorRT plan, ``set_tensor_address`` + ``execute_async_v3`` on
  torch CUDA tensors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np
import torch


class Runner(Protocol):
    inputs: list[str]
    outputs: list[str]
    device: torch.device

    def run(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...


class OrtRunner:
    def __init__(self, path: Path, inputs: list[str], outputs: list[str], device: str = "cpu"):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.add_session_config_entry("session.inter_op.allow_spinning", "0")
        self.device = torch.device(device)
        providers = ["CUDAExecutionProvider"] if self.device.type == "cuda" else ["CPUExecutionProvider"]
        if self.device.type == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
            raise RuntimeError("onnxruntime has no CUDA execution provider here; install onnxruntime-gpu")
        self.session = ort.InferenceSession(str(path), so, providers=providers)
        self.inputs, self.outputs = inputs, outputs

    def run(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.device.type == "cuda":
            return self._run_bound(feeds)
        arrays = {k: np.ascontiguousarray(feeds[k].detach().cpu().numpy()) for k in self.inputs}
        res = self.session.run(self.outputs, arrays)
        return {k: torch.from_numpy(v) for k, v in zip(self.outputs, res)}

    def _run_bound(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        binding = self.session.io_binding()
        for k in self.inputs:
            t = feeds[k].contiguous()
            binding.bind_input(k, "cuda", t.device.index or 0, _np_dtype(t.dtype), tuple(t.shape), t.data_ptr())
        for k in self.outputs:
            binding.bind_output(k, "cuda", self.device.index or 0)
        self.session.run_with_iobinding(binding)
        return {k: torch.from_dlpack(v.to_dlpack()) if hasattr(v, "to_dlpack") else torch.from_numpy(v.numpy())
                for k, v in zip(self.outputs, binding.get_outputs())}


def _np_dtype(dtype: torch.dtype):
    return {torch.float32: np.float32, torch.int64: np.int64, torch.bool: np.bool_}[dtype]


class CudaGraphCall:
    """``fn(*tensors) -> tensor or tuple`` captured once in a CUDA graph and replayed.

    Shapes must be static (they are: every graph serves one bucket). Each call copies its
    inputs into the buffers the graph was captured with, replays it and returns clones of
    the outputs (the captured output buffers are overwritten by the next replay)."""

    def __init__(self, fn):
        self.fn, self.graph = fn, None
        self.static_in: list[torch.Tensor] = []
        self.static_out: list[torch.Tensor] = []

    def __call__(self, *args: torch.Tensor) -> list[torch.Tensor]:
        if self.graph is None:
            self.static_in = [a.clone() for a in args]
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm up outside the capture (allocator, lazy init)
                for _ in range(2):
                    self.fn(*self.static_in)
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                out = self.fn(*self.static_in)
            self.static_out = list(out) if isinstance(out, (list, tuple)) else [out]
        for buf, a in zip(self.static_in, args):
            buf.copy_(a)
        self.graph.replay()
        return [o.clone() for o in self.static_out]


class _TorchRunner:
    """Shared by the AOTInductor and Inductor runners: named feeds -> positional call."""

    inputs: list[str]
    outputs: list[str]
    device: torch.device
    call = None

    graphs_by_default = False  # CUDA-graph replay when the caller does not say (on CUDA only)

    def _wrap(self, fn, cuda_graph: bool | None) -> None:
        if cuda_graph is None:
            cuda_graph = self.graphs_by_default and self.device.type == "cuda"
        self.call = CudaGraphCall(fn) if cuda_graph else fn

    def run(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        args = [feeds[k].to(self.device) for k in self.inputs]
        res = self.call(*args)
        res = res if isinstance(res, (list, tuple)) else [res]
        return dict(zip(self.outputs, res))


class AotiRunner(_TorchRunner):
    """``constants``: for packages built without their weights, {constant fqn: tensor on the
    device}; loaded as user-managed (no copy), so graphs share one set of weights.
    ``cuda_graph``: replay the package's kernels from a CUDA graph (default off: AOTInductor
    packages could not be loaded on any CUDA machine we had, so that path is untested)."""

    def __init__(self, path: Path, inputs: list[str], outputs: list[str], device: str = "cpu",
                 constants: dict[str, torch.Tensor] | None = None, cuda_graph: bool | None = None):
        from torch._inductor import aoti_load_package

        self.device = torch.device(device)
        self.model = aoti_load_package(str(path))
        if constants is not None:
            wanted = self.model.get_constant_fqns()  # unused parameters (e.g. post_layernorm) are not constants
            missing = [k for k in wanted if k not in constants]
            if missing:
                raise RuntimeError(f"{path}: no weight for constants {missing[:5]}")
            self.model.load_constants({k: constants[k] for k in wanted}, check_full_update=True, user_managed=True)
        self.inputs, self.outputs = inputs, outputs
        self._wrap(self.model, cuda_graph)


class InductorRunner(_TorchRunner):
    """An ExportedProgram archive (``torch.export.save``) compiled with ``torch.compile``
    (static shapes, whole graph); the compilation happens at the first call, which
    :meth:`Pipeline.warmup <llada_export.runtime.pipeline.Pipeline.warmup>` makes at load
    time. ``constants``: {fqn: tensor} for archives saved with their checkpoint weights
    left out (meta tensors in the archive). ``cuda_graph`` (default: on for CUDA, measured on
    the H200): replay the compiled kernels from a CUDA graph."""

    graphs_by_default = True

    def __init__(self, path: Path, inputs: list[str], outputs: list[str], device: str = "cpu",
                 constants: dict[str, torch.Tensor] | None = None, cuda_graph: bool | None = None):
        self.device = torch.device(device)
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
        self.module = ep.module()
        self.inputs, self.outputs = inputs, outputs
        self._wrap(torch.compile(self.module, dynamic=False, fullgraph=True), cuda_graph)


class TrtRunner:
    """TensorRT 10/11 plan; static shapes, so output buffers are allocated once."""

    def __init__(self, path: Path, inputs: list[str], outputs: list[str], device: str = "cuda"):
        import tensorrt as trt

        self.device = torch.device(device if device.startswith("cuda") else "cuda")
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine(Path(path).read_bytes())
        self.context = self.engine.create_execution_context()
        self.inputs, self.outputs = inputs, outputs
        self.stream = torch.cuda.Stream(self.device)
        self.buffers = {}
        for name in outputs:
            shape = tuple(self.engine.get_tensor_shape(name))
            dtype = _torch_dtype(self.engine.get_tensor_dtype(name))
            self.buffers[name] = torch.empty(shape, dtype=dtype, device=self.device)
            self.context.set_tensor_address(name, self.buffers[name].data_ptr())

    def run(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        keep = []
        for name in self.inputs:
            t = feeds[name].to(self.device).contiguous()
            keep.append(t)
            self.context.set_tensor_address(name, t.data_ptr())
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        self.context.execute_async_v3(self.stream.cuda_stream)
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        return {k: v.clone() for k, v in self.buffers.items()}


def _torch_dtype(trt_dtype):
    import tensorrt as trt

    return {trt.float32: torch.float32, trt.float16: torch.float16, trt.int64: torch.int64,
            trt.int32: torch.int32, trt.bool: torch.bool}[trt_dtype]


RUNNERS = {"onnxruntime": OrtRunner, "aoti": AotiRunner, "inductor": InductorRunner, "tensorrt": TrtRunner}
