"""The prefix KV cache: the eager cached model against the plain forward, and the cached engines
(ONNX Runtime, fp32) against the eager cached reference, token for token."""

from __future__ import annotations

import pytest
import torch

from helpers import fixed, PROMPTS, export, random_image
from llada_export.contract.pruning import PruneSettings
from llada_export.reference import embed_prompt, reference_generate
from llada_export.runtime.pipeline import Pipeline, RequestError
from llada_export.sampler import GenerationError
from llada_export.tokenizer import special_tokens


# ---------------------------------------------------------------------- the cache math (eager)
@pytest.mark.parametrize("block_start", [0, 5, 12])
def test_cached_step_equals_the_full_forward_on_the_same_ids(tiny, images, block_start):
    """With the cache filled from the same response ids, a cached step is the full forward: the cache
    holds exactly the K/V the full forward computes (prefix and earlier blocks)."""
    model, tok, _ = tiny
    lm, sp = model.language, special_tokens(tok)
    inp = embed_prompt(model, tok, images["380x250"], PROMPTS["long"])
    g, p = 16, inp.length
    ids = torch.full((1, g), sp.mask)
    ids[0, [1, 4, 9, 13]] = torch.tensor([7, 40, 99, 3])
    pos = torch.arange(p + g)[None]
    full = lm(inp.embeds, ids, pos)
    logits, kv = lm.prefill(inp.embeds, ids, pos)
    torch.testing.assert_close(logits, full, rtol=0, atol=1e-5)
    assert kv.shape == (len(lm.layers), 2, 1, model.config.text.num_key_value_heads, p + g,
                        model.config.text.head_dim)
    cached = lm.cached(ids, pos[:, p:], torch.ones(1, p + g, dtype=torch.bool), kv, torch.tensor([block_start]))
    torch.testing.assert_close(cached, full, rtol=0, atol=1e-4 * float(full.abs().max()))


def test_a_stale_cache_is_an_approximation(tiny, images):
    """Bidirectional attention: the prefix K/V depend on the response, so a cache filled before more
    tokens were committed gives (slightly) other logits than the full forward."""
    model, tok, _ = tiny
    lm, sp = model.language, special_tokens(tok)
    inp = embed_prompt(model, tok, images["380x250"], PROMPTS["short"])
    g, p = 16, inp.length
    pos = torch.arange(p + g)[None]
    old = torch.full((1, g), sp.mask)
    _, kv = lm.prefill(inp.embeds, old, pos)
    new = old.clone()
    new[0, :6] = torch.tensor([5, 6, 7, 8, 9, 10])
    stale = lm.cached(new, pos[:, p:], torch.ones(1, p + g, dtype=torch.bool), kv, torch.tensor([0]))
    assert (stale - lm(inp.embeds, new, pos)).abs().max() > 1e-4


# ---------------------------------------------------------------------- engines vs the eager cached reference
@pytest.fixture(scope="module")
def pipe(cache_engines):
    return Pipeline.load(cache_engines)


SETTINGS = [dict(refresh=1), dict(refresh=2), dict(refresh=5), dict(refresh=None), dict(factor=1.0),
            dict(factor=0.5, refresh=3), dict(threshold=0.9), dict(threshold=0.5, refresh=None)]


