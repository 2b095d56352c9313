"""The batched sampler's rules, checked on scripted denoisers (logits from fixed tables) against
independent per-request implementations written here (the official loop, the Fast-dLLM hook's
factor rule, Fast-dLLM's threshold rule)."""

from __future__ import annotations

import pytest
import torch

from llada_export.sampler import (PRESETS, GenerationConfig, GenerationError, SamplerTrace, StepInfo, generate,
                                  preset, transfer_schedule)

V, MASK, EOT, EOS, BOS = 32, 31, 30, 29, 28
SUPPRESS = [EOS, BOS]


class TableDenoiser:
    """Logits depend on the row, the position and on how many tokens the row has committed, like a
    real model; rows are independent. ``favour``: {position: token} pushed up (+100); EOT is pushed
    down everywhere else (so an answer ends exactly where a favoured EOT is), and so is the mask id
    (a model never trained to predict it; committing it leaves a position masked)."""

    fused = False

    def __init__(self, g: int, seeds=(0,), favour: dict[int, int] | None = None, scale: float = 3.0):
        self.tables = torch.stack([torch.randn(g, V, generator=torch.Generator().manual_seed(s)) * scale
                                   for s in seeds])  # [B, G, V]
        self.favour = favour or {}
        if EOT not in self.favour.values():
            self.tables[..., EOT] -= 50.0
        self.tables[..., MASK] -= 50.0
        self.calls: list[tuple[torch.Tensor, StepInfo, bool]] = []

    def logits(self, ids: torch.Tensor, uncond: bool = False) -> torch.Tensor:
        out = self.tables[: ids.shape[0]] + 0.1 * (ids != MASK).sum(1)[:, None, None]  # [B, G, V]
        for pos, tok in self.favour.items():
            out[:, pos, tok] += 100.0
        return out * (0.5 if uncond else 1.0)

    def __call__(self, ids: torch.Tensor, step: StepInfo, *, uncond: bool = False) -> torch.Tensor:
        snapshot = StepInfo(step.index, step.refresh.clone(), step.block_start.clone(), step.active.clone(),
                            list(step.refresh_rows), list(step.active_rows))  # the sampler reuses its buffers
        self.calls.append((ids.clone(), snapshot, uncond))
        return self.logits(ids, uncond)


def run(gen: GenerationConfig, den: TableDenoiser, b: int = 1, **kw) -> tuple[list[torch.Tensor], SamplerTrace]:
    trace = SamplerTrace()
    out = generate(den, gen, mask_id=MASK, eot_id=EOT, suppress_ids=SUPPRESS, batch_size=b, trace=trace, **kw)
    return out, trace


