"""Playbook tests of the HTTP request path, without sockets (after mitmproxy's proxy-layer
playbooks): bytes and events go in — a client's bytes, a backend's answer, a backend closing,
a clock running out — and we check what comes out: what each backend connection was sent
and what the client was written, in order.

The engine, the directory (SQLite), the front end, the exchange and the backend connection
objects are the real ones; only the transports are recorders (``Wire``), and new backend
connections come from ``Backends`` instead of a TCP connect.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from edge.config import EdgeConfig, HttpConfig
from edge.directory.directory import Directory
from edge.directory.feed import ChangeFeed
from edge.directory.service import DirectoryService
from edge.directory.stores import store_for_url
from edge.registry import ProxyContext
from httpproxy.exchange import ClientInfo, Exchange, ResponseHead
from httpproxy.front_h1 import ClientConnection
from httpproxy.server import HttpEngine
from httpproxy.upstream import BackendConnection, BackendKey

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Backend: b1\r\n\r\nok"


class Wire:
    """A transport that records: what was written, whether it was closed or reset."""

    def __init__(self, peer: tuple[str, int]) -> None:
        self.peer = peer
        self.data = bytearray()
        self.closed = False
        self.reset = False
        self.paused = False

    def write(self, data: bytes) -> None:
        assert not self.closed, "write after close"
        self.data += data

    def take(self) -> bytes:
        """What was written since the last take()."""
        out = bytes(self.data)
        self.data.clear()
        return out

    def get_extra_info(self, name: str, default: object = None) -> object:
        return {"peername": self.peer, "sockname": ("127.0.0.1", 80)}.get(name, default)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = self.reset = True

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def get_write_buffer_size(self) -> int:
        return 0


@dataclass
class Backends:
    """Backend connections the pool opens (``pool.connect`` replaced: no TCP)."""

    engine: HttpEngine
    opened: list[tuple[BackendConnection, Wire]] = field(default_factory=list)

    def new(self, key: BackendKey) -> BackendConnection:
        conn = BackendConnection(self.engine.pool, key)
        wire = Wire((key[0], key[1]))
        conn.connection_made(wire)  # type: ignore[arg-type]
        self.opened.append((conn, wire))
        return conn

    async def connect(self, key: BackendKey) -> BackendConnection:
        return self.new(key)


@dataclass
class Play:
    engine: HttpEngine
    backends: Backends

    def client(self, scheme: str = "http", ip: str = "127.0.0.1") -> tuple[ClientConnection, Wire]:
        conn = self.engine.connection(scheme=scheme)
        assert isinstance(conn, ClientConnection)
        wire = Wire((ip, 40000))
        conn.connection_made(wire)  # type: ignore[arg-type]
        return conn, wire

    async def settle(self) -> None:
        """Let the slow paths (backend connects: one task each) run."""
        for _ in range(20):
            await asyncio.sleep(0)


@contextlib.asynccontextmanager
async def playbook(tmp_path: Path, sites: tuple[str, ...] = ("www.a.test",),
                   unknown: tuple[str, ...] = (), **http: Any) -> AsyncIterator[Play]:
    """The real engine on a SQLite directory with ``sites`` (one tenant, backend host b1),
    every site warmed and every ``unknown`` name looked up once: the requests below are then
    routed without a query (the slow path is a task waiting on SQLite's thread); only backend
    connects are tasks. ``http``: more [http] settings."""
    url = f"sqlite:///{tmp_path}/edge.sqlite3"
    store = store_for_url(url)
    await store.open()
    await store.migrate()
    service = DirectoryService(store)
    await service.add_host("b1", "127.0.0.1", http_port=8)
    await service.add_tenant("t1", "b1")
    for name in sites:
        await service.add_site(name, "t1")
    config = EdgeConfig(http=HttpConfig(access_log=f"{tmp_path}/access.log", **http))
    directory = Directory(store, config.cache)
    context = ProxyContext(config=config, directory=directory,
                           feed=ChangeFeed(directory, interval=3600), keybox=None, worker_id=0,
                           logger=logging.getLogger("playbook"), name="http")
    for name in sites:
        assert await directory.route_for_site(name) is not None
    for name in unknown:
        assert await directory.site(name) is None
    engine = HttpEngine(context)
    backends = Backends(engine)
    engine.pool.connect = backends.connect  # type: ignore[method-assign]
    try:
        yield Play(engine, backends)
    finally:
        await engine.close()
        await store.close()


@pytest.fixture
async def play(tmp_path: Path) -> AsyncIterator[Play]:
    async with playbook(tmp_path, unknown=("nowhere.test", "unknown.test"),
                        header_timeout=0.2) as fixture:
        yield fixture


def _get(path: str, host: str = "www.a.test", extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode()


def _status_lines(data: bytes) -> list[bytes]:
    return [line for line in data.split(b"\r\n") if line.startswith(b"HTTP/1.1 ")]


async def test_pipelined_requests_are_answered_in_order(play: Play) -> None:
    client, wire = play.client()
    client.data_received(_get("/a") + _get("/b") + _get("/c"))
    await play.settle()
    # One request at a time reaches the backend: the others wait, in order, in the queue.
    assert len(play.backends.opened) == 1
    backend, bwire = play.backends.opened[0]
    assert bwire.take().startswith(b"GET /a HTTP/1.1\r\nHost: www.a.test\r\n")
    assert wire.take() == b""
    for path, body in ((b"/b", b"A"), (b"/c", b"B"), (None, b"C")):
        backend.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n" + body)
        out = wire.take()
        assert out.endswith(b"\r\n\r\n" + body) and out.count(b"HTTP/1.1 200") == 1
        sent = bwire.take()  # the next request, on the same (released, reused) connection
        assert sent.startswith(b"GET " + path + b" ") if path else sent == b""
    assert len(play.backends.opened) == 1 and not wire.closed


async def test_a_bad_request_behind_one_in_progress_is_answered_after_it(play: Play) -> None:
    """The request ahead is answered first; the connection then closes, and nothing after
    the bad bytes reached a backend."""
    client, wire = play.client()
    client.data_received(_get("/a") + b"GET /x HTTP/1.1\r\nHost: www.a.test\r\nBad Header\r\n\r\n"
                         + _get("/never"))
    await play.settle()
    backend, bwire = play.backends.opened[0]
    assert bwire.take().startswith(b"GET /a ")
    backend.data_received(OK)
    assert _status_lines(wire.take()) == [b"HTTP/1.1 200 OK"]
    assert wire.closed and bwire.take() == b""


async def test_idempotent_request_retried_once_when_the_pooled_connection_was_closed(
        play: Play) -> None:
    client, wire = play.client()
    client.data_received(_get("/first"))
    await play.settle()
    first, first_wire = play.backends.opened[0]
    assert first_wire.take().startswith(b"GET /first ")
    first.data_received(OK)
    assert _status_lines(wire.take()) == [b"HTTP/1.1 200 OK"]
    # The pooled connection is reused for the next request, and the backend had closed it
    # meanwhile: no byte of answer, then EOF. A GET is sent again on a fresh connection.
    client.data_received(_get("/second"))
    assert first_wire.take().startswith(b"GET /second ")
    first.connection_lost(None)
    await play.settle()
    assert len(play.backends.opened) == 2
    fresh, fresh_wire = play.backends.opened[1]
    assert fresh_wire.take().startswith(b"GET /second ")
    fresh.data_received(OK)
    assert _status_lines(wire.take()) == [b"HTTP/1.1 200 OK"]
    assert not wire.closed


async def test_a_request_with_a_body_is_not_retried(play: Play) -> None:
    client, wire = play.client()
    client.data_received(_get("/first"))
    await play.settle()
    first, fwire = play.backends.opened[0]
    first.data_received(OK)
    wire.take()
    client.data_received(b"POST /form HTTP/1.1\r\nHost: www.a.test\r\nContent-Length: 3\r\n\r\nabc")
    assert fwire.take().endswith(b"\r\n\r\nabc")
    first.connection_lost(None)
    await play.settle()
    assert len(play.backends.opened) == 1  # not sent again: the backend may have acted on it
    assert _status_lines(wire.take()) == [b"HTTP/1.1 502 Bad Gateway"]


async def test_unknown_site_is_answered_and_the_connection_kept(play: Play) -> None:
    client, wire = play.client()
    client.data_received(_get("/", host="nowhere.test"))
    await play.settle()
    assert _status_lines(wire.take()) == [b"HTTP/1.1 404 Not Found"]
    assert not wire.closed and play.backends.opened == []
    client.data_received(_get("/"))  # the next request on the same connection is served
    await play.settle()
    assert play.backends.opened[0][1].take().startswith(b"GET / ")


async def test_malformed_request_gets_400_and_close(play: Play) -> None:
    client, wire = play.client()
    client.data_received(b"GET / HTTP/1.1\r\nHost: www.a.test\r\nContent-Length: 1\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + _get("/smuggled"))
    await play.settle()
    out = wire.take()
    assert _status_lines(out) == [b"HTTP/1.1 400 Bad Request"] and b"Connection: close" in out
    assert wire.closed and play.backends.opened == []


async def test_a_head_not_complete_in_time_gets_408(play: Play) -> None:
    client, wire = play.client()
    client.data_received(b"GET / HTTP/1.1\r\nHost: www.a")
    await asyncio.sleep(0.5)  # header_timeout is 0.2 s here
    out = wire.take()
    assert _status_lines(out) == [b"HTTP/1.1 408 Request Timeout"] and wire.closed


async def test_backend_cut_mid_response_resets_the_client(play: Play) -> None:
    client, wire = play.client()
    client.data_received(_get("/big"))
    await play.settle()
    backend, _ = play.backends.opened[0]
    backend.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
    backend.connection_lost(None)
    assert wire.take().endswith(b"partial")
    assert wire.reset  # a reset, not a FIN: the client must not take 7 bytes for 100


@dataclass
class RecordingSink:
    """A front end of no particular HTTP version: it records the sink calls."""

    calls: list[tuple[str, object]] = field(default_factory=list)

    def info(self, exchange: Exchange, raw: bytes) -> None:
        self.calls.append(("info", raw))

    def start(self, exchange: Exchange, head: ResponseHead, body: bytes) -> None:
        self.calls.append(("start", (head.status, head.fields(), body)))

    def body(self, exchange: Exchange, data: bytes) -> None:
        self.calls.append(("body", data))

    def end(self, exchange: Exchange) -> None:
        self.calls.append(("end", exchange.status))

    def abort(self, exchange: Exchange) -> None:
        self.calls.append(("abort", None))

    def upgrade(self, exchange: Exchange, data: bytes, transport: object) -> None:
        self.calls.append(("upgrade", data))

    def pause_request_body(self, exchange: Exchange) -> None:
        self.calls.append(("pause", None))

    def resume_request_body(self, exchange: Exchange) -> None:
        self.calls.append(("resume", None))


def _exchange(play: Play, sink: RecordingSink, method: bytes, target: bytes,
              fields: list[tuple[bytes, bytes]]) -> Exchange:
    """An exchange built the way a non-HTTP/1 front end would (no llhttp involved)."""
    ex = Exchange(play.engine, ClientInfo("https", "192.0.2.7", 5000), sink, [])
    ex.method, ex.target = method, target
    for name, value in fields:
        ex.add_header(name, value)
    return ex


async def test_an_exchange_serves_any_front_end(play: Play) -> None:
    """Routing, the backend head and the answer go through the sink with no HTTP/1 front end:
    what an HTTP/2 front end relies on."""
    sink = RecordingSink()
    ex = _exchange(play, sink, b"POST", b"/up", [(b"host", b"www.a.test"), (b"user-agent", b"h2"),
                                                  (b"connection", b"x-drop"), (b"x-drop", b"1")])
    ex.chunked = True  # a body of unknown length: sent to the backend chunked
    ex.feed_body(b"early")  # before start: buffered
    ex.start()
    await play.settle()
    backend, bwire = play.backends.opened[0]
    sent = bwire.take()
    head, _, body = sent.partition(b"\r\n\r\n")
    assert head.startswith(b"POST /up HTTP/1.1\r\nHost: www.a.test\r\n")
    assert b"X-Forwarded-For: 192.0.2.7\r\n" in head and b"X-Forwarded-Proto: https\r\n" in head
    assert b"Transfer-Encoding: chunked" in head and b"x-drop" not in head.lower()
    assert body == b"5\r\nearly\r\n"
    ex.feed_body(b"more")
    ex.end_body()
    assert bwire.take() == b"4\r\nmore\r\n0\r\n\r\n"
    backend.data_received(b"HTTP/1.1 201 Created\r\nContent-Length: 4\r\nConnection: keep-alive\r\n"
                          b"Keep-Alive: timeout=5\r\n\r\nd")
    backend.data_received(b"one")
    assert sink.calls == [("resume", None),
                          ("start", (201, [(b"content-length", b"4")], b"d")),
                          ("body", b"one"), ("end", 201)]
    assert ex.over and play.engine.pool.idle_count() == 1  # the backend connection is reused


async def test_an_exchange_answers_errors_through_the_sink(play: Play) -> None:
    sink = RecordingSink()
    ex = _exchange(play, sink, b"GET", b"/", [(b"host", b"unknown.test")])
    ex.start()
    await play.settle()
    kind, payload = sink.calls[0]
    assert kind == "start" and isinstance(payload, tuple)
    status, fields, body = payload
    assert status == 404 and (b"content-type", b"text/html; charset=utf-8") in fields
    assert b"404 Not Found" in body and sink.calls[1:] == [("end", 404)]
    assert play.backends.opened == []


async def test_a_cancelled_exchange_drops_its_backend_connection(play: Play) -> None:
    sink = RecordingSink()
    ex = _exchange(play, sink, b"GET", b"/slow", [(b"host", b"www.a.test")])
    ex.start()
    await play.settle()
    backend, bwire = play.backends.opened[0]
    ex.cancel()  # the client reset its stream
    assert bwire.reset and ex.status == 499 and sink.calls == []
    backend.data_received(OK)  # too late: nothing reaches the sink
    assert sink.calls == []


async def test_a_request_body_buffered_past_the_limit_pauses_reading_until_sent(
        play: Play) -> None:
    """Flow control client → backend: body bytes that arrive before the backend connection
    exists are buffered up to BODY_BUFFER_LIMIT, then the client is no longer read; once the
    connection is there and the buffer went out, reading resumes."""
    from httpproxy.exchange import BODY_BUFFER_LIMIT

    client, wire = play.client()
    size = BODY_BUFFER_LIMIT + 4096
    client.data_received(b"PUT /up HTTP/1.1\r\nHost: www.a.test\r\nContent-Length: %d\r\n\r\n" % size)
    client.data_received(b"x" * (size - 10))
    assert wire.paused and play.backends.opened == []  # the connect is still a task
    await play.settle()
    backend, bwire = play.backends.opened[0]
    assert not wire.paused
    head, _, body = bwire.take().partition(b"\r\n\r\n")
    assert b"Content-Length: %d" % size in head and body == b"x" * (size - 10)
    client.data_received(b"y" * 10)  # the rest goes straight through
    assert bwire.take() == b"y" * 10
    backend.data_received(OK)
    assert _status_lines(wire.take()) == [b"HTTP/1.1 200 OK"] and not wire.closed
