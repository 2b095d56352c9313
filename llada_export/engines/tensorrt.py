"""The TensorRT 10/11 backend: plans built from the ONNX graphs with Polygraphy's loaders.

Written against the documented API and never run here: TensorRT's builder cannot be
installed on any machine this project has (``tensorrt_status`` says why, and its test
skips with that reason). The network is parsed from the ONNX file so the shared external
weights resolve; TensorRT 11 networks are strongly typed, so precision comes from the ONNX
graph itself (norms and RoPE tables are fp32 there); one static optimization profile per
graph. Its TopK needs a static K below 3840 (checked at export).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from .registry import Backend, WriteContext, register_backend

TOPK_LIMIT = 3840  # TensorRT's TopK needs a static K below this


def tensorrt_status() -> str | None:
    """None when TensorRT engines can be built and run here, else the reason they cannot."""
    if importlib.util.find_spec("tensorrt") is None:
        return "the 'tensorrt' Python package is not installed (pip install 'llada-export[gpu]' on a CUDA machine)"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU is visible"
    try:
        import tensorrt  # noqa: F401
    except Exception as e:  # a stub wheel without the builder libraries
        return f"tensorrt cannot be imported ({e})"
    return None


def write(ctx: WriteContext, graph: str, path: Path) -> list[Path]:
    import tensorrt as trt
    from polygraphy.backend.trt import (CreateConfig, Profile, engine_from_network, network_from_onnx_path,
                                        save_engine)

    onnx_path = ctx.ensure("onnxruntime", graph)
    flags = [trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED] if hasattr(
        trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED") else []
    network = network_from_onnx_path(str(onnx_path), flags=flags)
    profile = Profile()
    for t in ctx.io[graph].inputs:
        profile.add(t.name, min=t.shape, opt=t.shape, max=t.shape)
    engine = engine_from_network(network, config=CreateConfig(profiles=[profile]))
    save_engine(engine, str(path))
    return [path]


class TrtRunner:
    """A TensorRT plan; static shapes, so output buffers are allocated once (``set_tensor_address`` +
    ``execute_async_v3``); state outputs (the KV cache) are returned without a copy."""

    def __init__(self, path: Path, io, device: str = "cuda", constants=None, cuda_graph=None):
        import tensorrt as trt
        import torch

        self.device = torch.device(device if device.startswith("cuda") else "cuda")
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine(Path(path).read_bytes())
        self.context = self.engine.create_execution_context()
        self.inputs, self.outputs = io.input_names, io.output_names
        self.state = {t.name for t in io.outputs if t.state}
        self.stream = torch.cuda.Stream(self.device)
        self.buffers = {}
        dtypes = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
                  trt.int64: torch.int64, trt.int32: torch.int32, trt.bool: torch.bool}
        for name in self.outputs:
            shape = tuple(self.engine.get_tensor_shape(name))
            self.buffers[name] = torch.empty(shape, dtype=dtypes[self.engine.get_tensor_dtype(name)],
                                             device=self.device)
            self.context.set_tensor_address(name, self.buffers[name].data_ptr())

    def run(self, feeds):
        import torch

        keep = []
        for name in self.inputs:
            t = feeds[name].to(self.device).contiguous()
            keep.append(t)
            self.context.set_tensor_address(name, t.data_ptr())
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        self.context.execute_async_v3(self.stream.cuda_stream)
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        return {k: v if k in self.state else v.clone() for k, v in self.buffers.items()}


BACKEND = register_backend(Backend(
    name="tensorrt", folder="tensorrt", suffix=".plan", write=write, runner=TrtRunner,
    description="TensorRT plans built from the ONNX graphs (needs the tensorrt package and a GPU)",
    devices=("cuda",), needs_gpu=True, priority={"cuda": 0}, available=tensorrt_status))
