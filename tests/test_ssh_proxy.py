"""The SSH proxy end to end: stock OpenSSH clients -> SshProxy (in this process, on the test's
event loop, with a real SQLite directory and change feed) -> a real ``sshd`` started by the
test, or an asyncssh backend where the test needs to see what the backend saw (passwords,
keyboard-interactive 2FA, environment, dying mid-session).

Nothing is mocked: the client is /usr/bin/ssh (sftp, scp, rsync, git), the directory is the
real store, the backends speak SSH. Clients run as subprocesses so the proxy keeps serving on
this loop while they talk to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
import weakref
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncssh
import pytest

from edge.config import EdgeConfig, LimitsConfig, ListenAddress, ServeConfig, SshConfig
from edge.directory.directory import Directory
from edge.directory.feed import ChangeFeed
from edge.directory.service import DirectoryService
from edge.directory.stores import store_for_url
from edge.proxyproto import encode_v1
from edge.registry import ProxyContext
from sshproxy.hostkeys import ensure_keys, host_key_path, pinned_lines, upstream_key_path
from sshproxy.server import ClientConnection, SshProxy
from sshproxy.upstream import _UpstreamClient
from tests.support_directory import TcpForwarder

pytestmark = pytest.mark.skipif(shutil.which("ssh") is None, reason="needs the OpenSSH client")

SSHD = "/usr/sbin/sshd"
ASKPASS_ENV = "EDGE_TEST_PASSWORD"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- an asyncssh backend that reports what it saw ------------------------------------------------


@dataclass
class Seen:
    """What one backend session saw."""

    username: str
    command: str | None
    env: dict[str, str]
    term: str | None
    size: tuple[int, int] | None


@dataclass
class AsyncsshBackend:
    """A backend with password users, a 2FA user (password then code, keyboard-interactive) and
    the proxy's upstream key for every user. Commands: ``exit N``, ``whoami``, ``cat``,
    ``sleep``, ``tty``, ``env NAME``."""

    name: str
    upstream_key: asyncssh.SSHKey
    passwords: dict[str, str] = field(default_factory=lambda: {"alice": "alice-pw", "bob": "bob-pw"})
    otp: dict[str, tuple[str, str]] = field(default_factory=lambda: {"carol": ("carol-pw", "424242")})
    host_key: asyncssh.SSHKey = field(default_factory=lambda: asyncssh.generate_private_key("ssh-ed25519"))
    seen: list[Seen] = field(default_factory=list)
    kbdint_prompts: list[str] = field(default_factory=list)
    password_attempts: list[tuple[str, str]] = field(default_factory=list)
    connections: list[asyncssh.SSHServerConnection] = field(default_factory=list)
    started: asyncio.Event = field(default_factory=asyncio.Event)
    server: Any = None
    port: int = 0
    options: dict[str, Any] = field(default_factory=dict)
    refusal_delay: float = 0.0
    """Seconds before a wrong password is refused."""
    challenge_delay: float = 0.0
    """Seconds before the first keyboard-interactive prompt."""
    password_method: bool = True
    """False: passwords only through keyboard-interactive, like a PAM-only sshd."""
    host_key_algs: tuple[str, ...] = ()
    """Host-key signatures offered (default: all asyncssh can make with ``host_key``)."""
    password_stall: float = 0.0
    """Seconds the backend sits on a password before answering (a hung PAM/LDAP)."""

    async def start(self) -> None:
        backend = self

        class Server(asyncssh.SSHServer):
            def __init__(self) -> None:
                self.stage = 0

            def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
                backend.connections.append(conn)

            def begin_auth(self, username: str) -> bool:
                return True

            def password_auth_supported(self) -> bool:
                return backend.password_method

            async def validate_password(self, username: str, password: str) -> bool:
                backend.password_attempts.append((username, password))
                await asyncio.sleep(backend.password_stall)
                if backend.passwords.get(username) == password:
                    return True
                await asyncio.sleep(backend.refusal_delay)  # like sshd with PAM: slow to say no
                return False

            def public_key_auth_supported(self) -> bool:
                return True

            def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
                return key.public_data == backend.upstream_key.public_data

            def kbdint_auth_supported(self) -> bool:
                return True

            async def get_kbdint_challenge(self, username: str, lang: str, submethods: str) -> Any:
                await asyncio.sleep(backend.challenge_delay)  # like PAM starting up
                self.stage = 0
                backend.kbdint_prompts.append("Password: ")
                return "", "", "", [("Password: ", False)]

            def validate_kbdint_response(self, username: str, responses: Any) -> Any:
                if username in backend.passwords:  # like PAM: the password over keyboard-interactive
                    backend.password_attempts.append((username, str(list(responses))))
                    return list(responses) == [backend.passwords[username]]
                password, code = backend.otp.get(username, ("", ""))
                if self.stage == 0 and password and list(responses) == [password]:
                    self.stage = 1
                    backend.kbdint_prompts.append("Verification code: ")
                    return "2FA", "Enter the code from your app", "", [("Verification code: ", True)]
                return self.stage == 1 and list(responses) == [code]

        async def handle(process: asyncssh.SSHServerProcess[str]) -> None:
            size = process.get_terminal_size()
            backend.seen.append(Seen(process.get_extra_info("username"), process.command,
                                     {str(k): str(v) for k, v in process.env.items()},
                                     process.get_terminal_type(), (size[0], size[1]) if size[0] else None))
            backend.started.set()
            command = process.command or ""
            try:
                if command.startswith("exit "):
                    process.exit(int(command.split()[1]))
                    return
                if command == "whoami":
                    process.stdout.write(f"{backend.name} {process.get_extra_info('username')}\n")
                elif command.startswith("env "):
                    process.stdout.write(process.env.get(command[4:], "-") + "\n")
                elif command == "tty":
                    process.stdout.write(f"{process.get_terminal_type()} {size[0]}x{size[1]}\n")
                elif command == "cat":
                    process.stdout.write(await process.stdin.read())
                elif command == "sleep":
                    await asyncio.sleep(3600)
                process.exit(0)
            except (asyncssh.BreakReceived, asyncssh.TerminalSizeChanged, OSError):
                process.exit(1)

        host_key: Any = self.host_key
        if self.host_key_algs:  # like an old sshd: an RSA key signs with ssh-rsa (SHA-1) only
            host_key = asyncssh.load_keypairs([self.host_key])[0]
            host_key.host_key_algorithms = [alg.encode() for alg in self.host_key_algs]
        self.options = {"server_host_keys": [host_key], "server_factory": Server,
                        "process_factory": handle, "config": None}
        self.server = await asyncssh.listen("127.0.0.1", 0, **self.options)
        self.port = self.server.sockets[0].getsockname()[1]

    async def serve_behind_proxy_protocol(self) -> tuple[int, list[bytes], asyncio.Task[None]]:
        """Another listener that wants a PROXY v1 line first (like sshd behind mmproxy); returns
        its port, the header lines received, and the accept task."""
        loop = asyncio.get_running_loop()
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        listener.setblocking(False)
        headers: list[bytes] = []

        async def accept() -> None:
            while True:
                sock, _ = await loop.sock_accept(listener)
                line = b""
                while not line.endswith(b"\r\n"):
                    line += await loop.sock_recv(sock, 1)
                headers.append(line)
                await asyncssh.run_server(sock, **self.options)

        return listener.getsockname()[1], headers, asyncio.ensure_future(accept())

    def die(self) -> None:
        """The backend machine goes away: every connection is aborted, no goodbye."""
        for conn in self.connections:
            conn.abort()

    async def stop(self) -> None:
        self.die()
        self.server.close()
        await self.server.wait_closed()


# -- a real sshd ------------------------------------------------------------------------------


@dataclass
class Sshd:
    port: int
    dir: Path
    process: subprocess.Popen[bytes]
    host_pub: str


def start_sshd(base: Path, authorized: str, key_types: tuple[str, ...] = ("ed25519",)) -> Sshd:
    """sshd on a free port as root (the test user), only public-key login with ``authorized``."""
    base.mkdir(parents=True, exist_ok=True)
    Path("/run/sshd").mkdir(exist_ok=True)  # privilege separation directory sshd insists on
    for kind in key_types:
        subprocess.run(["ssh-keygen", "-q", "-t", kind, "-N", "", "-f", str(base / f"host_{kind}")],
                       check=True)
    host_keys = "\n".join(f"HostKey {base / f'host_{kind}'}" for kind in key_types)
    (base / "authorized_keys").write_text(authorized)
    port = free_port()
    (base / "sshd_config").write_text(f"""Port {port}
