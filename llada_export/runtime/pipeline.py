"""``Pipeline``: vision -> stage A (once) -> stage B or the prefix cache, with the official sampler, batched.

``Pipeline.load("engines/")`` validates the manifest and opens one runner per graph of the
chosen backend (per batch size of a ``--batch-sizes`` directory); ``generate(image, prompt)`` answers one
request, ``generate_batch`` up to the engines' (largest) batch size together, on the smallest size that
holds the batch (one bucket, one generation setting; rows are independent, so
an answer does not depend on what else is in its batch). The runtime imports nothing from
the exporter: the manifest, the bucket, the graph set and the layout are the contract.
"""

from __future__ import annotations

import difflib
import inspect
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from ..contract.graphset import PRUNED_PATH, UNPRUNED, UNPRUNED_PATH
from ..contract.layout import RequestError, RequestParts, check_counts, layout_bucket
from ..contract.manifest import DATA_ONLY, Manifest, ManifestError
from ..device import parse_device
from ..engines.registry import Runner, check_artifacts, get_backend, load_builtin, pick_backend
from ..graphs.anyres import ImageError, assemble, image_size, preprocess, visual_token_count
from ..light_tokenizer import open_tokenizer, tokenizer_choice
from ..rules import shorten
from ..sampler import GenerationConfig, GenerationError, SamplerTrace, StepEvent, StepInfo, generate
from ..sampler import PRODUCT_REFRESH, parallel_rule
from ..sampler import preset as get_preset
from ..tokenizer import DEFAULT_SYSTEM_PROMPT, decode_answer, encode_prompt
from .denoiser import EngineDenoiser
from .inputs import (check_history, check_prompt, check_refresh, check_seed, check_size, check_text,
                     checked_callback, checked_cancel, in_batch)
from .weights import bind_constants, read_weights, reader_choice


@dataclass
class Request:
    image: object = None  # path, PIL image, HxWx3 uint8 array, or None for text only
    prompt: str = ""
    system: str = DEFAULT_SYSTEM_PROMPT
    seed: int = 0  # for temperature > 0 / random remasking; 0 <= seed < 2**63
    # earlier turns of a conversation, (role, text) pairs between the system message and ``prompt``, rendered
    # by the chat template (the image, if any, goes in the first user turn)
    history: tuple[tuple[str, str], ...] = ()

    def validate(self) -> "Request":
        """The one rule of :mod:`.inputs`: a non-empty UTF-8 prompt, UTF-8 system text, ``history`` as
        (role, text) pairs of the chat roles, a seed in [0, 2**63) (any integer type: stored as ``int``);
        an image path must name a file. PromptError, GenerationError or ImageError."""
        check_prompt(self.prompt)
        check_text(self.system, "system")
        self.history = check_history(self.history)
        self.seed = check_seed(self.seed)  # a plain int: torch's manual_seed refuses numpy integers
        if isinstance(self.image, (str, Path)) and os.path.isdir(self.image):  # False for a too-long name
            raise ImageError(f"{shorten(str(self.image))}: is a directory, not an image file")
        return self


@dataclass
class GenerationResult:
    text: str
    ids: list[int]
    kept_visual: list[int] | None  # kept visual positions in the unpadded prompt (None: unpruned, or cancelled
    # before the first forward in a batch that moved to a smaller size without its row: stage A never saw it)
    n_visual: int
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    step_times: list[float] = field(default_factory=list)  # seconds per denoising forward (the batch's)
    forwards: int = 0  # forwards this request's row needed
    graph_calls: dict[str, int] = field(default_factory=dict)  # graph -> calls (the batch's; graph@bN: narrowed)
    # what produced the answer: Pipeline.generate(image, prompt, **settings) gives it again
    # (gen/block/steps, temperature, remasking, cfg_scale, factor/threshold, cache, refresh, seed, system, unpruned)
    settings: dict = field(default_factory=dict)
    pruning: dict | None = None  # the graphs' pruning (layer, keep, score_from); None: the unpruned graph ran
    # "stop": the answer ended at <|eot_id|>; "length": it used gen_length; "cancelled": generate_batch's
    # ``cancel`` ended the row (its ids: the committed prefix when it was cancelled)
    finish_reason: str = "length"

    def to_dict(self) -> dict:
        return dict(text=self.text, ids=self.ids, finish_reason=self.finish_reason, settings=self.settings,
                    pruning=self.pruning, kept_visual=self.kept_visual, n_visual=self.n_visual,
                    timings=self.timings, step_times=self.step_times, forwards=self.forwards,
                    graph_calls=self.graph_calls)


