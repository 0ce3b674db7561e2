"""HTTP/2 to clients (issue 14 §2): ALPN h2 on the HTTPS listener, prior knowledge (h2c) on the
plain one, every stream served by the edge's request path, and the defences.

Real clients: curl --http2, nghttp, h2load, httpx[http2]; hostile clients are the pure-Python
``h2`` package writing raw frames (it lets a test send what a browser never would).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import httpx
import pytest

from edge.config import EdgeConfig, HttpConfig, HttpsConfig
from edge.directory.directory import Directory
from edge.directory.feed import ChangeFeed
from edge.directory.secrets import KeyBox
from edge.directory.service import DirectoryService
from edge.registry import ProxyContext
from httpproxy.http2 import H2Connection, covers
from httpproxy.server import HttpEngine, HttpProxy
from httpproxy.tls_server import HttpsProxy
from tests.support_directory import feed_at_head, make_certificate
from tests.test_http_support import Backend, listening_socket, parse_curl

TIMEOUT = 20.0
PREFACE_BYTES = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


@dataclass
class H2Edge:
    """The edge's HTTPS listener (ALPN h2) and plain listener (h2c on), one engine."""

    https: HttpsProxy
    http: HttpProxy
    tls_port: int
    port: int
    feed: ChangeFeed
    backends: tuple[Backend, Backend]
    cacerts: dict[str, Path]
    access_log: Path
    logs: list[str] = field(default_factory=list)

    @property
    def engine(self) -> HttpEngine:
        assert self.http.engine is not None
        return self.http.engine

    def h2_connections(self) -> list[H2Connection]:
        return [c for c in self.engine.connections if isinstance(c, H2Connection)]

    async def curl(self, name: str, *args: str, path: str = "/", check: bool = True,
                   cacert: str | None = None) -> Any:
        cmd = ["curl", "-sS", "--http2", "--max-time", str(int(TIMEOUT)), "-D", "-",
               "-o", "/dev/stdout", "--resolve", f"{name}:{self.tls_port}:127.0.0.1",
               "--cacert", str(self.cacerts[cacert or name]), *args,
               f"https://{name}:{self.tls_port}{path}"]
        proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), TIMEOUT + 5)
        return parse_curl(out.replace(b"HTTP/2 ", b"HTTP/2.0 "), proc.returncode or 0,
                          err.decode(errors="replace"), check=check)

    def ssl_context(self, name: str) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.cacerts[name]))
        ctx.set_alpn_protocols(["h2"])
        return ctx

    def access_lines(self) -> list[dict[str, Any]]:
        self.engine.access_log.flush()
        return [json.loads(line) for line in self.access_log.read_text().splitlines()]


async def start_h2_edge(service: DirectoryService, keybox: KeyBox, tmp_path: Path,
                        **http: Any) -> tuple[H2Edge, ChangeFeed]:
    a, b = await Backend("a").start(), await Backend("b").start()
    await service.add_host("host-a", "127.0.0.1", http_port=a.port)
    await service.add_host("host-b", "127.0.0.1", http_port=b.port)
    await service.add_tenant("ta", "host-a")
    await service.add_tenant("tb", "host-b")
    cacerts: dict[str, Path] = {}
    # One certificate for two tenants' names: a browser coalesces them onto one connection.
    for tenant_names in ((("ta", "www.a.test"), ("tb", "www.b.test")), (("ta", "only.a.test"),)):
        names = [name for _, name in tenant_names]
        chain, key = make_certificate(names, common_name=names[0])
        cert_id = await service.import_certificate(chain, key)
        for tenant, name in tenant_names:
            await service.add_site(name, tenant, certificate_id=cert_id)
            cacerts[name] = tmp_path / f"{name}.pem"
            cacerts[name].write_bytes(chain)
    await service.add_site("nocert.a.test", "ta")
    access_log = tmp_path / "access.log"
    config = EdgeConfig(http=HttpConfig(access_log=str(access_log), h2c=True, **http),
                        https=HttpsConfig())
    directory = Directory(service.store, config.cache, keybox=keybox)
    feed = await feed_at_head(ChangeFeed(directory))
    context = ProxyContext(config=config, directory=directory, feed=feed, keybox=keybox,
                           worker_id=0, logger=logging.getLogger("test.h2"), name="https")
    https = HttpsProxy(context)
    http = HttpProxy(context)
    tls_sock, plain_sock = socket.create_server(("127.0.0.1", 0)), listening_socket()
    await https.start([tls_sock])
    await http.start([plain_sock])
    edge = H2Edge(https, http, tls_sock.getsockname()[1], plain_sock.getsockname()[1], feed,
                  (a, b), cacerts, access_log)
    return edge, feed


