"""A batch whose rows finish or are cancelled moves to a smaller built batch size (issue 23, item 4).

On conftest's multi_size_engines, shared with test_batch_sizes.py (pruned + cache graphs at batch sizes 1, 2 and 4, ONNX Runtime, CPU): once
the rows still running fit a smaller size, the batch goes on with them on that size's graphs; every answer,
forward count, kept-token list and ``on_step`` event is what the batch gives with narrowing off, and each
answer is what its request gives alone (on the CPU the graphs of every size give the same numbers). A
single-size directory (the session's batch-size-3 cache engines) computes its done rows as before.
"""

from __future__ import annotations

import pytest

from helpers import four_requests
from llada_export.runtime.pipeline import Pipeline

# the four requests' rows finish at different forwards under threshold 0.1 (the random tiny model is rarely that
# sure of a token: a lower threshold commits more per forward; 1, 16, 3 and 2 forwards without the cache)
EARLY = dict(threshold=0.1)
CASES = {"no cache": EARLY, "cache, refresh at block starts": dict(EARLY, cache=True, refresh=None, block_length=8),
         "cache every forward": dict(EARLY, cache=True), "sampled": dict(EARLY, temperature=0.7, cache=False)}


@pytest.fixture(scope="module")
def pipe(multi_size_engines):
    return Pipeline.load(multi_size_engines, backend="onnxruntime")


class Recorder:
    """``on_step``: every event; ``cancel``: ``rows`` flagged from the forward ``at`` on (0: before any)."""

    def __init__(self, rows: list[bool] | None = None, at: int = 0, n: int = 4):
        self.rows, self.at, self.events, self.n = rows, at, [], n  # n: the batch's requests

    def on_step(self, event) -> None:
        self.events.append(event)

    def cancel(self) -> list[bool]:
        return self.rows if self.rows and len(self.events) >= self.at else [False] * self.n


def run(pipe, narrow: bool, rows: list[bool] | None = None, at: int = 0, reqs=None, **settings):
    """The batch (``four_requests()`` by default) with narrowing on or off: (results, recorder)."""
    reqs = reqs or four_requests()
    rec, pipe.narrow = Recorder(rows, at, len(reqs)), narrow
    try:
        got = pipe.generate_batch(reqs, on_step=rec.on_step, cancel=rec.cancel, **settings)
    finally:
        pipe.narrow = True
    return got, rec


def same_events(a: Recorder, b: Recorder) -> None:
    """The same events, [B, G] in the starting order, step by step."""
    assert len(a.events) == len(b.events)
    for x, y in zip(a.events, b.events):
        assert x.index == y.index and x.ids.shape == y.ids.shape == (4, 16)
        assert x.ids.equal(y.ids) and x.committed.equal(y.committed) and x.done.equal(y.done), x.index


def fields(results) -> list[tuple]:
    return [(r.ids, r.forwards, r.finish_reason, r.kept_visual, r.n_visual) for r in results]


def sizes_run(forwards: list[int], built=(1, 2, 4)) -> list[int]:
    """The batch sizes a batch of rows needing ``forwards`` forwards runs on, in order, with the forwards at each:
    at each forward, the smallest built size that holds the rows still running."""
    at: dict[int, int] = {}
    for k in range(max(forwards)):
        size = min(n for n in built if n >= sum(f > k for f in forwards))
        at[size] = at.get(size, 0) + 1
    return at


@pytest.mark.parametrize("settings", list(CASES.values()), ids=list(CASES))
def test_rows_that_finish_early_free_their_slots(pipe, settings):
    """Rows done at different forwards: the batch moves to the smallest size that holds the rows left (calls
    named ``graph@b2``, ``graph@b1``); answers, forwards, kept tokens and events are those of the batch kept at
    size 4 and of each request alone."""
    got, rec = run(pipe, True, **settings)
    off, rec_off = run(pipe, False, **settings)
    alone = [pipe.generate_batch([r], **settings)[0] for r in four_requests()]
    assert fields(got) == fields(off) == fields(alone)
    at = sizes_run([r.forwards for r in got])
    assert len(at) > 1, "the rows finished together: nothing to narrow"
    assert got[0].timings["engine_batch_sizes"] == list(at) and got[0].timings["engine_batch_size"] == 4
    assert off[0].timings["engine_batch_sizes"] == [4] and all("@" not in k for k in off[0].graph_calls)
    calls = got[0].graph_calls
    assert {k.partition("@b")[2] for k in calls} == {""} | {str(n) for n in list(at)[1:]}
    if settings.get("refresh", 1) == 1:  # one graph call a forward (no row refreshes alone): counted per size
        assert {n: sum(c for k, c in calls.items() if k.endswith(f"@b{n}") or n == 4 and "@" not in k)
                for n in at} == at
    else:  # cached steps of the narrowed cache
        assert calls.get("cached@b1", 0) > 0
    same_events(rec, rec_off)
    final = rec.events[-1]
    assert final.done.all() and [final.ids[i, : len(r.ids)].tolist() for i, r in enumerate(got)] == [r.ids for r in got]


