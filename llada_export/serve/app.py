"""``llada-serve``'s Ray Serve application: one ``Pipeline`` per replica, requests batched per setting.

A replica loads the engines once (on its own GPU where the cluster has GPUs: Ray gives each
replica one and sets ``CUDA_VISIBLE_DEVICES``), then answers the routes of
:mod:`llada_export.serve.api`. A chat request is checked in full (body, image, sampler settings,
whether it fits the bucket) before it joins a batch, so a bad request fails alone with a 4xx and
nothing else is affected. Good requests wait up to ``batch_wait_ms`` in the queue of their
generation setting (``@serve.batch``, one queue per setting: rows of a batch share the sampler
schedule) and run together, up to ``max_batch`` rows, on one engine thread per replica.

While a batch runs, new requests wait before the queues and join them together when the engine
is free. Serve's batcher closes its next batch ``batch_wait_ms`` after the first request that
comes after the last batch started, whether or not the engine is free (it then waits for it):
under steady load every batch would hold the one or two requests of that window (measured: mean
batch 1.0 with requests queued for seconds) instead of all that queued meanwhile. For the same
reason at most ``max_batch`` requests of one setting are let into its queue until their batch
starts; the rest wait for the next batch: a surplus let in closed a partial batch of its own
while the others waited (measured: 8 streaming clients at max batch 4 ran batches of 4, 2, 2,
...). Requests waiting for the engine are not in Serve's batch queue length metric (they count
as ongoing). Those of one setting are let in first come, first served (``serve/gate.py``): one that
arrives as a batch ends waits behind the ones that waited for it.

At most ``max_queued`` requests wait on a replica (being checked, at the gate or in a batch queue:
``Room`` in ``serve/gate.py``); one more is refused at once with a 503 ``server_overloaded`` and a
``Retry-After`` of the last batch's seconds (the running batch's end makes room), counted in GET /health and
``llada_overloaded``, instead of queueing without bound while every caller's wait grows. The deployment
sends a replica that many requests beyond its batches (``max_ongoing_requests``), so the limit is the
replica's own, not Serve's proxy queue.

On Ctrl-C or SIGTERM the server drains before it stops (``serve/drain.py``): a new chat request is refused
with a 503 ``server_shutting_down``, GET /health answers 503 ``draining``, and every request taken
(``Flights``: counted from its admission until its answer is sent) is answered first.

Browser pages of the origins ``allowed_origins`` names may call the API (``serve/cors.py``: a preflight
is answered with a 204, every answer carries ``Access-Control-Allow-Origin``); other origins' preflights
get a 403, and without the option no answer carries CORS headers.

A body is read up to 16 MiB (413 beyond, from its Content-Length before a byte is read), then
parsed, decoded and checked on an admission thread, never on the replica's event loop; a prompt
whose byte length alone cannot fit the bucket is refused before it is tokenised.

A streaming request (``stream: true``) joins the same batch queues as a plain one: the sampler's
per-step callback hands each streaming row's committed prefix (the answer's longest prefix with no
mask left: it grows as the sampler fills it from the left, block by block with block_length <
gen_length) to its caller's event stream, which sends the new text as a chunk; only batches with a
streaming row (or a stop string) read the ids back each step.

A caller that disconnects (plain or streaming) is cancelled: Serve cancels a plain request's
handler, a stream's generator is closed; either sets its row's cancel flag, which the sampler reads
before each forward. A cancelled row stops committing (and no longer asks the cached step for a
refresh); the batch goes on for the others, and ends at the next step once none is left. A row
cancelled before its batch starts is left out of it. A request with a ``stop`` string (streamed or
plain: its committed prefix is then read each step) stops its row the same way once the stop string
has come. Rows cancelled or finished free their slots: once the rows still running fit a smaller
built batch size (a ``--batch-sizes`` directory), the batch goes on with only them on the smallest
size that holds them; in a single-size directory their slots are computed (and ignored) until the
batch ends. The engine then takes the next batch. Each replica counts them:
``cancelled`` (callers that hung up) and ``stopped`` (answers ended by a stop string), in GET
/health and as the Prometheus counters ``llada_cancelled`` / ``llada_stopped`` next to Ray Serve's
metrics (batch sizes, queue lengths, latencies) at the node's metrics port.

Each request is answered as soon as its own row is done (the sampler hands the row's final answer out
between two forwards), not when its batch ends: a one-word answer batched with a long one leaves after
its own forwards. Its ``llada.batch.seconds`` and timings count the batch's time up to that answer. The
batch itself still runs until its longest row is done, so the next batch (and a request that arrives
meanwhile) waits for it: a freed slot is not refilled mid-batch.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..rules import shorten
from .api import (MAX_BODY_BYTES, APIError, check_body_size, check_content_type, chunk, completion, decode_json,
                  finish_reason, llada_info, parse_chat, sse, usage)
from .cors import answer_headers, preflight_headers
from .drain import Flights, find_board
from .gate import Gate, Overloaded, Room
from .stream import RowStreams, TextStream, answer_with_stop

APP_NAME, DEPLOYMENT = "llada", "LLaDAServer"
DRAIN_FACTOR = 4  # a body over the limit is read (and dropped) up to this many times the limit before the 413
log = logging.getLogger("ray.serve")  # a replica's own log file under the session folder's logs/serve/
# API names of the settings the runtime checks, by the name its messages use
RUNTIME_NAMES = {"gen_length": "max_tokens", "temperature": "temperature", "seed": "seed", "steps": "steps",
                 "block_length": "block_length", "refresh": "refresh", "factor": "factor", "threshold": "threshold",
                 "cfg_scale": "cfg_scale", "remasking": "remasking", "preset": "preset", "cache": "cache",
                 "prompt": "messages", "system": "messages"}


@dataclass
class ServeOptions:
    engines: str
    model_name: str | None = None  # default: the engines directory's name
    max_batch: int | None = None  # default: the engines' batch size (the largest of their --batch-sizes)
    batch_wait_ms: float = 10.0
    backend: str | None = None
    device: str | None = None  # default: cuda where the replica has a GPU, else what the engines were built for
    threads: int | None = None  # CPU threads per replica for the engines
    max_body_mb: float = MAX_BODY_BYTES / 2**20  # the largest request body (an image's base64 included)
    allowed_origins: tuple[str, ...] = ()  # browser pages' origins that may call the API (serve/cors.py); none: no CORS
    max_queued: int | None = 64  # requests a replica holds waiting for their batch; one more is a 503 (None: no limit)

    @property
    def name(self) -> str:
        return self.model_name or Path(self.engines).resolve().name


class LLaDAServer:
    """The deployment's class (Ray Serve wraps it in :func:`build_app`)."""

    def __init__(self, options: dict):
        import torch

        from ..contract.layout import RequestError
        from ..graphs.anyres import ImageError
        from ..runtime.pipeline import Pipeline
        from ..sampler import GenerationError
        from ..tokenizer import PromptError

        self.options = ServeOptions(**options)
        device = self.options.device or ("cuda" if torch.cuda.is_available() else None)
        self.pipe = Pipeline.load(self.options.engines, backend=self.options.backend, device=device,
                                  threads=self.options.threads)
        self.pipe.warmup()  # compile / capture / first-run costs now, not in the first request
        b = self.pipe.bucket.batch_size
        self.max_batch = min(self.options.max_batch or b, b)
        self.refusals = (RequestError, ImageError, GenerationError, PromptError)
        self.engine = ThreadPoolExecutor(1, thread_name_prefix="llada-engine")  # one batch at a time per device
        self.admission = ThreadPoolExecutor(2, thread_name_prefix="llada-admit")  # parse, decode, tokenise
        # no token spans more UTF-8 bytes than the longest vocabulary entry's own (byte-level entries take 1 or 2
        # bytes per byte they stand for): a prompt of n bytes has at least n / this many tokens
        self.max_token_bytes = max(len(t.encode("utf-8", "surrogatepass")) for t in self.pipe.tokenizer.get_vocab())
        self.batchers: dict = {}
        self.gate = Gate(self.max_batch)  # who may join a batch queue now (serve/gate.py)
        self.room = Room(self.options.max_queued)  # how many may wait for a batch at all (serve/gate.py)
        self.last_batch_s = 1.0  # the last batch's seconds: a refused caller's Retry-After
        self.started = time.time()
        # rows stopped early (callers that hung up, stop strings) and requests refused because the room was full
        self.counts = {"cancelled": 0, "stopped": 0, "overloaded": 0}
        self.counters = _counters()
        self.flights = Flights()  # chat requests in flight; refused while the server drains (serve/drain.py)
        if (board := find_board(APP_NAME)) is not None:
            self.flights.watch(board, _replica_id())

    def _stop_row(self, row: "Row", why: str, message: str | None = None) -> None:
        """Stop computing ``row`` (its sampler row is frozen from the next step on), counted under ``why``
        (``cancelled`` or ``stopped``) in /health and the Prometheus counter; ``message`` to the log."""
        if row.cancelled.is_set():
            return
        row.cancelled.set()
        self._count(why, message)

    def _count(self, why: str, message: str | None = None) -> None:
        self.counts[why] += 1
        if self.counters:
            self.counters[why].inc()
        if message:
            log.warning("llada: %s", message)

    # ------------------------------------------------------------------ routing
    async def __call__(self, http):
        from starlette.responses import JSONResponse, Response

        route = (http.method, http.url.path.rstrip("/") or "/")
        origin = http.headers.get("origin")
        if http.method == "OPTIONS" and "access-control-request-method" in http.headers:  # a browser's preflight
            headers = preflight_headers(origin, http.headers.get("access-control-request-headers"),
                                        self.options.allowed_origins)
            if headers is None:
                e = APIError(f"origin {shorten(repr(origin))} may not call this server from a browser; start "
                             "llada-serve with --allowed-origins naming it", status=403, code="origin_not_allowed")
                return JSONResponse(e.body(), status_code=e.status)
            return Response(status_code=204, headers=headers)
        response = await self._route(http, route)
        response.headers.update(answer_headers(origin, self.options.allowed_origins))
        return response

    async def _route(self, http, route: tuple[str, str]):
        from starlette.responses import JSONResponse

        handlers = {("POST", "/v1/chat/completions"): self.chat, ("GET", "/v1/models"): self.models,
                    ("GET", "/health"): self.health}
        if route[1].startswith("/v1/models/"):  # OpenAI's "retrieve model": GET /v1/models/{model}
            handlers[("GET", route[1])] = self.model
        try:
            if route not in handlers:
                known = {p for _, p in handlers}
                if route[1] in known:
                    raise APIError(f"{route[0]} is not allowed on {route[1]}", status=405, code="method_not_allowed")
                raise APIError(f"no route {route[1]}; routes: POST /v1/chat/completions, GET /v1/models, GET "
                               "/v1/models/{model}, GET /health", status=404, code="not_found")
            answer = await handlers[route](http)
            return answer if not isinstance(answer, dict) else JSONResponse(answer)
        except APIError as e:
            return JSONResponse(e.body(), status_code=e.status, headers=e.headers)
        except Exception as e:  # noqa: BLE001 - a fault of ours: still a JSON answer, and in the replica's log
            log.exception("llada: %s %s failed", *route)
            return JSONResponse(APIError(f"internal error: {type(e).__name__}: {e}", status=500,
                                         type="server_error").body(), status_code=500)

    async def health(self, http):
        """``cancelled`` / ``stopped``: this replica's rows stopped early since it started (see the module);
        ``overloaded``: requests it refused with a 503 because ``waiting`` had reached ``max_queued``;
        ``in_flight``: chat requests taken and not yet answered. A 503 with ``"status": "draining"`` once the
        server is stopping (``serve/drain.py``): a load balancer's check then takes it out of its pool."""
        from starlette.responses import JSONResponse

        body = {"status": "draining" if self.flights.draining else "ok", "model": self.options.name,
                "uptime_s": round(time.time() - self.started, 1), "in_flight": len(self.flights),
                "waiting": self.room.waiting(), "max_queued": self.options.max_queued, **self.counts}
        return JSONResponse(body, status_code=503) if self.flights.draining else body

    async def models(self, http) -> dict:
        p, bucket = self.pipe, self.pipe.bucket
        info = {"backend": p.backend, "device": p.device, "pruned": p.pruned, "unpruned_graph": p.has_unpruned,
                "prefix_cache": p.has_cache(), "batch_size": bucket.batch_size, "batch_sizes": p.batch_sizes,
                "max_batch": self.max_batch,
                "max_tokens": bucket.gen_length, "max_text_tokens": bucket.max_text_tokens,
                "max_visual_tokens": bucket.max_visual_tokens, "generation_defaults": p.manifest.generation}
        return {"object": "list", "data": [{"id": self.options.name, "object": "model", "created": int(self.started),
                                            "owned_by": "llada-export", "llada": info}]}

    async def model(self, http) -> dict:
        """``GET /v1/models/{model}`` (the official client's ``models.retrieve``): the entry of ``/v1/models``
        for this server's model, 404 ``model_not_found`` for any other name."""
        name = http.url.path.rstrip("/").removeprefix("/v1/models/")  # the server decoded the %-escapes
        entry = (await self.models(http))["data"][0]
        if name != entry["id"]:
            raise self._not_served(name)
        return entry

    def _not_served(self, name: str) -> APIError:
        return APIError(f"model {shorten(repr(name))} is not served here; this server serves {self.options.name!r}",
                        status=404, param="model", code="model_not_found")

    async def chat(self, http):
        t0 = time.perf_counter()
        raw = await self._read_body(http)  # read (or drained) first, so that the client hears the refusal
        check_content_type(http.headers.get("content-type"))
        flight = self.flights.take()  # a 503 once the server drains; else counted until its answer is sent
        loop = asyncio.get_running_loop()
        try:
            with self.room.parse():  # a full room refuses at once, before the body is parsed
                chat, request, gen, prompt_tokens = await loop.run_in_executor(self.admission, self._admit, raw)
        except BaseException as e:
            self.flights.land(flight)
            if isinstance(e, Overloaded):
                raise self._overloaded(e) from None
            raise
        if chat.stream:
            return self._stream(chat, request, gen, prompt_tokens, t0, flight)
        row = Row(request)
        self.room.hold(row)
        try:
            return await self._chat(chat, row, gen, prompt_tokens, t0)
        finally:
            self.room.release([row])
            self.flights.land(flight)

    def _overloaded(self, e: Overloaded) -> APIError:
        """The 503 of a request the full room refused (counted; not logged: a flood would fill the log)."""
        self._count("overloaded")
        retry = max(1, min(60, math.ceil(self.last_batch_s)))  # room is made when the running batch ends
        return APIError(f"the server is overloaded: {e.waiting} requests already wait for a batch on this replica "
                        f"(its limit, llada-serve --max-queued {e.limit}); retry after {retry} s (Retry-After), or "
                        "serve with more --replicas or a larger --max-queued", status=503, type="server_error",
                        code="server_overloaded", headers={"Retry-After": str(retry)})

    async def _chat(self, chat, row: "Row", gen, prompt_tokens: int, t0: float) -> dict:
        """A plain (not streamed) request's answer, its row held in the room until its batch starts."""
        if chat.stop:  # the row stops once a stop string is in its committed prefix (the answer up to it is final)
            row.push = _stop_watch(TextStream(self._decode, chat.stop), row.cancelled)
        key = (gen, chat.unpruned)
        try:
            await self.gate.enter(key, row)
            result, batch = await self._answer(key, row)
        except asyncio.CancelledError:
            self._stop_row(row, "cancelled", "a request was cancelled (its caller hung up); its row stops, its "
                           "batch goes on for the others")
            raise
        except Exception as e:  # the engines failed on a batch: every caller in it hears why
            raise APIError(f"generation failed: {type(e).__name__}: {e}", status=500, type="server_error") from e
        if result.finish_reason == "cancelled":  # by its stop string, which the committed prefix holds
            self._count("stopped")
            result.finish_reason = "stop"
        answer = answer_with_stop(self._decode, result.ids, result.text, chat.stop) if chat.stop else None
        return completion(self.options.name, result, prompt_tokens, gen.gen_length, self._extra(batch, gen, t0),
                          answer)

    @staticmethod
    def _extra(batch: dict, gen, t0: float) -> dict:
        return {"batch": {"id": batch["id"], "size": batch["size"], "seconds": batch["seconds"]},
                "queue_s": batch["started"] - t0, "server_s": time.perf_counter() - t0, "setting": gen.describe()}

    def _decode(self, ids: list[int]) -> str:
        from ..tokenizer import decode_answer

        return decode_answer(self.pipe.tokenizer, ids)

    def _stream(self, chat, request, gen, prompt_tokens: int, t0: float, flight):
        """``stream: true``: server-sent chat.completion.chunk events. The request joins the same batch
        queue as a plain one; each step's committed prefix (the answer's longest prefix with no mask
        left) comes from the sampler's per-step callback, and each chunk carries its new text. The last
        chunk has the finish_reason (and this server's ``llada`` record); with ``stream_options:
        {"include_usage": true}`` a chunk with the usage and no choices follows, then ``data: [DONE]``.
        A caller that hangs up (the generator is closed before its end) is cancelled, and a stop string
        stops the row too: either way its row stops computing and its batch goes on for the others.
        ``flight`` (its count in /health and the drain) lands when the stream ends, or goes with the
        generator if the response never started."""
        from starlette.responses import StreamingResponse

        loop = asyncio.get_running_loop()
        prefixes: asyncio.Queue = asyncio.Queue()
        row = Row(request, lambda ids: loop.call_soon_threadsafe(prefixes.put_nowait, ids))
        self.room.hold(row)  # until its batch starts or its stream ends (or nothing holds the stream any more)
        cid, created, name = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), self.options.name
        extra = {"usage": None} if chat.include_usage else {}

        async def events():
            text = TextStream(self._decode, chat.stop)
            task, ended = None, False
            try:
                yield chunk(cid, name, created, {"role": "assistant", "content": ""}, **extra)
                key = (gen, chat.unpruned)
                await self.gate.enter(key, row)
                task = asyncio.ensure_future(self._answer(key, row))  # its batch's task is never cancelled
                task.add_done_callback(_consume)  # nobody may await it any more (the caller hung up)
                while not text.stopped:
                    ids = asyncio.ensure_future(prefixes.get())
                    done, _ = await asyncio.wait({ids, task}, return_when=asyncio.FIRST_COMPLETED)
                    if ids not in done:
                        ids.cancel()
                        break
                    if delta := text.feed(ids.result()):
                        yield chunk(cid, name, created, {"content": delta}, **extra)
                if text.stopped:  # a stop string: the answer is complete, the rest of the row is not computed
                    self._stop_row(row, "stopped")
                    reason, n_tokens, info = "stop", text.stop_tokens, {}
                else:
                    try:
                        result, batch = await task
                    except Exception as e:  # noqa: BLE001 - the engines failed on the batch: said in the stream
                        log.exception("llada: a streamed request's batch failed")
                        ended = True
                        yield sse({"error": APIError(f"generation failed: {type(e).__name__}: {e}", status=500,
                                                     type="server_error").body()["error"]})
                        return
                    if delta := text.finish(result.text):
                        yield chunk(cid, name, created, {"content": delta}, **extra)
                    if text.stopped:
                        _, n_tokens, _ = answer_with_stop(self._decode, result.ids, result.text, chat.stop)
                        reason = "stop"
                    else:
                        n_tokens, reason = len(result.ids), finish_reason(result, gen.gen_length)
                    info = {"llada": llada_info(result) | self._extra(batch, gen, t0)}
                yield chunk(cid, name, created, {}, reason, **extra, **info)
                if chat.include_usage:
                    yield sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": name,
                               "choices": [], "usage": usage(prompt_tokens, n_tokens)})
                ended = True
                yield sse("[DONE]")
            finally:
                self.room.release([row])
                self.flights.land(flight)
                if not ended:  # closed before its end: the caller hung up
                    self._stop_row(row, "cancelled", "a streaming caller hung up; its row stops, its batch goes on "
                                   "for the others")

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _read_body(self, http) -> bytes:
        """The body, at most the limit; a 413 beyond it. Bytes past the limit are read and dropped, never
        kept or parsed (up to DRAIN_FACTOR times the limit, announced or not), so that a client that reads
        its answer only once it has sent its body (most do) gets the 413 rather than a reset connection."""
        limit = int(self.options.max_body_mb * 2**20)
        declared = http.headers.get("content-length", "")
        declared = int(declared) if declared.isdigit() else None
        if declared is not None and declared > DRAIN_FACTOR * limit:
            check_body_size(declared, limit)  # not worth reading at all
        chunks, n = [], 0
        async for part in http.stream():
            n += len(part)
            if n > limit or (declared or 0) > limit:
                chunks.clear()  # over the limit: only counted from here on
                if n > DRAIN_FACTOR * limit:
                    break
            else:
                chunks.append(part)
        check_body_size(max(n, declared or 0), limit)
        return b"".join(chunks)

    def _admit(self, raw: bytes):
        """On the admission thread: the body -> (chat, pipeline request, GenerationConfig, prompt tokens),
        checked against these engines by the runtime's own rules (a 4xx naming the field if not)."""
        chat = parse_chat(decode_json(raw), int(self.options.max_body_mb * 2**20))  # 4xx naming the field
        if chat.model is not None and chat.model != self.options.name:
            raise self._not_served(chat.model)
        from ..contract.layout import RequestError
        from ..runtime.pipeline import Request
        from ..tokenizer import DEFAULT_SYSTEM_PROMPT

        bucket = self.pipe.bucket
        max_tokens = chat.settings.get("gen_length")
        if max_tokens is not None and max_tokens > bucket.gen_length:
            raise APIError(f"{chat.length_field} {max_tokens} is over these engines' maximum {bucket.gen_length} "
                           f"(their --gen-length): ask for at most {bucket.gen_length}", param=chat.length_field,
                           code="invalid_settings")
        if chat.unpruned and self.pipe.pruned and not self.pipe.has_unpruned:  # the runtime's message names no field
            raise APIError("unpruned: these engines have no unpruned graph (exported without --baseline): leave "
                           "unpruned out", param="unpruned", code="invalid_settings")
        try:
            request = Request(chat.image, chat.prompt, DEFAULT_SYSTEM_PROMPT if chat.system is None else chat.system,
                              chat.seed, chat.history).validate()
            gen = self._generation_config(chat)
        except ValueError as e:
            raise self._refused(e, chat) from e
        self._check_prompt_bytes(request)
        try:
            n_text, n_visual = self.pipe.check(request, gen.gen_length)
        except RequestError as e:  # larger than the bucket
            raise self._refused(e, chat, param="messages", code="context_length_exceeded") from e
        except ValueError as e:
            raise self._refused(e, chat, fallback="messages") from e
        return chat, request, gen, n_text + n_visual

    def _refused(self, e: ValueError, chat, *, param: str | None = None, fallback: str | None = None,
                 code: str | None = None) -> APIError:
        """A runtime refusal as the caller's 400, in the API's words: the server's engines path (some messages
        start with it) said as "the engines directory", and the runtime's gen_length, in the message and as
        ``param``, by the field the caller sent (max_tokens or max_completion_tokens). ``param``: the field
        whatever the refusal names; else the one it names (:func:`_param`), else ``fallback``."""
        # only where the runtime puts the path ("ROOT: ...", "ROOT has no ...", "... and ROOT was exported ..."):
        # engines served as `--engines engines` must not turn every word "engines" into the phrase
        where = r"(?<![^\s])" + re.escape(str(self.pipe.root)) + r"(?=:| has | was )"
        message = re.sub(r"\bgen_length\b", chat.length_field, re.sub(where, "the engines directory", str(e)))
        if param is None:
            param = _param(e) or fallback
            param = chat.length_field if param == "max_tokens" else param
        return APIError(message, param=param, code=code or _code(e))

    def _generation_config(self, chat):
        """``Pipeline.generation_config`` for the request; a preset that does not fit these engines is named."""
        from ..contract.layout import RequestError
        from ..sampler import PRESETS, GenerationError

        try:
            return self.pipe.generation_config(unpruned=chat.unpruned, **chat.settings)
        except (GenerationError, RequestError) as e:
            name = chat.settings.get("preset")
            if name not in PRESETS:
                raise
            api = {"gen_length": "max_tokens", "block_length": "block_length", "steps": "steps"}
            unset = [k for k in api if k not in chat.settings]  # what the preset decides
            if not any(k in str(e) for k in unset):
                raise
            raise GenerationError(
                f"preset {name!r} sets {', '.join(f'{k} {getattr(PRESETS[name], k)}' for k in unset)}, which does "
                f"not fit the rest of this request on these engines (responses of at most "
                f"{self.pipe.bucket.gen_length} tokens): {e}; give {', '.join(api[k] for k in unset)} too, or leave "
                "preset out") from e

    def _check_prompt_bytes(self, request) -> None:
        """A prompt too long for the bucket by its UTF-8 length alone, refused before it is tokenised."""
        texts = (request.prompt, request.system, *(t for _, t in request.history))
        n_bytes = sum(len(t.encode("utf-8", "surrogatepass")) for t in texts)
        at_least = n_bytes // self.max_token_bytes - 2  # a token may straddle the chat template's text at each end
        limit = self.pipe.bucket.max_text_tokens
        if at_least > limit:
            raise APIError(f"the prompt is {n_bytes} bytes: at least {at_least} text tokens, and these engines take "
                           f"at most {limit}: shorten it, or re-export with a larger --max-prompt-tokens",
                           param="messages", code="context_length_exceeded")

    def _batcher(self, gen, unpruned: bool):
        """The batch queue of one generation setting (made at its first request)."""
        from ray import serve

        key = (gen, unpruned)
        if key not in self.batchers:
            async def run(rows: list) -> list:
                started = time.perf_counter()
                self.gate.leave(key, rows)
                self.room.release(rows)
                live = [r for r in rows if not r.cancelled.is_set()]  # cancelled while queued: left out
                info = {"id": uuid.uuid4().hex[:12], "size": len(live), "started": started}
                results = await self._generate(live, gen, unpruned, info) if live else []
                info["seconds"] = time.perf_counter() - started
                if live:
                    self.last_batch_s = info["seconds"]
                _log_cancelled(info["id"], len(rows) - len(live), results)
                answers = dict(zip(map(id, live), results))
                return [(answers.get(id(r)), info) for r in rows]  # None: a row left out (nobody waits for it)

            self.batchers[key] = serve.batch(max_batch_size=self.max_batch,
                                             batch_wait_timeout_s=self.options.batch_wait_ms / 1e3)(run)
        return self.batchers[key]

    async def _answer(self, key, row: "Row") -> tuple:
        """(result, batch info) of ``row``'s request, as soon as its row is done (the engine thread hands it
        out between two forwards while longer rows go on), else when its batch ends. The batch's task is
        never cancelled: a caller that hangs up sets its row's cancel flag, and the batch frees its place."""
        loop = asyncio.get_running_loop()
        early = loop.create_future()
        row.finished = lambda value: loop.call_soon_threadsafe(_settle, early, value)
        task = asyncio.ensure_future(self._batcher(*key)(row))
        task.add_done_callback(_consume)
        task.add_done_callback(lambda _: self.gate.leave(key, [row]))  # a batch queue that failed, too
        done, _ = await asyncio.wait({early, task}, return_when=asyncio.FIRST_COMPLETED)
        return early.result() if early in done else task.result()

    async def _generate(self, rows: list, gen, unpruned: bool, info: dict) -> list:
        """One batch on the engine thread; the sampler reads the rows' cancel flags before each forward, and
        each row's answer goes to its caller once the row is done (``info``: the batch's id, size, start)."""
        self.gate.batch_started()
        requests = [r.request for r in rows]
        tokens = self.pipe.tokens
        on_step = (RowStreams([r.push for r in rows], tokens.mask, tokens.eot)
                   if any(r.push for r in rows) else None)  # a read-back per step only for streams
        flags = [r.cancelled for r in rows]

        def on_finish(i: int, result) -> None:  # on the engine thread
            if rows[i].finished is not None:
                rows[i].finished((result, {**info, "seconds": time.perf_counter() - info["started"]}))

        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(
                self.engine, lambda: self.pipe.generate_batch(requests, unpruned=unpruned, config=gen,
                                                              on_step=on_step, on_finish=on_finish,
                                                              cancel=lambda: [f.is_set() for f in flags]))
        finally:
            self.gate.batch_ended()

    def check_health(self) -> None:
        """Serve calls this periodically; an exception marks the replica unhealthy and restarts it."""
        if self.engine._shutdown:
            raise RuntimeError("the engine thread is gone")


