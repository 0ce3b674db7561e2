"""The mutation sets of real request-smuggling scanners, replayed against the HTTP edge.

defparam/smuggler (configs/default.py, doubles.py, exhaustive.py) hides ``Transfer-Encoding:
chunked`` behind a byte (a control, a space, obs-text) before or after the name, around the
colon or after the value, or behind a bare CR/LF in a neighbouring header; its probes are the
TE.CL one (``0\\r\\n\\r\\nX`` with a Content-Length of 5/6) and the CL.TE one (one chunk ``Z``
with a Content-Length of 4/11). PortSwigger's http-request-smuggler (DesyncBox) adds more
spellings of the name and value and its Content-Length games; BishopFox's h2csmuggler asks for
an h2c upgrade. Each mutation carries a body that would smuggle a request for the other
tenant's site if the edge and a backend framed it differently; the same mutations also go in
as HTTP/2 fields over h2c, which the edge downgrades to HTTP/1.1.

The backends parse with h11 (what a strict HTTP/1.1 server reads). Each case must end one of
two ways: the client gets one 4xx/5xx and no backend sees a byte, or site a's backend reads
exactly one request for www.a.test whose body is the client's body, and the forwarded head
holds no second spelling of Transfer-Encoding a lenient backend could act on."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from edge.directory.secrets import KeyBox
from edge.directory.service import DirectoryService
from tests.test_http2 import h2_edge
from tests.test_http2_verify import RawBackend, probe
from tests.test_http_support import Edge, raw_exchange, start_edge, statuses


@pytest.fixture
def database_url(sqlite_url: str) -> str:
    """Parsing does not depend on the store: SQLite only."""
    return sqlite_url


@dataclass
class RawSites:
    edge: Edge
    a: RawBackend
    b: RawBackend

    def reset(self) -> None:
        """Forget what the backends read (before the next case on the same edge)."""
        for backend in (self.a, self.b):
            backend.requests.clear()
            backend.errors.clear()
            backend.raw.clear()


@contextlib.asynccontextmanager
async def raw_sites(service: DirectoryService) -> AsyncIterator[RawSites]:
    """Tenant ta with www.a.test on backend a, tenant tb with www.b.test on backend b; both
    backends are h11 parsers that record what they read."""
    a, b = await RawBackend().start(), await RawBackend().start()
    for name, backend in (("a", a), ("b", b)):
        await service.add_host(f"host-{name}", "127.0.0.1", http_port=backend.port)
        await service.add_tenant(f"t{name}", f"host-{name}")
        await service.add_site(f"www.{name}.test", f"t{name}")
    edge = await start_edge(service.store, service)
    try:
        yield RawSites(edge, a, b)
    finally:
        await edge.proxy.drain()
        await edge.proxy.close()
        await a.stop()
        await b.stop()


SMUGGLED = b"GPOST /smuggled HTTP/1.1\r\nHost: www.b.test\r\n\r\n"
BODIES = {
    # smuggler's TE.CL probe, then a whole request after the last chunk
    "tecl": b"0\r\n\r\n" + SMUGGLED,
    # smuggler's CL.TE probe: one chunk, the last chunk, and the same smuggled request
    "clte": b"1\r\nZ\r\n0\r\n\r\n" + SMUGGLED,
}


def _mutations() -> dict[str, bytes]:
    """Header lines that spell Transfer-Encoding: chunked the way the scanners do."""
    te = "Transfer-Encoding"
    m: dict[str, str] = {
        "nameprefix1": f" {te}: chunked", "tabprefix1": f"{te}:\tchunked",
        "tabprefix2": f"{te}\t:\tchunked", "spacejoin1": "Transfer Encoding: chunked",
        "underjoin1": "Transfer_Encoding: chunked", "smashed": "Transfer Encoding:chunked",
        "space1": f"{te} : chunked", "valueprefix1": f"{te}:  chunked",
        "vertprefix1": f"{te}:\x0bchunked", "commaCow": f"{te}: chunked, cow",
        "cowComma": f"{te}: cow, chunked", "contentEnc": "Content-Encoding: chunked",
        "linewrapped1": f"{te}:\n chunked", "linewrapped-crlf": f"{te}:\r\n chunked",
        "quoted": f'{te}: "chunked"', "aposed": f"{te}: 'chunked'", "lazygrep": f"{te}: chunk",
        "sarcasm": "TrAnSFer-EnCODinG: cHuNkeD", "yelling": "TRANSFER-ENCODING: CHUNKED",
        "0dsuffix": f"{te}: chunked\r", "tabsuffix": f"{te}: chunked\t",
        "revdualchunk": f"{te}: cow\r\n{te}: chunked", "dualchunk": f"{te}: chunked\r\n{te}: cow",
        "0dspam": "Transfer\r-Encoding: chunked", "nested": f"{te}: cow chunked bar",
        "spaceFF": f"{te}:\xffchunked", "accentCH": f"{te}: ch\x96nked",
        "accentTE": "Transf\x82r-Encoding: chunked", "x-rout": f"X:X\r{te}: chunked",
        "x-nout": f"X:X\n{te}: chunked", "chunked-identity": f"{te}: chunked, identity",
        "identity-chunked": f"{te}: identity, chunked", "chunked-comma": f"{te}: chunked,",
        "comma-chunked": f"{te}: , chunked", "chunkedchunked": f"{te}: chunked, chunked",
        "te-x-te": f"{te}: chunked\r\nX: y\r\n{te}: chunked",
        "chunked-semicolon": f"{te}: chunked;q=1", "nul-value": f"{te}: chunked\x00",
        "cl-dup": "Content-Length: 0",  # a second, different Content-Length
    }
    # byte-around-the-name families from configs/default.py, doubles.py and exhaustive.py
    for i in [*range(0x01, 0x21), *range(0x7F, 0x100)]:
        c = chr(i)
        m[f"midspace-{i:02x}"] = f"{te}:{c}chunked"
        m[f"postspace-{i:02x}"] = f"{te}{c}: chunked"
        m[f"prespace-{i:02x}"] = f"{c}{te}: chunked"
        m[f"endspace-{i:02x}"] = f"{te}: chunked{c}"
        m[f"xprespace-{i:02x}"] = f"X: X{c}{te}: chunked"
        m[f"endspacex-{i:02x}"] = f"{te}: chunked{c}X: X"
        m[f"rxprespace-{i:02x}"] = f"X: X\r{c}{te}: chunked"
        m[f"xnprespace-{i:02x}"] = f"X: X{c}\n{te}: chunked"
        m[f"endspacerx-{i:02x}"] = f"{te}: chunked\r{c}X: X"
        m[f"endspacexn-{i:02x}"] = f"{te}: chunked{c}\nX: X"
        m[f"{i:02x}-{i:02x}-XX-XX"] = f"{c}{te}{c}: chunked"
        m[f"{i:02x}-XX-{i:02x}-XX"] = f"{c}{te}:{c}chunked"
        m[f"{i:02x}-XX-XX-{i:02x}"] = f"{c}{te}: chunked{c}"
        m[f"XX-{i:02x}-{i:02x}-XX"] = f"{te}{c}:{c}chunked"
        m[f"XX-{i:02x}-XX-{i:02x}"] = f"{te}{c}: chunked{c}"
        m[f"XX-XX-{i:02x}-{i:02x}"] = f"{te}:{c}chunked{c}"
    m.update(_portswigger(te))
    return {name: line.encode("latin-1") for name, line in m.items()}


def _portswigger(te: str) -> dict[str, str]:
    """PortSwigger http-request-smuggler's (DesyncBox) Transfer-Encoding permutations not
    already in smuggler's lists ("^~" is its CRLF inside an HTTP/2 field)."""
    m = {
        "ps-nameprefix2": f"Foo: bar\r\n\t{te}: chunked", "ps-nospace1": f"{te}:chunked",
        "ps-doublewrapped": f"{te}:\r\n \r\n chunked", "ps-gareth1": f"{te}\n : chunked",
        "ps-badsetupCR": f"Foo: bar\r{te}: chunked", "ps-badsetupLF": f"Foo: bar\n{te}: chunked",
        "ps-vertwrap": f"{te}: \n\x0bchunked", "ps-tabwrap": f"{te}: \r\n\tchunked",
        "ps-multiCase": "tRANSFER-ENCODING: chunked", "ps-0dwrap": f"Foo: bar\r\n\r{te}: chunked",
        "ps-connection": f"Connection: {te}\r\n{te}: chunked", "ps-spjunk": f"{te} x: chunked",
        "ps-backslash": "Transfer\\Encoding: chunked", "ps-unispace": f"{te}:\xa0chunked",
        "ps-nel": f"{te}\x85: chunked", "ps-nbsp": f"{te}\xa0: chunked",
        "ps-shy2": f"{te}\xad: chunked", "ps-shy": "Transfer\xadEncoding: chunked",
        "ps-nested": f"{te}: identity, chunked, identity", "ps-encode": "Transfer-%45ncoding: chunked",
        "ps-bodysplit": f"Foo: barn\n\n{te}: chunked", "ps-badwrap": f"X-Blah-Ignore: \r\n {te}: chunked",
        "ps-h2colon": f"{te}`chunked : chunked", "ps-h2name": f"{te}`chunked\r\nxz: x",
        "ps-h2space": f"{te} chunked : chunked", "ps-h2prefix": f":{te.lower()}: chunked",
        "ps-http2hide": f"Foo: b\r\n{te}: chunked\r\nx: x",
        "ps-h2auth": f":authority: www.a.test:443\r\n{te}: chunked\r\nx: x",
        "ps-h2path": f":path: /?cb=1 HTTP/1.1\r\n{te}: chunked\r\nx: x",
        "ps-h2method": f":method: POST /?cb=1 HTTP/1.1\r\n{te}: chunked\r\nx: x",
        "ps-qencode": f"{te}: =?iso-8859-1?B?Y2h1bmtlZA==?=",
        "ps-qencodeutf": f"{te}: =?UTF-8?B?Y2h1bmtlZA==?=",
    }
    # its spacefix1/prefix1/namesuffix1/suffix1 families: one special byte in four places
    for i in (0x00, 0x09, 0x0B, 0x0C, 0x0D, 0x0A, 0x20, 0x7F, 0x85, 0xA0, 0xFF):
        c = chr(i)
        m[f"ps-spacefix1-{i:02x}"] = f"{te}:chunked{c}"
        m[f"ps-prefix1-{i:02x}"] = f"{te}: {c}chunked"
        m[f"ps-namesuffix1-{i:02x}"] = f"{te}{c}: chunked"
        m[f"ps-suffix1-{i:02x}"] = f"{te}: chunked{c}"
    return m


