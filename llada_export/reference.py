"""The eager oracles: the LLaDA-V model unpruned, LLaDA-FastV-pruned, and with the prefix KV cache.

Plain PyTorch, readable first. Exported graphs and engines are tested against these.

- :class:`ReferenceDenoiser` drives the sampler on one unpadded request:
  - unpruned: every step runs every layer on the full sequence (what the official code does);
  - pruned (``prune=PruneSettings(K, keep)``): step 1 runs layers < K on the full sequence,
    scores the visual tokens from layer K's explicit attention probabilities, keeps
    ``k = round(keep * n_visual)`` of them (ascending, original position ids) and runs layers
    >= K on the reduced sequence; every later step runs all layers on the reduced sequence;
  - cached (``cache=True``, the Fast-dLLM prefix cache as the official LLaDA-V hook): a refresh
    runs the whole (reduced) sequence and keeps every layer's K/V; between refreshes only the
    response rows run, the current block and after with fresh K/V, the prefix and earlier
    blocks from the cache. With pruning, step 1 is the pruning step and the cache is filled
    at step 2 (it holds the reduced prefix only).
- ``oracle_*``: each graph of the graph set computed eagerly from the same feeds (padded
  bucket inputs), what ``llada-compare`` and the export tests compare the engines with.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .contract.layout import RequestParts
from .contract.pruning import PruneSettings, num_kept
from .contract.tokens import SpecialTokens
from .graphs.anyres import assemble, preprocess
from .graphs.llada import attention_mask
from .graphs.llava import LLaDAV
from .graphs.pruning import gather_seq, prune_indices
from .sampler import GenerationConfig, SamplerTrace, StepInfo, fused_prediction, generate
from .tokenizer import DEFAULT_SYSTEM_PROMPT, TokenizerError, decode_answer, encode_prompt, special_tokens


@dataclass
class PromptInputs:
    """A request's prefix, unpadded: [text before <image> | visual tokens | text after]."""

    embeds: torch.Tensor  # [1, P, D]
    visual_mask: torch.Tensor  # [1, P] bool
    ids_before: list[int]
    ids_after: list[int]
    n_visual: int

    @property
    def length(self) -> int:
        return self.embeds.shape[1]

    def parts(self) -> RequestParts:
        """The pieces :func:`~llada_export.contract.layout.layout_bucket` places in a bucket."""
        e, nb = self.embeds[0], len(self.ids_before)
        return RequestParts(e[:nb], e[nb: nb + self.n_visual], e[nb + self.n_visual:])


@torch.no_grad()
def visual_embeddings(model: LLaDAV, image) -> torch.Tensor:
    """Image -> anyres visual embeddings [n_visual, D] (vision tower, projector, assembly)."""
    pixels, size = preprocess(image, model.config)  # [N, 3, S, S]
    feats = model.encode_images(pixels.to(model.lm_head.weight.device))  # [N, T, D]
    return assemble(feats, size, model.config, model.model.image_newline)  # [n_visual, D]


@torch.no_grad()
def embed_prompt(model: LLaDAV, tokenizer, image, prompt: str, system: str = DEFAULT_SYSTEM_PROMPT) -> PromptInputs:
    """Chat template + tokenizer + splicing: the request's prefix embeddings (unpadded)."""
    if tokenizer is None:
        raise TokenizerError("encoding a text prompt needs the tokenizer; the checkpoint has no tokenizer files")
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


