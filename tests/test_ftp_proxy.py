"""The FTP/FTPS proxy end to end: real clients (ftplib, curl) through FtpProxy to real
pyftpdlib backends (``python -m ftpproxy.devserver`` subprocesses), with the directory on
SQLite and MariaDB."""

from __future__ import annotations

import asyncio
import contextlib
import ftplib
import hashlib
import io
import logging
import os
import random
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
from prometheus_client import REGISTRY

from edge.config import CacheConfig, EdgeConfig, FtpConfig, LimitsConfig, ServeConfig
from edge.directory.directory import Directory
from edge.directory.feed import ChangeFeed
from edge.directory.secrets import KeyBox
from edge.directory.service import DirectoryService
from edge.directory.store import SQLStore
from edge.directory.stores import store_for_url
from edge.proxyproto import ProxyHeaderParser, encode_v1
from edge.registry import ProxyContext
from ftpproxy.server import FtpProxy
from tests.support_directory import make_certificate

pytestmark = [
    pytest.mark.timeout(120),
    # event_loop_policy (uvloop, as ``edge serve`` runs) until conftest has a loop-factory hook.
    pytest.mark.filterwarnings("ignore:Overriding the \"event_loop_policy\" fixture"),
]

T = TypeVar("T")
USER, PASSWORD = "alice", "s3cret-pw"
BACKEND_USER = "alice_b"
CLIENT_TIMEOUT = 30.0
BIG = 100 * 1024 * 1024


# -- backends --------------------------------------------------------------------------------


@dataclass
class Backend:
    root: Path
    port: int
    process: asyncio.subprocess.Process
    name: str

    async def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(sig)
            await asyncio.wait_for(self.process.wait(), 15)


@dataclass
class Backends:
    tmp: Path
    started: list[Backend] = field(default_factory=list)

    async def start(self, name: str = "a", *, certfile: str = "", extra: tuple[str, ...] = (),
                    ) -> Backend:
        root = self.tmp / f"backend-{name}"
        root.mkdir(exist_ok=True)
        args = [sys.executable, "-m", "ftpproxy.devserver", "--root", str(root), "--name", name,
                "--user", f"{BACKEND_USER}:{PASSWORD}", *extra]
        if certfile:
            args += ["--certfile", certfile]
        process = await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.PIPE)
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), 30)
        assert line.startswith(b"LISTENING "), line
        backend = Backend(root, int(line.split()[1]), process, name)
        self.started.append(backend)
        return backend

    async def stop_all(self) -> None:
        for backend in self.started:
            await backend.stop(signal.SIGKILL)


@pytest.fixture
async def backends(tmp_path: Path) -> AsyncIterator[Backends]:
    group = Backends(tmp_path)
    yield group
    await group.stop_all()


# -- certificates ------------------------------------------------------------------------------


@dataclass
class Pem:
    cert: str
    key: str
    combined: str


def write_pem(directory: Path, name: str) -> Pem:
    chain, key = make_certificate(["localhost", "127.0.0.1"], common_name=name)
    cert_file, key_file, combined = (directory / f"{name}.crt", directory / f"{name}.key",
                                     directory / f"{name}.pem")
    cert_file.write_bytes(chain)
    key_file.write_bytes(key)
    combined.write_bytes(chain + key)
    return Pem(str(cert_file), str(key_file), str(combined))


@pytest.fixture
def proxy_pem(tmp_path: Path) -> Pem:
    return write_pem(tmp_path, "proxy")


@pytest.fixture
def backend_pem(tmp_path: Path) -> Pem:
    return write_pem(tmp_path, "backend")


# -- the proxy ---------------------------------------------------------------------------------


def free_port_range(width: int = 40) -> tuple[int, int]:
    """A random range of currently free ports (parallel test runs must not collide)."""
    for _ in range(100):
        low = random.randint(20000, 60000 - width)
        try:
            with contextlib.ExitStack() as stack:
                for port in (low, low + width // 2, low + width - 1):
                    s = stack.enter_context(socket.socket())
                    s.bind(("127.0.0.1", port))
            return low, low + width - 1
        except OSError:
            continue
    raise RuntimeError("no free port range")


class ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def find(self, msg: str, **fields: Any) -> list[logging.LogRecord]:
        return [r for r in self.records if r.getMessage() == msg
                and all(getattr(r, k, None) == v for k, v in fields.items())]


@dataclass
class Edge:
    proxy: FtpProxy
    port: int
    service: DirectoryService
    store: SQLStore
    directory: Directory
    feed: ChangeFeed
    log: ListHandler
    config: EdgeConfig

    async def stop(self) -> None:
        await self.proxy.close()
        await self.feed.stop()


@dataclass
class EdgeFactory:
    store: SQLStore
    service: DirectoryService
    keybox: KeyBox
    started: list[Edge] = field(default_factory=list)

    async def start(self, *, store: SQLStore | None = None, limits: LimitsConfig | None = None,
                    listen: str = "127.0.0.1", serve: ServeConfig | None = None,
                    **ftp: Any) -> Edge:
        ftp.setdefault("passive_ports", free_port_range())
        ftp.setdefault("login_failure_delay", 0.2)
        config = EdgeConfig(ftp=FtpConfig(**ftp), limits=limits or LimitsConfig(),
                            cache=CacheConfig(change_poll_interval=0.2),
                            serve=serve or ServeConfig())
        store = store or self.store
        directory = Directory(store, config.cache, keybox=self.keybox)
        feed = ChangeFeed(directory, interval=0.2)
        await feed.start()
        logger = logging.getLogger(f"test.ftp.{len(self.started)}")
        logger.setLevel(logging.INFO)
        handler = ListHandler()
        logger.addHandler(handler)
        context = ProxyContext(config=config, directory=directory, feed=feed, keybox=self.keybox,
                               worker_id=0, logger=logger, name="ftp")
        proxy = FtpProxy(context)
        sock = socket.socket(socket.AF_INET6 if ":" in listen else socket.AF_INET)
        sock.bind((listen, 0))
        sock.listen(128)
        sock.setblocking(False)
        await proxy.start([sock])
        edge = Edge(proxy, sock.getsockname()[1], self.service, store, directory, feed, handler,
                    config)
        self.started.append(edge)
        return edge

    async def stop_all(self) -> None:
        for edge in self.started:
            await edge.stop()


@pytest.fixture
async def sqlite_store(sqlite_url: str) -> AsyncIterator[SQLStore]:
    s = store_for_url(sqlite_url)
    await s.open()
    await s.migrate()
    yield s
    await s.close()


@pytest.fixture
async def edges(sqlite_store: SQLStore, keybox: KeyBox) -> AsyncIterator[EdgeFactory]:
    """Proxies on a SQLite directory (most tests: the store does not matter to them)."""
    factory = EdgeFactory(sqlite_store, DirectoryService(sqlite_store, keybox), keybox)
    yield factory
    await factory.stop_all()


@pytest.fixture
async def edges_any_db(store: SQLStore, keybox: KeyBox) -> AsyncIterator[EdgeFactory]:
    """Proxies on SQLite and on MariaDB (``database_url`` parametrisation)."""
    factory = EdgeFactory(store, DirectoryService(store, keybox), keybox)
    yield factory
    await factory.stop_all()


async def provision(service: DirectoryService, backend: Backend, *, host: str = "host-a",
                    tenant: str = "t1", **host_fields: Any) -> None:
    await service.add_host(host, "127.0.0.1", ftp_port=backend.port, **host_fields)
    await service.add_tenant(tenant, host)
    await service.add_account(USER, tenant, protocols=["ftp"], upstream_username=BACKEND_USER)


# -- clients ---------------------------------------------------------------------------------


def client_context(pem: Pem) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=pem.cert)
    return context


class ReusingFTP_TLS(ftplib.FTP_TLS):
    """FTP_TLS that offers the control connection's TLS session on data connections (as curl,
    FileZilla and lftp do) and remembers whether the server resumed it."""

    reused: list[bool]

    def ntransfercmd(self, cmd: str, rest: Any = None) -> tuple[socket.socket, int | None]:
        conn, size = ftplib.FTP.ntransfercmd(self, cmd, rest)
        if self._prot_p:  # type: ignore[attr-defined]
            conn = self.context.wrap_socket(conn, server_hostname=self.host,
                                            session=self.sock.session)  # type: ignore[attr-defined]
            self.reused.append(conn.session_reused)
        return conn, size


def connect(port: int, *, tls: Pem | None = None, login: bool = True, user: str = USER,
            password: str = PASSWORD, passive: bool = True, host: str = "127.0.0.1") -> ftplib.FTP:
    ftp: ftplib.FTP
    if tls is not None:
        ftp = ReusingFTP_TLS(context=client_context(tls), timeout=CLIENT_TIMEOUT)
        ftp.reused = []  # type: ignore[attr-defined]
    else:
        ftp = ftplib.FTP(timeout=CLIENT_TIMEOUT)
    ftp.connect(host, port)
    ftp.set_pasv(passive)
    if tls is not None:
        assert isinstance(ftp, ftplib.FTP_TLS)
        ftp.auth()
    if login:
        ftp.login(user, password)
        if tls is not None:
            assert isinstance(ftp, ftplib.FTP_TLS)
            ftp.prot_p()
    return ftp


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


