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
