"""Backends that answer for every site of a synthetic fleet, one endpoint per simulated host.

* HTTP: one nginx serving all simulated hosts (``listen 127.0.0.x:PORT`` per host); any
  ``Host`` gets ``200 ok HOST via ADDRESS:PORT`` (so a client can tell which simulated host
  answered: the move scenario uses it), ``Cache-Control: public, max-age=300``.
  ``/bytes`` answers 64 KiB for throughput runs.
* FTP: ``python -m benchmarks.backends ftp`` — pyftpdlib, one server per simulated host in one
  process, one virtual user with a home directory holding test files.
* SSH: the system ``sshd`` on per-host addresses, run as root with its own config, host key,
  and an ``AuthorizedKeysFile`` in the scenario's scratch folder (see :func:`start_sshd`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from benchmarks.procs import NGINX, Child, free_port, nginx_main_conf, spawn, start_nginx, wait_port

SSHD = "/usr/sbin/sshd"
ROOT = str(Path(__file__).resolve().parent.parent)


def host_endpoints(addresses: Sequence[str]) -> list[tuple[str, int]]:
    """A free port for each simulated host address."""
    return [(address, free_port(address)) for address in addresses]


async def start_http_backend(workdir: Path, addresses: Sequence[str], *, workers: int = 1) -> Child:
    """nginx answering on one ``address:port`` per simulated host (``child.ports`` holds
    ``"<index>" → port`` in host order)."""
    endpoints = host_endpoints(addresses)
    listens = "\n".join(f"    listen {a}:{p};" for a, p in endpoints)
    folder = workdir / "backend-nginx"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "bytes.bin").write_bytes(b"x" * 65536)
    body = f"""
  server {{
{listens}
    server_name _;
    location / {{
      add_header Cache-Control "public, max-age=300";
      return 200 "ok $host via $server_addr:$server_port\\n";
    }}
    location = /bytes {{
      add_header Cache-Control "no-store";
      default_type application/octet-stream;
      alias {folder}/bytes.bin;
    }}
  }}"""
    child = await start_nginx(workdir, "backend-nginx", nginx_main_conf(folder, body, workers=workers),
                              endpoints[:1] + endpoints[-1:])
    child.ports = {str(i): p for i, (_, p) in enumerate(endpoints)}
    return child


async def start_ftp_backend(workdir: Path, addresses: Sequence[str], user: str, password: str,
                            *, big_bytes: int = 8 << 20) -> Child:
    """pyftpdlib on every address (free ports); ``child.ports["<index>"]``. The user's home
    holds ``small.bin`` (1 KiB) and ``big.bin`` (``big_bytes``)."""
    home = workdir / "ftp-home"
    home.mkdir(parents=True, exist_ok=True)
    (home / "small.bin").write_bytes(os.urandom(1024))
    (home / "big.bin").write_bytes(os.urandom(big_bytes))
    endpoints = host_endpoints(addresses)
    child = spawn("backend-ftp", [sys.executable, "-m", "benchmarks.backends", "ftp",
                                  "--user", user, "--password", password, "--home", str(home),
                                  *[f"{a}:{p}" for a, p in endpoints]], workdir,
                  env={**os.environ, "PYTHONPATH": ROOT})
    for address, port in endpoints[:1] + endpoints[-1:]:
        await wait_port(address, port, 30, child)
    child.ports = {str(i): p for i, (_, p) in enumerate(endpoints)}
    return child


async def start_sshd(workdir: Path, addresses: Sequence[str], authorized_keys: str) -> Child:
    """The system sshd listening on every address (free ports), key auth only, accepting
    ``authorized_keys`` for any user (we run as root; the benchmark logs in as this user)."""
    folder = workdir / "sshd"
    folder.mkdir(parents=True, exist_ok=True)
    host_key = folder / "host_ed25519"
    if not host_key.exists():
        keygen = await asyncio.create_subprocess_exec(
            "ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host_key))
        if await keygen.wait():
            raise RuntimeError("ssh-keygen failed")
    keys = folder / "authorized_keys"
    keys.write_text(authorized_keys)
    keys.chmod(0o600)
    endpoints = host_endpoints(addresses)
    lines = [f"ListenAddress {a}:{p}" for a, p in endpoints]
    lines += [f"HostKey {host_key}", f"PidFile {folder}/sshd.pid", f"AuthorizedKeysFile {keys}",
              "StrictModes no", "PasswordAuthentication no", "KbdInteractiveAuthentication no",
              "PubkeyAuthentication yes", "PermitRootLogin prohibit-password", "UsePAM no",
              "MaxStartups 200:30:400", "MaxSessions 100", "LogLevel ERROR",
              "Subsystem sftp internal-sftp", "PrintMotd no"]
    config = folder / "sshd_config"
    config.write_text("\n".join(lines) + "\n")
    with contextlib.suppress(OSError):  # privilege separation directory (needed as root)
        os.makedirs("/run/sshd", exist_ok=True)
    child = spawn("sshd", [SSHD, "-D", "-e", "-f", str(config)], folder)
    for address, port in endpoints[:1] + endpoints[-1:]:
        await wait_port(address, port, 30, child)
    child.ports = {str(i): p for i, (_, p) in enumerate(endpoints)}
    return child


def host_key_line(workdir: Path) -> str:
    """The sshd's public host key (``ssh-ed25519 AAAA...``) for pinning."""
    return (workdir / "sshd" / "host_ed25519.pub").read_text().strip()


# -- the FTP backend process ----------------------------------------------------------------

def _serve_ftp(args: argparse.Namespace) -> None:
    from pyftpdlib.authorizers import DummyAuthorizer
    from pyftpdlib.handlers import FTPHandler
    from pyftpdlib.ioloop import IOLoop
    from pyftpdlib.servers import FTPServer

    authorizer = DummyAuthorizer()
    authorizer.add_user(args.user, args.password, args.home, perm="elradfmwMT")
    handler = type("BenchHandler", (FTPHandler,), {"authorizer": authorizer,
                                                   "banner": "bench backend ready"})
    ioloop = IOLoop.instance()
    for endpoint in args.endpoints:
        host, _, port = endpoint.rpartition(":")
        # The same listen backlog as the proxy's listener (4096), so a burst of simultaneous
        # SYNs is not dropped/retried on one side only (pyftpdlib's default is 100).
        server = FTPServer((host, int(port)), handler, ioloop=ioloop, backlog=4096)
        server.max_cons = 2048
    print(json.dumps({"event": "ready", "endpoints": args.endpoints}), flush=True)
    ioloop.loop()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.backends")
    sub = parser.add_subparsers(dest="mode", required=True)
    p = sub.add_parser("ftp", help="pyftpdlib on every HOST:PORT given")
    p.add_argument("--user", required=True)
    p.add_argument("--password", required=True)
    p.add_argument("--home", required=True)
    p.add_argument("endpoints", nargs="+", metavar="HOST:PORT")
    args = parser.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.ERROR)
    _serve_ftp(args)


if __name__ == "__main__":
    main()

__all__ = ["NGINX", "start_ftp_backend", "start_http_backend", "start_sshd"]