ListenAddress 127.0.0.1
{host_keys}
PidFile none
UsePAM no
StrictModes no
PermitRootLogin prohibit-password
AuthorizedKeysFile {base / 'authorized_keys'}
PasswordAuthentication no
KbdInteractiveAuthentication no
AcceptEnv EDGE_CLIENT_ADDR LANG LC_*
Subsystem sftp internal-sftp
LogLevel ERROR
""")
    process = subprocess.Popen([SSHD, "-D", "-e", "-f", str(base / "sshd_config")],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            break
        if process.poll() is not None:
            raise RuntimeError(f"sshd failed: {process.stderr.read().decode() if process.stderr else ''}")
        time.sleep(0.05)
    return Sshd(port, base, process, "".join(
        (base / f"host_{kind}.pub").read_text() for kind in key_types))


# -- the proxy under test ----------------------------------------------------------------------


@dataclass
class Edge:
    """A running SshProxy with its directory, keys and a client-side known_hosts."""

    proxy: SshProxy
    service: DirectoryService
    directory: Directory
    port: int
    tmp: Path
    known_hosts: Path
    user_key: Path
    records: list[logging.LogRecord]
    feed: ChangeFeed

    def ssh_args(self, user: str, *, key: Path | None = None, batch: bool = True) -> list[str]:
        args = ["ssh", "-F", "/dev/null", "-p", str(self.port),
                "-o", f"UserKnownHostsFile={self.known_hosts}",
                "-o", "StrictHostKeyChecking=yes", "-o", "IdentitiesOnly=yes", "-o", "IdentityAgent=none",
                "-o", "ConnectTimeout=20", "-o", "ServerAliveInterval=0",
                "-o", f"BatchMode={'yes' if batch else 'no'}"]
        if key is not None:
            args += ["-i", str(key)]
        return [*args, f"{user}@127.0.0.1"]

    async def ssh(self, user: str, *command: str, key: Path | None = None, password: str | None = None,
                  stdin: bytes | None = None, time_limit: float = 90) -> tuple[int, str, str]:
        """Run the stock ssh client; returns (exit status, stdout, stderr)."""
        env = dict(os.environ)
        if password is not None:
            env.update(SSH_ASKPASS=str(self.tmp / "askpass"), SSH_ASKPASS_REQUIRE="force",
                       **{ASKPASS_ENV: password})
            args = [*self.ssh_args(user, batch=False), "-o", "PreferredAuthentications=password",
                    "-o", "NumberOfPasswordPrompts=1"]
        else:
            args = [*self.ssh_args(user, key=key or self.user_key), "-o",
                    "PreferredAuthentications=publickey"]
        return await run(*args, *command, stdin=stdin, env=env, time_limit=time_limit)

    async def log_lines(self) -> list[dict[str, Any]]:
        """The per-connection log lines, once every connection so far has closed."""
        deadline = time.monotonic() + 20
        while self.proxy.connections:
            assert time.monotonic() < deadline, "connections stay open after their clients left"
            await asyncio.sleep(0.02)
        return [r.__dict__ for r in self.records if getattr(r, "event", "") == "ssh_connection"]


async def run(*args: str, stdin: bytes | None = None, env: dict[str, str] | None = None,
              time_limit: float = 90, cwd: Path | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *args, stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=cwd)
    try:
        out, err = await asyncio.wait_for(proc.communicate(stdin), time_limit)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"{args[0]} hung for {time_limit} s: {' '.join(args)}") from None
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Proxy host keys + upstream key (as `edge init` makes them) and a user key pair."""
    base = tmp_path_factory.mktemp("sshkeys")
    ensure_keys(SshConfig(host_key_dir=str(base / "hostkeys")))
    for name in ("user", "stranger"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f",
                        str(base / name)], check=True)
    return base


