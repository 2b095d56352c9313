"""Probe whether the field's FP8 libraries fit the export pipeline: torchao's float8 inference and
NVIDIA ModelOpt's FP8 quantization, each tried on the bundled demo model's denoiser (the fused
language model the exporter traces) on the CPU, next to the project's own ``llada_fp8::linear``.

Each candidate runs in a child process of its own (the libraries register ops and patch torch
globally) through the pipeline's steps: quantize, eager forward (top-1 agreement and logit error
against the unquantized model on VQA test prompts), ``torch.export`` with the exporter's dynamic
prefix length, ``torch.onnx.export(dynamo=True)`` of its static re-export (the ONNX writer's call)
and of the dynamic program, ONNX Runtime on each file, reloading the saved ``.pt2`` in a process
where the library is not importable (what a runtime without it would see), the program's weights
into safetensors (the engines' weights file), ModelOpt's own ONNX exporter, and Inductor
(``torch.compile``). A step that fails is reported with its one-line error and the tool still
exits 0: it reports, it does not test (CI has neither library).

The libraries are not dependencies of the project; install them apart, never into the venv:

    pip install --no-deps --target /tmp/fp8libs/torchao torchao==0.18.0
    pip install --no-deps --target /tmp/fp8libs/modelopt nvidia-modelopt==0.47.0 ninja nvidia-ml-py \\
        omegaconf antlr4-python3-runtime==4.9.3 pulp scipy onnxconverter-common onnx-graphsurgeon onnxslim lief
    python tools/fp8_libraries.py --torchao /tmp/fp8libs/torchao --modelopt /tmp/fp8libs/modelopt \\
        --resolve --out benchmarks/fp8_libraries.md

(``--no-deps``: a plain ``pip install nvidia-modelopt`` resolves torch and the CUDA wheels again;
``--resolve`` asks pip, dry-run, what each would pull and reports it.) torchao 0.18.0 is the
release for torch >= 2.11 (its ``__init__`` loads its extensions only from 2.11 on), so the same
wheel serves this CPU's torch 2.13 and the GPU machine's 2.11.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SCALES = {  # the activation scales each candidate's configuration gives
    "llada_fp8": "dynamic, per row (token)",
    "torchao": "dynamic, per row (PerRow)",
    "modelopt": "static, per tensor, calibrated (FP8_DEFAULT_CFG)",
}
CANDIDATES = {  # name -> (library, dtype): torchao's PerRow wants bf16 weights, ONNX Runtime's CPU wants fp32
    "llada_fp8 fp32": ("llada_fp8", "float32"),
    "llada_fp8 bf16": ("llada_fp8", "bfloat16"),
    "torchao bf16": ("torchao", "bfloat16"),
    "modelopt fp32": ("modelopt", "float32"),
}
PIP_NAMES = {"torchao": "torchao==0.18.0", "modelopt": "nvidia-modelopt==0.47.0"}
LOGGED: list[str] = []  # the library's log messages (torchao logs the extensions it cannot load)


def capture_logs(name: str) -> None:
    """Keep ``name``'s log messages from now on (before anything imports the library)."""
    import logging

    handler = logging.Handler()
    handler.emit = lambda record: LOGGED.append(record.getMessage())
    logging.getLogger(name).addHandler(handler)


@dataclass
class Step:
    name: str
    status: str  # ok | failed | skipped
    detail: str = ""
    seconds: float = 0.0


@dataclass
class Probe:
    """One candidate's steps, filled in by the child process."""

    candidate: str
    library: str
    dtype: str
    version: str = ""
    steps: list[Step] = field(default_factory=list)

    def run(self, name: str, fn, *args):
        """Run ``fn``; record ok with what it returns (a string) or failed with the error's last line."""
        t0 = time.perf_counter()
        try:
            out = fn(*args)
            self.steps.append(Step(name, "ok", out if isinstance(out, str) else "", time.perf_counter() - t0))
            return out if out is not None else True
        except Exception as e:  # a probe reports every failure, whatever its type
            self.steps.append(Step(name, "failed", one_line(e), time.perf_counter() - t0))
            return None

    def skip(self, name: str, why: str) -> None:
        self.steps.append(Step(name, "skipped", why))


