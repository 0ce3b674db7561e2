"""Run as a separate OS process by test_feed.py: its own store, Directory and ChangeFeed.

Usage: python support_feed_child.py DATABASE_URL USERNAME
Prints ``ready`` and then, every 20 ms, the host the account routes to (``-`` if none),
until stdin is closed or 30 s have passed.
"""

from __future__ import annotations

import asyncio
import sys
import time

from edge.config import CacheConfig
from edge.directory.directory import Directory
from edge.directory.feed import ChangeFeed
from edge.directory.stores import store_for_url


async def main(url: str, username: str) -> None:
    store = store_for_url(url)
    await store.open()
    directory = Directory(store, CacheConfig(ttl=3600, negative_ttl=3600))
    feed = ChangeFeed(directory, interval=0.05)
    await feed.start()
    loop = asyncio.get_running_loop()
    stdin_closed = loop.run_in_executor(None, sys.stdin.read)
    print("ready", flush=True)
    deadline = time.monotonic() + 30
    try:
        while not stdin_closed.done() and time.monotonic() < deadline:
            route = await directory.route_for_account(username)
            print(route.host.name if route else "-", flush=True)
            await asyncio.sleep(0.02)
    finally:
        await feed.stop()
        await store.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
