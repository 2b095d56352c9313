"""``export_engines``: checkpoint -> engines directory (atomically), the work behind ``llada-export``.

It iterates over the graph set (``contract.graphset``) and the backend registry
(``engines.registry``): which graphs are built follows from the options, each graph's
builder and I/O come from its spec, each artifact from its backend's writer. With several
batch sizes (``batch_sizes``) every graph with a batch dimension is built once per size
(``contract.graphset.sized_key`` names them) over one copy of the weights: ONNX's shared
weights file, and for the compiled backends one set of tensors (``compiled_weights``).
"""

from __future__ import annotations

import math
import resource
import sys
import time
import traceback
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..checkpoint.loader import checkpoint_tokenizer, load_checkpoint, read_config
from ..config import LLaDAVConfig
from ..contract.bucket import Bucket
from ..contract.graphset import Dims, Selection, batched, graphs_for, resolve, sized_key
from ..contract.manifest import DTYPES, Manifest, file_table, is_engines_dir
from ..contract.pruning import PruneSettings
from ..device import is_out_of_memory, parse_device
from ..engines.registry import WriteContext, get_backend, write_artifact
from ..engines.tensorrt import TOPK_LIMIT
from ..graphs.anyres import grid_shape, max_visual_token_count, visual_token_count
from ..light_tokenizer import EXPORT_KEY as LIGHT_TOKENIZER, export_record as light_tokenizer_record
from ..outdir import atomic_output_dir, check_output_dir
from ..quant.fp8 import FP8Error, FP8Record, FP8Settings, check_record, quantize_linears, structural_copy
from ..sampler import GenerationConfig
from ..tokenizer import DEFAULT_SYSTEM_PROMPT, encode_prompt, has_tokenizer_files, special_tokens
from ..graphs.fused import fused_weights
from .capacity import HEADROOM, headroom_bytes, path_capacity, powers_of_two, weight_bytes
from .capacity import largest_call as graphs_largest_call
from .programs import INPLACE, BuildContext, check_program

COMPILED_WEIGHTS = ("auto", "package", "checkpoint", "shared")
WEIGHTS = ("native", "fp8")  # native: the weights in --dtype; fp8: e4m3 linears (quant/fp8.py)
FP8_BACKENDS = ("onnxruntime", "inductor", "tensorrt")  # backends whose graphs can hold the FP8 op
SHARED_WEIGHTS_FILE = "weights.safetensors"  # compiled_weights="shared": the compiled graphs' weights, once
EXTERNAL_WEIGHTS_ABOVE = 2 * 1024**3  # compiled_weights="auto": weights bigger than this stay in the checkpoint
AUTO_MAX_BATCH = 256  # --batch-sizes auto: the largest size it builds, however many requests fit
AUTO_NOTE = "batch sizes planned by --batch-sizes auto"


class ExportError(ValueError):
    """A user error in the export request (bad flag value, bad checkpoint, existing output)."""