def one_line(e: BaseException) -> str:
    """The error's type and first meaningful line (torch's errors put the cause after a summary)."""
    text = str(e).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    pick = next((ln for ln in lines if "No ONNX function" in ln or "not a registered" in ln), lines[0] if lines else "")
    pick = pick.split("'>: ", 1)[-1] if pick.startswith("<class '") else pick  # torch.onnx's "<class 'X'>: why"
    return f"{type(e).__name__}: {pick[:300]}"


# ---------------------------------------------------------------------- inputs and metrics
def load_requests(model_dir: str, dtype: torch.dtype, n: int, split: str, gen_length: int):
    """The demo model's fused language model and ``n`` first-step denoiser inputs of real VQA prompts."""
    from llada_export import vqa_task
    from llada_export.checkpoint.loader import load_checkpoint
    from llada_export.graphs.fused import fuse_projections
    from llada_export.reference import embed_prompt
    from llada_export.tokenizer import special_tokens

    model, tok, _ = load_checkpoint(model_dir, dtype=dtype, require_tokenizer=True)
    model.requires_grad_(False)
    mask = special_tokens(tok).mask
    reqs = []
    for i in range(n):
        s = vqa_task.sample(split, i)
        p = embed_prompt(model, tok, s.image(), s.prompt).embeds.float()  # [1, P, D]
        length = p.shape[1] + gen_length
        reqs.append((p, torch.full((1, gen_length), mask), torch.arange(length)[None],  # [1, G], [1, L]
                     torch.ones(1, length, dtype=torch.bool)))  # [1, L]
    return fuse_projections(model.language), reqs


def denoiser(lm):
    from llada_export.graphs.llada import DenoiserGraph, Head

    return DenoiserGraph(lm, Head()).eval()


@torch.no_grad()
def logits(module, reqs) -> list[torch.Tensor]:
    return [module(*r)[0].float() for r in reqs]  # each [1, G, V]


def compare(out: list[torch.Tensor], ref: list[torch.Tensor]) -> str:
    """Top-1 agreement over all response positions and the largest logit error relative to the largest logit."""
    agree = sum(int((o.argmax(-1) == r.argmax(-1)).sum()) for o, r in zip(out, ref))
    total = sum(r.shape[1] for r in ref)
    err = max(float((o - r).abs().max()) for o, r in zip(out, ref)) / max(float(r.abs().max()) for r in ref)
    return f"top-1 {agree}/{total}, rel. logit error {err:.4f}"


# ---------------------------------------------------------------------- the candidates' quantizers
def quantize_ours(lm, dtype, probe: Probe):
    from llada_export.quant.fp8 import FP8Settings, quantized_copy

    probe.version = "llada_export.quant.fp8"
    probe.steps.append(Step("import", "ok", "part of the package"))
    return probe.run("quantize", lambda: quantized_copy(lm, FP8Settings("row", skip=("lm_head",)))[0])


def quantize_torchao(lm, dtype, probe: Probe):
    """As documented (``quantize_`` + ``Float8DynamicActivationFloat8WeightConfig(PerRow())``); where it
    refuses the CPU, again with its hardware check bypassed, to see whether the rest would work."""
    import torchao
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_
    import torchao.quantization.quant_api as quant_api

    probe.version = f"torchao {torchao.__version__}"
    not_loaded = sorted(Path(m.split(": ")[0].split()[-1]).name for m in LOGGED if m.startswith("Failed to load"))
    probe.steps.append(Step("import", "ok", "extensions not loaded on this CPU build: "
                            f"{', '.join(not_loaded) or 'none'}"))
    config = Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
    keep = lambda m, fqn: isinstance(m, torch.nn.Linear) and fqn != "lm_head"  # noqa: E731

    def quantized(src):
        out = copy.deepcopy(src)
        quantize_(out, config, filter_fn=keep)
        return out

    q = probe.run("quantize", quantized, lm)
    if q is None:
        quant_api._check_hardware_support = lambda granularity: None  # the CPU is refused by this check alone
        q = probe.run("quantize (hardware check bypassed)", quantized, lm)
    probe.run("quantize float32 weights", quantized, copy.deepcopy(lm).float())
    return q


