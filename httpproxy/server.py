"""The HTTP edge: :class:`HttpEngine` (per-worker request handling shared by the plain and the
TLS listener) and :class:`HttpProxy` (the registry's ``http`` proxy: the plain listener).

Per request (:mod:`httpproxy.exchange`): Host → site (exact, then wildcard) → tenant → host
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
from typing import Any, NamedTuple, Protocol

from edge import metrics as edge_metrics
from edge.directory.model import Change, Host, Site, Tenant
from edge.directory.store import append_change
from edge.limits import ConnectionCap
from edge.logging import edge_stream_fd
from edge.proxyproto import ProxyHeaderPolicy, is_trusted
from edge.registry import ProxyContext
from httpproxy import websocket
from httpproxy.accesslog import LOGGER_NAME, AccessLog, stream_head, stream_ts
from httpproxy.cache import CacheEntry, ContentCache, Revalidation, entry_tags, url_key
from httpproxy.cacheflow import (
    head_fields,
    invalidation_targets,
    merge_not_modified,
    not_modified_update,
    revalidation_fields,
    secondary_key,
    vary_names,
)
from httpproxy.cachepolicy import (
    StoreTerms,
    StoreVerdict,
    cache_key,
    response_storability,
    store_terms,
    strip_fields,
    verdict_at,
)
from httpproxy.exchange import ClientInfo, Exchange
from httpproxy.front_h1 import ClientConnection
from httpproxy.http2 import choose_protocol
from httpproxy.metrics import LocalStats
from httpproxy.rules import RequestHead, target_text
from httpproxy.sitestate import (
    CACHE_MEMO_MAX,
    FILTER_MEMO_MAX,
    MEMO_ENTRIES_MAX,
    ROUTES_MAX,
    SITE_STATES_MAX,
    CacheMemo,
    CacheMemoKey,
    FilterMemo,
    FilterMemoKey,
    Route,
    SiteState,
)
from httpproxy.upstream import BackendConnection, BackendKey, BackendPool, is_close_delimited

__all__ = [
    "CACHE_MEMO_MAX", "FILTER_MEMO_MAX", "MEMO_ENTRIES_MAX", "ROUTES_MAX", "SITE_STATES_MAX",
    "HttpEngine", "HttpProxy", "Route", "SiteState", "shared_engine",
]

log = logging.getLogger("edge.http")
_json_str = json.encoder.encode_basestring_ascii
_perf_counter = time.perf_counter
_time = time.time
_ACCESS_LINE = (b'%b"ts":%b,"method":"%b","host_header":%b,"path":%b,%b,"status":%d,"bytes":%d,'
                b'"request_bytes":%d,"duration_ms":%.3f,"cache":%b}\n')
"""One access-log line, built as bytes in one formatting operation (the method is an HTTP
token llhttp validated; the Host and target are escaped by :func:`_json_bytes`)."""
_JSON_UNSAFE = re.compile(rb'[\x00-\x1f"\\\x7f-\xff]')
_CACHE_FIELD = {None: b"null", "HIT": b'"HIT"', "MISS": b'"MISS"', "STALE": b'"STALE"',
                "REVALIDATED": b'"REVALIDATED"',
                "BYPASS": b'"BYPASS"'}


def _json_bytes(value: bytes, limit: int) -> bytes:
    """A JSON string literal for raw header/target bytes (Latin-1), at most ``limit`` bytes."""
    value = value[:limit]
    if _JSON_UNSAFE.search(value) is None:
        return b'"' + value + b'"'
    return _json_str(value.decode("latin-1")).encode()


class AccessEntry(NamedTuple):
    """One request as :meth:`HttpEngine.finished` queues it for the access log (formatted into
    a line by :func:`_access_line` at the next flush, in a batch)."""

    prefix: bytes
    """The connection's ``{"client":...,"scheme":...,`` (:attr:`ClientInfo.log_prefix`)."""
    ts: float
    method: bytes
    host_json: bytes | None
    """The Host as a JSON string when the route knew it, else None (then from ``host_raw``)."""
    host_raw: bytes | None
    target: bytes
    route: bytes
    """The ``"site":...,"tenant":...,"host":...`` fields."""
    status: int
    bytes_out: int
    body_size: int
    duration: float
    cache_result: str | None


