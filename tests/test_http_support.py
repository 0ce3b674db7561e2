"""Shared pieces of the HTTP proxy tests: real aiohttp backends, the proxy started in-process on
a port-0 socket over a real directory (SQLite or MariaDB), curl and raw-socket clients.

(No tests here; named test_http_* so it belongs with the HTTP test files.)
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import re
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import WSMsgType, web

from edge.config import EdgeConfig, HttpConfig
from edge.directory.directory import Directory
from edge.directory.feed import ChangeFeed
from edge.directory.service import DirectoryService
from edge.directory.store import SQLStore
from edge.registry import ProxyContext
from httpproxy.server import HttpEngine, HttpProxy

TIMEOUT = 30.0


@dataclass
class Backend:
    """An aiohttp web server that says who it is and records what reached it."""

    name: str
    port: int = 0
    requests: list[dict[str, Any]] = field(default_factory=list)
    counter: int = 0
    runner: web.AppRunner | None = None
    hold: asyncio.Event = field(default_factory=asyncio.Event)
    flip_status: int = 200
    """What /flip answers (tests change it)."""

    async def start(self) -> Backend:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/ws", self.ws)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", self.port)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    async def ws(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                await ws.send_str(f"{self.name}:{msg.data}")
        return ws

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.counter += 1
        body = await request.read()
        info = {"backend": self.name, "method": request.method, "path": request.path_qs,
                "headers": dict(request.headers), "body_len": len(body), "n": self.counter,
                "version": f"{request.version.major}.{request.version.minor}"}
        self.requests.append(info)
        path = request.path
        query = request.query
        headers: dict[str, str] = {}
        if "cc" in query:
            headers["Cache-Control"] = query["cc"]
        if "setcookie" in query:
            headers["Set-Cookie"] = "a=b"
        if path.startswith("/status/"):
            return web.Response(status=int(path.split("/")[2]), text=f"{self.name} status",
                                headers=headers)
        if path == "/flip":
            return web.json_response({**info, "headers": {}}, status=self.flip_status)
        if path == "/echo":
            return web.Response(body=body, headers=headers)
        if path.startswith("/size/"):
            return web.Response(body=b"x" * int(path.split("/")[2]), headers=headers)
        if path == "/die":
            # Promise 100000 bytes, send 1000, then vanish.
            resp = web.StreamResponse(headers={"Content-Length": "100000"})
            await resp.prepare(request)
            await resp.write(b"y" * 1000)
            assert request.transport is not None
            request.transport.abort()
            return resp
        if path == "/die-chunked":
            resp = web.StreamResponse()
            resp.enable_chunked_encoding()
            await resp.prepare(request)
            await resp.write(b"z" * 1000)
            assert request.transport is not None
            request.transport.abort()
            return resp
        if path == "/slow":
            await asyncio.sleep(float(query.get("s", "5")))
            return web.Response(text="slow", headers=headers)
        if path == "/hold":
            await self.hold.wait()
            return web.Response(text=f"{self.name} held", headers=headers)
        if path == "/chunked":
            resp = web.StreamResponse(headers=headers)
            resp.enable_chunked_encoding()
            await resp.prepare(request)
            for i in range(5):
                await resp.write(f"part{i};".encode())
            await resp.write_eof()
            return resp
        if path == "/stream":
            size = int(query.get("n", "1000000"))
            resp = web.StreamResponse(headers={"Content-Length": str(size)})
            await resp.prepare(request)
            sent = 0
            while sent < size:
                chunk = min(65536, size - sent)
                await resp.write(b"s" * chunk)
                sent += chunk
            await resp.write_eof()
            return resp
        return web.json_response(info, headers=headers)


@dataclass
class Edge:
    """A running HTTP proxy over a real directory."""

    service: DirectoryService
    directory: Directory
    feed: ChangeFeed
    proxy: HttpProxy
    port: int
    config: EdgeConfig

    @property
    def engine(self) -> HttpEngine:
        assert self.proxy.engine is not None
        return self.proxy.engine

    async def sync(self) -> None:
        """Apply pending change-feed entries now (instead of waiting for the poll)."""
        await self.feed.poll_once()

    async def curl(self, *args: str, host: str | None = "www.a.test", path: str = "/",
                   check: bool = True) -> Response:
        return await curl(self.port, *args, host=host, path=path, check=check)

    async def raw(self, data: bytes, *, read_until_close: bool = True) -> bytes:
        return await raw_exchange(self.port, data, read_until_close=read_until_close)


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes
    exit_code: int
    stderr: str

    def json(self) -> Any:
        return json.loads(self.body)


async def curl(port: int, *args: str, host: str | None = "www.a.test", path: str = "/",
               check: bool = True) -> Response:
    """Run the real curl against the proxy; returns status, last response's headers, body."""
    cmd = ["curl", "-sS", "--max-time", str(TIMEOUT), "-D", "-", "-o", "/dev/stdout"]
    if host is not None:
        cmd += ["-H", f"Host: {host}"]
    cmd += [*args, f"http://127.0.0.1:{port}{path}"]
    proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), TIMEOUT + 5)
    return parse_curl(out, proc.returncode or 0, err.decode(errors="replace"), check=check)


