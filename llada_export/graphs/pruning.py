"""LLaDA-FastV visual-token pruning: scoring and static-shape selection.

The settings type (:class:`~llada_export.contract.pruning.PruneSettings`) lives in the
contract layer; this module is the tensor side. Shared by the eager pruned reference
(``reference.py``), the attention analysis tool and the FX pass
(``passes/prune.py``), which inserts a call to :func:`prune_indices` at the start of
layer K of the exported denoiser. Everything here is static-shape: the number of
visual candidate slots ``V`` and kept slots ``k_static`` are fixed at export; a
request keeps ``num_keep <= k_static`` real tokens and the rest of the picks are
marked dead (``alive`` False), so they never receive attention.
"""

from __future__ import annotations

import torch

from ..contract.pruning import SCORE_SOURCES


def query_weights(
    source: str,
    key_mask: torch.Tensor,  # [B, L] bool
    visual_mask: torch.Tensor,  # [B, L] bool
    response_ids: torch.Tensor,  # [B, G] int64 (last G slots)
    position_ids: torch.Tensor,  # [B, L] int64
    mask_id: int,
) -> torch.Tensor:
    """Non-negative weights [B, L] over query positions, summing to 1 per row."""
    b, l = key_mask.shape
    g = response_ids.shape[1]
    is_resp = torch.cat([torch.zeros(b, l - g, dtype=torch.bool, device=key_mask.device),
                         torch.ones(b, g, dtype=torch.bool, device=key_mask.device)], dim=1)  # [B, L]
    text = key_mask & ~visual_mask  # [B, L]
    if source == "response":
        masked = torch.cat([torch.zeros(b, l - g, dtype=torch.bool, device=key_mask.device),
                            response_ids == mask_id], dim=1)  # [B, L]
        w = masked & key_mask
    elif source == "text":
        w = text
    elif source == "last":
        prompt_text = text & ~is_resp  # [B, L]
        last_pos = torch.where(prompt_text, position_ids, -1).amax(dim=1, keepdim=True)  # [B, 1]
        w = prompt_text & (position_ids == last_pos)
    else:
        raise ValueError(f"score source must be one of {SCORE_SOURCES}, got {source!r}")
    w = w.float()
    return w / w.sum(dim=1, keepdim=True).clamp_min(1.0)


def visual_scores(
    q: torch.Tensor,  # [B, H, L, hd] after RoPE
    k: torch.Tensor,  # [B, H, L, hd] after RoPE
    key_mask: torch.Tensor,  # [B, L] bool
    weights: torch.Tensor,  # [B, L] query weights
    query_rows: int | None = None,
) -> torch.Tensor:
    """Attention each key receives: mean over heads, weighted mean over queries. [B, L] fp32.

    ``query_rows=n`` restricts the explicit probability matrix to the last n query rows
    (all weight lies there for the ``response`` source), so it is [B, H, n, L], not L x L.
    """
    if query_rows is not None:
        q, weights = q[:, :, -query_rows:], weights[:, -query_rows:]
    scale = q.shape[-1] ** -0.5
    logits = (q.float() @ k.float().transpose(-1, -2)) * scale  # [B, H, Lq, L]
    logits = logits.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    probs = logits.softmax(dim=-1)  # [B, H, Lq, L]
    per_query = probs.mean(dim=1)  # [B, Lq, L]
    return (per_query * weights[:, :, None]).sum(dim=1)  # [B, L]


def select_tokens(
    scores: torch.Tensor,  # [B, L] fp32
    visual_mask: torch.Tensor,  # [B, L] bool, exactly V candidate slots per row
    key_mask: torch.Tensor,  # [B, L] bool
    num_keep: torch.Tensor,  # [B] int64, real tokens to keep (<= k_static)
    n_visual_slots: int,
    k_static: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep every non-visual slot and the top ``k_static`` visual slots.

    Returns ``index`` [B, L'] (ascending original positions, L' = L - V + k_static) and
    ``alive`` [B, L'] (real, and within the request's ``num_keep`` best visual tokens).
    Padded visual slots rank below every real one, so they are only picked (dead) when
    the request has fewer real visual tokens than ``k_static``.
    """
    b, l = scores.shape
    l_red = l - n_visual_slots + k_static
    neg_inf = torch.full_like(scores, float("-inf"))
    cand = torch.where(visual_mask, torch.where(key_mask, scores, torch.full_like(scores, -1e30)), neg_inf)  # [B, L]
    top = cand.topk(k_static, dim=1).indices  # [B, k] best first
    rank_ok = torch.arange(k_static, device=scores.device)[None, :] < num_keep[:, None]  # [B, k]
    keep_flag = torch.scatter(~visual_mask, 1, top, torch.ones_like(rank_ok))  # [B, L]
    alive_full = torch.scatter(key_mask, 1, top, key_mask.gather(1, top) & rank_ok)  # [B, L]
    slot = torch.cumsum(keep_flag.long(), dim=1) - 1  # [B, L] position in reduced sequence
    slot = torch.where(keep_flag, slot, torch.full_like(slot, l_red))  # dropped -> dummy slot
    src = torch.arange(l, device=scores.device)[None, :].expand(b, l)
    index = torch.zeros(b, l_red + 1, dtype=torch.long, device=scores.device).scatter(1, slot, src)[:, :l_red]
    alive = alive_full.gather(1, index)  # [B, L']
    return index, alive


def prune_indices(
    q: torch.Tensor,  # [B, H, L, hd] layer-K queries after RoPE (full sequence)
    k: torch.Tensor,  # [B, H, L, hd] layer-K keys after RoPE
    key_mask: torch.Tensor,  # [B, L] bool
    visual_mask: torch.Tensor,  # [B, L] bool
    num_keep: torch.Tensor,  # [B] int64
    response_ids: torch.Tensor,  # [B, G]
    position_ids: torch.Tensor,  # [B, L]
    *,
    n_visual_slots: int,
    k_static: int,
    source: str,
    mask_id: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Score visual tokens at layer K and select the reduced sequence: (index, alive)."""
    key_mask = key_mask.bool()
    w = query_weights(source, key_mask, visual_mask, response_ids, position_ids, mask_id)  # [B, L]
    rows = response_ids.shape[1] if source == "response" else None
    scores = visual_scores(q, k, key_mask, w, rows)  # [B, L]
    return select_tokens(scores, visual_mask, key_mask, num_keep, n_visual_slots, k_static)


def gather_seq(x: torch.Tensor, index: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Gather along sequence dim ``dim`` with index [B, L'] (batch is dim 0)."""
    shape = [1] * x.dim()
    shape[0], shape[dim] = index.shape
    idx = index.view(shape).expand(*[index.shape[1] if d == dim else s for d, s in enumerate(x.shape)])
    return x.gather(dim, idx)
