"""The HTTP API of ``llada-serve``, without Ray: an OpenAI-style chat request -> a pipeline request and
its generation settings, and a pipeline result -> a chat completion.

``POST /v1/chat/completions`` takes the body vision-language servers take::

    {"model": "demo", "max_tokens": 16,
     "messages": [{"role": "system", "content": "..."},            # optional
                  {"role": "user", "content": [
                      {"type": "text", "text": "What colour is the square?"},
                      {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}]}],
     "temperature": 0, "seed": 0,
     "steps": 16, "block_length": 16, "preset": "chartqa", "cache": true, "refresh": 32,
     "factor": 1.0, "threshold": 0.9, "remasking": "low_confidence", "unpruned": false}

One user turn with exactly one image (a ``data:`` URL: the server fetches nothing) and its text
parts, in order; the image goes where its part is. ``max_tokens`` is the response length (the
sampler's gen length), at most the engines' (default: theirs, or the preset's). The fields after
``seed`` are this server's sampler settings (see ``llada-generate --help``). Any other field is
refused, so a setting the server would silently ignore never passes as honoured.

A body is at most ``MAX_BODY_BYTES`` (16 MiB, the base64 image included: 413 above it, before it is
parsed). Every error is ``{"error": {"message", "type", "param", "code"}}`` with a 4xx status for what
the caller can fix; nothing in this module touches the engines.
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

from ..tokenizer import IMAGE_TOKEN

# sampler settings a request may carry, beyond the OpenAI fields; value checks are the pipeline's
SAMPLER_FIELDS = ("steps", "block_length", "preset", "cache", "refresh", "factor", "threshold", "remasking",
                  "cfg_scale", "unpruned")
OPENAI_FIELDS = ("model", "messages", "max_tokens", "max_completion_tokens", "temperature", "seed", "n", "stream",
                 "user")
FIELDS = OPENAI_FIELDS + SAMPLER_FIELDS
MAX_BODY_BYTES = 16 * 2**20  # a request body above this is refused (413) before it is parsed
MAX_IMAGE_BYTES = MAX_BODY_BYTES  # a decoded data URL above this is refused (413) before Pillow sees it
MAX_IMAGE_PIXELS = 40_000_000  # and an image above this before it is decoded (anyres resizes to a few crops)


class APIError(Exception):
    """A request the server refuses; ``status`` is the HTTP status."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.status, self.param, self.code, self.type = message, status, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class ChatRequest:
    """What a chat body asks for: the pipeline request's parts and the sampler settings."""

    prompt: str
    image: object  # PIL image
    system: str | None = None  # None: the pipeline's default system prompt
    seed: int = 0
    settings: dict = field(default_factory=dict)  # Pipeline.generation_config keyword arguments
    unpruned: bool = False
    model: str | None = None


def check_body_size(n_bytes: int, max_bytes: int = MAX_BODY_BYTES) -> None:
    """413 for a body of ``n_bytes`` over ``max_bytes`` (called with the Content-Length before the body is
    read, and on the bytes read so far while it is)."""
    if n_bytes > max_bytes:
        raise APIError(f"the request body is over {max_bytes / 2**20:g} MiB ({n_bytes / 2**20:.1f} MiB): send a "
                       "smaller image (its base64 takes 4/3 of its size)", status=413, code="request_too_large")


def decode_json(raw: bytes) -> object:
    """The body's JSON; 400 for anything that is not JSON, or that nests deeper than Python can parse."""
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(f"the request body is not valid JSON ({e})", code="invalid_json") from e
    except RecursionError:
        raise APIError("the request body nests arrays or objects too deeply to parse", code="invalid_json") from None


def parse_chat(body: object, max_image_bytes: int = MAX_IMAGE_BYTES) -> ChatRequest:
    """Validate a decoded JSON body; raises APIError naming the field at fault."""
    if not isinstance(body, dict):
        raise APIError("the request body must be a JSON object")
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise APIError(f"unknown field(s) {', '.join(unknown)}; accepted: {', '.join(FIELDS)}", param=unknown[0],
                       code="unknown_field")
    if body.get("n", 1) != 1:
        raise APIError("n must be 1: one answer per request", param="n")
    if body.get("stream", False):
        raise APIError("stream is not supported: a diffusion model commits its tokens out of order", param="stream")
    system, user = _split_messages(body.get("messages"))
    prompt, image = _user_content(user, max_image_bytes)
    if "max_tokens" in body and "max_completion_tokens" in body:
        raise APIError("give max_tokens or max_completion_tokens, not both", param="max_completion_tokens")
    max_tokens = body.get("max_tokens", body.get("max_completion_tokens"))
    settings: dict = {}
    if max_tokens is not None:
        settings["gen_length"] = _int(max_tokens, "max_tokens", low=1)
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
    if "refresh" in body:
        r = body["refresh"]
        settings["refresh"] = None if r in (None, "never") else _int(r, "refresh", low=1)
    seed = _int(body.get("seed", 0), "seed")
    unpruned = _bool(body.get("unpruned", False), "unpruned")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise APIError("model must be a string", param="model")
    return ChatRequest(prompt, image, system, seed, settings, unpruned, model)


