"""Every write to the directory goes through here: validated, then committed together with
its change-feed entry.

The CLI, the bulk loader and tests call :class:`DirectoryService`; nothing else writes SQL.
A refused write raises :class:`ValidationError`, :class:`NotFoundError` or
:class:`ConflictError` with a message naming the object, and leaves the database unchanged
(each method is one transaction).
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from edge.directory.directory import USERNAME_RE
from edge.directory.model import (
    HOST_STATES,
    PROTOCOLS,
    PROXY_PROTOCOL_MODES,
    TENANT_STATES,
    AcmeAccount,
    AcmeName,
    Host,
    Tenant,
)
from edge.directory.names import normalize_hostname, wildcard_parent
from edge.directory.rules import validate_cache_policy, validate_filters
from edge.directory.secrets import KeyBox
from edge.directory.store import (
    ACME_ACCOUNT_SELECT,
    ACME_NAME_SELECT,
    HOST_COLUMNS,
    SQLStore,
    Tx,
    acme_account_from_row,
    acme_name_from_row,
    append_change,
    host_from_row,
)
from edge.errors import ConflictError, NotFoundError, ValidationError

DEFAULT_MOVE_DRAIN = 300.0
"""Seconds ``edge tenant move`` leaves sessions on the old host by default: long enough for
most uploads and deploys to finish, short enough that the old host can be emptied."""

ACME_KEY_TYPES = ("ec256", "rsa2048", "rsa4096")
"""Certificate key types for automatic certificates: ECDSA P-256 by default."""

NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")


def check_name(kind: str, name: str) -> str:
    if not NAME_RE.fullmatch(name):
        raise ValidationError(f"{kind} name {name!r} must be 1-63 of a-z 0-9 . _ - "
                              "(starting with a letter or digit)")
    return name


def check_port(flag: str, port: int) -> int:
    if not 1 <= port <= 65535:
        raise ValidationError(f"{flag} {port} is not a port (1-65535)")
    return port


def check_choice(what: str, value: object, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValidationError(f"{what} {value!r} must be one of {', '.join(choices)}")
    return str(value)


def check_username(username: str, what: str = "username") -> str:
    if not USERNAME_RE.fullmatch(username):
        raise ValidationError(f"{what} {username!r} must be 1-128 of A-Z a-z 0-9 . _ @ + -")
    return username


def check_protocols(protocols: Iterable[str]) -> list[str]:
    """The account's protocols, sorted and de-duplicated; at least one of ssh, ftp."""
    if isinstance(protocols, str):
        protocols = [p for p in protocols.split(",") if p]
    protocol_list = sorted(set(protocols))
    if not protocol_list or any(p not in PROTOCOLS for p in protocol_list):
        raise ValidationError(f"--protocols must be a list of {', '.join(PROTOCOLS)}")
    return protocol_list


def check_address(address: str) -> str:
    """A backend address: an IP literal or a hostname (resolved by the proxies at connect)."""
    try:
        return str(ipaddress.ip_address(address))
    except ValueError:
        pass
    try:
        return normalize_hostname(address)
    except ValidationError:
        raise ValidationError(f"--address {address!r} is neither an IP address nor a hostname") from None


def check_authorized_keys(text: str) -> str:
    """Refuse authorized_keys text OpenSSH would not accept (checked with asyncssh's parser)."""
    if not text.strip():
        return ""
    import asyncssh

    try:
        asyncssh.import_authorized_keys(text)
    except (ValueError, asyncssh.KeyImportError) as exc:
        raise ValidationError(f"authorized keys: {exc}") from None
    return text.strip() + "\n"


@dataclass(frozen=True, slots=True)
class ParsedCertificate:
    fingerprint: str
    names: tuple[str, ...]
    not_before: float
    not_after: float
    chain_pem: bytes
    key_pem: bytes


