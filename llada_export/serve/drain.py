"""Stopping ``llada-serve`` without dropping the requests it holds (a drain).

On Ctrl-C or SIGTERM (a rolling restart, ``kubectl delete pod``, ``systemctl stop``) the server stops taking
chat requests and answers those it already took before it ends:

- every replica is told to drain: a new chat request gets a 503 ``server_shutting_down`` with ``Retry-After``
  (a client or a load balancer sends it again, elsewhere or later), and GET /health answers 503 with
  ``"status": "draining"`` (a load balancer's health check takes the server out of its pool);
- every request it had taken (being checked, waiting for its batch, in a batch, a stream still sending) is
  answered as usual, for up to the drain's timeout;
- then the application and the cluster are shut down as before (``serve/server.py``'s ``stop``).

Ray Serve has no call that reaches every replica (a handle's call goes to one, and its router prefers the
least busy, the replica that needs it least), and its own shutdown does not do this: ``serve.shutdown()``
ends the HTTP proxy at once (an answer 1.2 s into its 3.6 s lost its connection, measured), and
``serve.delete`` lets the requests in flight finish but answers new ones with a 404 "Path not found", which
no client sends again. So the process that starts the server also starts a :class:`Board`, a small Ray actor:
each replica's watcher thread waits on it (one pending call, no polling) and, once the drain is announced,
flags its :class:`Flights` and reports how many requests it still holds until the board goes.
"""

from __future__ import annotations

import threading
import time
import weakref

from .api import APIError

NAMESPACE = "llada-serve"  # the board's Ray namespace (its name is the application's)
REPORT_S = 0.1  # how often a draining replica reports the requests it holds


class Flight:
    """One chat request a replica has taken: alive until it is answered (a plain request's handler returned,
    or a stream's last event sent). Held weakly by :class:`Flights`, so that a stream whose response never
    started (its generator is dropped unrun) stops counting by itself."""

    __slots__ = ("__weakref__",)


class Flights:
    """A replica's chat requests in flight, and since when it drains (None: it does not; then it takes new
    requests, else it refuses them)."""

    def __init__(self) -> None:
        self.draining_since: float | None = None
        self._live: weakref.WeakSet = weakref.WeakSet()

    def __len__(self) -> int:
        return len(self._live)

    @property
    def draining(self) -> bool:
        return self.draining_since is not None

    def take(self) -> Flight:
        """A new chat request's :class:`Flight` (hold it until its answer is sent), or the 503 of a draining
        replica."""
        if self.draining:
            raise APIError("the server is shutting down and takes no new requests: send this one again (to another "
                           "server, or to this one once it is back)", status=503, type="server_error",
                           code="server_shutting_down", headers={"Retry-After": "1"})
        flight = Flight()
        self._live.add(flight)
        return flight

    def land(self, flight: Flight) -> None:
        self._live.discard(flight)

    def watch(self, board, replica: str) -> threading.Thread:
        """On a thread of the replica: wait for the board's drain, then flag this replica and report the
        requests it holds every REPORT_S, until the board is gone (its server stopping)."""
        def run() -> None:
            import ray

            try:
                ray.get(board.wait.remote())
                self.draining_since = time.monotonic()
                while True:
                    time.sleep(REPORT_S)
                    ray.get(board.report.remote(replica, len(self), time.monotonic() - self.draining_since))
            except Exception:  # noqa: BLE001 - the board is gone: the server is stopping, nothing to report to
                return

        t = threading.Thread(target=run, daemon=True, name="llada-drain-watch")
        t.start()
        return t


class Board:
    """The drain's meeting point (a Ray actor of the process that started the server; it goes with it):
    replicas wait on :meth:`wait`, the server's process calls :meth:`drain` and reads :meth:`held`."""

    def __init__(self) -> None:
        import asyncio

        self.event = asyncio.Event()
        self.reports: dict = {}  # replica -> (requests it holds, seconds it has drained)

    async def wait(self) -> None:
        await self.event.wait()

    async def drain(self) -> None:
        self.event.set()

    async def report(self, replica: str, held: int, draining_s: float) -> None:
        self.reports[replica] = (held, draining_s)

    async def held(self) -> dict:
        return dict(self.reports)


def start_board(app: str):
    """The board of application ``app`` (started before its replicas, which look it up by name)."""
    import ray

    return ray.remote(num_cpus=0)(Board).options(name=app, namespace=NAMESPACE).remote()


def find_board(app: str):
    """In a replica: the board of ``app``, or None where there is none (the app was run without
    :func:`start_board`: stopping it then drops what it holds)."""
    import sys

    ray = sys.modules.get("ray")  # a Serve replica has imported it; elsewhere (a test's LLaDAServer) none
    if ray is None or not ray.is_initialized():
        return None
    try:
        return ray.get_actor(app, namespace=NAMESPACE)
    except ValueError:
        return None


def drain(board, replicas: int, timeout_s: float, poll_s: float = REPORT_S) -> tuple[bool, int]:
    """Announce the drain and wait until each of the ``replicas`` has reported, having drained for a report's
    interval at least (a request let in just before its flag was set is counted by then), that it holds no
    request; at most ``timeout_s``. Returns (drained, requests still held at the last reports)."""
    import ray

    deadline = time.monotonic() + timeout_s
    ray.get(board.drain.remote(), timeout=max(1.0, timeout_s))
    while True:
        reports = ray.get(board.held.remote(), timeout=max(1.0, timeout_s))
        held = sum(n for n, _ in reports.values())
        settled = [r for r, (n, s) in reports.items() if n == 0 and s >= REPORT_S]
        if len(settled) >= replicas:
            return True, 0
        if time.monotonic() >= deadline:
            return False, held
        time.sleep(poll_s)
