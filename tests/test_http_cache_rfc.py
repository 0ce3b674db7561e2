"""The content cache against a real origin we control, from the RFC text, through the
running edge. Each test cites the section it checks.

Part 1 (freshness, RFC 9111 §4.2 / §3 / §5, RFC 9110 §5.6.7, RFC 9213, RFC 9211): the origin is
a raw asyncio HTTP/1.1 server whose response head per path the test writes byte for byte
(repeated fields, odd dates, Age lists), and counts what reaches it; the client side reads the
edge's answer as raw field lines, so a repeated header is seen as two lines, not one joined
value (:class:`ScriptedOrigin`, fixture ``rig``).

Part 2 (the store: revalidation, RFC 9111 §4.3; client conditionals, RFC 9110 §13; Vary,
RFC 9111 §4.1; invalidation by unsafe methods, RFC 9111 §4.4; ranges, RFC 9110 §14; purge by
URL and tag; metrics): clients are the real curl; the origin is an aiohttp server that answers
conditionals itself (:class:`ValidatingOrigin`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from email.utils import formatdate
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from edge.directory.secrets import KeyBox, generate_key
from edge.directory.service import DirectoryService
from edge.directory.stores import store_for_url
from tests.test_http_support import Edge, raw_exchange, start_edge

SITE = "www.rfc.test"
HONEST = {"mode": "full", "ttl": {}}
"""Only the origin's headers decide (also the old code's spelling of that, so the tests that
must fail on it can run there)."""


@dataclass
class ScriptedOrigin:
    """An origin whose response head per path is set by the test (``set``)."""

    heads: dict[str, tuple[int, list[tuple[str, str]]]] = field(default_factory=dict)
    hits: dict[str, int] = field(default_factory=dict)
    requests: list[dict[str, str]] = field(default_factory=list)
    port: int = 0
    server: asyncio.Server | None = None

    def set(self, path: str, *fields: tuple[str, str], status: int = 200) -> None:
        self.heads[path] = (status, list(fields))

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                path = lines[0].split(" ")[1]
                headers = {k.strip().lower(): v.strip() for k, _, v in
                           (line.partition(":") for line in lines[1:] if line)}
                self.requests.append(headers)
                n = self.hits[path] = self.hits.get(path, 0) + 1
                status, fields = self.heads.get(path, (200, []))
                body = f"{path} #{n}".encode()
                out = [f"HTTP/1.1 {status} X", f"Content-Length: {len(body)}"]
                out += [f"{name}: {value}" for name, value in fields]
                writer.write("\r\n".join(out).encode("latin-1") + b"\r\n\r\n" + body)
                await writer.drain()
        writer.close()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


@dataclass
class Answer:
    status: int
    fields: list[tuple[str, str]]
    body: bytes

    def all(self, name: str) -> list[str]:
        return [v for k, v in self.fields if k == name]

    def one(self, name: str) -> str | None:
        values = self.all(name)
        assert len(values) <= 1, f"{name} repeated: {values}"
        return values[0] if values else None

    @property
    def x_cache(self) -> str | None:
        return self.one("x-cache")


@dataclass
class Rig:
    edge: Edge
    origin: ScriptedOrigin
    service: DirectoryService

    async def policy(self, policy: dict[str, object]) -> None:
        await self.service.update_site(SITE, cache_policy=policy)
        await self.edge.sync()

    async def get(self, path: str, *extra: str) -> Answer:
        lines = [f"GET {path} HTTP/1.1", f"Host: {SITE}", "Connection: close", *extra]
        raw = await raw_exchange(self.edge.port, "\r\n".join(lines).encode() + b"\r\n\r\n")
        head, _, body = raw.partition(b"\r\n\r\n")
        status_line, *rest = head.decode("latin-1").split("\r\n")
        fields = [(k.strip().lower(), v.strip()) for k, _, v in (r.partition(":") for r in rest)]
        return Answer(int(status_line.split()[1]), fields, body)

    async def twice(self, path: str, *fields: tuple[str, str], status: int = 200,
                    extra: tuple[str, ...] = ()) -> tuple[Answer, Answer]:
        """Serve ``fields`` on ``path``, GET it twice; the second answer says if it was reused."""
        self.origin.set(path, *fields, status=status)
        first = await self.get(path, *extra)
        return first, await self.get(path)


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    store = store_for_url(f"sqlite:///{tmp_path / 'edge.sqlite3'}")
    await store.open()
    await store.migrate()
    service = DirectoryService(store, KeyBox.from_text(generate_key()))
    origin = ScriptedOrigin()
    await origin.start()
    await service.add_host("origin", "127.0.0.1", http_port=origin.port)
    await service.add_tenant("t", "origin")
    await service.add_site(SITE, "t", cache_policy=HONEST)
    edge = await start_edge(store, service)
    try:
        yield Rig(edge, origin, service)
    finally:
        await edge.proxy.drain()
        await edge.proxy.close()
        await origin.stop()
        await store.close()


def _date(offset: float = 0) -> str:
    return formatdate(time.time() + offset, usegmt=True)


def _reused(pair: tuple[Answer, Answer]) -> bool:
    first, second = pair
    assert first.status == second.status
    return second.body == first.body


# -- Age (RFC 9111 §4.2.3, §5.1) ------------------------------------------------------------


async def test_one_age_from_stored_age_plus_resident_time(rig: Rig) -> None:
    """RFC 9111 §4.2.3: the Age sent is the current age, corrected_initial_age plus resident
    time, in one Age field (§5.1 defines it as a singleton): the origin's ``Age: 30`` is not
    repeated beside ours."""
    first, second = await rig.twice("/age", ("Cache-Control", "max-age=3600"), ("Age", "30"))
    assert second.x_cache == "HIT" and second.body == first.body
    age = second.one("age")
    assert age is not None and 30 <= int(age) <= 40


async def test_age_list_uses_first_member(rig: Rig) -> None:
    """RFC 9111 §5.1: a list-based Age field uses its first member: ``Age: 7200, 3`` with
    max-age=3600 is already stale, not "invalid, so 0"."""
    assert not _reused(await rig.twice("/agelist", ("Cache-Control", "max-age=3600"),
                                       ("Age", "7200, 3")))


@pytest.mark.parametrize("value", ["abc", "-7200", "7200.0"])
async def test_invalid_age_is_ignored(rig: Rig, value: str) -> None:
    """RFC 9111 §5.1: an Age that is not a non-negative integer is ignored; the response is
    fresh on its max-age and served with our own Age only."""
    first, second = await rig.twice("/badage", ("Cache-Control", "max-age=3600"), ("Age", value))
    assert second.x_cache == "HIT" and second.body == first.body
    age = second.one("age")
    assert age is not None and int(age) < 10


async def test_huge_age_is_two_to_the_31(rig: Rig) -> None:
    """RFC 9111 §1.2.2: a delta-seconds too large to represent is taken as 2^31: stale."""
    assert not _reused(await rig.twice("/bigage", ("Cache-Control", "max-age=3600"),
                                       ("Age", "99999999999999999999")))


# -- Expires and HTTP-date (RFC 9110 §5.6.7, RFC 9111 §5.3, §4.2) ---------------------------

VALID_FUTURE = ["Thu, 18 Aug 2050 02:01:18 GMT", "Thursday, 18-Aug-50 02:01:18 GMT",
                "Thu Aug  8 02:01:18 2050", "THU, 18 AUG 2050 02:01:18 gmt"]
INVALID = ["Thu, 18 Aug 2050 02:01:18 UTC", "Thu, 18 Aug 2050 02:01:18 +0000",
           "Thu, 18 Aug 50 02:01:18 GMT", "Thu 18 Aug 2050 02:01:18 GMT",
           "Thu, 18  Aug  2050 02:01:18 GMT", "Thu, 18-Aug-2050 02:01:18 GMT",
           "Thu, 18 Aug 2050 02.01.18 GMT", "Thu, 18 Aug 2050 2:01:18 GMT", "0", ""]


@pytest.mark.parametrize("value", VALID_FUTURE)
async def test_future_expires_in_every_http_date_form_is_fresh(rig: Rig, value: str) -> None:
    """RFC 9110 §5.6.7: recipients accept IMF-fixdate, rfc850-date and asctime-date; RFC 9111
    §4.2: caches match them case-insensitively. A future Expires makes the response fresh."""
    assert _reused(await rig.twice("/exp", ("Expires", value)))


@pytest.mark.parametrize("value", INVALID)
async def test_invalid_expires_is_already_expired(rig: Rig, value: str) -> None:
    """RFC 9111 §5.3: a cache recipient MUST interpret an invalid date format as a time in
    the past (already expired); RFC 9110 §5.6.7 allows no other zone, no two-digit year
    outside rfc850-date, no dashes in IMF-fixdate, no extra spaces, no one-digit hour."""
    assert not _reused(await rig.twice("/badexp", ("Expires", value)))


async def test_two_expires_lines_are_expired(rig: Rig) -> None:
    """RFC 9111 §4.2.1: with more than one Expires value a cache uses the first or considers
    the response stale; we consider it stale (the joined list is not an HTTP-date)."""
    assert not _reused(await rig.twice("/twoexp", ("Expires", "Thu, 18 Aug 2050 02:01:18 GMT"),
                                       ("Expires", "Thu, 18 Aug 2050 02:01:19 GMT")))


# -- what may be stored (RFC 9111 §3, §3.5, §4.2.2, §5.2.2) ---------------------------------


@pytest.mark.parametrize("status", [302, 307, 403, 500, 503])
async def test_explicit_freshness_for_any_final_status(rig: Rig, status: int) -> None:
    """RFC 9111 §3: a response with explicit freshness (max-age) may be stored whatever its
    final status code (not only the heuristically cacheable ones)."""
    pair = await rig.twice(f"/s{status}", ("Cache-Control", "max-age=3600"), status=status)
    assert pair[0].status == status and _reused(pair)


async def test_heuristic_freshness_only_where_allowed(rig: Rig) -> None:
    """RFC 9111 §4.2.2: a cache may assign a heuristic lifetime (a fraction of the time since
    Last-Modified) to heuristically cacheable codes (RFC 9110 §15.1) without explicit
    freshness; never to others (302); only where the site policy allows heuristics."""
    modified = ("Last-Modified", _date(-10 * 86400))
    await rig.policy({"mode": "standard"})
    assert _reused(await rig.twice("/h200", modified, ("Date", _date())))
    assert not _reused(await rig.twice("/h302", modified, ("Date", _date()), status=302))
    assert not _reused(await rig.twice("/hnolm", ("Date", _date())))  # nothing to guess from
    await rig.policy({"mode": "standard", "heuristic_fraction": 0})
    assert not _reused(await rig.twice("/h200off", modified))
    await rig.policy(HONEST)  # the operator modes guess nothing unless asked
    assert not _reused(await rig.twice("/h200full", modified))


async def test_heuristic_lifetime_is_bounded(rig: Rig) -> None:
    """RFC 9111 §4.2.2 (a fraction of the Last-Modified age) with the policy's upper bound:
    a year-old Last-Modified with heuristic_max=1 gives one second, not 36 days."""
    await rig.policy({"mode": "standard", "heuristic_max": 1})
    rig.origin.set("/hb", ("Last-Modified", _date(-365 * 86400)))
    await rig.get("/hb")
    await asyncio.sleep(1.2)
    assert (await rig.get("/hb")).x_cache == "MISS"


async def test_authorization_needs_public_s_maxage_or_must_revalidate(rig: Rig) -> None:
    """RFC 9111 §3.5: a response to a request with Authorization is reused only if it has
    public, s-maxage or must-revalidate; the authorised request itself always reaches the
    origin (its answer may be that user's)."""
    auth = ("Authorization: Basic dTpw",)
    assert not _reused(await rig.twice("/a0", ("Cache-Control", "max-age=3600"), extra=auth))
    for path, cc in (("/a1", "public, max-age=3600"), ("/a2", "s-maxage=3600"),
                     ("/a3", "max-age=3600, must-revalidate")):
        assert _reused(await rig.twice(path, ("Cache-Control", cc), extra=auth)), cc
    hits = rig.origin.hits["/a1"]
    await rig.get("/a1", *auth)
    assert rig.origin.hits["/a1"] == hits + 1


@pytest.mark.parametrize("cc", ["private, max-age=3600", "no-store, max-age=3600",
                                'private="x", s-maxage=60'])
async def test_private_and_no_store_never_stored(rig: Rig, cc: str) -> None:
    """RFC 9111 §5.2.2.5 / §5.2.2.7: a shared cache never stores no-store or private."""
    assert not _reused(await rig.twice("/p", ("Cache-Control", cc)))


async def test_set_cookie_never_reaches_another_client(rig: Rig) -> None:
    """A Set-Cookie is one client's: by default a response carrying one is not stored
    (``set_cookie: "no-store"``); with ``set_cookie: "strip"`` it is stored without it, the
    client whose request fetched it still gets its cookie, no other client does."""
    fields = (("Cache-Control", "max-age=3600"), ("Set-Cookie", "sid=secret"))
    assert not _reused(await rig.twice("/c1", *fields))
    await rig.policy({"mode": "standard", "set_cookie": "strip"})
    first, second = await rig.twice("/c2", *fields)
    assert first.all("set-cookie") == ["sid=secret"]
    assert second.x_cache == "HIT" and second.all("set-cookie") == []


# -- targeted Cache-Control (RFC 9213) ------------------------------------------------------


async def test_cdn_cache_control_overrides_and_is_not_forwarded(rig: Rig) -> None:
    """RFC 9213 §2.2: the targeted field we obey replaces Cache-Control for us (no-store in
    Cache-Control, max-age in CDN-Cache-Control: stored); it is consumed here, not passed on
    to clients, while Cache-Control is passed on unchanged."""
    first, second = await rig.twice("/cdn", ("Cache-Control", "no-store"),
                                    ("CDN-Cache-Control", "max-age=3600"))
    assert second.x_cache == "HIT" and second.body == first.body
    for answer in (first, second):
        assert answer.all("cdn-cache-control") == []
        assert answer.one("cache-control") == "no-store"
    # ... and the other way round: CDN-Cache-Control: no-store wins over a long max-age
    assert not _reused(await rig.twice("/cdn2", ("Cache-Control", "max-age=3600"),
                                       ("CDN-Cache-Control", "no-store")))


async def test_invalid_targeted_field_is_ignored(rig: Rig) -> None:
    """RFC 9213 §2.1: a targeted field that is not a valid Structured Fields Dictionary
    (RFC 8941) is ignored as a whole; Cache-Control decides."""
    for n, value in enumerate(("max-age=10000, &&&&&", 'max-age="10000"', "MaX-aGe=3600")):
        assert not _reused(await rig.twice(f"/bad{n}", ("Cache-Control", "no-store"),
                                           ("CDN-Cache-Control", value))), value


async def test_operator_target_outranks_cdn_cache_control(rig: Rig) -> None:
    """RFC 9213 §2.2: a cache obeys the first of its target list present in a response; the
    site's ``target`` comes before CDN-Cache-Control, and neither reaches the client."""
    await rig.policy({"mode": "standard", "target": "Edge-Cache-Control"})
    first, second = await rig.twice("/t", ("CDN-Cache-Control", "no-store"),
                                    ("Edge-Cache-Control", "max-age=3600"))
    assert second.x_cache == "HIT" and second.body == first.body
    assert not [k for k, _ in first.fields + second.fields if k.endswith("-cache-control")]


# -- status headers (RFC 9211) and the default mode -----------------------------------------


async def test_cache_status_and_x_cache_switchable(rig: Rig) -> None:
    """RFC 9211 §2: Cache-Status names the cache and says hit, or why it went forward
    (fwd=uri-miss, fwd=bypass); X-Cache says the same in the old way. Each is a site switch;
    Cache-Status is on by default in mode standard, off in the older modes."""
    fields = (("Cache-Control", "max-age=3600"),)
    first, second = await rig.twice("/old", *fields)  # mode full: X-Cache only, as before
    assert (first.one("cache-status"), second.one("cache-status")) == (None, None)
    assert second.x_cache == "HIT"
    await rig.policy({"mode": "full", "ttl": {}, "cache_status": True})
    assert (await rig.get("/old")).one("cache-status") == "edge; hit"
    await rig.policy({"mode": "standard"})
    first, second = await rig.twice("/cs", *fields)
    assert (first.one("cache-status"), first.x_cache) == ("edge; fwd=uri-miss", "MISS")
    assert (second.one("cache-status"), second.x_cache) == ("edge; hit", "HIT")
    bypass = await rig.get("/cs", "Cache-Control: no-store")
    assert bypass.one("cache-status") == "edge; fwd=bypass"
    await rig.policy({"mode": "standard", "x_cache": False})
    answer = await rig.get("/cs")
    assert answer.x_cache is None and answer.one("cache-status") == "edge; hit"
    await rig.policy({"mode": "standard", "cache_status": False})
    answer = await rig.get("/cs")
    assert answer.x_cache == "HIT" and answer.one("cache-status") is None


async def test_default_mode_stores_only_what_the_origin_allows(rig: Rig) -> None:
    """RFC 9111 §3, §4.2: a policy that names no mode is ``standard``: a response with no
    freshness information and no Last-Modified is not stored (the ``full`` override mode
    would keep it for its status TTL)."""
    await rig.policy({"stale_if_error": 60})
    assert not _reused(await rig.twice("/plain"))
    assert _reused(await rig.twice("/maxage", ("Cache-Control", "max-age=60")))
    await rig.policy({"mode": "full"})
    assert _reused(await rig.twice("/plain2"))


# == Part 2: the store (revalidation, conditionals, Vary, invalidation, ranges, purges) ==========

MODIFIED = formatdate(1_700_000_000, usegmt=True)
CONTENT = bytes(range(48, 58)) * 10  # "0123456789" x 10


@dataclass
class ValidatingOrigin:
    """An origin that validates: ETag ``"v<version>"``, a fixed Last-Modified, 304s."""

    port: int = 0
    version: int = 1
    cc: str = "max-age=100"
    seen: list[dict[str, str]] = field(default_factory=list)
    methods: list[str] = field(default_factory=list)
    hold: asyncio.Event | None = None
    runner: web.AppRunner | None = None
    extra_200: dict[str, str] = field(default_factory=dict)
    extra_304: dict[str, str] = field(default_factory=dict)
    """More fields for the 200 / the 304 of the default paths (``Age``, targeted fields)."""

    async def start(self) -> ValidatingOrigin:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        assert site._server is not None
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    @property
    def gets(self) -> int:
        return self.methods.count("GET")

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.seen.append(dict(request.headers))
        self.methods.append(request.method)
        path, query = request.path, request.query
        if request.method != "GET":
            await request.read()
            if path == "/fail":
                return web.Response(status=500, text="no")
            self.version += 1
            headers = {k: v for k, v in (("Location", query.get("location")),
                                         ("Content-Location", query.get("cl"))) if v}
            return web.Response(status=int(query.get("status", "200")), text="done",
                                headers=headers)
        if self.hold is not None:
            await self.hold.wait()
        if path == "/vary":
            lang = request.headers.get("X-Lang")
            vary_headers = {"Vary": query["on"], "Cache-Control": "max-age=100",
                            "ETag": f'"lang-{lang}"'}
            if request.headers.get("If-None-Match") == f'"lang-{lang}"':
                return web.Response(status=304, headers=vary_headers)
            return web.Response(text=f"lang={lang}", headers=vary_headers)
        if path == "/tagged":
            return web.Response(text=f"tagged {self.version}",
                                headers={"Cache-Control": "max-age=100",
                                         "Cache-Tag": query.get("tags", ""),
                                         "Surrogate-Key": query.get("keys", "")})
        etag = f'"v{self.version}"'
        validators = {"Last-Modified": MODIFIED} if path == "/lm" else {
            "ETag": etag, "Last-Modified": MODIFIED}
        if path == "/lm" and request.headers.get("If-Modified-Since") == MODIFIED:
            return web.Response(status=304, headers={"Cache-Control": self.cc, **validators})
        if path != "/lm" and request.headers.get("If-None-Match") == etag:
            return web.Response(status=304, headers={
                "Cache-Control": self.cc, "ETag": etag, "X-Extra": f"updated {len(self.seen)}",
                **self.extra_304})
        headers = {"Cache-Control": self.cc, "X-Extra": "first", **validators, **self.extra_200}
        if path == "/bytes-chunked":
            resp = web.StreamResponse(headers=headers)
            resp.enable_chunked_encoding()
            await resp.prepare(request)
            for i in range(0, len(CONTENT), 30):
                await resp.write(CONTENT[i:i + 30])
            await resp.write_eof()
            return resp
        if path == "/bytes":
            ranged = request.headers.get("Range", "").removeprefix("bytes=")
            if ranged and "," not in ranged and not ranged.startswith("-"):
                first, _, last = ranged.partition("-")
                part = CONTENT[int(first):int(last or len(CONTENT) - 1) + 1]
                return web.Response(status=206, body=part, headers={
                    **headers, "Content-Range": f"bytes {first}-{int(first) + len(part) - 1}/100"})
            return web.Response(body=CONTENT, headers=headers)
        return web.Response(text=f"doc v{self.version}", headers=headers)

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


@asynccontextmanager
async def edge_with_origin(service: DirectoryService, policy: dict[str, Any] | None = None,
                           ) -> AsyncIterator[tuple[Edge, ValidatingOrigin]]:
    origin = await ValidatingOrigin().start()
    await service.add_host("host-o", "127.0.0.1", http_port=origin.port)
    await service.add_tenant("to", "host-o")
    await service.add_site("www.o.test", "to", cache_policy=policy or HONEST)
    await service.add_site("*.o.test", "to", cache_policy=policy or HONEST)
    edge = await start_edge(service.store, service)
    try:
        yield edge, origin
    finally:
        await edge.proxy.drain()
        await edge.proxy.close()
        await origin.stop()


async def get(edge: Edge, path: str, *args: str, host: str = "www.o.test") -> Any:
    return await edge.curl(*args, host=host, path=path)


def age_all(edge: Edge, seconds: float) -> None:
    """Make every stored response ``seconds`` older (instead of sleeping through its TTL)."""
    assert edge.engine.cache is not None
    for entry in edge.engine.cache.entries():
        entry.stored_at -= seconds


# -- revalidation (RFC 9111 §4.3) -----------------------------------------------------------------


async def test_stale_response_is_revalidated_and_304_updates_it(service: DirectoryService) -> None:
    """RFC 9111 §4.3.1: a stale stored response with an ETag is validated with If-None-Match
    (and If-Modified-Since from Last-Modified); §4.3.3/§4.3.4: a 304 makes it usable again,
    its fields replacing the stored ones, and the stored content is served."""
    async with edge_with_origin(service) as (edge, origin):
        first = await get(edge, "/doc")
        assert first.headers["x-cache"] == "MISS" and first.body == b"doc v1"
        age_all(edge, 200)
        second = await get(edge, "/doc")
        assert origin.seen[-1]["If-None-Match"] == '"v1"'
        assert origin.seen[-1]["If-Modified-Since"] == MODIFIED
        assert second.status == 200 and second.body == b"doc v1"
        assert second.headers["x-cache"] == "REVALIDATED"
        assert second.headers["x-extra"] == "updated 2"  # the 304's field replaced ours
        third = await get(edge, "/doc")  # fresh again for max-age from the 304
        assert third.headers["x-cache"] == "HIT" and third.headers["x-extra"] == "updated 2"
        assert origin.gets == 2
        assert edge.engine.cache_events["revalidations"] == 1
        assert edge.engine.cache_events["revalidated"] == 1


async def test_changed_resource_replaces_the_stored_one(service: DirectoryService) -> None:
    """RFC 9111 §4.3.3: a full (200) response to the conditional request replaces the stored
    response and is what the client gets."""
    async with edge_with_origin(service) as (edge, origin):
        await get(edge, "/doc")
        origin.version = 2
        age_all(edge, 200)
        changed = await get(edge, "/doc")
        assert changed.body == b"doc v2" and changed.headers["x-cache"] == "MISS"
        assert (await get(edge, "/doc")).headers["x-cache"] == "HIT"
        assert (await get(edge, "/doc")).body == b"doc v2"


async def test_revalidated_response_ages_from_the_304(service: DirectoryService) -> None:
    """RFC 9111 §4.3.4 / §4.2.3: after a 304 the stored response's age is the 304's
    (``Age: 5`` from the origin), not the first response's plus the time it sat stored; and
    it is sent as one ``Age`` field (§5.1), the origin's never kept beside ours."""
    async with edge_with_origin(service) as (edge, origin):
        origin.extra_200 = {"Age": "90"}
        origin.extra_304 = {"Age": "5"}
        await get(edge, "/doc")
        hit = await get(edge, "/doc")
        assert hit.headers["x-cache"] == "HIT" and 90 <= int(hit.headers["age"]) <= 95
        age_all(edge, 20)  # current age 110 > max-age=100: stale
        revalidated = await get(edge, "/doc")
        assert revalidated.headers["x-cache"] == "REVALIDATED"
        assert 5 <= int(revalidated.headers["age"]) <= 10
        again = await get(edge, "/doc")
        assert again.headers["x-cache"] == "HIT" and 5 <= int(again.headers["age"]) <= 10
        assert origin.gets == 2


async def test_targeted_field_of_a_304_governs_and_is_not_forwarded(
        service: DirectoryService) -> None:
    """RFC 9213 §2.2 with RFC 9111 §4.3.4: a 304's ``CDN-Cache-Control`` updates the stored
    response like any field and then governs its freshness for us (here ``max-age=100``
    over the origin's ``Cache-Control: no-cache``); §2.1: it is ours, so no client sees it,
    neither on the revalidated answer nor on later hits."""
    async with edge_with_origin(service) as (edge, origin):
        origin.cc = "no-cache"
        origin.extra_304 = {"CDN-Cache-Control": "max-age=100"}
        assert (await get(edge, "/doc")).headers["x-cache"] == "MISS"
        revalidated = await get(edge, "/doc")  # no-cache: validated before every use
        assert revalidated.headers["x-cache"] == "REVALIDATED"
        assert "cdn-cache-control" not in revalidated.headers
        hit = await get(edge, "/doc")
        assert hit.headers["x-cache"] == "HIT" and "cdn-cache-control" not in hit.headers
        assert hit.headers["cache-control"] == "no-cache"  # passed on as the origin sent it
        assert origin.gets == 2


async def test_last_modified_only_is_revalidated_with_if_modified_since(
        service: DirectoryService) -> None:
    """RFC 9111 §4.3.1: with only a Last-Modified, the cache sends If-Modified-Since."""
    async with edge_with_origin(service) as (edge, origin):
        await get(edge, "/lm")
        age_all(edge, 200)
        again = await get(edge, "/lm")
        assert origin.seen[-1]["If-Modified-Since"] == MODIFIED
        assert "If-None-Match" not in origin.seen[-1]
        assert again.headers["x-cache"] == "REVALIDATED" and again.body == b"doc v1"


@pytest.mark.parametrize("cc", ["no-cache", "max-age=0", "max-age=0, must-revalidate"])
async def test_response_needing_revalidation_is_served_after_304(service: DirectoryService,
                                                                 cc: str) -> None:
    """RFC 9111 §5.2.2.4 (no-cache), §5.2.2.2 (must-revalidate), §4.2 (max-age=0): the
    response is stored but never used without validating it first; after each 304 the
    stored content is served (not fetched again)."""
    async with edge_with_origin(service) as (edge, origin):
        origin.cc = cc
        assert (await get(edge, "/doc")).headers["x-cache"] == "MISS"
        for _ in range(2):
            again = await get(edge, "/doc")
            assert again.headers["x-cache"] == "REVALIDATED" and again.body == b"doc v1"
            assert origin.seen[-1]["If-None-Match"] == '"v1"'
        assert origin.gets == 3


@pytest.mark.parametrize("directive", ["Cache-Control: no-cache", "Cache-Control: max-age=0",
                                       "Pragma: no-cache"])
async def test_client_no_cache_validates_the_stored_response(service: DirectoryService,
                                                             directive: str) -> None:
    """RFC 9111 §5.2.1.4 (no-cache), §5.2.1.1 (max-age=0), §5.4 (Pragma): the stored response
    is not used without validation at the origin; a conditional request that gets a 304
    serves it (the origin does not resend the content), a 200 replaces it."""
    async with edge_with_origin(service) as (edge, origin):
        await get(edge, "/doc")
        validated = await get(edge, "/doc", "-H", directive)
        assert origin.seen[-1]["If-None-Match"] == '"v1"'
        assert validated.headers["x-cache"] == "REVALIDATED" and validated.body == b"doc v1"
        origin.version = 2
        changed = await get(edge, "/doc", "-H", directive)
        assert changed.body == b"doc v2"
        assert (await get(edge, "/doc")).body == b"doc v2"  # the 200 replaced it
        assert origin.gets == 3


async def test_a_repeated_304_reuses_the_update_and_a_changed_one_is_applied(
        service: DirectoryService) -> None:
    """RFC 9111 §4.3.4: every 304 updates the stored response. A 304 that repeats the last
    one byte for byte (an origin's 304s within one second) leaves it as that one did, so the
    edge reuses that update (merge and storage terms) instead of working it out again; one
    that differs only in its Date changes only the Date (RFC 9110 §6.6.1: served as the
    origin sent it); a 304 that differs otherwise is applied in full: its fields and its
    freshness (here max-age after no-cache) govern from then on."""
    async with edge_with_origin(service) as (edge, origin):
        origin.cc = "no-cache"
        origin.extra_304 = {"X-Extra": "same", "Date": formatdate(usegmt=True)}
        assert (await get(edge, "/doc")).headers["x-cache"] == "MISS"
        first = await get(edge, "/doc")
        assert first.headers["x-cache"] == "REVALIDATED" and first.headers["x-extra"] == "same"
        assert edge.engine.cache is not None
        [entry] = edge.engine.cache.entries()
        update = entry.revalidation
        assert update is not None
        second = await get(edge, "/doc")
        assert second.headers["x-cache"] == "REVALIDATED" and second.body == b"doc v1"
        assert entry.revalidation is update  # the same 304 again: its update was reused
        later = formatdate(time.time() + 7, usegmt=True)
        origin.extra_304 = {"X-Extra": "same", "Date": later}
        redated = await get(edge, "/doc")  # the same 304 but for its Date
        assert redated.headers["x-cache"] == "REVALIDATED" and redated.headers["date"] == later
        assert entry.revalidation is not None and entry.revalidation.terms is update.terms
        origin.cc = "max-age=100"
        origin.extra_304 = {"X-Extra": "changed", "Date": formatdate(usegmt=True)}
        third = await get(edge, "/doc")
        assert third.headers["x-cache"] == "REVALIDATED"
        assert third.headers["x-extra"] == "changed"
        assert third.headers["cache-control"] == "max-age=100"
        fresh = await get(edge, "/doc")
        assert fresh.headers["x-cache"] == "HIT" and fresh.headers["x-extra"] == "changed"
        assert origin.gets == 5


async def test_revalidations_are_collapsed(service: DirectoryService) -> None:
    """Request collapsing holds for revalidations: concurrent requests for one stale response
    send the origin one conditional request (RFC 9111 §4 lets a cache wait for it)."""
    async with edge_with_origin(service) as (edge, origin):
        await get(edge, "/doc")
        age_all(edge, 200)
        origin.hold = asyncio.Event()
        tasks = [asyncio.create_task(get(edge, "/doc")) for _ in range(5)]
        for _ in range(200):
            if origin.gets >= 2:
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.4)  # the others arrive and wait on the flight
        origin.hold.set()
        answers = await asyncio.gather(*tasks)
        assert all(a.status == 200 and a.body == b"doc v1" for a in answers)
        assert origin.gets == 2
        assert sorted(a.headers["x-cache"] for a in answers) == ["HIT"] * 4 + ["REVALIDATED"]