MUTATIONS = _mutations()


def smuggling_request(gadget: bytes, body: bytes, *, before: bool = True,
                      cl_line: bytes | None = None, method: bytes = b"POST") -> bytes:
    """smuggler's request template: the gadget line before (or after) Host, then a
    Content-Length counting the whole body (or ``cl_line``)."""
    lines = [method + b" /?cb=1 HTTP/1.1", gadget, b"Host: www.a.test"]
    if not before:
        lines[1:3] = lines[2:0:-1]
    lines += [b"Content-Type: application/x-www-form-urlencoded",
              cl_line or b"Content-Length: %d" % len(body), b"Connection: close"]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def folded_names(head: bytes) -> list[bytes]:
    """The head's header names as a lenient parser might see them: lines split at any CR or
    LF, names lower-cased with everything but letters dropped (``Transfer_Encoding`` is
    ``HTTP_TRANSFER_ENCODING`` to a CGI/WSGI backend)."""
    lines = re.split(rb"[\r\n]+", head)[1:]
    return [re.sub(rb"[^a-z]", b"", line.partition(b":")[0].lower()) for line in lines]


async def check_one_or_nothing(sites: RawSites, request: bytes, body: bytes,
                               method: bytes = b"POST") -> None:
    try:
        raw = await raw_exchange(sites.edge.port, request, timeout=10)
    except TimeoutError:
        pytest.fail("the edge neither answered nor closed")
    got = statuses(raw)
    # Let the backend parse all it got: a forwarded part of a refused request, or bytes after
    # the one request it answered (a second request, or a parse error, is what a desync leaves).
    await asyncio.sleep(0.02 if got == [200] else 0.005)
    a, b = sites.a, sites.b
    assert a.errors == [] and b.errors == [], (a.errors, b.errors, a.raw)
    assert b.requests == [] and b.raw in ([], [b""])  # nothing ever reaches the other tenant
    if not a.requests:
        assert len(got) == 1 and 400 <= got[0] < 600, raw[:300]
        assert b"".join(a.raw) == b"", a.raw
        return
    assert got == [200], raw[:300]
    assert len(a.requests) == 1, [(r.method, r.target) for r in a.requests]
    seen = a.requests[0]
    assert (seen.method, seen.target) == (method, b"/?cb=1")
    assert [v for n, v in seen.headers if n == b"host"] == [b"www.a.test"]
    assert seen.body == body  # the smuggled request stayed body
    # one framing header, and no other spelling of Transfer-Encoding in what was forwarded
    head = b"".join(a.raw).partition(b"\r\n\r\n")[0]
    framing = [n for n, _ in seen.headers if n in (b"content-length", b"transfer-encoding")]
    assert len(framing) == 1
    assert folded_names(head).count(b"transferencoding") == framing.count(b"transfer-encoding"), \
        head


