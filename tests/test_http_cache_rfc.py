"""The content cache against a real origin we control, from the RFC text: revalidation
(RFC 9111 §4.3), client conditionals (RFC 9110 §13), Vary (RFC 9111 §4.1), invalidation by
unsafe methods (RFC 9111 §4.4), ranges (RFC 9110 §14), purge by URL and tag, metrics.

Clients are the real curl; the origin is an aiohttp server that answers conditionals itself.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Any

import pytest
from aiohttp import web

from edge.directory.service import DirectoryService
from tests.test_http_support import Edge, start_edge

HONEST = {"mode": "full", "ttl": {}}
"""Only the origin's own freshness information (no operator TTLs)."""
MODIFIED = formatdate(1_700_000_000, usegmt=True)
CONTENT = bytes(range(48, 58)) * 10  # "0123456789" x 10


@dataclass
class Origin:
    """An origin that validates: ETag ``"v<version>"``, a fixed Last-Modified, 304s."""

    port: int = 0
    version: int = 1
    cc: str = "max-age=100"
    seen: list[dict[str, str]] = field(default_factory=list)
    methods: list[str] = field(default_factory=list)
    hold: asyncio.Event | None = None
    runner: web.AppRunner | None = None

    async def start(self) -> Origin:
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
                "Cache-Control": self.cc, "ETag": etag, "X-Extra": f"updated {len(self.seen)}"})
        headers = {"Cache-Control": self.cc, "X-Extra": "first", **validators}
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
                           ) -> AsyncIterator[tuple[Edge, Origin]]:
    origin = await Origin().start()
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