def quantize_modelopt(lm, dtype, probe: Probe, calib):
    """``mtq.quantize(model, mtq.FP8_DEFAULT_CFG, forward_loop)``: static per-tensor scales calibrated on ``calib``."""
    import modelopt
    import modelopt.torch.quantization as mtq

    probe.version = f"nvidia-modelopt {modelopt.__version__}"
    probe.steps.append(Step("import", "ok"))

    def quantized():
        out = copy.deepcopy(lm)
        graph = denoiser(out)
        with torch.no_grad():
            mtq.quantize(out, mtq.FP8_DEFAULT_CFG, lambda m: [graph(*r) for r in calib])
        return out

    return probe.run("quantize", quantized)


# ---------------------------------------------------------------------- the pipeline's steps
def export_program(module, example, modelopt_mode: bool = False):
    """``torch.export`` with the exporter's dynamic prefix length; ``modelopt_mode``: inside ModelOpt's
    ``export_torch_mode`` (its quantizers detach their amax buffers there)."""
    import contextlib

    p = torch.export.Dim("prefix", min=2, max=2048)
    g = example[1].shape[1]
    mode = contextlib.nullcontext()
    if modelopt_mode:
        from modelopt.torch.quantization.utils import export_torch_mode
        mode = export_torch_mode()
    with torch.no_grad(), mode:
        return torch.export.export(module, example, dynamic_shapes=({1: p}, None, {1: p + g}, {1: p + g}))


def census(ep) -> str:
    """Non-aten ops of the program and the dtypes of its weights."""
    ops = {}
    for n in ep.graph.nodes:
        name = str(n.target)
        if n.op == "call_function" and (name.startswith(("aten._scaled_mm", "torchao.", "tensorrt.", "llada_fp8.",
                                                         "export."))):
            ops[name] = ops.get(name, 0) + 1
    kinds = {}
    for t in list(ep.state_dict.values()) + [c for c in ep.constants.values() if isinstance(c, torch.Tensor)]:
        key = f"{type(t).__name__}[{t.dtype}]".replace("Parameter", "Tensor")
        kinds[key] = kinds.get(key, 0) + 1
    return f"ops {ops or 'aten only'}; weights {kinds}"


def onnx_file(ep, path: Path, library: str) -> str:
    import logging
    import warnings

    from llada_export.quant.fp8 import ONNX_TRANSLATIONS

    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    table = ONNX_TRANSLATIONS if library == "llada_fp8" else None  # the libraries' ops have no translation of ours
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(ep, (), str(path), dynamo=True, optimize=True, verbose=False, custom_translation_table=table)
    return onnx_ops(path)


def onnx_ops(path: Path) -> str:
    import onnx

    m = onnx.load(str(path))
    keep = ("QuantizeLinear", "DequantizeLinear", "MatMul", "Gemm")
    ops = {}
    for n in m.graph.node:
        if n.op_type in keep or n.domain:
            key = f"{n.domain + ':' if n.domain else ''}{n.op_type}"
            ops[key] = ops.get(key, 0) + 1
    f8 = sum(1 for t in m.graph.initializer if t.data_type == onnx.TensorProto.FLOAT8E4M3FN)
    return f"{ops}; {f8} FLOAT8E4M3FN initializers"


def ort_logits(path: Path, reqs) -> list[torch.Tensor]:
    import onnxruntime as ort

    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in s.get_inputs()]
    return [torch.from_numpy(s.run(None, {k: t.numpy() for k, t in zip(names, r)})[0]).float() for r in reqs]


def modelopt_onnx(module, example, path: Path) -> str:
    """ModelOpt's own ONNX path (``get_onnx_bytes_and_metadata``: the TorchScript exporter, then its FP8 passes)."""
    import warnings

    from modelopt.torch._deploy.utils.torch_onnx import OnnxBytes, get_onnx_bytes_and_metadata

    axes = {"prefix_embeds": {1: "P"}, "position_ids": {1: "L"}, "key_mask": {1: "L"}}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data, _ = get_onnx_bytes_and_metadata(module, example, dynamic_axes=axes)
    path.write_bytes(OnnxBytes.from_bytes(data).get_onnx_model_file_bytes())
    deprecated = [str(w.message).splitlines()[0][:160] for w in caught if issubclass(w.category, (DeprecationWarning,
                                                                                                 FutureWarning))]
    return onnx_ops(path) + (f"; warned: {deprecated[0]}" if deprecated else "")


