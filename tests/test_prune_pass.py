"""The FX pass's stage A against the eager pruned reference, on padded buckets."""

from __future__ import annotations

import pytest
import torch

from helpers import PROMPTS
from llada_export.contract.bucket import Bucket
from llada_export.contract.graphset import Dims
from llada_export.contract.layout import layout_bucket
from llada_export.contract.pruning import PruneSettings, num_kept
from llada_export.exporter.programs import BuildContext
from llada_export.passes.prune import PassError, insert_pruning
from llada_export.reference import embed_prompt, pruned_forward
from llada_export.tokenizer import special_tokens

G = 16
BUCKET = Bucket(max_text_tokens=192, max_visual_tokens=150, gen_length=G, vision_batch=2)


def context(model, sp, bucket=BUCKET, prune=None) -> BuildContext:
    return BuildContext(model, bucket, Dims.of(bucket, model.config), sp, prune, False, torch.device("cpu"))


@pytest.fixture(scope="module")
def traced(tiny):
    model, tok, _ = tiny
    sp = special_tokens(tok)
    return context(model, sp).traced("denoiser"), sp


def _eager(model, prompt, layer, keep, sp, gen_length):
    """Unpadded eager pruned reference: (logits [G, V], kept positions)."""
    p, nv = prompt.length, prompt.n_visual
    resp = torch.full((1, gen_length), sp.mask)
    pos = torch.arange(p + gen_length)[None]
    vmask = torch.cat([prompt.visual_mask, torch.zeros(1, gen_length, dtype=torch.bool)], 1)
    k = num_kept(keep, nv)
    logits, index, alive = pruned_forward(model, prompt.embeds, resp, pos, torch.ones_like(vmask), vmask,
                                          torch.tensor([k]), PruneSettings(layer, keep), k, sp.mask)
    assert alive.all()
    return logits[0], index[0][vmask[0, index[0]]]


@pytest.mark.parametrize("layer", [0, 2, 3])
@pytest.mark.parametrize("keep", [0.25, 0.5, 1.0])
@pytest.mark.parametrize("image, prompt", [("380x250", "short"), ("384x384", "long")])
def test_stage_a_matches_eager_pruned_reference(tiny, traced, images, layer, keep, image, prompt):
    model, tok, _ = tiny
    ep, sp = traced
    k_static = num_kept(keep, BUCKET.max_visual_tokens)
    bucket = Bucket(BUCKET.max_text_tokens, BUCKET.max_visual_tokens, G, 2, k_static=k_static)
    stage_a = insert_pruning(ep, PruneSettings(layer, keep), n_visual_slots=bucket.max_visual_tokens,
                             k_static=k_static, mask_id=sp.mask)

    req = embed_prompt(model, tok, images[image], PROMPTS[prompt])
    nv = req.n_visual
    x = layout_bucket(bucket, [req.parts()], G)  # padded: 150 visual slots, 192 text
    assert x.prefix_embeds.shape[1] > req.length
    resp = torch.full((1, G), sp.mask)
    n_keep = torch.tensor([num_kept(keep, nv)])
    with torch.no_grad():
        logits, index, alive = stage_a(x.prefix_embeds, resp, x.position_ids, x.key_mask, x.visual_mask, n_keep)

    ref_logits, ref_kept = _eager(model, req, layer, keep, sp, G)
    kept_slots = index[0][alive[0] & x.visual_mask[0, index[0]]]
    assert x.position_ids[0, kept_slots].tolist() == ref_kept.tolist()  # same tokens, original positions
    assert len(ref_kept) == n_keep.item()
    # 1e-5 relative to the logits' scale (|logits| reach ~10 with this checkpoint's init std 0.3):
    # padding changes fp32 summation order, nothing else.
    torch.testing.assert_close(logits[0], ref_logits, rtol=0, atol=1e-5 * float(ref_logits.abs().max()))
    assert index.shape[1] == bucket.seq_len - bucket.max_visual_tokens + bucket.k_static  # static L'


def test_stage_a_reexports_with_static_shapes(traced, tiny):
    model, _, _ = tiny
    ep, sp = traced
    bucket = Bucket(BUCKET.max_text_tokens, BUCKET.max_visual_tokens, G, 2, k_static=num_kept(0.35, 150))
    gm = insert_pruning(ep, PruneSettings(2, 0.35), n_visual_slots=bucket.max_visual_tokens,
                        k_static=bucket.k_static, mask_id=sp.mask)
    prog = torch.export.export(gm, context(model, sp, bucket).examples("stage_a"))
    for n in prog.graph.nodes:
        val = n.meta.get("val")
        if isinstance(val, torch.Tensor):
            assert all(isinstance(s, int) for s in val.shape), f"{n.name} has a symbolic shape {val.shape}"
    outs = [s.arg.name for s in prog.graph_signature.output_specs]
    assert len(outs) == 3


def test_pass_refuses_what_it_cannot_rewrite(traced):
    ep, sp = traced
    kw = dict(n_visual_slots=150, mask_id=sp.mask)
    with pytest.raises(PassError, match="out of range"):
        insert_pruning(ep, PruneSettings(4, 0.5), k_static=50, **kw)
    with pytest.raises(PassError, match="k_static"):
        insert_pruning(ep, PruneSettings(1, 0.5), k_static=0, **kw)
    with pytest.raises(PassError, match="k_static"):
        insert_pruning(ep, PruneSettings(1, 0.5), k_static=151, **kw)
    with pytest.raises(PassError, match="no decoder layers"):
        insert_pruning(ep, PruneSettings(1, 0.5), k_static=50, layer_regex=r"blocks\.{layer}$", **kw)


def test_pass_needs_a_symbolic_length(tiny):
    model, tok, _ = tiny
    sp = special_tokens(tok)
    bucket = Bucket(20, 20, G, 2)
    static = torch.export.export(model.language, context(model, sp, bucket).examples("unpruned"))
    with pytest.raises(PassError, match="static prefix length"):
        insert_pruning(static, PruneSettings(1, 0.5), n_visual_slots=20, k_static=5, mask_id=sp.mask)


def test_the_cached_steps_two_programs_share_one_example_kv_cache(tiny):
    """torch.export keeps the example inputs a program was traced with (``ExportedProgram.example_inputs``, the
    very tensors; needed by AOTInductor's compile). The cached step is exported twice (functional and in place)
    and then precompiled: one example KV cache for all three (30 GiB unpruned at B = 16 on the GPU, where two
    copies beside the weights ran an 80 GB card out of memory), not one each."""
    from llada_export.exporter.programs import INPLACE, build_cached

    model, tok, _ = tiny
    bucket = Bucket(max_text_tokens=64, max_visual_tokens=32, gen_length=G, vision_batch=1, batch_size=2)
    ctx = context(model, special_tokens(tok), bucket, PruneSettings(2, 0.5))
    functional = build_cached(ctx)
    inplace = ctx.variants[INPLACE]["cached"]
    names = [t.name for t in ctx.io("cached").inputs]
    cache = names.index("kv_cache")
    a, b = functional.example_inputs[0], inplace.example_inputs[0]
    assert all(x is y for x, y in zip(a, b)) and a[cache] is ctx.examples("cached")[cache]
