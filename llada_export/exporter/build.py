"""``export_engines``: checkpoint -> engines directory (atomic), the work behind ``llada-export``."""

from __future__ import annotations

import os
import resource
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..checkpoint import load_checkpoint
from ..config import LLaDAVConfig
from ..engines import BACKENDS
from ..graphs.llada import FusedDenoiser
from ..graphs.anyres import grid_shape, visual_token_count
from ..passes.prune import PruneSpec
from ..runtime.sampler import GenerationConfig
from ..tokenizer import SpecialTokens
from .backends import tensorrt_status, write_aoti, write_onnx, write_program, write_tensorrt
from .bucket import Bucket
from .manifest import file_table, write_manifest
from .programs import (DENOISER_INPUTS, DENOISER_OUTPUTS, FUSED_OUTPUTS, STAGE_A_INPUTS, STAGE_A_OUTPUTS,
                       VISION_INPUTS,
                       VISION_OUTPUTS, export_denoiser, stage_a_program, static_denoiser, user_input_values,
                       vision_program)

COMPILED = ("aoti", "inductor")  # backends whose artifacts can leave their weights in the checkpoint
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
TRT_TOPK_LIMIT = 3840  # TensorRT's TopK needs a static K below this


class ExportError(ValueError):
    """A user error in the export request (bad flag value, bad checkpoint, existing output)."""


@dataclass
class ExportOptions:
    model: str
    output: str
    prune_layer: int = 16
    keep: float = 0.35
    score_from: str = "response"
    prune: bool = True
    baseline: bool = False  # also build the unpruned denoiser ("full") for comparisons
    fuse_sampler: bool = False  # graphs output (x0, confidence) instead of logits
    # aoti / inductor artifacts: "package" keeps the weights inside each .pt2, "checkpoint" maps them to
    # checkpoint keys and the runtime loads them once for all graphs; "auto": checkpoint above 2 GB
    compiled_weights: str = "auto"
    backends: tuple[str, ...] = ("onnxruntime",)
    dtype: str = "float32"
    device: str = "cpu"
    gen_length: int = 128
    block_length: int = 128
    steps: int = 128
    max_prompt_tokens: int = 256
    image_size: tuple[int, int] = (384, 384)
    max_visual_tokens: int | None = None
    overwrite: bool = False
    progress: bool = True
    notes: list[str] = field(default_factory=list)

    def validate(self) -> None:
        GenerationConfig(self.gen_length, self.block_length, self.steps).validate()
        if not 0.0 < self.keep <= 1.0:
            raise ExportError(f"--keep must be in (0, 1], got {self.keep}")
        if self.prune_layer < 0:
            raise ExportError(f"--prune-layer must be >= 0, got {self.prune_layer}")
        if self.compiled_weights not in ("auto", "package", "checkpoint"):
            raise ExportError(f"compiled_weights must be auto, package or checkpoint, got {self.compiled_weights!r}")
        if self.dtype not in DTYPES:
            raise ExportError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        bad = [b for b in self.backends if b not in BACKENDS]
        if bad:
            raise ExportError(f"unknown backend {bad[0]!r}; choose from {', '.join(BACKENDS)} or all")
        if self.max_prompt_tokens < 8:
            raise ExportError("--max-prompt-tokens must be at least 8")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ExportError(f"--device {self.device}: no CUDA GPU is visible")



def plan_bucket(opts: ExportOptions, cfg) -> Bucket:
    w, h = opts.image_size
    v = opts.max_visual_tokens or visual_token_count(w, h, cfg)
    cols, rows = grid_shape((w, h), cfg)
    return Bucket(max_text_tokens=opts.max_prompt_tokens, max_visual_tokens=v, gen_length=opts.gen_length,
                  vision_batch=1 + cols * rows, keep=opts.keep, prune=opts.prune)


