"""The runtime pipeline (ONNX Runtime, fp32) against the eager oracles, token for token.

- pruned engines (stage A at step 1, stage B after) == ``reference_generate(prune=PruneSettings(K, keep))``,
  same answer ids and the same kept visual tokens;
- the unpruned graph of the same directory (``unpruned=True``) == ``reference_generate(prune=None)``;
- keep = 1.0 engines (nothing pruned) == the unpruned reference;
- requests that do not fit the bucket fail with an error naming the export flag to change.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch

from helpers import KEEP, PROMPTS, PRUNE_LAYER, export, random_image
from llada_export.contract.manifest import ManifestError
from llada_export.contract.pruning import PruneSettings
from llada_export.reference import reference_generate
from llada_export.graphs.anyres import ImageError
from llada_export.runtime.pipeline import Pipeline, Request, RequestError
from llada_export.sampler import GenerationError, preset
from llada_export.tokenizer import PromptError, encode_prompt

IMAGE_NAMES = ("380x250", "384x384")
# mc (2 steps) and chartqa (16 steps) on every image x prompt pair; demo (128 steps) on two pairs.
CASES = ([(p, i, q) for p in ("mc", "chartqa") for i in IMAGE_NAMES for q in PROMPTS]
         + [("demo", "380x250", "short"), ("demo", "384x384", "long")])


def text_of(ref) -> str:
    """The reference's answer as the pipeline writes it: the reference decodes its ids as they are, the
    pipeline cuts the bytes of a character that the answer's last tokens leave incomplete (U+FFFD)."""
    return ref.text.rstrip("\ufffd")


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
                pruned=pipe.generate(image, text, fixed_schedule=True, preset=p),
                unpruned=pipe.generate(image, text, fixed_schedule=True, preset=p, unpruned=True),
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
    assert got.text == text_of(ref)
    assert 0 < len(got.ids) <= preset(p).gen_length
    assert {"vision", "stage_a_per_call", "stage_b_per_call", "total"} <= set(got.timings)
    assert got.graph_calls == {"stage_a": 1, "stage_b": got.forwards - 1}


@pytest.mark.parametrize("p, img, prompt", CASES, ids=["-".join(c) for c in CASES])
def test_unpruned_graph_matches_unpruned_reference(run_case, p, img, prompt):
    r = run_case(p, img, prompt)
    got, ref = r["unpruned"], r["ref_unpruned"]
    assert got.kept_visual is None
    assert got.ids == ref.ids
    assert got.text == text_of(ref)
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
    got = pipe.generate(None, text, fixed_schedule=True, preset="chartqa")
    full = pipe.generate(None, text, fixed_schedule=True, preset="chartqa", unpruned=True)
    assert got.n_visual == 0 and got.kept_visual == []
    assert got.ids == ref.ids
    assert full.ids == ref.ids


# ---------------------------------------------------------------------- request errors
def test_prompt_longer_than_bucket(pipe, images):
    long_prompt = "<image>\n" + " ".join(f"word{i}" for i in range(400))
    with pytest.raises(RequestError, match="--max-prompt-tokens"):
        pipe.generate(images["384x384"], long_prompt, fixed_schedule=True, preset="mc")


def test_image_with_too_many_visual_tokens(pipe):
    with pytest.raises(RequestError, match="--image-size") as e:
        pipe.generate(random_image(1024, 768, 3), PROMPTS["short"], fixed_schedule=True, preset="mc")
    assert str(pipe.bucket.max_visual_tokens) in str(e.value)


def test_gen_length_larger_than_built(pipe, images):
    g = pipe.bucket.gen_length * 2
    with pytest.raises(RequestError, match="--gen-length"):
        pipe.generate(images["384x384"], PROMPTS["short"], fixed_schedule=True, gen_length=g)
    with pytest.raises(RequestError, match="--gen-length"):
        pipe.generate(images["384x384"], PROMPTS["short"], fixed_schedule=True, preset="demo", gen_length=g, block_length=g, steps=g)


def test_image_without_marker_goes_first(pipe, images):
    """As the official evaluation writes it: "<image>\n" + question."""
    plain = pipe.generate(images["384x384"], "What is here?", fixed_schedule=True, preset="chartqa")
    marked = pipe.generate(images["384x384"], "<image>\nWhat is here?", fixed_schedule=True, preset="chartqa")
    assert plain.ids == marked.ids and plain.kept_visual == marked.kept_visual
    b1, _ = encode_prompt(pipe.tokenizer, "What is here?", has_image=True)
    b2, _ = encode_prompt(pipe.tokenizer, "<image>\nWhat is here?", has_image=True)
    assert b1 == b2


