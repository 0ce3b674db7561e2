"""The SSH session bridge (sshproxy/bridge.py) with real clients against a real sshd.

The front is a minimal asyncssh server (no directory; it accepts any client key: routing and
authentication are sshproxy/server.py's, tested there) whose connections log in upstream as
root with a test key and bridge every channel through :class:`sshproxy.bridge.SessionLink`.
Upstream is a real OpenSSH ``sshd`` started by the test on a free port (and an asyncssh backend
where sshd refuses root sessions something); clients are the stock ``ssh``/``sftp``/``scp``/
``rsync``/``git`` and asyncssh.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncssh
import pytest

from sshproxy import tuning
from sshproxy.bridge import BridgeSettings, SessionLink, is_backend_loopback

SSHD = "/usr/sbin/sshd"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
# .ci/run installs OpenSSH: under CI a missing sshd fails the tests instead of skipping them.
pytestmark = pytest.mark.skipif(not (os.path.exists(SSHD) and shutil.which("ssh")) and not IN_CI,
                                reason="needs openssh-server and openssh-client")

TIMEOUT = 60.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, deadline: float) -> None:
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@dataclass
class Sshd:
    port: int
    dir: Path
    client_key: Path
    host_key_line: str
    process: subprocess.Popen[bytes]


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    """A real sshd on a free port accepting root with a test key (no PAM, its own host key)."""
    d = tmp_path_factory.mktemp("sshd")
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "host_key")], check=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "client_key")], check=True)
    (d / "authorized_keys").write_text((d / "client_key.pub").read_text())
    Path("/run/sshd").mkdir(exist_ok=True)  # privilege separation directory
    port = free_port()
    (d / "sshd_config").write_text(f"""\
