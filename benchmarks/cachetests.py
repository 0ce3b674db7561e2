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
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, NamedTuple

from benchmarks.procs import Child, free_port, nginx_main_conf, spawn, start_nginx, wait_port
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


async def _edge(tmp: Path, origin_port: int, policy: str) -> tuple[HttpProxy, int]:
    store = store_for_url(f"sqlite:///{tmp / 'edge.sqlite3'}")
    await store.open()
    await store.migrate()
    service = DirectoryService(store, KeyBox.from_text(generate_key()))
    await service.add_host("ct-origin", "127.0.0.1", http_port=origin_port)
    await service.add_tenant("ct", "ct-origin")
    await service.add_site("localhost", "ct", cache_policy=policy)
    # Idle backend connections are closed before the suite's Node origin closes them (its
    # keep-alive timeout is 5 s): otherwise a setup PUT (not replayable) that races that close
    # gets a 502 and the test counts as setup_fail.
    config = EdgeConfig(http=HttpConfig(access_log="off", pool_idle_timeout=2.0),
                        cache=CacheConfig())
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


# -- the peers, each configured as a shared cache that follows the origin's headers ---------

NGINX_CONF = """
  proxy_cache_path {folder}/cache levels=1:2 keys_zone=ct:8m max_size=256m inactive=600m;
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://127.0.0.1:{origin};
      proxy_http_version 1.1;
      proxy_cache ct;
      proxy_cache_revalidate on;
      proxy_cache_background_update on;
    }}
  }}"""
"""The suite's own nginx setup (docker/nginx/nginx.conf: ``proxy_cache`` +
``proxy_cache_revalidate on``) plus ``proxy_cache_background_update on``, so the origin's
``stale-while-revalidate`` is served while updating. ``proxy_cache_use_stale`` stays off: its
parameters serve stale responses without the origin's permission (RFC 9111 §4.2.4); nginx
honours ``stale-while-revalidate``/``stale-if-error`` from the response without it."""

VARNISH_VCL = """vcl 4.1;
backend default {{ .host = "127.0.0.1"; .port = "{origin}"; }}
"""
"""Varnish's built-in VCL with only the backend; run with the suite's own parameters
(docker/serve.sh): ``default_ttl=0`` (nothing without freshness information is stored),
``default_grace=0`` (no stale serving the origin didn't allow), ``default_keep=3600`` (stale
objects kept for conditional revalidation)."""

SQUID_CONF = """
http_port 127.0.0.1:{port} accel defaultsite=localhost no-vhost
cache_peer 127.0.0.1 parent {origin} 0 no-query no-digest originserver name=origin
acl suite dstdomain localhost
http_access allow suite
http_access deny all
cache_peer_access origin allow all
cache_mem 64 MB
shutdown_lifetime 1 second
connect_retries 3
pid_filename {folder}/squid.pid
cache_log {folder}/cache.log
access_log none
coredump_dir {folder}
visible_hostname cachetests
"""
"""Squid as a reverse-proxy accelerator, as the suite's docker/squid/squid.conf (memory cache,
Debian's defaults otherwise), answering only for ``localhost`` (no open proxy)."""


async def _start_nginx(workdir: Path, origin: int) -> Child:
    port = free_port()
    folder = workdir / "nginx"
    body = NGINX_CONF.format(folder=folder, port=port, origin=origin)
    child = await start_nginx(workdir, "nginx", nginx_main_conf(folder, body), [("127.0.0.1", port)])
    child.ports["http"] = port
    return child


async def _start_varnish(workdir: Path, origin: int) -> Child:
    port = free_port()
    vcl = workdir / "default.vcl"
    vcl.write_text(VARNISH_VCL.format(origin=origin))
    argv = ["varnishd", "-F", "-n", str(workdir / "varnish"), "-a", f"127.0.0.1:{port}",
            "-T", "none", "-f", str(vcl), "-p", "default_ttl=0", "-p", "default_grace=0",
            "-p", "default_keep=3600", "-s", "malloc,64M"]
    child = spawn("varnish", argv, workdir)
    await wait_port("127.0.0.1", port, 60, child)
    child.ports["http"] = port
    return child