def test_two_markers_are_refused(pipe, images):
    with pytest.raises(PromptError, match="2 <image> markers"):
        pipe.generate(images["384x384"], "<image> and <image>", fixed_schedule=True, preset="mc")


def test_marker_without_image(pipe):
    with pytest.raises(PromptError, match="no image"):
        pipe.generate(None, PROMPTS["short"], fixed_schedule=True, preset="mc")


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
    got = pipe.generate(images[img], PROMPTS[prompt], fixed_schedule=True, preset="chartqa")
    ref = reference_generate(model, tok, images[img], PROMPTS[prompt], preset("chartqa"), prune=None)
    assert got.ids == ref.ids
    start = len(encode_prompt(tok, PROMPTS[prompt], has_image=True)[0])
    assert got.kept_visual == list(range(start, start + got.n_visual))


def test_unpruned_request_without_baseline_graph(keep_all_engines, images):
    pipe = Pipeline.load(keep_all_engines, backend="onnxruntime")
    with pytest.raises(RequestError, match="--baseline"):
        pipe.generate(images["384x384"], PROMPTS["short"], fixed_schedule=True, preset="chartqa", unpruned=True)


AOTI_CASES = [("mc", "380x250", "short"), ("chartqa", "384x384", "long"), ("demo", "380x250", "long")]


@pytest.mark.parametrize("p, img, prompt", AOTI_CASES, ids=["-".join(c) for c in AOTI_CASES])
def test_aoti_pipeline_matches_pruned_reference(aoti_engines, tiny, images, p, img, prompt):
    """The AOTInductor backend (layer 1, keep 0.35, G 128) against the eager pruned reference."""
    model, tok, _ = tiny
    pipe = Pipeline.load(aoti_engines)
    assert pipe.backend == "aoti"
    ref = reference_generate(model, tok, images[img], PROMPTS[prompt], preset(p), PruneSettings(1, 0.35))
    got = pipe.generate(images[img], PROMPTS[prompt], fixed_schedule=True, preset=p)
    assert got.ids == ref.ids
    assert got.kept_visual == ref.kept_visual


# ---------------------------------------------------------------------- sampling through the engines
@pytest.fixture(scope="module")
def cache_pipe(cache_engines):
    """Engines with the prefix cache, G 16, batch size 3 (the shared session set)."""
    return Pipeline.load(cache_engines, backend="onnxruntime")


def test_seeded_sampling_in_a_batch_is_each_request_alone_and_the_reference(cache_pipe, tiny, images):
    """temperature > 0: each row samples from its own seeded generator, so a row of a batch is the request
    run alone and the eager reference with the same seed; the same seed repeats, another seed differs."""
    model, tok, _ = tiny
    kw = dict(gen_length=16, block_length=8, steps=16, temperature=0.8)
    rows = [Request(images["380x250"], PROMPTS["long"], seed=1), Request(images["384x384"], PROMPTS["short"], seed=2),
            Request(images["380x250"], PROMPTS["long"], seed=3)]
    batch = cache_pipe.generate_batch(rows, **kw)
    gen = cache_pipe.generation_config(**kw)
    assert gen.cache  # these engines' default
    for r, got in zip(rows, batch):
        alone = cache_pipe.generate(r.image, r.prompt, seed=r.seed, **kw)
        ref = reference_generate(model, tok, r.image, r.prompt, gen, PruneSettings(PRUNE_LAYER, KEEP), seed=r.seed)
        assert got.ids == alone.ids == ref.ids, r.seed
        assert got.kept_visual == ref.kept_visual
    assert batch[0].ids != batch[2].ids  # same request, another seed: another answer
    greedy = cache_pipe.generate(images["380x250"], PROMPTS["long"], fixed_schedule=True, gen_length=16, block_length=8, steps=16)
    assert greedy.ids != batch[0].ids  # the temperature is used


