"""Tenant isolation, HTTP: every way a request could name another tenant's site or a host that
is not in the directory, sent with raw sockets (and curl) through the real proxy to real
backends. Tenant ta (backend a) owns www.a.test and *.a.test, tenant tb (backend b) owns
www.b.test. A listener stands on a forbidden address and records any connection to it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from edge.directory.service import DirectoryService
from tests.test_http_support import Backend, Edge, running, statuses


@pytest.fixture
def database_url(sqlite_url: str) -> str:
    """Routing does not depend on the store: SQLite only (other HTTP tests cover MariaDB)."""
    return sqlite_url


class Forbidden:
    """A TCP listener that must never be reached: it records every connection and its bytes."""

    def __init__(self) -> None:
        self.seen: list[bytes] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.seen.append(b"")
        with contextlib.suppress(Exception):
            self.seen[-1] = await asyncio.wait_for(reader.read(4096), 2)
        writer.close()

    async def start(self) -> Forbidden:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self


@contextlib.asynccontextmanager
async def forbidden() -> AsyncIterator[Forbidden]:
    listener = await Forbidden().start()
    try:
        yield listener
    finally:
        assert listener.server is not None
        listener.server.close()


def hosts_seen(backend: Backend) -> list[str]:
    return [r["headers"].get("Host", "") for r in backend.requests]


async def one(edge: Edge, request: bytes) -> tuple[list[int], bytes]:
    raw = await edge.raw(request)
    return statuses(raw), raw


# (request head, expected status): each names something that is not the site the
# connection may reach; nothing may reach backend b or the forbidden listener. SYNTAX: a Host
# that is not valid RFC 9110 syntax may be refused as 400 (bad request) or 404 (no such site).
SYNTAX = -1
OWN = -2  # its own site (200) or refused (400/404): never another tenant


def refused_requests(port: int) -> list[tuple[bytes, int]]:
    return [
        # absolute-form naming another tenant / a raw address, Host naming ours
        (b"GET http://www.b.test/ HTTP/1.1\r\nHost: www.a.test\r\n\r\n", 400),
        (b"GET http://www.a.test@www.b.test/ HTTP/1.1\r\nHost: www.a.test\r\n\r\n", 400),
        (b"GET http://127.0.0.1:%d/ HTTP/1.1\r\nHost: www.a.test\r\n\r\n" % port, 400),
        # absolute-form to a raw address with a matching Host: not a site
        (b"GET http://127.0.0.1:%d/ HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % (port, port), 404),
        # forward-proxy verbs
        (b"CONNECT 127.0.0.1:%d HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % (port, port), 405),
        (b"CONNECT www.b.test:80 HTTP/1.1\r\nHost: www.a.test\r\n\r\n", 405),
        # hosts that are not sites
        (b"GET / HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % port, 404),
        (b"GET / HTTP/1.1\r\nHost: localhost:%d\r\n\r\n" % port, 404),
        (b"GET / HTTP/1.1\r\nHost: [::1]:%d\r\n\r\n" % port, SYNTAX),
        # userinfo in Host: never routed to the part after '@'
        (b"GET / HTTP/1.1\r\nHost: www.a.test@www.b.test\r\n\r\n", SYNTAX),
        # wildcard boundaries: *.a.test covers one label under a.test, nothing else
        (b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n", 404),
        (b"GET / HTTP/1.1\r\nHost: xa.test\r\n\r\n", 404),
        (b"GET / HTTP/1.1\r\nHost: x.www.b.test\r\n\r\n", 404),
        (b"GET / HTTP/1.1\r\nHost: b.test\r\n\r\n", 404),
        (b"GET / HTTP/1.1\r\nHost: www.b.test.a.test\r\n\r\n", 404),
        # IDNA lookalikes of www.b.test (Cyrillic small letter ve; fullwidth b): other names
        ("GET / HTTP/1.1\r\nHost: www.\u0432.test\r\n\r\n".encode(), 404),
        (b"GET / HTTP/1.1\r\nHost: www.xn--b-ttt.test\r\n\r\n", 404),
        # two Host headers naming two tenants
        (b"GET / HTTP/1.1\r\nHost: www.a.test\r\nHost: www.b.test\r\n\r\n", 400),
        # an empty Host / none at all
        (b"GET / HTTP/1.1\r\nHost:\r\n\r\n", SYNTAX),
        (b"GET / HTTP/1.1\r\n\r\n", 400),
    ]


async def test_requests_naming_no_site_of_theirs_reach_nobody(service: DirectoryService) -> None:
    async with forbidden() as trap, running(service.store, service, backends=2) as (edge, (a, b)):
        for request, status in refused_requests(trap.port):
            # (Connection: close: a refusal that keeps the connection open then ends it too)
            got, raw = await one(edge, request[:-2] + b"Connection: close\r\n\r\n")
            assert got == [status] or (status == SYNTAX and got in ([400], [404])), (request, raw[:300])
        assert b.requests == [] and trap.seen == []
        # Nothing reached backend a either: each of those requests was refused at the edge.
        assert a.requests == []


@pytest.mark.parametrize(("host", "tenant"), [
    ("www.b.test", "b"), ("WWW.B.TEST", "b"), ("www.b.test.", "b"), ("WwW.b.TeSt.:80", "b"),
    ("www.a.test", "a"), ("evil.a.test", "a"), ("www-b-test.a.test", "a"),
])
async def test_each_spelling_reaches_its_own_tenant_only(service: DirectoryService, host: str,
                                                         tenant: str) -> None:
    async with running(service.store, service, backends=2) as (edge, (a, b)):
        got, raw = await one(edge, b"GET /x HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n"
                             % host.encode())
        assert got == [200], raw[:300]
        mine, other = (a, b) if tenant == "a" else (b, a)
        assert [r["path"] for r in mine.requests] == ["/x"] and other.requests == []


async def test_port_in_host_never_picks_the_backend_port(service: DirectoryService) -> None:
    async with forbidden() as trap, running(service.store, service, backends=2) as (edge, (a, b)):
        got, raw = await one(edge, b"GET / HTTP/1.1\r\nHost: www.b.test:%d\r\nConnection: close"
                             b"\r\n\r\n" % trap.port)
        assert got == [200], raw[:300]
        assert len(b.requests) == 1 and trap.seen == [] and a.requests == []


async def test_keep_alive_connection_routes_each_request_by_its_own_host(
        service: DirectoryService) -> None:
    """One client connection asking for both tenants' sites in turn (pipelined): each request
    reaches its own tenant's backend, never the backend connection of the one before."""
    async with running(service.store, service, backends=2) as (edge, (a, b)):
        pipeline = b"".join(b"GET /%d HTTP/1.1\r\nHost: %s\r\n\r\n" % (i, host)
                            for i, host in enumerate([b"www.a.test", b"www.b.test"] * 3))
        pipeline += b"GET /end HTTP/1.1\r\nHost: www.a.test\r\nConnection: close\r\n\r\n"
        got, raw = await one(edge, pipeline)
        assert got == [200] * 7, raw[:500]
        assert [r["path"] for r in a.requests] == ["/0", "/2", "/4", "/end"]
        assert [r["path"] for r in b.requests] == ["/1", "/3", "/5"]
        assert set(hosts_seen(a)) == {"www.a.test"} and set(hosts_seen(b)) == {"www.b.test"}


