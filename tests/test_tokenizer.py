"""Stand-in tokenizers, special tokens, chat template and the official <image> split."""

from __future__ import annotations

import pytest

from llada_export.synthetic.tokenizer import FULL_VOCAB_SIZE, OFFICIAL_IDS, build_tokenizer
from llada_export.tokenizer import (
    BOS_TOKEN,
    CHAT_TEMPLATE,
    DEFAULT_SYSTEM_PROMPT,
    IMAGE_SENTINEL,
    PromptError,
    TokenizerError,
    encode_prompt,
    format_prompt,
    special_tokens,
    split_at_image,
    tokenize_with_image,
)

QUESTION = "<image>\nWhat is shown in the image?"
BEFORE_TEXT = (
    "<|startoftext|><|start_header_id|>system<|end_header_id|>\n\n" + DEFAULT_SYSTEM_PROMPT
    + "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
)
AFTER_TEXT = "\nWhat is shown in the image?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"


@pytest.fixture(scope="module", params=[False, True], ids=["official", "auto_bos"])
def tiny(request):
    return build_tokenizer("tiny", add_bos=request.param)


@pytest.fixture(scope="module")
def full():
    return build_tokenizer("full")


def raw_ids(tok, text):
    """Token ids of ``text`` without any post-processing (no auto BOS)."""
    return tok(text, add_special_tokens=False).input_ids


# ---------------------------------------------------------------------- vocabulary
def test_full_vocab_layout(full):
    assert len(full) == FULL_VOCAB_SIZE
    st = special_tokens(full)
    assert (st.bos, st.eos, st.mask, st.start_header, st.end_header, st.eot) == (
        126080, 126081, 126336, 126346, 126347, 126348)
    for tok, i in OFFICIAL_IDS.items():
        assert full.convert_ids_to_tokens(i) == tok
    assert full.convert_ids_to_tokens(126084) == "<|reserved_token_0|>"
    assert full.convert_ids_to_tokens(126339) == "<|reserved_token_255|>"
    assert full.convert_ids_to_tokens(FULL_VOCAB_SIZE - 1).startswith("<|reserved_token_")
    # Specials are atomic, and ordinary text never produces filler or reserved ids.
    ids = raw_ids(full, "hello <|mdm_mask|> world <|eot_id|>")
    assert 126336 in ids and 126348 in ids
    assert all(i < 126080 or i in (126336, 126348) for i in ids)


def test_tiny_vocab(tiny):
    assert 256 < len(tiny) < 1000
    st = special_tokens(tiny)
    assert len({st.mask, st.bos, st.eos, st.start_header, st.end_header, st.eot}) == 6
    assert tiny.pad_token_id == st.eos == st.pad
    assert tiny.decode(raw_ids(tiny, "The quick brown fox.")) == "The quick brown fox."


def test_build_is_deterministic():
    a, b = build_tokenizer("tiny"), build_tokenizer("tiny")
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()


def test_suppressed_ids(tiny):
    st = special_tokens(tiny)
    assert st.suppressed() == [st.eos, st.bos, st.start_header, st.end_header]
    assert st.eot not in st.suppressed() and st.mask not in st.suppressed()


def test_missing_special_token_is_a_clear_error():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.BPE(vocab={"a": 0, "<|startoftext|>": 1}, merges=[]))
    t.pre_tokenizer = pre_tokenizers.ByteLevel()
    hf = PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<|startoftext|>")
    with pytest.raises(TokenizerError, match="mdm_mask"):
        special_tokens(hf)


def test_auto_bos_kind(tiny):
    bos = tiny.convert_tokens_to_ids(BOS_TOKEN)
    ids = tiny("hello").input_ids
    assert (ids[0] == bos) == tiny.add_bos_token
    assert ids[-1] != bos


