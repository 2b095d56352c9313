"""Attention over a padded bucket without a mask: the cached step's kernel.

A bucket's rows hold padding slots (text padding, unused visual slots, the static top-k's dead
slots, response slots past ``gen_length``) that must receive no attention. A boolean key mask
says so, but the fastest kernel for 128 queries over the cached prefix (flash attention) takes no
mask: on an H100 the masked cuDNN kernel takes 1.50 ms of a 7.8 ms cached step where flash attention
without a mask takes 0.86 ms (``benchmarks/bench_gpu_step.md``).

So the torch backends keep K = V = 0 in every masked slot of the KV cache (the prefill writes
zeros there, the cached step zeroes the masked response slots it writes) and run flash attention
over all slots. A zero key scores exactly 0 against any query, and a zero value adds nothing, so
for each query row the kernel's output and log-sum-exp are those of the real keys with
``n_pad`` extra terms ``exp(0) = 1`` in the softmax's denominator:

    lse  = log(S + n_pad)           S = sum over the real keys of exp(score)
    out  = N / (S + n_pad)          N = sum over the real keys of exp(score) * v

The masked attention's output is ``N / S = out / (1 - n_pad * exp(-lse))``: one rescale per
query row and head, from the kernel's own log-sum-exp (fp32). It is exact in real arithmetic; in
floating point the rescale's factor loses accuracy only when the real keys' share of the softmax
mass ``S / (S + n_pad)`` is tiny (every real score far below 0 while the pads score 0), where its
relative error is about fp32's epsilon over that share.
"""

from __future__ import annotations

import torch


def zero_padding(t: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
    """t [B, n, L, hd] with its masked slots (key_mask [B, L] False) set to 0."""
    return torch.where(key_mask[:, None, :, None], t, torch.zeros((), dtype=t.dtype, device=t.device))


def supported(q: torch.Tensor) -> bool:
    """Whether :func:`attend_zero_padded` has a kernel for q: flash attention on CUDA takes fp16 and bf16
    (head dim a multiple of 8 up to 256, SM 8.0 or newer); the CPU's flash kernel every float dtype."""
    if q.device.type == "cpu":
        return True
    if q.device.type != "cuda" or q.dtype not in (torch.float16, torch.bfloat16):
        return False
    if q.shape[-1] > 256 or q.shape[-1] % 8:
        return False
    return torch.cuda.get_device_capability(q.device) >= (8, 0)


@torch.library.custom_op("llada::attention_lse", mutates_args=())
def attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unmasked softmax attention of q [B, H, Lq, hd] over k, v [B, H, Lk, hd] by the flash kernel, with its
    log-sum-exp: (out [B, Lq, H, hd] contiguous, lse [B, H, Lq] fp32, natural log). An op of our own around
    aten's flash op: that one also returns its random-number state as a uint64 tensor, which
    ``torch.export``'s serializer cannot write, and its output's strides follow the inputs' (here fixed)."""
    if q.device.type == "cuda":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False)[:2]
    else:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False)
    return out.transpose(1, 2).contiguous(), lse.float().contiguous()  # a copy only where out is not [B, Lq, H, hd]


@attention_lse.register_fake
def _(q, k, v):
    b, h, lq, hd = q.shape
    return q.new_empty(b, lq, h, v.shape[-1]), q.new_empty(b, h, lq, dtype=torch.float32)


def attend_zero_padded(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_pad: torch.Tensor) -> torch.Tensor:
    """Bidirectional softmax attention of q [B, H, Lq, hd] over k, v [B, H, Lk, hd] whose masked slots hold
    zeros, ``n_pad`` [B] of them per row: what ``scaled_dot_product_attention`` with the key mask returns,
    computed by a kernel that takes no mask (module docstring). -> [B, Lq, H, hd] in q's dtype (the layout
    o_proj reads)."""
    out, lse = attention_lse(q, k, v)  # [B, Lq, H, hd], [B, H, Lq] fp32
    return rescale(out, lse, n_pad, q.dtype)


def rescale(out: torch.Tensor, lse: torch.Tensor, n_pad: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An unmasked kernel's out [B, Lq, H, hd] and natural-log lse [B, H, Lq] over keys whose ``n_pad`` [B]
    masked slots hold zeros -> the masked attention's output [B, Lq, H, hd] in ``dtype`` (module docstring)."""
    # S / (S + n_pad), [B, H, Lq]. With a pad, S + n_pad >= 1 and lse >= 0, so the clamp changes nothing; without
    # one it keeps exp(-lse) finite where every score is far below 0 (0 * inf would be NaN)
    real_share = 1.0 - n_pad.to(lse.dtype)[:, None, None] * torch.exp(-lse.clamp_min(0.0))
    # a row of padding only (a batch's idle row) has out = 0 and a share of 0: the floor keeps it 0, not NaN
    scale = 1.0 / real_share.clamp_min(torch.finfo(torch.float32).eps)
    return (out.float() * scale.transpose(1, 2)[..., None]).to(dtype)  # [B, Lq, H, hd]
