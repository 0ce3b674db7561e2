"""The HTTPS accept loop: accept, peek the ClientHello, hand the socket on untouched.

Why our own loop: the certificate depends on the SNI, the SNI's site comes from the directory,
and the directory must be *awaited* (a synchronous ``sni_callback`` cannot). So before any TLS
engine exists we look at the ClientHello with ``recv(MSG_PEEK)``: the bytes stay in the
kernel, and the TLS engine (uvloop's, via ``loop.connect_accepted_socket(ssl=ctx)``) later
reads the very same ClientHello from the socket. Nothing is replayed through a Python
``MemoryBIO``, so the handshake and every later record run at native speed.

Peeking has one trap: readiness is level-triggered, so a partial ClientHello would wake the
loop again and again. After a short peek we set ``SO_RCVLOWAT`` to one byte more than is
buffered: the kernel reports the socket readable only when more arrives (or on EOF). It is set
back to 1 before the socket is handed on.

Per connection (:class:`PendingConnection`), in order:

1. From a peer inside ``[https] trusted_proxies`` only: an optional PROXY protocol v1/v2
   header, consumed (really read) from the first bytes; its source address becomes the client
   address. Anyone else's bytes are never parsed as a header.
2. The ClientHello, parsed by the sans-IO :class:`~httpproxy.clienthello.ClientHelloReader`
   (size limit ``[https] max_client_hello``). A malformed one gets its TLS alert; plain HTTP
   gets a short ``400`` in plain text once its request head has arrived.
3. ``on_hello(connection, hello)``: the owner looks the SNI up and either refuses
   (:meth:`PendingConnection.refuse`) or takes the socket (:meth:`PendingConnection.detach`)
   and starts TLS on it. ``[https] handshake_timeout`` covers all of it, from accept on.

Before anything is answered in the clear, buffered input is read and dropped: closing a
socket with unread data makes Linux send RST, which can destroy the alert before the client
reads it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
import time
from collections.abc import Callable

from edge import metrics
from edge.directory.names import hostname_or_none
from edge.limits import ConnectionCap
from edge.proxyproto import MAX_V2_PAYLOAD, ProxyHeaderParser, ProxyHeaderPolicy, ProxyProtocolError
from httpproxy import tls_metrics
from httpproxy.clienthello import ClientHello, ClientHelloError, ClientHelloReader, alert_bytes
from httpproxy.metrics import LocalHistogram

__all__ = ["Acceptor", "OnHello", "PendingConnection", "plain_http_answer"]

log = logging.getLogger("edge.proxy.https")

OnHello = Callable[["PendingConnection", ClientHello], None]
"""Called once per connection whose ClientHello is complete; returns nothing. It must end the
connection with :meth:`PendingConnection.refuse` or take it with
:meth:`PendingConnection.detach` and then call :meth:`PendingConnection.finish`, unless the
connection closes itself first (timeout, :meth:`Acceptor.close`: check ``closed``)."""

ACCEPT_BATCH = 64
"""Connections accepted per readiness event, so one busy listener cannot starve the loop."""
ACCEPT_PAUSE = 0.5
"""Seconds a listener rests after accept() failed for lack of resources (e.g. EMFILE)."""
_PROXY_PEEK = 16 + MAX_V2_PAYLOAD
_PLAIN_HTTP_HEAD_LIMIT = 16384
_DISCARD_LIMIT = 1 << 16
# Accepted sockets stay in blocking mode (no fcntl() pair per connection): every call here
# says MSG_DONTWAIT, and libuv makes the descriptor non-blocking when TLS takes it over.
_NOWAIT = socket.MSG_DONTWAIT
_PEEK = socket.MSG_PEEK | socket.MSG_DONTWAIT
_ESTABLISHED = frozenset(("ok", "default_certificate", "on_demand"))
"""Outcomes whose accept → established time goes into ``edge_https_handshake_seconds``."""


class _AcceptedSocket(socket.socket):
    """An accepted TCP socket whose ``family`` and ``type`` are plain class attributes.

    On :class:`socket.socket` both are properties that convert the C value to an enum on
    every read (about a microsecond each); uvloop's ``connect_accepted_socket`` reads them
    three times per connection (checked against uvloop 0.23). They cannot change for an
    accepted stream socket, so the subclasses below answer them as constants."""

    __slots__ = ()
    type = socket.SOCK_STREAM


class _AcceptedSocket4(_AcceptedSocket):
    __slots__ = ()
    family = socket.AF_INET


class _AcceptedSocket6(_AcceptedSocket):
    __slots__ = ()
    family = socket.AF_INET6


_ACCEPTED_CLASSES: dict[int, type[_AcceptedSocket]] = {
    socket.AF_INET: _AcceptedSocket4, socket.AF_INET6: _AcceptedSocket6}


def plain_http_answer(host: str | None = None) -> bytes:
    """The whole plain-text ``400`` answer to an HTTP request sent to the TLS port."""
    hint = f"https://{host}/" if host else "https://"
    body = f"400 Bad Request: this port speaks TLS (HTTPS); use {hint}\n".encode()
    return (b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)


class PendingConnection:
    """One accepted connection before its TLS session is established."""

    __slots__ = ("_acceptor", "_lowat", "_parser", "_plain", "_reader", "_reading", "_timer",
                 "cap_key", "client_address", "closed", "deadline", "fed", "outcome", "peer",
                 "sock", "started")

    def __init__(self, acceptor: Acceptor, sock: socket.socket, peer: tuple[str, int],
                 parser: ProxyHeaderParser | None) -> None:
        self._acceptor = acceptor
        self.sock = sock
        self.peer = peer
        self.client_address = peer
        """The client: the PROXY header's source when a trusted balancer sent one."""
        self.started = time.monotonic()
        self.deadline = self.started + acceptor.timeout
        self._parser = parser
        self._reader = ClientHelloReader(acceptor.max_client_hello)
        self.fed = 0
        self._lowat = 1
        self._reading = False
        self._plain: bytearray | None = None
        self.closed = False
        self.outcome: str | None = None
        self.cap_key: str | None = None
        """The client address holding a slot of the acceptor's per-address cap."""
        self._timer: asyncio.TimerHandle | None = None  # see arm_deadline()

    # -- reading the first bytes ---------------------------------------------------------

    def on_readable(self) -> None:
        if self.closed:
            return
        if self._plain is not None:
            self._read_plain_http()
            return
        size = _PROXY_PEEK if self._parser is not None else self._reader.max_bytes + 1
        try:
            data = self.sock.recv(size, _PEEK)
        except (BlockingIOError, InterruptedError):
            self._want_more(0)
            return
        except OSError:
            self.close("closed")
            return
        if not data or len(data) <= self.fed:
            # Woken without new bytes: SO_RCVLOWAT asks for one more than were buffered, so
            # this is EOF after a partial hello (peeking would find the same bytes forever).
            self.close("closed")
            return
        if self._parser is not None:
            self._proxy_header(data)
            return
        new = data[self.fed:] if self.fed else data
        self.fed = len(data)
        try:
            hello = self._reader.feed(new)
        except ClientHelloError as exc:
            if exc.plain_http:
                self._plain = bytearray()
                self._read_plain_http()
            else:
                self.refuse(exc.alert, "bad_hello")
            return
        if hello is None:
            self._want_more(len(data))
            return
        self._stop_reading()
        self._acceptor.on_hello(self, hello)

    def _proxy_header(self, data: bytes) -> None:
        """Consume a PROXY header at the start (if the trusted peer sent one), then go on
        peeking from the first TLS byte."""
        assert self._parser is not None
        try:
            result = self._parser.feed(data[self.fed:])
        except ProxyProtocolError:
            self.close("proxy_header")
            return
        self.fed = len(data)
        if result is None:
            self._want_more(len(data))
            return
        self._parser = None
        self.fed = 0
        header_length = len(data) - len(result.remaining)
        if header_length:
            try:
                got = len(self.sock.recv(header_length, _NOWAIT))
            except OSError:
                got = -1
            if got != header_length:  # the peeked bytes are buffered: this cannot fall short
                self.close("proxy_header")
                return
        header = result.header
        if header is not None and header.source is not None:
            self.client_address = header.source
        if not self._acceptor.admit(self):  # counted by the address the balancer saw
            self.close("per_ip_cap")
            return
        if result.remaining:
            self.on_readable()
        else:
            self._want_more(0)

    def arm_deadline(self) -> None:
        """Close the connection when ``[https] handshake_timeout`` is over, unless detached
        first. Armed lazily: a hello complete at accept (TCP_DEFER_ACCEPT) whose site is
        cached goes straight to TLS, whose own timeout takes the rest of the deadline."""
        if self._timer is None and not self.closed:
            self._timer = self._acceptor.loop.call_later(max(0.0, self.remaining()),
                                                          self._timed_out)

    def _want_more(self, buffered: int) -> None:
        self.arm_deadline()
        # Level-triggered readiness would report the peeked bytes forever: ask the kernel to
        # wake us only once more than ``buffered`` bytes are there (EOF wakes us regardless).
        lowat = max(buffered + 1, 1)
        if lowat != self._lowat:
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, lowat)
            except OSError:
                self.close("closed")
                return
            self._lowat = lowat
        if not self._reading:
            self._acceptor.loop.add_reader(self.sock.fileno(), self.on_readable)
            self._reading = True

    def _stop_reading(self) -> None:
        if self._reading:
            self._acceptor.loop.remove_reader(self.sock.fileno())
            self._reading = False

    def _read_plain_http(self) -> None:
        """Read (consume) the plain-HTTP request head, then answer 400 and close."""
        assert self._plain is not None
        try:
            while chunk := self.sock.recv(4096, _NOWAIT):
                self._plain += chunk
                if b"\r\n\r\n" in self._plain or len(self._plain) > _PLAIN_HTTP_HEAD_LIMIT:
                    break
            else:
                self.close("plain_http")  # EOF before the head ended: nobody to answer
                return
        except (BlockingIOError, InterruptedError):
            if b"\r\n\r\n" not in self._plain and len(self._plain) <= _PLAIN_HTTP_HEAD_LIMIT:
                self._want_more(0)
                return
        except OSError:
            self.close("plain_http")
            return
        self._answer(plain_http_answer(_host_header(bytes(self._plain))), "plain_http")

    # -- endings -------------------------------------------------------------------------

    def refuse(self, alert: str, outcome: str) -> None:
        """End the connection with the TLS fatal ``alert`` (sent in the clear)."""
        self._answer(alert_bytes(alert), outcome)

    def _answer(self, data: bytes, outcome: str) -> None:
        if self.closed:
            return
        self._stop_reading()
        self._discard_input()
        with contextlib.suppress(OSError):
            self.sock.send(data, _NOWAIT)
            self.sock.shutdown(socket.SHUT_WR)
        self.close(outcome)

    def _discard_input(self) -> None:
        # Drop what the client sent (e.g. the peeked hello) so close() sends FIN, not RST.
        with contextlib.suppress(OSError):
            for _ in range(_DISCARD_LIMIT // 4096):
                if not self.sock.recv(4096, _NOWAIT):
                    break

    def _timed_out(self) -> None:
        self._timer = None
        self.close("timeout")

    def close(self, outcome: str) -> None:
        """Close the socket (if still ours) and record ``outcome``."""
        if self.closed:
            return
        self._stop_reading()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._discard_input()
        self.sock.close()
        self.finish(outcome)

    def detach(self) -> socket.socket:
        """Hand the socket over to a TLS transport: stops the deadline timer and restores
        ``SO_RCVLOWAT``. The caller then owns the socket and must call :meth:`finish`."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._stop_reading()
        if self._lowat != 1:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
            self._lowat = 1
        self.closed = True
        return self.sock

    def remaining(self) -> float:
        """Seconds left of ``[https] handshake_timeout``."""
        return self.deadline - time.monotonic()

    def finish(self, outcome: str) -> None:
        """Record how this connection's handshake ended (once); it stops being pending."""
        self.closed = True
        if self.outcome is None:
            self.outcome = outcome
            self._acceptor.finished(self, outcome)


def _host_header(head: bytes) -> str | None:
    """The Host header of a plain request, if it is a plain hostname (for the 400 hint)."""
    for line in head.split(b"\r\n")[1:]:
        name, sep, value = line.partition(b":")
        if sep and name.strip().lower() == b"host":
            text = value.strip().decode("ascii", "replace").rsplit(":", 1)[0]
            return hostname_or_none(text)
    return None


class Acceptor:
    """Accepts on listening sockets and peeks each connection's ClientHello.

    ``on_hello`` receives each complete hello (see :data:`OnHello`). ``policy`` says who may
    send a PROXY header. At most ``max_pending`` connections per acceptor are before an
    established TLS session, and at most ``max_pending_per_address`` (0: no cap) from one
    client address (after a PROXY header); further ones are closed at once. ``defer_accept``
    sets ``TCP_DEFER_ACCEPT`` (``timeout`` seconds) on the listening sockets.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, *, on_hello: OnHello, timeout: float,
                 max_client_hello: int, max_pending: int, policy: ProxyHeaderPolicy,
                 defer_accept: bool = True, max_pending_per_address: int = 0) -> None:
        self.loop = loop
        self.defer_accept = defer_accept
        self.on_hello = on_hello
        self.timeout = timeout
        self.max_client_hello = max_client_hello
        self.max_pending = max_pending
        self.policy = policy
        self.pending: set[PendingConnection] = set()
        self.per_address = ConnectionCap(max_pending_per_address) if max_pending_per_address else None
        # Plain counters on the hot path; export_metrics() copies them to Prometheus.
        self.outcomes = dict.fromkeys(tls_metrics.OUTCOMES, 0)
        self.accepted = 0
        self._exported = dict.fromkeys(tls_metrics.OUTCOMES, 0)
        self._exported_accepted = 0
        self._counters = {o: tls_metrics.HANDSHAKES.labels(outcome=o) for o in tls_metrics.OUTCOMES}
        self.latency = HandshakeLatency()
        self._connections = metrics.CONNECTIONS.labels(proxy="https")
        self._listeners: list[socket.socket] = []
        self._accept_as: dict[int, tuple[int, type[socket.socket]]] = {}
        """Listener fd → (address family, socket class) of the sockets it accepts."""
        self._idle = asyncio.Event()
        self._idle.set()

    def start(self, sockets: list[socket.socket]) -> None:
        for sock in sockets:
            if self.defer_accept:
                # The kernel hands a connection over only once its first bytes (the
                # ClientHello) arrived: the first peek then finds them, no readiness watch
                # per connection, and silent clients never cost a Python object.
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT,
                                    max(1, math.ceil(self.timeout)))
            sock.setblocking(False)
            self._accept_as[sock.fileno()] = (int(sock.family),
                                              _ACCEPTED_CLASSES.get(sock.family, socket.socket))
            self.loop.add_reader(sock.fileno(), self._accept, sock)
            self._listeners.append(sock)

    def _accept(self, listener: socket.socket) -> None:
        # socket.accept() without its wrapper: the wrapper's ``self.type`` / ``self.family``
        # enum conversions cost more than the accept4() system call itself.
        family, make = self._accept_as[listener.fileno()]
        accept = listener._accept  # type: ignore[attr-defined]
        for _ in range(ACCEPT_BATCH):
            try:
                fd, address = accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue  # the client gave up while queued
            except OSError as exc:
                # EMFILE/ENFILE/ENOBUFS: the listener stays readable, so a level-triggered
                # watch would spin. Pause this listener briefly; the kernel keeps the backlog.
                log.warning("accept on the HTTPS listener failed (%s); pausing %.1fs",
                            exc, ACCEPT_PAUSE)
                self._pause_listener(listener)
                return
            self._new_connection(make(family, socket.SOCK_STREAM, 0, fd), address)

    def _pause_listener(self, listener: socket.socket) -> None:
        fd = listener.fileno()
        self.loop.remove_reader(fd)

        def resume() -> None:
            if listener in self._listeners and listener.fileno() == fd:
                self.loop.add_reader(fd, self._accept, listener)

        self.loop.call_later(ACCEPT_PAUSE, resume)

    def _new_connection(self, sock: socket.socket, address: tuple[str, int]) -> None:
        self.accepted += 1
        if len(self.pending) >= self.max_pending:
            sock.close()
            self._count("overloaded")
            return
        peer = (address[0], address[1])
        connection = PendingConnection(self, sock, peer, self.policy.parser_for(peer[0]))
        self.pending.add(connection)
        self._idle.clear()
        if connection._parser is None and not self.admit(connection):
            connection.close("per_ip_cap")
            return
        connection.on_readable()

    def admit(self, connection: PendingConnection) -> bool:
        """Take a per-address slot for ``connection`` (released when it stops pending)."""
        cap = self.per_address
        if cap is None:
            return True
        key = connection.client_address[0]
        if not cap.try_acquire(key):
            return False
        connection.cap_key = key
        return True

    def finished(self, connection: PendingConnection, outcome: str) -> None:
        """Bookkeeping when a connection leaves the pending set (called by ``finish``)."""
        self.pending.discard(connection)
        if connection.cap_key is not None and self.per_address is not None:
            self.per_address.release(connection.cap_key)
            connection.cap_key = None
        if not self.pending:
            self._idle.set()
        self.outcomes[outcome] += 1
        if outcome in _ESTABLISHED:
            self.latency.observe(time.monotonic() - connection.started)

    def _count(self, outcome: str) -> None:
        self.outcomes[outcome] += 1

    def export_metrics(self) -> None:
        """Add the counts since the last call to the Prometheus counters (once a second)."""
        for outcome, count in self.outcomes.items():
            if count != self._exported[outcome]:
                self._counters[outcome].inc(count - self._exported[outcome])
                self._exported[outcome] = count
        if self.accepted != self._exported_accepted:
            self._connections.inc(self.accepted - self._exported_accepted)
            self._exported_accepted = self.accepted
        self.latency.export()

    def stop_accepting(self) -> None:
        """Close the listening sockets (``drain``); pending handshakes go on."""
        for sock in self._listeners:
            with contextlib.suppress(ValueError, OSError):
                self.loop.remove_reader(sock.fileno())
            sock.close()
        self._listeners.clear()

    async def wait_idle(self) -> None:
        """Return once no connection is pending."""
        await self._idle.wait()

    def close(self) -> None:
        """Stop accepting and close every connection still before its TLS session."""
        self.stop_accepting()
        for connection in list(self.pending):
            connection.close("closed")


class HandshakeLatency(LocalHistogram):
    """``edge_https_handshake_seconds`` counted in plain numbers, exported once a second.

    ``Histogram.observe`` in prometheus_client's multiprocess mode (``edge serve``) takes a
    lock and writes two mmap'd values per call, each after a ``getpid()``: ~18 µs against
    ~1 µs for a bucket count, ~1.4 % of the worker's non-GC CPU per TLS handshake (py-spy,
    10 names cycling).
    """

    __slots__ = ()

    def __init__(self) -> None:
        super().__init__(tls_metrics.HANDSHAKE_SECONDS)
