"""The proxy's control connection to one backend FTP server.

A thin asyncio Protocol around the sans-IO :class:`~ftpproxy.protocol.ReplyReader`: replies
are queued in order and taken with :meth:`BackendControl.reply`. A reply that arrives while
nobody waits (the backend's own idle-timeout ``421``) and the connection's end are reported
to ``on_event`` so the session can pass them on at once instead of at the next command.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Callable
from typing import cast

from ftpproxy.protocol import ProtocolError, Reply, ReplyReader, format_command
from ftpproxy.waiting import DeadlineWaiter

__all__ = ["BackendControl", "BackendError", "BackendGone"]


class BackendError(Exception):
    """The backend could not be used (refused, timed out, TLS failed, bad greeting...)."""


class BackendGone(BackendError):
    """The backend's control connection closed or broke the protocol."""


class BackendControl(asyncio.Protocol):
    """One backend control connection; create it with :meth:`connect`."""

    def __init__(self, on_event: Callable[[], None]) -> None:
        self.transport: asyncio.Transport | None = None
        self._reader = ReplyReader()
        self._replies: deque[Reply] = deque()
        self._waiter = DeadlineWaiter()
        self._on_event = on_event
        self.gone: str | None = None
        """Why the connection ended (``None`` while open)."""

    @classmethod
    async def connect(cls, host: str, port: int, *, connect_timeout: float, on_event: Callable[[], None],
                      first_bytes: bytes = b"") -> BackendControl:
        """Connect and write ``first_bytes`` (a PROXY header) before anything else.

        Raises :class:`BackendError` saying what failed.
        """
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(connect_timeout):  # no extra task, unlike wait_for
                _, protocol = await loop.create_connection(lambda: cls(on_event), host, port)
        except TimeoutError:
            raise BackendError(f"backend {host}:{port}: no answer within {connect_timeout:g} s") from None
        except OSError as exc:
            raise BackendError(f"backend {host}:{port}: {exc.strerror or exc}") from None
        if first_bytes:
            protocol.write_raw(first_bytes)
        return protocol

    # -- asyncio callbacks --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            replies = self._reader.feed(data)
        except ProtocolError as exc:
            self._end(f"protocol error: {exc}")
            if self.transport is not None:
                self.transport.abort()
            return
        if replies:
            self._replies.extend(replies)
            self._wake()

    def eof_received(self) -> bool:
        self._end("closed by backend")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._end(f"lost: {exc}" if exc else "closed")

    # -- API --

    @property
    def peer_ip(self) -> str:
        peer = self.transport.get_extra_info("peername") if self.transport else None
        return str(peer[0]) if peer else ""

    @property
    def ssl_object(self) -> ssl.SSLObject | None:
        return self.transport.get_extra_info("ssl_object") if self.transport else None

    @property
    def idle(self) -> bool:
        """True when replies are queued that nobody waits for (see ``on_event``)."""
        return not self._waiter.waiting

    def pending(self) -> list[Reply]:
        """Take the queued replies nobody asked for."""
        replies = list(self._replies)
        self._replies.clear()
        return replies

    def write_raw(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def send(self, verb: str, argument: str = "") -> None:
        """Write one command (built with :func:`format_command`, so CR/LF cannot get in)."""
        if self.gone is not None:
            raise BackendGone(self.gone)
        self.write_raw(format_command(verb, argument))

    async def reply(self, wait: float | None = None) -> Reply:
        """The next reply within ``wait`` seconds. Raises :class:`BackendGone` (connection
        ended) or TimeoutError."""
        while not self._replies:
            if self.gone is not None:
                raise BackendGone(self.gone)
            await self._waiter.wait(wait)
        return self._replies.popleft()

    async def final_reply(self, wait: float | None = None) -> Reply:
        """The next reply that is not a ``1xx`` preliminary one."""
        while True:
            reply = await self.reply(wait)
            if reply.code >= 200:
                return reply

    async def command(self, verb: str, argument: str = "", wait: float | None = None) -> Reply:
        """Send a command and return its final reply (preliminary ``1xx`` replies skipped)."""
        self.send(verb, argument)
        return await self.final_reply(wait)

    async def start_tls(self, context: ssl.SSLContext, server_hostname: str,
                        handshake_timeout: float) -> None:
        """Upgrade after ``234``. Raises :class:`BackendError` on a failed handshake."""
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        try:
            transport = await loop.start_tls(self.transport, self, context,
                                             server_hostname=server_hostname,
                                             ssl_handshake_timeout=handshake_timeout)
        except (OSError, ssl.SSLError, TimeoutError) as exc:
            raise BackendError(f"TLS with backend failed: {exc}") from None
        if transport is None:
            raise BackendGone("closed during TLS handshake")
        self.transport = transport

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    # -- internals --

    def _end(self, why: str) -> None:
        self._waiter.close()
        if self.gone is None:
            self.gone = why
            self._wake()

    def _wake(self) -> None:
        if not self._waiter.wake():
            self._on_event()
