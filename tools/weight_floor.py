"""The weight-read floor of a denoising step: the time to read every linear weight of the decoder
layers and the LM head once, measured on this device.

A cached step at batch 1 computes ~128 rows against every weight, so it cannot be faster than
reading them: this is the floor the cached step is compared with (``tools/bench_gpu.py engines``
reports cached / floor). The read is timed three ways, the fastest taken: one ``sum`` per weight into
an fp32 scalar, one GEMV per weight (its bytes as a bf16 matrix: cuBLAS streams a matrix at close
to the memory bandwidth; the sum alone read 2.30 TB/s on an H100 where a probe reached 3.04), and one
GEMM of 16 rows per weight (added on 2026-12-07 when the engines' own GEMMs at 128 rows read faster
than the first two: reports before then used those two), each way all weights replayed from one CUDA
graph and timed with CUDA events (median); on a CPU the kernels run eagerly (a smoke run).

    python tools/weight_floor.py --preset full        # random full-size bf16 weights on the GPU
"""

from __future__ import annotations

import argparse
import json

import torch
from torch import nn

from llada_export.timing import median_seconds


GEMM_ROWS = 16  # the third read: a GEMM this many rows tall is bound by reading its weight, and cuBLAS's small-M
# kernels stream a weight faster than its GEMV or a sum did (an H100 on 2026-12-07: the bf16 GEMMs at 128 rows
# read 2.63 TB/s, benchmarks/fp8_gemm_probe.md, where GEMV / sum gave the floor 2.45-2.53 TB/s)


def linear_weights(model) -> list[torch.Tensor]:
    """Every linear weight of the decoder layers (q, k, v, o, gate, up, down) and the LM head of an
    ``LLaDAV`` (the tensors a denoising step reads whatever its length)."""
    layers = [m.weight for m in model.model.layers.modules() if isinstance(m, nn.Linear)]
    return layers + [model.lm_head.weight]


def fp8_weights(model) -> list[torch.Tensor]:
    """What a ``--weights fp8`` step reads instead of :func:`linear_weights`: the layers' linears as
    1-byte tensors of the same shapes (e4m3 stand-ins: the read time does not depend on the values;
    their per-channel fp32 scales add < 0.1% and are left out) and the LM head, which stays unquantized."""
    layers = [torch.zeros(m.weight.shape, dtype=torch.uint8, device=m.weight.device)
              for m in model.model.layers.modules() if isinstance(m, nn.Linear)]
    return layers + [model.lm_head.weight]


def _rows(t: torch.Tensor) -> torch.Tensor | None:
    """``t``'s bytes as a 2-D matrix of the dtype a GEMV reads (bf16 on a GPU, fp32 on a CPU), or None."""
    dt = torch.bfloat16 if t.is_cuda else torch.float32
    nbytes = t.shape[-1] * t.element_size()
    if t.dim() != 2 or not t.is_contiguous() or nbytes % dt.itemsize:
        return None
    return t.view(dt) if t.dtype != dt else t  # [N, K * size / dt size]: the same bytes


def _timed(read, cuda: bool, repeat: int) -> float:
    if cuda:  # lazy init outside the capture, then all the reads replayed from one CUDA graph
        read()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            read()
        read = graph.replay
    return median_seconds(read, repeat=repeat)


def weight_read_floor(tensors: list[torch.Tensor], repeat: int = 20) -> dict:
    """Read ``tensors`` once, three ways, each all tensors in one CUDA graph (CUDA events, median): one
    ``sum`` per tensor into an fp32 scalar, one GEMV per tensor (its bytes as a bf16 matrix times a
    vector: cuBLAS streams a matrix at close to the memory bandwidth) and one GEMM of ``GEMM_ROWS`` rows
    per tensor (the same matrix, 16 rows of ones). The fastest is the floor:
    {"gb", "ms", "tb_per_s", "tensors", "method", "methods_ms"}."""
    cuda = tensors[0].is_cuda
    out = torch.empty(len(tensors), dtype=torch.float32, device=tensors[0].device)

    def read_sum() -> None:
        for i, t in enumerate(tensors):
            torch.sum(t, dim=tuple(range(t.dim())), dtype=torch.float32, out=out[i])  # reads t once

    methods = {"sum per tensor": read_sum}
    mats = [_rows(t) for t in tensors]
    if all(m is not None for m in mats):
        vecs = {m.shape[1]: torch.ones(m.shape[1], dtype=m.dtype, device=m.device) for m in mats}
        outs = [torch.empty(m.shape[0], dtype=m.dtype, device=m.device) for m in mats]  # [N] each

        def read_gemv() -> None:
            for m, o in zip(mats, outs):
                torch.mv(m, vecs[m.shape[1]], out=o)  # reads m once

        methods["GEMV per tensor"] = read_gemv
        rows = {k: torch.ones(GEMM_ROWS, k, dtype=mats[0].dtype, device=mats[0].device) for k in vecs}  # [16, K]
        gouts = [torch.empty(GEMM_ROWS, m.shape[0], dtype=m.dtype, device=m.device) for m in mats]  # [16, N] each

        def read_gemm() -> None:
            for m, o in zip(mats, gouts):
                torch.mm(rows[m.shape[1]], m.t(), out=o)  # reads m once: cuBLAS's small-M GEMMs stream it

        methods[f"GEMM of {GEMM_ROWS} rows per tensor"] = read_gemm
    times = {name: _timed(fn, cuda, repeat) for name, fn in methods.items()}
    best = min(times, key=times.get)
    seconds = times[best]
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    where = "one CUDA graph, CUDA events" if cuda else "eager"
    return {"gb": nbytes / 1e9, "ms": seconds * 1e3, "tb_per_s": nbytes / seconds / 1e12, "tensors": len(tensors),
            "method": f"{best}, {where} (fastest of {', '.join(times)})",
            "methods_ms": {k: v * 1e3 for k, v in times.items()}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="full", choices=("full", "tiny", "demo"), help="model size (default: full)")
    p.add_argument("--repeat", type=int, default=20, help="timed replays, median taken (default: 20)")
    p.add_argument("--fp8", action="store_true", help="the floor of e4m3 layer weights (the LM head stays bf16)")
    args = p.parse_args(argv)
    from llada_export.config import PRESETS
    from llada_export.synthetic.tokenizer import build_tokenizer
    from llada_export.synthetic.weights import random_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = PRESETS[args.preset]()
    cfg.text.vocab_size = cfg.text.vocab_size or len(build_tokenizer("full" if args.preset == "full" else "tiny"))
    model = random_model(cfg, device, torch.bfloat16 if device == "cuda" else torch.float32, 0)
    print(json.dumps(weight_read_floor((fp8_weights if args.fp8 else linear_weights)(model), args.repeat)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
