"""Stand-in LLaDA-V tokenizers for tests, random checkpoints and the demo model.

The real LLaDA-V tokenizer is a byte-level BPE of 126k entries. The stand-ins are built
with the ``tokenizers`` library: a small byte-level BPE trained on a built-in English text
(plus, for the demo model, its task's words), plus the official special tokens. The
``"full"`` kind puts every special token at its official id inside a 126464-entry
vocabulary; the ``"tiny"`` kind is a few hundred entries.
"""

from __future__ import annotations

import json
from typing import Literal, Sequence

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from ..tokenizer import (ADDITIONAL_SPECIAL_TOKENS, BOS_TOKEN, CHAT_TEMPLATE, CLS_TOKEN, END_HEADER_TOKEN, EOS_TOKEN,
                         EOT_TOKEN, GMASK_TOKEN, MASK_TOKEN, MODEL_MAX_LENGTH, START_HEADER_TOKEN)

# ---------------------------------------------------------------------- full layout
FULL_VOCAB_SIZE = 126464
FIRST_SPECIAL_ID = 126080
# Official ids of the named special tokens. Every other id from FIRST_SPECIAL_ID up to
# FULL_VOCAB_SIZE holds ``<|reserved_token_{id - 126084}|>`` (the official names run
# 126084..126339; we continue the numbering up to the end of the embedding table).
OFFICIAL_IDS = {
    BOS_TOKEN: 126080,
    EOS_TOKEN: 126081,
    CLS_TOKEN: 126082,
    GMASK_TOKEN: 126083,
    MASK_TOKEN: 126336,
    "<role>": 126340,
    "</role>": 126341,
    "<|arithmetic_start|>": 126342,
    "<|arithmetic_end|>": 126343,
    "<|number_start|>": 126344,
    "<|number_end|>": 126345,
    START_HEADER_TOKEN: 126346,
    END_HEADER_TOKEN: 126347,
    EOT_TOKEN: 126348,
}
RESERVED_BASE_ID = 126084

# Built-in training text for the stand-in BPE (deterministic: same merges every run).
_BPE_TEXT = """\
The quick brown fox jumps over the lazy dog. What is shown in this image? Describe the
picture in detail. The image shows a small red house next to a large green tree, and a
person is walking a dog along the road. There are two cars parked on the street.
Answer the question using a single word or phrase. How many people are in the photo?
The chart shows the number of students in each year; the answer is 42. Please read the
text in the document and tell me what it says. You are a helpful language and vision
assistant. You are able to understand the visual content that the user provides, and
assist the user with a variety of tasks using natural language. The system and the user
talk to the assistant about the weather, the time, the colour of the sky and the sea.
"""
_BPE_VOCAB_SIZE = 384  # 256 byte symbols + up to 128 merges


# ---------------------------------------------------------------------- building
def _train_bpe(corpus: Sequence[str] = (), vocab_size: int = _BPE_VOCAB_SIZE
               ) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges of a small byte-level BPE trained on the built-in text plus
    ``corpus`` lines (deterministic for the same inputs)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_BPE_TEXT.splitlines() + list(corpus), trainer)
    model = json.loads(tok.to_str())["model"]
    return dict(model["vocab"]), [tuple(m) for m in model["merges"]]


def _special_layout(kind: str) -> list[str]:
    """Added (special) tokens in id order, starting right after the BPE vocabulary."""
    if kind == "tiny":
        return [BOS_TOKEN, EOS_TOKEN, CLS_TOKEN, GMASK_TOKEN, *ADDITIONAL_SPECIAL_TOKENS,
                START_HEADER_TOKEN, END_HEADER_TOKEN, EOT_TOKEN]
    by_id = {i: t for t, i in OFFICIAL_IDS.items()}
    return [by_id.get(i, f"<|reserved_token_{i - RESERVED_BASE_ID}|>") for i in range(FIRST_SPECIAL_ID, FULL_VOCAB_SIZE)]


def build_tokenizer(kind: Literal["tiny", "full"], add_bos: bool = False, corpus: Sequence[str] = (),
                    bpe_vocab_size: int = _BPE_VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """A stand-in LLaDA-V tokenizer (byte-level BPE + the official special tokens).

    ``kind="full"``: exactly 126464 entries; the BPE sits at the low ids, unused ids up
    to 126079 are unreachable filler entries ``<|filler_N|>``, and ids 126080.. hold the
    special tokens at their official ids (reserved tokens in between and after).
    ``kind="tiny"``: a few hundred entries, specials right after the BPE.

    ``add_bos=False`` is the official kind (``add_bos_token`` false: BOS comes only from
    the chat template text). ``add_bos=True`` is the other kind, whose post-processor
    prepends BOS to every encoded text itself.

    ``corpus`` (extra training lines) and ``bpe_vocab_size`` give a model its own BPE:
    the demo model's tokenizer is trained on its task's questions and answers, so every
    answer is one token (``tools/train_demo.py``).
    """
    if kind not in ("tiny", "full"):
        raise ValueError(f"tokenizer kind must be 'tiny' or 'full', not {kind!r}")
    vocab, merges = _train_bpe(corpus, bpe_vocab_size)
    if kind == "full":
        for i in range(len(vocab), FIRST_SPECIAL_ID):
            vocab[f"<|filler_{i}|>"] = i  # never produced by any merge
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = _special_layout(kind)
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    bos_id = tok.token_to_id(BOS_TOKEN)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN}:1 $B:1",
            special_tokens=[(BOS_TOKEN, bos_id)],
        )
    else:
        tok.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B:1")
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        cls_token=CLS_TOKEN,
        additional_special_tokens=list(ADDITIONAL_SPECIAL_TOKENS),
        add_bos_token=add_bos,
        add_eos_token=False,
        model_max_length=MODEL_MAX_LENGTH,
        clean_up_tokenization_spaces=False,
        chat_template=CHAT_TEMPLATE,
    )
    if kind == "full":
        assert len(hf) == FULL_VOCAB_SIZE, len(hf)
        for t, i in OFFICIAL_IDS.items():
            assert hf.convert_tokens_to_ids(t) == i, (t, i)
    return hf