Port {port}
ListenAddress 127.0.0.1
HostKey {d / 'host_key'}
PidFile {d / 'sshd.pid'}
UsePAM no
PermitRootLogin prohibit-password
AuthorizedKeysFile {d / 'authorized_keys'}
StrictModes no
PasswordAuthentication no
KbdInteractiveAuthentication no
AcceptEnv LANG LC_* EDGE_CLIENT_ADDR SECRET_TOKEN
AllowTcpForwarding yes
GatewayPorts no
Subsystem sftp internal-sftp
MaxSessions 50
MaxStartups 100
LogLevel ERROR
""")
    process = subprocess.Popen([SSHD, "-D", "-e", "-f", str(d / "sshd_config")])
    try:
        wait_port(port, time.monotonic() + 20)
        host_key = (d / "host_key.pub").read_text().split()
        yield Sshd(port, d, d / "client_key", f"{host_key[0]} {host_key[1]}", process)
    finally:
        process.terminate()
        process.wait(10)


@dataclass
class Front:
    """The test front server and what it saw."""

    port: int
    known_hosts: Path
    client_key: Path
    links: list[SessionLink] = field(default_factory=list)
    settings: BridgeSettings = field(default_factory=BridgeSettings)
    upstream_conns: list[asyncssh.SSHClientConnection] = field(default_factory=list)


class FrontServer(asyncssh.SSHServer):
    """Accepts any client key, logs in upstream as root with the test key, bridges through a SessionLink.

    Like a real front, it starts the upstream login as soon as the username is known and lets the
    client's own authentication finish only when the upstream login has succeeded, so the two
    handshakes overlap instead of adding up.
    """

    def __init__(self, front: Front, sshd: Sshd) -> None:
        self._front = front
        self._sshd = sshd
        self._conn: asyncssh.SSHServerConnection | None = None
        self._link: SessionLink | None = None
        self._upstream: asyncio.Task[asyncssh.SSHClientConnection] | None = None

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self._conn = conn
        tuning.drop_redundant_ignore_packets(conn)

    def begin_auth(self, username: str) -> bool:
        self._upstream = asyncio.get_running_loop().create_task(self._connect_upstream())
        return True

    async def _connect_upstream(self) -> asyncssh.SSHClientConnection:
        return await asyncssh.connect(
            "127.0.0.1", self._sshd.port, username="root", client_keys=[str(self._sshd.client_key)],
            known_hosts=None, config=None, agent_path=None, **tuning.CLIENT_OPTIONS)

    def public_key_auth_supported(self) -> bool:
        return True

    async def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:  # type: ignore[override]
        assert self._conn is not None and self._upstream is not None
        upstream = await self._upstream
        if self._link is None:
            peer = self._conn.get_extra_info("peername")
            self._link = SessionLink(upstream, client_address=f"{peer[0]} {peer[1]}",
                                     settings=self._front.settings, downstream=self._conn)
            self._front.links.append(self._link)
        return True  # any key: this harness tests the bridge, sshproxy/server.py does authentication

    def session_requested(self) -> asyncssh.SSHServerSession[bytes]:  # type: ignore[override]
        assert self._link is not None
        return self._link.session_requested()

    def connection_requested(self, dest_host: str, dest_port: int, orig_host: str,
                             orig_port: int):  # type: ignore[no-untyped-def]
        assert self._link is not None
        return self._link.connection_requested(dest_host, dest_port, orig_host, orig_port)

    def server_requested(self, listen_host: str, listen_port: int):  # type: ignore[no-untyped-def]
        assert self._link is not None
        return self._link.server_requested(listen_host, listen_port)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._link is not None:
            self._link.close("client disconnected")
        elif self._upstream is not None:
            self._upstream.cancel()


async def start_front(sshd: Sshd, tmp_path: Path, settings: BridgeSettings,
                      **listen_options: Any) -> tuple[Front, asyncssh.SSHAcceptor]:
    """The test front on a free port; ``listen_options`` go to ``asyncssh.listen`` (e.g. rekey_bytes)."""
    host_key = asyncssh.generate_private_key("ssh-ed25519")
    known_hosts = tmp_path / "known_hosts"
    front = Front(0, known_hosts, sshd.client_key, settings=settings)
    acceptor = await asyncssh.listen(
        "127.0.0.1", 0, server_factory=lambda: FrontServer(front, sshd), server_host_keys=[host_key],
        config=None, **settings.server_options(), **listen_options)
    front.port = acceptor.get_port()
    known_hosts.write_text(f"[127.0.0.1]:{front.port} {host_key.export_public_key().decode().strip()}\n")
    return front, acceptor


@contextlib.asynccontextmanager
async def running_front(sshd: Sshd, tmp_path: Path, settings: BridgeSettings,
                        **listen_options: Any) -> AsyncIterator[Front]:
    """:func:`start_front`, closed with its links at the end."""
    front, acceptor = await start_front(sshd, tmp_path, settings, **listen_options)
    try:
        yield front
    finally:
        acceptor.close()
        for link in front.links:
            link.close("test over")
        await acceptor.wait_closed()


@pytest.fixture
async def front(sshd: Sshd, tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Front]:
    settings = getattr(request, "param", BridgeSettings(allow_local_forwarding=True,
                                                        allow_remote_forwarding=True))
    async with running_front(sshd, tmp_path, settings) as front:
        yield front


def ssh_base(port: int, known_hosts: Path, key: Path, *extra: str) -> list[str]:
    return ["-F", "/dev/null", "-o", "BatchMode=yes", "-o", f"UserKnownHostsFile={known_hosts}",
            "-o", "StrictHostKeyChecking=yes", "-o", "IdentitiesOnly=yes",
            *(["-o", "LogLevel=ERROR"] if "-v" not in extra else []),
            "-i", str(key), *extra]


def ssh_args(front: Front, command: str | None, *options: str) -> list[str]:
    """``ssh`` through the front running ``command`` (None: no command), ``options`` before the host."""
    return ["ssh", *ssh_base(front.port, front.known_hosts, front.client_key, *options),
            "-p", str(front.port), "root@127.0.0.1", *([command] if command is not None else [])]


def direct_ssh_args(sshd: Sshd, tmp_path: Path, command: str, *options: str) -> list[str]:
    known = tmp_path / "direct_known_hosts"
    known.write_text(f"[127.0.0.1]:{sshd.port} {sshd.host_key_line}\n")
    return ["ssh", *ssh_base(sshd.port, known, sshd.client_key, *options), "-p", str(sshd.port),
            "root@127.0.0.1", command]


@dataclass
class Result:
    returncode: int
    stdout: bytes
    stderr: bytes


async def run(args: list[str], stdin: bytes | None = None, limit: float = TIMEOUT,
              env: dict[str, str] | None = None) -> Result:
    """Run a client without blocking the loop the front server lives in."""
    proc = await asyncio.create_subprocess_exec(
        *args, stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        out, err = await asyncio.wait_for(proc.communicate(stdin), limit)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"{args[0]} did not finish within {limit}s: {args}") from None
    assert proc.returncode is not None
    return Result(proc.returncode, out, err)


async def connect_client(front: Front, **kwargs: object) -> asyncssh.SSHClientConnection:
    options: dict[str, object] = {"known_hosts": str(front.known_hosts), "config": None,
                                  "client_keys": [str(front.client_key)], "agent_path": None, **kwargs}
    return await asyncssh.connect("127.0.0.1", front.port, username="root", **options)  # type: ignore[arg-type]


async def both_ways_with_checksums(conn: asyncssh.SSHClientConnection, data: bytes) -> None:
    """``data`` up to the backend's sha256sum, as many random bytes down; both checksums match."""
    up = await asyncio.wait_for(conn.run("sha256sum", input=data, encoding=None), TIMEOUT)
    assert up.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()
    down = await asyncio.wait_for(conn.run(
        f'f=$(mktemp) && head -c {len(data)} /dev/urandom > "$f" && sha256sum < "$f" >&2 && cat "$f"; '
        'rm -f "$f"', encoding=None), TIMEOUT)
    assert down.exit_status == 0 and len(down.stdout) == len(data)
    assert hashlib.sha256(down.stdout).hexdigest() == down.stderr.split()[0].decode()


# -- exec, exit status, streams ------------------------------------------------------------------


async def test_exit_status_propagates(front: Front) -> None:
    result = await run(ssh_args(front, "exit 7"))
    assert result.returncode == 7, result.stderr
    assert front.links[0].stats.exit_status == 7


async def test_stdin_to_eof_stdout_and_stderr_kept_apart(front: Front) -> None:
    data = os.urandom(300_000)
    result = await run(ssh_args(front, "cat; echo to-stderr >&2; exit 3"), stdin=data)
    assert result.returncode == 3
    assert result.stdout == data  # cat only finishes (and so exits 3) after the client's EOF went through
    assert result.stderr == b"to-stderr\n"
    stats = front.links[0].stats
    assert stats.bytes_up == len(data)
    assert stats.bytes_down == len(data) + len(b"to-stderr\n")


async def test_exit_signal_reported_like_direct(front: Front, sshd: Sshd, tmp_path: Path) -> None:
    command = "kill -USR1 $$"
    through = await run(ssh_args(front, command))
    direct = await run(direct_ssh_args(sshd, tmp_path, command))
    assert direct.returncode == 255
    assert (through.returncode, through.stderr) == (direct.returncode, direct.stderr)
    assert front.links[0].stats.exit_signal == "USR1"


async def test_output_after_client_eof_still_arrives(front: Front) -> None:
    result = await run(ssh_args(front, "cat >/dev/null; sleep 0.2; echo late"), stdin=b"x")
    assert (result.returncode, result.stdout) == (0, b"late\n")


