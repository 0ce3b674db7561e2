"""Data channels: the passive listener, connection set-up, and moving the bytes.

Every data connection goes through the proxy: towards the client in whatever mode it asked
for (PASV/EPSV: :class:`PassiveListener`; PORT/EPRT: :func:`connect_socket`), towards the
backend always passive. Client sockets stay unread plain sockets until the proxy knows whether
they become TLS. Then, with no TLS on either side, :class:`SplicePump` moves the bytes with
splice(2); otherwise both sides become transports with a :class:`HoldProtocol` (keeps what
arrives until both exist; :func:`connect_hold`, :func:`wrap_socket`) and :func:`start_relay`
hands them to :mod:`edge.relay` (``one_way``: the first EOF ends a transfer).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import random
import socket
from collections.abc import Callable
from ssl import SSLContext
from typing import cast

from edge.proxyproto import canonical_ip
from edge.relay import DEFAULT_HIGH_WATER, Relay
from ftpproxy.tls import data_connection

__all__ = [
    "HoldProtocol",
    "PassiveListener",
    "connect_hold",
    "connect_socket",
    "start_relay",
    "wrap_socket",
]

_rng = random.SystemRandom()
#: Random ports tried before a PASV is refused with 425 (the range may be nearly full).
BIND_ATTEMPTS = 32


def same_ip(a: str, b: str) -> bool:
    """True if two addresses are the same host (IPv4-mapped IPv6 compared as IPv4)."""
    try:
        return canonical_ip(a) == canonical_ip(b)
    except ValueError:
        return False


class HoldProtocol(asyncio.Protocol):
    """Holds a fresh connection until the relay takes it: reading paused, bytes kept, EOF noted.

    (uvloop reads a fresh connection once even when ``connection_made`` paused it, so what
    arrives is buffered, never dropped.)
    """

    __slots__ = ("buffer", "closed", "eof", "transport")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.eof = False
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.pause_reading()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.transport is not None and len(self.buffer) >= DEFAULT_HIGH_WATER:
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        self.eof = True
        return True  # keep a TCP transport open for writing (ignored by TLS transports)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)

    @property
    def finished(self) -> bool:
        """The peer has sent everything it will send (EOF or connection gone)."""
        return self.eof or self.closed.done()

    def take(self) -> bytes:
        data = bytes(self.buffer)
        self.buffer.clear()
        return data


class PassiveListener:
    """One passive data port: a random port from the range, exactly one accepted connection,
    and only from ``expected_ip`` (PASV port stealing: anyone else is closed at once and
    reported to ``on_foreign``; the port keeps waiting for the real client).

    The accepted connection stays a plain socket until :func:`wrap_socket`: nothing is read
    from it before the proxy knows whether it becomes TLS, so no byte of a ClientHello can be
    consumed by the wrong protocol.
    """

    def __init__(self, sock: socket.socket, port: int, expected_ip: str,
                 on_foreign: Callable[[str], None]) -> None:
        self.port = port
        self._sock = sock
        self._expected = expected_ip
        self._on_foreign = on_foreign
        self._taken = False
        self._task = asyncio.get_running_loop().create_task(self._accept_loop())

    @classmethod
    async def open(cls, bind_ip: str, port_range: tuple[int, int], expected_ip: str,
                   on_foreign: Callable[[str], None]) -> PassiveListener:
        """Listen on a random free port of ``port_range`` on ``bind_ip``.

        Raises OSError when no port could be bound after :data:`BIND_ATTEMPTS` tries.
        """
        family = socket.AF_INET6 if ":" in bind_ip else socket.AF_INET
        low, high = port_range
        last: OSError | None = None
        for _ in range(BIND_ATTEMPTS):
            port = _rng.randint(low, high)
            sock = socket.socket(family, socket.SOCK_STREAM)
            # SO_REUSEADDR: the proxy closes data connections first, so each used port keeps
            # TIME_WAIT entries for a minute; without it a range is used up by ~range-size
            # transfers per minute (small files) and PASV fails. On Linux it never lets two
            # sockets listen on one port at once, so the one-accept rule still holds.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((bind_ip, port))
                sock.listen(4)
            except OSError as exc:
                sock.close()
                if exc.errno not in (errno.EADDRINUSE, errno.EACCES):
                    raise
                last = exc
                continue
            sock.setblocking(False)
            return cls(sock, port, expected_ip, on_foreign)
        raise OSError(errno.EADDRINUSE, f"no free passive port in {low}-{high} ({last})")

    async def _accept_loop(self) -> socket.socket:
        loop = asyncio.get_running_loop()
        try:
            while True:
                conn, peer = await loop.sock_accept(self._sock)
                if same_ip(str(peer[0]), self._expected):
                    return conn
                conn.close()
                self._on_foreign(str(peer[0]))
        finally:
            self._sock.close()  # exactly one accept

    async def accept(self, wait: float) -> socket.socket:
        """The client's connection (now the caller's), waiting up to ``wait`` seconds.

        Raises TimeoutError, or ConnectionAbortedError if the port was closed meanwhile.
        """
        try:
            conn = await asyncio.wait_for(asyncio.shield(self._task), wait)
        except asyncio.CancelledError:
            self.close()
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # we are being cancelled ourselves
            raise ConnectionAbortedError("passive port closed") from None
        except BaseException:
            self.close()
            raise
        self._taken = True
        self.close()
        return conn

    def close(self) -> None:
        """Stop listening; a connection accepted but never taken is closed."""
        if not self._task.done():
            self._task.cancel()
        elif not self._taken and not self._task.cancelled() and self._task.exception() is None:
            self._task.result().close()
        self._sock.close()


async def connect_socket(host: str, port: int, connect_timeout: float) -> socket.socket:
    """A plain connected socket (active mode towards the client, and the backend's passive
    port on the splice path), not yet read from."""
    loop = asyncio.get_running_loop()
    try:
        # Data connections go to validated IP literals: resolve them here rather than through
        # the loop's getaddrinfo, which is a round trip through a thread pool per transfer.
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)
    except socket.gaierror:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setblocking(False)
    try:
        # Not loop.sock_connect: uvloop (0.23) resolves the address again there, passing only
        # the family, which misses its numeric fast path and goes through libuv's thread
        # pool: a wake-up from another thread in the middle of every transfer's set-up
        # (strace: ~0.5 ms between the backend's 150 and the connect).
        err = sock.connect_ex(address)
        if err == errno.EINPROGRESS:
            if _connected(sock):
                err = 0
            else:
                async with asyncio.timeout(connect_timeout):  # no extra task, unlike wait_for
                    await _writable(loop, sock)
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            raise OSError(err, f"Connect call failed {address}: {os.strerror(err)}")
    except BaseException:
        sock.close()
        raise
    return sock


def _connected(sock: socket.socket) -> bool:
    """True if a non-blocking connect has already completed (to a local or nearby peer the
    handshake is often over before ``connect`` returns ``EINPROGRESS``): saves a trip through
    the event loop (add_writer, a wake-up, remove_writer) per data connection."""
    try:
        sock.getpeername()
    except OSError:
        return False
    return True


async def _writable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    """Until ``sock`` is writable (a non-blocking connect has finished, either way)."""
    done = loop.create_future()

    def ready() -> None:
        if not done.done():
            done.set_result(None)
    fd = sock.fileno()
    loop.add_writer(fd, ready)
    try:
        await done
    finally:
        loop.remove_writer(fd)


async def wrap_socket(sock: socket.socket, *, tls: SSLContext | None, handshake_timeout: float,
                      ) -> tuple[asyncio.Transport, HoldProtocol]:
    """Turn a client data socket into a held transport; TLS server side when ``tls`` is set."""
    loop = asyncio.get_running_loop()
    hold = HoldProtocol()
    # uvloop returns its TLS protocol rather than ours for ssl=...: keep our own reference.
    with data_connection():
        transport, _ = await loop.connect_accepted_socket(
            lambda: hold, sock, ssl=tls, ssl_handshake_timeout=handshake_timeout if tls else None)
    return transport, hold


async def connect_hold(host: str, port: int, connect_timeout: float, *,
                       ssl: SSLContext | None = None, server_hostname: str | None = None,
                       ) -> tuple[asyncio.Transport, HoldProtocol]:
    """Connect (plain, or TLS with ``ssl``/``server_hostname``) and hold the connection."""
    loop = asyncio.get_running_loop()
    hold = HoldProtocol()
    transport, _ = await asyncio.wait_for(
        loop.create_connection(lambda: hold, host, port, ssl=ssl,
                               server_hostname=server_hostname if ssl is not None else None),
        connect_timeout)
    return transport, hold


async def start_relay(client: tuple[asyncio.Transport, HoldProtocol],
                      backend: tuple[asyncio.Transport, HoldProtocol], *,
                      idle_timeout: float) -> Relay | tuple[int, int]:
    """Relay client ↔ backend data connections.

    Returns the running :class:`~edge.relay.Relay`, or ``(bytes_to_backend, bytes_to_client)`` when a
    side had already finished sending before the hand-over (a small file: the backend sent it
    and closed before the client's connection was ready); its bytes are then written to the
    other side, which is closed after flushing, and nothing else is relayed.
    """
    (ct, ch), (bt, bh) = client, backend
    for source, src_hold, sink in ((bt, bh, ct), (ct, ch, bt)):
        if src_hold.finished:
            data = src_hold.take()
            if not sink.is_closing():
                sink.write(data)
                sink.close()
            source.close()
            sink_hold = ch if sink is ct else bh
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(sink_hold.closed), idle_timeout)
            if not sink_hold.closed.done():
                sink.abort()
            return (len(data), 0) if sink is bt else (0, len(data))
    return Relay.attach(ct, bt, one_way=True, initial_a_to_b=ch.take(), initial_b_to_a=bh.take(),
                            idle_timeout=idle_timeout, names=("client", "backend"))