def standard_domain(src: Path, dst: Path) -> str:
    """ModelOpt's ``trt``-domain Q/DQ renamed to the standard ops (and their uint8 value infos dropped)."""
    import onnx

    m = onnx.load(str(src))
    renamed = 0
    for n in m.graph.node:
        if n.domain == "trt":
            n.domain, renamed = "", renamed + 1
    q_out = {o for n in m.graph.node if n.op_type == "QuantizeLinear" for o in n.output}
    keep = [v for v in m.graph.value_info if v.name not in q_out]
    del m.graph.value_info[:]
    m.graph.value_info.extend(keep)
    opsets = [o for o in m.opset_import if o.domain != "trt"]
    del m.opset_import[:]
    m.opset_import.extend(opsets)
    onnx.save(m, str(dst))
    return f"{renamed} nodes renamed"


def reload_elsewhere(pt2: Path, inputs: Path, library: str) -> str:
    """Load the saved program in a fresh process whose path has the repository only (not the library)."""
    code = ("import sys, torch; sys.path.insert(0, sys.argv[3]); import llada_export.quant.fp8; "
            "ep = torch.export.load(sys.argv[1]); r = torch.load(sys.argv[2]); ep.module()(*r); print('ran')")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([sys.executable, "-c", code, str(pt2), str(inputs), str(ROOT)], env=env,
                         capture_output=True, text=True, timeout=300)
    if res.returncode != 0:
        lines = res.stderr.splitlines()
        why = [ln.split("SerializeError: ", 1)[1] for ln in lines if "SerializeError: " in ln]  # the op it lacked
        last = [ln for ln in lines if ln.strip() and not ln.startswith((" ", "Traceback", "W1"))]
        raise RuntimeError((why or last or [f"exit {res.returncode}"])[0].split(". ")[0])
    if library == "llada_fp8":
        return "ran (llada_export imported there, as the runtime does)"
    found = subprocess.run([sys.executable, "-c", f"import {library}"], env=env, capture_output=True)
    importable = found.returncode == 0
    return f"ran ({library} {'importable there too' if importable else 'not importable there'})"


def to_safetensors(ep) -> str:
    from safetensors.torch import save

    state = {k: t.detach() for k, t in ep.state_dict.items()}
    return f"{len(save(state)) / 2**20:.1f} MiB"


