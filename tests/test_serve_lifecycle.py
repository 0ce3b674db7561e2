"""Stopping and reloading ``edge serve`` under HTTP traffic, with real processes on loopback.

``edge serve`` runs the real HTTP proxy (two workers) in front of a threaded Python HTTP
backend; clients are ``http.client`` connections that keep their connection alive.
"""

from __future__ import annotations

import asyncio
import http.client
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from edge.directory.service import DirectoryService
from edge.directory.stores import store_for_url
from tests.test_serve import EdgeServe, http_get, make_db, metric_value, wait_for

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]
SITE = "www.a.test"
SLOW_SECONDS = 4.0


class _Backend(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        if self.path == "/slow":
            time.sleep(SLOW_SECONDS)
        body = b"x" * 2000 + b"\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def backend() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Backend)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


@pytest.fixture
def edge_http(tmp_path: Path, backend: int) -> Iterator[Callable[..., EdgeServe]]:
    (tmp_path / "db").mkdir()
    db_url = make_db(tmp_path / "db" / "directory.sqlite3")

    async def provision() -> None:
        store = store_for_url(db_url)
        await store.open()
        service = DirectoryService(store, None)
        await service.add_host("web", "127.0.0.1", http_port=backend)
        await service.add_tenant("ta", "web")
        await service.add_site(SITE, "ta")
        await store.close()

    asyncio.run(provision())
    started: list[EdgeServe] = []

    def _start(workers: int = 2, grace: float = 10.0) -> EdgeServe:
        config = (f'[database]\nurl = "{db_url}"\n[admin]\nlisten = ["127.0.0.1:0"]\n'
                  f"[serve]\nworkers = {workers}\ngrace_period = {grace}\n"
                  '[http]\nlisten = ["127.0.0.1:0"]\naccess_log = "off"\n')
        server = EdgeServe(tmp_path, config, env={"EDGE_PROXY_OVERRIDES": ""})
        started.append(server)
        server.wait_line("admin")
        server.wait_line("http")
        server.wait_ready()
        return server

    yield _start
    for server in started:
        server.kill()


def get(conn: http.client.HTTPConnection, path: str = "/") -> http.client.HTTPResponse:
    conn.request("GET", path, headers={"Host": SITE})
    response = conn.getresponse()
    response.read()
    return response


@dataclass
class Load:
    """Client threads: each opens a connection, sends three keep-alive requests, repeats.

    Like curl and browsers (RFC 9112 section 9.3.1), a request on a *reused* connection that
    the server closed before any response byte is sent again on a new connection: a server
    may close an idle keep-alive connection at any time. Anything else is an error.
    """

    port: int
    requests: int = 0
    retried: int = 0
    connections: int = 0
    errors: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        deadline = time.monotonic() + 30  # bounded even if the test forgets to stop us
        while not self.stop.is_set() and time.monotonic() < deadline:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            self.connections += 1
            try:
                for _ in range(3):
                    response = self.get(conn)
                    if response.status != 200:
                        self.errors.append(f"status {response.status}")
                    self.requests += 1
            except (OSError, http.client.HTTPException) as exc:
                self.errors.append(repr(exc))
            finally:
                conn.close()

    def get(self, conn: http.client.HTTPConnection) -> http.client.HTTPResponse:
        reused = conn.sock is not None
        try:
            return get(conn)
        except (ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected):
            if not reused:
                raise
        self.retried += 1
        conn.close()
        return get(conn)


def test_sighup_under_http_load_loses_nothing(edge_http: Callable[..., EdgeServe]) -> None:
    server = edge_http()
    port = server.listeners["http"][0][1]
    load = Load(port)
    threads = [threading.Thread(target=load.run) for _ in range(2)]
    for thread in threads:
        thread.start()
    try:
        wait_for(lambda: load.requests > 50, 15, "traffic before the reload")
        server.signal(signal.SIGHUP)
        wait_for(lambda: any(r.get("msg") == "configuration reloaded" for r in server.records()),
                 30, "reload")
        before = load.requests
        wait_for(lambda: load.requests > before + 50, 15, "traffic after the reload")
    finally:
        load.stop.set()
        for thread in threads:
            thread.join(15)
    assert load.errors == [], load.errors[:5]
    # The old workers close idle keep-alive connections (as nginx does on reload): at most
    # the one each client had open then needs its request sent again.
    assert load.retried <= len(threads)
    assert server.stop() == 0


def test_sigterm_refuses_new_connections_and_finishes_keepalive_requests(
        edge_http: Callable[..., EdgeServe]) -> None:
    server = edge_http()
    port = server.listeners["http"][0][1]
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    assert get(conn).status == 200  # a kept-alive connection
    slow: dict[str, object] = {}

    def slow_request() -> None:
        try:
            response = get(conn, "/slow")
            slow.update(status=response.status, connection=response.getheader("Connection"),
                        length=response.length)
        except Exception as exc:
            slow["error"] = repr(exc)

    thread = threading.Thread(target=slow_request)
    thread.start()
    time.sleep(0.5)  # the request reached the backend
    server.signal(signal.SIGTERM)
    signalled = time.monotonic()

    def refused() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        except ConnectionRefusedError:
            return True
        return False

    wait_for(refused, 3, "new connections refused")
    refused_after = time.monotonic() - signalled
    # Refused while the slow request is still being served: the node is draining, not gone.
    assert server.proc.poll() is None
    assert refused_after < SLOW_SECONDS - 1
    status, body = http_get(server.url("/readyz"))
    assert status == 503 and "shutting down" in body
    thread.join(SLOW_SECONDS + 10)
    assert slow == {"status": 200, "connection": "close", "length": 0}, slow
    assert server.stop() == 0


def test_database_outage_keeps_the_node_ready_while_warm_traffic_is_served(
        edge_http: Callable[..., EdgeServe], tmp_path: Path) -> None:
    server = edge_http()
    port = server.listeners["http"][0][1]
    for _ in range(10):  # warm both workers' caches (new connections spread over them)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        assert get(conn).status == 200
        conn.close()
    assert http_get(server.url("/healthz/directory")) == (200, "directory ok\n")
    (tmp_path / "db").rename(tmp_path / "db-away")  # the database is unreachable by path
    try:
        status, body = http_get(server.url("/healthz/directory"))
        assert status == 503 and body.startswith("directory unreachable"), body
        assert metric_value(http_get(server.url("/metrics"))[1], "edge_directory_up") == 0
        for _ in range(20):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            assert get(conn).status == 200
            conn.close()
            assert http_get(server.url("/readyz")) == (200, "ready\n")
    finally:
        (tmp_path / "db-away").rename(tmp_path / "db")
    assert http_get(server.url("/healthz/directory"))[0] == 200
    assert metric_value(http_get(server.url("/metrics"))[1], "edge_directory_up") == 1
    assert server.stop() == 0


def test_sigterm_closes_the_ssh_listener_while_sessions_drain(tmp_path: Path) -> None:
    # The SSH proxy's drain stops its accept loop but leaves the socket to the worker: every
    # copy of a listener must be closed, or the kernel keeps queueing connections to reset.
    from edge.config import SshConfig
    from sshproxy.hostkeys import ensure_keys

    ensure_keys(SshConfig(host_key_dir=str(tmp_path / "hostkeys")))
    db_url = make_db(tmp_path / "directory.sqlite3")
    config = (f'[database]\nurl = "{db_url}"\n[admin]\nlisten = ["127.0.0.1:0"]\n'
              "[serve]\nworkers = 2\ngrace_period = 10\n[limits]\nlogin_grace_time = 30\n"
              f'[ssh]\nlisten = ["127.0.0.1:0"]\nhost_key_dir = "{tmp_path / "hostkeys"}"\n')
    server = EdgeServe(tmp_path, config, env={"EDGE_PROXY_OVERRIDES": ""})
    try:
        server.wait_line("admin")
        _, port = server.wait_line("ssh")
        server.wait_ready(30)
        # Sessions on both workers (still logging in), so both drain for a while.
        sessions = []
        for _ in range(8):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            assert sock.recv(64).startswith(b"SSH-2.0-")
            sessions.append(sock)
        server.signal(signal.SIGTERM)

        def refused() -> bool:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=2).close()
            except ConnectionRefusedError:
                return True
            return False

        wait_for(refused, 5, "new SSH connections refused")
        assert server.proc.poll() is None  # still draining the sessions above
        for sock in sessions:
            sock.close()
        assert server.proc.wait(20) == 0
    finally:
        server.kill()
