"""What the torch backends (aoti, inductor) share: CUDA-graph replay, the runner base, and the
split of a program's constants into checkpoint tensors and the rest."""

from __future__ import annotations

from typing import Any

import torch

# registers llada::attention_lse, which the cached programs call: both backends' runners import this module before
# they load a program, an AOTI package or precompiled kernels
from ..ops import padded_attention  # noqa: F401


class CudaGraphCall:
    """``fn(*tensors) -> tensor or tuple`` captured once in a CUDA graph and replayed.

    Shapes must be static (they are: every graph serves one bucket). Each call copies its
    inputs into the buffers the graph was captured with, replays it and returns clones of
    the outputs (the captured output buffers are overwritten by the next replay). Inputs at
    ``state_in`` (the KV cache) are captured as they are and never copied when the same
    tensor comes again; outputs at ``state_out`` are returned as the captured buffers
    themselves (no copy; the next replay overwrites them in place)."""

    def __init__(self, fn, state_in: frozenset[int] = frozenset(), state_out: frozenset[int] = frozenset()):
        self.fn, self.graph = fn, None
        self.state_in, self.state_out = state_in, state_out
        self.static_in: list[torch.Tensor] = []
        self.static_out: list[torch.Tensor] = []

    def __call__(self, *args: torch.Tensor) -> list[torch.Tensor]:
        if self.graph is None:
            self.static_in = [a if i in self.state_in else a.clone() for i, a in enumerate(args)]
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
            if buf.data_ptr() != a.data_ptr():
                buf.copy_(a)
        self.graph.replay()
        return [o if i in self.state_out else o.clone() for i, o in enumerate(self.static_out)]


class TorchRunner:
    """Shared by the AOTInductor and Inductor runners: named feeds -> positional call, optional
    CUDA-graph replay (``cuda_graph`` None: ``graphs_by_default``, on CUDA only)."""

    def __init__(self, fn, io, device: str, cuda_graph: bool | None, graphs_by_default: bool = False):
        self.device = torch.device(device)
        self.inputs, self.outputs = io.input_names, io.output_names
        if cuda_graph is None:
            cuda_graph = graphs_by_default and self.device.type == "cuda"
        state_in = frozenset(i for i, t in enumerate(io.inputs) if t.state)
        state_out = frozenset(i for i, t in enumerate(io.outputs) if t.state)
        self.call = CudaGraphCall(fn, state_in, state_out) if cuda_graph else fn

    def run(self, feeds: dict[str, Any]) -> dict[str, torch.Tensor]:
        args = [feeds[k].to(self.device) for k in self.inputs]
        res = self.call(*args)
        res = res if isinstance(res, (list, tuple)) else [res]
        return dict(zip(self.outputs, res))


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