@pytest.fixture(scope="module")
def big_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    path = tmp_path_factory.mktemp("big") / "big.bin"
    with path.open("wb") as f:
        for _ in range(BIG // (1 << 20)):
            f.write(os.urandom(1 << 20))
    return path, sha256_file(path)


def place(source: Path, target: Path) -> None:
    """Put the big file into a backend's directory without copying 100 MB when possible."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def retr_hash(ftp: ftplib.FTP, name: str, rest: int | None = None) -> tuple[str, int]:
    digest, size = hashlib.sha256(), [0]

    def sink(chunk: bytes) -> None:
        digest.update(chunk)
        size[0] += len(chunk)

    ftp.retrbinary(f"RETR {name}", sink, blocksize=1 << 16, rest=rest)
    return digest.hexdigest(), size[0]


async def run(fn: Callable[[], Any]) -> Any:
    return await asyncio.to_thread(fn)


class RawControl:
    """A hand-driven control connection, for what well-behaved clients never send."""

    def __init__(self, port: int, source: str = "127.0.0.1") -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT,
                                             source_address=(source, 0))
        self.file = self.sock.makefile("rb")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> bytes:
        """One whole reply (multi-line replies joined)."""
        line = self.file.readline()
        if len(line) >= 4 and line[3:4] == b"-":
            end = line[:3] + b" "
            while True:
                more = self.file.readline()
                line += more
                if not more or more.startswith(end):
                    break
        return line

    def cmd(self, line: str) -> bytes:
        self.send(line.encode() + b"\r\n")
        return self.reply()

    def close(self) -> None:
        self.file.close()
        self.sock.close()


@contextlib.contextmanager
def raw(port: int, source: str = "127.0.0.1") -> Iterator[RawControl]:
    control = RawControl(port, source)
    try:
        yield control
    finally:
        control.close()


async def curl(*args: str) -> tuple[int, bytes, bytes]:
    process = await asyncio.create_subprocess_exec(
        "curl", "--silent", "--show-error", "--max-time", "60", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out, err


# == basic sessions ===========================================================================


async def test_login_list_and_100mb_both_ways(edges_any_db: EdgeFactory, backends: Backends,
                                             big_file: tuple[Path, str], tmp_path: Path) -> None:
    backend = await backends.start()
    await provision(edges_any_db.service, backend)
    edge = await edges_any_db.start()
    big, digest = big_file
    place(big, backend.root / "down.bin")

    def session() -> None:
        ftp = connect(edge.port)
        assert "down.bin" in ftp.nlst()
        lines: list[str] = []
        ftp.retrlines("LIST", lines.append)
        assert any("down.bin" in line and str(BIG) in line for line in lines)
        facts = dict(ftp.mlsd())
        assert facts["down.bin"]["size"] == str(BIG)
        assert retr_hash(ftp, "down.bin") == (digest, BIG)
        with big.open("rb") as f:
            ftp.storbinary("STOR up.bin", f, blocksize=1 << 16)
        assert ftp.size("up.bin") == BIG
        ftp.quit()

    await run(session)
    assert sha256_file(backend.root / "up.bin") == digest
    # One access-log line per transfer and one per session.
    transfers = edge.log.find("ftp transfer", user=USER, result="ok")
    assert {r.command for r in transfers} >= {"RETR", "STOR", "LIST", "MLSD", "NLST"}
    assert [r.bytes for r in transfers if r.command == "RETR"] == [BIG]
    await wait_for(lambda: bool(edge.log.find("ftp session", user=USER)))
    (closed,) = edge.log.find("ftp session", user=USER)
    assert closed.bytes_down >= BIG and closed.bytes_up == BIG and closed.host == "host-a"


async def wait_for(condition: Callable[[], bool], seconds: float = 20.0) -> None:
    """Poll ``condition`` (log lines appear after the client saw the reply)."""
    await eventually(lambda: asyncio.sleep(0, condition()), bool, seconds)


async def eventually(probe: Callable[[], Awaitable[T]], ok: Callable[[T], bool],
                     seconds: float = 20.0) -> T:
    """``await probe()`` until ``ok(result)`` (changes reach the proxy through the ~0.2 s
    change-feed poll), at most ``seconds``; returns the last result either way."""
    deadline = time.monotonic() + seconds
    for _ in range(100_000):
        value = await probe()
        if ok(value) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    return value


@pytest.fixture(scope="module", params=["uvloop"])
def event_loop_policy(request: pytest.FixtureRequest) -> asyncio.AbstractEventLoopPolicy:
    """``edge serve`` runs uvloop: so do these tests (FTPS ones also run on asyncio's loop)."""
    import uvloop

    if request.param == "asyncio":
        return asyncio.DefaultEventLoopPolicy()
    return uvloop.EventLoopPolicy()


async def test_active_mode_port_and_eprt(edges: EdgeFactory, backends: Backends) -> None:
    backend = await backends.start()
    await provision(edges.service, backend)
    edge = await edges.start()
    (backend.root / "a.txt").write_bytes(b"active data\n" * 1000)

    def session() -> None:
        ftp = connect(edge.port, passive=False)
        assert retr_hash(ftp, "a.txt") == (hashlib.sha256(b"active data\n" * 1000).hexdigest(), 12000)
        ftp.storbinary("STOR b.txt", io.BytesIO(b"uploaded actively"))
        # ftplib only sends EPRT for IPv6; the IPv4 form by hand:
        listener = socket.create_server(("127.0.0.1", 0))
        port = listener.getsockname()[1]
        assert ftp.sendcmd(f"EPRT |1|127.0.0.1|{port}|").startswith("200")
        ftp.putcmd("RETR a.txt")
        assert ftp.getresp()[:3] in ("125", "150")
        conn, _ = listener.accept()
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
        conn.close()
        listener.close()
        assert ftp.getresp().startswith("226")
        assert data == b"active data\n" * 1000
        ftp.quit()

    await run(session)
    assert (backend.root / "b.txt").read_bytes() == b"uploaded actively"


async def test_resume_rename_delete_and_directories(edges: EdgeFactory, backends: Backends) -> None:
    backend = await backends.start()
    await provision(edges.service, backend)
    edge = await edges.start()
    payload = os.urandom(300_000)
    (backend.root / "file.bin").write_bytes(payload)

    def session() -> None:
        ftp = connect(edge.port)
        # REST + RETR: the rest of a download.
        digest, size = retr_hash(ftp, "file.bin", rest=100_000)
        assert (digest, size) == (hashlib.sha256(payload[100_000:]).hexdigest(), 200_000)
        # REST + STOR: resuming an interrupted upload.
        ftp.storbinary("STOR part.bin", io.BytesIO(payload[:120_000]))
        ftp.storbinary("STOR part.bin", io.BytesIO(payload[120_000:]), rest=120_000)
        assert ftp.size("part.bin") == len(payload)
        ftp.storbinary("APPE part.bin", io.BytesIO(b"tail"))
        ftp.rename("part.bin", "renamed.bin")
        ftp.mkd("sub")
        ftp.cwd("sub")
        assert ftp.pwd() == "/sub"
        ftp.cwd("/")
        ftp.delete("file.bin")
        with pytest.raises(ftplib.error_perm, match=r"^550"):
            ftp.delete("file.bin")
        ftp.rmd("sub")
        ftp.quit()

    await run(session)
    assert (backend.root / "renamed.bin").read_bytes() == payload + b"tail"
    assert not (backend.root / "file.bin").exists() and not (backend.root / "sub").exists()


@pytest.mark.parametrize("event_loop_policy", ["asyncio", "uvloop"], indirect=True)
async def test_ftps_control_and_data_with_session_reuse(
        edges: EdgeFactory, backends: Backends, proxy_pem: Pem, big_file: tuple[Path, str],
        request: pytest.FixtureRequest) -> None:
    backend = await backends.start()
    await provision(edges.service, backend)
    edge = await edges.start(certificate_file=proxy_pem.cert, key_file=proxy_pem.key,
                             require_tls=True)
    payload = os.urandom(5_000_000)
    (backend.root / "f.bin").write_bytes(payload)

    def session() -> list[bool]:
        ftp = connect(edge.port, tls=proxy_pem)
        assert ftp.sock.version() in ("TLSv1.2", "TLSv1.3")  # type: ignore[attr-defined]
        assert "f.bin" in ftp.nlst()
        assert retr_hash(ftp, "f.bin") == (hashlib.sha256(payload).hexdigest(), len(payload))
        ftp.storbinary("STOR g.bin", io.BytesIO(payload))
        ftp.set_pasv(False)  # active mode: the proxy connects, and is still the TLS server
        assert retr_hash(ftp, "g.bin")[1] == len(payload)
        ftp.quit()
        return list(ftp.reused)  # type: ignore[attr-defined]

    reused = await run(session)
    assert len(reused) == 4 and all(reused), reused
    assert (backend.root / "g.bin").read_bytes() == payload
    transfers = edge.log.find("ftp transfer", result="ok")
    assert all(r.client_resumed for r in transfers) and len(transfers) == 4


async def test_require_tls_refuses_plain_login(edges: EdgeFactory, backends: Backends,
                                               proxy_pem: Pem) -> None:
    backend = await backends.start()
    await provision(edges.service, backend)
    edge = await edges.start(certificate_file=proxy_pem.cert, key_file=proxy_pem.key,
                             require_tls=True)

    def session() -> None:
        with raw(edge.port) as c:
            assert c.reply().startswith(b"220 ")
            assert c.cmd(f"USER {USER}").startswith(b"530 Policy requires TLS")
            assert c.cmd(f"PASS {PASSWORD}").startswith(b"503 ")

    await run(session)


async def test_ftps_backend_verified_and_data_session_resumed(
        edges: EdgeFactory, backends: Backends, proxy_pem: Pem, backend_pem: Pem) -> None:
    backend = await backends.start(certfile=backend_pem.combined, extra=("--tls-required",))
    await provision(edges.service, backend, backend_tls=True)
    edge = await edges.start(backend_ca_file=backend_pem.cert)
    (backend.root / "x.txt").write_bytes(b"x" * 100_000)

    def session() -> None:
        ftp = connect(edge.port)  # plain towards the proxy, TLS towards the backend
        assert retr_hash(ftp, "x.txt")[1] == 100_000
        ftp.storbinary("STOR y.txt", io.BytesIO(b"y" * 50_000))
        ftp.quit()

    await run(session)
    assert (backend.root / "y.txt").read_bytes() == b"y" * 50_000
    transfers = edge.log.find("ftp transfer", result="ok")
    assert len(transfers) == 2
    assert all(r.backend_tls in ("TLSv1.2", "TLSv1.3") for r in transfers)
    assert all(r.backend_resumed for r in transfers), [vars(r) for r in transfers]


async def test_ftps_backend_with_untrusted_certificate_is_refused(
        edges: EdgeFactory, backends: Backends, proxy_pem: Pem, backend_pem: Pem) -> None:
    backend = await backends.start(certfile=backend_pem.combined)
    await provision(edges.service, backend, backend_tls=True)
    edge = await edges.start(backend_ca_file=proxy_pem.cert)  # not the backend's issuer

    def session() -> None:
        with pytest.raises(ftplib.error_temp, match=r"^421"):
            connect(edge.port)

    await run(session)
    assert not (backend.root / "x").exists()


# == curl ======================================================================================


async def test_curl_passive_active_and_ftps(edges: EdgeFactory, backends: Backends, proxy_pem: Pem,
                                            tmp_path: Path) -> None:
    backend = await backends.start()
    await provision(edges.service, backend)
    edge = await edges.start(certificate_file=proxy_pem.cert, key_file=proxy_pem.key)
    payload = os.urandom(2_000_000)
    (backend.root / "c.bin").write_bytes(payload)
    upload = tmp_path / "upload.bin"
    upload.write_bytes(payload[::-1])
    url = f"ftp://{USER}:{PASSWORD}@127.0.0.1:{edge.port}"
    # Passive (curl uses EPSV first), download and upload.
    code, out, err = await curl(f"{url}/c.bin")
    assert code == 0 and out == payload, err
    code, _, err = await curl("-T", str(upload), f"{url}/from-curl.bin")
    assert code == 0, err
    assert (backend.root / "from-curl.bin").read_bytes() == payload[::-1]
    # Plain PASV and active mode (EPRT, then PORT with --disable-eprt).
    for flags in (["--disable-epsv"], ["-P", "127.0.0.1"], ["-P", "127.0.0.1", "--disable-eprt"]):
        code, out, err = await curl(*flags, f"{url}/c.bin")
        assert code == 0 and out == payload, (flags, err)
    # Directory listing.
    code, out, err = await curl(f"{url}/")
    assert code == 0 and b"c.bin" in out, err
    # Explicit FTPS, data channels protected. (Active-mode FTPS is covered with ftplib: curl
    # 7.88 fails it against pyftpdlib directly too, "sa_addr inet_ntop() failed".)
    for flags in ([], ["--disable-epsv"]):
        code, out, err = await curl("--ssl-reqd", "--cacert", proxy_pem.cert, *flags,
                                    f"{url}/c.bin")
        assert code == 0 and out == payload, (flags, err)
    code, _, err = await curl("--ssl-reqd", "--cacert", proxy_pem.cert, "-T", str(upload),
                              f"{url}/tls-up.bin")
    assert code == 0, err
    assert (backend.root / "tls-up.bin").read_bytes() == payload[::-1]
    tls = [r for r in edge.log.find("ftp transfer", result="ok") if getattr(r, "client_tls", None)]
    assert len(tls) == 3 and all(r.client_resumed for r in tls)


# == attacks ===================================================================================


def _same_port_on_two_addresses(first: str, second: str) -> tuple[socket.socket, socket.socket]:
    """Listeners on one free port number at two addresses (retried: the port the kernel gives
    for ``first`` may be in use at ``second``)."""
    for _ in range(50):
        a = socket.create_server((first, 0))
        try:
            return a, socket.create_server((second, a.getsockname()[1]))
        except OSError:
            a.close()
    raise AssertionError(f"no port free on both {first} and {second}")


async def test_bounce_port_address_ignored_and_low_ports_refused(
        edges: EdgeFactory, backends: Backends) -> None:
    backend = await backends.start()
    await provision(edges.service, backend)
    edge = await edges.start()
    (backend.root / "a.txt").write_bytes(b"secret" * 10)

    def session() -> None:
        ftp = connect(edge.port)
        # Privileged ports: refused, PORT and EPRT alike.
        for command in ("PORT 127,0,0,1,0,25", "EPRT |1|127.0.0.1|22|", "PORT 10,0,0,1,0,80"):
            with pytest.raises(ftplib.error_perm, match=r"^504"):
                ftp.sendcmd(command)
        # A third-party address: the proxy connects to the client's own address instead.
        victim, mine = _same_port_on_two_addresses("127.0.0.2", "127.0.0.1")
        victim.settimeout(0.5)
        port = victim.getsockname()[1]
        p1, p2 = divmod(port, 256)
        assert ftp.sendcmd(f"PORT 127,0,0,2,{p1},{p2}").startswith("200")
        ftp.putcmd("RETR a.txt")
        assert ftp.getresp()[:1] == "1"
        conn, _ = mine.accept()
        assert conn.recv(100) == b"secret" * 10
        conn.close()
        assert ftp.getresp().startswith("226")
        with pytest.raises(TimeoutError):
            victim.accept()
        victim.close()
        mine.close()
        ftp.quit()

    before = REGISTRY.get_sample_value("edge_ftp_refused_total", {"reason": "bounce"}) or 0
    await run(session)
    assert REGISTRY.get_sample_value("edge_ftp_refused_total", {"reason": "bounce"}) == before + 3


async def test_passive_port_stealing_refused(edges: EdgeFactory, backends: Backends) -> None:
    backend = await backends.start()
    await provision(edges.service, backend)
    edge = await edges.start()
    (backend.root / "a.txt").write_bytes(b"private" * 100)

    def session() -> None:
        ftp = connect(edge.port)
        low, high = edge.config.ftp.passive_ports
        host, port = ftplib.parse227(ftp.sendcmd("PASV"))
        assert low <= port <= high
        # Another address races the client to the port: dropped without a byte.
        thief = socket.create_connection((host, port), timeout=10, source_address=("127.0.0.2", 0))
        assert thief.recv(100) == b""
        thief.close()
        client = socket.create_connection((host, port), timeout=10)
        ftp.putcmd("RETR a.txt")
        assert ftp.getresp()[:1] == "1"
        data = b""
        while chunk := client.recv(65536):
            data += chunk
        assert data == b"private" * 100
        assert ftp.getresp().startswith("226")
        # Exactly one accept: the port is closed afterwards.
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((host, port), timeout=5)
        # Ports are random: a few PASV replies are not consecutive.
        ports = {ftplib.parse227(ftp.sendcmd("PASV"))[1] for _ in range(4)}
        assert len(ports) >= 3
        ftp.quit()

    await run(session)
    assert edge.log.find("ftp: connection to a passive port from a foreign address dropped",
                         peer="127.0.0.2")


async def test_backend_pasv_pointing_elsewhere_is_refused(edges: EdgeFactory, backends: Backends,
                                                          ) -> None:
    backend = await backends.start(extra=("--masquerade", "127.0.0.3"))
    await provision(edges.service, backend)
    edge = await edges.start()
    (backend.root / "a.txt").write_bytes(b"data")

    def session() -> None:
        ftp = connect(edge.port)
        with pytest.raises(ftplib.error_temp, match=r"^425"):
            ftp.retrbinary("RETR a.txt", lambda b: None)
        assert ftp.voidcmd("NOOP").startswith("200")  # the session goes on
        ftp.quit()

    await run(session)
    (record,) = edge.log.find("ftp: backend passive reply refused")
    assert "127.0.0.3" in record.error


async def test_backend_data_port_refusing_gives_425_and_the_session_goes_on(
        edges: EdgeFactory, backends: Backends) -> None:
    # A backend whose passive port refuses the proxy's data connection: the client gets a
    # clear 425 and the session goes on, each later transfer with its own file's bytes (the
    # transfer command is only sent once the backend data connection exists: sent earlier,
    # pyftpdlib queues it and, ABOR or not, replays it on the next data connection).
    backend = await backends.start(extra=("--refuse-data", "2"))
    await provision(edges.service, backend)
    edge = await edges.start()
    (backend.root / "a.txt").write_bytes(b"data")
    (backend.root / "c.txt").write_bytes(b"other")

    def session() -> None:
        ftp = connect(edge.port)
        with pytest.raises(ftplib.error_temp, match=r"^425 Cannot open data connection"):
            ftp.retrbinary("RETR a.txt", lambda b: None)
        assert ftp.voidcmd("NOOP").startswith("200")
        with pytest.raises(ftplib.error_temp, match=r"^425"):
            ftp.storbinary("STOR b.txt", io.BytesIO(b"upload"))
        assert ftp.pwd() == "/"
        for _ in range(3):  # not the file of the RETR that failed
            assert retr_hash(ftp, "c.txt") == (hashlib.sha256(b"other").hexdigest(), 5)
        ftp.storbinary("STOR b.txt", io.BytesIO(b"upload"))
        ftp.quit()

    await run(session)
    assert (backend.root / "b.txt").read_bytes() == b"upload"
    failed = edge.log.find("ftp transfer", result="failed")
    assert len(failed) == 2 and all("backend data connection" in r.error for r in failed)


async def test_no_user_enumeration(edges: EdgeFactory, backends: Backends) -> None:
    backend = await backends.start()
    await provision(edges.service, backend)
    delay = 0.6
    edge = await edges.start(login_failure_delay=delay)

    def attempt(user: str, password: str) -> tuple[bytes, bytes, float]:
        with raw(edge.port) as c:
            c.reply()
            user_reply = c.cmd(f"USER {user}")
            started = time.monotonic()
            pass_reply = c.cmd(f"PASS {password}")
            return user_reply, pass_reply, time.monotonic() - started

    known = await run(lambda: attempt(USER, "wrong"))
    unknown = await run(lambda: attempt("nobody", "wrong"))
    malformed = await run(lambda: attempt("bad/name", "wrong"))
    for result in (known, unknown, malformed):
        assert result[:2] == (b"331 Password required.\r\n", b"530 Login incorrect.\r\n"), result
        assert result[2] >= delay * 0.9
    # Only the known user ever reached a backend; there is no default backend.
    assert len(edge.log.find("ftp login failed")) == 3


async def test_starttls_injection_discarded(edges: EdgeFactory, backends: Backends,
                                            proxy_pem: Pem) -> None:
    backend = await backends.start()
    await provision(edges.service, backend)
    edge = await edges.start(certificate_file=proxy_pem.cert, key_file=proxy_pem.key)

    def session() -> bytes:
        with raw(edge.port) as c:
            c.reply()
            # USER pipelined in plaintext behind AUTH TLS, in the same segment.
            c.send(f"AUTH TLS\r\nUSER {USER}\r\n".encode())
            assert c.reply().startswith(b"234 ")
            tls = client_context(proxy_pem).wrap_socket(c.sock, server_hostname="localhost")
            tls.sendall(f"PASS {PASSWORD}\r\n".encode())
            answer = tls.recv(1000)
            tls.close()
            return answer

    # Had the injected USER counted, PASS would log in; it must not.
    assert (await run(session)).startswith(b"503 Login with USER first.")
    assert edge.log.find("ftp: discarded plaintext pipelined behind AUTH TLS")


async def test_proxy_header_only_first_and_only_from_trusted(
        edges: EdgeFactory, backends: Backends) -> None:
    backend = await backends.start()
    await provision(edges.service, backend)
    untrusted = await edges.start()
    trusted = await edges.start(trusted_proxies=("127.0.0.1/32",))

    def spoof() -> tuple[bytes, bytes]:
        with raw(untrusted.port) as c:
            greeting = c.reply()
            return greeting, c.cmd("PROXY TCP4 198.51.100.7 127.0.0.1 4000 21")

    greeting, answer = await run(spoof)
    assert greeting.startswith(b"220 ") and answer.startswith(b"500 ")

    def behind_balancer() -> tuple[bytes, bytes]:
        with raw(trusted.port) as c:
            c.send(encode_v1(("198.51.100.7", 4000), ("127.0.0.1", 21)))
            greeting = c.reply()
            c.cmd(f"USER {USER}")
            c.cmd("PASS wrong")
            # A second header later is just a bad command.
            return greeting, c.cmd("PROXY TCP4 203.0.113.9 127.0.0.1 4000 21")

    greeting, answer = await run(behind_balancer)
    assert greeting.startswith(b"220 ") and answer.startswith(b"500 ")
    assert trusted.log.find("ftp login failed", client="198.51.100.7")

    def no_header() -> bytes:
        with raw(trusted.port) as c:
            c.send(b"USER alice\r\n")  # a trusted peer must send the header first
            return c.file.read()

    started = time.monotonic()
    assert await run(no_header) == b""
    assert time.monotonic() - started < 10  # closed at once, not after the login grace time
    await wait_for(lambda: bool(trusted.log.find("ftp session", result="bad_proxy_header")))


async def test_proxy_protocol_towards_backend(edges: EdgeFactory, backends: Backends) -> None:
    backend = await backends.start()
    headers: list[bytes] = []

    async def shim(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Stands for a backend that reads the PROXY header (pyftpdlib does not)."""
        parser = ProxyHeaderParser()
        result = None
        while result is None:
            data = await reader.read(1024)
            headers.append(data)
            result = parser.feed(data)
        headers[:] = [repr(result.header.source).encode()] if result.header else []
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", backend.port)
        up_writer.write(result.remaining)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer),
                             return_exceptions=True)

    server = await asyncio.start_server(shim, "127.0.0.1", 0)
    shim_port = server.sockets[0].getsockname()[1]
    await edges.service.add_host("host-a", "127.0.0.1", ftp_port=shim_port,
                                 send_proxy_protocol="v2")
    await edges.service.add_tenant("t1", "host-a")
    await edges.service.add_account(USER, "t1", upstream_username=BACKEND_USER)
    edge = await edges.start()
    (backend.root / "a.txt").write_bytes(b"hello")

    def session() -> tuple[str, int]:
        ftp = connect(edge.port)
        assert retr_hash(ftp, "a.txt")[1] == 5
        name = ftp.sock.getsockname()
        ftp.quit()
        return name

    client = await run(session)
    server.close()
    assert headers == [repr(("127.0.0.1", client[1])).encode()]


async def test_failed_login_limits_per_address_and_user_and_per_ip(
        edges: EdgeFactory, backends: Backends) -> None:
    backend = await backends.start()
    await provision(edges.service, backend)
    limits = LimitsConfig(max_failures_per_ip_user=2, max_failures_per_ip=4, ban_seconds=60)
    edge = await edges.start(limits=limits)

    def login(user: str, password: str, source: str = "127.0.0.1") -> bytes:
        with raw(edge.port, source) as c:
            c.reply()
            c.cmd(f"USER {user}")
            return c.cmd(f"PASS {password}")

    def scenario() -> None:
        assert login(USER, "wrong1").startswith(b"530")
        assert login(USER, "wrong2").startswith(b"530")
        # This address is banned for this user: even the right password fails, looking the same.
        assert login(USER, PASSWORD) == b"530 Login incorrect.\r\n"
        # Per IP: 127.0.0.1 has 2 failures; two more (any users) ban the address.
        assert login("x1", "p").startswith(b"530")
        assert login("x2", "p").startswith(b"530")
        assert login("x3", "p") == b"530 Login incorrect.\r\n"
        # Another address is unaffected, alice included.
        assert login("x4", "p", "127.0.0.6").startswith(b"530")
        assert login(USER, PASSWORD, "127.0.0.5").startswith(b"230")

    await run(scenario)
    assert edge.log.find("ftp: login refused by failed-login limits", user=USER)
    assert edge.log.find("ftp: login refused by failed-login limits", user="x3")


async def test_idle_and_login_timeouts_and_connection_cap(edges: EdgeFactory,
                                                          backends: Backends) -> None:
    backend = await backends.start()
    await provision(edges.service, backend)
    limits = LimitsConfig(login_grace_time=1.0, max_connections_per_ip=2)
    edge = await edges.start(limits=limits, idle_timeout=1.0)

    def scenario() -> None:
        with raw(edge.port) as c:
            c.reply()
            assert c.reply().startswith(b"421 Login timeout")
        ftp = connect(edge.port)
        time.sleep(2.0)
        with pytest.raises((ftplib.error_temp, EOFError, ConnectionError)):
            ftp.voidcmd("NOOP")
        with raw(edge.port) as a, raw(edge.port) as b, raw(edge.port) as c:
            a.reply(), b.reply()
            assert c.reply() == b"421 Too many connections from your address.\r\n"

    await run(scenario)
    assert edge.log.find("ftp session", result="idle")
    assert edge.log.find("ftp session", result="login_timeout")


async def test_long_and_malformed_commands(edges: EdgeFactory, backends: Backends) -> None:
    backend = await backends.start()
    await provision(edges.service, backend)
    edge = await edges.start()

    def session() -> list[bytes]:
        with raw(edge.port) as c:
            c.reply()
            c.cmd(f"USER {USER}")
            c.cmd(f"PASS {PASSWORD}")
            return [c.cmd("SIZE " + "a" * 3000), c.cmd("NO\x00OP"), c.cmd("SYST")]

    too_long, nul, syst = await run(session)
    assert too_long == b"500 Command too long.\r\n"
    assert nul.startswith(b"500 ")
    assert syst.startswith(b"215 ")


async def test_transfer_timeout_when_client_stops_reading(edges: EdgeFactory, backends: Backends,
                                                          big_file: tuple[Path, str]) -> None:
    backend = await backends.start()
    await provision(edges.service, backend)
    edge = await edges.start(transfer_timeout=1.0)
    place(big_file[0], backend.root / "big.bin")

    def session() -> bytes:
        ftp = connect(edge.port)
        host, port = ftplib.parse227(ftp.sendcmd("PASV"))
        data = socket.create_connection((host, port), timeout=10)
        data.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        ftp.putcmd("RETR big.bin")
        assert ftp.getresp()[:1] == "1"
        answer = ftp.getline()  # nothing read from the data connection meanwhile
        data.close()
        ftp.close()
        return answer.encode()

    assert (await run(session)).startswith(b"426 ")
    assert edge.log.find("ftp transfer", result="aborted", relay="idle")


# == operations ================================================================================


async def test_tenant_move_drains_sessions_and_new_logins_go_to_new_host(
        edges_any_db: EdgeFactory, backends: Backends) -> None:
    old, new = await backends.start("old"), await backends.start("new")
    (old.root / "where.txt").write_bytes(b"old host")
    (new.root / "where.txt").write_bytes(b"new host")
    service = edges_any_db.service
    await provision(service, old, host="host-old")
    await service.add_host("host-new", "127.0.0.1", ftp_port=new.port)
    edge = await edges_any_db.start()

    def read_where(ftp: ftplib.FTP) -> bytes:
        out = io.BytesIO()
        ftp.retrbinary("RETR where.txt", out.write)
        return out.getvalue()

    ftp = await run(lambda: connect(edge.port))
    assert await run(lambda: read_where(ftp)) == b"old host"
    moved_at = time.monotonic()
    await service.move_tenant("t1", "host-new", drain=1.5)
    # New logins follow the move as soon as the change feed has seen it (~0.2 s here).
    def fresh_login() -> bytes:
        fresh = connect(edge.port)
        where = read_where(fresh)
        fresh.quit()
        return where

    assert await eventually(lambda: run(fresh_login), lambda w: w == b"new host") == b"new host"
    # The old session keeps working until the drain deadline, then gets 421.
    answer = await run(lambda: ftp.getline())  # the unsolicited 421
    assert answer.startswith("421 ") and "moved" in answer
    assert time.monotonic() - moved_at >= 1.4
    assert edge.log.find("ftp session", result="drained")
    ftp.close()


async def test_host_maintenance_and_directory_down(edges: EdgeFactory, backends: Backends,
                                                   sqlite_url: str) -> None:
    backend = await backends.start()
    await provision(edges.service, backend)
    await edges.service.add_account("carol", "t1", upstream_username=BACKEND_USER)
    edge = await edges.start(serve=ServeConfig(maintenance_drain=1.5))
    ftp = await run(lambda: connect(edge.port))
    started = time.monotonic()
    await edges.service.set_host_state("host-a", "maintenance", "Disk upgrade until 18:00 UTC.")
    # Open sessions on the host keep working for [serve] maintenance_drain, then are told
    # (edge.sessionpolicy); new logins get the notice at once.
    await asyncio.sleep(0.6)  # the change feed (0.2 s) has seen it
    assert await run(ftp.pwd) == "/"
    assert await run(ftp.getline) == "421 Disk upgrade until 18:00 UTC."
    assert time.monotonic() - started >= 1.4
    ftp.close()

    def login() -> str:
        try:
            connect(edge.port).quit()
        except ftplib.error_temp as exc:
            return str(exc)
        return "logged in"

    notice = "421 Disk upgrade until 18:00 UTC."
    assert await eventually(lambda: run(login), lambda text: text == notice) == notice
    await edges.service.set_host_state("host-a", "active")

    # Directory unreachable: a user never looked up gets 421, not 530.
    store = store_for_url(sqlite_url)
    await store.open()
    down = await edges.start(store=store)
    await store.close()  # every query fails from now on

    def cold() -> tuple[bytes, bytes]:
        with raw(down.port) as c:
            c.reply()
            return c.cmd("USER carol"), c.file.read()

    answer, rest = await run(cold)
    assert answer == b"421 Service temporarily unavailable, try again later.\r\n" and rest == b""


async def test_backend_dies_mid_transfer(edges: EdgeFactory, backends: Backends,
                                         big_file: tuple[Path, str]) -> None:
    backend = await backends.start()
    await provision(edges.service, backend)
    edge = await edges.start()
    place(big_file[0], backend.root / "big.bin")
    started = asyncio.Event()
    loop = asyncio.get_running_loop()

    def session() -> tuple[str, int]:
        ftp = connect(edge.port)
        received = [0]

        def sink(chunk: bytes) -> None:
            received[0] += len(chunk)
            if received[0] > 1_000_000 and not started.is_set():
                loop.call_soon_threadsafe(started.set)
                time.sleep(0.5)  # let the backend die while data is still due

        try:
            ftp.retrbinary("RETR big.bin", sink)
        except (ftplib.error_temp, ftplib.error_perm) as exc:
            return str(exc), received[0]
        return "no error", received[0]

    task = asyncio.ensure_future(run(session))
    await asyncio.wait_for(started.wait(), 60)
    await backend.stop(signal.SIGKILL)
    message, received = await asyncio.wait_for(task, 60)
    assert message.startswith(("426", "451")) and received < BIG, message
    assert edge.log.find("ftp transfer", command="RETR", result="aborted")


async def test_abor_during_download(edges: EdgeFactory, backends: Backends,
                                    big_file: tuple[Path, str]) -> None:
    backend = await backends.start()
    await provision(edges.service, backend)
    edge = await edges.start()
    place(big_file[0], backend.root / "big.bin")

    def session() -> tuple[str, str]:
        ftp = connect(edge.port)
        conn = ftp.transfercmd("RETR big.bin")
        conn.recv(65536)
        ftp.putcmd("ABOR")
        conn.close()
        first = ftp.getline()
        second = ftp.getline()
        assert ftp.voidcmd("NOOP").startswith("200")  # the session is in step again
        ftp.quit()
        return first, second

    first, second = await run(session)
    assert first.startswith("426 ") and second[:3] in ("225", "226"), (first, second)


async def test_backend_idle_timeout_reaches_the_client(edges: EdgeFactory, backends: Backends) -> None:
    backend = await backends.start(extra=("--idle-timeout", "1"))
    await provision(edges.service, backend)
    edge = await edges.start()
    ftp = await run(lambda: connect(edge.port))
    # The backend's own 421 is passed on as it comes, not at the next command.
    line = await run(ftp.getline)
    assert line.startswith("421 ") and "timed out" in line.lower(), line
    with pytest.raises(EOFError):  # and the proxy closed the connection
        await run(ftp.getline)
    ftp.close()
    await wait_for(lambda: bool(edge.log.find("ftp session", result="backend_closed")))


def test_ftps_through_edge_serve_with_two_workers(tmp_path: Path, proxy_pem: Pem) -> None:
    """Registry, pre-forked uvloop workers, JSON access log and /metrics, for real."""
    from tests.test_serve import EdgeServe, http_get, metric_value
    from tests.test_serve import wait_for as wait_until

    root = tmp_path / "backend"
    root.mkdir()
    (root / "hello.txt").write_bytes(b"hello through edge serve")
    backend = subprocess.Popen([sys.executable, "-m", "ftpproxy.devserver", "--root", str(root),
                                "--user", f"{BACKEND_USER}:{PASSWORD}"], stdout=subprocess.PIPE)
    try:
        assert backend.stdout is not None
        backend_port = int(backend.stdout.readline().split()[1])
        db_url = f"sqlite:///{tmp_path / 'edge.sqlite3'}"

        async def provision_db() -> None:
            store = store_for_url(db_url)
            await store.open()
            try:
                await store.migrate()
                service = DirectoryService(store)
                await service.add_host("web1", "127.0.0.1", ftp_port=backend_port)
                await service.add_tenant("acme", "web1")
                await service.add_account(USER, "acme", upstream_username=BACKEND_USER)
            finally:
                await store.close()

        asyncio.run(provision_db())
        low, high = free_port_range()
        config = (f'[database]\nurl = "{db_url}"\n[admin]\nlisten = ["127.0.0.1:0"]\n'
                  f"[serve]\nworkers = 2\ngrace_period = 1.0\n"
                  f'[ftp]\nlisten = ["127.0.0.1:0"]\npassive_ports = [{low}, {high}]\n'
                  f'certificate_file = "{proxy_pem.cert}"\nkey_file = "{proxy_pem.key}"\n')
        serve = EdgeServe(tmp_path, config, env={"EDGE_PROXY_OVERRIDES": ""})
        try:
            serve.wait_line("admin")
            _, port = serve.wait_line("ftp")
            serve.wait_ready(30)
            for tls in (proxy_pem, None, proxy_pem):
                ftp = connect(port, tls=tls)
                out = io.BytesIO()
                ftp.retrbinary("RETR hello.txt", out.write)
                assert out.getvalue() == b"hello through edge serve"
                ftp.quit()

            def exported() -> str | None:
                status, text = http_get(serve.url("/metrics"))
                return text if status == 200 and "edge_ftp_logins_total" in text else None

            text = wait_until(exported, 20, "FTP metrics")
            assert metric_value(text, 'edge_ftp_logins_total{result="ok"}') == 3
            assert metric_value(text, 'edge_connections_total{proxy="ftp"}') == 3
            assert metric_value(text, 'edge_ftp_transfers_total{kind="download",result="ok"}') == 3
            sessions = wait_until(lambda: [r for r in serve.records() if r.get("msg") == "ftp session"]
                                  or None, 20, "session log lines")
            assert all(r["user"] == USER and r["host"] == "web1" for r in sessions)
            # SIGTERM: open sessions get a 421 once the grace period is over.
            idle = connect(port)
            assert serve.stop() == 0
            assert idle.getline().startswith("421 Service shutting down")
            idle.close()
        finally:
            serve.stop()
    finally:
        backend.kill()
        backend.wait()


@pytest.mark.parametrize(("section", "message"), [
    ({"require_tls": True}, "require_tls: needs certificate_file"),
    ({"key_file": "k.pem"}, "key_file: set certificate_file too"),
    ({"masquerade_address": "::1"}, "not an IPv4 address"),
    ({"transfer_timeout": 0}, "transfer_timeout: must be greater than 0"),
    ({"backend_reply_timeout": 0}, "backend_reply_timeout: must be greater than 0"),
    ({"passive_ports": [80, 90]}, "1024 <= LOW <= HIGH"),
])
def test_ftp_config_refuses_unsafe_settings(section: dict[str, Any], message: str) -> None:
    from edge.config import config_from_mapping
    from edge.errors import ConfigError

    with pytest.raises(ConfigError, match=re.escape(message)):
        config_from_mapping({"ftp": section})


def test_missing_certificate_file_is_a_clear_error(tmp_path: Path) -> None:
    from edge.errors import ConfigError
    from ftpproxy.tls import server_context

    with pytest.raises(ConfigError, match=r"\[ftp\] certificate_file/key_file: cannot load"):
        server_context(str(tmp_path / "missing.pem"))


async def test_ipv6_clients_use_epsv_and_eprt(edges: EdgeFactory, backends: Backends) -> None:
    backend = await backends.start()  # the backend stays IPv4
    await provision(edges.service, backend)
    edge = await edges.start(listen="::1")
    (backend.root / "six.txt").write_bytes(b"over IPv6" * 1000)

    def session() -> None:
        for passive in (True, False):  # ftplib sends EPSV / EPRT |2|::1|port| on IPv6
            ftp = connect(edge.port, host="::1", passive=passive)
            assert retr_hash(ftp, "six.txt")[1] == 9000
            with pytest.raises(ftplib.error_temp, match=r"^425 PASV needs IPv4"):
                ftp.sendcmd("PASV")
            ftp.quit()

    await run(session)


async def test_pasv_reply_carries_the_masquerade_address(edges: EdgeFactory, backends: Backends,
                                                         ) -> None:
    backend = await backends.start()
    await provision(edges.service, backend)
    edge = await edges.start(masquerade_address="198.51.100.10")

    def session() -> tuple[str, int]:
        ftp = connect(edge.port)
        host, port = ftplib.parse227(ftp.sendcmd("PASV"))
        ftp.quit()
        return host, port

    host, port = await run(session)
    low, high = edge.config.ftp.passive_ports
    assert host == "198.51.100.10" and low <= port <= high


async def test_many_small_transfers_through_a_small_passive_range(edges: EdgeFactory,
                                                                 backends: Backends) -> None:
    # Each used passive port keeps TIME_WAIT entries for a minute (the proxy closes data
    # connections first): a busy site fetching small files must not run out of ports.
    backend = await backends.start()
    await provision(edges.service, backend)
    low, high = free_port_range(4)
    edge = await edges.start(passive_ports=(low, high))
    (backend.root / "small.txt").write_bytes(b"small file\n")

    def session() -> None:
        ftp = connect(edge.port)
        for _ in range(24):
            assert retr_hash(ftp, "small.txt") == (hashlib.sha256(b"small file\n").hexdigest(), 11)
        ftp.quit()

    await run(session)


async def test_data_mode_commands_interleaved_with_others(edges: EdgeFactory,
                                                           backends: Backends) -> None:
    # The backend's PASV is sent when the client picks a data mode: every later command must
    # still get its own reply, in order, whatever comes between PASV and the transfer.
    backend = await backends.start()
    await provision(edges.service, backend)
    edge = await edges.start()
    (backend.root / "a.txt").write_bytes(b"interleaved\n" * 500)

    def session() -> None:
        ftp = connect(edge.port)
        assert ftp.sendcmd("PASV").startswith("227")  # never used
        host, port = ftplib.parse227(ftp.sendcmd("PASV"))
        assert ftp.sendcmd("NOOP").startswith("200")
        assert ftp.sendcmd("TYPE I").startswith("200")
        assert ftp.size("a.txt") == 6000
        assert ftp.pwd() == "/"
        data_sock = socket.create_connection((host, port), timeout=CLIENT_TIMEOUT)
        ftp.putcmd("RETR a.txt")
        assert ftp.getresp()[:1] == "1"
        data = b""
        while chunk := data_sock.recv(65536):
            data += chunk
        data_sock.close()
        assert ftp.getresp().startswith("226")
        assert data == b"interleaved\n" * 500
        # A data mode chosen and then dropped for a new login, and one left unused at QUIT.
        assert ftp.sendcmd("EPSV").startswith("229")
        ftp.login(USER, PASSWORD)
        assert retr_hash(ftp, "a.txt")[1] == 6000
        assert ftp.sendcmd("PASV").startswith("227")
        assert ftp.quit().startswith("221")

    await run(session)
    assert not edge.log.find("ftp session failed")


async def test_a_burst_of_connections_is_queued_not_dropped(edges: EdgeFactory,
                                                             backends: Backends) -> None:
    # 300 clients arriving while the proxy is busy must wait in the accept queue: with the
    # listen() default of 100 the kernel dropped the others' SYNs (each then waited 1 s).
    backend = await backends.start()
    await provision(edges.service, backend)
    edge = await edges.start(limits=LimitsConfig(max_connections_per_ip=1000,
                                                 max_unauthenticated_per_ip=1000))
    clients: list[socket.socket] = []
    try:
        # Connect while this loop cannot accept (the call blocks it): only the backlog counts.
        for _ in range(300):
            sock = socket.socket()
            sock.settimeout(0.5)  # a dropped SYN is retried after 1 s: this would time out
            sock.connect(("127.0.0.1", edge.port))
            clients.append(sock)
        for sock in clients:
            sock.settimeout(CLIENT_TIMEOUT)

        def greetings() -> None:
            for sock in clients:
                assert sock.recv(100).startswith(b"220 ")
        await run(greetings)
    finally:
        for sock in clients:
            sock.close()


# == hostile input and refused AUTH (issue 13) ==================================================


async def test_bare_lf_does_not_end_a_command(edges: EdgeFactory, backends: Backends) -> None:
    # pyftpdlib reached directly reads `PASS secret<LF>DELE hello.txt` as one (wrong) password;
    # the proxy once split it at the LF, logged in and deleted the file.
    backend = await backends.start()
    await provision(edges.service, backend)
    edge = await edges.start()
    (backend.root / "hello.txt").write_bytes(b"keep me")

    def session() -> list[bytes]:
        with raw(edge.port) as c:
            c.reply()
            user = c.cmd(f"USER {USER}")
            injected = c.cmd(f"PASS {PASSWORD}\nDELE hello.txt")
            return [user, injected, c.cmd("LIST"), c.cmd(f"PASS {PASSWORD}"), c.cmd("TYPE I"),
                    c.cmd("SIZE hello.txt")]

    user, injected, listing, login, _, size = await run(session)
    assert user.startswith(b"331 ")
    assert injected == b"500 Syntax error: bare LF in command line.\r\n"
    assert listing.startswith(b"530 ")  # not logged in by it
    assert login.startswith(b"230 ") and size == b"213 7\r\n"  # and the session goes on
    assert (backend.root / "hello.txt").read_bytes() == b"keep me"


async def test_refused_auth_tls_leaves_the_session_answering(edges: EdgeFactory,
                                                             backends: Backends) -> None:
    # No FTPS certificate: AUTH TLS is refused (502) and every later command is answered, sent
    # one by one or pipelined in one segment behind the AUTH (the reader paused after AUTH and
    # was never resumed: lftp's OPTS UTF8 ON and USER waited forever).
    backend = await backends.start()
    await provision(edges.service, backend)
    edge = await edges.start()

    def session() -> list[bytes]:
        with raw(edge.port) as c:
            c.reply()
            replies = [c.cmd("AUTH TLS"), c.cmd("OPTS UTF8 ON"), c.cmd("AUTH SSL")]
            c.send(f"AUTH TLS\r\nFEAT\r\nUSER {USER}\r\nPASS {PASSWORD}\r\nAUTH TLS\r\nPWD\r\n".encode())
            replies += [c.reply() for _ in range(6)]
            return replies

    replies = await run(session)
    assert [r[:3] for r in replies] == [b"502", b"200", b"502", b"502", b"211", b"331",
                                        b"230", b"502", b"257"], replies
    assert b"AUTH TLS" not in replies[4]  # FEAT does not offer what is refused


async def lftp(port: int, script: str, *settings: str) -> tuple[int, str, str]:
    """Stock lftp, bounded: one try, 20 s network timeout, killed after 90 s."""
    command = "; ".join(["set net:max-retries 1", "set net:timeout 20",
                         "set net:reconnect-interval-base 1", *settings, script, "quit"])
    process = await asyncio.create_subprocess_exec(
        "lftp", "-e", command, "-u", f"{USER},{PASSWORD}", f"ftp://127.0.0.1:{port}",
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env={**os.environ, "HOME": os.environ.get("HOME", "/tmp")})
    try:
        out, err = await asyncio.wait_for(process.communicate(), 90)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise AssertionError("lftp hung") from None
    assert process.returncode is not None
    return process.returncode, out.decode(errors="replace"), err.decode(errors="replace")


@pytest.mark.skipif(shutil.which("lftp") is None, reason="Debian package lftp (in .ci/run)")
async def test_lftp_with_and_without_ftps(edges: EdgeFactory, backends: Backends, proxy_pem: Pem,
                                          tmp_path: Path) -> None:
    backend = await backends.start()
    await provision(edges.service, backend)
    (backend.root / "listed.txt").write_bytes(b"lftp sees me")
    # No certificate: lftp tries AUTH TLS (ssl-allow), gets 502 and goes on in plain FTP.
    plain = await edges.start()
    started = time.monotonic()
    code, out, err = await lftp(plain.port, "ls; get listed.txt -o " + str(tmp_path / "got.txt"),
                                "set ftp:ssl-allow yes")
    assert code == 0 and "listed.txt" in out, (code, out, err)
    assert (tmp_path / "got.txt").read_bytes() == b"lftp sees me"
    assert time.monotonic() - started < 60
    # With a certificate lftp uses TLS, control and data (forced: no silent fallback).
    ftps = await edges.start(certificate_file=proxy_pem.cert, key_file=proxy_pem.key)
    code, out, err = await lftp(ftps.port, "ls", "set ftp:ssl-force yes",
                                "set ftp:ssl-protect-data yes", f"set ssl:ca-file {proxy_pem.cert}")
    assert code == 0 and "listed.txt" in out, (code, out, err)
    listings = ftps.log.find("ftp transfer", result="ok")
    assert listings and all(getattr(r, "client_tls", None) for r in listings)


async def test_backend_killed_mid_upload(edges: EdgeFactory, backends: Backends) -> None:
    # The backend process is SIGKILLed while the client is still sending: the client gets an
    # error reply on the control connection (never a 226 for the truncated file), not a hang.
    backend = await backends.start()
    await provision(edges.service, backend)
    edge = await edges.start()
    total, chunk = 32 << 20, os.urandom(1 << 16)
    half_sent = asyncio.Event()
    killed = asyncio.Event()
    loop = asyncio.get_running_loop()

    def session() -> tuple[str, int]:
        ftp = connect(edge.port)
        conn = ftp.transfercmd("STOR up.bin")
        sent = 0
        with contextlib.suppress(OSError):
            while sent < total:
                conn.sendall(chunk)
                sent += len(chunk)
                if sent == 4 << 20:
                    loop.call_soon_threadsafe(half_sent.set)
                    assert asyncio.run_coroutine_threadsafe(killed.wait(), loop).result(60)
        conn.close()
        return ftp.getline(), sent

    task = asyncio.ensure_future(run(session))
    await asyncio.wait_for(half_sent.wait(), 60)
    await backend.stop(signal.SIGKILL)
    killed.set()
    answer, _ = await asyncio.wait_for(task, 90)
    assert answer[:1] in ("4", "5"), answer
    assert (backend.root / "up.bin").stat().st_size < total
    assert edge.log.find("ftp transfer", command="STOR", result="aborted")


async def test_backend_that_never_greets_gives_421_in_bounded_time(edges: EdgeFactory) -> None:
    # A backend host that accepts TCP and never sends its 220: the login gets 421 once
    # backend_connect_timeout (connect and greeting) has passed, not a hang.
    silent = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    loop = asyncio.get_running_loop()
    accepting = loop.run_in_executor(None, lambda: accepted.append(silent.accept()[0]))
    await edges.service.add_host("host-a", "127.0.0.1", ftp_port=silent.getsockname()[1])
    await edges.service.add_tenant("t1", "host-a")
    await edges.service.add_account(USER, "t1", protocols=["ftp"], upstream_username=BACKEND_USER)
    edge = await edges.start(backend_connect_timeout=1.5)

    def login() -> tuple[bytes, bytes, float]:
        with raw(edge.port) as c:
            c.reply()
            user = c.cmd(f"USER {USER}")
            started = time.monotonic()
            return user, c.cmd(f"PASS {PASSWORD}"), time.monotonic() - started

    try:
        user, answer, waited = await run(login)
    finally:
        await asyncio.wait_for(accepting, 30)
        for sock in (*accepted, silent):
            sock.close()
    assert user.startswith(b"331 ")
    assert answer == b"421 Service not available, try again later.\r\n"
    assert waited < 15  # the configured 1.5 s (+ load), not the 30 s login grace time
    assert edge.log.find("ftp session", result="backend_unavailable")


class RecordingShim:
    """TCP shim between the proxy and a real backend that records what the proxy sends on
    control connections (data connections go straight to the backend's passive ports)."""

    def __init__(self, backend_port: int) -> None:
        self.backend_port = backend_port
        self.sent = bytearray()
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> RecordingShim:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.backend_port)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, record: bool) -> None:
            while data := await src.read(65536):
                if record:
                    self.sent += data
                dst.write(data)
                await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer, True), pipe(up_reader, writer, False),
                             return_exceptions=True)

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


