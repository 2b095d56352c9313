"""Attention over zeroed padding without a mask (the torch cached step's kernel) against
``scaled_dot_product_attention`` with the key mask, and the cached step that uses it against the
concatenating, masked one on a padded bucket."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers import PROMPTS
from llada_export.graphs.fused import fuse_projections
from llada_export.ops.padded_attention import attend_zero_padded, supported, zero_padding
from llada_export.reference import embed_prompt
from llada_export.tokenizer import special_tokens


def _case(b=3, h=4, lq=16, lk=90, hd=32, dtype=torch.float32, shift=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, hd, generator=g) for n in (lq, lk, lk))
    u = torch.randn(hd, generator=g)  # a direction every query shares: the keys' shift along it moves all scores
    q, k = q + 3 * u, k + shift * u  # shift -0.5: real scores about -8, the pads' 0 dominate the kernel's softmax
    mask = torch.rand(b, lk, generator=g) > 0.3  # [B, Lk] True = real; pads scattered through the row
    mask[:, :3] = True
    return q.to(dtype), k.to(dtype), v.to(dtype), mask


@pytest.mark.parametrize("shift, tol", [(0.0, 2e-5), (0.5, 2e-5), (-0.5, 1e-3)])
def test_equals_masked_sdpa_in_fp32(shift, tol):
    """Real scores around 0, above 0, and far below 0 (the real keys' share of the kernel's softmax under
    1e-3: the rescale's fp32 error grows as the module docstring says)."""
    q, k, v, mask = _case(shift=shift)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
    got = attend_zero_padded(q, zero_padding(k, mask), zero_padding(v, mask), (~mask).sum(-1)).transpose(1, 2)
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    if shift <= 0:  # the pads matter there: attending over them unmasked is another answer (the test could fail)
        plain = F.scaled_dot_product_attention(q, zero_padding(k, mask), zero_padding(v, mask))
        assert (plain - want).abs().max() > 1e-2


def test_equals_masked_sdpa_in_bf16_within_its_rounding():
    q, k, v, mask = _case(dtype=torch.bfloat16, lk=300)
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask[:, None, None, :])
    got = attend_zero_padded(q, zero_padding(k, mask), zero_padding(v, mask), (~mask).sum(-1)).transpose(1, 2)
    masked = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
    assert got.dtype == torch.bfloat16
    # no further from the fp32 answer than bf16's masked kernel, give or take one rounding
    assert (got.float() - ref).abs().max() <= 2 * (masked.float() - ref).abs().max() + 1e-2


def test_no_padding_and_a_row_of_padding_only():
    q, k, v, mask = _case()
    mask[0] = True  # row 0: no pad, the kernel's output as is
    mask[1] = False  # row 1: nothing to attend to (an idle batch row): zeros, not NaN
    got = attend_zero_padded(q, zero_padding(k, mask), zero_padding(v, mask), (~mask).sum(-1)).transpose(1, 2)
    torch.testing.assert_close(got[0], F.scaled_dot_product_attention(q, k, v)[0], rtol=2e-5, atol=2e-5)
    assert torch.equal(got[1], torch.zeros_like(got[1]))
    assert torch.isfinite(got).all()


def test_rows_whose_every_score_is_far_below_zero():
    """No pad and every score about -200 (exp(-lse) overflows fp32): the kernel's answer, finite; with pads
    the pads' exp(0) swamps such a row (the limit the module docstring states): finite, not NaN."""
    q, k, v, mask = _case(shift=-12.0)
    n_pad = (~mask).sum(-1)
    mask[0], n_pad[0] = True, 0
    got = attend_zero_padded(q, zero_padding(k, mask), zero_padding(v, mask), n_pad).transpose(1, 2)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got[0], F.scaled_dot_product_attention(q, k, v)[0], rtol=2e-5, atol=2e-5)


def test_kernel_support():
    assert supported(torch.zeros(1, 1, 1, 8))  # the CPU's flash kernel takes any float dtype
    assert not supported(torch.zeros(1, 1, 1, 8, device="meta"))