@pytest.fixture(scope="module")
def sshd(keys: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    if not os.path.exists(SSHD) or os.geteuid() != 0:
        pytest.skip("needs openssh-server and root (sshd logs in as the test user)")
    upstream_pub = (upstream_key_path(SshConfig(host_key_dir=str(keys / "hostkeys")))
                    .with_name("upstream_key.pub").read_text())
    server = start_sshd(tmp_path_factory.mktemp("sshd"), upstream_pub)
    yield server
    server.process.terminate()
    server.process.wait(10)


def upstream_key(keys: Path) -> asyncssh.SSHKey:
    return asyncssh.read_private_key(str(keys / "hostkeys" / "upstream_key"))


async def make_edge(tmp: Path, keys: Path, *, limits: LimitsConfig | None = None,
                    db_url: str | None = None, proxy_db_url: str | None = None,
                    serve: ServeConfig | None = None, **ssh: Any) -> AsyncIterator[Edge]:
    """``proxy_db_url``: where the proxy reads (e.g. through a forwarder the test cuts)."""
    db_url = db_url or f"sqlite:///{tmp / 'edge.sqlite3'}"
    store = store_for_url(db_url)
    await store.open()
    await store.migrate()
    service = DirectoryService(store)
    proxy_store = store_for_url(proxy_db_url) if proxy_db_url else store
    if proxy_store is not store:
        await proxy_store.open()
    directory = Directory(proxy_store)
    feed = ChangeFeed(directory, interval=0.1)
    await feed.start()
    settings = {"host_key_dir": str(keys / "hostkeys"), "auth_failure_delay": 0.3, **ssh}
    config = EdgeConfig(ssh=SshConfig(listen=(ListenAddress("127.0.0.1", 0),), **settings),
                        limits=limits or LimitsConfig(), serve=serve or ServeConfig())
    logger = logging.getLogger(f"test.ssh.{tmp.name}")
    handler = _Records()
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    proxy = SshProxy(ProxyContext(config=config, directory=directory, feed=feed, keybox=None,
                                  worker_id=0, logger=logger, name="ssh"))
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    await proxy.start([listener])
    port = listener.getsockname()[1]
    known = _client_files(tmp, config.ssh.host_key_dir, port)
    edge = Edge(proxy, service, directory, port, tmp, known, keys / "user", handler.records, feed)
    try:
        yield edge
    finally:
        await proxy.drain()
        await proxy.close()
        listener.close()
        await feed.stop()
        if proxy_store is not store:
            await proxy_store.close()
        await store.close()
        logger.removeHandler(handler)


def _client_files(tmp: Path, host_key_dir: str, port: int) -> Path:
    """A known_hosts with the proxy's host keys, and the askpass helper; returns known_hosts."""
    known = tmp / "known_hosts"
    known.write_text("".join(
        f"[127.0.0.1]:{port} " + Path(f"{host_key_path(host_key_dir, kind)}.pub").read_text()
        for kind in ("ed25519", "ecdsa", "rsa")))
    askpass = tmp / "askpass"
    askpass.write_text(f"#!/bin/sh\nprintf '%s\\n' \"${ASKPASS_ENV}\"\n")
    askpass.chmod(0o755)
    return known


@pytest.fixture
async def edge(tmp_path: Path, keys: Path) -> AsyncIterator[Edge]:
    async for value in make_edge(tmp_path, keys):
        yield value


@pytest.fixture
async def backend(keys: Path) -> AsyncIterator[AsyncsshBackend]:
    server = AsyncsshBackend("backend-a", upstream_key(keys))
    await server.start()
    yield server
    await server.stop()


async def feed_caught_up(edge: Edge) -> None:
    """Wait until the proxy's change feed has applied every change written so far."""
    latest = await edge.service.store.latest_change_id()
    deadline = time.monotonic() + 30
    while (edge.feed.cursor or 0) < latest:
        assert time.monotonic() < deadline, "the change feed is not catching up"
        await asyncio.sleep(0.05)


async def host_settled(edge: Edge, name: str, **expected: Any) -> None:
    """Wait until this worker's cached host row shows ``expected`` (the change feed ran)."""
    deadline = time.monotonic() + 20
    while True:
        host = await edge.directory.host(name)
        if host is not None and all(getattr(host, k) == v for k, v in expected.items()):
            return
        assert time.monotonic() < deadline, f"change feed never delivered {expected} for {name}"
        await asyncio.sleep(0.05)


async def add_backend_host(edge: Edge, name: str, backend: AsyncsshBackend | Sshd, **fields: Any) -> None:
    pinned = backend.host_pub if isinstance(backend, Sshd) else pinned_lines([backend.host_key])
    await edge.service.add_host(name, "127.0.0.1", ssh_port=backend.port)
    await edge.service.update_host(name, ssh_known_hosts=pinned, **fields)


async def provision(edge: Edge, backend: AsyncsshBackend | Sshd, *, user: str = "alice",
                    upstream_username: str | None = None) -> None:
    """Host web1 -> tenant acme -> account ``user`` with the test user key authorized."""
    await add_backend_host(edge, "web1", backend)
    await edge.service.add_tenant("acme", "web1")
    await edge.service.add_account(user, "acme", protocols=["ssh"], upstream_username=upstream_username or "",
                                   authorized_keys=(edge.user_key.with_suffix(".pub")).read_text())


# -- login and routing -------------------------------------------------------------------------


async def test_password_login_is_passed_through_and_exit_status_comes_back(
        edge: Edge, backend: AsyncsshBackend) -> None:
    await provision(edge, backend)
    rc, out, err = await edge.ssh("alice", "whoami", password="alice-pw")
    assert (rc, out) == (0, "backend-a alice\n"), err
    assert backend.password_attempts == [("alice", "alice-pw")]
    rc, _, err = await edge.ssh("alice", "exit 7", password="alice-pw")
    assert rc == 7, err
    line = (await edge.log_lines())[-1]
    assert line["user"] == "alice" and line["host"] == "web1" and line["auth_method"] == "password"
    assert line["outcome"] == "logged in" and line["exit_status"] == 7 and line["channels"] == 1


async def test_key_login_to_real_sshd_maps_to_upstream_user_with_proxy_key(
        edge: Edge, sshd: Sshd) -> None:
    me = os.environ.get("USER") or "root"
    await provision(edge, sshd, user="alice", upstream_username=me)
    rc, out, err = await edge.ssh("alice", 'echo "$USER from $EDGE_CLIENT_ADDR"; exit 3')
    assert rc == 3, err
    ip, port = out.split(" from ")[1].split()
    assert out == f"{me} from {ip} {port}\n" and ip == "127.0.0.1" and 1024 <= int(port) <= 65535


async def test_agent_forwarding_when_enabled_reaches_the_backend(tmp_path: Path, keys: Path,
                                                                 sshd: Sshd) -> None:
    """``[ssh] allow_agent_forwarding``: ``ssh -A`` through the proxy gives the backend the client's
    agent (ssh-add there lists the client's key); the connection's log line says so."""
    me = os.environ.get("USER") or "root"
    agent_sock = tmp_path / "agent.sock"
    agent = await asyncio.create_subprocess_exec("ssh-agent", "-D", "-a", str(agent_sock),
                                                 stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while not agent_sock.exists():
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        env = {**os.environ, "SSH_AUTH_SOCK": str(agent_sock)}
        key = keys / "user"
        assert (await run("ssh-add", str(key), env=env))[0] == 0
        fingerprint = (await run("ssh-keygen", "-l", "-f", f"{key}.pub"))[1].split()[1]
        async for edge in make_edge(tmp_path, keys, allow_agent_forwarding=True):
            await provision(edge, sshd, user="alice", upstream_username=me)
            # IdentityAgent=none would also unset the agent that -A forwards.
            args = edge.ssh_args("alice", key=key)
            at = args.index("IdentityAgent=none")
            del args[at - 1:at + 1]
            rc, out, err = await run(*args[:-1], "-A", args[-1], "ssh-add -l", env=env)
            assert rc == 0 and fingerprint in out, err
            line = (await edge.log_lines())[-1]
            assert line["agent_forwarded"] is True and line["outcome"] == "logged in"
    finally:
        agent.terminate()
        await agent.wait()


async def test_unknown_user_suspended_tenant_and_wrong_credentials_fail_alike(
        edge: Edge, backend: AsyncsshBackend, keys: Path) -> None:
    await provision(edge, backend)
    await edge.service.add_tenant("gone", "web1")
    await edge.service.add_account("bob", "gone", protocols=["ssh"],
                                   authorized_keys=(edge.user_key.with_suffix(".pub")).read_text())
    await edge.service.set_tenant_state("gone", "suspended")
    delay = edge.proxy.config.auth_failure_delay
    answers = {}
    for case, user, password in (("wrong password", "alice", "nope"), ("unknown user", "mallory", "nope"),
                                 ("suspended tenant", "bob", "bob-pw")):
        started = time.monotonic()
        rc, out, err = await edge.ssh(user, "whoami", password=password)
        elapsed = time.monotonic() - started
        answers[case] = (rc, out, err.replace(user, "USER"))
        assert elapsed >= delay, f"{case}: answered after {elapsed:.2f} s, before the common delay"
    assert len(set(answers.values())) == 1, answers
    assert answers["unknown user"][0] == 255 and "Permission denied" in answers["unknown user"][2]
    # Only the real account's wrong password reached the backend; the rest never left the proxy.
    assert backend.password_attempts == [("alice", "nope")]
    # Keys: a key not in authorized_keys and an unknown user look the same too.
    wrong = await edge.ssh("alice", "whoami", key=keys / "stranger")
    unknown = await edge.ssh("mallory", "whoami", key=edge.user_key)
    suspended = await edge.ssh("bob", "whoami", key=edge.user_key)
    assert wrong[0] == unknown[0] == suspended[0] == 255
    assert wrong[2].replace("alice", "U") == unknown[2].replace("mallory", "U") \
        == suspended[2].replace("bob", "U")
    assert not backend.seen
    outcomes = [(line["user"], line["outcome"]) for line in (await edge.log_lines())]
    assert ("mallory", "login failed") in outcomes and ("alice", "login failed") in outcomes


async def test_keyboard_interactive_two_factor_is_relayed(edge: Edge, backend: AsyncsshBackend) -> None:
    await provision(edge, backend, user="carol")
    prompts: list[str] = []

    class Client(asyncssh.SSHClient):
        def kbdint_auth_requested(self) -> str:
            return ""

        def kbdint_challenge_received(self, name: str, instructions: str, lang: str,
                                      challenge: Any) -> list[str]:
            prompts.extend(prompt for prompt, _ in challenge)
            return ["carol-pw" if prompt == "Password: " else "424242" for prompt, _ in challenge]

    async with asyncssh.connect("127.0.0.1", edge.port, username="carol", known_hosts=None,
                                client_factory=Client, preferred_auth="keyboard-interactive",
                                config=None, client_keys=[], agent_path=None) as conn:
        result = await conn.run("whoami", check=True)
    assert result.stdout == "backend-a carol\n"
    assert prompts == ["Password: ", "Verification code: "]
    # A wrong code fails like any wrong password.
    with pytest.raises(asyncssh.PermissionDenied):
        async with asyncssh.connect("127.0.0.1", edge.port, username="carol", known_hosts=None,
                                    password="carol-pw", preferred_auth="keyboard-interactive",
                                    config=None, client_keys=[], agent_path=None):
            pass


async def test_pty_terminal_type_and_size_reach_the_backend(edge: Edge, sshd: Sshd) -> None:
    me = os.environ.get("USER") or "root"
    await provision(edge, sshd, upstream_username=me)
    async with asyncssh.connect("127.0.0.1", edge.port, username="alice", known_hosts=None,
                                client_keys=[str(edge.user_key)], config=None, agent_path=None) as conn:
        result = await conn.run("echo $TERM; stty size", term_type="xterm-256color",
                                term_size=(132, 43), check=True)
    assert result.stdout.split() == ["xterm-256color", "43", "132"]


async def test_upstream_host_key_mismatch_and_unpinned_host_are_refused(
        edge: Edge, backend: AsyncsshBackend) -> None:
    await provision(edge, backend)
    other = asyncssh.generate_private_key("ssh-ed25519")
    await edge.service.update_host("web1", ssh_known_hosts=pinned_lines([other]))
    await host_settled(edge, "web1", ssh_known_hosts=pinned_lines([other]))
    rc, out, err = await edge.ssh("alice", "whoami", password="alice-pw")
    assert rc == 255 and out == ""
    assert "host key verification failed" in err
    assert backend.password_attempts == []  # the password never went to the impostor
    await edge.service.update_host("web1", ssh_known_hosts="")
    await host_settled(edge, "web1", ssh_known_hosts="")
    rc, _, err = await edge.ssh("alice", "whoami", password="alice-pw")
    assert rc == 255 and "backend unavailable" in err
    # Explicitly insecure: accepted without a pin.
    await edge.service.update_host("web1", ssh_insecure=True)
    await host_settled(edge, "web1", ssh_insecure=True)
    rc, out, err = await edge.ssh("alice", "whoami", password="alice-pw")
    assert (rc, out) == (0, "backend-a alice\n"), err
    reasons = [line["reason"] for line in (await edge.log_lines())]
    assert any("pin-ssh-key web1" in reason for reason in reasons)


async def test_brute_force_bans_the_ip_even_for_the_right_password(
        tmp_path: Path, keys: Path, backend: AsyncsshBackend) -> None:
    async for edge in make_edge(tmp_path, keys, limits=LimitsConfig(max_failures_per_ip=3)):
        await provision(edge, backend)
        for _ in range(3):
            rc, _, _ = await edge.ssh("alice", "whoami", password="guess")
            assert rc == 255
        rc, out, err = await edge.ssh("alice", "whoami", password="alice-pw")
        assert rc == 255 and out == "" and "Permission denied" in err
        assert len(backend.password_attempts) == 3  # the ban answers without asking the backend
        assert (await edge.log_lines())[-1]["reason"] == "too many failed logins from 127.0.0.1"


async def test_backend_dying_mid_session_ends_the_client_with_an_error(
        edge: Edge, backend: AsyncsshBackend) -> None:
    await provision(edge, backend)
    client = asyncio.ensure_future(edge.ssh("alice", "sleep", password="alice-pw", time_limit=60))
    await asyncio.wait_for(backend.started.wait(), 60)
    backend.die()
    rc, _, err = await client
    assert rc == 255
    assert "connection to the server lost" in err or "the server closed the connection" in err


async def test_maintenance_banner_then_disconnect(edge: Edge, backend: AsyncsshBackend) -> None:
    await provision(edge, backend)
    await edge.service.set_host_state("web1", "maintenance", "Back at 03:00 UTC.")
    await host_settled(edge, "web1", state="maintenance")
    rc, out, err = await edge.ssh("alice", "whoami", password="alice-pw")
    assert rc == 255 and out == ""
    assert "Back at 03:00 UTC." in err
    assert backend.password_attempts == []


async def test_tenant_move_routes_new_logins_and_drains_old_sessions(
        edge: Edge, backend: AsyncsshBackend, keys: Path) -> None:
    await provision(edge, backend)
    other = AsyncsshBackend("backend-b", upstream_key(keys))
    await other.start()
    try:
        await add_backend_host(edge, "web2", other)
        old = asyncio.ensure_future(edge.ssh("alice", "sleep", password="alice-pw", time_limit=60))
        await asyncio.wait_for(backend.started.wait(), 60)
        await edge.service.move_tenant("acme", "web2", drain=1.0)
        # The change feed evicts the tenant within a poll; new logins land on web2.
        deadline = time.monotonic() + 20
        while True:
            rc, out, err = await edge.ssh("alice", "whoami", password="alice-pw")
            if out == "backend-b alice\n" or time.monotonic() > deadline:
                break
        assert (rc, out) == (0, "backend-b alice\n"), err
        rc, _, err = await old
        assert rc == 255 and "moved to another server" in err
    finally:
        await other.stop()


async def test_open_session_of_a_suspended_tenant_is_closed_with_a_message(
        edge: Edge, backend: AsyncsshBackend) -> None:
    await provision(edge, backend)
    old = asyncio.ensure_future(edge.ssh("alice", "sleep", password="alice-pw", time_limit=60))
    await asyncio.wait_for(backend.started.wait(), 60)
    await edge.service.set_tenant_state("acme", "suspended")
    rc, _, err = await asyncio.wait_for(old, 60)  # the sleep would run for the whole time_limit
    assert rc == 255 and "This account is not available." in err


async def test_open_session_on_a_host_put_down_is_closed_without_the_old_notice(
        edge: Edge, backend: AsyncsshBackend) -> None:
    await provision(edge, backend)
    await edge.service.update_host("web1", notice="Back at 03:00 UTC.")
    old = asyncio.ensure_future(edge.ssh("alice", "sleep", password="alice-pw", time_limit=60))
    await asyncio.wait_for(backend.started.wait(), 60)
    await edge.service.set_host_state("web1", "down")
    rc, _, err = await asyncio.wait_for(old, 60)
    assert rc == 255 and "not reachable right now" in err
    assert "Back at 03:00" not in err
    # New logins are refused the same way, without the notice left from a maintenance.
    rc, out, err = await edge.ssh("alice", "whoami", password="alice-pw")
    assert rc == 255 and out == "" and "not reachable right now" in err
    assert "Back at 03:00" not in err


async def test_open_session_on_a_host_put_in_maintenance_is_kept_then_closed_with_the_notice(
        tmp_path: Path, keys: Path, backend: AsyncsshBackend) -> None:
    async for edge in make_edge(tmp_path, keys, serve=ServeConfig(maintenance_drain=2.0)):
        await provision(edge, backend)
        old = asyncio.ensure_future(edge.ssh("alice", "sleep", password="alice-pw",
                                             time_limit=60))
        await asyncio.wait_for(backend.started.wait(), 60)
        started = time.monotonic()
        await edge.service.set_host_state("web1", "maintenance", "Back at 03:00 UTC.")
        await host_settled(edge, "web1", state="maintenance")
        await asyncio.sleep(0.5)
        assert not old.done()  # kept for [serve] maintenance_drain
        rc, _, err = await asyncio.wait_for(old, 60)
        assert rc == 255 and "Back at 03:00 UTC." in err
        assert time.monotonic() - started >= 1.9


# -- stock OpenSSH tools through the proxy to a real sshd -------------------------------------------


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _transport_opts(edge: Edge) -> list[str]:
    """Options shared by sftp/scp (they take -P/-o, not ssh's -p)."""
    return ["-F", "/dev/null", "-o", f"UserKnownHostsFile={edge.known_hosts}", "-o",
            "StrictHostKeyChecking=yes", "-o", "IdentitiesOnly=yes", "-o", "IdentityAgent=none",
            "-o", "BatchMode=yes", "-i", str(edge.user_key), "-P", str(edge.port)]


@pytest.fixture
async def sshd_edge(edge: Edge, sshd: Sshd) -> Edge:
    await provision(edge, sshd, upstream_username=os.environ.get("USER") or "root")
    return edge


@pytest.mark.slow
async def test_sftp_put_and_get_100_mb_with_matching_checksums(sshd_edge: Edge, tmp_path: Path) -> None:
    edge = sshd_edge
    source = tmp_path / "big.bin"
    with source.open("wb") as file:
        for _ in range(100):
            file.write(os.urandom(1 << 20))
    remote = tmp_path / "remote.bin"  # sshd runs on this machine: the "backend disk" is tmp_path
    back = tmp_path / "back.bin"
    batch = tmp_path / "batch"
    batch.write_text(f"put {source} {remote}\nget {remote} {back}\n")
    rc, _, err = await run("sftp", *_transport_opts(edge), "-b", str(batch), "alice@127.0.0.1",
                           time_limit=170)
    assert rc == 0, err
    assert _sha256(remote) == _sha256(source) == _sha256(back)
    line = (await edge.log_lines())[-1]
    assert line["bytes_up"] > 100 << 20 and line["bytes_down"] > 100 << 20


async def test_scp_both_ways(sshd_edge: Edge, tmp_path: Path) -> None:
    edge = sshd_edge
    source = tmp_path / "up.txt"
    source.write_bytes(os.urandom(300_000))
    remote = tmp_path / "remote.txt"
    rc, _, err = await run("scp", *_transport_opts(edge), str(source), f"alice@127.0.0.1:{remote}")
    assert rc == 0, err
    assert remote.read_bytes() == source.read_bytes()
    back = tmp_path / "down.txt"
    rc, _, err = await run("scp", *_transport_opts(edge), f"alice@127.0.0.1:{remote}", str(back))
    assert rc == 0, err
    assert back.read_bytes() == source.read_bytes()
    # Legacy scp protocol (-O: scp on the backend, not sftp) works as well.
    rc, _, err = await run("scp", "-O", *_transport_opts(edge), f"alice@127.0.0.1:{remote}",
                           str(tmp_path / "legacy.txt"))
    assert rc == 0, err
    assert (tmp_path / "legacy.txt").read_bytes() == source.read_bytes()


async def test_rsync_over_ssh(sshd_edge: Edge, tmp_path: Path) -> None:
    edge = sshd_edge
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    for i in range(20):
        (src / "sub" / f"f{i}").write_bytes(os.urandom(10_000 + i))
    dest = tmp_path / "dest"
    ssh_cmd = " ".join(edge.ssh_args("alice", key=edge.user_key)[:-1])
    rc, _, err = await run("rsync", "-a", "-e", ssh_cmd, f"{src}/", f"alice@127.0.0.1:{dest}/")
    assert rc == 0, err
    assert sorted(p.name for p in (dest / "sub").iterdir()) == sorted(p.name for p in (src / "sub").iterdir())
    assert all((dest / "sub" / p.name).read_bytes() == p.read_bytes() for p in (src / "sub").iterdir())


async def test_git_clone_and_push_over_ssh(sshd_edge: Edge, tmp_path: Path) -> None:
    edge = sshd_edge
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com",
           "GIT_SSH_COMMAND": " ".join(edge.ssh_args("alice", key=edge.user_key)[:-1])}
    repo = tmp_path / "repo.git"
    assert (await run("git", "init", "-q", "--bare", str(repo), env=env))[0] == 0
    url = f"ssh://alice@127.0.0.1:{edge.port}{repo}"
    work = tmp_path / "work"
    rc, _, err = await run("git", "clone", "-q", url, str(work), env=env)
    assert rc == 0, err
    (work / "README").write_text("hello\n")
    for args in (("add", "README"), ("commit", "-qm", "first"), ("push", "-q", "origin", "HEAD:main")):
        rc, _, err = await run("git", "-C", str(work), *args, env=env)
        assert rc == 0, err
    rc, _, err = await run("git", "clone", "-q", "-b", "main", url, str(tmp_path / "again"), env=env)
    assert rc == 0, err
    assert (tmp_path / "again" / "README").read_text() == "hello\n"


# -- protection, PROXY protocol, directory outages ------------------------------------------------


async def test_proxy_protocol_from_trusted_net_sets_the_client_address(
        tmp_path: Path, keys: Path, backend: AsyncsshBackend) -> None:
    async for edge in make_edge(tmp_path, keys, trusted_proxies=("127.0.0.0/8",)):
        await provision(edge, backend)
        sock = socket.create_connection(("127.0.0.1", edge.port))
        sock.sendall(encode_v1(("203.0.113.9", 40000), ("127.0.0.1", edge.port)))
        async with asyncssh.connect(sock=sock, username="alice", password="alice-pw", known_hosts=None,
                                    config=None, client_keys=[], agent_path=None) as conn:
            result = await conn.run("env EDGE_CLIENT_ADDR", check=True)
        assert result.stdout == "203.0.113.9 40000\n"
        assert (await edge.log_lines())[-1]["client"] == "203.0.113.9:40000"
        # A trusted peer without a header (health check, direct admin) is served as itself.
        rc, out, err = await edge.ssh("alice", "env EDGE_CLIENT_ADDR", password="alice-pw")
        assert rc == 0 and out.startswith("127.0.0.1 "), err


async def test_proxy_header_from_untrusted_peer_is_not_believed(
        edge: Edge, backend: AsyncsshBackend) -> None:
    await provision(edge, backend)
    sock = socket.create_connection(("127.0.0.1", edge.port))
    sock.sendall(encode_v1(("203.0.113.9", 40000), ("127.0.0.1", edge.port)))
    with pytest.raises((asyncssh.Error, OSError)):
        async with asyncssh.connect(sock=sock, username="alice", password="alice-pw", known_hosts=None,
                                    config=None, client_keys=[], agent_path=None) as conn:
            await conn.run("env EDGE_CLIENT_ADDR")
    assert not backend.seen


async def test_max_sessions_per_user(tmp_path: Path, keys: Path, backend: AsyncsshBackend) -> None:
    async for edge in make_edge(tmp_path, keys, max_sessions_per_user=1):
        await provision(edge, backend)
        first = asyncio.ensure_future(edge.ssh("alice", "sleep", password="alice-pw", time_limit=60))
        await asyncio.wait_for(backend.started.wait(), 60)
        rc, _, err = await edge.ssh("alice", "whoami", password="alice-pw")
        assert rc == 255 and "too many sessions for this account" in err
        edge.proxy.connections.copy().pop().close("test over")
        await first


async def test_unauthenticated_connections_per_ip_are_capped(
        tmp_path: Path, keys: Path, backend: AsyncsshBackend) -> None:
    async for edge in make_edge(tmp_path, keys, limits=LimitsConfig(max_unauthenticated_per_ip=2)):
        await provision(edge, backend)
        idle = [await asyncio.open_connection("127.0.0.1", edge.port) for _ in range(2)]
        for reader, _ in idle:  # both get the server's identification: they are being served
            assert (await asyncio.wait_for(reader.readline(), 20)).startswith(b"SSH-2.0-edge")
        rc, _, err = await edge.ssh("alice", "whoami", password="alice-pw")
        assert rc == 255 and ("closed" in err or "reset" in err), err
        assert not backend.password_attempts  # refused before any login
        for _, writer in idle:
            writer.close()
        deadline = time.monotonic() + 20
        while edge.proxy.limits.unauthenticated.count("127.0.0.1"):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        rc, out, err = await edge.ssh("alice", "whoami", password="alice-pw")
        assert (rc, out) == (0, "backend-a alice\n"), err


async def test_login_grace_time_closes_silent_connections(
        tmp_path: Path, keys: Path, backend: AsyncsshBackend) -> None:
    async for edge in make_edge(tmp_path, keys, limits=LimitsConfig(login_grace_time=1.0)):
        reader, writer = await asyncio.open_connection("127.0.0.1", edge.port)
        writer.write(b"SSH-2.0-silent\r\n")
        # Identification, KEXINIT, then nothing from us: the proxy closes after the grace time.
        received = await asyncio.wait_for(reader.read(), 30)
        assert received.startswith(b"SSH-2.0-edge")
        writer.close()
        line = (await edge.log_lines())[-1]
        assert line["outcome"] == "closed before login" and "timeout" in line["reason"].lower()


@pytest.mark.mysql
async def test_directory_down_cold_user_gets_temporarily_unavailable_cached_user_logs_in(
        tmp_path: Path, keys: Path, backend: AsyncsshBackend, mysql_url: str) -> None:
    from edge.directory.mysql import parse_mysql_url

    args = parse_mysql_url(mysql_url)
    forwarder = TcpForwarder(args["host"], args["port"])
    await forwarder.start()
    auth = args["user"] + (":" + args["password"] if args["password"] else "")
    proxy_url = f"mysql://{auth}@127.0.0.1:{forwarder.port}/{args['db']}"
    try:
        async for edge in make_edge(tmp_path, keys, db_url=mysql_url, proxy_db_url=proxy_url):
            await provision(edge, backend)
            await edge.service.add_account("dave", "acme", protocols=["ssh"])
            await feed_caught_up(edge)  # no eviction of alice's route may arrive after the cut
            rc, out, err = await edge.ssh("alice", "whoami", password="alice-pw")
            assert (rc, out) == (0, "backend-a alice\n"), err
            await forwarder.stop()
            rc, out, err = await edge.ssh("dave", "whoami", password="alice-pw")
            assert rc == 255 and "temporarily unavailable" in err
            rc, out, err = await edge.ssh("alice", "whoami", password="alice-pw")
            assert (rc, out) == (0, "backend-a alice\n"), err
    finally:
        await forwarder.stop()


def _user_certificates(tmp: Path, users: tuple[str, ...]) -> Path:
    """A user CA and, per user, a key with a certificate for that principal; returns the CA."""
    ca = tmp / "user_ca"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(ca)], check=True)
    for user in users:
        key = tmp / f"{user}_key"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
        subprocess.run(["ssh-keygen", "-q", "-s", str(ca), "-I", f"{user}-cert", "-n", user,
                        "-V", "-5m:+1h", f"{key}.pub"], check=True)
    return ca


