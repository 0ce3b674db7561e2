"""A local ACME CA for ``edge demo``, tests and benchmarks: Debian's ``pebble`` with
``pebble-challtestsrv`` as its DNS. Never used in production.

Everything on loopback: challtestsrv answers every A query with 127.0.0.1 (AAAA: none), so
pebble validates HTTP-01 / TLS-ALPN-01 against the edge's own listeners, whose ports are
given as pebble's ``httpPort`` / ``tlsPort``. ``PEBBLE_VA_NOSLEEP=1`` (no artificial
validation delay), ``PEBBLE_WFE_NONCEREJECT=0`` (no random bad nonces), and
``PEBBLE_AUTHZREUSE=0`` so that each order really validates.

:meth:`Pebble.orders` counts the orders pebble created (its log line per order): the
number the SNI-flood and racing tests assert on.
"""

from __future__ import annotations

import json
import shutil
import socket
import ssl
import subprocess
import time
import urllib.request
from pathlib import Path

PEBBLE = shutil.which("pebble") or "/usr/bin/pebble"
CHALLTESTSRV = shutil.which("pebble-challtestsrv") or "/usr/bin/pebble-challtestsrv"


def _listener_certificate() -> tuple[bytes, bytes]:
    """pebble's own HTTPS certificate (self-signed; clients trust it as ``ca_file``)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pebble")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .sign(key, hashes.SHA256()))
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


START_ATTEMPTS = 3
"""Starts tried when a port picked free was taken before pebble bound it."""


def available() -> bool:
    return Path(PEBBLE).exists() and Path(CHALLTESTSRV).exists()


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Pebble:
    """pebble + challtestsrv, stopped by :meth:`stop`."""

    def __init__(self, workdir: Path, *, http_port: int, tls_port: int,
                 eab: dict[str, str] | None = None) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        chain, key = _listener_certificate()
        self.ca_file = workdir / "pebble-listener.pem"
        self.ca_file.write_bytes(chain)
        (workdir / "pebble-listener.key").write_bytes(key)
        self.http_port, self.tls_port, self.eab = http_port, tls_port, eab
        self.log_path = workdir / "pebble.log"
        # The ports are picked free and bound by pebble moments later: on a busy machine one
        # may be taken meanwhile ("bind: address already in use"), so start again on new ones.
        for attempt in range(START_ATTEMPTS):
            self._start()
            try:
                self._wait_up()
                return
            except AssertionError:
                in_use = "address already in use" in self.log()
                self.stop()
                if not in_use or attempt == START_ATTEMPTS - 1:
                    raise

    def _start(self) -> None:
        """Pick free ports, write pebble's configuration, start challtestsrv and pebble."""
        workdir = self.workdir
        self.port = free_port()
        self.management_port = free_port()
        self.dns_port = free_port(socket.SOCK_DGRAM)
        self.dns_management_port = free_port()
        pebble: dict[str, object] = {
            "listenAddress": f"127.0.0.1:{self.port}",
            "managementListenAddress": f"127.0.0.1:{self.management_port}",
            "certificate": str(self.ca_file), "privateKey": str(workdir / "pebble-listener.key"),
            "httpPort": self.http_port, "tlsPort": self.tls_port, "ocspResponderURL": "",
            "externalAccountBindingRequired": self.eab is not None,
        }
        if self.eab is not None:
            pebble["externalAccountMACKeys"] = self.eab
        (workdir / "pebble.json").write_text(json.dumps({"pebble": pebble}))
        self._log = self.log_path.open("wb")
        self.dns = subprocess.Popen(
            [CHALLTESTSRV, "-dns01", f"127.0.0.1:{self.dns_port}", "-http01", "", "-https01", "",
             "-tlsalpn01", "", "-management", f"127.0.0.1:{self.dns_management_port}",
             "-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        env = {"PEBBLE_VA_NOSLEEP": "1", "PEBBLE_WFE_NONCEREJECT": "0", "PEBBLE_AUTHZREUSE": "0",
               "PATH": "/usr/bin:/bin"}
        self.proc = subprocess.Popen(
            [PEBBLE, "-config", str(workdir / "pebble.json"), "-dnsserver",
             f"127.0.0.1:{self.dns_port}"], stdout=self._log, stderr=subprocess.STDOUT, env=env)

    @property
    def directory(self) -> str:
        return f"https://127.0.0.1:{self.port}/dir"

    def _wait_up(self, timeout: float = 15.0) -> None:
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(self.directory, context=ctx, timeout=2):
                    return
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise AssertionError(f"pebble did not start:\n{self.log()}") from None
                time.sleep(0.1)

    def root_pem(self) -> bytes:
        """The CA root that signs issued certificates (for clients verifying the edge)."""
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        url = f"https://127.0.0.1:{self.management_port}/roots/0"
        with urllib.request.urlopen(url, context=ctx, timeout=5) as response:
            data: bytes = response.read()
        return data

    def certificate_status(self, serial: int) -> str:
        """pebble's view of an issued certificate: ``Valid`` or ``Revoked``."""
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        url = f"https://127.0.0.1:{self.management_port}/cert-status-by-serial/{serial:x}"
        with urllib.request.urlopen(url, context=ctx, timeout=5) as response:
            return str(json.loads(response.read())["Status"])

    def add_a(self, host: str, address: str) -> None:
        """Make challtestsrv resolve ``host`` to ``address`` (e.g. a dead one)."""
        body = json.dumps({"host": host.rstrip(".") + ".", "addresses": [address]}).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.dns_management_port}/add-a", data=body, method="POST")
        with urllib.request.urlopen(request, timeout=5):
            pass

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def orders(self) -> int:
        """Orders pebble has created since it started."""
        return self.log().count("Added order")

    def stop(self) -> None:
        for proc in (self.proc, self.dns):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
        self._log.close()
