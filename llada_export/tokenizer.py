"""LLaDA-V tokenizer: special tokens, chat template, and the official ``<image>`` splitting.

The real LLaDA-V tokenizer is a byte-level BPE of 126k entries. For tests and random
checkpoints we build stand-ins with the ``tokenizers`` library (:func:`build_tokenizer`):
a small byte-level BPE trained on a built-in English text, plus the official special
tokens. The ``"full"`` kind puts every special token at its official id inside a
126464-entry vocabulary; the ``"tiny"`` kind is a few hundred entries.

Everything else here works with any tokenizer that carries the official special tokens
(the real one included): ids are always resolved *by name* (:class:`SpecialTokens`).

Prompt encoding follows the official inference code: the chat template renders the
system and user messages, then the prompt is split on ``<image>`` and each chunk is
tokenized separately (:func:`tokenize_with_image`, same rule as the official
``tokenizer_image_token``, including its BOS offset quirk).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal, Sequence

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

# ---------------------------------------------------------------------- token names
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"  # also the pad token
MASK_TOKEN = "<|mdm_mask|>"
START_HEADER_TOKEN = "<|start_header_id|>"
END_HEADER_TOKEN = "<|end_header_id|>"
EOT_TOKEN = "<|eot_id|>"
CLS_TOKEN = "[CLS]"
GMASK_TOKEN = "[gMASK]"

# The official ``additional_special_tokens`` (special_tokens_map.json), in that order.
ADDITIONAL_SPECIAL_TOKENS = [
    MASK_TOKEN, "<role>", "</role>", "<|arithmetic_start|>", "<|arithmetic_end|>",
    "<|number_start|>", "<|number_end|>",
]

IMAGE_TOKEN = "<image>"
IMAGE_SENTINEL = -200  # the official IMAGE_TOKEN_INDEX: where the visual embeddings go

# The official chat template (tokenizer_config.json of LLaDA-V), verbatim: BOS, then per
# message a header, the trimmed content and <|eot_id|>, then the assistant header.
CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
)

# The official conversation template ``llava_llada`` system prompt.
DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful language and vision assistant. "
    "You are able to understand the visual content that the user provides, "
    "and assist the user with a variety of tasks using natural language."
)

# The official tokenizer_config.json writes int(1e30) ("no limit").
MODEL_MAX_LENGTH = int(1e30)

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


class TokenizerError(ValueError):
    """A tokenizer lacks a token LLaDA-V needs."""


class PromptError(ValueError):
    """The prompt and the image inputs do not fit together (``<image>`` markers)."""


# ---------------------------------------------------------------------- special tokens
def token_id(tokenizer: PreTrainedTokenizerBase, token: str) -> int:
    """The id of ``token``, or :class:`TokenizerError` if the tokenizer does not hold it."""
    tid = tokenizer.convert_tokens_to_ids(token)
    if tid is None or tokenizer.convert_ids_to_tokens(tid) != token:
        raise TokenizerError(
            f"the tokenizer has no token {token!r} (is this an LLaDA / LLaDA-V tokenizer?)"
        )
    return int(tid)


@dataclass(frozen=True)
class SpecialTokens:
    """Ids of the special tokens the sampler and prompt code need, resolved by name."""

    mask: int
    bos: int
    eos: int  # also pad
    start_header: int
    end_header: int
    eot: int

    @classmethod
    def from_tokenizer(cls, tokenizer: PreTrainedTokenizerBase) -> "SpecialTokens":
        return cls(
            mask=token_id(tokenizer, MASK_TOKEN),
            bos=token_id(tokenizer, BOS_TOKEN),
            eos=token_id(tokenizer, EOS_TOKEN),
            start_header=token_id(tokenizer, START_HEADER_TOKEN),
            end_header=token_id(tokenizer, END_HEADER_TOKEN),
            eot=token_id(tokenizer, EOT_TOKEN),
        )

    @property
    def pad(self) -> int:
        return self.eos

    def suppressed(self) -> list[int]:
        """Ids the official sampler sets to -inf at masked positions ([eos, bos,
        start_header, end_header]); ``<|eot_id|>`` is not suppressed."""
        return [self.eos, self.bos, self.start_header, self.end_header]


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


# ---------------------------------------------------------------------- prompts
def format_prompt(tokenizer: PreTrainedTokenizerBase, user_text: str, system: str = DEFAULT_SYSTEM_PROMPT) -> str:
    """The prompt string the official conversation code builds: system + user message
    rendered by the chat template, ending with the assistant header."""
    messages = [{"role": "system", "content": system}, {"role": "user", "content": user_text}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def tokenize_with_image(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of ``text`` with :data:`IMAGE_SENTINEL` where each ``<image>`` was.

    Same result as the official ``tokenizer_image_token``: each chunk between markers is
    tokenized on its own (``tokenizer(chunk).input_ids``, so a BOS-adding tokenizer adds
    BOS to every chunk). If the first chunk starts with BOS, one BOS is kept and the
    first token of *every* chunk is dropped (the chunk 0 BOS already kept; for later
    chunks that is their auto-added BOS, or, with a tokenizer that adds no BOS, their
    real first token, e.g. the ``"\\n"`` after ``<image>``).
    """
    chunks = [tokenizer(chunk).input_ids for chunk in text.split(IMAGE_TOKEN)]
    offset = 1 if chunks and chunks[0] and chunks[0][0] == tokenizer.bos_token_id else 0
    ids: list[int] = [chunks[0][0]] if offset else []
    for i, chunk in enumerate(chunks):
        if i > 0:
            ids.append(IMAGE_SENTINEL)
        ids.extend(chunk[offset:])
    return ids


def split_at_image(ids: Sequence[int]) -> tuple[list[int], list[int]]:
    """Split ids holding exactly one :data:`IMAGE_SENTINEL` into (before, after)."""
    n = sum(1 for i in ids if i == IMAGE_SENTINEL)
    if n != 1:
        raise PromptError(f"expected exactly one {IMAGE_TOKEN} in the prompt, found {n}")
    k = list(ids).index(IMAGE_SENTINEL)
    return list(ids[:k]), list(ids[k + 1:])


def encode_prompt(
    tokenizer: PreTrainedTokenizerBase,
    user_text: str,
    has_image: bool,
    system: str = DEFAULT_SYSTEM_PROMPT,
) -> tuple[list[int], list[int]]:
    """Chat-format ``user_text`` and tokenize it the official way.

    With an image, the user text must hold exactly one ``<image>`` marker (the official
    demo writes ``"<image>\\n" + question``); returns the ids before and after it. Without
    an image there must be no marker; returns (all ids, []).
    """
    prompt = format_prompt(tokenizer, user_text, system)
    n = prompt.count(IMAGE_TOKEN)
    if has_image and n == 0:
        raise PromptError(
            f"an image was given but the prompt has no {IMAGE_TOKEN} marker; put {IMAGE_TOKEN} where the "
            f"image goes, e.g. '{IMAGE_TOKEN}\\nWhat is shown?'"
        )
    if has_image and n > 1:
        raise PromptError(f"the prompt has {n} {IMAGE_TOKEN} markers; only one image per prompt is supported")
    if not has_image and n > 0:
        raise PromptError(
            f"the prompt has {n} {IMAGE_TOKEN} marker(s) but no image was given; pass an image or remove the marker"
        )
    ids = tokenize_with_image(tokenizer, prompt)
    return split_at_image(ids) if has_image else (ids, [])
