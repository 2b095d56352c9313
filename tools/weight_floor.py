"""The weight-read floor of a denoising step: the time to read every linear weight of the decoder
layers and the LM head once, measured on this device.

A cached step at batch 1 computes ~128 rows against every weight, so it cannot be faster than
reading them: this is the floor the cached step is compared with (``tools/bench_gpu.py engines``
reports cached / floor). The read is one ``sum`` per weight into an fp32 scalar (a reduction
kernel streams its input once at close to the memory bandwidth), all of them replayed from one
CUDA graph and timed with CUDA events (median); on a CPU the kernels run eagerly (a smoke run).

    python tools/weight_floor.py --preset full        # random full-size bf16 weights on the GPU
"""

from __future__ import annotations

import argparse
import json

import torch
from torch import nn

from llada_export.timing import median_seconds


def linear_weights(model) -> list[torch.Tensor]:
    """Every linear weight of the decoder layers (q, k, v, o, gate, up, down) and the LM head of an
    ``LLaDAV`` (the tensors a denoising step reads whatever its length)."""
    layers = [m.weight for m in model.model.layers.modules() if isinstance(m, nn.Linear)]
    return layers + [model.lm_head.weight]


def fp8_weights(model) -> list[torch.Tensor]:
    """What a ``--weights fp8`` step reads instead of :func:`linear_weights`: the layers' linears as
    1-byte tensors of the same shapes (e4m3 stand-ins: the read time does not depend on the values;
    their per-channel fp32 scales add < 0.1% and are left out) and the LM head, which stays unquantized."""
    layers = [torch.empty(m.weight.shape, dtype=torch.uint8, device=m.weight.device)
              for m in model.model.layers.modules() if isinstance(m, nn.Linear)]
    return layers + [model.lm_head.weight]


def weight_read_floor(tensors: list[torch.Tensor], repeat: int = 20) -> dict:
    """Read ``tensors`` once (one reduction each): {"gb", "ms", "tb_per_s", "tensors", "method"}."""
    out = torch.empty(len(tensors), dtype=torch.float32, device=tensors[0].device)

    def read() -> None:
        for i, t in enumerate(tensors):
            torch.sum(t, dim=tuple(range(t.dim())), dtype=torch.float32, out=out[i])  # reads t once

    fn, method = read, "sum per tensor, eager"
    if tensors[0].is_cuda:
        read()  # lazy init outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            read()
        fn, method = graph.replay, "sum per tensor, one CUDA graph, CUDA events"
    seconds = median_seconds(fn, repeat=repeat)
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    return {"gb": nbytes / 1e9, "ms": seconds * 1e3, "tb_per_s": nbytes / seconds / 1e12, "tensors": len(tensors),
            "method": method}


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
