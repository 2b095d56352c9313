"""A small client for ``llada-serve`` (standard library only: no torch, no Ray).

    from llada_export.serve.client import Client
    client = Client("http://127.0.0.1:8000")
    reply = client.chat("What colour is the square?", image="photo.png", max_tokens=16)
    print(reply["choices"][0]["message"]["content"])
    for piece in client.chat_stream("Describe the image.", image="photo.png"):  # stream: true
        print(piece, end="", flush=True)

Generation is deterministic for a given request and seed, so a request that failed on the server
side (500, 502, 503, 504: a replica that died, an overloaded server's 503) or whose connection broke
is sent again, ``retries`` times with a growing pause (at least the server's ``Retry-After``, up to 60
s); a 4xx is the caller's to fix and raised at once. A stream is retried only until its first byte.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from ..rules import is_url, shorten, shorten_path

RETRY_STATUS = (500, 502, 503, 504)


class ServerError(OSError):
    """An error answer (``status``, and the server's message) or no answer at all (status None)."""

    def __init__(self, message: str, status: int | None = None, body: dict | None = None):
        super().__init__(message)
        self.status, self.body = status, body


def image_data_url(image) -> str:
    """A path, PIL image, HxWx3 uint8 array or encoded bytes -> ``data:image/...;base64,...``."""
    if isinstance(image, (bytes, bytearray)):
        raw, fmt = bytes(image), "png"
    elif isinstance(image, (str, Path)):
        if not os.path.isfile(image):  # as llada-generate --engines says it, the name shortened
            if is_url(str(image)):
                raise ValueError(f"{shorten(str(image))}: a URL; images are read from local files")
            raise ValueError(f"{shorten_path(image)}: image file not found")
        raw, fmt = Path(image).read_bytes(), Path(image).suffix.lstrip(".").lower() or "png"
        fmt = "jpeg" if fmt == "jpg" else fmt
    else:
        from PIL import Image

        from ..pixels import to_rgb

        im = Image.fromarray(image) if not isinstance(image, Image.Image) else image
        buf = io.BytesIO()
        to_rgb(im).save(buf, format="PNG")  # as the engines read it (upright, 16-bit grey scaled)
        raw, fmt = buf.getvalue(), "png"
    return f"data:image/{fmt};base64,{base64.b64encode(raw).decode('ascii')}"


def chat_body(prompt: str, image, *, system: str | None = None, **fields) -> dict:
    """The /v1/chat/completions body for one question about one image, or text only (``image`` None;
    ``fields``: max_tokens, seed, temperature, stop, stream and the server's sampler settings; None values
    are left out). An ``<image>`` in the prompt places the image there (as llada-generate reads it);
    without one the image goes first."""
    messages = [{"role": "system", "content": system}] if system is not None else []
    if image is None:
        messages.append({"role": "user", "content": prompt})
        return {"messages": messages, **{k: v for k, v in fields.items() if v is not None}}
    before, marker, after = prompt.partition("<image>")
    if not marker:
        before, after = "", prompt
    parts = [{"type": "text", "text": before.rstrip("\n")}] if before.strip() else []
    parts.append({"type": "image_url", "image_url": {"url": image_data_url(image)}})
    if after.lstrip("\n"):
        parts.append({"type": "text", "text": after.lstrip("\n")})
    messages.append({"role": "user", "content": parts})
    return {"messages": messages, **{k: v for k, v in fields.items() if v is not None}}


def check_url(url: str) -> str:
    """The server's base URL without its trailing slash, and without a trailing ``/v1`` (the openai client's
    ``base_url`` form, http://host:port/v1: the routes are added with theirs); ValueError at once for one
    that is no http(s) URL."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        hint = f": use http://{url}" if "://" not in url else ""
        raise ValueError(f"the server URL {url!r} is not an http:// or https:// URL{hint}")
    url = url.rstrip("/")
    return url[:-len("/v1")] if url.endswith("/v1") else url


class Client:
    def __init__(self, url: str, timeout_s: float = 600, retries: int = 3, backoff_s: float = 0.5):
        self.url, self.timeout_s, self.retries, self.backoff_s = check_url(url), timeout_s, retries, backoff_s

    def chat(self, prompt: str, image, *, system: str | None = None, **fields) -> dict:
        """One chat completion (the server's JSON answer)."""
        return self.post("/v1/chat/completions", chat_body(prompt, image, system=system, **fields))

    def chat_stream(self, prompt: str, image, *, system: str | None = None, final: list | None = None,
                    **fields):
        """``stream: true``: yields the answer's text pieces as the server commits them (their concatenation
        is the answer). ``final``: a list that receives the last chunk (finish_reason, and the server's
        ``llada`` record) and, with ``stream_options={"include_usage": True}``, the usage chunk."""
        body = json.dumps(chat_body(prompt, image, system=system, stream=True, **fields)).encode()
        req = urllib.request.Request(self.url + "/v1/chat/completions", data=body, method="POST",
                                     headers={"Content-Type": "application/json", "Accept": "text/event-stream"})
        with self._open(req) as r:
            for line in r:
                line = line.strip()
                if not line.startswith(b"data: "):
                    continue
                data = line[len(b"data: "):]
                if data == b"[DONE]":
                    return
                event = json.loads(data)
                if "error" in event:
                    raise ServerError(f"the stream failed: {event['error'].get('message')}", 500, event)
                choice = event["choices"][0] if event["choices"] else None
                if choice is not None and choice["delta"].get("content"):
                    yield choice["delta"]["content"]
                if final is not None and (choice is None or choice["finish_reason"] is not None):
                    final.append(event)
        raise ServerError(f"the stream from {self.url} ended before data: [DONE]")

    def models(self) -> dict:
        return self.get("/v1/models")

    def health(self) -> dict:
        return self.get("/health")

    def get(self, path: str) -> dict:
        return self._send(urllib.request.Request(self.url + path, method="GET"))

    def post(self, path: str, body: dict | bytes) -> dict:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        return self._send(urllib.request.Request(self.url + path, data=data, method="POST",
                                                 headers={"Content-Type": "application/json"}))

    def _send(self, req: urllib.request.Request) -> dict:
        return self._open(req, lambda r: json.loads(r.read()))

    def _open(self, req: urllib.request.Request, read=None):
        """``read(response)``, or the open response without ``read`` (a stream: retried until it answers)."""
        for attempt in range(self.retries + 1):
            wait = self.backoff_s * 2**attempt
            try:
                r = urllib.request.urlopen(req, timeout=self.timeout_s)
                if read is None:
                    return r
                with r:
                    return read(r)
            except urllib.error.HTTPError as e:
                err = _server_error(e)
                if e.code not in RETRY_STATUS or attempt == self.retries:
                    raise err from None
                wait = max(wait, retry_after(e.headers.get("Retry-After")))  # an overloaded server says when
            except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
                reason = getattr(e, "reason", e)
                if attempt == self.retries:
                    raise ServerError(f"no answer from {self.url} after {attempt + 1} attempt(s): {reason}") from None
            time.sleep(wait)
        raise AssertionError("unreachable")


def retry_after(value: str | None, most: float = 60.0) -> float:
    """Seconds of a ``Retry-After`` header in its delay-seconds form (0 when absent, a date or not a finite
    number), at most ``most``."""
    try:
        seconds = float(value) if value else 0.0
    except ValueError:
        return 0.0
    return min(max(seconds, 0.0), most) if math.isfinite(seconds) else 0.0


def _server_error(e: urllib.error.HTTPError) -> ServerError:
    raw = e.read()
    try:
        body = json.loads(raw)
        message = body["error"]["message"]
    except (ValueError, KeyError, TypeError):
        body, message = None, raw.decode("utf-8", "replace").strip() or e.reason
    return ServerError(f"HTTP {e.code}: {message}", e.code, body)