@pytest.mark.parametrize("unpruned", [False, True], ids=["pruned", "unpruned"])
def test_random_remasking_matches_the_reference(pipe, tiny, images, unpruned):
    model, tok, _ = tiny
    gen = preset("chartqa")
    prune = None if unpruned else PruneSettings(PRUNE_LAYER, KEEP)
    answers = {}
    for seed in (4, 5):
        got = pipe.generate(images["384x384"], PROMPTS["long"], fixed_schedule=True, preset="chartqa", remasking="random", seed=seed,
                            unpruned=unpruned)
        ref = reference_generate(model, tok, images["384x384"], PROMPTS["long"], replace(gen, remasking="random"),
                                 prune, seed=seed)
        assert got.ids == ref.ids and got.kept_visual == ref.kept_visual
        assert got.settings["remasking"] == "random" and got.settings["seed"] == seed
        answers[seed] = got.ids
    again = pipe.generate(images["384x384"], PROMPTS["long"], fixed_schedule=True, preset="chartqa", remasking="random", seed=4,
                          unpruned=unpruned)
    assert again.ids == answers[4] and answers[4] != answers[5]


@pytest.mark.parametrize("unpruned", [False, True], ids=["pruned", "unpruned"])
def test_cfg_runs_the_unconditional_forward_as_the_reference(pipe, tiny, images, unpruned):
    """cfg_scale > 0: every step also runs the engines with the prompt masked (the unconditional forward)."""
    model, tok, _ = tiny
    gen = replace(preset("chartqa"), cfg_scale=1.5)
    prune = None if unpruned else PruneSettings(PRUNE_LAYER, KEEP)
    got = pipe.generate(images["380x250"], PROMPTS["long"], fixed_schedule=True, preset="chartqa", cfg_scale=1.5, unpruned=unpruned)
    ref = reference_generate(model, tok, images["380x250"], PROMPTS["long"], gen, prune)
    plain = pipe.generate(images["380x250"], PROMPTS["long"], fixed_schedule=True, preset="chartqa", unpruned=unpruned)
    assert got.ids == ref.ids and got.kept_visual == ref.kept_visual
    assert got.ids != plain.ids  # guidance changed the answer: the comparison above could fail
    assert sum(got.graph_calls.values()) == 2 * got.forwards == len(ref.calls)  # two forwards a step


def test_system_prompt_and_on_step(pipe, tiny, images):
    """``system`` replaces the default system prompt (the reference with it gives the same answer);
    ``on_step`` sees every forward, in order, with the ids so far; the last one holds the answer."""
    model, tok, _ = tiny
    system = "Answer in one word."
    events = []
    got = pipe.generate(images["384x384"], PROMPTS["short"], fixed_schedule=True, preset="chartqa", system=system, on_step=events.append)
    ref = reference_generate(model, tok, images["384x384"], PROMPTS["short"], preset("chartqa"),
                             PruneSettings(PRUNE_LAYER, KEEP), system=system)
    default = reference_generate(model, tok, images["384x384"], PROMPTS["short"], preset("chartqa"),
                                 PruneSettings(PRUNE_LAYER, KEEP))
    assert got.ids == ref.ids and got.kept_visual == ref.kept_visual
    assert ref.ids != default.ids  # the system prompt reached the model
    assert pipe.check(Request(images["384x384"], PROMPTS["short"], system), 16)[0] != \
        pipe.check(Request(images["384x384"], PROMPTS["short"]), 16)[0]
    assert got.settings["system"] == system
    assert [e.index for e in events] == list(range(1, got.forwards + 1))
    mask = pipe.tokens.mask
    for before, e in zip([None, *events], events):  # each step commits exactly what it says it committed
        was = before.ids[0] if before is not None else torch.full_like(e.ids[0], mask)
        assert (e.committed[0] == ((was == mask) & (e.ids[0] != mask))).all()
    assert int(events[0].committed[0].sum()) == 1  # chartqa: 16 steps for 16 positions
    assert events[-1].done.all() and not events[0].done.any()
    assert events[-1].ids[0, : len(got.ids)].tolist() == got.ids


# ---------------------------------------------------------------------- what a result records
def test_result_records_the_settings_that_reproduce_it(pipe, images):
    """``settings`` go back into generate() as they are and give the same answer (seeded sampling,
    random remasking, a parallel rule); ``finish_reason`` says whether the answer reached <|eot_id|>."""
    r = pipe.generate(images["380x250"], PROMPTS["long"], preset="chartqa", temperature=0.7, seed=11,
                      threshold=0.2, system="Be brief.")
    d = json.loads(json.dumps(r.to_dict()))  # as a JSON reader gets it
    assert d["settings"] == dict(gen_length=16, block_length=16, steps=16, temperature=0.7,
                                 remasking="low_confidence", cfg_scale=0.0, factor=None, threshold=0.2, fixed_schedule=False,
                                 cache=False,
                                 seed=11, system="Be brief.", unpruned=False)
    assert d["pruning"] == {"layer": PRUNE_LAYER, "keep": KEEP, "score_from": "response"}
    assert pipe.generate(images["380x250"], PROMPTS["long"], **d["settings"]).ids == r.ids
    other = pipe.generate(images["380x250"], PROMPTS["long"], **{**d["settings"], "seed": 12})
    assert other.ids != r.ids  # the seed is part of what reproduces it
    full = pipe.generate(images["380x250"], PROMPTS["long"], fixed_schedule=True, preset="mc", unpruned=True)
    assert full.pruning is None and full.settings["unpruned"] is True