async def test_upstream_refusing_a_subsystem_fails_the_client(front: Front) -> None:
    result = await run(ssh_args(front, "no-such-subsystem", "-s"))
    assert result.returncode == 255
    assert b"edge: the server refused the session" in result.stderr


class OpenBackend(asyncssh.SSHServer):
    def begin_auth(self, username: str) -> bool:
        return False  # no authentication: a test backend on loopback


async def backend_process(process: asyncssh.SSHServerProcess[str]) -> None:
    """The asyncssh backend's command: reports signals and breaks, exits 3 on TERM."""
    process.stdout.write("ready\n")
    while True:
        try:
            await process.stdin.readline()
            if process.stdin.at_eof():
                process.exit(0)
                return
        except asyncssh.BreakReceived as exc:
            process.stdout.write(f"break {exc.msec}\n")
        except asyncssh.SignalReceived as exc:
            process.stdout.write(f"signal {exc.signal}\n")
            if exc.signal == "TERM":
                process.exit(3)
                return


@pytest.fixture
async def asyncssh_front(tmp_path: Path, sshd: Sshd) -> AsyncIterator[Front]:
    """The front bridging to an asyncssh backend (sshd refuses signal requests for root sessions)."""
    backend = await asyncssh.listen(
        "127.0.0.1", 0, server_host_keys=[asyncssh.generate_private_key("ssh-ed25519")],
        server_factory=OpenBackend, process_factory=backend_process, config=None, line_editor=False)
    fake = Sshd(backend.get_port(), tmp_path, sshd.client_key, "", sshd.process)
    front, acceptor = await start_front(fake, tmp_path, BridgeSettings())
    try:
        yield front
    finally:
        acceptor.close()
        for link in front.links:
            link.close("test over")
        backend.close()


async def test_signal_and_break_reach_the_upstream(asyncssh_front: Front) -> None:
    async with await connect_client(asyncssh_front) as conn:
        process = await conn.create_process(encoding="utf-8")
        assert await asyncio.wait_for(process.stdout.readline(), TIMEOUT) == "ready\n"
        process.send_break(250)
        assert await asyncio.wait_for(process.stdout.readline(), TIMEOUT) == "break 250\n"
        process.send_signal("USR1")
        assert await asyncio.wait_for(process.stdout.readline(), TIMEOUT) == "signal USR1\n"
        process.send_signal("TERM")
        assert await asyncio.wait_for(process.stdout.readline(), TIMEOUT) == "signal TERM\n"
        result = await asyncio.wait_for(process.wait(), TIMEOUT)
    assert result.exit_status == 3


# -- PTY, window change, env ---------------------------------------------------------------------


async def test_pty_type_size_modes_and_window_change(front: Front) -> None:
    async with await connect_client(front) as conn:
        process = await conn.create_process(
            term_type="xterm-edge", term_size=(101, 37), term_modes={asyncssh.PTY_ECHO: 0},
            encoding="utf-8")
        process.stdin.write("echo TERM=$TERM; stty size; stty -a | grep -o -- '-echo ' | head -1\n")
        seen = ""
        while "-echo" not in seen:
            seen += await asyncio.wait_for(process.stdout.read(4096), TIMEOUT)
        assert "TERM=xterm-edge" in seen
        assert "37 101" in seen
        process.change_terminal_size(120, 50)
        process.stdin.write("stty size; exit 5\n")
        rest = await asyncio.wait_for(process.stdout.read(), TIMEOUT)
        assert "50 120" in rest
        result = await asyncio.wait_for(process.wait(), TIMEOUT)
        assert result.exit_status == 5


async def test_stock_ssh_pty_session(front: Front) -> None:
    result = await run(ssh_args(front, "tty; exit 4", "-tt"))
    assert result.returncode == 4
    assert b"/dev/pts/" in result.stdout


async def test_env_allow_list_and_client_address(front: Front) -> None:
    async with await connect_client(front) as conn:
        local_port = conn.get_extra_info("sockname")[1]
        env = {"LANG": "C.UTF-8", "LC_EDGE": "kept", "SECRET_TOKEN": "leak", "EDGE_CLIENT_ADDR": "spoofed"}
        result = await asyncio.wait_for(conn.run("env", env=env), TIMEOUT)
    lines = set(str(result.stdout).splitlines())
    assert {"LANG=C.UTF-8", "LC_EDGE=kept"} <= lines
    assert not any(line.startswith("SECRET_TOKEN=") for line in lines)
    assert f"EDGE_CLIENT_ADDR=127.0.0.1 {local_port}" in lines


# -- several channels ------------------------------------------------------------------------------


async def test_parallel_channels_on_one_connection(front: Front) -> None:
    async with await connect_client(front) as conn:
        results = await asyncio.wait_for(asyncio.gather(
            *(conn.run(f"head -c {n * 100_000} /dev/zero | wc -c; exit {n}") for n in range(1, 9))),
            TIMEOUT)
    assert [r.exit_status for r in results] == list(range(1, 9))
    assert [int(str(r.stdout)) for r in results] == [n * 100_000 for n in range(1, 9)]
    assert len(front.links) == 1 and front.links[0].stats.channels_opened == 8


async def test_ssh_multiplexed_sessions(front: Front, tmp_path: Path) -> None:
    control = tmp_path / "cm"
    master = ssh_args(front, None, "-o", "ControlMaster=yes", "-o", f"ControlPath={control}", "-N", "-f")
    assert (await run(master)).returncode == 0
    try:
        results = await asyncio.gather(*(run(ssh_args(front, f"exit {n}", "-o", f"ControlPath={control}"))
                                         for n in range(3)))
        assert [r.returncode for r in results] == [0, 1, 2], [r.stderr for r in results]
        assert len(front.links) == 1 and front.links[0].stats.channels_opened == 3
    finally:
        await run(ssh_args(front, None, "-o", f"ControlPath={control}", "-O", "exit"))


