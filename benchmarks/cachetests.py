"""Run the independent HTTP cache conformance suite (https://cache-tests.fyi) through the edge.

The suite (github.com/http-tests/cache-tests, BSD-3) is not vendored: check it out and
install its npm dependencies once, outside this repository::

    git clone https://github.com/http-tests/cache-tests /tmp/cache-tests
    (cd /tmp/cache-tests && npm install --omit=dev)

Then::

    .venv/bin/python -m benchmarks.cachetests --suite /tmp/cache-tests \
        --policy '{"mode": "standard"}' --out /tmp/results.json

This starts the suite's origin server (node) on 127.0.0.1, a SQLite directory in a temporary
directory whose one site ``localhost`` (tenant ``ct`` on host ``ct-origin``) points at it with
the given cache policy, the HTTP edge in-process on a free 127.0.0.1 port, then the suite's CLI
runner against ``http://localhost:PORT``; prints the counts per result type (the suite's own
classification, ``test-engine/lib/results.mjs``) and writes the raw results JSON.
``--id TEST`` runs one test verbosely (the suite prints both sides' headers).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

from edge.config import CacheConfig, EdgeConfig, HttpConfig
from edge.directory.directory import Directory
from edge.directory.feed import ChangeFeed
from edge.directory.secrets import KeyBox, generate_key
from edge.directory.service import DirectoryService
from edge.directory.stores import store_for_url
from edge.registry import ProxyContext
from httpproxy.server import HttpProxy

SUMMARY_JS = """
import tests from './tests/index.mjs'
import { determineTestResult, resultTypes } from './test-engine/lib/results.mjs'
import fs from 'fs'
const results = JSON.parse(fs.readFileSync(process.argv[2]))
const names = new Map(Object.entries(resultTypes).map(([k, v]) => [v, k]))
const out = {}
for (const suite of tests) for (const test of suite.tests) {
  const r = determineTestResult(tests, test.id, results)
  out[test.id] = [names.get(r) || String(r), test.kind || 'required']
}
console.log(JSON.stringify(out))
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.1)
    raise SystemExit(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


async def _edge(tmp: Path, origin_port: int, policy: str) -> tuple[HttpProxy, int]:
    store = store_for_url(f"sqlite:///{tmp / 'edge.sqlite3'}")
    await store.open()
    await store.migrate()
    service = DirectoryService(store, KeyBox.from_text(generate_key()))
    await service.add_host("ct-origin", "127.0.0.1", http_port=origin_port)
    await service.add_tenant("ct", "ct-origin")
    await service.add_site("localhost", "ct", cache_policy=policy)
    config = EdgeConfig(http=HttpConfig(access_log="off"), cache=CacheConfig())
    directory = Directory(store, config.cache)
    feed = ChangeFeed(directory, interval=3600)
    feed.cursor = await store.latest_change_id()
    feed.healthy = True
    context = ProxyContext(config=config, directory=directory, feed=feed, keybox=None,
                           worker_id=0, logger=logging.getLogger("cachetests"), name="http")
    proxy = HttpProxy(context)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(512)
    sock.setblocking(False)
    await proxy.start([sock])
    return proxy, int(sock.getsockname()[1])


class _EdgeThread(threading.Thread):
    """The edge on its own event loop, so the suite's processes can be run synchronously."""

    def __init__(self, tmp: Path, origin_port: int, policy: str) -> None:
        super().__init__(daemon=True)
        self.args = (tmp, origin_port, policy)
        self.port = 0
        self.ready = threading.Event()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stop: asyncio.Event | None = None

    def run(self) -> None:
        try:
            asyncio.run(self._main())
        finally:
            self.ready.set()  # also when starting failed: the caller sees port 0

    async def _main(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.stop = asyncio.Event()
        proxy, self.port = await _edge(*self.args)
        self.ready.set()
        await self.stop.wait()
        await proxy.drain()
        await proxy.close()

    def shutdown(self) -> None:
        if self.loop is not None and self.stop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.stop.set)
        self.join(30)


def _run(args: argparse.Namespace) -> int:
    suite = Path(args.suite).resolve()
    node = shutil.which("node")
    if node is None:
        raise SystemExit("node is not installed")
    origin_port = _free_port()
    env = {**os.environ, "npm_config_port": str(origin_port), "npm_config_protocol": "http",
           "npm_config_pidfile": os.devnull}
    origin = subprocess.Popen([node, "test-engine/server/server.mjs"], cwd=suite, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with tempfile.TemporaryDirectory() as tmp:
        edge = _EdgeThread(Path(tmp), origin_port, args.policy)
        try:
            _wait_port(origin_port)
            edge.start()
            if not edge.ready.wait(30) or not edge.port:
                raise SystemExit("the edge did not start")
            cli_env = {**os.environ, "npm_config_base": f"http://localhost:{edge.port}",
                       "npm_config_id": args.id, "npm_package_config_id": ""}
            out = subprocess.run([node, "--no-warnings", "test-engine/cli.mjs"], cwd=suite,
                                 env=cli_env, stdout=subprocess.PIPE, check=False).stdout
        finally:
            try:
                edge.shutdown()
            finally:  # never leave the suite's origin running
                origin.terminate()
                origin.wait(10)
        if args.id:
            sys.stdout.write(out.decode(errors="replace"))
            return 0
        results_path = Path(args.out) if args.out else Path(tmp) / "results.json"
        results_path.write_bytes(out)
        script = suite / ".edge-summary.mjs"
        script.write_text(SUMMARY_JS)
        summary = subprocess.run([node, str(script), str(results_path.resolve())], cwd=suite,
                                 check=True, capture_output=True, text=True).stdout
        classified: dict[str, list[str]] = json.loads(summary)
    counts = Counter(result for result, _kind in classified.values())
    required_fail = sorted(t for t, (r, _k) in classified.items() if r == "fail")
    print(f"policy {args.policy}: {len(classified)} tests")
    for name, n in counts.most_common():
        print(f"  {name:16} {n}")
    print("required failures:", " ".join(required_fail))
    if args.classified:
        Path(args.classified).write_text(json.dumps(classified, indent=1, sort_keys=True))
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", default="/tmp/cache-tests", help="cache-tests checkout")
    parser.add_argument("--policy", default='{"mode": "full", "ttl": {}}',
                        help="the site's cache_policy JSON")
    parser.add_argument("--id", default="", help="run one test, verbosely")
    parser.add_argument("--out", default="", help="write the raw results JSON here")
    parser.add_argument("--classified", default="",
                        help="write {test id: [result, kind]} JSON here")
    sys.exit(_run(parser.parse_args()))


if __name__ == "__main__":
    main()
