"""HTTPS edge, TLS layer: certificates by SNI from the directory (issue 5 item 2).

The proxy runs in-process on a port-0 socket under uvloop (as in production), with the real
directory on SQLite and MariaDB. Clients are curl (``--resolve`` + ``--cacert``) and Python's
``ssl`` module, which shows exactly which certificate was served and which alert was sent.
Behind the TLS layer sits a tiny HTTP engine of the tests (``SniEchoEngine``) that answers
every request with the SNI site and client address it was given; the end-to-end tests with
the real forwarder are in ``test_http_tls_e2e.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import uvloop
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from edge.config import EdgeConfig, HttpsConfig
from edge.directory.directory import Directory
from edge.directory.feed import ChangeFeed
from edge.directory.model import Site
from edge.directory.secrets import KeyBox
from edge.directory.service import DirectoryService
from edge.directory.store import SQLStore
from edge.errors import ConfigError
from edge.proxyproto import encode_v1, encode_v2
from edge.registry import ProxyContext
from httpproxy import tls_metrics
from httpproxy.clienthello import alert_bytes
from httpproxy.tls import HandshakeLatency
from httpproxy.tls_server import HttpsProxy
from tests.support_directory import feed_at_head, make_certificate

TIMEOUT = 30.0  # generous: a loaded 2-core machine


# Production runs uvloop, whose TLS transport is separate code from asyncio's. (pytest-asyncio
# would rather see a conftest ``pytest_asyncio_loop_factories`` hook; conftest is shared.)
pytestmark = pytest.mark.filterwarnings("ignore:Overriding the \"event_loop_policy\" fixture")


@pytest.fixture(scope="module")
def event_loop_policy() -> uvloop.EventLoopPolicy:
    return uvloop.EventLoopPolicy()


# -- a stand-in HTTP engine -------------------------------------------------------------------


class _EchoProtocol(asyncio.Protocol):
    """Answers each request head with ``sni=<site> client=<ip>:<port>``, keep-alive."""

    def __init__(self, engine: SniEchoEngine, sni_site: Site | None,
                 client: tuple[str, int] | None) -> None:
        self.engine = engine
        self.sni = sni_site.hostname if sni_site is not None else "-"
        self.client = client
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.engine.sessions.add(self)
        self.engine.idle.clear()
        ssl_object = transport.get_extra_info("ssl_object")
        self.engine.alpn.append(ssl_object.selected_alpn_protocol() if ssl_object else None)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            _, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
            client = f"{self.client[0]}:{self.client[1]}" if self.client else "-"
            body = f"sni={self.sni} client={client}\n".encode()
            assert self.transport is not None
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s"
                                 % (len(body), body))

    def connection_lost(self, exc: Exception | None) -> None:
        self.engine.sessions.discard(self)
        if not self.engine.sessions:
            self.engine.idle.set()


@dataclass
class SniEchoEngine:
    sessions: set[_EchoProtocol] = field(default_factory=set)
    made: list[tuple[str, Site | None, tuple[str, int] | None]] = field(default_factory=list)
    alpn: list[str | None] = field(default_factory=list)
    closed: bool = False
    draining: bool = False
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    def connection(self, *, scheme: str, sni_site: Site | None = None,
                   client_address: tuple[str, int] | None = None,
                   certificate_names: tuple[str, ...] | None = None) -> asyncio.Protocol:
        self.made.append((scheme, sni_site, client_address))
        return _EchoProtocol(self, sni_site, client_address)

    def active_sessions(self, scheme: str | None = None) -> int:
        return len(self.sessions)

    def drain(self) -> None:
        self.draining = True

    async def wait_idle(self, timeout: float) -> None:  # noqa: ASYNC109
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.idle.wait(), timeout)

    async def close(self) -> None:
        self.closed = True
        for session in list(self.sessions):
            if session.transport is not None:
                session.transport.close()


# -- fixtures -----------------------------------------------------------------------------------


@dataclass
class Edge:
    """The proxy under test, its directory and the certificates made for it."""

    proxy: HttpsProxy
    engine: SniEchoEngine
    port: int
    service: DirectoryService
    directory: Directory
    feed: ChangeFeed
    tmp: Path
    certs: dict[str, tuple[int, bytes, Path]] = field(default_factory=dict)
    """label -> (certificate id, chain PEM, path of the PEM for --cacert)."""

    async def add_cert(self, label: str, names: list[str]) -> int:
        chain, key = make_certificate(names, common_name=label)
        cert_id = await self.service.import_certificate(chain, key)
        path = self.tmp / f"{label}.pem"
        path.write_bytes(chain)
        self.certs[label] = (cert_id, chain, path)
        return cert_id

    def der(self, label: str) -> bytes:
        return x509.load_pem_x509_certificate(self.certs[label][1]).public_bytes(
            encoding=_DER)


_DER = Encoding.DER

EdgeFactory = Callable[..., Awaitable[Edge]]


@pytest.fixture
async def make_edge(store: SQLStore, service: DirectoryService, keybox: KeyBox,
                    tmp_path: Path) -> AsyncIterator[EdgeFactory]:
    """Start an HttpsProxy with ``[https]`` settings given as keywords; seeds host + tenant."""
    await service.add_host("web-a", "127.0.0.1", http_port=8081, https_port=8443)
    await service.add_tenant("acme", "web-a")
    started: list[HttpsProxy] = []

    async def factory(listen: str = "127.0.0.1", **https: Any) -> Edge:
        config = EdgeConfig(https=HttpsConfig(**https))
        directory = Directory(store, config.cache, keybox=keybox)
        feed = await feed_at_head(ChangeFeed(directory))
        engine = SniEchoEngine()
        context = ProxyContext(config=config, directory=directory, feed=feed, keybox=keybox,
                               worker_id=0, logger=logging.getLogger("test.https"), name="https")
        proxy = HttpsProxy(context, engine=engine)
        family = socket.AF_INET6 if ":" in listen else socket.AF_INET
        listener = socket.create_server((listen, 0), family=family)
        port = listener.getsockname()[1]
        await proxy.start([listener])
        started.append(proxy)
        return Edge(proxy, engine, port, service, directory, feed, tmp_path)

    yield factory
    for proxy in started:
        await proxy.drain()
        await proxy.close()


# -- clients ------------------------------------------------------------------------------------


@dataclass
class Handshake:
    der: bytes
    alpn: str | None
    version: str | None


def client_context(alpn: list[str] | None = None, *,
                   maximum: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    """A client that accepts any certificate: the tests compare the served DER themselves."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(alpn)
    if maximum is not None:
        ctx.maximum_version = maximum
    return ctx


