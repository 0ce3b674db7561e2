"""The HTTP edge: :class:`HttpEngine` (per-worker request handling shared by the plain and the
TLS listener) and :class:`HttpProxy` (the registry's ``http`` proxy: the plain listener).

Per request (:mod:`httpproxy.connection`): Host → site (exact, then wildcard) → tenant → host
from the directory cache, the site's filters (:mod:`httpproxy.rules`) and cache policy
(:mod:`httpproxy.cachepolicy`) compiled once per site version, then a pooled keep-alive
connection to the backend (:mod:`httpproxy.upstream`) or an answer from the content cache
(:mod:`httpproxy.cache`). The engine owns what connections share: the backend pool, the
content cache (purged through the change feed), per-site state, the access log and counters.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import socket
import time
from collections.abc import Coroutine
from typing import Any

from edge import metrics as edge_metrics
from edge.directory.model import Change, Host, Site, Tenant
from edge.limits import ConnectionCap, RateLimiter
from edge.proxyproto import ProxyHeaderPolicy, is_trusted
from edge.registry import ProxyContext
from httpproxy.accesslog import AccessLog
from httpproxy.cache import CacheEntry, ContentCache
from httpproxy.cachepolicy import CachePolicy, cache_key
from httpproxy.connection import ClientConnection, Request
from httpproxy.metrics import LocalStats
from httpproxy.rules import CompiledFilters, Decision, target_text
from httpproxy.upstream import BackendConnection, BackendKey, BackendPool, is_close_delimited

__all__ = ["HttpEngine", "HttpProxy", "Route", "SiteState", "shared_engine"]

log = logging.getLogger("edge.http")
_json_str = json.encoder.encode_basestring_ascii
_perf_counter = time.perf_counter
_time = time.time
_ACCESS_LINE = (b'%b"ts":%.3f,"method":"%b","host_header":%b,"path":%b,%b,"status":%d,"bytes":%d,'
                b'"request_bytes":%d,"duration_ms":%.3f,"cache":%b}\n')
"""One access-log line, built as bytes in one formatting operation (the method is an HTTP
token llhttp validated; the Host and target are escaped by :func:`_json_bytes`)."""
_JSON_UNSAFE = re.compile(rb'[\x00-\x1f"\\\x7f-\xff]')
_CACHE_FIELD = {None: b"null", "HIT": b'"HIT"', "MISS": b'"MISS"', "STALE": b'"STALE"',
                "BYPASS": b'"BYPASS"'}


def _json_bytes(value: bytes, limit: int) -> bytes:
    """A JSON string literal for raw header/target bytes (Latin-1), at most ``limit`` bytes."""
    value = value[:limit]
    if _JSON_UNSAFE.search(value) is None:
        return b'"' + value + b'"'
    return _json_str(value.decode("latin-1")).encode()


def _access_line(values: tuple[Any, ...]) -> bytes:
    """One access-log line from what :meth:`HttpEngine.finished` queued."""
    (prefix, ts, method, host_json, host_raw, target, route, status, bytes_out, body_size, duration,
     cache_result) = values
    if host_json is None:
        host_json = _json_bytes(host_raw or b"", 256)
    return _ACCESS_LINE % (prefix, ts, method, host_json, _json_bytes(target, 1024), route, status,
                           bytes_out, body_size, duration * 1000, _CACHE_FIELD[cache_result])


SITE_STATES_MAX = 100_000
"""Compiled per-site states kept per worker (oldest dropped first)."""
MemoKey = tuple[bytes, bytes, str, bytes | None, str]
CACHE_MEMO_MAX = 4096
"""Remembered cache decisions per site (see SiteState.cache_memo); cleared when full."""
FILTER_MEMO_MAX = 1024
"""Remembered filter outcomes per site (see SiteState.filter_memo); cleared when full."""
MEMO_ENTRIES_MAX = 262_144
"""Entries all sites' memos together (cache decisions, filter outcomes, IP-rule verdicts) may
gain in one worker before every site's memos are forgotten (:meth:`HttpEngine.memo_grew`).
Each site's own bound alone would let a scan over many sites, with many distinct URLs or
client addresses, grow them with the number of sites; with the key bound
(``connection.MEMO_KEY_BYTES``) this keeps them under a few hundred MiB whatever arrives."""
FilterMemoKey = tuple[str, bytes, bytes, bytes | None, bytes | None]


class SiteState:
    """A site's compiled filters, rate limiter and cache policy (rebuilt when the site changes)."""

    __slots__ = ("_log_route", "_log_route_for", "cache_memo", "evaluate_filters", "filter_memo",
                 "filters", "limiter", "memo_filters", "memo_host", "memo_user_agent", "policy",
                 "site")

    def __init__(self, site: Site) -> None:
        self.site = site
        self.filters = CompiledFilters.from_rules(site.filters)
        self.limiter: RateLimiter | None = self.filters.new_rate_limiter()
        self.policy = CachePolicy.from_policy(site.cache_policy)
        # Most sites have no rules: skip building a RequestHead for them entirely.
        self.evaluate_filters = bool(site.filters) or site.https_redirect or site.hsts
        self._log_route = b""
        self._log_route_for: tuple[Tenant, Host] | None = None
        self.cache_memo: dict[MemoKey, tuple[Any, bytes, bytes]] = {}
        """(method, target, Host, Accept-Encoding, scheme) → (verdict, encoding variant, cache key) for
        requests without cache-relevant headers; cleared when full."""
        # After the IP rules, evaluate_filters() is a pure function of the scheme, the method,
        # the target and three headers, except for the rate limit (it spends a token, per
        # client) and Basic auth (the memo would hold credentials): without those, that part's
        # outcome is remembered per request shape (any client), and only the inputs the rules
        # actually read are part of the key.
        filters = self.filters
        self.memo_filters = self.limiter is None and not filters.auth_areas
        self.memo_user_agent = bool(filters.ua_deny)
        self.memo_host = site.https_redirect
        self.filter_memo: dict[FilterMemoKey, tuple[Decision, bytes]] = {}
        """(scheme, method, target, User-Agent if read, Host if read) → (the decision of
        :func:`httpproxy.rules.evaluate_after_ip`, the response headers it adds as bytes)."""

    def memo_entries(self) -> int:
        """Entries in this site's memos (cache decisions, filter outcomes, IP verdicts)."""
        return len(self.cache_memo) + len(self.filter_memo) + len(self.filters.ip_verdicts)

    def forget_memos(self) -> None:
        self.cache_memo.clear()
        self.filter_memo.clear()
        self.filters.ip_verdicts.clear()

    def log_route(self, tenant: Tenant, host: Host) -> bytes:
        """The access log's site/tenant/host fields, built once per route."""
        cached = self._log_route_for
        if cached is None or cached[0] is not tenant or cached[1] is not host:
            self._log_route_for = (tenant, host)
            self._log_route = (f'"site":"{self.site.hostname}","tenant":"{tenant.name}",'
                               f'"host":"{host.name}"').encode()
        return self._log_route


