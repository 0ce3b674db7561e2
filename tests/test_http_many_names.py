"""A fleet through one worker: requests on one connection for ever other sites, and backend
answers that differ in their length (the body names the site). Playbook style (no sockets,
see tests/test_http_playbook.py): the engine, directory, front end, exchange and backend
connection are the real ones, the transports record.

What the backend and the client see must not depend on the Host the connection asked for
before: the X-Forwarded block is built from per-route and per-client pieces, and a backend
head that only differs from the last in its date and length skips the full examination.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from edge.config import EdgeConfig, HttpConfig
from edge.directory.directory import Directory
from edge.directory.feed import ChangeFeed
from edge.directory.service import DirectoryService
from edge.directory.stores import store_for_url
from edge.registry import ProxyContext
from httpproxy.front_h1 import ClientConnection
from httpproxy.server import HttpEngine
from tests.test_http_playbook import Backends, Wire

SITES = ("www.a.test", "b.test", "www.c.test")
DATE = b"Tue, 08 Dec 2026 01:00:00 GMT"


def _answer(body: bytes, *, status: bytes = b"200 OK", date: bytes = DATE) -> bytes:
    """What the http benchmark's nginx backend answers (``return 200 "ok $host ..."``)."""
    return (b"HTTP/1.1 " + status + b"\r\nServer: nginx/1.22.1\r\nDate: " + date +
            b"\r\nContent-Type: text/plain\r\nContent-Length: %d\r\nConnection: keep-alive\r\n"
            b"Cache-Control: public, max-age=300\r\n\r\n" % len(body) + body)


def _client_head(body: bytes, *, status: bytes = b"200 OK", date: bytes = DATE) -> bytes:
    """The head the client is sent for :func:`_answer` (hop-by-hop Connection dropped)."""
    return (b"HTTP/1.1 " + status + b"\r\nServer: nginx/1.22.1\r\nDate: " + date +
            b"\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n"
            b"Cache-Control: public, max-age=300\r\n\r\n" % len(body))


class Fleet:
    def __init__(self, engine: HttpEngine, backends: Backends) -> None:
        self.engine = engine
        self.backends = backends

    def client(self, ip: str) -> tuple[ClientConnection, Wire]:
        conn = self.engine.connection(scheme="http")
        assert isinstance(conn, ClientConnection)
        wire = Wire((ip, 40000))
        conn.connection_made(wire)  # type: ignore[arg-type]
        return conn, wire

    async def settle(self) -> None:
        for _ in range(20):
            await asyncio.sleep(0)


@pytest.fixture
async def fleet(tmp_path: Path) -> AsyncIterator[Fleet]:
    url = f"sqlite:///{tmp_path}/edge.sqlite3"
    store = store_for_url(url)
    await store.open()
    await store.migrate()
    service = DirectoryService(store)
    await service.add_host("b1", "127.0.0.1", http_port=8)
    await service.add_tenant("t1", "b1")
    for name in SITES:
        await service.add_site(name, "t1")
    config = EdgeConfig(http=HttpConfig(access_log=f"{tmp_path}/access.log"))
    directory = Directory(store, config.cache)
    context = ProxyContext(config=config, directory=directory,
                           feed=ChangeFeed(directory, interval=3600), keybox=None, worker_id=0,
                           logger=logging.getLogger("many-names"), name="http")
    for name in SITES:  # warm: requests are routed without a query
        assert await directory.route_for_site(name) is not None
    engine = HttpEngine(context)
    backends = Backends(engine)
    engine.pool.connect = backends.connect  # type: ignore[method-assign]
    try:
        yield Fleet(engine, backends)
    finally:
        await engine.close()
        await store.close()


@pytest.mark.parametrize(("ip", "node"), [("127.0.0.1", b"127.0.0.1"), ("::1", b'"[::1]"')])
async def test_each_request_tells_the_backend_its_own_host_and_client(
        fleet: Fleet, ip: str, node: bytes) -> None:
    client, wire = fleet.client(ip)
    for name in (*SITES, *SITES[::-1], SITES[1], SITES[1]):
        client.data_received(b"GET / HTTP/1.1\r\nHost: %b\r\n\r\n" % name.encode())
        await fleet.settle()
        backend, bwire = fleet.backends.opened[-1]
        host = name.encode()
        assert bwire.take() == (
            b"GET / HTTP/1.1\r\nHost: %b\r\nX-Forwarded-For: %b\r\nX-Real-IP: %b\r\n"
            b"X-Forwarded-Proto: http\r\nX-Forwarded-Host: %b\r\n"
            b'Forwarded: for=%b;host="%b";proto=http\r\n\r\n'
            % (host, ip.encode(), ip.encode(), host, node, host))
        backend.data_received(_answer(b"ok " + host))
        assert wire.take().endswith(b"\r\n\r\nok " + host)
    assert len(fleet.backends.opened) == 1


async def test_answers_of_other_lengths_each_reach_the_client_with_their_own_head(
        fleet: Fleet) -> None:
    client, wire = fleet.client("127.0.0.1")
    later = b"Tue, 08 Dec 2026 01:00:01 GMT"
    answers = [(b"ok www.a.test", b"200 OK", DATE), (b"ok b.test", b"200 OK", DATE),
               (b"ok " + b"x" * 120, b"200 OK", DATE), (b"ok b.test", b"200 OK", later),
               (b"", b"200 OK", later), (b"gone", b"404 Not Found", later),
               (b"ok www.c.test", b"200 OK", later)]
    for n, (body, status, date) in enumerate(answers):
        client.data_received(b"GET /%d HTTP/1.1\r\nHost: %b\r\n\r\n"
                             % (n, SITES[n % len(SITES)].encode()))
        await fleet.settle()
        backend, bwire = fleet.backends.opened[-1]
        assert bwire.take().startswith(b"GET /%d " % n)
        backend.data_received(_answer(body, status=status, date=date))
        assert wire.take() == _client_head(body, status=status, date=date) + body
    assert len(fleet.backends.opened) == 1 and not wire.closed


@pytest.mark.parametrize("bad", [
    _answer(b"ok", date=b"Tue, 08 Dec 2026 01:00\r\n01 GMT"),  # a header line through the date
    _answer(b"ok").replace(b"Content-Length: 2", b"Content-Length: 2\r\nContent-Length: 9"),
    _answer(b"ok").replace(b"Content-Length: 2", b"Content-Length: +2"),
])
async def test_a_head_like_the_last_but_not_strict_is_refused(fleet: Fleet, bad: bytes) -> None:
    client, wire = fleet.client("127.0.0.1")
    client.data_received(b"GET / HTTP/1.1\r\nHost: www.a.test\r\n\r\n")
    await fleet.settle()
    backend, _ = fleet.backends.opened[-1]
    backend.data_received(_answer(b"ok www.a.test"))
    assert wire.take().endswith(b"ok www.a.test")
    client.data_received(b"GET / HTTP/1.1\r\nHost: b.test\r\n\r\n")
    await fleet.settle()
    backend.data_received(bad)
    await fleet.settle()
    out = wire.take()
    assert out.startswith(b"HTTP/1.1 502 Bad Gateway\r\n") and b"ok" not in out.split(b"\r\n\r\n")[1]