async def handshake(port: int, server_name: str | None, *, alpn: list[str] | None = None,
                    maximum: ssl.TLSVersion | None = None, before: bytes = b"",
                    address: str = "127.0.0.1") -> Handshake:
    """TLS handshake (after ``before`` sent in the clear); raises ssl.SSLError on an alert."""
    sock = socket.create_connection((address, port), timeout=TIMEOUT)
    if before:
        sock.sendall(before)
    sock.setblocking(False)
    _, writer = await asyncio.wait_for(asyncio.open_connection(
        sock=sock, ssl=client_context(alpn, maximum=maximum),
        server_hostname=server_name or "", ssl_handshake_timeout=TIMEOUT), TIMEOUT)
    try:
        ssl_object = writer.get_extra_info("ssl_object")
        return Handshake(ssl_object.getpeercert(binary_form=True),
                         ssl_object.selected_alpn_protocol(), ssl_object.version())
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def https_get(port: int, server_name: str, *, before: bytes = b"") -> str:
    """One request over TLS; returns the response body."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    if before:
        sock.sendall(before)
    sock.setblocking(False)
    reader, writer = await asyncio.wait_for(asyncio.open_connection(
        sock=sock, ssl=client_context(), server_hostname=server_name), TIMEOUT)
    try:
        writer.write(f"GET / HTTP/1.1\r\nHost: {server_name}\r\n\r\n".encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
        length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
        return (await asyncio.wait_for(reader.readexactly(length), TIMEOUT)).decode()
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def curl(*args: str) -> subprocess.CompletedProcess[str]:
    proc = await asyncio.create_subprocess_exec(
        "curl", "-sS", "--max-time", str(int(TIMEOUT)), *args,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return subprocess.CompletedProcess(args, proc.returncode, out.decode(), err.decode())


async def curl_https(edge: Edge, name: str, cacert: Path, *extra: str,
                     ) -> subprocess.CompletedProcess[str]:
    # --http1.1: the echo engine answers in HTTP/1 whatever ALPN chose (h2 is offered).
    return await curl("--http1.1", "--resolve", f"{name}:{edge.port}:127.0.0.1", "--cacert",
                      str(cacert), *extra, f"https://{name}:{edge.port}/")


async def raw_exchange(port: int, data: bytes, *, read_timeout: float = TIMEOUT) -> bytes:
    """Send ``data`` in the clear, return everything the server sends until it closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        if data:
            writer.write(data)
        return await asyncio.wait_for(reader.read(), read_timeout)
    finally:
        writer.close()