# -- file transfer with stock tools ------------------------------------------------------------------


def digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


@pytest.mark.slow
async def test_sftp_put_get_100mb(front: Front, tmp_path: Path) -> None:
    source = tmp_path / "source.bin"
    with source.open("wb") as f:
        for _ in range(100):
            f.write(os.urandom(1_000_000))
    remote = tmp_path / "remote.bin"  # the backend is this machine: same path space
    back = tmp_path / "back.bin"
    batch = tmp_path / "batch"
    batch.write_text(f"put {source} {remote}\nget {remote} {back}\n")
    sftp = ["sftp", *ssh_base(front.port, front.known_hosts, front.client_key), "-P", str(front.port),
            "-b", str(batch), "root@127.0.0.1"]
    result = await run(sftp, limit=180)
    assert result.returncode == 0, result.stderr
    assert digest(remote) == digest(source) == digest(back)


async def test_scp_both_ways(front: Front, tmp_path: Path) -> None:
    source = tmp_path / "a.bin"
    source.write_bytes(os.urandom(3_000_000))
    base = ["scp", *ssh_base(front.port, front.known_hosts, front.client_key), "-P", str(front.port)]
    for legacy in ([], ["-O"]):  # scp over sftp (default since OpenSSH 9) and the old scp protocol
        remote = tmp_path / f"remote{len(legacy)}.bin"
        back = tmp_path / f"back{len(legacy)}.bin"
        up = await run([*base, *legacy, str(source), f"root@127.0.0.1:{remote}"])
        assert up.returncode == 0, up.stderr
        down = await run([*base, *legacy, f"root@127.0.0.1:{remote}", str(back)])
        assert down.returncode == 0, down.stderr
        assert back.read_bytes() == source.read_bytes()


@pytest.mark.skipif(not shutil.which("rsync"), reason="needs rsync")
async def test_rsync(front: Front, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "one.txt").write_text("one\n")
    (src / "sub" / "two.bin").write_bytes(os.urandom(500_000))
    dest = tmp_path / "dest"
    shell = " ".join(["ssh", *ssh_base(front.port, front.known_hosts, front.client_key),
                      "-p", str(front.port)])
    result = await run(["rsync", "-a", "-e", shell, f"{src}/", f"root@127.0.0.1:{dest}/"])
    assert result.returncode == 0, result.stderr
    assert (dest / "one.txt").read_text() == "one\n"
    assert (dest / "sub" / "two.bin").read_bytes() == (src / "sub" / "two.bin").read_bytes()