def parse_certificate(chain_pem: bytes, key_pem: bytes, *, now: float | None = None) -> ParsedCertificate:
    """Check a certificate chain and its key; raise ValidationError saying what is wrong.

    Checks: PEM parses, the key matches the leaf certificate, the leaf is valid now, and it
    names at least one DNS name (subjectAltName). Returns the canonical key in PKCS#8.
    """
    now = time.time() if now is None else now
    try:
        chain = x509.load_pem_x509_certificates(chain_pem)
    except ValueError as exc:
        raise ValidationError(f"certificate: not a PEM certificate chain ({exc})") from None
    leaf = chain[0]
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise ValidationError(f"private key: cannot load an unencrypted PEM key ({exc})") from None
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey |
                      ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey):
        raise ValidationError("private key: unsupported key type for TLS")
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*spki) != leaf.public_key().public_bytes(*spki):
        raise ValidationError("private key does not match the certificate "
                              f"(subject {leaf.subject.rfc4514_string()})")
    not_before = leaf.not_valid_before_utc.timestamp()
    not_after = leaf.not_valid_after_utc.timestamp()
    if not_after <= now:
        raise ValidationError(f"certificate expired on {leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")
    if not_before > now + 300:
        raise ValidationError(
            f"certificate is not valid before {leaf.not_valid_before_utc:%Y-%m-%d %H:%M} UTC")
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns_names = san.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        dns_names = []
    if not dns_names:
        raise ValidationError("certificate names no DNS hostnames (subjectAltName)")
    names = tuple(dict.fromkeys(normalize_hostname(n, allow_wildcard=True) for n in dns_names))
    fingerprint = hashlib.sha256(leaf.public_bytes(serialization.Encoding.DER)).hexdigest()
    canonical_key = key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())
    chain_out = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain)
    return ParsedCertificate(fingerprint, names, not_before, not_after, chain_out, canonical_key)


def certificate_covers(names: Iterable[str], hostname: str) -> bool:
    """True if a certificate with SAN ``names`` is valid for ``hostname``.

    RFC 6125: ``*.example.com`` covers exactly one label (``a.example.com``, not
    ``example.com`` nor ``a.b.example.com``); a wildcard site needs the wildcard name itself.
    """
    parent = None if hostname.startswith("*.") else wildcard_parent(hostname)
    return any(name == hostname or (parent is not None and name == "*." + parent)
               for name in names)


