"""torch.export programs for every graph of an engine set.

The denoiser is traced ONCE with a symbolic prefix length; stage A is that program
rewritten by the FX pruning pass, stage B (and the unpruned baseline) are the same
program re-exported at static shapes.
"""

from __future__ import annotations

import torch
from torch import nn

from ..graphs.llada import LanguageModel
from ..graphs.llava import LLaDAV
from ..passes.prune import PruneSpec, insert_pruning
from .bucket import Bucket

DENOISER_INPUTS = ("prefix_embeds", "response_ids", "position_ids", "key_mask")
DENOISER_OUTPUTS = ("logits",)
FUSED_OUTPUTS = ("x0", "confidence")
STAGE_A_INPUTS = DENOISER_INPUTS + ("visual_mask", "num_keep")
STAGE_A_OUTPUTS = DENOISER_OUTPUTS + ("kept_index", "kept_alive")
VISION_INPUTS = ("pixel_values",)
VISION_OUTPUTS = ("features",)


def denoiser_example(lm: nn.Module, prefix_len: int, gen_length: int, mask_id: int, device) -> tuple:
    d = _language(lm).embed_tokens.weight.shape[1]
    length = prefix_len + gen_length
    return (
        torch.zeros(1, prefix_len, d, device=device),  # prefix_embeds fp32
        torch.full((1, gen_length), mask_id, dtype=torch.long, device=device),  # response_ids
        torch.arange(length, device=device)[None],  # position_ids
        torch.ones(1, length, dtype=torch.bool, device=device),  # key_mask
    )


def stage_a_example(lm: LanguageModel, bucket: Bucket, mask_id: int, device) -> tuple:
    base = denoiser_example(lm, bucket.prefix_len, bucket.gen_length, mask_id, device)
    vmask = torch.zeros(1, bucket.seq_len, dtype=torch.bool, device=device)
    vmask[0, : bucket.max_visual_tokens] = True
    return base + (vmask, torch.tensor([bucket.k_static], device=device))


def export_denoiser(lm: LanguageModel, bucket: Bucket, mask_id: int, device) -> torch.export.ExportedProgram:
    """The unpruned denoiser with a symbolic prefix length P (sequence length P + G)."""
    g = bucket.gen_length
    p = torch.export.Dim("prefix", min=2, max=max(bucket.prefix_len, 4))
    shapes = ({1: p}, None, {1: p + g}, {1: p + g})
    args = denoiser_example(lm, bucket.prefix_len, g, mask_id, device)
    with torch.no_grad():
        return torch.export.export(lm, args, dynamic_shapes=shapes)


def stage_a_program(ep: torch.export.ExportedProgram, lm: LanguageModel, bucket: Bucket, spec: PruneSpec,
                    mask_id: int, device) -> torch.export.ExportedProgram:
    gm = insert_pruning(ep, spec)
    with torch.no_grad():
        return torch.export.export(gm, stage_a_example(lm, bucket, mask_id, device))


def static_denoiser(ep: torch.export.ExportedProgram, lm: LanguageModel, prefix_len: int, gen_length: int,
                    mask_id: int, device) -> torch.export.ExportedProgram:
    """The same traced denoiser at a static prefix length (stage B, or the unpruned baseline)."""
    with torch.no_grad():
        return torch.export.export(ep.module(), denoiser_example(lm, prefix_len, gen_length, mask_id, device))


def _language(m: nn.Module) -> LanguageModel:
    return m if isinstance(m, LanguageModel) else m.lm


class VisionGraph(nn.Module):
    """SigLIP tower + projector on a fixed batch of crops; fp32 in, fp32 out."""

    def __init__(self, model: LLaDAV):
        super().__init__()
        self.tower, self.projector = model.model.vision_tower, model.model.mm_projector

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        dtype = self.projector[0].weight.dtype
        feats = self.tower(pixel_values.to(dtype))  # [N, T, C]
        return self.projector(feats).float()  # [N, T, D]


def vision_program(model: LLaDAV, bucket: Bucket, device) -> torch.export.ExportedProgram:
    s = model.config.vision.image_size
    x = torch.zeros(bucket.vision_batch, 3, s, s, device=device)
    with torch.no_grad():
        return torch.export.export(VisionGraph(model), (x,))


def user_input_values(ep: torch.export.ExportedProgram) -> list:
    """The fake values (shape, dtype) of a program's user inputs, in order."""
    specs = [s for s in ep.graph_signature.input_specs if s.kind == torch.export.graph_signature.InputKind.USER_INPUT]
    nodes = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    return [nodes[s.arg.name].meta["val"] for s in specs]
