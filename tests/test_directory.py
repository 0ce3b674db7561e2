"""Cached directory lookups on both real stores (SQLite file, MariaDB): routes, exact and
wildcard sites, hostname normalisation, negative caching, single-flight, stale-if-error with
the database really unreachable, and schema migrations."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator

import pytest

from edge.config import CacheConfig
from edge.directory import schema
from edge.directory.directory import AccountRoute, Directory, SiteRoute
from edge.directory.feed import ChangeFeed
from edge.directory.mysql import MySQLStore, parse_mysql_url
from edge.directory.service import DirectoryService
from edge.directory.sqlite import SQLiteStore
from edge.directory.store import SQLStore
from edge.errors import DirectoryUnavailable
from tests.support_clock import FakeClock
from tests.support_directory import (
    Hold,
    TcpForwarder,
    count_calls,
    feed_at_head,
    seed,
)

# Exact TTLs: these tests are about expiry itself (refresh while serving: tests/test_cache.py).
CONFIG = CacheConfig(ttl=300, negative_ttl=30, stale_if_error=3600, refresh_window=0, ttl_spread=0)


@pytest.fixture
async def seeded(service: DirectoryService) -> DirectoryService:
    await seed(service)
    return service


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


# -- routes and site matching ------------------------------------------------------------------


async def test_route_for_account_follows_account_tenant_host(seeded: DirectoryService,
                                                             store: SQLStore) -> None:
    directory = Directory(store, CONFIG)
    route = await directory.route_for_account("alice")
    assert isinstance(route, AccountRoute)
    assert (route.account.username, route.tenant.name, route.host.name) == ("alice", "t1",
                                                                             "host-a")
    assert (route.host.address, route.host.ssh_port) == ("10.0.0.1", 2201)
    assert route.account.protocols == frozenset({"ssh", "ftp"})
    bob = await directory.route_for_account("bob")
    assert bob is not None and bob.account.protocols == frozenset({"ftp"})
    assert await directory.route_for_account("nobody") is None


async def test_route_for_site_and_wildcard_rules(seeded: DirectoryService, store: SQLStore) -> None:
    directory = Directory(store, CONFIG)
    exact = await directory.route_for_site("www.example.com")
    assert isinstance(exact, SiteRoute)
    assert (exact.site.hostname, exact.tenant.name, exact.host.name) == ("www.example.com", "t1",
                                                                         "host-a")
    # exact beats wildcard: www is t1's although *.example.com is t2's
    wild = await directory.route_for_site("a.example.com")
    assert wild is not None and (wild.site.hostname, wild.tenant.name) == ("*.example.com", "t2")
    # one label only
    assert await directory.route_for_site("example.com") is None
    assert await directory.route_for_site("a.b.example.com") is None
    assert await directory.site("other.test") is None


@pytest.mark.parametrize("spelling", ["WWW.EXAMPLE.COM", "www.example.com.", "Www.Example.Com.",
                                      " www.example.com "])
async def test_hostnames_are_normalised_on_lookup(seeded: DirectoryService, store: SQLStore,
                                                  spelling: str) -> None:
    directory = Directory(store, CONFIG)
    site = await directory.site(spelling)
    assert site is not None and site.hostname == "www.example.com"


async def test_idna_spellings_are_the_same_site(seeded: DirectoryService, store: SQLStore) -> None:
    directory = Directory(store, CONFIG)
    for spelling in ("bücher.example", "xn--bcher-kva.example", "BÜCHER.example.",
                     "XN--BCHER-KVA.EXAMPLE"):
        site = await directory.site(spelling)
        assert site is not None and site.hostname == "xn--bcher-kva.example", spelling
    assert [s.hostname for s in await store.list_sites()].count("xn--bcher-kva.example") == 1


@pytest.mark.parametrize("garbage", [
    "", ".", "..", "a..b", "exa mple.com", "example.com:443", "127.0.0.1", "[::1]", "-a.com",
    "a-.com", "under_score.com", "x" * 64 + ".com", ("a." * 130) + "com", "\x00.com",
    "*.example.com", "a/b.com", "ex%41mple.com", "xn--.com", "\udcff.com"])
async def test_garbage_host_or_sni_is_unknown_without_query(seeded: DirectoryService,
                                                            store: SQLStore, garbage: str) -> None:
    queries = count_calls(store, "fetch_site_pair")
    directory = Directory(store, CONFIG)
    assert await directory.site(garbage) is None
    assert await directory.route_for_site(garbage) is None
    assert len(queries) == 0


@pytest.mark.parametrize("username", ["", " ", "a b", "-x", "x" * 200, "ali\x00ce", "ä"])
async def test_garbage_usernames_are_unknown_without_query(store: SQLStore, username: str) -> None:
    queries = count_calls(store, "fetch_account")
    directory = Directory(store, CONFIG)
    assert await directory.route_for_account(username) is None
    assert len(queries) == 0


# -- negative caching --------------------------------------------------------------------------


async def test_unknown_name_is_queried_once(seeded: DirectoryService, store: SQLStore,
                                            clock: FakeClock) -> None:
    sites = count_calls(store, "fetch_site_pair")
    accounts = count_calls(store, "fetch_account")
    directory = Directory(store, CONFIG, clock=clock)
    for _ in range(2):
        assert await directory.site("unknown.other.test") is None
        assert await directory.site("nohost.test") is None
        assert await directory.account("ghost") is None
    assert len(sites) == 2
    assert len(accounts) == 1
    assert directory.accounts.stats.negative_hits == 1


async def test_negative_entry_expires_after_negative_ttl(seeded: DirectoryService,
                                                         store: SQLStore, clock: FakeClock) -> None:
    accounts = count_calls(store, "fetch_account")
    directory = Directory(store, CONFIG, clock=clock)
    assert await directory.account("ghost") is None
    clock.advance(CONFIG.negative_ttl - 1)
    assert await directory.account("ghost") is None
    assert len(accounts) == 1
    await seeded.add_account("ghost", "t1")  # no change feed here: only expiry can tell
    assert await directory.account("ghost") is None
    clock.advance(2)
    account = await directory.account("ghost")
    assert account is not None and account.tenant == "t1"
    assert len(accounts) == 2


async def test_site_added_later_is_found_after_change_feed(seeded: DirectoryService,
                                                           store: SQLStore,
                                                           clock: FakeClock) -> None:
    directory = Directory(store, CONFIG, clock=clock)
    feed = await feed_at_head(ChangeFeed(directory, clock=clock))
    assert await directory.site("new.example.org") is None
    assert await directory.site("a.shop.test") is None
    assert await directory.site("shop.test") is None
    await seeded.add_site("new.example.org", "t1")
    await seeded.add_site("*.shop.test", "t2")
    assert await directory.site("new.example.org") is None  # still the cached negative
    assert await feed.poll_once() == 2
    found = await directory.site("new.example.org")
    assert found is not None and found.tenant == "t1"
    # the wildcard covers the name previously cached as unknown...
    wild = await directory.site("a.shop.test")
    assert wild is not None and wild.hostname == "*.shop.test"
    # ...but still not its parent
    assert await directory.site("shop.test") is None


# -- single-flight -----------------------------------------------------------------------------


async def test_hundred_concurrent_cold_lookups_make_one_query(seeded: DirectoryService,
                                                              store: SQLStore) -> None:
    accounts = count_calls(store, "fetch_account")
    sites = count_calls(store, "fetch_site_pair")
    directory = Directory(store, CONFIG)
    results = await asyncio.gather(*(directory.account("alice") for _ in range(100)))
    assert len(accounts) == 1
    assert {r.tenant for r in results if r is not None} == {"t1"} and None not in results
    routes = await asyncio.gather(*(directory.route_for_site("q.example.com") for _ in range(100)))
    assert len(sites) == 1
    assert all(r is not None and r.tenant.name == "t2" for r in routes)


async def test_cancelled_waiter_does_not_cancel_the_others(seeded: DirectoryService,
                                                           store: SQLStore) -> None:
    hold = Hold(store, "fetch_account")
    directory = Directory(store, CONFIG)
    tasks = [asyncio.create_task(directory.account("alice")) for _ in range(5)]
    await asyncio.wait_for(hold.queried.wait(), 10)
    tasks[0].cancel()
    tasks[3].cancel()
    hold.release.set()
    done = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(done[0], asyncio.CancelledError)
    assert isinstance(done[3], asyncio.CancelledError)
    for i in (1, 2, 4):
        assert done[i] is not None and done[i].username == "alice"  # type: ignore[union-attr]
    assert hold.calls == 1
    assert await directory.account("alice") is not None and hold.calls == 1  # it was cached


async def test_all_waiters_cancelled_the_load_still_completes(seeded: DirectoryService,
                                                              store: SQLStore) -> None:
    hold = Hold(store, "fetch_account")
    directory = Directory(store, CONFIG)
    tasks = [asyncio.create_task(directory.account("alice")) for _ in range(3)]
    await asyncio.wait_for(hold.queried.wait(), 10)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    hold.release.set()
    for _ in range(50):
        await asyncio.sleep(0)
        if directory.accounts.stats.loads and len(directory.accounts):
            break
    assert await directory.account("alice") is not None
    assert hold.calls == 1


# -- stale-if-error with the database really unreachable -------------------------------------


async def _warm_and_expire(directory: Directory, clock: FakeClock) -> None:
    assert (await directory.route_for_account("alice")).host.name == "host-a"  # type: ignore[union-attr]
    assert (await directory.route_for_site("www.example.com")).tenant.name == "t1"  # type: ignore[union-attr]
    assert await directory.account("ghost") is None
    clock.advance(CONFIG.ttl + 1)  # every entry expired, well inside stale_if_error


async def breaker_closed(directory: Directory) -> None:
    """Wait (bounded) for the circuit breaker's background probe to reach the database: until
    then lookups are answered from memory without asking it."""
    deadline = time.monotonic() + 20
    while directory.breaker.open:
        assert time.monotonic() < deadline, "the breaker's probe never reached the database"
        await asyncio.sleep(0.05)


async def _assert_stale_answers(directory: Directory) -> None:
    stale_before = sum(c.stats.stale for c in directory.caches)
    route = await directory.route_for_account("alice")
    assert route is not None and route.host.name == "host-a"
    site = await directory.route_for_site("www.example.com")
    assert site is not None and site.tenant.name == "t1"
    assert await directory.account("ghost") is None  # a stale negative answer is still an answer
    assert sum(c.stats.stale for c in directory.caches) > stale_before
    assert directory.accounts.stats.stale >= 2
    with pytest.raises(DirectoryUnavailable, match="directory database") as info:
        await directory.route_for_account("bob")
    assert "bob" not in directory.accounts._entries
    return info.value  # type: ignore[return-value]


@pytest.fixture
async def forwarded_mysql(mysql_url: str) -> AsyncIterator[tuple[MySQLStore, TcpForwarder]]:
    args = parse_mysql_url(mysql_url)
    forwarder = TcpForwarder(args["host"], args["port"])
    await forwarder.start()
    auth = args["user"] + (":" + args["password"] if args["password"] else "")
    url = f"mysql://{auth}@127.0.0.1:{forwarder.port}/{args['db']}"
    store = MySQLStore(url, connect_timeout=2.0, query_timeout=2.0)
    await store.open()
    await store.migrate()
    yield store, forwarder
    await store.close()
    await forwarder.stop()


@pytest.mark.mysql
async def test_mysql_stale_if_error_when_database_unreachable(
        forwarded_mysql: tuple[MySQLStore, TcpForwarder], keybox: object,
        clock: FakeClock) -> None:
    store, forwarder = forwarded_mysql
    service = DirectoryService(store)
    await seed(service)
    directory = Directory(store, CONFIG, clock=clock)
    await _warm_and_expire(directory, clock)

    await forwarder.stop()  # listener closed, every pooled connection aborted
    with pytest.raises(DirectoryUnavailable):
        await store.ping()
    error = await _assert_stale_answers(directory)
    assert f"127.0.0.1:{forwarder.port}" in str(error)
    # the change feed reports the outage rather than crashing
    feed = ChangeFeed(directory, clock=clock)
    with pytest.raises(DirectoryUnavailable):
        await feed.poll_once()

    await forwarder.start()  # same port: the database is back
    await service.move_tenant("t1", "host-b")
    await breaker_closed(directory)
    clock.advance(CONFIG.ttl + 1)
    route = await directory.route_for_account("alice")
    assert route is not None and route.host.name == "host-b"  # loaded again, not stale
    bob = await directory.route_for_account("bob")
    assert bob is not None and bob.tenant.name == "t2"


async def test_sqlite_stale_if_error_when_database_fails(sqlite_url: str,
                                                         clock: FakeClock) -> None:
    # A held lock cannot make a WAL reader fail quickly (BEGIN EXCLUSIVE does not block WAL
    # readers; a held -shm lock surfaces only after ~10 s as SQLITE_PROTOCOL). So the failure
    # used is another genuine one: another connection takes the tables away (a broken
    # migration / restore in progress) and every query of the store fails.
    path = sqlite_url[len("sqlite:///"):]
    store = SQLiteStore(path, busy_timeout=0.2)
    await store.open()
    await store.migrate()
    try:
        service = DirectoryService(store)
        await seed(service)
        directory = Directory(store, CONFIG, clock=clock)
        await _warm_and_expire(directory, clock)
        other = sqlite3.connect(path, isolation_level=None)
        tables = ("accounts", "tenants", "hosts", "sites", "changes")
        for table in tables:
            other.execute(f"ALTER TABLE {table} RENAME TO {table}_away")
        error = await _assert_stale_answers(directory)
        assert "run `edge init`" in str(error) and path in str(error)

        # A writer holding the lock: writes fail after the short busy timeout, reads go on.
        for table in tables:
            other.execute(f"ALTER TABLE {table}_away RENAME TO {table}")
        other.execute("BEGIN EXCLUSIVE")
        with pytest.raises(DirectoryUnavailable, match="locked"):
            await service.move_tenant("t1", "host-b")
        other.execute("COMMIT")
        other.close()

        await service.move_tenant("t1", "host-b")
        await breaker_closed(directory)
        clock.advance(CONFIG.ttl + 1)
        route = await directory.route_for_account("alice")
        assert route is not None and route.host.name == "host-b"
        assert await directory.route_for_account("bob") is not None
    finally:
        await store.close()


async def test_stale_answers_stop_after_stale_if_error(seeded: DirectoryService,
                                                       store: SQLStore, clock: FakeClock) -> None:
    directory = Directory(store, CacheConfig(ttl=10, negative_ttl=5, stale_if_error=100, refresh_window=0),
                          clock=clock)
    assert await directory.account("alice") is not None
    await store.close()  # from now on every query fails with DirectoryUnavailable
    clock.advance(10 + 50)
    assert await directory.account("alice") is not None
    assert directory.accounts.stats.stale == 1
    clock.advance(100)
    with pytest.raises(DirectoryUnavailable):
        await directory.account("alice")


# -- schema ------------------------------------------------------------------------------------


async def test_migrate_is_idempotent(database_url: str) -> None:
    from edge.directory.stores import store_for_url

    store = store_for_url(database_url)
    await store.open()
    try:
        assert await store.schema_version() == 0
        assert await store.migrate() == [m[0] for m in schema.MIGRATIONS]
        assert await store.migrate() == []
        assert await store.migrate() == []
        assert await store.schema_version() == schema.SCHEMA_VERSION
        assert await store.count("changes") == 0
        rows = await store.fetchall("SELECT version FROM schema_migrations")
        assert sorted(r[0] for r in rows) == [m[0] for m in schema.MIGRATIONS]
    finally:
        await store.close()