def _split_messages(messages: object) -> tuple[str | None, dict]:
    if not isinstance(messages, list) or not messages:
        raise APIError("messages must be a non-empty list", param="messages")
    system, users, answers = None, [], 0
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise APIError(f"messages[{i}] must be an object with role and content", param="messages")
        if m["role"] == "system":
            if system is not None or users:
                raise APIError("one system message, before the user message", param="messages")
            system = _text_only(m["content"], f"messages[{i}].content")
        elif m["role"] == "user":
            users.append(m)
        elif m["role"] == "assistant":
            answers += 1
        else:
            raise APIError(f"messages[{i}].role {m['role']!r} is not system or user", param="messages")
    if not users:
        raise APIError("no user message: send one user message with the image and the question"
                       + (" (assistant messages, earlier answers, are not taken)" if answers else ""), param="messages")
    if answers:
        raise APIError("multi-turn conversations are not supported: send one user message, without assistant "
                       "messages", param="messages")
    if len(users) != 1:
        raise APIError(f"{len(users)} user messages; send exactly one", param="messages")
    return system, users[0]


def _text_only(content: object, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(_str(p.get("text"), where) for p in content)
    raise APIError(f"{where} must be text", param="messages")


def _user_content(user: dict, max_image_bytes: int) -> tuple[str, object]:
    content = user["content"]
    if isinstance(content, str):
        raise APIError("no image: the user message needs an image_url part (a data: URL)", param="messages",
                       code="no_image")
    if not isinstance(content, list):
        raise APIError("the user message's content must be a string or a list of parts", param="messages")
    texts, images = [], []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            text = _str(part.get("text"), f"content[{i}].text")
            if IMAGE_TOKEN in text:
                raise APIError(f"content[{i}].text holds {IMAGE_TOKEN}: place the image with an image_url part",
                               param="messages")
            texts.append(text)
        elif kind == "image_url":
            images.append((len(texts), part.get("image_url")))
        else:
            raise APIError(f"content[{i}] has type {kind!r}; accepted: text, image_url", param="messages")
    if not images:
        raise APIError("no image: the user message needs an image_url part (a data: URL)", param="messages",
                       code="no_image")
    if len(images) > 1:
        raise APIError(f"{len(images)} images; these engines take one image per request", param="messages",
                       code="too_many_images")
    at, ref = images[0]
    image = decode_data_url(ref.get("url") if isinstance(ref, dict) else ref, max_image_bytes)
    if at == 0:
        return "\n".join(texts), image  # the image first, as the official demo writes it
    after = "\n".join(texts[at:])
    return "\n".join(texts[:at]) + "\n" + IMAGE_TOKEN + ("\n" + after if after else ""), image


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
            return im.convert("RGB")
    except UnidentifiedImageError:
        raise APIError("the image bytes are not an image Pillow can read (PNG, JPEG, WebP, ...)", param="messages",
                       code="invalid_image") from None
    except (Image.DecompressionBombError, OSError, SyntaxError, ValueError) as e:
        raise APIError(f"the image bytes cannot be decoded ({_no_repr(e)})", param="messages",
                       code="invalid_image") from e


def _no_repr(e: BaseException) -> str:
    """An exception's message without the ``<_io.BytesIO object at 0x...>`` reprs Pillow puts in it."""
    return re.sub(r"\s*<[\w.]+ object at 0x[0-9a-f]+>", "", str(e)).strip() or type(e).__name__


def completion(model: str, result, prompt_tokens: int, gen_length: int, extra: dict | None = None) -> dict:
    """A ``chat.completion`` object for a pipeline GenerationResult (whose ids are cut before the first
    ``<|eot_id|>``: fewer than ``gen_length`` means it stopped). ``llada``: what this server adds:
    visual tokens kept, forwards, timings, the settings that produced the answer and the pipeline's
    finish reason (as ``GenerationResult.to_dict`` records them), the batch the request ran in."""
    used = len(result.ids)
    recorded = result.to_dict()
    llada = {"visual_tokens": result.n_visual,
             "kept_visual_tokens": result.n_visual if result.kept_visual is None else len(result.kept_visual),
             "forwards": result.forwards, "timings": result.timings, "graph_calls": result.graph_calls,
             **{k: recorded[k] for k in ("settings", "pruning", "finish_reason") if k in recorded}}
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                         "finish_reason": recorded.get("finish_reason", "stop" if used < gen_length else "length")}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": used,
                      "total_tokens": prompt_tokens + used},
            "llada": llada | (extra or {})}


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
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _bool(v: object, name: str) -> bool:
    if not isinstance(v, bool):
        raise APIError(f"{name} must be true or false, got {v!r}", param=name)
    return v