async def _start_squid(workdir: Path, origin: int) -> Child:
    port = free_port()
    conf = workdir / "squid.conf"
    conf.write_text(SQUID_CONF.format(port=port, origin=origin, folder=workdir))
    child = spawn("squid", ["squid", "-N", "-f", str(conf)], workdir)
    await wait_port("127.0.0.1", port, 60, child)
    child.ports["http"] = port
    return child


PEER_STARTERS: dict[str, Callable[[Path, int], Coroutine[Any, Any, Child]]] = {
    "nginx": _start_nginx, "varnish": _start_varnish, "squid": _start_squid}


def _version(argv: list[str]) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    return (proc.stdout + proc.stderr).strip().splitlines()[0]


PEER_VERSIONS: dict[str, Callable[[], str]] = {
    "nginx": lambda: _version(["nginx", "-v"]),
    "varnish": lambda: _version(["varnishd", "-V"]),
    "squid": lambda: _version(["squid", "-v"]),
}


class Target(NamedTuple):
    """One column of the comparison: the edge under one ``cache_policy``, or a peer cache."""

    label: str
    peer: str  # "" for the edge
    policy: str = ""


PEER_NAMES = ("nginx", "varnish", "squid")


def _targets(args: argparse.Namespace) -> list[Target]:
    policies = args.policy or list(DEFAULT_POLICIES)
    edge = [Target(f"edge {_policy_label(p)}", "", p) for p in policies]
    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    unknown = sorted(set(peers) - set(PEER_NAMES))
    if unknown:
        raise SystemExit(f"unknown peer(s) {', '.join(unknown)}; known: {', '.join(PEER_NAMES)}")
    return edge + [Target(p, p) for p in peers]


def _policy_label(policy: str) -> str:
    return json.dumps(json.loads(policy), separators=(",", ":"))


def _run_cli(suite: Path, node: str, port: int, test_id: str) -> bytes:
    env = {**os.environ, "npm_config_base": f"http://localhost:{port}",
           "npm_config_id": test_id, "npm_package_config_id": ""}
    return subprocess.run([node, "--no-warnings", "test-engine/cli.mjs"], cwd=suite, env=env,
                          stdout=subprocess.PIPE, check=False).stdout


def _run_edge(suite: Path, node: str, origin_port: int, policy: str, test_id: str) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        edge = _EdgeThread(Path(tmp), origin_port, policy)
        try:
            edge.start()
            if not edge.ready.wait(30) or not edge.port:
                raise SystemExit("the edge did not start")
            return _run_cli(suite, node, edge.port, test_id)
        finally:
            edge.shutdown()


def _run_peer(suite: Path, node: str, origin_port: int, peer: str, test_id: str) -> bytes:
    with tempfile.TemporaryDirectory(prefix=f"ct-{peer}-") as tmp:
        workdir = Path(tmp)
        workdir.chmod(0o777)  # squid and varnish drop root for their own users
        child = asyncio.run(PEER_STARTERS[peer](workdir, origin_port))
        try:
            return _run_cli(suite, node, child.ports["http"], test_id)
        finally:
            child.stop()


def _classify(suite: Path, node: str, results_path: Path) -> dict[str, list[str]]:
    """{test id: [result, kind]} by the suite's own rules (dependencies honoured)."""
    script = suite / ".edge-summary.mjs"
    script.write_text(SUMMARY_JS)
    summary = subprocess.run([node, str(script), str(results_path.resolve())], cwd=suite,
                             check=True, capture_output=True, text=True).stdout
    classified: dict[str, list[str]] = json.loads(summary)
    return classified


