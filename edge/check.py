"""``edge check``: validate the configuration and the directory before serving, like ``nginx -t``.

The configuration is already validated when it loads (an unknown key or a bad value is an
error naming it); this adds what only the files, the directory and the network can tell:

- the files the configured proxies need at start: the SSH proxy's host keys and upstream key,
  the FTPS certificate and key;
- backend hosts reachable on the ports the configured proxies use (TCP connect);
- SSH: every host has pinned host keys (or is explicitly ``ssh_insecure``), else the SSH proxy
  refuses its logins;
- certificates expired or expiring within ``days``; certificates the secret key cannot decrypt;
- sites whose certificate does not cover their hostname;
- rows pointing at missing rows (accounts/sites at a missing tenant, tenants at a missing host),
  which a bulk load or a hand-edited MySQL can leave behind;
- tenants living on a host that is down or in maintenance (a warning: maybe intended).

Everything is read-only. Each problem is a :class:`Finding`; ``edge check`` prints them and
exits non-zero when there is at least one ``error``.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass
from typing import Literal

from edge.config import EdgeConfig
from edge.directory.model import Host
from edge.directory.secrets import KeyBox
from edge.directory.service import certificate_covers, iso
from edge.directory.store import SQLStore
from edge.errors import ConfigError, SecretsError

DEFAULT_EXPIRY_DAYS = 21
"""Certificates expiring sooner than this are flagged: three weeks leaves time to renew by
hand when automatic renewal (which starts at 30 days left) has failed."""

_PAGE = 5000

Severity = Literal["error", "warning"]


@dataclass(frozen=True, slots=True)
class Finding:
    """One thing ``edge check`` found: ``subject`` names the object (``host web1``)."""

    severity: Severity
    subject: str
    message: str

    def line(self) -> str:
        return f"{self.severity}: {self.subject}: {self.message}"


@dataclass(frozen=True, slots=True)
class CheckOptions:
    days: int = DEFAULT_EXPIRY_DAYS
    connect_timeout: float = 2.0
    connect: bool = True
    """Probe backend ports (off for a directory check from a machine that cannot reach them)."""


def used_protocols(config: EdgeConfig) -> tuple[str, ...]:
    """The backend protocols this edge forwards to: those with a listener; all when the
    configuration has none (a CLI machine checks for the whole fleet)."""
    used = tuple(p for p, section in (("ssh", config.ssh), ("ftp", config.ftp),
                                      ("http", config.http), ("https", config.https))
                 if section.listen)
    return used or ("ssh", "ftp", "http")


def _backend_port(host: Host, protocol: str) -> int:
    """The port a proxy connects to (HTTPS goes to http_port unless the host wants TLS)."""
    if protocol in ("http", "https"):
        return host.https_port if host.backend_tls else host.http_port
    return host.ssh_port if protocol == "ssh" else host.ftp_port


async def run_checks(config: EdgeConfig, store: SQLStore,
                     options: CheckOptions | None = None) -> list[Finding]:
    """Every finding, errors first; an empty list means all is well."""
    options = options or CheckOptions()
    hosts = await store.list_hosts()
    findings = [*_check_files(config), *_check_hosts(config, hosts)]
    if options.connect:
        findings += await _check_reachable(config, hosts, options.connect_timeout)
    findings += await _check_orphans(store)
    findings += await _check_certificates(config, store, options.days)
    findings += await _check_site_certificates(store)
    return sorted(findings, key=lambda f: f.severity != "error")


def _check_files(config: EdgeConfig) -> list[Finding]:
    """What `edge serve` would refuse to start without (same loaders, same messages)."""
    findings = []
    if config.ssh.listen:
        import importlib  # edge never imports a proxy package at module top

        hostkeys = importlib.import_module("sshproxy.hostkeys")
        for load in (hostkeys.load_host_keys, hostkeys.load_upstream_key):
            try:
                load(config.ssh)
            except ConfigError as exc:
                findings.append(Finding("error", "ssh proxy", str(exc)))
    if config.ftp.listen:
        for name in (config.ftp.certificate_file, config.ftp.key_file):
            if name and not os.access(name, os.R_OK):
                findings.append(Finding("error", "ftp proxy", f"cannot read {name}"))
    return findings


def _check_hosts(config: EdgeConfig, hosts: list[Host]) -> list[Finding]:
    findings = []
    for host in hosts:
        if ("ssh" in used_protocols(config) and not host.ssh_known_hosts.strip()
                and not host.ssh_insecure):
            findings.append(Finding("error", f"host {host.name}",
                                    "no pinned SSH host keys: the SSH proxy refuses its logins "
                                    f"(edge host pin-ssh-key {host.name})"))
    return findings


async def _probe(host: Host, protocol: str, wait: float) -> Finding | None:
    if host.state != "active":
        return None  # down or in maintenance: not answering is expected
    port = _backend_port(host, protocol)
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host.address, port), wait)
    except (OSError, TimeoutError) as exc:
        reason = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
        return Finding("error", f"host {host.name}",
                       f"{protocol} backend {host.address}:{port} unreachable ({reason})")
    writer.close()
    return None


async def _check_reachable(config: EdgeConfig, hosts: list[Host],
                           wait: float) -> list[Finding]:
    protocols = dict.fromkeys("http" if p == "https" else p for p in used_protocols(config))
    # HTTP and HTTPS share the backend port (unless backend_tls): probe it once.
    probes = [_probe(h, p, wait) for h in hosts for p in protocols]
    return [f for f in await asyncio.gather(*probes) if f is not None]


async def _check_orphans(store: SQLStore) -> list[Finding]:
    queries = (
        ("account", "SELECT username FROM accounts WHERE tenant_id NOT IN "
                    "(SELECT id FROM tenants)", "its tenant does not exist"),
        ("site", "SELECT hostname FROM sites WHERE tenant_id NOT IN (SELECT id FROM tenants)",
         "its tenant does not exist"),
        ("site", "SELECT hostname FROM sites WHERE certificate_id IS NOT NULL AND "
                 "certificate_id NOT IN (SELECT id FROM certificates)",
         "its certificate does not exist"),
        ("tenant", "SELECT name FROM tenants WHERE host_id NOT IN (SELECT id FROM hosts)",
         "its host does not exist"),
    )
    findings = []
    for kind, sql, message in queries:
        for row in await store.fetchall(sql + f" LIMIT {_PAGE}"):
            findings.append(Finding("error", f"{kind} {row[0]}", message))
    rows = await store.fetchall("SELECT t.name, h.name, h.state FROM tenants t JOIN hosts h "
                                "ON h.id = t.host_id WHERE h.state <> 'active' "
                                f"ORDER BY t.name LIMIT {_PAGE}")
    findings += [Finding("warning", f"tenant {r[0]}", f"lives on host {r[1]}, which is {r[2]}")
                 for r in rows]
    return findings


async def _check_certificates(config: EdgeConfig, store: SQLStore, days: int) -> list[Finding]:
    findings = []
    now = time.time()
    try:
        keybox: KeyBox | None = KeyBox.from_config(config.secrets)
    except SecretsError as exc:
        keybox = None
        if await store.count("certificates"):
            findings.append(Finding("error", "secret key", f"{exc} (stored TLS keys cannot "
                                                          "be decrypted)"))
    after = 0
    while True:
        certs = await store.list_certificates(after=after, limit=_PAGE)
        for cert in certs:
            subject = f"certificate {cert.id} ({','.join(cert.names)})"
            if cert.not_after <= now:
                findings.append(Finding("error", subject, f"expired on {iso(cert.not_after)}"))
            elif cert.not_after <= now + days * 86400:
                left = (cert.not_after - now) / 86400
                findings.append(Finding("error", subject, f"expires in {left:.0f} day(s), on "
                                                          f"{iso(cert.not_after)}"))
            if keybox is not None:
                try:
                    keybox.decrypt(cert.key_encrypted)
                except SecretsError as exc:
                    findings.append(Finding("error", subject, f"private key: {exc}"))
        if len(certs) < _PAGE:
            return findings
        after = certs[-1].id


async def _check_site_certificates(store: SQLStore) -> list[Finding]:
    findings = []
    after = ""
    while True:
        rows = await store.fetchall(
            "SELECT s.hostname, c.id, c.names FROM sites s JOIN certificates c "
            f"ON c.id = s.certificate_id WHERE s.hostname > ? ORDER BY s.hostname LIMIT {_PAGE}",
            (after,))
        for hostname, cert_id, names in rows:
            cert_names = [n for n in str(names).split(",") if n]
            if not certificate_covers(cert_names, hostname):
                findings.append(Finding("error", f"site {hostname}",
                                        f"certificate {cert_id} ({', '.join(cert_names)}) "
                                        "does not cover it: browsers will refuse the site"))
        if len(rows) < _PAGE:
            return findings
        after = rows[-1][0]
