"""The fault-injection helpers do what the fault tests assume they do."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from edge.directory.mysql import MySQLStore
from tests.support_mariadb import PrivateMariaDB, private_mariadb  # noqa: F401

pytestmark = pytest.mark.slow


def _states(pid: int) -> list[str]:
    states = []
    for thread in Path(f"/proc/{pid}/task").iterdir():
        try:
            states.append((thread / "stat").read_text().rsplit(")", 1)[1].split()[0])
        except FileNotFoundError:
            continue
    return states


def test_stopped_mariadb_has_no_running_thread_when_stop_returns(
        private_mariadb: PrivateMariaDB) -> None:  # noqa: F811
    # kill(SIGSTOP) only queues the signal: right after it, a thread woken by a query could
    # still answer. tests/test_directory_faults.py sends its poll at once and expects no
    # answer ("DID NOT RAISE DirectoryUnavailable" on a loaded machine).
    private_mariadb.ensure_running()
    assert private_mariadb.process is not None
    pid = private_mariadb.process.pid
    try:
        for _ in range(10):
            private_mariadb.stop()
            running = [s for s in _states(pid) if s not in ("T", "t", "Z", "X")]
            assert not running, f"threads still runnable after stop(): {running}"
            private_mariadb.cont()
    finally:
        private_mariadb.ensure_running()
    assert os.waitpid(pid, os.WNOHANG) == (0, 0)  # and it is still alive


async def test_closing_the_store_while_a_query_runs_does_not_hang(
        private_mariadb: PrivateMariaDB) -> None:  # noqa: F811
    # A worker shutting down (or a test's teardown) while a breaker probe still waits on the
    # database: close() waits for that connection to come back to its pool, so the query's
    # release must reach the pool even though close() already let go of it.
    private_mariadb.ensure_running()
    store = MySQLStore(private_mariadb.url("mysql"), pool_size=2, query_timeout=5.0)
    await store.open()
    query = asyncio.create_task(store.fetchone("SELECT SLEEP(0.5)"))
    await asyncio.sleep(0.1)  # the query is on the wire
    await asyncio.wait_for(store.close(), 10)
    assert await query == (0,)