@dataclass(frozen=True)
class Hostile:
    """One row: bytes sent in one segment → reply codes, and what must (not) reach the backend.

    ``then``: the code of a ``PWD`` sent afterwards (the session is still in step; ``None``: the
    connection must be closed). ``login``: log in first; ``early``: send before the greeting.
    """

    send: bytes
    replies: tuple[str, ...]
    never: tuple[bytes, ...] = ()
    gets: bytes = b""
    then: str | None = "257"
    login: bool = True
    early: bool = False


LOGIN = f"USER {USER}\r\n".encode()
HOSTILE: dict[str, Hostile] = {
    # CR/LF/NUL injection: a line ends at CRLF only; anything else inside it is a 500.
    "bare LF in PASS": Hostile(LOGIN + f"PASS {PASSWORD}\nDELE hello.txt\r\n".encode(),
                               ("331", "500"), never=(b"PASS", b"DELE"), then="530", login=False),
    "bare LF after login": Hostile(b"NOOP\nDELE hello.txt\r\n", ("500",), never=(b"DELE",)),
    "bare LF first": Hostile(b"\nDELE hello.txt\r\n", ("500",), never=(b"DELE",)),
    "stray CR": Hostile(b"NOOP\rDELE hello.txt\r\n", ("500",), never=(b"DELE",)),
    "CR eaten by IAC": Hostile(b"RNFR hello.txt\xff\r\nDELE hello.txt\r\n", ("500",),
                               never=(b"RNFR", b"DELE")),
    "LF inside RNTO": Hostile(b"RNFR hello.txt\r\nRNTO x\nDELE hello.txt\r\n", ("350", "500"),
                              never=(b"RNTO", b"DELE")),
    "NUL": Hostile(b"DELE hello.txt\x00.bak\r\n", ("500",), never=(b"DELE",)),
    "not UTF-8": Hostile(b"DELE hello\xc3(.txt\r\n", ("500",), never=(b"DELE",)),
    "IAC IAC is a literal 0xFF": Hostile(b"DELE hello\xff\xff.txt\r\n", ("500",), never=(b"DELE",)),
    "Telnet IP DM before ABOR": Hostile(b"\xff\xf4\xff\xf2ABOR\r\n", ("225",), gets=b"ABOR\r\n"),
    "Telnet WILL mid-verb": Hostile(b"NO\xff\xfb\x01OP\r\n", ("200",), gets=b"NOOP\r\n"),
    "empty line": Hostile(b"\r\n", ("500",)),
    "five-letter verb": Hostile(b"DELEX hello.txt\r\n", ("500",), never=(b"DELEX",)),
    # Over-long lines: refused whole, their tail never read as a command.
    "over-long": Hostile(b"DELE " + b"a" * 3000 + b"\r\nNOOP\r\n", ("500", "200"), never=(b"DELE",)),
    "over-long tail": Hostile(b"SITE " + b"x" * 5000 + b"DELE hello.txt\r\n", ("500",),
                              never=(b"SITE", b"DELE")),
    # PORT/EPRT: the backend never sees them (it is always used passively); no bounce.
    "PORT to port 21": Hostile(b"PORT 127,0,0,1,0,21\r\n", ("504",), never=(b"PORT",)),
    "PORT elsewhere": Hostile(b"PORT 10,0,0,1,195,80\r\n", ("200",), never=(b"PORT",)),
    "EPRT to port 25": Hostile(b"EPRT |1|127.0.0.1|25|\r\n", ("504",), never=(b"EPRT",)),
    "EPRT protocol 3": Hostile(b"EPRT |3|1.2.3.4|5000|\r\n", ("501",), never=(b"EPRT",)),
    "PORT short": Hostile(b"PORT 1,2,3,4,5\r\n", ("501",)),
    "PORT port 0": Hostile(b"PORT 1,2,3,4,0,0\r\n", ("501",)),
    "PORT byte 256": Hostile(b"PORT 1,2,3,4,256,1\r\n", ("501",)),
    "PORT after EPSV ALL": Hostile(b"EPSV ALL\r\nPORT 127,0,0,1,195,80\r\nPASV\r\n",
                                   ("200", "503", "503")),
    # PASV abuse: each answered in order, one listener at a time.
    "PASV x20": Hostile(b"PASV\r\n" * 20, ("227",) * 20),
    "EPSV protocol 3": Hostile(b"EPSV 3\r\n", ("522",)),
    "RETR without PASV": Hostile(b"RETR hello.txt\r\n", ("425",), never=(b"RETR",)),
    # REST / ABOR edge cases: the backend's answers, in step.
    "REST negative": Hostile(b"REST -1\r\n", ("501",)),
    "REST garbage": Hostile(b"REST abc\r\n", ("501",)),
    "ABOR without transfer": Hostile(b"ABOR\r\n", ("225",)),
    "ABOR before login": Hostile(b"ABOR\r\n", ("530",), never=(b"ABOR",), then="530", login=False),
    # SITE: passed on re-formatted; the backend decides.
    "SITE HELP": Hostile(b"SITE HELP\r\n", ("214",), gets=b"SITE HELP\r\n"),
    "SITE EXEC": Hostile(b"SITE EXEC id\r\n", ("500",), gets=b"SITE EXEC id\r\n"),
    # TLS verbs the proxy owns (no certificate here) and refused ones.
    "AUTH TLS after login": Hostile(b"AUTH TLS\r\nNOOP\r\n", ("502", "200"), never=(b"AUTH",)),
    "CCC REIN PBSZ PROT": Hostile(b"CCC\r\nREIN\r\nPBSZ 0\r\nPROT P\r\n", ("533", "502", "503", "503"),
                                  never=(b"CCC", b"REIN", b"PBSZ", b"PROT")),
    # Login sequencing.
    "after QUIT": Hostile(b"QUIT\r\nDELE hello.txt\r\n", ("221",), never=(b"DELE",), then=None),
    "QUIT before login": Hostile(b"QUIT\r\nUSER alice\r\n", ("221",), never=(b"USER",), then=None,
                                 login=False),
    "pipelined failed login": Hostile(LOGIN + b"PASS wrong\r\nDELE hello.txt\r\n", ("331", "530", "530"),
                                      never=(b"DELE",), then="530", login=False),
    "before the greeting": Hostile(LOGIN + f"PASS {PASSWORD}\r\nPWD\r\n".encode(),
                                   ("220", "331", "230", "257"), login=False, early=True),
    "PASV before login": Hostile(b"PASV\r\nPORT 127,0,0,1,195,80\r\n", ("530", "530"), then="530",
                                 login=False),
}


