"""Connection-level guards of the HTTP edge: which upgrades are relayed (WebSocket only, after
routing and filters), the first-byte timeout of a new connection, and the per-address cap on
open connections (counted by the address a trusted balancer's PROXY header names)."""

from __future__ import annotations

import asyncio
import contextlib

from edge.directory.service import DirectoryService
from edge.proxyproto import encode_v1
from tests.test_http_support import TIMEOUT, http_config, running, statuses

_WS_HANDSHAKE = (b"GET /ws HTTP/1.1\r\nHost: %b\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                 b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
_H2C = (b"GET / HTTP/1.1\r\nHost: %b\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
        b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n")


class SwitchingBackend:
    """A backend that answers ``101 Switching Protocols`` to any request head and then echoes
    whatever arrives (a tunnel), recording every byte per connection."""

    def __init__(self) -> None:
        self.connections: list[bytearray] = []
        self.port = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> SwitchingBackend:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen = bytearray()
        self.connections.append(seen)
        switched = False
        try:
            while chunk := await reader.read(65536):
                seen += chunk
                if switched:
                    writer.write(b"tunnel:" + chunk)
                elif b"\r\n\r\n" in seen:
                    switched = True
                    writer.write(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
                                 b"Upgrade: h2c\r\n\r\n")
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


async def _switching_site(service: DirectoryService, backend: SwitchingBackend) -> None:
    await service.add_host("host-sw", "127.0.0.1", http_port=backend.port)
    await service.add_tenant("tsw", "host-sw")
    await service.add_site("sw.test", "tsw")


async def _read_all(reader: asyncio.StreamReader, timeout: float = TIMEOUT) -> bytes:  # noqa: ASYNC109
    data = b""
    with contextlib.suppress(TimeoutError, ConnectionError):
        async with asyncio.timeout(timeout):
            while chunk := await reader.read(65536):
                data += chunk
    return data


# -- Upgrade ---------------------------------------------------------------------------------


async def test_h2c_upgrade_opens_no_tunnel_even_to_a_backend_that_switches(
        service: DirectoryService) -> None:
    backend = await SwitchingBackend().start()
    try:
        async with running(service.store, service) as (edge, _):
            await _switching_site(service, backend)
            reader, writer = await asyncio.open_connection("127.0.0.1", edge.port)
            writer.write(_H2C % b"sw.test")
            await writer.drain()
            await asyncio.sleep(0.5)
            writer.write(b"GET /admin HTTP/1.1\r\nHost: internal\r\n\r\n")  # would ride the tunnel
            await writer.drain()
            answer = await _read_all(reader, 10)
            writer.close()
            assert b"101" not in answer.split(b"\r\n", 1)[0]
            assert statuses(answer)[:1] == [502]  # the backend's 101 to a plain request
            assert b"tunnel:" not in answer
            head = bytes(backend.connections[0]).lower()
            assert b"upgrade" not in head and b"http2-settings" not in head
            assert all(b"/admin" not in bytes(c) or b"host: internal" not in bytes(c).lower()
                       for c in backend.connections)
    finally:
        await backend.stop()


async def test_non_websocket_upgrade_is_served_as_a_plain_request(service: DirectoryService) -> None:
    async with running(service.store, service) as (edge, (a,)):
        # Pipelined: the request after the h2c one is read and answered as HTTP too.
        raw = await edge.raw(_H2C % b"www.a.test"
                             + b"GET /second HTTP/1.1\r\nHost: www.a.test\r\nConnection: close\r\n\r\n")
        assert statuses(raw) == [200, 200]
        assert [r["path"] for r in a.requests] == ["/", "/second"]
        assert "Upgrade" not in a.requests[0]["headers"]
        assert "HTTP2-Settings" not in a.requests[0]["headers"]
        # Many in one read (each one restarts the parser: no recursion per request).
        many = 1500
        raw = await edge.raw(_H2C % b"www.a.test" * many
                             + b"GET /last HTTP/1.1\r\nHost: www.a.test\r\nConnection: close\r\n\r\n")
        assert statuses(raw) == [200] * (many + 1)
        del a.requests[:]
        # An Upgrade request with a body: llhttp would take the body for the new protocol.
        raw = await edge.raw(b"POST /x HTTP/1.1\r\nHost: www.a.test\r\nConnection: Upgrade\r\n"
                             b"Upgrade: h2c\r\nContent-Length: 44\r\n\r\n"
                             + b"GET /smuggled HTTP/1.1\r\nHost: www.a.test\r\n\r\n")
        assert statuses(raw) == [400]
        assert a.requests == []


async def test_websocket_upgrade_to_a_denied_path_never_reaches_the_backend(
        service: DirectoryService) -> None:
    backend = await SwitchingBackend().start()
    try:
        async with running(service.store, service) as (edge, _):
            await _switching_site(service, backend)
            await service.update_site("sw.test", filters={"path_deny": [{"prefix": "/ws"}]})
            await edge.sync()
            raw = await edge.raw(_WS_HANDSHAKE % b"sw.test" + b"\x81\x05hello")
            assert statuses(raw) == [403]
            assert b"tunnel:" not in raw
            assert backend.connections == []
            # The same handshake to an allowed path is relayed (the backend switches).
            await service.update_site("sw.test", filters={"path_deny": [{"prefix": "/private"}]})
            await edge.sync()
            reader, writer = await asyncio.open_connection("127.0.0.1", edge.port)
            writer.write(_WS_HANDSHAKE % b"sw.test")
            await writer.drain()
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
            assert head.startswith(b"HTTP/1.1 101 ")
            writer.write(b"frame")
            await writer.drain()
            assert await asyncio.wait_for(reader.readexactly(12), TIMEOUT) == b"tunnel:frame"
            writer.close()
            assert b"upgrade: websocket" in bytes(backend.connections[0]).lower()
    finally:
        await backend.stop()


# -- timers and the per-address cap -------------------------------------------------------------


async def test_a_connection_that_sends_nothing_is_closed_after_header_timeout(
        service: DirectoryService) -> None:
    # Before: a new connection was held for keepalive_timeout (75 s) without sending a byte.
    config = http_config(header_timeout=1.0, keepalive_timeout=60.0)
    async with running(service.store, service, http=config) as (edge, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", edge.port)
        loop = asyncio.get_running_loop()
        started = loop.time()
        data = await _read_all(reader, 15)
        elapsed = loop.time() - started
        writer.close()
        assert data == b""
        assert elapsed < 10, f"silent connection held {elapsed:.1f} s (keepalive_timeout is 60)"
        assert edge.proxy.active_sessions() == 0
        # A connection that made a request gets keepalive_timeout, not header_timeout.
        reader, writer = await asyncio.open_connection("127.0.0.1", edge.port)
        writer.write(b"GET / HTTP/1.1\r\nHost: www.a.test\r\n\r\n")
        await writer.drain()
        await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
        await asyncio.sleep(2.5)
        writer.write(b"GET /again HTTP/1.1\r\nHost: www.a.test\r\nConnection: close\r\n\r\n")
        await writer.drain()
        assert statuses(await _read_all(reader)) == [200]  # the first head was read above
        assert edge.engine.stats.status[2] == 2
        writer.close()


async def test_per_address_cap_refuses_the_next_connection_and_serves_other_addresses(
        service: DirectoryService) -> None:
    config = http_config(max_connections_per_ip=3, trusted_proxies=("127.0.0.0/8",),
                         header_timeout=30.0)
    async with running(service.store, service, http=config) as (edge, (a,)):
        crowd = encode_v1(("203.0.113.7", 40000), ("127.0.0.1", edge.port))
        held = []
        for _ in range(3):  # a slowloris crowd from one address, behind the balancer
            reader, writer = await asyncio.open_connection("127.0.0.1", edge.port)
            writer.write(crowd + b"GET / HTTP/1.1\r\nHost: www.a.test\r\n")
            await writer.drain()
            held.append((reader, writer))
        for _ in range(100):
            if edge.engine.per_address is not None and edge.engine.per_address.count("203.0.113.7") == 3:
                break
            await asyncio.sleep(0.05)
        # The fourth from that address is refused at once, politely, and counted.
        raw = await edge.raw(crowd + b"GET / HTTP/1.1\r\nHost: www.a.test\r\n\r\n")
        assert statuses(raw) == [429]
        assert b"Retry-After: 10" in raw
        assert edge.engine.stats.refused["per_ip_cap"] == 1
        # Another address (through the same balancer, or directly) is served.
        other = encode_v1(("198.51.100.9", 40001), ("127.0.0.1", edge.port))
        raw = await edge.raw(other + b"GET /other HTTP/1.1\r\nHost: www.a.test\r\nConnection: close\r\n\r\n")
        assert statuses(raw) == [200]
        assert a.requests[-1]["headers"]["X-Real-IP"] == "198.51.100.9"
        assert (await edge.curl()).status == 200
        # A slot comes back when one of the crowd's connections closes.
        held[0][1].close()
        for _ in range(100):
            if edge.engine.per_address is not None and edge.engine.per_address.count("203.0.113.7") < 3:
                break
            await asyncio.sleep(0.05)
        raw = await edge.raw(crowd + b"GET /back HTTP/1.1\r\nHost: www.a.test\r\nConnection: close\r\n\r\n")
        assert statuses(raw) == [200]
        for _, writer in held[1:]:
            writer.close()
