"""The SSH part of ``edge demo``: two local SSH backends, pinned, and the commands to try.

The backends are small asyncssh servers (a real ``sshd`` needs root and system users): user
``demo`` with password ``demo`` (and the proxy's upstream key), a tiny command set (``hostname``
says which backend you reached, ``whoami``, ``echo``, ``exit N``) and SFTP confined to
``<demo dir>/backends/<name>``. They listen on the demo hosts' SSH ports (2201, 2202), so
``edge tenant move demo --to demo-b`` visibly moves the next login.

Run one by hand: ``python -m sshproxy.demo NAME PORT DIR``.
"""

from __future__ import annotations

import asyncio
import shlex
import subprocess
import sys
from pathlib import Path

import asyncssh

from edge.config import SshConfig
from edge.demo import DemoPart
from edge.directory.service import DirectoryService
from sshproxy.hostkeys import ensure_keys, host_key_path, pinned_lines

PROXY_PORT = 2222
BACKENDS = (("demo-a", 2201), ("demo-b", 2202))
USER, PASSWORD = "demo", "demo"


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
    processes: list[subprocess.Popen[bytes]] = [
        subprocess.Popen([sys.executable, "-m", "sshproxy.demo", name, str(port), str(demo_dir)])
        for name, port in BACKENDS]

    async def provision(service: DirectoryService) -> None:
        for name, _ in BACKENDS:
            await service.update_host(name, ssh_known_hosts=pinned_lines([keys[name]]))

    opts = f"-o UserKnownHostsFile={shlex.quote(str(known_hosts))}"
    commands = (
        f"  ssh:     ssh {opts} -p {PROXY_PORT} {USER}@127.0.0.1 hostname   (password: {PASSWORD};"
        " says demo-a, after the move below demo-b)\n"
        f"           sftp {opts} -P {PROXY_PORT} {USER}@127.0.0.1\n")
    return DemoPart(
        config=f'[ssh]\nlisten = ["127.0.0.1:{PROXY_PORT}"]\nhost_key_dir = "{ssh_dir}"\n',
        commands=commands, processes=processes, provision=provision)


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
