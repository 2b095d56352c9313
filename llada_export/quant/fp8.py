"""FP8 (e4m3) linears: weights quantized once per output channel, activations quantized
dynamically per row (token) or per tensor at every call.

One custom op, ``llada_fp8::linear``, carries the whole quantized product through
``torch.export``, so each backend lowers it its own way:

- eager and Inductor (the op is CompositeImplicitAutograd, so ``torch.compile`` traces into it
  and fuses the activation quantization): ``torch._scaled_mm`` on CUDA sm89+ with bf16
  activations, else an exact emulation (the e4m3 values times their scales, then a matmul: the
  same numbers up to accumulation order; on the CPU, whose ``_scaled_mm`` does the same slower);
- ONNX (``ONNX_TRANSLATIONS`` for ``torch.onnx.export(custom_translation_table=...)``):
  FLOAT8E4M3FN weight initializers behind a ``DequantizeLinear`` per output channel
  (axis 0), and the activation as ``QuantizeLinear`` -> ``DequantizeLinear`` with the scale
  computed in the graph (``amax(|x|) / 448``), then ``MatMul``: the Q/DQ pattern of
  TensorRT's explicit-quantization FP8 path (whose FP8 GEMMs want per-tensor activation scales
  known at build time: a dynamic scale stays a Q/DQ pair TensorRT may not fuse).

Why not torchao or NVIDIA ModelOpt (tried on the CPU: ``tools/fp8_libraries.py``,
``benchmarks/fp8_libraries.md``): torchao 0.18's float8 inference (``quantize_`` with dynamic
per-row activations) refuses to quantize without an sm89+ GPU, so CPU-only CI could not test it;
with its check bypassed it exports and compiles, but its program holds ``aten._scaled_mm`` over
``Float8Tensor`` subclass weights, which ``torch.onnx.export`` cannot lower, the ``.pt2`` needs
torchao to load, and its weights do not go to safetensors. ModelOpt 0.47's ``FP8_DEFAULT_CFG``
runs on the CPU but simulates FP8 (full-precision weights, static calibrated per-tensor
activation scales, a ``tensorrt::quantize_op`` per call that neither ``torch.onnx.export`` nor a
fresh process without ModelOpt can resolve), and its own ONNX exporter works on an ``nn.Module``
with the TorchScript exporter (bypassing the FX pruning pass) and writes ``trt``-domain Q/DQ that
ONNX Runtime does not load. One custom op covers every backend: real e4m3 weights, standard
FLOAT8E4M3FN Q/DQ in ONNX, ``_scaled_mm`` on sm89+, exact CPU emulation that CI tests.

``quantize_linears`` swaps every ``nn.Linear`` of a module tree whose name matches no
``settings.skip`` pattern for an :class:`FP8Linear`, in place; the exporter applies it to a
structural copy of the model (``structural_copy``: the tensors of the other modules shared,
the caller's model untouched) after any fusion of its projections, so fused linears
(``qkv_proj``, ``gate_up_proj``) are quantized as they are traced.
"""

from __future__ import annotations

import copy
import fnmatch
from dataclasses import dataclass, field

import torch
from torch import nn

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0  # largest finite e4m3fn value
MIN_AMAX = 1e-12  # an all-zero row (padding) gets this amax: a finite scale, zeros stay zeros
ACTIVATIONS = ("row", "tensor")
# the vision tower, the projector and the head stay in the export dtype unless the patterns say otherwise
DEFAULT_SKIP = ("model.vision_tower.*", "model.mm_projector.*", "lm_head")


class FP8Error(ValueError):
    """A bad FP8 setting (activation granularity, skip patterns)."""


@dataclass(frozen=True)
class FP8Settings:
    activations: str = "row"  # dynamic activation scales: one per row (token) or one per tensor
    skip: tuple[str, ...] = DEFAULT_SKIP  # fnmatch patterns of module names that stay unquantized

    def validate(self) -> None:
        if self.activations not in ACTIVATIONS:
            raise FP8Error(f"--fp8-activations must be one of {', '.join(ACTIVATIONS)}, got {self.activations!r}")
        bad = [p for p in self.skip if not isinstance(p, str) or not p.strip()]
        if bad:
            raise FP8Error(f"--fp8-skip patterns must be non-empty module-name patterns, got {bad!r}")
        if not _skipped("lm_head", self.skip):  # the model reads its dtype and device from the head's weight
            raise FP8Error("--fp8-skip must keep lm_head (the head stays in --dtype); add lm_head to the patterns")


