"""The FTP/FTPS proxy (registry name ``ftp``): listeners, shared limits, drain on tenant moves.

One :class:`FtpProxy` per worker process. It owns what sessions share: the TLS contexts, the
failed-login limits and per-IP connection caps (:mod:`edge.limits`), and the index of logged-in
sessions by tenant and host, to which the change feed's changes are applied as
:mod:`edge.sessionpolicy` says (``421`` with its message, now or at the drain deadline).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time
from collections import defaultdict
from collections.abc import Coroutine
from typing import Any

from edge import metrics as edge_metrics
from edge import sessionpolicy
from edge.directory.model import Change
from edge.errors import DirectoryUnavailable
from edge.limits import ConnectionCap, LoginLimits, LoginLimitSettings
from edge.proxyproto import ProxyHeaderPolicy
from edge.registry import ProxyContext
from ftpproxy import metrics
from ftpproxy.session import FtpSession
from ftpproxy.tls import ResumingClientContext, backend_context, server_context

__all__ = ["FtpProxy"]

SHUTDOWN_TEXT = "Service shutting down, please reconnect."


class FtpProxy:
    """The ``ftp`` proxy of :mod:`edge.registry`; see the module docstring."""

    LISTEN_BACKLOG = 4096
    """Accept queue of the control listeners (capped by net.core.somaxconn). create_server
    calls listen() again on the inherited socket, with asyncio's default of 100 unless told:
    a burst of 300 logins then overflowed it and the dropped SYNs cost clients 1 s each."""

    MAX_BACKEND_CONNECTS = 32
    """Backend connections per host:port being set up at once (TCP connect + greeting). A
    burst of logins for one host would otherwise overflow its listen backlog, and each
    dropped SYN costs a client a whole second of retransmission."""

    def __init__(self, context: ProxyContext) -> None:
        self.context = context
        self.config = config = context.config.ftp
        self.directory = context.directory
        self.logger = context.logger
        limits = context.config.limits
        self.limits = LoginLimits(LoginLimitSettings.from_config(limits),
                                  failure_delay=self.config.login_failure_delay)
        self.connection_cap = ConnectionCap(limits.max_connections_per_ip)
        self.login_grace_time = limits.login_grace_time
        self.header_policy = ProxyHeaderPolicy(
            "required" if config.trusted_proxies else "off", config.trusted_proxies)
        self.tls_context: ssl.SSLContext | None = (
            server_context(config.certificate_file, config.key_file)
            if config.certificate_file else None)
        self._backend_tls: ResumingClientContext | None = None
        self.servers: list[asyncio.Server] = []
        self.sessions: set[FtpSession] = set()
        self._by_tenant: defaultdict[str, set[FtpSession]] = defaultdict(set)
        self._by_host: defaultdict[str, set[FtpSession]] = defaultdict(set)
        self._idle = asyncio.Event()
        self._idle.set()
        self._checks: set[asyncio.Task[None]] = set()
        self._connects: dict[tuple[str, int], asyncio.Semaphore] = {}
        # Labelled children looked up once (labels() costs a lock and a dict lookup per call;
        # ~2% of the worker's time in a login burst, ~1% in 1-byte transfers).
        self.connections_counter = edge_metrics.CONNECTIONS.labels(proxy="ftp")
        self.login_counters = {result: metrics.LOGINS.labels(result=result)
                               for result in ("ok", "failed", "banned", "unavailable")}
        kinds = ("download", "upload", "listing")
        self.transfer_counters = {(kind, result): metrics.TRANSFERS.labels(kind=kind, result=result)
                                  for kind in kinds for result in ("ok", "failed", "aborted")}
        self.transfer_seconds = {kind: metrics.TRANSFER_SECONDS.labels(kind=kind) for kind in kinds}
        self.bytes_up = edge_metrics.BYTES.labels(proxy="ftp", direction="upstream")
        self.bytes_down = edge_metrics.BYTES.labels(proxy="ftp", direction="downstream")

    @property
    def backend_tls_context(self) -> ResumingClientContext:
        """Built on first use: only hosts with ``backend_tls`` need it."""
        if self._backend_tls is None:
            self._backend_tls = backend_context(verify=self.config.backend_tls_verify,
                                                ca_file=self.config.backend_ca_file)
        return self._backend_tls

    def connect_slot(self, address: str, port: int) -> asyncio.Semaphore:
        """``async with proxy.connect_slot(address, port):`` around setting up a backend."""
        key = (address, port)
        slot = self._connects.get(key)
        if slot is None:
            if len(self._connects) > 10_000:  # forget idle ones; hosts come and go
                self._connects = {k: s for k, s in self._connects.items() if s.locked()}
            slot = self._connects[key] = asyncio.Semaphore(self.MAX_BACKEND_CONNECTS)
        return slot

    # -- Proxy interface ----------------------------------------------------------------------

    async def start(self, sockets: list[socket.socket]) -> None:
        loop = asyncio.get_running_loop()
        for sock in sockets:
            self.servers.append(await loop.create_server(self._new_session, sock=sock,
                                                         backlog=self.LISTEN_BACKLOG))
        self.context.feed.subscribe(self._on_change)

    def _new_session(self) -> FtpSession:
        session = FtpSession(self)
        self.sessions.add(session)
        self._idle.clear()
        self.connections_counter.inc()
        return session

    async def drain(self) -> None:
        for server in self.servers:
            server.close()

    async def wait_closed(self, timeout: float) -> None:  # noqa: ASYNC109 - the interface
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout)

    async def close(self) -> None:
        await self.drain()
        for session in list(self.sessions):
            session.terminate(SHUTDOWN_TEXT, "shutdown")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), 5.0)
        for session in list(self.sessions):
            session.close_now()
        for task in list(self._checks):
            task.cancel()

    def active_sessions(self) -> int:
        return len(self.sessions)

    # -- session index ------------------------------------------------------------------------

    def watch(self, session: FtpSession) -> None:
        """Index a logged-in session by tenant and host, for drains and maintenance."""
        if session.route is not None:
            self._by_tenant[session.route.tenant.name].add(session)
            self._by_host[session.route.host.name].add(session)
            session.session_id = self.context.sessions.add("ftp", session)

    def unwatch(self, session: FtpSession) -> None:
        """Undo :meth:`watch` (the session ends, or starts a new login with USER)."""
        if session.session_id:
            self.context.sessions.remove(session.session_id)
            session.session_id = ""
        route = session.route
        if route is not None:
            for index, key in ((self._by_tenant, route.tenant.name), (self._by_host, route.host.name)):
                group = index.get(key)
                if group is not None:
                    group.discard(session)
                    if not group:
                        del index[key]

    def forget(self, session: FtpSession) -> None:
        self.sessions.discard(session)
        self.unwatch(session)
        if not self.sessions:
            self._idle.set()

    # -- change feed: tenant moves and host maintenance ---------------------------------------

    def _on_change(self, change: Change) -> None:
        """Feed subscriber (must not block): re-check the affected sessions in a task."""
        if change.entity == "tenant" and change.name in self._by_tenant:
            self._spawn(self._check_tenants([change.name]))
        elif change.entity == "host" and change.name in self._by_host:
            self._spawn(self._check_hosts([change.name]))
        elif change.entity == "all":
            self._spawn(self._check_tenants(list(self._by_tenant)))
            self._spawn(self._check_hosts(list(self._by_host)))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._checks.add(task)
        task.add_done_callback(self._checks.discard)

    async def _check_tenants(self, names: list[str]) -> None:
        for name in names:
            await self._apply_policy(list(self._by_tenant.get(name, ())))

    async def _check_hosts(self, names: list[str]) -> None:
        for name in names:
            await self._apply_policy(list(self._by_host.get(name, ())))

    async def _apply_policy(self, sessions: list[FtpSession]) -> None:
        """What :mod:`edge.sessionpolicy` says about each session's current tenant and host."""
        for session in sessions:
            route = session.route
            assert route is not None
            try:
                tenant = await self.directory.tenant(route.tenant.name)
                host = await self.directory.host(route.host.name)
            except DirectoryUnavailable:
                continue  # keep the sessions; the next change will be checked again
            session.apply(sessionpolicy.decide(
                route.host.name, tenant, host, now=time.time(),
                maintenance_drain=self.context.config.serve.maintenance_drain))
