"""The process model end to end: ``edge serve`` as a real process tree on loopback.

Proxies are replaced by the echo proxy of ``tests/echo_proxy.py`` (registered for ``ssh``
through ``$EDGE_PROXY_OVERRIDES``); the directory is a real SQLite file. Ports are 0 and read
back from the ``edge: NAME listening on HOST:PORT`` lines on stdout.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from edge.config import LogConfig
from edge.directory.stores import store_for_url
from edge.logging import JsonFormatter, TextFormatter, configure, set_process_fields

ROOT = Path(__file__).resolve().parent.parent
LINE_RE = re.compile(r"^edge: (\S+) listening on (\S+):(\d+)$")
pytestmark = pytest.mark.timeout(90)


def make_db(path: Path) -> str:
    url = f"sqlite:///{path}"

    async def migrate() -> None:
        store = store_for_url(url)
        await store.open()
        try:
            await store.migrate()
        finally:
            await store.close()

    asyncio.run(migrate())
    return url


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


class Echo:
    """A client session of the echo proxy."""

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        self.sock = socket.create_connection((host, port), timeout=5)
        self.file = self.sock.makefile("rb")
        hello = self.readline()
        match = re.fullmatch(r"hello worker=(\d+) pid=(\d+)", hello)
        assert match, hello
        self.worker, self.pid = int(match[1]), int(match[2])

    def readline(self) -> str:
        return self.file.readline().decode().rstrip("\n")

    def echo(self, text: str) -> str:
        self.sock.sendall(text.encode() + b"\n")
        return self.readline()

    def close(self) -> None:
        self.file.close()
        self.sock.close()


class EdgeServe:
    """``edge serve --config FILE`` in a subprocess; stdout lines are collected by a thread."""

    def __init__(self, tmp: Path, config: str, *args: str, env: dict[str, str] | None = None,
                 ) -> None:
        self.config_path = tmp / "edge.toml"
        self.config_path.write_text(config)
        self.log_path = tmp / "serve.log"
        full_env = {**os.environ, "PYTHONPATH": str(ROOT),
                    "EDGE_PROXY_OVERRIDES": "ssh=tests.echo_proxy:EchoProxy", **(env or {})}
        full_env.pop("EDGE_CONFIG", None)
        full_env.pop("EDGE_DATABASE_URL", None)
        self.log_file = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "import sys; from edge.cli.main import main; sys.exit(main())",
             "serve", "--config", str(self.config_path), *args],
            cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=self.log_file)
        self.lines: queue.Queue[str] = queue.Queue()
        self.listeners: dict[str, list[tuple[str, int]]] = {}
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.lines.put(raw.decode().rstrip("\n"))

    def wait_line(self, name: str, timeout: float = 15.0) -> tuple[str, int]:
        """The next ``edge: NAME listening on`` line (as host, port)."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no listening line for {name}; log:\n{self.log()}")
            try:
                line = self.lines.get(timeout=remaining)
            except queue.Empty:
                continue
            match = LINE_RE.match(line)
            assert match, f"unexpected stdout line {line!r}"
            address = (match[2].strip("[]"), int(match[3]))
            self.listeners.setdefault(match[1], []).append(address)
            if match[1] == name:
                return address

    def url(self, path: str) -> str:
        host, port = self.listeners["admin"][-1]
        return f"http://{host}:{port}{path}"

    @property
    def port(self) -> int:
        return self.listeners["ssh"][-1][1]

    def log(self) -> str:
        self.log_file.flush()
        return self.log_path.read_text(errors="replace")

    def records(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log().splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out

    def wait_ready(self, timeout: float = 15.0) -> None:
        wait_for(lambda: http_get(self.url("/readyz"))[0] == 200, timeout, "readyz 200")

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self.log_file.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.log_file.close()


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    return make_db(tmp_path / "directory.sqlite3")


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[..., EdgeServe]]:
    started: list[EdgeServe] = []

    def _start(config: str, *args: str, wait: tuple[str, ...] = ("admin", "ssh"),
               env: dict[str, str] | None = None) -> EdgeServe:
        server = EdgeServe(tmp_path, config, *args, env=env)
        started.append(server)
        for name in wait:
            server.wait_line(name)
        return server

    yield _start
    for server in started:
        server.kill()


