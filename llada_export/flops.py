"""The analytic FLOPs model of one request (multiply-adds x 2), for benchmarks and the pruning sweep.

Counts the matrix products of the decoder layers (q, k, v, o projections, the SwiGLU MLP,
the two attention products), of the lm_head rows the graphs compute (the response), and
of the vision tower and projector; norms, RoPE and softmax are left out (well under 1%).
"""

from __future__ import annotations

from .config import LLaDAVConfig
from .contract.pruning import num_kept


def lm_flops(cfg: LLaDAVConfig, length: int, layers: int, logits_rows: int = 0, keys: int | None = None) -> float:
    """``layers`` decoder layers over ``length`` query tokens attending to ``keys`` keys (default:
    the same tokens), plus ``logits_rows`` rows of the lm_head."""
    t = cfg.text
    d, i = t.hidden_size, t.intermediate_size
    keys = length if keys is None else keys
    per_layer = 2 * length * (4 * d * d + 3 * d * i) + 4 * length * keys * d
    return layers * per_layer + 2 * logits_rows * d * t.vocab_size


def vision_flops(cfg: LLaDAVConfig, crops: int) -> float:
    v = cfg.vision
    n, c, i, layers = v.tokens_per_crop, v.hidden_size, v.intermediate_size, v.num_hidden_layers - 1
    tower = layers * (2 * n * (4 * c * c + 2 * c * i) + 4 * n * n * c) + 2 * n * 3 * v.patch_size**2 * c
    proj = 2 * n * (c * cfg.text.hidden_size + cfg.text.hidden_size**2)
    return crops * (tower + proj)


def graph_flops(cfg: LLaDAVConfig, prefix: int, n_vis: int, g: int, layer: int | None, keep: float, crops: int,
                score_from: str = "response") -> dict:
    """FLOPs of one call of each graph of a path, per request row, for a bucket of ``prefix`` prompt
    slots (``n_vis`` of them visual) and ``g`` response slots: ``vision`` (every crop), ``stage_a``
    (pruned path: the first forward, full length up to layer K, then the reduced sequence; None
    unpruned), ``full`` (stage B, or the unpruned forward), ``prefill`` (the same forward writing the
    cache) and ``cached`` (the G response rows against the cached prefix). ``score_from``: the
    queries that rank the visual tokens at layer K (``response``: the G response rows; ``text`` and
    ``last``: the graph computes the full L x L probability matrix and weights it)."""
    n_layers, length = cfg.text.num_hidden_layers, prefix + g
    if layer is None:
        full = lm_flops(cfg, length, n_layers, g)
        stage_a, red = None, length
    else:
        red = length - n_vis + num_kept(keep, n_vis)
        rows = g if score_from == "response" else length
        stage_a = (lm_flops(cfg, length, layer, 0) + lm_flops(cfg, red, n_layers - layer, g)
                   + 4 * rows * length * cfg.text.hidden_size)
        full = lm_flops(cfg, red, n_layers, g)
    return {"vision": vision_flops(cfg, crops), "stage_a": stage_a, "full": full, "prefill": full,
            "cached": lm_flops(cfg, g, n_layers, g, keys=red), "reduced_length": red, "length": length}


def answer_flops(per_call: dict, counts: dict) -> float:
    """FLOPs of one answer as it ran: vision once, plus each graph's calls for its row (``counts``:
    graph kind -> calls, the kinds of :func:`graph_flops`) times that graph's FLOPs per call."""
    return per_call["vision"] + sum(n * per_call[kind] for kind, n in counts.items() if n)


def request_flops(cfg: LLaDAVConfig, prefix: int, n_vis: int, gen, layer: int | None, keep: float, crops: int,
                  forwards: int | None = None, cached_forwards: int = 0) -> dict:
    """FLOPs of one request: vision, step 1 (stage A, or the unpruned forward), and every later
    forward (``forwards`` in all, default ``gen.steps``; ``cached_forwards`` of them cached steps,
    which run only the G response rows against the cached prefix)."""
    f = graph_flops(cfg, prefix, n_vis, gen.gen_length, layer, keep, crops)
    forwards = gen.steps if forwards is None else forwards
    step1 = f["full"] if layer is None else f["stage_a"]
    full_later = max(forwards - 1 - cached_forwards, 0)
    total = f["vision"] + step1 + full_later * f["full"] + cached_forwards * f["cached"]
    return {"total": total, "stage_a": step1, "stage_b": f["full"], "cached": f["cached"],
            "reduced_length": f["reduced_length"], "length": f["length"]}
