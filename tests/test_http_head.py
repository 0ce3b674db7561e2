"""The request head a backend gets: one request, the one the edge routed, framed as the edge
read it, with a normalised Host, whatever the client put in ``Connection``, ``Host`` or the
request line.

The differential test parses what reaches a backend with h11 (not llhttp, which the edge
uses), so a disagreement between the edge's reading of a request and the backend's shows."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import h11
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge.directory.service import DirectoryService
from httpproxy.authority import Authority, forwarded_value, parse_authority, parse_host
from tests.test_http_support import TIMEOUT, Edge, http_config, running, start_edge, statuses


@pytest.fixture
def database_url(sqlite_url: str) -> str:
    """Request heads do not depend on the store: SQLite only."""
    return sqlite_url


# -- a backend that reads requests with h11 --------------------------------------------------


@dataclass
class Seen:
    """One request as h11 read it at the backend."""

    connection: int
    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def header(self, name: bytes) -> list[bytes]:
        return [v for k, v in self.headers if k == name]


@dataclass
class H11Backend:
    """Records every request h11 finds on each connection; answers each ``200 ok``."""

    port: int = 0
    seen: list[Seen] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    live: dict[int, h11.Connection] = field(default_factory=dict)
    server: asyncio.Server | None = None

    async def start(self) -> H11Backend:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()

    def pending(self) -> list[str]:
        """Connections holding part of a request (bytes the backend waits to complete)."""
        return [f"connection {n}: state {c.their_state}, buffered {c.trailing_data[0][:80]!r}"
                for n, c in self.live.items()
                if c.their_state is not h11.IDLE or c.trailing_data[0]]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        number = len(self.live) + len(self.errors) + 1000 * len(self.seen)
        conn = self.live[number] = h11.Connection(h11.SERVER)
        request: h11.Request | None = None
        body = b""
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await reader.read(65536)
                    conn.receive_data(data)
                    if not data:
                        break
                elif isinstance(event, h11.Request):
                    request, body = event, b""
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    assert request is not None
                    self.seen.append(Seen(number, request.method, request.target,
                                          list(request.headers), body))
                    writer.write(conn.send(h11.Response(status_code=200, headers=[
                        ("Content-Length", "2")])) or b"")
                    writer.write(conn.send(h11.Data(data=b"ok")) or b"")
                    writer.write(conn.send(h11.EndOfMessage()) or b"")
                    await writer.drain()
                    conn.start_next_cycle()
                elif isinstance(event, h11.ConnectionClosed):
                    break
        except (h11.RemoteProtocolError, h11.LocalProtocolError) as exc:
            self.errors.append(f"connection {number}: {exc!r}")
        except ConnectionError:
            pass
        finally:
            self.live.pop(number, None)
            writer.close()


@pytest.fixture
async def h11_edge(service: DirectoryService) -> AsyncIterator[tuple[Edge, H11Backend]]:
    """Two tenants' sites (www.h.test + *.h.test; www.i.test) on one backend host."""
    backend = await H11Backend().start()
    await service.add_host("host-h", "127.0.0.1", http_port=backend.port)
    await service.add_tenant("th", "host-h")
    await service.add_site("www.h.test", "th")
    await service.add_site("*.h.test", "th")
    await service.add_tenant("ti", "host-h")
    await service.add_site("www.i.test", "ti")
    edge = await start_edge(service.store, service, http_config(backend_timeout=10.0))
    try:
        yield edge, backend
    finally:
        await edge.proxy.drain()
        await edge.proxy.close()
        await backend.stop()


