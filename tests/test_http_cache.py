"""The content cache in the running HTTP edge: HIT/MISS/STALE/BYPASS, single flight, Vary,
stale-while-revalidate, stale-if-error, purge through the change feed, and the LRU bound."""

from __future__ import annotations

import asyncio

from edge.directory.service import DirectoryService
from httpproxy.cache import CacheEntry, ContentCache
from tests.test_http_support import Edge, running

FULL = {"mode": "full", "ttl": {"200": 600, "404": 60}}


async def _policy(edge: Edge, service: DirectoryService, policy: dict[str, object],
                  site: str = "www.a.test") -> None:
    await service.update_site(site, cache_policy=policy)
    await edge.sync()


def _age_all(edge: Edge, seconds: float) -> None:
    """Make every stored object ``seconds`` older (instead of sleeping through a TTL)."""
    cache = edge.engine.cache
    assert cache is not None
    for entry in cache.entries():
        entry.stored_at -= seconds


async def test_miss_then_hit(service: DirectoryService) -> None:
    async with running(service.store, service) as (edge, (a,)):
        await _policy(edge, service, FULL)
        r1 = await edge.curl(path="/page")
        assert r1.status == 200 and r1.headers["x-cache"] == "MISS"
        r2 = await edge.curl(path="/page")
        assert r2.headers["x-cache"] == "HIT"
        assert r2.body == r1.body
        assert r2.headers["age"].isdigit()
        assert a.counter == 1
        head = await edge.curl("-I", path="/page")  # HEAD answered from the GET entry
        assert head.headers["x-cache"] == "HIT" and b'"backend"' not in head.body
        assert a.counter == 1
        # other query string, other object
        assert (await edge.curl(path="/page?v=2")).headers["x-cache"] == "MISS"
        # 404s are cached too (1 minute by default)
        assert (await edge.curl(path="/status/404")).headers["x-cache"] == "MISS"
        assert (await edge.curl(path="/status/404")).headers["x-cache"] == "HIT"


async def test_no_x_cache_when_cache_off(service: DirectoryService) -> None:
    async with running(service.store, service) as (edge, (a,)):
        r = await edge.curl(path="/page")
        assert "x-cache" not in r.headers
        await edge.curl(path="/page")
        assert a.counter == 2


async def test_bypass_and_not_stored(service: DirectoryService) -> None:
    async with running(service.store, service) as (edge, (_a,)):
        await _policy(edge, service, {"mode": "wordpress"})
        # Authorization: forwarded, stored only if public/s-maxage/must-revalidate (RFC 9111 §3.5)
        assert (await edge.curl("-u", "u:p", path="/a")).headers["x-cache"] == "MISS"
        assert (await edge.curl("-X", "POST", path="/a")).headers["x-cache"] == "BYPASS"
        assert (await edge.curl(path="/wp-admin/x")).headers["x-cache"] == "BYPASS"
        r = await edge.curl("-H", "Cookie: wordpress_logged_in_abc=1", path="/a")
        assert r.headers["x-cache"] == "BYPASS"
        # responses that must not be stored
        for path in ("/sc?setcookie=1", "/p?cc=private", "/n?cc=no-store"):
            assert (await edge.curl(path=path)).headers["x-cache"] == "MISS"
            assert (await edge.curl(path=path)).headers["x-cache"] == "MISS", path
        # an explicit max-age is honoured
        assert (await edge.curl(path="/m?cc=max-age%3D100")).headers["x-cache"] == "MISS"
        assert (await edge.curl(path="/m?cc=max-age%3D100")).headers["x-cache"] == "HIT"