async def test_openssh_user_certificate_signed_by_configured_ca(
        tmp_path: Path, keys: Path, backend: AsyncsshBackend) -> None:
    ca = _user_certificates(tmp_path, ("alice", "bob"))
    async for edge in make_edge(tmp_path, keys, user_ca_keys=f"{ca}.pub"):
        await provision(edge, backend)  # alice's authorized_keys does not list the certified key
        rc, out, err = await edge.ssh("alice", "whoami", key=tmp_path / "alice_key")
        assert (rc, out) == (0, "backend-a alice\n"), err
        # A certificate for another principal does not open alice's account.
        rc, out, err = await edge.ssh("alice", "whoami", key=tmp_path / "bob_key")
        assert rc == 255 and "Permission denied" in err
        assert (await edge.log_lines())[0]["auth_method"] == "publickey"


async def test_idle_session_is_closed_after_idle_timeout(
        tmp_path: Path, keys: Path, backend: AsyncsshBackend) -> None:
    async for edge in make_edge(tmp_path, keys, idle_timeout=1.5):
        await provision(edge, backend)
        started = time.monotonic()
        rc, _, err = await edge.ssh("alice", "sleep", password="alice-pw", time_limit=60)
        assert rc == 255 and "idle for 2 s" in err
        assert time.monotonic() - started >= 1.5
        # A session that keeps talking is not idle, however long it lasts.
        rc, out, err = await edge.ssh("alice", "cat", password="alice-pw", stdin=b"x" * 10)
        assert (rc, out) == (0, "x" * 10), err


