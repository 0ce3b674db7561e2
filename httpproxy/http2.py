"""HTTP/2 to clients: a thin front end that turns streams into requests of the HTTP edge.

Framing, HPACK, flow-control bookkeeping and the protocol's own validation (pseudo-headers,
connection-specific headers, header characters, Content-Length against DATA) are libnghttp2's,
through the ``ngh2`` binding (measured at ~2.5 µs of CPU per request against ~77 µs for the
pure-Python ``h2``: ``benchmarks/README.md``, ``python -m benchmarks.h2engine``).

Each stream is one :class:`~httpproxy.exchange.Exchange`, the request path the HTTP/1
connections use (routing by ``:authority``, filters, redirects, HSTS, the content cache,
access log, error pages), built from the stream's validated fields only (no client bytes
reach a request line or header line unchecked); its :class:`Stream` is the exchange's
:class:`~httpproxy.exchange.ResponseSink` and sends the answer as HEADERS + DATA.

Flow control is end to end, both ways: a request body's bytes are acknowledged to the client
(WINDOW_UPDATE) only while the stream's request side reads (the backend takes them), and a
response stream whose unsent bytes pass ``[http] h2_stream_buffer`` pauses reading from its
backend until the client's window lets them out. A slow client never makes the edge hold more
than about that much per stream.

Defences (limits from ``[http]``; docs/http.md lists them): at most ``h2_max_concurrent_streams``
streams (more are refused by libnghttp2 with RST_STREAM REFUSED_STREAM), a header list of at
most ``max_header_size`` decoded bytes and at most 8 CONTINUATION frames per block
(CONTINUATION flood, HPACK bombs), a token bucket on client stream resets
(``h2_reset_burst``/``h2_reset_rate``: rapid reset, CVE-2023-44487) and on "glitches" (empty
DATA frames, SETTINGS/PING floods, frames on closed streams), and a bound on unread
SETTINGS/PING acknowledgements: each ends the connection with GOAWAY. A connection without
streams for ``keepalive_timeout`` gets GOAWAY; so does every connection when the worker drains
(reload, stop), and the streams in progress finish first.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
import struct
import time
from typing import NamedTuple, Protocol

import httptools
import ngh2

from edge import sessionpolicy
from edge.directory.model import Site
from edge.limits import RateLimiter
from edge.sessions import SessionSnapshot
from httpproxy import metrics
from httpproxy.authority import parse_host
from httpproxy.exchange import ClientInfo, Exchange, ResponseHead
from httpproxy.front_h1 import ClientConnection, ConnectionServices

__all__ = ["PREFACE", "H2Connection", "Stream", "choose_protocol", "covers"]

_clock = time.perf_counter

log = logging.getLogger("edge.http")

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
"""What an HTTP/2 client with prior knowledge sends first (RFC 9113 §3.4)."""
_HOP_BY_HOP = frozenset((b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding",
                         b"upgrade", b"te"))
"""Response header names HTTP/2 forbids (RFC 9113 §8.2.2); the rest go to the client as they are."""
_UNSAFE = re.compile(rb"[\x00-\x20\x7f]")
"""Bytes never allowed in the request line's target or in :authority (libnghttp2 refuses them
already: checked again because these bytes become an HTTP/1 request line)."""
_NO_BODY_STATUS = (204, 304)
_GOAWAY_HEAD = b"\x00\x00\x08\x07\x00\x00\x00\x00\x00"
"""A GOAWAY frame's header: 8 payload bytes (last stream id, error code), type 7, stream 0."""
PROTOCOL_ERROR = 0x1
INTERNAL_ERROR = 0x2
REFUSED_STREAM = 0x7
CANCEL = 0x8
ENHANCE_YOUR_CALM = 0xB


@functools.lru_cache(maxsize=8)
def _configuration(max_header_size: int, reset_burst: int, reset_rate: int,
                   max_outbound_ack: int) -> ngh2.Configuration:
    """libnghttp2's session options: one (frozen) object for every connection of the same
    settings, not one per connection."""
    return ngh2.Configuration(
        auto_window_update=False,
        max_inbound_header_list_size=max_header_size,
        max_continuations=8,
        stream_reset_rate_limit=(reset_burst, reset_rate),
        max_outbound_ack=max_outbound_ack)