async def test_stale_while_revalidate_refresh_is_conditional(service: DirectoryService) -> None:
    """RFC 5861 §3 with RFC 9111 §4.3: the background refresh of a response served stale is a
    conditional request; its 304 updates the stored response, which is then fresh."""
    async with edge_with_origin(service) as (edge, origin):
        origin.cc = "max-age=10, stale-while-revalidate=600"
        await get(edge, "/doc")
        age_all(edge, 20)
        stale = await get(edge, "/doc")
        assert stale.headers["x-cache"] == "STALE" and stale.body == b"doc v1"
        for _ in range(200):
            if edge.engine.cache_events["revalidated"] == 1:
                break
            await asyncio.sleep(0.02)
        assert origin.seen[-1]["If-None-Match"] == '"v1"'
        fresh = await get(edge, "/doc")
        assert fresh.headers["x-cache"] == "HIT" and fresh.headers["x-extra"] == "updated 2"
        assert fresh.body == b"doc v1" and origin.gets == 2


# -- client conditionals (RFC 9110 §13) ----------------------------------------------------------


async def test_if_none_match_answered_304_from_the_cache(service: DirectoryService) -> None:
    """RFC 9110 §13.1.2: If-None-Match uses the weak comparison; a match on GET is 304
    (§15.4.5: with ETag, Cache-Control, no content), a miss is the stored 200; ``*``
    matches any stored representation."""
    async with edge_with_origin(service) as (edge, origin):
        await get(edge, "/doc")
        for tag in ('"v1"', 'W/"v1"', '"x", W/"v1"', "*"):
            r = await get(edge, "/doc", "-H", f"If-None-Match: {tag}")
            assert r.status == 304 and r.body == b"", tag
            assert r.headers["etag"] == '"v1"' and r.headers["cache-control"] == "max-age=100"
            assert r.headers["x-cache"] == "HIT"
        other = await get(edge, "/doc", "-H", 'If-None-Match: "v0"')
        assert other.status == 200 and other.body == b"doc v1"
        assert origin.gets == 1
        assert edge.engine.cache_events["not_modified"] == 4


