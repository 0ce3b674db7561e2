"""Request smuggling and slowloris attempts against the HTTP edge, with raw sockets.

Each malformed request must get the right status, close the connection, and never reach a
backend (nothing after the bad bytes may be read as a request either)."""

from __future__ import annotations

import asyncio

import pytest

from edge.directory.service import DirectoryService
from tests.test_http_support import TIMEOUT, http_config, running, statuses


@pytest.fixture
def database_url(sqlite_url: str) -> str:
    """Parsing does not depend on the store: these run on SQLite only (the other HTTP test
    files cover MariaDB)."""
    return sqlite_url


SMUGGLING = [
    # CL + TE
    (b"POST / HTTP/1.1\r\nHost: www.a.test\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: www.a.test\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: www.a.test\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n"
     b"0\r\n\r\n", 400),
    # duplicate / invalid Content-Length
    (b"POST / HTTP/1.1\r\nHost: www.a.test\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde", 400),
    (b"POST / HTTP/1.1\r\nHost: www.a.test\r\nContent-Length: 4\r\nContent-Length: 4\r\n\r\nabcd", 400),
    (b"POST / HTTP/1.1\r\nHost: www.a.test\r\nContent-Length: +4\r\n\r\nabcd", 400),
    (b"POST / HTTP/1.1\r\nHost: www.a.test\r\nContent-Length: 4, 4\r\n\r\nabcd", 400),
    (b"POST / HTTP/1.1\r\nHost: www.a.test\r\nContent-Length: 0x4\r\n\r\nabcd", 400),
    # obfuscated / unsupported Transfer-Encoding
    (b"POST / HTTP/1.1\r\nHost: www.a.test\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: www.a.test\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 501),
    (b"POST / HTTP/1.1\r\nHost: www.a.test\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: www.a.test\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n", 501),
    # bare LF / bare CR / obs-fold
    (b"GET / HTTP/1.1\nHost: www.a.test\n\n", 400),
    (b"GET / HTTP/1.1\r\nHost: www.a.test\rX-A: b\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: www.a.test\r\nX-A: a\r\n b\r\n\r\n", 400),
    # two Host headers
    (b"GET / HTTP/1.1\r\nHost: www.a.test\r\nHost: www.b.test\r\n\r\n", 400),
    # NUL in header value, space before colon
    (b"GET / HTTP/1.1\r\nHost: www.a.test\r\nX-A: a\x00b\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost : www.a.test\r\n\r\n", 400),
    # bad chunk size
    (b"POST / HTTP/1.1\r\nHost: www.a.test\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nab\r\n0\r\n\r\n", 400),
    # unsupported Expect
    (b"POST / HTTP/1.1\r\nHost: www.a.test\r\nExpect: something\r\nContent-Length: 1\r\n\r\na", 417),
    # chunk-size overflow, chunk extension junk, negative / overflowing Content-Length
    (b"POST / HTTP/1.1\r\nHost: www.a.test\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"10000000000000001\r\na\r\n0\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: www.a.test\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"1;a\x00b\r\na\r\n0\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: www.a.test\r\nContent-Length: -1\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: www.a.test\r\nContent-Length: 99999999999999999999999\r\n\r\n", 400),
    # Transfer-Encoding other than chunked, or chunked twice
    (b"POST / HTTP/1.1\r\nHost: www.a.test\r\nTransfer-Encoding: identity\r\n\r\n", 501),
    (b"POST / HTTP/1.1\r\nHost: www.a.test\r\nTransfer-Encoding: chunked\r\n"
     b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    # Transfer-Encoding in HTTP/1.0 (no chunked coding there: a 1.0 backend would read the
    # chunks as a body of unknown length, or the next request; RFC 9112 §6.1)
    (b"POST / HTTP/1.0\r\nHost: www.a.test\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"5\r\nhello\r\n0\r\n\r\n", 400),
    (b"POST / HTTP/1.0\r\nHost: www.a.test\r\nConnection: keep-alive\r\n"
     b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.0\r\n\r\n", 400),
    (b"POST / HTTP/1.0\r\nHost: www.a.test\r\nTransfer-Encoding: identity\r\n\r\n", 400),
    # request line: space in the target, NUL, lowercase or unknown method (a double space
    # between method and target is read as one by llhttp: the line the backend gets is ours)
    (b"GET /a b HTTP/1.1\r\nHost: www.a.test\r\n\r\n", 400),
    (b"GET /\x00 HTTP/1.1\r\nHost: www.a.test\r\n\r\n", 400),
    (b"get / HTTP/1.1\r\nHost: www.a.test\r\n\r\n", 400),
    (b"TRACK / HTTP/1.1\r\nHost: www.a.test\r\n\r\n", 400),
    (b"GET / HTTP/1.1 extra\r\nHost: www.a.test\r\n\r\n", 400),
    # HTTP versions: only 1.0 and 1.1 (llhttp takes 0.9 and 2.0 too)
    (b"GET / HTTP/2.0\r\nHost: www.a.test\r\n\r\n", 505),
    (b"GET / HTTP/0.9\r\nHost: www.a.test\r\n\r\n", 505),
    (b"GET / HTTP/1.2\r\nHost: www.a.test\r\n\r\n", 400),
    (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400),
    # methods refused by default
    (b"CONNECT www.a.test:443 HTTP/1.1\r\nHost: www.a.test:443\r\n\r\n", 405),
    (b"TRACE / HTTP/1.1\r\nHost: www.a.test\r\nConnection: close\r\n\r\n", 405),
    # Host syntax (tests/test_http_head.py has the whole table and what the backend gets)
    (b"GET / HTTP/1.1\r\nHost: www.a.test:@evil.example\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: www.a.test:<script>\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: www.a.test\x01\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: www.a.test\r\nhost: www.a.test\r\n\r\n", 400),
    (b"GET http://x@www.a.test/ HTTP/1.1\r\nHost: www.a.test\r\n\r\n", 400),
    # header names: empty, with a space or separator, bare CR inside a value
    (b"GET / HTTP/1.1\r\nHost: www.a.test\r\n: x\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: www.a.test\r\nX A: b\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: www.a.test\r\nX(A): b\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: www.a.test\r\nX-A: a\rb\r\n\r\n", 400),
    # obs-fold continuing a Content-Length or Transfer-Encoding
    (b"POST / HTTP/1.1\r\nHost: www.a.test\r\nContent-Length: 1\r\n 0\r\n\r\na", 400),
    (b"POST / HTTP/1.1\r\nHost: www.a.test\r\nTransfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n", 400),
]


@pytest.mark.parametrize(("request_bytes", "status"), SMUGGLING,
                         ids=[f"case{i}" for i in range(len(SMUGGLING))])
async def test_smuggling_attempt_refused(service: DirectoryService, request_bytes: bytes,
                                         status: int) -> None:
    async with running(service.store, service, backends=2) as (edge, (a, b)):
        raw = await edge.raw(request_bytes)
        got = statuses(raw)
        assert got == [status], raw[:200]
        assert b"Connection: close" in raw
        assert a.requests == [] and b.requests == []


async def test_oversized_head_431(service: DirectoryService) -> None:
    async with running(service.store, service, http=http_config(max_header_size=4096)) as (edge, (a,)):
        raw = await edge.raw(b"GET / HTTP/1.1\r\nHost: www.a.test\r\nX-Big: " + b"a" * 8000 + b"\r\n\r\n")
        assert statuses(raw) == [431]
        many = b"".join(b"X-H%d: v\r\n" % i for i in range(1000))
        raw = await edge.raw(b"GET / HTTP/1.1\r\nHost: www.a.test\r\n" + many + b"\r\n")
        assert statuses(raw) == [431]
        # a head that never ends is cut at the limit, not buffered forever
        reader, writer = await asyncio.open_connection("127.0.0.1", edge.port)
        writer.write(b"GET / HTTP/1.1\r\nHost: www.a.test\r\nX-Endless: ")
        for _ in range(20):
            writer.write(b"b" * 1000)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), TIMEOUT)
        assert statuses(data) == [431]
        writer.close()
        assert a.requests == []
        r = await edge.curl(host="www.a.test")  # normal requests still work
        assert r.status == 200


async def test_slowloris_head_timeout_408(service: DirectoryService) -> None:
    async with running(service.store, service, http=http_config(header_timeout=1.0)) as (edge, (a,)):
        reader, writer = await asyncio.open_connection("127.0.0.1", edge.port)
        loop = asyncio.get_running_loop()
        started = loop.time()
        writer.write(b"GET / HTTP/1.1\r\nHost: www.a.test\r\n")
        closed = False
        data = b""
        # trickle a header byte every 0.2 s: each byte is progress, but the head never completes
        for _ in range(50):
            try:
                writer.write(b"X")
                await writer.drain()
            except ConnectionError:
                break
            try:
                chunk = await asyncio.wait_for(reader.read(65536), 0.2)
            except TimeoutError:
                continue
            data += chunk
            if not chunk:
                closed = True
                break
        assert statuses(data) == [408]
        assert closed or reader.at_eof() or data
        assert loop.time() - started < 8
        writer.close()
        assert a.requests == []


async def test_idle_keepalive_connection_closed(service: DirectoryService) -> None:
    async with running(service.store, service, http=http_config(keepalive_timeout=0.5)) as (edge, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", edge.port)
        writer.write(b"GET / HTTP/1.1\r\nHost: www.a.test\r\n\r\n")
        await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
        rest = await asyncio.wait_for(reader.read(), TIMEOUT)  # returns at EOF
        assert b"HTTP/1.1" not in rest  # closed quietly, no 408 for an idle connection
        writer.close()


async def test_silent_connection_and_late_unfinished_head_are_closed(service: DirectoryService) -> None:
    """A connection that never sends a byte is closed, and so is one whose first bytes come
    late and never finish the head (no per-connection timer may be skipped for them)."""
    async with running(service.store, service,
                       http=http_config(header_timeout=0.5, keepalive_timeout=0.5)) as (edge, (a,)):
        reader, writer = await asyncio.open_connection("127.0.0.1", edge.port)
        assert await asyncio.wait_for(reader.read(), 10) == b""  # EOF, well before the 10 s
        writer.close()
        reader, writer = await asyncio.open_connection("127.0.0.1", edge.port)
        await asyncio.sleep(0.3)
        writer.write(b"GET / HTTP/1.1\r\nHost: www.a.test\r\n")
        data = await asyncio.wait_for(reader.read(), 10)
        assert statuses(data) in ([408], [])
        writer.close()
        assert a.requests == []


async def test_bad_request_after_good_one_in_pipeline(service: DirectoryService) -> None:
    async with running(service.store, service) as (edge, (a,)):
        raw = await edge.raw(b"GET /ok HTTP/1.1\r\nHost: www.a.test\r\n\r\n"
                             b"GET / HTTP/1.1\r\nHost: www.a.test\r\n"
                             b"Content-Length: 1\r\nContent-Length: 2\r\n\r\n"
                             b"GET /never HTTP/1.1\r\nHost: www.a.test\r\n\r\n")
        assert statuses(raw)[0] == 200
        assert [r["path"] for r in a.requests] == ["/ok"]
