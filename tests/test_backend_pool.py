"""The backend keep-alive pool against backends that close idle connections, and responses
whose framing is "read until the backend closes".

The backends here are raw asyncio servers (a few lines each), so each one does exactly the
thing under test. What is asserted is what a user notices: a form POST never gets a 502
because the pooled connection it was sent on was being closed by the backend, and a
response framed by the connection's end reaches the client whole."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from pathlib import Path

from benchmarks.procs import free_port, nginx_main_conf, start_nginx
from edge.directory.service import DirectoryService
from httpproxy.upstream import (
    NO_KEEP_ALIVE_HINT,
    UNHINTED_IDLE,
    BackendPool,
    KeepAlive,
    is_close_delimited,
    keep_alive_hint,
)
from tests.test_http_support import Edge, http_config, pytest, running, statuses


@pytest.fixture
def database_url(sqlite_url: str) -> str:
    """Nothing here depends on the store: SQLite only."""
    return sqlite_url


_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*([0-9]+)", re.IGNORECASE)


class IdleClosingBackend:
    """A keep-alive backend that answers 200 with ``Keep-Alive: <hint>`` (none when empty)
    and drops, unanswered, a request that arrives on a connection idle for ``idle_close``
    seconds or more, or after ``max_requests`` on it.

    That is what the proxy meets when the backend's idle close (Node's and Apache's 5 s)
    crosses its next request on the wire: the backend has closed, its FIN is not there yet
    when the request is written. Closing lazily makes that race happen every time.
    ``half_close``: send FIN (shutdown for writing) right after each response and read on
    without ever answering again, like a backend that is half-way through closing."""

    def __init__(self, hint: bytes, idle_close: float, *, max_requests: int = 1000,
                 half_close: bool = False) -> None:
        self.hint = hint
        self.idle_close = idle_close
        self.max_requests = max_requests
        self.half_close = half_close
        self.accepted = 0
        self.dropped = 0
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self.writers.append(writer)
        answered = 0
        last = 0.0
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if answered and (time.monotonic() - last >= self.idle_close
                                 or answered >= self.max_requests or self.half_close):
                    self.dropped += 1
                    writer.transport.abort()
                    return
                length = _LENGTH.search(head)
                if length is not None:
                    await reader.readexactly(int(length.group(1)))
                hint = b"Keep-Alive: " + self.hint + b"\r\n" if self.hint else b""
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n" + hint + b"\r\nok")
                await writer.drain()
                answered += 1
                last = time.monotonic()
                if self.half_close:
                    await asyncio.sleep(0.05)
                    writer.write_eof()

    def stop(self) -> None:
        for writer in self.writers:
            writer.transport.abort()
        if self.server is not None:
            self.server.close()


async def _site(service: DirectoryService, edge: Edge, port: int) -> None:
    await service.add_host("host-k", "127.0.0.1", http_port=port)
    await service.add_tenant("tk", "host-k")
    await service.add_site("pool.test", "tk")
    await edge.sync()


async def _post(edge: Edge) -> int:
    r = await edge.curl("-X", "POST", "--data-binary", "field=value", host="pool.test",
                        path="/form", check=False)
    return r.status


@pytest.mark.parametrize(("hint", "idle_close", "max_requests", "pause"), [
    # nginx's `keepalive_timeout 1s 1s`, Node's and Apache's header, at a tiny timeout
    (b"timeout=1", 1.0, 1000, 1.05),
    (b"timeout=1, max=50", 1.0, 1000, 1.05),
    # Apache's max counts the requests left: 0 means this was the last one
    (b"timeout=30, max=0", 30.0, 1, 0.0),
    # no hint: gunicorn's keep-alive (2 s) is the shortest common default
    (b"", 2.0, 1000, 2.05),
], ids=["timeout", "timeout-max", "max-0", "no-hint"])
async def test_post_after_backend_keepalive_timeout_is_never_a_502(
        service: DirectoryService, hint: bytes, idle_close: float, max_requests: int,
        pause: float) -> None:
    """POSTs (not retryable) spaced just past the backend's keep-alive timeout each get the
    backend's 200: a pooled connection past the backend's announced timeout (minus a margin)
    or request count, or past the default when it announces none, is not reused."""
    backend = IdleClosingBackend(hint, idle_close, max_requests=max_requests)
    port = await backend.start()
    try:
        async with running(service.store, service) as (edge, _):
            await _site(service, edge, port)
            got = []
            for _ in range(3):
                got.append(await _post(edge))
                await asyncio.sleep(pause)
            assert got == [200, 200, 200]
            assert backend.dropped == 0
    finally:
        backend.stop()


async def test_hinted_connection_is_reused_within_its_timeout(service: DirectoryService) -> None:
    """The hint shortens reuse, it does not end it: requests in quick succession share one
    backend connection."""
    backend = IdleClosingBackend(b"timeout=5, max=100", 5.0)
    port = await backend.start()
    try:
        async with running(service.store, service) as (edge, _):
            await _site(service, edge, port)
            assert [await _post(edge) for _ in range(4)] == [200] * 4
            assert backend.accepted == 1
    finally:
        backend.stop()



async def test_nginx_keep_alive_header_is_honoured(service: DirectoryService,
                                                   tmp_path: Path) -> None:
    """A real nginx backend with ``keepalive_timeout 30s 1s``: it keeps idle connections
    30 s but announces ``Keep-Alive: timeout=1``. The edge believes the header: POSTs in
    quick succession share a connection, a POST after a pause past half a second does not.
    (With the real close at the announced time, the pool would otherwise write into the
    close now and then; the raw backends above make that race happen every time.)"""
    port = free_port()
    conf = nginx_main_conf(tmp_path, f"""
  keepalive_timeout 30s 1s;
  server {{
    listen 127.0.0.1:{port};
    location / {{ return 200 "ok"; }}
  }}""")
    nginx = await start_nginx(tmp_path, "nginx-backend", conf, [("127.0.0.1", port)])
    async with nginx, running(service.store, service) as (edge, _):
        await _site(service, edge, port)
        assert [await _post(edge) for _ in range(3)] == [200] * 3
        assert edge.engine.pool.connects == 1
        await asyncio.sleep(0.7)
        assert await _post(edge) == 200
        assert edge.engine.pool.connects == 2


async def test_half_closed_pooled_connection_is_not_reused(service: DirectoryService) -> None:
    """A backend that sent FIN after its response (and would read a request but never answer
    it) has its connection dropped from the pool: the POST goes on a new one."""
    backend = IdleClosingBackend(b"", 30.0, half_close=True)
    port = await backend.start()
    try:
        async with running(service.store, service,
                           http=http_config(backend_timeout=3.0)) as (edge, _):
            await _site(service, edge, port)
            assert await _post(edge) == 200
            await asyncio.sleep(0.3)  # the FIN has arrived
            assert await _post(edge) == 200
            assert backend.accepted == 2 and backend.dropped == 0
    finally:
        backend.stop()


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


@pytest.mark.parametrize(("head", "hint"), [
    (b"HTTP/1.1 200 OK\r\nKeep-Alive: timeout=5, max=100\r\n", KeepAlive(5.0, 100)),  # Apache
    (b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\n",
     KeepAlive(5.0, -1)),  # Node
    (b"HTTP/1.1 200 OK\r\nkeep-alive:max=0 , TIMEOUT = \"20\"\r\n", KeepAlive(20.0, 0)),
    (b"HTTP/1.1 200 OK\r\nKeep-Alive: timeout=9\r\nKeep-Alive: timeout=3\r\n",
     KeepAlive(3.0, -1)),
    (b"HTTP/1.1 200 OK\r\nKeep-Alive: 300\r\n", NO_KEEP_ALIVE_HINT),  # RFC 2068's bare number
    (b"HTTP/1.1 200 OK\r\nX-Keep-Alive: timeout=1\r\n", NO_KEEP_ALIVE_HINT),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n", NO_KEEP_ALIVE_HINT),
])
def test_keep_alive_hint(head: bytes, hint: KeepAlive) -> None:
    assert keep_alive_hint(head) == hint


async def test_idle_limit_keeps_a_margin_below_the_backend_timeout() -> None:
    pool = BackendPool(size=4, idle_timeout=30.0, connect_timeout=1.0, response_timeout=1.0)
    try:
        assert pool.idle_limit(KeepAlive(5.0, -1)) == 4.0  # Apache, Node
        assert pool.idle_limit(KeepAlive(1.0, -1)) == 0.5  # never past half the timeout
        assert pool.idle_limit(KeepAlive(0.0, -1)) == 0.0  # not reused at all
        assert pool.idle_limit(KeepAlive(75.0, -1)) == 30.0  # pool_idle_timeout still bounds
        assert pool.idle_limit(NO_KEEP_ALIVE_HINT) == UNHINTED_IDLE
    finally:
        pool.close()
