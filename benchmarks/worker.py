"""Worker-like child processes the scenarios start (``python -m benchmarks.worker MODE ...``).

They look like a proxy worker from the directory's point of view: one store, one Directory,
one ChangeFeed polling, routes looked up through the cache. Output is JSON lines on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time

from benchmarks.core import rss_kib
from edge.config import CacheConfig
from edge.directory.bulk import synthetic_site_name
from edge.directory.directory import Directory
from edge.directory.feed import ChangeFeed
from edge.directory.stores import store_for_url


def emit(**fields: object) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


async def watch(args: argparse.Namespace) -> None:
    """Route one hostname in a loop; print the time whenever its host changes."""
    store = store_for_url(args.database)
    await store.open()
    directory = Directory(store, CacheConfig())
    feed = ChangeFeed(directory, interval=args.interval)
    await feed.start()
    last = None
    emit(event="ready")
    while True:
        route = await directory.route_for_site(args.hostname)
        host = None if route is None else route.host.name
        if host != last:
            emit(event="host", host=host, t=time.time())
            last = host
        await asyncio.sleep(args.every)


async def rss(args: argparse.Namespace) -> None:
    """Open like a worker, do some lookups, report RSS and how long opening took."""
    start = time.perf_counter()
    store = store_for_url(args.database)
    await store.open()
    directory = Directory(store, CacheConfig())
    feed = ChangeFeed(directory, interval=1.0)
    await feed.start()
    opened = time.perf_counter() - start
    tenants = max(1, args.sites // 10)
    rng = random.Random(7)
    found = 0
    lookups_start = time.perf_counter()
    for _ in range(args.lookups):
        s = rng.randrange(args.sites)
        name = synthetic_site_name(s % tenants, s // tenants).replace("*", "x")
        found += (await directory.route_for_site(name)) is not None
    emit(event="done", open_seconds=opened, lookups=args.lookups, found=found,
         lookup_seconds=time.perf_counter() - lookups_start,
         ready_seconds=time.perf_counter() - start, rss_kib=rss_kib())
    await feed.stop()
    await store.close()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.worker")
    sub = parser.add_subparsers(dest="mode", required=True)
    p = sub.add_parser("watch")
    p.add_argument("--database", required=True)
    p.add_argument("--hostname", required=True)
    p.add_argument("--interval", type=float, default=1.0)
    p.add_argument("--every", type=float, default=0.002)
    p = sub.add_parser("rss")
    p.add_argument("--database", required=True)
    p.add_argument("--sites", type=int, required=True)
    p.add_argument("--lookups", type=int, default=1000)
    args = parser.parse_args()
    try:
        import uvloop  # production workers run on uvloop; measure the same thing
    except ImportError:
        runner = asyncio.run
    else:
        runner = uvloop.run
    runner(watch(args) if args.mode == "watch" else rss(args))


if __name__ == "__main__":
    main()
