"""Backend runners with one small interface: named torch tensors in, named torch tensors out.

- :class:`OrtRunner`: ONNX Runtime (CPU, or CUDA with onnxruntime-gpu and IO binding so
  tensors stay on the device); thread spinning off, since sessions alternate.
- :class:`AotiRunner`: an AOTInductor package (.pt2) on CPU or CUDA.
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


class AotiRunner:
    """``constants``: for packages built without their weights, {constant fqn: tensor on the
    device}; loaded as user-managed (no copy), so graphs share one set of weights."""

    def __init__(self, path: Path, inputs: list[str], outputs: list[str], device: str = "cpu",
                 constants: dict[str, torch.Tensor] | None = None):
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

    def run(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        args = [feeds[k].to(self.device) for k in self.inputs]
        res = self.model(*args)
        res = res if isinstance(res, (list, tuple)) else [res]
        return dict(zip(self.outputs, res))


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


RUNNERS = {"onnxruntime": OrtRunner, "aoti": AotiRunner, "tensorrt": TrtRunner}