# ---------------------------------------------------------------------- independent oracles
def official_generate(logits_fn, gen: GenerationConfig, rule=None) -> list[int]:
    """One request, the official loop written plainly (blocks, fixed schedule or a parallel rule,
    suppression; a -inf candidate is never committed). With ``gen.stop_at_eot`` the first committed
    eot is a stop (later positions stop competing, nothing after it runs); without it every block
    runs all its steps, as the official generate without stopping criteria. The answer is cut at its
    first eot either way."""
    g, bl = gen.gen_length, gen.block_length
    steps = gen.steps // (g // bl)
    x = [MASK] * g
    stop = None
    for b in range(g // bl):
        start, end = b * bl, (b + 1) * bl
        if stop is not None and stop <= start:
            break
        sched = transfer_schedule(sum(t == MASK for t in x[start:end]), steps)
        i = 0
        while True:
            if i >= (steps if rule is None else bl):
                break
            masked = [t == MASK for t in x]
            if stop is not None and not any(masked[:stop]):
                break
            if not any(masked[start:end]):
                break
            lg = logits_fn(torch.tensor([x]))[0].double()  # [G, V]
            for p in range(g):
                if masked[p]:
                    lg[p, SUPPRESS] = float("-inf")
            probs = lg.softmax(-1)
            x0 = lg.argmax(-1).tolist()
            limit = stop if stop is not None else end
            conf = [float(probs[p, x0[p]]) if masked[p] and p < limit else float("-inf") for p in range(g)]
            order = sorted(range(g), key=lambda p: -conf[p])
            n_masked = sum(masked)
            finite = sum(c > float("-inf") for c in conf)
            if rule is None:
                k = sched[i]
            else:
                k = rule([conf[p] for p in order if masked[p]], n_masked)
            for p in order[: min(k, finite)]:
                x[p] = x0[p]
            i += 1
            if gen.stop_at_eot and EOT in x:
                stop = min(stop if stop is not None else g, x.index(EOT))
    return x[: x.index(EOT)] if EOT in x else x


def hook_factor_rule(f: float):
    """The official LLaDA-V Fast-dLLM hook's loop (its `threshold` argument), as written there."""
    def rule(sorted_masked_conf: list[float], n: int) -> int:
        thresholds = [-1.0] + [1 - f / (j + 2) for j in range(1, n)]
        top = n - 1
        for j in range(n):
            if sorted_masked_conf[j] < thresholds[j]:
                top = j
                break
        return top + 1 if top in (0, n - 1) else top
    return rule


def threshold_rule(t: float):
    """Fast-dLLM: the most confident masked token of the block, plus every other with confidence >= t."""
    def rule(sorted_masked_conf: list[float], n: int) -> int:
        return 1 + sum(c >= t for c in sorted_masked_conf[1:])
    return rule


# ---------------------------------------------------------------------- the official schedule
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
    (out,), trace = run(gen, TableDenoiser(12))
    assert trace.forwards == 6
    for step, per_row in enumerate(trace.committed):  # 3 blocks, 2 steps each, 2 tokens per step
        block = step // 2
        assert len(per_row[0]) == 2
        assert all(block * 4 <= p < (block + 1) * 4 for p in per_row[0])
    assert len(out) == 12 and MASK not in out.tolist()


def test_low_confidence_commits_the_most_confident_first():
    den = TableDenoiser(8, seeds=(3,))
    _, trace = run(GenerationConfig(8, 8, 4, stop_at_eot=False), den)
    logits = den.logits(torch.full((1, 8), MASK))[0]
    logits[:, SUPPRESS] = float("-inf")
    conf = logits.softmax(-1).max(-1).values
    assert trace.committed[0][0] == sorted(conf.topk(2).indices.tolist())


@pytest.mark.parametrize("gen", [GenerationConfig(16, 16, 16), GenerationConfig(16, 4, 8), GenerationConfig(16, 8, 16),
                                 GenerationConfig(12, 4, 6, stop_at_eot=False)])
@pytest.mark.parametrize("favour", [{}, {6: EOT}, {1: EOT}, {9: EOT, 3: 7}])
def test_matches_the_official_loop(gen, favour):
    for seed in range(3):
        den = TableDenoiser(gen.gen_length, seeds=(seed,), favour=favour)
        (out,), _ = run(gen, den)
        seen: list[torch.Tensor] = []  # the ids of every forward of the oracle
        expect = official_generate(lambda ids: seen.append(ids) or den.logits(ids), gen)
        assert out.tolist() == expect
        # the same trajectory: every forward sees the same ids (which positions were committed when,
        # and where it stopped; the tokens alone would not show a schedule or stop error here)
        assert len(den.calls) == len(seen)
        assert all(torch.equal(ids, want) for (ids, _, _), want in zip(den.calls, seen))


def test_suppressed_ids_never_chosen_but_eot_is():
    favour = {0: EOS, 1: BOS, 2: EOT}
    (out,), _ = run(GenerationConfig(6, 6, 6, stop_at_eot=False), TableDenoiser(6, favour=favour))
    assert len(out) == 2  # the favoured eot at position 2 is committed and cuts the answer there
    assert EOS not in out.tolist() and BOS not in out.tolist()


def test_output_cut_at_first_eot():
    (out,), _ = run(GenerationConfig(8, 8, 8, stop_at_eot=False), TableDenoiser(8, favour={5: EOT}))
    assert len(out) == 5 and EOT not in out.tolist()


def test_stop_at_eot_skips_later_blocks():
    gen = GenerationConfig(8, 4, 8, stop_at_eot=True)
    (out,), trace = run(gen, TableDenoiser(8, favour={1: EOT}))
    assert len(out) == 1  # only position 0 precedes the eot
    assert trace.forwards == 2  # the eot first (+100), then position 0; block 2 never runs
    _, trace2 = run(GenerationConfig(8, 4, 8, stop_at_eot=False), TableDenoiser(8, favour={1: EOT}))
    assert trace2.forwards == 8


def test_temperature_sampling_is_seeded():
    gen = GenerationConfig(8, 8, 8, temperature=1.0, stop_at_eot=False)

    def sample(seed):
        return run(gen, TableDenoiser(8), generators=[torch.Generator().manual_seed(seed)])[0][0]

    a, b, c = sample(7), sample(7), sample(8)
    greedy = run(GenerationConfig(8, 8, 8, stop_at_eot=False), TableDenoiser(8))[0][0]
    assert torch.equal(a, b)
    assert not torch.equal(a, c) or not torch.equal(a, greedy)


def test_cfg_uses_the_guidance_formula():
    """Step 1 commits argmax(un + (s + 1) (cond - un)): with these tables that is not argmax(cond)."""
    s = 1.5

    class Den(TableDenoiser):
        def logits(self, ids, uncond=False):
            out = torch.zeros(ids.shape[0], 4, V)
            out[..., 0] = 5.0 if not uncond else 4.0   # cond favours 0 (by 1 over token 1) ...
            out[..., 1] = 4.0 if not uncond else 0.0   # ... but 1 gains more than 0 over uncond
            out[0, 2, 3] = 12.0 if not uncond else 9.0  # position 2: token 3 (guided 9 + 2.5 * 3 = 16.5)
            return out

    den = Den(4)
    (out,), trace = run(GenerationConfig(4, 4, 4, cfg_scale=s, stop_at_eot=False), den)
    # guided: token 0 -> 4 + 2.5 * 1 = 6.5, token 1 -> 0 + 2.5 * 4 = 10: token 1 wins wherever 3 is not favoured
    assert out.tolist() == [1, 1, 3, 1]
    assert trace.forwards == 8 and sum(u for _, _, u in den.calls) == 4


# ---------------------------------------------------------------------- batching
@pytest.mark.parametrize("gen", [GenerationConfig(16, 16, 16), GenerationConfig(16, 4, 8),
                                 GenerationConfig(16, 16, 16, factor=1.0), GenerationConfig(16, 8, 8, threshold=0.3)])
def test_rows_are_independent(gen):
    """Each row of a batch gives what it gives alone, whatever the others do (one stops early)."""
    seeds, favour = (11, 12, 13), {4: EOT}
    alone = [run(gen, TableDenoiser(16, seeds=(s,), favour=favour if s == 12 else None))[0][0] for s in seeds]

    class Mixed(TableDenoiser):
        def logits(self, ids, uncond=False):
            out = super().logits(ids, uncond)
            out[1, 4, EOT] += 150.0  # row 1 only: its eot (the others keep EOT pushed down)
            return out

    den = Mixed(16, seeds=seeds)
    outs, trace = run(gen, den, b=3)
    assert [o.tolist() for o in outs] == [a.tolist() for a in alone]
    assert len(outs[1]) == 4 and trace.row_forwards[1] < max(trace.row_forwards)
    assert trace.forwards == max(trace.row_forwards)


def test_inactive_rows_give_nothing_and_change_nothing():
    gen = GenerationConfig(8, 8, 8)
    outs, trace = run(gen, TableDenoiser(8, seeds=(5, 6)), b=2, active=torch.tensor([True, False]))
    alone = run(gen, TableDenoiser(8, seeds=(5,)))[0][0]
    assert outs[0].tolist() == alone.tolist() and outs[1].numel() == 0
    assert trace.row_forwards[1] == 0
    assert all(per_row[1] == [] for per_row in trace.committed)


# ---------------------------------------------------------------------- parallel decoding
@pytest.mark.parametrize("scale", [3.0, 12.0, 40.0])  # from near-uniform to confident logits
@pytest.mark.parametrize("f", [1.0, 0.5, 2.0])
@pytest.mark.parametrize("blocks", [1, 4])
def test_factor_rule_matches_the_official_hook(scale, f, blocks):
    gen = GenerationConfig(16, 16 // blocks, 16, factor=f)
    for seed in range(4):
        den = TableDenoiser(16, seeds=(seed,), scale=scale)
        (out,), trace = run(gen, den)
        assert out.tolist() == official_generate(lambda ids: den.logits(ids), gen, hook_factor_rule(f))


@pytest.mark.parametrize("t", [0.95, 0.9, 0.7, 0.3])
def test_threshold_rule_matches_fast_dllm(t):
    gen = GenerationConfig(16, 8, 16, threshold=t)
    for seed in range(4):
        den = TableDenoiser(16, seeds=(seed,), scale=12.0)
        (out,), _ = run(gen, den)
        assert out.tolist() == official_generate(lambda ids: den.logits(ids), gen, threshold_rule(t))


def test_parallel_rules_commit_several_tokens_when_confident():
    den = TableDenoiser(16, seeds=(1,), scale=40.0)
    _, fixed = run(GenerationConfig(16, 16, 16), den)
    _, fac = run(GenerationConfig(16, 16, 16, factor=1.0), den)
    _, thr = run(GenerationConfig(16, 16, 16, threshold=0.9), den)
    assert fixed.forwards == 16 and fac.forwards < 8 and thr.forwards < 8


def test_factor_one_token_per_step_on_flat_confidences():
    """Random weights (near-uniform confidences): the hook commits one token per step until two are
    left, then both: 127 forwards for 128 tokens, 15 for 16."""
    den = TableDenoiser(16, scale=0.01)
    _, trace = run(GenerationConfig(16, 16, 16, factor=1.0, stop_at_eot=False), den)
    assert trace.forwards == 15
    assert [len(c[0]) for c in trace.committed] == [1] * 14 + [2]


# ---------------------------------------------------------------------- cache refresh hints
@pytest.mark.parametrize("refresh, expect", [(1, [True] * 8), (3, [True, False, False, True, False, False, True, False]),
                                             (None, [True] + [False] * 7)])
def test_refresh_hints_follow_the_official_hook(refresh, expect):
    """Refresh at forward i of a block when i % refresh == 0 (the block's first forward always)."""
    gen = GenerationConfig(16, 8, 16, cache=True, refresh=refresh, stop_at_eot=False)
    den = TableDenoiser(16)
    run(gen, den)
    hints = [bool(step.refresh[0]) for _, step, _ in den.calls]
    assert hints == expect + expect  # two blocks of 8 forwards
    assert [step.refresh_rows[0] for _, step, _ in den.calls] == hints  # the same flags on the host
    assert [int(step.block_start[0]) for _, step, _ in den.calls] == [0] * 8 + [8] * 8


# ---------------------------------------------------------------------- settings
@pytest.mark.parametrize("kw, msg", [
    (dict(gen_length=10, block_length=4, steps=4), "not a multiple of block_length"),
    (dict(gen_length=8, block_length=4, steps=3), "not divisible by the number of blocks"),
    (dict(gen_length=8, block_length=8, steps=8, remasking="top"), "remasking"),
    (dict(gen_length=0), "gen_length must be a positive integer"),
    (dict(steps=0), "steps must be a positive integer"),
    (dict(block_length=0), "block_length must be a positive integer"),
    (dict(factor=1.0, threshold=0.9), "not both"),
    (dict(factor=0.0), "factor must be > 0"),
    (dict(threshold=1.5), "threshold must be in"),
    (dict(cache=True, cfg_scale=1.0), "classifier-free guidance"),
    (dict(refresh=0, cache=True), "refresh must be a positive integer"),
    (dict(factor=1.0, remasking="random"), "low_confidence"),
])
def test_bad_generation_settings_are_clear(kw, msg):
    with pytest.raises(GenerationError, match=msg):
        GenerationConfig(**kw).validate()


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset"):
        preset("fast")
