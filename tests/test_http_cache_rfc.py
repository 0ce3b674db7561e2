"""The content cache against RFC 9111 / 9110 / 9213 / 9211, through the running edge.

Each test cites the section it checks. The origin is a raw asyncio HTTP/1.1 server whose
response head per path the test writes byte for byte (repeated fields, odd dates, Age lists),
and counts what reaches it; the client side reads the edge's answer as raw field lines, so a
repeated header is seen as two lines, not one joined value.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from email.utils import formatdate
from pathlib import Path

import pytest

from edge.directory.secrets import KeyBox, generate_key
from edge.directory.service import DirectoryService
from edge.directory.stores import store_for_url
from tests.test_http_support import Edge, raw_exchange, start_edge

SITE = "www.rfc.test"
HONEST = {"mode": "full", "ttl": {}}
"""Only the origin's headers decide (also the old code's spelling of that, so the tests that
must fail on it can run there)."""


@dataclass
class Origin:
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
    origin: Origin
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
    origin = Origin()
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