PUBLISH_INTERVAL = 0.05
"""Seconds between two invalidation transactions of one worker (the feed polls every 1 s)."""
PUBLISH_SITE_MAX = 32
"""URLs of one site in one invalidation batch beyond which the whole site is purged instead."""
_new_entry = tuple.__new__


def _access_line(entry: AccessEntry, stream: bool = False) -> bytes:
    """One access-log line from what :meth:`HttpEngine.finished` queued; ``stream``: as a
    line of the edge log (``ts`` as RFC 3339 text, the log fields first)."""
    # Unpacked in field order: on Python 3.11 each named read of a NamedTuple field is an
    # unspecialised attribute lookup (~12 of them per request cost ~3 % of a request's
    # instructions); the entry is still built and documented by name.
    (prefix, ts, method, host_json, host_raw, target, route, status, bytes_out, body_size, duration,
     cache_result) = entry
    if host_json is None:
        host_json = _json_bytes(host_raw or b"", 256)
    if stream:
        prefix = stream_head() + prefix[1:]
        ts_text = stream_ts(ts)
    else:
        ts_text = b"%.3f" % ts
    return _ACCESS_LINE % (prefix, ts_text, method, host_json, _json_bytes(target, 1024), route,
                           status, bytes_out, body_size, duration * 1000, _CACHE_FIELD[cache_result])


def _access_stream_line(entry: AccessEntry) -> bytes:
    return _access_line(entry, True)


class ClientSide(Protocol):
    """What the engine keeps of a client connection, HTTP/1 (ClientConnection) or HTTP/2
    (httpproxy.http2.H2Connection)."""

    scheme: str
    cap_key: str | None

    @property
    def client_ip(self) -> str:
        """The client's address (after a PROXY header)."""

    def close_if_idle(self) -> None:
        """Draining: close now when idle, else after what is in progress."""

    def shutdown(self) -> None:
        """Close at once (the worker stops)."""


