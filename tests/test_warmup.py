"""``Pipeline.warmup()`` on engines exported for a small bucket (``--image-size 384x288``: 118 visual slots,
fewer than the 136 of a 64x64 image on the tiny config): loading with warm-up succeeds, warm-up runs every
graph of every batch size (vision, stage A, the full graphs, prefill and cached step), and the engines
still answer as the eager oracle afterwards."""

from __future__ import annotations

import pytest

from helpers import KEEP, PRUNE_LAYER, random_image
from llada_export.contract.pruning import PruneSettings
from llada_export.graphs.anyres import visual_token_count
from llada_export.reference import reference_generate
from llada_export.runtime.pipeline import Pipeline, Request

SMALL = (384, 288)  # 118 visual tokens on the tiny config


@pytest.fixture(scope="module")
def small(multi_size_engines):
    """Pruned graphs with the prefix cache, batch sizes 1, 2 and 4, a 384x288 bucket (conftest's
    multi_size_engines, shared with test_batch_sizes)."""
    return multi_size_engines


def test_the_bucket_is_smaller_than_a_64px_image(small, tiny):
    """The case that failed: the blank 64x64 image warm-up used gives more visual tokens than the slots."""
    cfg = tiny[2]
    v = Pipeline.load(small, backend="onnxruntime", warmup=False).bucket.max_visual_tokens
    assert v == visual_token_count(*SMALL, cfg) < visual_token_count(64, 64, cfg)


def test_load_with_warmup_runs_every_graph_then_answers_as_the_oracle(small, tiny):
    model, tok, _ = tiny
    p = Pipeline.load(small, backend="onnxruntime", warmup=False)
    calls = set()
    for size, runners in p.sized_runners.items():
        for name, r in runners.items():
            run = r.run
            r.run = lambda feeds, run=run, name=name, size=size: calls.add((size, name)) or run(feeds)
    assert p.warmup() > 0
    assert calls == {(s, g) for s, rs in p.sized_runners.items() for g in rs}  # every graph of every size

    # Pipeline.load's own warm-up (on by request; on by default for CUDA-graph backends) succeeds too
    p = Pipeline.load(small, backend="onnxruntime", warmup=True)
    image = random_image(*SMALL, seed=4)
    asks = ((image, "<image>\nWhat is here?"), (None, "Name a colour."))
    for cache in (False, True):
        gen = p.generation_config(preset="chartqa", cache=cache)
        got = p.generate_batch([Request(*a) for a in asks], config=gen)
        for r, (img, q) in zip(got, asks):
            ref = reference_generate(model, tok, img, q, gen, PruneSettings(PRUNE_LAYER, KEEP))
            assert r.ids == ref.ids and r.kept_visual == ref.kept_visual


def test_warmup_image_fits_every_bucket(tiny):
    """The blank image's size: 64x64 where it fits (as before), else one whose visual tokens fit the slots;
    none where no image fits (fewer slots than the base crop's tokens: warm-up runs text only)."""
    from llada_export.runtime.pipeline import _warmup_image_size

    cfg = tiny[2]
    assert _warmup_image_size(visual_token_count(64, 64, cfg), cfg) == (64, 64)
    for v in (70, 100, 118, 135):
        w, h = _warmup_image_size(v, cfg)
        assert visual_token_count(w, h, cfg) <= v
    assert _warmup_image_size(0, cfg) is None and _warmup_image_size(10, cfg) is None