def family(name: str) -> str:
    """The scanner's family of a mutation: its name with the byte(s) as "%02x"."""
    if not re.fullmatch(r"[\w-]+?(-[0-9a-fX]{2})+|([0-9a-fX]{2}-){3}[0-9a-fX]{2}", name):
        return name
    return "-".join("%02x" if re.fullmatch(r"[0-9a-f]{2}", part) else part
                    for part in name.split("-"))


FAMILIES: dict[str, list[str]] = {}
for _name in MUTATIONS:
    FAMILIES.setdefault(family(_name), []).append(_name)


async def failures(sites: RawSites, names: list[str], body: bytes, *, before: bool) -> list[str]:
    """Each mutation on a fresh connection; the names (and why) of those that fail."""
    failed = []
    for name in names:
        sites.reset()
        try:
            await check_one_or_nothing(
                sites, smuggling_request(MUTATIONS[name], body, before=before), body)
        except AssertionError as exc:
            failed.append(f"{name}: {str(exc)[:300]}")
    return failed


@pytest.mark.parametrize("probe", list(BODIES))
@pytest.mark.parametrize("fam", list(FAMILIES))
async def test_smuggler_mutations_are_one_request_or_refused(service: DirectoryService, fam: str,
                                                             probe: str) -> None:
    async with raw_sites(service) as sites:
        failed = await failures(sites, FAMILIES[fam], BODIES[probe], before=True)
        failed += await failures(sites, FAMILIES[fam][:3], BODIES[probe], before=False)
    assert failed == []