class HttpEngine:
    """Per-worker state shared by the plain and TLS listeners: directory, backend pools,
    content cache, limiters, access log."""

    def __init__(self, context: ProxyContext) -> None:
        self.context = context
        self.sessions = context.sessions
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
        fd = edge_stream_fd(LOGGER_NAME) if self.settings.access_log == "" else -1
        self.access_log = AccessLog(self.settings.access_log,
                                    _access_stream_line if fd >= 0 else _access_line, stream_fd=fd)
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
        self.connections: set[ClientSide] = set()
        self._open_by_scheme: dict[str, int] = {"http": 0, "https": 0}
        self.draining = False
        self._closed = False
        self._idle = asyncio.Event()
        self._idle.set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.refreshes = 0
        self.cache_events = self.stats.cache_events
        """Cache event counters the connections increment (see LocalStats.cache_events)."""
        self._unpublished: dict[tuple[str, str], str] = {}
        """Invalidations for the change feed not yet written, (entity, name) → site (one
        transaction per batch)."""
        self._publishing = False
        context.feed.subscribe(self._on_change)
        self._export_task = self.loop.create_task(self._export_loop(), name="edge-http-metrics")

    # -- the interface the listeners use --------------------------------------------------------

    def connection(self, *, scheme: str, sni_site: Site | None = None,
                   client_address: tuple[str, int] | None = None,
                   certificate_names: tuple[str, ...] | None = None) -> asyncio.Protocol:
        """A new protocol for one client connection. scheme "http"/"https"; sni_site = the
        site the TLS SNI matched (Host must belong to it else 421); client_address overrides
        transport peername (PROXY protocol); certificate_names (TLS with ALPN h2 offered): the
        connection may be HTTP/2 (httpproxy.http2), which serves requests for these names."""
        if certificate_names is not None or (scheme == "http" and self.settings.h2c
                                             and self.proxy_policy is None):
            return choose_protocol(self, scheme, sni_site, client_address, certificate_names or ())
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
            conn.shutdown()
        self.pool.close()
        self._export_task.cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.sleep(0)
        self.export_metrics()
        self.access_log.close()
        _ENGINES.pop(id(self.directory), None)

    # -- used by ClientConnection -------------------------------------------------------------

    def opened(self, conn: ClientSide) -> None:
        if conn not in self.connections:
            self.connections.add(conn)
            self._open_by_scheme[conn.scheme] = self._open_by_scheme.get(conn.scheme, 0) + 1
        self._idle.clear()
        if conn.scheme == "http":  # the TLS listener counts its own connections
            edge_metrics.CONNECTIONS.labels(proxy="http").inc()

    def admit(self, conn: ClientSide) -> bool:
        """Take a slot for ``conn``'s client address; False (counted) when it has its cap."""
        cap = self.per_address
        if cap is None:
            return True
        if cap.try_acquire(conn.client_ip):
            conn.cap_key = conn.client_ip
            return True
        self.stats.refused["per_ip_cap"] += 1
        return False

    def closed(self, conn: ClientSide) -> None:
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

    def remember_cache(self, state: SiteState, key: CacheMemoKey, value: CacheMemo) -> None:
        """Remember a cache decision for ``state``'s site (see :attr:`SiteState.cache_memo`)."""
        memo = state.cache_memo
        if len(memo) >= CACHE_MEMO_MAX:
            memo.clear()
        memo[key] = value
        self.memo_grew()

    def remember_filters(self, state: SiteState, key: FilterMemoKey,
                         value: FilterMemo) -> None:
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

    def remember_route(self, raw: bytes, name: str, host_str: str, site: Site, tenant: Tenant,
                       host: Host, state: SiteState, backend_key: BackendKey | None) -> Route:
        """The :class:`Route` for Host header bytes ``raw`` (normalised: ``name``), kept in
        :attr:`routes` unless one of the answers it came from has already expired (an answer
        served in its refresh window: the refreshed one will be remembered instead)."""
        directory = self.directory
        expires = directory.route_expiry(name, site, tenant)
        route = Route(host_str, site, tenant, host, state, backend_key,
                      _json_bytes(raw, 256), expires)
        if expires > directory.clock():
            routes = self.routes
            if len(routes) >= ROUTES_MAX:
                del routes[next(iter(routes))]
            routes[raw] = route
        return route

    def finished(self, client: ClientInfo, req: Exchange) -> None:
        """Account for one answered request (access log, counters)."""
        started = req.started
        duration = _perf_counter() - started if started else 0.0
        status = req.status
        stats = self.stats
        # LocalStats.observe() inlined: once per request.
        stats.status[status // 100 if status < 600 else 5] += 1
        stats.latency.observe(duration)
        traffic = client.traffic
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
            # tuple.__new__: the entry without a call to AccessEntry.__new__ (Python, 12 args).
            access_log.add(_new_entry(AccessEntry, (
                client.log_prefix, _time(), req.method, host_json, req.host_raw, req.target,
                route, status, req.bytes_out, req.body_size, duration, cache_result)))
            return
        if not access_log.enabled:
            return
        site, tenant, host = req.site, req.tenant, req.host
        access_log.record({
            "client": client.ip, "scheme": client.scheme, "method": req.method.decode("latin-1"),
            "host_header": req.host_header[:256], "path": req.target[:1024].decode("latin-1"),
            "site": site.hostname if site is not None else None,
            "tenant": tenant.name if tenant is not None else None,
            "host": host.name if host is not None else None,
            "status": status, "bytes": req.bytes_out, "request_bytes": req.body_size,
            "duration_ms": round(duration * 1000, 3), "cache": cache_result,
        })

    # -- content cache -------------------------------------------------------------------------

    def cache_key(self, req: Exchange, path: str, accept_encoding: str | None, scheme: str) -> bytes:
        return cache_key(req.host_header, path, accept_encoding, scheme=scheme)

    def cache_end_flight(self, req: Exchange, entry: CacheEntry | None) -> None:
        flight, key = req.flight, req.cache_key
        req.flight = None
        req.store = False
        if flight is not None and key is not None and self.cache is not None:
            self.cache.end_flight(key, flight, entry)

    def cache_store(self, req: Exchange) -> None:
        """Store the response ``req`` captured (called at its end)."""
        capture, verdict, key, site = req.capture, req.verdict, req.cache_key, req.site
        req.capture = None
        entry: CacheEntry | None = None
        if (self.cache is not None and capture is not None and verdict is not None
                and key is not None and site is not None and req.method == b"GET"):
            entry = self.store_entry(key, site, req.target, req.headers, req.status,
                                     req.capture_head, b"".join(capture), verdict,
                                     fields=req.capture_fields)
        self.cache_end_flight(req, entry)

    def store_entry(self, key: bytes, site: Site, target: bytes,
                    request: list[tuple[bytes, bytes]], status: int, head: bytes, body: bytes,
                    verdict: StoreVerdict, *,
                    fields: dict[str, str] | None = None) -> CacheEntry | None:
        """Build and store an entry (a variant when the response has Vary: its secondary key
        from ``request``'s fields; ``fields``: head's, when already parsed); ``head`` is
        already stripped of ``policy.store_strip``, ``verdict`` says when it arrived with
        what age (``stored_at``, RFC 9111 §4.2.3). Returns the entry, or None when it was
        not stored."""
        assert self.cache is not None
        if fields is None:
            fields = head_fields(head)
        vary = vary_names(fields.get("vary"))
        if vary is None:
            return None
        secondary = b""
        if vary:
            request_fields = RequestHead.from_pairs(b"GET", target, request).headers
            secondary = secondary_key(vary, request_fields)
        entry = CacheEntry(key, site.hostname, target_text(target).partition("?")[0], status,
                           head, body, ttl=verdict.ttl, swr=verdict.stale_while_revalidate,
                           sie=verdict.stale_if_error, vary=vary, secondary=secondary,
                           tags=entry_tags(fields), stored_at=verdict.stored_at,
                           validators=revalidation_fields(fields))
        return entry if self.cache.put(entry) else None

    def cache_update(self, stored: CacheEntry, head_304: bytes, state: SiteState, site: Site,
                     target: bytes, request: list[tuple[bytes, bytes]], *,
                     authorization: bool = False) -> CacheEntry | None:
        """The origin validated ``stored`` with a 304 (RFC 9111 §4.3.4): store its head
        updated by the 304's fields, its age counted from the 304 (its Date and Age, §4.2.3).
        ``authorization``: the validating request carried Authorization (§3.5). Returns the
        stored update, or None when the updated response may no longer be stored (then it is
        dropped)."""
        assert self.cache is not None
        self.cache_events["revalidated"] += 1
        policy = state.policy
        memo = stored.revalidation
        terms: StoreTerms | StoreVerdict
        known = (memo.reuse(stored.head, head_304, policy, target, authorization)
                 if memo is not None else None)
        if memo is not None and known is not None:
            update, terms = known, memo.terms
            if known is not memo.update:
                memo = memo._replace(update=known)
        else:
            # Decided on the fields as merged (the 304's targeted Cache-Control counts).
            update = not_modified_update(stored.head, head_304, policy.store_strip)
            terms = store_terms(stored.status, update.fields, policy, path=target_text(target),
                                authorization=authorization)
            memo = None
        if isinstance(terms, StoreVerdict):
            verdict = terms  # refused whatever the time
        else:
            verdict = verdict_at(terms, update.fields, policy, time.time())
            if memo is None:
                memo = Revalidation(update, policy, target, authorization, terms)
        if verdict.store and update.vary == stored.vary and self.cache.update(
                stored, update.head, ttl=verdict.ttl, swr=verdict.stale_while_revalidate,
                sie=verdict.stale_if_error, stored_at=verdict.stored_at, tags=update.tags,
                validators=update.validators):
            stored.revalidation = memo
            return stored  # the usual case: same key, updated in place
        self.cache.remove(stored.key)
        if not verdict.store:
            return None
        return self.store_entry(stored.primary, site, target, request, stored.status,
                                update.head, stored.body, verdict, fields=dict(update.fields))

    def cache_revalidated(self, req: Exchange, stored: CacheEntry, head_304: bytes) -> CacheEntry:
        """:meth:`cache_update` for a client's request: ends its flight with the update and
        returns what to serve it (the updated response even when it is no longer stored)."""
        assert req.state is not None and req.site is not None
        entry = self.cache_update(stored, head_304, req.state, req.site, req.target, req.headers,
                                  authorization=req.authorization is not None)
        self.cache_end_flight(req, entry)
        if entry is None:
            # Served to this client only: the 304's fields, minus our targeted ones (RFC 9213).
            head = strip_fields(merge_not_modified(stored.head, head_304),
                                req.state.policy.forward_strip)
            entry = CacheEntry(stored.primary, stored.site, stored.path, stored.status, head,
                               stored.body, ttl=0.0, swr=0.0, sie=0.0)
        return entry

    # -- invalidation (RFC 9111 §4.4) ------------------------------------------------------------

    def invalidate(self, req: Exchange, status: int, head: bytes) -> None:
        """An unsafe method succeeded: drop its target and same-origin Location /
        Content-Location here at once, and on every other worker through the change feed."""
        if self.cache is None:
            return
        targets = invalidation_targets(req.method, status, req.host_header,
                                       target_text(req.target), head_fields(head))
        assert req.site is not None
        site = req.site.hostname
        host = cache_key(req.host_header, "", None).split(b"\0")[1].decode("latin-1")
        for target in targets:
            self.cache_events["invalidated_urls"] += 1
            self.cache.purge_url(url_key(cache_key(req.host_header, target, None)))
            name = host + target
            if len(name) > 255 or not name.isascii():
                # Too long for the feed's name column: the whole site is dropped instead
                # (more than needed, never less).
                self._publish("purge", site, site)
            else:
                self._publish("invalidate", name, site)

    def _publish(self, entity: str, name: str, site: str) -> None:
        self._unpublished[(entity, name)] = site
        if not self._publishing:
            self._publishing = True
            self.spawn(self._publish_batch())

    @staticmethod
    def _coalesce(pending: dict[tuple[str, str], str]) -> list[tuple[str, str]]:
        """The rows for a batch: a site with more than PUBLISH_SITE_MAX URLs in it gets one
        site purge instead (a POST flood cannot turn into a flood of feed rows that every
        worker of the fleet reads)."""
        per_site: dict[str, int] = {}
        for site in pending.values():
            per_site[site] = per_site.get(site, 0) + 1
        rows = [key for key, site in pending.items() if per_site[site] <= PUBLISH_SITE_MAX]
        rows += [("purge", site) for site, count in per_site.items() if count > PUBLISH_SITE_MAX]
        return rows

    async def _publish_batch(self) -> None:
        """Write the pending invalidations in one transaction, at most one transaction per
        PUBLISH_INTERVAL (what arrives meanwhile goes in the next). A failure is logged;
        this worker's own copies are already gone."""
        try:
            while self._unpublished:
                batch = self._coalesce(self._unpublished)
                self._unpublished.clear()
                try:
                    async with self.directory.store.transaction() as tx:
                        for entity, name in batch:
                            await append_change(tx, entity, name)
                except Exception as exc:  # the database is down or read-only: serve on
                    self.cache_events["publish_failures"] += 1
                    log.warning("cache invalidation not published to the change feed: %s", exc)
                await asyncio.sleep(PUBLISH_INTERVAL)
        finally:
            self._publishing = False

    def refresh(self, req: Exchange, key: bytes, stored: CacheEntry) -> None:
        """Stale-while-revalidate: fetch ``req`` again in the background (once per key),
        conditionally when ``stored`` has validators (a 304 updates it)."""
        if self.cache is None or self.cache.flight(key) is not None:
            return
        flight = self.cache.begin_flight(key)
        self.refreshes += 1
        self.spawn(_Refresh(self, req, key, flight, stored).run())

    def _on_change(self, change: Change) -> None:
        # Any change may touch a remembered route (site, tenant, host, state): forget them all.
        self.routes.clear()
        websocket.on_change(self.context, change, self.spawn)  # open WebSockets: session policy
        cache = self.cache
        if cache is None:
            return
        entity, name = change.entity, change.name
        if entity == "purge":
            slash = name.find("/")
            site, path = (name, "") if slash < 0 else (name[:slash], name[slash:])
            dropped = cache.purge(site, path)
            log.info("cache purge", extra={"site": site, "path": path, "objects": dropped})
        elif entity in ("invalidate", "purge-url"):
            slash = name.find("/")
            if slash > 0:
                dropped = cache.purge_url(url_key(cache_key(name[:slash], name[slash:], None)))
                if entity == "purge-url":
                    log.info("cache purge", extra={"url": name, "objects": dropped})
        elif entity == "purge-tag":
            site, _, tag = name.partition(" ")
            dropped = cache.purge_tag(site, tag)
            log.info("cache purge", extra={"site": site, "tag": tag, "objects": dropped})
        elif entity == "all":
            cache.clear()

    # -- metrics ----------------------------------------------------------------------------------

    def export_metrics(self) -> None:
        cache = self.cache
        if cache is not None:
            self.cache_events["evictions"] = cache.evictions
            self.cache_events["invalidations"] = cache.invalidations
        self.stats.export(cache.size if cache is not None else 0)

    async def _export_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            try:
                self.export_metrics()
            except Exception:  # metrics must never stop serving
                log.exception("exporting HTTP metrics failed")


"""A response head's first Age line (the strict response parser allows no space before the
colon); RFC 9111 §5.1 reads only the first member anyway."""


class _Refresh:
    """A background fetch that only fills the cache (stale-while-revalidate)."""

    def __init__(self, engine: HttpEngine, req: Exchange, key: bytes, flight: Any,
                 stored: CacheEntry) -> None:
        self.engine = engine
        self.key = key
        self.flight = flight
        self.stored = stored
        self.updated: CacheEntry | None = None
        self.head = req.head_bytes
        if stored.validators:  # RFC 9111 §4.3.1 (req's own conditionals are not in it)
            self.head = self.head[:-2] + stored.validators + b"\r\n"
            engine.cache_events["revalidations"] += 1
        self.backend_key = req.backend_key
        self.site = req.site
        self.state = req.state
        self.target = req.target
        self.request = req.headers
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
        self.status = status
        assert self.state is not None
        if status == 304 and self.stored.validators and self.site is not None:
            self.updated = self.engine.cache_update(self.stored, head, self.state, self.site,
                                                    self.target, self.request)
            return  # stored at response_end (no content follows a 304)
        verdict = response_storability(status, head_fields(head), self.state.policy, time.time(),
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
        if self.updated is not None:
            self._finish(self.updated)
            return
        entry = None
        cache = self.engine.cache
        if self.capture is not None and self.site is not None and cache is not None:
            entry = self.engine.store_entry(self.key, self.site, self.target, self.request,
                                            self.status, self.headbytes, b"".join(self.capture),
                                            self.verdict)
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
