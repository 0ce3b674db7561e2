"""One request through the edge, whatever HTTP version it came in on: the exchange.

A front end (:mod:`httpproxy.front_h1` for HTTP/1; an HTTP/2 or QUIC one the same way)
turns its protocol's bytes into an :class:`Exchange` and the exchange's answer back into its
protocol's bytes. In between, the exchange does the same steps for every version:

    route (Host / :authority → site, tenant, host through the directory cache)
    → filters (IP rules, then the memoised rest: deny, auth, redirects, HSTS headers)
    → content cache (memoised decision, lookup, stale-while-revalidate, single flight)
    → forward (pooled HTTP/1.1 backend connection, one retry on a dead pooled one)
    → response (to the front end's :class:`ResponseSink`)

It knows nothing of framing, ``Connection`` headers, keep-alive, pipelining or streams: it
reads an :class:`ExchangeRequest`'s fields, talks to the engine through
:class:`EngineServices` and answers through the sink. A front end:

1. builds the exchange when a request head is complete::

       ex = Exchange(services, client, sink, headers)   # headers: every (name, value) received
       ex.method, ex.target = b"GET", b"/path"           # origin-form (or b"*" for OPTIONS)
       for name, value in headers: ex.add_header(name, value)   # or the HTTP/1 reader's inline copy
       ex.content_length = ...  # -1 unknown (then sent to the backend chunked: ex.chunked = True)

2. calls :meth:`Exchange.start` when the request may be served (HTTP/1: when it is the
   oldest unanswered request on the connection; HTTP/2: at once, one exchange per stream);
3. feeds the request body with :meth:`Exchange.feed_body` / :meth:`Exchange.end_body`
   (before or after ``start``: bytes fed before are buffered), and honours
   :meth:`ResponseSink.pause_request_body` / ``resume_request_body`` (flow control from the
   backend side back to the client);
4. writes what the sink receives (``start``, ``body``, ``end`` or ``abort``), and calls
   :meth:`Exchange.pause_response` / :meth:`Exchange.resume_response` when its own output
   buffer is full / drained (flow control from the client back to the backend);
5. calls :meth:`Exchange.cancel` if its client goes away (or resets the stream) first.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from edge import sessionpolicy
from edge.directory.cache import Miss
from edge.directory.names import hostname_or_none
from edge.errors import DirectoryUnavailable
from edge.proxyproto import header_for_backend
from httpproxy import acme_http01, pages
from httpproxy.authority import Authority, forwarded_value, parse_authority, parse_host
from httpproxy.cacheflow import (
    SAFE_METHODS,
    Answer,
    answer_from_store,
    head_fields,
    strip_conditionals,
)
from httpproxy.cachepolicy import (
    Freshness,
    RequestAction,
    StoreVerdict,
    cache_key,
    encoding_variant,
    freshness,
    request_cacheability,
    response_storability,
    strip_fields,
)
from httpproxy.rules import RequestHead, evaluate_after_ip, ip_refusal, target_text
from httpproxy.sitestate import CacheMemo, FilterMemo
from httpproxy.upstream import BackendConnection, BackendKey, is_close_delimited

if TYPE_CHECKING:
    from edge.config import HttpConfig
    from edge.directory.directory import Directory, SiteRoute
    from edge.directory.model import Host, Site, Tenant
    from httpproxy.cache import CacheEntry, ContentCache, Flight
    from httpproxy.metrics import LocalStats
    from httpproxy.sitestate import CacheMemoKey, FilterMemoKey, Route, SiteState
    from httpproxy.upstream import BackendPool

__all__ = ["BODY_BUFFER_LIMIT", "ClientInfo", "EngineServices", "Exchange", "ResponseHead",
           "ResponseSink", "header_code"]

BODY_BUFFER_LIMIT = 1 << 20
"""Bytes of not-yet-forwarded request body buffered before the front end is told to stop
reading (:meth:`Exchange.feed_body`)."""


_CHUNKED = re.compile(rb"\r\ntransfer-encoding[ \t]*:[^\r\n]*\bchunked\b", re.IGNORECASE)


class ResponseHead(NamedTuple):
    """A response head in both forms a front end may want, the second computed only if asked.

    ``raw`` is what an HTTP/1.1 front end writes almost as is: the status line and header lines
    (each ending in CRLF, no blank line), from the backend with its hop-by-hop headers already
    removed (:func:`httpproxy.upstream.examine_head`), framing headers kept. ``extra`` holds the
    header lines the edge adds (``X-Cache``, ``Age``, HSTS, filter headers), same format. An
    HTTP/1 front end writes ``raw + extra + [Connection: close] + CRLF``: no parsing, no
    re-serialisation (the backend head gains of ``examine_head``/``HeadTemplate`` stay).

    :meth:`fields` is the status-free header list an HTTP/2 (or HTTP/3) front end encodes:
    lower-case names, ``raw`` then ``extra``, without ``Transfer-Encoding`` (HTTP/2 frames
    itself). ``chunked`` says whether the body bytes the sink receives are chunked-coded as
    the backend sent them (an HTTP/2 front end decodes them; HTTP/1 passes them through).

    A NamedTuple made with :data:`_new_head` (no Python-level ``__new__`` per response):
    nothing is computed until a front end asks.
    """

    status: int
    raw: bytes
    extra: bytes = b""

    @property
    def chunked(self) -> bool:
        """Whether the body bytes that follow are chunked-coded (``Transfer-Encoding: chunked``
        in ``raw``); computed on each call (HTTP/1 front ends never ask)."""
        return _CHUNKED.search(self.raw) is not None

    def fields(self) -> list[tuple[bytes, bytes]]:
        """The header fields as (lower-case name, value) pairs (parsed on each call: call once)."""
        fields = []
        for line in (self.raw + self.extra).split(b"\r\n")[1:]:
            name, sep, value = line.partition(b":")
            if not sep:
                continue
            lower = name.strip().lower()
            if lower == b"transfer-encoding":
                continue
            fields.append((lower, value.strip()))
        return fields


_new_head = tuple.__new__
"""``_new_head(ResponseHead, (status, raw, extra))``: a ResponseHead for the cost of a tuple."""


class ResponseSink(Protocol):
    """Where an :class:`Exchange` sends its answer: the front end of the request's connection
    (one sink may serve many exchanges: each call names the exchange). No method returns
    anything and none may raise.

    For one exchange the calls are: optionally ``info`` (1xx) any number of times, then
    ``start``, any number of ``body``, then ``end`` or ``abort``; or ``upgrade`` (101, only
    for an exchange the front end marked ``upgrade``). Errors before a response started are
    answered with a page (``start`` + ``end``), never ``abort``. ``exchange.must_close`` is
    set before ``start``/``end`` when the connection
    must not carry another request after this one (HTTP/1: add ``Connection: close``, close
    after ``end``; HTTP/2 may ignore it except on ``draining``)."""

    def info(self, exchange: Exchange, raw: bytes) -> None:
        """A 1xx interim response (not 101) as HTTP/1.1 bytes, blank line included."""

    def start(self, exchange: Exchange, head: ResponseHead, body: bytes) -> None:
        """The final response head and the first body bytes (maybe b""; see
        :attr:`ResponseHead.chunked`). ``exchange.head_request``: HEAD, send no body."""

    def body(self, exchange: Exchange, data: bytes) -> None:
        """More response body bytes. When the client side cannot take more, the front end
        calls :meth:`Exchange.pause_response` (and ``resume_response`` once drained)."""

    def end(self, exchange: Exchange) -> None:
        """The response is complete (the exchange is over: accounted, nothing more comes)."""

    def abort(self, exchange: Exchange) -> None:
        """The response broke off after ``start``: the client must not take what it got for a
        whole response (HTTP/1: reset the connection; HTTP/2: RST_STREAM)."""

    def upgrade(self, exchange: Exchange, data: bytes, transport: object) -> None:
        """101 from the backend for an upgrade (WebSocket) request: ``data`` (the head, blank
        line and what followed) goes to the client, then the front end relays between its
        client and ``transport`` (the backend's, now owned by the front end)."""

    def pause_request_body(self, exchange: Exchange) -> None:
        """The backend cannot take more request body now: stop reading it from the client."""

    def resume_request_body(self, exchange: Exchange) -> None:
        """The backend can take request body again."""


class ClientInfo:
    """What exchanges need of the client connection they came in on (one per connection,
    shared by all of its exchanges)."""

    __slots__ = ("fwd_bytes", "fwd_client", "fwd_host", "ip", "ip_bytes", "local", "local_lookup",
                 "log_prefix", "port", "scheme", "scheme_bytes", "sni_site", "traffic", "trusted")

    def __init__(self, scheme: str, ip: str, port: int, *, sni_site: Site | None = None,
                 trusted: bool = False, traffic: list[int] | None = None,
                 local_lookup: Callable[[], tuple[str, int] | None] | None = None) -> None:
        self.scheme = scheme
        """"http" or "https" (what the X-Forwarded-Proto and filter schemes say)."""
        self.scheme_bytes = scheme.encode("ascii")
        self.sni_site = sni_site
        """The site the TLS SNI matched: a request for another site is answered 421."""
        self.trusted = trusted
        """Whether X-Forwarded-For from this client is believed (a trusted proxy)."""
        self.traffic = traffic if traffic is not None else [0, 0]
        """[bytes out, bytes in] counters of this connection's listener (shared list)."""
        self.local_lookup = local_lookup
        """Returns our address of the connection (asked only for a PROXY header to a backend)."""
        self.local: tuple[str, int] | None = None
        self.ip = ip
        self.port = port
        self.ip_bytes = b""
        self.log_prefix = b""
        self.fwd_host: str | None = None
        self.fwd_bytes = b""
        self.set_address(ip, port)

    def set_address(self, ip: str, port: int) -> None:
        """The client's address (again, once a PROXY header named the real one)."""
        self.ip, self.port = ip, port
        self.fwd_host = None
        self.ip_bytes = ip.encode("ascii", "replace")
        self.log_prefix = f'{{"client":"{ip}","scheme":"{self.scheme}",'.encode()
        self.fwd_client = _forwarded_client_parts(self.ip_bytes, self.scheme_bytes)
        """This client's pieces of the X-Forwarded block (see :func:`_forwarded_client_parts`)."""


class EngineServices(Protocol):
    """The engine as an exchange sees it (:class:`httpproxy.server.HttpEngine` is one)."""

    settings: HttpConfig
    directory: Directory
    stats: LocalStats
    pool: BackendPool
    cache: ContentCache | None
    max_object_bytes: int
    draining: bool
    routes: dict[bytes, Route]
    """Raw Host bytes → :class:`httpproxy.sitestate.Route` (the warm path)."""

    def site_state(self, site: Site) -> SiteState:
        """The site's compiled filters, limiter and cache policy (and memos)."""

    def remember_route(self, raw: bytes, name: str, host_str: str, site: Site, tenant: Tenant,
                       host: Host, state: SiteState, backend_key: BackendKey | None) -> Route:
        """The route for Host bytes ``raw``, kept in :attr:`routes` when still fresh."""

    def remember_filters(self, state: SiteState, key: FilterMemoKey, value: FilterMemo) -> None: ...

    def remember_cache(self, state: SiteState, key: CacheMemoKey, value: CacheMemo) -> None: ...

    def memo_grew(self, entries: int = 1) -> None: ...

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run a slow-path coroutine (directory query, backend connect) as a kept task."""

    def finished(self, client: ClientInfo, exchange: Exchange) -> None:
        """Account for one answered exchange (access log, counters)."""

    def cache_end_flight(self, exchange: Exchange, entry: CacheEntry | None) -> None: ...

    def cache_store(self, exchange: Exchange) -> None: ...

    def refresh(self, exchange: Exchange, key: bytes, stored: CacheEntry) -> None:
        """Stale-while-revalidate: fetch the exchange's request again in the background
        (conditionally when ``stored`` has validators)."""

    cache_events: dict[str, int]
    """Cache event counters (:attr:`httpproxy.metrics.LocalStats.cache_events`)."""

    def cache_revalidated(self, exchange: Exchange, stored: CacheEntry, head_304: bytes
                          ) -> CacheEntry:
        """The origin's 304 validated ``stored``: returns the updated response to serve."""

    def invalidate(self, exchange: Exchange, status: int, head: bytes) -> None:
        """An unsafe method succeeded: invalidate its URIs here and fleet-wide."""


MEMO_KEY_BYTES = 1024
"""Target + the other request bytes in a memo key beyond which a request's filter outcome or
cache decision is not remembered (bounds :attr:`httpproxy.sitestate.SiteState.filter_memo`
and ``cache_memo`` per entry; :data:`httpproxy.sitestate.MEMO_ENTRIES_MAX` bounds the count)."""

log = logging.getLogger("edge.http")
_clock = time.perf_counter
"""Request timing (uvloop's loop.time() has millisecond steps: too coarse for latencies)."""

# Request headers by what we do with them; anything not listed is forwarded as it is.
# Hop-by-hop ones (RFC 9110 §7.6.1) are never forwarded; the X-Forwarded family is ours.
# Host and the framing (Content-Length / Transfer-Encoding) are never copied either: the
# backend's head states them from what we parsed and routed by (_build_head), so nothing a
# client lists in Connection can remove or change them.
(PLAIN, HOST, _TE, _CL, _EXPECT, _CONNECTION, DROP, _XFF, _UPGRADE, _AE, _CACHE, _UA,
 _AUTH) = range(13)
SPECIAL = {b"host": HOST, b"transfer-encoding": _TE, b"content-length": _CL, b"expect": _EXPECT,
           b"connection": _CONNECTION, b"keep-alive": DROP, b"proxy-connection": DROP,
           b"te": DROP, b"proxy-authorization": DROP, b"http2-settings": DROP,
           b"upgrade": _UPGRADE, b"x-forwarded-for": _XFF, b"x-forwarded-proto": DROP,
           b"x-forwarded-host": DROP, b"forwarded": DROP, b"x-real-ip": DROP,
           # What frameworks read beside ours (Rack: X-Forwarded-Ssl/-Scheme before
           # X-Forwarded-Proto; Symfony/Laravel/Rails: X-Forwarded-Port/-Prefix): from a
           # client they are unkeyed cache poisoning (a page cached with its links and
           # redirects to port 1 or https on a plain site), never something we vouch for.
           b"x-forwarded-port": DROP, b"x-forwarded-ssl": DROP, b"x-forwarded-scheme": DROP,
           b"x-forwarded-prefix": DROP, b"front-end-https": DROP, b"x-url-scheme": DROP,
           b"accept-encoding": _AE, b"authorization": _AUTH, b"cookie": _CACHE, b"range": _CACHE,
           b"user-agent": _UA,
           b"cache-control": _CACHE, b"pragma": _CACHE, b"if-none-match": _CACHE,
           b"if-modified-since": _CACHE, b"if-range": _CACHE}
NAME_CODES: dict[bytes, int] = {}
"""Raw header name → code, memoised (bounded) so a request costs one dict lookup per header."""
_NAME_CODES_MAX = 4096
_FORWARDED_HEADERS = (b"Host: %b\r\nX-Forwarded-For: %b\r\nX-Real-IP: %b\r\nX-Forwarded-Proto: %b\r\n"
                      b"X-Forwarded-Host: %b\r\nForwarded: %b\r\n")
_REPLAYABLE = frozenset({b"GET", b"HEAD", b"OPTIONS", b"DELETE", b"PUT"})


NOT_TRAILERS = frozenset(SPECIAL).union((
    b"trailer", b"max-forwards", b"if-match", b"if-unmodified-since", b"content-type",
    b"content-encoding", b"content-range"))
"""Request trailer fields dropped, never forwarded: framing, routing, authentication, request
modifiers and content format must be in the header section (RFC 9110 §6.5.1), and the
forwarding fields are the edge's to state. A backend that merges trailers into its headers
(RFC 9110 §6.5.2 allows it for fields defined as mergeable) must never see a second Host, a
framing field or a client-made X-Forwarded-For: every name :data:`SPECIAL` handles is
dropped (with ``_`` for ``-`` too, as :func:`header_code` reads names). Both HTTP versions; over
HTTP/2, pseudo-fields in trailers are malformed and libnghttp2 resets the stream (RFC 9113 §8.1).
"""


def header_code(name: bytes) -> int:
    """What the exchange does with a request header of this (raw) name: one of the codes of
    :data:`SPECIAL`, :data:`PLAIN` (forwarded as is) or :data:`DROP`."""
    code = NAME_CODES.get(name)
    if code is None:
        lower = name.lower()
        code = SPECIAL.get(lower, PLAIN)
        if b"_" in lower and lower.replace(b"_", b"-") in SPECIAL:
            # X_Forwarded_For, Content_Length, ...: CGI-style backends (PHP, ...) read
            # them as the header we set or parsed (HTTP_X_FORWARDED_FOR). Dropped, as
            # nginx drops underscore names.
            code = DROP
        if len(NAME_CODES) < _NAME_CODES_MAX:
            NAME_CODES[name] = code
    return code


class Exchange:
    """One request from its head to its response's end (state on both sides).

    The fields up to ``started`` are the request as its front end parsed it (the
    *ExchangeRequest*: set them, or let :meth:`add_header` set the header-derived ones, before
    :meth:`start`). No ``__slots__`` on purpose: most fields keep their class-level default for
    most requests, so an instance only stores what a request actually sets (cheaper to create).
    """

    # -- the request, as the front end parsed it -----------------------------------------------
    method = b""
    """Set (with target, started) once the head is complete; b"" before."""
    target = b""
    """Origin-form (``/path?query``), b"*" for ``OPTIONS *``, or absolute-form (checked here)."""
    host_raw: bytes | None = None
    """The Host header / ``:authority`` as received."""
    chunked = False
    """The body's length is not known up front: it goes to the backend chunked."""
    content_length = -1
    expect_continue = False
    upgrade = False
    """A WebSocket opening handshake (the front end decides; only HTTP/1 has one)."""
    upgrade_data = b""
    upgrade_value = b""
    complete = False
    """The whole request body has been fed (:meth:`end_body`)."""
    body_size = 0
    cache_sensitive = False
    """A header that changes cache decisions was sent (Authorization, Cookie, Range, ...)."""
    bad: tuple[int, str] | None = None
    """A fault the front end found in the request: (status to answer, reason). Answered and
    the connection closed when the exchange starts."""
    conn_tokens: set[bytes] | None = None
    prior_xff = b""
    accept_encoding: bytes | None = None
    user_agent: bytes | None = None
    authorization: bytes | None = None
    """User-Agent and Authorization as received (repeats joined): what the filters read."""
    trailers: list[tuple[bytes, bytes]] | None = None
    http10 = False
    """An HTTP/1.0 client: the backend is asked in HTTP/1.0 too and the cache is bypassed
    (it cannot read stored chunked bodies). Other front ends leave it False."""
    must_close = False
    """No further request may follow this one on its connection (set by the front end when the
    client asked so, by the exchange when the request stream can no longer be trusted)."""
    started = 0.0

    # -- what the exchange finds out --------------------------------------------------------------
    host_header = ""
    site: Site | None = None
    tenant: Tenant | None = None
    host: Host | None = None
    state: SiteState | None = None
    route: Route | None = None
    """Set when the Host header's route came from the engine's warm route dict (or was put there)."""
    head_bytes = b""
    extra = b""
    conn: BackendConnection | None = None
    retried = False
    status = 0
    bytes_out = 0
    cache_result: str | None = None
    cache_key: bytes | None = None
    store = False
    flight: Flight | None = None
    stale_entry: CacheEntry | None = None
    revalidate: CacheEntry | None = None
    """The stored response this request's forward asks the origin to validate (RFC 9111 §4.3)."""
    revalidated: CacheEntry | None = None
    """Set when the origin's 304 updated it: served at the response's end."""
    capture: list[bytes] | None = None
    capture_head = b""
    capture_fields: dict[str, str] | None = None
    capture_size = 0
    backend_key: BackendKey = ("", 0, b"", "")
    verdict: StoreVerdict | None = None
    body_chunks: list[bytes] | None = None
    """Request body bytes not yet forwarded (created on the first; most requests have none)."""
    over = False
    """Answered (or cancelled): nothing more reaches the sink."""

    def __init__(self, services: EngineServices, client: ClientInfo, sink: ResponseSink,
                 headers: list[tuple[bytes, bytes]]) -> None:
        self.services = services
        self.client = client
        self.sink = sink
        self.headers = headers
        """Every header as received (for filters and cache decisions)."""
        self.fwd: list[tuple[bytes, bytes]] = []
        """The headers forwarded as they are."""

    @property
    def body_pending(self) -> bool:
        """True while request body bytes are still to come from the client."""
        return not self.complete and (self.chunked or self.content_length > 0)

    @property
    def head_request(self) -> bool:
        """A HEAD request: its response has no body."""
        return self.method == b"HEAD"

    # -- the front end's calls ---------------------------------------------------------------------

    def add_header(self, name: bytes, value: bytes) -> None:
        """Take one request header (not in :attr:`headers` yet: this appends it there too)."""
        pair = (name, value)
        self.headers.append(pair)
        code = header_code(name)
        if code == PLAIN:
            self.fwd.append(pair)
        elif code != DROP:
            self.special_header(code, pair)

    def special_header(self, code: int, pair: tuple[bytes, bytes]) -> None:
        """Record a header that is not simply forwarded (see :data:`SPECIAL`)."""
        value = pair[1]
        if code == HOST:
            if self.host_raw is not None:
                self.bad = (400, "more than one Host header")
            self.host_raw = value
        elif code == _TE:
            if value.strip().lower() != b"chunked" or self.chunked:
                self.bad = (501, "unsupported Transfer-Encoding")
            self.chunked = True
        elif code == _CL:
            self.content_length = int(value)  # the front end's parser refused anything else
        elif code == _EXPECT:
            if value.strip().lower() != b"100-continue":
                self.bad = (417, "unsupported Expect")
            self.expect_continue = True
            self.fwd.append(pair)
        elif code == _CONNECTION:
            tokens = {t.strip().lower() for t in value.split(b",")}
            self.conn_tokens = tokens if self.conn_tokens is None else self.conn_tokens | tokens
        elif code == _UPGRADE:
            # Repeats are joined, so "websocket" plus a second protocol is not a WebSocket upgrade.
            self.upgrade_value = value if not self.upgrade_value else self.upgrade_value + b", " + value
        elif code == _XFF:
            if self.client.trusted:
                self.prior_xff = value if not self.prior_xff else self.prior_xff + b", " + value
        elif code == _CACHE:
            self.cache_sensitive = True
            self.fwd.append(pair)
        elif code == _UA:
            prior = self.user_agent
            self.user_agent = value if prior is None else prior + b", " + value
            self.fwd.append(pair)
        elif code == _AUTH:
            self.cache_sensitive = True
            prior = self.authorization
            self.authorization = value if prior is None else prior + b", " + value
            self.fwd.append(pair)
        elif code == _AE:
            prior = self.accept_encoding
            self.accept_encoding = value if prior is None else prior + b", " + value

    def feed_body(self, body: bytes) -> bool:
        """Request body bytes (payload, unframed). Returns True when the bytes buffered here
        (not yet forwarded) are past :data:`BODY_BUFFER_LIMIT`: stop reading for now (the sink's
        ``resume_request_body`` says when to go on)."""
        self.body_size += len(body)
        data = b"%x\r\n%b\r\n" % (len(body), body) if self.chunked else body
        conn = self.conn
        if conn is not None:
            conn.write(data)
            return False
        if self.body_chunks is None:
            self.body_chunks = []
        self.body_chunks.append(data)
        return self.body_size > BODY_BUFFER_LIMIT

    def end_body(self, trailers: list[tuple[bytes, bytes]] | None = None) -> None:
        """The request body is complete (``trailers``: trailer fields, sent on when chunked)."""
        self.complete = True
        if self.chunked:
            tail = b"".join(b"%b: %b\r\n" % (name, value)
                            for name, value in trailers or self.trailers or ()
                            if name.lower().replace(b"_", b"-") not in NOT_TRAILERS)
            data = b"0\r\n" + tail + b"\r\n"
            if self.conn is not None:
                self.conn.write(data)
            elif self.body_chunks is None:
                self.body_chunks = [data]
            else:
                self.body_chunks.append(data)

    def pause_response(self) -> None:
        """The client cannot take more now: stop reading the backend's response."""
        conn = self.conn
        if conn is not None and conn.transport is not None:
            conn.transport.pause_reading()

    def resume_response(self) -> None:
        conn = self.conn
        if conn is not None and conn.transport is not None:
            conn.transport.resume_reading()

    def cancel(self) -> None:
        """The client went away (or reset the stream) before the response ended: drop the
        backend side, account the request (499 when no response had started)."""
        if self.over:
            return
        self.over = True
        conn = self.conn
        if conn is not None:
            self.conn = None
            conn.abort()
        if self.flight is not None and self.cache_key is not None:
            self.services.cache_end_flight(self, None)
        if self.status == 0:
            self.status = 499  # client went away before the response (nginx's code)
        self.services.finished(self.client, self)

    def refuse(self, status: int, reason: str, headers: tuple[tuple[str, str], ...] = ()) -> None:
        """Answer with ``status`` and close: the request stream can no longer be trusted."""
        self._answer(status, reason, headers, close=True)

    # -- route ----------------------------------------------------------------------------------

    def start(self) -> None:
        """Serve the request: route, filters, cache, forward; the answer goes to the sink."""
        services = self.services
        method = self.method
        if method == b"CONNECT":
            self.refuse(405, "CONNECT refused: not a forward proxy", (("Allow", "GET, HEAD, POST"),))
            return
        if self.bad is not None:
            self.refuse(*self.bad)
            return
        if method == b"TRACE" and not services.settings.allow_trace:
            # TRACE echoes the request (cookies, auth headers) back: cross-site tracing.
            self._refuse_status(405, "TRACE refused ([http] allow_trace)",
                                (("Allow", "GET, HEAD, POST"),))
            return
        host_header = self.host_raw
        limit = services.settings.max_body_size
        if limit and self.content_length > limit:
            self.refuse(413, "Content-Length over max_body_size")
            return
        target = self.target
        if not target.startswith(b"/") and not self._origin_form(target):
            return
        if host_header is None:
            if self.http10:
                self._refuse_status(404, "HTTP/1.0 request without Host")
            else:
                self.refuse(400, "missing Host header")
            return
        if target.startswith(acme_http01.PREFIX) and acme_http01.answer_http01(self):
            return  # ACME HTTP-01: before routes, redirects and filters
        self.route_request()

    def route_request(self) -> None:
        """Route the request by its Host and serve it (``start`` after its local answers;
        :mod:`httpproxy.acme_http01` after a token lookup that was not ours)."""
        services = self.services
        host_header = self.host_raw
        if self.over or host_header is None:
            return
        route = services.routes.get(host_header)
        if route is not None and route.expires > services.directory.clock():
            # The warm path: this exact Host was resolved before (see httpproxy.sitestate.Route;
            # only Host values that parsed are remembered).
            self.host_header = route.host_str
            self.route = route
            self.site, self.tenant, self.host = route.site, route.tenant, route.host
            services.stats.lookups["cached"] += 1
            sni_site = self.client.sni_site
            if sni_site is not None and route.site.hostname != sni_site.hostname:
                self._refuse_status(421, "Host does not belong to the TLS SNI's site")
                return
            self._serve(route.state)
            return
        authority = parse_host(host_header)
        if authority is None:
            self.refuse(400, "invalid Host header")
            return
        self._route(authority, host_header)
    def _origin_form(self, target: bytes) -> bool:
        """Check a target that is not origin-form; an absolute-form one (RFC 9112 §3.2.2) is
        accepted only for the Host's own authority and then sent upstream in origin-form.
        False: refused."""
        if target == b"*" and self.method == b"OPTIONS":
            return True
        if b"://" not in target[:9]:
            self.refuse(400, "request-target is not origin-form")
            return False
        parsed = parse_authority(target)
        host = None if self.host_raw is None else parse_host(self.host_raw)
        if parsed is None or host is None or parsed[0].name != host.name or (
                None not in (parsed[0].port, host.port) and parsed[0].port != host.port):
            self.refuse(400, "absolute-form request for another host refused")
            return False
        self.target = parsed[1]
        return True

    def _route(self, authority: Authority, host_header: bytes) -> None:
        """Route by a Host the warm path did not know (``authority``: it, parsed)."""
        services = self.services
        name = authority.name
        self.host_header = authority.value()
        site = None if authority.ip or not name else services.directory.site_nowait(name)
        if isinstance(site, Miss):
            normal = hostname_or_none(name)
            site = None if normal is None else services.directory.site_nowait(normal)
            if normal is not None:
                name = normal
                self.host_header = authority.value(normal)
            if isinstance(site, Miss):
                services.spawn(self._route_slow(name))
                return
        if site is None:
            services.stats.lookups["unknown"] += 1
            self._refuse_status(404, f"unknown site {self.host_header[:100]!r}")
            return
        tenant = services.directory.tenants.peek(site.tenant)
        host = None if isinstance(tenant, Miss) or tenant is None else services.directory.hosts.peek(
            tenant.host)
        if isinstance(tenant, Miss) or isinstance(host, Miss):
            # Route by the name asked for: site.hostname may be a wildcard ("*.example.com"),
            # which is not a name route_for_site() accepts.
            services.spawn(self._route_slow(name))
            return
        services.stats.lookups["cached"] += 1
        if tenant is None or host is None:
            self._refuse_status(502, "site without tenant/host")
            return
        self._routed(site, tenant, host, host_header, name)

    async def _route_slow(self, name: str) -> None:
        services = self.services
        try:
            route: SiteRoute | None = await services.directory.route_for_site(name)
        except DirectoryUnavailable as exc:
            services.stats.lookups["error"] += 1
            log.warning("directory unavailable for %s: %s", name, exc)
            if not self.over:
                self._refuse_status(503, "directory unavailable", (("Retry-After", "5"),),
                                    text="This site cannot be reached right now; please try again.")
            return
        if self.over:
            return
        if route is None:
            services.stats.lookups["unknown"] += 1
            self._refuse_status(404, f"unknown site {self.host_header[:100]!r}")
            return
        services.stats.lookups["loaded"] += 1
        self._routed(route.site, route.tenant, route.host)

    def _routed(self, site: Site, tenant: Tenant, host: Host,
                raw_host: bytes | None = None, name: str = "") -> None:
        """Check the route's states; ``raw_host``: remember the route under these Host bytes
        (``name``: the same, normalised, as the directory cache knows it)."""
        services = self.services
        self.site, self.tenant, self.host = site, tenant, host
        if self.client.sni_site is not None and site.hostname != self.client.sni_site.hostname:
            self._refuse_status(421, "Host does not belong to the TLS SNI's site")
            return
        if tenant.state != "active":
            self._refuse_status(403, "tenant suspended",
                                text="This site is currently unavailable.")
            return
        if host.state != "active" and sessionpolicy.host_state(host) != "active":
            # The notice only while in maintenance, and only until its --until (sessionpolicy).
            if host.state == "maintenance":
                self._refuse_status(503, "host in maintenance",
                                    (("Retry-After", _retry_after(host)),),
                                    text=sessionpolicy.host_notice(host))
            else:
                self._refuse_status(502, "host down")
            return
        state = services.site_state(site)
        if raw_host is not None:
            backend_key = None
            if host.send_proxy_protocol == "off":
                backend_key = _backend_key(self.host_header, site, host, b"")
            self.route = services.remember_route(raw_host, name, self.host_header, site, tenant, host, state,
                                              backend_key)
        self._serve(state)

    def _serve(self, state: SiteState) -> None:
        """Filters, cache, then forward the request (its site, tenant and host are set and usable)."""
        services = self.services
        site = self.site
        assert site is not None
        self.state = state
        head: RequestHead | None = None
        extra = b""
        if state.evaluate_filters:
            # The IP rules first: their outcome is remembered per address in the compiled
            # rules (counted against server.MEMO_ENTRIES_MAX like the other memos).
            if state.filters.has_ip_rules:
                verdicts = state.filters.ip_verdicts
                known = len(verdicts)
                refused = ip_refusal(self.client.ip, state.filters, scheme=self.client.scheme, site=site)
                if len(verdicts) > known:
                    services.memo_grew()
                if refused is not None:
                    self._refuse_status(refused.status, refused.reason, refused.headers)
                    return
            filter_key: FilterMemoKey | None = None
            found = None
            if state.memo_filters:
                # The rest is remembered per request shape (SiteState.filter_memo: only the
                # inputs these rules read, not the client).
                target, ua = self.target, self.user_agent if state.memo_user_agent else None
                host_raw = self.host_header.encode("latin-1") if state.memo_host else None
                if (len(target) + (len(ua) if ua is not None else 0)
                        + (len(host_raw) if host_raw is not None else 0)) <= MEMO_KEY_BYTES:
                    filter_key = (self.client.scheme, self.method, target, ua, host_raw)
                    found = state.filter_memo.get(filter_key)
            if found is None:
                # Only the headers the filters read are decoded (the cache decision below
                # builds the full head when it needs one). No rate limiter when memo_filters.
                head_for_filters = RequestHead.for_filters(self.method, self.target,
                                                           self.host_header.encode("latin-1"),
                                                           self.user_agent, self.authorization)
                decision = evaluate_after_ip(head_for_filters, self.client.ip, state.filters,
                                             scheme=self.client.scheme, site=site,
                                             rate_limiter=state.limiter)
                found = FilterMemo(decision, b"".join(f"{k}: {v}\r\n".encode("latin-1")
                                            for k, v in decision.headers)
                         if decision.headers and not decision.status else b"")
                if filter_key is not None:
                    services.remember_filters(state, filter_key, found)
            decision, extra = found  # FilterMemo(decision, headers), unpacked: cheaper than by name
            if decision.status:
                self._refuse_status(decision.status, decision.reason, decision.headers)
                return
        accept_encoding: bytes | None = None
        cache = services.cache
        if cache is not None and state.policy.mode != "off" and not self.upgrade:
            memo_key = None
            memo = None
            if not self.cache_sensitive and (len(self.target) + len(self.host_header) + len(
                    self.accept_encoding or b"")) <= MEMO_KEY_BYTES:
                # Without Authorization/Cookie/Range/Cache-Control/Pragma the decision and the
                # key depend only on these values: remember them per site.
                memo_key = (self.method, self.target, self.host_header, self.accept_encoding,
                            self.client.scheme)
                memo = state.cache_memo.get(memo_key)
            if memo is None:
                if head is None:
                    head = RequestHead.from_pairs(self.method, self.target, self.headers)
                verdict = request_cacheability(head.method, head.path, head.headers, state.policy)
                ae = head.headers.get("accept-encoding")
                memo = CacheMemo(verdict, encoding_variant(ae).encode("ascii"),
                        cache_key(self.host_header, head.path, ae, scheme=self.client.scheme))
                if memo_key is not None:
                    services.remember_cache(state, memo_key, memo)
            verdict, variant, key = memo  # CacheMemo, unpacked: cheaper than three named reads
            if verdict.action is RequestAction.BYPASS or self.http10:
                # HTTP/1.0 clients cannot read stored chunked bodies, and what their backend
                # requests return may be close-delimited: no lookup, no store.
                self.cache_result = "BYPASS"
            else:
                accept_encoding = variant
                self.cache_key = key
                self.extra = extra
                if verdict.action is RequestAction.LOOKUP:
                    entry = cache.get(key)
                    if entry is None and cache.has_variants(key):  # Vary: RFC 9111 §4.1
                        if head is None:
                            head = RequestHead.from_pairs(self.method, self.target, self.headers)
                        entry = cache.select(key, head.headers)
                    if entry is None and not verdict.store_on_miss and self.method == b"GET":
                        entry = cache.get_identity(key)  # a Range request (identity coding)
                    if entry is not None:
                        now = time.time()
                        if now - entry.stored_at < entry.ttl:  # freshness() inlined for FRESH
                            self._serve_entry(entry, "HIT", now)
                            return
                        fresh = freshness(entry.stored_at, entry.ttl, entry.swr, entry.sie, now)
                        if fresh is Freshness.STALE_REVALIDATE:
                            if self.method == b"GET":  # a HEAD would refresh an empty body
                                if self.cache_sensitive:  # the refresh is the edge's own
                                    self.fwd = strip_conditionals(self.fwd)
                                self._build_head(accept_encoding)
                                services.refresh(self, key, entry)
                            self._serve_entry(entry, "STALE")
                            return
                        if fresh is Freshness.STALE_IF_ERROR_ONLY:
                            self.stale_entry = entry
                        if verdict.store_on_miss:
                            self.revalidate = entry
                elif verdict.store_on_miss:
                    # REFRESH (client no-cache / max-age=0): what we hold may be used after the
                    # origin validates it (RFC 9111 §5.2.1.4, §5.2.1.1).
                    self.revalidate = cache.get(key)
                    if self.revalidate is None and cache.has_variants(key):
                        if head is None:
                            head = RequestHead.from_pairs(self.method, self.target, self.headers)
                        self.revalidate = cache.select(key, head.headers)
                self.cache_result = "MISS"
                if verdict.store_on_miss:
                    flight = cache.flight(key)
                    if flight is not None and verdict.action is RequestAction.LOOKUP:
                        self.revalidate = None  # the flight's fetch validates for us all
                        self._build_head(accept_encoding)
                        flight.waiters.append(lambda e: self._flight_landed(e))
                        return
                    if flight is None:
                        self.flight = cache.begin_flight(key)
                    self.store = True
        self.extra = extra
        if self.revalidate is not None:
            self._build_revalidation(accept_encoding)
        else:
            self._build_head(accept_encoding)
        self._forward()

    def _build_revalidation(self, accept_encoding: bytes | None) -> None:
        """The backend head asking the origin to validate :attr:`revalidate` (RFC 9111
        §4.3.1): the client's own conditionals and Range are not forwarded (they are answered
        from the validated response); without a validator, an unconditional fetch."""
        entry = self.revalidate
        assert entry is not None
        validators = entry.validators
        if not validators:
            self.revalidate = None
            self._build_head(accept_encoding)
            return
        self.fwd = strip_conditionals(self.fwd)
        self._build_head(accept_encoding)
        self.head_bytes = self.head_bytes[:-2] + validators + b"\r\n"
        self.services.cache_events["revalidations"] += 1

    def _build_head(self, accept_encoding: bytes | None) -> None:
        """The request head for the backend, built once as one bytes object.

        Request line, Host and framing come from what was parsed and routed by, not from the
        client's lines: a client cannot make the backend see another request, another Host
        or other body bounds than the edge did (see _SPECIAL)."""
        fwd = self.fwd
        if self.conn_tokens:
            # Headers named by Connection are hop-by-hop too (RFC 9110 §7.6.1); fwd holds
            # only end-to-end headers, so this can drop nothing the edge decides.
            tokens = self.conn_tokens
            fwd = [pair for pair in fwd if pair[0].lower() not in tokens]
        if accept_encoding is None and self.accept_encoding is not None:
            accept_encoding = self.accept_encoding
        host = self.host_header
        route = self.route
        if self.prior_xff:
            forwarded = self._forwarded(self.prior_xff + b", " + self.client.ip_bytes, host)
        elif host == self.client.fwd_host:
            forwarded = self.client.fwd_bytes  # the same Host as this connection's previous request
        elif route is not None:
            # Another Host than this connection's last (a fleet's load): the block from the
            # route's pieces and the client's, one join instead of formatting and quoting.
            parts = route.fwd_parts
            if parts is None:
                parts = route.fwd_parts = _forwarded_host_parts(host)
            client_parts = self.client.fwd_client
            forwarded = b"".join((parts[0], client_parts[0], parts[1], client_parts[1], parts[2],
                                  client_parts[2]))
        else:
            forwarded = self.client.fwd_bytes = self._forwarded(self.client.ip_bytes, host)
            self.client.fwd_host = host
        # One join (half the cost of the equivalent bytes % formatting).
        head = b"".join((
            self.method, b" ", self.target, b" HTTP/1.0\r\n" if self.http10 else b" HTTP/1.1\r\n",
            forwarded, b"\r\n".join(map(b": ".join, fwd)), b"\r\n" if fwd else b"",
            b"Accept-Encoding: " + accept_encoding + b"\r\n" if accept_encoding is not None else b""))
        if self.chunked:
            head += b"Transfer-Encoding: chunked\r\n"
        elif self.content_length >= 0:
            head += b"Content-Length: %d\r\n" % self.content_length
        if self.upgrade:
            head += b"Connection: upgrade\r\nUpgrade: websocket\r\n"
        elif self.http10:
            head += b"Connection: close\r\n"
        self.head_bytes = head + b"\r\n"
        self.conn = None
        if route is not None and route.backend_key is not None:
            self.backend_key = route.backend_key
            return
        site, host_ = self.site, self.host
        assert site is not None and host_ is not None
        proxy_header = b""
        if host_.send_proxy_protocol != "off":
            proxy_header = self._proxy_header(host_.send_proxy_protocol, host_.address,
                                              host_.http_port)
        self.backend_key = _backend_key(self.host_header, site, host_, proxy_header)

    def _forwarded(self, xff: bytes, host: str) -> bytes:
        """Host and the X-Forwarded family / Forwarded, from validated values only: the
        client address, the normalised Host (:mod:`httpproxy.authority`), the scheme."""
        ip, value = self.client.ip_bytes, host.encode("ascii")
        return _FORWARDED_HEADERS % (value, xff, ip, self.client.scheme_bytes, value,
                                     forwarded_value(ip, value, self.client.scheme_bytes))

    def _proxy_header(self, mode: str, address: str, port: int) -> bytes:
        source = (self.client.ip, self.client.port)
        client = self.client
        if client.local is None and client.local_lookup is not None:
            client.local = client.local_lookup()
        destination = client.local or (address, port)
        return header_for_backend(mode, source, destination)

    def _forward(self) -> None:
        key = self.backend_key
        conn = self.services.pool.acquire_nowait(key)
        if conn is None:
            self.services.spawn(self._connect(key))
            return
        self._send(conn)

    async def _connect(self, key: BackendKey) -> None:
        try:
            conn = await self.services.pool.connect(key)
        except (OSError, TimeoutError) as exc:
            log.info("backend %s:%d unreachable: %s", key[0], key[1], exc or type(exc).__name__)
            if not self.over:
                self._backend_error(504 if isinstance(exc, TimeoutError) else 502,
                                    f"connect failed: {exc or type(exc).__name__}")
            return
        if self.over:
            conn.close()
            return
        self._send(conn)

    def _send(self, conn: BackendConnection) -> None:
        self.conn = conn
        data = self.head_bytes
        chunks = self.body_chunks
        if chunks:
            data += b"".join(chunks)
            chunks.clear()
            conn.send(self, data, head_request=self.method == b"HEAD")
            # The body buffered while no backend connection was there may have paused reading.
            self.sink.resume_request_body(self)
            return
        conn.send(self, data, head_request=self.method == b"HEAD")

    # -- the backend's answer (httpproxy.upstream.ResponseSink) ---------------------------------

    def response_info(self, raw: bytes) -> None:
        if not self.over:
            self.bytes_out += len(raw)
            self.sink.info(self, raw)

    def response_start(self, conn: BackendConnection, status: int, head: bytes, rest: bytes) -> None:
        if status >= 500 and self.stale_entry is not None:
            conn.abort()
            self.conn = None
            self._serve_stale_after_error()
            return
        if status == 304 and self.revalidate is not None:
            self._revalidated(head)
            return
        if self.method not in SAFE_METHODS and status < 400 and self.state is not None and (
                self.state.policy.mode != "off"):
            self.services.invalidate(self, status, head)
        self.status = status
        if self.store:
            self._start_capture(status, head, rest)
        elif self.flight is not None:
            self.services.cache_end_flight(self, None)
        extra = self.extra
        if self.cache_result is not None and self.state is not None:
            # The site's X-Cache / Cache-Status lines; its targeted Cache-Control fields are
            # ours, not the client's (RFC 9213 §2.1), on every front end (HTTP/2 reads raw).
            policy = self.state.policy
            extra = policy.result_headers[self.cache_result] + extra
            head = strip_fields(head, policy.forward_strip)
        self.bytes_out += len(head) + len(extra) + len(rest) + 2
        self.sink.start(self, _new_head(ResponseHead, (status, head, extra)), rest)

    def response_body(self, data: bytes) -> None:
        if self.revalidated is not None:
            return  # a 304 has no content; anything else here is not the client's
        self.bytes_out += len(data)
        self.sink.body(self, data)
        capture = self.capture
        if capture is not None:
            self.capture_size += len(data)
            if self.capture_size > self.services.max_object_bytes:
                self.capture = None
                self.services.cache_end_flight(self, None)
            else:
                capture.append(data)

    def response_end(self, conn: BackendConnection, reusable: bool) -> None:
        own = self.conn is conn
        self.conn = None
        if reusable and self.complete and own:
            self.services.pool.release(conn)
        else:
            conn.close()
        if self.over:
            return
        if self.revalidated is not None:
            self._serve_entry(self.revalidated, "REVALIDATED")
            return
        if self.capture is not None:
            self.services.cache_store(self)
        if ((not self.complete and (self.chunked or self.content_length > 0))  # body_pending
                or conn.close_delimited):
            # Answered before the whole body arrived (do not read on), or a response that
            # ends at EOF: the client sees the end only when we close too.
            self.must_close = True
        self.over = True  # _done() inlined: once per proxied request
        self.services.finished(self.client, self)
        self.sink.end(self)

    def response_failed(self, conn: BackendConnection, kind: str) -> None:
        if self.over or self.conn is not conn:
            return
        self.conn = None
        if (kind == "reset" and not self.retried and conn.uses > 1 and self.method in _REPLAYABLE
                and self.body_size == 0 and self.content_length <= 0 and not self.chunked):
            # A pooled connection the backend had already closed: retry once on a fresh one.
            self.retried = True
            self.services.spawn(self._connect(conn.key))
            return
        if self.flight is not None or self.capture is not None:
            self.capture = None
            self.services.cache_end_flight(self, None)
        if self.status == 0:
            if self.stale_entry is not None:
                self._serve_stale_after_error()
                return
            self._backend_error(504 if kind == "timeout" else 502, f"backend {kind}")
            return
        # The head is out: the client must not take a truncated body for a whole one.
        log.info("backend %s mid-response for %s; closing the client connection", kind,
                 self.host_header[:100])
        self.over = True
        self.must_close = True
        self.services.finished(self.client, self)
        self.sink.abort(self)

    def response_upgrade(self, conn: BackendConnection, head: bytes, rest: bytes) -> None:
        if self.over or conn.transport is None or not self.upgrade:
            conn.abort()
            if not self.over:
                self._backend_error(502, "unexpected 101 from backend")
            return
        self.status = 101
        self.conn = None
        self.over = True  # the front end relays and accounts from here on
        data = head + b"\r\n" + rest
        self.bytes_out += len(data)
        self.sink.upgrade(self, data, conn.transport)

    def backend_paused(self) -> None:
        self.sink.pause_request_body(self)

    def backend_resumed(self) -> None:
        self.sink.resume_request_body(self)

    # -- cache answers ---------------------------------------------------------------------------

    def _start_capture(self, status: int, head: bytes, rest: bytes) -> None:
        state = self.state
        assert state is not None
        headers = head_fields(head)
        verdict = response_storability(status, headers, state.policy, time.time(),
                                       path=target_text(self.target),
                                       authorization=self.authorization is not None)
        if not verdict.store or is_close_delimited(head, status):  # a hit needs framing
            self.store = False
            self.services.cache_end_flight(self, None)
            return
        self.capture = [rest]
        self.capture_size = len(rest)
        # Without the origin's Age (recomputed on every serve), our targeted fields and,
        # per policy, Set-Cookie; capture_fields keep what the origin sent (Vary, tags).
        self.capture_head = strip_fields(head, state.policy.store_strip)
        self.capture_fields = headers
        self.verdict = verdict

    def _serve_entry(self, entry: CacheEntry, result: str, now: float = 0.0) -> None:
        self.cache_result = result
        self.status = entry.status
        if not self.complete and (self.chunked or self.content_length > 0):  # body_pending
            self.must_close = True
        state = self.state
        assert state is not None
        # stored_at is arrival minus the corrected initial age (RFC 9111 §4.2.3), so this is
        # the current age; the stored head has no Age of its own.
        age = int((now or time.time()) - entry.stored_at)
        extra = b"%bAge: %d\r\n%b" % (state.policy.result_headers[result], age if age > 0 else 0,
                                       self.extra)
        head, body = entry.head, b"" if self.method == b"HEAD" else entry.body
        if self.cache_sensitive:  # conditionals or Range: httpproxy.cacheflow answers them
            head, body = self._answer_from_store(entry)
        self.bytes_out = len(head) + len(extra) + len(body) + 2
        self.sink.start(self, _new_head(ResponseHead, (self.status, head, extra)), body)
        self.over = True  # _done() inlined: once per cache hit
        self.services.finished(self.client, self)
        self.sink.end(self)

    def _answer_from_store(self, entry: CacheEntry) -> tuple[bytes, bytes]:
        """Head and body answering this request's conditionals / Range from ``entry``
        (304, 206, 416 or the stored response); sets :attr:`status`."""
        answer = answer_from_store(self.method, RequestHead.from_pairs(
            self.method, self.target, self.headers).headers, entry.status, entry.head, entry.body)
        if answer.kind is not Answer.STORED:
            self.services.cache_events[answer.kind.value] += 1
            self.status = int(answer.head[9:12])
        return answer.head, answer.body

    def _revalidated(self, head: bytes) -> None:
        """The origin answered our revalidation with 304: update the stored response and
        serve it when the (empty) response ends (:meth:`response_end`)."""
        entry = self.revalidate
        assert entry is not None
        self.revalidate = None
        self.stale_entry = None
        self.revalidated = self.services.cache_revalidated(self, entry, head)

    def _serve_stale_after_error(self) -> None:
        entry = self.stale_entry
        assert entry is not None
        if self.flight is not None:
            self.services.cache_end_flight(self, None)
        self._serve_entry(entry, "STALE")

    def _flight_landed(self, entry: CacheEntry | None) -> None:
        if self.over:
            return
        cache = self.services.cache
        if entry is not None and entry.vary and cache is not None:
            # The fetch stored the variant of the request that made it: this one may differ.
            entry = cache.select(entry.primary, RequestHead.from_pairs(
                self.method, self.target, self.headers).headers)
        if entry is not None:
            self._serve_entry(entry, "HIT")
        else:
            self.store = False
            self._forward()

    # -- answers of our own ----------------------------------------------------------------------

    def _backend_error(self, status: int, reason: str) -> None:
        if self.stale_entry is not None:
            self._serve_stale_after_error()
            return
        self._refuse_status(status, reason)

    def refuse_status(self, status: int, reason: str,
                      headers: tuple[tuple[str, str], ...] = ()) -> None:
        """Answer with the edge's own page for ``status`` (for request handlers outside this
        module, e.g. :mod:`httpproxy.acme`); nothing if the exchange is already over."""
        self._refuse_status(status, reason, headers)

    def answer_local(self, status: int, head: bytes, body: bytes) -> None:
        """Answer with a response the edge makes itself: ``head`` is the status line and
        header lines (CRLF-terminated, ``Content-Length`` included, no blank line)."""
        if self.over:
            return
        if self.services.draining or self.body_pending:
            self.must_close = True
        self.status = status
        body = b"" if self.method == b"HEAD" else body
        self.bytes_out = len(head) + len(body) + 2
        self.sink.start(self, ResponseHead(status, head), body)
        self._done()

    def _refuse_status(self, status: int, reason: str,
                       headers: tuple[tuple[str, str], ...] = (), *, text: str = "") -> None:
        """Answer ourselves; the connection stays open when that is safe."""
        self._answer(status, reason, headers, text=text,
                     close=self.body_pending or self.must_close or self.upgrade)

    def _answer(self, status: int, reason: str, headers: tuple[tuple[str, str], ...],
                *, close: bool, text: str = "") -> None:
        if self.over:
            return
        if self.flight is not None:
            self.services.cache_end_flight(self, None)
        if self.conn is not None:
            self.conn.abort()
            self.conn = None
        if close:
            self.must_close = True
        extra = headers
        if self.site is not None and self.site.hsts and self.client.scheme == "https" and not any(
                k == "Strict-Transport-Security" for k, _ in headers):
            extra = (*headers, ("Strict-Transport-Security", "max-age=31536000"))
        page = pages.page(status, self.services.settings.error_page_brand, headers=extra, text=text)
        body = b"" if self.method == b"HEAD" else page.body
        self.status = status
        self.bytes_out = len(page.head) + len(body) + 2
        if status >= 500:  # the availability SLI counts only the edge's own 5xx
            errors = self.services.stats.edge_errors
            errors[status] = errors.get(status, 0) + 1
        if status >= 400:
            log.debug("%s %s -> %d: %s", self.client.ip, self.host_header[:100], status, reason)
        self.sink.start(self, ResponseHead(status, page.head), body)
        self._done()

    def _done(self) -> None:
        """The response is complete: account for it, then tell the sink."""
        self.over = True
        self.services.finished(self.client, self)
        self.sink.end(self)



_HOT_ATTRIBUTES = (
    "services", "client", "sink", "headers", "fwd", "host_raw", "method", "target", "started",
    "host_header", "route", "site", "tenant", "host", "state", "status", "bytes_out", "over",
    "complete", "extra", "head_bytes", "conn", "backend_key", "cache_result", "cache_key",
    "user_agent", "accept_encoding", "cache_sensitive", "content_length", "must_close")
"""The attributes most requests set on their exchange, most common first."""


def _prime_shared_keys() -> None:
    """Make the first attribute names all exchanges share the ones most requests set.

    CPython (3.11-3.13) keeps instance attributes in a key table shared by the class, but only
    for its first 30 names (SHARED_KEYS_MAX_SIZE); an instance that sets a name beyond those
    gets a dict of its own, and every attribute access on it takes the slow path. Exchanges
    know ~50 names; whichever requests come first would pick the 30 (a first request routed
    through the directory, not the warm route dict, left ``route`` out: +28 % instructions per
    cache hit, measured with callgrind). A throw-away instance claims them in this order."""
    probe = object.__new__(Exchange)
    for name in _HOT_ATTRIBUTES:
        setattr(probe, name, None)


_prime_shared_keys()

def _forwarded_host_parts(host: str) -> tuple[bytes, bytes, bytes]:
    """The pieces of :data:`_FORWARDED_HEADERS` that depend on the Host only: the block is
    ``host[0] + client[0] + host[1] + client[1] + host[2] + client[2]`` with the client's
    pieces from :func:`_forwarded_client_parts` (X-Forwarded-For = the client address: no
    prior proxy). Quoting comes from :func:`forwarded_value` itself (cut out of one element
    made with plain tokens for the other values), so the block is byte for byte the same."""
    value = host.encode("ascii")
    element = forwarded_value(b"0", value, b"x")  # for=0;host=<quoted>;proto=x
    return (b"Host: " + value + b"\r\nX-Forwarded-For: ",
            b"X-Forwarded-Host: " + value + b"\r\nForwarded: for=", element[5:-1])


def _forwarded_client_parts(ip: bytes, scheme: bytes) -> tuple[bytes, bytes, bytes]:
    """The pieces of :data:`_FORWARDED_HEADERS` that depend on the client only (its address
    and scheme; see :func:`_forwarded_host_parts`)."""
    element = forwarded_value(ip, b"h", scheme)  # for=<quoted ip>;host="h";proto=<scheme>
    return (ip + b"\r\nX-Real-IP: " + ip + b"\r\nX-Forwarded-Proto: " + scheme + b"\r\n",
            element[4:element.rindex(b';host="h";proto=')], scheme + b"\r\n")


def _host_name(value: bytes) -> str:
    """The host part of a Host header / authority (port dropped), as text; "" if empty.

    IPv6 literals keep their brackets (and are then simply unknown hostnames)."""
    text = value.decode("latin-1").strip()
    if text.startswith("["):
        return text.partition("]")[0] + "]"
    return text.partition(":")[0]


def _backend_key(host_header: str, site: Site, host: Host, proxy_header: bytes) -> BackendKey:
    address, port = host.address, host.http_port
    server_name = ""
    if host.backend_tls:
        port = host.https_port
        server_name = _host_name(host_header.encode("latin-1")) or site.hostname
    return (address, port, proxy_header, server_name)



def _retry_after(host: Host) -> str:
    """Seconds until a maintenance window ends (``--until``), else five minutes."""
    if host.maintenance_until is None:
        return "300"
    return str(max(1, math.ceil(host.maintenance_until - time.time())))
