"""The eager oracles: the unpruned LLaDA-V model and the LLaDA-FastV pruned model.

Plain PyTorch, readable first. Exported graphs and engines are tested against these.

- :class:`ReferenceDenoiser`: every step runs every layer on the full sequence
  (what the official implementation does).
- :class:`PrunedReferenceDenoiser`: step 1 runs layers < K on the full sequence,
  scores the visual tokens from layer K's explicit attention probabilities, keeps
  ``k = round(keep * n_visual)`` of them (ascending, original position ids) and runs
  layers >= K on the reduced sequence; every later step runs all layers on the
  reduced sequence.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .graphs.anyres import assemble, preprocess
from .graphs.llava import LLaDAV
from .graphs.llada import attention_mask
from .graphs.pruning import SCORE_SOURCES, gather_seq, num_kept, prune_indices
from .runtime.sampler import GenerationConfig, SamplerTrace, generate
from .tokenizer import DEFAULT_SYSTEM_PROMPT, SpecialTokens, encode_prompt


@dataclass
class PromptInputs:
    """A request's prefix: [text before <image> | visual tokens | text after]."""

    embeds: torch.Tensor  # [1, P, D]
    visual_mask: torch.Tensor  # [1, P] bool
    ids_before: list[int]
    ids_after: list[int]
    n_visual: int

    @property
    def length(self) -> int:
        return self.embeds.shape[1]


@torch.no_grad()
def visual_embeddings(model: LLaDAV, image) -> torch.Tensor:
    """Image -> anyres visual embeddings [n_visual, D] (vision tower, projector, assembly)."""
    pixels, size = preprocess(image, model.config)  # [N, 3, S, S]
    feats = model.encode_images(pixels.to(model.lm_head.weight.device))  # [N, T, D]
    return assemble(feats, size, model.config, model.model.image_newline)  # [n_visual, D]


@torch.no_grad()
def build_prompt(model: LLaDAV, tokenizer, image, prompt: str, system: str = DEFAULT_SYSTEM_PROMPT) -> PromptInputs:
    before, after = encode_prompt(tokenizer, prompt, has_image=image is not None, system=system)
    dev = model.lm_head.weight.device
    parts = [model.embed(torch.tensor(before, dtype=torch.long, device=dev))]  # [n0, D]
    n_vis = 0
    if image is not None:
        vis = visual_embeddings(model, image).to(model.dtype)  # [n_visual, D]
        n_vis = vis.shape[0]
        parts.append(vis)
    parts.append(model.embed(torch.tensor(after, dtype=torch.long, device=dev)))  # [n1, D]
    embeds = torch.cat(parts)[None]  # [1, P, D]
    vmask = torch.zeros(1, embeds.shape[1], dtype=torch.bool, device=dev)
    vmask[0, len(before): len(before) + n_vis] = True
    return PromptInputs(embeds, vmask, before, after, n_vis)


class ReferenceDenoiser:
    """Unpruned: the full sequence through every layer at every step."""

    def __init__(self, model: LLaDAV, prompt: PromptInputs, mask_id: int):
        self.model, self.prompt = model, prompt
        self.mask_embed = model.embed(torch.tensor([mask_id], device=prompt.embeds.device))  # [1, D]

    @torch.no_grad()
    def __call__(self, response_ids: torch.Tensor, *, uncond: bool = False) -> torch.Tensor:
        prefix = self.prompt.embeds
        if uncond:
            prefix = self.mask_embed.expand_as(prefix[0])[None]
        pos = torch.arange(prefix.shape[1] + response_ids.shape[0], device=prefix.device)[None]  # [1, L]
        return self.model.denoise(prefix, response_ids[None], pos)[0]  # [G, V]


@dataclass
class PruneSettings:
    layer: int
    keep: float
    score_from: str = "response"

    def validate(self, n_layers: int) -> "PruneSettings":
        if not 0 <= self.layer < n_layers:
            raise ValueError(f"prune layer {self.layer} is out of range: the model has layers 0..{n_layers - 1}")
        if not 0.0 < self.keep <= 1.0:
            raise ValueError(f"keep must be in (0, 1], got {self.keep}")
        if self.score_from not in SCORE_SOURCES:
            raise ValueError(f"score source must be one of {SCORE_SOURCES}, got {self.score_from!r}")
        return self