def metric(name: str, **labels: str) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value(name, labels) or 0.0


# -- certificates by SNI ------------------------------------------------------------------------


async def test_certificate_by_sni_exact_and_wildcard(make_edge: EdgeFactory) -> None:
    edge = await make_edge()
    a = await edge.add_cert("a", ["www.a.test"])
    b = await edge.add_cert("b", ["www.b.test"])
    wild = await edge.add_cert("wild", ["*.c.test"])
    await edge.service.add_site("www.a.test", "acme", certificate_id=a)
    await edge.service.add_site("www.b.test", "acme", certificate_id=b)
    await edge.service.add_site("*.c.test", "acme", certificate_id=wild)

    # curl verifies the chain and the name against --cacert: the right certificate per name.
    for name, label in (("www.a.test", "a"), ("www.b.test", "b"), ("shop.c.test", "wild")):
        result = await curl_https(edge, name, edge.certs[label][2])
        assert result.returncode == 0, result.stderr
        expected_site = "*.c.test" if label == "wild" else name
        assert result.stdout.startswith(f"sni={expected_site} client=127.0.0.1:")
        # ... and the other site's certificate does not verify for this name.
        other = "b" if label == "a" else "a"
        refused = await curl_https(edge, name, edge.certs[other][2])
        assert refused.returncode == 60, refused  # peer certificate cannot be authenticated

    served = await handshake(edge.port, "WWW.B.TEST.")  # SNI is normalised like every name
    assert served.der == edge.der("b")
    with pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME"):
        await handshake(edge.port, "deep.shop.c.test")  # a wildcard covers one label only
    assert {scheme for scheme, _, _ in edge.engine.made} == {"https"}
    assert edge.proxy._acceptor is not None
    assert edge.proxy._acceptor.outcomes["ok"] == 4  # the 3 refused curls fail as tls_error


async def test_unknown_sni_no_sni_and_site_without_certificate_are_refused(
        make_edge: EdgeFactory) -> None:
    edge = await make_edge()
    a = await edge.add_cert("a", ["www.a.test"])
    await edge.service.add_site("www.a.test", "acme", certificate_id=a)
    await edge.service.add_site("plain.a.test", "acme")  # no certificate
    refused_before = metric("edge_https_handshakes_total", outcome="unrecognized_name")

    for name in ("unknown.test", "plain.a.test", "x.www.a.test", None):
        with pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME"):
            await handshake(edge.port, name)
    # An IP literal as SNI counts as no SNI (RFC 6066 forbids it); still refused.
    result = await curl("--cacert", str(edge.certs["a"][2]), f"https://127.0.0.1:{edge.port}/")
    assert result.returncode == 35 and "unrecognized name" in result.stderr.lower(), result
    assert edge.engine.made == []  # nothing reached the HTTP engine
    assert edge.proxy._acceptor is not None
    assert edge.proxy._acceptor.outcomes["unrecognized_name"] == 5
    edge.proxy.export_metrics()  # what the proxy does once a second
    assert metric("edge_https_handshakes_total", outcome="unrecognized_name") == refused_before + 5
    assert metric("edge_connections_total", proxy="https") >= 5