def test_in_place_cached_step_on_a_padded_bucket_equals_the_masked_one(tiny, images):
    """A bucket row with padding in the prefix and masked response slots past gen_length: the in-place
    step (zeroed pads, no mask) gives the masked, concatenating step's logits, and the cache it writes
    keeps zeros in the masked response slots."""
    model, tok, _ = tiny
    lm = fuse_projections(model.language)
    inp = embed_prompt(model, tok, images["380x250"], PROMPTS["long"])
    p_real, g, pad = inp.length, 16, 7
    embeds = torch.cat([inp.embeds, torch.randn(1, pad, inp.embeds.shape[2])], dim=1)  # 7 padding slots
    p = p_real + pad
    key_mask = torch.ones(1, p + g, dtype=torch.bool)
    key_mask[0, p_real:p] = False
    key_mask[0, p + 12:] = False  # gen_length 12 of 16
    ids = torch.full((1, g), special_tokens(tok).mask)
    ids[0, [1, 4, 9]] = torch.tensor([7, 40, 99])
    pos = torch.cat([torch.arange(p_real), torch.zeros(pad, dtype=torch.long), torch.arange(p_real, p_real + g)])[None]
    with torch.no_grad():
        _, kv = lm.prefill(embeds, ids, pos, key_mask)
        assert torch.equal(kv[..., p_real:p, :], torch.zeros_like(kv[..., p_real:p, :]))  # the prefill zeroes pads
        buf = kv.clone()
        for start in (0, 8):
            want = lm.cached(ids, pos[:, p:], key_mask, kv, torch.tensor([start]), inplace=False)
            got = lm.cached(ids, pos[:, p:], key_mask, buf, torch.tensor([start]), inplace=True)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert torch.equal(buf[..., p + 12:, :], torch.zeros_like(buf[..., p + 12:, :]))
    assert not torch.equal(buf[..., p + 8: p + 12, :], kv[..., p + 8: p + 12, :])  # the fresh slots were written


# ---------------------------------------------------------------------- the export's choice
def _attention_ops(program) -> int:
    import torch as t

    ep = t.export.load(str(program))
    return sum(n.target == t.ops.llada.attention_lse.default for n in ep.graph.nodes)


def test_export_chooses_the_cached_attention_and_records_it(tiny_ckpt, tiny, images, tmp_path):
    """``cached_attention="masked"``: the in-place cached program holds the masked kernel (no llada::attention_lse),
    the manifest says so, and the engines answer as the eager cached reference (the default, flash, is checked on
    test_fused_cache's engines: one attention_lse per layer)."""
    from helpers import export
    from llada_export.contract.manifest import Manifest
    from llada_export.contract.pruning import PruneSettings
    from llada_export.reference import reference_generate
    from llada_export.runtime.pipeline import Pipeline

    out = export(tiny_ckpt, tmp_path / "e", cache=True, gen_length=16, backends=("inductor",),
                 compiled_weights="checkpoint", compile_cache=False, cached_attention="masked")
    assert Manifest.read(out).export["cached_attention"] == "masked"
    assert _attention_ops(out / "programs" / "cached.pt2") == 0
    model, tok, _ = tiny
    pipe = Pipeline.load(out, runner_options={"compile": False})
    kw = dict(gen_length=16, block_length=8, steps=16, cache=True, refresh=3)
    want = reference_generate(model, tok, images["380x250"], PROMPTS["long"], pipe.generation_config(**kw),
                              PruneSettings(2, 0.5))
    assert pipe.generate(images["380x250"], PROMPTS["long"], **kw).ids == want.ids


@pytest.mark.parametrize("extra, msg", [([], "add --cache"), (["--cache", "--backend", "onnxruntime"], "add --cache")])
def test_cached_attention_without_a_torch_cached_step_is_refused(tiny_ckpt, tmp_path, capsys, extra, msg):
    from llada_export.cli.export import main

    with pytest.raises(SystemExit) as e:
        main(["--model", str(tiny_ckpt), "-o", str(tmp_path / "e"), "-q", "--cached-attention", "masked", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and "--cached-attention applies to the cached step of the torch backends" in err[-1]
    assert msg in err[-1]
    assert not (tmp_path / "e").exists()