@contextlib.asynccontextmanager
async def h2_edge(service: DirectoryService, keybox: KeyBox, tmp_path: Path,
                  **http: Any) -> AsyncIterator[H2Edge]:
    edge, _ = await start_h2_edge(service, keybox, tmp_path, **http)
    try:
        yield edge
    finally:
        await edge.https.drain()
        await edge.http.drain()
        await edge.https.wait_closed(5)
        await edge.https.close()
        await edge.http.close()
        for backend in edge.backends:
            await backend.stop()


@pytest.fixture
async def edge(service: DirectoryService, keybox: KeyBox, tmp_path: Path) -> AsyncIterator[H2Edge]:
    async with h2_edge(service, keybox, tmp_path) as e:
        yield e


async def test_curl_http2_over_alpn_reaches_the_site_backend(edge: H2Edge) -> None:
    a, b = edge.backends
    r = await edge.curl("www.a.test", "-v", path="/hello?x=1")
    assert r.status == 200, r
    assert "ALPN: server accepted h2" in r.stderr or "ALPN, server accepted to use h2" in r.stderr
    assert r.json()["backend"] == "a" and r.json()["path"] == "/hello?x=1"
    seen = a.requests[-1]["headers"]
    assert seen["Host"] == f"www.a.test:{edge.tls_port}" and seen["X-Forwarded-Proto"] == "https"
    assert b.requests == []


async def test_httpx_http2_routing_bodies_both_ways_and_errors(edge: H2Edge) -> None:
    a, b = edge.backends
    url = f"https://127.0.0.1:{edge.tls_port}"
    # --resolve's equivalent: connect to 127.0.0.1, SNI and :authority www.a.test
    transport = httpx.AsyncHTTPTransport(http2=True, verify=edge.ssl_context("www.a.test"))
    async with httpx.AsyncClient(transport=transport, timeout=TIMEOUT,
                                 headers={"Host": "www.a.test"},
                                 event_hooks={"request": [_sni("www.a.test")]}) as client:
        r = await client.get(f"{url}/x")
        assert r.http_version == "HTTP/2" and r.status_code == 200 and r.json()["backend"] == "a"
        body = bytes(range(256)) * 20_000  # 5 MB up, streamed, no Content-Length
        async def chunks() -> AsyncIterator[bytes]:
            for i in range(0, len(body), 100_000):
                yield body[i:i + 100_000]
        r = await client.post(f"{url}/echo", content=chunks())
        assert r.status_code == 200 and r.content == body
        r = await client.post(f"{url}/echo", content=body[:70_000])  # with Content-Length
        assert r.content == body[:70_000]
        assert a.requests[-1]["body_len"] == 70_000
        r = await client.get(f"{url}/stream?n=3000000")  # 3 MB down
        assert r.status_code == 200 and len(r.content) == 3_000_000
        r = await client.get(f"{url}/chunked")  # chunked from the backend: DATA frames here
        assert r.content == b"part0;part1;part2;part3;part4;"
        r = await client.head(f"{url}/size/5000")
        assert r.status_code == 200 and r.headers["content-length"] == "5000" and r.content == b""
        r = await client.get(f"{url}/status/503")
        assert r.status_code == 503 and r.text == "a status"
        with pytest.raises(httpx.RemoteProtocolError):  # RST_STREAM, not a short body
            await client.get(f"{url}/die")  # the backend dies mid-body
        r = await client.get(f"{url}/after")  # the connection serves on
        assert r.status_code == 200 and r.http_version == "HTTP/2"
    assert b.requests == []


def _sni(name: str) -> Any:
    async def hook(request: httpx.Request) -> None:
        request.extensions["sni_hostname"] = name
    return hook


def _h2_client(**settings: int) -> h2.connection.H2Connection:
    conn = h2.connection.H2Connection(h2.config.H2Configuration(
        client_side=True, header_encoding=None, validate_outbound_headers=False,
        normalize_outbound_headers=False, validate_inbound_headers=False))
    conn.local_settings = h2.settings.Settings(client=True, initial_values={
        h2.settings.SettingCodes.ENABLE_PUSH: 0, **settings})
    conn.initiate_connection()
    return conn