@torch.no_grad()
def pruned_forward(
    model: LLaDAV,
    prefix_embeds: torch.Tensor,  # [1, P, D]
    response_ids: torch.Tensor,  # [1, G]
    position_ids: torch.Tensor,  # [1, L]
    key_mask: torch.Tensor,  # [1, L] bool
    visual_mask: torch.Tensor,  # [1, L] bool
    num_keep: torch.Tensor,  # [1] int64
    settings: PruneSettings,
    k_static: int,
    mask_id: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """First denoising step with pruning at layer K: (logits [1, G, V], index [1, L'], alive [1, L'])."""
    g = response_ids.shape[1]
    lm = model.language
    layers = lm.layers
    x = torch.cat([prefix_embeds.to(lm.dtype), lm.embed_tokens(response_ids)], dim=1)  # [1, L, D]
    cos, sin = lm.rotary(position_ids)  # [1, L, hd]
    for layer in layers[: settings.layer]:
        x = layer(x, cos, sin, attention_mask(key_mask))
    lk = layers[settings.layer]
    q, k = lk.self_attn.query_key(lk.input_layernorm(x), cos, sin)  # [1, H, L, hd]
    index, alive = prune_indices(
        q, k, key_mask, visual_mask, num_keep, response_ids, position_ids,
        n_visual_slots=int(visual_mask.sum(1).max()), k_static=k_static,
        source=settings.score_from, mask_id=mask_id,
    )  # [1, L'], [1, L']
    x, cos, sin = gather_seq(x, index), gather_seq(cos, index), gather_seq(sin, index)  # [1, L', *]
    for layer in layers[settings.layer:]:
        x = layer(x, cos, sin, attention_mask(alive))
    return lm.head(x[:, -g:]), index, alive


class PrunedReferenceDenoiser:
    """LLaDA-FastV: prune once in step 1 at layer K, keep the reduced sequence after."""

    def __init__(self, model: LLaDAV, prompt: PromptInputs, settings: PruneSettings, mask_id: int):
        self.model, self.prompt, self.mask_id = model, prompt, mask_id
        self.settings = settings.validate(len(model.model.layers))
        self.k = num_kept(settings.keep, prompt.n_visual) if prompt.n_visual else 0
        self.mask_embed = model.embed(torch.tensor([mask_id], device=prompt.embeds.device))  # [1, D]
        self.kept: torch.Tensor | None = None  # [L'] original positions of the reduced sequence

    @property
    def kept_visual(self) -> torch.Tensor:
        """Kept visual positions (ascending, in prefix coordinates)."""
        assert self.kept is not None, "call the denoiser once first"
        kept = self.kept[self.kept < self.prompt.length]
        return kept[self.prompt.visual_mask[0, kept]]

    @torch.no_grad()
    def __call__(self, response_ids: torch.Tensor, *, uncond: bool = False) -> torch.Tensor:
        p, g, dev = self.prompt.length, response_ids.shape[0], self.prompt.embeds.device
        if self.kept is None:
            if uncond:
                raise RuntimeError("the conditional forward of step 1 decides the pruning; call it first")
            pos = torch.arange(p + g, device=dev)[None]  # [1, L]
            if self.prompt.n_visual == 0:
                self.kept = pos[0]
                return self.model.denoise(self.prompt.embeds, response_ids[None], pos)[0]
            vmask = torch.cat([self.prompt.visual_mask, torch.zeros(1, g, dtype=torch.bool, device=dev)], dim=1)
            logits, index, _ = pruned_forward(
                self.model, self.prompt.embeds, response_ids[None], pos, torch.ones_like(vmask), vmask,
                torch.tensor([self.k], device=dev), self.settings, self.k, self.mask_id)
            self.kept = index[0]
            return logits[0]
        prefix = gather_seq(self.prompt.embeds, self.kept[None, : len(self.kept) - g])  # [1, P', D]
        if uncond:
            prefix = self.mask_embed.expand_as(prefix[0])[None]
        return self.model.denoise(prefix, response_ids[None], self.kept[None])[0]  # positions = original ids


@dataclass
class ReferenceResult:
    ids: list[int]
    text: str
    kept_visual: list[int] | None = None
    trace: SamplerTrace = field(default_factory=SamplerTrace)


@torch.no_grad()
def reference_generate(
    model: LLaDAV,
    tokenizer,
    image,
    prompt: str,
    gen: GenerationConfig,
    prune: PruneSettings | None = None,
    seed: int = 0,
    system: str = DEFAULT_SYSTEM_PROMPT,
) -> ReferenceResult:
    """Generate an answer with the eager model, unpruned or LLaDA-FastV-pruned."""
    gen.validate()
    sp = SpecialTokens.from_tokenizer(tokenizer)
    inputs = build_prompt(model, tokenizer, image, prompt, system)
    if prune is None:
        den = ReferenceDenoiser(model, inputs, sp.mask)
    else:
        den = PrunedReferenceDenoiser(model, inputs, prune, sp.mask)
    trace = SamplerTrace()
    dev = model.lm_head.weight.device
    ids = generate(den, gen, mask_id=sp.mask, eot_id=sp.eot, suppress_ids=sp.suppressed(),
                   generator=torch.Generator(device=dev).manual_seed(seed), trace=trace, device=dev)
    kept = den.kept_visual.tolist() if prune is not None and den.kept is not None else None
    return ReferenceResult(ids.tolist(), tokenizer.decode(ids.tolist(), skip_special_tokens=True), kept, trace)