async def test_backend_host_key_announcements_never_reach_the_client(
        sshd_edge: Edge, sshd: Sshd) -> None:
    edge = sshd_edge
    # The client knows only the proxy's ed25519 key and accepts host key updates from "the server".
    known = edge.tmp / "known_hosts_one"
    known.write_text(edge.known_hosts.read_text().splitlines()[0] + "\n")
    args = [a.replace(str(edge.known_hosts), str(known)) for a in edge.ssh_args("alice", key=edge.user_key)]
    rc, _, err = await run(*args[:-1], "-o", "UpdateHostKeys=yes", "-o", "HostKeyAlgorithms=ssh-ed25519",
                           args[-1], "true")
    assert rc == 0, err
    assert "signature" not in err.lower()
    backend_keys = {line.split()[1] for line in sshd.host_pub.splitlines()}
    learned = {line.split()[2] for line in known.read_text().splitlines() if line.strip()}
    assert not backend_keys & learned


async def test_password_reaches_a_keyboard_interactive_only_backend_once(
        edge: Edge, backend: AsyncsshBackend) -> None:
    backend.password_method = False  # PAM-style: "Password:" over keyboard-interactive
    await provision(edge, backend)
    rc, out, err = await edge.ssh("alice", "whoami", password="alice-pw")
    assert (rc, out) == (0, "backend-a alice\n"), err
    rc, _, _ = await edge.ssh("alice", "whoami", password="wrong")
    assert rc == 255
    assert backend.password_attempts == [("alice", "['alice-pw']"), ("alice", "['wrong']")]


