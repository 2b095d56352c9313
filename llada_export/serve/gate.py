"""A replica's admission gate: when a request may join its setting's batch queue (``serve/app.py``'s module
docstring says why the server needs one). Rows wait here while a batch runs, or while ``max_batch`` rows of
their setting already wait in that queue for their batch to start; each setting's waiters are let in first
come, first served. Everything runs on the replica's event loop (no lock); the engine thread never calls it.
"""

from __future__ import annotations

import asyncio
from collections import deque


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