@pytest.mark.parametrize("name", list(HOSTILE))
async def test_hostile_input_catalogue(name: str, edges: EdgeFactory, backends: Backends) -> None:
    row = HOSTILE[name]
    backend = await backends.start()
    shim = await RecordingShim(backend.port).start()
    await edges.service.add_host("host-a", "127.0.0.1", ftp_port=shim.port)
    await edges.service.add_tenant("t1", "host-a")
    await edges.service.add_account(USER, "t1", protocols=["ftp"], upstream_username=BACKEND_USER)
    edge = await edges.start()
    (backend.root / "hello.txt").write_bytes(b"keep me")

    def session() -> tuple[list[bytes], bytes | None]:
        with raw(edge.port) as c:
            if row.early:
                c.send(row.send)
            else:
                c.reply()
                if row.login:
                    assert c.cmd(f"USER {USER}").startswith(b"331 ")
                    assert c.cmd(f"PASS {PASSWORD}").startswith(b"230 ")
                    shim.sent.clear()
                c.send(row.send)
            replies = [c.reply() for _ in row.replies]
            after = c.cmd("PWD") if row.then is not None else c.file.read()
            return replies, after

    try:
        replies, after = await run(session)
    finally:
        shim.close()
    assert [r[:3].decode() for r in replies] == list(row.replies), replies
    if row.then is None:
        assert after == b""
    else:
        assert after is not None and after[:3].decode() == row.then, after
    for forbidden in row.never:
        assert forbidden not in bytes(shim.sent), bytes(shim.sent)
    assert row.gets in bytes(shim.sent)
    assert (backend.root / "hello.txt").read_bytes() == b"keep me"