ROUTES_MAX = 10_000
"""Resolved Host headers remembered per worker (see :class:`Route`); the oldest is dropped
when full."""


class Route:
    """What a request with exactly these Host header bytes is routed to, resolved once.

    Only routes whose site, tenant and host were all fresh in the directory cache and whose
    tenant and host are active are remembered. :attr:`HttpEngine.routes` is cleared on every
    change the feed applies, and a route is used only until ``expires``: the first expiry of
    the directory cache answers it was resolved from. So a route is never older than a change
    the directory has seen and never outlives the directory cache's own TTL.

    (It used to be cleared once a second instead. With thousands of Host names in use, that
    sent every name's first request of each second through the full lookup again, and made a
    proxied request with 20,000 names cost ~1.6x one with a single name.)
    """

    __slots__ = ("backend_key", "expires", "host", "host_json", "host_str", "log_route", "site",
                 "state", "tenant")

    def __init__(self, host_str: str, site: Site, tenant: Tenant, host: Host, state: SiteState,
                 backend_key: BackendKey | None, host_json: bytes, expires: float) -> None:
        self.expires = expires
        """On the directory's clock (:attr:`edge.directory.directory.Directory.clock`)."""
        self.host_str = host_str
        self.site = site
        self.tenant = tenant
        self.host = host
        self.state = state
        self.backend_key = backend_key
        """The pool key, unless the host wants a PROXY header (that depends on the client)."""
        self.host_json = host_json
        self.log_route = state.log_route(tenant, host)


