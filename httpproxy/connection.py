"""One client connection of the HTTP edge: parse requests, route, filter, cache, forward.

An ``asyncio.Protocol`` driven by httptools (llhttp) callbacks; a request that finds its site,
tenant and host in the directory cache, passes the filters and gets a pooled backend
connection costs no coroutine, future or task. The slow paths (a directory lookup that has
to query the store, connecting to a backend) run as one task each.

Requests are answered strictly in order (pipelining): the request being served is
:attr:`ClientConnection.active`, later ones wait in :attr:`ClientConnection.queue` with
their bodies buffered (reading pauses once that buffer is large). Bodies are streamed:
request body chunks go to the backend as they arrive (re-chunked when the client sent
chunked), response bytes come back raw (:mod:`httpproxy.upstream`).

Smuggling defences are llhttp's strict mode (CL+TE, duplicate or invalid Content-Length,
bare CR/LF, obs-fold, bad tokens: all 400) plus ours: a Transfer-Encoding other than
``chunked`` (501), any Transfer-Encoding in HTTP/1.0 (400), a missing, repeated or
malformed Host (400), HTTP versions other than 1.0/1.1 (505), head size (431), head timeout
(408), body size (413). Any refused request closes the connection, so nothing left over in
the stream is ever read as a request. The
backend's head states the request line, Host and framing the edge parsed (never the
client's lines), so the backend cannot read another request than the one routed.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import socket
import struct
import time
from typing import TYPE_CHECKING

import httptools

from edge import sessionpolicy
from edge.directory.cache import Miss
from edge.directory.directory import SiteRoute
from edge.directory.model import Host, Site, Tenant
from edge.directory.names import hostname_or_none
from edge.errors import DirectoryUnavailable
from edge.proxyproto import ProxyHeaderParser, ProxyProtocolError, header_for_backend
from edge.relay import Relay
from httpproxy import pages
from httpproxy.authority import Authority, forwarded_value, parse_authority, parse_host
from httpproxy.cache import CacheEntry, Flight
from httpproxy.cachepolicy import (
    Freshness,
    RequestAction,
    StoreVerdict,
    encoding_variant,
    freshness,
    request_cacheability,
    response_storability,
    strip_fields,
)
from httpproxy.rules import RequestHead, evaluate_after_ip, ip_refusal, target_text
from httpproxy.upstream import BackendConnection, BackendKey, is_close_delimited

MEMO_KEY_BYTES = 1024
"""Target + the other request bytes in a memo key beyond which a request's filter outcome or
cache decision is not remembered (bounds :attr:`httpproxy.server.SiteState.filter_memo` and
``cache_memo`` per entry; :data:`httpproxy.server.MEMO_ENTRIES_MAX` bounds the count)."""

if TYPE_CHECKING:
    from httpproxy.server import FilterMemoKey, HttpEngine, Route, SiteState

__all__ = ["ClientConnection", "Request"]

log = logging.getLogger("edge.http")
_clock = time.perf_counter
"""Request timing (uvloop's loop.time() has millisecond steps: too coarse for latencies)."""

# Request headers by what we do with them; anything not listed is forwarded as it is.
# Hop-by-hop ones (RFC 9110 §7.6.1) are never forwarded; the X-Forwarded family is ours.
# Host and the framing (Content-Length / Transfer-Encoding) are never copied either: the
# backend's head states them from what we parsed and routed by (_build_head), so nothing a
# client lists in Connection can remove or change them.
(_PLAIN, _HOST, _TE, _CL, _EXPECT, _CONNECTION, _DROP, _XFF, _UPGRADE, _AE, _CACHE, _UA,
 _AUTH) = range(13)
_SPECIAL = {b"host": _HOST, b"transfer-encoding": _TE, b"content-length": _CL, b"expect": _EXPECT,
            b"connection": _CONNECTION, b"keep-alive": _DROP, b"proxy-connection": _DROP,
            b"te": _DROP, b"proxy-authorization": _DROP, b"http2-settings": _DROP,
            b"upgrade": _UPGRADE, b"x-forwarded-for": _XFF, b"x-forwarded-proto": _DROP,
            b"x-forwarded-host": _DROP, b"forwarded": _DROP, b"x-real-ip": _DROP,
            b"accept-encoding": _AE, b"authorization": _AUTH, b"cookie": _CACHE, b"range": _CACHE,
            b"user-agent": _UA,
            b"cache-control": _CACHE, b"pragma": _CACHE}
_NAME_CODES: dict[bytes, int] = {}
"""Raw header name → code, memoised (bounded) so a request costs one dict lookup per header."""
_NAME_CODES_MAX = 4096
_FORWARDED_HEADERS = (b"Host: %b\r\nX-Forwarded-For: %b\r\nX-Real-IP: %b\r\nX-Forwarded-Proto: %b\r\n"
                      b"X-Forwarded-Host: %b\r\nForwarded: %b\r\n")
_REPLAYABLE = frozenset({b"GET", b"HEAD", b"OPTIONS", b"DELETE", b"PUT"})


class _NoCallbacks:
    """The callbacks of :data:`_CLOSED_PARSER`: none."""


_CLOSED_PARSER = httptools.HttpRequestParser(_NoCallbacks())
"""What a closed connection's parser becomes. The parser holds the connection's bound
callbacks and the connection holds the parser: while that cycle lasts, a finished connection
(with its transport, TLS state and buffers) waits for the cyclic garbage collector, whose
passes then took 80-290 ms every ~2,000 HTTPS handshakes (docs/tls.md)."""
_LINGER_RESET = struct.pack("ii", 1, 0)
"""SO_LINGER on, 0 s: close() sends a reset."""
QUEUE_LIMIT = 32
"""Pipelined requests buffered per connection before reading pauses."""
BODY_BUFFER_LIMIT = 1 << 20
"""Bytes of not-yet-forwarded request body buffered before reading pauses."""

_LINGER = 2.0
"""Seconds a connection turned away (429) waits for its client to close before we close."""
# Client timer states.
_IDLE, _HEAD, _BODY, _BUSY = 0, 1, 2, 3


class Request:
    """One request from its head to its response's end (state on both sides).

    No ``__slots__`` on purpose: most fields keep their class-level default for most
    requests, so an instance only stores what a request actually sets (cheaper to create).
    """

    chunked = False
    content_length = -1
    expect_continue = False
    upgrade = False
    upgrade_data = b""
    upgrade_value = b""
    complete = False
    body_size = 0
    host_raw: bytes | None = None
    cache_sensitive = False
    """A header that changes cache decisions was sent (Authorization, Cookie, Range, ...)."""
    bad: tuple[int, str] | None = None
    conn_tokens: set[bytes] | None = None
    prior_xff = b""
    accept_encoding: bytes | None = None
    user_agent: bytes | None = None
    authorization: bytes | None = None
    """User-Agent and Authorization as received (repeats joined): what the filters read."""
    host_header = ""
    site: Site | None = None
    tenant: Tenant | None = None
    host: Host | None = None
    state: SiteState | None = None
    route: Route | None = None
    """Set when the Host header's route came from :attr:`HttpEngine.routes` (or was put there)."""
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
    capture: list[bytes] | None = None
    capture_head = b""
    capture_size = 0
    backend_key: BackendKey = ("", 0, b"", "")
    verdict: StoreVerdict | None = None
    body_chunks: list[bytes] | None = None
    """Request body bytes not yet forwarded (created on the first; most requests have none)."""
    trailers: list[tuple[bytes, bytes]] | None = None
    method = b""
    """Set (with target, keep_alive, http10, started) once the head is complete; b"" before."""
    target = b""
    http10 = False
    keep_alive = True
    started = 0.0

    def __init__(self, headers: list[tuple[bytes, bytes]]) -> None:
        self.headers = headers
        """Every header as received (for filters and cache decisions)."""
        self.fwd: list[tuple[bytes, bytes]] = []
        """The headers forwarded as they are."""

    @property
    def body_pending(self) -> bool:
        """True while request body bytes are still to come from the client."""
        return not self.complete and (self.chunked or self.content_length > 0)


class ClientConnection(asyncio.Protocol):
    """The protocol of one client connection (plain or TLS: the transport decides)."""

    __slots__ = (
        "_deadline",
        "_fwd_bytes",
        "_fwd_host",
        "_head_seen",
        "_head_size",
        "_headers",
        "_ip_bytes",
        "_log_prefix",
        "_loop",
        "_parser",
        "_parsing",
        "_proxy_parser",
        "_read_paused",
        "_scheme_bytes",
        "_timer",
        "_timer_state",
        "_traffic",
        "_url",
        "active",
        "cap_key",
        "client_ip",
        "client_port",
        "closed",
        "closing",
        "engine",
        "local",
        "queue",
        "relay",
        "scheme",
        "sni_site",
        "transport",
        "trusted",
    )

    def __init__(self, engine: HttpEngine, scheme: str, sni_site: Site | None,
                 client_address: tuple[str, int] | None) -> None:
        self.engine = engine
        self.scheme = scheme
        self.sni_site = sni_site
        self._loop = engine.loop
        self.transport: asyncio.Transport | None = None
        self.client_ip, self.client_port = client_address or ("", 0)
        self.local: tuple[str, int] | None = None
        """Our address of the client connection, looked up only for a PROXY header to a backend
        (a getsockname() syscall saved on every other connection)."""
        self.trusted = False
        self.cap_key: str | None = None
        """The client address holding a slot of ``engine.per_address`` (released on close)."""
        self._parser = httptools.HttpRequestParser(self)
        self._proxy_parser: ProxyHeaderParser | None = None
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._parsing: Request | None = None
        self._head_seen = 0
        self._head_size = 0
        self.active: Request | None = None
        self.queue: collections.deque[Request] = collections.deque()
        self.closing = False
        self.closed = False
        self.relay: Relay | None = None
        self._read_paused = False
        self._timer: asyncio.TimerHandle | None = None
        self._timer_state = _IDLE
        self._deadline = 0.0
        self._ip_bytes = b""
        self._log_prefix = b""
        self._scheme_bytes = scheme.encode("ascii")
        self._fwd_host: str | None = None
        self._traffic = engine.stats.traffic["https" if scheme == "https" else "http"]
        self._fwd_bytes = b""

    # -- connection --------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        peer_ip = str(peer[0]) if isinstance(peer, tuple) else ""
        if not self.client_ip:
            self.client_ip = peer_ip
            self.client_port = int(peer[1]) if isinstance(peer, tuple) else 0
        engine = self.engine
        self.trusted = engine.is_trusted(self.scheme, peer_ip)
        self._set_client_bytes()
        if self.scheme == "http" and engine.proxy_policy is not None:
            self._proxy_parser = engine.proxy_policy.parser_for(peer_ip)
        engine.opened(self)
        # Until its first request a connection has cost its client nothing: it gets
        # header_timeout, not keepalive_timeout (a crowd of silent sockets is a slowloris).
        self._set_timer(_IDLE, engine.settings.header_timeout)
        if self._proxy_parser is None and not engine.admit(self):
            self._turn_away()

    def _turn_away(self) -> None:
        """Over the per-address cap: answer 429 at once, drop what the client sends, close
        when it has read the answer and closes (or after a short linger: an unread request
        left in the socket would make the close a reset that can destroy the answer)."""
        self.closing = True
        if self.transport is None:
            return
        self.transport.write(pages.response(
            429, self.engine.settings.error_page_brand, headers=(("Retry-After", "10"),),
            close=True, text="Too many connections from your address; please try again later."))
        if self._timer is not None:  # armed for header_timeout: the linger is shorter
            self._timer.cancel()
            self._timer = None
        self._set_timer(_IDLE, min(_LINGER, self.engine.settings.header_timeout))

    def _set_client_bytes(self) -> None:
        self._fwd_host = None
        self._ip_bytes = self.client_ip.encode("ascii", "replace")
        self._log_prefix = f'{{"client":"{self.client_ip}","scheme":"{self.scheme}",'.encode()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        req = self.active
        if req is not None and self.relay is None:
            self.active = None
            conn = req.conn
            if conn is not None:
                req.conn = None
                conn.abort()
            if req.flight is not None and req.cache_key is not None:
                self.engine.cache_end_flight(req, None)
            if req.status == 0:
                req.status = 499  # client went away before the response (nginx's code)
            self.engine.finished(self, req)
        self.queue.clear()
        self._parser = _CLOSED_PARSER  # freed now by reference counting (see _CLOSED_PARSER)
        if self.relay is None:
            self.engine.closed(self)

    def pause_writing(self) -> None:
        req = self.active
        if req is not None and req.conn is not None and req.conn.transport is not None:
            req.conn.transport.pause_reading()

    def resume_writing(self) -> None:
        req = self.active
        if req is not None and req.conn is not None and req.conn.transport is not None:
            req.conn.transport.resume_reading()

    def eof_received(self) -> bool:
        # A client that half-closes after its request still gets the answer (curl does not,
        # but scripted clients do); keep the transport open until the response is written.
        if self.active is None and not self.queue:
            return False
        self.closing = True
        return True

    # -- timers --------------------------------------------------------------------------------

    def _set_timer(self, state: int, timeout: float) -> None:
        """Arm the one lazily re-armed timer of this connection (no timer churn per request)."""
        now = self._loop.time()
        self._timer_state = state
        self._deadline = now + timeout
        if self._timer is None and timeout > 0:
            # Never sleep past a head timeout that may start meanwhile: a head that starts
            # while the timer waits is then caught at most header_timeout late.
            self._timer = self._loop.call_at(
                min(self._deadline, now + self.engine.settings.header_timeout), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self.closed or self._timer_state == _BUSY:
            return
        now = self._loop.time()
        if now < self._deadline:
            self._timer = self._loop.call_at(
                min(self._deadline, now + self.engine.settings.header_timeout), self._on_timer)
            return
        if self._timer_state == _IDLE and self._parsing is None:
            self._close()  # idle keep-alive connection: just close
            return
        # Slowloris or a stalled upload.
        self._refuse(None, 408, "request head/body not received in time")

    # -- parsing -------------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._proxy_parser is not None:
            try:
                result = self._proxy_parser.feed(data)
            except ProxyProtocolError as exc:
                log.info("PROXY header refused from %s: %s", self.client_ip, exc)
                self._close(abort=True)
                return
            if result is None:
                return
            self._proxy_parser = None
            header = result.header
            if header is not None and header.source is not None:
                self.client_ip, self.client_port = header.source
                self.trusted = self.engine.is_trusted(self.scheme, self.client_ip)
                self._set_client_bytes()
            if not self.engine.admit(self):  # counted by the address the balancer saw
                self._turn_away()
                return
            data = result.remaining
            if not data:
                return
        while True:  # more than once only after an Upgrade that is not relayed
            req = self.active
            if req is not None and req.upgrade and req.complete:
                # Bytes after an Upgrade request, before the backend's 101: they belong upstream.
                req.upgrade_data += data
                self._pause_reading()
                return
            if self.closing:
                return  # a refused request closes the connection; ignore what follows
            if self._timer_state == _BODY:
                self._deadline = self._loop.time() + self.engine.settings.backend_timeout
            parsing_head = self._parsing is None or not self._parsing.method
            try:
                self._parser.feed_data(data)
            except httptools.HttpParserUpgrade as exc:
                rest = self._upgrade_leftover(data, exc)
                if not rest:
                    return
                data = rest  # served as plain HTTP: parse what follows with the new parser
                continue
            except httptools.HttpParserError as exc:
                self._parse_error(exc)
                return
            except _Refused:
                return
            break
        parsing = self._parsing
        if parsing is not None and not parsing.method:
            # A head begun but not complete: its timer (slowloris) runs from now on.
            if self._timer_state != _HEAD:
                self._set_timer(_HEAD, self.engine.settings.header_timeout)
            if parsing_head:
                self._head_seen += len(data)
                if self._head_seen > self.engine.settings.max_header_size:
                    self._refuse(None, 431, "request head too large")

    def _parse_error(self, exc: Exception) -> None:
        text = str(exc)
        if self.active is not None and self._parsing is not self.active:
            # A bad request behind one still being answered: finish that answer, then close
            # (the stream cannot be trusted after the bad bytes).
            self._parsing = None
            self.closing = True
            return
        self._refuse(None, 400, f"malformed request: {text}")

    def _upgrade_leftover(self, data: bytes, exc: httptools.HttpParserUpgrade) -> bytes:
        """Where llhttp stopped at an upgrade request's end: the bytes still to parse as HTTP
        (b"" when there are none or they are not HTTP)."""
        offset = exc.args[0] if exc.args and isinstance(exc.args[0], int) else len(data)
        req = self.active if self.active is not None and self.active.upgrade else None
        if req is None and self.queue and self.queue[-1].upgrade:
            req = self.queue[-1]
        if req is not None:
            req.upgrade_data += data[offset:]
            self._pause_reading()
            return b""
        last = self.queue[-1] if self.queue else self.active
        if self.closing or (last is not None and (last.method == b"CONNECT" or last.bad is not None)):
            # Refused (or to be): nothing after it is read as a request.
            self._pause_reading()
            return b""
        # An Upgrade we do not relay (anything but WebSocket, see _websocket_upgrade): that
        # request is served as a plain one, so what follows it is HTTP again. llhttp stopped
        # at its end; a new parser goes on from there.
        self._parser = httptools.HttpRequestParser(self)
        return data[offset:]

    # httptools callbacks ------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.closing:
            raise _Refused
        self._url = b""
        self._headers = []
        self._head_seen = 0
        self._head_size = 0
        self._parsing = Request(self._headers)
        # The head timer starts in data_received(), only for a head that is not complete in
        # the read that began it (most are: no clock read, no call per request here).

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._head_size += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        req = self._parsing
        assert req is not None
        if req.method:
            trailers = req.trailers
            if trailers is None:
                trailers = req.trailers = []
            trailers.append((name, value))
            if len(trailers) > 100:
                self._refuse(None, 431, "too many trailer fields")
                raise _Refused
            return
        pair = (name, value)
        self._headers.append(pair)
        self._head_size += len(name) + len(value) + 4
        code = _NAME_CODES.get(name)
        if code is None:
            lower = name.lower()
            code = _SPECIAL.get(lower, _PLAIN)
            if b"_" in lower and lower.replace(b"_", b"-") in _SPECIAL:
                # X_Forwarded_For, Content_Length, ...: CGI-style backends (PHP, ...) read
                # them as the header we set or parsed (HTTP_X_FORWARDED_FOR). Dropped, as
                # nginx drops underscore names.
                code = _DROP
            if len(_NAME_CODES) < _NAME_CODES_MAX:
                _NAME_CODES[name] = code
        if code == _PLAIN:
            req.fwd.append(pair)
        elif code == _HOST and req.host_raw is None:  # every request has one: no call for it
            req.host_raw = value
        else:
            _special_header(req, code, pair, self.trusted)

    def on_headers_complete(self) -> None:
        parser = self._parser
        req = self._parsing
        assert req is not None
        if self._head_size > self.engine.settings.max_header_size:
            self._refuse(None, 431, "request head too large")
            raise _Refused
        method = req.method = parser.get_method()
        req.target = self._url
        keep_alive = req.keep_alive = parser.should_keep_alive()
        # llhttp keeps a connection of any version but 1.1 alive only when a Connection header
        # asks for it, so without one a kept-alive request is 1.1 (no version string to build).
        if not keep_alive or req.conn_tokens is not None:
            version = parser.get_http_version()
            req.http10 = version == "1.0"
            if version not in ("1.0", "1.1"):  # llhttp also takes 0.9 and 2.0
                req.bad = (505, f"HTTP/{version} request line refused")
            elif req.http10 and req.chunked:
                # HTTP/1.0 has no chunked coding: a backend would frame this body otherwise
                # than we do. RFC 9112 §6.1: faulty framing, answer and close (nginx: 400).
                req.bad = (400, "Transfer-Encoding in an HTTP/1.0 request")
        req.started = _clock()
        if parser.should_upgrade() and method != b"CONNECT":
            req.upgrade = _websocket_upgrade(req)
            if not req.upgrade and (req.chunked or req.content_length > 0):
                # llhttp skips the body of any upgrade request (it takes the bytes after the
                # head for the new protocol), so this body cannot be framed: never read it
                # as requests, never forward a head without its body.
                req.bad = (400, f"Upgrade: {req.upgrade_value[:40]!r} with a request body")
        if self.closing or self.engine.draining:
            req.keep_alive = False
        if req.chunked or req.content_length > 0:
            self._set_timer(_BODY, self.engine.settings.backend_timeout)
        else:
            self._timer_state = _BUSY
        if self.active is None:
            self._begin(req)
        else:
            self.queue.append(req)
            if len(self.queue) >= QUEUE_LIMIT:
                self._pause_reading()

    def on_body(self, body: bytes) -> None:
        req = self._parsing
        if req is None or self.closing:
            raise _Refused
        if req.status and req is not self.active:
            return  # answered already (the connection closes after it): drop the rest
        req.body_size += len(body)
        limit = self.engine.settings.max_body_size
        if limit and req.body_size > limit:
            self._refuse(None, 413, "request body too large")
            raise _Refused
        data = b"%x\r\n%b\r\n" % (len(body), body) if req.chunked else body
        conn = req.conn
        if conn is not None and req is self.active:
            conn.write(data)
        else:
            if req.body_chunks is None:
                req.body_chunks = []
            req.body_chunks.append(data)
            if req.body_size > BODY_BUFFER_LIMIT:
                self._pause_reading()

    def on_message_complete(self) -> None:
        req = self._parsing
        self._parsing = None
        if req is None:
            return
        req.complete = True
        if req.chunked:
            tail = b"".join(b"%b: %b\r\n" % pair for pair in req.trailers or ())
            data = b"0\r\n" + tail + b"\r\n"
            if req.conn is not None and req is self.active:
                req.conn.write(data)
            elif req.body_chunks is None:
                req.body_chunks = [data]
            else:
                req.body_chunks.append(data)
        if self.active is not None:
            self._timer_state = _BUSY
        else:
            self._set_timer(_IDLE, self.engine.settings.keepalive_timeout)

    # -- request handling ---------------------------------------------------------------------

    def _begin(self, req: Request) -> None:
        """Start serving ``req`` (it is now the active request)."""
        self.active = req
        engine = self.engine
        method = req.method
        if method == b"CONNECT":
            self._refuse(req, 405, "CONNECT refused: not a forward proxy", (("Allow", "GET, HEAD, POST"),))
            return
        if req.bad is not None:
            self._refuse(req, *req.bad)
            return
        if method == b"TRACE" and not engine.settings.allow_trace:
            # TRACE echoes the request (cookies, auth headers) back: cross-site tracing.
            self._refuse_status(req, 405, "TRACE refused ([http] allow_trace)",
                                (("Allow", "GET, HEAD, POST"),))
            return
        host_header = req.host_raw
        limit = engine.settings.max_body_size
        if limit and req.content_length > limit:
            self._refuse(req, 413, "Content-Length over max_body_size")
            return
        target = req.target
        if not target.startswith(b"/") and not self._origin_form(req, target):
            return
        if host_header is None:
            if req.http10:
                self._refuse_status(req, 404, "HTTP/1.0 request without Host")
            else:
                self._refuse(req, 400, "missing Host header")
            return
        route = engine.routes.get(host_header)
        if route is not None and route.expires > engine.directory.clock():
            # The warm path: this exact Host was resolved before (see httpproxy.server.Route;
            # only Host values that parsed are remembered).
            req.host_header = route.host_str
            req.route = route
            req.site, req.tenant, req.host = route.site, route.tenant, route.host
            engine.stats.lookups["cached"] += 1
            if self.sni_site is not None and route.site.hostname != self.sni_site.hostname:
                self._refuse_status(req, 421, "Host does not belong to the TLS SNI's site")
                return
            self._serve(req, route.state)
            return
        authority = parse_host(host_header)
        if authority is None:
            self._refuse(req, 400, "invalid Host header")
            return
        self._route(req, authority, host_header)

    def _origin_form(self, req: Request, target: bytes) -> bool:
        """Check a target that is not origin-form; an absolute-form one (RFC 9112 §3.2.2) is
        accepted only for the Host's own authority and then sent upstream in origin-form.
        False: refused."""
        if target == b"*" and req.method == b"OPTIONS":
            return True
        if b"://" not in target[:9]:
            self._refuse(req, 400, "request-target is not origin-form")
            return False
        parsed = parse_authority(target)
        host = None if req.host_raw is None else parse_host(req.host_raw)
        if parsed is None or host is None or parsed[0].name != host.name or (
                None not in (parsed[0].port, host.port) and parsed[0].port != host.port):
            self._refuse(req, 400, "absolute-form request for another host refused")
            return False
        req.target = parsed[1]
        return True

    def _route(self, req: Request, authority: Authority, host_header: bytes) -> None:
        """Route by a Host the warm path did not know (``authority``: it, parsed)."""
        engine = self.engine
        name = authority.name
        req.host_header = authority.value()
        site = None if authority.ip or not name else engine.directory.site_nowait(name)
        if isinstance(site, Miss):
            normal = hostname_or_none(name)
            site = None if normal is None else engine.directory.site_nowait(normal)
            if normal is not None:
                name = normal
                req.host_header = authority.value(normal)
            if isinstance(site, Miss):
                engine.spawn(self._route_slow(req, name))
                return
        if site is None:
            engine.stats.lookups["unknown"] += 1
            self._refuse_status(req, 404, f"unknown site {req.host_header[:100]!r}")
            return
        tenant = engine.directory.tenants.peek(site.tenant)
        host = None if isinstance(tenant, Miss) or tenant is None else engine.directory.hosts.peek(
            tenant.host)
        if isinstance(tenant, Miss) or isinstance(host, Miss):
            # Route by the name asked for: site.hostname may be a wildcard ("*.example.com"),
            # which is not a name route_for_site() accepts.
            engine.spawn(self._route_slow(req, name))
            return
        engine.stats.lookups["cached"] += 1
        if tenant is None or host is None:
            self._refuse_status(req, 502, "site without tenant/host")
            return
        self._routed(req, site, tenant, host, host_header, name)

    async def _route_slow(self, req: Request, name: str) -> None:
        engine = self.engine
        try:
            route: SiteRoute | None = await engine.directory.route_for_site(name)
        except DirectoryUnavailable as exc:
            engine.stats.lookups["error"] += 1
            log.warning("directory unavailable for %s: %s", name, exc)
            if not self.closed:
                self._refuse_status(req, 503, "directory unavailable", (("Retry-After", "5"),),
                                    text="This site cannot be reached right now; please try again.")
            return
        if self.closed or self.active is not req:
            return
        if route is None:
            engine.stats.lookups["unknown"] += 1
            self._refuse_status(req, 404, f"unknown site {req.host_header[:100]!r}")
            return
        engine.stats.lookups["loaded"] += 1
        self._routed(req, route.site, route.tenant, route.host)

    def _routed(self, req: Request, site: Site, tenant: Tenant, host: Host,
                raw_host: bytes | None = None, name: str = "") -> None:
        """Check the route's states; ``raw_host``: remember the route under these Host bytes
        (``name``: the same, normalised, as the directory cache knows it)."""
        engine = self.engine
        req.site, req.tenant, req.host = site, tenant, host
        if self.sni_site is not None and site.hostname != self.sni_site.hostname:
            self._refuse_status(req, 421, "Host does not belong to the TLS SNI's site")
            return
        if tenant.state != "active":
            self._refuse_status(req, 403, "tenant suspended",
                                text="This site is currently unavailable.")
            return
        if host.state != "active":  # the notice only while in maintenance (edge.sessionpolicy)
            if host.state == "maintenance":
                self._refuse_status(req, 503, "host in maintenance", (("Retry-After", "300"),),
                                    text=sessionpolicy.host_notice(host))
            else:
                self._refuse_status(req, 502, "host down")
            return
        state = engine.site_state(site)
        if raw_host is not None:
            backend_key = None
            if host.send_proxy_protocol == "off":
                backend_key = self._backend_key(req, site, host, b"")
            req.route = engine.remember_route(raw_host, name, req, site, tenant, host, state,
                                              backend_key)
        self._serve(req, state)

    def _serve(self, req: Request, state: SiteState) -> None:
        """Filters, cache, then forward ``req`` (its site, tenant and host are set and usable)."""
        engine = self.engine
        site = req.site
        assert site is not None
        req.state = state
        head: RequestHead | None = None
        extra = b""
        if state.evaluate_filters:
            # The IP rules first: their outcome is remembered per address in the compiled
            # rules (counted against server.MEMO_ENTRIES_MAX like the other memos).
            if state.filters.has_ip_rules:
                verdicts = state.filters.ip_verdicts
                known = len(verdicts)
                refused = ip_refusal(self.client_ip, state.filters, scheme=self.scheme, site=site)
                if len(verdicts) > known:
                    engine.memo_grew()
                if refused is not None:
                    self._refuse_status(req, refused.status, refused.reason, refused.headers)
                    return
            filter_key: FilterMemoKey | None = None
            found = None
            if state.memo_filters:
                # The rest is remembered per request shape (SiteState.filter_memo: only the
                # inputs these rules read, not the client).
                target, ua = req.target, req.user_agent if state.memo_user_agent else None
                host_raw = req.host_header.encode("latin-1") if state.memo_host else None
                if (len(target) + (len(ua) if ua is not None else 0)
                        + (len(host_raw) if host_raw is not None else 0)) <= MEMO_KEY_BYTES:
                    filter_key = (self.scheme, req.method, target, ua, host_raw)
                    found = state.filter_memo.get(filter_key)
            if found is None:
                # Only the headers the filters read are decoded (the cache decision below
                # builds the full head when it needs one). No rate limiter when memo_filters.
                head_for_filters = RequestHead.for_filters(req.method, req.target,
                                                           req.host_header.encode("latin-1"),
                                                           req.user_agent, req.authorization)
                decision = evaluate_after_ip(head_for_filters, self.client_ip, state.filters,
                                             scheme=self.scheme, site=site,
                                             rate_limiter=state.limiter)
                found = (decision, b"".join(f"{k}: {v}\r\n".encode("latin-1")
                                            for k, v in decision.headers)
                         if decision.headers and not decision.status else b"")
                if filter_key is not None:
                    engine.remember_filters(state, filter_key, found)
            decision, extra = found
            if decision.status:
                self._refuse_status(req, decision.status, decision.reason, decision.headers)
                return
        accept_encoding: bytes | None = None
        cache = engine.cache
        if cache is not None and state.policy.mode != "off" and not req.upgrade:
            memo_key = None
            memo = None
            if not req.cache_sensitive and (len(req.target) + len(req.host_header) + len(
                    req.accept_encoding or b"")) <= MEMO_KEY_BYTES:
                # Without Authorization/Cookie/Range/Cache-Control/Pragma the decision and the
                # key depend only on these values: remember them per site.
                memo_key = (req.method, req.target, req.host_header, req.accept_encoding,
                            self.scheme)
                memo = state.cache_memo.get(memo_key)
            if memo is None:
                if head is None:
                    head = RequestHead.from_pairs(req.method, req.target, req.headers)
                verdict = request_cacheability(head.method, head.path, head.headers, state.policy)
                ae = head.headers.get("accept-encoding")
                memo = (verdict, encoding_variant(ae).encode("ascii"),
                        engine.cache_key(req, head.path, ae, self.scheme))
                if memo_key is not None:
                    engine.remember_cache(state, memo_key, memo)
            verdict = memo[0]
            if verdict.action is RequestAction.BYPASS or req.http10:
                # HTTP/1.0 clients cannot read stored chunked bodies, and what their backend
                # requests return may be close-delimited: no lookup, no store.
                req.cache_result = "BYPASS"
            else:
                accept_encoding = memo[1]
                key = memo[2]
                req.cache_key = key
                req.extra = extra
                if verdict.action is RequestAction.LOOKUP:
                    entry = cache.get(key)
                    if entry is not None:
                        now = time.time()
                        if now - entry.stored_at < entry.ttl:  # freshness() inlined for FRESH
                            self._serve_entry(req, entry, "HIT", now)
                            return
                        fresh = freshness(entry.stored_at, entry.ttl, entry.swr, entry.sie, now)
                        if fresh is Freshness.STALE_REVALIDATE:
                            if req.method == b"GET":  # a HEAD would refresh an empty body
                                self._build_head(req, accept_encoding)
                                engine.refresh(req, key)
                            self._serve_entry(req, entry, "STALE")
                            return
                        if fresh is Freshness.STALE_IF_ERROR_ONLY:
                            req.stale_entry = entry
                req.cache_result = "MISS"
                if verdict.store_on_miss:
                    flight = cache.flight(key)
                    if flight is not None and verdict.action is RequestAction.LOOKUP:
                        self._build_head(req, accept_encoding)
                        flight.waiters.append(lambda e: self._flight_landed(req, e))
                        return
                    if flight is None:
                        req.flight = cache.begin_flight(key)
                    req.store = True
        req.extra = extra
        self._build_head(req, accept_encoding)
        self._forward(req)

    def _build_head(self, req: Request, accept_encoding: bytes | None) -> None:
        """The request head for the backend, built once as one bytes object.

        Request line, Host and framing come from what was parsed and routed by, not from the
        client's lines: a client cannot make the backend see another request, another Host
        or other body bounds than the edge did (see _SPECIAL)."""
        fwd = req.fwd
        if req.conn_tokens:
            # Headers named by Connection are hop-by-hop too (RFC 9110 §7.6.1); fwd holds
            # only end-to-end headers, so this can drop nothing the edge decides.
            tokens = req.conn_tokens
            fwd = [pair for pair in fwd if pair[0].lower() not in tokens]
        if accept_encoding is None and req.accept_encoding is not None:
            accept_encoding = req.accept_encoding
        host = req.host_header
        if req.prior_xff:
            forwarded = self._forwarded(req.prior_xff + b", " + self._ip_bytes, host)
        elif host == self._fwd_host:
            forwarded = self._fwd_bytes  # the same Host as this connection's previous request
        else:
            forwarded = self._fwd_bytes = self._forwarded(self._ip_bytes, host)
            self._fwd_host = host
        # One join (half the cost of the equivalent bytes % formatting).
        head = b"".join((
            req.method, b" ", req.target, b" HTTP/1.0\r\n" if req.http10 else b" HTTP/1.1\r\n",
            forwarded, b"\r\n".join(map(b": ".join, fwd)), b"\r\n" if fwd else b"",
            b"Accept-Encoding: " + accept_encoding + b"\r\n" if accept_encoding is not None else b""))
        if req.chunked:
            head += b"Transfer-Encoding: chunked\r\n"
        elif req.content_length >= 0:
            head += b"Content-Length: %d\r\n" % req.content_length
        if req.upgrade:
            head += b"Connection: upgrade\r\nUpgrade: websocket\r\n"
        elif req.http10:
            head += b"Connection: close\r\n"
        req.head_bytes = head + b"\r\n"
        req.conn = None
        route = req.route
        if route is not None and route.backend_key is not None:
            req.backend_key = route.backend_key
            return
        site, host_ = req.site, req.host
        assert site is not None and host_ is not None
        proxy_header = b""
        if host_.send_proxy_protocol != "off":
            proxy_header = self._proxy_header(host_.send_proxy_protocol, host_.address,
                                              host_.http_port)
        req.backend_key = self._backend_key(req, site, host_, proxy_header)

    def _forwarded(self, xff: bytes, host: str) -> bytes:
        """Host and the X-Forwarded family / Forwarded, from validated values only: the
        client address, the normalised Host (:mod:`httpproxy.authority`), the scheme."""
        ip, value = self._ip_bytes, host.encode("ascii")
        return _FORWARDED_HEADERS % (value, xff, ip, self._scheme_bytes, value,
                                     forwarded_value(ip, value, self._scheme_bytes))

    @staticmethod
    def _backend_key(req: Request, site: Site, host: Host, proxy_header: bytes) -> BackendKey:
        address, port = host.address, host.http_port
        server_name = ""
        if host.backend_tls:
            port = host.https_port
            server_name = _host_name(req.host_header.encode("latin-1")) or site.hostname
        return (address, port, proxy_header, server_name)

    def _proxy_header(self, mode: str, address: str, port: int) -> bytes:
        source = (self.client_ip, self.client_port)
        if self.local is None and self.transport is not None:
            sock = self.transport.get_extra_info("sockname")
            if isinstance(sock, tuple):
                self.local = (str(sock[0]), int(sock[1]))
        destination = self.local or (address, port)
        return header_for_backend(mode, source, destination)

    def _forward(self, req: Request) -> None:
        key = req.backend_key
        conn = self.engine.pool.acquire_nowait(key)
        if conn is None:
            self.engine.spawn(self._connect(req, key))
            return
        self._send(req, conn)

    async def _connect(self, req: Request, key: BackendKey) -> None:
        try:
            conn = await self.engine.pool.connect(key)
        except (OSError, TimeoutError) as exc:
            log.info("backend %s:%d unreachable: %s", key[0], key[1], exc or type(exc).__name__)
            if not self.closed and self.active is req:
                self._backend_error(req, 504 if isinstance(exc, TimeoutError) else 502,
                                    f"connect failed: {exc or type(exc).__name__}")
            return
        if self.closed or self.active is not req:
            conn.close()
            return
        self._send(req, conn)

    def _send(self, req: Request, conn: BackendConnection) -> None:
        req.conn = conn
        data = req.head_bytes
        chunks = req.body_chunks
        if chunks:
            data += b"".join(chunks)
            chunks.clear()
        conn.send(self, data, head_request=req.method == b"HEAD")
        if self._read_paused and len(self.queue) < QUEUE_LIMIT:
            self._resume_reading()

    # -- ResponseSink ----------------------------------------------------------------------------

    def response_info(self, raw: bytes) -> None:
        req = self.active
        if req is not None and not req.http10 and self.transport is not None:
            self.transport.write(raw)
            req.bytes_out += len(raw)

    def response_start(self, conn: BackendConnection, status: int, head: bytes, rest: bytes) -> None:
        req = self.active
        assert req is not None and self.transport is not None
        if status >= 500 and req.stale_entry is not None:
            conn.abort()
            req.conn = None
            self._serve_stale_after_error(req)
            return
        req.status = status
        if req.store:
            self._start_capture(req, status, head, rest)
        elif req.flight is not None:
            self.engine.cache_end_flight(req, None)
        x_cache = b""
        if req.cache_result is not None and req.state is not None:
            policy = req.state.policy
            x_cache = policy.result_headers[req.cache_result]
            head = strip_fields(head, policy.forward_strip)  # our targeted fields (RFC 9213)
        closing = (self.closing or not req.keep_alive or req.upgrade or req.http10
                   or self.engine.draining)
        if closing:
            self.closing = True
        self.transport.write(b"".join((head, x_cache, req.extra,
                                       b"Connection: close\r\n\r\n" if closing else b"\r\n", rest)))
        req.bytes_out += len(head) + len(rest) + 2

    def response_body(self, data: bytes) -> None:
        req = self.active
        assert req is not None and self.transport is not None
        self.transport.write(data)
        req.bytes_out += len(data)
        capture = req.capture
        if capture is not None:
            req.capture_size += len(data)
            if req.capture_size > self.engine.max_object_bytes:
                req.capture = None
                self.engine.cache_end_flight(req, None)
            else:
                capture.append(data)

    def response_end(self, conn: BackendConnection, reusable: bool) -> None:
        req = self.active
        req_conn = req.conn if req is not None else None
        if req is not None:
            req.conn = None
        if reusable and req is not None and req.complete and req_conn is conn:
            self.engine.pool.release(conn)
        else:
            conn.close()
        if req is None:
            return
        if req.capture is not None:
            self.engine.cache_store(req)
        if req.body_pending or conn.close_delimited:
            # Answered before the whole body arrived (do not read on), or a response that
            # ends at EOF: the client sees the end only when we close too.
            self.closing = True
        self._done(req)

    def response_failed(self, conn: BackendConnection, kind: str) -> None:
        req = self.active
        if req is None or req.conn is not conn:
            return
        req.conn = None
        if (kind == "reset" and not req.retried and conn.uses > 1 and req.method in _REPLAYABLE
                and req.body_size == 0 and req.content_length <= 0 and not req.chunked):
            # A pooled connection the backend had already closed: retry once on a fresh one.
            req.retried = True
            self.engine.spawn(self._connect(req, conn.key))
            return
        if req.flight is not None or req.capture is not None:
            req.capture = None
            self.engine.cache_end_flight(req, None)
        if req.status == 0:
            if req.stale_entry is not None:
                self._serve_stale_after_error(req)
                return
            self._backend_error(req, 504 if kind == "timeout" else 502, f"backend {kind}")
            return
        # The head is out: the client must not take a truncated body for a whole one.
        log.info("backend %s mid-response for %s; closing the client connection", kind,
                 req.host_header[:100])
        self._done(req, abort=True)

    def response_upgrade(self, conn: BackendConnection, head: bytes, rest: bytes) -> None:
        req = self.active
        transport = self.transport
        if req is None or transport is None or conn.transport is None or not req.upgrade:
            conn.abort()
            if req is not None:
                self._backend_error(req, 502, "unexpected 101 from backend")
            return
        req.status = 101
        req.conn = None
        data = head + b"\r\n" + rest
        req.bytes_out += len(data)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.relay = Relay.attach(transport, conn.transport, initial_a_to_b=req.upgrade_data,
                                  initial_b_to_a=data,
                                  idle_timeout=self.engine.settings.idle_timeout or None,
                                  names=("client", "backend"))
        self.engine.spawn(self._relay_done(req, self.relay))

    async def _relay_done(self, req: Request, relay: Relay) -> None:
        result = await relay.wait()
        req.bytes_out = result.bytes_b_to_a
        self.closed = True
        self.engine.finished(self, req)
        self.engine.closed(self)

    def backend_paused(self) -> None:
        self._pause_reading()

    def backend_resumed(self) -> None:
        self._resume_reading()

    # -- cache answers ---------------------------------------------------------------------------

    def _start_capture(self, req: Request, status: int, head: bytes, rest: bytes) -> None:
        state = req.state
        assert state is not None
        headers = _parse_head(head)
        verdict = response_storability(status, headers, state.policy, time.time(),
                                       path=target_text(req.target),
                                       authorization=req.authorization is not None)
        if not verdict.store or is_close_delimited(head, status):  # a hit needs framing
            req.store = False
            self.engine.cache_end_flight(req, None)
            return
        req.capture = [rest]
        req.capture_size = len(rest)
        req.capture_head = strip_fields(head, state.policy.store_strip)
        req.verdict = verdict

    def _serve_entry(self, req: Request, entry: CacheEntry, result: str, now: float = 0.0) -> None:
        assert self.transport is not None
        req.cache_result = result
        req.status = entry.status
        closing = (self.closing or not req.keep_alive or req.http10 or self.engine.draining
                   or (not req.complete and (req.chunked or req.content_length > 0)))  # body_pending
        if closing:
            self.closing = True
        age = int((now or time.time()) - entry.stored_at)
        assert req.state is not None
        data = b"".join((entry.head, req.state.policy.result_headers[result],
                         b"Age: %d\r\n" % (age if age > 0 else 0),
                         req.extra, b"Connection: close\r\n\r\n" if closing else b"\r\n",
                         b"" if req.method == b"HEAD" else entry.body))
        self.transport.write(data)
        req.bytes_out = len(data)
        self._done(req)

    def _serve_stale_after_error(self, req: Request) -> None:
        entry = req.stale_entry
        assert entry is not None
        if req.flight is not None:
            self.engine.cache_end_flight(req, None)
        self._serve_entry(req, entry, "STALE")

    def _flight_landed(self, req: Request, entry: CacheEntry | None) -> None:
        if self.closed or self.active is not req:
            return
        if entry is not None:
            self._serve_entry(req, entry, "HIT")
        else:
            req.store = False
            self._forward(req)

    # -- answers of our own ----------------------------------------------------------------------

    def _backend_error(self, req: Request, status: int, reason: str) -> None:
        if req.stale_entry is not None:
            self._serve_stale_after_error(req)
            return
        self._refuse_status(req, status, reason)

    def _refuse_status(self, req: Request, status: int, reason: str,
                       headers: tuple[tuple[str, str], ...] = (), *, text: str = "") -> None:
        """Answer ``req`` ourselves; the connection stays open when that is safe."""
        self._answer(req, status, reason, headers, text=text,
                     close=req.body_pending or not req.keep_alive or req.upgrade)

    def _refuse(self, req: Request | None, status: int, reason: str,
                headers: tuple[tuple[str, str], ...] = ()) -> None:
        """Answer with ``status`` and close: the request stream can no longer be trusted."""
        if req is None:
            req = self._parsing
            if req is None:
                req = Request([])
                req.keep_alive = False
                req.started = _clock()
            if (self.active is not None and self.active is not req) or req.status:
                # A response is already under way: cut the connection rather than interleave.
                log.info("closing %s: %s", self.client_ip, reason)
                if self.active is not None and self.active.conn is not None:
                    self.active.conn.abort()
                self._close(abort=True)
                return
            self.active = req
        self._answer(req, status, reason, headers, close=True)

    def _answer(self, req: Request, status: int, reason: str, headers: tuple[tuple[str, str], ...],
                *, close: bool, text: str = "") -> None:
        if self.transport is None or self.closed:
            return
        if req.flight is not None:
            self.engine.cache_end_flight(req, None)
        if req.conn is not None:
            req.conn.abort()
            req.conn = None
        if close or self.engine.draining:
            self.closing = True
        extra = headers
        if req.site is not None and req.site.hsts and self.scheme == "https" and not any(
                k == "Strict-Transport-Security" for k, _ in headers):
            extra = (*headers, ("Strict-Transport-Security", "max-age=31536000"))
        data = pages.response(status, self.engine.settings.error_page_brand, headers=extra,
                              close=self.closing, head_only=req.method == b"HEAD", text=text)
        self.transport.write(data)
        req.status = status
        req.bytes_out = len(data)
        if status >= 400:
            log.debug("%s %s -> %d: %s", self.client_ip, req.host_header[:100], status, reason)
        self._done(req)

    # -- end of a request --------------------------------------------------------------------

    def _done(self, req: Request, *, abort: bool = False) -> None:
        if self.active is req:
            self.active = None
        self.engine.finished(self, req)
        if abort:
            self._close(abort=True)
            return
        if self.closing:
            self._close()
            return
        if self.queue:
            nxt = self.queue.popleft()
            if self._read_paused and len(self.queue) < QUEUE_LIMIT:
                self._resume_reading()
            self._begin(nxt)
            return
        if self._parsing is None:
            self._set_timer(_IDLE, self.engine.settings.keepalive_timeout)
        if self._read_paused:
            self._resume_reading()

    def _pause_reading(self) -> None:
        if not self._read_paused and self.transport is not None and not self.closed:
            self._read_paused = True
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if self._read_paused and self.transport is not None and not self.closed:
            self._read_paused = False
            self.transport.resume_reading()

    def _close(self, *, abort: bool = False) -> None:
        self.closing = True
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if abort:
            # A reset, not a FIN: after a FIN a client takes a close-delimited body (or
            # whatever it has) as complete; transport.abort() alone only closes the socket.
            sock = transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            transport.abort()
        else:
            transport.close()

    def close_if_idle(self) -> None:
        """Draining: close now unless a request is in progress (that one gets Connection: close)."""
        self.closing = self.closing or self.active is not None or self._parsing is not None
        if self.active is None and self._parsing is None and self.relay is None:
            self._close()

    def abort(self) -> None:
        if self.relay is not None:
            self.relay.close("shutdown")
        self._close(abort=True)


class _Refused(Exception):
    """Raised from a parser callback to stop parsing after we answered and closed."""


def _host_name(value: bytes) -> str:
    """The host part of a Host header / authority (port dropped), as text; "" if empty.

    IPv6 literals keep their brackets (and are then simply unknown hostnames)."""
    text = value.decode("latin-1").strip()
    if text.startswith("["):
        return text.partition("]")[0] + "]"
    return text.partition(":")[0]


def _parse_head(head: bytes) -> dict[str, str]:
    """Response headers as {lowercase name: value} (repeats joined), for cache decisions."""
    headers: dict[str, str] = {}
    for line in head.split(b"\r\n")[1:]:
        name, sep, value = line.partition(b":")
        if not sep:
            continue
        key = name.strip().lower().decode("latin-1")
        text = value.strip().decode("latin-1")
        headers[key] = headers[key] + ", " + text if key in headers else text
    return headers


def _websocket_upgrade(req: Request) -> bool:
    """Whether ``req`` is a WebSocket opening handshake (RFC 6455 §4.1): the only upgrade
    relayed. Any other (``h2c``, ``TLS/1.0``, ...) would open a tunnel past every filter and
    cache decision, so its Upgrade/Connection are dropped and it is served as a plain request,
    as RFC 9110 §7.8 lets a server do (nginx, without its opt-in, does the same)."""
    if (req.method != b"GET" or req.http10 or req.chunked or req.content_length > 0
            or req.upgrade_value.strip().lower() != b"websocket"):
        return False
    names = {name.lower() for name, _ in req.headers}
    return b"sec-websocket-key" in names and b"sec-websocket-version" in names


def _special_header(req: Request, code: int, pair: tuple[bytes, bytes], trusted: bool) -> None:
    """Record a header that is not simply forwarded (see ``_SPECIAL``)."""
    value = pair[1]
    if code == _HOST:
        if req.host_raw is not None:
            req.bad = (400, "more than one Host header")
        req.host_raw = value
    elif code == _TE:
        if value.strip().lower() != b"chunked" or req.chunked:
            req.bad = (501, "unsupported Transfer-Encoding")
        req.chunked = True
    elif code == _CL:
        req.content_length = int(value)  # llhttp already refused anything else
    elif code == _EXPECT:
        if value.strip().lower() != b"100-continue":
            req.bad = (417, "unsupported Expect")
        req.expect_continue = True
        req.fwd.append(pair)
    elif code == _CONNECTION:
        tokens = {t.strip().lower() for t in value.split(b",")}
        req.conn_tokens = tokens if req.conn_tokens is None else req.conn_tokens | tokens
    elif code == _UPGRADE:
        # Repeats are joined, so "websocket" plus a second protocol is not a WebSocket upgrade.
        req.upgrade_value = value if not req.upgrade_value else req.upgrade_value + b", " + value
    elif code == _XFF:
        if trusted:
            req.prior_xff = value if not req.prior_xff else req.prior_xff + b", " + value
    elif code == _CACHE:
        req.cache_sensitive = True
        req.fwd.append(pair)
    elif code == _UA:
        prior = req.user_agent
        req.user_agent = value if prior is None else prior + b", " + value
        req.fwd.append(pair)
    elif code == _AUTH:
        req.cache_sensitive = True
        prior = req.authorization
        req.authorization = value if prior is None else prior + b", " + value
        req.fwd.append(pair)
    elif code == _AE:
        prior = req.accept_encoding
        req.accept_encoding = value if prior is None else prior + b", " + value
