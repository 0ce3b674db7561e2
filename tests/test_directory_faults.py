"""The directory when its database hangs or dies (a private MariaDB, never the shared one).

A hung database (SIGSTOP) is the hard case: every query waits its full timeout. After the first
failure the circuit breaker must keep every lookup at memory speed, fail cold keys at once, and
let the change feed apply everything written meanwhile once the database is back.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from prometheus_client import REGISTRY

from edge import metrics
from edge.config import CacheConfig
from edge.directory.directory import Directory
from edge.directory.feed import ChangeFeed
from edge.directory.model import Change
from edge.directory.mysql import MySQLStore
from edge.directory.service import DirectoryService
from edge.errors import DirectoryUnavailable
from tests.support_clock import FakeClock
from tests.support_directory import feed_at_head, seed
from tests.support_mariadb import PrivateMariaDB, private_mariadb, private_mysql_url  # noqa: F401
from tests.test_http_support import running

pytestmark = pytest.mark.slow

CONNECT_TIMEOUT = 3.0
QUERY_TIMEOUT = 2.0
FAST = 0.5
"""A lookup answered from memory takes microseconds; anything that waited on the hung database
takes at least QUERY_TIMEOUT. The bound only separates the two (not a timing goal)."""

# Answers expire at once and are past their refresh window almost at once: every lookup below
# would go to the database without the breaker.
EXPIRING = CacheConfig(ttl=0.2, negative_ttl=0.2, refresh_window=0.05, ttl_spread=0.0,
                       stale_if_error=3600.0, probe_interval=0.2, probe_interval_max=0.5)


def _store(url: str) -> MySQLStore:
    return MySQLStore(url, pool_size=4, connect_timeout=CONNECT_TIMEOUT,
                      query_timeout=QUERY_TIMEOUT)


@pytest.fixture
async def empty_db(private_mysql_url: str,  # noqa: F811
                   private_mariadb: PrivateMariaDB) -> AsyncIterator[MySQLStore]:  # noqa: F811
    store = _store(private_mysql_url)
    await store.open()
    await store.migrate()
    yield store
    private_mariadb.ensure_running()  # a failed test may leave it stopped: close() would hang
    await store.close()


@pytest.fixture
async def db(empty_db: MySQLStore) -> MySQLStore:
    await seed(DirectoryService(empty_db))
    return empty_db


async def _eventually(check: Callable[[], Awaitable[bool]], within: float = 20.0) -> None:
    deadline = time.monotonic() + within
    while not await check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.1)


async def _timed(coro: Awaitable[object]) -> tuple[object, float]:
    started = time.monotonic()
    result = await coro
    return result, time.monotonic() - started


async def _host_of(directory: Directory, username: str) -> str:
    route = await directory.route_for_account(username)
    assert route is not None
    return route.host.name


async def test_hung_database_keeps_warm_lookups_at_memory_speed(
        db: MySQLStore, private_mariadb: PrivateMariaDB) -> None:  # noqa: F811
    directory = Directory(db, EXPIRING)
    try:
        assert await _host_of(directory, "alice") == "host-a"
        site = await directory.route_for_site("www.example.com")
        assert site is not None and site.host.name == "host-a"
        await asyncio.sleep(0.4)  # every answer is now past TTL + refresh window

        private_mariadb.stop()
        # The lookup that discovers the outage waits once for the timeout, then gets the stale
        # answer; everything after must not wait at all.
        route, _ = await _timed(directory.route_for_account("alice"))
        assert route is not None and route.host.name == "host-a"
        slowest = 0.0
        for i in range(40):
            if i % 2:
                route, took = await _timed(directory.route_for_account("alice"))
            else:
                route, took = await _timed(directory.route_for_site("www.example.com"))
            assert route is not None and route.host.name == "host-a"  # type: ignore[attr-defined]
            slowest = max(slowest, took)
            await asyncio.sleep(0.02)
        assert slowest < FAST, f"a warm lookup waited {slowest:.2f}s on the hung database"

        # A name never seen fails at once (the proxy says "temporarily unavailable").
        started = time.monotonic()
        with pytest.raises(DirectoryUnavailable):
            await directory.route_for_site("cold.example.org")
        assert time.monotonic() - started < FAST

        # Metrics say what is going on.
        assert directory.breaker.open
        stats = directory.stats()
        assert stats["tenant"]["stale"] >= 20 and stats["site"]["stale"] >= 20
        metrics.DirectoryExporter().export(stats)
        metrics.export_breaker(directory.breaker.open, directory.breaker.seconds_since_success())
        assert REGISTRY.get_sample_value("edge_directory_breaker_open") == 1
        assert (REGISTRY.get_sample_value("edge_directory_last_success_age_seconds") or 0) > 0.5
        assert (REGISTRY.get_sample_value("edge_directory_lookups_total",
                                          {"kind": "tenant", "outcome": "stale"}) or 0) >= 20

        # Back: the probe closes the breaker and a change is seen again.
        private_mariadb.cont()
        writer = _store(db.url)
        await writer.open()
        try:
            await DirectoryService(writer).move_tenant("t1", "host-b")
        finally:
            await writer.close()

        async def moved() -> bool:
            return await _host_of(directory, "alice") == "host-b"

        await _eventually(moved)
        assert not directory.breaker.open
        metrics.export_breaker(directory.breaker.open, directory.breaker.seconds_since_success())
        assert REGISTRY.get_sample_value("edge_directory_breaker_open") == 0
    finally:
        await directory.close()


async def test_feed_resumes_after_database_kill_and_restart(
        db: MySQLStore, private_mariadb: PrivateMariaDB) -> None:  # noqa: F811
    directory = Directory(db, CacheConfig(probe_interval=0.2, probe_interval_max=1.0))
    feed = ChangeFeed(directory, interval=0.2)
    seen: list[Change] = []
    feed.subscribe(seen.append)
    await feed.start()
    try:
        assert await _host_of(directory, "alice") == "host-a"
        private_mariadb.kill()

        async def unhealthy() -> bool:
            return not feed.healthy

        await _eventually(unhealthy)
        assert await _host_of(directory, "alice") == "host-a"  # still served from memory

        private_mariadb.restart()
        writer = _store(db.url)
        await writer.open()
        try:
            await DirectoryService(writer).move_tenant("t1", "host-b")
        finally:
            await writer.close()

        async def moved() -> bool:
            return any(c.entity == "tenant" and c.name == "t1" for c in seen)

        await _eventually(moved)
        assert feed.healthy
        assert await _host_of(directory, "alice") == "host-b"
    finally:
        await feed.stop()
        await directory.close()


async def test_move_written_while_breaker_open_is_applied(
        db: MySQLStore, private_mariadb: PrivateMariaDB) -> None:  # noqa: F811
    # The probe is slow on purpose: the move lands while this worker still thinks the
    # database is down, and must be applied by the feed's next poll, not lost.
    config = CacheConfig(ttl=0.2, negative_ttl=0.2, refresh_window=0.0, ttl_spread=0.0,
                         probe_interval=30.0, probe_interval_max=30.0)
    directory = Directory(db, config)
    feed = await feed_at_head(ChangeFeed(directory))
    try:
        assert await _host_of(directory, "alice") == "host-a"
        await asyncio.sleep(0.3)
        private_mariadb.stop()
        assert await _host_of(directory, "alice") == "host-a"  # stale, after one timeout
        with pytest.raises(DirectoryUnavailable):
            await feed.poll_once()
        assert directory.breaker.open

        private_mariadb.cont()
        writer = _store(db.url)
        await writer.open()
        try:
            await DirectoryService(writer).move_tenant("t1", "host-b")
        finally:
            await writer.close()
        # Not re-asked until a probe or a feed poll reaches the database.
        route, took = await _timed(directory.route_for_account("alice"))
        assert route is not None and directory.breaker.open and took < FAST

        assert await feed.poll_once() >= 1
        assert not directory.breaker.open
        assert await _host_of(directory, "alice") == "host-b"
    finally:
        await directory.close()


async def test_change_committed_behind_cursor_after_long_outage_is_applied(
        db: MySQLStore, private_mariadb: PrivateMariaDB) -> None:  # noqa: F811
    # A transaction that took its change id before the outage and commits after it: the gap
    # it leaves must still be watched when the database is back, however long the outage.
    clock = FakeClock()
    directory = Directory(db, CacheConfig(ttl=3600), clock=clock)
    feed = await feed_at_head(ChangeFeed(directory, gap_timeout=60.0, clock=clock))
    seen: list[Change] = []
    feed.subscribe(seen.append)
    assert await _host_of(directory, "alice") == "host-a"

    slow = private_mariadb.connect(db.url.rsplit("/", 1)[1])
    try:
        with slow.cursor() as cursor:
            cursor.execute("SELECT id FROM hosts WHERE name = 'host-b'")
            (host_b,) = cursor.fetchone()
            cursor.execute("BEGIN")
            cursor.execute("UPDATE tenants SET host_id = %s WHERE name = 't1'", (host_b,))
            cursor.execute("INSERT INTO changes (entity, name, created_at) VALUES "
                           "('tenant', 't1', %s)", (time.time(),))
        await DirectoryService(db).set_host_state("host-a", "maintenance", "patching")
        await feed.poll_once()  # sees the later change: the slow one's id is now a gap
        assert [c.name for c in seen] == ["host-a"]

        private_mariadb.stop()
        with pytest.raises(DirectoryUnavailable):
            await feed.poll_once()
        clock.advance(600.0)  # a ten-minute outage, far past gap_timeout
        with pytest.raises(DirectoryUnavailable):
            await feed.poll_once()
        private_mariadb.cont()
        slow.commit()
    finally:
        slow.close()

    await feed.poll_once()
    assert [c.name for c in seen] == ["host-a", "t1"]
    assert await _host_of(directory, "alice") == "host-b"
    await directory.close()


async def test_http_keeps_answering_warm_sites_while_the_database_hangs(
        empty_db: MySQLStore, private_mariadb: PrivateMariaDB) -> None:  # noqa: F811
    clock = FakeClock()
    async with running(empty_db, DirectoryService(empty_db), clock=clock) as (edge, (a,)):
        assert (await edge.curl(host="www.a.test")).json()["backend"] == "a"
        assert (await edge.curl(host="shop.a.test")).json()["backend"] == "a"
        clock.advance(3600.0)  # every cached answer is past TTL and refresh window
        private_mariadb.stop()
        # The request that finds the database hung waits once for the query timeout.
        first = await edge.curl(host="www.a.test")
        assert first.status == 200
        slowest = 0.0
        for host in ("www.a.test", "shop.a.test") * 10:
            started = time.monotonic()
            r = await edge.curl(host=host)
            slowest = max(slowest, time.monotonic() - started)
            assert r.status == 200 and r.json()["backend"] == "a"
        # curl's own start-up is in this bound; a wait on the database would be >= 2 s.
        assert slowest < 1.5, f"a warm request took {slowest:.2f}s with the database hung"
        started = time.monotonic()
        cold = await edge.curl(host="www.never-seen.test")
        assert cold.status == 503 and cold.headers["retry-after"].isdigit()
        assert time.monotonic() - started < 1.5
        assert len(a.requests) == 23
        private_mariadb.cont()
