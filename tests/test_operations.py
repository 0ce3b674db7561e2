"""``edge host drain`` as a stored operation (edge/operations.py), on SQLite and the real MariaDB:
planned once, every tenant moved exactly once, idempotent, resumable after the command is
SIGKILLed and after the database is killed mid-way, observable with ``edge operations``."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from edge.directory.service import DirectoryService
from edge.directory.store import SQLStore
from edge.directory.stores import store_for_url
from edge.errors import ConflictError, DirectoryUnavailable, ValidationError
from edge.operations import DrainOptions, Operations, parse_rate
from tests.support_mariadb import PrivateMariaDB, private_mariadb, private_mysql_url  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(120)


async def _fleet(service: DirectoryService, tenants: int, *, extra_on_b: int = 0) -> None:
    for name in ("web1", "web2", "web3"):
        await service.add_host(name, "127.0.0.1")
    for i in range(tenants):
        await service.add_tenant(f"t{i:03d}", "web1")
    for i in range(extra_on_b):
        await service.add_tenant(f"b{i:03d}", "web2")


async def _hosts(store: SQLStore) -> dict[str, str]:
    rows = await store.fetchall("SELECT t.name, h.name FROM tenants t JOIN hosts h "
                                "ON h.id = t.host_id")
    return {str(r[0]): str(r[1]) for r in rows}


async def _tenant_changes(store: SQLStore, after: int) -> list[str]:
    rows = await store.fetchall("SELECT name FROM changes WHERE entity = 'tenant' AND id > ? "
                                "ORDER BY id", (after,))
    return [str(r[0]) for r in rows]


async def test_drain_to_one_host_moves_every_tenant_once_and_twice_does_nothing(
        store: SQLStore, service: DirectoryService) -> None:
    await _fleet(service, 5)
    start = await store.latest_change_id()
    ops = Operations(store, service)
    op = await ops.start_host_drain("web1", DrainOptions(to="web2", drain=30))
    assert op is not None and op.state == "running" and op.progress["pending"] == 5
    done = await ops.resume(op.id)
    assert done.state == "done" and done.progress == {"pending": 0, "done": 5, "skipped": 0,
                                                      "total": 5}
    assert set((await _hosts(store)).values()) == {"web2"}
    # The move drains like `tenant move --drain 30`: previous host and deadline set.
    tenant = await service.get_tenant("t000")
    assert tenant.previous_host == "web1" and tenant.drain_deadline is not None
    assert 20 < tenant.drain_deadline - time.time() <= 30
    assert sorted(await _tenant_changes(store, start)) == [f"t{i:03d}" for i in range(5)]
    # Second run: no tenant left on web1, nothing written at all.
    latest = await store.latest_change_id()
    assert await ops.start_host_drain("web1", DrainOptions(to="web2", drain=30)) is None
    assert await store.latest_change_id() == latest
    assert [o.id for o in await ops.list_operations()] == [op.id]


async def test_spread_fills_the_least_loaded_active_hosts(store: SQLStore,
                                                          service: DirectoryService) -> None:
    await _fleet(service, 6, extra_on_b=2)
    await service.add_host("web4", "127.0.0.1", state="maintenance")
    ops = Operations(store, service)
    op = await ops.start_host_drain("web1", DrainOptions())
    assert op is not None
    await ops.resume(op.id)
    placed = await _hosts(store)
    counts = {h: list(placed.values()).count(h) for h in ("web1", "web2", "web3", "web4")}
    # 2 already on web2: web3 gets 4, web2 2 more -> 4 and 4; never the maintenance host.
    assert counts == {"web1": 0, "web2": 4, "web3": 4, "web4": 0}


async def test_refusals_name_the_problem_and_write_nothing(store: SQLStore,
                                                           service: DirectoryService) -> None:
    await _fleet(service, 2)
    await service.set_host_state("web3", "down")
    ops = Operations(store, service)
    latest = await store.latest_change_id()
    with pytest.raises(ConflictError, match=r"web3.*down"):
        await ops.start_host_drain("web1", DrainOptions(to="web3"))
    with pytest.raises(ValidationError, match="is the host being drained"):
        await ops.start_host_drain("web1", DrainOptions(to="web1"))
    with pytest.raises(ValidationError, match="--rate"):
        parse_rate("fast")
    assert parse_rate("30/min") == 30 and parse_rate("2/s") == 120
    assert await store.latest_change_id() == latest and await ops.list_operations() == []
    # An unfinished drain with other options is not planned again.
    first = await ops.start_host_drain("web1", DrainOptions(to="web2"))
    assert first is not None
    again = await ops.start_host_drain("web1", DrainOptions(to="web2"))
    assert again is not None and again.id == first.id
    with pytest.raises(ConflictError, match=f"operations resume {first.id}"):
        await ops.start_host_drain("web1", DrainOptions())


async def test_a_target_that_goes_down_fails_the_drain_until_resumed(
        store: SQLStore, service: DirectoryService) -> None:
    await _fleet(service, 3)
    ops = Operations(store, service)
    op = await ops.start_host_drain("web1", DrainOptions(to="web2"))
    assert op is not None
    await service.set_host_state("web2", "maintenance")
    failed = await ops.resume(op.id)
    assert failed.state == "failed" and "web2" in failed.error and "maintenance" in failed.error
    assert set((await _hosts(store)).values()) == {"web1"}
    await service.set_host_state("web2", "active")
    assert (await ops.resume(op.id)).state == "done"
    assert set((await _hosts(store)).values()) == {"web2"}


async def test_tenants_moved_away_meanwhile_are_skipped(store: SQLStore,
                                                        service: DirectoryService) -> None:
    await _fleet(service, 3)
    ops = Operations(store, service)
    op = await ops.start_host_drain("web1", DrainOptions(to="web2"))
    assert op is not None
    await service.move_tenant("t001", "web3")
    done = await ops.resume(op.id)
    assert done.progress["done"] == 2 and done.progress["skipped"] == 1
    assert (await _hosts(store))["t001"] == "web3"


async def test_two_runners_of_one_drain_never_move_a_tenant_twice(
        store: SQLStore, service: DirectoryService) -> None:
    await _fleet(service, 12)
    start = await store.latest_change_id()
    op = await Operations(store, service).start_host_drain("web1", DrainOptions(to="web2"))
    assert op is not None
    second = store_for_url(store.url)
    await second.open()
    try:
        await asyncio.gather(Operations(store).resume(op.id), Operations(second).resume(op.id))
    finally:
        await second.close()
    changes = await _tenant_changes(store, start)
    assert sorted(changes) == [f"t{i:03d}" for i in range(12)]  # each exactly once
    assert (await Operations(store).get(op.id)).progress["done"] == 12


# -- crashes: the command (SIGKILL), the database (private MariaDB) --------------------------

def _edge(db_url: str, *args: str, **kwargs: Any) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "EDGE_DATABASE_URL": db_url}
    env.pop("EDGE_CONFIG", None)
    return subprocess.Popen([sys.executable, "-m", "edge.cli.main", *args], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def _setup(db_url: str, tenants: int) -> None:
    async def go() -> None:
        store = store_for_url(db_url)
        await store.open()
        try:
            await store.migrate()
            await _fleet(DirectoryService(store), tenants)
        finally:
            await store.close()

    asyncio.run(go())


def _query(db_url: str, coro: Any) -> Any:
    async def go() -> Any:
        store = store_for_url(db_url)
        await store.open()
        try:
            return await coro(store)
        finally:
            await store.close()

    return asyncio.run(go())


def _wait_moves(db_url: str, at_least: int, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        moved = sum(1 for h in _query(db_url, _hosts).values() if h == "web2")
        if moved >= at_least:
            return moved
        time.sleep(0.05)
    raise AssertionError(f"fewer than {at_least} moves after {timeout}s")


def test_drain_command_sigkilled_mid_way_resumes_where_it_stopped(tmp_path: Path) -> None:
    db_url = f"sqlite:///{tmp_path / 'edge.sqlite3'}"
    _setup(db_url, 20)
    start = _query(db_url, lambda s: s.latest_change_id())
    # 300 moves/min: one every 0.2 s, so the kill lands in the middle.
    proc = _edge(db_url, "host", "drain", "web1", "--to", "web2", "--rate", "300/min")
    moved = _wait_moves(db_url, 3)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    moved = sum(1 for h in _query(db_url, _hosts).values() if h == "web2")
    assert 3 <= moved < 20, moved
    listed = _edge(db_url, "operations", "list", "--json")
    ops = json.loads(listed.communicate(timeout=30)[0])
    assert len(ops) == 1 and ops[0]["state"] == "running"
    assert ops[0]["progress"]["done"] == moved and ops[0]["progress"]["total"] == 20
    # The same command again resumes the saved operation; it does not plan a new one.
    again = _edge(db_url, "host", "drain", "web1", "--to", "web2", "--rate", "6000/min")
    out, err = again.communicate(timeout=60)
    assert again.returncode == 0, err
    assert f"operation {ops[0]['id']}" in out and "done: 20 moved" in out
    assert set(_query(db_url, _hosts).values()) == {"web2"}
    changes = _query(db_url, lambda s: _tenant_changes(s, start))
    assert sorted(changes) == [f"t{i:03d}" for i in range(20)]  # nobody moved twice
    shown = _edge(db_url, "operations", "show", str(ops[0]["id"]))
    text = shown.communicate(timeout=30)[0]
    assert "t019" in text and "done" in text
    third = _edge(db_url, "host", "drain", "web1", "--to", "web2")
    assert "nothing to do" in third.communicate(timeout=30)[0] and third.returncode == 0


def test_drain_survives_the_database_being_killed_mid_way(
        private_mariadb: PrivateMariaDB, private_mysql_url: str) -> None:  # noqa: F811
    db_url = private_mysql_url
    _setup(db_url, 15)
    start = _query(db_url, lambda s: s.latest_change_id())
    proc = _edge(db_url, "host", "drain", "web1", "--to", "web2", "--rate", "300/min",
                 "--retry-for", "1s")
    _wait_moves(db_url, 3)
    private_mariadb.kill()
    out, err = proc.communicate(timeout=60)
    # The command gives up after --retry-for and says how to continue.
    assert proc.returncode == DirectoryUnavailable.exit_code, (out, err)
    assert "operations resume 1" in err
    private_mariadb.start()
    moved = sum(1 for h in _query(db_url, _hosts).values() if h == "web2")
    assert 3 <= moved < 15
    # With a generous --retry-for, a database that comes back mid-run is ridden out.
    resume = _edge(db_url, "operations", "resume", "1", "--retry-for", "60s")
    _wait_moves(db_url, moved + 1)
    private_mariadb.kill()
    time.sleep(1.0)
    private_mariadb.start()
    out, err = resume.communicate(timeout=90)
    assert resume.returncode == 0, err
    assert "done: " in out
    assert set(_query(db_url, _hosts).values()) == {"web2"}
    changes = _query(db_url, lambda s: _tenant_changes(s, start))
    assert sorted(changes) == [f"t{i:03d}" for i in range(15)]