async def _exchange(port: int, data: bytes) -> tuple[int, bytes]:
    """One request on a new client connection: (status, body) read with h11."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    client = h11.Connection(h11.CLIENT)
    status, body = 0, b""
    try:
        writer.write(data)
        await writer.drain()
        while True:
            event = client.next_event()
            if event is h11.NEED_DATA:
                client.receive_data(await asyncio.wait_for(reader.read(65536), TIMEOUT))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                return status, body
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


# -- the differential property ---------------------------------------------------------------

CONNECTION_NAMES = ["content-length", "transfer-encoding", "host", "x-forwarded-for",
                    "x-forwarded-host", "x-forwarded-proto", "forwarded", "x-real-ip", "expect",
                    "keep-alive", "te", "upgrade", "close", "cookie", "user-agent",
                    "accept-encoding", "authorization", "x-extra-0", "x-extra-1", "x-extra-2"]
"""Every header a client could name in Connection: ours, framing, routing, end-to-end ones."""
HOSTS = [  # (Host sent, Host the backend must get)
    (b"www.h.test", b"www.h.test"), (b"WWW.H.Test.", b"www.h.test"),
    (b"www.h.test:8080", b"www.h.test:8080"), (b"Shop.h.test:080", b"shop.h.test:80"),
    (b"www.i.test", b"www.i.test"), (b"www.i.test.:443", b"www.i.test:443"),
]


@dataclass
class Generated:
    method: bytes
    target: bytes
    host: tuple[bytes, bytes]
    framing: str  # "none", "length", "chunked"
    body: bytes
    chunks: list[int]
    extras: list[tuple[bytes, bytes]]
    connection: list[bytes] | None
    underscores: list[tuple[bytes, bytes]]

    def wire(self) -> bytes:
        lines = [b"%b %b HTTP/1.1" % (self.method, self.target), b"Host: " + self.host[0]]
        lines += [b"%b: %b" % pair for pair in self.extras + self.underscores]
        lines += [b"X-Forwarded-For: 6.6.6.6", b'Forwarded: for=6.6.6.6;host="evil"']
        if self.connection is not None:
            lines.append(b"Connection: " + b", ".join(self.connection))
        body = self.body
        if self.framing == "length":
            lines.append(b"Content-Length: %d" % len(body))
        elif self.framing == "chunked":
            lines.append(b"Transfer-Encoding: chunked")
            parts, rest = [], body
            for size in self.chunks:
                piece, rest = rest[:size], rest[size:]
                if piece:
                    parts.append(b"%x\r\n%b\r\n" % (len(piece), piece))
            if rest:
                parts.append(b"%x\r\n%b\r\n" % (len(rest), rest))
            body = b"".join(parts) + b"0\r\n\r\n"
        return b"\r\n".join(lines) + b"\r\n\r\n" + body


_token = st.text("abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=12)


@st.composite
def requests(draw: st.DrawFn) -> Generated:
    framing = draw(st.sampled_from(["none", "length", "chunked"]))
    body = b"" if framing == "none" else draw(st.binary(max_size=300))
    if framing != "none" and draw(st.booleans()):
        # A body that is itself a request: what a smuggling attempt looks like.
        body = (b"GET /smuggled HTTP/1.1\r\nHost: www.i.test\r\nContent-Length: "
                + draw(st.sampled_from([b"0", b"40"])) + b"\r\n\r\n" + body[:20])
    names = draw(st.lists(st.sampled_from(CONNECTION_NAMES), max_size=6))
    connection = None
    if names or draw(st.booleans()):
        connection = [n.upper().encode() if draw(st.booleans()) else n.encode() for n in names]
    return Generated(
        method=draw(st.sampled_from([b"GET", b"POST", b"PUT", b"DELETE", b"PATCH", b"OPTIONS"])),
        target=b"/" + draw(_token).encode() + draw(st.sampled_from([b"", b"?q=1", b"/x.php"])),
        host=draw(st.sampled_from(HOSTS)),
        framing=framing, body=body,
        chunks=draw(st.lists(st.integers(1, 64), max_size=4)),
        extras=[(b"X-Extra-%d" % i, draw(_token).encode()) for i in range(draw(st.integers(0, 3)))]
        + draw(st.sampled_from([[], [(b"Cookie", b"s=1")], [(b"User-Agent", b"curl/8")]])),
        connection=connection,
        underscores=draw(st.sampled_from([[], [(b"X_Forwarded_For", b"6.6.6.6")],
                                          [(b"X_Real_IP", b"6.6.6.6"), (b"Content_Length", b"9")]])),
    )


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(generated=requests())
async def test_backend_reads_exactly_the_request_the_edge_routed(
        h11_edge: tuple[Edge, H11Backend], generated: Generated) -> None:
    """Whatever a client names in Connection (framing, Host, our headers, end-to-end ones),
    an independent parser at the backend reads exactly one request: same method, target,
    body, the normalised Host, our X-Forwarded-* values; named end-to-end headers gone."""
    edge, backend = h11_edge
    before = len(backend.seen)
    status, body = await _exchange(edge.port, generated.wire())
    assert status == 200 and body == b"ok", (status, body)
    await asyncio.sleep(0)  # let the backend read whatever else the edge may have sent
    assert backend.errors == []
    assert backend.pending() == []
    assert len(backend.seen) == before + 1, backend.seen[before:]
    seen = backend.seen[-1]
    assert (seen.method, seen.target, seen.body) == (generated.method, generated.target,
                                                    generated.body)
    host = generated.host[1]
    assert seen.header(b"host") == [host]
    assert seen.header(b"x-forwarded-host") == [host]
    assert seen.header(b"x-forwarded-for") == [b"127.0.0.1"]
    assert seen.header(b"forwarded") == [b'for=127.0.0.1;host="%b";proto=http' % host]
    named = {n.lower() for n in generated.connection or ()}
    for name, value in generated.extras:
        expected = [] if name.lower() in named else [value]
        assert seen.header(name.lower()) == expected, name
    assert not [k for k, _ in seen.headers if b"_" in k]
    assert not seen.header(b"connection")


# -- the end-to-end attacks the differential test generalises ---------------------------------


async def test_connection_content_length_cannot_smuggle_into_another_tenants_request(
        service: DirectoryService) -> None:
    """An attacker's POST on www.a.test names Content-Length in Connection, its body an
    unfinished request; the next request through the same pooled backend connection is a
    victim's, to another tenant's site on the same backend host. The victim's request must
    arrive intact and alone; the attacker's body must stay a body."""
    async with running(service.store, service,
                       http=http_config(backend_timeout=5.0)) as (edge, (a,)):
        await service.add_tenant("tc", "host-a")
        await service.add_site("www.c.test", "tc")
        await edge.sync()
        smuggled = b"POST /store HTTP/1.1\r\nHost: www.a.test\r\nContent-Length: 60\r\n\r\nstolen="
        raw = await edge.raw(b"POST /store HTTP/1.1\r\nHost: www.a.test\r\n"
                             b"Connection: keep-alive, Content-Length\r\n"
                             b"Content-Length: %d\r\n\r\n%b" % (len(smuggled), smuggled)
                             + b"GET /end HTTP/1.1\r\nHost: www.a.test\r\nConnection: close\r\n\r\n")
        assert statuses(raw) == [200, 200]
        victim = await edge.curl("-H", "Cookie: session=victim-secret", host="www.c.test",
                                 path="/account")
        assert victim.status == 200
        answer = victim.json()
        assert (answer["path"], answer["headers"]["Host"]) == ("/account", "www.c.test")
        assert answer["headers"]["Cookie"] == "session=victim-secret"
        assert [(r["method"], r["path"], r["body_len"]) for r in a.requests] == [
            ("POST", "/store", len(smuggled)), ("GET", "/end", 0), ("GET", "/account", 0)]


