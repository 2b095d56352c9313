"""The HTTP API of ``llada-serve``, without Ray: an OpenAI-style chat request -> a pipeline request and
its generation settings, and a pipeline result -> a chat completion.

``POST /v1/chat/completions`` takes the body the official ``openai`` client sends::

    {"model": "demo", "max_tokens": 16,
     "messages": [{"role": "system", "content": "..."},            # optional ("developer" too)
                  {"role": "user", "content": [
                      {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}},
                      {"type": "text", "text": "What colour is the square?"}]},
                  {"role": "assistant", "content": "Red."},         # earlier turns, optional
                  {"role": "user", "content": "And its shape?"}],
     "temperature": 0, "seed": 0, "stop": ["\n"], "stream": false,
     "steps": 16, "block_length": 16, "preset": "chartqa", "cache": true, "refresh": 32,
     "factor": 1.0, "threshold": 0.9, "fixed_schedule": false, "remasking": "low_confidence",
     "unpruned": false}

The conversation is rendered with the official chat template, message by message, and answered after
its last message (the user's). At most one image (a ``data:`` URL: the server fetches nothing), in the
first user message, as the official demo sends it; the image goes where its part is (first if it comes
first). Without an image the question is text only. ``max_tokens`` (or ``max_completion_tokens``) is
the response length (the sampler's gen length), at most the engines' (default: theirs, or the
preset's); ``stop``: up to 4 strings, the answer cut before the first (finish_reason "stop");
``stream``: server-sent chunks of the answer's committed prefix (see :mod:`.app`). The fields after
``stream`` are this server's sampler settings (see ``llada-generate --help``): with none of ``factor``,
``threshold`` and ``fixed_schedule: true``, the threshold rule at 0.9 decodes in parallel, and the cache
(when the engines have it) refreshes every forward (the defaults of ``Pipeline`` and ``llada-generate``
too); null for any of them is "left out".

Every other field of the official client is accepted at the value(s) this model honours
(:data:`NEUTRAL`: ``n`` 1, ``top_p`` 1, ``presence_penalty`` / ``frequency_penalty`` 0, ``logprobs``
false, ``response_format`` ``{"type": "text"}``, no tools, ...; ``user`` and the other identifiers as
given; null for any of them is "left out") and refused with a 400 naming it and what is supported at
any other value; an unknown field is refused, so a setting the server would silently ignore never
passes as honoured.

A body is at most ``MAX_BODY_BYTES`` (16 MiB, the base64 image included: 413 above it, before it is
parsed), sent as ``application/json`` (or with no Content-Type: 415 for any other). Every error is
``{"error": {"message", "type", "param", "code"}}`` with a 4xx status for what the caller can fix;
nothing in this module touches the engines.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
import time
import uuid
from dataclasses import dataclass, field

from ..rules import shorten
from ..tokenizer import IMAGE_TOKEN

# sampler settings a request may carry, beyond the OpenAI fields; value checks are the pipeline's
SAMPLER_FIELDS = ("steps", "block_length", "preset", "cache", "refresh", "factor", "threshold", "fixed_schedule",
                  "remasking", "cfg_scale", "unpruned")
# every field of the official client's chat.completions.create (openai 3.63), honoured or checked below
OPENAI_FIELDS = ("model", "messages", "max_tokens", "max_completion_tokens", "temperature", "seed", "n", "stream",
                 "stream_options", "stop", "user", "safety_identifier", "prompt_cache_key", "prompt_cache_retention",
                 "prompt_cache_options", "metadata", "store", "service_tier", "top_p", "presence_penalty",
                 "frequency_penalty", "logit_bias", "logprobs", "top_logprobs", "response_format", "tools",
                 "tool_choice", "parallel_tool_calls", "functions", "function_call", "modalities", "audio",
                 "prediction", "reasoning_effort", "verbosity", "web_search_options", "moderation")
FIELDS = OPENAI_FIELDS + SAMPLER_FIELDS
# OpenAI fields taken at their neutral values only: field -> (accepted values, what this server does)
NEUTRAL = {
    "n": ((1,), "one answer per request"),
    "top_p": ((1,), "it samples from the whole distribution (top_p 1)"),
    "presence_penalty": ((0,), "it applies no presence penalty (0)"),
    "frequency_penalty": ((0,), "it applies no frequency penalty (0)"),
    "logit_bias": (({},), "it applies no logit bias ({})"),
    "logprobs": ((False,), "it returns no log probabilities (false)"),
    "top_logprobs": ((0,), "it returns no log probabilities (0)"),
    "response_format": (({"type": "text"},), 'it answers in plain text ({"type": "text"})'),
    "tools": (([],), "it calls no tools ([])"),
    "tool_choice": (("none", "auto"), 'it calls no tools ("none")'),
    "functions": (([],), "it calls no functions ([])"),
    "function_call": (("none", "auto"), 'it calls no functions ("none")'),
    "modalities": ((["text"],), 'it answers in text (["text"])'),
    "store": ((False,), "it stores no completions (false)"),
    "service_tier": (("auto", "default"), 'it has one service tier ("auto", "default")'),
    "reasoning_effort": (("none",), 'it does not reason before answering ("none")'),
    "verbosity": (("medium",), 'the answer length is max_tokens ("medium")'),
    "audio": ((), "it answers in text"),
    "prediction": ((), "it takes no predicted output"),
    "web_search_options": ((), "it searches nothing"),
    "moderation": ((), "it moderates nothing"),
    "prompt_cache_options": ((), "its prefix cache is per request"),
    "prompt_cache_retention": ((), "its prefix cache is per request"),
}
IDENTIFIERS = ("user", "safety_identifier", "prompt_cache_key")  # strings the caller names itself by: accepted
MAX_STOP = 4  # stop strings, as OpenAI's limit
ROLES = ("system", "developer", "user", "assistant")
MAX_BODY_BYTES = 16 * 2**20  # a request body above this is refused (413) before it is parsed
MAX_IMAGE_BYTES = MAX_BODY_BYTES  # a decoded data URL above this is refused (413) before Pillow sees it
MAX_IMAGE_PIXELS = 40_000_000  # and an image above this before it is decoded (anyres resizes to a few crops)


class APIError(Exception):
    """A request the server refuses; ``status`` is the HTTP status."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message, self.status, self.param, self.code, self.type = message, status, param, code, type
        self.headers = headers  # sent with the answer (a 503's Retry-After)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class ChatRequest:
    """What a chat body asks for: the pipeline request's parts and the sampler settings."""

    prompt: str
    image: object  # PIL image, or None for a text-only conversation
    system: str | None = None  # None: the pipeline's default system prompt
    seed: int = 0
    settings: dict = field(default_factory=dict)  # Pipeline.generation_config keyword arguments
    unpruned: bool = False
    model: str | None = None
    history: tuple[tuple[str, str], ...] = ()  # earlier turns, (role, text), before ``prompt``
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the usage
    stop: tuple[str, ...] = ()
    length_field: str = "max_tokens"  # the field that set the response length (max_completion_tokens too)


