"""Bidirectional byte relay between two asyncio transports, with back-pressure.

Built on Protocols rather than streams: ``data_received`` writes each chunk straight into the
other transport, with no per-chunk task switch or buffer copy of our own. On loopback a
stream-based pump (read/write/drain) moved 2-2.5x fewer bytes per second than this; a
``BufferedProtocol`` variant was no faster and pins a read buffer per side, so it is not used.

Back-pressure: each transport gets a write-buffer high-water mark; when one side's buffer
goes above it (``pause_writing``), reading stops on the *other* side, and resumes when the
buffer drains (``resume_writing``). A relay so holds at most about ``high_water`` plus one
read chunk per direction, however fast one side sends and however slowly the other reads.

Half-close: EOF from one side is passed on with ``write_eof()`` and the other direction keeps
flowing (a client may send a request, shut down its sending side, and still read the whole
answer). A TLS transport can neither be half-closed nor stay open after its peer's EOF: EOF
*from* a TLS side ends the relay; EOF *towards* one is not passed on and the relay waits for
that side to finish (so set an idle timeout).

Two ways in:

* :func:`open_relay` - a proxy protocol that has finished its own dialogue (FTP data channel,
  HTTP ``CONNECT``/upgrade, PROXY header) hands its client transport over and the relay
  connects upstream;
* :meth:`Relay.attach` - both transports are already open.

Then ``result = await relay.wait()`` (a :class:`RelayResult`) or ``relay.close()``.
"""

from __future__ import annotations

import asyncio
import ssl as _ssl
from dataclasses import dataclass
from typing import Final, cast

from edge.splice import SplicePump  # the zero-copy one-way pump (plain TCP, no TLS)

__all__ = [
    "CLOSE_LINGER",
    "DEFAULT_HIGH_WATER",
    "Relay",
    "RelayConnectError",
    "RelayResult",
    "SplicePump",
    "open_relay",
]

DEFAULT_HIGH_WATER: Final = 64 * 1024
"""Write-buffer size (bytes, per transport) above which the other side stops being read.

The kernel's socket buffers do the real buffering; this only has to keep them fed. Measured
on loopback, 64 KiB, 256 KiB and 1 MiB relay at the same speed (within noise), so the
smallest wins: a relay holds at most about 2 x (high_water + one 256 KiB read chunk)."""

CLOSE_LINGER: Final = 10.0
"""Seconds a closing relay lets a transport flush what is buffered before aborting it, so a
peer that stops reading cannot keep a finished relay's sockets open forever."""


class RelayConnectError(OSError):
    """The upstream connection could not be made; the message names ``host:port`` and why.

    ``errno`` is copied from the underlying error when there was one; the original exception
    is the ``__cause__``. The client transport is back with its original protocol.
    """

    def __init__(self, host: str, port: int, why: str) -> None:
        super().__init__(f"cannot connect to upstream {_hostport(host, port)}: {why}")
        self.host = host
        self.port = port


@dataclass(frozen=True, slots=True)
class RelayResult:
    """How a relay ended.

    ``bytes_a_to_b``/``bytes_b_to_a`` count everything the relay wrote in each direction,
    initial bytes included (for :func:`open_relay`, *a* is the client, *b* the upstream).
    ``reason`` is ``"eof"`` (both sides finished cleanly), ``"idle"``, ``"closed"`` (a side
    went away without EOF, or :meth:`Relay.close` was called), ``"error"`` (``error`` says
    which side and what), ``"cancelled"`` (the task awaiting :meth:`Relay.wait` was
    cancelled), or whatever reason was passed to :meth:`Relay.close`.
    """

    bytes_a_to_b: int
    bytes_b_to_a: int
    reason: str
    error: str | None = None


