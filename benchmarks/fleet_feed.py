"""What a fleet of edges costs the directory, and how fast a move reaches all of them.

``python -m benchmarks.fleet_feed [--edges 50 --interval 1.0 --idle 10 --moves 5]
[--url mysql://root@127.0.0.1:3306/]``

Starts ``--edges`` processes that each run what an ``edge serve`` worker runs on the read side:
a :class:`Directory` (lookup cache) and its :class:`ChangeFeed` polling every ``--interval``
seconds, on one MariaDB database (a fresh database created on the server at ``--url`` and
dropped afterwards; the shared server is only queried, never stopped). Then:

* the database's cost of the idle fleet: ``Questions`` and ``Com_select`` per second from
  ``SHOW GLOBAL STATUS`` over ``--idle`` seconds, minus this process's own status queries;
* ``--moves`` tenant moves, one at a time: for each, the time from the commit until every edge
  routes the tenant's site to the new host (each edge looks its route up every 5 ms, a cache hit
  unless the feed evicted it), reported as p50 / p90 / max over edges.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
import uuid

import pymysql

from edge.config import CacheConfig
from edge.directory.directory import Directory
from edge.directory.feed import ChangeFeed
from edge.directory.service import DirectoryService
from edge.directory.stores import store_for_url

SITE = "www.fleet.test"


async def child(url: str, interval: float) -> None:
    """One edge's read side; prints ``ready``, then ``HOST TIME`` whenever the route changes."""
    store = store_for_url(url)
    await store.open()
    directory = Directory(store, CacheConfig(change_poll_interval=interval))
    feed = ChangeFeed(directory, interval=interval)
    await feed.start()
    route = await directory.route_for_site(SITE)
    current = route.host.name if route else ""
    print("ready", current, flush=True)
    while True:
        await asyncio.sleep(0.005)
        route = await directory.route_for_site(SITE)
        name = route.host.name if route else ""
        if name != current:
            current = name
            print(name, f"{time.time():.6f}", flush=True)


def status(conn: pymysql.connections.Connection) -> dict[str, int]:
    with conn.cursor() as cursor:
        cursor.execute("SHOW GLOBAL STATUS WHERE Variable_name IN ('Questions', 'Com_select')")
        return {name: int(value) for name, value in cursor.fetchall()}


async def provision(url: str) -> None:
    store = store_for_url(url)
    await store.open()
    await store.migrate()
    service = DirectoryService(store, None)
    await service.add_host("web1", "10.0.0.1")
    await service.add_host("web2", "10.0.0.2")
    await service.add_tenant("fleet", "web1")
    await service.add_site(SITE, "fleet")
    await store.close()


async def move(url: str, to: str) -> float:
    store = store_for_url(url)
    await store.open()
    try:
        await DirectoryService(store, None).move_tenant("fleet", to)
        return time.time()
    finally:
        await store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--edges", type=int, default=50)
    parser.add_argument("--interval", type=float, default=1.0, help="[cache] change_poll_interval")
    parser.add_argument("--idle", type=float, default=10.0)
    parser.add_argument("--moves", type=int, default=5)
    parser.add_argument("--url", default="mysql://root@127.0.0.1:3306/")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        asyncio.run(child(args.child, args.interval))
        return
    server = args.url.rstrip("/")
    name = "edge_fleet_" + uuid.uuid4().hex[:8]
    host, port = server.split("@")[-1].split(":")
    admin = pymysql.connect(host=host, port=int(port), user="root", autocommit=True)
    with admin.cursor() as cursor:
        cursor.execute(f"CREATE DATABASE {name}")
    url = f"{server}/{name}"
    procs: list[subprocess.Popen[str]] = []
    try:
        asyncio.run(provision(url))
        for _ in range(args.edges):
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "benchmarks.fleet_feed", "--child", url,
                 "--interval", str(args.interval)], stdout=subprocess.PIPE, text=True))
        for proc in procs:
            assert proc.stdout is not None and proc.stdout.readline().startswith("ready")
        time.sleep(2 * args.interval)
        before, started = status(admin), time.monotonic()
        time.sleep(args.idle)
        after, elapsed = status(admin), time.monotonic() - started
        own = 1  # the second SHOW GLOBAL STATUS is itself one question
        qps = (after["Questions"] - before["Questions"] - own) / elapsed
        sps = (after["Com_select"] - before["Com_select"]) / elapsed
        print(f"{args.edges} edges polling every {args.interval:g} s, idle {elapsed:.1f} s: "
              f"{qps:.1f} questions/s, {sps:.1f} SELECT/s on the directory "
              f"({qps / args.edges / (1 / args.interval):.2f} per edge per poll)")
        spreads = []
        for n in range(args.moves):
            target = "web2" if n % 2 == 0 else "web1"
            committed = asyncio.run(move(url, target))
            seen = []
            for proc in procs:
                assert proc.stdout is not None
                line = proc.stdout.readline().split()
                assert line[0] == target, line
                seen.append(float(line[1]) - committed)
            seen.sort()
            spreads.append(seen)
            print(f"move {n + 1} → {target}: every edge after {seen[-1] * 1000:.0f} ms "
                  f"(p50 {statistics.median(seen) * 1000:.0f} ms, "
                  f"p90 {seen[int(len(seen) * 0.9) - 1] * 1000:.0f} ms)")
        worst = [s[-1] for s in spreads]
        print(json.dumps({"edges": args.edges, "interval": args.interval, "questions_per_s":
                          round(qps, 1), "selects_per_s": round(sps, 1),
                          "move_all_edges_ms_max": round(max(worst) * 1000),
                          "move_all_edges_ms_median": round(statistics.median(worst) * 1000)}))
    finally:
        for proc in procs:
            proc.kill()
        for proc in procs:
            proc.wait()
        with admin.cursor() as cursor:
            cursor.execute(f"DROP DATABASE IF EXISTS {name}")
        admin.close()


if __name__ == "__main__":
    main()
