"""The runtime pipeline (ONNX Runtime, fp32) against the eager oracles, token for token.

- pruned engines (stage A at step 1, stage B after) == ``reference_generate(prune=PruneSettings(K, keep))``,
  same answer ids and the same kept visual tokens;
- the unpruned graph of the same directory (``unpruned=True``) == ``reference_generate(prune=None)``;
- keep = 1.0 engines (nothing pruned) == the unpruned reference;
- requests that do not fit the bucket fail with an error naming the export flag to change.
"""

from __future__ import annotations

import math

import pytest

from helpers import KEEP, PROMPTS, PRUNE_LAYER, export, random_image
from llada_export.contract.pruning import PruneSettings
from llada_export.reference import reference_generate
from llada_export.runtime.pipeline import Pipeline, RequestError
from llada_export.sampler import preset
from llada_export.tokenizer import PromptError, encode_prompt

IMAGE_NAMES = ("380x250", "384x384")
# mc (2 steps) and chartqa (16 steps) on every image x prompt pair; demo (128 steps) on two pairs.
CASES = ([(p, i, q) for p in ("mc", "chartqa") for i in IMAGE_NAMES for q in PROMPTS]
         + [("demo", "380x250", "short"), ("demo", "384x384", "long")])


def round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


@pytest.fixture(scope="module")
def pipe(engines):
    return Pipeline.load(engines, backend="onnxruntime")


@pytest.fixture(scope="module")
def run_case(pipe, tiny, images):
    """(preset, image name, prompt name) -> dict of the four answers, computed once per module."""
    model, tok, _ = tiny
    cache: dict[tuple[str, str, str], dict] = {}

    def run(p: str, img: str, prompt: str) -> dict:
        key = (p, img, prompt)
        if key not in cache:
            image, text, gen = images[img], PROMPTS[prompt], preset(p)
            cache[key] = dict(
                pruned=pipe.generate(image, text, preset=p),
                unpruned=pipe.generate(image, text, preset=p, unpruned=True),
                ref_pruned=reference_generate(model, tok, image, text, gen, prune=PruneSettings(PRUNE_LAYER, KEEP)),
                ref_unpruned=reference_generate(model, tok, image, text, gen, prune=None),
            )
        return cache[key]

    return run


@pytest.mark.parametrize("p, img, prompt", CASES, ids=["-".join(c) for c in CASES])
def test_pruned_engines_match_pruned_reference(run_case, p, img, prompt):
    r = run_case(p, img, prompt)
    got, ref = r["pruned"], r["ref_pruned"]
    assert got.kept_visual is not None and ref.kept_visual is not None
    assert got.kept_visual == ref.kept_visual
    assert got.ids == ref.ids
    assert got.text == ref.text
    assert 0 < len(got.ids) <= preset(p).gen_length
    assert {"vision", "stage_a_per_call", "stage_b_per_call", "total"} <= set(got.timings)
    assert got.graph_calls == {"stage_a": 1, "stage_b": got.forwards - 1}


@pytest.mark.parametrize("p, img, prompt", CASES, ids=["-".join(c) for c in CASES])
def test_unpruned_graph_matches_unpruned_reference(run_case, p, img, prompt):
    r = run_case(p, img, prompt)
    got, ref = r["unpruned"], r["ref_unpruned"]
    assert got.kept_visual is None
    assert got.ids == ref.ids
    assert got.text == ref.text
    assert got.graph_calls == {"unpruned": got.forwards}


def test_answers_vary_and_pruning_changes_something(run_case):
    """Guards the comparisons above: the random model's answers are not constant, and the
    pruned path is really pruned (its answers differ from the unpruned ones somewhere)."""
    chart = [run_case("chartqa", i, q) for i in IMAGE_NAMES for q in PROMPTS]
    assert any(len(set(r["pruned"].ids)) > 1 for r in chart), "every answer is one repeated token"
    assert any(len(set(r["unpruned"].ids)) > 1 for r in chart), "every answer is one repeated token"
    assert len({tuple(r["pruned"].ids) for r in chart}) > 1, "all requests give the same answer"
    all_cases = [run_case(*c) for c in CASES if c[0] != "demo"]
    assert any(r["pruned"].ids != r["unpruned"].ids for r in all_cases), \
        "pruning at keep 0.5 never changed an answer: is the pruned path really pruned?"


@pytest.mark.parametrize("img", IMAGE_NAMES)
@pytest.mark.parametrize("prompt", list(PROMPTS))
def test_kept_count_and_span(run_case, pipe, img, prompt):
    r = run_case("chartqa", img, prompt)["pruned"]
    w, h = map(int, img.split("x"))
    from llada_export.graphs.anyres import visual_token_count

    assert r.n_visual == visual_token_count(w, h, pipe.config)
    assert len(r.kept_visual) == round_half_up(KEEP * r.n_visual)
    before, _ = encode_prompt(pipe.tokenizer, PROMPTS[prompt], has_image=True)
    start = len(before)  # visual tokens occupy positions start .. start + n_visual - 1
    assert r.kept_visual == sorted(set(r.kept_visual))
    assert all(start <= k < start + r.n_visual for k in r.kept_visual)
    # Pruning picks by score, not simply the first k slots.
    assert r.kept_visual != list(range(start, start + len(r.kept_visual)))


