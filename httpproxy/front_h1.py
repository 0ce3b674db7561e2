"""The HTTP/1 front end: one client connection's bytes → exchanges (:mod:`httpproxy.exchange`),
and their answers → bytes.

An ``asyncio.Protocol`` driven by httptools (llhttp) callbacks. It owns what is HTTP/1 about a
request: the PROXY header, the connection's timers, parsing and the smuggling checks,
pipelining order, ``Connection``/keep-alive, writing responses (a backend's raw head passed
through with only ``Connection: close`` added) and WebSocket relays (:mod:`edge.relay`).
Everything else (routing, filters, cache, forwarding) is the exchange's. A request that finds
its site, tenant and host in the directory cache, passes the filters and gets a pooled backend
connection costs no coroutine, future or task.

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
from typing import TYPE_CHECKING, Protocol

import httptools

from edge.proxyproto import ProxyHeaderParser, ProxyProtocolError
from edge.relay import Relay
from httpproxy import pages
from httpproxy.exchange import (
    HOST,
    NAME_CODES,
    PLAIN,
    ClientInfo,
    EngineServices,
    Exchange,
    ResponseHead,
    header_code,
)

if TYPE_CHECKING:
    from edge.directory.model import Site
    from edge.limits import ConnectionCap
    from edge.proxyproto import ProxyHeaderPolicy

__all__ = ["ClientConnection", "ConnectionServices"]

log = logging.getLogger("edge.http")
_clock = time.perf_counter
"""Request timing (uvloop's loop.time() has millisecond steps: too coarse for latencies)."""


class ConnectionServices(EngineServices, Protocol):
    """The engine as an HTTP/1 connection sees it: what its exchanges need, plus the
    per-connection bookkeeping (:class:`httpproxy.server.HttpEngine` is one)."""

    loop: asyncio.AbstractEventLoop
    proxy_policy: ProxyHeaderPolicy | None
    per_address: ConnectionCap | None

    def opened(self, conn: ClientConnection) -> None:
        """Count ``conn`` as open (its listener's gauge, draining)."""

    def admit(self, conn: ClientConnection) -> bool:
        """Take a per-address slot for ``conn``; False: over the cap (answer 429)."""

    def closed(self, conn: ClientConnection) -> None:
        """``conn`` is gone: release its slot and count it closed."""

    def is_trusted(self, scheme: str, ip: str) -> bool:
        """Whether X-Forwarded-*/PROXY headers from ``ip`` are believed."""


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

_LINGER = 2.0
"""Seconds a connection turned away (429) waits for its client to close before we close."""
# Client timer states.
_IDLE, _HEAD, _BODY, _BUSY = 0, 1, 2, 3


class ClientConnection(asyncio.Protocol):
    """The protocol of one client connection (plain or TLS: the transport decides)."""

    __slots__ = (
        "_deadline",
        "_head_seen",
        "_head_size",
        "_headers",
        "_loop",
        "_parser",
        "_parsing",
        "_proxy_parser",
        "_read_paused",
        "_timer",
        "_timer_state",
        "_url",
        "active",
        "cap_key",
        "client",
        "closed",
        "closing",
        "engine",
        "queue",
        "relay",
        "scheme",
        "transport",
    )

    def __init__(self, engine: ConnectionServices, scheme: str, sni_site: Site | None,
                 client_address: tuple[str, int] | None) -> None:
        self.engine = engine
        self.scheme = scheme
        self._loop = engine.loop
        self.transport: asyncio.Transport | None = None
        ip, port = client_address or ("", 0)
        self.client = ClientInfo(scheme, ip, port, sni_site=sni_site,
                                 traffic=engine.stats.traffic["https" if scheme == "https" else "http"],
                                 local_lookup=self._local_address)
        """What this connection's exchanges know of it (address, scheme, SNI site, trust)."""
        self.cap_key: str | None = None
        """The client address holding a slot of ``engine.per_address`` (released on close)."""
        self._parser = httptools.HttpRequestParser(self)
        self._proxy_parser: ProxyHeaderParser | None = None
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._parsing: Exchange | None = None
        self._head_seen = 0
        self._head_size = 0
        self.active: Exchange | None = None
        self.queue: collections.deque[Exchange] = collections.deque()
        self.closing = False
        self.closed = False
        self.relay: Relay | None = None
        self._read_paused = False
        self._timer: asyncio.TimerHandle | None = None
        self._timer_state = _IDLE
        self._deadline = 0.0

    @property
    def client_ip(self) -> str:
        return self.client.ip

    @property
    def trusted(self) -> bool:
        return self.client.trusted

    def _local_address(self) -> tuple[str, int] | None:
        """Our address of the client connection, looked up only for a PROXY header to a backend
        (a getsockname() syscall saved on every other connection)."""
        sock = self.transport.get_extra_info("sockname") if self.transport is not None else None
        return (str(sock[0]), int(sock[1])) if isinstance(sock, tuple) else None

    # -- connection --------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        peer_ip = str(peer[0]) if isinstance(peer, tuple) else ""
        client = self.client
        if not client.ip:
            client.set_address(peer_ip, int(peer[1]) if isinstance(peer, tuple) else 0)
        engine = self.engine
        client.trusted = engine.is_trusted(self.scheme, peer_ip)
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

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        req = self.active
        if req is not None and self.relay is None:
            self.active = None
            req.cancel()
        self.queue.clear()
        self._parser = _CLOSED_PARSER  # freed now by reference counting (see _CLOSED_PARSER)
        # The same for the other references back to this connection: a request cut off
        # mid-head (it names this connection as its sink) and the local-address lookup.
        self._parsing = None
        self.client.local_lookup = None
        if self.relay is None:
            self.engine.closed(self)

    def pause_writing(self) -> None:
        if self.active is not None:
            self.active.pause_response()

    def resume_writing(self) -> None:
        if self.active is not None:
            self.active.resume_response()

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
        self._refuse(408, "request head/body not received in time")

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
                self.client.set_address(*header.source)
                self.client.trusted = self.engine.is_trusted(self.scheme, self.client_ip)
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
                    self._refuse(431, "request head too large")

    def _parse_error(self, exc: Exception) -> None:
        text = str(exc)
        if self.active is not None and self._parsing is not self.active:
            # A bad request behind one still being answered: finish that answer, then close
            # (the stream cannot be trusted after the bad bytes).
            self._parsing = None
            self.closing = True
            return
        self._refuse(400, f"malformed request: {text}")

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
        self._parsing = Exchange(self.engine, self.client, self, self._headers)
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
                self._refuse(431, "too many trailer fields")
                raise _Refused
            return
        pair = (name, value)
        self._headers.append(pair)
        self._head_size += len(name) + len(value) + 4
        code = NAME_CODES.get(name)
        if code is None:
            code = header_code(name)
        # Exchange.add_header() inlined for the two commonest cases (a call saved per header).
        if code == PLAIN:
            req.fwd.append(pair)
        elif code == HOST and req.host_raw is None:  # every request has one: no call for it
            req.host_raw = value
        else:
            req.special_header(code, pair)

    def on_headers_complete(self) -> None:
        parser = self._parser
        req = self._parsing
        assert req is not None
        if self._head_size > self.engine.settings.max_header_size:
            self._refuse(431, "request head too large")
            raise _Refused
        method = req.method = parser.get_method()
        req.target = self._url
        keep_alive = parser.should_keep_alive()
        if not keep_alive:
            req.must_close = True
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
            req.must_close = True
        if req.chunked or req.content_length > 0:
            self._set_timer(_BODY, self.engine.settings.backend_timeout)
        else:
            self._timer_state = _BUSY
        if self.active is None:
            self.active = req  # _begin() inlined: once per request
            req.start()
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
        limit = self.engine.settings.max_body_size
        if limit and req.body_size + len(body) > limit:
            req.body_size += len(body)
            self._refuse(413, "request body too large")
            raise _Refused
        if req.feed_body(body):
            self._pause_reading()

    def on_message_complete(self) -> None:
        req = self._parsing
        self._parsing = None
        if req is None:
            return
        if req.chunked:
            req.end_body()  # the last chunk and trailers still go to the backend
        else:
            req.complete = True
        if self.active is not None:
            self._timer_state = _BUSY
        else:
            self._set_timer(_IDLE, self.engine.settings.keepalive_timeout)

    # -- exchanges -----------------------------------------------------------------------------

    def _begin(self, req: Exchange) -> None:
        """Start serving ``req`` (it is now the active request: responses go out in order)."""
        self.active = req
        req.start()

    def _refuse(self, status: int, reason: str) -> None:
        """Answer with ``status`` and close: the request stream can no longer be trusted."""
        req = self._parsing
        if req is None:
            req = Exchange(self.engine, self.client, self, [])
            req.must_close = True
            req.started = _clock()
        if (self.active is not None and self.active is not req) or req.status:
            # A response is already under way: cut the connection rather than interleave.
            log.info("closing %s: %s", self.client_ip, reason)
            if self.active is not None:
                self.active.cancel()
                self.active = None
            self._close(abort=True)
            return
        self.active = req
        req.refuse(status, reason)

    # -- ResponseSink (httpproxy.exchange) -----------------------------------------------------

    def info(self, exchange: Exchange, raw: bytes) -> None:
        if not exchange.http10 and self.transport is not None:
            self.transport.write(raw)

    def start(self, exchange: Exchange, head: ResponseHead, body: bytes) -> None:
        transport = self.transport
        if transport is None:
            return
        closing = (self.closing or exchange.must_close or exchange.upgrade or exchange.http10
                   or self.engine.draining)
        if closing:
            self.closing = True
        _, raw, extra = head  # unpacked: cheaper than two named reads, once per response
        transport.write(b"".join((raw, extra,
                                  b"Connection: close\r\n\r\n" if closing else b"\r\n", body)))

    def body(self, exchange: Exchange, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def end(self, exchange: Exchange) -> None:
        """``exchange`` is answered (and accounted): close, or go on with the next request."""
        if self.active is exchange:
            self.active = None
        if exchange.must_close or self.closing:
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

    def abort(self, exchange: Exchange) -> None:
        if self.active is exchange:
            self.active = None
        self._close(abort=True)

    def upgrade(self, exchange: Exchange, data: bytes, transport: object) -> None:
        assert isinstance(transport, asyncio.Transport) and self.transport is not None
        self.active = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.relay = Relay.attach(self.transport, transport, initial_a_to_b=exchange.upgrade_data,
                                  initial_b_to_a=data,
                                  idle_timeout=self.engine.settings.idle_timeout or None,
                                  names=("client", "backend"))
        self.engine.spawn(self._relay_done(exchange, self.relay))

    async def _relay_done(self, req: Exchange, relay: Relay) -> None:
        result = await relay.wait()
        req.bytes_out = result.bytes_b_to_a
        self.closed = True
        self.client.local_lookup = None  # no cycle back to this connection (see connection_lost)
        self.engine.finished(self.client, req)
        self.engine.closed(self)

    def pause_request_body(self, exchange: Exchange) -> None:
        self._pause_reading()

    def resume_request_body(self, exchange: Exchange) -> None:
        if self._read_paused and len(self.queue) < QUEUE_LIMIT:
            self._resume_reading()

    # -- reading and closing --------------------------------------------------------------

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

    def shutdown(self) -> None:
        """Engine closing: reset the connection (and end its relay) now."""
        if self.relay is not None:
            self.relay.close("shutdown")
        self._close(abort=True)




class _Refused(Exception):
    """Raised from a parser callback to stop parsing after we answered and closed."""


def _websocket_upgrade(req: Exchange) -> bool:
    """Whether ``req`` is a WebSocket opening handshake (RFC 6455 §4.1): the only upgrade
    relayed. Any other (``h2c``, ``TLS/1.0``, ...) would open a tunnel past every filter and
    cache decision, so its Upgrade/Connection are dropped and it is served as a plain request,
    as RFC 9110 §7.8 lets a server do (nginx, without its opt-in, does the same)."""
    if (req.method != b"GET" or req.http10 or req.chunked or req.content_length > 0
            or req.upgrade_value.strip().lower() != b"websocket"):
        return False
    names = {name.lower() for name, _ in req.headers}
    return b"sec-websocket-key" in names and b"sec-websocket-version" in names