# ---------------------------------------------------------------------- chat template
def test_chat_template_matches_official_string(tiny):
    assert tiny.chat_template == CHAT_TEMPLATE
    assert format_prompt(tiny, QUESTION) == BEFORE_TEXT + "<image>" + AFTER_TEXT


def test_chat_template_trims_content(tiny):
    assert format_prompt(tiny, "  hi \n", system=" sys ") == (
        "<|startoftext|><|start_header_id|>system<|end_header_id|>\n\nsys<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


# ---------------------------------------------------------------------- <image> split
def test_official_kind_drops_newline_after_image():
    tok = build_tokenizer("tiny", add_bos=False)
    bos = tok.convert_tokens_to_ids(BOS_TOKEN)
    newline = raw_ids(tok, "\n")
    # Expected, by hand: the first chunk tokenized as is (its BOS comes from the
    # template text); the second chunk loses its first token, which is the "\n".
    before = raw_ids(tok, BEFORE_TEXT)
    after = raw_ids(tok, AFTER_TEXT)
    assert before[0] == bos and after[: len(newline)] == newline == [after[0]]
    expected = before + [IMAGE_SENTINEL] + after[1:]
    assert tokenize_with_image(tok, format_prompt(tok, QUESTION)) == expected
    assert encode_prompt(tok, QUESTION, has_image=True) == (before, after[1:])


def test_auto_bos_kind_drops_the_added_bos():
    tok = build_tokenizer("tiny", add_bos=True)
    bos = tok.convert_tokens_to_ids(BOS_TOKEN)
    # Each chunk gets an auto BOS; the first chunk keeps it (so two BOS: auto + template),
    # every chunk drops its first token: for the second chunk that is the auto BOS, so
    # the "\n" after <image> survives.
    before = [bos] + raw_ids(tok, BEFORE_TEXT)
    after = raw_ids(tok, AFTER_TEXT)
    assert before[:2] == [bos, bos]
    expected = before + [IMAGE_SENTINEL] + after
    assert tokenize_with_image(tok, format_prompt(tok, QUESTION)) == expected
    assert encode_prompt(tok, QUESTION, has_image=True) == (before, after)


def test_full_kind_split_uses_official_ids(full):
    before, after = encode_prompt(full, QUESTION, has_image=True)
    assert before[:2] == [126080, 126346] and before[-3] == 126347
    assert after.index(126348) + 1 == after.index(126346) and after[-3] == 126347  # eot, header ... end_header \n\n


def test_no_image_prompt(tiny):
    before, after = encode_prompt(tiny, "What is two plus two?", has_image=False)
    assert after == [] and IMAGE_SENTINEL not in before
    assert before == tokenize_with_image(tiny, format_prompt(tiny, "What is two plus two?"))


def test_sentinel_for_every_image():
    tok = build_tokenizer("tiny")
    ids = tokenize_with_image(tok, "a<image>b<image>c")
    assert ids.count(IMAGE_SENTINEL) == 2


@pytest.mark.parametrize(
    "text, has_image, match",
    [
        ("<image><image>\nCompare.", True, "2 <image> markers"),
        ("<image>\nWhat is shown?", False, "no image was given"),
    ],
)
def test_prompt_errors(tiny, text, has_image, match):
    with pytest.raises(PromptError, match=match):
        encode_prompt(tiny, text, has_image=has_image)


def test_split_at_image_errors():
    assert split_at_image([1, IMAGE_SENTINEL, 2]) == ([1], [2])
    with pytest.raises(PromptError, match="found 0"):
        split_at_image([1, 2])
    with pytest.raises(PromptError, match="found 2"):
        split_at_image([IMAGE_SENTINEL, 1, IMAGE_SENTINEL])


def test_image_goes_first_without_a_marker(tiny):
    """As the official demo and evaluation write it: "<image>\\n" + question."""
    assert encode_prompt(tiny, "What is shown?", has_image=True) == \
        encode_prompt(tiny, "<image>\nWhat is shown?", has_image=True)
