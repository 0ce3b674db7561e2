"""HTTP/2 to clients: a thin front end that turns streams into requests of the HTTP edge.

Framing, HPACK, flow-control bookkeeping and the protocol's own validation (pseudo-headers,
connection-specific headers, header characters, Content-Length against DATA) are libnghttp2's,
through the ``ngh2`` binding (measured at ~2.5 µs of CPU per request against ~77 µs for the
pure-Python ``h2``: ``benchmarks/README.md``, ``python -m benchmarks.h2engine``).

Each stream is served by the request path the HTTP/1 connections use (routing, filters,
redirects, HSTS, the content cache, access log, error pages), one
:class:`~httpproxy.connection.ClientConnection` per stream behind a :class:`Stream` transport:
the stream's request is handed to it as the HTTP/1.1 request the edge would have parsed (from
validated fields only: no client bytes reach a request line or header line unchecked), and
what it writes back is read as one HTTP/1.1 response and sent as HEADERS + DATA. That is the
seam until the version-agnostic exchange of issue 14 §1 lands; then a stream hands its request
to an exchange instead, and nothing else here changes.

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
import logging
import re
import struct
from typing import TYPE_CHECKING, Any

import httptools
import ngh2

from edge.directory.model import Site
from httpproxy import metrics
from httpproxy.authority import parse_host
from httpproxy.connection import ClientConnection

if TYPE_CHECKING:
    from httpproxy.server import HttpEngine

__all__ = ["PREFACE", "H2Connection", "Stream", "choose_protocol", "covers"]

log = logging.getLogger("edge.http")

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
"""What an HTTP/2 client with prior knowledge sends first (RFC 9113 §3.4)."""
_CHUNK_END = b"0\r\n\r\n"
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


def covers(names: tuple[str, ...], host: str) -> bool:
    """Whether a certificate for ``names`` is valid for ``host`` (a wildcard covers one label)."""
    if host in names:
        return True
    _, dot, parent = host.partition(".")
    return bool(dot) and f"*.{parent}" in names


class StreamConnection(ClientConnection):
    """The HTTP/1 request path for one HTTP/2 stream: a client connection that is neither
    counted as a connection nor held to the per-address cap (its HTTP/2 connection is)."""

    __slots__ = ()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.trusted = self.engine.is_trusted(self.scheme, self.client_ip)
        self._set_client_bytes()

    def _set_client_bytes(self) -> None:
        super()._set_client_bytes()
        # The access-log line says the request came over HTTP/2.
        self._log_prefix += b'"version":"2",'


class Stream(asyncio.Transport):
    """One HTTP/2 stream: the transport its :class:`StreamConnection` writes its HTTP/1
    response to, read here head first, then the body by its framing."""

    __slots__ = ("_body_mode", "_buf", "_chunks", "_remaining", "chunked_request", "conn", "ended",
                 "front", "head_only", "reading", "reset", "sent_head", "sid", "unacked",
                 "write_paused")

    def __init__(self, front: H2Connection, sid: int, head_only: bool) -> None:
        super().__init__()
        self.front = front
        self.sid = sid
        self.head_only = head_only
        self.conn: StreamConnection | None = None
        self.sent_head = False
        self.ended = False
        """The response's last byte is queued (END_STREAM), or the stream was reset."""
        self.reset = False
        self.reading = True
        """False while the request path does not take request body bytes (backend paused)."""
        self.unacked = 0
        """Request body bytes received but not yet acknowledged (WINDOW_UPDATE) to the client."""
        self.write_paused = False
        self.chunked_request = False
        """The request body is passed on chunked (the client sent no Content-Length)."""
        self._buf = b""
        self._body_mode = 0  # 0 length-delimited, 1 chunked, 2 until close
        self._remaining = 0
        self._chunks: Any = None

    # -- asyncio.Transport as the request path uses it --------------------------------------

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "peername":
            return self.front.peer
        if name == "sockname" and self.front.transport is not None:
            return self.front.transport.get_extra_info("sockname", default)
        return default

    def is_closing(self) -> bool:
        return self.ended

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        if not self.reading:
            self.reading = True
            self.front.acknowledge(self)

    def is_reading(self) -> bool:
        return self.reading

    def close(self) -> None:
        """The request path is done with this stream: what was sent is the whole response
        (a close-delimited body ends here), or the stream is reset if no head went out."""
        if self.ended:
            return
        if self.sent_head:
            self.ended = True
            self.front.send_data(self, b"", end=True)
        else:
            self.abort()

    def abort(self) -> None:
        """A response cut short: the client must not take it for a whole one (RST_STREAM)."""
        if not self.ended:
            self.ended = True
            self.front.reset_stream(self, INTERNAL_ERROR)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.ended:
            return
        data = bytes(data)
        if not self.sent_head:
            data = self._head(self._buf + data if self._buf else data)
            if not data or self.ended:
                return
        mode = self._body_mode
        if mode == 0:
            take = data[:self._remaining]
            self._remaining -= len(take)
            self.ended = self._remaining == 0
            self.front.send_data(self, take, end=self.ended)
        elif mode == 1:
            try:
                self._chunks.feed_data(data)
            except httptools.HttpParserError:
                self.abort()  # the backend's chunked framing is broken: the body is not whole
        else:
            self.front.send_data(self, data, end=False)

    # -- the response head ----------------------------------------------------------------

    def _head(self, data: bytes) -> bytes:
        """Send the response head once it is complete; what follows it (b"" until then)."""
        end = data.find(b"\r\n\r\n")
        if end < 0:
            self._buf = data
            return b""
        self._buf = b""
        lines = data[:end].split(b"\r\n")
        status = int(lines[0][9:12])
        if status < 200:  # 100 Continue / 103: not forwarded over HTTP/2 (the final one follows)
            return self._head(data[end + 4:]) if len(data) > end + 4 else b""
        headers: list[tuple[bytes, bytes]] = [(b":status", b"%d" % status)]
        length = -1
        chunked = False
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.lower()
            value = value.strip()
            if name in _HOP_BY_HOP:
                if name == b"transfer-encoding":
                    chunked = True
                continue
            if name == b"content-length":
                length = int(value)
            headers.append((name, value))
        self.sent_head = True
        no_body = self.head_only or status in _NO_BODY_STATUS
        if no_body or length == 0:
            self.ended = True
            self.front.send_head(self, headers, end=True)
            return b""
        self.front.send_head(self, headers, end=False)
        if chunked:
            self._body_mode = 1
            self._chunks = httptools.HttpResponseParser(_ChunkSink(self))
            self._chunks.feed_data(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        elif length > 0:
            self._remaining = length
        else:
            self._body_mode = 2
        return data[end + 4:]


class _ChunkSink:
    """httptools callbacks for a chunked response body: the decoded bytes go out as DATA."""

    __slots__ = ("stream",)

    def __init__(self, stream: Stream) -> None:
        self.stream = stream

    def on_body(self, body: bytes) -> None:
        if not self.stream.ended:
            self.stream.front.send_data(self.stream, body, end=False)

    def on_message_complete(self) -> None:
        stream = self.stream
        if not stream.ended:
            stream.ended = True
            stream.front.send_data(stream, b"", end=True)


class H2Connection(asyncio.Protocol):
    """One HTTP/2 client connection (TLS with ALPN ``h2``, or prior knowledge on plain HTTP)."""

    def __init__(self, engine: HttpEngine, scheme: str, sni_site: Site | None,
                 client_address: tuple[str, int] | None, names: tuple[str, ...] = ()) -> None:
        """``names``: the names the connection's certificate covers (coalescing: a request for
        another site than the SNI's is served when the certificate covers its name)."""
        self.engine = engine
        self.scheme = scheme
        self.sni_site = sni_site
        self.names = names
        self.client_ip, self.client_port = client_address or ("", 0)
        self.peer: tuple[str, int] = (self.client_ip, self.client_port)
        self.cap_key: str | None = None
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, Stream] = {}
        self.closing = False
        self.closed = False
        self._tcp_paused = False
        self._flush_scheduled = False
        self._last_sid = 0
        self._answered = 0
        self._idle_timer: asyncio.TimerHandle | None = None
        settings = engine.settings
        self._buffer_limit = settings.h2_stream_buffer
        self.h2 = ngh2.Connection(ngh2.Role.SERVER, ngh2.Configuration(
            auto_window_update=False,
            max_inbound_header_list_size=settings.max_header_size,
            max_continuations=8,
            stream_reset_rate_limit=(settings.h2_reset_burst, settings.h2_reset_rate),
            max_outbound_ack=settings.h2_max_outbound_ack))

    # -- connection --------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        if not self.client_ip and isinstance(peer, tuple):
            self.client_ip, self.client_port = str(peer[0]), int(peer[1])
        self.peer = (self.client_ip, self.client_port)
        engine = self.engine
        engine.opened(self)
        metrics.H2_CONNECTIONS.inc()
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

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._cancel_idle()
        for stream in list(self.streams.values()):
            self._release(stream, client_gone=True)
        self.streams.clear()
        if self._answered:
            metrics.H2_STREAMS.inc(self._answered)
            self._answered = 0
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
        h2 = self.h2
        try:
            h2.receive_data(data)
            events = h2.events()
        except ngh2.NGH2Error as exc:
            self._fail(exc)
            return
        # Streams the client opens and resets within one read (rapid reset) never start a
        # request: nothing is routed or connected for them.
        reset = {e.stream_id for e in events if type(e) is ngh2.StreamReset}
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
                    self._release(stream, client_gone=not stream.ended)
            elif kind is ngh2.TrailersReceived:
                self._end_body(event.stream_id)  # type: ignore[attr-defined]
            elif kind is ngh2.WindowUpdated:
                self._schedule_flush()
            elif kind is ngh2.ConnectionClosed or kind is ngh2.GoAwayReceived:
                self.closing = True
        self._flush()
        if self.closing and not self.streams:
            self._close()

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

    # -- streams -----------------------------------------------------------------------------

    def _request(self, event: ngh2.RequestReceived) -> None:
        sid = event.stream_id
        if self.closing:
            self.h2.reset_stream(sid, REFUSED_STREAM)
            return
        self._last_sid = sid
        method = path = authority = host = b""
        lines: list[bytes] = []
        cookies: list[bytes] = []
        has_length = False
        for name, value in event.headers:
            if name.startswith(b":"):
                if name == b":method":
                    method = value
                elif name == b":path":
                    path = value
                elif name == b":authority":
                    authority = value
                continue  # :scheme: the listener's scheme is what the edge states upstream
            if name == b"host":
                host = value
            elif name == b"cookie":
                cookies.append(value)  # split per crumb over HTTP/2 (RFC 9113 §8.2.3)
            else:
                has_length = has_length or name == b"content-length"
                lines.append(name + b": " + value)
        if not authority:
            authority = host
        if (not path or _UNSAFE.search(path) or _UNSAFE.search(authority)
                or (host and host != authority)):
            # RFC 9113 §8.3.1: Host and :authority must name the same; malformed → stream error.
            metrics.H2_REFUSED.labels(reason="malformed").inc()
            self.h2.reset_stream(sid, PROTOCOL_ERROR)
            return
        if cookies:
            lines.append(b"cookie: " + b"; ".join(cookies))
        chunked = not event.end_stream and not has_length
        if chunked:
            lines.append(b"transfer-encoding: chunked")
        stream = Stream(self, sid, head_only=method == b"HEAD")
        self.streams[sid] = stream
        self._cancel_idle()
        conn = StreamConnection(self.engine, self.scheme, self._site_for(authority),
                                (self.client_ip, self.client_port))
        stream.conn = conn
        stream.chunked_request = chunked
        conn.connection_made(stream)
        lines.append(b"")
        conn.data_received(b"%b %b HTTP/1.1\r\nhost: %b\r\n%b\r\n" % (
            method, path, authority, b"\r\n".join(lines)))
        if event.end_stream and chunked:
            conn.data_received(_CHUNK_END)

    def _site_for(self, authority: bytes) -> Site | None:
        """The SNI site the stream's request must belong to (else 421), or None when the
        connection's certificate covers the request's name: a browser coalesces every name of
        a certificate onto one connection, and each request is routed by its own name."""
        sni_site = self.sni_site
        if sni_site is None or not self.names:
            return sni_site
        parsed = parse_host(authority)
        if parsed is not None and parsed.name != sni_site.hostname and covers(
                self.names, parsed.name):
            return None
        return sni_site

    def _body(self, event: ngh2.DataReceived) -> None:
        stream = self.streams.get(event.stream_id)
        data = event.data
        if stream is None or stream.conn is None:
            if data:  # a stream we no longer serve: its bytes still count against the window
                self.h2.acknowledge_received_data(len(data), event.stream_id)
            return
        if data:
            stream.unacked += len(data)
            stream.conn.data_received(
                b"%x\r\n%b\r\n" % (len(data), data) if stream.chunked_request else data)
            if stream.reading:
                self.acknowledge(stream)
        if event.end_stream:
            self._end_body(event.stream_id)

    def _end_body(self, sid: int) -> None:
        stream = self.streams.get(sid)
        if stream is not None and stream.conn is not None and stream.chunked_request:
            stream.conn.data_received(_CHUNK_END)

    def acknowledge(self, stream: Stream) -> None:
        """Tell the client the request body bytes of ``stream`` were taken (WINDOW_UPDATE)."""
        if stream.unacked and not stream.reset:
            amount, stream.unacked = stream.unacked, 0
            try:
                self.h2.acknowledge_received_data(amount, stream.sid)
            except ngh2.NGH2Error:
                return
            self._schedule_flush()

    def send_head(self, stream: Stream, headers: list[tuple[bytes, bytes]], *, end: bool) -> None:
        if stream.reset:
            return
        try:
            self.h2.send_response(stream.sid, headers, end_stream=end)
        except ngh2.NGH2Error:
            stream.reset = True
            return
        if end:
            self._answered += 1
            self._finish_later(stream)
        self._schedule_flush()

    def send_data(self, stream: Stream, data: bytes, *, end: bool) -> None:
        if stream.reset:
            return
        try:
            self.h2.send_data(stream.sid, data, end_stream=end)
        except ngh2.NGH2Error:
            stream.reset = True
            return
        if end:
            self._answered += 1
            self._finish_later(stream)
        elif self.h2.queued_body_size(stream.sid) > self._buffer_limit:
            self._pause_stream(stream)
        self._schedule_flush()

    def reset_stream(self, stream: Stream, code: int) -> None:
        if not stream.reset:
            stream.reset = True
            with contextlib.suppress(ngh2.NGH2Error):
                self.h2.reset_stream(stream.sid, code)
            self._finish_later(stream)
            self._schedule_flush()

    def _pause_stream(self, stream: Stream) -> None:
        if not stream.write_paused and stream.conn is not None:
            stream.write_paused = True
            stream.conn.pause_writing()  # pauses reading from the stream's backend

    def _finish_later(self, stream: Stream) -> None:
        # The request path finishes its request (access log, pool release) after the write
        # that ended the stream returns: release the stream only then.
        self.engine.loop.call_soon(self._release, stream, False)

    def _release(self, stream: Stream, client_gone: bool) -> None:
        """Forget ``stream``; ``client_gone``: the client reset or closed it before the end
        (the request path then aborts its backend connection and logs 499)."""
        conn = stream.conn
        if conn is None:
            return
        stream.conn = None
        if client_gone:
            stream.ended = stream.reset = True
        conn.connection_lost(None)
        self.streams.pop(stream.sid, None)
        if not self.streams and not self.closed:
            if self.closing:
                self._flush()
                self._close()
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
            transport.write(data)
        if self._tcp_paused:
            return
        low = self._buffer_limit // 2
        for stream in self.streams.values():
            if stream.write_paused and stream.conn is not None and (
                    stream.reset or self.h2.queued_body_size(stream.sid) <= low):
                stream.write_paused = False
                stream.conn.resume_writing()
        if self.closing and not self.streams and not self.h2.want_write:
            self._close()

    def _close(self) -> None:
        self.closing = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    # -- timers, drain -------------------------------------------------------------------------

    def _arm_idle(self, timeout: float) -> None:
        self._cancel_idle()
        if timeout > 0:
            self._idle_timer = self.engine.loop.call_later(timeout, self._idle)

    def _cancel_idle(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def _idle(self) -> None:
        self._idle_timer = None
        if not self.streams:
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

    def abort(self) -> None:
        for stream in list(self.streams.values()):
            self._release(stream, client_gone=True)
        if self.transport is not None:
            self.transport.abort()


class _Chooser(asyncio.Protocol):
    """Picks HTTP/1 or HTTP/2 for a new connection, then steps aside (``set_protocol``).

    TLS: by the ALPN protocol the handshake chose. Plain (``[http] h2c``): by whether the first
    bytes are the HTTP/2 connection preface."""

    def __init__(self, engine: HttpEngine, scheme: str, sni_site: Site | None,
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


def choose_protocol(engine: HttpEngine, scheme: str, sni_site: Site | None = None,
                    client_address: tuple[str, int] | None = None,
                    names: tuple[str, ...] = ()) -> asyncio.Protocol:
    """The protocol for a new client connection that may speak HTTP/2: it becomes a
    :class:`H2Connection` or a :class:`~httpproxy.connection.ClientConnection` once the
    connection says which (returns the chooser)."""
    return _Chooser(engine, scheme, sni_site, client_address, names)