def _run(args: argparse.Namespace) -> int:
    suite = Path(args.suite).resolve()
    node = shutil.which("node")
    if node is None:
        raise SystemExit("node is not installed")
    targets = _targets(args)
    origin_port = free_port()
    env = {**os.environ, "npm_config_port": str(origin_port), "npm_config_protocol": "http",
           "npm_config_pidfile": os.devnull}
    # One origin for every target: each test's requests carry their own UUID paths.
    origin = subprocess.Popen([node, "test-engine/server/server.mjs"], cwd=suite, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results: dict[str, dict[str, list[str]]] = {}
    try:
        asyncio.run(wait_port("127.0.0.1", origin_port, 20))
        with tempfile.TemporaryDirectory() as tmp:
            for target in targets:
                started = time.monotonic()
                if target.peer:
                    out = _run_peer(suite, node, origin_port, target.peer, args.id)
                else:
                    out = _run_edge(suite, node, origin_port, target.policy, args.id)
                if args.id:
                    print(f"==== {target.label}")
                    sys.stdout.write(out.decode(errors="replace"))
                    continue
                results_path = Path(tmp) / "results.json"
                results_path.write_bytes(out)
                results[target.label] = _classify(suite, node, results_path)
                print(f"{target.label}: done in {time.monotonic() - started:.0f} s",
                      file=sys.stderr)
                if args.save:
                    _save(Path(args.save), target, out, results[target.label])
    finally:  # never leave the suite's origin running
        origin.terminate()
        origin.wait(10)
    if results:
        _report(targets, results)
    return 0


def _save(folder: Path, target: Target, raw: bytes, classified: dict[str, list[str]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    slug = "-".join("".join(c if c.isalnum() else " " for c in target.policy.lower()).split())
    stem = target.peer or f"edge-{slug or 'off'}"
    (folder / f"{stem}.json").write_bytes(raw)
    (folder / f"{stem}-class.json").write_text(json.dumps(classified, indent=1, sort_keys=True))


RESULT_ORDER = ("pass", "fail", "optional_fail", "yes", "no", "setup_fail", "harness_fail",
                "dependency_fail", "retry", "untested")


def _report(targets: list[Target], results: dict[str, dict[str, list[str]]]) -> None:
    """A Markdown table (a row per result type, a column per target), the versions, then what differs."""
    labels = [t.label for t in targets if t.label in results]
    counts = {label: Counter(r for r, _k in results[label].values()) for label in labels}
    seen = {name for c in counts.values() for name in c}
    rows = [r for r in RESULT_ORDER if r in seen] + sorted(seen - set(RESULT_ORDER))
    print("| result | " + " | ".join(f"`{label}`" for label in labels) + " |")
    print("|---|" + "---|" * len(labels))
    for row in rows:
        print(f"| {row} | " + " | ".join(str(counts[label][row]) for label in labels) + " |")
    print()
    for target in targets:
        if target.peer:
            print(f"{target.label}: {PEER_VERSIONS[target.peer]()}")
    for label in labels:
        failed = sorted(t for t, (r, _k) in results[label].items() if r == "fail")
        print(f"{label} required failures ({len(failed)}): {' '.join(failed)}")
    _report_edge_behind(targets, results)


def _report_edge_behind(targets: list[Target], results: dict[str, dict[str, list[str]]]) -> None:
    """Tests some peer passes that an edge mode does not (the list to look at)."""
    peers = [t.label for t in targets if t.peer and t.label in results]
    for edge in (t.label for t in targets if not t.peer and t.label in results):
        behind = {test: [p for p in peers if results[p][test][0] == "pass"]
                  for test, (r, _k) in results[edge].items() if r != "pass"}
        behind = {test: ps for test, ps in behind.items() if ps}
        print(f"{edge}: not pass where a peer passes ({len(behind)}):")
        for test, ps in sorted(behind.items()):
            print(f"  {test:50} {results[edge][test][0]:16} passed by {','.join(ps)}")


DEFAULT_POLICIES = ('{"mode": "standard"}', '{"mode": "full", "ttl": {}}')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", default="/tmp/cache-tests", help="cache-tests checkout")
    parser.add_argument("--policy", action="append", default=[],
                        help="a cache_policy JSON for the edge's site (repeatable; default: "
                             + " and ".join(DEFAULT_POLICIES) + ")")
    parser.add_argument("--peers", default="",
                        help="comma-separated peers run in the same run: "
                             + ",".join(PEER_NAMES))
    parser.add_argument("--id", default="", help="run one test, verbosely")
    parser.add_argument("--save", default="",
                        help="folder for each target's raw results and {test: [result, kind]}")
    sys.exit(_run(parser.parse_args()))


if __name__ == "__main__":
    main()