@pytest.mark.parametrize("by", ["site", "id"])
async def test_default_certificate_for_unknown_and_missing_sni(
        make_edge: EdgeFactory, service: DirectoryService, by: str) -> None:
    chain, key = make_certificate(["fallback.test"], common_name="fallback")
    cert_id = await service.import_certificate(chain, key)
    await service.add_site("fallback.test", "acme", certificate_id=cert_id)
    edge = await make_edge(default_certificate="fallback.test" if by == "site" else str(cert_id))
    a = await edge.add_cert("a", ["www.a.test"])
    await edge.service.add_site("www.a.test", "acme", certificate_id=a)
    await edge.service.add_site("plain.a.test", "acme")
    fallback_der = x509.load_pem_x509_certificate(chain).public_bytes(_DER)

    assert (await handshake(edge.port, "www.a.test")).der == edge.der("a")
    for name in ("unknown.test", None, "plain.a.test"):
        assert (await handshake(edge.port, name)).der == fallback_der
    # The engine learns which site the SNI named (none for unknown/no SNI): it checks Host.
    assert [site.hostname if site else None for _, site, _ in edge.engine.made] == [
        "www.a.test", None, None, "plain.a.test"]
    assert edge.proxy._acceptor is not None
    assert edge.proxy._acceptor.outcomes["default_certificate"] == 3


async def test_rotated_certificate_is_served_after_the_feed_poll(make_edge: EdgeFactory) -> None:
    edge = await make_edge()
    old = await edge.add_cert("old", ["www.a.test"])
    await edge.service.add_site("www.a.test", "acme", certificate_id=old)
    assert (await handshake(edge.port, "www.a.test")).der == edge.der("old")

    # What `edge cert import` + `edge site set --certificate` do:
    new = await edge.add_cert("new", ["www.a.test"])
    await edge.service.update_site("www.a.test", certificate_id=new)
    # Until the feed evicts it, the cached site still names the old certificate.
    assert (await handshake(edge.port, "www.a.test")).der == edge.der("old")
    assert await edge.feed.poll_once() >= 2
    assert (await handshake(edge.port, "www.a.test")).der == edge.der("new")
    result = await curl_https(edge, "www.a.test", edge.certs["new"][2])
    assert result.returncode == 0 and result.stdout.startswith("sni=www.a.test"), result


async def test_context_cache_is_bounded_and_counts(make_edge: EdgeFactory) -> None:
    edge = await make_edge(context_cache_size=2)
    misses_before = metric("edge_https_context_cache_total", result="miss")
    for label in ("a", "b", "c"):
        cert_id = await edge.add_cert(label, [f"www.{label}.test"])
        await edge.service.add_site(f"www.{label}.test", "acme", certificate_id=cert_id)
    contexts = edge.proxy.contexts
    for label in ("a", "b", "a", "c", "b"):  # LRU: c evicts b, then b evicts a
        assert (await handshake(edge.port, f"www.{label}.test")).der == edge.der(label)
        assert len(contexts) <= 2
    assert (contexts.hits, contexts.misses) == (1, 4)
    assert edge.certs["a"][0] not in contexts and edge.certs["c"][0] in contexts
    assert edge.certs["b"][0] in contexts
    edge.proxy.export_metrics()
    assert metric("edge_https_context_cache_total", result="miss") == misses_before + 4
    assert metric("edge_https_context_cache_entries") == 2