async def test_if_modified_since_answered_from_the_cache(service: DirectoryService) -> None:
    """RFC 9110 §13.1.3: If-Modified-Since at or after Last-Modified is 304; before it, the
    200; §13.2.2: ignored when If-None-Match is present."""
    async with edge_with_origin(service) as (edge, origin):
        await get(edge, "/doc")
        later = formatdate(1_700_000_100, usegmt=True)
        earlier = formatdate(1_600_000_000, usegmt=True)
        assert (await get(edge, "/doc", "-H", f"If-Modified-Since: {later}")).status == 304
        assert (await get(edge, "/doc", "-H", f"If-Modified-Since: {MODIFIED}")).status == 304
        assert (await get(edge, "/doc", "-H", f"If-Modified-Since: {earlier}")).status == 200
        both = await get(edge, "/doc", "-H", f"If-Modified-Since: {later}",
                         "-H", 'If-None-Match: "v0"')
        assert both.status == 200 and both.body == b"doc v1"
        assert origin.gets == 1


@pytest.mark.parametrize("since", [
    "Tue, 14 Nov 23 22:13:20 GMT",   # two-digit year in IMF-fixdate
    "Tue, 14 Nov 2023 22:13:20 UTC",  # zone other than GMT
    "Tue, 14-Nov-2023 22:13:20 GMT",  # dashes
])
async def test_if_modified_since_that_is_no_http_date_is_ignored(
        service: DirectoryService, since: str) -> None:
    """RFC 9110 §13.1.3: a recipient MUST ignore If-Modified-Since when its value is not a
    valid HTTP-date (§5.6.7; the same strict parser as Expires): the stored 200 is served
    whole, even though a lenient parser reads these as after Last-Modified."""
    async with edge_with_origin(service) as (edge, origin):
        await get(edge, "/doc")
        answer = await get(edge, "/doc", "-H", f"If-Modified-Since: {since}")
        assert answer.status == 200 and answer.body == b"doc v1"
        assert answer.headers["x-cache"] == "HIT" and origin.gets == 1