async def test_proxy_protocol_is_sent_to_backends_that_ask_for_it(
        edge: Edge, backend: AsyncsshBackend) -> None:
    port, headers, task = await backend.serve_behind_proxy_protocol()
    try:
        await provision(edge, backend)
        await edge.service.update_host("web1", ssh_port=port, send_proxy_protocol="v1")
        await host_settled(edge, "web1", send_proxy_protocol="v1")
        rc, out, err = await edge.ssh("alice", "whoami", password="alice-pw")
        assert (rc, out) == (0, "backend-a alice\n"), err
        assert len(headers) == 1
        fields = headers[0].split()
        # PROXY TCP4 <client ip> <proxy's own address> <client port> <backend port>
        assert fields[:4] == [b"PROXY", b"TCP4", b"127.0.0.1", b"127.0.0.1"]
        line = (await edge.log_lines())[-1]
        assert line["client"] == f"127.0.0.1:{int(fields[4])}"
    finally:
        task.cancel()


async def test_every_offered_key_is_tried(sshd_edge: Edge, keys: Path) -> None:
    edge = sshd_edge
    args = edge.ssh_args("alice")  # the stranger's key first, the authorized one second
    rc, out, err = await run(*args[:-1], "-i", str(keys / "stranger"), "-i", str(edge.user_key),
                             args[-1], "echo in")
    assert (rc, out) == (0, "in\n"), err