@pytest.mark.parametrize("settings", SETTINGS, ids=[str(s) for s in SETTINGS])
@pytest.mark.parametrize("unpruned", [False, True], ids=["pruned", "unpruned"])
@pytest.mark.parametrize("blocks", [1, 4])
def test_cached_engines_match_the_eager_cached_reference(pipe, tiny, images, settings, unpruned, blocks):
    model, tok, _ = tiny
    for img, prompt in (("380x250", "long"), ("384x384", "short")):  # two padded layouts of one bucket
        kw = dict(gen_length=16, block_length=16 // blocks, steps=16, cache=True, **settings)
        gen = pipe.generation_config(unpruned=unpruned, **fixed(kw))
        ref = reference_generate(model, tok, images[img], PROMPTS[prompt], gen, None if unpruned else PruneSettings(2, 0.5))
        got = pipe.generate(images[img], PROMPTS[prompt], unpruned=unpruned, **fixed(kw))
        assert got.ids == ref.ids, (img, prompt)
        assert got.kept_visual == (None if unpruned else ref.kept_visual)
        assert len(set(ref.ids)) > 2  # the random model's answer varies: the comparison could fail
        graphs = ("unpruned_prefill", "unpruned_cached") if unpruned else ("stage_a", "prefill", "cached")
        assert set(got.graph_calls) <= set(graphs)
        if gen.refresh != 1:  # the product's default refresh is 1 (every forward a prefill)
            assert got.graph_calls.get(graphs[-1], 0) > 0  # cached steps ran


@pytest.mark.parametrize("unpruned", [False, True], ids=["pruned", "unpruned"])
def test_refresh_one_equals_the_uncached_engines(pipe, images, unpruned):
    """Refreshing at every step recomputes everything: token for token the uncached engines."""
    for prompt in PROMPTS.values():
        uncached = pipe.generate(images["380x250"], prompt, fixed_schedule=True, preset="chartqa", unpruned=unpruned, cache=False)
        every = pipe.generate(images["380x250"], prompt, fixed_schedule=True, preset="chartqa", unpruned=unpruned, cache=True, refresh=1)
        assert every.ids == uncached.ids and every.kept_visual == uncached.kept_visual
        assert "cached" not in every.graph_calls and "unpruned_cached" not in every.graph_calls


def test_cache_changes_answers_somewhere_and_saves_forwards(pipe, images):
    """Guards the comparisons: a stale cache is not the uncached model (somewhere the answer
    differs), and the cached path runs mostly cached steps."""
    diff = 0
    for img in images.values():
        for prompt in PROMPTS.values():
            a = pipe.generate(img, prompt, fixed_schedule=True, preset="chartqa", cache=False)
            b = pipe.generate(img, prompt, fixed_schedule=True, preset="chartqa", cache=True, refresh=None)
            diff += a.ids != b.ids
            assert b.graph_calls == {"stage_a": 1, "prefill": 1, "cached": b.forwards - 2}
    assert diff > 0


def test_trained_model_answers_stop_early(demo_cache_engines):
    """The trained demo model answers in a token and stops at <|eot_id|>: its cached engines (parallel
    decoding too; conftest's G = 16 engines asked for 8 tokens) stop with the eager cached reference,
    right, in fewer forwards."""
    from llada_export import demo, vqa_task
    from llada_export.checkpoint.loader import load_checkpoint

    p = Pipeline.load(demo_cache_engines)
    model, tok, _ = load_checkpoint(demo.DEMO_MODEL)
    for s in [vqa_task.sample("test", 40 + i, qtype=t) for i, t in enumerate(("colour", "count", "digit"))]:
        for kw in (dict(refresh=4), dict(factor=1.0), dict(threshold=0.9)):
            gen = p.generation_config(gen_length=8, cache=True, **fixed(kw))
            ref = reference_generate(model, tok, s.image(), s.prompt, gen, PruneSettings(demo.DEMO_PRUNE_LAYER, demo.DEMO_KEEP))
            got = p.generate(s.image(), s.prompt, gen_length=8, cache=True, **fixed(kw))
            assert got.ids == ref.ids and got.text.strip() == s.answer
            assert got.forwards < 8 and (got.forwards <= 3 or "refresh" in kw)


# ---------------------------------------------------------------------- bad combinations
def test_engines_without_cache_graphs_refuse_cache(engines, images):
    p = Pipeline.load(engines)
    with pytest.raises(RequestError, match="re-export with --cache"):
        p.generate(images["384x384"], PROMPTS["short"], fixed_schedule=True, preset="mc", cache=True)
    with pytest.raises(RequestError, match="refresh applies to the prefix cache"):
        p.generate(images["384x384"], PROMPTS["short"], fixed_schedule=True, preset="mc", refresh=4)
    assert p.generate(images["384x384"], PROMPTS["short"], fixed_schedule=True, preset="mc").graph_calls == {"stage_a": 1, "stage_b": 1}


@pytest.mark.parametrize("kw, err, msg", [
    (dict(cache=True, cfg_scale=1.0), GenerationError, "classifier-free guidance"),
    (dict(factor=1.0, threshold=0.9), GenerationError, "not both"),
    (dict(cache=False, refresh=4), RequestError, "refresh applies to the prefix cache"),
    (dict(cache=True, refresh=0), GenerationError, "refresh must be a positive integer"),
    (dict(factor=1.0, remasking="random"), GenerationError, "low_confidence"),
])
def test_bad_combinations_are_clear(pipe, images, kw, err, msg):
    with pytest.raises(err, match=msg):
        pipe.generate(images["384x384"], PROMPTS["short"], preset="mc", **fixed(kw))


def test_cache_defaults_on_when_the_engines_have_it(pipe, images):
    r = pipe.generate(images["384x384"], PROMPTS["short"], fixed_schedule=True, preset="chartqa")
    assert r.settings["cache"] is True and r.settings["refresh"] == 1  # on, refreshed every forward
    assert "prefill" in r.graph_calls and "cached" not in r.graph_calls
    r = pipe.generate(images["384x384"], PROMPTS["short"], fixed_schedule=True, preset="chartqa", refresh=4)
    assert "cached" in r.graph_calls


def test_other_pruning_settings_with_the_cache(tiny_ckpt, tiny, tmp_path):
    """K 1, keep 0.25, scores from the last prompt token: the cache path follows the pruning path."""
    out = export(tiny_ckpt, tmp_path / "e", prune=PruneSettings(1, 0.25, "last"), cache=True, gen_length=16)
    p = Pipeline.load(out)
    model, tok, _ = tiny
    img = random_image(333, 222, 5)
    for kw in (dict(refresh=4), dict(factor=1.0)):
        gen = p.generation_config(preset="chartqa", cache=True, **fixed(kw))
        ref = reference_generate(model, tok, img, PROMPTS["long"], gen, PruneSettings(1, 0.25, "last"))
        got = p.generate(img, PROMPTS["long"], preset="chartqa", cache=True, **fixed(kw))
        assert got.ids == ref.ids and got.kept_visual == ref.kept_visual
