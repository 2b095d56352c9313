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
    each batch on the engine."""

    def __init__(self, max_batch: int) -> None:
        self.max_batch = max_batch
        self.running = 0  # batches started and not finished (on the engine thread or waiting for it)
        self.queued: dict = {}  # key -> {id(row): row} let into that queue, their batch not started
        self.waiting: dict = {}  # key -> deque of tickets, in arrival order, not let in yet
        self._changed: asyncio.Event | None = None  # set when running, queued or a waiting line shrinks

    async def enter(self, key, row) -> None:
        """Return once no batch runs, fewer than ``max_batch`` rows of ``key`` wait for their batch, and every
        row of ``key`` that came before ``row`` was let in. A caller cancelled while it waits leaves the line."""
        queued = self.queued.setdefault(key, {})
        line = self.waiting.setdefault(key, deque())
        ticket = object()
        line.append(ticket)
        try:
            while line[0] is not ticket or self.running or len(queued) >= self.max_batch:
                if self._changed is None:
                    self._changed = asyncio.Event()
                await self._changed.wait()
        except BaseException:  # cancelled while waiting: out of the line; the next in it looks again
            line.remove(ticket)
            self._wake()
            raise
        line.popleft()
        queued[id(row)] = row
        if line:  # the next in line may fit too
            self._wake()

    def leave(self, key, rows: list) -> None:
        """``rows`` no longer wait in queue ``key`` (their batch started, or their callers gave up)."""
        queued = self.queued.get(key, {})
        if [queued.pop(id(r)) for r in rows if id(r) in queued]:
            self._wake()

    def batch_started(self) -> None:
        self.running += 1

    def batch_ended(self) -> None:
        self.running -= 1
        if not self.running:
            self._wake()

    def _wake(self) -> None:
        """Rows waiting in ``enter`` look again."""
        if self._changed is not None:
            self._changed.set()
            self._changed = None