def child(candidate: str, args) -> Probe:
    library, dtype_name = CANDIDATES[candidate]
    dtype = getattr(torch, dtype_name)
    probe = Probe(candidate, library, dtype_name)
    capture_logs(library)
    lm, reqs = load_requests(args.model, dtype, args.samples, "test", args.gen_length)
    ref = logits(denoiser(lm), reqs)
    ours = None
    if library != "llada_fp8":
        from llada_export.quant.fp8 import FP8Settings, quantized_copy
        ours = logits(denoiser(quantized_copy(lm, FP8Settings("row", skip=("lm_head",)))[0]), reqs)
    if library == "torchao":
        q = quantize_torchao(lm, dtype, probe)
    elif library == "modelopt":
        calib = load_requests(args.model, dtype, args.samples, "train", args.gen_length)[1]  # other prompts
        q = quantize_modelopt(lm, dtype, probe, calib)
    else:
        q = quantize_ours(lm, dtype, probe)
    if q is None:
        return probe
    graph = denoiser(q)
    out = None

    def eager():
        nonlocal out
        out = logits(graph, reqs)
        against_ours = f"; vs llada_fp8 per-row: {compare(out, ours)}" if ours else ""
        return f"vs unquantized: {compare(out, ref)}{against_ours}"

    probe.run("eager forward", eager)
    work = Path(args.workdir)
    if library == "modelopt":
        probe.run("torch.export outside ModelOpt's export_torch_mode", lambda: export_program(graph, reqs[0]) and "")
    ep = probe.run("torch.export (dynamic prefix)", export_program, graph, reqs[0], library == "modelopt")
    if ep is not None and ep is not True:
        probe.steps[-1].detail = census(ep)
        if out is not None:
            probe.run("exported program run", lambda: compare(logits(ep.module(), reqs), out) + " vs eager")
        with torch.no_grad():  # the ONNX writer's programs are static re-exports (BuildContext.static)
            static = probe.run("static re-export (first prompt's shape)", torch.export.export, ep.module(), reqs[0])
        for kind, prog, feed in (("static", static, reqs[:1]), ("dynamic prefix", ep, reqs)):
            onnx_path = work / f"{library}_{dtype_name}_{kind.split()[0]}.onnx"
            done = isinstance(prog, torch.export.ExportedProgram) and probe.run(
                f"torch.onnx.export, {kind}", onnx_file, prog, onnx_path, library)
            if not done:
                probe.skip(f"ONNX Runtime run, {kind}", "no ONNX file")
            elif dtype != torch.float32:
                probe.skip(f"ONNX Runtime run, {kind}", "bf16 graph: ONNX Runtime's CPU kernels (e.g. Mul) take no "
                                                        "bf16; the CPU engines are exported fp32")
            elif out is not None:
                probe.run(f"ONNX Runtime run, {kind}",
                          lambda: compare(ort_logits(onnx_path, feed), out[:len(feed)]) + " vs eager")
        pt2, inputs = work / f"{library}_{dtype_name}.pt2", work / "inputs.pt"
        torch.export.save(ep, str(pt2))
        torch.save(reqs[0], str(inputs))
        probe.run("reload .pt2 without the library", reload_elsewhere, pt2, inputs, library)
        probe.run("program weights to safetensors (the engines' weights file)", to_safetensors, ep)
    else:
        probe.skip("torch.onnx.export", "no exported program")
    if library == "modelopt":
        vendor = work / "modelopt_vendor.onnx"
        if probe.run("ModelOpt ONNX export (get_onnx_bytes_and_metadata)", modelopt_onnx, graph, reqs[0], vendor):
            probe.run("ONNX Runtime run of that file", lambda: compare(ort_logits(vendor, reqs), out))
            std = work / "modelopt_std.onnx"
            if probe.run("same file, trt-domain Q/DQ renamed to standard", standard_domain, vendor, std):
                probe.run("ONNX Runtime run of the renamed file", lambda: compare(ort_logits(std, reqs), out)
                          + " vs eager")
    if args.compile and out is not None:
        torch._dynamo.reset()
        probe.run("Inductor (torch.compile, CPU)",
                  lambda: compare(logits(torch.compile(graph), reqs), out) + " vs eager")
    else:
        probe.skip("Inductor (torch.compile, CPU)", "--no-compile" if not args.compile else "no eager output")
    return probe


# ---------------------------------------------------------------------- parent: run, resolve, render
def run_child(candidate: str, args, paths: dict[str, str], work: Path) -> dict:
    library = CANDIDATES[candidate][0]
    out = work / f"{candidate.replace(' ', '_')}.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [paths.get(library), str(ROOT)])))
    cmd = [sys.executable, __file__, "--child", candidate, "--json-out", str(out), "--workdir", str(work),
           "--model", args.model, "--samples", str(args.samples), "--gen-length", str(args.gen_length)]
    cmd += [] if args.compile else ["--no-compile"]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    if res.returncode != 0 or not out.exists():
        tail = [ln for ln in res.stderr.splitlines() if ln.strip()][-1:] or [f"exit {res.returncode}"]
        return asdict(Probe(candidate, library, CANDIDATES[candidate][1], steps=[Step("import", "failed", tail[0])]))
    data = json.loads(out.read_text())
    data["seconds"] = round(time.perf_counter() - t0, 1)
    return data