def preflight(opts: ExportOptions, cfg: LLaDAVConfig | None = None) -> Bucket:
    """Every check that needs no weights (flags, config, bucket, backends), before any heavy work.
    ``cfg``: the config of a model already in memory (else read from the checkpoint)."""
    opts.validate()
    if cfg is None:
        if not Path(opts.model).is_dir():
            raise ExportError(f"{opts.model}: no such checkpoint directory")
        cfg = LLaDAVConfig.from_json(opts.model)
    n_layers = cfg.text.num_hidden_layers
    if opts.prune and not 0 <= opts.prune_layer < n_layers:
        raise ExportError(f"--prune-layer {opts.prune_layer} is out of range: the model has layers 0..{n_layers - 1}")
    bucket = plan_bucket(opts, cfg)
    if "tensorrt" in opts.backends and opts.prune and bucket.k_static >= TRT_TOPK_LIMIT:
        raise ExportError(f"the bucket keeps {bucket.k_static} visual tokens, over TensorRT's TopK limit "
                          f"({TRT_TOPK_LIMIT - 1}); lower --keep, --image-size or --max-visual-tokens")
    if opts.backends == ("tensorrt",) and (reason := tensorrt_status()):
        raise ExportError(f"TensorRT engines cannot be built here: {reason}")
    return bucket