# ---------------------------------------------------------------------- the op
_LIB = torch.library.Library("llada_fp8", "DEF")
_LIB.define("linear(Tensor x, Tensor w8, Tensor w_scale, Tensor? bias, bool per_row) -> Tensor")


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] weight -> (e4m3 [N, K], fp32 scale [N]): one scale per output channel, amax -> 448."""
    scale = w.detach().float().abs().amax(dim=1).clamp(min=MIN_AMAX) / E4M3_MAX  # [N]
    return (w.detach().float() / scale[:, None]).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


def activation_scale(x2: torch.Tensor, per_row: bool) -> torch.Tensor:
    """[M, K] -> fp32 [M, 1] scales (per row, or the tensor's one scale repeated)."""
    a = x2.float().abs()
    amax = a.amax(dim=1, keepdim=True) if per_row else a.amax().reshape(1, 1).expand(x2.shape[0], 1).contiguous()  # [M, 1]: _scaled_mm's row-wise form
    return amax.clamp(min=MIN_AMAX) / E4M3_MAX


def _cpu_scaled_mm() -> bool:
    """Whether this torch's CPU ``_scaled_mm`` takes e4m3 operands with row-wise fp32 scales (probed
    once at import, on real tensors: never under a tracer's fake tensors)."""
    try:
        a = torch.ones(16, 16, dtype=E4M3)
        s = torch.ones(16, 1)
        return bool(torch._scaled_mm(a, a.t(), s, s.t(), out_dtype=torch.float32)[0, 0] == 16)
    except (RuntimeError, NotImplementedError, TypeError):
        return False


CPU_SCALED_MM = _cpu_scaled_mm()


def uses_scaled_mm(device: torch.device, dtype: torch.dtype, k: int, n: int) -> bool:
    """Whether the op runs ``torch._scaled_mm`` for these operands, else the exact emulation. CUDA:
    row-wise scaled GEMMs need sm89+, bf16 output and dims in multiples of 16. The CPU has no FP8
    units: its ``_scaled_mm`` (where this torch has one, ``CPU_SCALED_MM``) upcasts and gives the
    emulation's numbers 3x slower (measured, torch 2.13), so the CPU emulates."""
    if device.type == "cuda":
        return (dtype == torch.bfloat16 and k % 16 == 0 and n % 16 == 0
                and torch.cuda.get_device_capability(device) >= (8, 9))
    return False


def _linear(x: torch.Tensor, w8: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
            per_row: bool) -> torch.Tensor:
    k, n = x.shape[-1], w8.shape[0]
    x2 = x.reshape(-1, k)  # [M, K]
    s = activation_scale(x2, per_row)  # [M, 1]
    x8 = (x2.float() / s).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)  # [M, K]
    if uses_scaled_mm(x.device, x.dtype, k, n):
        y = torch._scaled_mm(x8, w8.t(), scale_a=s, scale_b=w_scale.reshape(1, n), out_dtype=x.dtype)  # [M, N]
    else:
        y = (x8.to(x.dtype) * s.to(x.dtype)) @ (w8.to(x.dtype) * w_scale.to(x.dtype)[:, None]).t()  # [M, N]
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], n)  # [..., N]


_LIB.impl("linear", _linear, "CompositeImplicitAutograd")


def emulated_linear(x: torch.Tensor, w8: torch.Tensor, w_scale: torch.Tensor, per_row: bool) -> torch.Tensor:
    """The FP8 product computed in fp64 from the same e4m3 values (a test's reference)."""
    x2 = x.reshape(-1, x.shape[-1]).double()  # [M, K]
    s = activation_scale(x2, per_row).double()  # [M, 1]
    x8 = (x2 / s).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3).double() * s
    return (x8 @ (w8.double() * w_scale.double()[:, None]).t()).reshape(*x.shape[:-1], -1)


class FP8Linear(nn.Module):
    """``nn.Linear`` with e4m3 weights and per-output-channel scales; dynamic e4m3 activations."""

    def __init__(self, linear: nn.Linear, per_row: bool):
        super().__init__()
        w8, scale = quantize_weight(linear.weight)
        self.register_buffer("weight_fp8", w8)  # [N, K] e4m3
        self.register_buffer("weight_scale", scale)  # [N] fp32
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach())
        self.per_row = per_row
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.llada_fp8.linear(x, self.weight_fp8, self.weight_scale, self.bias, self.per_row)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, activations={'row' if self.per_row else 'tensor'}"