@pytest.mark.parametrize("fam", [f for f in FAMILIES if "%" not in f])
async def test_short_content_length_leaves_a_client_error(service: DirectoryService,
                                                          fam: str) -> None:
    """smuggler's timing probes declare fewer bytes than they send (CL.TE: 4 of the chunked
    body, TE.CL: 5 of ``0\\r\\n\\r\\nX``): what follows the declared body is the client's
    next request on its own connection, refused there; never bytes for a backend."""
    async with raw_sites(service) as sites:
        for body, length in ((BODIES["clte"], 4), (BODIES["tecl"], 5)):
            sites.reset()
            request = smuggling_request(MUTATIONS[fam], body,
                                        cl_line=b"Content-Length: %d" % length)
            raw = await raw_exchange(sites.edge.port, request, timeout=10)
            await asyncio.sleep(0.005)
            got = statuses(raw)
            assert got and all(400 <= code < 600 for code in got[1:]), raw[:300]
            assert sites.a.errors == [] and sites.b.raw in ([], [b""])
            assert [r.body for r in sites.a.requests] == ([body[:length]] if got[0] == 200 else [])


# PortSwigger's Content-Length permutations (n: the body's length) and "connection" for CL.
CL_LINES = {
    "CL-plus": b"Content-Length: +%d", "CL-minus": b"Content-Length: -%d",
    "CL-pad": b"Content-Length: 0%d", "CL-bigpad": b"Content-Length: 00000000000%d",
    "CL-spacepad": b"Content-Length: 0 %d", "CL-e": b"Content-Length: %de0",
    "CL-dec": b"Content-Length: %d.0", "CL-commaprefix": b"Content-Length: 0, %d",
    "CL-commasuffix": b"Content-Length: %d, 0", "CL-tab": b"Content-Length:\t%d\t",
    "CL-connection": b"Connection: Content-Length\r\nContent-Length: %d",
    "CL-underjoin": b"Content_Length: 0\r\nContent-Length: %d",
    "CL-expect": b"Expect: 100-continue\r\nContent-Length: %d",
    "CL-expect-obfs": b"Expect: x 100-continue\r\nContent-Length: %d",
}


