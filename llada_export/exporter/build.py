"""``export_engines``: checkpoint -> engines directory (atomically), the work behind ``llada-export``.

It iterates over the graph set (``contract.graphset``) and the backend registry
(``engines.registry``): which graphs are built follows from the options, each graph's
builder and I/O come from its spec, each artifact from its backend's writer.
"""

from __future__ import annotations

import math
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..checkpoint.io import expected_shapes
from ..checkpoint.loader import checkpoint_tokenizer, load_checkpoint, read_config
from ..config import LLaDAVConfig
from ..contract.bucket import Bucket
from ..contract.graphset import Dims, Selection, TensorIO, graphs_for, resolve
from ..contract.manifest import DTYPES, Manifest, file_table, is_engines_dir
from ..contract.pruning import PruneSettings
from ..device import parse_device
from ..engines.registry import WriteContext, get_backend, write_artifact
from ..engines.tensorrt import TOPK_LIMIT
from ..graphs.anyres import grid_shape, max_visual_token_count, visual_token_count
from ..outdir import atomic_output_dir, check_output_dir
from ..sampler import GenerationConfig
from ..tokenizer import encode_prompt, has_tokenizer_files, special_tokens
from ..graphs.fused import fused_weights
from .programs import INPLACE, BuildContext, check_program

