"""The directory on a real replicated MariaDB: a private primary and replica pair
(``tests.support_mariadb.mariadb_pair``; never the shared server).

The proxies' read path is what a worker of ``edge serve`` builds: ``read_store(config)`` under a
:class:`Directory` and its :class:`ChangeFeed`; writes go through :class:`DirectoryService` on
the primary, as the CLI does.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager

import pytest

from edge.config import CacheConfig, DatabaseConfig
from edge.directory.directory import Directory
from edge.directory.feed import ChangeFeed
from edge.directory.replica import ReplicaStore
from edge.directory.service import DirectoryService
from edge.directory.stores import read_store, store_for_url
from edge.errors import DirectoryUnavailable
from tests.support_mariadb import ReplicatedPair, mariadb_pair  # noqa: F401 - fixture
from tests.test_serve import ROOT

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]
FEED_INTERVAL = 0.2


@pytest.fixture
def database(mariadb_pair: ReplicatedPair) -> Iterator[str]:  # noqa: F811
    """A fresh database created on the primary (and so on the replica), with the schema and
    two hosts, a tenant on web1 and its site; the replica caught up."""
    for server in (mariadb_pair.primary, mariadb_pair.replica):
        server.ensure_running()
    mariadb_pair.start_replication()  # no-op when running; again after a restart
    name = "edge_replica_" + uuid.uuid4().hex[:10]
    with mariadb_pair.primary.connect().cursor() as cursor:
        cursor.execute(f"CREATE DATABASE {name}")

    async def provision() -> None:
        store = store_for_url(mariadb_pair.primary.url(name))
        await store.open()
        await store.migrate()
        service = DirectoryService(store, None)
        await service.add_host("web1", "10.0.0.1")
        await service.add_host("web2", "10.0.0.2")
        await service.add_tenant("acme", "web1")
        await service.add_site("www.acme.test", "acme")
        await store.close()

    asyncio.run(provision())
    mariadb_pair.wait_caught_up(name)
    yield name
    for server in (mariadb_pair.primary, mariadb_pair.replica):
        server.ensure_running()
    mariadb_pair.resume_applying()
    with mariadb_pair.primary.connect().cursor() as cursor:
        cursor.execute(f"DROP DATABASE IF EXISTS {name}")


def config_for(pair: ReplicatedPair, name: str, fallback: str = "primary") -> DatabaseConfig:
    return DatabaseConfig(url=pair.primary.url(name), replica_url=pair.replica.url(name),
                          replica_fallback=fallback, connect_timeout=1.0, query_timeout=1.0)


@asynccontextmanager
async def proxy_reads(store: ReplicaStore | object) -> AsyncIterator[Directory]:
    """A worker's read side over ``store``: directory cache + change feed."""
    assert isinstance(store, ReplicaStore)
    await store.open()
    directory = Directory(store, CacheConfig(change_poll_interval=FEED_INTERVAL))
    feed = ChangeFeed(directory, interval=FEED_INTERVAL)
    await feed.start()
    try:
        yield directory
    finally:
        await feed.stop()
        await directory.close()
        await store.close()


async def write(pair: ReplicatedPair, name: str, action: str, *args: str) -> None:
    store = store_for_url(pair.primary.url(name))
    await store.open()
    try:
        await getattr(DirectoryService(store, None), action)(*args)
    finally:
        await store.close()


async def backend_of(directory: Directory, hostname: str) -> str | None:
    route = await directory.route_for_site(hostname)
    return None if route is None else route.host.name


async def eventually(check: Callable[[], Awaitable[bool]], within: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.05)


def com_select(pair: ReplicatedPair) -> int:
    with pair.primary.connect().cursor() as cursor:
        cursor.execute("SHOW GLOBAL STATUS LIKE 'Com_select'")
        return int(cursor.fetchone()[1])


async def test_a_move_reaches_a_proxy_on_a_lagging_replica_only_once_replicated(
        mariadb_pair: ReplicatedPair, database: str) -> None:  # noqa: F811
    """Lookups and the change feed read the replica: while it lags, the proxy keeps the old
    route (it never evicts and reloads the old row); once the move replicates, it follows
    within a poll; a site added meanwhile appears at the same moment."""
    async with proxy_reads(read_store(config_for(mariadb_pair, database))) as directory:
        assert await backend_of(directory, "www.acme.test") == "web1"
        mariadb_pair.pause_applying()
        await write(mariadb_pair, database, "move_tenant", "acme", "web2")
        await write(mariadb_pair, database, "add_site", "shop.acme.test", "acme")
        await asyncio.sleep(FEED_INTERVAL * 8)
        assert await backend_of(directory, "www.acme.test") == "web1"
        assert await backend_of(directory, "shop.acme.test") is None
        assert directory.store.source == "replica"  # type: ignore[attr-defined]
        mariadb_pair.resume_applying()
        await eventually(lambda: _is(directory, "www.acme.test", "web2"))
        await eventually(lambda: _is(directory, "shop.acme.test", "web2"))