def resolve(library: str) -> str:
    """What ``pip install <library>`` would pull into a fresh environment (pip's dry-run report)."""
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        res = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                              "--report", f.name, PIP_NAMES[library]], capture_output=True, text=True, timeout=600)
        if res.returncode != 0:
            return f"pip's dry run failed: {res.stderr.strip().splitlines()[-1:]}"
        pkgs = {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in json.load(open(f.name))["install"]}
    cuda = sorted(p for p in pkgs if p.startswith(("nvidia-", "cuda-", "triton")) and p != "nvidia-modelopt")
    torch_note = f"torch {pkgs['torch']}" if "torch" in pkgs else "no torch"
    return f"{len(pkgs)} package(s): {torch_note}, {len(cuda)} CUDA/NVIDIA runtime wheels"


def dir_mib(path: str | None) -> str:
    if not path:
        return "-"
    return f"{sum(p.stat().st_size for p in Path(path).rglob('*') if p.is_file()) / 2**20:.0f} MiB"


def summary(r: dict) -> list[str]:
    """One row of the summary table, read off the candidate's steps."""
    steps = {s["name"]: s for s in r["steps"]}

    def status(name: str) -> str:
        s = steps.get(name)
        return "-" if s is None else ("yes" if s["status"] == "ok" else "no")

    ort = steps.get("ONNX Runtime run, static", {})
    onnx_ok = steps.get("torch.onnx.export, static", {}).get("status") == "ok"
    if ort.get("status") == "ok":
        onnx = "yes"
    elif onnx_ok:
        onnx = "exports (bf16: not run in ONNX Runtime)" if ort.get("status") == "skipped" else "exports, ORT fails"
    else:
        onnx = "no"
    export = steps.get("torch.export (dynamic prefix)", {})
    fp8 = "yes" if "float8" in export.get("detail", "").lower() else ("no: full-precision weights, fake-quantized at "
                                                                       "every call" if export else "-")
    vendor = steps.get("ModelOpt ONNX export (get_onnx_bytes_and_metadata)")
    if vendor is None:
        own = "none" if r["library"] == "torchao" else "-"
    elif vendor["status"] != "ok":
        own = "no"
    else:
        own = (f"TorchScript export, trt-domain Q/DQ; ONNX Runtime: {status('ONNX Runtime run of that file')}, "
               f"after renaming the domain: {status('ONNX Runtime run of the renamed file')}")
    bypassed = " (†)" if "quantize (hardware check bypassed)" in steps else ""
    return [r["candidate"] + bypassed, status("quantize"), SCALES[r["library"]],
            status("torch.export (dynamic prefix)"), fp8,
            onnx, status("Inductor (torch.compile, CPU)"), status("reload .pt2 without the library"),
            status("program weights to safetensors (the engines' weights file)"), own]