def check_body_size(n_bytes: int, max_bytes: int = MAX_BODY_BYTES) -> None:
    """413 for a body of ``n_bytes`` over ``max_bytes`` (called with the Content-Length before the body is
    read, and on the bytes read so far while it is)."""
    if n_bytes > max_bytes:
        raise APIError(f"the request body is over {max_bytes / 2**20:g} MiB ({n_bytes:,} bytes): send a smaller "
                       "image (its base64 takes 4/3 of its size)", status=413, code="request_too_large")


def check_content_type(value: str | None) -> None:
    """415 for a body declared as anything but JSON (``application/json`` or ``application/*+json``, any
    parameters); no Content-Type at all is read as JSON. A browser page on any site may POST a text/plain or
    form body to a loopback server without asking first (no CORS preflight): refusing those keeps such
    pages from running requests on it."""
    kind = (value or "").split(";", 1)[0].strip().lower()
    if kind and kind != "application/json" and not (kind.startswith("application/") and kind.endswith("+json")):
        raise APIError(f"Content-Type {shorten(repr(value))} is not JSON: send the body as application/json "
                       "(curl: -H 'Content-Type: application/json')", status=415, code="unsupported_media_type")


def decode_json(raw: bytes) -> object:
    """The body's JSON; 400 for anything that is not JSON, that nests deeper than Python can parse, or whose
    integers are too long for it."""
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(f"the request body is not valid JSON ({e})", code="invalid_json") from e
    except ValueError:  # an integer literal over Python's int_max_str_digits (4300): was a 500
        raise APIError("the request body holds a number with too many digits to parse", code="invalid_json") from None
    except RecursionError:
        raise APIError("the request body nests arrays or objects too deeply to parse", code="invalid_json") from None