async def test_address_and_user_ban_stops_guessing_one_account_but_not_others(
        tmp_path: Path, keys: Path, backend: AsyncsshBackend) -> None:
    limits = LimitsConfig(max_failures_per_ip_user=2, max_failures_per_ip=100)
    async for edge in make_edge(tmp_path, keys, limits=limits):
        await provision(edge, backend)
        await edge.service.add_account("bob", "acme", protocols=["ssh"])
        for _ in range(2):
            assert (await edge.ssh("alice", "whoami", password="guess"))[0] == 255
        rc, _, err = await edge.ssh("alice", "whoami", password="alice-pw")
        assert rc == 255 and "Permission denied" in err
        rc, out, err = await edge.ssh("bob", "whoami", password="bob-pw")
        assert (rc, out) == (0, "backend-a bob\n"), err
        assert (await edge.log_lines())[-2]["reason"] == \
            "too many failed logins for user 'alice' from 127.0.0.1"


async def test_backend_down_is_a_clear_disconnect_not_permission_denied(
        edge: Edge, backend: AsyncsshBackend) -> None:
    await provision(edge, backend)
    await edge.service.update_host("web1", ssh_port=free_port())  # nothing listens there
    await host_settled(edge, "web1", state="active")
    await host_settled(edge, "web1", ssh_port=(await edge.service.get_host("web1")).ssh_port)
    rc, out, err = await edge.ssh("alice", "whoami", password="alice-pw")
    assert rc == 255 and out == ""
    assert "backend unavailable, try again later" in err and "Permission denied" not in err
    line = (await edge.log_lines())[-1]
    assert line["outcome"] == "upstream_error" and "unreachable" in line["reason"]


def _askpass_2fa(tmp: Path) -> Path:
    """An SSH_ASKPASS that answers the 2FA backend's prompts and records them in <it>.prompts."""
    askpass = tmp / "askpass-2fa"
    askpass.write_text('#!/bin/sh\necho "$1" >> "$0.prompts"\n'
                       'case "$1" in *Password*) echo carol-pw ;; *code*) echo 424242 ;; esac\n')
    askpass.chmod(0o755)
    return askpass


def _read(path: Path) -> str:
    return path.read_text()


async def test_stock_ssh_two_factor_prompts_are_relayed(edge: Edge, backend: AsyncsshBackend) -> None:
    await provision(edge, backend, user="carol")
    askpass = _askpass_2fa(edge.tmp)
    env = {**os.environ, "SSH_ASKPASS": str(askpass), "SSH_ASKPASS_REQUIRE": "force"}
    args = [*edge.ssh_args("carol", batch=False), "-o", "PreferredAuthentications=keyboard-interactive",
            "whoami"]
    rc, out, err = await run(*args, env=env)
    assert (rc, out) == (0, "backend-a carol\n"), err
    prompts = _read(Path(f"{askpass}.prompts"))
    assert "Password:" in prompts and "Verification code:" in prompts


# -- algorithms: nothing ssh-audit fails (SHA-1, NIST curves, small DH groups, CBC) -----------

SSH_AUDIT = str(Path(sys.executable).with_name("ssh-audit"))


def _failures(report: dict[str, Any]) -> list[str]:
    """Every algorithm ssh-audit marks as a failure, as ``"section alg: why"``."""
    return [f"{section} {entry['algorithm']}: {'; '.join(entry['notes']['fail'])}"
            for section in ("kex", "key", "enc", "mac")
            for entry in report.get(section, [])
            if entry.get("notes", {}).get("fail")]


