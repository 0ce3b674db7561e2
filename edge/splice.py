"""Zero-copy one-way byte pump between two plain TCP sockets (splice(2) through a pipe).

Part of :mod:`edge.relay` (re-exported there): use it where no TLS is involved on either side
and data flows one way (an FTP transfer). The bytes never enter Python, which is what lets a
proxy keep up with a backend sending with sendfile(2); :class:`edge.relay.Relay` is the
general, two-way, TLS-capable pump.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import socket
import struct

__all__ = ["SPLICE_CHUNK", "SplicePump"]

#: Bytes one splice(2) call may move; the pipe between the sockets is grown to this size.
SPLICE_CHUNK = 1 << 20
_F_SETPIPE_SZ = 1031  # fcntl.F_SETPIPE_SZ (Linux), not exported by Python 3.11


class SplicePump:
    """One-way copy between two plain TCP sockets with splice(2) through a pipe.

    Used for the common case of a transfer with no TLS on either side: the bytes never enter
    Python (no read/write copies, no per-chunk objects), which is what lets the proxy keep up
    with a backend that sends with sendfile(2). Back-pressure is natural: the source is only
    read while the pipe is empty. ``wait()`` returns ``(bytes, reason)`` with reason ``eof``
    (the source finished; the sink got EOF after the last byte), ``idle`` (no byte moved for
    ``idle_timeout`` seconds), ``error`` or the reason given to :meth:`close`. Both sockets are
    closed at the end.
    """

    def __init__(self, source: socket.socket, sink: socket.socket, *, idle_timeout: float) -> None:
        self._loop = asyncio.get_running_loop()
        self._src, self._dst = source, sink
        self._src_fd, self._dst_fd = source.fileno(), sink.fileno()
        source.setblocking(False)
        sink.setblocking(False)
        self._r, self._w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        with contextlib.suppress(OSError):
            fcntl.fcntl(self._w, _F_SETPIPE_SZ, SPLICE_CHUNK)
        self._in_pipe = 0
        self._eof = False
        self._writing = False
        self.count = 0
        self.error: str | None = None
        self._seen = -1
        self._done: asyncio.Future[str] = self._loop.create_future()
        self._idle_timeout = idle_timeout
        self._idle_handle = self._loop.call_later(idle_timeout, self._idle_check)
        self._loop.add_reader(self._src_fd, self._readable)

    @classmethod
    def available(cls) -> bool:
        return hasattr(os, "splice")

    async def wait(self) -> tuple[int, str]:
        try:
            reason = await asyncio.shield(self._done)
        except asyncio.CancelledError:
            self.close("cancelled")
            raise
        return self.count, reason

    def close(self, reason: str = "closed") -> None:
        self._finish(reason)

    def _readable(self) -> None:
        try:
            moved = os.splice(self._src_fd, self._w, SPLICE_CHUNK,
                              flags=os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._finish("error", f"source: {exc.strerror or exc}")
            return
        if moved == 0:
            self._eof = True
            self._loop.remove_reader(self._src_fd)
        self._in_pipe += moved
        self._drain()

    def _writable(self) -> None:
        self._drain()

    def _drain(self) -> None:
        while self._in_pipe:
            try:
                moved = os.splice(self._r, self._dst_fd, self._in_pipe,
                                  flags=os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK)
            except (BlockingIOError, InterruptedError):
                # The sink is full: stop reading the source until it drains.
                if not self._writing:
                    self._writing = True
                    self._loop.remove_reader(self._src_fd)
                    self._loop.add_writer(self._dst_fd, self._writable)
                return
            except OSError as exc:
                self._finish("error", f"sink: {exc.strerror or exc}")
                return
            self._in_pipe -= moved
            self.count += moved
        if self._writing:
            self._writing = False
            self._loop.remove_writer(self._dst_fd)
            if not self._eof:
                self._loop.add_reader(self._src_fd, self._readable)
        if self._eof:
            with contextlib.suppress(OSError):
                self._dst.shutdown(socket.SHUT_WR)
            self._finish("eof")

    def _idle_check(self) -> None:
        if self._done.done():
            return
        if self.count == self._seen and not (self._eof and self._in_pipe):
            self._finish("idle")
            return
        self._seen = self.count
        self._idle_handle = self._loop.call_later(self._idle_timeout, self._idle_check)

    def _finish(self, reason: str, error: str | None = None) -> None:
        if self._done.done():
            return
        self.error = error
        self._idle_handle.cancel()
        self._loop.remove_reader(self._src_fd)
        self._loop.remove_writer(self._dst_fd)
        for fd in (self._r, self._w):
            os.close(fd)
        for sock in (self._src, self._dst):
            if reason != "eof":
                # Aborted: reset rather than let the peer take a truncated file as complete.
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
        self._done.set_result(reason)