class H2Services(ConnectionServices, Protocol):
    """The engine as an HTTP/2 connection sees it (:class:`httpproxy.server.HttpEngine` is one):
    an HTTP/1 connection's services, with HTTP/2 connections counted alike."""

    def opened(self, conn: ClientConnection | H2Connection) -> None:
        """Count ``conn`` as open (its listener's gauge, draining)."""

    def admit(self, conn: ClientConnection | H2Connection) -> bool:
        """Take a per-address slot for ``conn``; False: over the cap."""

    def closed(self, conn: ClientConnection | H2Connection) -> None:
        """``conn`` is gone: release its slot and count it closed."""


def covers(names: tuple[str, ...], host: str) -> bool:
    """Whether a certificate for ``names`` is valid for ``host`` (a wildcard covers one label)."""
    if host in names:
        return True
    _, dot, parent = host.partition(".")
    return bool(dot) and f"*.{parent}" in names


class Stream:
    """One HTTP/2 stream: the :class:`~httpproxy.exchange.ResponseSink` of its exchange. The
    exchange's answer goes out as HEADERS + DATA (a chunked backend body decoded first)."""

    __slots__ = ("chunks", "exchange", "front", "reading", "reset", "sid", "submitted",
                 "unacked", "write_paused")

    def __init__(self, front: H2Connection, sid: int) -> None:
        self.front = front
        self.sid = sid
        self.exchange: Exchange | None = None
        """None once the stream is over for us (answered, reset, or the connection closed)."""
        self.reset = False
        """RST_STREAM sent or received: nothing more is sent on it."""
        self.reading = True
        """False while the exchange does not take request body bytes (its backend is full)."""
        self.unacked = 0
        """Request body bytes received but not yet acknowledged (WINDOW_UPDATE) to the client."""
        self.write_paused = False
        self.submitted = 0
        """Response body bytes handed to libnghttp2 so far."""
        self.chunks: httptools.HttpResponseParser | None = None
        """Decodes a chunked backend body (None for any other framing)."""

    # -- ResponseSink ------------------------------------------------------------------------

    def info(self, exchange: Exchange, raw: bytes) -> None:
        """1xx interim responses are not forwarded over HTTP/2 (the final one follows)."""

    def start(self, exchange: Exchange, head: ResponseHead, body: bytes) -> None:
        h2_head = _HEADS.get(head)
        if h2_head is None:
            h2_head = _h2_head(head)
        headers, chunked, coded = h2_head
        if coded and not exchange.head_request:
            self.front.reset_stream(self, INTERNAL_ERROR)
            return
        if chunked and not exchange.head_request:
            self.chunks = httptools.HttpResponseParser(_ChunkSink(self))
            self.chunks.feed_data(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        self.front.send_head(self, headers)
        if body:
            self.body(exchange, body)

    def body(self, exchange: Exchange, data: bytes) -> None:
        if exchange.head_request or not data:
            return
        chunks = self.chunks
        if chunks is None:
            self.front.send_data(self, data)
            return
        try:
            chunks.feed_data(data)
        except httptools.HttpParserError:
            # The exchange forwards a body its backend framed; broken framing here means the
            # body is not whole: the client must not take it for one.
            self.front.reset_stream(self, INTERNAL_ERROR)

    def end(self, exchange: Exchange) -> None:
        self.front.end_stream(self)

    def abort(self, exchange: Exchange) -> None:
        """Broke off after the head: RST_STREAM (a client never takes a cut body for whole)."""
        self.front.reset_stream(self, INTERNAL_ERROR)

    def upgrade(self, exchange: Exchange, data: bytes, transport: object) -> None:
        """Never asked for: an HTTP/2 exchange is not marked ``upgrade`` (no RFC 8441)."""
        abort = getattr(transport, "abort", None)  # uvloop's transports: not asyncio.Transport
        if abort is not None:
            abort()
        self.front.reset_stream(self, INTERNAL_ERROR)

    def pause_request_body(self, exchange: Exchange) -> None:
        self.reading = False

    def resume_request_body(self, exchange: Exchange) -> None:
        if not self.reading:
            self.reading = True
            self.front.acknowledge(self)


class H2Head(NamedTuple):
    """A response head as HTTP/2 sends it."""

    headers: tuple[tuple[bytes, bytes], ...]
    """``:status``, then the fields: lower-case names, no connection-specific fields."""
    chunked: bool
    """The body bytes that follow are chunked-coded (decoded before they go out as DATA)."""
    coded: bool = False
    """A transfer coding other than chunked alone (``gzip, chunked``): HTTP/2 has no
    transfer codings, and the client would take the coded bytes for the content. Such a
    response is not forwarded over HTTP/2: the stream is reset."""


_HEADS: dict[ResponseHead, H2Head] = {}
"""Memo of :func:`_h2_head`: a backend sends the same head bytes (same ``Date`` second, same
length) again and again, and a cache hit's head only changes with its ``Age``. Cleared when
full (the entries are small and made again in one parse)."""
_HEADS_MAX = 256
_HEAD_MEMO_BYTES = 2048
"""Heads up to this size are remembered (the memo holds at most ~1 MiB)."""


def _h2_head(head: ResponseHead) -> H2Head:
    """The HTTP/2 form of a response head, remembered in :data:`_HEADS`. One pass over the
    lines (what ``ResponseHead.fields()`` and ``.chunked`` give, for a third of their cost
    together)."""
    status, raw, extra = head
    headers = [(b":status", b"%d" % status)]
    codings: list[bytes] = []
    named: set[bytes] = set()
    for line in (raw + extra).split(b"\r\n")[1:]:
        name, sep, value = line.partition(b":")
        if not sep:
            continue
        name = name.strip().lower()
        if name in _HOP_BY_HOP:
            if name == b"transfer-encoding":
                codings += (coding.strip() for coding in value.lower().split(b","))
            elif name == b"connection":
                named.update(token.strip().lower() for token in value.split(b","))
            continue
        headers.append((name, value.strip()))
    chunked = codings == [b"chunked"]
    if named:
        # Backend heads come without them (upstream.examine_head); whatever else reaches a
        # head (stored, merged, added by the edge) is held to RFC 9113 §8.2.2 here too.
        headers = [pair for pair in headers if pair[0] not in named]
    h2_head = H2Head(tuple(headers), chunked, bool(codings) and not chunked)
    if len(raw) + len(extra) <= _HEAD_MEMO_BYTES:
        if len(_HEADS) >= _HEADS_MAX:
            _HEADS.clear()
        _HEADS[head] = h2_head
    return h2_head


class _ChunkSink:
    """httptools callbacks for a chunked response body: the decoded bytes go out as DATA."""

    __slots__ = ("stream",)

    def __init__(self, stream: Stream) -> None:
        self.stream = stream

    def on_body(self, body: bytes) -> None:
        self.stream.front.send_data(self.stream, body)


class H2Session:
    """An HTTP/2 connection in ``edge sessions`` (protocol ``h2``). Its user is the SNI's site
    (else the first request's name); tenant and host are those of the last request routed:
    a coalescing browser may send several sites over one connection. A kill or a session-policy
    close sends GOAWAY (the streams in progress finish); a drain does the same at its deadline."""

    def __init__(self, conn: H2Connection) -> None:
        self.conn = conn
        self.since = time.time()
        self.user = conn.sni_site.hostname if conn.sni_site is not None else ""
        self.last: Exchange | None = None
        """The last exchange answered from a route (read only by :meth:`snapshot`: per stream,
        one reference is all a session costs)."""
        self._drain: asyncio.TimerHandle | None = None

    def snapshot(self) -> SessionSnapshot:
        """Returns the connection's client, last route and byte counts so far."""
        conn = self.conn
        last = self.last
        user, tenant, host = self.user, "", ""
        if last is not None:
            user = user or last.host_header
            if last.tenant is not None and last.host is not None:
                tenant, host = last.tenant.name, last.host.name
        return SessionSnapshot(user, tenant, host,
                               f"{conn.client_ip}:{conn.client_port}", self.since,
                               conn.bytes_in, conn.bytes_out)

    def apply(self, action: sessionpolicy.Action) -> None:
        """GOAWAY now (close/kill), at a drain deadline, or keep."""
        if action.kind is sessionpolicy.Kind.KEEP:
            if self._drain is not None:
                self._drain.cancel()
                self._drain = None
        elif action.kind is sessionpolicy.Kind.CLOSE:
            self.conn.close_if_idle()
        elif self._drain is None:
            delay = max(0.0, action.deadline - time.time())
            self._drain = asyncio.get_running_loop().call_later(delay, self.conn.close_if_idle)

    def cancel(self) -> None:
        if self._drain is not None:
            self._drain.cancel()
            self._drain = None


class H2Connection(asyncio.Protocol):
    """One HTTP/2 client connection (TLS with ALPN ``h2``, or prior knowledge on plain HTTP)."""

    def __init__(self, engine: H2Services, scheme: str, sni_site: Site | None,
                 client_address: tuple[str, int] | None, names: tuple[str, ...] = ()) -> None:
        """``names``: the names the connection's certificate covers (coalescing: a request for
        another site than the SNI's is served when the certificate covers its name)."""
        self.engine = engine
        self.scheme = scheme
        self.sni_site = sni_site
        self.names = names
        self.client_ip, self.client_port = client_address or ("", 0)
        self.cap_key: str | None = None
        self.transport: asyncio.Transport | None = None
        self.client: ClientInfo | None = None
        """What this connection's exchanges know of it (the SNI site: Host must belong to it)."""
        self._coalesced: ClientInfo | None = None
        """The same without an SNI site: for requests whose name the certificate covers."""
        self.streams: dict[int, Stream] = {}
        self.closing = False
        self.closed = False
        self.bytes_in = 0
        self.bytes_out = 0
        self.session: H2Session | None = None
        self._session_id = ""
        self._tcp_paused = False
        self._flush_scheduled = False
        self._paused = 0
        """Streams whose backend reading is paused (write_paused) and not yet resumed."""
        self._last_sid = 0
        self._answered = 0
        self._idle_timer: asyncio.TimerHandle | None = None
        self._control: RateLimiter | None = None
        """SETTINGS/PING frames allowed (made on the first one)."""
        self._idle_deadline = 0.0
        """When the connection, without streams, gets GOAWAY (0: it has streams)."""
        settings = engine.settings
        self._buffer_limit = settings.h2_stream_buffer
        self.h2 = ngh2.Connection(ngh2.Role.SERVER, _configuration(
            settings.max_header_size, settings.h2_reset_burst, settings.h2_reset_rate,
            settings.h2_max_outbound_ack))

    # -- connection --------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        if not self.client_ip and isinstance(peer, tuple):
            self.client_ip, self.client_port = str(peer[0]), int(peer[1])
        engine = self.engine
        self.client = self._client_info(self.sni_site)
        engine.opened(self)
        metrics.H2_CONNECTIONS.inc()
        self.session = H2Session(self)
        self._session_id = engine.sessions.add("h2", self.session)
        settings = engine.settings
        self.h2.initiate_connection({
            ngh2.Setting.MAX_CONCURRENT_STREAMS: settings.h2_max_concurrent_streams,
            ngh2.Setting.INITIAL_WINDOW_SIZE: settings.h2_stream_window,
            ngh2.Setting.MAX_HEADER_LIST_SIZE: settings.max_header_size,
            ngh2.Setting.ENABLE_PUSH: 0,
        })
        # The connection window covers every stream's window: one paused upload cannot stall
        # the others (what is unacknowledged is bounded per stream).
        self.h2.set_local_window_size(
            settings.h2_stream_window * settings.h2_max_concurrent_streams)
        if not engine.admit(self):
            self.closing = True
            self.h2.send_goaway(ENHANCE_YOUR_CALM, debug_data=b"too many connections")
        self._arm_idle(settings.header_timeout)
        self._flush()

    def _client_info(self, sni_site: Site | None) -> ClientInfo:
        engine = self.engine
        client = ClientInfo(self.scheme, self.client_ip, self.client_port, sni_site=sni_site,
                            trusted=engine.is_trusted(self.scheme, self.client_ip),
                            traffic=engine.stats.traffic["https" if self.scheme == "https"
                                                         else "http"],
                            local_lookup=self._local_address)
        client.log_prefix += b'"version":"2",'  # the access-log line says HTTP/2
        return client

    def _local_address(self) -> tuple[str, int] | None:
        sock = self.transport.get_extra_info("sockname") if self.transport is not None else None
        return (str(sock[0]), int(sock[1])) if isinstance(sock, tuple) else None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        for stream in list(self.streams.values()):
            self._cancel(stream)
        self.streams.clear()
        # The client infos' local-address lookup is a bound method of this connection: a
        # cycle the worker's rarely run cyclic GC would keep, libnghttp2 session and all (as
        # front_h1's connection_lost does).
        for client in (self.client, self._coalesced):
            if client is not None:
                client.local_lookup = None
        if self._answered:
            metrics.H2_STREAMS.inc(self._answered)
            self._answered = 0
        if self.session is not None:
            self.session.cancel()
            self.engine.sessions.remove(self._session_id)
            self.session = None
        self.engine.closed(self)

    def pause_writing(self) -> None:
        self._tcp_paused = True
        for stream in self.streams.values():
            self._pause_stream(stream)

    def resume_writing(self) -> None:
        self._tcp_paused = False
        self._flush()

    def eof_received(self) -> bool:
        return False

    def data_received(self, data: bytes) -> None:
        self.bytes_in += len(data)
        h2 = self.h2
        try:
            h2.receive_data(data)
            events = h2.events()
        except ngh2.NGH2Error as exc:
            self._fail(exc)
            return
        # Streams the client opens and resets within one read (rapid reset) never start an
        # exchange: nothing is routed or connected for them.
        reset = {e.stream_id for e in events if type(e) is ngh2.StreamReset} if len(events) > 1 else ()
        for event in events:
            kind = type(event)
            if kind is ngh2.RequestReceived:
                if reset and event.stream_id in reset:  # type: ignore[attr-defined]
                    continue
                self._request(event)  # type: ignore[arg-type]
            elif kind is ngh2.DataReceived:
                self._body(event)  # type: ignore[arg-type]
            elif kind is ngh2.StreamClosed or kind is ngh2.StreamReset:
                stream = self.streams.get(event.stream_id)  # type: ignore[attr-defined]
                if stream is not None:
                    self._cancel(stream)
            elif kind is ngh2.TrailersReceived:
                self._end_body(event.stream_id, event.headers)  # type: ignore[attr-defined]
            elif kind is ngh2.WindowUpdated:
                self._schedule_flush()
            elif kind is ngh2.PingReceived or kind is ngh2.SettingsReceived:
                if not self._control_allowed():
                    self._fail(ngh2.DenialOfServiceError("SETTINGS/PING flood"))
                    return
            elif kind is ngh2.ConnectionClosed or kind is ngh2.GoAwayReceived:
                self.closing = True
        # Written once per loop iteration: the answers of every stream this read started,
        # and libnghttp2's acknowledgements, in one write.
        self._schedule_flush()

    def _control_allowed(self) -> bool:
        """A SETTINGS or PING frame arrived: within ``h2_max_outbound_ack`` at once and
        ``h2_control_rate`` per second after that? (Each makes us answer: a client that reads
        its answers fast enough never trips libnghttp2's bound on queued acknowledgements.)"""
        limiter = self._control
        if limiter is None:
            settings = self.engine.settings
            limiter = self._control = RateLimiter(settings.h2_control_rate or 1,
                                                  max(settings.h2_max_outbound_ack, 1), max_keys=1)
        return limiter.allow(None)

    def _fail(self, exc: ngh2.NGH2Error) -> None:
        """End the connection after a protocol error or a defence tripped. libnghttp2 has
        queued its GOAWAY when it could; after some errors the session is no longer usable,
        so the GOAWAY is written here (ENHANCE_YOUR_CALM for a flood, else PROTOCOL_ERROR)."""
        flood = isinstance(exc, ngh2.DenialOfServiceError)
        metrics.H2_REFUSED.labels(reason="flood" if flood else "protocol").inc()
        log.info("HTTP/2 connection from %s ended: %s", self.client_ip, exc)
        transport = self.transport
        if transport is not None and not transport.is_closing():
            try:
                data = self.h2.data_to_send()
            except ngh2.NGH2Error:
                data = b""
            if b"\x07\x00\x00\x00\x00\x00" not in data[:64 * 1024]:  # no GOAWAY frame header
                code = ENHANCE_YOUR_CALM if flood else PROTOCOL_ERROR
                data += _GOAWAY_HEAD + struct.pack("!II", self._last_sid, code)
            transport.write(data)
        self._close()

    # -- requests ----------------------------------------------------------------------------

    def _request(self, event: ngh2.RequestReceived) -> None:
        sid = event.stream_id
        if self.closing:
            self.h2.reset_stream(sid, REFUSED_STREAM)
            return
        self._last_sid = sid
        client = self.client
        assert client is not None
        stream = Stream(self, sid)
        # Made before the fields are read, so each goes to it as it comes; dropped unstarted
        # (nothing routed, nothing accounted) if the stream is malformed.
        exchange = Exchange(self.engine, client, stream, [])
        add = exchange.add_header
        method = path = authority = host = b""
        cookies: list[bytes] | None = None
        for name, value in event.headers:  # libnghttp2 put the pseudo-fields first
            if name[:1] == b":":
                if name == b":method":
                    method = value
                elif name == b":path":
                    path = value
                elif name == b":authority":
                    authority = value
                continue  # :scheme: the listener's scheme is what the edge states upstream
            if name == b"host":
                host = value
            elif name == b"cookie":  # split per crumb over HTTP/2 (RFC 9113 §8.2.3)
                if cookies is None:
                    cookies = [value]
                else:
                    cookies.append(value)
            else:
                add(name, value)
        if not authority:
            authority = host
        if not path or _UNSAFE.search(path) or (host and host != authority):
            # RFC 9113 §8.3.1: Host and :authority name the same; malformed → stream error.
            metrics.H2_REFUSED.labels(reason="malformed").inc()
            self.h2.reset_stream(sid, PROTOCOL_ERROR)
            return
        if self.names and self.sni_site is not None:  # coalescing (same client address)
            exchange.client = self._client_for(authority)
        stream.exchange = exchange
        self.streams[sid] = stream
        self._idle_deadline = 0.0  # it has a stream: no GOAWAY when the idle timer fires
        exchange.method, exchange.target, exchange.started = method, path, _clock()
        add(b"host", authority)
        if cookies is not None:
            add(b"cookie", b"; ".join(cookies))
        if event.end_stream:
            exchange.end_body()
        elif exchange.content_length < 0:
            exchange.chunked = True  # a body of unknown length goes to the backend chunked
        exchange.start()

    def _client_for(self, authority: bytes) -> ClientInfo:
        """The client info whose SNI site the request must belong to (else 421); without one
        when the connection's certificate covers the request's name: a browser coalesces every
        name of a certificate onto one connection, and each request is routed by its own name."""
        client = self.client
        assert client is not None
        sni_site = self.sni_site
        if sni_site is None or not self.names:
            return client
        parsed = parse_host(authority)
        if parsed is None or parsed.name == sni_site.hostname or not covers(self.names, parsed.name):
            return client
        if self._coalesced is None:
            self._coalesced = self._client_info(None)
        return self._coalesced

    def _body(self, event: ngh2.DataReceived) -> None:
        sid = event.stream_id
        stream = self.streams.get(sid)
        data = event.data
        if stream is None or stream.exchange is None or stream.exchange.over:
            if data:  # a stream we no longer serve: its bytes still count against the window
                self.h2.acknowledge_received_data(len(data), sid)
            if event.end_stream and stream is not None and stream.exchange is not None:
                stream.exchange.end_body()
            return
        exchange = stream.exchange
        if data:
            stream.unacked += len(data)
            if exchange.feed_body(data):
                stream.reading = False
            if stream.reading:
                self.acknowledge(stream)
        if event.end_stream:
            exchange.end_body()

    def _end_body(self, sid: int, trailers: tuple[tuple[bytes, bytes], ...]) -> None:
        stream = self.streams.get(sid)
        if stream is not None and stream.exchange is not None:
            stream.exchange.end_body(list(trailers))

    def acknowledge(self, stream: Stream) -> None:
        """Tell the client the request body bytes of ``stream`` were taken (WINDOW_UPDATE)."""
        if stream.unacked and not stream.reset:
            amount, stream.unacked = stream.unacked, 0
            try:
                self.h2.acknowledge_received_data(amount, stream.sid)
            except ngh2.NGH2Error:
                return
            self._schedule_flush()

    # -- responses ---------------------------------------------------------------------------

    def send_head(self, stream: Stream, headers: tuple[tuple[bytes, bytes], ...]) -> None:
        session = self.session
        if session is not None and stream.exchange is not None and stream.exchange.tenant is not None:
            session.last = stream.exchange  # the route the answer came from
        if stream.reset:
            return
        try:
            self.h2.send_response(stream.sid, headers)
        except ngh2.NGH2Error:
            stream.reset = True
            return
        if not self._flush_scheduled:
            self._schedule_flush()

    def send_data(self, stream: Stream, data: bytes) -> None:
        if stream.reset:
            return
        try:
            self.h2.send_data(stream.sid, data)
        except ngh2.NGH2Error:
            stream.reset = True
            return
        # Nothing can be queued past the limit before that much was submitted: most responses
        # never ask libnghttp2 for the queue's size.
        submitted = stream.submitted = stream.submitted + len(data)
        if submitted > self._buffer_limit and self.h2.queued_body_size(stream.sid) > self._buffer_limit:
            self._pause_stream(stream)
        if not self._flush_scheduled:
            self._schedule_flush()

    def end_stream(self, stream: Stream) -> None:
        """The exchange is over and answered: END_STREAM (it already accounted itself)."""
        stream.exchange = None
        self._answered += 1
        if not stream.reset:
            try:
                self.h2.end_stream(stream.sid)
            except ngh2.NGH2Error:
                stream.reset = True
        self._forget(stream)
        if not self._flush_scheduled:
            self._schedule_flush()

    def reset_stream(self, stream: Stream, code: int) -> None:
        if not stream.reset:
            stream.reset = True
            with contextlib.suppress(ngh2.NGH2Error):
                self.h2.reset_stream(stream.sid, code)
            self._schedule_flush()
        exchange, stream.exchange = stream.exchange, None
        if exchange is not None and not exchange.over:
            exchange.cancel()
        self._forget(stream)

    def _pause_stream(self, stream: Stream) -> None:
        if not stream.write_paused and stream.exchange is not None:
            stream.write_paused = True
            self._paused += 1
            stream.exchange.pause_response()  # stops reading from the stream's backend

    def _cancel(self, stream: Stream) -> None:
        """The stream closed (its end sent, or reset by the client, or the connection gone):
        an exchange still running is cancelled (its backend dropped, 499 logged)."""
        exchange, stream.exchange = stream.exchange, None
        stream.reset = True
        if exchange is not None and not exchange.over:
            exchange.cancel()
        self._forget(stream)

    def _forget(self, stream: Stream) -> None:
        """The stream needs nothing more from us (what it queued still goes out): the last one
        gone, a draining connection closes once written, an idle one waits keepalive_timeout."""
        if stream.write_paused:
            stream.write_paused = False
            self._paused -= 1
        if self.streams.pop(stream.sid, None) is None or self.streams or self.closed:
            return
        if self.closing:
            self._schedule_flush()
        else:
            self._arm_idle(self.engine.settings.keepalive_timeout)

    # -- output ------------------------------------------------------------------------------

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.engine.loop.call_soon(self._flush)

    def _flush(self) -> None:
        """Write what libnghttp2 has ready (as far as the client's windows allow), then let
        paused streams read from their backends again once their queue has drained."""
        self._flush_scheduled = False
        transport = self.transport
        if transport is None or self.closed or self._tcp_paused:
            return
        try:
            data = self.h2.data_to_send()
        except ngh2.NGH2Error as exc:
            self._fail(exc)
            return
        if data:
            self.bytes_out += len(data)
            transport.write(data)
        if self._tcp_paused:
            return
        if self._paused:
            self._resume_streams()
        h2 = self.h2
        if not h2.want_write and (not h2.want_read or (self.closing and not self.streams)):
            # Drained, or libnghttp2 ended the session itself (a GOAWAY it sent after a
            # defence tripped): streams still open are cancelled when the transport closes.
            self._close()

    def _resume_streams(self) -> None:
        """Let paused streams read from their backends again once their queue has drained."""
        low = self._buffer_limit // 2
        for stream in self.streams.values():
            if stream.write_paused and (stream.exchange is None
                                        or self.h2.queued_body_size(stream.sid) <= low):
                stream.write_paused = False
                self._paused -= 1
                if stream.exchange is not None:
                    stream.exchange.resume_response()

    def _close(self) -> None:
        self.closing = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    # -- timers, drain -------------------------------------------------------------------------

    def _arm_idle(self, timeout: float) -> None:
        """Close after ``timeout`` without streams. One timer, re-armed lazily: the deadline
        moves on each stream's end without a timer per request."""
        if timeout <= 0:
            return
        loop = self.engine.loop
        deadline = self._idle_deadline = loop.time() + timeout
        timer = self._idle_timer
        if timer is not None and timer.when() > deadline:  # armed for a longer wait
            timer.cancel()
            timer = None
        if timer is None:
            self._idle_timer = loop.call_at(deadline, self._idle)

    def _idle(self) -> None:
        self._idle_timer = None
        if self.closed or self.streams or not self._idle_deadline:
            return
        now = self.engine.loop.time()
        if now < self._idle_deadline:
            self._idle_timer = self.engine.loop.call_at(self._idle_deadline, self._idle)
            return
        self.close_if_idle()

    def close_if_idle(self) -> None:
        """Draining (or idle): GOAWAY now; the streams in progress finish, then we close."""
        if self.closed:
            return
        if not self.closing:
            self.closing = True
            with contextlib.suppress(ngh2.NGH2Error):
                self.h2.send_goaway(0, last_stream_id=self._last_sid)
        self._flush()
        if not self.streams:
            self._close()

    def shutdown(self) -> None:
        """The worker stops: cancel every exchange, close at once."""
        for stream in list(self.streams.values()):
            self._cancel(stream)
        self.streams.clear()
        if self.transport is not None:
            self.transport.abort()


class _Chooser(asyncio.Protocol):
    """Picks HTTP/1 or HTTP/2 for a new connection, then steps aside (``set_protocol``).

    TLS: by the ALPN protocol the handshake chose. Plain (``[http] h2c``): by whether the first
    bytes are the HTTP/2 connection preface."""

    def __init__(self, engine: H2Services, scheme: str, sni_site: Site | None,
                 client_address: tuple[str, int] | None, names: tuple[str, ...]) -> None:
        self.engine = engine
        self.scheme = scheme
        self.sni_site = sni_site
        self.client_address = client_address
        self.names = names
        self.transport: asyncio.Transport | None = None
        self._seen = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if self.scheme == "https":
            ssl_object = transport.get_extra_info("ssl_object")
            chosen = ssl_object.selected_alpn_protocol() if ssl_object is not None else None
            self._switch(chosen == "h2")

    def data_received(self, data: bytes) -> None:
        seen = self._seen = self._seen + data
        if seen[:len(PREFACE)] != PREFACE[:len(seen)]:
            self._switch(False, seen)
        elif len(seen) >= len(PREFACE):
            self._switch(True, seen)

    def _switch(self, http2: bool, data: bytes = b"") -> None:
        transport = self.transport
        assert transport is not None
        proto: asyncio.Protocol
        if http2:
            proto = H2Connection(self.engine, self.scheme, self.sni_site, self.client_address,
                                 self.names)
        else:
            proto = ClientConnection(self.engine, self.scheme, self.sni_site, self.client_address)
        transport.set_protocol(proto)
        proto.connection_made(transport)
        if data:
            proto.data_received(data)

    def eof_received(self) -> bool:
        return False


def choose_protocol(engine: H2Services, scheme: str, sni_site: Site | None = None,
                    client_address: tuple[str, int] | None = None,
                    names: tuple[str, ...] = ()) -> asyncio.Protocol:
    """The protocol for a new client connection that may speak HTTP/2: it becomes a
    :class:`H2Connection` or a :class:`~httpproxy.front_h1.ClientConnection` once the
    connection says which (returns the chooser)."""
    return _Chooser(engine, scheme, sni_site, client_address, names)