class Pipeline:
    """Load an engines directory and answer requests. See :meth:`generate`."""

    def __init__(self, root: Path, manifest: Manifest, backend: str, device: str, weights_from: str | None = None,
                 cuda_graphs: bool | None = None, weights: dict[str, torch.Tensor] | None = None,
                 runner_options: dict | None = None):
        self.root, self.manifest, self.backend, self.device = root, manifest, backend, device
        t0 = time.perf_counter()
        self.load_times: dict[str, float] = {}  # seconds per stage of the load (Pipeline.load adds verify, warmup)
        self.config = manifest.model_config()
        self.bucket, self.tokens = manifest.bucket, manifest.tokens
        self.keep = manifest.pruning.keep if manifest.pruning else 1.0
        self.pruned = manifest.pruned
        self.weights_reader: str | None = None  # what read the engines' weights file (runtime/weights.py)
        self.step_graph: bool | None = None  # the sampler's per-step update from a CUDA graph (None: on CUDA)
        # a batch whose running rows fit a smaller built batch size goes on at that size (generate_batch)
        self.narrow = True
        tok_dir = root / "tokenizer"
        # "light": tokenizers + jinja2, where the export found it the same as transformers' (no transformers import)
        self.tokenizer, self.tokenizer_kind = open_tokenizer(tok_dir, manifest.export) if tok_dir.is_dir() \
            else (None, None)
        self.load_times["weights:tokenizer"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        emb = load_file(str(root / "text_embeddings.safetensors"), device=device)  # the first CUDA call: its context
        self.embed_table, self.image_newline = emb["embed_tokens"], emb["image_newline"]
        self.load_times["weights:embeddings"] = time.perf_counter() - t1
        self.newline = self.image_newline.float()  # [D]
        self.mask_embed = self.embed_table[self.tokens.mask].float()[None]  # [1, D]
        b = get_backend(backend)
        external = (manifest.constants_from_checkpoint or {}).get(backend)
        # the weights the graphs use, by checkpoint key (fused ones built once; the checkpoint's tensors that
        # only fed them are freed: one copy of the weights)
        self.weights: dict[str, torch.Tensor] = {}
        if weights_from is not None and not external:
            raise ManifestError(f"{root}: the {backend} engines hold their own weights, so weights_from "
                                f"(llada-generate --weights) {weights_from} would be ignored; it applies to aoti / "
                                "inductor engines that read their weights from the checkpoint (over 2 GiB of weights)")
        if external:
            owned = weights is None
            if owned:
                weights = self._checkpoint_weights(weights_from, device)
            constants, self.weights = bind_constants(external, weights, owned)
            del weights
        self.load_times["weights"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        self.runners: dict[str, Runner] = {}  # the largest batch size's graphs (sized_runners: every size's)
        self.compile_cache = "none"
        if (rel := (manifest.compile_cache or {}).get(backend)) and b.load_cache is not None:
            self.compile_cache = b.load_cache(root / rel, device)
        precompiled = (manifest.precompiled or {}).get(backend)  # Inductor's saved kernels, per graph
        graphs = manifest.artifacts[backend]
        # a progress bar only where loading takes long: the inductor graphs compile in warmup()
        for name, rel in tqdm(graphs.items(), desc=f"load {backend}", unit="graph", disable=None if b.cuda_graphs else True):  # None: only on a terminal
            kw = {"cuda_graph": cuda_graphs, **({"precompiled": root / precompiled} if precompiled else {}),
                  **(runner_options or {})}
            if external:
                kw["constants"] = constants.pop(name)
                side = (root / rel).with_suffix(".constants.safetensors")
                if side.exists():
                    kw["constants"].update({k: v.to(device) for k, v in load_file(str(side)).items()})
            t1 = time.perf_counter()
            self.runners[name] = b.runner(root / rel, manifest.graphs[name], device, **kw)
            self.load_times[f"graphs:{name}"] = time.perf_counter() - t1
        self.load_times["graphs"] = time.perf_counter() - t0
        self.batch_sizes = manifest.sizes  # ascending; several for a --batch-sizes directory
        self.sized_runners = {n: {g: self.runners[k] for g, k in manifest.keys_at(n).items() if k in self.runners}
                              for n in self.batch_sizes}
        self.runners = self.sized_runners[self.bucket.batch_size]
        said = {getattr(r, "precompiled", None) for r in self.sized_runners_all()} - {None}
        # "loaded": every graph runs Inductor's saved kernels; "none": the export saved none; "not used": the
        # runner options turned them off; else why not (the graphs compile at warm-up)
        self.precompiled = "none" if not precompiled else "not used" if not said else "loaded" if said == {"loaded"} \
            else "; ".join(sorted(said - {"loaded"}))

    def sized_runners_all(self) -> list[Runner]:
        """Every runner of every batch size, once."""
        return list({id(r): r for rs in self.sized_runners.values() for r in rs.values()}.values())

    def _checkpoint_weights(self, weights_from: str | None, device: str) -> dict[str, torch.Tensor]:
        """Compiled graphs (aoti, inductor) built without weights: load them once from the engines' own
        weights file (``manifest.weights_file``) unless ``weights_from`` is given, else from the checkpoint."""
        if self.manifest.weights_file is not None and weights_from is None:
            t0 = time.perf_counter()
            uses = {k for m in self.manifest.constants_from_checkpoint[self.backend].values() for k in m.values()}
            weights, self.weights_reader = read_weights(self.root / self.manifest.weights_file, device, uses)
            self.load_times["weights_read"] = time.perf_counter() - t0
            return weights
        from ..checkpoint.loader import load_checkpoint  # (transformers' SigLIP modules: seconds of imports)

        src = Path(weights_from or self.manifest.source_checkpoint)
        if not src.is_dir():
            raise ManifestError(f"{self.root}: the {self.backend} graphs load their weights from the checkpoint "
                                f"{src}, which is not there; pass weights_from= (llada-generate --weights DIR)")
        model, _, cfg = load_checkpoint(src, dtype=self.manifest.dtype, device=device)
        if cfg.hash() != self.manifest.config_hash:
            raise ManifestError(f"{src}: its config differs from the one these engines were exported from")
        return dict(model.state_dict())  # the model goes: the tensors live as long as a graph holds them

    @classmethod
    def load(cls, path: str | Path, backend: str | None = None, device: str | None = None,
             verify: bool = True, weights_from: str | None = None, cuda_graphs: bool | None = None,
             warmup: bool | None = None, weights: dict[str, torch.Tensor] | None = None,
             runner_options: dict | None = None, threads: int | None = None) -> "Pipeline":
        """Validate the manifest (versions, artifacts, SHA-256 of every file) and open the sessions.
        The SHA-256 of the compiled graphs' weights file (``manifest.weights_file``; safetensors, which
        cannot run code when read) is computed while the load goes on: the load returns, or raises
        ManifestError for a damaged file, once it is checked. Seconds per stage
        (verify, weights, graphs, warmup, verify_wait) are in the pipeline's ``load_times``.

        ``backend``: default the best-ranked built backend that runs here. ``weights_from``:
        checkpoint directory for aoti / inductor graphs exported without their weights (default:
        the checkpoint recorded in the manifest), or ``weights``: those tensors already in memory,
        by checkpoint key, on ``device``. ``cuda_graphs``: replay each graph from a captured CUDA
        graph (default: what the backend does by default). ``warmup`` (default: on for backends
        that compile at load, e.g. inductor): run :meth:`warmup` before returning. ``runner_options``:
        passed to the backend's runner (inductor: ``{"compile": False}`` runs the programs' eager kernels
        from CUDA graphs, without compile time; ``{"precompiled": None}`` compiles with torch.compile even
        where the export saved the kernels). ``threads``: CPU threads for the engines (torch's
        intra-op threads, and the sessions' own pools for backends that have them); default: theirs."""
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise ValueError(f"threads must be a positive integer (CPU threads for the engines), got {threads!r}")
        reader_choice(), tokenizer_choice()  # the environment's choices, named before any work (a typo is not ignored)
        root = Path(path)
        t0 = time.perf_counter()
        m = Manifest.read(root, verify=False)
        # every file's SHA-256; the compiled graphs' weights file's (safetensors: data only; up to 16 GB) in the
        # background while the load goes on
        big = [m.weights_file] if m.weights_file is not None and m.weights_file.endswith(DATA_ONLY) else []
        verified = m.verify(root, defer=big) if verify else None
        times = {"verify": time.perf_counter() - t0}  # seconds per stage: Pipeline.load_times
        try:
            pipe = cls._load(root, m, backend, device, weights_from, cuda_graphs, warmup, weights, runner_options,
                             threads, times)
        except BaseException as e:
            if verified is not None:
                if isinstance(e, Exception) and not isinstance(e, ManifestError):
                    try:  # a reader's error: a damaged weights file is said as such, not as the failure it caused
                        verified.wait()
                    except ManifestError as bad:
                        raise bad from e
                verified.cancel()  # our own refusal, or Ctrl-C: no waiting for a hash nobody will read
            raise
        t0 = time.perf_counter()
        if verified is not None:
            verified.wait()
        times["verify_wait"] = time.perf_counter() - t0
        pipe.load_times = times
        return pipe

    @classmethod
    def _load(cls, root: Path, m: Manifest, backend, device, weights_from, cuda_graphs, warmup, weights,
              runner_options, threads, times: dict[str, float]) -> "Pipeline":
        load_builtin()
        built = m.backends
        dev = parse_device(device) if device is not None else None
        if backend is None:
            kind = dev.type if dev is not None else ("cuda" if torch.cuda.is_available() else "cpu")
            backend = pick_backend(built, kind)
            if backend is None:
                raise ManifestError(f"{root}: none of the built backends ({', '.join(built)}) runs on this machine")
        elif backend not in built:
            from ..engines.registry import backend_names

            fix = f"re-export with --backend {backend}" if backend in backend_names() else \
                f"backends: {', '.join(backend_names())}"
            raise ManifestError(f"{root}: backend {backend!r} was not built (built: {', '.join(built)}); {fix}")
        b = get_backend(backend)
        if (reason := b.available()) is not None:
            raise ManifestError(f"{root}: the {backend} engines cannot run here: {reason}")
        if dev is None:
            dev = parse_device("cuda" if b.needs_gpu or m.device.startswith("cuda") else "cpu")
        if dev.type not in b.devices:
            raise ManifestError(f"{root}: the {backend} engines do not run on {dev} (they run on {', '.join(b.devices)})")
        if threads is not None:
            torch.set_num_threads(threads)
            if b.session_threads:
                runner_options = {"threads": threads, **(runner_options or {})}
        check_artifacts(m, root, backend)  # the graphs are what the manifest says (shapes, static top-k)
        pipe = cls(root, m, backend, str(dev), weights_from, cuda_graphs, weights, runner_options)
        times.update(pipe.load_times)
        if warmup if warmup is not None else b.cuda_graphs:
            times["warmup"] = pipe.warmup()
        return pipe

    # ------------------------------------------------------------------ properties
    @property
    def has_unpruned(self) -> bool:
        return UNPRUNED in self.runners

    def has_cache(self, unpruned: bool = False) -> bool:
        path = UNPRUNED_PATH if unpruned or not self.pruned else PRUNED_PATH
        return path.prefill in self.runners and path.cached in self.runners

    def run(self, graph: str, **feeds: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.runners[graph].run(feeds)

    def batch_size_for(self, n: int) -> int:
        """The engines' batch size that runs ``n`` requests: the smallest built size that holds them.
        RequestError for more than the largest (a batch is never split: the caller sizes its batches)."""
        fits = [b for b in self.batch_sizes if b >= n]
        if not fits:
            raise RequestError(f"{n} requests, but these engines take at most {self.bucket.batch_size} at once: "
                               "re-export with a larger --batch-size (or --batch-sizes), or split the batch")
        return fits[0]

    def at_size(self, batch: int) -> "Pipeline | _AtSize":
        """This pipeline with the graphs of batch size ``batch`` (one of :attr:`batch_sizes`): what a
        denoiser of a batch of that size runs. The pipeline itself at the largest size."""
        return self if batch == self.bucket.batch_size else _AtSize(self, batch)

    @torch.no_grad()
    def warmup(self) -> float:
        """Run every graph once (the vision graph, then each path's first steps, cached and not, at every
        batch size), so that compilation and CUDA-graph capture happen now, not in the first real request.
        The blank request fits the bucket: a grey image whose visual tokens fit the visual slots
        (:func:`_warmup_image_size`; text only where none fits) and the empty chat template, cut to the
        text slots. Returns the seconds it took."""
        t0 = time.perf_counter()
        g, dev = self.bucket.gen_length, torch.device(self.device)
        size = _warmup_image_size(self.bucket.max_visual_tokens, self.config)
        visual = torch.zeros(0, self.embed_table.shape[1], device=dev)  # [0, D]: text only
        if "vision" in self.runners:  # runs even where no image fits the slots (then its rows go unused)
            w, h = size or (64, 64)
            rows, _ = self.encode_image(np.full((h, w, 3), 128, dtype=np.uint8))  # [n_visual, D]
            if size is not None and rows.shape[0] <= self.bucket.max_visual_tokens:
                visual = rows
        if self.tokenizer is not None:
            before, after = encode_prompt(self.tokenizer, "", has_image=visual.shape[0] > 0, system="")
        else:
            before, after = [self.tokens.mask], []
        t = self.bucket.max_text_tokens
        before, after = before[:t], after[: t - min(len(before), t)]
        emb = [self.embed_table[torch.tensor(i, dtype=torch.long, device=dev)].float() for i in (before, after)]
        parts = RequestParts(emb[0], visual, emb[1])  # [nb, D], [nv, D], [na, D]
        for n, unpruned in ((n, u) for n in self.batch_sizes for u in dict.fromkeys([not self.pruned, self.has_unpruned])):
            for cache in dict.fromkeys([False, self.has_cache(unpruned)]):
                x = layout_bucket(self.manifest.bucket_at(n), [parts], g)
                den = EngineDenoiser(self.at_size(n), x, unpruned=unpruned, cache=cache)
                ids = torch.full((x.batch, g), self.tokens.mask, dtype=torch.long, device=self.device)
                for i in range(3):  # stage A (pruned) or the full graph / prefill; then full, or prefill + cached
                    info = _blank_step(x.batch, i, self.device)
                    den.predict(ids, info) if self.manifest.fused_sampler else den(ids, info)
        return time.perf_counter() - t0

    # ------------------------------------------------------------------ request -> bucket
    def encode_image(self, image, pixels: tuple[torch.Tensor, tuple[int, int]] | None = None
                     ) -> tuple[torch.Tensor, float]:
        """Image -> visual embeddings [n_visual, D] fp32 on the engines' device (on a GPU, the
        features never leave it), and the seconds it took. ``pixels``: ``preprocess(image)``
        already made."""
        t0 = time.perf_counter()
        dev = torch.device(self.device)
        # [N, 3, S, S]: uint8 crops from PIL, normalised on the engines' device
        pixels, size = pixels if pixels is not None else preprocess(image, self.config, dev)
        pixels = pixels.to(dev)
        n, nb = pixels.shape[0], self.bucket.vision_batch
        feats = []
        for i in range(0, n, nb):
            chunk = pixels[i: i + nb]
            pad = torch.zeros(nb - chunk.shape[0], *chunk.shape[1:], device=dev)
            out = self.run("vision", pixel_values=torch.cat([chunk, pad]))["features"].float().to(dev)
            feats.append(out[: chunk.shape[0]])
        visual = assemble(torch.cat(feats), size, self.config, self.newline)  # [n_visual, D]
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return visual, time.perf_counter() - t0

    def check(self, request: Request, gen_length: int) -> tuple[int, int]:
        """(text tokens, visual tokens) of ``request``, checked against the bucket without running a
        graph (a server refuses it before it joins a batch). RequestError, PromptError or ImageError
        say what is wrong and which export flag would make it fit."""
        request.validate()
        if self.tokenizer is None:
            raise RequestError(f"{self.root} has no tokenizer/ folder: text prompts cannot be encoded")
        before, after = encode_prompt(self.tokenizer, request.prompt, has_image=request.image is not None,
                                      system=request.system, history=request.history)
        n_visual = visual_token_count(*image_size(request.image), self.config) if request.image is not None else 0
        check_counts(self.bucket, len(before) + len(after), n_visual, gen_length)
        return len(before) + len(after), n_visual

    def prepare(self, request: Request, gen_length: int, pixels=None) -> tuple[RequestParts, float]:
        """A request's embedded prefix pieces, checked against the bucket (the text is encoded first and the
        image's token count read from its size, so a request that does not fit fails before any vision work).
        Returns the seconds of vision."""
        if self.tokenizer is None:
            raise RequestError(f"{self.root} has no tokenizer/ folder: text prompts cannot be encoded")
        before, after = encode_prompt(self.tokenizer, request.prompt, has_image=request.image is not None,
                                      system=request.system, history=request.history)
        dev = torch.device(self.device)
        ids = torch.tensor(before + after, dtype=torch.long, device=dev)
        text = self.embed_table[ids].float()  # [nb + na, D]
        empty = torch.zeros(0, text.shape[1], device=dev)
        size = None if request.image is None else pixels[1] if pixels is not None else image_size(request.image)
        n_visual = 0 if size is None else visual_token_count(*size, self.config)
        check_counts(self.bucket, len(before) + len(after), n_visual, gen_length)
        visual, t_vis = self.encode_image(request.image, pixels) if request.image is not None else (empty, 0.0)
        return RequestParts(text[: len(before)], visual, text[len(before):]), t_vis

    def _layout(self, requests: list[Request], gen_length: int, size: int | None = None):
        """The requests in the bucket at batch size ``size`` (default: the smallest that holds them)."""
        size = self.batch_size_for(len(requests)) if size is None else size
        prepared = []
        for i, r in enumerate(requests):
            try:
                prepared.append(self.prepare(r, gen_length))
            except ValueError as e:  # e.g. an image too large for the bucket: which request
                raise in_batch(e, i, len(requests)) from None
        parts, t_vis = zip(*prepared)
        return layout_bucket(self.manifest.bucket_at(size), list(parts), gen_length), list(t_vis)

    # ------------------------------------------------------------------ generate
    def generation_config(self, *, gen_length: int | None = None, steps: int | None = None,
                          block_length: int | None = None, temperature: float = 0.0,
                          remasking: str = "low_confidence", cfg_scale: float = 0.0, preset: str | None = None,
                          factor: float | None = None, threshold: float | None = None, cache: bool | None = None,
                          refresh: int | None | str = "default", unpruned: bool = False,
                          fixed_schedule: bool = False) -> GenerationConfig:
        """The sampler settings of a request, checked against what these engines can serve.
        ``cache`` None: the prefix cache when the engines have its graphs. ``refresh``: forwards
        between cache refreshes within a block (None or "never": only at block starts; default
        ``sampler.PRODUCT_REFRESH``, 1: every forward, exact; the official demo's 32 is faster). Parallel
        decoding: ``factor`` or ``threshold`` names a rule; with neither, the threshold rule at
        ``sampler.PRODUCT_THRESHOLD`` (0.9, Fast-dLLM's) unless ``fixed_schedule`` asks for the
        official fixed schedule (steps / blocks tokens per forward; random remasking always uses it).
        Every value is checked by the rule of :mod:`.inputs` (finite numbers in range; GenerationError
        naming the field)."""
        if unpruned and self.pruned and not self.has_unpruned:
            raise RequestError(f"{self.root} has no unpruned graph; export with --baseline or --no-prune")
        has_cache = self.has_cache(unpruned)
        path = "unpruned" if unpruned or not self.pruned else "pruned"
        if cache is not None and not isinstance(cache, bool):
            raise GenerationError(f"cache must be True, False or None (when the engines have it), got {cache!r}")
        if cache and not has_cache:
            raise RequestError(f"{self.root} has no prefix-cache graphs for the {path} path; re-export with --cache")
        use_cache = has_cache if cache is None else cache
        if refresh != "default" and not has_cache:  # --cache would be refused too: name the export flag
            raise RequestError(f"refresh applies to the prefix cache only, and {self.root} was exported without "
                               f"--cache (no prefix-cache graphs for the {path} path): re-export with llada-export "
                               "... --cache to use refresh, or leave refresh out")
        if refresh != "default" and not use_cache:
            raise RequestError("refresh applies to the prefix cache only; use it with cache=True (--cache)")
        gen_length, steps, block_length = (check_size(v, k) for v, k in
                                           ((gen_length, "gen_length"), (steps, "steps"), (block_length, "block_length")))
        factor, threshold = parallel_rule(factor, threshold, fixed_schedule, remasking)
        kw = dict(temperature=temperature, remasking=remasking, cfg_scale=cfg_scale, factor=factor,
                  threshold=threshold, cache=use_cache,
                  refresh=PRODUCT_REFRESH if refresh == "default" else check_refresh(refresh))
        d = self.manifest.generation
        if preset is not None:
            gen = get_preset(preset, gen_length=gen_length, steps=steps, block_length=block_length)
            gen = replace(gen, **kw)
        else:
            gl = d["gen_length"] if gen_length is None else gen_length
            gen = GenerationConfig(gl, min(d["block_length"], gl) if block_length is None else block_length,
                                   min(d["steps"], gl) if steps is None else steps, **kw)
        if isinstance(gen.gen_length, int) and gen.gen_length > self.bucket.gen_length:  # before the divisibility rules
            raise RequestError(f"gen_length {gen.gen_length} exceeds the engines' maximum {self.bucket.gen_length}: "
                               f"re-export with --gen-length {gen.gen_length}")
        gen.validate()
        return gen

    @torch.no_grad()
    def generate(self, image, prompt: str, *, system: str = DEFAULT_SYSTEM_PROMPT, seed: int = 0,
                 history: tuple[tuple[str, str], ...] = (), unpruned: bool = False,
                 on_step: Callable[[StepEvent], None] | None = None,
                 **settings) -> GenerationResult:
        """Answer ``prompt`` (non-empty UTF-8 text) about ``image`` (path, PIL image or HxWx3 uint8 array;
        None for text only), after the conversation's earlier turns ``history`` ((role, text) pairs: user,
        assistant, system; the image goes in the first user turn); ``seed`` (0 <= seed < 2**63) drives
        temperature > 0 and random remasking.
        ``settings``: see :meth:`generation_config` (preset, gen_length, steps, block_length,
        temperature, remasking, cfg_scale, factor, threshold, cache, refresh). The result's ``settings``
        are these, resolved: ``generate(image, prompt, **result.settings)`` answers the same."""
        check_options(settings, "generate", ("system", "seed", "history", "unpruned", "on_step", *BATCH_OPTIONS))
        request = Request(image, prompt, system, seed, history)
        return self.generate_batch([request], unpruned=unpruned, on_step=on_step, **settings)[0]

    @torch.no_grad()
    def generate_batch(self, requests: list[Request], *, unpruned: bool = False,
                       on_step: Callable[[StepEvent], None] | None = None, config: GenerationConfig | None = None,
                       cancel: Callable[[], list[bool]] | None = None,
                       on_finish: Callable[[int, GenerationResult], None] | None = None,
                       **settings) -> list[GenerationResult]:
        """Answer up to ``bucket.batch_size`` requests together, on the smallest built batch size that holds
        them (``batch_size_for``; ``timings["engine_batch_size"]``), with one generation setting:
        ``settings`` as :meth:`generation_config` takes them, or the ``config`` it returned.
        ``requests``: :class:`Request` objects, ``(image, prompt)`` pairs or dicts of Request's fields.
        ``cancel``: called before each forward, a list of exactly one flag (True / False) per request (ValueError
        otherwise); a request flagged True stops there (its row no longer commits; the batch ends once no row is left
        running) and its result has ``finish_reason`` "cancelled". The other rows' answers do not change.

        Rows that are done or cancelled free their slots: once the running rows fit a smaller built size
        (a ``--batch-sizes`` directory), the batch goes on with those rows on that size's graphs between two
        forwards (``timings["engine_batch_sizes"]``: the sizes it ran on, in order; calls after a move are
        counted in ``graph_calls`` as ``graph@bN``). Answers do not change beyond what another batch size's
        graphs may give (README, batch invariance). ``pipe.narrow = False`` keeps every batch at the size it
        started on.

        ``on_step`` and ``on_finish`` are callables or None (TypeError up front).
        ``on_finish(i, result)``: called (on this thread, between two forwards) as soon as request ``i``'s
        answer is final, while longer rows may still run: the same answer as the returned list's, with the
        timings, step times and graph calls of the batch up to that moment (``timings["total"]``: the
        request's time until its answer)."""
        t0 = time.perf_counter()
        check_options(settings, "generate_batch", ("unpruned", "on_step", *BATCH_OPTIONS))
        if config is not None and settings:
            raise TypeError("pass the settings or a GenerationConfig, not both")
        requests = as_requests(requests)
        cancel = checked_cancel(cancel, len(requests))
        on_step = checked_callback(on_step, "on_step", "lambda event: print(event.index, event.committed)")
        on_finish = checked_callback(on_finish, "on_finish", "lambda i, result: print(i, result.text)")
        gen = config if config is not None else self.generation_config(unpruned=unpruned, **settings)
        use_full = unpruned or not self.pruned
        size = self.batch_size_for(len(requests))
        x, t_vis = self._layout(requests, gen.gen_length, size)
        den = EngineDenoiser(self.at_size(size), x, unpruned=use_full, cache=gen.cache, narrow=self.narrow)
        t1 = time.perf_counter()
        gens = [torch.Generator(device=self.device).manual_seed(r.seed) for r in requests]
        gens += [None] * (x.batch - len(requests))
        trace = SamplerTrace(record=False)

        def result(i: int, row: list[int], forwards: int, cancelled: bool, t2: float) -> GenerationResult:
            """Request i's answer, with the batch's timings up to ``t2``."""
            done_calls = list(den.calls)
            st = [s for _, s in done_calls]
            calls: dict[str, int] = {}
            for name, _ in done_calls:
                calls[name] = calls.get(name, 0) + 1
            timings = {"vision": t_vis[i], "prepare": t1 - t0 - sum(t_vis), "total": t2 - t0, "denoise": t2 - t1,
                       "sampler_overhead": (t2 - t1) - sum(st), "batch_size": len(requests),
                       "engine_batch_size": size, "engine_batch_sizes": list(den.sizes),
                       "sampler_step_graph": float(trace.step_graph)}
            for name in calls:
                timings[f"{name}_per_call"] = sum(s for n, s in done_calls if n == name) / calls[name]
            r = requests[i]
            settings = {**gen.to_dict(), "seed": r.seed, "system": r.system, "unpruned": bool(unpruned),
                        **({"history": [list(t) for t in r.history]} if r.history else {})}
            return GenerationResult(
                decode_answer(self.tokenizer, row), row, None if use_full else den.kept_visual(i), x.n_visual[i],
                timings, st, forwards, calls, settings,
                None if use_full or self.manifest.pruning is None else self.manifest.pruning.to_dict(),
                # the sampler cuts each answer at its first <|eot_id|>: a full-length answer found none
                "cancelled" if cancelled else "stop" if len(row) < gen.gen_length else "length")

        def done(i: int, ids: torch.Tensor, forwards: int, cancelled: bool) -> None:
            if i < len(requests):
                on_finish(i, result(i, ids.tolist(), forwards, cancelled, time.perf_counter()))

        ids = generate(den, gen, mask_id=self.tokens.mask, eot_id=self.tokens.eot, suppress_ids=self.tokens.suppressed(),
                       batch_size=x.batch, active=x.active, generators=gens, trace=trace, device=self.device,
                       on_step=on_step, step_graph=self.step_graph, cancel=cancel,
                       on_done=None if on_finish is None else done)
        t2 = time.perf_counter()
        return [result(i, ids[i].tolist(), trace.row_forwards[i], trace.cancelled[i], t2) for i in range(len(requests))]


# generate_batch's own keyword arguments beyond unpruned and on_step (generate passes them through)
BATCH_OPTIONS = ("config", "cancel", "on_finish")


def check_options(settings: dict, call: str, own: tuple[str, ...]) -> None:
    """TypeError naming the keyword arguments of ``settings`` that neither ``call`` (its ``own``) nor
    :meth:`Pipeline.generation_config` takes, with the accepted ones (a raw TypeError named only one)."""
    sampler = [p for p in inspect.signature(Pipeline.generation_config).parameters if p not in ("self", *own)]
    unknown = [k for k in settings if k not in sampler and k not in own]
    if unknown:
        close = {k: m[0] for k in unknown if (m := difflib.get_close_matches(k, [*own, *sampler], 1))}
        hint = "".join(f" (did you mean {m!r} for {k!r}?)" for k, m in close.items())
        raise TypeError(f"{call}() got unknown option{'s' if len(unknown) > 1 else ''} "
                        f"{', '.join(map(repr, unknown))}{hint}; it takes {', '.join(own)} and the sampler "
                        f"settings {', '.join(sampler)} (see Pipeline.generation_config)")


def as_requests(requests) -> list[Request]:
    """``generate_batch``'s requests as validated :class:`Request` objects: Requests, ``(image, prompt)``
    pairs, or dicts of Request's fields (image, prompt, system, seed, history)."""
    one = isinstance(requests, (Request, str, bytes, dict)) or (
        isinstance(requests, tuple) and len(requests) == 2 and isinstance(requests[1], str))
    if one or not isinstance(requests, Iterable):
        raise RequestError("generate_batch takes a list of requests, e.g. [Request(image, prompt), ...] or "
                           "[(image, prompt), ...]; for one request call generate(image, prompt)")
    requests = list(requests)
    if not requests:
        raise RequestError("generate_batch got no requests: pass at least one Request(image, prompt)")
    out = [_as_request(r, i) for i, r in enumerate(requests)]
    for i, r in enumerate(out):
        try:
            r.validate()
        except ValueError as e:
            raise in_batch(e, i, len(out)) from None
    return out


def _as_request(r, i: int) -> Request:
    names = [f.name for f in fields(Request)]
    if isinstance(r, Request):
        return replace(r)  # a copy: validating it changes nothing the caller holds
    if isinstance(r, tuple) and len(r) == 2:
        return Request(*r)
    if isinstance(r, dict) and set(r) <= set(names):
        return Request(**r)
    what = (f"a dict with {', '.join(sorted(map(str, set(r) - set(names))))}" if isinstance(r, dict)
            else f"a tuple of {len(r)}" if isinstance(r, tuple) else f"a {type(r).__name__}")
    raise RequestError(f"requests[{i}] is {what}: pass Request(image, prompt, system=..., seed=...), an "
                       f"(image, prompt) pair or a dict of Request's fields ({', '.join(names)})")


class _AtSize:
    """A pipeline seen at one of its smaller batch sizes: that size's bucket, graphs and ``run``; every
    other attribute is the pipeline's own (read through, so settings made on it later hold here too)."""

    def __init__(self, pipe: Pipeline, batch: int):
        self._pipe, self.bucket, self.runners = pipe, pipe.manifest.bucket_at(batch), pipe.sized_runners[batch]

    def __getattr__(self, name: str):
        return getattr(self._pipe, name)

    def run(self, graph: str, **feeds: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.runners[graph].run(feeds)


def _warmup_image_size(max_visual: int, cfg) -> tuple[int, int] | None:
    """(width, height) of warm-up's blank image: 64x64 where its visual tokens fit ``max_visual`` slots,
    else the size (on a 16-pixel grid up to twice the crop size) whose tokens fill the most slots that fit
    (e.g. a ``--image-size 384x288`` bucket); None where no image fits (warm-up runs text only)."""
    if max_visual > 0 and visual_token_count(64, 64, cfg) <= max_visual:
        return 64, 64
    top = 2 * cfg.vision.image_size
    fits = [(n, -w * h, w, h) for w in range(16, top + 1, 16) for h in range(16, top + 1, 16)
            if (n := visual_token_count(w, h, cfg)) <= max_visual]
    return max(fits)[2:] if fits else None


def _blank_step(b: int, index: int, device) -> StepInfo:
    dev = torch.device(device)
    return StepInfo(index, torch.full((b,), index == 0, dtype=torch.bool, device=dev),
                    torch.zeros(b, dtype=torch.long, device=dev), torch.ones(b, dtype=torch.bool, device=dev),
                    [index == 0] * b, [True] * b)


__all__ = ["GenerationResult", "Pipeline", "Request", "RequestError", "as_requests"]
