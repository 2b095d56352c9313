"""The replica's admission (``serve/gate.py``): rows of one setting are let into its batch queue first
come, first served, at most ``max_batch`` before their batch starts, none while a batch runs; and at most
``max_queued`` requests wait at all (the room), one more refused. Real asyncio tasks on a real event loop;
no server (the Ray tests in test_serve.py run them inside the server)."""

from __future__ import annotations

import asyncio

import gc

import pytest

from llada_export.serve.gate import Gate, Overloaded, Room


class Row:  # the gate knows rows by identity, as the server's
    def __init__(self, name: str) -> None:
        self.name = name


async def settle() -> None:
    for _ in range(20):  # let every ready task run until nothing moves
        await asyncio.sleep(0)


def test_waiters_are_let_in_first_come_first_served_even_against_a_newcomer_at_the_wake():
    """Five rows wait while a batch runs. A sixth arrives just as the batch ends (its first step is
    already scheduled when the five are woken): it must not pass them (before the gate kept a line, it
    found the gate open before they woke and went in first)."""
    async def main():
        gate, key, let_in = Gate(max_batch=2), "setting", []
        rows = {n: Row(n) for n in ("r1", "r2", "r3", "r4", "r5", "newcomer")}

        async def arrive(name):
            await gate.enter(key, rows[name])
            let_in.append(name)

        gate.batch_started()
        waiters = [asyncio.ensure_future(arrive(f"r{i}")) for i in range(1, 6)]
        await settle()
        assert let_in == []  # a batch runs: nobody in
        newcomer = asyncio.ensure_future(arrive("newcomer"))  # scheduled before the wake below
        gate.batch_ended()
        await settle()
        assert let_in == ["r1", "r2"]  # max_batch, in arrival order
        for done in (["r1", "r2"], ["r3", "r4"], ["r5", "newcomer"]):
            gate.leave(key, [rows[n] for n in done])  # their batch started: the next two go in
            await settle()
        assert let_in == ["r1", "r2", "r3", "r4", "r5", "newcomer"]
        assert all(t.done() for t in (*waiters, newcomer)) and not gate.waiting[key]

    asyncio.run(main())


def test_a_waiter_that_gives_up_leaves_the_line_and_the_next_goes_in():
    async def main():
        gate, key = Gate(max_batch=1), "setting"
        a, b, c = Row("a"), Row("b"), Row("c")
        await gate.enter(key, a)  # a waits for its batch: the queue is full
        first = asyncio.ensure_future(gate.enter(key, b))
        second = asyncio.ensure_future(gate.enter(key, c))
        await settle()
        first.cancel()  # b's caller hung up, at the head of the line
        await settle()
        assert first.cancelled() and not second.done()
        gate.leave(key, [a])
        await settle()
        assert second.done() and gate.queued[key] == {id(c): c} and not gate.waiting[key]

    asyncio.run(main())


def test_settings_wait_in_lines_of_their_own():
    """A full queue of one setting does not hold back another setting's rows; a running batch holds all."""
    async def main():
        gate = Gate(max_batch=1)
        a1, a2, b1 = Row("a1"), Row("a2"), Row("b1")
        await gate.enter("A", a1)
        wait_a2 = asyncio.ensure_future(gate.enter("A", a2))
        wait_b1 = asyncio.ensure_future(gate.enter("B", b1))
        await settle()
        assert wait_b1.done() and not wait_a2.done()
        gate.leave("A", [a1])
        gate.batch_started()  # a1's batch runs: a2 waits for its end, not only for a1's place
        await settle()
        assert not wait_a2.done()
        gate.batch_ended()
        await settle()
        assert wait_a2.done()

    asyncio.run(main())


def test_the_rows_of_a_batch_are_let_in_together_in_one_turn_of_the_loop():
    """100 rows wait while a batch runs; when it ends the first four are in the queue after one turn of the
    event loop, and no other waiter has moved."""
    async def main():
        gate, key = Gate(max_batch=4), "setting"
        rows = [Row(f"r{i}") for i in range(100)]
        gate.batch_started()
        waiters = [asyncio.ensure_future(gate.enter(key, r)) for r in rows]
        await settle()
        gate.batch_ended()
        await asyncio.sleep(0)  # one turn: the gate lets its rows in
        assert list(gate.queued[key].values()) == rows[:4] and len(gate.waiting[key]) == 96
        await asyncio.sleep(0)
        assert [w.done() for w in waiters[:5]] == [True] * 4 + [False]
        for w in waiters[4:]:
            w.cancel()
        await settle()
        assert not gate.waiting[key]

    asyncio.run(main())


