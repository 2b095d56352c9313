"""The official LLaDA-V sampler (masked-diffusion denoising with low-confidence remasking).

Reproduces ``generate_with_embeds`` of the official code on the response region:
blocks of ``block_length``, ``steps // n_blocks`` steps per block, a fixed number of
positions committed per step (remainder to the first steps), EOS / BOS / header ids
set to -inf at masked positions (``<|eot_id|>`` is not suppressed), temperature 0 ->
argmax, else Gumbel-max in float64, confidence = float64 softmax probability of the
chosen token (``low_confidence``) or uniform noise (``random``), positions past the
current block excluded, optional classifier-free guidance. With ``stop_at_eot`` (the
official demo and evaluation pass ``stopping_criteria=['<|eot_id|>']``) the first
committed ``<|eot_id|>`` becomes a stop position: later positions no longer compete,
the block ends once everything before it is committed, and later blocks are skipped.
The answer is cut at the first ``<|eot_id|>``.

The model is reached through a :class:`Denoiser`: anything that maps the current
response ids [G] to logits [G, V]; the prompt (and, for pruned engines, which visual
tokens survive) is the denoiser's own state. So the same sampler drives the eager
reference, the eager pruned reference and the exported engines.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Protocol

import torch


@dataclass(frozen=True)
class GenerationConfig:
    gen_length: int = 128
    block_length: int = 128
    steps: int = 128
    temperature: float = 0.0
    remasking: str = "low_confidence"
    cfg_scale: float = 0.0
    stop_at_eot: bool = True

    def validate(self) -> "GenerationConfig":
        if self.gen_length <= 0 or self.block_length <= 0 or self.steps <= 0:
            raise ValueError("gen_length, block_length and steps must be positive")
        if self.gen_length % self.block_length:
            raise ValueError(
                f"gen_length {self.gen_length} is not a multiple of block_length {self.block_length}")
        n_blocks = self.gen_length // self.block_length
        if self.steps % n_blocks:
            raise ValueError(
                f"steps {self.steps} is not divisible by the number of blocks {n_blocks} "
                f"(gen_length {self.gen_length} / block_length {self.block_length})")
        if self.steps // n_blocks > self.block_length:
            raise ValueError(f"{self.steps // n_blocks} steps per block exceed block_length {self.block_length}")
        if self.remasking not in ("low_confidence", "random"):
            raise ValueError(f"remasking must be 'low_confidence' or 'random', got {self.remasking!r}")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        return self


# Official presets (gen_length, block_length, steps).
PRESETS: dict[str, GenerationConfig] = {
    "mc": GenerationConfig(2, 2, 2),
    "chartqa": GenerationConfig(16, 16, 16),
    "docvqa": GenerationConfig(32, 32, 16),
    "mathvista": GenerationConfig(96, 96, 48),
    "mathverse": GenerationConfig(64, 64, 32),
    "demo": GenerationConfig(128, 128, 128),
}


def preset(name: str, **overrides) -> GenerationConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return replace(PRESETS[name], **{k: v for k, v in overrides.items() if v is not None}).validate()


class Denoiser(Protocol):
    """``__call__``: response_ids [G] int64 -> logits [G, V] (fp32); ``uncond``: prompt fully
    masked (CFG). A denoiser with ``fused = True`` (engines built with the sampler's greedy
    step inside) offers ``predict(response_ids) -> (x0 [G], confidence [G])`` instead."""

    def __call__(self, response_ids: torch.Tensor, *, uncond: bool = False) -> torch.Tensor: ...


@dataclass
class SamplerTrace:
    """What happened, for tests and timings: forward calls made and tokens committed per step."""

    forwards: int = 0
    committed: list[list[int]] = field(default_factory=list)


def transfer_schedule(n_masked: int, steps: int) -> list[int]:
    """Tokens committed at each step of a block: even split, remainder to the first steps."""
    base, rem = divmod(n_masked, steps)
    return [base + (1 if i < rem else 0) for i in range(steps)]


def add_gumbel_noise(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    """Gumbel-max in float64 as the official code: exp(logits) / (-log u)^temperature."""
    if temperature == 0:
        return logits
    logits = logits.to(torch.float64)
    noise = torch.rand(logits.shape, dtype=torch.float64, generator=generator, device=logits.device)
    return logits.exp() / (-torch.log(noise)) ** temperature


def generate(
    denoiser: Denoiser,
    gen: GenerationConfig,
    *,
    mask_id: int,
    eot_id: int,
    suppress_ids: list[int],
    generator: torch.Generator | None = None,
    trace: SamplerTrace | None = None,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Run the sampler on ``device`` (where the denoiser's logits live; a ``generator`` for
    sampling must be on it too); returns the answer ids (cut at the first ``<|eot_id|>``),
    int64 [n] on the CPU."""
    gen.validate()
    g, bl = gen.gen_length, gen.block_length
    n_blocks = g // bl
    steps = gen.steps // n_blocks
    x = torch.full((g,), mask_id, dtype=torch.long, device=device)  # response ids [G]
    suppress = torch.tensor(suppress_ids, dtype=torch.long, device=device)
    stop: int | None = None  # index of the first committed eot (stop_at_eot)
    greedy = gen.temperature == 0 and gen.remasking == "low_confidence" and gen.cfg_scale == 0
    fused = denoiser.predict if greedy and getattr(denoiser, "fused", False) else None
    if not greedy and getattr(denoiser, "fused", False):
        raise ValueError("these engines were built with --fuse-sampler (argmax and confidence inside the graph): "
                         "they serve temperature 0, low_confidence remasking and no CFG only; re-export without "
                         "--fuse-sampler for other settings")

    for b in range(n_blocks):
        start, end = b * bl, (b + 1) * bl
        if stop is not None and stop <= start:
            break
        schedule = transfer_schedule(int((x[start:end] == mask_id).sum()), steps)
        for i in range(steps):
            mask = x == mask_id  # [G]
            if stop is not None and not mask[:stop].any():
                break
            if not mask[start:end].any():
                break
            if fused is not None:
                x0, x0_p = fused(x.clone())  # argmax + its probability computed in the graph
                x0, x0_p = x0.to(x.device), x0_p.to(x.device, torch.float64)
                if trace is not None:
                    trace.forwards += 1
            else:
                x0, x0_p = _predict(denoiser, x, mask, suppress, gen, generator, trace)
            x0_p[(stop if stop is not None else end):] = float("-inf")
            x0 = torch.where(mask, x0, x)
            confidence = torch.where(mask, x0_p, torch.full_like(x0_p, float("-inf")))
            chosen = torch.topk(confidence, k=schedule[i]).indices
            x[chosen] = x0[chosen]
            if trace is not None:
                trace.committed.append(sorted(chosen.tolist()))
            if gen.stop_at_eot:
                eots = (x == eot_id).nonzero().flatten()
                if len(eots):
                    stop = int(eots[0]) if stop is None else min(stop, int(eots[0]))
    return cut_at_eot(x.cpu(), eot_id)