COMPILED_WEIGHTS = ("auto", "package", "checkpoint")
EXTERNAL_WEIGHTS_ABOVE = 2 * 1024**3  # compiled_weights="auto": weights bigger than this stay in the checkpoint
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "bool": 1}


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
    # aoti / inductor artifacts: "package" keeps the weights inside each .pt2, "checkpoint" maps them to
    # checkpoint keys and the runtime loads them once for all graphs; "auto": checkpoint above
    # external_weights_above bytes (2 GiB)
    compiled_weights: str = "auto"
    external_weights_above: int = EXTERNAL_WEIGHTS_ABOVE  # bytes: "auto"'s threshold
    backends: tuple[str, ...] = ("onnxruntime",)
    dtype: str = "float32"
    device: str = "cpu"
    gen_length: int = 128
    block_length: int | None = None  # default: gen_length
    steps: int | None = None  # default: gen_length
    max_prompt_tokens: int = 256
    image_size: tuple[int, int] | None = None  # None: a bucket that takes every image
    max_visual_tokens: int | None = None
    batch_size: int = 1
    compile_cache: bool | None = None  # inductor: compile at export and save the cache (default: on CUDA)
    overwrite: bool = False
    progress: bool = True
    notes: list[str] = field(default_factory=list)

    @property
    def selection(self) -> Selection:
        return Selection(prune=self.prune is not None, baseline=self.baseline, cache=self.cache)

    def generation(self) -> GenerationConfig:
        g = self.gen_length
        return GenerationConfig(g, self.block_length or g, self.steps or g)

    def validate(self) -> None:
        for name in ("gen_length", "max_prompt_tokens", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ExportError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")
        for name in ("block_length", "steps", "max_visual_tokens"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ExportError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")
        self.generation().validate()
        if self.prune is not None:
            self.prune.validate()
        if self.compiled_weights not in COMPILED_WEIGHTS:
            raise ExportError(f"compiled_weights must be one of {', '.join(COMPILED_WEIGHTS)}, "
                              f"got {self.compiled_weights!r}")
        if self.dtype not in DTYPES:
            raise ExportError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if not self.backends:
            raise ExportError("no backend to build")
        for b in self.backends:
            get_backend(b)  # unknown names raise with the list
        if self.compile_cache and "inductor" not in self.backends:
            raise ExportError("compile_cache applies to inductor builds only")
        if self.image_size is not None and min(self.image_size) < 1:
            raise ExportError(f"--image-size must be positive, got {self.image_size}")
        self.device = str(parse_device(self.device))


def plan_bucket(opts: ExportOptions, cfg: LLaDAVConfig) -> Bucket:
    """The bucket: ``--max-visual-tokens``, else the tokens of ``--image-size``, else the most any
    image can give (anyres bounds it); the vision batch fits the largest crop grid it allows."""
    s = cfg.vision.image_size
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
                  gen_length=opts.gen_length, vision_batch=crops, batch_size=opts.batch_size)


def tensor_bytes(t: TensorIO) -> int:
    return math.prod(t.shape) * ITEMSIZE[t.dtype]


def largest_call(opts: ExportOptions, bucket: Bucket, cfg: LLaDAVConfig) -> tuple[str, int]:
    """The graph whose one call needs the most memory, and a lower bound of that memory: its inputs,
    outputs and one layer's activations (hidden states and the MLP's two projections, fp32, for every
    row it computes). The export allocates the inputs as tracing examples; running the graph needs it all."""
    dims, worst = Dims.of(bucket, cfg, opts.dtype), ("", 0)
    for spec in graphs_for(opts.selection):
        io = spec.io(dims, opts.fuse_sampler)
        if spec.denoiser:  # rows computed: [B, L] position ids (the G response rows for a cached step)
            width, rows = cfg.text.hidden_size + cfg.text.intermediate_size, math.prod(io.inputs[2].shape)
        else:  # vision: N crops of T tokens
            width, rows = cfg.vision.hidden_size + cfg.vision.intermediate_size, bucket.vision_batch * cfg.vision.tokens_per_crop
        need = sum(map(tensor_bytes, io.inputs + io.outputs)) + 2 * 4 * rows * width
        worst = max(worst, (spec.name, need), key=lambda x: x[1])
    return worst


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
    weights = 0 if weights_loaded else sum(map(math.prod, expected_shapes(cfg).values())) * ITEMSIZE[opts.dtype]
    if have is None or weights + call <= have:
        return
    fits = int((have - weights) // (call / bucket.batch_size)) if have > weights else 0
    fix = (f"use --batch-size {fits} or less" if 1 <= fits < bucket.batch_size else
           "use a smaller --image-size / --max-visual-tokens, --max-prompt-tokens or --gen-length")
    raise ExportError(f"these engines need at least {human_bytes(weights + call)} on {device} (weights "
                      f"{human_bytes(weights)}; one {graph} call of batch size {bucket.batch_size}, its inputs, outputs "
                      f"and one layer's activations: {human_bytes(call)}) and {device} has {human_bytes(have)} free: {fix}")


def human_bytes(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def template_tokens(tokenizer) -> int:
    """Text tokens of the chat template around an empty question with an image and an empty system
    prompt: the smallest prompt there is."""
    before, after = encode_prompt(tokenizer, "", has_image=True, system="")
    return len(before) + len(after)


def preflight(opts: ExportOptions, cfg: LLaDAVConfig | None = None, tokenizer=None) -> Bucket:
    """Every check that needs no weights (flags, config, bucket, backends, output directory),
    before any heavy work. ``cfg`` / ``tokenizer``: a model already in memory."""
    opts.validate()
    protect = []
    if cfg is None:
        if not Path(opts.model).is_dir():
            raise ExportError(f"{opts.model}: no such checkpoint directory")
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
    check_memory(opts, bucket, cfg, weights_loaded=not protect)
    if tokenizer is not None and (n := template_tokens(tokenizer)) >= opts.max_prompt_tokens:
        raise ExportError(f"--max-prompt-tokens {opts.max_prompt_tokens} does not hold the chat template itself "
                          f"({n} tokens with an empty system prompt and question); use at least {n + 16}")
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
    protect = [] if loaded else [opts.model]
    try:
        with atomic_output_dir(opts.output, overwrite=opts.overwrite, owned=is_engines_dir, protect=protect,
                               what="engines directory") as tmp:
            _build(opts, tmp, loaded).write(tmp)
    except (RuntimeError, MemoryError) as e:  # torch.OutOfMemoryError is a RuntimeError
        if not is_out_of_memory(e):
            raise
        raise ExportError(f"out of memory on {opts.device} while building the engines (batch size {opts.batch_size}); "
                          "lower --batch-size, --image-size / --max-visual-tokens or --max-prompt-tokens, or free "
                          "memory; nothing was written") from None
    return Path(opts.output)


def is_out_of_memory(e: BaseException) -> bool:
    """An allocation failure of torch (CPU or CUDA) or of Python."""
    text = str(e).lower()
    return isinstance(e, (MemoryError, torch.OutOfMemoryError)) or "can't allocate memory" in text \
        or "out of memory" in text


def _build(opts: ExportOptions, root: Path, loaded: tuple | None) -> Manifest:
    t0 = time.perf_counter()
    device = torch.device(opts.device)
    model, tokenizer, cfg = loaded or load_checkpoint(opts.model, dtype=opts.dtype, device=device,
                                                      require_tokenizer=True)
    model.requires_grad_(False)
    tokens = special_tokens(tokenizer)
    bucket = plan_bucket(opts, cfg)
    dims = Dims.of(bucket, cfg, opts.dtype)
    ctx = BuildContext(model, bucket, dims, tokens, opts.prune, opts.fuse_sampler, device)
    specs = graphs_for(opts.selection)

    programs, io = {}, {}
    for spec in tqdm(specs, desc="torch.export", unit="graph", disable=not opts.progress):
        io[spec.name] = spec.io(dims, opts.fuse_sampler)
        programs[spec.name] = resolve(spec.build)(ctx)
        check_program(programs[spec.name], io[spec.name], spec.name)

    state = model.state_dict()
    weight_bytes = sum(t.numel() * t.element_size() for t in state.values())
    if ctx.fused_language is not None:  # the graphs' fused weights, by the checkpoint keys they concatenate
        state |= fused_weights(ctx.fused_language, "model.")
    external = opts.compiled_weights == "checkpoint" or (opts.compiled_weights == "auto"
                                                         and weight_bytes > opts.external_weights_above)
    compile_cache = opts.compile_cache if opts.compile_cache is not None else device.type == "cuda"
    wctx = WriteContext(root, opts.device, opts.dtype, programs=programs, io=io, notes=list(opts.notes),
                        weight_keys={t.data_ptr(): k for k, t in state.items()} if external else None,
                        weights=state, options={"compile_cache": compile_cache, "example_fill": ctx.fill(),
                                 "inplace": ctx.variants.get(INPLACE, {})})
    backends = []
    for name in opts.backends:
        if (reason := skip_reason(name, opts.device)) is not None:
            wctx.notes.append(f"not built: {reason}")
        else:
            backends.append(get_backend(name))
    work = [(b, s.name) for b in backends for s in specs]
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
    emb = root / "text_embeddings.safetensors"
    save_file({"embed_tokens": model.model.embed_tokens.weight.detach().cpu().contiguous(),
               "image_newline": model.model.image_newline.detach().cpu().contiguous()}, str(emb))
    files.append(emb)
    weights = {b.name: ("loaded at run time from the source checkpoint (constants_from_checkpoint maps each "
                        "graph constant to its checkpoint key) and shared by all graphs"
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
        notes=wctx.notes,
        export={"seconds": round(time.perf_counter() - t0, 2),
                "peak_host_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
                "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None})