# -- Vary (RFC 9111 §4.1) ------------------------------------------------------------------------


async def test_vary_selects_variants_by_secondary_key(service: DirectoryService) -> None:
    """RFC 9111 §4.1: a stored response with Vary is used only for a request whose nominated
    fields match the request that stored it (absent and present differ)."""
    async with edge_with_origin(service) as (edge, origin):
        en = await get(edge, "/vary?on=X-Lang", "-H", "X-Lang: en")
        de = await get(edge, "/vary?on=X-Lang", "-H", "X-Lang: de")
        assert (en.body, de.body) == (b"lang=en", b"lang=de")
        assert en.headers["x-cache"] == de.headers["x-cache"] == "MISS"
        for lang in ("en", "de"):
            hit = await get(edge, "/vary?on=X-Lang", "-H", f"X-Lang: {lang}")
            assert hit.headers["x-cache"] == "HIT" and hit.body == f"lang={lang}".encode()
        none = await get(edge, "/vary?on=X-Lang")
        assert none.headers["x-cache"] == "MISS" and none.body == b"lang=None"
        assert (await get(edge, "/vary?on=X-Lang")).headers["x-cache"] == "HIT"
        assert origin.gets == 3


async def test_client_no_cache_validates_the_matching_variant(service: DirectoryService) -> None:
    """RFC 9111 §4.1 with §5.2.1.4: the variant validated is the one the request selects."""
    async with edge_with_origin(service) as (edge, origin):
        for lang in ("en", "de"):
            await get(edge, "/vary?on=X-Lang", "-H", f"X-Lang: {lang}")
        again = await get(edge, "/vary?on=X-Lang", "-H", "X-Lang: de",
                          "-H", "Cache-Control: no-cache")
        assert origin.seen[-1]["If-None-Match"] == '"lang-de"'
        assert again.headers["x-cache"] == "REVALIDATED" and again.body == b"lang=de"


