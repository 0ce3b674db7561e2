"""Hostile HTTP input through the real proxy (in-process, real aiohttp backends, raw sockets).

* Request heads from a grammar of valid and mutated heads: whatever the proxy forwards, a
  strict reference parser (h11) accepts too, with the same method, target and Host; whatever
  it refuses gets one error status, never a backend request.
* Backend response heads the proxy's raw forwarding does not parse (one plain Content-Length)
  must still be well-formed HTTP: a head with a bare LF reads differently to a lenient client
  (a hidden ``Transfer-Encoding``) and is refused with 502 like any invalid head."""

from __future__ import annotations

import asyncio
import contextlib
import re
import tempfile
from collections.abc import AsyncIterator

import h11
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge.directory.service import DirectoryService
from edge.directory.stores import store_for_url
from tests.test_http_support import raw_exchange, running, start_edge, statuses


@pytest.fixture
def database_url(sqlite_url: str) -> str:
    """Parsing does not depend on the store: SQLite only."""
    return sqlite_url


@contextlib.asynccontextmanager
async def fresh_service() -> AsyncIterator[DirectoryService]:
    """A new SQLite directory per hypothesis example (fixtures live for the whole test)."""
    with tempfile.TemporaryDirectory() as tmp:
        store = store_for_url(f"sqlite:///{tmp}/edge.sqlite3")
        await store.open()
        await store.migrate()
        try:
            yield DirectoryService(store)
        finally:
            await store.close()


def h11_request(head: bytes) -> h11.Request | None:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(head)
    try:
        event = conn.next_event()
    except h11.RemoteProtocolError:
        return None
    return event if isinstance(event, h11.Request) else None


TOKENS = st.sampled_from([b"GET", b"POST", b"HEAD", b"OPTIONS", b"get", b"G\x00T", b"GET "])
TARGETS = st.sampled_from([b"/", b"/a?b=c", b"/%2e%2e/x", b"*", b"http://www.a.test/x",
                           b"//www.b.test/", b"/a b", b"/\x7f", b"/\xff"])
HOSTS = st.sampled_from([b"www.a.test", b"WWW.A.TEST.", b"www.a.test:80", b" www.a.test",
                         b"www.a.test ", b"www.a.test\t", b"", b"www.a.test,www.b.test",
                         b"www.b.test", b"x.a.test", b"[::1]", b"www.a.test@x"])
HEADER_NAMES = st.sampled_from([b"X-A", b"Content-Length", b"Transfer-Encoding", b"Connection",
                                b"Upgrade", b"Expect", b"X A", b"X-A ", b"\x00", b"Host"])
HEADER_VALUES = st.sampled_from([b"1", b"0", b"chunked", b"close", b"keep-alive, X-A",
                                 b"h2c", b"100-continue", b"a\x00b", b"\x80", b" v ", b""])
