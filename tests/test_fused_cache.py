"""Fused projections (q/k/v, gate/up as one GEMM each) and the cached step writing its cache in
place: against the eager model (the oracle, unfused, functional cache), and the engines built from
them (ONNX Runtime functional, Inductor in place) against the eager cached reference, token for token."""

from __future__ import annotations

import pytest
import torch

from helpers import PROMPTS, export, random_image
from llada_export.contract.pruning import PruneSettings
from llada_export.graphs.fused import fuse_projections, fused_weights, resolve_weight
from llada_export.reference import embed_prompt, reference_generate
from llada_export.runtime.pipeline import Pipeline, Request
from llada_export.tokenizer import special_tokens


def _inputs(model, tok, image, g=16):
    inp = embed_prompt(model, tok, image, PROMPTS["long"])
    ids = torch.full((1, g), special_tokens(tok).mask)
    ids[0, [1, 4, 9, 13]] = torch.tensor([7, 40, 99, 3])
    return inp.embeds, ids, torch.arange(inp.length + g)[None]


# ---------------------------------------------------------------------- eager: fused == unfused, in place == concat
def test_fused_model_computes_the_eager_logits_and_shares_the_other_weights(tiny, images):
    model, tok, _ = tiny
    lm = model.language
    fused = fuse_projections(lm)
    embeds, ids, pos = _inputs(model, tok, images["380x250"])
    with torch.no_grad():
        want, got = lm(embeds, ids, pos), fused(embeds, ids, pos)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        (lw, lkv), (fw, fkv) = lm.prefill(embeds, ids, pos), fused.prefill(embeds, ids, pos)
    torch.testing.assert_close(fw, lw, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fkv, lkv, rtol=1e-5, atol=1e-5)
    a, b = lm.layers[0], fused.layers[0]
    assert b.self_attn.o_proj is a.self_attn.o_proj and b.mlp.down_proj is a.mlp.down_proj
    assert fused.lm_head is lm.lm_head
    assert not hasattr(b.self_attn, "q_proj") and "self_attn.q_proj.weight" in dict(a.named_parameters())
    # the checkpoint keys of a fused weight rebuild it
    state = dict(model.state_dict())
    for key, w in fused_weights(fused, "model.").items():
        assert torch.equal(resolve_weight(state, key), w)
    assert resolve_weight(state, key) is resolve_weight(state, key)  # made once


def _cached_steps(lm, kv, ids, pos, p, g, steps, inplace):
    """Cached steps over one cache with block_start fixed per refresh interval (as the sampler does)."""
    mask = torch.ones(1, p + g, dtype=torch.bool)
    out = []
    for new_ids, start in steps:
        ids = ids.clone()
        ids[0, : len(new_ids)] = torch.tensor(new_ids)
        out.append(lm.cached(ids, pos[:, p:], mask, kv, torch.tensor([start]), inplace))
    return out


def test_in_place_cached_steps_equal_the_functional_ones(tiny, images):
    """Several cached steps on one cache (fresh tokens committed between them, block start 8 of 16):
    writing the fresh K/V into the buffer gives the logits of the concatenating form, and leaves the
    prefix and the earlier block's slots as the refresh wrote them."""
    model, tok, _ = tiny
    lm = fuse_projections(model.language)
    embeds, ids, pos = _inputs(model, tok, images["380x250"])
    p, g = embeds.shape[1], ids.shape[1]
    steps = [([5, 6, 7, 8, 9, 10, 11, 12], 8), ([5, 6, 7, 8, 9, 10, 11, 12, 40], 8),
             ([5, 6, 7, 8, 9, 10, 11, 12, 40, 41, 42], 8)]
    with torch.no_grad():
        _, kv = lm.prefill(embeds, ids, pos)
        buf = kv.clone()
        want = _cached_steps(lm, kv, ids, pos, p, g, steps, inplace=False)
        got = _cached_steps(lm, buf, ids, pos, p, g, steps, inplace=True)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert torch.equal(buf[..., : p + 8, :], kv[..., : p + 8, :])  # prefix + block 0: the refresh's K/V
    assert not torch.equal(buf[..., p + 8:, :], kv[..., p + 8:, :])  # the fresh slots were written


# ---------------------------------------------------------------------- engines: ONNX (functional), Inductor (in place)
@pytest.fixture(scope="module")
def fused_engines(tiny_ckpt, tmp_path_factory):
    """ONNX Runtime + Inductor engines with the cache graphs, pruned (layer 2, keep 0.5) + unpruned,
    G = 32, batch 2, the Inductor weights left in the checkpoint (fused weights mapped to their parts)."""
    return export(tiny_ckpt, tmp_path_factory.mktemp("fused") / "e", baseline=True, cache=True, gen_length=32,
                  batch_size=2, backends=("onnxruntime", "inductor"), compiled_weights="checkpoint",
                  compile_cache=False)


