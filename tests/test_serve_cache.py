"""The content cache across the workers of a real ``edge serve --workers 2``: an unsafe
method answered by one worker invalidates the URL on every worker (RFC 9111 §4.4), and a
purge by tag reaches them all, through the change feed."""

from __future__ import annotations

import asyncio
import http.client
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from edge.directory.service import DirectoryService
from edge.directory.stores import store_for_url
from tests.test_serve import EdgeServe, make_db, wait_for

pytestmark = [pytest.mark.timeout(90), pytest.mark.slow]
SITE = "www.c.test"


class _Origin(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    version = 1
    gets = 0
    lock = threading.Lock()

    def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        with self.lock:
            type(self).gets += 1
            version = self.version
        self._send(200, f"v{version}".encode(), {"Cache-Control": "max-age=300",
                                                 "Cache-Tag": "t1", "ETag": f'"{version}"'})

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        with self.lock:
            type(self).version += 1
        self._send(200, b"ok", {})

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def origin() -> Iterator[int]:
    _Origin.version, _Origin.gets = 1, 0
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Origin)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def _run(db_url: str, work: Callable[[DirectoryService], object]) -> None:
    async def go() -> None:
        store = store_for_url(db_url)
        await store.open()
        try:
            result = work(DirectoryService(store, None))
            if asyncio.iscoroutine(result):
                await result
        finally:
            await store.close()

    asyncio.run(go())


@pytest.fixture
def serve(tmp_path: Path, origin: int) -> Iterator[tuple[EdgeServe, str]]:
    (tmp_path / "db").mkdir()
    db_url = make_db(tmp_path / "db" / "directory.sqlite3")

    async def provision(service: DirectoryService) -> None:
        await service.add_host("web", "127.0.0.1", http_port=origin)
        await service.add_tenant("tc", "web")
        await service.add_site(SITE, "tc", cache_policy={"mode": "full", "ttl": {}})

    _run(db_url, provision)
    config = (f'[database]\nurl = "{db_url}"\n[admin]\nlisten = ["127.0.0.1:0"]\n'
              "[serve]\nworkers = 2\ngrace_period = 5\n"
              '[http]\nlisten = ["127.0.0.1:0"]\naccess_log = "off"\n')
    server = EdgeServe(tmp_path, config, env={"EDGE_PROXY_OVERRIDES": ""})
    try:
        server.wait_line("admin")
        server.wait_line("http")
        server.wait_ready()
        yield server, db_url
    finally:
        server.kill()


def _fetch(port: int, method: str = "GET") -> tuple[bytes, str]:
    """One request on a new connection (so SO_REUSEPORT spreads them over the workers)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, "/doc", body=b"x" if method == "POST" else None,
                     headers={"Host": SITE})
        response = conn.getresponse()
        return response.read(), response.getheader("X-Cache") or ""
    finally:
        conn.close()


def _warm_both_workers(port: int) -> None:
    # Sequential new connections: each worker misses once, then hits; 40 connections land
    # on both workers but with probability 2**-39.
    for _ in range(40):
        _fetch(port)
    assert _Origin.gets == 2, "each worker stores its own copy"


def _all_see(port: int, body: bytes) -> bool:
    return all(_fetch(port)[0] == body for _ in range(20))


def test_unsafe_method_invalidates_on_every_worker(serve: tuple[EdgeServe, str]) -> None:
    """RFC 9111 §4.4: a successful POST invalidates the target URI in the cache; with two
    workers the one that did not see the POST drops its copy too (change feed), instead of
    serving the old response for its remaining 300 s."""
    server, _db = serve
    port = server.listeners["http"][-1][1]
    _warm_both_workers(port)
    assert _fetch(port, "POST")[0] == b"ok"
    started = time.monotonic()
    wait_for(lambda: _all_see(port, b"v2"), 5, "every worker serving the new version")
    elapsed = time.monotonic() - started
    assert _Origin.gets >= 3
    print(f"invalidation reached both workers within {elapsed:.2f} s")


def test_purge_by_tag_reaches_every_worker(serve: tuple[EdgeServe, str]) -> None:
    """``edge cache purge SITE --tag T`` through the change feed drops T's objects on every
    worker."""
    server, db_url = serve
    port = server.listeners["http"][-1][1]
    _warm_both_workers(port)
    _Origin.version = 7  # changed behind the cache's back
    assert not _all_see(port, b"v7")
    _run(db_url, lambda service: service.purge_cache(SITE, tag="t1"))
    wait_for(lambda: _all_see(port, b"v7"), 5, "every worker refetching after the purge")