@pytest.mark.parametrize("cl", list(CL_LINES))
async def test_content_length_permutation_is_one_request_or_refused(service: DirectoryService,
                                                                     cl: str) -> None:
    body = BODIES["tecl"]
    async with raw_sites(service) as sites:
        request = smuggling_request(b"X-Probe: 1", body, cl_line=CL_LINES[cl] % len(body))
        await check_one_or_nothing(sites, request, body)


@pytest.mark.parametrize("method", [b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE"])
@pytest.mark.parametrize("gadget", ["vanilla", "nospace1", "space1", "ps-connection"])
async def test_te_cl_with_other_methods(service: DirectoryService, method: bytes,
                                        gadget: str) -> None:
    """PortSwigger's get/head/options permutations: a body on a method that seldom has one."""
    line = MUTATIONS.get(gadget, b"Transfer-Encoding: chunked")
    async with raw_sites(service) as sites:
        for body in BODIES.values():
            sites.reset()
            await check_one_or_nothing(sites, smuggling_request(line, body, method=method), body,
                                       method)


def h2_field(gadget: bytes) -> tuple[str, str]:
    """A mutation as one HTTP/2 field: the name before the first colon (lower case, as HTTP/2
    wants), the value after it less the one space HTTP/1 puts there; its CR/LF/controls stay
    in, as a downgrade attack sends them."""
    name, _, value = gadget.partition(b":")
    value = value.removeprefix(b" ")
    return name.lower().decode("latin-1"), value.decode("latin-1")


async def h2_failures(sm: Any, names: list[str], body: bytes) -> list[str]:
    """Each mutation as a field of an h2c POST for www.a.test with ``body``; the names (and
    why) of those the backend reads as anything but that one request, or that are refused
    after something reached a backend."""
    edge, a, b = sm
    failed = []
    for name in names:
        for backend in (a, b):
            backend.requests.clear()
            backend.errors.clear()
            backend.raw.clear()
        headers = (*H2_BASE, ("content-length", str(len(body))), h2_field(MUTATIONS[name]))
        out = await probe(edge, headers, body)
        await asyncio.sleep(0.005)
        try:
            assert a.errors == [] and b.errors == [] and b.requests == []
            if out.status != 200:
                assert a.requests == [] and (out.reset or 400 <= out.status < 600), out
                continue
            assert len(a.requests) == 1 and a.requests[0].body == body
            head = b"".join(a.raw).partition(b"\r\n\r\n")[0]
            assert b"transferencoding" not in folded_names(head), head
        except AssertionError as exc:
            failed.append(f"{name}: {str(exc)[:300]}")
    return failed


@pytest.fixture
async def sm(service: DirectoryService, keybox: KeyBox, tmp_path: Path) -> AsyncIterator[Any]:
    """The h2c edge of tests/test_http2.py with both sites on h11 raw backends."""
    async with h2_edge(service, keybox, tmp_path) as edge:
        a, b = await RawBackend().start(), await RawBackend().start()
        await service.update_host("host-a", http_port=a.port)
        await service.update_host("host-b", http_port=b.port)
        await edge.feed.poll_once()
        try:
            yield edge, a, b
        finally:
            await a.stop()
            await b.stop()


H2_BASE = ((":method", "POST"), (":scheme", "http"), (":authority", "www.a.test"),
           (":path", "/?cb=1"))


@pytest.mark.parametrize("fam", list(FAMILIES))
async def test_smuggler_mutations_over_h2c_are_one_request_or_refused(sm: Any, fam: str) -> None:
    """The same mutations as HTTP/2 fields, downgraded to HTTP/1.1 for the backend."""
    assert await h2_failures(sm, FAMILIES[fam], BODIES["tecl"]) == []


H2C_UPGRADES = {
    # h2csmuggler's request, and its --upgrade-only variant
    "h2csmuggler": b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n"
                   b"Connection: Upgrade, HTTP2-Settings\r\n",
    "upgrade-only": b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n"
                    b"Connection: Upgrade\r\n",
    "no connection": b"Upgrade: h2c\r\n",
}
# What h2csmuggler sends once it has its 101: the HTTP/2 preface and a SETTINGS frame.
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00"


@pytest.mark.parametrize("upgrade", list(H2C_UPGRADES))
async def test_h2c_upgrade_is_served_as_plain_http1(service: DirectoryService,
                                                    upgrade: str) -> None:
    """The edge never passes on an h2c upgrade (a tunnel past every per-request check): the
    backend reads one plain GET with no Upgrade or HTTP2-Settings, and the preface that
    follows is a bad request of the client's, never bytes for the backend."""
    async with raw_sites(service) as sites:
        raw = await raw_exchange(sites.edge.port, b"GET / HTTP/1.1\r\nHost: www.a.test\r\n"
                                 + H2C_UPGRADES[upgrade] + b"\r\n" + H2_PREFACE, timeout=10)
        assert statuses(raw)[0] == 200 and b" 101 " not in raw
        assert sites.a.errors == [] and sites.b.requests == []
        assert [(r.method, r.target) for r in sites.a.requests] == [(b"GET", b"/")]
        names = {name for name, _ in sites.a.requests[0].headers}
        assert not names & {b"upgrade", b"http2-settings", b"connection"}
        assert b"PRI" not in b"".join(sites.a.raw)


async def test_backend_101_to_a_request_without_upgrade_is_502(service: DirectoryService) -> None:
    """A backend that accepts h2c (answers 101 even though the edge dropped the Upgrade)
    gets a 502 for the client and none of the client's later bytes."""
    heads: list[bytes] = []
    after: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        heads.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
                     b"Upgrade: h2c\r\n\r\n")
        with contextlib.suppress(ConnectionError, TimeoutError):
            after.append(await asyncio.wait_for(reader.read(65536), 5))
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    await service.add_host("h2c", "127.0.0.1", http_port=server.sockets[0].getsockname()[1])
    await service.add_tenant("th2c", "h2c")
    await service.add_site("www.h2c.test", "th2c")
    edge = await start_edge(service.store, service)
    try:
        raw = await raw_exchange(edge.port, b"GET / HTTP/1.1\r\nHost: www.h2c.test\r\n"
                                 + H2C_UPGRADES["h2csmuggler"] + b"\r\n" + H2_PREFACE
                                 + b"GET /next HTTP/1.1\r\nHost: www.h2c.test\r\n\r\n", timeout=10)
        got = statuses(raw)
        # the preface after it: a bad request (answered in its turn, or cut by the close)
        assert got[0] == 502 and all(400 <= code < 600 for code in got[1:]) and b" 101 " not in raw
        assert len(heads) == 1 and b"\nupgrade:" not in heads[0].lower()
        assert b"".join(after) == b""
    finally:
        await edge.proxy.drain()
        await edge.proxy.close()
        server.close()