def test_the_programs_hold_fused_weights_and_the_torch_cached_step_writes_its_cache(fused_engines, tiny):
    from llada_export.contract.manifest import Manifest
    from llada_export.engines.onnxruntime import SHARED_WEIGHTS

    m = Manifest.read(fused_engines)
    # the ONNX graphs share one copy of the fused weights: the weights file holds less than the model
    # (no vision tower weight is in a denoiser graph twice, no fused weight twice)
    model_bytes = sum(t.numel() * t.element_size() for t in tiny[0].state_dict().values())
    assert (fused_engines / "onnx" / SHARED_WEIGHTS).stat().st_size < 1.05 * model_bytes
    mapped = m.constants_from_checkpoint["inductor"]
    for graph in ("stage_a", "stage_b", "prefill", "cached", "unpruned_prefill", "unpruned_cached"):
        keys = set(mapped[graph].values())
        assert "cat(model.layers.0.self_attn.q_proj.weight,model.layers.0.self_attn.k_proj.weight," \
               "model.layers.0.self_attn.v_proj.weight)" in keys, graph
        assert not any(k.endswith(("q_proj.weight", "gate_proj.weight")) and not k.startswith("cat(") for k in keys)
    for graph in ("cached", "unpruned_cached"):  # the program writes its kv_cache input (and nothing else)
        ep = torch.export.load(str(fused_engines / "programs" / f"{graph}.pt2"))
        writes = [n for n in ep.graph.nodes
                  if isinstance(n.target, torch._ops.OpOverload) and n.target._schema.is_mutable]
        assert [n.target for n in writes] == [torch.ops.aten.index_put_.default] * 4, graph  # one per layer
        assert writes[0].args[0].name == "kv_cache" and all(b.args[0] is a for a, b in zip(writes, writes[1:]))
        assert not any(n.target == torch.ops.aten.cat.default and n.args[0][0].name.startswith("select")
                       for n in ep.graph.nodes), graph  # no concatenation of the cache
        # the default cached attention: flash over the zeroed padding, one llada::attention_lse per layer
        assert sum(n.target == torch.ops.llada.attention_lse.default for n in ep.graph.nodes) == 4, graph
    assert m.export["cached_attention"] == "flash"


CASES = [("onnxruntime", True, False), ("onnxruntime", True, True), ("inductor", False, False),
         ("inductor", False, True)]  # (backend, compiled, unpruned); Inductor's compile: the test below


@pytest.mark.parametrize("backend, compiled, unpruned", CASES,
                         ids=[f"{b}-{'compiled' if c else 'eager'}-{'unpruned' if u else 'pruned'}"
                              for b, c, u in CASES])
def test_cached_engines_match_the_eager_cached_reference_over_blocks(fused_engines, tiny, images, backend, compiled,
                                                                     unpruned):
    """Blocks of 8 of 32, refresh every 3 forwards (block_start advances between refreshes), and
    confidence-threshold steps in a batch of two rows that refresh at different steps: token for
    token the eager (unfused, concatenating) cached model. Inductor: the programs as exported
    (``compile=False``; compiling the whole graph set on a CPU takes minutes: what Inductor makes of
    the cached step is the next test's)."""
    model, tok, _ = tiny
    pipe = Pipeline.load(fused_engines, backend=backend, runner_options=None if compiled else {"compile": False})
    prune = None if unpruned else PruneSettings(2, 0.5)
    for kw in (dict(refresh=3), dict(threshold=0.5, refresh=2)):
        kw = dict(gen_length=32, block_length=8, steps=32, cache=True, **kw)
        gen = pipe.generation_config(unpruned=unpruned, **kw)
        reqs = [(images["380x250"], PROMPTS["long"]), (random_image(200, 300, 9), PROMPTS["short"])]
        refs = [reference_generate(model, tok, img, prompt, gen, prune) for img, prompt in reqs]
        got = pipe.generate(*reqs[0], unpruned=unpruned, **kw)
        assert got.ids == refs[0].ids and got.kept_visual == (None if unpruned else refs[0].kept_visual)
        assert got.graph_calls.get("unpruned_cached" if unpruned else "cached", 0) > 0
        assert len(set(refs[0].ids)) > 2  # the random model's answer varies: the comparison could fail
        batched = pipe.generate_batch([Request(*r) for r in reqs], unpruned=unpruned, **kw)
        assert [b.ids for b in batched] == [r.ids for r in refs]


def test_inductor_writes_the_cache_in_place_without_copying_it(tiny, images):
    """What Inductor makes of the in-place cached program: no buffer the size of a layer's cache or of
    the whole cache is allocated (the attention reads the input buffer; a ``copy_`` into a view made it
    rebuild the whole cache at every layer), the input is updated as the eager in-place step updates it."""
    from torch._inductor.utils import run_and_get_code

    from llada_export.graphs.llada import CachedGraph, Head

    model, tok, _ = tiny
    lm = fuse_projections(model.language)
    embeds, ids, pos = _inputs(model, tok, images["380x250"])
    p, g = embeds.shape[1], ids.shape[1]
    with torch.no_grad():
        _, kv = lm.prefill(embeds, ids, pos)
        args = (ids, pos[:, p:], torch.ones(1, p + g, dtype=torch.bool), kv.clone(), torch.tensor([8]))
        ep = torch.export.export(CachedGraph(lm, Head(), inplace=True), args)
        want_kv = kv.clone()
        want = CachedGraph(lm, Head())(*args[:3], want_kv, args[4])[0]
        CachedGraph(lm, Head(), inplace=True)(*args[:3], want_kv, args[4])
        got, code = run_and_get_code(torch.compile(ep.module(), dynamic=False, fullgraph=True), *args)
    torch.testing.assert_close(got[0], want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(args[3], want_kv, rtol=1e-4, atol=1e-4)
    sizes = {tuple(kv.shape), tuple(kv.shape[2:])}  # the whole cache, one layer's K or V
    allocs = [line for src in code for line in src.splitlines() if "empty_strided" in line and "((" in line]
    assert allocs and not any(str(s).replace(" ", "") in a.replace(" ", "") for a in allocs for s in sizes), allocs
