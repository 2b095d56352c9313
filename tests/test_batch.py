"""Batched engines (--batch-size 3): a request's answer does not depend on what else is in its batch."""

from __future__ import annotations

import pytest

from helpers import fixed, PROMPTS, random_image
from llada_export.contract.manifest import Manifest
from llada_export.contract.pruning import PruneSettings
from llada_export.reference import reference_generate
from llada_export.runtime.pipeline import Pipeline, Request, RequestError


@pytest.fixture(scope="module")
def pipe(cache_engines):
    return Pipeline.load(cache_engines)


def mixed_requests(images):
    """Different image sizes, prompt lengths and a text-only request, in one batch."""
    return [Request(images["380x250"], PROMPTS["long"]), Request(random_image(200, 300, 9), PROMPTS["short"]),
            Request(None, "Name three colours.")]


def test_graphs_have_the_batch_dimension(cache_engines):
    m = Manifest.read(cache_engines)
    assert m.bucket.batch_size == 3
    for name, io in m.graphs.items():
        lead = 2 if any(t.name == "kv_cache" for t in io.inputs + io.outputs) else 0
        for t in io.inputs + io.outputs:
            if name != "vision":  # the vision graph batches crops, one request at a time
                assert t.shape[2 if t.name == "kv_cache" else 0] == 3, (name, t.name, lead)


SETTINGS = [dict(cache=False), dict(cache=True, refresh=4), dict(cache=True, factor=1.0),
            dict(cache=True, threshold=0.5, refresh=None)]


@pytest.mark.parametrize("settings", SETTINGS, ids=[str(s) for s in SETTINGS])
@pytest.mark.parametrize("unpruned", [False, True], ids=["pruned", "unpruned"])
def test_batch_equals_one_at_a_time_and_the_reference(pipe, tiny, images, settings, unpruned):
    model, tok, _ = tiny
    reqs = mixed_requests(images)
    batched = pipe.generate_batch(reqs, preset="chartqa", unpruned=unpruned, **fixed(settings))
    for r, got in zip(reqs, batched):
        alone = pipe.generate(r.image, r.prompt, preset="chartqa", unpruned=unpruned, **fixed(settings))
        gen = pipe.generation_config(preset="chartqa", unpruned=unpruned, **fixed(settings))
        ref = reference_generate(model, tok, r.image, r.prompt, gen, None if unpruned else PruneSettings(2, 0.5))
        assert got.ids == alone.ids == ref.ids
        assert got.kept_visual == alone.kept_visual == (None if unpruned else ref.kept_visual)
        assert got.forwards == alone.forwards
    assert len({tuple(b.ids) for b in batched}) == 3  # three different answers: rows did not mix


def test_partial_batch_and_order(pipe, images):
    """Two requests on batch-3 engines (one dead row), in either order."""
    a, b, _ = mixed_requests(images)
    ab = pipe.generate_batch([a, b], fixed_schedule=True, preset="chartqa")
    ba = pipe.generate_batch([b, a], fixed_schedule=True, preset="chartqa")
    assert [r.ids for r in ab] == [r.ids for r in reversed(ba)]
    assert ab[0].timings["batch_size"] == 2


def test_more_requests_than_the_batch_is_refused(pipe, images):
    with pytest.raises(RequestError, match="at most 3 at once"):
        pipe.generate_batch(mixed_requests(images) + [Request(None, "hi")], fixed_schedule=True, preset="mc")


def test_one_bad_request_names_itself_and_runs_nothing(pipe, images):
    reqs = mixed_requests(images)
    reqs[1] = Request(random_image(1024, 768, 1), "too big")
    with pytest.raises(RequestError, match="visual tokens"):
        pipe.generate_batch(reqs, fixed_schedule=True, preset="mc")