def parse_chat(body: object, max_image_bytes: int = MAX_IMAGE_BYTES) -> ChatRequest:
    """Validate a decoded JSON body; raises APIError naming the field at fault. An OpenAI field set to
    null counts as left out (the official client sends null for a field given as None)."""
    if not isinstance(body, dict):
        raise APIError("the request body must be a JSON object")
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise APIError(f"unknown field(s) {shorten(', '.join(unknown))}; accepted: {', '.join(FIELDS)}",
                       param=shorten(unknown[0]),
                       code="unknown_field")
    body = {k: v for k, v in body.items() if v is not None or k in SAMPLER_FIELDS}
    for name, (ok, does) in NEUTRAL.items():
        if name in body:
            _neutral(name, body[name], ok, does)
    for name in IDENTIFIERS:
        if name in body and not isinstance(body[name], str):
            raise APIError(f"{name} must be a string", param=name)
    if "metadata" in body and not (isinstance(body["metadata"], dict)
                                   and all(isinstance(v, str) for v in body["metadata"].values())):
        raise APIError("metadata must be an object of strings", param="metadata")
    system, history, user = _split_messages(body.get("messages"))
    image, history, prompt = _conversation(history, user, max_image_bytes)
    if "max_tokens" in body and "max_completion_tokens" in body:
        raise APIError("give max_tokens or max_completion_tokens, not both", param="max_completion_tokens")
    max_tokens = body.get("max_tokens", body.get("max_completion_tokens"))
    length_field = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    settings: dict = {}
    if max_tokens is not None:
        settings["gen_length"] = _int(max_tokens, length_field, low=1)
    if "temperature" in body:
        settings["temperature"] = _number(body["temperature"], "temperature")
    for k in ("steps", "block_length"):
        if k in body:
            settings[k] = _int(body[k], k, low=1)
    for k in ("factor", "threshold", "cfg_scale"):
        if body.get(k) is not None:
            settings[k] = _number(body[k], k)
    for k in ("preset", "remasking"):
        if k in body:
            if not isinstance(body[k], str):
                raise APIError(f"{k} must be a string", param=k)
            settings[k] = body[k]
    if "cache" in body:
        settings["cache"] = _bool(body["cache"], "cache")
    if body.get("fixed_schedule") is not None:  # true: no parallel rule (the default is the factor rule)
        settings["fixed_schedule"] = _bool(body["fixed_schedule"], "fixed_schedule")
    if "refresh" in body:
        r = body["refresh"]
        settings["refresh"] = None if r in (None, "never") else _int(r, "refresh", low=1)
    seed = _int(body.get("seed", 0), "seed")
    unpruned = _bool(body.get("unpruned", False), "unpruned")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise APIError("model must be a string", param="model")
    stream = _bool(body.get("stream", False), "stream")
    include_usage = _stream_options(body.get("stream_options"), stream)
    return ChatRequest(prompt, image, system, seed, settings, unpruned, model, history, stream, include_usage,
                       _stop(body.get("stop")), length_field)


def _neutral(name: str, value: object, ok: tuple, does: str) -> None:
    """An OpenAI field this server takes at its neutral value(s) only; a 400 naming it otherwise."""
    if any(value == v and type(value) is type(v) or (isinstance(v, int) and not isinstance(v, bool)
                                                       and not isinstance(value, bool) and value == v) for v in ok):
        return
    if name == "response_format" and isinstance(value, dict) and value.get("type") == "text":
        return  # {"type": "text"} with nothing else that matters
    allowed = " or ".join(json.dumps(v) for v in ok)
    raise APIError(f"{name} {_short_json(value)} is not supported: {does}; "
                   + (f"send {allowed} or leave {name} out" if ok else f"leave {name} out"),
                   param=name, code="unsupported_value")


def _short_json(v: object) -> str:
    try:
        text = json.dumps(v)
    except (TypeError, ValueError):
        text = repr(v)
    return shorten(text)


def _stream_options(options: object, stream: bool) -> bool:
    if options is None:
        return False
    if not stream:
        raise APIError("stream_options is only allowed with stream: true", param="stream_options")
    if not isinstance(options, dict):
        raise APIError("stream_options must be an object", param="stream_options")
    unknown = sorted(set(options) - {"include_usage", "include_obfuscation"})
    if unknown:
        raise APIError(f"stream_options.{shorten(unknown[0])} is not supported; accepted: include_usage",
                       param="stream_options")
    if options.get("include_obfuscation"):
        raise APIError("stream_options.include_obfuscation true is not supported: chunks carry no padding; send "
                       "false or leave it out", param="stream_options", code="unsupported_value")
    return _bool(options.get("include_usage", False), "stream_options.include_usage")


def _stop(stop: object) -> tuple[str, ...]:
    """``stop``: a string or up to 4 non-empty strings."""
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise APIError("stop must be a non-empty string or a list of non-empty strings", param="stop")
    if len(stops) > MAX_STOP:
        raise APIError(f"stop has {len(stops)} strings; at most {MAX_STOP}", param="stop")
    return tuple(stops)


