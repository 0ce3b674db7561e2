"""A private MariaDB server for fault tests: stop it, kill it, restart it.

The shared server at 127.0.0.1:3306 must never be disturbed, so tests that need the database
to hang or die start their own: ``mariadb-install-db`` into a temporary datadir, then
``mariadbd`` on a free port with grants skipped (only 127.0.0.1 can reach it).

Use the fixtures by importing them into a test module::

    from tests.support_mariadb import private_mariadb, private_mysql_url  # noqa: F401

``private_mariadb`` is one server per module (starting one takes a few seconds);
``private_mysql_url`` gives each test a fresh database on it, after making sure the server is
running again whatever the previous test did to it.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pymysql
import pytest

from tests.conftest import IN_CI

INSTALL_DB = shutil.which("mariadb-install-db") or shutil.which("mysql_install_db")
MARIADBD = shutil.which("mariadbd", path=os.environ.get("PATH", "") + ":/usr/sbin:/usr/libexec")


def _die_with_parent() -> None:
    # A test process killed by a timeout must not leave a (possibly SIGSTOPped) server behind:
    # the kernel SIGKILLs it when pytest exits, which also works on a stopped process.
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PrivateMariaDB:
    """One ``mariadbd`` process owned by a test; same datadir and port across restarts."""

    def __init__(self, base: Path, extra_args: tuple[str, ...] = ("--skip-log-bin",)) -> None:
        """``extra_args``: more ``mariadbd`` options (binary log, server id for replication)."""
        if INSTALL_DB is None or MARIADBD is None:
            raise RuntimeError("mariadb-install-db / mariadbd not installed")
        self.base = base
        self.datadir = base / "data"
        self.socket = base / "mysqld.sock"
        self.log = base / "mariadbd.log"
        self.port = _free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.stopped = False
        self.extra_args = extra_args
        subprocess.run(
            [INSTALL_DB, "--no-defaults", f"--datadir={self.datadir}", "--user=root",
             "--auth-root-authentication-method=normal",
             "--skip-test-db", "--skip-name-resolve"],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=120)

    @property
    def admin_url(self) -> str:
        return f"mysql://root@127.0.0.1:{self.port}/mysql"

    def url(self, database: str) -> str:
        return f"mysql://root@127.0.0.1:{self.port}/{database}"

    def start(self, timeout: float = 60.0) -> None:
        """Start ``mariadbd`` and wait until it answers a query."""
        assert self.process is None, "already running"
        log = open(self.log, "ab")  # noqa: SIM115 - the server's stderr for its whole life
        self.process = subprocess.Popen(
            [MARIADBD, "--no-defaults", f"--datadir={self.datadir}", f"--port={self.port}",
             "--bind-address=127.0.0.1", f"--socket={self.socket}", "--user=root",
             "--skip-grant-tables", "--skip-name-resolve", f"--pid-file={self.base / 'pid'}",
             "--innodb-buffer-pool-size=16M", "--innodb-log-file-size=8M",
             "--max-connections=200", "--performance-schema=OFF", *self.extra_args],
            stdout=log, stderr=log, start_new_session=True, preexec_fn=_die_with_parent)
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"mariadbd exited ({self.process.returncode}); see {self.log}")
            try:
                self.connect().close()
                return
            except pymysql.err.MySQLError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"mariadbd not ready after {timeout}s; see {self.log}") from None
                time.sleep(0.1)

    def connect(self, database: str | None = None) -> pymysql.connections.Connection:
        return pymysql.connect(host="127.0.0.1", port=self.port, user="root", database=database,
                               connect_timeout=3, read_timeout=10, autocommit=True)

    def _signal(self, signum: int) -> None:
        assert self.process is not None, "not running"
        self.process.send_signal(signum)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGSTOP: the server hangs (connections are accepted by the kernel, never answered).

        Returns once every thread is stopped: ``kill`` only queues the signal, and until one
        of the server's threads is scheduled to start the group stop, a connection thread that
        a query wakes runs on and answers it (seen on a loaded machine: a feed poll sent right
        after ``kill`` succeeded).
        """
        self._signal(signal.SIGSTOP)
        self.stopped = True
        deadline = time.monotonic() + timeout
        while not self.all_threads_stopped():
            if time.monotonic() > deadline:
                raise RuntimeError(f"mariadbd not stopped {timeout}s after SIGSTOP")
            time.sleep(0.001)

    def all_threads_stopped(self) -> bool:
        """True when no thread of the server can run (stopped, or exited)."""
        assert self.process is not None, "not running"
        task = Path(f"/proc/{self.process.pid}/task")
        for thread in task.iterdir():
            try:
                stat = (thread / "stat").read_text()
            except FileNotFoundError:  # the thread exited meanwhile
                continue
            if stat.rsplit(")", 1)[1].split()[0] not in ("T", "t", "Z", "X"):
                return False
        return True

    def cont(self) -> None:
        """SIGCONT: a stopped server carries on as if nothing happened."""
        self._signal(signal.SIGCONT)
        self.stopped = False

    def kill(self) -> None:
        """SIGKILL: the server dies; its connections are reset."""
        assert self.process is not None, "not running"
        if self.stopped:
            self.cont()
        self.process.kill()
        self.process.wait(timeout=30)
        self.process = None

    def restart(self) -> None:
        """Kill if running, then start again on the same datadir and port."""
        if self.process is not None:
            self.kill()
        self.start()

    def ensure_running(self) -> None:
        if self.stopped:
            self.cont()
        if self.process is None or self.process.poll() is not None:
            self.process = None
            self.start()

    def shutdown(self) -> None:
        if self.process is not None:
            if self.stopped:
                self.cont()
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)
            self.process = None