@torch.no_grad()
def pruned_forward(
    model: LLaDAV,
    prefix_embeds: torch.Tensor,  # [B, P, D]
    response_ids: torch.Tensor,  # [B, G]
    position_ids: torch.Tensor,  # [B, L]
    key_mask: torch.Tensor,  # [B, L] bool
    visual_mask: torch.Tensor,  # [B, L] bool
    num_keep: torch.Tensor,  # [B] int64
    settings: PruneSettings,
    k_static: int,
    mask_id: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """First denoising step with pruning at layer K: (logits [B, G, V], index [B, L'], alive [B, L'])."""
    g = response_ids.shape[1]
    lm = model.language
    layers = lm.layers
    x = torch.cat([prefix_embeds.to(lm.dtype), lm.embed_tokens(response_ids)], dim=1)  # [B, L, D]
    cos, sin = lm.rotary(position_ids)  # [B, L, hd]
    for layer in layers[: settings.layer]:
        x = layer(x, cos, sin, attention_mask(key_mask))
    lk = layers[settings.layer]
    q, k = lk.self_attn.query_key(lk.input_layernorm(x), cos, sin)  # [B, H, L, hd]
    index, alive = prune_indices(
        q, k, key_mask, visual_mask, num_keep, response_ids, position_ids,
        n_visual_slots=int(visual_mask.sum(1).max()), k_static=k_static,
        source=settings.score_from, mask_id=mask_id,
    )  # [B, L'], [B, L']
    x, cos, sin = gather_seq(x, index), gather_seq(cos, index), gather_seq(sin, index)  # [B, L', *]
    for layer in layers[settings.layer:]:
        x = layer(x, cos, sin, attention_mask(alive))
    return lm.head(x[:, -g:]), index, alive


class ReferenceDenoiser:
    """The eager oracle the sampler drives (see the module docstring): one request, B = 1."""

    fused = False

    def __init__(self, model: LLaDAV, prompt: PromptInputs, mask_id: int, prune: PruneSettings | None = None,
                 cache: bool = False):
        self.model, self.prompt, self.mask_id, self.cache = model, prompt, mask_id, cache
        self.prune = prune.validate(len(model.model.layers)) if prune is not None else None
        self.k = num_kept(prune.keep, prompt.n_visual) if self.prune and prompt.n_visual else 0
        self.first_done = False  # the pruning step (step 1) ran
        self.mask_embed = model.embed(torch.tensor([mask_id], device=prompt.embeds.device))  # [1, D]
        self.kept: torch.Tensor | None = None  # [L'] original positions of the reduced sequence
        self.kv: torch.Tensor | None = None  # [layers, 2, 1, n_kv, L', hd] from the last refresh
        self.calls: list[str] = []  # what each forward ran: stage_a / full / prefill / cached

    @property
    def kept_visual(self) -> torch.Tensor | None:
        """Kept visual positions (ascending, in prefix coordinates); None when nothing was pruned."""
        if self.kept is None:
            return None
        kept = self.kept[self.kept < self.prompt.length]
        return kept[self.prompt.visual_mask[0, kept]]

    def _sequence(self, g: int, uncond: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(prefix [1, P', D], position ids [1, P' + G]): reduced after pruning, original ids kept."""
        p, dev = self.prompt.length, self.prompt.embeds.device
        if self.kept is None:
            prefix, pos = self.prompt.embeds, torch.arange(p + g, device=dev)[None]
        else:
            prefix, pos = gather_seq(self.prompt.embeds, self.kept[None, : len(self.kept) - g]), self.kept[None]
        if uncond:
            prefix = self.mask_embed.expand_as(prefix[0])[None]
        return prefix, pos

    @torch.no_grad()
    def __call__(self, response_ids: torch.Tensor, step: StepInfo | None = None, *, uncond: bool = False
                 ) -> torch.Tensor:
        if response_ids.shape[0] != 1:
            raise ValueError("the reference denoiser serves one request (batch 1)")
        g, dev = response_ids.shape[1], response_ids.device
        lm = self.model.language
        if self.prune is not None and not self.first_done:
            if uncond:
                raise RuntimeError("the conditional forward of step 1 decides the pruning; call it first")
            self.first_done = True
            self.calls.append("stage_a")
            if not self.prompt.n_visual:  # nothing to prune: step 1 is the full forward (and fills no cache)
                prefix, pos = self._sequence(g, False)
                return lm(prefix, response_ids, pos)
            p = self.prompt.length
            pos = torch.arange(p + g, device=dev)[None]  # [1, L]
            vmask = torch.cat([self.prompt.visual_mask, torch.zeros(1, g, dtype=torch.bool, device=dev)], dim=1)
            logits, index, _ = pruned_forward(
                self.model, self.prompt.embeds, response_ids, pos, torch.ones_like(vmask), vmask,
                torch.tensor([self.k], device=dev), self.prune, self.k, self.mask_id)
            self.kept = index[0]
            return logits
        prefix, pos = self._sequence(g, uncond)
        if not self.cache:
            self.calls.append("full")
            return lm(prefix, response_ids, pos)
        if self.kv is None or step is None or step.refresh_rows[0]:
            self.calls.append("prefill")
            logits, self.kv = lm.prefill(prefix, response_ids, pos)
            return logits
        self.calls.append("cached")
        return lm.cached(response_ids, pos[:, -g:], torch.ones_like(pos, dtype=torch.bool), self.kv, step.block_start)


@dataclass
class ReferenceResult:
    ids: list[int]
    text: str
    kept_visual: list[int] | None = None
    trace: SamplerTrace = field(default_factory=SamplerTrace)
    calls: list[str] = field(default_factory=list)


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
    """Generate an answer with the eager model: unpruned or LLaDA-FastV-pruned, with the prefix
    cache when ``gen.cache``."""
    gen.validate()
    sp = special_tokens(tokenizer)
    inputs = embed_prompt(model, tokenizer, image, prompt, system)
    den = ReferenceDenoiser(model, inputs, sp.mask, prune, cache=gen.cache)
    trace = SamplerTrace()
    dev = model.lm_head.weight.device
    (ids,) = generate(den, gen, mask_id=sp.mask, eot_id=sp.eot, suppress_ids=sp.suppressed(),
                      generators=[torch.Generator(device=dev).manual_seed(seed)], trace=trace, device=dev)
    kept = den.kept_visual.tolist() if prune is not None and den.kept_visual is not None else (
        [] if prune is not None else None)
    return ReferenceResult(ids.tolist(), decode_answer(tokenizer, ids.tolist()), kept, trace,
                           den.calls)


# ---------------------------------------------------------------------- oracles of the graph set
@dataclass(frozen=True)
class OracleContext:
    tokens: SpecialTokens
    prune: PruneSettings | None = None
    k_static: int = 0
    fused: bool = False

    def head(self, logits: torch.Tensor, response_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if not self.fused:
            return (logits,)
        return fused_prediction(logits, response_ids, self.tokens.suppressed(), self.tokens.mask)


@torch.no_grad()
def oracle_vision(model: LLaDAV, feeds: dict, ctx: OracleContext) -> tuple[torch.Tensor, ...]:
    return (model.encode_images(feeds["pixel_values"]).float(),)


@torch.no_grad()
def oracle_stage_a(model: LLaDAV, feeds: dict, ctx: OracleContext) -> tuple[torch.Tensor, ...]:
    logits, index, alive = pruned_forward(model, feeds["prefix_embeds"], feeds["response_ids"], feeds["position_ids"],
                                          feeds["key_mask"], feeds["visual_mask"], feeds["num_keep"], ctx.prune,
                                          ctx.k_static, ctx.tokens.mask)
    return ctx.head(logits, feeds["response_ids"]) + (index, alive)


@torch.no_grad()
def oracle_denoiser(model: LLaDAV, feeds: dict, ctx: OracleContext) -> tuple[torch.Tensor, ...]:
    return ctx.head(model.denoise(**feeds), feeds["response_ids"])


@torch.no_grad()
def oracle_prefill(model: LLaDAV, feeds: dict, ctx: OracleContext) -> tuple[torch.Tensor, ...]:
    logits, kv = model.language.prefill(**feeds)
    return ctx.head(logits, feeds["response_ids"]) + (kv,)


@torch.no_grad()
def oracle_cached(model: LLaDAV, feeds: dict, ctx: OracleContext) -> tuple[torch.Tensor, ...]:
    return ctx.head(model.language.cached(**feeds), feeds["response_ids"])