async def test_handshake_seconds_histogram_counts_established_handshakes(
        make_edge: EdgeFactory) -> None:
    # Counted in plain integers per handshake and published by export_metrics (once a second):
    # what a scrape shows must be what per-handshake observe() calls would have shown.
    edge = await make_edge()
    a = await edge.add_cert("a", ["www.a.test"])
    await edge.service.add_site("www.a.test", "acme", certificate_id=a)
    name = "edge_https_handshake_seconds"
    count, inf = metric(f"{name}_count"), metric(f"{name}_bucket", le="+Inf")
    total, slow = metric(f"{name}_sum"), metric(f"{name}_bucket", le="10.0")
    for _ in range(3):
        await handshake(edge.port, "www.a.test")
    with pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME"):
        await handshake(edge.port, "unknown.test")  # refused: no handshake time
    assert edge.proxy._acceptor is not None
    assert edge.proxy._acceptor.outcomes["ok"] == 3
    edge.proxy.export_metrics()
    assert metric(f"{name}_count") == count + 3
    assert metric(f"{name}_bucket", le="+Inf") == inf + 3
    assert metric(f"{name}_bucket", le="10.0") == slow + 3  # each took well under 10 s
    assert 0 < metric(f"{name}_sum") - total < 3 * TIMEOUT
    edge.proxy.export_metrics()  # nothing new since: nothing added twice
    assert metric(f"{name}_count") == count + 3


