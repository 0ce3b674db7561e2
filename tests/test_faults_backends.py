"""Backends that die or misbehave in the middle of a request: real processes SIGKILLed
mid-transfer (HTTP and SSH), listeners that never answer, answer half a head, or hang up.

What every test asserts is what the user notices: a truncated download is never presented
as complete (curl / scp / sftp / ssh exit non-zero, within a bounded time), an upload to a
dead backend never gets a 2xx, nothing truncated is served from the cache, and the edge goes
on serving the next request."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from edge.directory.service import DirectoryService
from tests.test_http_support import TIMEOUT, Edge, http_config, running, statuses
from tests.test_ssh_proxy import Edge as SshEdge
from tests.test_ssh_proxy import Sshd, _transport_opts

# The SSH proxy tests' fixtures: the edge over a directory, keys, a real sshd.
from tests.test_ssh_proxy import edge as edge
from tests.test_ssh_proxy import keys as keys
from tests.test_ssh_proxy import sshd as sshd
from tests.test_ssh_proxy import sshd_edge as sshd_edge


@pytest.fixture
def database_url(sqlite_url: str) -> str:
    """Backend faults do not depend on the store: SQLite only."""
    return sqlite_url


# -- HTTP: a backend process killed mid-transfer ----------------------------------------------

_BACKEND = r'''
import socket, sys, threading, time

def send_slowly(conn, data):
    # Small pieces with pauses, so the kill lands while bytes are still flowing.
    for i in range(0, len(data), 65536):
        conn.sendall(data[i:i + 65536])
        time.sleep(0.002)

def serve(conn):
    buf = b""
    while True:
        while b"\r\n\r\n" not in buf:
            data = conn.recv(512)
            if not data:
                return
            buf += data
        head, _, buf = buf.partition(b"\r\n\r\n")
        target = head.split(b" ")[1]
        kind, _, size = target.strip(b"/").partition(b"/")
        if kind == b"ok":
            for line in head.lower().split(b"\r\n"):
                if line.startswith(b"content-length:"):
                    length = int(line[15:])
                    while len(buf) < length:
                        buf += conn.recv(65536)
                    buf = buf[length:]
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\nrestart")
            continue
        if kind == b"cl":  # announces `size` bytes, sends a quarter, then stalls
            total = int(size)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % total)
            send_slowly(conn, b"c" * (total // 4))
        elif kind == b"chunked":  # chunked, a quarter of `size`, never the last chunk
            conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            piece = b"h" * 65536
            send_slowly(conn, (b"10000\r\n" + piece + b"\r\n") * (int(size) // 4 // 65536))
        elif kind == b"eof":  # ends at EOF: reads only the head, leaves the body unread
            conn.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + b"e" * 100000)
        elif kind == b"upload":  # reads the body slowly, never answers
            got = len(buf)
            while True:
                data = conn.recv(65536)
                if not data:
                    return
                got += len(data)
                if got >= int(size):
                    print("body", got, flush=True)
                time.sleep(0.01)
        print("sent", flush=True)
        time.sleep(3600)

sock = socket.socket()
sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
sock.bind(("127.0.0.1", int(sys.argv[1])))
sock.listen(16)
print(sock.getsockname()[1], flush=True)
while True:
    conn, _ = sock.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
'''


class BackendProcess:
    """A raw-socket HTTP backend in its own process (so it can really be SIGKILLed)."""

    def __init__(self, proc: asyncio.subprocess.Process, port: int) -> None:
        self.proc = proc
        self.port = port

    @classmethod
    async def start(cls, port: int = 0) -> BackendProcess:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _BACKEND, str(port), stdout=asyncio.subprocess.PIPE)
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), TIMEOUT)
        return cls(proc, int(line))

    async def said(self, word: bytes) -> None:
        """Wait until the backend printed ``word`` (it has sent / read what it was told to)."""
        assert self.proc.stdout is not None
        while True:
            line = await asyncio.wait_for(self.proc.stdout.readline(), TIMEOUT)
            assert line, "backend exited"
            if line.startswith(word):
                return

    async def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGKILL)
        await asyncio.wait_for(self.proc.wait(), TIMEOUT)


@contextlib.asynccontextmanager
async def killable_site(service: DirectoryService, edge: Edge) -> AsyncIterator[BackendProcess]:
    backend = await BackendProcess.start()
    try:
        await service.add_host("host-k", "127.0.0.1", http_port=backend.port)
        await service.add_tenant("tk", "host-k")
        await service.add_site("kill.test", "tk")
        await edge.sync()
        yield backend
    finally:
        await backend.kill()


async def _curl(edge: Edge, path: str, out: Path, *args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        "curl", "-sS", "--max-time", str(TIMEOUT), "-o", str(out), "-w", "%{http_code}",
        "-H", "Host: kill.test", *args, f"http://127.0.0.1:{edge.port}{path}",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)


async def _finish(proc: asyncio.subprocess.Process) -> tuple[int, str, str]:
    out, err = await asyncio.wait_for(proc.communicate(), TIMEOUT + 5)
    return proc.returncode or 0, out.decode(), err.decode(errors="replace")


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


async def _grows_to(path: Path, size: int) -> None:
    """Wait until curl wrote ``size`` bytes (it buffers its last writes: ask for less than
    was sent)."""
    for _ in range(int(TIMEOUT / 0.02)):
        if _size(path) >= size:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{path} never reached {size} bytes")


@pytest.mark.parametrize("framing", ["cl", "chunked"])
async def test_http_backend_killed_mid_download(service: DirectoryService, tmp_path: Path,
                                                framing: str) -> None:
    """curl sees the transfer fail (never a complete 200), the edge keeps serving, and the
    dead backend's connection is never taken from the pool again."""
    size = 16 << 20
    async with running(service.store, service) as (edge, (_a,)), \
            killable_site(service, edge) as backend:
        out = tmp_path / "body"
        curl = await _curl(edge, f"/{framing}/{size}", out)
        await backend.said(b"sent")
        await _grows_to(out, size // 8)
        await backend.kill()
        code, status, err = await _finish(curl)
        assert code != 0, err  # 18: transfer closed with outstanding read data remaining
        assert status == "200" and _size(out) < size
        # The edge is fine: another site's backend answers, and the killed backend's
        # connection is not reused (a new backend on its port gets a new connection).
        assert (await edge.curl(host="www.a.test")).status == 200
        assert edge.engine.pool.idle_count() <= 1
        connects = edge.engine.pool.connects
        again = await BackendProcess.start(backend.port)
        try:
            r = await edge.curl(host="kill.test", path="/ok")
            assert r.status == 200 and r.body == b"restart"
            assert edge.engine.pool.connects == connects + 1
        finally:
            await again.kill()


async def test_http_backend_killed_mid_chunked_body_never_gets_last_chunk(
        service: DirectoryService) -> None:
    """At the byte level: a chunked response cut by a dead backend never ends with the
    terminating 0-size chunk (which would make any client take it as complete)."""
    size = 8 << 20
    async with running(service.store, service) as (edge, _), \
            killable_site(service, edge) as backend:
        reader, writer = await asyncio.open_connection("127.0.0.1", edge.port)
        writer.write(b"GET /chunked/%d HTTP/1.1\r\nHost: kill.test\r\n\r\n" % size)
        await backend.said(b"sent")
        data = await asyncio.wait_for(reader.readexactly(size // 8), TIMEOUT)
        await backend.kill()
        with contextlib.suppress(ConnectionError):
            while chunk := await asyncio.wait_for(reader.read(1 << 20), TIMEOUT):
                data += chunk
        writer.close()
        assert statuses(data) == [200]
        assert not data.endswith(b"\r\n0\r\n\r\n")
        assert len(data) < size


async def test_http_close_delimited_response_cut_by_a_reset_is_not_complete(
        service: DirectoryService, tmp_path: Path) -> None:
    """A response that ends at EOF cannot be told from a crash when the backend closes
    normally; but a backend killed with unread request bytes resets the connection, and that
    is passed on as an abort, not as a clean end the client would take for the whole body."""
    body = tmp_path / "body"
    body.write_bytes(b"b" * (256 << 10))
    async with running(service.store, service) as (edge, _), \
            killable_site(service, edge) as backend:
        out = tmp_path / "answer"
        curl = await _curl(edge, "/eof/", out, "--data-binary", f"@{body}", "-H", "Expect:")
        await backend.said(b"sent")
        await _grows_to(out, 50000)
        await backend.kill()
        code, status, err = await _finish(curl)
        assert status == "200" and code != 0, err  # 56: connection reset
        assert (await edge.curl(host="www.a.test")).status == 200


async def test_http_backend_killed_mid_upload(service: DirectoryService, tmp_path: Path) -> None:
    """An upload streaming to a backend that dies: the client gets a 502 or a closed
    connection, never a 2xx."""
    size = 64 << 20
    upload = tmp_path / "upload"
    with upload.open("wb") as f:
        f.truncate(size)
    async with running(service.store, service) as (edge, (_a,)), \
            killable_site(service, edge) as backend:
        curl = await _curl(edge, f"/upload/{1 << 20}", tmp_path / "answer",
                           "--data-binary", f"@{upload}", "-H", "Expect:")
        await backend.said(b"body")
        await backend.kill()
        code, status, err = await _finish(curl)
        assert not status.startswith("2"), (code, status, err)
        assert status == "502" or code != 0
        assert (await edge.curl(host="www.a.test")).status == 200


async def test_http_backend_restarted_between_requests(service: DirectoryService) -> None:
    """A backend process killed while the edge holds an idle connection to it, then started
    again: the dead pooled connection is dropped when the backend's FIN arrives, so even a
    POST (never retried) reaches the new process instead of failing with 502."""
    async with running(service.store, service) as (edge, _), \
            killable_site(service, edge) as backend:
        r = await edge.curl(host="kill.test", path="/ok")
        assert r.status == 200 and edge.engine.pool.idle_count() == 1
        await backend.kill()
        again = await BackendProcess.start(backend.port)
        try:
            r = await edge.curl("--data-binary", "x=1", host="kill.test", path="/ok")
            assert r.status == 200 and r.body == b"restart"
        finally:
            await again.kill()


async def test_http_truncated_response_is_not_cached(service: DirectoryService,
                                                     tmp_path: Path) -> None:
    size = 4 << 20
    async with running(service.store, service,
                       http=http_config(backend_timeout=5.0)) as (edge, _), \
            killable_site(service, edge) as backend:
        await service.update_site("kill.test", cache_policy={"mode": "full", "ttl": {"200": 600}})
        await edge.sync()
        out = tmp_path / "body"
        curl = await _curl(edge, f"/cl/{size}", out)
        await backend.said(b"sent")
        waiter = await _curl(edge, f"/cl/{size}", tmp_path / "waiter")
        await _grows_to(out, size // 8)
        cache = edge.engine.cache
        assert cache is not None
        for _ in range(int(TIMEOUT / 0.02)):  # the waiter joined the fetch under way
            if any(flight.waiters for flight in cache._flights.values()):
                break
            await asyncio.sleep(0.02)
        else:
            raise AssertionError("the second request never joined the first one's fetch")
        await backend.kill()
        code, _status, err = await _finish(curl)
        assert code != 0, err
        assert list(cache.entries()) == []
        # A request that waited for that fetch (single flight) is not left hanging and does
        # not get the truncated body: it asks the backend itself. That is 502 (refused); 504
        # when its connect lands in the dying process's accept queue and no reset comes back
        # (seen about once in 10 runs: then backend_timeout applies).
        code, status, err = await _finish(waiter)
        assert status in ("502", "504"), (code, status, err)
        assert _size(tmp_path / "waiter") < 4096  # our error page, none of the 4 MiB body
        # The backend is gone: the next request is a 502, not the truncated body as a HIT.
        r = await edge.curl(host="kill.test", path=f"/cl/{size}", check=False)
        assert r.status == 502 and r.headers.get("x-cache") != "HIT"


# -- HTTP: backends that never answer, answer half a head, or hang up ---------------------------


class Listener:
    """A TCP listener that reads requests and then does ``script`` (in-process: nothing here
    needs a kill)."""

    def __init__(self, script: str) -> None:
        self.script = script
        self.accepted = 0
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self.writers.append(writer)
        if self.script == "close":
            writer.transport.abort()
            return
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            await reader.readuntil(b"\r\n\r\n")
            if self.script.startswith("half"):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Le")
                if self.script == "half-close":
                    await writer.drain()
                    writer.close()
                    return
            await reader.read()  # "silent": read on, never write

    def stop(self) -> None:
        for writer in self.writers:
            writer.transport.abort()
        if self.server is not None:
            self.server.close()


@pytest.mark.parametrize(("script", "status"), [
    ("silent", 504), ("half", 504), ("half-close", 502), ("close", 502)])
async def test_http_backend_that_never_answers_properly(service: DirectoryService, script: str,
                                                        status: int) -> None:
    """A listener that accepts and never writes, or writes half a head and stalls: 504 after
    ``backend_timeout``; half a head then hang-up, or hang-up at once: 502 at once."""
    listener = Listener(script)
    port = await listener.start()
    timeout = 1.0
    try:
        async with running(service.store, service,
                           http=http_config(backend_timeout=timeout)) as (edge, (_a,)):
            await service.add_host("host-l", "127.0.0.1", http_port=port)
            await service.add_tenant("tl", "host-l")
            await service.add_site("listen.test", "tl")
            await edge.sync()
            started = time.monotonic()
            r = await edge.curl(host="listen.test")
            took = time.monotonic() - started
            assert r.status == status
            assert b"HTTP/1.1 200" not in r.body and b"Content-Le" not in r.body
            if status == 504:
                assert took >= timeout * 0.9
            assert took < timeout + 10
            assert listener.accepted >= 1
            assert (await edge.curl(host="www.a.test")).status == 200
    finally:
        listener.stop()


async def test_http_backend_port_with_nothing_listening(service: DirectoryService) -> None:
    """Connection refused: 502 at once (not after backend_connect_timeout)."""
    sock = __import__("socket").socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]  # bound, never listening: connects are refused
    try:
        async with running(service.store, service,
                           http=http_config(backend_connect_timeout=20.0)) as (edge, _):
            await service.add_host("host-n", "127.0.0.1", http_port=port)
            await service.add_tenant("tn", "host-n")
            await service.add_site("nothing.test", "tn")
            await edge.sync()
            started = time.monotonic()
            r = await edge.curl(host="nothing.test")
            assert r.status == 502 and b"not reachable" in r.body
            assert time.monotonic() - started < 10
    finally:
        sock.close()


# -- SSH: the backend's sshd for a session SIGKILLed mid-transfer ------------------------------

SSH_SIZE = 50 << 20


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc), parents first."""
    found: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{parent}/task"):
                with open(f"/proc/{parent}/task/{task}/children") as file:
                    kids = [int(x) for x in file.read().split()]
                found += kids
                todo += kids
    return found


def _kill_sessions(sshd: Sshd) -> int:
    """SIGKILL the per-connection sshd processes (and what they run) under the listening
    sshd, as if the backend crashed for those sessions; the listener lives on."""
    victims = _descendants(sshd.process.pid)
    for pid in victims:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return len(victims)


async def _transfer_killed(sshd: Sshd, args: list[str], watch: Path | None,
                           stdout_bytes: int = 0) -> tuple[int, str, int]:
    """Run a client, kill the backend's session processes once ``watch`` holds some bytes
    (or the client printed ``stdout_bytes``); returns (exit status, stderr, bytes seen)."""
    proc = await asyncio.create_subprocess_exec(*args, stdin=asyncio.subprocess.DEVNULL,
                                                stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    seen = 0
    if watch is not None:
        await _grows_to(watch, 1 << 20)
    else:
        while seen < stdout_bytes:
            chunk = await asyncio.wait_for(proc.stdout.read(65536), TIMEOUT)
            assert chunk, "the command ended before the kill"
            seen += len(chunk)
    assert _kill_sessions(sshd) >= 1
    try:
        out, err = await asyncio.wait_for(proc.communicate(), TIMEOUT)
    except TimeoutError:
        proc.kill()
        raise AssertionError(f"{args[0]} hung after its backend was killed") from None
    seen += len(out)
    return proc.returncode or 0, err.decode(errors="replace"), seen


@pytest.fixture
def remote_file(sshd_edge: SshEdge, tmp_path: Path) -> Path:
    """50 MiB of random bytes on the backend (sshd runs here: its disk is tmp_path)."""
    path = tmp_path / "remote.bin"
    with path.open("wb") as file:
        for _ in range(SSH_SIZE >> 20):
            file.write(os.urandom(1 << 20))
    return path


# Both clients read at most 40 Mbit/s (-l, in Kbit/s): the 50 MiB would take ~10 s, so the
# kill (after the first MiB) lands mid-transfer even on a fast machine.
@pytest.mark.parametrize("client", ["scp", "sftp"])
async def test_ssh_backend_killed_mid_download(sshd_edge: SshEdge, sshd: Sshd, remote_file: Path,
                                               tmp_path: Path, client: str) -> None:
    edge = sshd_edge
    dest = tmp_path / "dest.bin"
    if client == "scp":
        args = ["scp", "-l", "40000", *_transport_opts(edge), f"alice@127.0.0.1:{remote_file}",
                str(dest)]
    else:
        batch = tmp_path / "batch"
        batch.write_text(f"get {remote_file} {dest}\n")
        args = ["sftp", "-l", "40000", *_transport_opts(edge), "-b", str(batch), "alice@127.0.0.1"]
    started = time.monotonic()
    code, err, _ = await _transfer_killed(sshd, args, dest)
    assert code != 0, err  # scp: 1; sftp: killed by SIGPIPE writing to its dead ssh
    assert "connection to the server lost" in err
    assert _size(dest) < SSH_SIZE
    assert time.monotonic() - started < TIMEOUT
    # The listening sshd lives on: the next transfer through the edge works.
    rc, out, err = await edge.ssh("alice", "echo", "alive")
    assert (rc, out) == (0, "alive\n"), err


async def test_ssh_backend_killed_mid_scp_upload(sshd_edge: SshEdge, sshd: Sshd,
                                                 tmp_path: Path) -> None:
    source = tmp_path / "up.bin"
    with source.open("wb") as file:
        for _ in range(SSH_SIZE >> 20):
            file.write(os.urandom(1 << 20))
    remote = tmp_path / "remote-up.bin"
    args = ["scp", "-l", "40000", *_transport_opts(sshd_edge), str(source),
            f"alice@127.0.0.1:{remote}"]
    code, err, _ = await _transfer_killed(sshd, args, remote)
    assert code != 0, err
    assert "connection to the server lost" in err
    assert _size(remote) < SSH_SIZE


async def test_ssh_backend_killed_mid_command_output(sshd_edge: SshEdge, sshd: Sshd) -> None:
    args = [*sshd_edge.ssh_args("alice", key=sshd_edge.user_key), "cat /dev/zero"]
    code, err, seen = await _transfer_killed(sshd, args, None, stdout_bytes=4 << 20)
    assert code == 255, err
    # On the channel ("edge: ...") or in the disconnect message, whichever comes first.
    assert "connection to the server lost" in err
    assert seen >= 4 << 20