@pytest.mark.parametrize("turns", [1, 0])
def test_a_waiter_cancelled_as_the_gate_opens_gives_its_place_to_the_next(turns):
    """The gate opens for waiter a, whose caller hangs up either one turn later (a was let in: its future holds
    the result, its task has not run on) or at once (the let-in, scheduled first, runs before a's own turn and
    skips it): either way b takes the place, and a ends with CancelledError, nothing else."""
    async def main():
        gate, key = Gate(max_batch=1), "setting"
        a, b = Row("a"), Row("b")
        gate.batch_started()
        first = asyncio.ensure_future(gate.enter(key, a))
        second = asyncio.ensure_future(gate.enter(key, b))
        await settle()
        gate.batch_ended()  # the let-in is scheduled now
        for _ in range(turns):
            await asyncio.sleep(0)
            assert gate.queued[key] == {id(a): a}
        first.cancel()
        await settle()
        assert first.cancelled() and second.done() and gate.queued[key] == {id(b): b}
        assert not gate.waiting[key]

    asyncio.run(main())


def test_the_room_refuses_the_request_past_its_limit_and_takes_one_again_once_a_place_is_free():
    """Two requests being checked and one held row fill a room of 3: the next is refused with the count and
    the limit; a checked request that was refused (its checks raised) frees its place, and so does a row
    whose batch started."""
    room = Room(max_queued=3)
    a, b = Row("a"), Row("b")
    with room.parse(), room.parse():  # two requests being checked at once (their awaits interleave)
        room.hold(a)
        assert room.waiting() == 3
        with pytest.raises(Overloaded) as e, room.parse():
            pass
        assert (e.value.waiting, e.value.limit) == (3, 3) and room.waiting() == 3
    assert room.waiting() == 1  # both checks over; a still waits for its batch
    with pytest.raises(ValueError), room.parse():  # checks that refuse the request (a 400): no place kept
        raise ValueError("bad request")
    room.hold(b)
    room.release([a, b])  # their batch started
    assert room.waiting() == 0
    room.release([a])  # released twice (its batch started, then its request ended): no error, no count
    assert room.waiting() == 0


def test_a_row_nobody_holds_any_more_leaves_the_room_by_itself():
    """A stream whose response never started is dropped without its finally block running: its row must not
    keep a place for ever (the room holds rows weakly)."""
    room = Room(max_queued=1)
    row = Row("stream")
    room.hold(row)
    with pytest.raises(Overloaded), room.parse():
        pass
    del row
    gc.collect()
    with room.parse():  # the place is free again
        assert room.waiting() == 1


def test_a_room_without_a_limit_takes_every_request():
    room = Room(max_queued=None)
    rows = [Row(str(i)) for i in range(100)]
    for r in rows:
        room.hold(r)
    with room.parse():
        assert room.waiting() == 101


# ---------------------------------------------------------------------- a replica's requests in flight (the drain)
def test_flights_count_until_they_land_and_a_draining_replica_refuses():
    """serve/drain.py's Flights: each request taken counts until it lands; one dropped without landing (a
    stream whose response never started) stops counting by itself; once draining, take() is the 503."""
    from llada_export.serve.api import APIError
    from llada_export.serve.drain import Flights

    flights = Flights()
    a, b = flights.take(), flights.take()
    assert len(flights) == 2 and not flights.draining
    flights.land(a)
    assert len(flights) == 1
    del b
    gc.collect()
    assert len(flights) == 0
    flights.draining_since = 0.0
    with pytest.raises(APIError) as e:
        flights.take()
    assert (e.value.status, e.value.code, e.value.headers) == (503, "server_shutting_down", {"Retry-After": "1"})
    assert len(flights) == 0
