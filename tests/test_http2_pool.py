"""The backend pool under bursts: many HTTP/2 streams end in one loop iteration and the next
read wants as many backend connections again. Connections beyond the pool's size are kept for
a moment (not closed and reconnected per burst), then trimmed back to the size."""

from __future__ import annotations

import asyncio

import pytest

from httpproxy import upstream
from httpproxy.upstream import BackendConnection, BackendPool


async def test_a_burst_keeps_its_connections_for_the_next_then_trims_to_the_size(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(upstream, "SURPLUS_GRACE", 0.2, raising=False)
    accepted: list[asyncio.StreamWriter] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    pool = BackendPool(size=2, idle_timeout=30, connect_timeout=5, response_timeout=5)
    key = ("127.0.0.1", port, b"", "")
    try:
        burst: list[BackendConnection] = [await pool.connect(key) for _ in range(6)]
        for conn in burst:  # a burst of responses ends: every connection goes idle at once
            pool.release(conn)
        assert pool.idle_count() == 6 and not any(c.closed for c in burst)
        again = [pool.acquire_nowait(key) for _ in range(6)]  # the next burst reuses them all
        assert sorted(map(id, again)) == sorted(map(id, burst)) and pool.connects == 6
        for conn in burst:
            pool.release(conn)
        await asyncio.sleep(0.5)  # the surplus waited its grace unused: back to the size
        assert pool.idle_count() == 2 and sum(c.closed for c in burst) == 4
        assert pool.acquire_nowait(key) is burst[-1]  # the warmest are the ones kept
    finally:
        pool.close()
        for writer in accepted:
            writer.close()
        server.close()


async def test_the_surplus_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(upstream, "SURPLUS_FACTOR", 2, raising=False)
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    pool = BackendPool(size=2, idle_timeout=30, connect_timeout=5, response_timeout=5)
    key = ("127.0.0.1", port, b"", "")
    try:
        conns = [await pool.connect(key) for _ in range(6)]
        for conn in conns:
            pool.release(conn)
        assert pool.idle_count() == 4 and [c.closed for c in conns] == [False] * 4 + [True] * 2
    finally:
        pool.close()
        server.close()
