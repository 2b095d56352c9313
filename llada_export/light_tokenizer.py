"""The engines' tokenizer without transformers: ``tokenizers`` for the ids, ``jinja2`` for the chat template.

``Pipeline.load`` spent 4.2 s of a 20 s load of full-size engines on the tokenizer (an H100 lease of
2026-12-07, ``benchmarks/bench_load_quick.md``), nearly all of it importing transformers; the
tokenizer.json itself parses in about 0.1 s. :class:`LightTokenizer` offers the part of transformers'
tokenizer API that :mod:`llada_export.tokenizer` and the server use (call -> ``input_ids``, ``decode``,
``convert_tokens_to_ids`` / ``convert_ids_to_tokens``, ``get_vocab``, ``get_added_vocab``, ``apply_chat_template``,
``bos_token_id``, ``backend_tokenizer``) from the files ``save_pretrained`` wrote into ``engines/tokenizer``.

It is used only where it was shown to be the same tokenizer: the export runs :func:`differences` (every
probe prompt encoded the official way, every probe answer decoded, the special token ids) against the
transformers tokenizer it saved, and records the outcome in the manifest's ``export`` table
(``light_tokenizer``). Engines without that record (older exports, or a tokenizer this class does not
reproduce, e.g. one that only has a SentencePiece ``tokenizer.model``) load transformers' tokenizer, as
does ``LLADA_TOKENIZER=transformers``.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Sequence

from .rules import env_choice

EXPORT_KEY = "light_tokenizer"  # the manifest's export table: True, or why not (a string)
TOKENIZER_ENV = "LLADA_TOKENIZER"  # auto (the light one where the export proved it) | transformers
TOKENIZER_CHOICES = ("auto", "transformers")
# the special-token attributes transformers' tokenizers carry (their ids are all_special_ids)
SPECIAL_ATTRS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class Encoding:
    """What ``tokenizer(text)`` gives that the official prompt code reads."""

    def __init__(self, ids: list[int]):
        self.input_ids = ids


class LightTokenizer:
    """A tokenizer directory written by transformers' ``save_pretrained`` (tokenizer.json,
    tokenizer_config.json, chat_template.jinja), read with ``tokenizers`` and ``jinja2`` only."""

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer

        root = Path(path)
        if not (root / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{root}: no tokenizer.json (the light tokenizer reads only fast tokenizers)")
        self.name_or_path = str(root)
        self.backend_tokenizer = Tokenizer.from_file(str(root / "tokenizer.json"))
        cfg_file = root / "tokenizer_config.json"
        cfg: dict[str, Any] = json.loads(cfg_file.read_text(encoding="utf-8")) if cfg_file.is_file() else {}
        self.special_tokens_map = {a: _content(cfg[a]) for a in SPECIAL_ATTRS if cfg.get(a) is not None}
        extra = cfg.get("extra_special_tokens") or cfg.get("additional_special_tokens") or []
        self.extra_special_tokens = [_content(t) for t in (extra.values() if isinstance(extra, dict) else extra)]
        # transformers 5 skips the clean-up (meant for WordPiece) for a BPE model unless told otherwise
        self.clean_up_tokenization_spaces = bool(cfg.get("clean_up_tokenization_spaces", False)) and (
            type(self.backend_tokenizer.model).__name__ != "BPE"
            or bool(cfg.get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output")))
        template = root / "chat_template.jinja"
        self.chat_template = template.read_text(encoding="utf-8") if template.is_file() else \
            _default_template(cfg.get("chat_template"))
        self._template = None
        specials = [*self.special_tokens_map.values(), *self.extra_special_tokens]
        self.all_special_ids = sorted({i for t in specials if (i := self.backend_tokenizer.token_to_id(t)) is not None})

    # ------------------------------------------------------------------ ids
    @property
    def bos_token_id(self) -> int | None:
        return self._id_of("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._id_of("eos_token")

    def _id_of(self, attr: str) -> int | None:
        token = self.special_tokens_map.get(attr)
        return None if token is None else self.backend_tokenizer.token_to_id(token)

    def __call__(self, text: str) -> Encoding:
        return Encoding(self.backend_tokenizer.encode(text, add_special_tokens=True).ids)

    def convert_tokens_to_ids(self, token: str) -> int | None:
        return self.backend_tokenizer.token_to_id(token)

    def convert_ids_to_tokens(self, ids: int | Sequence[int], skip_special_tokens: bool = False):
        if isinstance(ids, int):
            return self.backend_tokenizer.id_to_token(ids)
        skip = set(self.all_special_ids) if skip_special_tokens else set()
        return [self.backend_tokenizer.id_to_token(int(i)) for i in ids if int(i) not in skip]

    def get_vocab(self) -> dict[str, int]:
        """Every entry, the added tokens included (as transformers' ``get_vocab``)."""
        return self.backend_tokenizer.get_vocab(with_added_tokens=True)

    def get_added_vocab(self) -> dict[str, int]:
        return {t.content: i for i, t in self.backend_tokenizer.get_added_tokens_decoder().items()}

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        text = self.backend_tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        return _clean_up(text) if self.clean_up_tokenization_spaces else text

    # ------------------------------------------------------------------ chat template
    def apply_chat_template(self, messages: list[dict[str, str]], tokenize: bool = False,
                            add_generation_prompt: bool = False) -> str:
        """The template rendered as transformers renders it (a sandboxed jinja2 environment with
        trim_blocks, lstrip_blocks and loop controls; the special tokens as variables)."""
        if tokenize:
            raise ValueError("LightTokenizer.apply_chat_template renders text only (tokenize=False)")
        if not self.chat_template:
            raise ValueError(f"{self.name_or_path}: no chat template")
        if self._template is None:
            self._template = _compile(self.chat_template)
        return self._template.render(messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt,
                                     **self.special_tokens_map, additional_special_tokens=self.extra_special_tokens)


def _content(token: Any) -> str:
    """A token as tokenizer_config.json writes it: a string, or an AddedToken's dict."""
    return token["content"] if isinstance(token, dict) else str(token)


def _default_template(template: Any) -> str | None:
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        return named.get("default")
    return template


def _clean_up(text: str) -> str:
    """transformers' ``clean_up_tokenization`` (spaces before punctuation and contractions)."""
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
                 (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text


def _compile(template: str):
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)


def tokenizer_choice() -> str:
    """``LLADA_TOKENIZER``'s value (default auto); ValueError for any other (checked at every ``Pipeline.load``)."""
    return env_choice(TOKENIZER_ENV, TOKENIZER_CHOICES)


def open_tokenizer(path: Path, export: dict) -> tuple[Any, str]:
    """(the tokenizer of an engines directory, "light" or "transformers"): the light one where the export
    found it the same as transformers' (``export[EXPORT_KEY] is True``) unless ``LLADA_TOKENIZER=transformers``."""
    if tokenizer_choice() == "auto" and export.get(EXPORT_KEY) is True:
        return LightTokenizer(path), "light"
    from .tokenizer import load_tokenizer

    return load_tokenizer(path), "transformers"


def export_record(reference, path: Path) -> tuple[bool | str, str | None]:
    """The export's check of the saved tokenizer ``path`` against ``reference`` (the transformers tokenizer it
    saved): (the manifest's ``export[EXPORT_KEY]``, a note for the manifest or None)."""
    try:
        diffs = differences(reference, LightTokenizer(path))
    except Exception as e:  # noqa: BLE001  any failure only means: load it with transformers
        diffs = [f"{type(e).__name__}: {e}"]
    if not diffs:
        return True, None
    why = "; ".join(diffs)
    return why[:500], (f"the runtime loads the tokenizer with transformers (seconds of imports): without transformers "
                       f"it would differ ({why[:300]})")


# ---------------------------------------------------------------------- the export's check
PROBE_TEXTS = ("What is shown?", "Describe the image in detail.", "  spaces  around  ", "line one\nline two\n",
               "Zahlen: 3,14 — ½ × 2 = 1; naïve café", "日本語のテキスト 🙂 and emoji 👍🏽",
               "<|mdm_mask|> special <|eot_id|> tokens in text", "", "tab\there", "Yes , it is . Isn 't it ? I 'm sure !",
               "multi <image> marker")


def probe_conversations() -> list[dict[str, Any]]:
    """Requests whose prompts the export encodes both ways: with and without an image, default / empty / own
    system prompt, earlier turns."""
    from .tokenizer import DEFAULT_SYSTEM_PROMPT

    out = []
    for i, text in enumerate(PROBE_TEXTS):
        if "<image>" in text:
            out.append({"user_text": text, "has_image": True, "system": "", "history": ()})
            continue
        out.append({"user_text": text, "has_image": i % 2 == 0, "system": DEFAULT_SYSTEM_PROMPT, "history": ()})
        out.append({"user_text": text, "has_image": False, "system": "", "history": ()})
    out.append({"user_text": "And the colour?", "has_image": True, "system": "Be brief.",
                "history": (("user", "How many shapes?"), ("assistant", "3 shapes"))})
    out.append({"user_text": "Again", "has_image": False, "system": DEFAULT_SYSTEM_PROMPT,
                "history": (("system", "Answer in English."), ("user", "Hallo"), ("assistant", "Hello"))})
    return out


def differences(reference, light: LightTokenizer, limit: int = 5, seed: int = 0) -> list[str]:
    """Where ``light`` differs from ``reference`` (transformers' tokenizer of the same files) on the probes:
    the special token ids, each probe prompt encoded as the runtime encodes it, and answers decoded as the
    runtime decodes them (the probes' own ids, every prefix of a multi-byte text, random ids across the
    vocabulary). Empty: the same tokenizer, as far as the runtime can tell."""
    from .tokenizer import TokenizerError, decode_answer, encode_prompt, special_tokens

    diffs: list[str] = []

    def check(what: str, fn):
        try:
            a = fn(reference)
        except (TokenizerError, ValueError) as e:
            a = f"{type(e).__name__}: {e}"
        try:
            b = fn(light)
        except (TokenizerError, ValueError) as e:
            b = f"{type(e).__name__}: {e}"
        if a != b and len(diffs) < limit:
            diffs.append(f"{what}: {str(a)[:120]!r} (transformers) != {str(b)[:120]!r}")

    check("special tokens", special_tokens)
    if getattr(reference, "chat_template", None) or light.chat_template:
        for p in probe_conversations():
            check(f"prompt {p['user_text']!r}", lambda t, p=p: encode_prompt(t, **p))
    answers = [reference(t).input_ids for t in PROBE_TEXTS]
    wide = reference("日本語 🙂 ½").input_ids
    answers += [wide[:k] for k in range(1, len(wide) + 1)]
    rng = random.Random(seed)
    n = light.backend_tokenizer.get_vocab_size(with_added_tokens=True)
    answers += [[rng.randrange(n) for _ in range(rng.randint(1, 24))] for _ in range(64)]
    answers += [[*a, *light.all_special_ids[:3], *a] for a in answers[:3]]
    for ids in answers:
        check(f"answer {ids[:8]}", lambda t, ids=ids: decode_answer(t, ids))
    return diffs
