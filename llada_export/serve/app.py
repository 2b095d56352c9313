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
batch 1.0 with requests queued for seconds) instead of all that queued meanwhile. Requests
waiting for the engine are not in Serve's batch queue length metric (they count as ongoing).

A caller that disconnects is cancelled by Serve; the batch it was in runs to the end for the
others. Ray Serve's metrics (batch sizes, queue lengths, latencies) stay on: Prometheus text at
the node's metrics port.
"""

from __future__ import annotations

import asyncio
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from .api import MAX_IMAGE_BYTES, APIError, completion, parse_chat

APP_NAME, DEPLOYMENT = "llada", "LLaDAServer"


@dataclass
class ServeOptions:
    engines: str
    model_name: str | None = None  # default: the engines directory's name
    max_batch: int | None = None  # default: the engines' batch size
    batch_wait_ms: float = 10.0
    backend: str | None = None
    device: str | None = None  # default: cuda where the replica has a GPU, else what the engines were built for
    threads: int | None = None  # CPU threads per replica for the engines
    max_image_mb: float = MAX_IMAGE_BYTES / 2**20

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
        self.batchers: dict = {}
        self.running = 0  # batches started and not finished (on the engine thread or waiting for it)
        self.idle: asyncio.Event | None = None  # set while running == 0 (made in the replica's event loop)
        self.started = time.time()

    # ------------------------------------------------------------------ routing
    async def __call__(self, http):
        from starlette.responses import JSONResponse

        route = (http.method, http.url.path.rstrip("/") or "/")
        handlers = {("POST", "/v1/chat/completions"): self.chat, ("GET", "/v1/models"): self.models,
                    ("GET", "/health"): self.health}
        try:
            if route not in handlers:
                known = {p for _, p in handlers}
                if route[1] in known:
                    raise APIError(f"{route[0]} is not allowed on {route[1]}", status=405, code="method_not_allowed")
                raise APIError(f"no route {route[1]}; routes: POST /v1/chat/completions, GET /v1/models, GET /health",
                               status=404, code="not_found")
            return JSONResponse(await handlers[route](http))
        except APIError as e:
            return JSONResponse(e.body(), status_code=e.status)

    async def health(self, http) -> dict:
        return {"status": "ok", "model": self.options.name, "uptime_s": round(time.time() - self.started, 1)}

    async def models(self, http) -> dict:
        p, bucket = self.pipe, self.pipe.bucket
        info = {"backend": p.backend, "device": p.device, "pruned": p.pruned, "unpruned_graph": p.has_unpruned,
                "prefix_cache": p.has_cache(), "batch_size": bucket.batch_size, "max_batch": self.max_batch,
                "max_tokens": bucket.gen_length, "max_text_tokens": bucket.max_text_tokens,
                "max_visual_tokens": bucket.max_visual_tokens, "generation_defaults": p.manifest.generation}
        return {"object": "list", "data": [{"id": self.options.name, "object": "model", "created": int(self.started),
                                            "owned_by": "llada-export", "llada": info}]}

    async def chat(self, http) -> dict:
        t0 = time.perf_counter()
        raw = await http.body()
        limit = int(self.options.max_image_mb * 2**20)
        if len(raw) > limit * 4 // 3 + 2**20:  # base64 of the largest image, plus room for the text
            raise APIError(f"the request body is {len(raw) / 2**20:.1f} MiB; images up to "
                           f"{self.options.max_image_mb:g} MiB are taken", status=413, code="request_too_large")
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(f"the request body is not valid JSON ({e})", code="invalid_json") from e
        chat = parse_chat(body, limit)
        if chat.model is not None and chat.model != self.options.name:
            raise APIError(f"model {chat.model!r} is not served here; this server serves {self.options.name!r}",
                           status=404, param="model", code="model_not_found")
        request, gen, prompt_tokens = self._admit(chat)
        await self._engine_idle()
        try:
            result, batch = await self._batcher(gen, chat.unpruned)(request)
        except Exception as e:  # the engines failed on a batch: every caller in it hears why
            raise APIError(f"generation failed: {type(e).__name__}: {e}", status=500, type="server_error") from e
        extra = {"batch": {"size": batch["size"], "seconds": batch["seconds"]}, "queue_s": batch["started"] - t0,
                 "server_s": time.perf_counter() - t0, "setting": gen.describe()}
        return completion(self.options.name, result, prompt_tokens, gen.gen_length, extra)

    def _admit(self, chat):
        """The pipeline request and its GenerationConfig, checked against these engines (a 4xx if not)."""
        from ..contract.layout import RequestError
        from ..runtime.pipeline import Request
        from ..tokenizer import DEFAULT_SYSTEM_PROMPT

        request = Request(chat.image, chat.prompt, DEFAULT_SYSTEM_PROMPT if chat.system is None else chat.system,
                          chat.seed)
        try:
            gen = self.pipe.generation_config(unpruned=chat.unpruned, **chat.settings)
        except self.refusals as e:
            raise APIError(str(e), code="invalid_settings") from e
        try:
            n_text, n_visual = self.pipe.check(request, gen.gen_length)
        except RequestError as e:  # larger than the bucket
            raise APIError(str(e), code="context_length_exceeded") from e
        except self.refusals as e:
            raise APIError(str(e), code="invalid_prompt") from e
        return request, gen, n_text + n_visual

    async def _engine_idle(self) -> None:
        """Return once no batch is running (at once when none is): what arrives during a batch joins
        the next one together (see the module's docstring)."""
        if self.idle is None:
            self.idle = asyncio.Event()
            self.idle.set()
        while self.running:
            await self.idle.wait()

    def _batcher(self, gen, unpruned: bool):
        """The batch queue of one generation setting (made at its first request)."""
        from ray import serve

        key = (gen, unpruned)
        if key not in self.batchers:
            async def run(requests: list) -> list:
                started = time.perf_counter()
                self.running += 1
                self.idle.clear()
                try:
                    loop = asyncio.get_running_loop()
                    results = await loop.run_in_executor(
                        self.engine, lambda: self.pipe.generate_batch(requests, unpruned=unpruned, config=gen))
                finally:
                    self.running -= 1
                    if not self.running:
                        self.idle.set()
                info = {"size": len(requests), "started": started, "seconds": time.perf_counter() - started}
                return [(r, info) for r in results]

            self.batchers[key] = serve.batch(max_batch_size=self.max_batch,
                                             batch_wait_timeout_s=self.options.batch_wait_ms / 1e3)(run)
        return self.batchers[key]

    def check_health(self) -> None:
        """Serve calls this periodically; an exception marks the replica unhealthy and restarts it."""
        if self.engine._shutdown:
            raise RuntimeError("the engine thread is gone")


def build_app(options: ServeOptions, replicas: int = 1, gpus_per_replica: float = 0, cpus_per_replica: float = 1):
    """The bound Serve application: ``replicas`` copies of :class:`LLaDAServer`."""
    from ray import serve

    actor = {"num_cpus": cpus_per_replica, **({"num_gpus": gpus_per_replica} if gpus_per_replica else {})}
    max_batch = options.max_batch or 0
    deployment = serve.deployment(LLaDAServer, name=DEPLOYMENT).options(
        num_replicas=replicas, ray_actor_options=actor,
        # room for a full batch per setting queued behind the one running; beyond it Serve queues in the proxy
        max_ongoing_requests=max(16, 4 * max_batch),
        health_check_period_s=5, health_check_timeout_s=30, graceful_shutdown_timeout_s=5)
    return deployment.bind(asdict(options))