def parse_curl(out: bytes, code: int, err: str, *, check: bool) -> Response:
    status, headers, body = 0, {}, b""
    rest = out
    while rest.startswith(b"HTTP/"):
        head, _, rest = rest.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            k, _, v = line.decode("latin-1").partition(":")
            key = k.strip().lower()
            headers[key] = headers[key] + ", " + v.strip() if key in headers else v.strip()
        if status >= 200 and status != 101:
            body = rest
            break
    if check:
        assert code == 0, f"curl failed ({code}): {err}"
    return Response(status, headers, body, code, err)


async def raw_exchange(port: int, data: bytes, *, read_until_close: bool = True,
                       timeout: float = TIMEOUT) -> bytes:  # noqa: ASYNC109
    """Send raw bytes, read until the proxy closes (or ``timeout``)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        if not read_until_close:
            return await asyncio.wait_for(reader.read(65536), timeout)
        return await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


def statuses(raw: bytes) -> list[int]:
    """Status codes of every response in a raw byte stream, in order."""
    return [int(m) for m in re.findall(rb"HTTP/1\.[01] (\d\d\d) ", raw)]


def listening_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    sock.setblocking(False)
    return sock


async def start_edge(store: SQLStore, service: DirectoryService, http: HttpConfig | None = None,
                     *, clock: Callable[[], float] = time.monotonic) -> Edge:
    config = EdgeConfig(http=http or HttpConfig(access_log="off"))
    directory = Directory(store, config.cache, clock=clock)
    feed = ChangeFeed(directory, interval=3600)  # tests apply changes with Edge.sync()
    feed.cursor = await store.latest_change_id()
    feed.healthy = True
    context = ProxyContext(config=config, directory=directory, feed=feed, keybox=None,
                           worker_id=0, logger=logging.getLogger("test.http"), name="http")
    proxy = HttpProxy(context)
    sock = listening_socket()
    port = sock.getsockname()[1]
    await proxy.start([sock])
    return Edge(service, directory, feed, proxy, port, config)


@contextlib.asynccontextmanager
async def running(store: SQLStore, service: DirectoryService, *, http: HttpConfig | None = None,
                  backends: int = 1, clock: Callable[[], float] = time.monotonic,
                  ) -> AsyncIterator[tuple[Edge, list[Backend]]]:
    """Backends a (and b), hosts host-a/host-b pointing at them, tenant ta on host-a with
    site www.a.test and *.a.test, tenant tb on host-b with www.b.test. ``clock``: the
    directory cache's."""
    started = [await Backend(name).start() for name in ("a", "b")[:max(backends, 1)]]
    await service.add_host("host-a", "127.0.0.1", http_port=started[0].port)
    await service.add_tenant("ta", "host-a")
    await service.add_site("www.a.test", "ta")
    await service.add_site("*.a.test", "ta")
    if len(started) > 1:
        await service.add_host("host-b", "127.0.0.1", http_port=started[1].port)
        await service.add_tenant("tb", "host-b")
        await service.add_site("www.b.test", "tb")
    edge = await start_edge(service.store, service, http, clock=clock)
    try:
        yield edge, started
    finally:
        await edge.proxy.drain()
        await edge.proxy.close()
        for backend in started:
            await backend.stop()


def http_config(**changes: Any) -> HttpConfig:
    return dataclasses.replace(HttpConfig(access_log="off"), **changes)


__all__ = ["TIMEOUT", "Backend", "Edge", "Response", "curl", "http_config", "listening_socket",
           "pytest", "raw_exchange", "running", "start_edge", "statuses"]