@dataclass
class ExportOptions:
    model: str
    output: str
    prune: PruneSettings | None = field(default_factory=lambda: PruneSettings(16, 0.35))  # None: unpruned engines
    baseline: bool = False  # also build the unpruned graphs beside the pruned ones
    cache: bool = False  # also build the prefix-KV-cache graphs (prefill + cached step)
    fuse_sampler: bool = False  # graphs output (x0, confidence) instead of logits
    # the torch backends' cached step: "flash" attends over the zeroed padding without a mask (ops/padded_attention),
    # "masked" with the key mask, as the eager reference and the ONNX graphs
    cached_attention: str = "flash"
    # aoti / inductor artifacts: "package" keeps the weights inside each .pt2, "checkpoint" maps them to
    # checkpoint keys and the runtime loads them once for all graphs, "shared" does the same from one
    # weights.safetensors written into the directory; "auto": checkpoint above external_weights_above
    # bytes (2 GiB), below it shared with several batch sizes (package would hold a copy per graph and size)
    compiled_weights: str = "auto"
    external_weights_above: int = EXTERNAL_WEIGHTS_ABOVE  # bytes: "auto"'s threshold
    backends: tuple[str, ...] = ("onnxruntime",)
    dtype: str = "float32"
    weights: str = "native"  # "fp8": e4m3 linears with per-output-channel scales (settings in fp8)
    fp8: FP8Settings = field(default_factory=FP8Settings)  # activation scales, linears that stay unquantized
    device: str = "cpu"
    gen_length: int = 128
    block_length: int | None = None  # default: gen_length
    steps: int | None = None  # default: gen_length
    max_prompt_tokens: int = 256
    image_size: tuple[int, int] | None = None  # None: a bucket that takes every image
    max_visual_tokens: int | None = None
    batch_size: int = 1
    # several batch sizes in one directory (--batch-sizes 1,2,4,8), graphs of each over one copy of the weights;
    # empty: (batch_size,). validate() sets batch_size to the largest
    batch_sizes: tuple[int, ...] = ()
    # --batch-sizes auto: preflight sets batch_sizes to the powers of two up to the largest batch that fits
    # device_memory bytes (default: the CUDA device's free memory at export); see exporter/capacity.py
    auto_batch: bool = False
    device_memory: int | None = None
    # inductor: compile at export and save the cache (default: on CUDA when precompile is off)
    compile_cache: bool | None = None
    precompile: bool | None = None  # inductor: save each graph's kernels, run without Dynamo (default: on CUDA)
    overwrite: bool = False
    progress: bool = True
    notes: list[str] = field(default_factory=list)

    @property
    def selection(self) -> Selection:
        return Selection(prune=self.prune is not None, baseline=self.baseline, cache=self.cache)

    @property
    def sizes(self) -> tuple[int, ...]:
        """The batch sizes to build, ascending."""
        return tuple(sorted(set(self.batch_sizes))) if self.batch_sizes else (self.batch_size,)

    def generation(self) -> GenerationConfig:
        g = self.gen_length
        return GenerationConfig(g, self.block_length or g, self.steps or g)

    def _check_schedule(self) -> None:
        """The default schedule's flags with their valid values (the sampler's rule names no flag)."""
        gen = self.generation()
        g, b, s = gen.gen_length, gen.block_length, gen.steps
        if g % b:
            fits = max(d for d in range(1, min(b, g) + 1) if g % d == 0)
            raise ExportError(f"--block-length {b} must divide --gen-length {g} (e.g. --block-length {fits}, or leave "
                              "it out: default --gen-length)")
        n = g // b  # blocks
        if s % n or s > g:
            raise ExportError(f"--steps {s} must be a multiple of the {n} block(s) (--gen-length {g} / --block-length "
                              f"{b}) from {n} to {g}: at most one step per token (default: --steps {g})")

    def validate(self) -> None:
        for name in ("gen_length", "max_prompt_tokens", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ExportError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")
        for name in ("block_length", "steps", "max_visual_tokens"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ExportError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")
        for v in self.batch_sizes:
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ExportError(f"--batch-sizes must be positive integers, got {v!r}")
        if self.device_memory is not None and (isinstance(self.device_memory, bool) or not self.auto_batch
                                               or not isinstance(self.device_memory, int) or self.device_memory < 1):
            raise ExportError(f"--device-memory {self.device_memory!r}: a positive byte count, used by "
                              "--batch-sizes auto only")
        if self.batch_sizes and self.batch_size not in (1, max(self.batch_sizes)):
            raise ExportError(f"batch_size {self.batch_size} and batch_sizes {list(self.batch_sizes)}: give one "
                              "(--batch-size N is --batch-sizes N)")
        self.batch_size = max(self.sizes)
        self._check_schedule()
        self.generation().validate()
        if self.prune is not None:
            self.prune.validate()
        if self.cached_attention not in ("flash", "masked"):
            raise ExportError(f"cached_attention must be flash or masked, got {self.cached_attention!r}")
        if self.compiled_weights not in COMPILED_WEIGHTS:
            raise ExportError(f"compiled_weights must be one of {', '.join(COMPILED_WEIGHTS)}, "
                              f"got {self.compiled_weights!r}")
        if self.dtype not in DTYPES:
            raise ExportError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if not self.backends:
            raise ExportError("no backend to build")
        if self.weights not in WEIGHTS:
            raise ExportError(f"--weights must be one of {', '.join(WEIGHTS)}, got {self.weights!r}")
        if self.weights == "fp8":
            try:
                self.fp8.validate()
            except FP8Error as e:
                raise ExportError(str(e)) from None
            if bad := [b for b in self.backends if b not in FP8_BACKENDS]:
                raise ExportError(f"--weights fp8 builds {', '.join(FP8_BACKENDS)} engines, not {', '.join(bad)}; "
                                  "pick one of those backends")
        for b in self.backends:
            get_backend(b)  # unknown names raise with the list
        if self.compile_cache and "inductor" not in self.backends:
            raise ExportError("compile_cache applies to inductor builds only")
        if self.precompile and "inductor" not in self.backends:
            raise ExportError("precompile applies to inductor builds only")
        if self.image_size is not None and min(self.image_size) < 1:
            raise ExportError(f"--image-size must be positive, got {self.image_size}")
        self.device = str(parse_device(self.device))


def plan_bucket(opts: ExportOptions, cfg: LLaDAVConfig) -> Bucket:
    """The bucket: ``--max-visual-tokens``, else the tokens of ``--image-size``, else the most any
    image can give (anyres bounds it); the vision batch fits the largest crop grid it allows."""
    s = cfg.vision.image_size
    least = cfg.vision.patches_per_side ** 2  # the base crop's tokens: every image gives at least these
    if opts.max_visual_tokens is not None and opts.max_visual_tokens < least:
        raise ExportError(f"--max-visual-tokens {opts.max_visual_tokens} is fewer than the {least} visual tokens every "
                          f"image gives (the whole-image crop's, at any size): the engines would refuse every image; "
                          f"give --max-visual-tokens {least} or more, or --image-size instead")
    if opts.image_size is not None:
        w, h = opts.image_size
        n = visual_token_count(w, h, cfg)
        if opts.max_visual_tokens is not None and opts.max_visual_tokens < n:
            raise ExportError(f"--max-visual-tokens {opts.max_visual_tokens} is fewer than the {n} visual tokens of a "
                              f"{w}x{h} image (--image-size): the engines would refuse the image they are built for; "
                              f"give --max-visual-tokens {n} or more, or only one of the two flags")
        v = opts.max_visual_tokens or n
        cols, rows = grid_shape((w, h), cfg)
        crops = 1 + cols * rows
    else:
        v = opts.max_visual_tokens or max_visual_token_count(cfg)
        crops = 1 + max((gw // s) * (gh // s) for gw, gh in cfg.image_grid_pinpoints)
    k = opts.prune.k_static(v) if opts.prune is not None else v
    return Bucket(max_text_tokens=opts.max_prompt_tokens, max_visual_tokens=v, k_static=k,
                  gen_length=opts.gen_length, vision_batch=crops, batch_size=max(opts.sizes))


def largest_call(opts: ExportOptions, bucket: Bucket, cfg: LLaDAVConfig) -> tuple[str, int]:
    """The graph whose one call needs the most memory, and a lower bound of that memory: its inputs,
    outputs and one layer's activations (``exporter.capacity``). The export allocates the inputs as
    tracing examples; running the graph needs it all."""
    return graphs_largest_call(opts.selection, bucket, cfg, opts.dtype, opts.fuse_sampler, opts.prune)


def available_memory(device: torch.device) -> int | None:
    """Bytes free for this process: the GPU's free memory, or the host's MemAvailable (within a
    cgroup's limit); None where unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    have = None
    try:
        meminfo = Path("/proc/meminfo").read_text()
        have = next(int(line.split()[1]) * 1024 for line in meminfo.splitlines() if line.startswith("MemAvailable:"))
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            have = min(have, int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text()))
    except (OSError, ValueError, StopIteration):
        pass
    return have


def check_memory(opts: ExportOptions, bucket: Bucket, cfg: LLaDAVConfig, weights_loaded: bool) -> None:
    """Refuse a bucket whose largest graph call (and the weights, unless already in memory) cannot fit
    the export device's free memory, before anything is allocated; say the batch size that fits."""
    device = torch.device(opts.device)
    have = available_memory(device)
    graph, call = largest_call(opts, bucket, cfg)
    weights = 0 if weights_loaded else weight_bytes(cfg, opts.dtype)
    if have is None or weights + call <= have:
        return
    fits = int((have - weights) // (call / bucket.batch_size)) if have > weights else 0
    fix = (f"use --batch-size {fits} or less (the largest of --batch-sizes)" if 1 <= fits < bucket.batch_size else
           "use a smaller --image-size / --max-visual-tokens, --max-prompt-tokens or --gen-length")
    raise ExportError(f"these engines need at least {human_bytes(weights + call)} on {device} (weights "
                      f"{human_bytes(weights)}; one {graph} call of batch size {bucket.batch_size}, its inputs, outputs "
                      f"and one layer's activations: {human_bytes(call)}) and {device} has {human_bytes(have)} free: {fix}")


def human_bytes(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def plan_batch_sizes(opts: ExportOptions, bucket: Bucket, cfg: LLaDAVConfig, weights_loaded: bool) -> Bucket:
    """``--batch-sizes auto``: the powers of two up to the largest batch of the engines' decoding path
    (pruned if pruning, with the cache if built) that fits ``opts.device_memory`` (else the CUDA device's
    free memory, plus the weights if already there) beside the weights and a headroom; sets
    ``opts.batch_sizes`` and a note with the arithmetic, returns the bucket at the largest size."""
    device = torch.device(opts.device)
    path = "pruned" if opts.prune is not None else "unpruned"
    cap = path_capacity(path, bucket, cfg, opts.dtype, cache=opts.cache, fused=opts.fuse_sampler, prune=opts.prune)
    if opts.device_memory is not None:
        memory, where = opts.device_memory, "--device-memory"
    elif device.type == "cuda":
        memory, where = available_memory(device) + (cap.weights if weights_loaded else 0), f"free on {device}"
    else:
        raise ExportError(f"--batch-sizes auto sizes batches for a GPU's memory: give --device-memory (e.g. 80GiB, "
                          f"the serving card's) to plan on {device}, or export with --device cuda")
    headroom = headroom_bytes(memory)
    what = f"{path}{' + cache' if opts.cache else ''}"
    fits = cap.largest_batch(memory, headroom)
    if fits < 1:
        raise ExportError(f"not one {what} request fits {human_bytes(memory)} ({where}): it needs "
                          f"{human_bytes(cap.need(1, headroom))} (weights {human_bytes(cap.weights)}, KV cache "
                          f"{human_bytes(cap.kv)}, peak {cap.peak_graph} call, headroom {human_bytes(headroom)}); plan "
                          f"for a card of at least {human_bytes(math.ceil(cap.need(1) / (1 - HEADROOM)))} or shrink "
                          "--image-size / --max-visual-tokens, --max-prompt-tokens or --gen-length")
    opts.batch_sizes = powers_of_two(min(fits, AUTO_MAX_BATCH))
    opts.batch_size = max(opts.batch_sizes)
    note = (f"{AUTO_NOTE}: {', '.join(map(str, opts.batch_sizes))}; the largest {what} batch that fits "
            f"{human_bytes(memory)} ({where}) is {fits}{f' (built up to {AUTO_MAX_BATCH})' if fits > AUTO_MAX_BATCH else ''}: "
            f"weights {cap.weights} B + per request {cap.per_request} B (KV cache {cap.kv} B over {cap.kv_positions} "
            f"positions, prefix {cap.held} B, peak call {cap.peak_graph}) + headroom {headroom} B "
            "(exporter/capacity.py's arithmetic on the shapes)")
    opts.notes = [n for n in opts.notes if not n.startswith(AUTO_NOTE)] + [note]
    return replace(bucket, batch_size=opts.batch_size)


def template_tokens(tokenizer, system: str = "") -> int:
    """Text tokens of the chat template around an empty question with an image and ``system`` (default: an
    empty system prompt: the smallest prompt there is)."""
    before, after = encode_prompt(tokenizer, "", has_image=True, system=system)
    return len(before) + len(after)


KEEP_ALL_NOTE = "--keep"  # the note's start (a pruning that keeps every visual token)
PROMPT_NOTE = "--max-prompt-tokens"  # the note's start, so that a second preflight does not repeat it
BF16_ORT_NOTE = "the bfloat16 onnxruntime engines"  # the start of the note for --dtype bfloat16 on the CPU


def preflight(opts: ExportOptions, cfg: LLaDAVConfig | None = None, tokenizer=None) -> Bucket:
    """Every check that needs no weights (flags, config, bucket, backends, output directory),
    before any heavy work. ``cfg`` / ``tokenizer``: a model already in memory."""
    opts.validate()
    protect = []
    if cfg is None:
        if not Path(opts.model).is_dir():
            raise ExportError(f"{opts.model}: " + ("a file, not a checkpoint directory" if Path(opts.model).exists()
                                                   else "no such checkpoint directory"))
        cfg = read_config(opts.model)
        protect = [opts.model]
        if not has_tokenizer_files(opts.model):
            raise ExportError(f"{opts.model}: no tokenizer files (tokenizer.json / tokenizer_config.json): "
                              "the engines need the special token ids and the prompt encoding")
        tokenizer = checkpoint_tokenizer(opts.model, cfg)
    check_output_dir(opts.output, overwrite=opts.overwrite, owned=is_engines_dir, protect=protect,
                     what="engines directory")
    if opts.prune is not None:
        opts.prune.validate(cfg.text.num_hidden_layers)
    bucket = plan_bucket(opts, cfg)
    if opts.auto_batch:
        bucket = plan_batch_sizes(opts, bucket, cfg, weights_loaded=not protect)
    check_memory(opts, bucket, cfg, weights_loaded=not protect)
    n, m = (template_tokens(tokenizer), template_tokens(tokenizer, DEFAULT_SYSTEM_PROMPT)) if tokenizer is not None else (0, 0)
    if n >= opts.max_prompt_tokens:
        raise ExportError(f"--max-prompt-tokens {opts.max_prompt_tokens} does not hold the chat template itself "
                          f"({n} tokens with an empty system prompt and question); use at least {n + 16}, or "
                          f"{m + 16} for llada-generate and llada-compare, which send the default system prompt")
    if m >= opts.max_prompt_tokens:
        opts.notes = [x for x in opts.notes if not x.startswith(PROMPT_NOTE)] + [
            f"{PROMPT_NOTE} {opts.max_prompt_tokens} holds no question with the default system prompt ({m} tokens "
            f"of template with it): llada-generate, llada-compare and llada-serve (without a system message) refuse "
            f"every prompt; Pipeline requests need a shorter system prompt (Request(system=...)); re-export with "
            f"at least {m + 16} to use them"]
    if "onnxruntime" in opts.backends and opts.dtype == "bfloat16" and torch.device(opts.device).type == "cpu":
        opts.notes = [x for x in opts.notes if not x.startswith(BF16_ORT_NOTE)] + [
            f"{BF16_ORT_NOTE} do not run on this CPU: ONNX Runtime's CPU provider has no bfloat16 kernels; run them "
            "with onnxruntime-gpu (llada-generate --device cuda), or re-export with --dtype float32 or float16 for "
            "the CPU"]
    if opts.prune is not None and bucket.k_static >= bucket.max_visual_tokens:
        opts.notes = [x for x in opts.notes if not x.startswith(KEEP_ALL_NOTE)] + [
            f"{KEEP_ALL_NOTE} {opts.prune.keep:g} keeps all {bucket.max_visual_tokens} visual slots: the pruned "
            "graphs compute what the unpruned ones do, plus stage A's second pass; export with --no-prune for "
            "the unpruned engines, or a --keep below 1 to prune"]
    if "tensorrt" in opts.backends and opts.prune is not None and bucket.k_static >= TOPK_LIMIT:
        raise ExportError(f"the bucket keeps {bucket.k_static} visual tokens, over TensorRT's TopK limit "
                          f"({TOPK_LIMIT - 1}); lower --keep, --image-size or --max-visual-tokens")
    skipped = {name: why for name in opts.backends if (why := skip_reason(name, opts.device))}
    if len(opts.backends) == 1 and skipped:  # several (--backend all): those that cannot are left out, with a note
        raise ExportError(skipped[opts.backends[0]])
    if len(skipped) == len(opts.backends):
        raise ExportError(f"none of the backends can be built here: {'; '.join(skipped.values())}")
    return bucket


def skip_reason(name: str, device: str) -> str | None:
    """Why ``name``'s engines cannot be built here for ``device``, or None."""
    b = get_backend(name)
    if (reason := b.available()) is not None:
        return f"{name} engines cannot be built here: {reason}"
    if torch.device(device).type not in b.devices:
        return f"the {name} backend does not run on {device} (it runs on {', '.join(b.devices)})"
    return None


def export_engines(opts: ExportOptions, loaded: tuple | None = None) -> Path:
    """Build every graph for every requested backend into ``opts.output`` (atomically).

    ``loaded``: ``(model, tokenizer, config)`` already in memory (benchmarks build random
    full-size weights on the GPU); ``opts.model`` is then only recorded. Graphs whose weights
    stay in the checkpoint then need ``Pipeline.load(..., weights=model.state_dict())``."""
    preflight(opts, *(loaded[2], loaded[1]) if loaded else ())
    if opts.auto_batch and opts.progress:  # the plan before the long build (the manifest's note keeps it)
        tqdm.write(f"{next(n for n in opts.notes if n.startswith(AUTO_NOTE))}; building them now", file=sys.stderr)
    protect = [] if loaded else [opts.model]
    try:
        with atomic_output_dir(opts.output, overwrite=opts.overwrite, owned=is_engines_dir, protect=protect,
                               what="engines directory") as tmp:
            _build(opts, tmp, loaded).write(tmp)
    except (RuntimeError, MemoryError) as e:  # torch.OutOfMemoryError is a RuntimeError
        if not is_out_of_memory(e):
            raise
        at = [f"{f.name} ({Path(f.filename).name}:{f.lineno})" for f in traceback.extract_tb(e.__traceback__)
              if "llada_export" in f.filename]  # where in the build (the chain itself is left out: it is long)
        raise ExportError(f"out of memory on {opts.device} while building the engines (batch size {opts.batch_size}"
                          f"{', in ' + at[-1] if at else ''}); "
                          "lower --batch-size (--batch-sizes), --image-size / --max-visual-tokens or --max-prompt-tokens, or free "
                          "memory; nothing was written") from None
    return Path(opts.output)


def _build(opts: ExportOptions, root: Path, loaded: tuple | None) -> Manifest:
    t0 = time.perf_counter()
    device = torch.device(opts.device)
    model, tokenizer, cfg = loaded or load_checkpoint(opts.model, dtype=opts.dtype, device=device,
                                                      require_tokenizer=True)
    model.requires_grad_(False)
    tokens = special_tokens(tokenizer)
    bucket = plan_bucket(opts, cfg)
    largest, specs = bucket.batch_size, graphs_for(opts.selection)
    programs, io, variants, ctx = {}, {}, {}, None
    fp8 = None
    if opts.weights == "fp8":  # quantized after any fusion of the projections (by module name)
        ctx = size_context(None, model, replace(bucket, batch_size=largest), cfg, tokens, opts, device,
                           share_storage=loaded is None)
        fp8 = apply_fp8(ctx, opts.fp8)
    # the largest size first (its plain-named graphs, vision among them), then each smaller size's batched graphs
    work = [(b, s) for b in sorted(opts.sizes, reverse=True) for s in specs if b == largest or batched(s)]
    for b, spec in tqdm(work, desc="torch.export", unit="graph", disable=not opts.progress):
        if ctx is None or ctx.bucket.batch_size != b:
            ctx = size_context(ctx, model, replace(bucket, batch_size=b), cfg, tokens, opts, device,
                               share_storage=loaded is None)
        key = sized_key(spec.name, b, largest)
        io[key] = spec.io(ctx.dims, opts.fuse_sampler)
        programs[key] = resolve(spec.build)(ctx)
        check_program(programs[key], io[key], key)
        for variant, progs in getattr(ctx, "variants", {}).items():  # e.g. the in-place cached step
            variants.setdefault(variant, {}).update({sized_key(g, b, largest): p for g, p in progs.items()})

    state = model.state_dict()
    weight_bytes = sum(t.numel() * t.element_size() for t in state.values())
    if ctx.fused_language is not None and fp8 is None:  # (fp8: no checkpoint mapping) the graphs' fused weights, by the checkpoint keys they concatenate
        state |= fused_weights(ctx.fused_language, "model.")
    mode = compiled_weights_mode(opts, weight_bytes)
    if fp8 is not None:  # the e4m3 tensors are no checkpoint's: left out of the graphs, they go to the directory
        state |= fp8.tensors()
        mode = "shared" if mode != "package" else mode
    external = mode in ("checkpoint", "shared")
    precompile = opts.precompile if opts.precompile is not None else device.type == "cuda"
    # the compile cache serves the torch.compile path: by default only where no kernels are precompiled
    compile_cache = opts.compile_cache if opts.compile_cache is not None else device.type == "cuda" and not precompile
    wctx = WriteContext(root, opts.device, opts.dtype, programs=programs, io=io, notes=list(opts.notes),
                        weight_keys={t.data_ptr(): k for k, t in state.items()} if external else None,
                        weights=state, options={"compile_cache": compile_cache, "example_fill": ctx.fill(),
                                 "inplace": variants.get(INPLACE, {}), "precompile": precompile})
    backends = []
    for name in opts.backends:
        if (reason := skip_reason(name, opts.device)) is not None:
            wctx.notes.append(f"not built: {reason}")
        else:
            backends.append(get_backend(name))
    work = [(b, key) for b in backends for key in programs]
    bar = tqdm(total=len(work), desc="build engines", unit="artifact", disable=not opts.progress)
    for b, graph in work:
        bar.set_postfix_str(f"{b.name}:{graph}")
        if graph not in wctx.artifacts.get(b.name, {}):
            write_artifact(wctx, b, graph)
        bar.update()
    bar.close()
    for b in backends:
        if b.finalize is not None:
            t1 = time.perf_counter()
            wctx.files += b.finalize(wctx)
            if b.name in wctx.compile_cache:
                wctx.notes.append(f"{b.name}: compiled every graph at export ({time.perf_counter() - t1:.1f} s) and "
                                  f"saved the compiler's cache ({wctx.compile_cache[b.name]})")

    # What the runtime needs beside the graphs: the tokenizer and the prompt-side embedding table.
    tokenizer.save_pretrained(root / "tokenizer")
    files = wctx.files + [p for p in (root / "tokenizer").iterdir()]
    light, note = light_tokenizer_record(tokenizer, root / "tokenizer")  # the runtime's tokenizer without transformers
    if note:
        wctx.notes.append(note)
    emb = root / "text_embeddings.safetensors"
    save_file({"embed_tokens": model.model.embed_tokens.weight.detach().cpu().contiguous(),
               "image_newline": model.model.image_newline.detach().cpu().contiguous()}, str(emb))
    files.append(emb)
    weights_file = None
    if mode == "shared" and wctx.constants:
        files.append(write_shared_weights(root / SHARED_WEIGHTS_FILE, wctx.constants,
                                          state | (fp8.tensors() if fp8 is not None else {})))
        weights_file = SHARED_WEIGHTS_FILE
    where = f"{SHARED_WEIGHTS_FILE} in this directory" if weights_file else "the source checkpoint"
    weights = {b.name: (f"loaded at run time from {where} (constants_from_checkpoint maps each graph constant "
                        "to its checkpoint key) and shared by all graphs" + (" of every batch size" if len(opts.sizes) > 1 else "")
                        if b.name in wctx.constants else b.description) for b in backends}
    gen = opts.generation()
    return Manifest(
        source_checkpoint=str(Path(opts.model).resolve()) if not loaded else f"(in memory: {opts.model})",
        config_hash=cfg.hash(), config=cfg.to_dict(), dtype=opts.dtype, device=opts.device,
        fused_sampler=opts.fuse_sampler, pruning=opts.prune, bucket=bucket,
        generation={"gen_length": gen.gen_length, "block_length": gen.block_length, "steps": gen.steps},
        tokens=tokens, graphs=io, artifacts=wctx.artifacts, files=file_table(root, files),
        weights=weights | {"prompt_embeddings": "text_embeddings.safetensors"},
        constants_from_checkpoint=wctx.constants or None, compile_cache=wctx.compile_cache or None,
        precompiled=wctx.precompiled or None,
        notes=wctx.notes, batch_sizes=list(opts.sizes), weights_file=weights_file,
        quantization=fp8.to_dict() if fp8 is not None else None,
        export={"seconds": round(time.perf_counter() - t0, 2), LIGHT_TOKENIZER: light,
                **({"cached_attention": opts.cached_attention}
                   if opts.cache and {"inductor", "aoti"} & set(opts.backends) else {}),
                "peak_host_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
                "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None})


def size_context(prev: BuildContext | None, model, bucket: Bucket, cfg: LLaDAVConfig, tokens, opts: ExportOptions,
                 device: torch.device, share_storage: bool = False) -> BuildContext:
    """The build context at ``bucket``'s batch size. After the first size it is ``prev`` with the new bucket
    and fresh per-program memo tables (programs are traced per batch size) but everything else kept, so
    that every size's graphs hold the same weight tensors (one copy in ONNX's weights file, one mapping).
    ``share_storage``: the model is the build's own (not a caller's), its weights may become views of the
    fused ones (``BuildContext.share_storage``)."""
    dims = Dims.of(bucket, cfg, opts.dtype)
    if prev is None:
        return BuildContext(model, bucket, dims, tokens, opts.prune, opts.fuse_sampler, device,
                            share_storage=share_storage, unmasked_cache=opts.cached_attention == "flash")
    memo = {f.name: f.default_factory() for f in fields(prev) if f.default_factory is not MISSING}
    return replace(prev, bucket=bucket, dims=dims, **memo)


def compiled_weights_mode(opts: ExportOptions, weight_bytes: int) -> str:
    """Where the compiled backends' (aoti, inductor) weights go: ``opts.compiled_weights``, "auto" resolved."""
    if opts.compiled_weights != "auto":
        return opts.compiled_weights
    if weight_bytes > opts.external_weights_above:
        return "checkpoint"
    return "shared" if len(opts.sizes) > 1 else "package"


def write_shared_weights(path: Path, constants: dict[str, dict[str, dict[str, str]]],
                         state: dict[str, torch.Tensor]) -> Path:
    """Every checkpoint tensor the compiled graphs map a constant to, once, by checkpoint key (a derived
    key such as ``cat(a,b)``: the tensor itself where ``state`` holds it, else its parts, which the runtime
    concatenates)."""
    keys = {k for graphs in constants.values() for mapping in graphs.values() for k in mapping.values()}
    parts = {p for k in keys for p in (k[4:-1].split(",") if k not in state and k.startswith("cat(") else [k])}
    missing = sorted(parts - set(state))
    if missing:
        raise RuntimeError(f"graph constants map to {missing[:3]}, which are not checkpoint tensors")
    save_file({k: state[k].detach().cpu().contiguous() for k in sorted(parts)}, str(path))
    return path


def apply_fp8(ctx: BuildContext, settings: FP8Settings) -> FP8Record:
    """FP8 linears in every graph ``ctx`` builds, on a structural copy of its model (the caller's model is
    untouched): the language model the graphs trace is taken first (fused, where the context fuses its
    projections, from the unquantized linears), then its linears and the rest of the model's are
    quantized by their names in the checkpoint's naming (``model.layers.N...``, ``lm_head``)."""
    ctx.model = structural_copy(ctx.model)
    record, memo = FP8Record(settings), {}
    language = getattr(ctx, "language", None)  # the fused copy, where the context has one
    if language is not None:
        quantize_linears(language, record, name_of=lambda n: n if n == "lm_head" else f"model.{n}", memo=memo)
    done = set(record.quantized) | set(record.skipped)
    quantize_linears(ctx.model, record, memo=memo,  # the vision tower, the projector; the layers if not fused
                     exclude=lambda n: n in done or (language is not None and n.startswith("model.layers.")))
    record.skipped = list(dict.fromkeys(record.skipped))
    try:
        return check_record(record)
    except FP8Error as e:
        raise ExportError(str(e)) from None