def render(results: list[dict], args, paths: dict[str, str], resolved: dict[str, str]) -> str:
    names = []  # every candidate's steps in their run order, merged
    for r in results:
        at = 0
        for s in r["steps"]:
            if s["name"] in names:
                at = names.index(s["name"]) + 1
            else:
                names.insert(at, s["name"])
                at += 1
    lines = ["# FP8 libraries against the export pipeline (CPU probe)", "",
             f"Machine: this {os.cpu_count()}-core CPU ({platform.machine()}, no GPU), Python "
             f"{platform.python_version()}, torch {torch.__version__}. Model: the bundled demo model's denoiser "
             f"(fused projections, lm_head unquantized), {args.samples} VQA test prompts, G = {args.gen_length}, "
             "first denoising step. Made by `python tools/fp8_libraries.py " + " ".join(sys.argv[1:]) + "` (its "
             "docstring gives the installs).", "",
             "| candidate | version | install (target dir) | `pip install` would pull | seconds |",
             "|---|---|---|---|---|"]
    for r in results:
        lib = r["library"]
        size = dir_mib(paths.get(lib)) if lib != "llada_fp8" else "-"
        lines.append(f"| {r['candidate']} | {r['version'] or '-'} | {size}"
                     f" | {resolved.get(lib, '-')} | {r.get('seconds', '-')} |")
    head = ["candidate", "quantizes on the CPU as documented", "activation scales", "torch.export",
            "FP8 weights in the program", "the ONNX writer's call + ONNX Runtime", "Inductor",
            ".pt2 loads without the library",
            "weights to safetensors", "the library's own ONNX path"]
    lines += ["", "## Summary", "", "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    lines += ["| " + " | ".join(summary(r)) + " |" for r in results]
    if any(s["name"] == "quantize (hardware check bypassed)" for r in results for s in r["steps"]):
        lines += ["", "(†) every step after `quantize` ran with torchao's hardware check "
                  "(`torchao.quantization.quant_api._check_hardware_support`) patched out, as an sm89+ GPU passes it."]
    lines += ["", "## Every step", "", "| step | " + " | ".join(r["candidate"] for r in results) + " |",
              "|---|" + "---|" * len(results)]
    for name in names:
        cells = []
        for r in results:
            s = next((s for s in r["steps"] if s["name"] == name), None)
            cells.append("" if s is None else f"**{s['status']}** {s['detail']}".replace("|", "/").strip())
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "top-1: argmax agreement of the response positions' logits; rel. logit error: the "
              "largest absolute logit error over the prompts relative to the largest logit. 'vs eager': the step's "
              "output against the same candidate's eager quantized forward (how exact the lowering is). "
              "seconds: the candidate's child process, Inductor's compile included. `pip install` would pull: "
              "pip's dry run into an empty environment (`--resolve`).", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    from llada_export.demo import DEMO_MODEL

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--torchao", help="directory torchao was installed into (pip --target); default: as importable")
    p.add_argument("--modelopt", help="directory nvidia-modelopt and its deps were installed into (pip --target)")
    p.add_argument("--candidates", default=",".join(CANDIDATES), help=f"comma list of {', '.join(CANDIDATES)}")
    p.add_argument("--model", default=str(DEMO_MODEL), help="checkpoint directory (default: the bundled demo model)")
    p.add_argument("--samples", type=int, default=4, help="VQA prompts measured (and ModelOpt's calibration prompts)")
    p.add_argument("--gen-length", type=int, default=16, help="response length G (default: 16)")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="skip the Inductor step (the slowest)")
    p.add_argument("--resolve", action="store_true", help="ask pip (dry run, registry access) what each library pulls")
    p.add_argument("--timeout", type=int, default=900, help="seconds per candidate (default: 900)")
    p.add_argument("--out", help="write the Markdown report here (default: print it)")
    p.add_argument("--json", help="also write the raw results here")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--json-out", help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        torch.manual_seed(0)
        try:
            probe = child(args.child, args)
        except Exception as e:  # a crash outside the steps: still a report
            traceback.print_exc()
            probe = Probe(args.child, *CANDIDATES[args.child], steps=[Step("setup", "failed", one_line(e))])
        for step in probe.steps:  # the temporary directory's name says nothing
            step.detail = step.detail.replace(f"{args.workdir}/", "")
        Path(args.json_out).write_text(json.dumps(asdict(probe), indent=1))
        return 0
    chosen = [c.strip() for c in args.candidates.split(",") if c.strip()]
    unknown = [c for c in chosen if c not in CANDIDATES]
    if unknown:
        p.error(f"--candidates: unknown {unknown}; choose from {', '.join(CANDIDATES)}")
    paths = {k: v for k, v in (("torchao", args.torchao), ("modelopt", args.modelopt)) if v}
    for lib, path in paths.items():
        if not Path(path).is_dir():
            p.error(f"--{lib} {path} is not a directory; install with pip --target (see --help)")
    with tempfile.TemporaryDirectory(prefix="fp8_libraries_") as work:
        results = []
        for c in chosen:
            print(f"probing {c} ...", file=sys.stderr, flush=True)
            results.append(run_child(c, args, paths, Path(work)))
    libs = {CANDIDATES[c][0] for c in chosen} - {"llada_fp8"}
    resolved = {lib: resolve(lib) for lib in sorted(libs)} if args.resolve else {}
    text = render(results, args, paths, resolved)
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "resolved": resolved}, indent=1))
    if args.out:
        Path(args.out).write_text(text)
        print(f"wrote {args.out}", file=sys.stderr)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
