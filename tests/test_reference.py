"""The eager oracles: unpruned model, key mask, scoring, and the LLaDA-FastV pruned reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers import PROMPTS
from llada_export.contract.pruning import PruneSettings, PruneSettingsError, num_kept
from llada_export.graphs.pruning import query_weights, select_tokens, visual_scores
from llada_export.reference import ReferenceDenoiser, embed_prompt, reference_generate
from llada_export.sampler import preset
from llada_export.tokenizer import special_tokens


@pytest.fixture(scope="module")
def prompt_inputs(tiny, images):
    model, tok, _ = tiny
    return embed_prompt(model, tok, images["380x250"], PROMPTS["short"])


@pytest.mark.parametrize("layer", [0, 2, 3])
def test_keep_one_reproduces_unpruned_tokens(tiny, images, layer):
    model, tok, _ = tiny
    gen = preset("chartqa")
    full = reference_generate(model, tok, images["380x250"], PROMPTS["short"], gen)
    pruned = reference_generate(model, tok, images["380x250"], PROMPTS["short"], gen, PruneSettings(layer, 1.0))
    assert len(set(full.ids)) > 2, "degenerate random model: the comparison could not fail"
    assert pruned.ids == full.ids
    n_before = len(embed_prompt(model, tok, images["380x250"], PROMPTS["short"]).ids_before)
    assert pruned.kept_visual == list(range(n_before, n_before + len(pruned.kept_visual)))


@pytest.mark.parametrize("keep", [0.1, 0.35, 0.5])
def test_kept_count_and_original_positions(tiny, prompt_inputs, keep):
    model, tok, _ = tiny
    sp = special_tokens(tok)
    g = 16
    den = ReferenceDenoiser(model, prompt_inputs, sp.mask, PruneSettings(2, keep))
    resp = torch.full((1, g), sp.mask)
    den(resp)  # step 1 decides the pruning
    n_vis = prompt_inputs.n_visual
    k = int(keep * n_vis + 0.5)
    kept = den.kept_visual
    assert len(kept) == k
    vis_pos = prompt_inputs.visual_mask[0].nonzero().flatten()
    assert set(kept.tolist()) <= set(vis_pos.tolist())
    assert torch.equal(kept, kept.sort().values)

    # Step 2 on the reduced sequence must use the ORIGINAL position ids (gaps kept).
    resp2 = resp.clone()
    resp2[0, :3] = torch.tensor([5, 6, 7])
    got = den(resp2)[0]
    p = prompt_inputs.length
    keep_pos = torch.cat([torch.arange(p)[~prompt_inputs.visual_mask[0]], kept]).sort().values  # [P']
    prefix = prompt_inputs.embeds[:, keep_pos]
    pos = torch.cat([keep_pos, torch.arange(p, p + g)])[None]
    expect = model.denoise(prefix, resp2, pos)[0]
    renumbered = model.denoise(prefix, resp2, torch.arange(pos.shape[1])[None])[0]
    torch.testing.assert_close(got, expect, rtol=0, atol=1e-6)
    assert (got - renumbered).abs().max() > 1e-3


def test_key_mask_padding_leaves_real_logits_unchanged(tiny, prompt_inputs):
    model, _, _ = tiny
    g, p = 8, prompt_inputs.length
    resp = torch.randint(0, 300, (1, g))
    pos = torch.arange(p + g)[None]
    base = model.denoise(prompt_inputs.embeds, resp, pos)
    ones = model.denoise(prompt_inputs.embeds, resp, pos, torch.ones(1, p + g, dtype=torch.bool))
    torch.testing.assert_close(ones, base, rtol=0, atol=1e-6)  # all-ones mask == no mask

    # Insert 13 junk slots in the middle of the prompt and 5 at its end, masked out.
    cut = p // 2
    junk = torch.randn(1, 13, prompt_inputs.embeds.shape[-1]) * 5
    tail = torch.randn(1, 5, prompt_inputs.embeds.shape[-1]) * 5
    emb = torch.cat([prompt_inputs.embeds[:, :cut], junk, prompt_inputs.embeds[:, cut:], tail], dim=1)
    pos_pad = torch.cat([torch.arange(cut), torch.zeros(13, dtype=torch.long), torch.arange(cut, p),
                         torch.zeros(5, dtype=torch.long), torch.arange(p, p + g)])[None]
    mask = torch.ones_like(pos_pad, dtype=torch.bool)
    mask[0, cut:cut + 13] = False
    mask[0, p + 13: p + 18] = False
    padded = model.denoise(emb, resp, pos_pad, mask)
    # fp32 summation order differs with 18 more (masked) keys: 1e-5 of the logits' scale (~10 here)
    torch.testing.assert_close(padded, base, rtol=0, atol=1e-5 * float(base.abs().max()))
    unmasked = model.denoise(emb, resp, pos_pad)
    assert (unmasked - base).abs().max() > 1e-3  # the mask is what makes it equal


def test_visual_scores_match_attention_probabilities():
    torch.manual_seed(0)
    b, h, l, hd, g = 1, 4, 30, 16, 6
    q, k = torch.randn(b, h, l, hd), torch.randn(b, h, l, hd)
    key_mask = torch.ones(b, l, dtype=torch.bool)
    key_mask[0, 10:13] = False
    w = torch.zeros(b, l)
    w[0, -g:] = 1.0 / g
    # Attention probabilities through SDPA with the identity as values (an independent path).
    eye = torch.eye(l).expand(b, h, l, l)
    probs = F.scaled_dot_product_attention(q, k, eye, attn_mask=key_mask[:, None, None, :])  # [B, H, L, L]
    expect = probs[:, :, -g:].mean(dim=(1, 2))  # mean over heads and the response queries
    torch.testing.assert_close(visual_scores(q, k, key_mask, w, g), expect, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(visual_scores(q, k, key_mask, w, None), expect, rtol=1e-5, atol=1e-6)


def test_select_tokens_keeps_top_visual_and_marks_dead_picks():
    scores = torch.tensor([[0.9, 0.1, 0.5, 0.7, 0.2, 0.3, 0.95, 0.0]])
    visual = torch.tensor([[0, 1, 1, 1, 1, 1, 1, 0]], dtype=torch.bool)  # slots 1..6, slot 6 padded
    key = torch.tensor([[1, 1, 1, 1, 1, 1, 0, 1]], dtype=torch.bool)
    index, alive = select_tokens(scores, visual, key, torch.tensor([2]), n_visual_slots=6, k_static=3)
    # real visual ranking: 3 (0.7), 2 (0.5), 5 (0.3), 4, 1; padded slot 6 ranks last despite 0.95
    assert index.tolist() == [[0, 2, 3, 5, 7]]
    assert alive.tolist() == [[True, True, True, False, True]]  # slot 5 is the 3rd pick, over num_keep=2
    assert num_kept(0.35, 1485) == 520 and num_kept(0.5, 3) == 2 and num_kept(0.01, 10) == 1


def test_prune_settings_errors(tiny, prompt_inputs):
    model, tok, _ = tiny
    with pytest.raises(PruneSettingsError, match="out of range"):
        ReferenceDenoiser(model, prompt_inputs, 0, PruneSettings(4, 0.5))
    with pytest.raises(PruneSettingsError, match="keep must be in"):
        ReferenceDenoiser(model, prompt_inputs, 0, PruneSettings(1, 1.5))
    with pytest.raises(PruneSettingsError, match="score source"):
        PruneSettings(1, 0.5, "middle").validate()


def test_score_sources_weight_the_right_queries():
    """``text`` and ``last`` against weights built by hand from the layout (``response``: the masked
    response slots)."""
    mask_id = 99
    # layout: [t t v v v t pad | r r r r]: text 0,1,5; visual 2-4; slot 6 padding; response 7-10
    key = torch.tensor([[1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1]], dtype=torch.bool)
    vis = torch.tensor([[0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    pos = torch.tensor([[0, 1, 2, 3, 4, 5, 0, 6, 7, 8, 9]])
    resp = torch.tensor([[mask_id, 7, mask_id, mask_id]])
    text = query_weights("text", key, vis, resp, pos, mask_id)
    expect = torch.zeros(1, 11)
    expect[0, [0, 1, 5, 7, 8, 9, 10]] = 1 / 7  # every real non-visual slot, response included
    torch.testing.assert_close(text, expect)
    last = query_weights("last", key, vis, resp, pos, mask_id)
    expect = torch.zeros(1, 11)
    expect[0, 5] = 1.0  # the last real prompt token (position 5), not the padding slot after it
    torch.testing.assert_close(last, expect)
    response = query_weights("response", key, vis, resp, pos, mask_id)
    expect = torch.zeros(1, 11)
    expect[0, [7, 9, 10]] = 1 / 3  # the still-masked response slots
    torch.testing.assert_close(response, expect)


@pytest.mark.parametrize("source", ["text", "last"])
def test_visual_scores_for_text_and_last_sources(source):
    """The scores are the weighted mean (over those queries) of the head-mean attention
    probabilities, computed here with SDPA as an independent path."""
    torch.manual_seed(1)
    b, h, l, hd, g = 1, 3, 12, 8, 4
    q, k = torch.randn(b, h, l, hd), torch.randn(b, h, l, hd)
    key = torch.ones(b, l, dtype=torch.bool)
    key[0, 6] = False
    vis = torch.zeros(b, l, dtype=torch.bool)
    vis[0, 2:5] = True
    pos = torch.arange(l)[None]
    w = query_weights(source, key, vis, torch.full((b, g), 5), pos, 5)  # [B, L]
    probs = F.scaled_dot_product_attention(q, k, torch.eye(l).expand(b, h, l, l), attn_mask=key[:, None, None, :])
    per_query = probs.mean(1)  # [B, L, L]
    rows = w[0].nonzero().flatten()
    expect = per_query[0, rows].mean(0)[None]  # equal weights over the chosen queries
    torch.testing.assert_close(visual_scores(q, k, key, w), expect, rtol=1e-5, atol=1e-6)
