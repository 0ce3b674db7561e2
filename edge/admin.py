"""The admin listener of ``edge serve`` (runs in the master process, loopback by default).

* ``GET /healthz`` → 200 ``ok`` while the master runs (a liveness probe: restart me if not).
* ``GET /readyz`` → 200 ``ready`` when every worker of the current generation is alive and
  accepting and the node is not draining (SIGTERM); otherwise 503 with one line per reason
  (a readiness probe: send me no traffic). The directory is deliberately not part of it:
  workers serve warm traffic from their caches while the database is away, and a load
  balancer that took every node out on a database blip would turn it into a total outage.
* ``GET /healthz/directory`` → 200 ``directory ok`` when the directory answers a ping within
  :data:`PING_TIMEOUT` seconds, else 503 with the reason (for alerting, not for routing).
* ``GET /metrics`` → Prometheus text format, summed over all workers (multiprocess mode,
  see :mod:`edge.metrics`) plus the master's own ``edge_workers_expected`` and
  ``edge_directory_up`` (the same ping as ``/healthz/directory``, taken at scrape time).
* ``GET /sessions``, ``POST /sessions/{id}/kill``, ``GET /status``: the live view
  (:mod:`edge.liveapi`), when the supervisor attached one (``AdminServer.live``).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
from collections.abc import Callable

from aiohttp import web

from edge.config import DatabaseConfig, ListenAddress
from edge.directory.stores import read_store
from edge.liveapi import LiveRoutes
from edge.ports import in_use_message

log = logging.getLogger("edge.admin")

PING_TIMEOUT = 2.0
"""Seconds /readyz waits for the directory to answer ``SELECT 1``."""

WorkersCheck = Callable[[], str | None]
"""Returns ``None`` when all workers are alive and ready, else why not (one line)."""


def render_metrics(multiproc_dir: str | None = None, expected_workers: int | None = None,
                   directory_up: bool | None = None) -> bytes:
    """Prometheus text exposition aggregating every worker's files in ``multiproc_dir``."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import GaugeMetricFamily
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    path = multiproc_dir or os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if path:
        MultiProcessCollector(registry, path=path)  # type: ignore[no-untyped-call]
    # Collectors, not Gauges: in multiprocess mode a Gauge would create a value file for the
    # master's pid, which would then count as a live worker.
    families = []
    if expected_workers is not None:
        families.append(GaugeMetricFamily("edge_workers_expected",
                                          "Worker processes the master wants running.",
                                          value=expected_workers))
    if directory_up is not None:
        families.append(GaugeMetricFamily(
            "edge_directory_up", "1 if the directory database answered a ping from the master "
            f"within {PING_TIMEOUT:g} s at scrape time, else 0.", value=int(directory_up)))

    class _Master:
        def collect(self) -> list[GaugeMetricFamily]:
            return families

    registry.register(_Master())
    return generate_latest(registry)


async def ping_directory(config: DatabaseConfig, within: float = PING_TIMEOUT) -> str | None:
    """``None`` if the directory answers ``SELECT 1`` in time, else the reason (one line).

    Opens a short-lived store each time: the master keeps no connection (and so no SQLite
    helper thread) around while it forks workers.
    """
    store = read_store(config)

    async def _ping() -> None:
        await store.open()
        await store.ping()

    try:
        await asyncio.wait_for(_ping(), within)
    except TimeoutError:
        return f"directory did not answer within {within:g}s"
    except Exception as exc:
        return f"directory unreachable: {exc}".splitlines()[0]
    finally:
        with contextlib.suppress(Exception):
            await store.close()
    return None


class AdminServer:
    """aiohttp app on sockets bound by :meth:`start`; the checks come from the supervisor."""

    def __init__(self, *, database: Callable[[], DatabaseConfig], workers: WorkersCheck,
                 expected_workers: Callable[[], int], multiproc_dir: str | None) -> None:
        self._database = database
        self._workers = workers
        self._expected = expected_workers
        self._multiproc_dir = multiproc_dir
        self._runner: web.AppRunner | None = None
        self.addresses: tuple[ListenAddress, ...] = ()
        self.bound: list[tuple[str, int]] = []
        self.pinging = 0
        """Directory pings in flight (see :meth:`ping`)."""
        self.sockets: list[socket.socket] = []
        """The listening sockets (a forked worker closes its copies)."""
        self.live: LiveRoutes | None = None
        """Live sessions and status (set by the supervisor before :meth:`start`)."""

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/healthz/directory", self.directory_health)
        app.router.add_get("/metrics", self.metrics)
        if self.live is not None:
            self.live.add_routes(app)
        return app

    async def healthz(self, request: web.Request) -> web.Response:
        """Always 200 ``ok``: answering at all proves the master's loop runs."""
        return web.Response(text="ok\n")

    async def readyz(self, request: web.Request) -> web.Response:
        """200 ``ready`` or 503 with the reason: workers (see the module doc), not the database."""
        workers = self._workers()
        if workers:
            return web.Response(status=503, text=f"not ready: {workers}\n")
        return web.Response(text="ready\n")

    async def directory_health(self, request: web.Request) -> web.Response:
        """200 ``directory ok`` or 503 with why the directory did not answer."""
        problem = await self.ping()
        if problem:
            return web.Response(status=503, text=f"{problem}\n")
        return web.Response(text="directory ok\n")

    async def ping(self) -> str | None:
        """:func:`ping_directory` with the current settings; ``None`` when it answered."""
        # The supervisor does not fork while this runs: an SQLite ping uses a helper thread.
        self.pinging += 1
        try:
            return await ping_directory(self._database())
        finally:
            self.pinging -= 1

    async def metrics(self, request: web.Request) -> web.Response:
        """The aggregated metrics (reads a few small mmap files per worker pid).

        Built in the loop rather than a thread: the master forks workers and should not carry
        idle threads into them.
        """
        directory_up = await self.ping() is None
        body = render_metrics(self._multiproc_dir, self._expected(), directory_up)
        return web.Response(body=body, headers={
            "Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    async def start(self, addresses: tuple[ListenAddress, ...]) -> list[tuple[str, int]]:
        """Bind and serve; returns ``(host, port)`` actually bound. Raises OSError on failure."""
        sockets = [_bind_tcp(a) for a in addresses]
        runner = web.AppRunner(self.app(), access_log=None, handle_signals=False)
        await runner.setup()
        try:
            for sock in sockets:
                await web.SockSite(runner, sock).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.sockets = sockets
        self.addresses = addresses
        self.bound = [sock.getsockname()[:2] for sock in sockets]
        return self.bound

    async def stop(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()
        self.sockets = []


def _bind_tcp(address: ListenAddress) -> socket.socket:
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address.host, address.port))
        sock.listen(128)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        why = (in_use_message(address.host, address.port) if exc.errno == errno.EADDRINUSE
               else f"{address}: {exc.strerror}")
        raise OSError(exc.errno, f"[admin] listen: {why}") from None
    return sock


__all__ = ["PING_TIMEOUT", "AdminServer", "ping_directory", "render_metrics"]