async def test_absolute_form_for_its_own_host_is_rewritten(service: DirectoryService) -> None:
    """The one absolute-form the edge accepts (same host as Host) reaches that host's tenant
    with an origin-form target: the backend never sees another authority. With userinfo (how
    links get disguised) it is refused."""
    async with running(service.store, service, backends=2) as (edge, (a, b)):
        got, raw = await one(edge, b"GET http://www.b.test/p HTTP/1.1\r\nHost: www.b.test\r\n"
                             b"Connection: close\r\n\r\n")
        assert got == [200], raw[:300]
        got, raw = await one(edge, b"GET http://x@www.b.test/q HTTP/1.1\r\nHost: www.b.test\r\n"
                             b"Connection: close\r\n\r\n")
        assert got == [400], raw[:300]
        assert [r["path"] for r in b.requests] == ["/p"] and a.requests == []


async def test_idn_site_and_its_lookalikes(service: DirectoryService) -> None:
    """An IDN site (www.bücher.test, tenant tb) is reached by its A-label in any case; raw
    UTF-8 in Host (not strictly a Host: RFC 3986 reg-name is ASCII) is turned into that same
    A-label or refused, never another site; ASCII and Cyrillic lookalikes are other names."""
    async with running(service.store, service, backends=2) as (edge, (a, b)):
        await service.add_site("www.bücher.test", "tb")
        await edge.sync()
        for host, status in ((b"www.xn--bcher-kva.test", 200), (b"WWW.XN--BCHER-KVA.TEST.", 200),
                             (b"www.bucher.test", 404), (b"www.b\xc3\xbccher.test", OWN),
                             ("www.bü\u0441her.test".encode(), 404),  # Cyrillic es
                             (b"www.xn--bcher-kva.test.a.test", 404)):
            got, raw = await one(edge, b"GET /i HTTP/1.1\r\nHost: %s\r\nConnection: close"
                                 b"\r\n\r\n" % host)
            assert got == [status] or (status == SYNTAX and got in ([400], [404])) or (
                status == OWN and got in ([200], [400], [404])), (host, raw[:300])
        assert a.requests == [] and len(b.requests) in (2, 3)
        assert {r["headers"]["Host"] for r in b.requests} == {"www.xn--bcher-kva.test"}
