"""``edge demo``: a working edge on this machine with nothing but SQLite.

Creates ``.edge-demo/`` with a secret key, a configuration and a SQLite directory holding two
demo backend hosts, a tenant, an account and sites (one with a self-signed certificate stored
encrypted), then runs ``edge serve`` with whichever proxies are built, and prints exactly how
to connect. It grows as the proxies land: each proxy package may expose
``demo_backend(demo_dir) -> DemoBackend`` (see :mod:`edge.registry`).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import socket
import sys
from pathlib import Path

from edge.config import load_config
from edge.directory.secrets import KeyBox, generate_key
from edge.directory.service import DirectoryService
from edge.directory.stores import store_for_url


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


async def _provision(db_url: str, keybox: KeyBox) -> None:
    store = store_for_url(db_url)
    await store.open()
    try:
        await store.migrate()
        if await store.count("hosts"):
            return
        service = DirectoryService(store, keybox)
        await service.add_host("demo-a", "127.0.0.1", ssh_port=2201, ftp_port=2101,
                               http_port=8081, https_port=8443)
        await service.add_host("demo-b", "127.0.0.1", ssh_port=2202, ftp_port=2102,
                               http_port=8082, https_port=8444)
        await service.add_tenant("demo", "demo-a")
        await service.add_tenant("other", "demo-b")
        await service.add_account("demo", "demo")
        chain, key = self_signed(["www.demo.test", "*.demo.test"])
        cert_id = await service.import_certificate(chain, key)
        await service.add_site("www.demo.test", "demo", certificate_id=cert_id,
                               cache_policy={"mode": "static"})
        await service.add_site("*.demo.test", "demo", certificate_id=cert_id)
        await service.add_site("www.other.test", "other")
    finally:
        await store.close()


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
    config_file = demo_dir / "edge.toml"
    config_file.write_text(
        f'[database]\nurl = "{db_url}"\n\n[secrets]\nkey_file = "{key_file}"\n\n'
        f'[admin]\nlisten = ["127.0.0.1:{admin_port}"]\n\n[log]\nformat = "text"\n')
    config = load_config(config_file)
    asyncio.run(_provision(db_url, KeyBox.from_config(config.secrets)))
    edge = f"edge --config {config_file}"
    print(f"""
hosting edge demo — directory {db_url}
  admin:   curl http://127.0.0.1:{admin_port}/healthz
           curl http://127.0.0.1:{admin_port}/readyz
           curl -s http://127.0.0.1:{admin_port}/metrics | grep ^edge_
  look:    {edge} host list
           {edge} tenant show demo
           {edge} site list
           {edge} cert list
  route:   {edge} route shop.demo.test          (matched by *.demo.test -> demo-a)
           {edge} route --account demo
  move:    {edge} tenant move demo --to demo-b --drain 10
           {edge} route shop.demo.test          (now -> demo-b)
The SSH, FTP and HTTP proxies are not built yet (see the issue tracker); when they are, this
demo starts local backends for them and prints the ssh/ftp/curl commands here.
Ctrl-C stops the demo.
""", flush=True)
    if args.duration:
        import signal
        import threading

        threading.Timer(args.duration, lambda: os.kill(os.getpid(), signal.SIGTERM)).start()
    try:
        return int(serve(config))
    except KeyboardInterrupt:
        return 0
    finally:
        sys.stdout.flush()
