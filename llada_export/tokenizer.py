"""LLaDA-V tokenizer: special tokens, chat template, and the official ``<image>`` splitting.

Everything here works with any tokenizer that carries the official special tokens (the
real one, or the stand-ins of :mod:`llada_export.synthetic.tokenizer`): ids are always
resolved *by name* (:func:`special_tokens`).

Prompt encoding follows the official inference code: the chat template renders the
system and user messages, then the prompt is split on ``<image>`` and each chunk is
tokenized separately (:func:`tokenize_with_image`, same rule as the official
``tokenizer_image_token``, including its BOS offset quirk).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from .contract.tokens import SpecialTokens

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

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


def special_tokens(tokenizer: PreTrainedTokenizerBase) -> SpecialTokens:
    """The special token ids the sampler and the graphs need, resolved by name."""
    return SpecialTokens(
        mask=token_id(tokenizer, MASK_TOKEN),
        bos=token_id(tokenizer, BOS_TOKEN),
        eos=token_id(tokenizer, EOS_TOKEN),
        start_header=token_id(tokenizer, START_HEADER_TOKEN),
        end_header=token_id(tokenizer, END_HEADER_TOKEN),
        eot=token_id(tokenizer, EOT_TOKEN),
    )


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """``AutoTokenizer`` from a local directory, quietly: it also parses config.json, whose
    model_type (llava_llada) transformers does not know, and warns about that."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    finally:
        hf_logging.set_verbosity(level)


def has_tokenizer_files(path: str | Path) -> bool:
    return any((Path(path) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))


# ---------------------------------------------------------------------- prompts
def format_prompt(tokenizer: PreTrainedTokenizerBase, user_text: str, system: str = DEFAULT_SYSTEM_PROMPT,
                  history: Sequence[tuple[str, str]] = ()) -> str:
    """The prompt string the official conversation code builds: system + user message
    rendered by the chat template, ending with the assistant header. ``history``: the earlier
    turns of a conversation, ``(role, text)`` pairs (user, assistant, system) between the system
    message and ``user_text``, rendered by the same template, message by message."""
    messages = [{"role": "system", "content": system}, *({"role": r, "content": t} for r, t in history),
                {"role": "user", "content": user_text}]
    if not tokenizer.chat_template:  # transformers' own message points at its templating docs
        raise TokenizerError(f"{tokenizer.name_or_path}: no chat template: chat_template.jinja is missing (the "
                             "official LLaDA-V checkpoint ships it beside tokenizer_config.json); copy it there from "
                             "the model's release")
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
    history: Sequence[tuple[str, str]] = (),
) -> tuple[list[int], list[int]]:
    """Chat-format ``user_text`` (after the earlier turns ``history``, see :func:`format_prompt`) and
    tokenize it the official way.

    With an image, the user text holds at most one ``<image>`` marker where the image goes;
    without one the image goes first, ``"<image>\\n" + text``, as the official demo and
    evaluation write it (in a conversation: first in the first user message). Returns the ids
    before and after the image. Without an image there must be no marker; returns (all ids, []).
    """
    history = list(history)
    if has_image and not any(IMAGE_TOKEN in t for _, t in history) and IMAGE_TOKEN not in user_text:
        first = next((i for i, (r, _) in enumerate(history) if r == "user"), None)
        if first is None:
            user_text = IMAGE_TOKEN + "\n" + user_text
        else:
            history[first] = ("user", IMAGE_TOKEN + "\n" + history[first][1])
    prompt = format_prompt(tokenizer, user_text, system, history)
    n = prompt.count(IMAGE_TOKEN)
    if has_image and n > 1:
        raise PromptError(f"the prompt has {n} {IMAGE_TOKEN} markers; only one image per prompt is supported")
    if not has_image and n > 0:
        raise PromptError(
            f"the prompt has {n} {IMAGE_TOKEN} marker(s) but no image was given; pass an image or remove the marker"
        )
    ids = tokenize_with_image(tokenizer, prompt)
    return split_at_image(ids) if has_image else (ids, [])


# ---------------------------------------------------------------------- answers
def decode_answer(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int]) -> str:
    """Answer ids -> text: ``tokenizer.decode(ids, skip_special_tokens=True)``, except that the text never
    ends in a partial UTF-8 sequence. A byte-level BPE token can hold part of a character; an answer
    cut at ``gen_length`` (or before its ``<|eot_id|>``) inside one would end in U+FFFD. The bytes of
    those incomplete characters are cut (a U+FFFD the model wrote as a whole character stays)."""
    text = tokenizer.decode(list(ids), skip_special_tokens=True)
    if not text.endswith("\ufffd"):
        return text
    raw = _answer_bytes(tokenizer, ids)
    if raw is None:  # not a byte-level tokenizer: decode whole tokens, dropping the last few that end badly
        for k in range(len(ids) - 1, max(-1, len(ids) - 5), -1):
            if not (shorter := tokenizer.decode(list(ids[:k]), skip_special_tokens=True)).endswith("\ufffd"):
                return shorter
        return text
    cut = _incomplete_tail(raw)
    return text[: len(text) - cut] if cut and text.endswith("\ufffd" * cut) else text


def _incomplete_tail(raw: bytes) -> int:
    """How many U+FFFD at the end of ``raw.decode("utf-8", "replace")`` stand for bytes that make no
    character (a character's first bytes, or stray continuation bytes)."""
    cut = 0
    while raw and not raw.endswith("\ufffd".encode()):
        lossy = raw.decode("utf-8", "replace")
        if not lossy.endswith("\ufffd"):
            break
        # a U+FFFD replaces at most 3 bytes (the longest incomplete sequence): find how many
        j = next((j for j in (1, 2, 3) if raw[:-j].decode("utf-8", "replace") == lossy[:-1]), None)
        if j is None:
            break
        raw, cut = raw[:-j], cut + 1
    return cut


def _answer_bytes(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int]) -> bytes | None:
    """The bytes a byte-level BPE decodes ``ids`` from (special tokens skipped); None for other tokenizers."""
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    if type(decoder).__name__ != "ByteLevel":
        return None
    byte_of = _byte_decoder()
    added = set(tokenizer.get_added_vocab())
    out = bytearray()
    for tok in tokenizer.convert_ids_to_tokens(list(ids), skip_special_tokens=True):
        if tok in added or any(c not in byte_of for c in tok):
            out += tok.encode("utf-8")  # an added token is its text
        else:
            out += bytes(byte_of[c] for c in tok)
    return bytes(out)


def _byte_decoder() -> dict[str, int]:
    """The byte-level BPE alphabet: printable Latin-1 bytes stand for themselves, the other bytes for
    the characters from U+0100 on, in byte order."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    others = [b for b in range(256) if b not in set(kept)]
    return {**{chr(b): b for b in kept}, **{chr(256 + i): b for i, b in enumerate(others)}}
