"""A replica's admission: whether a request may wait at all (:class:`Room`), and when it may join its
setting's batch queue (:class:`Gate`; ``serve/app.py``'s module docstring says why the server needs one).
Rows wait at the gate while a batch runs, or while ``max_batch`` rows of their setting already wait in that
queue for their batch to start; each setting's waiters are let in first come, first served. Everything runs
on the replica's event loop (no lock); the engine thread never calls it.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections import deque


class Overloaded(Exception):
    """A request refused because its replica already holds ``limit`` requests that wait for their batch."""

    def __init__(self, waiting: int, limit: int) -> None:
        super().__init__(f"{waiting} requests wait for a batch here (the limit is {limit})")
        self.waiting, self.limit = waiting, limit


class Room:
    """The requests a replica holds that have not started: those being checked (``parse``) and those whose
    rows wait at the gate or in a batch queue (``hold`` ... ``release``). At most ``max_queued`` (None: no
    limit): one more is refused at once (:class:`Overloaded`, the server's 503) instead of queueing without
    bound while every caller's wait grows. A row leaves when its batch starts or its request ends; a row
    nobody holds any more (a stream whose response never started) leaves by itself (weak references)."""

    def __init__(self, max_queued: int | None) -> None:
        self.max_queued = max_queued
        self.parsing = 0
        self.rows: weakref.WeakSet = weakref.WeakSet()

    def waiting(self) -> int:
        return self.parsing + len(self.rows)

    @contextlib.contextmanager
    def parse(self):
        """Around a request's checks: refused with :class:`Overloaded` when the room is full, else counted
        until its row is held (or the checks refuse it)."""
        n = self.waiting()
        if self.max_queued is not None and n >= self.max_queued:
            raise Overloaded(n, self.max_queued)
        self.parsing += 1
        try:
            yield
        finally:
            self.parsing -= 1

    def hold(self, row) -> None:
        self.rows.add(row)

    def release(self, rows) -> None:
        for r in rows:
            self.rows.discard(r)


class Gate:
    """``await enter(key, row)`` returns once ``row`` may join queue ``key``; ``leave(key, rows)`` when those
    rows left it (their batch started, or their callers gave up); ``batch_started`` / ``batch_ended`` around
    each batch on the engine.

    Each waiter waits on a future of its own, and whenever the gate opens it lets in at once as many heads of
    each line as fit (:meth:`_let_in`): only the rows let in are woken. The gate before woke every waiter at
    each change to look again; under a flood of 150 requests at once on one CPU replica its batches held 2.48
    rows of 4 on average, in two runs, against 3.96 with this one (``tools/load_test.py --rate 40 --requests
    150 --max-queued 1000`` on out/serve-engines, 2026-12-07: ``benchmarks/load_test_overload_q1000*.md``; why
    the old one formed small batches there was not isolated)."""

    def __init__(self, max_batch: int) -> None:
        self.max_batch = max_batch
        self.running = 0  # batches started and not finished (on the engine thread or waiting for it)
        self.queued: dict = {}  # key -> {id(row): row} let into that queue, their batch not started
        self.waiting: dict = {}  # key -> deque of (future, row), in arrival order, not let in yet
        self._soon = False  # a _let_in is scheduled

    async def enter(self, key, row) -> None:
        """Return once no batch runs, fewer than ``max_batch`` rows of ``key`` wait for their batch, and every
        row of ``key`` that came before ``row`` was let in. A caller cancelled while it waits leaves the line
        (or, let in as it was cancelled, gives its place to the next)."""
        queued = self.queued.setdefault(key, {})
        line = self.waiting.setdefault(key, deque())
        if not line and not self.running and len(queued) < self.max_batch:
            queued[id(row)] = row
            return
        entry = (asyncio.get_running_loop().create_future(), row)
        line.append(entry)
        try:
            await entry[0]
        except BaseException:
            if entry[0].done() and not entry[0].cancelled():  # let in, then cancelled before it ran on
                self.leave(key, [row])
            elif entry in line:  # (a _let_in that ran first has dropped it already)
                line.remove(entry)
            raise

    def leave(self, key, rows: list) -> None:
        """``rows`` no longer wait in queue ``key`` (their batch started, or their callers gave up). The next
        are let in at the loop's next turn, not now: a batch calls this as it starts, and its
        ``batch_started`` (in the same turn) must close the gate first."""
        queued = self.queued.get(key, {})
        if [queued.pop(id(r)) for r in rows if id(r) in queued]:
            self._let_in_soon()

    def batch_started(self) -> None:
        self.running += 1

    def batch_ended(self) -> None:
        self.running -= 1
        if not self.running:
            self._let_in_soon()

    def _let_in_soon(self) -> None:
        if not self._soon:
            self._soon = True
            asyncio.get_running_loop().call_soon(self._let_in)

    def _let_in(self) -> None:
        """While no batch runs: the heads of every line, in arrival order, up to ``max_batch`` queued per key."""
        self._soon = False
        if self.running:
            return
        for key, line in self.waiting.items():
            queued = self.queued.setdefault(key, {})
            while line and len(queued) < self.max_batch:
                future, row = line.popleft()
                if not future.done():  # a cancelled waiter not yet out of the line is skipped
                    queued[id(row)] = row
                    future.set_result(None)