async def test_smuggled_request_cannot_pass_a_path_deny_filter(service: DirectoryService) -> None:
    async with running(service.store, service) as (edge, (a,)):
        await service.update_site("www.a.test", filters={"path_deny": [{"prefix": "/.git"}]})
        await edge.sync()
        inner = b"GET /.git/config HTTP/1.1\r\nHost: www.a.test\r\n\r\n"
        for connection in (b"content-length", b"close, Content-Length"):
            raw = await edge.raw(b"POST / HTTP/1.1\r\nHost: www.a.test\r\nConnection: %b\r\n"
                                 b"Content-Length: %d\r\n\r\n%b" % (connection, len(inner), inner)
                                 + b"GET /.git/HEAD HTTP/1.1\r\nHost: www.a.test\r\n"
                                 b"Connection: close\r\n\r\n")
            assert statuses(raw)[:1] == [200], raw[:300]
        assert (await edge.curl(path="/next")).status == 200
        paths = [r["path"] for r in a.requests]
        assert not [p for p in paths if p.startswith("/.git")], paths
        assert [r["body_len"] for r in a.requests if r["path"] == "/"] == [len(inner)] * 2


# -- what the backend sees, table-driven ------------------------------------------------------

SEEN_CASES = [
    # (headers sent besides Host: www.a.test, body, {backend header: value or None = absent})
    ([b"Connection: Host"], b"", {"Host": "www.a.test"}),
    ([b"Connection: content-length", b"Content-Length: 3"], b"abc", {"Content-Length": "3"}),
    ([b"Connection: Transfer-Encoding", b"Transfer-Encoding: chunked"], b"3\r\nabc\r\n0\r\n\r\n",
     {"Transfer-Encoding": "chunked"}),
    ([b"Connection: X-Forwarded-For, X-Real-IP, Forwarded, X-Forwarded-Host"], b"",
     {"X-Forwarded-For": "127.0.0.1", "X-Real-IP": "127.0.0.1", "X-Forwarded-Host": "www.a.test",
      "Forwarded": 'for=127.0.0.1;host="www.a.test";proto=http'}),
    ([b"Connection: x-secret", b"X-Secret: 1", b"X-Kept: 2"], b"", {"X-Secret": None, "X-Kept": "2"}),
    ([b"X_Forwarded_For: 6.6.6.6", b"X_Real_IP: 6.6.6.6", b"X_Forwarded_Host: evil",
      b"X_Forwarded_Proto: https", b"User_Agent: x", b"Content_Length: 9", b"X-Forwarded_For: 6.6.6.6",
      b"X_Custom: kept"], b"",
     {"X_Forwarded_For": None, "X_Real_IP": None, "X_Forwarded_Host": None,
      "X_Forwarded_Proto": None, "User_Agent": None, "Content_Length": None,
      "X-Forwarded_For": None, "X_Custom": "kept",
      "X-Forwarded-For": "127.0.0.1"}),
    ([b'Forwarded: for=6.6.6.6;host="evil";proto=https', b"X-Forwarded-Proto: https"], b"",
     {"Forwarded": 'for=127.0.0.1;host="www.a.test";proto=http', "X-Forwarded-Proto": "http"}),
]