@pytest.mark.parametrize("img, prompt, reason", [("380x250", "long", "stop"), ("384x384", "short", "length")])
def test_finish_reason(pipe, tok_eot, images, img, prompt, reason):
    events = []
    r = pipe.generate(images[img], PROMPTS[prompt], fixed_schedule=True, preset="chartqa", on_step=events.append)
    reached_eot = tok_eot in events[-1].ids[0].tolist()  # the response before the answer is cut
    assert reached_eot == (reason == "stop") and r.finish_reason == reason
    assert r.to_dict()["finish_reason"] == reason


@pytest.fixture(scope="module")
def tok_eot(pipe):
    return pipe.tokens.eot


def test_answer_never_ends_in_a_partial_utf8_sequence(pipe, tiny, images):
    """The random model's byte-level tokens can stop inside a character: the raw decode then ends in
    U+FFFD; the answer ends before that character's bytes."""
    model, tok, _ = tiny
    q = "What colour is it?"
    r = pipe.generate(images["384x384"], q, fixed_schedule=True, preset="chartqa")
    ref = reference_generate(model, tok, images["384x384"], q, preset("chartqa"), PruneSettings(PRUNE_LAYER, KEEP))
    assert r.ids == ref.ids
    raw = tok.decode(r.ids, skip_special_tokens=True)
    assert raw.endswith("\ufffd")  # this case does end inside a character
    assert r.text == raw[:-1] and not r.text.endswith("\ufffd")
    r.text.encode("utf-8")


# ---------------------------------------------------------------------- bad inputs: one rule, clear errors
NAN, INF = float("nan"), float("inf")
BAD_CALLS = [
    (dict(prompt=None), PromptError, "prompt must be a string, got None"),
    (dict(prompt=""), PromptError, "prompt is empty"),
    (dict(prompt=" \n\t"), PromptError, "prompt is empty"),
    (dict(prompt="<image>\n"), PromptError, "prompt is empty"),
    (dict(prompt="hi \udcff"), PromptError, "not valid UTF-8 text: the byte 0xff at character 3"),
    (dict(prompt="hi \ud800"), PromptError, "not valid UTF-8 text: a lone surrogate"),
    (dict(system="\udc80"), PromptError, "system is not valid UTF-8"),
    (dict(seed=-1), GenerationError, "seed must be from 0 to 2\\*\\*63 - 1"),
    (dict(seed=2**63), GenerationError, "seed must be from 0 to 2\\*\\*63 - 1"),
    (dict(seed=1.5), GenerationError, "seed must be an integer"),
    (dict(temperature=INF), GenerationError, "temperature must be a finite number, got inf"),
    (dict(temperature=NAN), GenerationError, "temperature must be a finite number, got nan"),
    (dict(temperature=-1.0), GenerationError, "temperature must be >= 0"),
    (dict(temperature="0.5"), GenerationError, "temperature must be a number"),
    (dict(cfg_scale=NAN), GenerationError, "cfg_scale must be a finite number"),
    (dict(factor=INF), GenerationError, "factor must be a finite number"),
    (dict(threshold=NAN), GenerationError, "threshold must be a finite number"),
    (dict(gen_length=0), GenerationError, "gen_length must be a positive integer"),
    (dict(cache="yes"), GenerationError, "cache must be True, False or None"),
    (dict(image="{dir}"), ImageError, "is a directory, not an image file"),
]


@pytest.mark.parametrize("kw, err, msg", BAD_CALLS, ids=[str(k) for k, _, _ in BAD_CALLS])
def test_bad_inputs_are_refused_by_name(pipe, images, tmp_path, kw, err, msg):
    kw = {"image": images["384x384"], "prompt": "What is here?", "preset": "mc", **kw}
    if kw["image"] == "{dir}":
        kw["image"] = tmp_path
    with pytest.raises(err, match=msg) as e:
        pipe.generate(**kw)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("requests, msg", [
    ([], "got no requests"),
    ("What is here?", "takes a list of requests"),
    (("img", "What is here?"), "takes a list of requests"),
    ([("img", "What is here?", 3)], r"requests\[0\] is a tuple of 3: pass Request\(image, prompt"),
    ([{"image": None, "question": "hi"}], r"requests\[0\] is a dict with question: .*Request's fields"),
    ([42], r"requests\[0\] is a int: pass Request"),
])
def test_generate_batch_refuses_what_is_not_a_request(pipe, requests, msg):
    with pytest.raises(RequestError, match=msg):
        pipe.generate_batch(requests, fixed_schedule=True, preset="mc")


