"""HTTP edge forwarding: headers, bodies both ways, keep-alive, pipelining, Expect, HEAD, 1xx,
chunked + trailers, WebSocket, PROXY v2 to backends, backends dying mid-response."""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path

import aiohttp
import pytest

from edge.directory.service import DirectoryService
from edge.proxyproto import ProxyHeaderParser, encode_v2
from tests.test_http_support import TIMEOUT, http_config, running, statuses


class RawBackend:
    """A scripted backend: records the raw bytes of each connection and answers with
    ``reply`` once it has seen a whole request head (and ``need`` more bytes)."""

    def __init__(self, reply: bytes, *, proxy_header: bool = False, need: bytes = b"\r\n\r\n",
                 close: bool = False) -> None:
        self.reply = reply
        self.need = need
        self.proxy_header = proxy_header
        self.close_after = close
        self.received: list[bytes] = []
        self.headers_seen: list[object] = []
        self.port = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> RawBackend:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = b""
        parser = ProxyHeaderParser(required=True) if self.proxy_header else None
        try:
            while True:
                chunk = await reader.read(65536)
                if not chunk:
                    break
                if parser is not None:
                    result = parser.feed(chunk)
                    if result is None:
                        continue
                    self.headers_seen.append(result.header)
                    parser = None
                    chunk = result.remaining
                data += chunk
                if self.need in data and data.endswith(self.need.split(b"\r\n\r\n")[-1] or b"\r\n\r\n"):
                    self.received.append(data)
                    data = b""
                    writer.write(self.reply)
                    await writer.drain()
                    if self.close_after:
                        break
        finally:
            writer.close()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()


async def _raw_site(service: DirectoryService, backend: RawBackend, name: str = "raw.test",
                    **host: object) -> None:
    await service.add_host("host-raw", "127.0.0.1", http_port=backend.port, **host)  # type: ignore[arg-type]
    await service.add_tenant("traw", "host-raw")
    await service.add_site(name, "traw")


async def test_forwarded_headers_set_and_client_values_dropped(service: DirectoryService) -> None:
    async with running(service.store, service) as (edge, (_a,)):
        r = await edge.curl("-H", "X-Forwarded-For: 6.6.6.6", "-H", "Forwarded: for=6.6.6.6",
                            "-H", "X-Real-IP: 6.6.6.6", "-H", "X-Forwarded-Host: evil",
                            "-H", "Connection: X-Secret", "-H", "X-Secret: 1",
                            "-H", "Keep-Alive: timeout=5", "-H", "Proxy-Connection: keep-alive",
                            "-H", "X-Normal: yes", host="www.a.test:8080")
        h = r.json()["headers"]
        assert h["X-Forwarded-For"] == "127.0.0.1"
        assert h["X-Real-IP"] == "127.0.0.1"
        assert h["X-Forwarded-Proto"] == "http"
        assert h["X-Forwarded-Host"] == "www.a.test:8080"
        assert h["Forwarded"] == 'for=127.0.0.1;host="www.a.test:8080";proto=http'
        assert h["Host"] == "www.a.test:8080"
        assert h["X-Normal"] == "yes"
        for gone in ("X-Secret", "Keep-Alive", "Proxy-Connection"):
            assert gone not in h


async def test_forwarded_for_appended_from_trusted_proxy(service: DirectoryService) -> None:
    async with running(service.store, service,
                       http=http_config(trusted_proxies=("127.0.0.0/8",))) as (edge, (_a,)):
        r = await edge.curl("-H", "X-Forwarded-For: 203.0.113.9", host="www.a.test")
        assert r.json()["headers"]["X-Forwarded-For"] == "203.0.113.9, 127.0.0.1"


async def test_proxy_protocol_from_trusted_load_balancer(service: DirectoryService) -> None:
    async with running(service.store, service,
                       http=http_config(trusted_proxies=("127.0.0.0/8",))) as (edge, (a,)):
        header = encode_v2(("198.51.100.7", 40000), ("127.0.0.1", edge.port))
        raw = await edge.raw(header + b"GET /pp HTTP/1.1\r\nHost: www.a.test\r\nConnection: close\r\n\r\n")
        assert statuses(raw) == [200]
        assert a.requests[-1]["headers"]["X-Forwarded-For"] == "198.51.100.7"
        # without a header from a trusted peer it still works ("optional")
        raw = await edge.raw(b"GET /np HTTP/1.1\r\nHost: www.a.test\r\nConnection: close\r\n\r\n")
        assert statuses(raw) == [200]