async def test_what_the_backend_sees(service: DirectoryService) -> None:
    async with running(service.store, service) as (edge, (a,)):
        for headers, body, expected in SEEN_CASES:
            raw = await edge.raw(b"POST /seen HTTP/1.1\r\nHost: www.a.test\r\n"
                                 + b"".join(h + b"\r\n" for h in headers)
                                 + (b"" if b"Transfer" in b"".join(headers) else
                                    b"" if body else b"Content-Length: 0\r\n")
                                 + b"\r\n" + body + b"GET /end HTTP/1.1\r\nHost: www.a.test\r\n"
                                 b"Connection: close\r\n\r\n")
            assert statuses(raw) == [200, 200], (headers, raw[:300])
            got = json.loads(raw.split(b"\r\n\r\n", 1)[1].split(b"HTTP/1.1", 1)[0])
            assert a.requests[-1]["path"] == "/end"
            assert got["path"] == "/seen", headers
            for name, value in expected.items():
                assert got["headers"].get(name) == value, (headers, name, got["headers"])
            assert got["body_len"] == (3 if body else 0)


# -- Host syntax ------------------------------------------------------------------------------

HOST_CASES = [
    # (Host header bytes, status, Host / X-Forwarded-Host the backend gets)
    (b"www.a.test", 200, "www.a.test"),
    (b"WWW.A.Test", 200, "www.a.test"),
    (b"www.a.test.", 200, "www.a.test"),
    (b"www.a.test:8080", 200, "www.a.test:8080"),
    (b"www.a.test:08080", 200, "www.a.test:8080"),
    (b"Shop.A.Test.:80", 200, "shop.a.test:80"),
    ("bücher.test".encode(), 200, "xn--bcher-kva.test"),
    (b"XN--BCHER-KVA.TEST", 200, "xn--bcher-kva.test"),
    (b"www.a.test:@evil.example", 400, None),
    (b"www.a.test:x/../evil", 400, None),
    (b"www.a.test:<script>", 400, None),
    (b"www.a.test:", 400, None),
    (b"www.a.test:80:81", 400, None),
    (b"www.a.test:99999", 400, None),
    (b"www.a.test:-80", 400, None),
    (b"www.a.test:\\", 400, None),
    (b'www.a.test:"', 400, None),
    (b"evil.example@www.a.test", 400, None),
    (b"user:pw@www.a.test", 400, None),
    (b"www.a.test/evil", 400, None),
    (b"www.a.test?x", 400, None),
    (b"www.a.test#x", 400, None),
    (b"www.a.test evil", 400, None),
    (b"www.a.test\tevil", 400, None),
    (b"www.a.test,www.b.test", 400, None),
    (b"www.a.test%2f", 400, None),
    (b"\xff\xfe.test", 400, None),
    (b".", 400, None),
    (b":80", 400, None),
    (b"[::1", 400, None),
    (b"[fe80::1%eth0]", 400, None),
    (b"[::1]x", 400, None),
    (b"[::1]", 404, None),
    (b"[::1]:80", 404, None),
    (b"127.0.0.1", 404, None),
    (b"127.0.0.1:80", 404, None),
    (b"bad_host.test", 404, None),
    (b"www..a.test", 404, None),
    (b"", 404, None),
]


