"""FX pass: insert LLaDA-FastV visual-token pruning at decoder layer K of an exported denoiser.

Input: the UNPRUNED denoiser exported once with a symbolic prefix length ``P`` (so the
sequence length is the expression ``P + G`` and every reshape reads a SymInt, never a
baked integer). The pass

1. finds layer K's nodes from ``nn_module_stack`` metadata (module path ``...layers.K``),
   and in them the attention call whose query/key inputs carry RoPE;
2. clones the part of layer K that computes those q and k on the full sequence and
   inserts :func:`~llada_export.graphs.pruning.prune_indices` (scores from explicit
   attention probabilities + static top-k) after it;
3. copies layer K and everything downstream onto the reduced tensors: every upstream
   tensor with a sequence dimension (the residual stream, RoPE tables, the attention
   mask) is gathered along that dimension (boolean masks are also ANDed with the
   ``alive`` flags), and every upstream SymInt that depends on ``P`` is recomputed from
   the reduced length;
4. returns a GraphModule with two extra inputs (``visual_mask``, ``num_keep``) and two
   extra outputs (``kept_index``, ``kept_alive``), ready to be re-exported with
   static shapes as stage A.

It refuses graphs it cannot rewrite with :class:`PassError`.
"""

from __future__ import annotations

import operator
import re
import sympy
import torch
import torch.fx as fx

from ..contract.pruning import PruneSettings, PruneSettingsError
from ..graphs.pruning import gather_seq, prune_indices

aten = torch.ops.aten
_SDPA = (aten.scaled_dot_product_attention.default,)
_DROP_IN_COPY = {aten._assert_scalar.default, aten._assert_tensor_metadata.default,
                 aten.sym_constrain_range_for_size.default}


class PassError(ValueError):
    """The exported graph cannot be rewritten as asked."""


LAYER_REGEX = r"(^|\.)layers\.{layer}$"  # module path of decoder layer {layer}


def gather_mask(mask: torch.Tensor, index: torch.Tensor, alive: torch.Tensor, dim: int) -> torch.Tensor:
    """Gather a boolean mask along ``dim`` and AND it with the kept slots' ``alive`` flags."""
    shape = [1] * mask.dim()
    shape[0], shape[dim] = alive.shape
    return gather_seq(mask, index, dim) & alive.view(shape)


def _module_paths(n: fx.Node) -> list[str]:
    return [v[0] for v in (n.meta.get("nn_module_stack") or {}).values()]


def count_layers(gm: fx.GraphModule, layer_regex: str = LAYER_REGEX) -> int:
    pat = re.compile(layer_regex.replace("{layer}", r"(\d+)"))
    found = {int(m.group(m.re.groups)) for n in gm.graph.nodes for p in _module_paths(n) if (m := pat.search(p))}
    return max(found) + 1 if found else 0


def _ancestors(targets: list[fx.Node], within: set[fx.Node]) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    stack = [t for t in targets if t in within]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        stack.extend(a for a in n.all_input_nodes if a in within)
    return seen