def test_handshake_latency_fills_the_buckets_observe_would(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from prometheus_client import CollectorRegistry, Histogram

    buckets = (0.001, 0.01, 0.1, 1.0)
    counted = Histogram("counted", "", buckets=buckets, registry=CollectorRegistry())
    observed = Histogram("observed", "", buckets=buckets, registry=CollectorRegistry())
    monkeypatch.setattr(tls_metrics, "HANDSHAKE_SECONDS", counted)
    latency = HandshakeLatency()
    values = (0.0, 0.001, 0.0011, 0.01, 0.5, 1.0, 7.0, 0.02)  # bounds belong to their bucket
    for value in values:
        latency.observe(value)
        observed.observe(value)

    def samples(histogram: Histogram) -> list[tuple[str, dict[str, str], float]]:
        return [(s.name.split("_", 1)[1], s.labels, s.value) for s in histogram.collect()[0].samples
                if not s.name.endswith("_created")]

    assert {value for _, _, value in samples(counted)} == {0.0}  # nothing until export()
    latency.export()
    latency.export()  # nothing new the second time
    assert samples(counted) == samples(observed)


def test_handshake_latency_observes_directly_without_histogram_internals(
        monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[float] = []

    class OtherHistogram:  # a prometheus_client whose Histogram is built differently
        def observe(self, amount: float) -> None:
            seen.append(amount)

    monkeypatch.setattr(tls_metrics, "HANDSHAKE_SECONDS", OtherHistogram())
    latency = HandshakeLatency()
    latency.observe(0.25)
    latency.export()
    assert seen == [0.25]


@pytest.mark.skipif(not socket.has_ipv6, reason="no IPv6")
async def test_ipv6_listener_and_client_address(make_edge: EdgeFactory) -> None:
    edge = await make_edge(listen="::1")
    a = await edge.add_cert("a", ["www.a.test"])
    await edge.service.add_site("www.a.test", "acme", certificate_id=a)
    assert (await handshake(edge.port, "www.a.test", address="::1")).der == edge.der("a")
    _, site, client = edge.engine.made[0]
    assert site is not None and site.hostname == "www.a.test"
    assert client is not None and client[0] == "::1"


async def test_alpn_offers_h2_then_http11_and_min_version(make_edge: EdgeFactory) -> None:
    edge = await make_edge(min_tls_version="1.3")
    a = await edge.add_cert("a", ["www.a.test"])
    await edge.service.add_site("www.a.test", "acme", certificate_id=a)
    both = await handshake(edge.port, "www.a.test", alpn=["h2", "http/1.1"])
    assert (both.alpn, both.version) == ("h2", "TLSv1.3")
    h11_only = await handshake(edge.port, "www.a.test", alpn=["http/1.1"])
    assert h11_only.alpn == "http/1.1"
    with pytest.raises(ssl.SSLError, match="PROTOCOL_VERSION"):
        await handshake(edge.port, "www.a.test", maximum=ssl.TLSVersion.TLSv1_2)
    result = await curl_https(edge, "www.a.test", edge.certs["a"][2], "--tls-max", "1.2")
    assert result.returncode == 35 and "protocol version" in result.stderr, result
    assert edge.proxy._acceptor is not None
    assert edge.proxy._acceptor.outcomes["protocol_version"] == 2


async def test_alpn_without_http2_is_http11_only(make_edge: EdgeFactory) -> None:
    edge = await make_edge(http2=False)
    a = await edge.add_cert("a", ["www.a.test"])
    await edge.service.add_site("www.a.test", "acme", certificate_id=a)
    both = await handshake(edge.port, "www.a.test", alpn=["h2", "http/1.1"])
    assert both.alpn == "http/1.1"
    h2_only = await handshake(edge.port, "www.a.test", alpn=["h2"])
    assert h2_only.alpn is None  # h2 not offered: the engine speaks HTTP/1.1


# -- hostile and broken clients -----------------------------------------------------------------


@pytest.mark.parametrize("defer_accept", [True, False], ids=["defer_accept", "accept_at_once"])
async def test_silent_and_slow_clients_are_closed_at_the_handshake_timeout(
        make_edge: EdgeFactory, defer_accept: bool) -> None:
    # With TCP_DEFER_ACCEPT the kernel holds a silent client until its defer period is over
    # (SYN-ACK retransmits), then we time it out like any other.
    edge = await make_edge(handshake_timeout=0.5, defer_accept=defer_accept)
    a = await edge.add_cert("a", ["www.a.test"])
    await edge.service.add_site("www.a.test", "acme", certificate_id=a)
    assert await raw_exchange(edge.port, b"") == b""  # closed by the proxy, nothing sent
    # A ClientHello trickling in (first 3 bytes of a record header, then nothing).
    assert await raw_exchange(edge.port, b"\x16\x03\x01") == b""
    assert edge.proxy._acceptor is not None
    assert edge.proxy._acceptor.outcomes["timeout"] == 2
    assert edge.proxy.active_sessions() == 0
    # A real client still works afterwards.
    assert (await handshake(edge.port, "www.a.test")).der == edge.der("a")


async def test_oversized_and_malformed_client_hello_get_alerts(make_edge: EdgeFactory) -> None:
    edge = await make_edge(max_client_hello=1024)
    # A record announcing a 5000-byte ClientHello: refused before it is read.
    big = bytes((22, 3, 1, 0x13, 0x88, 1, 0, 0x13, 0x84)) + b"\0" * 100
    assert await raw_exchange(edge.port, big) == alert_bytes("illegal_parameter")
    # Not TLS, not HTTP.
    assert await raw_exchange(edge.port, b"\x00\x01garbage") == alert_bytes("unexpected_message")
    # A normal client (hello ~ 500 bytes) is unaffected by the limit: refused only for the name.
    with pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME"):
        await handshake(edge.port, "www.a.test")
    assert edge.proxy._acceptor is not None
    assert edge.proxy._acceptor.outcomes["bad_hello"] == 2


async def test_plain_http_to_the_tls_port_gets_400(make_edge: EdgeFactory) -> None:
    edge = await make_edge()
    result = await curl("-i", "--resolve", f"www.a.test:{edge.port}:127.0.0.1",
                        f"http://www.a.test:{edge.port}/path")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("HTTP/1.1 400 Bad Request")
    assert "this port speaks TLS (HTTPS); use https://www.a.test/" in result.stdout
    assert edge.engine.made == []


async def test_proxy_header_only_from_trusted_networks(make_edge: EdgeFactory) -> None:
    trusted = await make_edge(trusted_proxies=["127.0.0.0/8"])
    a = await trusted.add_cert("a", ["www.a.test"])
    await trusted.service.add_site("www.a.test", "acme", certificate_id=a)
    v1 = encode_v1(("203.0.113.9", 40001), ("127.0.0.1", trusted.port))
    v2 = encode_v2(("2001:db8::7", 40002), ("::1", trusted.port))
    assert await https_get(trusted.port, "www.a.test", before=v1) == (
        "sni=www.a.test client=203.0.113.9:40001\n")
    assert await https_get(trusted.port, "www.a.test", before=v2) == (
        "sni=www.a.test client=2001:db8::7:40002\n")
    # A trusted balancer's health check may connect without a header.
    assert (await https_get(trusted.port, "www.a.test")).startswith("sni=www.a.test client=127.0.0.1:")
    # A broken header from a trusted peer: closed without an answer.
    assert await raw_exchange(trusted.port, b"PROXY TCP4 nonsense\r\n") == b""

    untrusted = await make_edge(trusted_proxies=["10.0.0.0/8"])
    # From anyone else the header is just bytes that are not a ClientHello.
    assert await raw_exchange(untrusted.port, v1) == alert_bytes("unexpected_message")
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await handshake(untrusted.port, "www.a.test", before=v2)
    assert untrusted.engine.made == []


async def test_drain_stops_accepting_and_close_releases_engine(make_edge: EdgeFactory) -> None:
    edge = await make_edge(handshake_timeout=20)
    a = await edge.add_cert("a", ["www.a.test"])
    await edge.service.add_site("www.a.test", "acme", certificate_id=a)
    waiting = socket.create_connection(("127.0.0.1", edge.port))  # a handshake in flight
    waiting.sendall(b"\x16\x03\x01")
    for _ in range(200):
        if edge.proxy.active_sessions():
            break
        await asyncio.sleep(0.01)
    assert edge.proxy.active_sessions() == 1
    await edge.proxy.drain()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", edge.port), timeout=TIMEOUT)
    await edge.proxy.wait_closed(0.2)  # returns at its timeout, the client is still pending
    assert edge.proxy.active_sessions() == 1
    await edge.proxy.close()
    assert edge.proxy.active_sessions() == 0 and edge.engine.closed
    waiting.settimeout(TIMEOUT)
    assert waiting.recv(10) == b""
    waiting.close()


async def test_established_sessions_count_when_no_plain_listener_reports_them(
        make_edge: EdgeFactory) -> None:
    edge = await make_edge()  # [http] listen is empty: the https proxy reports engine sessions
    a = await edge.add_cert("a", ["www.a.test"])
    await edge.service.add_site("www.a.test", "acme", certificate_id=a)
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", edge.port, ssl=client_context(), server_hostname="www.a.test")
    writer.write(b"GET / HTTP/1.1\r\nHost: www.a.test\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
    assert head.startswith(b"HTTP/1.1 200 OK")
    assert (await asyncio.wait_for(reader.readline(), TIMEOUT)).startswith(b"sni=www.a.test ")
    assert edge.proxy.active_sessions() == 1 and edge.proxy.pending_handshakes() == 0
    writer.close()
    await edge.engine.wait_idle(TIMEOUT)
    assert edge.proxy.active_sessions() == 0


async def test_out_of_file_descriptors_pauses_accepting_then_recovers(
        make_edge: EdgeFactory, caplog: pytest.LogCaptureFixture) -> None:
    import os
    import resource

    edge = await make_edge(defer_accept=False)
    a = await edge.add_cert("a", ["www.a.test"])
    await edge.service.add_site("www.a.test", "acme", certificate_id=a)
    assert (await handshake(edge.port, "www.a.test")).der == edge.der("a")  # warm the caches
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    waiting = socket.create_connection(("127.0.0.1", edge.port))  # queued in the backlog
    try:
        lowest_free = os.dup(0)  # new descriptors take the lowest free number...
        os.close(lowest_free)
        # ...and must be below the limit: from here on, no descriptor can be created.
        resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))
        with caplog.at_level(logging.WARNING, logger="edge.proxy.https"):
            for _ in range(100):  # the loop runs the accept, which fails with EMFILE
                await asyncio.sleep(0.01)
                if "pausing" in caplog.text:
                    break
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert "Too many open files" in caplog.text and "pausing" in caplog.text
    # After the pause the queued client is accepted and a new one is served normally.
    assert (await handshake(edge.port, "www.a.test")).der == edge.der("a")
    waiting.close()


# -- directory down ---------------------------------------------------------------------------


@pytest.mark.mysql
async def test_directory_down_cold_sni_gets_internal_error_not_a_hang(
        mysql_url: str, keybox: KeyBox, tmp_path: Path) -> None:
    from edge.config import DatabaseConfig
    from edge.directory.mysql import parse_mysql_url
    from edge.directory.stores import store_for_url
    from tests.support_directory import TcpForwarder

    admin = store_for_url(mysql_url)
    await admin.open()
    await admin.migrate()
    service = DirectoryService(admin, keybox)
    await service.add_host("web-a", "127.0.0.1")
    await service.add_tenant("acme", "web-a")
    chain, key = make_certificate(["www.a.test", "www.cold.test"])
    cert_id = await service.import_certificate(chain, key)
    await service.add_site("www.a.test", "acme", certificate_id=cert_id)
    await service.add_site("www.cold.test", "acme", certificate_id=cert_id)

    args = parse_mysql_url(mysql_url)
    forwarder = TcpForwarder(args["host"], args["port"])
    await forwarder.start()
    url = mysql_url.replace(f"{args['host']}:{args['port']}", f"127.0.0.1:{forwarder.port}")
    store = store_for_url(url, DatabaseConfig(connect_timeout=2.0, query_timeout=2.0))
    await store.open()
    config = EdgeConfig(https=HttpsConfig(handshake_timeout=TIMEOUT))
    directory = Directory(store, config.cache, keybox=keybox)
    feed = await feed_at_head(ChangeFeed(directory))
    engine = SniEchoEngine()
    proxy = HttpsProxy(ProxyContext(config=config, directory=directory, feed=feed, keybox=keybox,
                                    worker_id=0, logger=logging.getLogger("t"), name="https"),
                       engine=engine)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    await proxy.start([listener])
    try:
        assert (await handshake(port, "www.a.test")).der  # warm: site + certificate cached
        await forwarder.stop()
        assert (await handshake(port, "www.a.test")).der  # cached names keep working
        with pytest.raises(ssl.SSLError, match="INTERNAL_ERROR"):
            await handshake(port, "www.cold.test")
        assert proxy._acceptor is not None
        assert proxy._acceptor.outcomes["unavailable"] == 1
        assert proxy._acceptor.outcomes["timeout"] == 0
    finally:
        await proxy.drain()
        await proxy.close()
        await forwarder.stop()
        await store.close()
        await admin.close()


# -- configuration ------------------------------------------------------------------------------


@pytest.mark.parametrize(("settings", "message"), [
    ({"min_tls_version": "1.1"}, "min_tls_version"),
    ({"ciphers": "NOTACIPHER"}, "ciphers"),
    ({"default_certificate": "not a name"}, "default_certificate"),
    ({"context_cache_size": 0}, "context_cache_size"),
    ({"max_client_hello": 100}, "max_client_hello"),
])
def test_bad_https_settings_are_refused(settings: dict[str, Any], message: str) -> None:
    from edge.config import config_from_mapping

    with pytest.raises(ConfigError, match=rf"\[https\] {message}"):
        config_from_mapping({"https": settings})
