"""``edge demo``: a working edge on this machine with nothing but SQLite.

Creates ``.edge-demo/`` with a secret key, a configuration and a SQLite directory holding two
demo backend hosts, two tenants, an account and sites (one with a self-signed certificate
stored encrypted), starts local backends for every proxy that is built, runs ``edge serve``
and prints exactly how to connect.

Each proxy package contributes through ``<package>.demo:demo_part(demo_dir) -> DemoPart``
(listed in :data:`DEMO_PARTS`, imported lazily so ``edge`` never imports a proxy at the top).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import importlib
import os
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from edge.config import load_config
from edge.directory.secrets import KeyBox, generate_key
from edge.directory.service import DirectoryService
from edge.directory.stores import store_for_url
from edge.errors import EdgeError
from edge.ports import AddressInUse, check_free

DEMO_PARTS = ("httpproxy.demo:demo_part", "sshproxy.demo:demo_part", "ftpproxy.demo:demo_part",
              "edge.acme.demo:demo_part")
"""Where each proxy's demo contribution lives; a missing module is simply not shown."""


@dataclass
class DemoPart:
    """One proxy's share of the demo.

    ``config`` is TOML appended to the demo's ``edge.toml`` (its listener section);
    ``commands`` is printed in the banner; ``processes`` are local backends the demo terminates
    when it stops; ``provision`` runs at every start after the base provisioning and must be
    idempotent.
    """

    config: str
    commands: str
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    provision: Callable[[DirectoryService], Awaitable[None]] | None = None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def self_signed(names: list[str], days: int = 30) -> tuple[bytes, bytes]:
    """A throw-away certificate and key for the demo (and tests)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


def load_parts(demo_dir: Path, targets: tuple[str, ...] = DEMO_PARTS) -> list[DemoPart]:
    """Every built proxy's :class:`DemoPart`; a proxy package without a demo is skipped."""
    parts = []
    for target in targets:
        module_name, _, attr = target.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError):
            continue
        parts.append(factory(demo_dir))
    return parts


async def _provision(db_url: str, keybox: KeyBox, parts: list[DemoPart]) -> None:
    store = store_for_url(db_url)
    await store.open()
    try:
        await store.migrate()
        service = DirectoryService(store, keybox)
        if not await store.count("hosts"):
            await _provision_base(service)
        for part in parts:
            if part.provision is not None:
                await part.provision(service)
    finally:
        await store.close()


class DemoHost(NamedTuple):
    name: str
    ssh_port: int
    ftp_port: int
    http_port: int
    https_port: int


DEMO_HOSTS = (DemoHost("demo-a", 2201, 2101, 8081, 8443), DemoHost("demo-b", 2202, 2102, 8082, 8444))
"""The demo's backend hosts; each proxy's demo part runs a backend on its protocol's port
(HTTPS goes to the plain HTTP backend, so nothing listens on ``https_port``)."""


def _check_backend_ports() -> None:
    """Refuse to start a second demo (or one next to something else on its ports): its
    backends would die on ``Address already in use`` while the edge shares its listeners."""
    for host in DEMO_HOSTS:
        for port in (host.ssh_port, host.ftp_port, host.http_port):
            try:
                check_free("127.0.0.1", port)
            except AddressInUse as exc:
                raise EdgeError(f"demo backend: {exc}") from None


async def _provision_base(service: DirectoryService) -> None:
    for host in DEMO_HOSTS:
        await service.add_host(host.name, "127.0.0.1", ssh_port=host.ssh_port,
                               ftp_port=host.ftp_port, http_port=host.http_port,
                               https_port=host.https_port)
    await service.add_tenant("demo", "demo-a")
    await service.add_tenant("other", "demo-b")
    await service.add_account("demo", "demo")
    chain, key = self_signed(["www.demo.test", "*.demo.test"])
    cert_id = await service.import_certificate(chain, key)
    await service.add_site("www.demo.test", "demo", certificate_id=cert_id,
                           cache_policy={"mode": "static"})
    await service.add_site("*.demo.test", "demo", certificate_id=cert_id)
    await service.add_site("www.other.test", "other")


def _stop(processes: list[subprocess.Popen[bytes]]) -> None:
    for proc in processes:
        if proc.poll() is None:
            proc.terminate()
    for proc in processes:
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()


def run_demo(args: argparse.Namespace) -> int:
    from edge.serve.supervisor import serve

    demo_dir = Path(args.dir).resolve()
    demo_dir.mkdir(parents=True, exist_ok=True)
    key_file = demo_dir / "secret.key"
    if not key_file.exists():
        key_file.write_text(generate_key() + "\n")
        key_file.chmod(0o600)
    db_url = f"sqlite:///{demo_dir / 'edge.sqlite3'}"
    admin_port = _free_port()
    _check_backend_ports()
    parts = load_parts(demo_dir)
    processes = [proc for part in parts for proc in part.processes]
    try:
        config_file = demo_dir / "edge.toml"
        config_file.write_text(
            f'[database]\nurl = "{db_url}"\n\n[secrets]\nkey_file = "{key_file}"\n\n'
            f'[admin]\nlisten = ["127.0.0.1:{admin_port}"]\n\n[log]\nformat = "text"\n\n'
            + "\n".join(part.config for part in parts))
        config = load_config(config_file)
        asyncio.run(_provision(db_url, KeyBox.from_config(config.secrets), parts))
        edge = f"edge --config {config_file}"
        proxies = "\n".join(part.commands.rstrip() for part in parts) or (
            "  (no proxy package is built yet: only the directory and admin API run)")
        print(f"""
hosting edge demo — directory {db_url}
{proxies}
  admin:   curl http://127.0.0.1:{admin_port}/healthz
           curl -s http://127.0.0.1:{admin_port}/metrics | grep ^edge_
  look:    {edge} host list
           {edge} site list
           {edge} route shop.demo.test          (matched by *.demo.test -> demo-a)
           {edge} route --account demo
  move:    {edge} tenant move demo --to demo-b --drain 10
           {edge} route shop.demo.test          (now -> demo-b; every proxy follows within ~1 s)
Ctrl-C stops the demo.
""", flush=True)
        if args.duration:
            import signal
            import threading

            timer = threading.Timer(args.duration, lambda: os.kill(os.getpid(), signal.SIGTERM))
            timer.daemon = True  # a demo stopped earlier (Ctrl-C, SIGTERM) must not wait for it
            timer.start()
        try:
            return int(serve(config))
        except KeyboardInterrupt:
            return 0
    finally:
        _stop(processes)
        sys.stdout.flush()