async def test_proxy_header_from_untrusted_peer_is_a_bad_request(service: DirectoryService) -> None:
    async with running(service.store, service) as (edge, (a,)):
        header = encode_v2(("198.51.100.7", 40000), ("127.0.0.1", edge.port))
        raw = await edge.raw(header + b"GET / HTTP/1.1\r\nHost: www.a.test\r\n\r\n")
        assert statuses(raw) == [400]
        assert a.requests == []


async def test_proxy_protocol_v2_sent_to_backend(service: DirectoryService) -> None:
    backend = await RawBackend(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", proxy_header=True).start()
    async with running(service.store, service) as (edge, _):
        await _raw_site(service, backend, send_proxy_protocol="v2")
        r = await edge.curl(host="raw.test")
        assert r.status == 200 and r.body == b"ok"
        header = backend.headers_seen[0]
        assert header.source[0] == "127.0.0.1"  # type: ignore[attr-defined]
        assert header.destination == ("127.0.0.1", edge.port)  # type: ignore[attr-defined]
    await backend.stop()


async def test_large_upload_and_download_stream(service: DirectoryService) -> None:
    payload = os.urandom(8 * 1024 * 1024)
    async with running(service.store, service) as (edge, (_a,)), aiohttp.ClientSession() as session:
        url = f"http://127.0.0.1:{edge.port}/echo"
        async with session.post(url, data=payload, headers={"Host": "www.a.test"}) as resp:
            assert resp.status == 200
            assert hashlib.sha256(await resp.read()).digest() == hashlib.sha256(payload).digest()

        async def gen():  # chunked upload
            for i in range(0, len(payload), 100_000):
                yield payload[i:i + 100_000]
        async with session.post(url, data=gen(), headers={"Host": "www.a.test"}) as resp:
            assert resp.status == 200
            assert await resp.read() == payload
        async with session.get(f"http://127.0.0.1:{edge.port}/stream?n=20000000",
                               headers={"Host": "www.a.test"}) as resp:
            total = 0
            async for chunk in resp.content.iter_chunked(1 << 16):
                total += len(chunk)
            assert total == 20_000_000


async def test_download_backpressure_slow_client(service: DirectoryService) -> None:
    """A client that does not read: the proxy stops reading the backend instead of buffering."""
    async with running(service.store, service) as (edge, (_a,)):
        reader, writer = await asyncio.open_connection("127.0.0.1", edge.port, limit=1 << 16)
        sock = writer.get_extra_info("socket")
        writer.write(b"GET /stream?n=200000000 HTTP/1.1\r\nHost: www.a.test\r\n\r\n")
        await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
        writer.transport.pause_reading()
        await asyncio.sleep(1.5)
        conn = next(iter(edge.engine.connections))
        assert conn.transport is not None
        # far below the 200 MB response: bounded by the high-water marks and socket buffers
        assert conn.transport.get_write_buffer_size() < 8 * 1024 * 1024
        del sock
        writer.close()


async def test_body_limit_413(service: DirectoryService) -> None:
    async with running(service.store, service, http=http_config(max_body_size=1000)) as (edge, (a,)):
        r = await edge.curl("--data-binary", "x" * 5000, path="/echo", check=False)
        assert r.status == 413
        assert r.status == 413
        assert a.requests == []
        # chunked body over the limit
        raw = await edge.raw(b"POST /echo HTTP/1.1\r\nHost: www.a.test\r\nTransfer-Encoding: chunked\r\n\r\n"
                             + b"400\r\n" + b"x" * 1024 + b"\r\n0\r\n\r\n")
        assert statuses(raw) == [413]
        r = await edge.curl("--data-binary", "x" * 999, path="/echo")
        assert r.status == 200 and len(r.body) == 999


async def test_expect_100_continue(service: DirectoryService, tmp_path: Path) -> None:
    async with running(service.store, service) as (edge, (_a,)):
        file = tmp_path / "body"
        file.write_bytes(b"y" * 2_000_000)
        body = f"@{file}"
        r = await edge.curl("-H", "Expect: 100-continue", "--data-binary", body, path="/echo")
        assert r.status == 200 and len(r.body) == 2_000_000
        # refused before the body: the client is told so and the body is never read
        r = await edge.curl("-H", "Expect: 100-continue", "--data-binary", body, host="nope.test",
                            path="/echo")
        assert r.status == 404


async def test_head_request(service: DirectoryService) -> None:
    async with running(service.store, service) as (edge, (_a,)):
        reader, writer = await asyncio.open_connection("127.0.0.1", edge.port)
        for _ in range(2):  # same connection: HEAD must not desynchronise the pooled backend
            writer.write(b"HEAD /size/5000 HTTP/1.1\r\nHost: www.a.test\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
            assert head.startswith(b"HTTP/1.1 200")
            assert b"Content-Length: 5000" in head
        writer.write(b"GET /size/10 HTTP/1.1\r\nHost: www.a.test\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
        assert b"Content-Length: 10" in head
        assert await asyncio.wait_for(reader.readexactly(10), TIMEOUT) == b"x" * 10
        writer.close()


async def test_chunked_response_and_request_trailers(service: DirectoryService) -> None:
    reply = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Sum\r\n\r\n"
             b"5\r\nhello\r\n0\r\nX-Sum: 42\r\n\r\n")
    backend = await RawBackend(reply, need=b"0\r\nX-Check: 7\r\n\r\n").start()
    async with running(service.store, service) as (edge, _):
        await _raw_site(service, backend)
        raw = await edge.raw(b"POST /t HTTP/1.1\r\nHost: raw.test\r\nTransfer-Encoding: chunked\r\n"
                             b"Connection: close\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\nX-Check: 7\r\n\r\n")
        assert statuses(raw) == [200]
        assert raw.endswith(b"5\r\nhello\r\n0\r\nX-Sum: 42\r\n\r\n")
        seen = backend.received[0]
        assert b"Transfer-Encoding: chunked" in seen
        assert seen.endswith(b"3\r\nabc\r\n2\r\nde\r\n0\r\nX-Check: 7\r\n\r\n")
    await backend.stop()


async def test_informational_103_forwarded(service: DirectoryService) -> None:
    reply = (b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n"
             b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nfin")
    backend = await RawBackend(reply).start()
    async with running(service.store, service) as (edge, _):
        await _raw_site(service, backend)
        raw = await edge.raw(b"GET / HTTP/1.1\r\nHost: raw.test\r\nConnection: close\r\n\r\n")
        assert statuses(raw) == [103, 200]
        assert raw.endswith(b"fin")
    await backend.stop()


async def test_response_hop_by_hop_removed(service: DirectoryService) -> None:
    reply = (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive, X-Hop\r\n"
             b"Keep-Alive: timeout=5\r\nX-Hop: 1\r\nX-Keep: 1\r\n\r\nok")
    backend = await RawBackend(reply).start()
    async with running(service.store, service) as (edge, _):
        await _raw_site(service, backend)
        r = await edge.curl(host="raw.test")
        assert r.body == b"ok"
        assert "x-keep" in r.headers
        for gone in ("keep-alive", "x-hop"):
            assert gone not in r.headers
        assert "connection" not in r.headers
    await backend.stop()


async def test_response_hop_by_hop_removed_from_every_repeated_head(service: DirectoryService) -> None:
    """The same head again on a pooled backend connection (stripped once, then remembered)
    loses its hop-by-hop headers every time, and a different head is stripped afresh."""
    reply = (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive, X-Hop\r\n"
             b"X-Hop: 1\r\nX-Keep: 1\r\n\r\nok")
    backend = await RawBackend(reply).start()
    async with running(service.store, service) as (edge, _):
        await _raw_site(service, backend)
        for i in range(4):
            if i == 2:
                backend.reply = reply.replace(b"X-Keep: 1", b"X-Keep: 2")
            r = await edge.curl(host="raw.test")
            assert r.body == b"ok" and r.headers["x-keep"] == ("1" if i < 2 else "2")
            assert "x-hop" not in r.headers and "connection" not in r.headers
        assert edge.engine.pool.connects == 1 and len(backend.received) == 4
    await backend.stop()


async def test_pipelined_requests_answered_in_order(service: DirectoryService) -> None:
    async with running(service.store, service, backends=2) as (edge, (_a, _b)):
        reqs = b"".join(
            f"GET /n{i} HTTP/1.1\r\nHost: www.{'ab'[i % 2]}.test\r\n\r\n".encode() for i in range(6))
        raw = await edge.raw(reqs + b"GET /last HTTP/1.1\r\nHost: www.a.test\r\nConnection: close\r\n\r\n")
        assert statuses(raw) == [200] * 7
        order = [part.split(b'"path": "')[1].split(b'"')[0] for part in raw.split(b"HTTP/1.1 200")[1:]]
        assert order == [b"/n0", b"/n1", b"/n2", b"/n3", b"/n4", b"/n5", b"/last"]


async def test_keepalive_reuses_backend_connections(service: DirectoryService) -> None:
    async with running(service.store, service) as (edge, (_a,)):
        for _ in range(5):
            assert (await edge.curl(host="www.a.test")).status == 200
        assert edge.engine.pool.connects == 1


async def test_stale_pooled_connection_is_retried(service: DirectoryService) -> None:
    backend = await RawBackend(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", close=True).start()
    async with running(service.store, service) as (edge, _):
        await _raw_site(service, backend)
        for _ in range(3):  # backend closes after every response, without saying so
            r = await edge.curl(host="raw.test")
            assert r.status == 200 and r.body == b"ok"
    await backend.stop()


async def test_backend_sending_more_than_its_content_length(service: DirectoryService) -> None:
    """Bytes past a response's Content-Length never reach the client, and that backend
    connection is not reused (the next request opens a new one)."""
    backend = await RawBackend(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n"
                               b"Content-Length: 6\r\n\r\nforged").start()
    async with running(service.store, service) as (edge, _):
        await _raw_site(service, backend)
        raw = await edge.raw(b"GET / HTTP/1.1\r\nHost: raw.test\r\n\r\n"
                             b"GET /2 HTTP/1.1\r\nHost: raw.test\r\nConnection: close\r\n\r\n")
        assert statuses(raw) == [200, 200]
        assert b"forged" not in raw and raw.count(b"\r\n\r\nok") == 2
        assert edge.engine.pool.connects == 2
    await backend.stop()


async def test_content_length_response_with_connection_close_is_not_reused(
        service: DirectoryService) -> None:
    backend = await RawBackend(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
                               close=True).start()
    async with running(service.store, service) as (edge, _):
        await _raw_site(service, backend)
        for _ in range(3):
            r = await edge.curl(host="raw.test")
            assert r.status == 200 and r.body == b"ok"
        assert edge.engine.pool.connects == 3  # never a reset retried on a closed connection
    await backend.stop()


@pytest.mark.parametrize("head", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2x\r\n",
])
async def test_badly_framed_response_is_never_a_complete_body(service: DirectoryService,
                                                              head: bytes) -> None:
    """Responses whose framing is ambiguous are left to llhttp, which refuses them before
    anything is forwarded: the client gets a 502 (never the backend's head and body, which
    it could take for a complete response) and that backend connection is dropped (never
    reused for another request)."""
    backend = await RawBackend(head + b"\r\nokk").start()
    async with running(service.store, service) as (edge, _):
        await _raw_site(service, backend)
        raw = await edge.raw(b"GET / HTTP/1.1\r\nHost: raw.test\r\n\r\n"
                             b"GET /2 HTTP/1.1\r\nHost: raw.test\r\nConnection: close\r\n\r\n")
        assert statuses(raw) == [502, 502]
        assert b"okk" not in raw
        assert edge.engine.pool.idle_count() == 0 and len(backend.received) == 2
    await backend.stop()


@pytest.mark.parametrize(("reply", "reused"), [
    (b"HTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n", True),
    (b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\nConnection: keep-alive\r\n\r\n", True),
    (b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n", False),
    (b"HTTP/1.1 204 No Content\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nforged", False),
])
async def test_bodyless_response_framed_by_llhttp(service: DirectoryService, reply: bytes,
                                                  reused: bool) -> None:
    """A response that llhttp frames and that ends with its head is forwarded whole; bytes
    after it are never forwarded and cost that backend connection its reuse."""
    backend = await RawBackend(reply).start()
    async with running(service.store, service) as (edge, _):
        await _raw_site(service, backend)
        raw = await edge.raw(b"GET / HTTP/1.1\r\nHost: raw.test\r\n\r\n"
                             b"GET /2 HTTP/1.1\r\nHost: raw.test\r\nConnection: close\r\n\r\n")
        assert statuses(raw) == [int(reply[9:12])] * 2
        assert b"forged" not in raw
        assert edge.engine.pool.connects == (1 if reused else 2)
    await backend.stop()


async def test_content_length_body_in_many_reads(service: DirectoryService) -> None:
    """A body that arrives in many reads is forwarded whole, and the connection is reused."""
    async with running(service.store, service) as (edge, (_a,)):
        for _ in range(2):
            r = await edge.curl(host="www.a.test", path="/size/3000000")
            assert r.status == 200 and len(r.body) == 3_000_000
        assert edge.engine.pool.connects == 1


async def test_backend_dying_mid_response_is_not_a_complete_body(service: DirectoryService) -> None:
    async with running(service.store, service) as (edge, (_a,)):
        for path in ("/die", "/die-chunked"):
            r = await edge.curl(host="www.a.test", path=path, check=False)
            assert r.exit_code != 0, path  # curl: transfer closed with outstanding data
            assert r.status == 200
        # and the proxy is fine afterwards
        assert (await edge.curl(host="www.a.test")).status == 200


async def test_close_delimited_response(service: DirectoryService) -> None:
    backend = await RawBackend(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil-eof", close=True).start()
    async with running(service.store, service) as (edge, _):
        await _raw_site(service, backend)
        r = await edge.curl(host="raw.test")
        assert r.status == 200 and r.body == b"until-eof"
    await backend.stop()


async def test_websocket_upgrade(service: DirectoryService) -> None:
    async with running(service.store, service) as (edge, (_a,)):
        async with aiohttp.ClientSession() as session, session.ws_connect(
                f"http://127.0.0.1:{edge.port}/ws", headers={"Host": "www.a.test"}) as ws:
            await ws.send_str("ping")
            msg = await asyncio.wait_for(ws.receive(), TIMEOUT)
            assert msg.data == "a:ping"
            await ws.send_str("again")
            assert (await asyncio.wait_for(ws.receive(), TIMEOUT)).data == "a:again"
        for _ in range(50):
            if edge.proxy.active_sessions() == 0:
                break
            await asyncio.sleep(0.1)
        assert edge.proxy.active_sessions() == 0


async def test_http10_client(service: DirectoryService) -> None:
    async with running(service.store, service) as (edge, (a,)):
        raw = await edge.raw(b"GET /size/10 HTTP/1.0\r\nHost: www.a.test\r\n\r\n")
        assert statuses(raw) == [200]
        assert raw.endswith(b"\r\n\r\n" + b"x" * 10)
        assert a.requests[-1]["version"] == "1.0"  # so the backend never answers chunked


async def test_client_disconnect_mid_response_frees_backend(service: DirectoryService) -> None:
    async with running(service.store, service) as (edge, (_a,)):
        reader, writer = await asyncio.open_connection("127.0.0.1", edge.port)
        writer.write(b"GET /stream?n=100000000 HTTP/1.1\r\nHost: www.a.test\r\n\r\n")
        await asyncio.wait_for(reader.readexactly(100_000), TIMEOUT)
        writer.transport.abort()
        for _ in range(100):
            if edge.proxy.active_sessions() == 0:
                break
            await asyncio.sleep(0.05)
        assert edge.proxy.active_sessions() == 0
        assert edge.engine.pool.idle_count() == 0  # the half-read backend connection is not reused
        assert (await edge.curl(host="www.a.test")).status == 200



async def test_backend_tls_verified_against_the_site_name(service: DirectoryService,
                                                          tmp_path: Path) -> None:
    import ssl

    from aiohttp import web

    from edge.demo import self_signed

    chain, key = self_signed(["secure.test"])
    cert_file, key_file = tmp_path / "backend.crt", tmp_path / "backend.key"
    cert_file.write_bytes(chain)
    key_file.write_bytes(key)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_file, key_file)

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text=f"tls backend saw {request.headers['Host']} over {request.scheme}")
    app = web.Application()
    app.router.add_get("/", hello)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        async with running(service.store, service,
                           http=http_config(backend_ca_file=str(cert_file))) as (edge, _):
            await service.add_host("host-tls", "127.0.0.1", https_port=port, backend_tls=True)
            await service.add_tenant("ttls", "host-tls")
            await service.add_site("secure.test", "ttls")
            await service.add_site("wrong-name.test", "ttls")
            r = await edge.curl(host="secure.test")
            assert r.status == 200 and r.body == b"tls backend saw secure.test over https"
            # the backend's certificate does not cover this name: never sent in the clear
            assert (await edge.curl(host="wrong-name.test")).status == 502
    finally:
        await runner.cleanup()
