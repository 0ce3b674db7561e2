"""The SSH part of ``edge demo``: two local SSH backends, pinned, and the commands to try.

When OpenSSH's server is installed (``/usr/sbin/sshd``), each backend is a real ``sshd`` on
loopback, so a shell, ``scp``, ``rsync`` and ``git`` work through the proxy. A non-root sshd
can only log in its own user, so the demo account ``demo`` logs in to the backends as the user
running the demo (its *SSH* upstream username; FTP keeps ``demo``) with the proxy's upstream
key, and clients log in to the proxy with a generated demo key (``<demo dir>/ssh/client_key``).
Each sshd sets ``EDGE_DEMO_BACKEND`` to its host's name, so ``echo $EDGE_DEMO_BACKEND`` says
which backend you reached.

Without sshd (or if it cannot start), the backends are small asyncssh servers: user ``demo``
with password ``demo``, a tiny command set (``hostname`` says which backend you reached,
``whoami``, ``echo``, ``exit N``) and SFTP confined to ``<demo dir>/backends/<name>``. Run one
by hand: ``python -m sshproxy.demo NAME PORT DIR``.

Either way they listen on the demo hosts' SSH ports (2201, 2202), so
``edge tenant move demo --to demo-b`` visibly moves the next login.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import asyncssh

from edge.config import SshConfig
from edge.demo import DemoPart
from edge.directory.service import DirectoryService
from sshproxy.hostkeys import ensure_keys, host_key_path, pinned_lines

PROXY_PORT = 2222
BACKENDS = (("demo-a", 2201), ("demo-b", 2202))
USER, PASSWORD = "demo", "demo"
SSHD = "/usr/sbin/sshd"


def _backend_key(demo_dir: Path, name: str) -> asyncssh.SSHKey:
    """The backend's persistent host key (so the pin stays valid across demo runs)."""
    path = demo_dir / "ssh" / f"backend-{name}_key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(asyncssh.generate_private_key("ssh-ed25519").export_private_key())
        path.chmod(0o600)
    return asyncssh.read_private_key(str(path))


def demo_part(demo_dir: Path) -> DemoPart:
    """Keys, known_hosts, the two backends and the banner lines for ``edge demo``."""
    ssh_dir = demo_dir / "ssh"
    config = SshConfig(host_key_dir=str(ssh_dir))
    ensure_keys(config)
    known_hosts = ssh_dir / "known_hosts"
    known_hosts.write_text("".join(
        f"[127.0.0.1]:{PROXY_PORT} " + Path(f"{host_key_path(ssh_dir, kind)}.pub").read_text()
        for kind in ("ed25519", "ecdsa", "rsa")))
    keys = {name: _backend_key(demo_dir, name) for name, _ in BACKENDS}
    processes = _start_sshds(demo_dir) if os.path.exists(SSHD) else None
    real = processes is not None
    if processes is None:
        processes = [subprocess.Popen([sys.executable, "-m", "sshproxy.demo", name, str(port),
                                       str(demo_dir)]) for name, port in BACKENDS]
    client_key = _client_key(ssh_dir) if real else None

    async def provision(service: DirectoryService) -> None:
        for name, _ in BACKENDS:
            await service.update_host(name, ssh_known_hosts=pinned_lines([keys[name]]))
        # Idempotent and per run: a demo dir made without sshd works with it and back.
        await service.update_account(
            USER, ssh_upstream_username=getpass.getuser() if real else "",
            authorized_keys=client_key.export_public_key().decode() if client_key else "")

    opts = f"-o UserKnownHostsFile={shlex.quote(_shown(known_hosts))}"
    return DemoPart(
        config=f'[ssh]\nlisten = ["127.0.0.1:{PROXY_PORT}"]\nhost_key_dir = "{ssh_dir}"\n',
        commands=_real_commands(opts, ssh_dir) if real else _fallback_commands(opts),
        processes=processes, provision=provision)


def _shown(path: Path) -> str:
    """A path as the banner prints it: relative to the current directory when inside it."""
    with contextlib.suppress(ValueError):
        return str(path.relative_to(Path.cwd()))
    return str(path)


def _real_commands(opts: str, ssh_dir: Path) -> str:
    key = f"-i {shlex.quote(_shown(ssh_dir / 'client_key'))}"
    return (
        f"  ssh:     ssh {opts} {key} -p {PROXY_PORT} {USER}@127.0.0.1 'echo $EDGE_DEMO_BACKEND'"
        "   (says {demo_host}; after the move below {move_to})\n"
        f"           ssh {opts} {key} -p {PROXY_PORT} {USER}@127.0.0.1      (a real shell on the "
        "backend sshd)\n"
        f"           scp {opts} {key} -P {PROXY_PORT} README.md {USER}@127.0.0.1:/tmp/edge-demo-README.md\n"
        f"           rsync -e \"ssh {opts} {key} -p {PROXY_PORT}\" -a docs/ "
        f"{USER}@127.0.0.1:/tmp/edge-demo-docs/\n"
        f"           sftp {opts} {key} -P {PROXY_PORT} {USER}@127.0.0.1\n")