# ---------------------------------------------------------------------- the model transform
@dataclass
class FP8Record:
    """What ``quantized_copy`` did, for the manifest."""

    settings: FP8Settings
    quantized: list[str] = field(default_factory=list)  # module names now FP8Linear
    skipped: list[str] = field(default_factory=list)  # nn.Linear names a skip pattern kept
    modules: dict[str, FP8Linear] = field(default_factory=dict, repr=False)  # name -> the FP8Linear

    def tensors(self) -> dict[str, torch.Tensor]:
        """The e4m3 weights and their scales by ``<linear name>.weight_fp8`` / ``.weight_scale``."""
        return {f"{n}.{k}": t for n, m in self.modules.items() for k, t in
                (("weight_fp8", m.weight_fp8), ("weight_scale", m.weight_scale))}

    def to_dict(self) -> dict:
        return {"weights": "fp8", "format": "float8_e4m3fn", "weight_scales": "per_output_channel",
                "activations": self.settings.activations, "activation_scales": "dynamic",
                "skip_patterns": list(self.settings.skip), "skipped": self.skipped,
                "quantized": len(self.quantized)}


def _skipped(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name, p + ".*") for p in patterns)


def structural_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s module structure sharing every parameter and buffer (no tensor copied)."""
    memo = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return copy.deepcopy(model, memo)


def quantize_linears(root: nn.Module, record: FP8Record, name_of=lambda n: n, exclude=lambda n: False,
                     memo: dict | None = None) -> FP8Record:
    """Replace, IN PLACE, every ``nn.Linear`` under ``root`` whose name (``name_of`` maps it to the
    model's naming) matches no skip pattern of ``record.settings`` by an :class:`FP8Linear`; names
    ``exclude`` accepts are left alone and unrecorded. ``memo`` (id of a linear -> its FP8Linear)
    gives a linear shared by two trees one quantized copy."""
    memo = {} if memo is None else memo
    per_row = record.settings.activations == "row"
    for name, lin in [(n, m) for n, m in root.named_modules() if type(m) is nn.Linear]:
        full = name_of(name)
        if exclude(full):
            continue
        if _skipped(full, record.settings.skip):
            record.skipped.append(full)
            continue
        if id(lin) not in memo:
            memo[id(lin)] = FP8Linear(lin, per_row)
        parent, _, attr = name.rpartition(".")
        setattr(root.get_submodule(parent) if parent else root, attr, memo[id(lin)])
        record.quantized.append(full)
        record.modules[full] = memo[id(lin)]
    return record


def check_record(record: FP8Record) -> FP8Record:
    if not record.quantized:
        raise FP8Error(f"--fp8-skip {' '.join(record.settings.skip)} leaves no linear layer to quantize; "
                       "narrow the patterns")
    return record


def quantized_copy(model: nn.Module, settings: FP8Settings) -> tuple[nn.Module, FP8Record]:
    """A copy of ``model`` whose ``nn.Linear`` modules are :class:`FP8Linear` unless a skip pattern
    matches their name; the copy shares every other tensor, ``model`` is left as it was."""
    settings.validate()
    out = structural_copy(model)
    return out, check_record(quantize_linears(out, FP8Record(settings)))


# ---------------------------------------------------------------------- ONNX
def _onnx_linear(x, w8, w_scale, bias, per_row: bool):
    """ONNX lowering of ``llada_fp8::linear``: DQ(w, axis 0), Q/DQ(x) with in-graph scales, MatMul."""
    import onnx
    from onnxscript import opset19 as op

    wd = op.DequantizeLinear(w8, op.CastLike(w_scale, x), axis=0)  # [N, K] in x's dtype
    x2 = op.Reshape(x, op.Concat(op.Constant(value_ints=[-1]), op.Shape(x, start=-1), axis=0))  # [M, K]
    a = op.Abs(op.Cast(x2, to=onnx.TensorProto.FLOAT))
    amax = op.ReduceMax(a, op.Constant(value_ints=[1]), keepdims=0) if per_row else op.ReduceMax(a, keepdims=0)
    s = op.CastLike(op.Div(op.Max(amax, op.Constant(value_float=MIN_AMAX)), op.Constant(value_float=E4M3_MAX)), x)
    zero = op.Constant(value_float=0.0)
    if per_row:  # [M]: per-axis zero points match the scales; expanded before the cast (Expand takes no float8)
        zero = op.Expand(zero, op.Shape(s))
    zp = op.Cast(zero, to=onnx.TensorProto.FLOAT8E4M3FN)
    xd = op.DequantizeLinear(op.QuantizeLinear(x2, s, zp, axis=0), s, zp, axis=0)  # [M, K]
    y = op.MatMul(xd, op.Transpose(wd, perm=[1, 0]))  # [M, N]
    if bias is not None:
        y = op.Add(y, bias)
    lead = op.Slice(op.Shape(x), op.Constant(value_ints=[0]), op.Constant(value_ints=[-1]))
    return op.Reshape(y, op.Concat(lead, op.Shape(w8, start=0, end=1), axis=0))  # [..., N]


ONNX_TRANSLATIONS = {torch.ops.llada_fp8.linear.default: _onnx_linear}