@dataclass
class Raw:
    """A raw HTTP/2 client connection (TLS with ALPN h2, or h2c) for hostile-client tests."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    conn: h2.connection.H2Connection
    events: list[Any] = field(default_factory=list)
    closed: bool = False
    buffer: bytes = b""

    def send(self) -> None:
        self.writer.write(self.conn.data_to_send())

    def request(self, authority: str, path: str = "/", method: str = "GET",
                end_stream: bool = True, extra: tuple[tuple[str, str], ...] = ()) -> int:
        sid = self.conn.get_next_available_stream_id()
        self.conn.send_headers(sid, [(":method", method), (":scheme", "https"),
                                     (":authority", authority), (":path", path), *extra],
                               end_stream=end_stream)
        self.send()
        return sid

    async def read(self, timeout: float = TIMEOUT) -> list[Any]:  # noqa: ASYNC109
        """Read once; the events it brought (also kept in ``events``)."""
        try:
            data = await asyncio.wait_for(self.reader.read(65536), timeout)
        except ConnectionError:  # closed with unread client bytes: the kernel sends a reset
            data = b""
        if not data:
            self.closed = True
            return []
        self.buffer += data
        new: list[Any] = []
        while len(self.buffer) >= 9:  # one frame at a time (see _after_goaway)
            size = 9 + int.from_bytes(self.buffer[:3], "big")
            if len(self.buffer) < size:
                break
            frame, self.buffer = self.buffer[:size], self.buffer[size:]
            if self.goaway() is None:
                new += self.conn.receive_data(frame)
            else:
                new += self._after_goaway(frame)
        self.send()
        self.events += new
        return new

    def _after_goaway(self, frame: bytes) -> list[Any]:
        """The h2 package stops at a GOAWAY, but a server goes on answering the streams it
        accepted: their HEADERS and DATA are read here."""
        from hyperframe.frame import DataFrame, Frame, HeadersFrame

        parsed, length = Frame.parse_frame_header(memoryview(frame[:9]))
        parsed.parse_body(memoryview(frame[9:9 + length]))
        events: list[Any] = []
        if isinstance(parsed, HeadersFrame):
            events.append(h2.events.ResponseReceived(
                stream_id=parsed.stream_id,
                headers=self.conn.decoder.decode(parsed.data, raw=True)))
        elif isinstance(parsed, DataFrame):
            events.append(h2.events.DataReceived(stream_id=parsed.stream_id, data=parsed.data,
                                                 flow_controlled_length=len(parsed.data)))
        if "END_STREAM" in parsed.flags:
            events.append(h2.events.StreamEnded(stream_id=parsed.stream_id))
        return events

    async def until(self, check: Any, timeout: float = TIMEOUT) -> None:  # noqa: ASYNC109
        """Read until ``check()`` holds or the edge closes; TimeoutError after ``timeout``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not check() and not self.closed:
            if loop.time() > deadline:
                raise TimeoutError
            with contextlib.suppress(TimeoutError):
                await self.read(0.1)

    def response(self, sid: int) -> tuple[int, dict[bytes, bytes], bytes, bool]:
        """Status, headers, body so far, and whether the stream ended, for ``sid``."""
        status, headers, body, ended = 0, {}, b"", False
        for event in self.events:
            if getattr(event, "stream_id", None) != sid:
                continue
            if isinstance(event, h2.events.ResponseReceived):
                headers = dict(event.headers)
                status = int(headers[b":status"])
            elif isinstance(event, h2.events.DataReceived):
                body += event.data
            elif isinstance(event, h2.events.StreamEnded | h2.events.StreamReset):
                ended = True
        return status, headers, body, ended

    def goaway(self) -> h2.events.ConnectionTerminated | None:
        found = [e for e in self.events if isinstance(e, h2.events.ConnectionTerminated)]
        return found[0] if found else None

    async def close(self) -> None:
        self.writer.transport.abort()  # unsent flood frames are dropped, not waited for
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.writer.wait_closed(), 5)


async def raw_client(edge: H2Edge, name: str | None = None, **settings: int) -> Raw:
    """An HTTP/2 connection: TLS (SNI ``name``, ALPN h2) or, without a name, h2c."""
    if name is None:
        reader, writer = await asyncio.open_connection("127.0.0.1", edge.port)
    else:
        reader, writer = await asyncio.open_connection("127.0.0.1", edge.tls_port,
                                                       ssl=edge.ssl_context(name),
                                                       server_hostname=name)
    raw = Raw(reader, writer, _h2_client(**settings))
    raw.send()
    return raw