def _split_messages(messages: object) -> tuple[str | None, list[tuple[str, object]], object]:
    """(the leading system text, the turns between it and the last message as (role, content), the last
    message's content, which must be the user's)."""
    if not isinstance(messages, list) or not messages:
        raise APIError("messages must be a non-empty list", param="messages")
    turns = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise APIError(f"messages[{i}] must be an object with role and content", param="messages")
        role = m["role"]
        if role in ("tool", "function") or m.get("tool_calls") or m.get("function_call"):
            raise APIError(f"messages[{i}] is a tool call or result: this server calls no tools", param="messages",
                           code="unsupported_value")
        if role not in ROLES:
            raise APIError(f"messages[{i}].role {_short(role)} is not one of {', '.join(ROLES)}", param="messages")
        if role != "user":
            text = _text_only(m["content"], f"messages[{i}].content")
            turns.append(("system" if role == "developer" else role, text))
        else:
            turns.append(("user", m["content"]))
    if turns[-1][0] != "user":
        raise APIError(f"the last message is the {turns[-1][0]}'s: end with the user message to answer"
                       + (" (there is none)" if all(r != "user" for r, _ in turns) else ""), param="messages")
    system = turns.pop(0)[1] if turns[0][0] == "system" else None
    return system, turns[:-1], turns[-1][1]


def _text_only(content: object, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") in ("text", "refusal")
                                         for p in content):
        return "".join(_str(p.get("text", p.get("refusal")), where) for p in content)
    raise APIError(f"{where} must be text (images go in the first user message)", param="messages")


def _conversation(history: list[tuple[str, object]], user: object, max_image_bytes: int):
    """(the image or None, the earlier turns as (role, text), the last user message's text). The image, if
    any, is in the first user message, as the official demo sends it."""
    users = [i for i, (r, _) in enumerate(history) if r == "user"] + [len(history)]
    turns, image = [], None
    for i, (role, content) in enumerate([*history, ("user", user)]):
        if role != "user":
            turns.append((role, content))
            continue
        text, img = _user_content(content, max_image_bytes)
        if img is not None and i != users[0]:
            raise APIError("an image in a later user message: the image goes in the first user message (as the "
                           "official demo sends it)", param="messages", code="too_many_images")
        image = img if img is not None else image
        turns.append(("user", text))
    return image, tuple(turns[:-1]), turns[-1][1]


def _user_content(content: object, max_image_bytes: int) -> tuple[str, object]:
    """A user message's text and its image (None without one). The image goes where its part is."""
    if isinstance(content, str):
        return _no_marker(content, "content"), None
    if not isinstance(content, list):
        raise APIError("a user message's content must be a string or a list of parts", param="messages")
    texts, images = [], []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            texts.append(_no_marker(_str(part.get("text"), f"content[{i}].text"), f"content[{i}].text"))
        elif kind == "image_url":
            images.append((len(texts), part.get("image_url")))
        else:
            raise APIError(f"content[{i}] has type {_short(kind)}; accepted: text, image_url", param="messages")
    if len(images) > 1:
        raise APIError(f"{len(images)} images; these engines take one image per request", param="messages",
                       code="too_many_images")
    if not images:
        return "\n".join(texts), None
    at, ref = images[0]
    image = decode_data_url(ref.get("url") if isinstance(ref, dict) else ref, max_image_bytes)
    if at == 0:
        return "\n".join(texts), image  # the image first, as the official demo writes it
    after = "\n".join(texts[at:])
    return "\n".join(texts[:at]) + "\n" + IMAGE_TOKEN + ("\n" + after if after else ""), image


def _no_marker(text: str, where: str) -> str:
    if IMAGE_TOKEN in text:
        raise APIError(f"{where} holds {IMAGE_TOKEN}: place the image with an image_url part", param="messages",
                       code="invalid_prompt")
    return text