async def test_host_header_syntax(service: DirectoryService) -> None:
    """A port is digits; no userinfo, path, space, comma or control character; the backend
    gets the Host normalised as the directory spells names (and X-Forwarded-Host with it)."""
    async with running(service.store, service) as (edge, (a,)):
        await service.add_site("bücher.test", "ta")
        await edge.sync()
        for host, status, forwarded in HOST_CASES:
            before = len(a.requests)
            for _ in range(2):  # the second request takes the warm route path
                raw = await edge.raw(b"GET /h HTTP/1.1\r\nHost: " + host
                                     + b"\r\nConnection: close\r\n\r\n")
                assert statuses(raw) == [status], (host, raw[:200])
            if forwarded is None:
                assert len(a.requests) == before, host
                continue
            for seen in a.requests[-2:]:
                assert seen["headers"]["Host"] == forwarded, host
                assert seen["headers"]["X-Forwarded-Host"] == forwarded, host
                assert seen["headers"]["Forwarded"] == f'for=127.0.0.1;host="{forwarded}";proto=http'


ABSOLUTE_CASES = [
    # (request target, Host, status, path the backend gets)
    (b"http://www.a.test/p?q=1", b"www.a.test", 200, "/p?q=1"),
    (b"HTTP://WWW.A.TEST./p", b"www.a.test", 200, "/p"),
    (b"http://www.a.test:8080/p", b"www.a.test:8080", 200, "/p"),
    (b"http://www.a.test?x=1", b"www.a.test", 200, "/?x=1"),
    (b"http://www.a.test:8081/p", b"www.a.test:8080", 400, None),
    (b"http://evil@www.a.test/p", b"www.a.test", 400, None),
    (b"http://www.a.test@evil.example/p", b"www.a.test", 400, None),
    (b"http://www.b.test/p", b"www.a.test", 400, None),
    (b"ftp://www.a.test/p", b"www.a.test", 400, None),
    (b"http://www.a.test:x/p", b"www.a.test", 400, None),
]