async def test_ssh_audit_finds_no_failures_on_the_listener(edge: Edge) -> None:
    proc = await asyncio.create_subprocess_exec(
        SSH_AUDIT, "--json", "--skip-rate-test", "--timeout", "20", "-p", str(edge.port), "127.0.0.1",
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    report = json.loads(out)
    assert report.get("kex") and report.get("key"), (out, err)
    assert _failures(report) == []
    offered = {entry["algorithm"] for entry in report["key"]}
    assert offered == {"ssh-ed25519", "rsa-sha2-512", "rsa-sha2-256"}


async def test_client_offering_only_sha1_rsa_host_keys_cannot_connect(
        edge: Edge, backend: AsyncsshBackend) -> None:
    await provision(edge, backend)
    rc, out, err = await run(*edge.ssh_args("alice")[:-1], "-o", "HostKeyAlgorithms=ssh-rsa",
                             "-o", "PreferredAuthentications=publickey", "-i", str(edge.user_key),
                             "alice@127.0.0.1", "whoami", time_limit=60)
    assert rc == 255 and out == ""
    assert "no matching host key type found" in err
    # The stock client with its defaults still logs in.
    rc, out, err = await edge.ssh("alice", "whoami")
    assert (rc, out) == (0, "backend-a alice\n"), err


# -- a backend that accepts and never answers --------------------------------------------------


async def test_silent_backend_is_reported_within_upstream_connect_timeout(
        tmp_path: Path, keys: Path, backend: AsyncsshBackend) -> None:
    """TCP accepted, not one byte back (a hung sshd, a full accept queue behind a firewall):
    the user hears "backend unavailable" after upstream_connect_timeout, not a bare
    "Connection closed" at the login grace time."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    accepted: list[socket.socket] = []
    loop = asyncio.get_running_loop()
    silent.setblocking(False)

    async def accept() -> None:
        while True:
            sock, _ = await loop.sock_accept(silent)
            accepted.append(sock)  # held open, never written to

    acceptor = asyncio.ensure_future(accept())
    try:
        async for edge in make_edge(tmp_path, keys, upstream_connect_timeout=2.0,
                                    limits=LimitsConfig(login_grace_time=60.0)):
            await provision(edge, backend)
            await edge.service.update_host("web1", ssh_port=silent.getsockname()[1])
            await host_settled(edge, "web1", ssh_port=silent.getsockname()[1])
            for login in (edge.ssh("alice", "whoami"), edge.ssh("alice", "whoami", password="alice-pw")):
                started = time.monotonic()
                rc, out, err = await login
                took = time.monotonic() - started
                assert rc == 255 and out == ""
                assert "backend unavailable, try again later" in err and "Permission denied" not in err
                assert took < 30, f"the client waited {took:.1f} s"
            lines = await edge.log_lines()
            assert [line["outcome"] for line in lines[-2:]] == ["upstream_error"] * 2
            assert "did not complete the SSH handshake within 2 s" in lines[-1]["reason"]
            assert accepted
    finally:
        acceptor.cancel()
        for sock in accepted:
            sock.close()
        silent.close()


async def test_backend_that_never_answers_the_password_is_reported_within_the_timeout(
        tmp_path: Path, keys: Path, backend: AsyncsshBackend) -> None:
    """Key exchange done, then the backend sits on the password (a hung PAM or LDAP): the user
    hears "backend unavailable" upstream_connect_timeout after giving it, not at login grace."""
    backend.password_stall = 3600
    async for edge in make_edge(tmp_path, keys, upstream_connect_timeout=2.0,
                                limits=LimitsConfig(login_grace_time=60.0)):
        await provision(edge, backend)
        started = time.monotonic()
        rc, out, err = await edge.ssh("alice", "whoami", password="alice-pw")
        took = time.monotonic() - started
        assert rc == 255 and out == ""
        assert "backend unavailable, try again later" in err and "Permission denied" not in err
        assert took < 30, f"the client waited {took:.1f} s"
        assert backend.password_attempts == [("alice", "alice-pw")]
        line = (await edge.log_lines())[-1]
        assert line["outcome"] == "upstream_error"
        assert "did not answer the login within 2 s" in line["reason"]


# -- memory: closed connections are freed without the cyclic GC -------------------------------


async def test_abandoned_connections_are_freed_without_the_cyclic_gc(
        tmp_path: Path, keys: Path, backend: AsyncsshBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    async for edge in make_edge(tmp_path, keys, limits=LimitsConfig(max_unauthenticated_per_ip=1000)):
        await _flood_then_count_survivors(edge, backend, monkeypatch)


async def _flood_then_count_survivors(edge: Edge, backend: AsyncsshBackend,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A flood of connections that never log in (TCP only, identification only, failed logins
    of an unknown and of a routed account), then two sessions: every asyncssh connection
    object (both legs) is gone once closed, by reference counting alone (the cyclic GC is off
    meanwhile). Workers run the cyclic GC rarely (edge.serve.worker.GC_THRESHOLDS), so what
    only it can free stays in a worker's memory after a flood."""
    await provision(edge, backend)
    made: list[weakref.ref[asyncssh.SSHServerConnection | asyncssh.SSHClientConnection]] = []
    upstream_made: list[weakref.ref[asyncssh.SSHClientConnection]] = []
    connection_made = ClientConnection.connection_made
    upstream_connection_made = _UpstreamClient.connection_made

    def watched(self: ClientConnection, conn: asyncssh.SSHServerConnection) -> None:
        made.append(weakref.ref(conn))
        connection_made(self, conn)

    def upstream_watched(self: _UpstreamClient, conn: asyncssh.SSHClientConnection) -> None:
        upstream_made.append(weakref.ref(conn))
        upstream_connection_made(self, conn)

    monkeypatch.setattr(ClientConnection, "connection_made", watched)
    monkeypatch.setattr(_UpstreamClient, "connection_made", upstream_watched)

    async def abandon(identify: bool) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", edge.port)
        if identify:
            writer.write(b"SSH-2.0-flood\r\n")
            await reader.readline()
        writer.close()

    async def fail_login() -> None:
        with contextlib.suppress(asyncssh.PermissionDenied):
            async with asyncssh.connect("127.0.0.1", edge.port, username="mallory", password="x",
                                        known_hosts=None, config=None, client_keys=None,
                                        preferred_auth="password"):
                pass

    gc.collect()
    gc.disable()
    try:
        for start in range(0, 300, 50):
            await asyncio.gather(*(abandon(identify=i % 2 == 0) for i in range(start, start + 50)))
        await asyncio.gather(*(fail_login() for _ in range(5)))
        rc, _, err = await edge.ssh("alice", "whoami", password="wrong")  # a routed account
        assert rc == 255 and "Permission denied" in err
        # And sessions that did log in (both legs, the bridge's channels).
        rc, out, err = await edge.ssh("alice", "whoami")
        assert (rc, out) == (0, "backend-a alice\n"), err
        rc, out, err = await edge.ssh("alice", "cat", password="alice-pw", stdin=b"x" * 100_000)
        assert (rc, len(out)) == (0, 100_000), err
        await edge.log_lines()  # every connection closed
        made += upstream_made
        for _ in range(100):  # bounded: connection_lost runs a moment after the client left
            if not any(ref() is not None for ref in made):
                break
            await asyncio.sleep(0.1)
        alive = Counter(type(conn).__name__ for ref in made if (conn := ref()) is not None)
        assert len(made) > 250 and len(upstream_made) >= 3 and not alive, \
            f"still in memory of {len(made)} closed connections: {dict(alive)}"
    finally:
        gc.enable()


async def test_backend_signing_its_host_key_only_with_sha1_is_refused(
        edge: Edge, keys: Path) -> None:
    """The upstream leg takes no ``ssh-rsa`` (SHA-1) host-key signature either, even for a
    pinned RSA key; the same key signed with rsa-sha2 is fine."""
    rsa = asyncssh.generate_private_key("ssh-rsa", key_size=2048)
    old = AsyncsshBackend("old-sshd", upstream_key(keys), host_key=rsa, host_key_algs=("ssh-rsa",))
    await old.start()
    try:
        await provision(edge, old)
        rc, out, err = await edge.ssh("alice", "whoami", password="alice-pw")
        assert rc == 255 and out == ""
        assert "backend unavailable, try again later" in err
        assert old.password_attempts == []  # the password never went to that backend
        line = (await edge.log_lines())[-1]
        assert line["outcome"] == "upstream_error" and "host key" in line["reason"].lower()
    finally:
        await old.stop()
    current = AsyncsshBackend("backend-a", upstream_key(keys), host_key=rsa)
    await current.start()
    try:
        await edge.service.update_host("web1", ssh_port=current.port)
        await host_settled(edge, "web1", ssh_port=current.port)
        rc, out, err = await edge.ssh("alice", "whoami", password="alice-pw")
        assert (rc, out) == (0, "backend-a alice\n"), err
    finally:
        await current.stop()


async def test_ssh_logs_in_with_the_accounts_ssh_upstream_username(
        edge: Edge, backend: AsyncsshBackend) -> None:
    """An account's backend name can differ per protocol: SSH uses ssh_upstream_username,
    not the FTP one nor the common default (issue 16: one --upstream-username for both)."""
    await add_backend_host(edge, "web1", backend)
    await edge.service.add_tenant("acme", "web1")
    await edge.service.add_account("alice-panel", "acme", protocols=["ssh", "ftp"],
                                   upstream_username="nobody", ssh_upstream_username="bob",
                                   ftp_upstream_username="bob-ftp")
    rc, out, err = await edge.ssh("alice-panel", "whoami", password="bob-pw")
    assert (rc, out) == (0, "backend-a bob\n"), err
    assert backend.password_attempts == [("bob", "bob-pw")]