def decode_data_url(url: object, max_bytes: int = MAX_IMAGE_BYTES):
    """``data:image/<fmt>;base64,<data>`` -> RGB PIL image; APIError for anything else."""
    from PIL import Image, UnidentifiedImageError

    if not isinstance(url, str):
        raise APIError("image_url.url must be a string", param="messages")
    if not url.startswith("data:"):
        raise APIError("image_url.url must be a data: URL (data:image/png;base64,...); the server fetches no URLs",
                       param="messages", code="invalid_image_url")
    head, sep, data = url.partition(",")
    if not sep or not head.endswith(";base64"):
        raise APIError("image_url.url must be base64 encoded: data:image/<format>;base64,<data>", param="messages",
                       code="invalid_image_url")
    if len(data) * 3 // 4 > max_bytes:
        raise APIError(f"the image is over {max_bytes // 2**20} MiB", status=413, param="messages",
                       code="image_too_large")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise APIError(f"image_url.url is not valid base64 ({e})", param="messages", code="invalid_base64") from e
    try:
        with Image.open(io.BytesIO(raw)) as im:  # reads the header only
            if im.width * im.height > MAX_IMAGE_PIXELS:
                raise APIError(f"the image is {im.width}x{im.height}: over {MAX_IMAGE_PIXELS // 10**6} Mpixels",
                               status=413, param="messages", code="image_too_large")
            from ..pixels import to_rgb

            return to_rgb(im)  # upright, 16-bit grey scaled: as llada-generate reads a file
    except UnidentifiedImageError:
        raise APIError("the image bytes are not an image Pillow can read (PNG, JPEG, WebP, ...)", param="messages",
                       code="invalid_image") from None
    except (Image.DecompressionBombError, OSError, SyntaxError, ValueError) as e:
        raise APIError(f"the image bytes cannot be decoded ({_no_repr(e)})", param="messages",
                       code="invalid_image") from e


def _no_repr(e: BaseException) -> str:
    """An exception's message without the ``<_io.BytesIO object at 0x...>`` reprs Pillow puts in it."""
    return re.sub(r"\s*<[\w.]+ object at 0x[0-9a-f]+>", "", str(e)).strip() or type(e).__name__


def completion(model: str, result, prompt_tokens: int, gen_length: int, extra: dict | None = None,
               answer: tuple[str, int, bool] | None = None) -> dict:
    """A ``chat.completion`` object for a pipeline GenerationResult (whose ids are cut before the first
    ``<|eot_id|>``: fewer than ``gen_length`` means it stopped). ``answer``: (text, completion tokens,
    cut by a stop string) when a ``stop`` string cut it (:func:`..stream.answer_with_stop`); its
    finish_reason is then "stop". ``llada``: what this server adds: visual tokens kept, forwards,
    timings, the settings that produced the answer and the pipeline's finish reason (as
    ``GenerationResult.to_dict`` records them), the batch the request ran in."""
    text, used, cut = answer or (result.text, len(result.ids), False)
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": finish_reason(result, gen_length, cut)}],
            "usage": usage(prompt_tokens, used), "llada": llada_info(result) | (extra or {})}


def finish_reason(result, gen_length: int, cut_by_stop: bool = False) -> str:
    """"stop" when the answer ended at ``<|eot_id|>`` or a stop string, "length" when it used all its tokens."""
    if cut_by_stop:
        return "stop"
    return result.to_dict().get("finish_reason", "stop" if len(result.ids) < gen_length else "length")


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def llada_info(result) -> dict:
    recorded = result.to_dict()
    return {"visual_tokens": result.n_visual,
            "kept_visual_tokens": result.n_visual if result.kept_visual is None else len(result.kept_visual),
            "forwards": result.forwards, "timings": result.timings, "graph_calls": result.graph_calls,
            **{k: recorded[k] for k in ("settings", "pruning", "finish_reason") if k in recorded}}


def chunk(cid: str, model: str, created: int, delta: dict, finish: str | None = None, **extra) -> bytes:
    """One ``chat.completion.chunk`` as a server-sent event: ``data: {json}\\n\\n``."""
    body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}], **extra}
    return sse(body)


def sse(body: dict | str) -> bytes:
    return f"data: {body if isinstance(body, str) else json.dumps(body)}\n\n".encode()


def _str(v: object, where: str) -> str:
    if not isinstance(v, str):
        raise APIError(f"{where} must be a string", param="messages")
    return v


def _int(v: object, name: str, low: int | None = None) -> int:
    """A JSON integer (``low``: for sizes, whose 0 the pipeline would read as "the default"); other ranges
    are the pipeline's to check, as for every caller."""
    if isinstance(v, bool) or not isinstance(v, int) or (low is not None and v < low):
        raise APIError(f"{name} must be an integer{'' if low is None else f' >= {low}'}, got {_short(v)}", param=name)
    return v


def _number(v: object, name: str) -> float:
    """A JSON number (its range, finiteness included, is the pipeline's to check)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise APIError(f"{name} must be a number, got {_short(v)}", param=name)
    try:
        return float(v)
    except OverflowError:  # an integer beyond a float
        raise APIError(f"{name} must be a finite number, got {_short(v)}", param=name) from None


def _short(v: object) -> str:
    return shorten(repr(v))


def _bool(v: object, name: str) -> bool:
    if not isinstance(v, bool):
        raise APIError(f"{name} must be true or false, got {_short(v)}", param=name)
    return v