async def test_vary_star_never_matches(service: DirectoryService) -> None:
    """RFC 9111 §4.1: ``Vary: *`` always fails to match."""
    async with edge_with_origin(service) as (edge, origin):
        for _ in range(3):
            assert (await get(edge, "/vary?on=*")).headers["x-cache"] == "MISS"
        assert origin.gets == 3


async def test_variants_per_url_are_bounded(service: DirectoryService) -> None:
    """A response varying on a field with many values keeps at most MAX_VARIANTS copies, the
    most recent ones."""
    from httpproxy.cache import MAX_VARIANTS

    async with edge_with_origin(service) as (edge, _origin):
        for i in range(MAX_VARIANTS + 4):
            await get(edge, "/vary?on=X-Lang", "-H", f"X-Lang: l{i}")
        assert edge.engine.cache is not None
        assert len(edge.engine.cache) == MAX_VARIANTS
        last = await get(edge, "/vary?on=X-Lang", "-H", f"X-Lang: l{MAX_VARIANTS + 3}")
        assert last.headers["x-cache"] == "HIT"
        assert (await get(edge, "/vary?on=X-Lang", "-H", "X-Lang: l0")).headers["x-cache"] == "MISS"


# -- invalidation (RFC 9111 §4.4) ------------------------------------------------------------------


