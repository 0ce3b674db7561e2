"""HTTPS end to end: curl → HttpsProxy (TLS by SNI) → the real HTTP engine → aiohttp backends.

The directory is real (SQLite and MariaDB); certificates are stored encrypted and loaded by SNI.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from edge.config import EdgeConfig, HttpConfig, HttpsConfig
from edge.directory.directory import Directory
from edge.directory.feed import ChangeFeed
from edge.directory.secrets import KeyBox
from edge.directory.service import DirectoryService
from edge.proxyproto import encode_v1
from edge.registry import ProxyContext
from httpproxy.server import HttpProxy
from httpproxy.tls_server import HttpsProxy
from tests.support_directory import feed_at_head, make_certificate
from tests.test_http_support import Backend, parse_curl

TIMEOUT = 30.0


@dataclass
class Tls:
    proxy: HttpsProxy
    port: int
    feed: ChangeFeed
    backends: tuple[Backend, Backend]
    cacerts: dict[str, Path]

    async def curl(self, name: str, *args: str, path: str = "/", cacert: str | None = None,
                   check: bool = True) -> Any:
        cmd = ["curl", "-sS", "--max-time", str(int(TIMEOUT)), "-D", "-", "-o", "/dev/stdout",
               "--resolve", f"{name}:{self.port}:127.0.0.1",
               "--cacert", str(self.cacerts[cacert or name]), *args,
               f"https://{name}:{self.port}{path}"]
        proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), TIMEOUT + 5)
        return parse_curl(out, proc.returncode or 0, err.decode(errors="replace"), check=check)


@pytest.fixture
async def tls_edge(service: DirectoryService, keybox: KeyBox,
                   tmp_path: Path) -> AsyncIterator[Tls]:
    a, b = await Backend("a").start(), await Backend("b").start()
    await service.add_host("host-a", "127.0.0.1", http_port=a.port)
    await service.add_host("host-b", "127.0.0.1", http_port=b.port)
    await service.add_tenant("ta", "host-a")
    await service.add_tenant("tb", "host-b")
    cacerts: dict[str, Path] = {}
    for tenant, names in (("ta", ["www.a.test", "*.a.test"]), ("tb", ["www.b.test"])):
        chain, key = make_certificate(names, common_name=names[0])
        cert_id = await service.import_certificate(chain, key)
        for name in names:
            await service.add_site(name, tenant, certificate_id=cert_id)
            cacerts[name] = tmp_path / f"{name.replace('*', 'star')}.pem"
            cacerts[name].write_bytes(chain)
    cacerts["shop.a.test"] = cacerts["*.a.test"]
    config = EdgeConfig(http=HttpConfig(access_log="off"),
                        https=HttpsConfig(trusted_proxies=("127.0.0.0/8",)))
    directory = Directory(service.store, config.cache, keybox=keybox)
    feed = await feed_at_head(ChangeFeed(directory))
    context = ProxyContext(config=config, directory=directory, feed=feed, keybox=keybox,
                           worker_id=0, logger=logging.getLogger("test.https"), name="https")
    proxy = HttpsProxy(context)  # the real shared HTTP engine
    listener = socket.create_server(("127.0.0.1", 0))
    await proxy.start([listener])
    try:
        yield Tls(proxy, listener.getsockname()[1], feed, (a, b), cacerts)
    finally:
        await proxy.drain()
        await proxy.wait_closed(5)
        await proxy.close()
        await a.stop()
        await b.stop()


async def test_https_request_reaches_the_site_backend(tls_edge: Tls) -> None:
    a, b = tls_edge.backends
    r = await tls_edge.curl("www.a.test", path="/hello?x=1")
    assert r.status == 200 and r.json()["backend"] == "a" and r.json()["path"] == "/hello?x=1"
    seen = a.requests[-1]["headers"]
    assert seen["X-Forwarded-Proto"] == "https"
    assert seen["X-Forwarded-Host"] == f"www.a.test:{tls_edge.port}"
    r = await tls_edge.curl("shop.a.test")  # wildcard site, wildcard certificate
    assert r.status == 200 and r.json()["backend"] == "a"
    r = await tls_edge.curl("www.b.test", "-H", "Connection: keep-alive")
    assert r.status == 200 and r.json()["backend"] == "b"
    # keep-alive over one TLS session: two requests, one handshake
    before = tls_edge.proxy.contexts.hits + tls_edge.proxy.contexts.misses
    r = await tls_edge.curl("www.b.test", f"https://www.b.test:{tls_edge.port}/second")
    assert r.status == 200
    assert [request["path"] for request in b.requests[-2:]] == ["/second", "/"]
    assert tls_edge.proxy.contexts.hits + tls_edge.proxy.contexts.misses == before + 1


async def test_first_request_for_a_wildcard_site_in_a_fresh_worker(tls_edge: Tls) -> None:
    r = await tls_edge.curl("shop.a.test")  # nothing cached yet: TLS caches the site only
    assert r.status == 200 and r.json()["backend"] == "a"


async def test_host_not_belonging_to_the_sni_site_gets_421(tls_edge: Tls) -> None:
    _, b = tls_edge.backends
    r = await tls_edge.curl("www.a.test", "-H", "Host: www.b.test")
    assert r.status == 421
    r = await tls_edge.curl("shop.a.test", "-H", "Host: other.a.test")  # same wildcard site
    assert r.status == 200 and r.json()["backend"] == "a"
    assert b.requests == []


async def test_rotated_certificate_end_to_end(tls_edge: Tls, service: DirectoryService,
                                              tmp_path: Path) -> None:
    chain, key = make_certificate(["www.b.test"], common_name="rotated")
    new_id = await service.import_certificate(chain, key)
    await service.update_site("www.b.test", certificate_id=new_id)
    rotated = tmp_path / "rotated.pem"
    rotated.write_bytes(chain)
    tls_edge.cacerts["rotated"] = rotated
    await tls_edge.feed.poll_once()
    r = await tls_edge.curl("www.b.test", cacert="rotated")
    assert r.status == 200 and r.json()["backend"] == "b"
    old = await tls_edge.curl("www.b.test", check=False)  # the old CA no longer verifies
    assert old.exit_code == 60


async def test_certificate_replaced_in_place_is_served_to_every_site(
        tls_edge: Tls, service: DirectoryService, tmp_path: Path) -> None:
    """`edge cert replace`: same id, new chain and key; every site using it (an exact and a
    wildcard one here) serves the new certificate after the next feed poll, the old no more."""
    assert (await tls_edge.curl("www.a.test")).status == 200  # the old one, now cached
    [site] = [s for s in await service.store.list_sites() if s.hostname == "www.a.test"]
    assert site.certificate_id is not None
    chain, key = make_certificate(["www.a.test", "*.a.test"], common_name="replaced")
    sites = await service.replace_certificate(site.certificate_id, chain, key)
    assert sites == ["*.a.test", "www.a.test"]
    replaced = tmp_path / "replaced.pem"
    replaced.write_bytes(chain)
    tls_edge.cacerts["replaced"] = replaced
    await tls_edge.feed.poll_once()
    for name in ("www.a.test", "shop.a.test"):
        r = await tls_edge.curl(name, cacert="replaced")
        assert r.status == 200 and r.json()["backend"] == "a"
        assert (await tls_edge.curl(name, check=False)).exit_code == 60  # old CA: refused


async def test_proxy_header_client_reaches_x_forwarded_for(tls_edge: Tls) -> None:
    a, _ = tls_edge.backends
    sock = socket.create_connection(("127.0.0.1", tls_edge.port), timeout=TIMEOUT)
    sock.sendall(encode_v1(("198.51.100.23", 50000), ("127.0.0.1", tls_edge.port)))
    sock.setblocking(False)
    ctx = ssl.create_default_context(cafile=str(tls_edge.cacerts["www.a.test"]))
    reader, writer = await asyncio.open_connection(sock=sock, ssl=ctx, server_hostname="www.a.test")
    try:
        writer.write(b"GET /who HTTP/1.1\r\nHost: www.a.test\r\nConnection: close\r\n\r\n")
        response = await asyncio.wait_for(reader.read(), TIMEOUT)
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
    assert response.startswith(b"HTTP/1.1 200")
    assert a.requests[-1]["headers"]["X-Forwarded-For"] == "198.51.100.23"


async def test_each_listener_reports_only_its_own_open_connections(tls_edge: Tls) -> None:
    """``edge_active_sessions{proxy=...}``: with a plain and a TLS listener on one engine, an open
    HTTPS connection counts for ``https`` only and a plain one for ``http`` only (it used to count
    HTTPS connections under ``http``)."""
    plain = HttpProxy(tls_edge.proxy.context)  # shares the TLS listener's engine
    listener = socket.create_server(("127.0.0.1", 0))
    await plain.start([listener])
    request = b"GET / HTTP/1.1\r\nHost: www.a.test\r\n\r\n"
    client_tls = ssl.create_default_context(cafile=str(tls_edge.cacerts["www.a.test"]))
    writers: list[asyncio.StreamWriter] = []
    try:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", tls_edge.port, ssl=client_tls, server_hostname="www.a.test")
        writers.append(writer)
        writer.write(request)
        assert (await asyncio.wait_for(reader.readline(), TIMEOUT)).startswith(b"HTTP/1.1 200")
        assert (tls_edge.proxy.active_sessions(), plain.active_sessions()) == (1, 0)
        reader, writer = await asyncio.open_connection("127.0.0.1", listener.getsockname()[1])
        writers.append(writer)
        writer.write(request)
        assert (await asyncio.wait_for(reader.readline(), TIMEOUT)).startswith(b"HTTP/1.1 200")
        assert (tls_edge.proxy.active_sessions(), plain.active_sessions()) == (1, 1)
    finally:
        for writer in writers:
            writer.close()
        for _ in range(100):
            if tls_edge.proxy.active_sessions() + plain.active_sessions() == 0:
                break
            await asyncio.sleep(0.05)
        assert (tls_edge.proxy.active_sessions(), plain.active_sessions()) == (0, 0)
        for server in plain.servers:
            server.close()