@pytest.mark.skipif(not shutil.which("git"), reason="needs git")
async def test_git_clone_and_push_over_ssh(front: Front, tmp_path: Path) -> None:
    bare = tmp_path / "repo.git"
    assert (await run(["git", "init", "-q", "--bare", str(bare)])).returncode == 0
    work = tmp_path / "work"
    git_ssh = " ".join(["ssh", *ssh_base(front.port, front.known_hosts, front.client_key)])
    env = {**os.environ, "GIT_SSH_COMMAND": git_ssh, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    url = f"ssh://root@127.0.0.1:{front.port}{bare}"
    assert (await run(["git", "clone", "-q", url, str(work)], env=env)).returncode == 0
    (work / "file.txt").write_text("through the bridge\n")
    for args in (["add", "file.txt"], ["commit", "-q", "-m", "one"], ["push", "-q", "origin", "HEAD:main"]):
        result = await run(["git", "-C", str(work), *args], env=env)
        assert result.returncode == 0, result.stderr
    clone2 = tmp_path / "clone2"
    assert (await run(["git", "clone", "-q", "-b", "main", url, str(clone2)], env=env)).returncode == 0
    assert (clone2 / "file.txt").read_text() == "through the bridge\n"


# -- forwarding ------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def echo_server() -> AsyncIterator[int]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(b"echo:" + data)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


async def test_local_forwarding_to_backend_loopback(front: Front) -> None:
    async with echo_server() as port, await connect_client(front) as conn:
        reader, writer = await conn.open_connection("127.0.0.1", port)
        writer.write(b"hello")
        assert await asyncio.wait_for(reader.readexactly(10), TIMEOUT) == b"echo:hello"
        writer.write_eof()  # the echo server closes after our EOF: both halves propagate
        assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""
        writer.close()
    stats = front.links[0].stats
    assert (stats.bytes_up, stats.bytes_down, stats.channels_opened) == (5, 10, 1)


async def test_local_forwarding_to_closed_port_reports_upstream_refusal(front: Front) -> None:
    async with await connect_client(front) as conn:
        with pytest.raises(asyncssh.ChannelOpenError) as info:
            await conn.open_connection("127.0.0.1", free_port())
    assert info.value.code == asyncssh.OPEN_CONNECT_FAILED
    assert "refused" in info.value.reason.lower()


async def test_local_forwarding_with_stock_ssh(front: Front) -> None:
    local = free_port()
    async with echo_server() as port:
        proc = await asyncio.create_subprocess_exec(
            *ssh_args(front, None, "-N", "-o", "ExitOnForwardFailure=yes", "-L", f"{local}:127.0.0.1:{port}"),
            stdin=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + TIMEOUT
            while True:
                try:
                    reader, writer = await asyncio.open_connection("127.0.0.1", local)
                    break
                except OSError:
                    assert time.monotonic() < deadline and proc.returncode is None
                    await asyncio.sleep(0.1)
            writer.write(b"ping")
            assert await asyncio.wait_for(reader.readexactly(9), TIMEOUT) == b"echo:ping"
            writer.close()
        finally:
            proc.terminate()
            await proc.wait()


async def test_local_forwarding_refused_off_loopback(front: Front) -> None:
    async with await connect_client(front) as conn:
        with pytest.raises(asyncssh.ChannelOpenError) as info:
            await conn.open_connection("192.0.2.1", 80)
    assert info.value.code == asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED
    assert "only to localhost" in info.value.reason


@pytest.mark.parametrize("front", [BridgeSettings()], indirect=True)
async def test_forwarding_refused_by_default(front: Front) -> None:
    async with echo_server() as port, await connect_client(front) as conn:
        with pytest.raises(asyncssh.ChannelOpenError) as info:
            await conn.open_connection("127.0.0.1", port)
        assert "disabled" in info.value.reason
        with pytest.raises(asyncssh.ChannelListenError):
            await conn.forward_remote_port("127.0.0.1", 0, "127.0.0.1", port)


async def test_remote_forwarding_when_allowed(front: Front) -> None:
    async with echo_server() as port, await connect_client(front) as conn:
        listener = await conn.forward_remote_port("127.0.0.1", 0, "127.0.0.1", port)
        remote_port = listener.get_port()  # a port the *backend* listens on
        assert remote_port
        reader, writer = await asyncio.open_connection("127.0.0.1", remote_port)
        writer.write(b"back")
        assert await asyncio.wait_for(reader.readexactly(9), TIMEOUT) == b"echo:back"
        writer.close()
        listener.close()


def test_backend_loopback_names() -> None:
    assert is_backend_loopback("127.0.0.1") and is_backend_loopback("127.1.2.3")
    assert is_backend_loopback("::1") and is_backend_loopback("[::1]") and is_backend_loopback("LocalHost")
    assert not is_backend_loopback("10.0.0.1") and not is_backend_loopback("example.com")
    assert not is_backend_loopback("localhost.example.com")


# -- failure and close ---------------------------------------------------------------------------------


async def test_upstream_killed_mid_session_ends_client_with_error(front: Front) -> None:
    proc = await asyncio.create_subprocess_exec(
        *ssh_args(front, "echo $PPID; exec sleep 600"), stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    line = await asyncio.wait_for(proc.stdout.readline(), TIMEOUT)
    os.kill(int(line), 9)  # the sshd process serving this session upstream
    await asyncio.wait_for(proc.wait(), TIMEOUT)
    assert proc.returncode == 255
    assert b"edge: connection to the server lost" in await proc.stderr.read()


async def test_client_disconnect_ends_the_upstream_session(front: Front) -> None:
    """The client vanishing closes the upstream channel: sshd hangs up the PTY session, as direct.

    (Without a PTY sshd only closes the command's pipes, direct or not: a ``sleep`` that never
    writes outlives any client.)"""
    marker = f"{os.getpid()}{time.monotonic_ns() % 100000}"
    pattern = f"sleep 6{marker}"
    proc = await asyncio.create_subprocess_exec(
        *ssh_args(front, f"echo ready; exec sleep 6{marker}", "-tt"), stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    assert await asyncio.wait_for(proc.stdout.readline(), TIMEOUT) == b"ready\r\n"  # PTY line ending
    assert (await run(["pgrep", "-f", pattern])).returncode == 0  # the command runs upstream
    proc.kill()  # the client vanishes without a goodbye
    await proc.wait()
    deadline = time.monotonic() + TIMEOUT
    while (await run(["pgrep", "-f", pattern])).returncode == 0:
        assert time.monotonic() < deadline, "the upstream command outlived its client"
        await asyncio.sleep(0.1)


async def test_link_close_tells_the_client_why(front: Front) -> None:
    proc = await asyncio.create_subprocess_exec(
        *ssh_args(front, "echo ready; exec sleep 600"), stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    assert await asyncio.wait_for(proc.stdout.readline(), TIMEOUT) == b"ready\n"
    front.links[0].close("your account moved to another server, please reconnect")
    await asyncio.wait_for(proc.wait(), TIMEOUT)
    assert proc.returncode == 255
    assert b"edge: your account moved to another server" in await proc.stderr.read()
    await asyncio.wait_for(front.links[0].wait_closed(), TIMEOUT)


def test_settings_env_patterns() -> None:
    settings = BridgeSettings(env_allow=("LANG", "LC_*", "GIT_PROTOCOL"))
    assert settings.env_allowed("LC_ALL") and settings.env_allowed("GIT_PROTOCOL")
    assert not settings.env_allowed("LD_PRELOAD") and not settings.env_allowed("LANGUAGE")
    assert not settings.env_allowed("EDGE_CLIENT_ADDR")


# -- flow control and memory ---------------------------------------------------------------------------


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextlib.asynccontextmanager
async def peak_rss() -> AsyncIterator[list[int]]:
    """Samples this process's RSS (the front runs in it) while the block runs; yields [baseline, peak]."""
    sample = [rss_bytes(), rss_bytes()]
    stop = asyncio.Event()

    async def sampler() -> None:
        while not stop.is_set():
            sample[1] = max(sample[1], rss_bytes())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.02)

    task = asyncio.create_task(sampler())
    try:
        yield sample
    finally:
        stop.set()
        await task


@pytest.mark.slow
async def test_memory_bounded_during_large_transfer(front: Front) -> None:
    size = 256 * 1024 * 1024
    async with peak_rss() as rss:
        up = await run(["bash", "-c", f"head -c {size} /dev/zero | " +
                        " ".join(f"'{a}'" for a in ssh_args(front, "wc -c"))], limit=300)
        down_ssh = " ".join(f"'{a}'" for a in ssh_args(front, f"head -c {size} /dev/zero"))
        down = await run(["bash", "-c", down_ssh + " | wc -c"], limit=300)
    assert (up.returncode, int(up.stdout)) == (0, size)
    assert (down.returncode, int(down.stdout)) == (0, size)
    growth = rss[1] - rss[0]
    assert growth < 64 * 1024 * 1024, f"front RSS grew by {growth / 2**20:.0f} MiB relaying 2 x 256 MiB"


async def test_slow_reader_pauses_the_upstream(front: Front) -> None:
    """A client that stops reading stops the upstream command: bytes in flight stay bounded."""
    size = 128 * 1024 * 1024
    proc = await asyncio.create_subprocess_exec(
        *ssh_args(front, f"head -c {size} /dev/zero"), stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    try:
        first = await asyncio.wait_for(proc.stdout.readexactly(1), TIMEOUT)
        assert first == b"\0"
        link = front.links[0]
        # Wait for the relay to stall: no byte moved during one full second.
        deadline = time.monotonic() + TIMEOUT
        last = -1
        while link.stats.bytes_down != last:
            assert time.monotonic() < deadline, "the relay never stalled behind a client that does not read"
            last = link.stats.bytes_down
            await asyncio.sleep(1.0)
        assert last < 8 * 1024 * 1024, f"{last / 2**20:.1f} MiB relayed to a client that read 1 byte"
        rest = 0
        while chunk := await asyncio.wait_for(proc.stdout.read(1 << 20), TIMEOUT):
            rest += len(chunk)
        assert 1 + rest == size
        assert await asyncio.wait_for(proc.wait(), TIMEOUT) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


# -- the ignore-packet fix ---------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def counting_relay(port: int) -> AsyncIterator[tuple[int, list[int]]]:
    """A TCP relay to ``port`` counting client-to-server bytes on the wire; yields (port, [count])."""
    count = [0]

    async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, counted: bool) -> None:
        while data := await reader.read(65536):
            if counted:
                count[0] += len(data)
            writer.write(data)
            await writer.drain()
        writer.close()

    handlers: set[asyncio.Task[None]] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.add(task)
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port)
        await asyncio.gather(pump(reader, up_writer, True), pump(up_reader, writer, False),
                             return_exceptions=True)

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], count
    finally:
        server.close()
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)


async def wire_bytes_for_small_writes(front: Front, fixed: bool, writes: int) -> int:
    async with counting_relay(front.port) as (port, count), await asyncssh.connect(
            "127.0.0.1", port, username="root", known_hosts=None, client_keys=[str(front.client_key)],
            config=None, agent_path=None, **tuning.CLIENT_OPTIONS) as conn:
        if fixed:
            assert tuning.drop_redundant_ignore_packets(conn)
            assert not tuning.drop_redundant_ignore_packets(conn)  # a second call changes nothing
        process = await conn.create_process("wc -c", encoding=None)
        await asyncio.wait_for(process.stdin.drain(), TIMEOUT)
        before = count[0]
        for _ in range(writes):
            process.stdin.write(b"x")  # one SSH data packet each: the channel is never blocked
            await asyncio.sleep(0)
        # wc -c answers only after the EOF, so every write has been on the wire by then.
        process.stdin.write_eof()
        result = await asyncio.wait_for(process.wait(), TIMEOUT)
        assert int(result.stdout) == writes
        return count[0] - before


@pytest.mark.skipif(not tuning.IGNORE_PACKET_FIX_NEEDED,
                    reason="this asyncssh does not pad with ignore packets")
async def test_ignore_packets_are_gone_from_the_wire(front: Front) -> None:
    writes = 400
    padded = await wire_bytes_for_small_writes(front, fixed=False, writes=writes)
    fixed = await wire_bytes_for_small_writes(front, fixed=True, writes=writes)
    # AES-GCM: a 1-byte data packet and an empty ignore packet are 36 bytes each on the wire.
    assert padded / writes >= 70
    assert fixed / writes <= 40, f"{fixed / writes:.1f} bytes per 1-byte write: ignore packets still sent"


def test_cbc_keeps_its_ignore_packets() -> None:
    class FakeConn:  # the only stand-in here: a CBC cipher is not negotiable with modern OpenSSH
        def __init__(self) -> None:
            self.sent: list[int] = []

        def send_packet(self, pkttype: int, *args: bytes, handler: object = None) -> None:
            self.sent.append(pkttype)

        def get_extra_info(self, name: str) -> str:
            return "aes128-cbc" if name == "send_cipher" else ""

    conn = FakeConn()
    if not tuning.drop_redundant_ignore_packets(conn):  # type: ignore[arg-type]
        pytest.skip("this asyncssh does not pad with ignore packets")
    conn.send_packet(2, b"\0\0\0\0")
    assert conn.sent == [2]


def test_settings_from_config_and_validation() -> None:
    from edge.config import config_from_mapping

    config = config_from_mapping({"ssh": {"allow_local_forwarding": True, "env_allow": ["LANG", "TZ"],
                                          "client_env_name": "PROXY_CLIENT"}})
    settings = BridgeSettings.from_config(config.ssh)
    assert settings == BridgeSettings(allow_local_forwarding=True, env_allow=("LANG", "TZ"),
                                      client_env_name="PROXY_CLIENT")
    assert BridgeSettings.from_config(config_from_mapping({}).ssh) == BridgeSettings()
    with pytest.raises(ValueError, match="not an environment variable name"):
        BridgeSettings(client_env_name="BAD NAME")
    agent_config = config_from_mapping({"ssh": {"allow_agent_forwarding": True}})
    assert BridgeSettings.from_config(agent_config.ssh).allow_agent_forwarding
    assert BridgeSettings(allow_agent_forwarding=True).server_options()["agent_forwarding"] is True
    assert BridgeSettings().server_options()["agent_forwarding"] is False


@contextlib.asynccontextmanager
async def ssh_agent_holding(key: Path, tmp_path: Path) -> AsyncIterator[dict[str, str]]:
    """A real ssh-agent holding ``key``; yields the environment a client uses it with."""
    agent_sock = tmp_path / "agent.sock"
    agent = await asyncio.create_subprocess_exec("ssh-agent", "-D", "-a", str(agent_sock),
                                                 stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not agent_sock.exists():
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        env = {**os.environ, "SSH_AUTH_SOCK": str(agent_sock)}
        added = await run(["ssh-add", str(key)], env=env)
        assert added.returncode == 0, added.stderr
        yield env
    finally:
        agent.terminate()
        await agent.wait()


def fingerprint(key: Path) -> bytes:
    return subprocess.run(["ssh-keygen", "-l", "-f", f"{key}.pub"], check=True,
                          capture_output=True).stdout.split()[1]


async def test_agent_forwarding_refused_by_default_session_still_works(front: Front, sshd: Sshd,
                                                                       tmp_path: Path) -> None:
    async with ssh_agent_holding(sshd.client_key, tmp_path) as env:
        command = "echo ${SSH_AUTH_SOCK:-none}"
        direct = await run(direct_ssh_args(sshd, tmp_path, command, "-A"), env=env)
        assert direct.stdout.startswith(b"/tmp/")  # the backend does forward agents when asked
        through = await run(ssh_args(front, command, "-A"), env=env)
        assert (through.returncode, through.stdout) == (0, b"none\n")
        assert not front.links[-1].stats.agent_forwarded


@pytest.mark.parametrize("front", [BridgeSettings(allow_agent_forwarding=True)], indirect=True)
async def test_agent_forwarding_lets_the_backend_use_the_clients_agent(front: Front, sshd: Sshd,
                                                                       tmp_path: Path) -> None:
    """``ssh -A`` through the proxy: on the backend, ssh-add lists the client's key and a second
    hop (the backend logging in to an sshd that trusts only that key, as for a git pull) works
    with no key file on the backend side."""
    hop = (f"ssh -F /dev/null -o BatchMode=yes -o StrictHostKeyChecking=no "
           f"-o UserKnownHostsFile=/dev/null -o LogLevel=ERROR -o IdentityFile=/nonexistent "
           f"-p {sshd.port} root@127.0.0.1 echo second hop")
    async with ssh_agent_holding(sshd.client_key, tmp_path) as env:
        listed = await run(ssh_args(front, "ssh-add -l", "-A"), env=env)
        assert listed.returncode == 0, listed.stderr
        assert fingerprint(sshd.client_key) in listed.stdout
        assert front.links[-1].stats.agent_forwarded
        hopped = await run(ssh_args(front, hop, "-A"), env=env)
        assert (hopped.returncode, hopped.stdout) == (0, b"second hop\n"), hopped.stderr
        without = await run(ssh_args(front, hop), env=env)  # no -A: the backend has no agent
        assert without.returncode == 255 and b"second hop" not in without.stdout
        assert not front.links[-1].stats.agent_forwarded


async def test_fast_ciphers_negotiated_on_both_legs(front: Front) -> None:
    """A stock ssh (its default lists start with chacha20) gets a cipher asyncssh runs fast."""
    result = await run(ssh_args(front, "true", "-v"))
    assert result.returncode == 0
    log = result.stderr.decode()
    kex_lines = [line for line in log.splitlines() if "kex: server->client cipher:" in line]
    assert kex_lines and "chacha20" not in kex_lines[0]
    assert "aes128-ctr MAC: umac-64-etm@openssh.com" in kex_lines[0] or "gcm" in kex_lines[0]
    assert "kex: algorithm: curve25519-sha256" in log
    upstream = front.links[0].upstream
    assert upstream.get_extra_info("send_cipher") == "aes128-gcm@openssh.com"
    assert upstream.get_extra_info("recv_cipher") == "aes128-gcm@openssh.com"


@pytest.mark.skipif(not tuning.GCM_FIX_NEEDED, reason="this asyncssh has a different AES-GCM shim")
def test_tuned_gcm_is_byte_for_byte_asyncssh_gcm() -> None:
    """The reused-key AES-GCM produces asyncssh's packets, reads them back, rejects a bad tag."""
    from asyncssh.encryption import GCMEncryption

    key, iv = os.urandom(16), os.urandom(12)
    plain_sender, tuned_sender = (GCMEncryption.new("aes128-gcm", key, iv) for _ in range(2))
    plain_receiver, tuned_receiver = (GCMEncryption.new("aes128-gcm", key, iv) for _ in range(2))
    assert tuning._fast_gcm(tuned_sender) and tuning._fast_gcm(tuned_receiver)
    assert not tuning._fast_gcm(tuned_sender)  # a second call changes nothing
    for seq, size in enumerate((16, 1024, 32 * 1024 + 16, 48)):
        header, packet = size.to_bytes(4, "big"), os.urandom(size)
        sealed = tuned_sender.encrypt_packet(seq, header, packet)
        assert sealed == plain_sender.encrypt_packet(seq, header, packet)  # same IV sequence too
        first, rest, tag = sealed[0][:16], sealed[0][16:], sealed[1]
        assert tuned_receiver.decrypt_packet(seq, first, rest, 4, tag) == packet
        assert plain_receiver.decrypt_packet(seq, first, rest, 4, tag) == packet
    forged = bytes([sealed[1][0] ^ 1]) + sealed[1][1:]
    fresh = GCMEncryption.new("aes128-gcm", key, iv)
    tuning._fast_gcm(fresh)
    assert fresh.decrypt_packet(0, first, rest, 4, forged) is None  # asyncssh's MAC error follows


async def test_tuned_legs_survive_rekeys_with_data_intact(front: Front) -> None:
    """Bulk data both ways through tuned legs while the client rekeys every 256 KiB: every byte
    arrives (checksums), and the client's new keys are tuned again after each rekey."""
    data = os.urandom(6 * 1024 * 1024)
    async with asyncssh.connect(
            "127.0.0.1", front.port, username="root", known_hosts=None, client_keys=[str(front.client_key)],
            config=None, agent_path=None, rekey_bytes=256 * 1024, **tuning.CLIENT_OPTIONS) as conn:
        tuning.tune_connection(conn)
        first_keys = conn._send_encryption  # type: ignore[attr-defined]
        await both_ways_with_checksums(conn, data)
        keys = conn._send_encryption  # type: ignore[attr-defined]
        assert keys is not first_keys, "no rekey happened"
        if tuning.GCM_FIX_NEEDED:
            assert getattr(keys, "_edge_tuned", False)
            assert getattr(conn._recv_encryption, "_edge_tuned", False)  # type: ignore[attr-defined]
    upstream = front.links[0].upstream
    if tuning.GCM_FIX_NEEDED:
        assert getattr(upstream._send_encryption, "_edge_tuned", False)  # type: ignore[attr-defined]


async def test_handshake_quickack_finds_the_tcp_socket(front: Front) -> None:
    """The key-exchange quick-ACK (tuning._quickack) needs the connection's TCP socket; a login
    through tuned legs still works with it set on every handshake read."""
    async with asyncssh.connect(
            "127.0.0.1", front.port, username="root", known_hosts=None, client_keys=[str(front.client_key)],
            config=None, agent_path=None, **tuning.CLIENT_OPTIONS) as conn:
        sock = tuning._tcp_socket(conn)
        assert sock is not None
        tuning._quickack(sock)
        result = await asyncio.wait_for(conn.run("echo ok"), TIMEOUT)
        assert result.stdout == "ok\n"


# -- the paused-channel window fix (tuning.bound_receive_window) -----------------------------------------


class _StopAndGoSession(asyncssh.SSHServerSession[bytes]):
    """Takes one packet, then pauses reading for a moment: what the bridge does behind a slow leg."""

    def __init__(self, fixed: bool) -> None:
        self.fixed = fixed
        self.received = 0
        self._chan: asyncssh.SSHServerChannel[bytes] | None = None
        self._resume: asyncio.TimerHandle | None = None

    def connection_made(self, chan: asyncssh.SSHServerChannel[bytes]) -> None:
        self._chan = chan
        if self.fixed:
            assert tuning.bound_receive_window(chan)
            assert not tuning.bound_receive_window(chan)  # a second call changes nothing

    def shell_requested(self) -> bool:
        return True

    def data_received(self, data: bytes, datatype: int | None) -> None:
        self.received += len(data)
        assert self._chan is not None
        if self._resume is None:
            self._chan.pause_reading()
            self._resume = asyncio.get_running_loop().call_later(0.002, self._go)

    def _go(self) -> None:
        self._resume = None
        assert self._chan is not None
        self._chan.resume_reading()


async def peak_bytes_held_by_a_pausing_reader(
        fixed: bool, size: int, *, session: Callable[[], _StopAndGoSession] | None = None,
        tune: Callable[[asyncssh.SSHClientConnection, asyncssh.SSHClientChannel[bytes]], None] | None = None,
        ) -> tuple[int, list[_StopAndGoSession]]:
    """Sends ``size`` bytes to a stop-and-go reader; returns the most bytes ever sent but not yet
    taken, and the reader sessions. ``session`` makes the reader (default: ``_StopAndGoSession(fixed)``);
    ``tune(conn, chan)`` is applied to the sending side (and the listener's connections are tuned too)."""
    sessions: list[_StopAndGoSession] = []

    class Server(asyncssh.SSHServer):
        def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
            if tune is not None:
                tuning.tune_connection(conn)

        def begin_auth(self, username: str) -> bool:
            return False

        def session_requested(self) -> _StopAndGoSession:
            sessions.append(session() if session is not None else _StopAndGoSession(fixed))
            return sessions[-1]

    server = await asyncssh.listen("127.0.0.1", 0, server_factory=Server,
                                   server_host_keys=[asyncssh.generate_private_key("ssh-ed25519")],
                                   **tuning.SERVER_OPTIONS)
    port = server.sockets[0].getsockname()[1]
    peak = 0
    try:
        async with asyncssh.connect("127.0.0.1", port, username="u", known_hosts=None, config=None,
                                    agent_path=None, **tuning.CLIENT_OPTIONS) as conn:
            chan, _ = await conn.create_session(asyncssh.SSHClientSession, **tuning.SESSION_OPTIONS)
            if tune is not None:
                tune(conn, chan)
            chunk = b"\0" * (1 << 20)
            for _ in range(size // len(chunk)):
                chan.write(chunk)
            deadline = time.monotonic() + TIMEOUT
            while (reader := sessions[0] if sessions else None) is None or reader.received < size:
                assert time.monotonic() < deadline, "the stop-and-go reader never got everything"
                sent = size - chan.get_write_buffer_size()
                peak = max(peak, sent - (reader.received if reader else 0))
                await asyncio.sleep(0.001)
            chan.close()
    finally:
        server.close()
        await server.wait_closed()
    assert sessions[0].received == size
    return peak, sessions


@pytest.mark.skipif(not tuning.WINDOW_FIX_NEEDED, reason="this asyncssh accounts the window differently")
async def test_a_pausing_reader_holds_at_most_one_window() -> None:
    """The bridge pauses a leg's channel while the other leg is slow; what that channel holds (and
    so the proxy's memory) must stay within the window it granted, however often it pauses."""
    size = 24 * 1024 * 1024
    fixed, _ = await peak_bytes_held_by_a_pausing_reader(True, size)
    assert fixed <= tuning.WINDOW, f"{fixed / 2**20:.1f} MiB held behind a {tuning.WINDOW >> 20} MiB window"
    # asyncssh's own accounting re-grants the queued bytes on every resume: the same run holds more.
    unfixed, _ = await peak_bytes_held_by_a_pausing_reader(False, size)
    assert unfixed > 2 * tuning.WINDOW, f"{unfixed / 2**20:.1f} MiB: the test no longer shows the problem"