class _Endpoint(asyncio.Protocol):
    """The protocol installed on one side; forwards what it reads to its peer's transport."""

    __slots__ = (
        "count",
        "eof",
        "live",
        "lost",
        "name",
        "peer",
        "read_paused",
        "relay",
        "tls",
        "transport",
        "write",
    )

    def __init__(self, relay: Relay, name: str) -> None:
        self.relay = relay
        self.name = name
        self.transport: asyncio.Transport | None = None
        self.peer: _Endpoint = self
        self.write = _discard  # the peer transport's write(), bound once relaying starts
        self.count = 0  # bytes read here and written to the peer
        self.live = False  # False before start and after finish: drop anything read
        self.eof = False  # this side has sent EOF
        self.lost = False  # this side's transport has closed
        self.read_paused = False  # we paused reading here because the peer's buffer is full
        self.tls = False

    def bind(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.tls = transport.get_extra_info("ssl_object") is not None

    # -- asyncio callbacks --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Only called for the side the relay connects itself (open_relay's upstream).
        self.bind(cast(asyncio.Transport, transport))
        self.relay._start()

    def data_received(self, data: bytes) -> None:
        if self.live:
            self.write(data)
            self.count += len(data)

    def eof_received(self) -> bool:
        return self.relay._on_eof(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.relay._on_lost(self, exc)

    def pause_writing(self) -> None:
        # Our buffer is full: stop reading what fills it.
        self.relay._pause_reading(self.peer)

    def resume_writing(self) -> None:
        self.relay._resume_reading(self.peer)


def _discard(data: bytes) -> None:
    pass


class Relay:
    """A running relay between transports *a* and *b*.

    Create one with :func:`open_relay` or :meth:`attach`, not directly. Everything happens in
    protocol callbacks; :meth:`wait` only waits for the end.
    """

    __slots__ = (
        "_a",
        "_b",
        "_done",
        "_high_water",
        "_idle_handle",
        "_idle_seen",
        "_idle_timeout",
        "_initial",
        "_last_progress",
        "_linger_handle",
        "_loop",
        "_one_way",
        "_result",
    )

    def __init__(
        self,
        *,
        idle_timeout: float | None,
        high_water: int,
        initial_a_to_b: bytes,
        initial_b_to_a: bytes,
        names: tuple[str, str],
        one_way: bool = False,
    ) -> None:
        if idle_timeout is not None and not idle_timeout > 0:
            raise ValueError(f"idle_timeout must be positive or None, got {idle_timeout!r}")
        if high_water < 1:
            raise ValueError(f"high_water must be at least 1 byte, got {high_water!r}")
        self._loop = asyncio.get_running_loop()
        self._a = _Endpoint(self, names[0])
        self._b = _Endpoint(self, names[1])
        self._a.peer = self._b
        self._b.peer = self._a
        self._high_water = high_water
        self._one_way = one_way
        self._idle_timeout = idle_timeout
        self._initial = (initial_a_to_b, initial_b_to_a)
        self._done: asyncio.Future[RelayResult] = self._loop.create_future()
        self._result: RelayResult | None = None
        self._idle_handle: asyncio.TimerHandle | None = None
        self._linger_handle: asyncio.TimerHandle | None = None
        self._idle_seen: tuple[int, int] = (-1, -1)
        self._last_progress = 0.0

    @classmethod
    def attach(
        cls,
        transport_a: asyncio.Transport,
        transport_b: asyncio.Transport,
        *,
        initial_a_to_b: bytes = b"",
        initial_b_to_a: bytes = b"",
        idle_timeout: float | None = None,
        high_water: int = DEFAULT_HIGH_WATER,
        names: tuple[str, str] = ("a", "b"),
        one_way: bool = False,
    ) -> Relay:
        """Start relaying between two open transports and return the running relay.

        Both transports get the relay's protocol (``set_protocol``); their old protocols get
        no further callbacks, so bytes those already read must be passed as
        ``initial_a_to_b``/``initial_b_to_a`` (written before anything else). Reading is
        resumed on both. ``names`` label the sides in :attr:`RelayResult.error`.
        ``one_way=True`` ends the relay at the first EOF from either side (after flushing
        what was read), for channels where data flows one way (an FTP transfer): a TLS peer,
        which cannot be half-closed, is then closed instead of waiting for it.
        Must be called from the event loop thread.
        """
        relay = cls(
            idle_timeout=idle_timeout,
            high_water=high_water,
            initial_a_to_b=initial_a_to_b,
            initial_b_to_a=initial_b_to_a,
            names=names,
            one_way=one_way,
        )
        relay._a.bind(transport_a)
        relay._b.bind(transport_b)
        transport_a.set_protocol(relay._a)
        transport_b.set_protocol(relay._b)
        relay._start()
        return relay

    # -- public state --

    @property
    def bytes_a_to_b(self) -> int:
        """Bytes written to *b* so far (live counter, for metrics)."""
        return self._a.count

    @property
    def bytes_b_to_a(self) -> int:
        """Bytes written to *a* so far."""
        return self._b.count

    @property
    def buffered(self) -> int:
        """Bytes currently waiting in the two transports' write buffers (the memory this
        relay holds beyond one read chunk); stays around ``high_water`` per direction."""
        return sum(
            ep.transport.get_write_buffer_size()
            for ep in (self._a, self._b)
            if ep.transport is not None and not ep.lost
        )

    @property
    def result(self) -> RelayResult | None:
        """The result once the relay has finished (transports may still be flushing)."""
        return self._result

    async def wait(self) -> RelayResult:
        """Wait until the relay has finished and both transports are closed.

        If the waiting task is cancelled, the relay is aborted with reason ``"cancelled"``
        (a later ``wait()`` returns that result) and ``CancelledError`` propagates.
        """
        try:
            return await asyncio.shield(self._done)
        except asyncio.CancelledError:
            self._finish("cancelled", abort=True)
            raise

    def close(self, reason: str = "closed") -> None:
        """End the relay with ``reason``: stop reading, let both transports flush what is
        buffered (for at most :data:`CLOSE_LINGER` seconds) and close them. No-op if it
        has already finished."""
        self._finish(reason)

    # -- internals --

    def _start(self) -> None:
        a, b = self._a, self._b
        if self._result is not None:  # closed while the upstream was still connecting
            if b.transport is not None:
                b.transport.abort()
            return
        ta, tb = a.transport, b.transport
        assert ta is not None and tb is not None
        if ta.is_closing() or tb.is_closing():
            # Closed before the hand-over: its connection_lost may already have gone to the
            # old protocol, so do not wait for one.
            a.lost = ta.is_closing()
            b.lost = tb.is_closing()
            self._finish("closed")
            return
        a.write = tb.write
        b.write = ta.write
        a.live = b.live = True
        hw = self._high_water
        # low = hw/4: resume early enough that the buffer never runs dry on a fast link.
        ta.set_write_buffer_limits(high=hw, low=hw // 4)
        tb.set_write_buffer_limits(high=hw, low=hw // 4)
        to_b, to_a = self._initial
        self._initial = (b"", b"")
        if to_a:
            ta.write(to_a)
            b.count += len(to_a)
        if to_b:
            tb.write(to_b)
            a.count += len(to_b)
        # A buffer that was already full under the old protocol will not call pause_writing
        # on us again; apply that back-pressure by hand.
        for ep in (a, b):
            t = ep.transport
            assert t is not None
            if t.get_write_buffer_size() > hw:
                self._pause_reading(ep.peer)
            elif not ep.read_paused and not t.is_reading():
                t.resume_reading()
        # uvloop starts reading a fresh connection right after connection_made returns,
        # undoing a pause made inside it: enforce the pauses once more after that.
        self._loop.call_soon(self._enforce_pauses)
        if self._idle_timeout is not None:
            self._last_progress = self._loop.time()
            self._schedule_idle_check()

    def _enforce_pauses(self) -> None:
        for ep in (self._a, self._b):
            t = ep.transport
            if ep.read_paused and ep.live and t is not None and t.is_reading():
                t.pause_reading()

    def _pause_reading(self, ep: _Endpoint) -> None:
        if not ep.read_paused and not ep.eof and ep.live:
            ep.read_paused = True
            assert ep.transport is not None
            ep.transport.pause_reading()

    def _resume_reading(self, ep: _Endpoint) -> None:
        if ep.read_paused:
            ep.read_paused = False
            # After EOF the transport must stay paused: a resumed reader would see EOF again.
            if not ep.eof and ep.live:
                assert ep.transport is not None
                ep.transport.resume_reading()

    def _on_eof(self, ep: _Endpoint) -> bool:
        ep.eof = True
        # The return value tells a plain TCP transport to stay open for writing; TLS
        # transports close after EOF regardless and warn if asked to stay open.
        keep_open = not ep.tls and not self._one_way
        if self._result is not None:
            return keep_open
        peer = ep.peer
        if peer.eof or ep.tls or self._one_way:
            # Both directions are done; or this side is TLS, which asyncio closes after EOF,
            # so nothing can reach it any more; or a one-way channel has nothing more to say
            # (closing flushes what the peer still has to write).
            self._finish("eof")
            return keep_open
        assert peer.transport is not None
        if peer.transport.can_write_eof():
            try:
                peer.transport.write_eof()
            except OSError as exc:  # the peer already reset: shutdown() fails
                self._finish("error", f"{peer.name}: {exc}")
        # else the peer is TLS and cannot be half-closed. Closing it would also cut off the
        # answer it may still be sending, so leave it open: the relay ends when it closes,
        # or at the idle timeout.
        return keep_open

    def _on_lost(self, ep: _Endpoint, exc: Exception | None) -> None:
        ep.lost = True
        if self._result is None:
            if exc is not None:
                self._finish("error", f"{ep.name}: {str(exc) or type(exc).__name__}")
            elif ep.eof:
                self._finish("eof")
            else:
                self._finish("closed")
        self._maybe_done()

    def _finish(self, reason: str, error: str | None = None, *, abort: bool = False) -> None:
        if self._result is not None:
            return
        a, b = self._a, self._b
        self._result = RelayResult(a.count, b.count, reason, error)
        a.live = b.live = False
        if self._idle_handle is not None:
            self._idle_handle.cancel()
            self._idle_handle = None
        for ep in (a, b):
            if ep.transport is None:
                ep.lost = True  # upstream still connecting: open_relay cleans it up
            elif not ep.lost:
                if abort:
                    ep.transport.abort()
                else:
                    ep.transport.close()  # flushes the write buffer first
        if not (a.lost and b.lost):
            self._linger_handle = self._loop.call_later(CLOSE_LINGER, self._linger_expired)
        self._maybe_done()

    def _linger_expired(self) -> None:
        self._linger_handle = None
        for ep in (self._a, self._b):
            if not ep.lost:
                ep.lost = True
                assert ep.transport is not None
                ep.transport.abort()
        self._maybe_done()

    def _maybe_done(self) -> None:
        if self._result is None or not (self._a.lost and self._b.lost) or self._done.done():
            return
        if self._linger_handle is not None:
            self._linger_handle.cancel()
            self._linger_handle = None
        self._done.set_result(self._result)

    def _schedule_idle_check(self) -> None:
        assert self._idle_timeout is not None
        # Checking a quarter-period apart instead of touching a timer on every chunk keeps
        # the data path free of clock calls; an idle relay ends within 1.25x the timeout.
        self._idle_handle = self._loop.call_later(self._idle_timeout / 4, self._idle_check)

    def _idle_check(self) -> None:
        self._idle_handle = None
        if self._result is not None:
            return
        assert self._idle_timeout is not None
        now = self._loop.time()
        # Progress is bytes read or a write buffer draining (a slow reader is not idle).
        seen = (self._a.count + self._b.count, self.buffered)
        if seen != self._idle_seen:
            self._idle_seen = seen
            self._last_progress = now
        elif now - self._last_progress >= self._idle_timeout:
            # Nothing moves, so flushing could wait forever: abort.
            self._finish("idle", abort=True)
            return
        self._schedule_idle_check()


async def open_relay(
    client_transport: asyncio.Transport,
    upstream_host: str,
    upstream_port: int,
    *,
    initial_to_upstream: bytes = b"",
    initial_to_client: bytes = b"",
    idle_timeout: float | None = None,
    high_water: int = DEFAULT_HIGH_WATER,
    connect_timeout: float = 10.0,
    ssl: _ssl.SSLContext | None = None,
    server_hostname: str | None = None,
) -> Relay:
    """Connect to ``upstream_host:upstream_port`` and relay it with ``client_transport``.

    The client transport is paused while connecting, then taken over (``set_protocol``);
    bytes its current protocol has already read must be passed as ``initial_to_upstream``.
    (Pausing in ``connection_made`` does not stop uvloop from reading a fresh connection,
    so a protocol that may hand over must keep whatever it receives.)
    ``initial_to_client`` (e.g. a ``200 Connection established``) and ``initial_to_upstream``
    (e.g. a PROXY header) are written once the upstream is connected, before anything
    relayed. ``ssl``/``server_hostname`` make the upstream connection TLS.

    Returns the running :class:`Relay` (*a* = client, *b* = upstream). Raises
    :class:`RelayConnectError` if the upstream cannot be reached within
    ``connect_timeout`` seconds; the client transport then still belongs to its original
    protocol, with reading as it was, so the caller can answer with its own error.
    """
    loop = asyncio.get_running_loop()
    relay = Relay(
        idle_timeout=idle_timeout,
        high_water=high_water,
        initial_a_to_b=initial_to_upstream,
        initial_b_to_a=initial_to_client,
        names=("client", "upstream"),
    )
    client, upstream = relay._a, relay._b
    old_protocol = client_transport.get_protocol()
    was_reading = client_transport.is_reading()
    # Take the protocol now so a client that disconnects meanwhile is noticed, but read
    # nothing until there is somewhere to send it.
    client_transport.pause_reading()
    client.bind(client_transport)
    client_transport.set_protocol(client)
    try:
        transport, _ = await asyncio.wait_for(
            loop.create_connection(
                lambda: upstream,
                upstream_host,
                upstream_port,
                ssl=ssl,
                server_hostname=server_hostname if ssl is not None else None,
            ),
            connect_timeout,
        )
    except BaseException as exc:
        lost_meanwhile = client.lost
        relay._result = relay._result or RelayResult(0, 0, "closed")  # silence the endpoints
        client.live = upstream.live = False
        if upstream.transport is not None:
            upstream.transport.abort()
        client_transport.set_protocol(old_protocol)
        if lost_meanwhile:
            old_protocol.connection_lost(None)
        elif was_reading:
            client_transport.resume_reading()
        if isinstance(exc, TimeoutError):
            raise RelayConnectError(
                upstream_host, upstream_port, f"no answer within {connect_timeout:g} s"
            ) from exc
        if isinstance(exc, OSError):
            error = RelayConnectError(upstream_host, upstream_port, _describe(exc))
            error.errno = exc.errno
            raise error from exc
        raise
    if relay._result is not None and not relay._done.done():
        # The client went away while we were connecting: _finish ran with no upstream yet.
        transport.abort()
        relay._b.lost = True
        relay._maybe_done()
    return relay


def _describe(exc: OSError) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (is the backend service running?)"
    if isinstance(exc, _ssl.SSLError):
        return f"TLS handshake failed: {exc.reason or exc}"
    return exc.strerror or str(exc) or type(exc).__name__


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