@pytest.mark.parametrize("cache", [False, True], ids=["no cache", "cache"])
def test_cancelled_rows_free_their_slots(pipe, cache):
    """Rows 0 and 2 cancelled after 4 forwards (fixed schedule: every row runs 16): the batch goes on at
    size 2 with rows 1 and 3, whose answers are those of the uncancelled batch; the cancelled rows give the
    prefix they had, as with narrowing off; the events keep all four rows in their order."""
    settings = dict(preset="chartqa", cache=cache, **({"refresh": 4} if cache else {}))
    flags = [True, False, True, False]
    got, rec = run(pipe, True, flags, 4, **settings)
    off, rec_off = run(pipe, False, flags, 4, **settings)
    full = pipe.generate_batch(four_requests(), **settings)
    assert fields(got) == fields(off)
    assert [got[1].ids, got[3].ids] == [full[1].ids, full[3].ids]
    assert [r.finish_reason for r in got][::2] == ["cancelled"] * 2 and [r.forwards for r in got] == [4, 16, 4, 16]
    assert got[0].timings["engine_batch_sizes"] == [4, 2]
    assert sum(n for k, n in got[0].graph_calls.items() if k.endswith("@b2")) == 16 - 4
    same_events(rec, rec_off)
    assert all(e.done[0] and e.done[2] for e in rec.events[4:])


def test_rows_cancelled_before_the_first_forward(pipe):
    """Three of four rows cancelled before any forward: stage A runs at size 1 for the one left, whose answer
    and kept tokens are its own alone; the others give nothing."""
    settings = dict(preset="chartqa", cache=True, refresh=4)
    got, _ = run(pipe, True, [True, False, True, True], 0, **settings)
    alone = pipe.generate_batch([four_requests()[1]], **settings)[0]
    assert (got[1].ids, got[1].kept_visual, got[1].forwards) == (alone.ids, alone.kept_visual, alone.forwards)
    assert [(got[i].ids, got[i].forwards, got[i].kept_visual) for i in (0, 2, 3)] == [([], 0, None)] * 3
    assert got[0].timings["engine_batch_sizes"] == [4, 1] and set(got[0].graph_calls) == {"stage_a@b1", "prefill@b1",
                                                                                            "cached@b1"}


@pytest.mark.parametrize("case,narrow", [("no cache", True), ("cache, refresh at block starts", False),
                                         ("cancelled", True)], ids=["no cache", "cache, kept at size 4", "cancelled"])
def test_each_answer_is_handed_out_when_its_row_is_done(pipe, case, narrow):
    """``on_finish`` gets each request's answer right after the forward that finished its row (a row done
    at its k-th forward: after the k-th event), while the longer rows still run: the answer, forwards, kept
    tokens and finish reason the returned list holds, its ``total`` time only up to then. Cancelled rows
    (row 2 before its 2nd forward) are handed out at the cancel, before a narrowing leaves them behind."""
    settings = CASES.get(case, dict(preset="chartqa", cache=True, refresh=4))
    rows, at = ([False, False, True, False], 1) if case == "cancelled" else (None, 0)
    got_at: dict[int, tuple] = {}
    rec, pipe.narrow = Recorder(rows, at), narrow
    try:
        got = pipe.generate_batch(four_requests(), on_step=rec.on_step, cancel=rec.cancel,
                                  on_finish=lambda i, r: got_at.setdefault(i, (r, len(rec.events))), **settings)
    finally:
        pipe.narrow = True
    assert sorted(got_at) == [0, 1, 2, 3]
    last = len(rec.events)
    for i, (early, n_events) in got_at.items():
        assert fields([early]) == fields([got[i]]) and early.text == got[i].text
        assert n_events == got[i].forwards, (i, n_events)  # right after its last forward
        assert early.timings["total"] <= got[i].timings["total"]
        if n_events < last:  # handed out before the batch's last forward
            assert len(early.step_times) < len(got[i].step_times)  # graph calls up to then
    assert min(n for _, n in got_at.values()) < last, "every row finished at the last forward: nothing early"
    if case == "cancelled":
        assert got_at[2][0].finish_reason == "cancelled" and got_at[2][1] == 1


def test_three_rows_stay_on_four_until_one_more_is_done(pipe):
    """Three requests run on size 4 (its dead fourth row computed); with narrowing they go to 2 and 1 as their
    rows finish, with the answers each gives alone."""
    got, _ = run(pipe, True, reqs=four_requests()[1:], **EARLY)
    off, _ = run(pipe, False, reqs=four_requests()[1:], **EARLY)
    assert fields(got) == fields(off) and got[0].timings["engine_batch_sizes"] == [4, 2, 1]


def test_a_single_size_directory_keeps_its_size(cache_engines):
    """Engines of one batch size (3): nothing smaller to move to; the same answers with narrowing on or off."""
    p = Pipeline.load(cache_engines)
    reqs = four_requests()[:3]
    on = p.generate_batch(reqs, cancel=lambda: [False, True, False], **EARLY)
    p.narrow = False
    off = p.generate_batch(reqs, cancel=lambda: [False, True, False], **EARLY)
    assert fields(on) == fields(off) and on[0].graph_calls == off[0].graph_calls
    assert on[0].timings["engine_batch_sizes"] == [3]


def test_inductor_narrows_its_cache_in_place_graphs(multi_size_engines, pipe):
    """The Inductor graphs (their own eager kernels), whose cached step writes the cache in place: narrowed
    mid-block with cached steps after the move, the answers of the ONNX batch kept at size 4."""
    ind = Pipeline.load(multi_size_engines, backend="inductor", runner_options={"compile": False}, warmup=False)
    settings = CASES["cache, refresh at block starts"]
    got = ind.generate_batch(four_requests(), **settings)
    off, _ = run(pipe, False, **settings)
    assert fields(got) == fields(off) and len(got[0].timings["engine_batch_sizes"]) > 1
    assert got[0].graph_calls.get("cached@b1", 0) > 0