async def test_coalesced_connection_routes_each_request_by_its_authority(edge: H2Edge) -> None:
    """A browser reuses one connection for every name of the certificate (www.a.test and
    www.b.test, two tenants): each request goes to its own site's backend; a name the
    certificate does not cover gets 421 there."""
    a, b = edge.backends
    raw = await raw_client(edge, "www.a.test")
    try:
        first = raw.request("www.a.test", "/one")
        second = raw.request("www.b.test", "/two")
        third = raw.request("only.a.test", "/three")  # same tenant, another certificate
        await raw.until(lambda: all(raw.response(s)[3] for s in (first, second, third)))
        assert raw.response(first)[0] == 200 and json.loads(raw.response(first)[2])["backend"] == "a"
        assert raw.response(second)[0] == 200 and json.loads(raw.response(second)[2])["backend"] == "b"
        assert raw.response(third)[0] == 421
        assert [r["path"] for r in a.requests] == ["/one"] and [r["path"] for r in b.requests] == ["/two"]
    finally:
        await raw.close()


async def test_authority_must_agree_with_host_and_unknown_sites_get_404(edge: H2Edge) -> None:
    raw = await raw_client(edge)  # h2c on the plain listener
    try:
        bad = raw.request("www.a.test", extra=(("host", "www.b.test"),))
        unknown = raw.request("nowhere.test", "/")
        good = raw.request("www.a.test", "/ok")
        await raw.until(lambda: all(raw.response(s)[3] for s in (bad, unknown, good)))
        assert raw.response(bad)[0] == 0  # RST_STREAM PROTOCOL_ERROR, no answer
        assert raw.response(unknown)[0] == 404 and b"hosting edge" in raw.response(unknown)[2]
        assert raw.response(good)[0] == 200
        assert [r["path"] for r in edge.backends[0].requests] == ["/ok"]
        assert edge.backends[1].requests == []
    finally:
        await raw.close()


async def test_cache_filters_hsts_access_log_and_metrics_over_http2(
        edge: H2Edge, service: DirectoryService) -> None:
    from httpproxy import metrics

    await service.update_site("www.a.test", cache_policy={"mode": "full", "ttl": {"200": 600}},
                              filters={"path_deny": [{"prefix": "/.git"}], "methods": ["GET"]},
                              hsts=True)
    await edge.feed.poll_once()
    before = metrics.H2_STREAMS._value.get()
    for _ in range(2):
        r = await edge.curl("www.a.test", path="/cached")
        assert r.status == 200 and r.headers["strict-transport-security"].startswith("max-age=")
    assert r.headers["x-cache"] == "HIT"
    assert (await edge.curl("www.a.test", path="/.git/config")).status == 403
    r = await edge.curl("www.a.test", "-X", "POST", path="/ok")
    assert r.status == 405 and r.headers["allow"] == "GET, HEAD"
    assert len(edge.backends[0].requests) == 1
    lines = [line for line in edge.access_lines() if line["path"] == "/cached"]
    assert [line["cache"] for line in lines] == ["MISS", "HIT"]
    assert all(line["version"] == "2" and line["site"] == "www.a.test" for line in lines)
    for _ in range(50):  # the counter is added when each connection closes
        if metrics.H2_STREAMS._value.get() >= before + 2:
            break
        await asyncio.sleep(0.05)
    assert metrics.H2_STREAMS._value.get() >= before + 2


def test_certificate_coverage_for_coalescing() -> None:
    names = ("www.a.test", "*.b.test")
    assert covers(names, "www.a.test") and covers(names, "shop.b.test")
    assert not covers(names, "a.test") and not covers(names, "x.shop.b.test")
    assert not covers(names, "b.test") and not covers((), "www.a.test")


# -- defences ------------------------------------------------------------------------------------


