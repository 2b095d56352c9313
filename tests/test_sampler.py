"""The official sampler's rules, checked on a scripted denoiser (logits from a fixed table)."""

from __future__ import annotations

import pytest
import torch

from llada_export.runtime.sampler import (PRESETS, GenerationConfig, SamplerTrace, generate, preset,
                                          transfer_schedule)

V, MASK, EOT, EOS, BOS = 32, 31, 30, 29, 28
SUPPRESS = [EOS, BOS]


class TableDenoiser:
    """Logits depend on the position and on how many tokens are committed, like a real model."""

    def __init__(self, g: int, seed: int = 0, favour: dict[int, int] | None = None):
        gen = torch.Generator().manual_seed(seed)
        self.table = torch.randn(g, V, generator=gen) * 3
        self.favour = favour or {}
        self.calls: list[torch.Tensor] = []

    def __call__(self, ids: torch.Tensor, *, uncond: bool = False) -> torch.Tensor:
        self.calls.append(ids.clone())
        logits = self.table + 0.1 * (ids != MASK).sum()
        for pos, tok in self.favour.items():
            logits[pos, tok] += 100.0
        return logits * (0.5 if uncond else 1.0)


def run(gen: GenerationConfig, den: TableDenoiser, **kw) -> tuple[torch.Tensor, SamplerTrace]:
    trace = SamplerTrace()
    out = generate(den, gen, mask_id=MASK, eot_id=EOT, suppress_ids=SUPPRESS, trace=trace, **kw)
    return out, trace


def test_transfer_schedule_even_split_remainder_first():
    assert transfer_schedule(10, 4) == [3, 3, 2, 2]
    assert transfer_schedule(8, 8) == [1] * 8
    assert sum(transfer_schedule(97, 13)) == 97


def test_official_presets():
    assert {k: (v.gen_length, v.block_length, v.steps) for k, v in PRESETS.items()} == {
        "mc": (2, 2, 2), "chartqa": (16, 16, 16), "docvqa": (32, 32, 16), "mathvista": (96, 96, 48),
        "mathverse": (64, 64, 32), "demo": (128, 128, 128)}


def test_blocks_commit_in_order_and_per_schedule():
    gen = GenerationConfig(gen_length=12, block_length=4, steps=6, stop_at_eot=False)
    out, trace = run(gen, TableDenoiser(12))
    assert trace.forwards == 6
    # 3 blocks, 2 steps each, 2 tokens per step, never outside the current block
    for step, committed in enumerate(trace.committed):
        block = step // 2
        assert len(committed) == 2
        assert all(block * 4 <= p < (block + 1) * 4 for p in committed)
    assert (out != MASK).all()


def test_low_confidence_commits_the_most_confident_first():
    den = TableDenoiser(8, seed=3)
    gen = GenerationConfig(8, 8, 4, stop_at_eot=False)
    _, trace = run(gen, den)
    logits = den.table.clone()
    logits[:, SUPPRESS] = float("-inf")
    conf = logits.softmax(-1).max(-1).values  # step 1: nothing committed yet, offset 0
    assert trace.committed[0] == sorted(conf.topk(2).indices.tolist())


def test_suppressed_ids_never_chosen_but_eot_is():
    favour = {0: EOS, 1: BOS, 2: EOT}
    out, _ = run(GenerationConfig(6, 6, 6, stop_at_eot=False), TableDenoiser(6, favour=favour))
    assert len(out) == 2  # the favoured eot at position 2 is committed and cuts the answer there
    assert EOS not in out.tolist() and BOS not in out.tolist()


def test_output_cut_at_first_eot():
    out, _ = run(GenerationConfig(8, 8, 8, stop_at_eot=False), TableDenoiser(8, favour={5: EOT}))
    assert len(out) <= 5 and EOT not in out.tolist()


def test_stop_at_eot_skips_later_blocks():
    gen = GenerationConfig(8, 4, 8, stop_at_eot=True)
    den = TableDenoiser(8, favour={1: EOT})
    out, trace = run(gen, den)
    assert len(out) == 1  # only position 0 precedes the eot
    assert trace.forwards < 8  # block 2 never runs, block 1 ends once position 0 is committed
    gen_no_stop = GenerationConfig(8, 4, 8, stop_at_eot=False)
    _, trace2 = run(gen_no_stop, TableDenoiser(8, favour={1: EOT}))
    assert trace2.forwards == 8


def test_temperature_sampling_is_seeded():
    gen = GenerationConfig(8, 8, 8, temperature=1.0, stop_at_eot=False)
    a, _ = run(gen, TableDenoiser(8), generator=torch.Generator().manual_seed(7))
    b, _ = run(gen, TableDenoiser(8), generator=torch.Generator().manual_seed(7))
    c, _ = run(gen, TableDenoiser(8), generator=torch.Generator().manual_seed(8))
    greedy, _ = run(GenerationConfig(8, 8, 8, stop_at_eot=False), TableDenoiser(8))
    assert torch.equal(a, b)
    assert not (torch.equal(a, c) and torch.equal(a, greedy))


def test_cfg_calls_the_unconditional_branch():
    gen = GenerationConfig(4, 4, 4, cfg_scale=1.5, stop_at_eot=False)
    den = TableDenoiser(4)
    _, trace = run(gen, den)
    assert trace.forwards == 8 and len(den.calls) == 8


@pytest.mark.parametrize("kw, msg", [
    (dict(gen_length=10, block_length=4, steps=4), "not a multiple of block_length"),
    (dict(gen_length=8, block_length=4, steps=3), "not divisible by the number of blocks"),
    (dict(gen_length=8, block_length=8, steps=8, remasking="top"), "remasking"),
])
def test_bad_generation_settings_are_clear(kw, msg):
    with pytest.raises(ValueError, match=msg):
        GenerationConfig(**kw).validate()


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset"):
        preset("fast")