async def test_unsafe_method_invalidates_target_and_same_origin_locations(
        service: DirectoryService) -> None:
    """RFC 9111 §4.4: a non-error response to an unsafe method invalidates the target URI and
    the Location / Content-Location URIs on the same host, not those of another host, and
    an error response invalidates nothing."""
    async with edge_with_origin(service) as (edge, _origin):
        for path in ("/doc", "/doc?a=1", "/created", "/cl"):
            await get(edge, path)
            assert (await get(edge, path)).headers["x-cache"] == "HIT"
        await get(edge, "/doc", "-X", "POST", "-d", "x")
        assert (await get(edge, "/doc")).body == b"doc v2"  # invalidated: fetched anew
        assert (await get(edge, "/doc?a=1")).headers["x-cache"] == "HIT"  # another URI
        await get(edge, "/p?location=/created&cl=http://www.o.test/cl", "-X", "PUT", "-d", "y")
        assert (await get(edge, "/created")).headers["x-cache"] == "MISS"
        assert (await get(edge, "/cl")).headers["x-cache"] == "MISS"
        await get(edge, "/p?location=http://other.test/doc%3Fa=1", "-X", "DELETE")
        await get(edge, "/fail?location=/doc%3Fa=1", "-X", "POST")
        assert (await get(edge, "/doc?a=1")).headers["x-cache"] == "HIT"
        # /doc; /p, /created, /cl; /p (not other.test's URL; nothing for the 500)
        assert edge.engine.cache_events["invalidated_urls"] == 5


