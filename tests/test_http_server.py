"""HTTP edge: routing, error pages, site moves, host states, directory (SQLite and MariaDB).

Real parts: the proxy in-process on a port-0 socket over a real store, aiohttp backends, curl.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from edge.directory.service import DirectoryService
from httpproxy.accesslog import FLUSH_INTERVAL, FLUSH_LINES, AccessLog
from tests.support_clock import FakeClock
from tests.test_http_support import curl, http_config, running, start_edge, statuses


async def test_request_routed_to_the_site_backend(service: DirectoryService) -> None:
    async with running(service.store, service, backends=2) as (edge, (_a, _b)):
        r = await edge.curl(host="www.a.test", path="/hello?x=1")
        assert r.status == 200
        assert r.json()["backend"] == "a"
        assert r.json()["path"] == "/hello?x=1"
        r = await edge.curl(host="WWW.B.Test.:8080", path="/")
        assert r.json()["backend"] == "b"
        # wildcard site
        r = await edge.curl(host="shop.a.test")
        assert r.json()["backend"] == "a"


async def test_unknown_host_gets_404_and_no_backend_is_contacted(service: DirectoryService) -> None:
    async with running(service.store, service, backends=2) as (edge, (a, b)):
        for host in ("unknown.test", "a.b.a.test", "127.0.0.1", "[::1]", "bad_host", ""):
            r = await edge.curl(host=host)
            assert r.status == 404, host
            assert b"No site is served" in r.body
            assert "text/html" in r.headers["content-type"]
        raw = await edge.raw(b"GET / HTTP/1.1\r\n\r\n")
        assert statuses(raw) == [400]  # HTTP/1.1 without Host
        r = await edge.curl(host="bad_host!")
        assert r.status == 400  # not Host syntax (tests/test_http_head.py has the whole class)
        assert a.requests == [] and b.requests == []


async def test_absolute_form_to_other_host_and_connect_refused(service: DirectoryService) -> None:
    async with running(service.store, service, backends=2) as (edge, (a, b)):
        raw = await edge.raw(b"GET http://www.b.test/ HTTP/1.1\r\nHost: www.a.test\r\n\r\n")
        assert statuses(raw) == [400]
        raw = await edge.raw(b"GET http://evil.example:80/x HTTP/1.1\r\nHost: evil.example\r\n"
                             b"Connection: close\r\n\r\n")
        assert statuses(raw) == [404]
        raw = await edge.raw(b"CONNECT www.b.test:443 HTTP/1.1\r\nHost: www.b.test:443\r\n\r\n")
        assert statuses(raw) == [405]
        assert a.requests == [] and b.requests == []
        # absolute-form naming the Host's own site is served (origin-form upstream)
        raw = await edge.raw(b"GET http://www.a.test/abs?q=1 HTTP/1.1\r\nHost: www.a.test\r\n"
                             b"Connection: close\r\n\r\n")
        assert statuses(raw) == [200]
        assert a.requests[-1]["path"] == "/abs?q=1"


async def test_site_moved_to_another_host_is_served_from_the_new_host(
        service: DirectoryService) -> None:
    async with running(service.store, service, backends=2) as (edge, (_a, _b)):
        assert (await edge.curl(host="www.a.test")).json()["backend"] == "a"
        await service.move_tenant("ta", "host-b")
        await edge.sync()
        assert (await edge.curl(host="www.a.test")).json()["backend"] == "b"
        # A wildcard site whose entry stayed cached while its tenant was evicted by the move:
        # routed by the name asked for, never by "*.a.test" (which would be a 404).
        assert (await edge.curl(host="shop.a.test")).json()["backend"] == "b"
        await service.move_tenant("ta", "host-a")
        await edge.sync()
        assert (await edge.curl(host="shop.a.test")).json()["backend"] == "a"
        await service.move_tenant("ta", "host-b")
        await edge.sync()
        # a site moved to the other tenant
        await service.update_site("www.b.test", tenant="ta")
        await service.move_tenant("ta", "host-a")
        await edge.sync()
        assert (await edge.curl(host="www.b.test")).json()["backend"] == "a"


async def test_host_states_maintenance_down_and_refused(service: DirectoryService) -> None:
    async with running(service.store, service, backends=2) as (edge, (_a, b)):
        await service.set_host_state("host-a", "maintenance")
        await edge.sync()
        r = await edge.curl(host="www.a.test")
        assert r.status == 503
        assert r.headers["retry-after"].isdigit()
        await service.set_host_state("host-a", "down")
        await edge.sync()
        r = await edge.curl(host="www.a.test")
        assert r.status == 502
        await service.set_host_state("host-a", "active")
        await edge.sync()
        assert (await edge.curl(host="www.a.test")).status == 200
        # connection refused: backend stopped
        await b.stop()
        r = await edge.curl(host="www.b.test")
        assert r.status == 502
        assert b"not reachable" in r.body
        assert str(b.port) not in r.body.decode() and "127.0.0.1" not in r.body.decode()


async def test_maintenance_page_shows_the_host_notice_only_while_in_maintenance(
        service: DirectoryService) -> None:
    async with running(service.store, service, backends=2) as (edge, (a, _b)):
        await service.set_host_state("host-a", "maintenance", "Disk upgrade until 18:00 UTC.")
        await edge.sync()
        r = await edge.curl(host="www.a.test")
        assert r.status == 503 and r.headers["retry-after"].isdigit()
        assert b"Disk upgrade until 18:00 UTC." in r.body
        await service.set_host_state("host-a", "down")  # the notice stays in the row
        await edge.sync()
        r = await edge.curl(host="www.a.test")
        assert r.status == 502
        assert b"Disk upgrade" not in r.body
        assert a.requests == []


async def test_backend_timeout_gives_504(service: DirectoryService) -> None:
    async with running(service.store, service, http=http_config(backend_timeout=0.5)) as (edge, _):
        r = await edge.curl(host="www.a.test", path="/slow?s=5")
        assert r.status == 504
        assert b"took too long" in r.body


async def test_error_pages_are_branded(service: DirectoryService) -> None:
    async with running(service.store, service,
                       http=http_config(error_page_brand="Example Hosting")) as (edge, _):
        r = await edge.curl(host="nope.test")
        assert r.status == 404
        assert b"Example Hosting" in r.body
        assert len(r.body) < 1024


async def test_tenant_suspended_gets_403(service: DirectoryService) -> None:
    async with running(service.store, service) as (edge, (a,)):
        await service.set_tenant_state("ta", "suspended")
        await edge.sync()
        r = await edge.curl(host="www.a.test")
        assert r.status == 403
        assert a.requests == []


async def test_cold_lookup_awaits_the_directory_and_then_is_cached(
        service: DirectoryService) -> None:
    async with running(service.store, service) as (edge, (_a,)):
        await service.add_site("new.example", "ta")  # not in any cache yet
        r = await edge.curl(host="new.example")
        assert r.json()["backend"] == "a"
        stats = edge.engine.stats.lookups
        assert stats["loaded"] >= 1
        before = stats["cached"]
        await edge.curl(host="new.example")
        assert stats["cached"] == before + 1


async def test_access_log_one_json_line_per_request(service: DirectoryService, tmp_path) -> None:
    path = tmp_path / "access.log"
    async with running(service.store, service, http=http_config(access_log=str(path))) as (edge, _):
        await edge.curl(host="www.a.test", path="/one")
        await edge.curl(host="nope.test", path="/two")
        edge.engine.access_log.flush()
        lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert [x["status"] for x in lines] == [200, 404]
    first = lines[0]
    assert first["site"] == "www.a.test" and first["tenant"] == "ta" and first["host"] == "host-a"
    assert first["path"] == "/one" and first["bytes"] > 0 and first["duration_ms"] >= 0
    assert "cache" in first
    assert lines[1]["site"] is None


async def test_metrics_exported(service: DirectoryService) -> None:
    from prometheus_client import REGISTRY

    async with running(service.store, service) as (edge, _):
        def value(name: str, labels: dict[str, str]) -> float:
            return REGISTRY.get_sample_value(name, labels) or 0.0
        before = value("edge_http_requests_total", {"status_class": "4xx"})
        before_lat = value("edge_http_request_duration_seconds_count", {})
        await edge.curl(host="nope.test")
        await edge.curl(host="www.a.test")
        edge.engine.export_metrics()
        assert value("edge_http_requests_total", {"status_class": "4xx"}) == before + 1
        assert value("edge_http_request_duration_seconds_count", {}) == before_lat + 2
        assert value("edge_http_site_lookups_total", {"outcome": "unknown"}) >= 1


async def test_proxy_on_mariadb_and_sqlite(database_url: str, service: DirectoryService) -> None:
    """The whole path on both stores (the database_url fixture is parametrised)."""
    async with running(service.store, service) as (edge, (_a,)):
        r = await edge.curl(host="www.a.test", path="/db")
        assert r.status == 200 and r.json()["backend"] == "a"
        assert (await edge.curl(host="x.y.test")).status == 404


async def test_drain_closes_idle_connections_and_refuses_new(service: DirectoryService) -> None:
    async with running(service.store, service) as (edge, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", edge.port)
        writer.write(b"GET / HTTP/1.1\r\nHost: www.a.test\r\n\r\n")
        await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert edge.proxy.active_sessions() == 1
        await edge.proxy.drain()
        await asyncio.wait_for(edge.proxy.wait_closed(10), 15)
        assert edge.proxy.active_sessions() == 0
        writer.close()


async def test_engine_standalone_start(service: DirectoryService) -> None:
    """start_edge with no sites: every request is a 404, nothing crashes."""
    edge = await start_edge(service.store, service)
    try:
        r = await curl(edge.port, host="www.a.test")
        assert r.status == 404
    finally:
        await edge.proxy.close()


async def test_directory_down_cold_site_503_warm_site_served(service: DirectoryService) -> None:
    async with running(service.store, service) as (edge, (_a,)):
        await service.add_site("cold.example", "ta")
        assert (await edge.curl(host="www.a.test")).status == 200  # now cached
        await service.store.close()  # the directory is unreachable from here on
        try:
            r = await edge.curl(host="cold.example")
            assert r.status == 503 and r.headers["retry-after"].isdigit()
            assert b"cold.example" not in r.body
            assert (await edge.curl(host="www.a.test")).status == 200
            assert edge.engine.stats.lookups["error"] >= 1
        finally:
            await service.store.open()


async def test_remembered_route_lasts_no_longer_than_the_directory_cache_answers(
        service: DirectoryService) -> None:
    """A remembered route stops being used when the cached answers it came from expire: a
    tenant moved while the change feed is silent is served from its new host once the
    directory cache's TTL has run out, and not before (the feed is the fast path; the TTL the
    safety net, for routes as for the cache)."""
    clock = FakeClock()
    async with running(service.store, service, backends=2, clock=clock) as (edge, _backends):
        for _ in range(2):  # the first loads the answers, the second remembers the route
            assert (await edge.curl(host="www.a.test")).json()["backend"] == "a"
        route = edge.engine.routes[b"www.a.test"]
        ttl = edge.config.cache.ttl
        assert clock.now < route.expires <= clock.now + ttl
        await service.move_tenant("ta", "host-b")  # not synced: this edge has not heard of it
        clock.advance(ttl * 0.8)
        assert (await edge.curl(host="www.a.test")).json()["backend"] == "a"
        assert edge.engine.routes[b"www.a.test"] is route  # still the warm path
        clock.advance(ttl * 0.2 + 1)  # every answer behind the route has now expired
        backends = [(await edge.curl(host="www.a.test")).json()["backend"] for _ in range(2)]
        # The first may still be served from the expired answer while it is refreshed in the
        # background ([cache] refresh_window); the refreshed answer is used from then on.
        for _ in range(100):
            if backends[-1] == "b":
                break
            await asyncio.sleep(0.02)
            backends.append((await edge.curl(host="www.a.test")).json()["backend"])
        assert backends[-1] == "b", backends
        assert (await edge.curl(host="www.a.test")).json()["backend"] == "b"
        assert edge.engine.routes[b"www.a.test"].host.name == "host-b"  # remembered anew


async def test_warm_route_is_remembered_logged_and_forgotten_on_any_change(
        service: DirectoryService, tmp_path) -> None:
    """The per-worker memo of resolved Host headers (the warm path) never outlives a change."""
    path = tmp_path / "access.log"
    async with running(service.store, service, backends=2,
                       http=http_config(access_log=str(path))) as (edge, (_a, _b)):
        for _ in range(2):  # the second request is answered through the remembered route
            assert (await edge.curl(host="www.a.test:80")).json()["backend"] == "a"
        assert b"www.a.test:80" in edge.engine.routes
        await service.move_tenant("ta", "host-b")
        await edge.sync()
        assert edge.engine.routes == {}
        assert (await edge.curl(host="www.a.test:80")).json()["backend"] == "b"
        await service.set_tenant_state("ta", "suspended")
        await edge.sync()
        assert (await edge.curl(host="www.a.test:80", check=False)).status == 403
        assert b"www.a.test:80" not in edge.engine.routes  # inactive routes are not remembered
        edge.engine.access_log.flush()
        lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert [(x["status"], x["host"], x["host_header"]) for x in lines] == [
        (200, "host-a", "www.a.test:80"), (200, "host-a", "www.a.test:80"),
        (200, "host-b", "www.a.test:80"), (403, None, "www.a.test:80")]
    assert all(x["site"] == "www.a.test" for x in lines)
    assert [x["tenant"] for x in lines[:3]] == ["ta"] * 3


async def test_access_log_file_written_every_256_lines_and_every_second(tmp_path: Path) -> None:
    """Queued lines reach the file when FLUSH_LINES are waiting or a second after the first."""
    path = tmp_path / "access.log"
    log = AccessLog(str(path), lambda values: b"%d\n" % values[0])
    try:
        for i in range(FLUSH_LINES - 1):
            log.add((i,))
        assert path.read_bytes() == b""
        log.add((FLUSH_LINES - 1,))
        assert path.read_bytes() == b"".join(b"%d\n" % i for i in range(FLUSH_LINES))
        log.add((1000,))
        log.add((1001,))
        await asyncio.sleep(FLUSH_INTERVAL + 0.5)
        assert path.read_bytes().endswith(b"%d\n1000\n1001\n" % (FLUSH_LINES - 1))
    finally:
        log.close()


async def test_finished_connections_are_freed_without_the_cycle_collector(service: DirectoryService) -> None:
    """A closed client connection (with its transport and parser) is freed by reference counting
    at once: with the cyclic GC off, none of 30 finished connections is left in memory. (When
    they needed the collector, its passes stalled every connection: HTTPS p99 +50-200 ms.)"""
    import gc

    from httpproxy.front_h1 import ClientConnection

    request = b"GET / HTTP/1.1\r\nHost: www.a.test\r\nConnection: close\r\n\r\n"
    async with running(service.store, service) as (edge, _):
        assert statuses(await edge.raw(request)) == [200]  # warm: route and backend pool in place
        gc.collect()
        gc.disable()
        try:
            for _ in range(30):
                assert statuses(await edge.raw(request)) == [200]
            await asyncio.sleep(0.2)  # the proxy's connection_lost callbacks have run
            alive = [o for o in gc.get_objects() if isinstance(o, ClientConnection)]
        finally:
            gc.enable()
        assert len(alive) <= 1, f"{len(alive)} finished client connections still in memory"