def export_engines(opts: ExportOptions, loaded: tuple | None = None) -> Path:
    """Build every graph for every requested backend into ``opts.output`` (atomically).

    ``loaded``: ``(model, tokenizer, config)`` already in memory (benchmarks build random
    full-size weights on the GPU); ``opts.model`` is then only recorded. Graphs whose weights
    stay in the checkpoint then need ``Pipeline.load(..., weights=model.state_dict())``."""
    preflight(opts, loaded[2] if loaded else None)
    out = Path(opts.output)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not opts.overwrite:
        raise ExportError(f"{out} already exists; pass --overwrite to replace it")
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        manifest = _build(opts, tmp, loaded)
        write_manifest(tmp, manifest)
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _build(opts: ExportOptions, root: Path, loaded: tuple | None) -> dict:
    t0 = time.perf_counter()
    dtype, device = DTYPES[opts.dtype], torch.device(opts.device)
    model, tokenizer, cfg = loaded or load_checkpoint(opts.model, dtype=dtype, device=device)
    model.requires_grad_(False)
    sp = SpecialTokens.from_tokenizer(tokenizer)
    bucket = plan_bucket(opts, cfg)
    lm = model.language
    outputs = DENOISER_OUTPUTS
    if opts.fuse_sampler:
        lm = FusedDenoiser(lm, sp.suppressed(), sp.mask)
        outputs = FUSED_OUTPUTS
    stage_a_outputs = outputs + STAGE_A_OUTPUTS[len(DENOISER_OUTPUTS):]

    graphs: dict[str, tuple] = {}  # name -> (program, inputs, outputs)
    steps = ["trace denoiser", "vision"] + (["stage_a", "stage_b"] if opts.prune else []) + (
        ["full"] if (opts.baseline or not opts.prune) else [])
    bar = tqdm(total=len(steps), desc="torch.export", unit="graph", disable=not opts.progress)
    ep = export_denoiser(lm, bucket, sp.mask, device)
    bar.update()
    graphs["vision"] = (vision_program(model, bucket, device), VISION_INPUTS, VISION_OUTPUTS)
    bar.update()
    if opts.prune:
        spec = PruneSpec(layer=opts.prune_layer, n_visual_slots=bucket.max_visual_tokens, k_static=bucket.k_static,
                         score_from=opts.score_from, mask_id=sp.mask)
        graphs["stage_a"] = (stage_a_program(ep, lm, bucket, spec, sp.mask, device), STAGE_A_INPUTS, stage_a_outputs)
        bar.update()
        graphs["stage_b"] = (static_denoiser(ep, lm, bucket.reduced_prefix_len, bucket.gen_length, sp.mask, device),
                             DENOISER_INPUTS, outputs)
        bar.update()
    if opts.baseline or not opts.prune:
        graphs["full"] = (static_denoiser(ep, lm, bucket.prefix_len, bucket.gen_length, sp.mask, device),
                          DENOISER_INPUTS, outputs)
        bar.update()
    bar.close()

    files: list[Path] = []
    artifacts: dict[str, dict[str, str]] = {}
    state = model.state_dict()
    weight_bytes = sum(t.numel() * t.element_size() for t in state.values())
    external = opts.compiled_weights == "checkpoint" or (opts.compiled_weights == "auto" and weight_bytes > 2 * 1024**3)
    weight_keys = {t.data_ptr(): k for k, t in state.items()} if external else None
    from_checkpoint: dict[str, dict[str, dict[str, str]]] = {}  # backend -> graph -> {constant fqn: key}
    notes = list(opts.notes)
    trt_reason = tensorrt_status() if "tensorrt" in opts.backends else None
    work = [(b, n) for b in opts.backends for n in graphs if not (b == "tensorrt" and trt_reason)]
    bar = tqdm(total=len(work), desc="build engines", unit="artifact", disable=not opts.progress)
    for backend, name in work:
        prog, ins, outs = graphs[name]
        bar.set_postfix_str(f"{backend}:{name}")
        if backend == "onnxruntime" or (backend == "tensorrt" and name not in artifacts.get("onnxruntime", {})):
            d = root / "onnx"
            d.mkdir(exist_ok=True)
            written = write_onnx(prog, d / f"{name}.onnx", ins, outs)
            files += written
            artifacts.setdefault("onnxruntime", {})[name] = f"onnx/{name}.onnx"
        if backend in COMPILED:
            folder, writer = ("aoti", write_aoti) if backend == "aoti" else ("programs", write_program)
            d = root / folder
            d.mkdir(exist_ok=True)
            written, mapping = writer(prog, d / f"{name}.pt2", weight_keys)
            files += written
            artifacts.setdefault(backend, {})[name] = f"{folder}/{name}.pt2"
            if mapping is not None:
                from_checkpoint.setdefault(backend, {})[name] = mapping
        if backend == "tensorrt":
            d = root / "tensorrt"
            d.mkdir(exist_ok=True)
            shapes = {n: tuple(v.shape) for n, v in zip(ins, user_input_values(prog))}
            files += write_tensorrt(root / artifacts["onnxruntime"][name], d / f"{name}.plan", shapes)
            artifacts.setdefault("tensorrt", {})[name] = f"tensorrt/{name}.plan"
        bar.update()
    bar.close()
    if trt_reason:
        notes.append(f"TensorRT engines were not built: {trt_reason}")

    # What the runtime needs beside the graphs: the tokenizer and the prompt-side embedding table.
    tokenizer.save_pretrained(root / "tokenizer")
    files += [p for p in (root / "tokenizer").iterdir()]
    emb = root / "text_embeddings.safetensors"
    save_file({"embed_tokens": model.model.embed_tokens.weight.detach().cpu().contiguous(),
               "image_newline": model.model.image_newline.detach().cpu().contiguous()}, str(emb))
    files.append(emb)

    return {
        "source": {"checkpoint": str(Path(opts.model).resolve()) if not loaded else f"(in memory: {opts.model})",
                   "config_hash": cfg.hash()},
        "config": cfg.to_dict(),
        "dtype": opts.dtype,
        "fused_sampler": opts.fuse_sampler,
        "device": opts.device,
        "pruning": {"enabled": opts.prune, "layer": opts.prune_layer if opts.prune else None,
                    "keep": opts.keep if opts.prune else 1.0, "score_from": opts.score_from,
                    "k_static": bucket.k_static},
        "bucket": bucket.to_dict(),
        "generation": {"gen_length": opts.gen_length, "block_length": opts.block_length, "steps": opts.steps},
        "tokens": asdict(sp) | {"suppressed": sp.suppressed()},
        "graphs": {n: {"inputs": list(ins), "outputs": list(outs),
                       "input_shapes": {i: list(v.shape) for i, v in zip(ins, user_input_values(p))}}
                   for n, (p, ins, outs) in graphs.items()},
        "artifacts": artifacts,
        "weights": {
            "onnxruntime": "inside each graph (initializers, or external data beside the .onnx over 2 GB)",
            **{b: ("loaded at run time from the source checkpoint (constants_from_checkpoint maps each graph "
                   "constant to its checkpoint key) and shared by all graphs" if b in from_checkpoint else
                   "inside each .pt2") for b in COMPILED if b in opts.backends},
            "prompt_embeddings": "text_embeddings.safetensors",
        },
        "constants_from_checkpoint": from_checkpoint or None,
        "notes": notes,
        "export_seconds": round(time.perf_counter() - t0, 2),
        "export_peak_host_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "export_peak_gpu_gib": (round(torch.cuda.max_memory_allocated() / 2**30, 2)
                                if device.type == "cuda" else None),
        "files": file_table(root, files),
    }