async def test_vary_accept_encoding_variants(service: DirectoryService) -> None:
    async with running(service.store, service) as (edge, (a,)):
        await _policy(edge, service, FULL)
        assert (await edge.curl("-H", "Accept-Encoding: gzip, br", path="/v")).headers["x-cache"] == "MISS"
        assert a.requests[-1]["headers"]["Accept-Encoding"] == "br"
        assert (await edge.curl("-H", "Accept-Encoding: gzip", path="/v")).headers["x-cache"] == "MISS"
        assert a.requests[-1]["headers"]["Accept-Encoding"] == "gzip"
        assert (await edge.curl("-H", "Accept-Encoding: gzip;q=1", path="/v")).headers["x-cache"] == "HIT"
        assert (await edge.curl(path="/v")).headers["x-cache"] == "MISS"  # identity
        assert a.counter == 3


async def test_single_flight_on_miss(service: DirectoryService) -> None:
    async with running(service.store, service) as (edge, (a,)):
        await _policy(edge, service, FULL)
        tasks = [asyncio.create_task(edge.curl(path="/hold")) for _ in range(6)]
        for _ in range(200):
            if a.counter >= 1:
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.5)  # give the other five time to arrive and queue behind it
        a.hold.set()
        results = await asyncio.gather(*tasks)
        assert all(r.status == 200 and r.body == b"a held" for r in results)
        assert a.counter == 1
        assert sorted(r.headers["x-cache"] for r in results).count("MISS") == 1


async def test_stale_while_revalidate(service: DirectoryService) -> None:
    async with running(service.store, service) as (edge, (a,)):
        await _policy(edge, service, {"mode": "full", "ttl": {"200": 10},
                                      "stale_while_revalidate": 600})
        first = await edge.curl(path="/swr")
        assert first.json()["n"] == 1
        _age_all(edge, 20)
        stale = await edge.curl(path="/swr")
        assert stale.headers["x-cache"] == "STALE"
        assert stale.json()["n"] == 1  # the old copy, at once
        for _ in range(200):  # the background refresh lands
            if a.counter == 2 and edge.engine.cache is not None and any(
                    e.stored_at > 0 and b'"n": 2' in e.body for e in edge.engine.cache.entries()):
                break
            await asyncio.sleep(0.02)
        fresh = await edge.curl(path="/swr")
        assert fresh.headers["x-cache"] == "HIT"
        assert fresh.json()["n"] == 2
        assert a.counter == 2


async def test_stale_if_error(service: DirectoryService) -> None:
    async with running(service.store, service) as (edge, (a,)):
        await _policy(edge, service, {"mode": "full", "ttl": {"200": 10}, "stale_if_error": 600})
        await edge.curl(path="/sie")
        _age_all(edge, 20)
        await a.stop()  # the backend is gone: the stale copy is served instead
        r = await edge.curl(path="/sie")
        assert r.status == 200 and r.headers["x-cache"] == "STALE"
        assert r.json()["n"] == 1
        # an uncached path on a dead backend is still a 502
        assert (await edge.curl(path="/other")).status == 502


async def test_stale_if_error_on_5xx(service: DirectoryService) -> None:
    async with running(service.store, service) as (edge, (a,)):
        await _policy(edge, service, {"mode": "full", "ttl": {"200": 10}, "stale_if_error": 600})
        assert (await edge.curl(path="/flip")).json()["n"] == 1
        _age_all(edge, 20)
        a.flip_status = 500
        r = await edge.curl(path="/flip")
        assert r.status == 200 and r.headers["x-cache"] == "STALE" and r.json()["n"] == 1
        assert a.counter == 2  # the backend was asked, its 500 was replaced
        a.flip_status = 200
        r = await edge.curl(path="/flip")
        assert r.headers["x-cache"] == "MISS" and r.json()["n"] == 3


