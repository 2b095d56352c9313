"""The one rule for request values (``runtime.inputs``), the sampler settings that use it, and answers
that never end inside a character (``tokenizer.decode_answer``)."""

from __future__ import annotations

import pytest

from llada_export.runtime.inputs import (GenerationError, PromptError, check_number, check_prompt, check_refresh,
                                         check_seed)
from llada_export.sampler import GenerationConfig
from llada_export.tokenizer import decode_answer

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("field, value", [(f, v) for f in ("temperature", "cfg_scale", "factor", "threshold")
                                          for v in (INF, -INF, NAN)])
def test_non_finite_settings_are_refused(field, value):
    """inf / nan never pass as 'no limit' or 'greedy': temperature inf gave an empty answer, nan was greedy."""
    with pytest.raises(GenerationError, match=f"{field} must be a finite number"):
        GenerationConfig(16, 16, 16, **{field: value}).validate()


@pytest.mark.parametrize("value, msg", [(True, "must be a number"), ("1", "must be a number"), (None, "must be a number"),
                                        (-0.5, "must be >= 0"), (1e999, "finite"), (10**400, "finite number, got an integer of 401 digits")])
def test_check_number(value, msg):
    with pytest.raises(GenerationError, match=msg):
        check_number(value, "temperature", low=0.0)
    assert check_number(2, "x", low=0.0) == 2.0 and check_number(1.0, "t", low=0.0, high=1.0, low_open=True) == 1.0


@pytest.mark.parametrize("seed", [-1, 2**63, 2**70, True, 1.0, "3", None])
def test_seed_range_is_one_rule(seed):
    with pytest.raises(GenerationError, match="seed must be"):
        check_seed(seed)


def test_seed_bounds_accepted():
    assert check_seed(0) == 0 and check_seed(2**63 - 1) == 2**63 - 1


@pytest.mark.parametrize("value, expect", [(None, None), ("never", None), (" Never ", None), (1, 1), (32, 32)])
def test_refresh_values(value, expect):
    assert check_refresh(value) == expect


@pytest.mark.parametrize("value", [0, -3, "sometimes", True, 2.5])
def test_bad_refresh(value):
    with pytest.raises(GenerationError, match="refresh must be a positive integer or 'never'"):
        check_refresh(value)


@pytest.mark.parametrize("prompt, msg", [
    (None, "prompt must be a string, got None"), (b"hi", "prompt must be a string, got bytes"),
    ("", "prompt is empty"), ("  \n", "prompt is empty"), ("<image>", "prompt is empty"),
    ("caf\udce9", "not valid UTF-8 text: the byte 0xe9 at character 3"), ("\ud83d!", "a lone surrogate"),
])
def test_bad_prompts(prompt, msg):
    with pytest.raises(PromptError, match=msg) as e:
        check_prompt(prompt)
    assert "\n" not in str(e.value)


def test_good_prompts():
    for p in ("What is here?", "<image>\nWhat is here?", "Qu'est-ce que c'est ? \u4e2d\U0001f600"):
        assert check_prompt(p) == p


# ---------------------------------------------------------------------- decoded answers
def _ids(tok, text: str) -> list[int]:
    ids = tok(text).input_ids
    return ids[1:] if ids and ids[0] == tok.bos_token_id else ids


@pytest.mark.parametrize("text, cut", [("4\u00e9", 1), ("ok \u4e2d", 1), ("ok \u4e2d", 2), ("\U0001f600", 1),
                                       ("\U0001f600", 2), ("\U0001f600", 3)])
def test_an_answer_cut_inside_a_character_drops_its_bytes(tiny, text, cut):
    """The tiny byte-level BPE spells these characters one byte a token: stopping ``cut`` bytes short
    leaves a partial UTF-8 sequence, which the raw decode shows as U+FFFD."""
    _, tok, _ = tiny
    ids = _ids(tok, text)
    assert len(ids) > cut and tok.decode(ids) == text
    part = ids[:-cut]
    assert tok.decode(part, skip_special_tokens=True).endswith("\ufffd")
    whole = text.encode()[: len(text.encode()) - cut].decode("utf-8", "ignore")
    assert decode_answer(tok, part) == whole


def test_complete_answers_and_a_written_replacement_character_are_kept(tiny):
    _, tok, _ = tiny
    for text in ("What is here?", "a \ufffd", "\u4e2d\ufffd"):
        assert decode_answer(tok, _ids(tok, text)) == text
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    assert decode_answer(tok, _ids(tok, "ok") + [eot]) == "ok"  # special tokens skipped, as decode does
    assert decode_answer(tok, []) == ""


def test_stray_bytes_at_the_end_are_cut(tiny):
    """Two leading bytes in a row (each an incomplete character) and a lone continuation byte."""
    _, tok, _ = tiny
    lead = _ids(tok, "\u4e2d")[:1]  # 0xe4
    cont = _ids(tok, "\u00e9")[1:]  # 0xa9
    assert decode_answer(tok, _ids(tok, "ok") + lead + lead) == "ok"
    assert decode_answer(tok, _ids(tok, "ok") + cont) == "ok"