def _fallback_commands(opts: str) -> str:
    return (
        f"  ssh:     ssh {opts} -p {PROXY_PORT} {USER}@127.0.0.1 hostname   (password: {PASSWORD};"
        " says {demo_host}, after the move below {move_to})\n"
        f"           sftp {opts} -P {PROXY_PORT} {USER}@127.0.0.1\n"
        f"           (install openssh-server for a real sshd backend: shell, scp, rsync, git)\n")


def _client_key(ssh_dir: Path) -> asyncssh.SSHKey:
    """The demo client's key (OpenSSH format, for ``ssh -i``), made once and kept."""
    path = ssh_dir / "client_key"
    if not path.exists():
        key = asyncssh.generate_private_key("ssh-ed25519", comment="edge-demo")
        path.write_bytes(key.export_private_key())
        path.chmod(0o600)
        path.with_suffix(".pub").write_bytes(key.export_public_key())
    return asyncssh.read_private_key(str(path))


def _start_sshds(demo_dir: Path) -> list[subprocess.Popen[bytes]] | None:
    """A real sshd per backend host, or None (then the asyncssh backends run) if one does not
    come up: e.g. not root and /run/sshd missing, or a port taken."""
    ssh_dir = demo_dir / "ssh"
    upstream_pub = asyncssh.read_private_key(str(ssh_dir / "upstream_key")).export_public_key()
    (ssh_dir / "backend_authorized_keys").write_bytes(upstream_pub)
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(exist_ok=True)  # privilege separation directory root sshd wants
    started: list[subprocess.Popen[bytes]] = []
    for name, port in BACKENDS:
        config = ssh_dir / f"sshd-{name}.conf"
        config.write_text(_sshd_config(ssh_dir, name, port))
        proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        started.append(proc)
        if not _wait_listening(proc, port):
            for other in started:
                other.terminate()
                other.wait(timeout=5)
            return None
    return started


def _sshd_config(ssh_dir: Path, name: str, port: int) -> str:
    # Only the proxy's upstream key may log in, only as the user running the demo.
    return f"""Port {port}
ListenAddress 127.0.0.1
HostKey {ssh_dir / f"backend-{name}_key"}
PidFile none
UsePAM no
StrictModes no
PermitRootLogin prohibit-password
AllowUsers {getpass.getuser()}
AuthorizedKeysFile {ssh_dir / "backend_authorized_keys"}
PasswordAuthentication no
KbdInteractiveAuthentication no
SetEnv EDGE_DEMO_BACKEND={name}
Subsystem sftp internal-sftp
LogLevel ERROR
"""


def _wait_listening(proc: subprocess.Popen[bytes], port: int, limit: float = 5.0) -> bool:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return True
        time.sleep(0.05)
    return False


# -- the backend process -----------------------------------------------------------------------


class _BackendServer(asyncssh.SSHServer):
    def __init__(self, upstream_key: asyncssh.SSHKey) -> None:
        self._upstream_key = upstream_key

    def begin_auth(self, username: str) -> bool:
        return True

    def password_auth_supported(self) -> bool:
        return True

    def validate_password(self, username: str, password: str) -> bool:
        return (username, password) == (USER, PASSWORD)

    def public_key_auth_supported(self) -> bool:
        return True

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        return username == USER and key.public_data == self._upstream_key.public_data


def _command(name: str, process: asyncssh.SSHServerProcess[str]) -> int:
    words = shlex.split(process.command or "")
    if not words:
        process.stdout.write(f"Welcome to demo backend {name}. This is not a real shell: try "
                             "`hostname`, `whoami`, `echo ...`, `exit N`.\r\n")
        return 0
    match words[0]:
        case "hostname":
            process.stdout.write(name + "\n")
        case "whoami":
            process.stdout.write(USER + "\n")
        case "echo":
            process.stdout.write(" ".join(words[1:]) + "\n")
        case "env":
            process.stdout.write("".join(f"{k}={v}\n" for k, v in process.env.items()))
        case "exit":
            return int(words[1]) if len(words) > 1 and words[1].isdigit() else 0
        case _:
            process.stderr.write(f"{words[0]}: not available on the demo backend\n")
            return 127
    return 0


async def _serve_backend(name: str, port: int, demo_dir: Path) -> None:
    root = demo_dir / "backends" / name
    root.mkdir(parents=True, exist_ok=True)
    upstream_key = asyncssh.read_private_key(str(demo_dir / "ssh" / "upstream_key"))

    def sftp_factory(chan: asyncssh.SSHServerChannel[bytes]) -> asyncssh.SFTPServer:
        return asyncssh.SFTPServer(chan, chroot=str(root).encode())

    def handle(process: asyncssh.SSHServerProcess[str]) -> None:
        process.exit(_command(name, process))

    await asyncssh.listen("127.0.0.1", port, server_host_keys=[_backend_key(demo_dir, name)],
                          server_factory=lambda: _BackendServer(upstream_key),
                          process_factory=handle, sftp_factory=sftp_factory, config=None)
    await asyncio.Event().wait()


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: python -m sshproxy.demo NAME PORT DEMO_DIR", file=sys.stderr)
        return 2
    try:
        asyncio.run(_serve_backend(argv[0], int(argv[1]), Path(argv[2])))
    except OSError as exc:
        print(f"demo SSH backend {argv[0]}: cannot listen on 127.0.0.1:{argv[1]}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))


__all__ = ["demo_part"]