@dataclass(eq=False)  # known by identity (the gate, the room's weak set)
class Row:
    """A request in a batch queue; ``push``: its stream's committed prefixes (called on the engine thread),
    None for a plain request; ``cancelled``: set when the row is to stop (read by the sampler each step)."""

    request: object  # runtime Request
    push: object = None  # Callable[[list[int]], None] | None
    cancelled: threading.Event = field(default_factory=threading.Event)
    finished: object = None  # Callable[[tuple], None]: (result, batch info) once the row is done (engine thread)


def _replica_id() -> str:
    from ray import serve

    return serve.get_replica_context().replica_id.unique_id


def _settle(future: asyncio.Future, value) -> None:
    if not future.done():
        future.set_result(value)


def _stop_watch(text: TextStream, flag: threading.Event):
    """A plain request's ``push`` (on the engine thread): its committed prefixes into ``text``; ``flag`` set
    once a stop string has come."""
    def push(ids: list[int]) -> None:
        text.feed(ids)
        if text.stopped:
            flag.set()

    return push


def _counters() -> dict:
    """The replica's Prometheus counters of rows stopped early (empty outside a Serve replica)."""
    try:
        from ray.serve.metrics import Counter

        return {"cancelled": Counter("llada_cancelled", "requests whose caller hung up before the answer; their "
                                     "rows stopped computing"),
                "stopped": Counter("llada_stopped", "answers ended by a stop string; their rows stopped computing"),
                "overloaded": Counter("llada_overloaded", "requests refused with a 503 because --max-queued requests "
                                      "already waited for a batch")}
    except Exception:  # noqa: BLE001 - no Ray metrics here: /health still counts
        return {}