def _predict(denoiser, x, mask, suppress, gen, generator, trace) -> tuple[torch.Tensor, torch.Tensor]:
    """One step from logits: (x0 [G], confidence [G] float64), as the official sampler."""
    logits = denoiser(x.clone()).float()  # [G, V]
    if gen.cfg_scale > 0:
        un = denoiser(x.clone(), uncond=True).float()
        logits = un + (gen.cfg_scale + 1) * (logits - un)
    if trace is not None:
        trace.forwards += 1 + (gen.cfg_scale > 0)
    sup = logits[:, suppress]  # [G, S]
    logits[:, suppress] = torch.where(mask[:, None], torch.full_like(sup, float("-inf")), sup)
    x0 = add_gumbel_noise(logits, gen.temperature, generator).argmax(dim=-1)  # [G]
    if gen.remasking == "low_confidence":
        p = torch.softmax(logits.to(torch.float64), dim=-1)  # [G, V]
        return x0, p.gather(-1, x0[:, None]).squeeze(-1)
    return x0, torch.rand(x0.shape[0], dtype=torch.float64, generator=generator, device=x0.device)


def fused_prediction(logits: torch.Tensor, response_ids: torch.Tensor, suppress_ids: list[int],
                     mask_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The greedy step inside a graph: logits [B, G, V] -> (x0 [B, G] int64, confidence [B, G] fp32).

    Suppressed ids are -inf at masked positions, as in the sampler; the confidence is the
    softmax probability of the argmax, exp(max - logsumexp), computed in fp32 (the eager
    sampler uses float64, so a near-tie can in rare cases commit positions in another order).
    """
    masked = (response_ids == mask_id)[..., None]  # [B, G, 1]
    sup = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
    sup[suppress_ids] = True
    logits = torch.where(masked & sup, torch.full_like(logits, float("-inf")), logits)  # [B, G, V]
    best = logits.max(dim=-1)  # values/indices [B, G]
    conf = torch.exp(best.values - torch.logsumexp(logits, dim=-1))  # [B, G]
    return best.indices, conf


def cut_at_eot(ids: torch.Tensor, eot_id: int) -> torch.Tensor:
    hits = (ids == eot_id).nonzero().flatten()
    return ids[: int(hits[0])] if len(hits) else ids