async def _is(directory: Directory, hostname: str, host: str) -> bool:
    return await backend_of(directory, hostname) == host


async def test_replica_down_reads_go_to_the_primary_and_come_back_once_it_caught_up(
        mariadb_pair: ReplicatedPair, database: str, caplog: pytest.LogCaptureFixture) -> None:  # noqa: F811
    """``replica_fallback = "primary"``: the replica killed → the same lookup is answered by
    the primary and the switch is logged; the replica back but behind → still the primary;
    caught up → the replica again."""
    config = config_for(mariadb_pair, database)
    store = ReplicaStore(store_for_url(config.replica_url, config), store_for_url(config.url, config),
                         retry=0.3)
    async with proxy_reads(store) as directory:
        assert await backend_of(directory, "www.acme.test") == "web1"
        mariadb_pair.replica.kill()
        await write(mariadb_pair, database, "add_site", "new.acme.test", "acme")
        assert await backend_of(directory, "new.acme.test") == "web1"
        assert store.source == "primary"
        assert "reading from the primary" in caplog.text
        mariadb_pair.replica.start()  # --skip-slave-start: it answers, but applies nothing yet
        await asyncio.sleep(1.0)
        assert store.source == "primary"  # behind the primary: not used
        assert await backend_of(directory, "new.acme.test") == "web1"
        mariadb_pair.start_replication()
        await eventually(lambda: _source(directory, store, "replica"))


async def _source(directory: Directory, store: ReplicaStore, wanted: str) -> bool:
    await directory.route_for_site("probe.invalid")  # a read, so the store may probe
    return store.source == wanted


async def test_replica_down_with_the_stale_policy_serves_memory_and_spares_the_primary(
        mariadb_pair: ReplicatedPair, database: str) -> None:  # noqa: F811
    """``replica_fallback = "stale"``: warm routes keep answering from memory, a name never
    seen fails at once, and not one query reaches the primary."""
    async with proxy_reads(read_store(config_for(mariadb_pair, database, "stale"))) as directory:
        assert await backend_of(directory, "www.acme.test") == "web1"
        before = com_select(mariadb_pair)
        mariadb_pair.replica.kill()
        await asyncio.sleep(FEED_INTERVAL * 5)
        for _ in range(20):
            assert await backend_of(directory, "www.acme.test") == "web1"
        with pytest.raises(DirectoryUnavailable):
            await directory.route_for_site("never.seen.test")
        assert com_select(mariadb_pair) == before


def test_primary_down_reads_go_on_and_writes_fail_with_a_clear_error(
        mariadb_pair: ReplicatedPair, database: str) -> None:  # noqa: F811
    """The primary killed: the proxies' reads (replica) go on; ``edge tenant move`` fails at
    once with one line naming the database, exit status non-zero, nothing half-written."""
    config = config_for(mariadb_pair, database)

    async def reads() -> str | None:
        async with proxy_reads(read_store(config)) as directory:
            return await backend_of(directory, "www.acme.test")

    mariadb_pair.primary.kill()
    assert asyncio.run(reads()) == "web1"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "EDGE_DATABASE_URL": config.url}
    env.pop("EDGE_CONFIG", None)
    result = subprocess.run(
        [sys.executable, "-c", "import sys; from edge.cli.main import main; sys.exit(main())",
         "tenant", "move", "acme", "--to", "web2"],
        env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "directory database" in result.stderr and "Traceback" not in result.stderr
    assert str(mariadb_pair.primary.port) in result.stderr
    mariadb_pair.primary.start()
    with mariadb_pair.primary.connect(database).cursor() as cursor:
        cursor.execute("SELECT h.name FROM tenants t JOIN hosts h ON h.id = t.host_id "
                       "WHERE t.name = 'acme'")
        assert cursor.fetchone()[0] == "web1"


def test_replica_fallback_setting_is_checked() -> None:
    from edge.config import config_from_mapping
    from edge.errors import ConfigError

    with pytest.raises((ConfigError, ValueError), match="primary, stale"):
        config_from_mapping({"database": {"replica_fallback": "maybe"}})
