"""A hung worker of ``edge serve`` (here: SIGSTOP) is found by the master's watchdog, killed
and replaced, so its share of new connections (its SO_REUSEPORT socket) is served again."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.test_serve import Echo, EdgeServe, config_text, db_url, http_get, start, wait_for

__all__ = ["db_url", "start"]  # fixtures used below

pytestmark = pytest.mark.timeout(120)


def _workers(server: EdgeServe) -> set[int]:
    pid = server.proc.pid
    return {int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}


def _pids_seen(server: EdgeServe, connections: int) -> tuple[set[int], int]:
    """Worker pids that greeted ``connections`` new sessions, and how many got no greeting."""
    seen, failed = set(), 0
    for _ in range(connections):
        try:
            session = Echo(server.port)
        except OSError:
            failed += 1
            continue
        seen.add(session.pid)
        session.close()
    return seen, failed


def test_hung_worker_is_killed_and_replaced(start: Callable[..., EdgeServe], db_url: str) -> None:
    server = start(config_text(db_url, workers=2).replace(
        "grace_period", "watchdog_timeout = 2.0\ngrace_period"))
    server.wait_ready(30)
    hung = min(_workers(server))
    os.kill(hung, signal.SIGSTOP)
    try:
        # /readyz stops saying ready while the worker is silent ...
        wait_for(lambda: http_get(server.url("/readyz"))[0] == 503, 20, "readyz 503")
        # ... the master kills it and a new worker takes the slot (and the socket).
        wait_for(lambda: hung not in _workers(server) and len(_workers(server)) == 2, 30,
                 "hung worker replaced")
        server.wait_ready(30)
    finally:
        if hung in _workers(server):
            os.kill(hung, signal.SIGKILL)
            os.kill(hung, signal.SIGCONT)
    assert any(r["msg"].startswith("worker has not answered") for r in server.records())
    deadline = time.monotonic() + 20
    seen, failed = _pids_seen(server, 20)
    while len(seen) < 2 and time.monotonic() < deadline:  # both slots greet new sessions
        more, lost = _pids_seen(server, 10)
        seen |= more
        failed += lost
    assert failed == 0 and hung not in seen and len(seen) == 2
    assert server.stop() == 0


def test_worker_without_a_control_socket_is_left_serving(
        start: Callable[..., EdgeServe], db_url: str, tmp_path: Path) -> None:
    # A worker whose control socket could not start logs it and keeps serving ("serving
    # matters more than edge sessions"): the watchdog cannot watch it and must not kill it
    # every watchdog_timeout. Here its socket file is removed under it.
    server = start(config_text(db_url, workers=2).replace(
        "grace_period", "watchdog_timeout = 1.0\ngrace_period"), env={"TMPDIR": str(tmp_path)})
    server.wait_ready(30)
    unwatched = min(_workers(server))
    (socket_file,) = tmp_path.glob(f"edge-control-*/{unwatched}.sock")
    socket_file.unlink()
    time.sleep(4)  # four watchdog timeouts
    assert unwatched in _workers(server)
    assert not any(r["msg"].startswith("worker has not answered") for r in server.records())
    assert http_get(server.url("/readyz"))[0] == 200
    assert server.stop() == 0