def test_text_only_request(pipe, tiny):
    """No image: nothing to prune; stage A/B and the unpruned graph all equal the unpruned reference."""
    model, tok, _ = tiny
    text = "Name three colours."
    ref = reference_generate(model, tok, None, text, preset("chartqa"), prune=None)
    got = pipe.generate(None, text, preset="chartqa")
    full = pipe.generate(None, text, preset="chartqa", unpruned=True)
    assert got.n_visual == 0 and got.kept_visual == []
    assert got.ids == ref.ids
    assert full.ids == ref.ids


# ---------------------------------------------------------------------- request errors
def test_prompt_longer_than_bucket(pipe, images):
    long_prompt = "<image>\n" + " ".join(f"word{i}" for i in range(400))
    with pytest.raises(RequestError, match="--max-prompt-tokens"):
        pipe.generate(images["384x384"], long_prompt, preset="mc")


def test_image_with_too_many_visual_tokens(pipe):
    with pytest.raises(RequestError, match="--image-size") as e:
        pipe.generate(random_image(1024, 768, 3), PROMPTS["short"], preset="mc")
    assert str(pipe.bucket.max_visual_tokens) in str(e.value)


def test_gen_length_larger_than_built(pipe, images):
    g = pipe.bucket.gen_length * 2
    with pytest.raises(RequestError, match="--gen-length"):
        pipe.generate(images["384x384"], PROMPTS["short"], gen_length=g)
    with pytest.raises(RequestError, match="--gen-length"):
        pipe.generate(images["384x384"], PROMPTS["short"], preset="demo", gen_length=g, block_length=g, steps=g)


def test_image_without_marker_goes_first(pipe, images):
    """As the official evaluation writes it: "<image>\n" + question."""
    plain = pipe.generate(images["384x384"], "What is here?", preset="chartqa")
    marked = pipe.generate(images["384x384"], "<image>\nWhat is here?", preset="chartqa")
    assert plain.ids == marked.ids and plain.kept_visual == marked.kept_visual
    b1, _ = encode_prompt(pipe.tokenizer, "What is here?", has_image=True)
    b2, _ = encode_prompt(pipe.tokenizer, "<image>\nWhat is here?", has_image=True)
    assert b1 == b2


def test_two_markers_are_refused(pipe, images):
    with pytest.raises(PromptError, match="2 <image> markers"):
        pipe.generate(images["384x384"], "<image> and <image>", preset="mc")


def test_marker_without_image(pipe):
    with pytest.raises(PromptError, match="no image"):
        pipe.generate(None, PROMPTS["short"], preset="mc")


# ---------------------------------------------------------------------- keep = 1.0
@pytest.fixture(scope="module")
def keep_all_engines(tiny_ckpt, tmp_path_factory):
    """keep 1.0 at layer 1, G = 16, no unpruned graph: nothing is pruned."""
    return export(tiny_ckpt, tmp_path_factory.mktemp("engines_keep1") / "onnx", prune=PruneSettings(1, 1.0),
                  gen_length=16)


@pytest.mark.parametrize("img", IMAGE_NAMES)
@pytest.mark.parametrize("prompt", list(PROMPTS))
def test_keep_all_matches_unpruned_reference(keep_all_engines, tiny, images, img, prompt):
    model, tok, _ = tiny
    pipe = Pipeline.load(keep_all_engines, backend="onnxruntime")
    assert pipe.pruned and pipe.keep == 1.0 and not pipe.has_unpruned
    got = pipe.generate(images[img], PROMPTS[prompt], preset="chartqa")
    ref = reference_generate(model, tok, images[img], PROMPTS[prompt], preset("chartqa"), prune=None)
    assert got.ids == ref.ids
    start = len(encode_prompt(tok, PROMPTS[prompt], has_image=True)[0])
    assert got.kept_visual == list(range(start, start + got.n_visual))


def test_unpruned_request_without_baseline_graph(keep_all_engines, images):
    pipe = Pipeline.load(keep_all_engines, backend="onnxruntime")
    with pytest.raises(RequestError, match="--baseline"):
        pipe.generate(images["384x384"], PROMPTS["short"], preset="chartqa", unpruned=True)


AOTI_CASES = [("mc", "380x250", "short"), ("chartqa", "384x384", "long"), ("demo", "380x250", "long")]


@pytest.mark.parametrize("p, img, prompt", AOTI_CASES, ids=["-".join(c) for c in AOTI_CASES])
def test_aoti_pipeline_matches_pruned_reference(aoti_engines, tiny, images, p, img, prompt):
    """The AOTInductor backend (layer 1, keep 0.35, G 128) against the eager pruned reference."""
    model, tok, _ = tiny
    pipe = Pipeline.load(aoti_engines)
    assert pipe.backend == "aoti"
    ref = reference_generate(model, tok, images[img], PROMPTS[prompt], preset(p), PruneSettings(1, 0.35))
    got = pipe.generate(images[img], PROMPTS[prompt], preset=p)
    assert got.ids == ref.ids
    assert got.kept_visual == ref.kept_visual
