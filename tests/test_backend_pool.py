"""The backend keep-alive pool against backends that close idle connections, and responses
whose framing is "read until the backend closes".

The backends here are raw asyncio servers (a few lines each), so each one does exactly the
thing under test. What is asserted is what a user notices: a form POST never gets a 502
because the pooled connection it was sent on was being closed by the backend, and a
response framed by the connection's end reaches the client whole."""

from __future__ import annotations

import asyncio
import contextlib

from edge.directory.service import DirectoryService
from httpproxy.upstream import is_close_delimited
from tests.test_http_support import Edge, pytest, running, statuses


@pytest.fixture
def database_url(sqlite_url: str) -> str:
    """Nothing here depends on the store: SQLite only."""
    return sqlite_url


async def _site(service: DirectoryService, edge: Edge, port: int) -> None:
    await service.add_host("host-k", "127.0.0.1", http_port=port)
    await service.add_tenant("tk", "host-k")
    await service.add_site("pool.test", "tk")
    await edge.sync()


class CloseDelimitedBackend:
    """Answers one request with ``Transfer-Encoding: <coding>`` (not chunked last), a body,
    and a close: RFC 9112 §6.3 says such a response ends when the connection closes."""

    BODY = b"x" * 5000 + b"-the-end"

    def __init__(self, coding: bytes) -> None:
        self.coding = coding
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: " + self.coding + b"\r\n\r\n")
            await writer.drain()
            await asyncio.sleep(0.05)  # the head and the body in separate reads
            writer.write(self.BODY)
            await writer.drain()
        writer.close()

    def stop(self) -> None:
        if self.server is not None:
            self.server.close()


@pytest.mark.parametrize("coding", [b"gzip", b"chunked, gzip", b"identity"])
async def test_transfer_encoding_not_ending_in_chunked_is_read_until_close(
        service: DirectoryService, coding: bytes) -> None:
    """A response whose Transfer-Encoding does not end in chunked is read until the backend
    closes and reaches the client whole, ended by the edge's close (not a reset), and the
    edge goes on serving."""
    backend = CloseDelimitedBackend(coding)
    port = await backend.start()
    try:
        async with running(service.store, service) as (edge, _):
            await _site(service, edge, port)
            raw = await edge.raw(b"GET / HTTP/1.1\r\nHost: pool.test\r\n\r\n")
            assert statuses(raw) == [200]
            head, _, body = raw.partition(b"\r\n\r\n")
            assert b"transfer-encoding: " + coding in head.lower()
            assert body == CloseDelimitedBackend.BODY
            assert (await edge.curl(host="www.a.test")).status == 200
    finally:
        backend.stop()


@pytest.mark.parametrize(("head", "expected"), [
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n", True),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n", True),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: gzip\r\n", True),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, Chunked \r\n", False),
    (b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\nTransfer-Encoding: chunked\r\n", False),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n", False),
    (b"HTTP/1.1 200 OK\r\nServer: x\r\n", True),
    (b"HTTP/1.1 204 No Content\r\nTransfer-Encoding: gzip\r\n", False),
])
def test_close_delimited_framing(head: bytes, expected: bool) -> None:
    """RFC 9112 §6.3: only a Transfer-Encoding whose last coding is chunked frames a body."""
    assert is_close_delimited(head, int(head[9:12])) is expected