async def test_invalidation_is_published_to_the_change_feed(service: DirectoryService) -> None:
    """RFC 9111 §4.4 across a fleet: the invalidation is written to the change feed, and a
    worker applying it drops its copy of the URL (every variant)."""
    async with edge_with_origin(service) as (edge, _origin):
        other = await start_edge(service.store, service)  # a second worker, same directory
        try:
            await other.curl(host="www.o.test", path="/doc")
            assert (await other.curl(host="www.o.test", path="/doc")).headers["x-cache"] == "HIT"
            await get(edge, "/doc", "-X", "POST", "-d", "x")
            for _ in range(100):
                if not edge.engine._publishing:
                    break
                await asyncio.sleep(0.02)
            await other.sync()
            fresh = await other.curl(host="www.o.test", path="/doc")
            assert fresh.headers["x-cache"] == "MISS" and fresh.body == b"doc v2"
        finally:
            await other.proxy.drain()
            await other.proxy.close()


# -- ranges (RFC 9110 §14) ---------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/bytes", "/bytes-chunked"])
async def test_range_answered_206_from_the_stored_response(service: DirectoryService,
                                                           path: str) -> None:
    """RFC 9110 §14.2 / §15.3.7: a Range on a stored full response is a 206 with
    Content-Range; a suffix range is the last N bytes; §15.5.17: a range starting beyond
    the end is 416 with ``Content-Range: bytes */length``; several ranges may be ignored."""
    async with edge_with_origin(service) as (edge, origin):
        await get(edge, path)
        part = await get(edge, path, "-r", "10-19")
        assert part.status == 206 and part.body == CONTENT[10:20]
        assert part.headers["content-range"] == "bytes 10-19/100"
        tail = await get(edge, path, "-r", "-5")
        assert tail.status == 206 and tail.body == CONTENT[-5:]
        assert tail.headers["content-range"] == "bytes 95-99/100"
        open_ended = await get(edge, path, "-r", "90-")
        assert open_ended.body == CONTENT[90:]
        beyond = await edge.curl("-r", "200-300", host="www.o.test", path=path, check=False)
        assert beyond.status == 416 and beyond.headers["content-range"] == "bytes */100"
        several = await get(edge, path, "-r", "0-1,5-6")
        assert several.status == 200 and several.body == CONTENT
        assert origin.gets == 1