EOLS = st.sampled_from([b"\r\n", b"\r\n", b"\r\n", b"\n", b"\r"])
VERSIONS = st.sampled_from([b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.10"])


@st.composite
def request_heads(draw: st.DrawFn) -> bytes:
    eol = draw(EOLS)
    line = draw(TOKENS) + b" " + draw(TARGETS) + b" " + draw(VERSIONS)
    headers = [(b"Host", draw(HOSTS))]
    headers += draw(st.lists(st.tuples(HEADER_NAMES, HEADER_VALUES), max_size=3))
    if draw(st.booleans()):
        headers = headers[1:]
    lines = [line] + [name + b": " + value for name, value in headers]
    return eol.join(lines) + b"\r\nConnection: close\r\n\r\n"


@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(heads=st.lists(request_heads(), min_size=5, max_size=5))
async def test_forwarded_heads_are_ones_a_strict_parser_accepts(heads: list[bytes]) -> None:
    async with fresh_service() as service, running(service.store, service, backends=2) as (
            edge, (a, b)):
        for head in heads:
            before = (len(a.requests), len(b.requests))
            # An empty chunked body follows every head (a declared body must end for the
            # request to complete; for a head without one it is a pipelined bad request).
            try:
                raw = await raw_exchange(edge.port, head + b"0\r\n\r\n", timeout=10)
            except TimeoutError:
                # Still waiting for a body its head announced (Content-Length: 1 got "0" and
                # waits on), which is right; anything else must be answered.
                assert b"content-length" in head.lower(), head
                continue
            assert statuses(raw), (head, raw[:300])
            forwarded = a.requests[before[0]:] + b.requests[before[1]:]
            if not forwarded:
                continue
            # RFC 9112 §3: a recipient MAY split the request line on runs of whitespace.
            line, eol, rest = head.partition(b"\r\n")
            reference = h11_request(re.sub(rb" +", b" ", line) + eol + rest)
            assert reference is not None, ("forwarded a head h11 refuses", head, forwarded)
            seen = forwarded[0]
            assert seen["method"] == reference.method.decode()
            assert seen["headers"].get("Host", "").lower().rstrip(".").split(":")[0] == \
                dict(reference.headers)[b"host"].decode().strip().lower().rstrip(".").split(":")[0]


async def test_backend_head_with_bare_lf_is_refused(service: DirectoryService) -> None:
    """A backend's head whose lines a lenient client splits differently (a bare LF hiding
    ``Transfer-Encoding: chunked`` next to the one Content-Length the proxy counts) must not
    reach the client: a 502, as for any head llhttp refuses."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nX-A: a\nTransfer-Encoding: chunked\r\n"
                     b"Content-Length: 5\r\n\r\nhello")
        await writer.drain()
        await reader.read()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    await service.add_host("raw", "127.0.0.1", http_port=port)
    await service.add_tenant("traw", "raw")
    await service.add_site("www.raw.test", "traw")
    edge = await start_edge(service.store, service)
    try:
        raw = await raw_exchange(edge.port, b"GET / HTTP/1.1\r\nHost: www.raw.test\r\n"
                                 b"Connection: close\r\n\r\n", timeout=20)
        assert statuses(raw) == [502], raw
        assert b"Transfer-Encoding" not in raw
    finally:
        await edge.proxy.drain()
        await edge.proxy.close()
        server.close()


@pytest.mark.parametrize(("method", "head"), [
    ("GET", b"HTTP/1.1 200 OK\r\nX-A: a\rTransfer-Encoding: chunked\r\nContent-Length: 5\r\n"),
    ("GET", b"HTTP/1.1 200 OK\r\nX-A: a\x00\r\nContent-Length: 5\r\n"),
    ("GET", b"HTTP/1.1 200 OK\r\nX-A: a\r\n Transfer-Encoding: chunked\r\nContent-Length: 5\r\n"),
    ("GET", b"HTTP/1.1 200 OK\r\nX\xff: a\r\nContent-Length: 5\r\n"),
    ("GET", b"HTTP/1.1 200 O\x00K\r\nContent-Length: 5\r\n"),  # llhttp takes this one
    ("HEAD", b"HTTP/1.1 200 OK\r\nX-A: a\nTransfer-Encoding: chunked\r\n"),  # llhttp never sees it
])
async def test_backend_head_that_is_not_strict_is_refused(service: DirectoryService, method: str,
                                                          head: bytes) -> None:
    """Any head a strict parser refuses (bare CR, NUL, obs-fold, a byte outside a token in a
    name, a control in the reason phrase), on either framing path and in answer to HEAD, is a
    502 and the backend connection is dropped: the next request gets a clean answer."""
    served = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal served
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:
                await reader.readuntil(b"\r\n\r\n")
                served += 1
                body = b"" if method == "HEAD" and served == 1 else b"hello"
                reply = head if served == 1 else b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n"
                writer.write(reply + b"\r\n" + body)
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    await service.add_host("raw", "127.0.0.1", http_port=port)
    await service.add_tenant("traw", "raw")
    await service.add_site("www.raw.test", "traw")
    edge = await start_edge(service.store, service)
    try:
        request = f"{method} / HTTP/1.1\r\nHost: www.raw.test\r\n\r\n".encode()
        raw = await raw_exchange(edge.port, request + b"GET /next HTTP/1.1\r\nHost: www.raw.test"
                                 b"\r\nConnection: close\r\n\r\n", timeout=20)
        assert statuses(raw) == [502, 200], raw
        assert b"X-A" not in raw and b"\x00" not in raw and b"\xff" not in raw
        assert raw.endswith(b"hello")
    finally:
        await edge.proxy.drain()
        await edge.proxy.close()
        server.close()