def _log_cancelled(batch: str, left_out: int, results: list) -> None:
    """In the replica's log: the rows of a batch that stopped early, and the forwards the batch made."""
    stopped = sum(r.finish_reason == "cancelled" for r in results)
    if left_out:
        log.warning("llada: batch %s: %d cancelled row(s) left out before it started", batch, left_out)
    if stopped:
        log.warning("llada: batch %s: %d of %d rows stopped early; %d forwards", batch, stopped, len(results),
                    max(r.forwards for r in results))


def _consume(task: asyncio.Future) -> None:
    """A request's batch future (or a stream's answer), when nobody awaits it any more (its caller hung up):
    its outcome is dropped without a "never retrieved" warning."""
    if not task.cancelled():
        task.exception()


def _code(e: ValueError) -> str:
    """The error code of a runtime refusal: the prompt or image at fault, or the settings."""
    from ..graphs.anyres import ImageError
    from ..tokenizer import PromptError

    return "invalid_prompt" if isinstance(e, (PromptError, ImageError)) else "invalid_settings"


def _param(e: ValueError) -> str | None:
    """The API field a runtime refusal is about: its ``field`` when it names one, else the first setting
    its message starts with or mentions."""
    name = getattr(e, "field", None) or getattr(e, "param", None)
    if name:
        return RUNTIME_NAMES.get(name, name)
    words = str(e).replace(",", " ").replace(":", " ").split()
    return next((RUNTIME_NAMES[w] for w in words if w in RUNTIME_NAMES), None)


def build_app(options: ServeOptions, replicas: int = 1, gpus_per_replica: float = 0, cpus_per_replica: float = 1):
    """The bound Serve application: ``replicas`` copies of :class:`LLaDAServer`."""
    from ray import serve

    actor = {"num_cpus": cpus_per_replica, **({"num_gpus": gpus_per_replica} if gpus_per_replica else {})}
    max_batch = options.max_batch or 0
    deployment = serve.deployment(LLaDAServer, name=DEPLOYMENT).options(
        num_replicas=replicas, ray_actor_options=actor,
        # room for a full batch per setting queued behind the one running, and for the requests the replica lets
        # wait (--max-queued; one more is its 503): a replica's own limit, before Serve queues in the proxy
        max_ongoing_requests=max(16, 4 * max_batch) + (options.max_queued or 0),
        health_check_period_s=5, health_check_timeout_s=30, graceful_shutdown_timeout_s=5,
        # a replica that fails to load (bad engines, no memory) fails the same way again: one failure per replica
        # ends the start with its error (Serve's default, three per replica, tripled the wait for it)
        max_constructor_retry_count=replicas)
    return deployment.bind(asdict(options))