async def test_purge_through_change_feed(service: DirectoryService) -> None:
    async with running(service.store, service) as (edge, (_a,)):
        await _policy(edge, service, FULL)
        for path in ("/news/1", "/news/2", "/about"):
            await edge.curl(path=path)
            assert (await edge.curl(path=path)).headers["x-cache"] == "HIT"
        await service.purge_cache("www.a.test", "/news")
        await edge.sync()
        assert (await edge.curl(path="/news/1")).headers["x-cache"] == "MISS"
        assert (await edge.curl(path="/about")).headers["x-cache"] == "HIT"
        await service.purge_cache("www.a.test")
        await edge.sync()
        assert (await edge.curl(path="/about")).headers["x-cache"] == "MISS"


async def test_purge_wildcard_site(service: DirectoryService) -> None:
    async with running(service.store, service) as (edge, (_a,)):
        await _policy(edge, service, FULL, site="*.a.test")
        await edge.curl(host="shop.a.test", path="/w")
        assert (await edge.curl(host="shop.a.test", path="/w")).headers["x-cache"] == "HIT"
        await service.purge_cache("*.a.test")
        await edge.sync()
        assert (await edge.curl(host="shop.a.test", path="/w")).headers["x-cache"] == "MISS"


def test_lru_bounded_in_bytes() -> None:
    cache = ContentCache(10_000, max_object_bytes=5_000)

    def entry(i: int, size: int = 1000) -> CacheEntry:
        return CacheEntry(b"k%d" % i, "s.test", f"/{i}", 200, b"HTTP/1.1 200 OK\r\n", b"x" * size,
                          ttl=60, swr=0, sie=0)
    for i in range(20):
        assert cache.put(entry(i))
        assert cache.size <= 10_000
    assert len(cache) < 20
    assert cache.get(b"k19") is not None and cache.get(b"k0") is None
    oldest = cache.entries()[0].key
    cache.get(oldest)  # recently used: survives the next insertions
    for i in range(20, 24):
        cache.put(entry(i))
    assert cache.get(oldest) is not None
    assert not cache.put(entry(99, 6000))  # bigger than max_object_bytes
    assert cache.purge("s.test", "/2") >= 1
    assert cache.purge("other.test") == 0


async def test_remembered_decision_does_not_leak_across_requests(service: DirectoryService) -> None:
    """The per-site decision memo only covers requests without cache-relevant headers."""
    async with running(service.store, service) as (edge, (_a,)):
        await _policy(edge, service, {"mode": "wordpress"})
        assert (await edge.curl(path="/m")).headers["x-cache"] == "MISS"
        assert (await edge.curl(path="/m")).headers["x-cache"] == "HIT"
        r = await edge.curl("-H", "Cookie: wordpress_logged_in_x=1", path="/m")
        assert r.headers["x-cache"] == "BYPASS"
        assert (await edge.curl("-H", "Cache-Control: no-store", path="/m")).headers["x-cache"] == "BYPASS"
        assert (await edge.curl("-H", "Accept-Encoding: gzip", path="/m")).headers["x-cache"] == "MISS"
        assert (await edge.curl(path="/m")).headers["x-cache"] == "HIT"


async def test_http10_bypasses_and_close_delimited_is_not_stored(service: DirectoryService) -> None:
    from tests.test_http_forwarding import RawBackend, _raw_site

    backend = await RawBackend(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil-eof", close=True).start()
    async with running(service.store, service) as (edge, (_a,)):
        await _policy(edge, service, FULL)
        assert (await edge.curl(path="/chunked")).headers["x-cache"] == "MISS"
        assert (await edge.curl(path="/chunked")).headers["x-cache"] == "HIT"
        raw = await edge.raw(b"GET /chunked HTTP/1.0\r\nHost: www.a.test\r\n\r\n")
        assert b"X-Cache: BYPASS" in raw and b"chunked" not in raw.split(b"\r\n\r\n")[0]
        # a response that ends at EOF has no framing a later hit could reuse
        await _raw_site(service, backend)
        await _policy(edge, service, FULL, site="raw.test")
        for _ in range(2):
            r = await edge.curl(host="raw.test")
            assert r.body == b"until-eof" and r.headers["x-cache"] == "MISS"
    await backend.stop()