def config_text(db_url: str, *, workers: int = 1, grace: float = 5.0,
                ssh: str = "127.0.0.1:0", extra: str = "") -> str:
    return (f'[database]\nurl = "{db_url}"\n[admin]\nlisten = ["127.0.0.1:0"]\n'
            f"[serve]\nworkers = {workers}\ngrace_period = {grace}\n"
            f'[ssh]\nlisten = ["{ssh}"]\n{extra}')


def metric_value(text: str, name: str) -> float:
    """Sum of every sample of ``name`` (all label sets) in a Prometheus exposition."""
    total = 0.0
    found = False
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
            found = True
    assert found, f"{name} not in /metrics"
    return total


# -- tests -------------------------------------------------------------------------------


def test_two_workers_share_the_port_and_metrics_sum(start: Callable[..., EdgeServe],
                                                    db_url: str) -> None:
    server = start(config_text(db_url), "--workers", "2")
    assert http_get(server.url("/healthz")) == (200, "ok\n")
    server.wait_ready()
    seen: dict[int, int] = {}
    connections = 0
    while len(seen) < 2 and connections < 200:
        session = Echo(server.port)
        connections += 1
        assert session.echo("ping") == "echo ping"
        seen[session.worker] = session.pid
        session.close()
    assert sorted(seen) == [0, 1], seen
    assert len(set(seen.values())) == 2
    for pid in seen.values():  # both are children of the master
        stat = Path(f"/proc/{pid}/stat").read_text()
        assert int(stat.rsplit(")", 1)[1].split()[1]) == server.proc.pid

    def metrics_settled() -> str | None:
        status, body = http_get(server.url("/metrics"))
        assert status == 200
        done = (metric_value(body, "edge_connections_total") == connections
                and metric_value(body, "edge_worker_up") == 2)
        return body if done else None

    body = wait_for(metrics_settled, 10, "metrics summed over both workers")
    for name in ("edge_directory_lookups_total", "edge_directory_cache_entries",
                 "edge_change_feed_lag_seconds", "edge_change_feed_healthy",
                 "edge_connections_total", "edge_active_sessions", "edge_bytes_total",
                 "edge_worker_up"):
        assert name in body, name
    assert metric_value(body, "edge_bytes_total") == 5 * connections  # "ping\n" each
    assert metric_value(body, "edge_workers_expected") == 2
    assert server.stop() == 0