async def test_absolute_form_authority_must_be_the_host(service: DirectoryService) -> None:
    async with running(service.store, service, backends=2) as (edge, (a, b)):
        for target, host, status, path in ABSOLUTE_CASES:
            before = len(a.requests)
            raw = await edge.raw(b"GET %b HTTP/1.1\r\nHost: %b\r\nConnection: close\r\n\r\n"
                                 % (target, host))
            assert statuses(raw) == [status], (target, raw[:200])
            if path is None:
                assert len(a.requests) == before, target
            else:
                assert a.requests[-1]["path"] == path
        assert b.requests == []


# -- request line -----------------------------------------------------------------------------


@pytest.mark.parametrize("allow", [False, True])
async def test_trace_refused_unless_allowed(service: DirectoryService, allow: bool) -> None:
    """TRACE echoes the request (cookies, credentials) back to the page that sent it."""
    request = (b"TRACE /t HTTP/1.1\r\nHost: www.a.test\r\nCookie: s=secret\r\n"
               b"Connection: close\r\n\r\n")
    async with running(service.store, service, http=http_config(allow_trace=allow)) as (edge, (a,)):
        raw = await edge.raw(request)
        if not allow:
            assert statuses(raw) == [405]
            assert b"\r\nAllow: " in raw and b"secret" not in raw
            assert a.requests == []
        else:
            assert statuses(raw) == [200]
            assert a.requests[-1]["method"] == "TRACE"


@pytest.mark.parametrize("version", [b"2.0", b"0.9"])
async def test_http_versions_other_than_1_get_505(service: DirectoryService, version: bytes) -> None:
    async with running(service.store, service) as (edge, (a,)):
        for connection in (b"", b"Connection: keep-alive\r\n"):
            raw = await edge.raw(b"GET / HTTP/%b\r\nHost: www.a.test\r\n%b\r\n" % (version, connection))
            assert statuses(raw) == [505]
        assert a.requests == []
        r = await edge.curl("--http1.0")
        assert r.status == 200 and a.requests[-1]["version"] == "1.0"


async def test_request_line_the_backend_gets_is_rebuilt(service: DirectoryService) -> None:
    """llhttp reads ``GET  /x`` (two spaces) as ``GET /x``; the backend gets our request line,
    never the client's bytes, so it cannot read the line differently."""
    async with running(service.store, service) as (edge, (a,)):
        raw = await edge.raw(b"GET  /x?y=1 HTTP/1.1\r\nHost: www.a.test\r\nConnection: close\r\n\r\n")
        assert statuses(raw) == [200]
        assert (a.requests[-1]["method"], a.requests[-1]["path"]) == ("GET", "/x?y=1")


# -- sans-IO ----------------------------------------------------------------------------------


def test_parse_host_and_authority() -> None:
    assert parse_host(b"WWW.A.TEST.:0443") == Authority("www.a.test", 443)
    assert parse_host(b"[0:0::1]:80") == Authority("[::1]", 80, ip=True)
    assert parse_host(b"www.a.test:@evil") is None
    assert parse_authority(b"https://www.a.test") == (Authority("www.a.test", None), b"/")
    assert parse_authority(b"http://u@www.a.test/") is None


def test_forwarded_value_quotes_per_rfc7239() -> None:
    assert forwarded_value(b"192.0.2.1", b"www.a.test", b"https") == (
        b'for=192.0.2.1;host="www.a.test";proto=https')
    assert forwarded_value(b"2001:db8::1", b"www.a.test:8080", b"http") == (
        b'for="[2001:db8::1]";host="www.a.test:8080";proto=http')
    assert forwarded_value(b"192.0.2.1", b'a"b\\c', b"http") == (
        b'for=192.0.2.1;host="a\\"b\\\\c";proto=http')
