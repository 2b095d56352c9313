"""Requests in the bucket: the batched layout every denoiser graph reads, and the stage A -> B hand-off.

One row per request, ``B`` rows (``bucket.batch_size``); rows without a request are dead
copies of row 0 (finite inputs; the sampler never commits for them). Used by the
pipeline, ``llada-compare``, the benchmarks and the tests, so the feeds of every graph
are built in this one place.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .bucket import Bucket
from .pruning import num_kept


class RequestError(ValueError):
    """A request these engines cannot serve: too large for the bucket (the message names the export
    flag to raise), or settings they were not built for."""


@dataclass
class RequestParts:
    """One request's prefix pieces, embedded: text before <image>, visual tokens, text after."""

    before: torch.Tensor  # [nb, D]
    visual: torch.Tensor  # [nv, D]
    after: torch.Tensor  # [na, D]

    @property
    def n_visual(self) -> int:
        return self.visual.shape[0]

    @property
    def n_text(self) -> int:
        return self.before.shape[0] + self.after.shape[0]


@dataclass
class BucketInputs:
    prefix_embeds: torch.Tensor  # [B, P, D] fp32 (P' after reduce_inputs)
    position_ids: torch.Tensor  # [B, L] int64
    key_mask: torch.Tensor  # [B, L] bool, True = a real token
    visual_mask: torch.Tensor  # [B, L] bool, the V visual slots (real or padding)
    n_visual: list[int]  # real visual tokens per row
    gen_length: int  # response slots in use (<= G; the rest are masked keys)
    active: torch.Tensor  # [B] bool: rows holding a request

    @property
    def batch(self) -> int:
        return self.prefix_embeds.shape[0]

    @property
    def response_positions(self) -> torch.Tensor:  # [B, G]
        return self.position_ids[:, self.prefix_embeds.shape[1]:]

    def num_keep(self, keep: float) -> torch.Tensor:
        """[B] int64: visual tokens each row keeps (round(keep * its own count); 0 without an image)."""
        return torch.tensor([num_kept(keep, n) if n else 0 for n in self.n_visual], device=self.key_mask.device)

    # ---- the feeds of each graph kind (names as in contract.graphset)
    def denoiser_feeds(self, response_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        return dict(prefix_embeds=self.prefix_embeds, response_ids=response_ids, position_ids=self.position_ids,
                    key_mask=self.key_mask)

    def stage_a_feeds(self, response_ids: torch.Tensor, keep: float) -> dict[str, torch.Tensor]:
        return self.denoiser_feeds(response_ids) | dict(visual_mask=self.visual_mask, num_keep=self.num_keep(keep))

    def cached_feeds(self, response_ids: torch.Tensor, kv_cache: torch.Tensor,
                     block_start: torch.Tensor) -> dict[str, torch.Tensor]:
        return dict(response_ids=response_ids, position_ids=self.response_positions.contiguous(),
                    key_mask=self.key_mask, kv_cache=kv_cache, block_start=block_start)


def check_fits(b: Bucket, parts: RequestParts, gen_length: int) -> None:
    check_counts(b, parts.n_text, parts.n_visual, gen_length)


def check_counts(b: Bucket, n_text: int, n_visual: int, gen_length: int) -> None:
    """RequestError naming the export flag to raise when a request of these sizes does not fit."""
    if n_text > b.max_text_tokens:
        raise RequestError(f"the prompt has {n_text} text tokens (chat template included); these engines take "
                          f"at most {b.max_text_tokens}: re-export with --max-prompt-tokens {n_text} or more")
    if n_visual > b.max_visual_tokens:
        raise RequestError(f"the image gives {n_visual} visual tokens; these engines take at most "
                          f"{b.max_visual_tokens}: re-export with --max-visual-tokens {n_visual} or more "
                          "(or a larger --image-size)")
    if gen_length > b.gen_length:
        raise RequestError(f"gen_length {gen_length} exceeds the engines' {b.gen_length}: re-export with "
                          f"--gen-length {gen_length}")


def layout_bucket(b: Bucket, requests: list[RequestParts], gen_length: int) -> BucketInputs:
    """Place up to B requests in the bucket, one per row:
    [before | visual + pad to V | after | pad to T | G response].

    Real tokens get the position ids they would have unpadded; padding slots are masked
    keys (position 0); response slots past ``gen_length`` are masked too. All tensors on
    the device of the first request's tensors."""
    if not 1 <= len(requests) <= b.batch_size:
        raise RequestError(f"{len(requests)} requests for engines of batch size {b.batch_size}")
    for r in requests:
        check_fits(b, r, gen_length)
    p, v, g, n = b.prefix_len, b.max_visual_tokens, b.gen_length, b.batch_size
    first = requests[0]
    with torch.device(first.visual.device):
        emb = torch.zeros(n, p, first.before.shape[1])  # [B, P, D]
        key = torch.zeros(n, p + g, dtype=torch.bool)  # [B, L]
        pos = torch.zeros(n, p + g, dtype=torch.long)  # [B, L]
        vmask = torch.zeros(n, p + g, dtype=torch.bool)  # [B, L]: the V visual slots, real or padding
        for i in range(n):
            r = requests[i] if i < len(requests) else first  # dead rows: copies of row 0
            nb, nv, na = r.before.shape[0], r.visual.shape[0], r.after.shape[0]
            emb[i, :nb] = r.before.float()
            emb[i, nb: nb + nv] = r.visual.float()
            emb[i, nb + v: nb + v + na] = r.after.float()
            key[i, : nb + nv] = True
            key[i, nb + v: nb + v + na] = True
            key[i, p: p + gen_length] = True
            n_real = nb + nv + na
            pos[i, : nb + nv] = torch.arange(nb + nv)
            pos[i, nb + v: nb + v + na] = torch.arange(nb + nv, n_real)
            pos[i, p:] = torch.arange(n_real, n_real + g)
            vmask[i, nb: nb + v] = True
        active = torch.arange(n) < len(requests)
    nvis = [(requests[i] if i < len(requests) else first).n_visual for i in range(n)]
    return BucketInputs(emb, pos, key, vmask, nvis, gen_length, active)


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B, L, ...] gathered along dim 1 with index [B, L'] -> [B, L', ...]."""
    idx = index.view(*index.shape, *([1] * (x.dim() - 2))).expand(*index.shape, *x.shape[2:])
    return x.gather(1, idx)


def reduce_inputs(x: BucketInputs, kept_index: torch.Tensor, kept_alive: torch.Tensor) -> BucketInputs:
    """The stage A -> stage B hand-off: stage A's kept slots (``kept_index`` [B, L'], ascending,
    response slots last) and their ``kept_alive`` flags [B, L'] -> the reduced layout every later
    step reads. Kept tokens keep their ORIGINAL position ids."""
    dev = x.prefix_embeds.device
    idx, alive = kept_index.to(dev), kept_alive.to(dev).bool()
    g = x.position_ids.shape[1] - x.prefix_embeds.shape[1]
    p_red = idx.shape[1] - g
    return replace(x, prefix_embeds=gather_rows(x.prefix_embeds, idx[:, :p_red]).contiguous(),
                   position_ids=x.position_ids.gather(1, idx).contiguous(), key_mask=alive,
                   visual_mask=x.visual_mask.gather(1, idx) & alive)


def take_rows(x: BucketInputs, rows: list[int], size: int) -> BucketInputs:
    """Rows ``rows`` of ``x`` (its indices, in that order) as a batch of ``size`` >= len(rows) rows: the
    rest are dead copies of the first kept row (finite inputs, inactive), as :func:`layout_bucket` pads.
    Works on the stage A layout and on the reduced one alike (a batch narrowed to a smaller size)."""
    if not 1 <= len(rows) <= size:
        raise ValueError(f"{len(rows)} rows do not fill a batch of {size} (1 to {size} rows)")
    pad = rows + [rows[0]] * (size - len(rows))
    idx = torch.tensor(pad, device=x.key_mask.device)  # [size]
    alive = torch.arange(size, device=x.key_mask.device) < len(rows)  # [size]
    rows_of = {k: getattr(x, k).index_select(0, idx) for k in ("prefix_embeds", "position_ids", "key_mask",
                                                               "visual_mask")}  # [size, ...] each
    return replace(x, **rows_of, n_visual=[x.n_visual[i] for i in pad], active=x.active[idx] & alive)


def kept_visual_positions(reduced: BucketInputs, row: int) -> list[int]:
    """Kept visual tokens of one row as positions in its unpadded prompt (= their position ids)."""
    keep = reduced.visual_mask[row]
    return sorted(reduced.position_ids[row, keep].tolist())