def test_directory_unreachable_is_not_unready(start: Callable[..., EdgeServe],
                                              tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/gone/directory.sqlite3"
    server = start(config_text(url))
    assert http_get(server.url("/healthz"))[0] == 200
    # Workers keep running (no crash loop) and accept connections: the node can serve.
    server.wait_ready()
    session = Echo(server.port)
    assert session.echo("x") == "echo x"
    session.close()
    status, body = http_get(server.url("/healthz/directory"))
    assert status == 503 and body.startswith("directory unreachable"), body
    assert metric_value(http_get(server.url("/metrics"))[1], "edge_directory_up") == 0
    assert not [r for r in server.records() if r["msg"].startswith("worker died")]
    assert server.stop() == 0


def test_mysql_port_closed_is_reported_by_healthz_directory(
        start: Callable[..., EdgeServe]) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = start(config_text(f"mysql://edge:x@127.0.0.1:{port}/edge"))
    server.wait_ready()
    status, body = http_get(server.url("/healthz/directory"))
    assert status == 503 and "directory unreachable" in body, body
    session = Echo(server.port)
    assert session.echo("x") == "echo x"
    session.close()
    assert server.stop() == 0


def test_workers_read_the_replica(start: Callable[..., EdgeServe], db_url: str,
                                  tmp_path: Path) -> None:
    # The primary (for the CLI's writes) is unreachable; the proxies read the replica and the
    # directory is healthy. A stub setting would show 503 here.
    dead_primary = f"sqlite:///{tmp_path}/gone/primary.sqlite3"
    text = config_text(dead_primary).replace(
        "[admin]", f'replica_url = "{db_url}"\n[admin]', 1)
    server = start(text)
    wait_for(lambda: http_get(server.url("/healthz/directory"))[0] == 200, 10,
             "directory healthy via the replica")
    session = Echo(server.port)
    assert session.echo("x") == "echo x"
    session.close()
    assert server.stop() == 0


def test_sigterm_lets_an_open_session_finish(start: Callable[..., EdgeServe],
                                            db_url: str) -> None:
    server = start(config_text(db_url, grace=10))
    server.wait_ready()
    session = Echo(server.port)
    began = time.monotonic()
    server.signal(signal.SIGTERM)
    time.sleep(0.5)
    assert session.echo("still here") == "echo still here"
    assert server.proc.poll() is None  # waiting for our session
    session.close()
    assert server.proc.wait(10) == 0
    assert time.monotonic() - began < 8  # did not sit out the whole grace period
    server.stop()


def test_sigterm_serves_connections_already_queued(start: Callable[..., EdgeServe],
                                                   db_url: str) -> None:
    # Connections the kernel completed before SIGTERM wait in the listener's backlog; closing
    # the listener would reset them. The worker is stopped so they cannot be accepted early.
    server = start(config_text(db_url, grace=10))
    server.wait_ready()
    probe = Echo(server.port)
    worker = probe.pid
    probe.close()
    os.kill(worker, signal.SIGSTOP)
    try:
        queued = [socket.create_connection(("127.0.0.1", server.port), timeout=10)
                  for _ in range(5)]
        server.signal(signal.SIGTERM)
        time.sleep(0.5)  # the master closed its copies of the listener and signalled
    finally:
        os.kill(worker, signal.SIGCONT)
    for sock in queued:
        with sock, sock.makefile("rb") as lines:
            assert lines.readline().startswith(b"hello worker=0"), "queued connection reset"
            sock.sendall(b"ping\n")
            assert lines.readline() == b"echo ping\n"

    def refused() -> bool:
        try:
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        except ConnectionRefusedError:
            return True
        with sock, sock.makefile("rb") as lines:  # came in while the worker still accepted
            assert lines.readline().startswith(b"hello worker=0"), "late connection reset"
        return False

    wait_for(refused, 5, "new connections refused")
    assert server.proc.wait(15) == 0
    server.stop()


def test_session_beyond_the_grace_period_is_closed(start: Callable[..., EdgeServe],
                                                  db_url: str) -> None:
    server = start(config_text(db_url, grace=1))
    server.wait_ready()
    session = Echo(server.port)
    server.signal(signal.SIGTERM)
    assert session.readline() == "bye shutting down"
    assert session.readline() == ""  # closed by the server
    session.close()
    assert server.proc.wait(10) == 0
    server.stop()


def test_sighup_with_a_broken_config_keeps_serving(start: Callable[..., EdgeServe],
                                                  db_url: str) -> None:
    server = start(config_text(db_url))
    server.wait_ready()
    server.config_path.write_text("[serve]\nworkers = 0\n")
    server.signal(signal.SIGHUP)
    record = wait_for(lambda: next((r for r in server.records()
                                    if "invalid configuration" in r["msg"]), None), 10,
                      "reload error in the log")
    assert record["level"] == "error" and "[serve] workers" in record["msg"]
    session = Echo(server.port)
    assert session.echo("ok") == "echo ok"
    session.close()
    assert http_get(server.url("/readyz"))[0] == 200
    assert server.stop() == 0


def test_sighup_applies_a_changed_config(start: Callable[..., EdgeServe], db_url: str) -> None:
    server = start(config_text(db_url, grace=10))
    server.wait_ready()
    old_port = server.port
    old_session = Echo(old_port)
    server.config_path.write_text(config_text(db_url, workers=2, grace=10, ssh="127.0.0.2:0"))
    server.signal(signal.SIGHUP)
    host, port = server.wait_line("ssh")
    assert host == "127.0.0.2"
    wait_for(lambda: any(r["msg"] == "configuration reloaded" for r in server.records()), 15,
             "reload")
    workers = set()
    for _ in range(100):
        session = Echo(port, host)
        workers.add(session.worker)
        session.close()
        if len(workers) == 2:
            break
    assert workers == {0, 1}
    # The old generation drains: its open session still works ...
    assert old_session.echo("old") == "echo old"
    old_session.close()

    # ... and once it is gone, the old address is released.
    def refused() -> bool:
        try:
            socket.create_connection(("127.0.0.1", old_port), timeout=1).close()
        except ConnectionRefusedError:
            return True
        return False

    wait_for(refused, 10, "old address released")
    _, body = http_get(server.url("/metrics"))
    assert metric_value(body, "edge_workers_expected") == 2
    assert server.stop() == 0


def test_killed_worker_is_restarted(start: Callable[..., EdgeServe], db_url: str) -> None:
    server = start(config_text(db_url))
    server.wait_ready()
    session = Echo(server.port)
    first = session.pid
    session.close()
    os.kill(first, signal.SIGKILL)

    def new_pid() -> int | None:
        try:
            session = Echo(server.port)
        except OSError:
            return None
        session.close()
        return session.pid if session.pid != first else None

    assert wait_for(new_pid, 10, "restarted worker")
    assert any(r["msg"].startswith("worker died") for r in server.records())
    server.wait_ready()
    assert metric_value(http_get(server.url("/metrics"))[1], "edge_worker_up") == 1
    assert server.stop() == 0


def test_worker_killed_under_load_costs_only_its_own_sessions(
        start: Callable[..., EdgeServe], db_url: str) -> None:
    server = start(config_text(db_url), "--workers", "2")
    server.wait_ready()
    stop = threading.Event()
    served: dict[int, int] = {}  # worker pid -> sessions completed
    failures: list[tuple[int | None, str]] = []  # (pid from the greeting, or None; error)

    def client() -> None:
        deadline = time.monotonic() + 40  # bounded even if the test fails early
        while not stop.is_set() and time.monotonic() < deadline:
            pid = None
            try:
                session = Echo(server.port)
                pid = session.pid
                for n in range(3):
                    assert session.echo(f"ping {n}") == f"echo ping {n}"
                session.close()
                served[pid] = served.get(pid, 0) + 1
            except (OSError, AssertionError) as exc:
                failures.append((pid, repr(exc)))

    threads = [threading.Thread(target=client) for _ in range(3)]
    for thread in threads:
        thread.start()
    try:
        wait_for(lambda: len(served) == 2 and min(served.values()) > 20, 20, "both workers busy")
        victim, survivor = sorted(served)
        os.kill(victim, signal.SIGKILL)
        survivor_before = served[survivor]
        wait_for(lambda: set(served) - {victim, survivor}, 20, "the restarted worker serving")
        wait_for(lambda: served[survivor] > survivor_before + 20, 20, "the survivor serving")
    finally:
        stop.set()
        for thread in threads:
            thread.join(20)
    # Only sessions the killed worker had accepted may fail (one per client at most); a
    # session greeted by any other worker, and every connection queued meanwhile, is served.
    assert [f for f in failures if f[0] not in (None, victim)] == []
    assert len(failures) <= len(threads), failures
    assert len(served) >= 3  # the victim, the survivor, the restarted worker
    server.wait_ready()
    assert server.stop() == 0


def test_listener_without_proxy_is_a_startup_error(start: Callable[..., EdgeServe],
                                                   db_url: str) -> None:
    # Whether httpproxy is built yet or not, point [http] at a module that does not exist.
    server = start(config_text(db_url, extra='[http]\nlisten = ["127.0.0.1:0"]\n'), wait=(),
                   env={"EDGE_PROXY_OVERRIDES": "http=httpproxy.not_built_yet:HttpProxy"})
    code = server.proc.wait(20)
    assert code != 0
    lines = server.log().strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("edge: error: [http] listen is set but the http proxy is not "
                               "installed/built yet")


def test_second_serve_on_the_same_port_refuses_and_names_the_first(
        start: Callable[..., EdgeServe], db_url: str, tmp_path: Path) -> None:
    with socket.socket() as probe:  # a fixed port: the second instance must find it taken
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    text = config_text(db_url, workers=2, ssh=f"127.0.0.1:{port}")
    first = start(text)
    first.wait_ready()
    (tmp_path / "second").mkdir()
    began = time.monotonic()
    second = EdgeServe(tmp_path / "second", text)
    try:
        code = second.proc.wait(20)
        log = second.log()
    finally:
        second.kill()
    assert code != 0 and time.monotonic() - began < 15
    errors = [line for line in log.splitlines() if line.startswith("edge: error:")]
    assert len(errors) == 1, log
    assert re.fullmatch(rf"edge: error: \[ssh\] listen: 127\.0\.0\.1:{port} is in use by "
                        rf"pid {first.proc.pid} \(python\S* .*serve .*\)", errors[0]), errors
    assert second.lines.empty()  # it never said "listening"
    for _ in range(6):  # the first still serves on both workers, alone
        session = Echo(first.port)
        assert session.echo("x") == "echo x"
        assert Path(f"/proc/{session.pid}/stat").read_text().split()[3] == str(first.proc.pid)
        session.close()
    assert first.stop() == 0


def test_demo_refuses_to_start_next_to_a_process_on_its_backend_ports(tmp_path: Path) -> None:
    port = 8081  # demo-a's HTTP backend (docs, tests/test_demo.py)
    holder = socket.socket()
    try:
        holder.bind(("127.0.0.1", port))
    except OSError:
        holder.close()
        pytest.skip(f"port {port} is busy (another demo running?)")
    with holder:
        holder.listen(1)
        # Its own session: if the demo does start (the bug), its backends are stopped with it.
        proc = subprocess.Popen(
            [sys.executable, "-c", "import sys; from edge.cli.main import main; sys.exit(main())",
             "demo", "--dir", str(tmp_path / "demo"), "--duration", "3"],
            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            out, err = proc.communicate(timeout=30)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0
    assert err.strip() == (f"edge: error: demo backend: 127.0.0.1:{port} is in use by "
                           f"pid {os.getpid()} ({_own_command()})"), err
    assert "listening" not in out


def _own_command() -> str:
    from edge.ports import find_holder

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        holder = find_holder(sock.getsockname()[1])
    assert holder is not None and holder.pid == os.getpid()
    return holder.command


def test_worker_rejecting_its_config_stops_serve_instead_of_restarting(
        start: Callable[..., EdgeServe], db_url: str) -> None:
    server = start(config_text(db_url), "--workers", "2", wait=(),
                   env={"ECHO_PROXY_REJECT_CONFIG": "1"})
    assert server.proc.wait(30) == 78
    log = server.log()
    assert "no host keys (run `edge init`)" in log
    assert "restarting" not in log


def test_only_admin_when_no_proxy_enabled(start: Callable[..., EdgeServe], db_url: str) -> None:
    config = f'[database]\nurl = "{db_url}"\n[admin]\nlisten = ["127.0.0.1:0"]\n'
    server = start(config, wait=("admin",))
    assert http_get(server.url("/healthz")) == (200, "ok\n")
    assert http_get(server.url("/readyz")) == (200, "ready\n")
    assert server.stop() == 0


def test_only_filters_proxies(start: Callable[..., EdgeServe], db_url: str) -> None:
    # --only ftp: the configured (echo) ssh listener is not started.
    server = start(config_text(db_url), "--only", "ftp", wait=("admin",))
    assert http_get(server.url("/readyz"))[0] == 200
    assert "ssh" not in server.listeners
    assert server.stop() == 0


# -- logging -----------------------------------------------------------------------------


def test_json_and_text_formatters() -> None:
    record = logging.LogRecord("edge.x", logging.WARNING, __file__, 1, "hello %s", ("you",), None)
    record.proxy = "ssh"
    set_process_fields(worker=3)
    try:
        data = json.loads(JsonFormatter().format(record))
        text = TextFormatter().format(record)
    finally:
        set_process_fields()
    assert data["msg"] == "hello you" and data["level"] == "warning"
    assert data["logger"] == "edge.x" and data["proxy"] == "ssh" and data["worker"] == 3
    assert data["ts"].endswith("Z")
    assert "hello you" in text and "proxy=ssh" in text and "worker=3" in text


def test_configure_replaces_its_handler() -> None:
    root = logging.getLogger()
    before = list(root.handlers)
    level = root.level
    try:
        configure(LogConfig(level="debug", format="text"))
        configure(LogConfig(level="info", format="json"))
        ours = [h for h in root.handlers if getattr(h, "_edge_handler", False)]
        assert len(ours) == 1 and isinstance(ours[0].formatter, JsonFormatter)
    finally:
        for handler in list(root.handlers):
            if handler not in before:
                root.removeHandler(handler)
        root.setLevel(level)
