"""The change feed on both real stores: each write evicts exactly its keys in another
Directory, a second OS process sees a tenant move, loads racing an eviction are not cached,
and change ids that become visible behind the cursor are still applied."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from edge.config import CacheConfig
from edge.directory.directory import Directory
from edge.directory.feed import ChangeFeed
from edge.directory.model import Change
from edge.directory.service import DirectoryService
from edge.directory.store import SQLStore
from tests.support_clock import FakeClock
from tests.support_directory import Hold, feed_at_head, is_cached, seed

CONFIG = CacheConfig(ttl=3600, negative_ttl=3600, stale_if_error=3600)
ROOT = Path(__file__).resolve().parent.parent

# Keys warmed in the watching Directory: (cache attribute, key).
WARM: list[tuple[str, str]] = [
    ("accounts", "alice"), ("accounts", "bob"), ("accounts", "ghost"),
    ("tenants", "t1"), ("tenants", "t2"),
    ("hosts", "host-a"), ("hosts", "host-b"),
    ("sites", "www.example.com"), ("sites", "new.example.com"), ("sites", "a.example.com"),
    ("sites", "x.other.test"),
    ("wildcards", "example.com"), ("wildcards", "other.test"),
]

Write = Callable[[DirectoryService], Awaitable[Any]]
WRITES: list[tuple[str, Write, set[tuple[str, str]]]] = [
    ("move_tenant", lambda s: s.move_tenant("t1", "host-b"), {("tenants", "t1")}),
    ("add_site", lambda s: s.add_site("new.example.com", "t1"), {("sites", "new.example.com")}),
    ("add_wildcard_site", lambda s: s.add_site("*.other.test", "t1"),
     {("wildcards", "other.test")}),
    ("remove_site", lambda s: s.remove_site("www.example.com"), {("sites", "www.example.com")}),
    ("remove_wildcard_site", lambda s: s.remove_site("*.example.com"),
     {("wildcards", "example.com")}),
    ("update_host", lambda s: s.update_host("host-a", notice="back soon", ssh_port=2222),
     {("hosts", "host-a")}),
    ("set_host_state", lambda s: s.set_host_state("host-b", "maintenance", "patching"),
     {("hosts", "host-b")}),
    ("remove_account", lambda s: s.remove_account("alice"), {("accounts", "alice")}),
    ("add_account", lambda s: s.add_account("ghost", "t2"), {("accounts", "ghost")}),
    ("set_tenant_state", lambda s: s.set_tenant_state("t2", "suspended"), {("tenants", "t2")}),
]


async def _warm(directory: Directory) -> None:
    for kind, key in WARM:
        if kind == "sites":
            await directory.site(key)
        elif kind == "wildcards":
            await directory.wildcards.get(key)
        else:
            await getattr(directory, kind).get(key)
    for kind, key in WARM:
        assert is_cached(getattr(directory, kind), key), (kind, key)


@pytest.mark.parametrize(("write", "evicted"), [(w, e) for _, w, e in WRITES],
                         ids=[name for name, _, _ in WRITES])
async def test_each_write_evicts_exactly_its_keys(service: DirectoryService, store: SQLStore,
                                                  write: Write,
                                                  evicted: set[tuple[str, str]]) -> None:
    await seed(service)
    clock = FakeClock()
    directory = Directory(store, CONFIG, clock=clock)
    feed = await feed_at_head(ChangeFeed(directory, clock=clock))
    seen: list[Change] = []
    feed.subscribe(seen.append)
    await _warm(directory)
    await write(service)
    assert await feed.poll_once() == 1
    assert len(seen) == 1
    still = {(kind, key) for kind, key in WARM if is_cached(getattr(directory, kind), key)}
    assert set(WARM) - still == evicted
    assert await feed.poll_once() == 0


async def test_evicted_keys_reload_the_new_answer(service: DirectoryService,
                                                  store: SQLStore) -> None:
    await seed(service)
    directory = Directory(store, CONFIG)
    feed = await feed_at_head(ChangeFeed(directory))
    assert (await directory.route_for_account("alice")).host.name == "host-a"  # type: ignore[union-attr]
    assert (await directory.route_for_site("x.example.com")).host.name == "host-a"  # type: ignore[union-attr]
    await service.move_tenant("t1", "host-b", drain=30)
    await service.set_host_state("host-a", "maintenance", "disk swap")
    await service.remove_site("*.example.com")
    # before the poll, the cache still answers the old way
    assert (await directory.route_for_account("alice")).host.name == "host-a"  # type: ignore[union-attr]
    assert await feed.poll_once() == 3
    route = await directory.route_for_account("alice")
    assert route is not None and route.host.name == "host-b"
    assert route.tenant.previous_host == "host-a" and route.tenant.drain_deadline is not None
    host_a = await directory.host("host-a")
    assert host_a is not None and (host_a.state, host_a.notice) == ("maintenance", "disk swap")
    assert await directory.route_for_site("x.example.com") is None


async def test_second_process_sees_tenant_move(service: DirectoryService, store: SQLStore,
                                               database_url: str) -> None:
    await seed(service)
    child = await asyncio.create_subprocess_exec(
        sys.executable, str(ROOT / "tests" / "support_feed_child.py"), database_url, "alice",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, cwd=str(ROOT), env={"PYTHONPATH": str(ROOT),
                                                            "PATH": "/usr/bin:/bin"})
    assert child.stdout is not None and child.stdin is not None

    async def wait_for_line(expected: str, within: float) -> None:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            line = await asyncio.wait_for(child.stdout.readline(), deadline - time.monotonic())
            if not line:
                break
            if line.decode().strip() == expected:
                return
        err = await child.stderr.read() if child.returncode is not None else b""  # type: ignore[union-attr]
        raise AssertionError(f"child never printed {expected!r}: {err.decode()[-2000:]}")

    try:
        await wait_for_line("ready", 20)
        await wait_for_line("host-a", 10)  # the child has cached alice -> t1 -> host-a
        await service.move_tenant("t1", "host-b")
        await wait_for_line("host-b", 10)
    finally:
        child.stdin.close()
        try:
            await asyncio.wait_for(child.wait(), 10)
        except TimeoutError:
            child.kill()
            await child.wait()
    assert child.returncode == 0


async def test_load_in_flight_when_evicted_is_not_cached(service: DirectoryService,
                                                         store: SQLStore) -> None:
    await seed(service)
    hold = Hold(store, "fetch_account")
    directory = Directory(store, CONFIG)
    feed = await feed_at_head(ChangeFeed(directory))
    waiter = asyncio.create_task(directory.account("alice"))
    await asyncio.wait_for(hold.queried.wait(), 10)  # the load has read the old row
    await service.remove_account("alice")
    assert await feed.poll_once() == 1
    hold.stop_holding()
    old = await waiter
    assert old is not None and old.username == "alice"  # its waiters still get an answer
    assert await directory.account("alice") is None  # but it was not cached
    assert hold.calls == 2


async def test_tenant_load_in_flight_during_move_is_not_cached(service: DirectoryService,
                                                               store: SQLStore) -> None:
    await seed(service)
    hold = Hold(store, "fetch_tenant")
    directory = Directory(store, CONFIG)
    feed = await feed_at_head(ChangeFeed(directory))
    waiter = asyncio.create_task(directory.route_for_account("alice"))
    await asyncio.wait_for(hold.queried.wait(), 10)
    await service.move_tenant("t1", "host-b")
    await feed.poll_once()
    hold.stop_holding()
    assert (await waiter).host.name == "host-a"  # type: ignore[union-attr]
    route = await directory.route_for_account("alice")
    assert route is not None and route.host.name == "host-b"


async def test_wildcard_added_while_site_load_in_flight_is_not_cached_unknown(
        service: DirectoryService, store: SQLStore) -> None:
    await seed(service)
    hold = Hold(store, "fetch_site_pair")
    directory = Directory(store, CONFIG)
    feed = await feed_at_head(ChangeFeed(directory))
    waiter = asyncio.create_task(directory.site("a.shop.test"))
    await asyncio.wait_for(hold.queried.wait(), 10)  # read: no exact, no wildcard
    await service.add_site("*.shop.test", "t2")
    assert await feed.poll_once() == 1
    hold.stop_holding()
    # The held lookup read "no wildcard" before the change; it may answer that, or (because the
    # wildcard half was not cached) re-ask and see the new site. What must never happen is
    # that the stale "unknown" is cached.
    first = await waiter
    assert first is None or first.hostname == "*.shop.test"
    site = await directory.site("a.shop.test")
    assert site is not None and site.hostname == "*.shop.test"


async def test_change_id_visible_behind_the_cursor_is_applied(service: DirectoryService,
                                                              store: SQLStore) -> None:
    await seed(service)
    clock = FakeClock()
    directory = Directory(store, CONFIG, clock=clock)
    feed = await feed_at_head(ChangeFeed(directory, clock=clock, gap_timeout=60))
    assert await directory.account("alice") is not None
    assert await directory.account("bob") is not None
    head = feed.cursor
    assert head is not None

    async def insert(change_id: int, entity: str, name: str) -> None:
        async with store.transaction() as tx:
            await tx.execute("INSERT INTO changes (id, entity, name, created_at) "
                             "VALUES (?, ?, ?, ?)", (change_id, entity, name, 0.0))

    # id head+5 commits first; head+1..head+4 are still "in flight" (a slow transaction)
    await insert(head + 5, "account", "bob")
    assert await feed.poll_once() == 1
    assert feed.cursor == head + 5
    assert not is_cached(directory.accounts, "bob")
    assert is_cached(directory.accounts, "alice")
    # now the slow transaction's change becomes visible, behind the cursor
    await insert(head + 2, "account", "alice")
    assert await feed.poll_once() == 1
    assert not is_cached(directory.accounts, "alice")
    assert feed.cursor == head + 5
    # applied once only
    assert await directory.account("alice") is not None
    assert await feed.poll_once() == 0
    assert is_cached(directory.accounts, "alice")
    # a gap older than gap_timeout is no longer asked for
    clock.advance(61)
    await insert(head + 3, "account", "alice")
    assert await feed.poll_once() == 0
    assert is_cached(directory.accounts, "alice")


async def test_feed_started_while_database_down_clears_everything(service: DirectoryService,
                                                                  store: SQLStore) -> None:
    await seed(service)
    directory = Directory(store, CONFIG)
    feed = ChangeFeed(directory)  # cursor unknown, as after start() with the database down
    assert await directory.account("alice") is not None
    assert await feed.poll_once() == 0
    assert len(directory.accounts) == 0
    assert feed.cursor == await store.latest_change_id()


async def test_start_and_stop_poll_in_background(service: DirectoryService,
                                                 store: SQLStore) -> None:
    await seed(service)
    directory = Directory(store, CONFIG)
    feed = ChangeFeed(directory, interval=0.01)
    await feed.start()
    try:
        assert feed.healthy and feed.cursor == await store.latest_change_id()
        assert (await directory.route_for_account("alice")).host.name == "host-a"  # type: ignore[union-attr]
        await service.move_tenant("t1", "host-b")
        for _ in range(500):
            if feed.applied:
                break
            await asyncio.sleep(0.01)
        route = await directory.route_for_account("alice")
        assert route is not None and route.host.name == "host-b"
    finally:
        await feed.stop()