class DirectoryService:
    """Validated writes (and the reads operators need around them)."""

    def __init__(self, store: SQLStore, keybox: KeyBox | None = None) -> None:
        self.store = store
        self.keybox = keybox

    # -- helpers -------------------------------------------------------------------------

    async def _id(self, tx: Tx, table: str, column: str, value: Any, kind: str) -> int:
        row = await tx.fetchone(f"SELECT id FROM {table} WHERE {column} = ?", (value,))
        if row is None:
            raise NotFoundError(f"{kind} {value!r} does not exist")
        return int(row[0])

    async def _absent(self, tx: Tx, table: str, column: str, value: Any, kind: str) -> None:
        row = await tx.fetchone(f"SELECT id FROM {table} WHERE {column} = ?", (value,))
        if row is not None:
            raise ConflictError(f"{kind} {value!r} already exists")

    # -- hosts ---------------------------------------------------------------------------

    async def add_host(self, name: str, address: str, *, ssh_port: int = 22, ftp_port: int = 21,
                       http_port: int = 80, https_port: int = 443, state: str = "active",
                       notice: str = "", send_proxy_protocol: str = "off",
                       backend_tls: bool = False, ssh_insecure: bool = False) -> Host:
        check_name("host", name)
        address = check_address(address)
        for flag, port in (("--ssh-port", ssh_port), ("--ftp-port", ftp_port),
                           ("--http-port", http_port), ("--https-port", https_port)):
            check_port(flag, port)
        check_choice("host state", state, HOST_STATES)
        check_choice("--send-proxy-protocol", send_proxy_protocol, PROXY_PROTOCOL_MODES)
        async with self.store.transaction() as tx:
            await self._absent(tx, "hosts", "name", name, "host")
            await tx.execute(
                f"INSERT INTO hosts ({HOST_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (name, address, ssh_port, ftp_port, http_port, https_port, state, notice, "",
                 int(ssh_insecure), send_proxy_protocol, int(backend_tls)))
            await append_change(tx, "host", name)
        return await self.get_host(name)

    async def get_host(self, name: str) -> Host:
        row = await self.store.fetchone(f"SELECT {HOST_COLUMNS} FROM hosts WHERE name = ?", (name,))
        if row is None:
            raise NotFoundError(f"host {name!r} does not exist")
        return host_from_row(row)

    async def update_host(self, name: str, **fields: Any) -> Host:
        """Change some of a host's settings (``state``, ``notice``, ``ssh_known_hosts``, ...)."""
        allowed = {"address", "ssh_port", "ftp_port", "http_port", "https_port", "state", "notice",
                   "ssh_known_hosts", "ssh_insecure", "send_proxy_protocol", "backend_tls"}
        unknown = set(fields) - allowed
        if unknown:
            raise ValidationError(f"unknown host field {sorted(unknown)[0]!r}")
        if "state" in fields and fields["state"] not in HOST_STATES:
            raise ValidationError(f"host state {fields['state']!r} must be one of "
                                  f"{', '.join(HOST_STATES)}")
        if "address" in fields:
            fields["address"] = check_address(fields["address"])
        if fields.get("send_proxy_protocol", "off") not in PROXY_PROTOCOL_MODES:
            raise ValidationError("send_proxy_protocol must be one of off, v1, v2")
        for key in ("ssh_port", "ftp_port", "http_port", "https_port"):
            if key in fields:
                check_port("--" + key.replace("_", "-"), fields[key])
        if not fields:
            return await self.get_host(name)
        async with self.store.transaction() as tx:
            await self._id(tx, "hosts", "name", name, "host")
            assignments = ", ".join(f"{key} = ?" for key in fields)
            values = [int(v) if isinstance(v, bool) else v for v in fields.values()]
            await tx.execute(f"UPDATE hosts SET {assignments} WHERE name = ?", (*values, name))
            await append_change(tx, "host", name)
        return await self.get_host(name)

    async def set_host_state(self, name: str, state: str, notice: str | None = None) -> Host:
        fields: dict[str, Any] = {"state": state}
        if notice is not None:
            fields["notice"] = notice
        return await self.update_host(name, **fields)

    # -- tenants -------------------------------------------------------------------------

    async def add_tenant(self, name: str, host: str) -> Tenant:
        check_name("tenant", name)
        async with self.store.transaction() as tx:
            await self._absent(tx, "tenants", "name", name, "tenant")
            host_id = await self._id(tx, "hosts", "name", host, "host")
            await tx.execute("INSERT INTO tenants (name, host_id, state) VALUES (?, ?, 'active')",
                             (name, host_id))
            await append_change(tx, "tenant", name)
        return Tenant(name, host)

    async def get_tenant(self, name: str) -> Tenant:
        tenant = await self.store.fetch_tenant(name)
        if tenant is None:
            raise NotFoundError(f"tenant {name!r} does not exist")
        return tenant

    async def move_tenant(self, name: str, to_host: str, *, drain: float = 0.0,
                          force: bool = False) -> Tenant:
        """Point a tenant at another host. One row and one change-feed entry, however many
        sites and accounts it has. Sessions still open on the old host are closed by the
        proxies after ``drain`` seconds. A host that is not ``active`` (down, in
        maintenance) would turn every user away, so it is refused unless ``force``."""
        if drain < 0:
            raise ValidationError("--drain must not be negative")
        async with self.store.transaction() as tx:
            row = await tx.fetchone("SELECT id, host_id FROM tenants WHERE name = ?", (name,))
            if row is None:
                raise NotFoundError(f"tenant {name!r} does not exist")
            tenant_id, old_host_id = row
            target = await tx.fetchone("SELECT id, state FROM hosts WHERE name = ?", (to_host,))
            if target is None:
                raise NotFoundError(f"host {to_host!r} does not exist")
            new_host_id, state = int(target[0]), str(target[1])
            if new_host_id == old_host_id:
                raise ValidationError(f"tenant {name!r} is already on host {to_host!r}")
            if state != "active" and not force:
                raise ConflictError(f"host {to_host!r} is {state}: moving tenant {name!r} there "
                                    "would turn its users away (--force to move anyway)")
            await tx.execute(
                "UPDATE tenants SET host_id = ?, previous_host_id = ?, drain_deadline = ? "
                "WHERE id = ?", (new_host_id, old_host_id, time.time() + drain, tenant_id))
            await append_change(tx, "tenant", name)
        return await self.get_tenant(name)

    async def set_tenant_state(self, name: str, state: str) -> Tenant:
        if state not in TENANT_STATES:
            raise ValidationError(f"tenant state {state!r} must be one of {', '.join(TENANT_STATES)}")
        async with self.store.transaction() as tx:
            await self._id(tx, "tenants", "name", name, "tenant")
            await tx.execute("UPDATE tenants SET state = ? WHERE name = ?", (state, name))
            await append_change(tx, "tenant", name)
        return await self.get_tenant(name)

    # -- accounts ------------------------------------------------------------------------

    async def add_account(self, username: str, tenant: str, *,
                          protocols: Iterable[str] = PROTOCOLS, upstream_username: str = "",
                          authorized_keys: str = "") -> None:
        check_username(username)
        if upstream_username:
            check_username(upstream_username, "upstream username")
        protocol_list = check_protocols(protocols)
        keys = check_authorized_keys(authorized_keys)
        async with self.store.transaction() as tx:
            await self._absent(tx, "accounts", "username", username, "account")
            tenant_id = await self._id(tx, "tenants", "name", tenant, "tenant")
            await tx.execute(
                "INSERT INTO accounts (username, tenant_id, protocols, upstream_username, "
                "authorized_keys) VALUES (?, ?, ?, ?, ?)",
                (username, tenant_id, ",".join(protocol_list), upstream_username, keys))
            await append_change(tx, "account", username)

    async def remove_account(self, username: str) -> None:
        async with self.store.transaction() as tx:
            await self._id(tx, "accounts", "username", username, "account")
            await tx.execute("DELETE FROM accounts WHERE username = ?", (username,))
            await append_change(tx, "account", username)

    # -- sites ---------------------------------------------------------------------------

    async def _check_site_certificate(self, tx: Tx, hostname: str, certificate_id: int) -> None:
        row = await tx.fetchone("SELECT names FROM certificates WHERE id = ?", (certificate_id,))
        if row is None:
            raise NotFoundError(f"certificate {certificate_id} does not exist")
        names = [n for n in row[0].split(",") if n]
        if not certificate_covers(names, hostname):
            raise ValidationError(f"certificate {certificate_id} ({', '.join(names)}) "
                                  f"does not cover {hostname}")

    async def add_site(self, hostname: str, tenant: str, *, certificate_id: int | None = None,
                       https_redirect: bool = False, hsts: bool = False,
                       cache_policy: str | dict[str, Any] | None = None,
                       filters: str | dict[str, Any] | None = None) -> str:
        """Add a site; returns its canonical hostname."""
        name = normalize_hostname(hostname, allow_wildcard=True)
        policy = json.dumps(validate_cache_policy(cache_policy), sort_keys=True)
        rules = json.dumps(validate_filters(filters), sort_keys=True)
        async with self.store.transaction() as tx:
            await self._absent(tx, "sites", "hostname", name, "site")
            tenant_id = await self._id(tx, "tenants", "name", tenant, "tenant")
            if certificate_id is not None:
                await self._check_site_certificate(tx, name, certificate_id)
            await tx.execute(
                "INSERT INTO sites (hostname, tenant_id, certificate_id, https_redirect, hsts, "
                "cache_policy, filters) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (name, tenant_id, certificate_id, int(https_redirect), int(hsts), policy, rules))
            await append_change(tx, "site", name)
        return name

    async def update_site(self, hostname: str, **fields: Any) -> str:
        """Change a site's certificate, redirect/HSTS flags or rules (validated like add)."""
        name = normalize_hostname(hostname, allow_wildcard=True)
        allowed = {"certificate_id", "https_redirect", "hsts", "cache_policy", "filters", "tenant"}
        unknown = set(fields) - allowed
        if unknown:
            raise ValidationError(f"unknown site field {sorted(unknown)[0]!r}")
        columns: dict[str, Any] = {}
        if "cache_policy" in fields:
            columns["cache_policy"] = json.dumps(validate_cache_policy(fields["cache_policy"]),
                                                 sort_keys=True)
        if "filters" in fields:
            columns["filters"] = json.dumps(validate_filters(fields["filters"]), sort_keys=True)
        for flag in ("https_redirect", "hsts"):
            if flag in fields:
                columns[flag] = int(bool(fields[flag]))
        async with self.store.transaction() as tx:
            await self._id(tx, "sites", "hostname", name, "site")
            if "certificate_id" in fields:
                if fields["certificate_id"] is not None:
                    await self._check_site_certificate(tx, name, fields["certificate_id"])
                columns["certificate_id"] = fields["certificate_id"]
            if "tenant" in fields:
                columns["tenant_id"] = await self._id(tx, "tenants", "name", fields["tenant"],
                                                      "tenant")
            if columns:
                assignments = ", ".join(f"{key} = ?" for key in columns)
                await tx.execute(f"UPDATE sites SET {assignments} WHERE hostname = ?",
                                 (*columns.values(), name))
                await append_change(tx, "site", name)
        return name

    async def remove_site(self, hostname: str) -> None:
        name = normalize_hostname(hostname, allow_wildcard=True)
        async with self.store.transaction() as tx:
            await self._id(tx, "sites", "hostname", name, "site")
            await tx.execute("DELETE FROM sites WHERE hostname = ?", (name,))
            await append_change(tx, "site", name)

    async def purge_cache(self, hostname: str, path: str = "") -> None:
        """Ask every worker's HTTP cache to drop a site's objects (all, or one path prefix)."""
        name = normalize_hostname(hostname, allow_wildcard=True)
        if path and not path.startswith("/"):
            raise ValidationError("--path must start with '/'")
        async with self.store.transaction() as tx:
            await self._id(tx, "sites", "hostname", name, "site")
            await append_change(tx, "purge", name + path)

    # -- change log -------------------------------------------------------------------------

    async def prune_changes(self, older_than: float, *, now: float | None = None) -> int:
        """Delete change-feed rows older than ``older_than`` seconds; returns how many.

        Running workers only read rows newer than their cursor, so old rows serve nobody.
        The newest row is always kept, so ids never restart and a cursor never goes backwards.
        """
        if older_than < 60:
            raise ValidationError("--older-than must be at least 60 seconds "
                                  "(workers poll about once a second)")
        cutoff = (time.time() if now is None else now) - older_than
        async with self.store.transaction() as tx:
            row = await tx.fetchone("SELECT MAX(id) FROM changes")
            if row is None or row[0] is None:
                return 0
            before = await tx.fetchone("SELECT COUNT(*) FROM changes WHERE created_at < ? "
                                       "AND id < ?", (cutoff, row[0]))
            await tx.execute("DELETE FROM changes WHERE created_at < ? AND id < ?",
                             (cutoff, row[0]))
        return int(before[0]) if before else 0

    # -- certificates --------------------------------------------------------------------

    async def import_certificate(self, chain_pem: bytes, key_pem: bytes) -> int:
        """Validate and store a certificate with its key encrypted; returns its id."""
        if self.keybox is None:
            from edge.errors import SecretsError

            raise SecretsError("importing a private key needs the at-rest secret key: set "
                               "$EDGE_SECRET_KEY or [secrets] key_file "
                               "(create one with `edge secret generate`)")
        cert = parse_certificate(chain_pem, key_pem)
        async with self.store.transaction() as tx:
            row = await tx.fetchone("SELECT id FROM certificates WHERE fingerprint = ?",
                                    (cert.fingerprint,))
            if row is not None:
                raise ConflictError(f"this certificate is already imported as id {row[0]}")
            certificate_id = await tx.execute(
                "INSERT INTO certificates (fingerprint, names, not_before, not_after, chain_pem, "
                "key_encrypted) VALUES (?, ?, ?, ?, ?, ?)",
                (cert.fingerprint, ",".join(cert.names), cert.not_before, cert.not_after,
                 cert.chain_pem, self.keybox.encrypt(cert.key_pem)))
            await append_change(tx, "certificate", str(certificate_id))
        return int(certificate_id)

    # -- ACME (edge.acme): accounts, names with automatic certificates, challenges ---------

    def _require_keybox(self, what: str) -> KeyBox:
        if self.keybox is None:
            from edge.errors import SecretsError

            raise SecretsError(f"{what} needs the at-rest secret key: set $EDGE_SECRET_KEY or "
                               "[secrets] key_file (create one with `edge secret generate`)")
        return self.keybox

    async def add_acme_account(self, name: str, directory_url: str, key_pem: bytes, *,
                               account_url: str, priority: int = 0, eab_kid: str = "",
                               email: str = "", environment: str = "production") -> AcmeAccount:
        """Store an account registered at a CA; its key encrypted like TLS keys."""
        check_name("ACME account", name)
        if not directory_url.startswith(("https://", "http://")):
            raise ValidationError(f"--directory {directory_url!r} must be an http(s) URL")
        check_choice("environment", environment, ("production", "staging"))
        encrypted = self._require_keybox("storing an ACME account key").encrypt(key_pem)
        async with self.store.transaction() as tx:
            await self._absent(tx, "acme_accounts", "name", name, "ACME account")
            await tx.execute(
                "INSERT INTO acme_accounts (name, directory_url, priority, environment, "
                "key_encrypted, account_url, eab_kid, email, failures, next_attempt, last_error, "
                "created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 0, 0, '', ?)",
                (name, directory_url, priority, environment, encrypted, account_url, eab_kid, email,
                 time.time()))
        return next(a for a in await self.acme_accounts() if a.name == name)

    async def remove_acme_account(self, name: str) -> None:
        async with self.store.transaction() as tx:
            await self._id(tx, "acme_accounts", "name", name, "ACME account")
            await tx.execute("DELETE FROM acme_accounts WHERE name = ?", (name,))

    async def acme_accounts(self) -> list[AcmeAccount]:
        """Every ACME account, primary (lowest priority) first."""
        rows = await self.store.fetchall(ACME_ACCOUNT_SELECT + " ORDER BY priority, name")
        return [acme_account_from_row(r) for r in rows]

    async def record_acme_account_result(self, name: str, *, error: str = "",
                                         retry_at: float = 0.0) -> None:
        """A CA-wide failure (down, rate limited: ``error`` and when to try again) or, with
        no error, a success that ends the account's back-off."""
        async with self.store.transaction() as tx:
            if error:
                await tx.execute("UPDATE acme_accounts SET failures = failures + 1, "
                                 "next_attempt = ?, last_error = ? WHERE name = ?",
                                 (retry_at, error[:2000], name))
            else:
                await tx.execute("UPDATE acme_accounts SET failures = 0, next_attempt = 0, "
                                 "last_error = '' WHERE name = ?", (name,))

    async def enable_auto_cert(self, hostname: str, key_type: str = "ec256") -> AcmeName:
        """Mark a site for automatic certificates (``--auto-cert``); idempotent."""
        name = normalize_hostname(hostname, allow_wildcard=True)
        if name.startswith("*."):
            raise ValidationError(f"{name}: wildcard certificates need DNS-01, which the edge "
                                  "does not answer; import one with `edge cert import`")
        check_choice("--key-type", key_type, ACME_KEY_TYPES)
        async with self.store.transaction() as tx:
            await self._id(tx, "sites", "hostname", name, "site")
            row = await tx.fetchone("SELECT id FROM acme_names WHERE hostname = ?", (name,))
            if row is None:
                await tx.execute(
                    "INSERT INTO acme_names (hostname, key_type, state, last_error, account, "
                    "lease_owner, updated_at) VALUES (?, ?, 'pending', '', '', '', ?)",
                    (name, key_type, time.time()))
            else:
                await tx.execute("UPDATE acme_names SET key_type = ? WHERE id = ?",
                                 (key_type, row[0]))
        return await self.acme_name(name)

    async def acme_name(self, hostname: str) -> AcmeName:
        name = normalize_hostname(hostname, allow_wildcard=True)
        row = await self.store.fetchone(ACME_NAME_SELECT + " WHERE hostname = ?", (name,))
        if row is None:
            raise NotFoundError(f"{name} has no automatic certificate (`edge site set "
                                f"{name} --auto-cert`)")
        return acme_name_from_row(row)

    async def acme_names(self, *, failing: bool = False, after: str = "",
                         limit: int = 1000) -> list[AcmeName]:
        where = "WHERE hostname > ?" + (" AND state = 'failing'" if failing else "")
        rows = await self.store.fetchall(
            f"{ACME_NAME_SELECT} {where} ORDER BY hostname LIMIT {int(limit)}", (after,))
        return [acme_name_from_row(r) for r in rows]

    async def due_acme_names(self, now: float, limit: int = 100) -> list[AcmeName]:
        """Names to work on now: no certificate yet or past ``renew_at``, not backing off,
        not leased by anyone."""
        rows = await self.store.fetchall(
            f"{ACME_NAME_SELECT} WHERE next_attempt <= ? AND lease_until < ? "
            f"AND (certificate_id IS NULL OR renew_at <= ?) ORDER BY next_attempt, renew_at "
            f"LIMIT {int(limit)}", (now, now, now))
        return [acme_name_from_row(r) for r in rows]

    async def lease_acme_name(self, hostname: str, owner: str, seconds: float,
                              now: float | None = None) -> bool:
        """Take the fleet-wide lease on ``hostname`` for ``seconds``; False if another owner
        holds it. The conditional UPDATE and the read-back run in one transaction, so of two
        processes racing exactly one reads its own name back."""
        now = time.time() if now is None else now
        async with self.store.transaction() as tx:
            await tx.execute("UPDATE acme_names SET lease_owner = ?, lease_until = ? "
                             "WHERE hostname = ? AND (lease_until < ? OR lease_owner = ?)",
                             (owner, now + seconds, hostname, now, owner))
            row = await tx.fetchone("SELECT lease_owner FROM acme_names WHERE hostname = ?",
                                    (hostname,))
        return row is not None and row[0] == owner

    async def release_acme_name(self, hostname: str, owner: str) -> None:
        async with self.store.transaction() as tx:
            await tx.execute("UPDATE acme_names SET lease_owner = '', lease_until = 0 "
                             "WHERE hostname = ? AND lease_owner = ?", (hostname, owner))

    async def count_acme_order(self, hostname: str) -> None:
        """One more order placed for ``hostname`` (``edge cert status`` shows the count)."""
        async with self.store.transaction() as tx:
            await tx.execute("UPDATE acme_names SET orders = orders + 1 WHERE hostname = ?",
                             (hostname,))

    async def record_acme_failure(self, hostname: str, error: str, retry_at: float) -> None:
        """An attempt failed: the CA's text, and no new attempt before ``retry_at``."""
        async with self.store.transaction() as tx:
            await tx.execute("UPDATE acme_names SET state = 'failing', failures = failures + 1, "
                             "next_attempt = ?, last_error = ?, updated_at = ? WHERE hostname = ?",
                             (retry_at, error[:2000], time.time(), hostname))

    async def request_acme_renewal(self, hostname: str) -> None:
        """Make a name due now (``edge cert renew NAME``): renew_at and back-off cleared."""
        name = (await self.acme_name(hostname)).hostname
        async with self.store.transaction() as tx:
            await tx.execute("UPDATE acme_names SET renew_at = 0, next_attempt = 0 "
                             "WHERE hostname = ?", (name,))

    async def install_acme_certificate(self, hostname: str, chain_pem: bytes, key_pem: bytes,
                                       *, renew_at: float, account: str) -> int:
        """Store an issued certificate, point the site at it and mark the name valid, in one
        transaction (change rows for the certificate and the site: every worker serves it
        after its next feed poll). Returns the certificate id."""
        keybox = self._require_keybox("storing an issued private key")
        cert = parse_certificate(chain_pem, key_pem)
        if not certificate_covers(cert.names, hostname):
            raise ValidationError(f"the CA's certificate ({', '.join(cert.names)}) does not "
                                  f"cover {hostname}")
        async with self.store.transaction() as tx:
            certificate_id = await tx.execute(
                "INSERT INTO certificates (fingerprint, names, not_before, not_after, chain_pem, "
                "key_encrypted) VALUES (?, ?, ?, ?, ?, ?)",
                (cert.fingerprint, ",".join(cert.names), cert.not_before, cert.not_after,
                 cert.chain_pem, keybox.encrypt(cert.key_pem)))
            await append_change(tx, "certificate", str(certificate_id))
            await tx.execute("UPDATE sites SET certificate_id = ? WHERE hostname = ?",
                             (certificate_id, hostname))
            await append_change(tx, "site", hostname)
            await tx.execute(
                "UPDATE acme_names SET state = 'valid', certificate_id = ?, renew_at = ?, "
                "failures = 0, next_attempt = 0, last_error = '', account = ?, updated_at = ? "
                "WHERE hostname = ?", (certificate_id, renew_at, account, time.time(), hostname))
        return int(certificate_id)

    async def put_challenge(self, token: str, hostname: str, key_authorization: str,
                            ttl: float = 3600.0) -> None:
        """Publish a challenge answer to every edge worker (replaces one with the same token)."""
        async with self.store.transaction() as tx:
            # Not DELETE + INSERT: on InnoDB a DELETE of an absent key takes a gap lock, and
            # concurrent orders then deadlock on each other's INSERT.
            row = await tx.fetchone("SELECT id FROM acme_challenges WHERE token = ?", (token,))
            if row is None:
                await tx.execute("INSERT INTO acme_challenges (token, hostname, "
                                 "key_authorization, expires_at) VALUES (?, ?, ?, ?)",
                                 (token, hostname, key_authorization, time.time() + ttl))
            else:
                await tx.execute("UPDATE acme_challenges SET hostname = ?, key_authorization = ?, "
                                 "expires_at = ? WHERE id = ?",
                                 (hostname, key_authorization, time.time() + ttl, row[0]))
            await append_change(tx, "challenge", token)

    async def delete_challenges_for(self, hostname: str) -> None:
        """Withdraw every challenge answer of ``hostname`` (its order ended)."""
        rows = await self.store.fetchall("SELECT token FROM acme_challenges WHERE hostname = ?",
                                         (hostname,))
        for row in rows:
            await self.delete_challenge(row[0])

    async def acme_state_counts(self) -> dict[str, int]:
        rows = await self.store.fetchall("SELECT state, COUNT(*) FROM acme_names GROUP BY state")
        return {str(r[0]): int(r[1]) for r in rows}

    async def delete_challenge(self, token: str) -> None:
        async with self.store.transaction() as tx:
            await tx.execute("DELETE FROM acme_challenges WHERE token = ?", (token,))
            await append_change(tx, "challenge", token)


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