async def test_range_with_identity_coding_uses_the_stored_full_response(
        service: DirectoryService) -> None:
    """RFC 9110 §14.2 with the Fetch standard: browsers send ``Accept-Encoding: identity`` with
    a Range request; a full response stored for a ``gzip`` request, not content-coded (no
    Content-Encoding, no Vary), answers it with a 206."""
    async with edge_with_origin(service) as (edge, origin):
        await get(edge, "/bytes", "-H", "Accept-Encoding: gzip")
        part = await get(edge, "/bytes", "-r", "2-4", "-H", "Accept-Encoding: identity")
        assert part.status == 206 and part.body == CONTENT[2:5]
        assert part.headers["x-cache"] == "HIT" and origin.gets == 1


async def test_if_range(service: DirectoryService) -> None:
    """RFC 9110 §13.1.5: If-Range with the current strong ETag (or the exact Last-Modified)
    keeps the Range; any other validator gets the whole response."""
    async with edge_with_origin(service) as (edge, origin):
        await get(edge, "/bytes")
        for validator in ('"v1"', MODIFIED):
            r = await get(edge, "/bytes", "-r", "0-3", "-H", f"If-Range: {validator}")
            assert r.status == 206 and r.body == CONTENT[:4], validator
        for validator in ('"v0"', 'W/"v1"', formatdate(1_600_000_000, usegmt=True)):
            r = await get(edge, "/bytes", "-r", "0-3", "-H", f"If-Range: {validator}")
            assert r.status == 200 and r.body == CONTENT, validator
        assert origin.gets == 1


async def test_range_miss_is_forwarded_not_stored(service: DirectoryService) -> None:
    """A Range request for a URL not stored goes to the origin as it is; its answer is not
    stored as the full response (RFC 9111 §3.3: a partial response is not the whole)."""
    async with edge_with_origin(service) as (edge, origin):
        r = await get(edge, "/bytes", "-r", "0-3")
        assert r.status == 206 and r.body == CONTENT[:4]
        assert origin.seen[-1]["Range"] == "bytes=0-3"
        full = await get(edge, "/bytes")
        assert full.headers["x-cache"] == "MISS" and full.body == CONTENT


# -- purge by URL and tag -----------------------------------------------------------------------


async def test_purge_by_url_and_by_tag(service: DirectoryService) -> None:
    """``edge cache purge HOST --url T`` drops that URL (every variant), ``--tag T`` the
    site's objects tagged T by Cache-Tag or Surrogate-Key, and nothing else."""
    async with edge_with_origin(service) as (edge, _origin):
        paths = ["/doc", "/doc?x=1", "/tagged?tags=red,blue", "/tagged?keys=red%20green",
                 "/tagged?tags=blue"]
        for path in paths:
            await get(edge, path)
        await service.purge_cache("www.o.test", url="/doc")
        await service.purge_cache("www.o.test", tag="red")
        await edge.sync()
        results = {p: (await get(edge, p)).headers["x-cache"] for p in paths}
        assert results == {"/doc": "MISS", "/doc?x=1": "HIT", "/tagged?tags=red,blue": "MISS",
                           "/tagged?keys=red%20green": "MISS", "/tagged?tags=blue": "HIT"}
        # another site's tag purge never reaches this site's objects
        await service.purge_cache("*.o.test", tag="blue")
        await edge.sync()
        assert (await get(edge, "/tagged?tags=blue")).headers["x-cache"] == "HIT"