def test_a_bad_request_of_a_batch_is_named(cache_pipe, images):
    reqs = [Request(images["384x384"], "What is here?"), Request(images["384x384"], "What?", seed=-2)]
    with pytest.raises(GenerationError, match=r"^requests\[1\]: seed must be from 0"):
        cache_pipe.generate_batch(reqs, fixed_schedule=True, preset="mc")


def test_generate_batch_takes_pairs_and_dicts(pipe, images):
    one = pipe.generate(images["384x384"], "What is here?", fixed_schedule=True, preset="mc", seed=3)
    pair, = pipe.generate_batch([(images["384x384"], "What is here?")], fixed_schedule=True, preset="mc")
    mapping, = pipe.generate_batch([{"image": images["384x384"], "prompt": "What is here?", "seed": 3}], fixed_schedule=True, preset="mc")
    assert pair.ids == mapping.ids == one.ids and mapping.settings["seed"] == 3


@pytest.mark.parametrize("threads", [0, -1, True, 1.5])
def test_load_refuses_bad_thread_counts(engines, threads):
    with pytest.raises(ValueError, match="threads must be a positive integer"):
        Pipeline.load(engines, threads=threads)


def test_load_refuses_weights_from_for_engines_that_hold_their_weights(engines, tiny_ckpt):
    """ONNX engines carry their weights: a --weights checkpoint would be silently ignored, so it is refused."""
    with pytest.raises(ManifestError, match="hold their own weights"):
        Pipeline.load(engines, weights_from=str(tiny_ckpt))


def test_cfg_with_the_cache_says_how_to_turn_it_off(cache_pipe, images):
    """The cache engines use their cache by default; guidance needs the full forward."""
    with pytest.raises(GenerationError, match=r"turn the cache off \(llada-generate --no-cache; cache=False"):
        cache_pipe.generate(images["380x250"], PROMPTS["long"], fixed_schedule=True, gen_length=16, cfg_scale=1.0)


def test_refresh_never_as_the_cli_and_http_spell_it(cache_pipe, tiny, images):
    model, tok, _ = tiny
    never = cache_pipe.generate(images["380x250"], PROMPTS["long"], fixed_schedule=True, gen_length=16, block_length=4, steps=16,
                                refresh="never")
    gen = cache_pipe.generation_config(gen_length=16, block_length=4, steps=16, refresh=None, fixed_schedule=True)
    ref = reference_generate(model, tok, images["380x250"], PROMPTS["long"], gen, PruneSettings(PRUNE_LAYER, KEEP))
    assert never.ids == ref.ids and never.settings["refresh"] == "never"
    # stage A at step 1, the cache filled at step 2, then refreshed only at the 3 other blocks' starts
    assert never.graph_calls["stage_a"] == 1 and never.graph_calls["prefill"] == 1 + 3


def test_gen_length_over_the_engines_maximum_is_said_first(engines):
    """A gen_length over the engines' (e.g. 100000, whose blocks do not divide the steps either) is
    refused with the maximum, not a divisibility rule."""
    import pytest
    from llada_export.runtime.pipeline import Pipeline

    pipe = Pipeline.load(engines)
    g = pipe.bucket.gen_length
    with pytest.raises(ValueError, match=f"gen_length 100000 exceeds the engines' maximum {g}"):
        pipe.generation_config(gen_length=100000)


def test_bf16_onnx_engines_on_the_cpu_are_refused_in_one_line(bf16_onnx_engines):
    """ONNX Runtime's CPU provider has no bfloat16 kernels for these graphs: loading them says so and
    what to do, instead of ONNX Runtime's NOT_IMPLEMENTED traceback."""
    import pytest
    import torch
    from llada_export.engines.registry import BackendError
    from llada_export.runtime.pipeline import Pipeline

    if torch.cuda.is_available():
        pytest.skip("a CUDA machine may run them through onnxruntime-gpu")
    with pytest.raises(BackendError, match="no bfloat16 kernel for this graph; run these engines on a GPU"):
        Pipeline.load(bf16_onnx_engines, device="cpu")
