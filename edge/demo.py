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
import shlex
import shutil
import signal
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
    parts: list[DemoPart] = []
    for target in targets:
        module_name, _, attr = target.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError):
            continue
        try:
            parts.append(factory(demo_dir))
        except BaseException:
            # The parts before it already started their backends: left running, they would
            # hold the demo's fixed ports and the next `edge demo` would refuse to start.
            _stop([proc for part in parts for proc in part.processes])
            raise
    return parts


class DemoState(NamedTuple):
    """Where the demo's tenants live *now* (a previous run may have moved them): the banner
    is written from this, never from the initial layout."""

    demo_host: str
    other_host: str

    @property
    def move_to(self) -> str:
        return "demo-b" if self.demo_host == "demo-a" else "demo-a"


async def _provision(db_url: str, keybox: KeyBox, parts: list[DemoPart]) -> DemoState:
    store = store_for_url(db_url)
    await store.open()
    try:
        await store.migrate()
        service = DirectoryService(store, keybox, actor="demo")
        if not await store.count("hosts"):
            await _provision_base(service)
        for part in parts:
            if part.provision is not None:
                await part.provision(service)
        demo, other = await service.get_tenant("demo"), await service.get_tenant("other")
        return DemoState(demo.host, other.host)
    finally:
        await store.close()


def edge_command() -> str:
    """How to run this very ``edge`` from a fresh shell, without activating its virtualenv:
    the ``edge`` script next to this Python (relative to the current directory when inside
    it: ``.venv/bin/edge``), else ``python -m edge.cli.main``."""
    script = Path(sys.executable).parent / "edge"
    if not script.exists():
        return f"{shlex.quote(sys.executable)} -m edge.cli.main"
    try:
        shown = str(script.relative_to(Path.cwd()))
    except ValueError:
        return shlex.quote(str(script))
    return shlex.quote(shown if "/" in shown else f"./{shown}")


def reset_demo_dir(demo_dir: Path) -> None:
    """``edge demo --reset``: start from scratch (new directory, keys, certificate). Only a
    directory the demo made is removed, never an arbitrary ``--dir``."""
    if not demo_dir.exists():
        return
    made_by_demo = (demo_dir / "edge.toml").exists() or (demo_dir / "edge.sqlite3").exists()
    if not made_by_demo:
        raise EdgeError(f"--reset: {demo_dir} does not look like a demo directory "
                        "(no edge.toml); remove it yourself if you mean it")
    shutil.rmtree(demo_dir)


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


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _fill(commands: str, state: DemoState) -> str:
    """A part's banner lines with the tenants' current hosts (``{demo_host}``, ``{move_to}``,
    ``{other_host}``); plain replace, since the commands themselves may hold braces."""
    return (commands.replace("{demo_host}", state.demo_host)
            .replace("{move_to}", state.move_to).replace("{other_host}", state.other_host))


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

    # SIGTERM before `serve` installs its own handler (the demo still starting its backends)
    # must still run the `finally` below, or the backends outlive the demo on its ports.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    demo_dir = Path(args.dir).resolve()
    if getattr(args, "reset", False):
        reset_demo_dir(demo_dir)
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
        state = asyncio.run(_provision(db_url, KeyBox.from_config(config.secrets), parts))
        shown_config = config_file.relative_to(Path.cwd()) \
            if config_file.is_relative_to(Path.cwd()) else config_file
        edge = f"{edge_command()} --config {shlex.quote(str(shown_config))}"
        proxies = "\n".join(_fill(part.commands.rstrip(), state) for part in parts) or (
            "  (no proxy package is built yet: only the directory and admin API run)")
        print(f"""
hosting edge demo — directory {db_url}
{proxies}
  admin:   curl http://127.0.0.1:{admin_port}/healthz
           curl -s http://127.0.0.1:{admin_port}/metrics | grep ^edge_
  look:    {edge} host list
           {edge} site list
           {edge} route shop.demo.test          (matched by *.demo.test -> {state.demo_host})
           {edge} route --account demo
           {edge} check
  move:    {edge} tenant move demo --to {state.move_to} --drain 10
           {edge} route shop.demo.test          (now -> {state.move_to}; every proxy follows within ~1 s)
           {edge} changes list                  (what changed, before -> after, and by whom)
  (the edge commands run from this directory; or `source .venv/bin/activate` and type `edge`)
Ctrl-C stops the demo; `edge demo --reset` (./dev demo --reset) starts it from scratch.
""", flush=True)
        if args.duration:
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
