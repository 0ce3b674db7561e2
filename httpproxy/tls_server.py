"""``HttpsProxy``: the registry's ``https`` proxy — certificates by SNI from the directory.

For each connection the accept loop (:mod:`httpproxy.tls`) peeks the ClientHello; then

1. the SNI's site is awaited from the cached directory (exact, then wildcard) and, if it has a
   certificate, the certificate (decrypted in memory by the core's keybox);
2. the certificate's :class:`ssl.SSLContext` comes from the bounded LRU
   (:class:`~httpproxy.contexts.ContextCache`), built on a miss by the one factory;
3. ``loop.connect_accepted_socket(engine.connection(scheme="https", sni_site=site, ...),
   ssl=ctx)`` runs the handshake on the untouched socket and hands the decrypted stream to
   the HTTP engine shared with the plain ``http`` proxy (:func:`httpproxy.server.shared_engine`).

No SNI, an unknown SNI, or a site without certificate: the ``[https] default_certificate``
(a site hostname or a certificate id) if configured, else the TLS alert ``unrecognized_name``.
Directory unreachable and the name not cached: alert ``internal_error`` at once (the lookup
is bounded by ``[database] query_timeout``). A certificate rotation (``edge cert import`` +
``edge site set --certificate``) reaches the next handshake as soon as the change feed evicts
the site; the feed also evicts a changed certificate's context.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import ssl
from typing import TYPE_CHECKING, Any, Protocol

from edge.directory.model import Certificate, Site
from edge.errors import DirectoryUnavailable, EdgeError
from edge.proxyproto import ProxyHeaderPolicy, ProxyMode
from edge.registry import ProxyContext
from httpproxy import acme, tls_metrics
from httpproxy.clienthello import ClientHello
from httpproxy.contexts import ContextCache, ContextFactory
from httpproxy.tls import Acceptor, PendingConnection

if TYPE_CHECKING:
    import socket

    from edge.acme.ondemand import OnDemand

__all__ = ["ConnectionEngine", "HttpsProxy"]

log = logging.getLogger("edge.proxy.https")


class ConnectionEngine(Protocol):
    """What the TLS layer needs from the HTTP engine (:class:`httpproxy.server.HttpEngine`)."""

    def connection(self, *, scheme: str, sni_site: Site | None = None,
                   client_address: tuple[str, int] | None = None,
                   certificate_names: tuple[str, ...] | None = None) -> asyncio.Protocol:
        """A fresh protocol for one decrypted client connection; ``certificate_names``: the
        connection may speak HTTP/2 (ALPN), whose coalesced requests the names allow."""

    def active_sessions(self, scheme: str | None = None) -> int:
        """Client connections the engine serves now: all, or those of one scheme."""

    def drain(self) -> None:
        """Finish requests in progress with ``Connection: close``; close idle connections."""

    async def wait_idle(self, timeout: float) -> None:  # noqa: ASYNC109 - mirrors the Proxy API
        """Return when no connection is left or after ``timeout`` seconds."""

    async def close(self) -> None:
        """End every connection; release resources. Idempotent (the engine is shared)."""


class _Choice:
    __slots__ = ("certificate", "outcome", "site")

    def __init__(self, site: Site | None, certificate: Certificate, outcome: str) -> None:
        self.site = site
        self.certificate = certificate
        self.outcome = outcome


class _OnDemandFailed(Exception):
    """No on-demand certificate within the bounded wait (the handshake gets internal_error)."""


class HttpsProxy:
    """TLS termination by SNI in front of the shared HTTP engine; one per worker."""

    EXPORT_INTERVAL = 1.0
    """Seconds between copies of the context-cache counters into Prometheus."""

    _loop: asyncio.AbstractEventLoop
    """Set by :meth:`start`; connections only arrive after it."""

    def __init__(self, context: ProxyContext, *, engine: ConnectionEngine | None = None) -> None:
        """``engine`` is for tests; by default the worker's shared HTTP engine is used."""
        self.context = context
        self.config = context.config.https
        self.directory = context.directory
        self.factory = ContextFactory(self.config)
        self.contexts = ContextCache(self.factory, self.config.context_cache_size)
        self._min_version = 0x0304 if self.config.min_tls_version == "1.3" else 0x0303
        self._engine = engine
        self.on_demand: OnDemand | None = None
        if context.config.acme.on_demand and context.keybox is not None:
            from edge.acme.ondemand import OnDemand

            self.on_demand = OnDemand(context.config, context.directory, context.keybox)
        self._acceptor: Acceptor | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._exporter: asyncio.Task[None] | None = None
        self._exported = (0, 0)
        policy_mode: ProxyMode = "optional" if self.config.trusted_proxies else "off"
        # A balancer may health-check without a header, and TLS cannot start with one by
        # accident (0x16 vs "PROXY " / "\r\n\r\n"), so the header is optional from trusted nets.
        self.policy = ProxyHeaderPolicy(policy_mode, self.config.trusted_proxies)

    @property
    def engine(self) -> ConnectionEngine:
        if self._engine is None:
            from httpproxy.server import shared_engine

            self._engine = shared_engine(self.context)
        return self._engine

    async def start(self, sockets: list[socket.socket]) -> None:
        loop = self._loop = asyncio.get_running_loop()
        _ = self.engine  # fail at start, not on the first handshake, if it cannot be built
        self.context.feed.subscribe(self.contexts.on_change)
        self._acceptor = Acceptor(loop, on_hello=self._on_hello,
                                  timeout=self.config.handshake_timeout,
                                  max_client_hello=self.config.max_client_hello,
                                  max_pending=self.config.max_pending_handshakes,
                                  policy=self.policy, defer_accept=self.config.defer_accept,
                                  max_pending_per_address=(
                                      self.context.config.http.max_connections_per_ip))
        self._acceptor.start(sockets)
        self._exporter = asyncio.create_task(self._export_loop(), name="edge-https-metrics")

    # -- per connection --------------------------------------------------------------------

    def _on_hello(self, connection: PendingConnection, hello: ClientHello) -> None:
        if not self._version_ok(hello):
            # OpenSSL would refuse it too, but uvloop drops the alert when a handshake fails:
            # decided here, the client learns why.
            connection.refuse("protocol_version", "protocol_version")
            return
        if acme.is_tls_alpn01(hello):  # ACME TLS-ALPN-01 validation (httpproxy/acme.py)
            connection.arm_deadline()
            task = self._loop.create_task(acme.serve_tls_alpn01(self.directory, connection, hello))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return
        # Fast path, no coroutine: site and certificate already in the directory cache.
        name = hello.server_name
        if name is not None:
            site = self.directory.site_nowait(name)
            if isinstance(site, Site) and site.certificate_id is not None:
                certificate = self.directory.certificates.peek(site.certificate_id)
                if isinstance(certificate, Certificate):
                    self._start_tls(connection, _Choice(site, certificate, "ok"))
                    return
        connection.arm_deadline()  # the lookup may wait for the database
        task = self._loop.create_task(self._serve(connection, hello))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _version_ok(self, hello: ClientHello) -> bool:
        """Whether the client offers a TLS version we accept (min_tls_version)."""
        offered = hello.tls_versions or (hello.legacy_version,)
        return max(offered) >= self._min_version

    async def _serve(self, connection: PendingConnection, hello: ClientHello) -> None:
        """Slow path: lookups that may query the store, or the default certificate."""
        try:
            choice = await self._choose(hello.server_name, connection.remaining())
        except _OnDemandFailed as exc:
            log.warning("TLS handshake for %s refused: no on-demand certificate in time", exc)
            connection.refuse("internal_error", "on_demand_failed")
            return
        except DirectoryUnavailable as exc:
            log.warning("TLS handshake for %r refused: %s", hello.server_name, exc)
            connection.refuse("internal_error", "unavailable")
            return
        except EdgeError as exc:  # SecretsError: no key to decrypt certificates
            log.error("TLS handshake for %r refused: %s", hello.server_name, exc)
            connection.refuse("internal_error", "certificate_error")
            return
        if connection.closed:  # the handshake deadline passed while we looked it up
            return
        if choice is None:
            log.debug("TLS handshake refused: no site/certificate for SNI %r (from %s)",
                      hello.server_name or hello.rejected_server_name, connection.client_address)
            connection.refuse("unrecognized_name", "unrecognized_name")
            return
        self._start_tls(connection, choice)

    def _start_tls(self, connection: PendingConnection, choice: _Choice) -> None:
        """Run the TLS handshake with the chosen certificate on the untouched socket."""
        try:
            ssl_context = self.contexts.get(choice.certificate)
        except EdgeError as exc:
            log.error("TLS handshake refused: %s", exc)
            connection.refuse("internal_error", "certificate_error")
            return
        remaining = connection.remaining()
        if remaining <= 0:
            connection.close("timeout")
            return
        sock = connection.detach()
        factory = functools.partial(self.engine.connection, scheme="https",
                                    sni_site=choice.site, client_address=connection.client_address,
                                    certificate_names=(choice.certificate.names if self.config.http2
                                                       else None))
        loop = self._loop
        task = loop.create_task(loop.connect_accepted_socket(
            factory, sock, ssl=ssl_context, ssl_handshake_timeout=remaining))
        self._tasks.add(task)
        task.add_done_callback(functools.partial(self._tls_done, connection, choice.outcome))

    def _tls_done(self, connection: PendingConnection, outcome: str,
                  task: asyncio.Task[tuple[asyncio.Transport, asyncio.Protocol]]) -> None:
        """Record how the handshake ended. On failure the transport has already closed the
        socket (closing it here could hit a reused file descriptor number)."""
        self._tasks.discard(task)
        if task.cancelled():
            connection.finish("closed")
            return
        exc = task.exception()
        if exc is None:
            connection.finish(outcome)
        elif isinstance(exc, TimeoutError):
            connection.finish("timeout")
        elif isinstance(exc, ssl.SSLError):
            log.debug("TLS handshake with %s failed: %s", connection.client_address, exc)
            connection.finish("tls_error")
        elif isinstance(exc, OSError | EOFError):
            connection.finish("closed")
        else:  # a bug in the engine's protocol must not go unnoticed
            log.error("starting the HTTP engine on a TLS connection from %s failed",
                      connection.client_address, exc_info=exc)
            connection.finish("closed")

    async def _choose(self, server_name: str | None, remaining: float) -> _Choice | None:
        """The site and certificate for this SNI, the default certificate, or None (refuse).

        Raises DirectoryUnavailable (cold key, database down) and SecretsError (no key).
        """
        site: Site | None = None
        if server_name is not None:
            site = await self.directory.site(server_name)
            if site is not None and site.certificate_id is not None:
                certificate = await self.directory.certificate(site.certificate_id)
                if certificate is not None:
                    return _Choice(site, certificate, "ok")
            if site is not None and site.certificate_id is None and self.on_demand is not None:
                # Only a name the directory has: random SNI never reaches ACME (edge/acme).
                certificate = await self.on_demand.obtain(site, remaining)
                if certificate is not None:
                    return _Choice(site, certificate, "on_demand")
                if not self.config.default_certificate:
                    raise _OnDemandFailed(site.hostname)
        default = await self._default_certificate()
        return None if default is None else _Choice(site, default, "default_certificate")

    async def _default_certificate(self) -> Certificate | None:
        """``[https] default_certificate``, looked up through the cache like any other."""
        name = self.config.default_certificate
        if not name:
            return None
        if name.isdigit():
            return await self.directory.certificate(int(name))
        site = await self.directory.site(name)
        if site is None or site.certificate_id is None:
            return None
        return await self.directory.certificate(site.certificate_id)

    # -- metrics ---------------------------------------------------------------------------

    def export_metrics(self) -> None:
        """Copy the context-cache counters into Prometheus (deltas since the last call)."""
        hits, misses = self.contexts.hits, self.contexts.misses
        last_hits, last_misses = self._exported
        if hits > last_hits:
            tls_metrics.CONTEXT_CACHE.labels(result="hit").inc(hits - last_hits)
        if misses > last_misses:
            tls_metrics.CONTEXT_CACHE.labels(result="miss").inc(misses - last_misses)
        self._exported = (hits, misses)
        tls_metrics.CONTEXT_CACHE_ENTRIES.set(len(self.contexts))
        if self._acceptor is not None:
            self._acceptor.export_metrics()
        tls_metrics.PENDING_HANDSHAKES.set(self.pending_handshakes())

    async def _export_loop(self) -> None:
        while True:
            try:
                self.export_metrics()
            except Exception:
                log.exception("exporting TLS metrics failed")
            await asyncio.sleep(self.EXPORT_INTERVAL)

    # -- Proxy interface -------------------------------------------------------------------

    def pending_handshakes(self) -> int:
        return 0 if self._acceptor is None else len(self._acceptor.pending)

    def active_sessions(self) -> int:
        """Connections still in the TLS handshake plus the engine's decrypted (https) ones; the
        plain listener reports only its own, so ``edge_active_sessions`` counts each once."""
        pending = self.pending_handshakes()
        if self._engine is not None:
            return pending + self._engine.active_sessions("https")
        return pending

    async def drain(self) -> None:
        if self._acceptor is not None:
            self._acceptor.stop_accepting()
        # Idempotent, and needed when no plain ``http`` listener runs to drain the engine.
        if self._engine is not None:
            self._engine.drain()

    async def wait_closed(self, timeout: float) -> None:  # noqa: ASYNC109 - the interface
        """Waits for the handshakes in flight, then for the shared engine's sessions."""
        deadline = asyncio.get_running_loop().time() + timeout
        if self._acceptor is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._acceptor.wait_idle(), timeout)
        if self._engine is not None:
            await self._engine.wait_idle(max(0.0, deadline - asyncio.get_running_loop().time()))

    async def close(self) -> None:
        if self._acceptor is not None:
            self._acceptor.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._exporter is not None:
            self._exporter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._exporter
            self._exporter = None
        with contextlib.suppress(Exception):
            self.export_metrics()  # the last second's counts
        if self.on_demand is not None:
            await self.on_demand.close()
        if self._engine is not None:
            await self._engine.close()  # idempotent: shared with the ``http`` proxy