async def small_window_client(edge: H2Edge, **settings: int) -> Raw:
    """An h2c client whose socket reads little: what the edge sends piles up at the edge."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", edge.port))
    reader, writer = await asyncio.open_connection(sock=sock)
    raw = Raw(reader, writer, _h2_client(**settings))
    raw.send()
    return raw


async def closed_with_goaway(raw: Raw, code: int | None = None) -> h2.events.ConnectionTerminated:
    await raw.until(lambda: raw.goaway() is not None)
    goaway = raw.goaway()
    assert goaway is not None, "no GOAWAY before the connection closed"
    if code is not None:
        assert goaway.error_code == code, goaway
    with contextlib.suppress(ConnectionError, TimeoutError):
        await raw.until(lambda: False, timeout=5)
    assert raw.closed
    return goaway


async def test_rapid_reset_ends_the_connection_and_reaches_no_backend(edge: H2Edge) -> None:
    """CVE-2023-44487: open and cancel streams as fast as the socket allows."""
    raw = await raw_client(edge)
    try:
        for _ in range(20):  # 20 writes of 100 open+reset pairs
            for _ in range(100):
                sid = raw.request("www.a.test", "/hold", end_stream=True)
                raw.conn.reset_stream(sid)
            raw.send()
            await raw.writer.drain()
            with contextlib.suppress(TimeoutError):
                await raw.read(timeout=0.05)
            if raw.goaway() is not None or raw.closed:
                break
        goaway = await closed_with_goaway(raw)
        assert goaway.error_code != 0  # libnghttp2 says INTERNAL_ERROR
    finally:
        await raw.close()
    assert len(edge.backends[0].requests) < 50


async def test_continuation_flood_ends_the_connection(edge: H2Edge) -> None:
    from hyperframe.frame import ContinuationFrame, HeadersFrame

    raw = await raw_client(edge)
    try:
        encoder = raw.conn.encoder
        block = encoder.encode([(b":method", b"GET"), (b":scheme", b"http"),
                                (b":path", b"/"), (b":authority", b"www.a.test")])
        frames = [HeadersFrame(1, data=block).serialize()]
        for i in range(200):  # never END_HEADERS
            frames.append(ContinuationFrame(1, data=encoder.encode([(b"x-%d" % i, b"y" * 100)]))
                          .serialize())
        raw.writer.write(b"".join(frames))
        await closed_with_goaway(raw)
    finally:
        await raw.close()
    assert edge.backends[0].requests == []


async def test_hpack_bomb_and_oversized_header_lists_are_refused(edge: H2Edge) -> None:
    """One 4 KiB header indexed once, then referenced by one byte each: 400 KiB decoded from
    a few hundred bytes on the wire. The edge stops at max_header_size (32 KiB)."""
    raw = await raw_client(edge)
    try:
        big = ("x-big", "b" * 4000)
        sid = raw.request("www.a.test", "/bomb", extra=tuple([big] * 100))
        await raw.until(lambda: raw.response(sid)[3] or raw.goaway() is not None)
        assert raw.response(sid)[0] in (0, 431)
    finally:
        await raw.close()
    assert edge.backends[0].requests == []
    # A normal request on a new connection still works: nothing else was affected.
    raw = await raw_client(edge)
    try:
        sid = raw.request("www.a.test", "/fine")
        await raw.until(lambda: raw.response(sid)[3])
        assert raw.response(sid)[0] == 200
    finally:
        await raw.close()


async def test_streams_over_the_concurrency_limit_are_refused(edge: H2Edge) -> None:
    a = edge.backends[0]
    raw = await raw_client(edge)  # sends before it reads the edge's SETTINGS: no limit known
    try:
        sids = [raw.request("www.a.test", f"/hold?{i}") for i in range(130)]
        await raw.until(lambda: sum(isinstance(e, h2.events.StreamReset) for e in raw.events) >= 30)
        refused = [e for e in raw.events if isinstance(e, h2.events.StreamReset)]
        assert len(refused) == 30 and all(e.error_code == 0x7 for e in refused)  # REFUSED_STREAM
        assert {e.stream_id for e in refused} == set(sids[100:])
        a.hold.set()
        await raw.until(lambda: all(raw.response(s)[3] for s in sids[:100]))
        assert all(raw.response(s)[0] == 200 for s in sids[:100])
    finally:
        a.hold.clear()
        await raw.close()


@pytest.mark.parametrize("frame", ["ping", "settings"])
async def test_ping_and_settings_floods_from_a_client_that_does_not_read(
        edge: H2Edge, frame: str) -> None:
    raw = await small_window_client(edge)
    sent = 0
    try:
        for _ in range(100):
            for i in range(500):
                if frame == "ping":
                    raw.conn.ping(b"%08d" % i)
                else:
                    raw.conn.update_settings({h2.settings.SettingCodes.MAX_FRAME_SIZE: 16384})
            raw.send()
            await asyncio.wait_for(raw.writer.drain(), 2)
            sent += 500
    except (TimeoutError, ConnectionError):
        pass  # the edge closed (or stopped reading): the edge's side says which below
    finally:
        await raw.close()
    assert sent < 50_000, "the edge took 50,000 frames without ending the connection"
    for _ in range(100):
        if not edge.h2_connections():
            break
        await asyncio.sleep(0.05)
    assert not edge.h2_connections()


async def test_empty_data_frame_flood_ends_the_connection(edge: H2Edge) -> None:
    from hyperframe.frame import DataFrame

    raw = await raw_client(edge)
    try:
        # An unknown site: answered 404 at once, no backend waits for this body.
        sid = raw.request("nowhere.test", "/echo", method="POST", end_stream=False)
        empty = DataFrame(sid).serialize()
        with contextlib.suppress(ConnectionError):
            for _ in range(40):
                raw.writer.write(empty * 1000)
                await raw.writer.drain()
        await closed_with_goaway(raw)
    finally:
        await raw.close()


async def test_slow_reader_and_stream_window_starvation(edge: H2Edge) -> None:
    """A client that never opens one stream's window: the edge holds about h2_stream_buffer of
    that response (reading from the backend pauses), other streams on the connection flow,
    and the whole body arrives intact once the client reads."""
    raw = await raw_client(edge)
    size = 4_000_000
    try:
        raw.conn.increment_flow_control_window(2**30)  # the connection window is wide open
        raw.send()
        starved = raw.request("www.a.test", f"/stream?n={size}")
        await raw.until(lambda: len(raw.response(starved)[2]) >= 65535)
        await asyncio.sleep(0.5)  # the backend keeps sending for as long as the edge reads
        front = edge.h2_connections()[0]
        queued = front.h2.queued_body_size(starved)
        assert queued <= 2 * edge.engine.settings.h2_stream_buffer, queued
        other = raw.request("www.a.test", "/other")
        await raw.until(lambda: raw.response(other)[3])
        assert raw.response(other)[0] == 200
        # Now read: open the starved stream's window for the rest at once.
        raw.conn.increment_flow_control_window(size, stream_id=starved)
        raw.send()
        await raw.until(lambda: raw.response(starved)[3])
        status, _, body, _ = raw.response(starved)
        assert status == 200 and body == b"s" * size
    finally:
        await raw.close()


async def test_drain_sends_goaway_and_finishes_streams_in_progress(edge: H2Edge) -> None:
    a = edge.backends[0]
    raw = await raw_client(edge, "www.a.test")
    try:
        held = raw.request("www.a.test", "/hold")
        await raw.until(lambda: bool(a.requests))
        edge.engine.drain()
        await raw.until(lambda: raw.goaway() is not None)
        goaway = raw.goaway()
        assert goaway is not None and goaway.error_code == 0 and goaway.last_stream_id == held
        a.hold.set()
        await raw.until(lambda: raw.response(held)[3])
        assert raw.response(held)[0] == 200 and raw.response(held)[2] == b"a held"
        await raw.until(lambda: False, timeout=5)  # returns when the edge closes
    finally:
        a.hold.clear()
        await raw.close()


async def _run(*argv: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), TIMEOUT + 10)
    return proc.returncode or 0, out.decode(errors="replace")


async def test_h2c_with_nghttp_h2load_and_curl_next_to_http1(edge: H2Edge) -> None:
    """[http] h2c: the plain listener takes HTTP/2 with prior knowledge and HTTP/1.1 alike."""
    a, _ = edge.backends
    url = f"http://127.0.0.1:{edge.port}"
    code, out = await _run("nghttp", "-v", "-H", ":authority: www.a.test", f"{url}/nghttp")
    assert code == 0 and ":status: 200" in out and '"backend": "a"' in out, out
    code, out = await _run("h2load", "-n", "200", "-c", "4", "-m", "10",
                           "-H", ":authority: www.a.test", f"{url}/load")
    assert code == 0 and "200 succeeded" in out and "status codes: 200 2xx" in out, out
    r = await _curl_plain(edge.port, "--http2-prior-knowledge", path="/prior")
    assert r.status == 200 and r.json()["path"] == "/prior"
    r = await _curl_plain(edge.port, path="/one")  # HTTP/1.1 on the same listener
    assert r.status == 200 and r.json()["path"] == "/one" and r.json()["version"] == "1.1"
    assert sum(1 for r in a.requests if r["path"] == "/load") == 200


async def _curl_plain(port: int, *args: str, path: str) -> Any:
    code, out = await _run("curl", "-sS", "-D", "-", "-o", "/dev/stdout", "-H", "Host: www.a.test",
                           *args, f"http://127.0.0.1:{port}{path}")
    return parse_curl(out.replace("HTTP/2 ", "HTTP/2.0 ").encode(), code, out, check=True)


async def test_idle_connection_gets_goaway_after_keepalive_timeout(
        service: DirectoryService, keybox: KeyBox, tmp_path: Path) -> None:
    async with h2_edge(service, keybox, tmp_path, keepalive_timeout=0.5) as edge:
        raw = await raw_client(edge)
        try:
            sid = raw.request("www.a.test", "/one")
            await raw.until(lambda: raw.response(sid)[3])
            assert raw.response(sid)[0] == 200
            started = asyncio.get_running_loop().time()
            goaway = await closed_with_goaway(raw, 0)
            assert goaway.last_stream_id == sid
            assert asyncio.get_running_loop().time() - started < 5
        finally:
            await raw.close()


async def test_ping_flood_from_a_client_that_reads_ends_the_connection(edge: H2Edge) -> None:
    """Reading every PING ACK keeps libnghttp2's queue empty: the per-connection token bucket
    (burst h2_max_outbound_ack, then h2_control_rate per second) still ends the flood."""
    raw = await raw_client(edge)
    try:
        for _ in range(40):  # up to 20,000 PINGs, each answered and read
            for i in range(500):
                raw.conn.ping(b"%08d" % i)
            raw.send()
            with contextlib.suppress(TimeoutError, ConnectionError):
                await raw.read(timeout=0.2)
            if raw.goaway() is not None or raw.closed:
                break
        goaway = await closed_with_goaway(raw)
        assert goaway.error_code == 0xB  # ENHANCE_YOUR_CALM
    finally:
        await raw.close()


# -- conformance (h2spec's server cases that matter here) ----------------------------------------
# h2spec itself is a Go binary from GitHub releases (not in Debian, PyPI or npm): these are its
# cases for a server, written as raw frames (hyperframe, hpack). Each names its h2spec section.

_GET = [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b":authority", b"www.a.test")]


def _frames_for(case: str) -> tuple[bytes, str]:
    """The bytes a hostile client sends after the preface, and what the edge must answer:
    "goaway:N" (connection error N), "rst:N" (stream error N on stream 1), or "ok" (answered)."""
    import hpack
    from hyperframe.frame import (
        DataFrame,
        HeadersFrame,
        PingFrame,
        PriorityFrame,
        SettingsFrame,
        WindowUpdateFrame,
    )

    enc = hpack.Encoder()

    def headers(fields: list[tuple[bytes, bytes]], *, end: bool = True, sid: int = 1) -> bytes:
        frame = HeadersFrame(sid, data=enc.encode(fields))
        frame.flags.add("END_HEADERS")
        if end:
            frame.flags.add("END_STREAM")
        return frame.serialize()

    settings = SettingsFrame(0).serialize()
    if case == "6.1 DATA on stream 0":  # hyperframe refuses to build it: patch the stream id
        data = DataFrame(1, data=b"x").serialize()
        return settings + data[:5] + b"\x00\x00\x00\x00" + data[9:], "goaway:1"
    if case == "8.1.2 upper-case header name":
        return settings + headers([*_GET, (b"X-Upper", b"1")]), "rst:1"
    if case == "8.1.2.1 pseudo-header after a regular one":
        return settings + headers([*_GET[:3], (b"x-a", b"1"), _GET[3]]), "rst:1"
    if case == "8.1.2.2 connection-specific header":
        return settings + headers([*_GET, (b"connection", b"keep-alive")]), "rst:1"
    if case == "8.1.2.2 TE other than trailers":
        return settings + headers([*_GET, (b"te", b"gzip")]), "rst:1"
    if case == "8.1.2.3 no :path":
        return settings + headers(_GET[:2] + _GET[3:]), "rst:1"
    if case == "8.1.2.6 content-length and DATA disagree":
        body = DataFrame(1, data=b"abc")
        body.flags.add("END_STREAM")
        return (settings + headers([*_GET, (b"content-length", b"10")], end=False)
                + body.serialize()), "rst:1"
    if case == "6.9 WINDOW_UPDATE of 0 on the connection":
        return settings + WindowUpdateFrame(0, window_increment=0).serialize(), "goaway:1"
    if case == "6.5.2 SETTINGS_ENABLE_PUSH = 2":
        return SettingsFrame(0, settings={SettingsFrame.ENABLE_PUSH: 2}).serialize(), "goaway:1"
    if case == "4.2 frame larger than SETTINGS_MAX_FRAME_SIZE":
        return settings + DataFrame(1, data=b"x" * 20000).serialize(), "goaway:6"
    if case == "6.7 PING on a stream":
        ping = PingFrame(0, opaque_data=b"12345678").serialize()
        return settings + ping[:5] + b"\x00\x00\x00\x01" + ping[9:], "goaway:1"
    if case == "5.5 unknown frame type ignored":
        unknown = b"\x00\x00\x05\xfa\x00\x00\x00\x00\x00hello"  # type 0xFA, 5 bytes
        return settings + unknown + headers(_GET), "ok"
    if case == "5.3 PRIORITY on an idle stream":
        return settings + PriorityFrame(3, depends_on=0, stream_weight=10).serialize() + headers(_GET), "ok"
    raise AssertionError(case)


CONFORMANCE = ["6.1 DATA on stream 0", "8.1.2 upper-case header name",
               "8.1.2.1 pseudo-header after a regular one", "8.1.2.2 connection-specific header",
               "8.1.2.2 TE other than trailers", "8.1.2.3 no :path",
               "8.1.2.6 content-length and DATA disagree", "6.9 WINDOW_UPDATE of 0 on the connection",
               "6.5.2 SETTINGS_ENABLE_PUSH = 2", "4.2 frame larger than SETTINGS_MAX_FRAME_SIZE",
               "6.7 PING on a stream", "5.5 unknown frame type ignored", "5.3 PRIORITY on an idle stream"]


async def test_h2spec_server_cases(edge: H2Edge) -> None:
    from hyperframe.frame import Frame, GoAwayFrame, HeadersFrame, RstStreamFrame

    failures = []
    for case in CONFORMANCE:
        data, expected = _frames_for(case)
        reader, writer = await asyncio.open_connection("127.0.0.1", edge.port)
        seen = "closed"
        try:
            writer.write(PREFACE_BYTES + data)
            buffer = b""
            deadline = asyncio.get_running_loop().time() + 5
            while seen == "closed" and asyncio.get_running_loop().time() < deadline:
                chunk = await asyncio.wait_for(reader.read(65536), 5)
                if not chunk:
                    break
                buffer += chunk
                while len(buffer) >= 9:
                    frame, length = Frame.parse_frame_header(memoryview(buffer[:9]))
                    if len(buffer) < 9 + length:
                        break
                    frame.parse_body(memoryview(buffer[9:9 + length]))
                    buffer = buffer[9 + length:]
                    if isinstance(frame, GoAwayFrame):
                        seen = f"goaway:{frame.error_code}"
                    elif isinstance(frame, RstStreamFrame):
                        seen = f"rst:{frame.error_code}"
                    elif isinstance(frame, HeadersFrame) and frame.stream_id == 1:
                        seen = "ok"
        finally:
            writer.transport.abort()
        if seen != expected:
            failures.append(f"{case}: expected {expected}, got {seen}")
    assert not failures, failures
    # Only the two well-formed requests ever reached a backend.
    assert len(edge.backends[0].requests) == 2


async def test_http2_connections_are_live_sessions_and_a_kill_sends_goaway(edge: H2Edge) -> None:
    """``edge sessions`` lists an HTTP/2 connection (protocol h2: the SNI's site, the last
    request's tenant and backend host, bytes both ways); ``sessions kill`` ends it with GOAWAY
    after the streams in progress."""
    raw = await raw_client(edge, "www.a.test")
    try:
        sid = raw.request("www.b.test", "/coalesced")  # another tenant, same certificate
        await raw.until(lambda: raw.response(sid)[3])
        [row] = [r for r in edge.engine.sessions.list() if r.protocol == "h2"]
        assert (row.user, row.tenant, row.host) == ("www.a.test", "tb", "host-b")
        assert row.bytes_up > 0 and row.bytes_down > 0 and row.client.startswith("127.0.0.1:")
        assert edge.engine.sessions.kill(row.id, "maintenance")
        await closed_with_goaway(raw, 0)
        assert [r for r in edge.engine.sessions.list() if r.protocol == "h2"] == []
    finally:
        await raw.close()