class ReplicatedPair:
    """A private primary and a replica replicating from it (binary log, row format), each a
    :class:`PrivateMariaDB` of its own; never the shared server."""

    def __init__(self, base: Path) -> None:
        self.primary = PrivateMariaDB(base / "primary", (
            "--log-bin=primary-bin", "--server-id=1", "--binlog-format=ROW"))
        self.replica = PrivateMariaDB(base / "replica", (
            "--skip-log-bin", "--server-id=2", "--skip-slave-start"))

    def start(self) -> None:
        self.primary.start()
        self.replica.start()
        self.start_replication(from_start=True)

    def start_replication(self, *, from_start: bool = False) -> None:
        with self.replica.connect().cursor() as cursor:
            if from_start:
                cursor.execute(
                    "CHANGE MASTER TO MASTER_HOST='127.0.0.1', MASTER_PORT=%s, MASTER_USER='root', "
                    "MASTER_PASSWORD='', MASTER_LOG_FILE='primary-bin.000001', MASTER_LOG_POS=4, "
                    "MASTER_CONNECT_RETRY=1", (self.primary.port,))
            cursor.execute("START SLAVE")

    def pause_applying(self) -> None:
        """The replica keeps receiving the binary log but applies nothing: it lags."""
        with self.replica.connect().cursor() as cursor:
            cursor.execute("STOP SLAVE SQL_THREAD")

    def resume_applying(self) -> None:
        with self.replica.connect().cursor() as cursor:
            cursor.execute("START SLAVE SQL_THREAD")

    def wait_caught_up(self, database: str, timeout: float = 30.0) -> None:
        """Until the replica's ``MAX(changes.id)`` in ``database`` equals the primary's."""
        deadline = time.monotonic() + timeout
        query = f"SELECT COALESCE(MAX(id), 0) FROM {database}.changes"
        while True:
            with self.primary.connect().cursor() as cursor:
                cursor.execute(query)
                wanted = cursor.fetchone()[0]
            try:
                with self.replica.connect().cursor() as cursor:
                    cursor.execute(query)
                    have = cursor.fetchone()[0]
            except pymysql.err.MySQLError:
                have = -1
            if have == wanted:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"replica at change {have}, primary at {wanted}")
            time.sleep(0.1)

    def shutdown(self) -> None:
        self.replica.shutdown()
        self.primary.shutdown()


@pytest.fixture(scope="module")
def mariadb_pair() -> Iterator[ReplicatedPair]:
    """A private primary + replica pair for this module."""
    if INSTALL_DB is None or MARIADBD is None:
        _unavailable("mariadb-install-db/mariadbd not installed")
    base = Path(tempfile.mkdtemp(prefix="edge-mariadb-pair-"))
    try:
        (base / "primary").mkdir()
        (base / "replica").mkdir()
        pair = ReplicatedPair(base)
        pair.start()
    except (RuntimeError, subprocess.SubprocessError, OSError, pymysql.err.MySQLError) as exc:
        shutil.rmtree(base, ignore_errors=True)
        _unavailable(f"cannot start a private MariaDB pair: {exc}")
    try:
        yield pair
    finally:
        pair.shutdown()
        shutil.rmtree(base, ignore_errors=True)


def _unavailable(reason: str) -> None:
    if IN_CI:
        pytest.fail(reason + " (CI=true: private MariaDB tests must not be skipped)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def private_mariadb() -> Iterator[PrivateMariaDB]:
    """A private MariaDB server for this module (never the shared one at :3306)."""
    if INSTALL_DB is None or MARIADBD is None:
        _unavailable("mariadb-install-db/mariadbd not installed")
    base = Path(tempfile.mkdtemp(prefix="edge-mariadb-"))
    try:
        server = PrivateMariaDB(base)
        server.start()
    except (RuntimeError, subprocess.SubprocessError, OSError) as exc:
        shutil.rmtree(base, ignore_errors=True)
        _unavailable(f"cannot start a private MariaDB: {exc}")
    try:
        yield server
    finally:
        server.shutdown()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def private_mysql_url(private_mariadb: PrivateMariaDB) -> Iterator[str]:
    """A fresh empty database on the (running) private server, dropped afterwards."""
    private_mariadb.ensure_running()
    name = "edge_fault_" + uuid.uuid4().hex[:12]
    admin = private_mariadb.connect()
    with admin.cursor() as cursor:
        cursor.execute(f"CREATE DATABASE {name}")
    admin.close()
    yield private_mariadb.url(name)
    private_mariadb.ensure_running()
    admin = private_mariadb.connect()
    with admin.cursor() as cursor:
        cursor.execute(f"DROP DATABASE IF EXISTS {name}")
    admin.close()


__all__ = ["PrivateMariaDB", "ReplicatedPair", "mariadb_pair", "private_mariadb",
           "private_mysql_url"]