class HttpEngine:
    """Per-worker state shared by the plain and TLS listeners: directory, backend pools,
    content cache, limiters, access log."""

    def __init__(self, context: ProxyContext) -> None:
        self.context = context
        self.loop = asyncio.get_running_loop()
        self.config = context.config
        self.settings = context.config.http
        self.directory = context.directory
        self.stats = LocalStats()
        self.pool = BackendPool(size=self.settings.pool_size,
                                idle_timeout=self.settings.pool_idle_timeout,
                                connect_timeout=self.settings.backend_connect_timeout,
                                response_timeout=self.settings.backend_timeout,
                                ca_file=self.settings.backend_ca_file)
        self.cache: ContentCache | None = (
            ContentCache(self.settings.cache_max_bytes) if self.settings.cache_max_bytes else None)
        self.max_object_bytes = self.cache.max_object_bytes if self.cache is not None else 0
        self.access_log = AccessLog(self.settings.access_log, _access_line)
        trusted = self.settings.trusted_proxies
        self.proxy_policy = ProxyHeaderPolicy("optional", trusted) if trusted else None
        self._trusted = {"http": ProxyHeaderPolicy("off", trusted).networks,
                         "https": ProxyHeaderPolicy("off", self.config.https.trusted_proxies).networks}
        self._sites: dict[str, SiteState] = {}
        self.memo_entries = 0
        """Entries added to per-site memos since they were last all forgotten."""
        self.memo_resets = 0
        self.routes: dict[bytes, Route] = {}
        """Raw Host header → :class:`Route` (the warm path skips decoding and three lookups)."""
        cap = self.settings.max_connections_per_ip
        self.per_address: ConnectionCap | None = ConnectionCap(cap) if cap else None
        """Open client connections per client address (slowloris crowds from one address)."""
        self.connections: set[ClientConnection] = set()
        self._open_by_scheme: dict[str, int] = {"http": 0, "https": 0}
        self.draining = False
        self._closed = False
        self._idle = asyncio.Event()
        self._idle.set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.refreshes = 0
        context.feed.subscribe(self._on_change)
        self._export_task = self.loop.create_task(self._export_loop(), name="edge-http-metrics")

    # -- the interface the listeners use --------------------------------------------------------

    def connection(self, *, scheme: str, sni_site: Site | None = None,
                   client_address: tuple[str, int] | None = None) -> asyncio.Protocol:
        """A new protocol for one client connection. scheme "http"/"https"; sni_site = the
        site the TLS SNI matched (Host must belong to it else 421); client_address overrides
        transport peername (PROXY protocol)."""
        return ClientConnection(self, scheme, sni_site, client_address)

    def active_sessions(self, scheme: str | None = None) -> int:
        """Client connections open now: all of them, or those of one scheme ("http"/"https"),
        so each listener reports its own in ``edge_active_sessions``."""
        if scheme is None:
            return len(self.connections)
        return self._open_by_scheme.get(scheme, 0)

    def drain(self) -> None:
        """Finish what is in progress with ``Connection: close``; close idle connections."""
        self.draining = True
        for conn in list(self.connections):
            conn.close_if_idle()

    async def wait_idle(self, timeout: float) -> None:  # noqa: ASYNC109 - mirrors the Proxy API
        """Return when no client connection is left or after ``timeout`` seconds."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout)

    async def close(self) -> None:
        """Close every client connection and backend connection; flush the access log."""
        if self._closed:
            return
        self._closed = True
        self.draining = True
        for conn in list(self.connections):
            conn.abort()
        self.pool.close()
        self._export_task.cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.sleep(0)
        self.export_metrics()
        self.access_log.close()
        _ENGINES.pop(id(self.directory), None)

    # -- used by ClientConnection -------------------------------------------------------------

    def opened(self, conn: ClientConnection) -> None:
        if conn not in self.connections:
            self.connections.add(conn)
            self._open_by_scheme[conn.scheme] = self._open_by_scheme.get(conn.scheme, 0) + 1
        self._idle.clear()
        if conn.scheme == "http":  # the TLS listener counts its own connections
            edge_metrics.CONNECTIONS.labels(proxy="http").inc()

    def admit(self, conn: ClientConnection) -> bool:
        """Take a slot for ``conn``'s client address; False (counted) when it has its cap."""
        cap = self.per_address
        if cap is None:
            return True
        if cap.try_acquire(conn.client_ip):
            conn.cap_key = conn.client_ip
            return True
        self.stats.refused["per_ip_cap"] += 1
        return False

    def closed(self, conn: ClientConnection) -> None:
        if conn.cap_key is not None and self.per_address is not None:
            self.per_address.release(conn.cap_key)
            conn.cap_key = None
        if conn in self.connections:
            self.connections.discard(conn)
            self._open_by_scheme[conn.scheme] -= 1
        if not self.connections:
            self._idle.set()

    def is_trusted(self, scheme: str, ip: str) -> bool:
        """Whether X-Forwarded-*/Forwarded and PROXY headers from ``ip`` are believed."""
        networks = self._trusted.get(scheme, ())
        return bool(networks) and is_trusted(ip, networks)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run a slow-path coroutine (lookup, connect) as a task kept until it ends."""
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("HTTP request task failed", exc_info=task.exception())

    def site_state(self, site: Site) -> SiteState:
        state = self._sites.get(site.hostname)
        if state is None or state.site is not site:
            if len(self._sites) >= SITE_STATES_MAX:
                self._sites.pop(next(iter(self._sites)))
            state = self._sites[site.hostname] = SiteState(site)
        return state

    def remember_cache(self, state: SiteState, key: MemoKey, value: tuple[Any, bytes, bytes]) -> None:
        """Remember a cache decision for ``state``'s site (see :attr:`SiteState.cache_memo`)."""
        memo = state.cache_memo
        if len(memo) >= CACHE_MEMO_MAX:
            memo.clear()
        memo[key] = value
        self.memo_grew()

    def remember_filters(self, state: SiteState, key: FilterMemoKey,
                         value: tuple[Decision, bytes]) -> None:
        """Remember a filter outcome for ``state``'s site (see :attr:`SiteState.filter_memo`)."""
        memo = state.filter_memo
        if len(memo) >= FILTER_MEMO_MAX:
            memo.clear()
        memo[key] = value
        self.memo_grew()

    def memo_grew(self, entries: int = 1) -> None:
        """Count entries added to any site's memos; at :data:`MEMO_ENTRIES_MAX` forget them
        all (every site state, including those only remembered routes still hold)."""
        self.memo_entries += entries
        if self.memo_entries >= MEMO_ENTRIES_MAX:
            self.memo_entries = 0
            self.memo_resets += 1
            for state in self._sites.values():
                state.forget_memos()
            for route in self.routes.values():
                route.state.forget_memos()

    def remember_route(self, raw: bytes, name: str, req: Request, site: Site, tenant: Tenant,
                       host: Host, state: SiteState, backend_key: BackendKey | None) -> Route:
        """The :class:`Route` for Host header bytes ``raw`` (normalised: ``name``), kept in
        :attr:`routes` unless one of the answers it came from has already expired (an answer
        served in its refresh window: the refreshed one will be remembered instead)."""
        directory = self.directory
        expires = directory.route_expiry(name, site, tenant)
        route = Route(req.host_header, site, tenant, host, state, backend_key,
                      _json_bytes(raw, 256), expires)
        if expires > directory.clock():
            routes = self.routes
            if len(routes) >= ROUTES_MAX:
                del routes[next(iter(routes))]
            routes[raw] = route
        return route

    def finished(self, conn: ClientConnection, req: Request) -> None:
        """Account for one answered request (access log, counters)."""
        started = req.started
        duration = _perf_counter() - started if started else 0.0
        status = req.status
        stats = self.stats
        # LocalStats.observe() inlined: once per request.
        stats.status[status // 100 if status < 600 else 5] += 1
        stats.latency.observe(duration)
        traffic = conn._traffic
        traffic[0] += req.bytes_out
        traffic[1] += len(req.head_bytes) + req.body_size
        cache_result = req.cache_result
        if cache_result is not None:
            stats.cache[cache_result] += 1
        access_log = self.access_log
        if access_log.buffered:
            # Formatted by hand: json.dumps of a dict costs several times more than this, and
            # this runs once per request. Names from the directory are validated hostnames
            # and identifiers; everything the client chose goes through the JSON escaper.
            # The line itself is formatted by _access_line() at the next flush, in a batch.
            resolved = req.route
            if resolved is not None:
                route, host_json = resolved.log_route, resolved.host_json
            else:
                state, site, tenant, host = req.state, req.site, req.tenant, req.host
                if state is not None and tenant is not None and host is not None:
                    route = state.log_route(tenant, host)
                elif site is not None:
                    route = b'"site":"%b","tenant":null,"host":null' % site.hostname.encode()
                else:
                    route = b'"site":null,"tenant":null,"host":null'
                host_json = None
            access_log.add((conn._log_prefix, _time(), req.method, host_json, req.host_raw,
                            req.target, route, status, req.bytes_out, req.body_size, duration,
                            cache_result))
            return
        if not access_log.enabled:
            return
        site, tenant, host = req.site, req.tenant, req.host
        access_log.record({
            "client": conn.client_ip, "scheme": conn.scheme, "method": req.method.decode("latin-1"),
            "host_header": req.host_header[:256], "path": req.target[:1024].decode("latin-1"),
            "site": site.hostname if site is not None else None,
            "tenant": tenant.name if tenant is not None else None,
            "host": host.name if host is not None else None,
            "status": status, "bytes": req.bytes_out, "request_bytes": req.body_size,
            "duration_ms": round(duration * 1000, 3), "cache": cache_result,
        })

    # -- content cache -------------------------------------------------------------------------

    def cache_key(self, req: Request, path: str, accept_encoding: str | None, scheme: str) -> bytes:
        return cache_key(req.host_header, path, accept_encoding, scheme=scheme)

    def cache_end_flight(self, req: Request, entry: CacheEntry | None) -> None:
        flight, key = req.flight, req.cache_key
        req.flight = None
        req.store = False
        if flight is not None and key is not None and self.cache is not None:
            self.cache.end_flight(key, flight, entry)

    def cache_store(self, req: Request) -> None:
        """Store the response ``req`` captured (called at its end)."""
        capture, verdict, key, site = req.capture, req.verdict, req.cache_key, req.site
        req.capture = None
        entry: CacheEntry | None = None
        if (self.cache is not None and capture is not None and verdict is not None
                and key is not None and site is not None and req.method == b"GET"):
            entry = CacheEntry(key, site.hostname, target_text(req.target).partition("?")[0],
                               req.status, req.capture_head, b"".join(capture), ttl=verdict.ttl,
                               swr=verdict.stale_while_revalidate, sie=verdict.stale_if_error,
                               stored_at=verdict.stored_at)
            if not self.cache.put(entry):
                entry = None
        self.cache_end_flight(req, entry)

    def refresh(self, req: Request, key: bytes) -> None:
        """Stale-while-revalidate: fetch ``req`` again in the background (once per key)."""
        if self.cache is None or self.cache.flight(key) is not None:
            return
        flight = self.cache.begin_flight(key)
        self.refreshes += 1
        self.spawn(_Refresh(self, req, key, flight).run())

    def _on_change(self, change: Change) -> None:
        # Any change may touch a remembered route (site, tenant, host, state): forget them all.
        self.routes.clear()
        if change.entity == "purge" and self.cache is not None:
            slash = change.name.find("/")
            site, path = (change.name, "") if slash < 0 else (change.name[:slash], change.name[slash:])
            dropped = self.cache.purge(site, path)
            log.info("cache purge", extra={"site": site, "path": path, "objects": dropped})
        elif change.entity == "all" and self.cache is not None:
            self.cache.clear()

    # -- metrics ----------------------------------------------------------------------------------

    def export_metrics(self) -> None:
        self.stats.export(self.cache.size if self.cache is not None else 0)

    async def _export_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            try:
                self.export_metrics()
            except Exception:  # metrics must never stop serving
                log.exception("exporting HTTP metrics failed")


class _Refresh:
    """A background fetch that only fills the cache (stale-while-revalidate)."""

    def __init__(self, engine: HttpEngine, req: Request, key: bytes, flight: Any) -> None:
        self.engine = engine
        self.key = key
        self.flight = flight
        self.head = req.head_bytes
        self.backend_key = req.backend_key
        self.site = req.site
        self.state = req.state
        self.target = req.target
        self.status = 0
        self.capture: list[bytes] | None = None
        self.headbytes = b""
        self.verdict: Any = None
        self.size = 0
        self.done = asyncio.get_running_loop().create_future()

    async def run(self) -> None:
        engine = self.engine
        conn = engine.pool.acquire_nowait(self.backend_key)
        try:
            if conn is None:
                conn = await engine.pool.connect(self.backend_key)
            conn.send(self, self.head, head_request=False)
            await self.done
        except (OSError, TimeoutError):
            self._finish(None)
        finally:
            if not self.flight.done:
                self._finish(None)

    def _finish(self, entry: CacheEntry | None) -> None:
        if self.engine.cache is not None:
            self.engine.cache.end_flight(self.key, self.flight, entry)
        if not self.done.done():
            self.done.set_result(None)

    # ResponseSink
    def response_info(self, raw: bytes) -> None:
        pass

    def response_start(self, conn: BackendConnection, status: int, head: bytes, rest: bytes) -> None:
        from httpproxy.cachepolicy import response_storability, strip_fields
        from httpproxy.connection import _parse_head

        self.status = status
        assert self.state is not None
        verdict = response_storability(status, _parse_head(head), self.state.policy, time.time(),
                                       path=target_text(self.target))
        if status >= 500 or not verdict.store or is_close_delimited(head, status):
            conn.abort()
            self._finish(None)
            return
        self.verdict = verdict
        self.headbytes = strip_fields(head, self.state.policy.store_strip)
        self.capture = [rest]
        self.size = len(rest)

    def response_body(self, data: bytes) -> None:
        if self.capture is not None:
            self.size += len(data)
            if self.size > self.engine.max_object_bytes:
                self.capture = None
            else:
                self.capture.append(data)

    def response_end(self, conn: BackendConnection, reusable: bool) -> None:
        if reusable:
            self.engine.pool.release(conn)
        else:
            conn.close()
        entry = None
        cache = self.engine.cache
        if self.capture is not None and self.site is not None and cache is not None:
            entry = CacheEntry(self.key, self.site.hostname,
                               target_text(self.target).partition("?")[0], self.status,
                               self.headbytes, b"".join(self.capture), ttl=self.verdict.ttl,
                               swr=self.verdict.stale_while_revalidate,
                               sie=self.verdict.stale_if_error,
                               stored_at=self.verdict.stored_at)
            if not cache.put(entry):
                entry = None
        self._finish(entry)

    def response_failed(self, conn: BackendConnection, kind: str) -> None:
        self._finish(None)

    def response_upgrade(self, conn: BackendConnection, head: bytes, rest: bytes) -> None:
        conn.abort()
        self._finish(None)

    def backend_paused(self) -> None:
        pass

    def backend_resumed(self) -> None:
        pass


_ENGINES: dict[int, HttpEngine] = {}


def shared_engine(context: ProxyContext) -> HttpEngine:
    """One engine per worker process, shared by HttpProxy and HttpsProxy (created on first call)."""
    key = id(context.directory)
    engine = _ENGINES.get(key)
    if engine is None or engine._closed:
        engine = _ENGINES[key] = HttpEngine(context)
    return engine


class HttpProxy:
    """The plain-HTTP listener (registry name ``http``); requests go to the shared engine."""

    def __init__(self, context: ProxyContext) -> None:
        self.context = context
        self.engine: HttpEngine | None = None
        self.servers: list[asyncio.Server] = []

    async def start(self, sockets: list[socket.socket]) -> None:
        engine = self.engine = shared_engine(self.context)
        loop = asyncio.get_running_loop()

        def factory() -> asyncio.Protocol:
            return engine.connection(scheme="http")

        for sock in sockets:
            self.servers.append(await loop.create_server(factory, sock=sock, backlog=4096))

    async def drain(self) -> None:
        for server in self.servers:
            server.close()
        if self.engine is not None:
            self.engine.drain()

    async def wait_closed(self, timeout: float) -> None:  # noqa: ASYNC109 - the interface
        if self.engine is not None:
            await self.engine.wait_idle(timeout)

    async def close(self) -> None:
        for server in self.servers:
            server.close()
        if self.engine is not None:
            await self.engine.close()

    def active_sessions(self) -> int:
        """Plain-HTTP connections only: the TLS listener reports its own (same engine)."""
        return self.engine.active_sessions("http") if self.engine is not None else 0