def insert_pruning(ep: torch.export.ExportedProgram, settings: PruneSettings, *, n_visual_slots: int,
                   k_static: int, mask_id: int, layer_regex: str = LAYER_REGEX) -> fx.GraphModule:
    """Rewrite the exported unpruned denoiser into stage A (see module docstring): prune at
    ``settings.layer``, ``k_static`` of the bucket's ``n_visual_slots`` visual slots kept."""
    gm = ep.module()
    nodes = list(gm.graph.nodes)
    n_layers = count_layers(gm, layer_regex)
    if n_layers == 0:
        raise PassError("no decoder layers found in the graph's module metadata (expected module paths '...layers.N')")
    try:
        settings.validate(n_layers)
    except PruneSettingsError as e:
        raise PassError(str(e)) from None
    if not 0 < k_static <= n_visual_slots:
        raise PassError(f"k_static must be in 1..{n_visual_slots} (keep outside (0, 1]?), got {k_static}")

    pat = re.compile(layer_regex.replace("{layer}", str(settings.layer)))
    layer_nodes = [n for n in nodes if any(pat.search(p) for p in _module_paths(n))]
    if not layer_nodes:
        raise PassError(f"layer {settings.layer} not found in the graph (module path regex {pat.pattern!r})")
    sdpa = [n for n in layer_nodes if n.target in _SDPA]
    if len(sdpa) != 1:
        raise PassError(f"expected one attention call in layer {settings.layer}, found {len(sdpa)}")
    q_node, k_node = sdpa[0].args[0], sdpa[0].args[1]

    placeholders = {n.name: n for n in nodes if n.op == "placeholder"}
    needed = ("prefix_embeds", "response_ids", "position_ids", "key_mask")
    if any(k not in placeholders for k in needed):
        raise PassError(f"the denoiser graph must take inputs {needed}, found {tuple(placeholders)}")
    p_dim = placeholders["prefix_embeds"].meta["val"].shape[1]
    if not isinstance(p_dim, torch.SymInt):
        raise PassError("the denoiser was exported with a static prefix length; export it with a symbolic Dim")
    p_sym = p_dim.node.expr
    g = placeholders["response_ids"].meta["val"].shape[1]
    seq_exprs = {p_sym + g}  # the full sequence length L = P + G

    first = layer_nodes[0]
    first_pos = nodes.index(first)
    upstream = set(nodes[:first_pos])

    new = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}  # full-length world
    red: dict[fx.Node, fx.Node] = {}  # reduced world (layer K and after)
    cache: dict[fx.Node, fx.Node] = {}

    for n in nodes[:first_pos]:
        if n.op == "call_module":  # export's input guards (shapes change here)
            continue
        env[n] = new.node_copy(n, lambda a: env[a])
        if n.op == "placeholder" and n.name == "key_mask":
            visual_mask = new.placeholder("visual_mask")
            num_keep = new.placeholder("num_keep")
    # Layer K's q/k on the full sequence, then the pruning op.
    qk = _ancestors([q_node, k_node], set(nodes[first_pos:]))
    for n in nodes[first_pos:]:
        if n in qk:
            env[n] = new.node_copy(n, lambda a: env[a])
    ph = {k: env[placeholders[k]] for k in needed}
    pruned = new.call_function(
        prune_indices,
        (env[q_node], env[k_node], ph["key_mask"], visual_mask, num_keep, ph["response_ids"], ph["position_ids"]),
        dict(n_visual_slots=n_visual_slots, k_static=k_static, source=settings.score_from, mask_id=mask_id),
    )
    index = new.call_function(operator.getitem, (pruned, 0))
    alive = new.call_function(operator.getitem, (pruned, 1))
    l_red = new.call_function(aten.sym_size.int, (index, 1))
    p_red = new.call_function(operator.sub, (l_red, g))

    def symint(a: fx.Node) -> fx.Node:
        expr = sympy.sympify(a.meta["val"].node.expr)
        if p_sym not in expr.free_symbols:
            return env[a]
        if expr.free_symbols != {p_sym} or sympy.degree(expr, p_sym) != 1:
            raise PassError(f"cannot rewrite size expression {expr} of node {a.name} onto the reduced length")
        coef, const = expr.coeff(p_sym), expr.subs(p_sym, 0)
        out = p_red if coef == 1 else new.call_function(operator.mul, (p_red, int(coef)))
        return out if const == 0 else new.call_function(operator.add, (out, int(const)))

    def reduced_input(a: fx.Node) -> fx.Node:
        if a in red:
            return red[a]
        if a not in upstream:
            raise PassError(f"node {a.name} is used before it is defined in the reduced region")
        if a in cache:
            return cache[a]
        val = a.meta.get("val")
        if isinstance(val, torch.SymInt):
            out = symint(a)
        elif isinstance(val, torch.Tensor):
            out = env[a]
            for d, s in enumerate(val.shape):
                if isinstance(s, torch.SymInt) and sympy.sympify(s.node.expr) in seq_exprs:
                    if val.dtype == torch.bool:
                        out = new.call_function(gather_mask, (out, index, alive, d))
                    else:
                        out = new.call_function(gather_seq, (out, index, d))
                elif isinstance(s, torch.SymInt):
                    raise PassError(f"tensor {a.name} of shape {tuple(val.shape)} crosses layer {settings.layer} "
                                    "with a symbolic dimension that is not the sequence length")
        else:
            out = env[a]
        cache[a] = out
        return out

    out_node = None
    for n in nodes[first_pos:]:
        if n.op == "output":
            out_node = n
            break
        if n.op == "call_function" and n.target in _DROP_IN_COPY:
            continue
        red[n] = new.node_copy(n, reduced_input)
    (result,) = out_node.args
    outs = result if isinstance(result, (tuple, list)) else (result,)
    new.output(tuple(red[o] for o in outs) + (index, alive))
    new.eliminate_dead_code()
    out = fx.GraphModule(gm, new)  # default codegen: flat inputs, tuple output
    out.eval()
    return out