async def test_backend_reply_with_bare_lf_cannot_inject_a_reply(edges: EdgeFactory,
                                                                backends: Backends) -> None:
    # A greeting holding a bare LF (pyftpdlib sends its banner as given) was read as two
    # replies: the second, "230", taken for the answer to USER, logged the client in without
    # the backend ever seeing PASS. A line ends at CRLF only: the backend is refused (421).
    backend = await backends.start("x\n230 Login successful")
    await provision(edges.service, backend)
    edge = await edges.start()

    def login() -> tuple[bytes, bytes]:
        with raw(edge.port) as c:
            c.reply()
            return c.cmd(f"USER {USER}"), c.cmd("PASS wrong")

    user, answer = await run(login)
    assert user.startswith(b"331 ")
    assert answer == b"421 Service not available, try again later.\r\n"


async def test_backend_that_stops_answering_gives_421_in_bounded_time(edges: EdgeFactory,
                                                                      backends: Backends) -> None:
    # A backend frozen (SIGSTOP: its TCP stays up, nothing answers) after login: the next
    # command gets 421 after backend_reply_timeout, not a hang of a fixed minute.
    backend = await backends.start()
    await provision(edges.service, backend)
    edge = await edges.start(backend_reply_timeout=1.5)

    def frozen_command() -> tuple[bytes, bytes, float]:
        with raw(edge.port) as c:
            c.reply()
            c.cmd(f"USER {USER}")
            assert c.cmd(f"PASS {PASSWORD}").startswith(b"230 ")
            backend.process.send_signal(signal.SIGSTOP)
            started = time.monotonic()
            return c.cmd("PWD"), c.file.read(), time.monotonic() - started

    try:
        answer, rest, waited = await run(frozen_command)
    finally:
        backend.process.send_signal(signal.SIGCONT)
    assert answer == b"421 Backend connection lost, closing control connection.\r\n"
    assert rest == b"" and waited < 15
    assert edge.log.find("ftp session", result="backend_lost")


async def test_ftp_logs_in_with_the_accounts_ftp_upstream_username(
        edges: EdgeFactory, backends: Backends) -> None:
    """An account's backend name can differ per protocol: FTP uses ftp_upstream_username,
    not the SSH one nor the common default (issue 16: one --upstream-username for both)."""
    backend = await backends.start()
    await edges.service.add_host("host-a", "127.0.0.1", ftp_port=backend.port)
    await edges.service.add_tenant("t1", "host-a")
    await edges.service.add_account(USER, "t1", upstream_username="nobody",
                                    ssh_upstream_username="alice-ssh",
                                    ftp_upstream_username=BACKEND_USER)
    edge = await edges.start()
    (backend.root / "hello.txt").write_text("hi\n")

    def session() -> list[str]:
        ftp = connect(edge.port)
        names = ftp.nlst()
        ftp.quit()
        return names

    assert "hello.txt" in await run(session)
