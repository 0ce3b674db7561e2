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
import os
import re
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
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
    Account,
    AcmeAccount,
    AcmeName,
    Host,
    Tenant,
)
from edge.directory.names import normalize_hostname, wildcard_parent
from edge.directory.rules import validate_cache_policy, validate_filters
from edge.directory.secrets import KeyBox
from edge.directory.store import (
    ACCOUNT_SELECT,
    ACME_ACCOUNT_SELECT,
    ACME_NAME_SELECT,
    HOST_COLUMNS,
    HOST_READ_COLUMNS,
    SQLStore,
    Tx,
    account_from_row,
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


def changed_fields(before: dict[str, Any],
                   after: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The keys whose value differs, as (before, after) dicts, for a change row's detail."""
    keys = [k for k in after if before.get(k) != after.get(k)]
    return {k: before.get(k) for k in keys}, {k: after[k] for k in keys}


_NOT_LOGGED = {"key_encrypted", "chain_pem"}
"""Fields never copied into change rows: secrets, and bulky PEM (the fingerprint says it)."""


def _loggable(obj: Any) -> dict[str, Any]:
    return {k: v for k, v in asdict(obj).items() if k not in _NOT_LOGGED}


@dataclass(frozen=True, slots=True)
class InUse:
    """What still refers to an object that was asked to be removed (for the error message)."""

    kind: str
    names: list[str]

    def text(self, limit: int = 20) -> str:
        shown = ", ".join(self.names[:limit])
        more = f" and {len(self.names) - limit} more" if len(self.names) > limit else ""
        return f"{len(self.names)} {self.kind}: {shown}{more}"


class DirectoryService:
    """Validated writes (and the reads operators need around them).

    ``actor`` is recorded in every change row this service writes (``cli:user@host``,
    ``api:<token name>``, ``bulk-load``), so ``edge changes list`` says who changed what.
    """

    def __init__(self, store: SQLStore, keybox: KeyBox | None = None, *,
                 actor: str = "") -> None:
        self.store = store
        self.keybox = keybox
        self.actor = actor

    async def _change(self, tx: Tx, entity: str, name: str, before: dict[str, Any] | None,
                      after: dict[str, Any] | None, *, diff: bool = True) -> None:
        """Append the change row for a write, with this service's actor and (``diff``) only
        the fields whose value changed."""
        if diff and before is not None and after is not None:
            before, after = changed_fields(before, after)
        await append_change(tx, entity, name, actor=self.actor, before=before, after=after)

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
            await self._change(tx, "host", name, None, {
                "address": address, "ssh_port": ssh_port, "ftp_port": ftp_port,
                "http_port": http_port, "https_port": https_port, "state": state,
                "send_proxy_protocol": send_proxy_protocol})
        return await self.get_host(name)

    async def get_host(self, name: str) -> Host:
        row = await self.store.fetchone(f"SELECT {HOST_READ_COLUMNS} FROM hosts WHERE name = ?", (name,))
        if row is None:
            raise NotFoundError(f"host {name!r} does not exist")
        return host_from_row(row)

    async def update_host(self, name: str, **fields: Any) -> Host:
        """Change some of a host's settings (``state``, ``notice``, ``ssh_known_hosts``, ...)."""
        allowed = {"address", "ssh_port", "ftp_port", "http_port", "https_port", "state", "notice",
                   "ssh_known_hosts", "ssh_insecure", "send_proxy_protocol", "backend_tls",
                   "maintenance_until"}
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
            row = await tx.fetchone(f"SELECT {HOST_READ_COLUMNS} FROM hosts WHERE name = ?", (name,))
            if row is None:
                raise NotFoundError(f"host {name!r} does not exist")
            assignments = ", ".join(f"{key} = ?" for key in fields)
            values = [int(v) if isinstance(v, bool) else v for v in fields.values()]
            await tx.execute(f"UPDATE hosts SET {assignments} WHERE name = ?", (*values, name))
            await self._change(tx, "host", name, _loggable(host_from_row(row)), fields)
        return await self.get_host(name)

    async def remove_host(self, name: str) -> None:
        """Remove a backend host. Refused (ConflictError naming them) while tenants live on
        it or are still draining from it: removing it would strand their users."""
        async with self.store.transaction() as tx:
            found = await tx.fetchone("SELECT id, address FROM hosts WHERE name = ?", (name,))
            if found is None:
                raise NotFoundError(f"host {name!r} does not exist")
            host_id, address = int(found[0]), str(found[1])
            rows = await tx.fetchall(
                "SELECT name, host_id = ?, drain_deadline FROM tenants "
                "WHERE host_id = ? OR previous_host_id = ? ORDER BY name",
                (host_id, host_id, host_id))
            now = time.time()
            living = [str(r[0]) for r in rows if r[1]]
            draining = [str(r[0]) for r in rows if not r[1] and (r[2] or 0) > now]
            if living:
                raise ConflictError(f"host {name!r} still has "
                                    f"{InUse('tenant(s)', living).text()} "
                                    "(move them first: edge tenant move NAME --to HOST)")
            if draining:
                raise ConflictError(f"host {name!r} still has sessions draining for "
                                    f"{InUse('moved tenant(s)', draining).text()}; "
                                    "retry after their drain deadline")
            # Finished drains only remember the old host for display; forget it.
            await tx.execute("UPDATE tenants SET previous_host_id = NULL, drain_deadline = NULL "
                             "WHERE previous_host_id = ?", (host_id,))
            await tx.execute("DELETE FROM hosts WHERE id = ?", (host_id,))
            await self._change(tx, "host", name, {"address": address}, None)

    async def set_host_state(self, name: str, state: str, notice: str | None = None, *,
                             until: float | None = None, now: float | None = None) -> Host:
        """Set ``state``; ``until`` (Unix time, maintenance only) ends the window by itself:
        from then on every proxy treats the host as active (edge.sessionpolicy.host_state).
        Any state change clears an earlier ``until``."""
        if until is not None:
            if state != "maintenance":
                raise ValidationError("--until applies only to the maintenance state")
            if until <= (time.time() if now is None else now):
                raise ValidationError("--until must be in the future")
        fields: dict[str, Any] = {"state": state, "maintenance_until": until}
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
            await self._change(tx, "tenant", name, None, {"host": host, "state": "active"})
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
            await self.move_tenant_in(tx, name, to_host, drain=drain, force=force)
        return await self.get_tenant(name)

    async def move_tenant_in(self, tx: Tx, name: str, to_host: str, *, drain: float,
                             force: bool = False) -> None:
        """:meth:`move_tenant` inside the caller's transaction (a host drain commits each
        move together with its step, so a resumed drain never moves a tenant twice)."""
        row = await tx.fetchone("SELECT id, host_id FROM tenants WHERE name = ?", (name,))
        if row is None:
            raise NotFoundError(f"tenant {name!r} does not exist")
        tenant_id, old_host_id = row
        old = await tx.fetchone("SELECT name FROM hosts WHERE id = ?", (old_host_id,))
        target = await tx.fetchone("SELECT id, state FROM hosts WHERE name = ?", (to_host,))
        if target is None:
            raise NotFoundError(f"host {to_host!r} does not exist")
        new_host_id, state = int(target[0]), str(target[1])
        if new_host_id == old_host_id:
            raise ValidationError(f"tenant {name!r} is already on host {to_host!r}")
        if state != "active" and not force:
            raise ConflictError(f"host {to_host!r} is {state}: moving tenant {name!r} there "
                                "would turn its users away (--force to move anyway)")
        old = await tx.fetchone("SELECT name FROM hosts WHERE id = ?", (old_host_id,))
        await tx.execute(
            "UPDATE tenants SET host_id = ?, previous_host_id = ?, drain_deadline = ? "
            "WHERE id = ?", (new_host_id, old_host_id, time.time() + drain, tenant_id))
        await self._change(tx, "tenant", name, {"host": old[0] if old else None},
                           {"host": to_host, "drain_seconds": drain}, diff=False)

    async def set_tenant_state(self, name: str, state: str) -> Tenant:
        if state not in TENANT_STATES:
            raise ValidationError(f"tenant state {state!r} must be one of {', '.join(TENANT_STATES)}")
        async with self.store.transaction() as tx:
            await self._id(tx, "tenants", "name", name, "tenant")
            row = await tx.fetchone("SELECT state FROM tenants WHERE name = ?", (name,))
            await tx.execute("UPDATE tenants SET state = ? WHERE name = ?", (state, name))
            await self._change(tx, "tenant", name, {"state": row[0] if row else None},
                               {"state": state})
        return await self.get_tenant(name)

    async def remove_tenant(self, name: str, *, cascade: bool = False) -> list[str]:
        """Remove a tenant. While it has sites or accounts this is refused (ConflictError
        listing them) unless ``cascade``, which removes them too, each with its own change
        row so every proxy forgets them. Returns what was removed ("site x", "account y")."""
        async with self.store.transaction() as tx:
            tenant_id = await self._id(tx, "tenants", "name", name, "tenant")
            sites = [str(r[0]) for r in await tx.fetchall(
                "SELECT hostname FROM sites WHERE tenant_id = ? ORDER BY hostname", (tenant_id,))]
            accounts = [str(r[0]) for r in await tx.fetchall(
                "SELECT username FROM accounts WHERE tenant_id = ? ORDER BY username",
                (tenant_id,))]
            if (sites or accounts) and not cascade:
                held = [InUse(kind, names).text() for kind, names in
                        (("site(s)", sites), ("account(s)", accounts)) if names]
                raise ConflictError(f"tenant {name!r} still has {'; '.join(held)} "
                                    "(remove them first, or --cascade to remove them too)")
            for hostname in sites:
                await self._change(tx, "site", hostname, {"tenant": name}, None)
            for username in accounts:
                await self._change(tx, "account", username, {"tenant": name}, None)
            await tx.execute("DELETE FROM sites WHERE tenant_id = ?", (tenant_id,))
            await tx.execute("DELETE FROM accounts WHERE tenant_id = ?", (tenant_id,))
            await tx.execute("DELETE FROM tenants WHERE id = ?", (tenant_id,))
            await self._change(tx, "tenant", name, {"name": name}, None)
        return [f"site {s}" for s in sites] + [f"account {a}" for a in accounts]

    # -- accounts ------------------------------------------------------------------------

    async def add_account(self, username: str, tenant: str, *,
                          protocols: Iterable[str] = PROTOCOLS, upstream_username: str = "",
                          authorized_keys: str = "", ssh_upstream_username: str = "",
                          ftp_upstream_username: str = "") -> None:
        """Add a login. ``upstream_username`` is the backend name for every protocol;
        ``ssh_upstream_username``/``ftp_upstream_username`` override it for one protocol
        ('' everywhere: the backend name is the username)."""
        check_username(username)
        names = _check_upstream_names(upstream_username=upstream_username,
                                      ssh_upstream_username=ssh_upstream_username,
                                      ftp_upstream_username=ftp_upstream_username)
        protocol_list = check_protocols(protocols)
        keys = check_authorized_keys(authorized_keys)
        async with self.store.transaction() as tx:
            await self._absent(tx, "accounts", "username", username, "account")
            tenant_id = await self._id(tx, "tenants", "name", tenant, "tenant")
            await tx.execute(
                "INSERT INTO accounts (username, tenant_id, protocols, upstream_username, "
                "authorized_keys, ssh_upstream_username, ftp_upstream_username) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (username, tenant_id, ",".join(protocol_list), upstream_username, keys,
                 ssh_upstream_username, ftp_upstream_username))
            await self._change(tx, "account", username, None, {
                "tenant": tenant, "protocols": protocol_list, **names,
                "authorized_keys": _key_summary(keys)})

    async def get_account(self, username: str) -> Account:
        account = await self.store.fetch_account(username)
        if account is None:
            raise NotFoundError(f"account {username!r} does not exist")
        return account

    async def update_account(self, username: str, *, protocols: Iterable[str] | None = None,
                             authorized_keys: str | None = None, tenant: str | None = None,
                             upstream_username: str | None = None,
                             ssh_upstream_username: str | None = None,
                             ftp_upstream_username: str | None = None) -> Account:
        """Change some of an account's settings (None: leave as is; '' for an upstream name:
        back to the default). Validated like :meth:`add_account`; returns the account."""
        columns: dict[str, Any] = _check_upstream_names(
            upstream_username=upstream_username, ssh_upstream_username=ssh_upstream_username,
            ftp_upstream_username=ftp_upstream_username)
        if protocols is not None:
            columns["protocols"] = ",".join(check_protocols(protocols))
        if authorized_keys is not None:
            columns["authorized_keys"] = check_authorized_keys(authorized_keys)
        if not columns and tenant is None:
            raise ValidationError("nothing to change: give at least one option")
        async with self.store.transaction() as tx:
            old = await _account_in(tx, username)
            if tenant is not None:
                columns["tenant_id"] = await self._id(tx, "tenants", "name", tenant, "tenant")
            assignments = ", ".join(f"{key} = ?" for key in columns)
            await tx.execute(f"UPDATE accounts SET {assignments} WHERE username = ?",
                             (*columns.values(), username))
            logged = {k: v for k, v in columns.items() if k != "tenant_id"}
            if "protocols" in logged:
                logged["protocols"] = sorted(logged["protocols"].split(","))
            if "authorized_keys" in logged:
                logged["authorized_keys"] = _key_summary(logged["authorized_keys"])
            if tenant is not None:
                logged["tenant"] = tenant
            await self._change(tx, "account", username, _account_log(old), logged)
        return await self.get_account(username)

    async def remove_account(self, username: str) -> None:
        async with self.store.transaction() as tx:
            old = await _account_in(tx, username)
            await tx.execute("DELETE FROM accounts WHERE username = ?", (username,))
            await self._change(tx, "account", username, _account_log(old), None)

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
            await self._change(tx, "site", name, None, {
                "tenant": tenant, "certificate_id": certificate_id,
                "https_redirect": https_redirect, "hsts": hsts})
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
            old_row = await tx.fetchone(
                "SELECT s.certificate_id, s.https_redirect, s.hsts, s.cache_policy, s.filters, "
                "t.name FROM sites s JOIN tenants t ON t.id = s.tenant_id WHERE s.hostname = ?",
                (name,))
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
                before = dict(zip(("certificate_id", "https_redirect", "hsts", "cache_policy",
                                   "filters", "tenant"), old_row or (), strict=False))
                after = {k: v for k, v in columns.items() if k != "tenant_id"}
                if "tenant" in fields:
                    after["tenant"] = fields["tenant"]
                await self._change(tx, "site", name, before, after)
        return name

    async def remove_site(self, hostname: str) -> None:
        name = normalize_hostname(hostname, allow_wildcard=True)
        async with self.store.transaction() as tx:
            await self._id(tx, "sites", "hostname", name, "site")
            row = await tx.fetchone("SELECT t.name, s.certificate_id FROM sites s JOIN tenants t "
                                    "ON t.id = s.tenant_id WHERE s.hostname = ?", (name,))
            await tx.execute("DELETE FROM sites WHERE hostname = ?", (name,))
            # Its ACME state goes too: no order for a name that is no longer in the directory.
            await tx.execute("DELETE FROM acme_names WHERE hostname = ?", (name,))
            await self._change(tx, "site", name, {"tenant": row[0] if row else None,
                                                  "certificate_id": row[1] if row else None},
                               None)

    async def purge_cache(self, hostname: str, path: str = "", *, url: str = "",
                          tag: str = "") -> None:
        """Ask every worker's HTTP cache to drop a site's objects: all, those under a path
        prefix, one URL (``url``: a request-target on ``hostname``, every variant and
        scheme), or those tagged ``tag`` (Cache-Tag / Surrogate-Key) by that site."""
        if sum(map(bool, (path, url, tag))) > 1:
            raise ValidationError("give at most one of --path, --url, --tag")
        wildcard_ok = not url  # a URL names a real host, maybe one under a wildcard site
        name = normalize_hostname(hostname, allow_wildcard=wildcard_ok)
        if path and not path.startswith("/"):
            raise ValidationError("--path must start with '/'")
        if url and (not url.startswith("/") or not url.isascii() or len(name + url) > 255
                    or any(c.isspace() for c in url)):
            raise ValidationError("--url must be an ASCII request-target starting with '/' "
                                  "(percent-encode the rest), at most 255 characters with the host")
        if tag and (not tag.isprintable() or any(c.isspace() or c == "," for c in tag)
                    or len(name) + 1 + len(tag) > 255):
            raise ValidationError("--tag must be one tag: no spaces or commas")
        async with self.store.transaction() as tx:
            if url:
                parent = name.partition(".")[2]
                row = await tx.fetchone("SELECT id FROM sites WHERE hostname = ? OR hostname = ?",
                                        (name, "*." + parent))
                if row is None:
                    raise NotFoundError(f"no site serves {name!r}")
                await self._change(tx, "purge-url", name + url, None, None)
                return
            await self._id(tx, "sites", "hostname", name, "site")
            if tag:
                await self._change(tx, "purge-tag", f"{name} {tag}", None, None)
            else:
                await self._change(tx, "purge", name + path, None, None)

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

    def _require_keybox(self, what: str = "importing a private key") -> KeyBox:
        if self.keybox is None:
            from edge.errors import SecretsError

            raise SecretsError(f"{what} needs the at-rest secret key: set $EDGE_SECRET_KEY or "
                               "[secrets] key_file (`edge init` creates one)")
        return self.keybox

    async def _sites_using(self, tx: Tx, certificate_id: int) -> list[str]:
        return [str(r[0]) for r in await tx.fetchall(
            "SELECT hostname FROM sites WHERE certificate_id = ? ORDER BY hostname",
            (certificate_id,))]

    async def remove_certificate(self, certificate_id: int) -> None:
        """Remove a certificate. Refused (ConflictError listing them) while sites use it:
        those sites would fall back to the default certificate and browsers would warn."""
        async with self.store.transaction() as tx:
            row = await tx.fetchone("SELECT fingerprint, names FROM certificates WHERE id = ?",
                                    (certificate_id,))
            if row is None:
                raise NotFoundError(f"certificate {certificate_id} does not exist")
            sites = await self._sites_using(tx, certificate_id)
            if sites:
                raise ConflictError(
                    f"certificate {certificate_id} is used by {InUse('site(s)', sites).text()} "
                    "(give them another certificate first: edge site set HOST --certificate ID)")
            await tx.execute("DELETE FROM certificates WHERE id = ?", (certificate_id,))
            await self._change(tx, "certificate", str(certificate_id),
                               {"fingerprint": row[0], "names": row[1]}, None)

    async def replace_certificate(self, certificate_id: int, chain_pem: bytes,
                                  key_pem: bytes) -> list[str]:
        """Rotate a certificate in place: same id, new chain and key, so every site using it
        serves the new one as soon as the proxies read the change row (their TLS contexts
        are keyed by id *and* fingerprint). Refused if the new certificate does not cover
        every site that uses the old one. Returns those sites."""
        keybox = self._require_keybox()
        cert = parse_certificate(chain_pem, key_pem)
        async with self.store.transaction() as tx:
            row = await tx.fetchone("SELECT fingerprint, names, not_after FROM certificates "
                                    "WHERE id = ?", (certificate_id,))
            if row is None:
                raise NotFoundError(f"certificate {certificate_id} does not exist")
            if row[0] == cert.fingerprint:
                raise ConflictError(f"certificate {certificate_id} already is this certificate")
            other = await tx.fetchone("SELECT id FROM certificates WHERE fingerprint = ?",
                                      (cert.fingerprint,))
            if other is not None:
                raise ConflictError(f"this certificate is already imported as id {other[0]}")
            sites = await self._sites_using(tx, certificate_id)
            uncovered = [s for s in sites if not certificate_covers(cert.names, s)]
            if uncovered:
                raise ValidationError(
                    f"the new certificate ({', '.join(cert.names)}) does not cover "
                    f"{InUse('site(s)', uncovered).text()} that use certificate {certificate_id}")
            await tx.execute(
                "UPDATE certificates SET fingerprint = ?, names = ?, not_before = ?, "
                "not_after = ?, chain_pem = ?, key_encrypted = ? WHERE id = ?",
                (cert.fingerprint, ",".join(cert.names), cert.not_before, cert.not_after,
                 cert.chain_pem, keybox.encrypt(cert.key_pem), certificate_id))
            await self._change(
                tx, "certificate", str(certificate_id),
                {"fingerprint": row[0], "names": row[1], "not_after": iso(float(row[2]))},
                {"fingerprint": cert.fingerprint, "names": ",".join(cert.names),
                 "not_after": iso(cert.not_after)})
        return sites

    async def import_certificate(self, chain_pem: bytes, key_pem: bytes) -> int:
        """Validate and store a certificate with its key encrypted; returns its id."""
        keybox = self._require_keybox()
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
                 cert.chain_pem, keybox.encrypt(cert.key_pem)))
            await self._change(tx, "certificate", str(certificate_id), None,
                               {"fingerprint": cert.fingerprint, "names": ",".join(cert.names),
                                "not_after": iso(cert.not_after)})
        return int(certificate_id)

    # -- ACME (edge.acme): accounts, names with automatic certificates, challenges ---------

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

    async def take_acme_budget(self, name: str, per_minute: float,
                               now: float | None = None) -> bool:
        """Take one on-demand order from the fleet-wide token bucket ``name`` (``per_minute``
        orders a minute, bursts of as many); False when it is empty. Like the lease: an upsert,
        a conditional UPDATE and a read-back of our own taker id, in one transaction."""
        now = time.time() if now is None else now
        rate, burst = per_minute / 60.0, max(1.0, per_minute)
        least = "MIN" if self.store.dialect == "sqlite" else "LEAST"
        insert = ("INSERT INTO acme_budgets (name, tokens, updated_at, taker) VALUES (?, ?, ?, '')"
                  + (" ON CONFLICT (name) DO NOTHING" if self.store.dialect == "sqlite"
                     else " ON DUPLICATE KEY UPDATE name = name"))
        refilled = f"{least}(?, tokens + (? - updated_at) * ?)"
        taker = os.urandom(8).hex()
        async with self.store.transaction() as tx:
            await tx.execute(insert, (name, burst, now))
            await tx.execute(
                f"UPDATE acme_budgets SET tokens = {refilled} - 1, updated_at = ?, taker = ? "
                f"WHERE name = ? AND {refilled} >= 1",
                (burst, now, rate, now, taker, name, burst, now, rate))
            row = await tx.fetchone("SELECT taker FROM acme_budgets WHERE name = ?", (name,))
        return row is not None and row[0] == taker

    async def install_acme_certificate(self, hostname: str, chain_pem: bytes, key_pem: bytes,
                                       *, renew_at: float, account: str,
                                       check_at: float | None = None) -> int:
        """Store an issued certificate, point the site at it and mark the name valid, in one
        transaction (change rows for the certificate and the site: every worker serves it
        after its next feed poll). Returns the certificate id.

        ``check_at``: when to ask the CA's renewal information (ARI) again; None: never
        before ``renew_at``. Kept in ``next_attempt``, which for a valid name means "look at
        it again then" (see :meth:`acme_names_to_recheck`)."""
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
                "failures = 0, next_attempt = ?, last_error = '', account = ?, updated_at = ? "
                "WHERE hostname = ?", (certificate_id, renew_at, _next_look(renew_at, check_at),
                                       account, time.time(), hostname))
        return int(certificate_id)

    async def acme_names_to_recheck(self, now: float, limit: int = 100) -> list[AcmeName]:
        """Valid names whose renewal information (ARI) is due to be asked again: their
        ``next_attempt`` passed and their ``renew_at`` did not (served by the due index)."""
        rows = await self.store.fetchall(
            f"{ACME_NAME_SELECT} WHERE next_attempt <= ? AND renew_at > ? AND lease_until < ? "
            f"AND state = 'valid' ORDER BY next_attempt LIMIT {int(limit)}", (now, now, now))
        return [acme_name_from_row(r) for r in rows]

    async def record_renewal_advice(self, hostname: str, certificate_id: int, renew_at: float,
                                    check_at: float | None) -> None:
        """The CA's renewal information for a name's current certificate (a no-op if the
        certificate changed meanwhile)."""
        async with self.store.transaction() as tx:
            await tx.execute(
                "UPDATE acme_names SET renew_at = ?, next_attempt = ?, updated_at = ? "
                "WHERE hostname = ? AND certificate_id = ? AND state = 'valid'",
                (renew_at, _next_look(renew_at, check_at), time.time(), hostname,
                 certificate_id))

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


    async def rotate_secret_key(self, batch: int = 500) -> tuple[int, int]:
        """Re-encrypt every stored private key that is not under the current secret key (the
        keybox must accept the old one: ``[secrets] previous_key_files``). Idempotent and
        resumable: rows already under the current key are skipped. Returns (re-encrypted,
        already current). No change rows: the keys themselves do not change."""
        if self.keybox is None:
            from edge.errors import SecretsError

            raise SecretsError("rotating needs the new secret key ($EDGE_SECRET_KEY or "
                               "[secrets] key_file) and the old one in previous_key_files")
        done = current = 0
        after = 0
        while True:
            rows = await self.store.fetchall(
                f"SELECT id, key_encrypted FROM certificates WHERE id > ? ORDER BY id "
                f"LIMIT {int(batch)}", (after,))
            if not rows:
                return done, current
            async with self.store.transaction() as tx:
                for row in rows:
                    blob = bytes(row[1])
                    if not self.keybox.needs_rotation(blob):
                        current += 1
                        continue
                    fresh = self.keybox.encrypt(self.keybox.decrypt(blob))
                    # Only if nobody rotated it meanwhile (another `rotate` run).
                    await tx.execute("UPDATE certificates SET key_encrypted = ? WHERE id = ? "
                                     "AND key_encrypted = ?", (fresh, row[0], blob))
                    done += 1
            after = int(rows[-1][0])


def _check_upstream_names(**names: str | None) -> dict[str, str]:
    """The upstream-name arguments that were given (not None), each checked like a username
    ('' allowed: back to the default)."""
    given = {k: v for k, v in names.items() if v is not None}
    for key, value in given.items():
        if value:
            check_username(value, key.replace("_", " "))
    return given


async def _account_in(tx: Tx, username: str) -> Account:
    row = await tx.fetchone(ACCOUNT_SELECT + " WHERE a.username = ?", (username,))
    if row is None:
        raise NotFoundError(f"account {username!r} does not exist")
    return account_from_row(row)


def _key_summary(keys: str) -> str:
    """Authorized keys as a change row shows them: how many, not the key material."""
    return f"{len(keys.splitlines())} key(s)"


def _account_log(account: Account) -> dict[str, Any]:
    return {"tenant": account.tenant, "protocols": sorted(account.protocols),
            "upstream_username": account.upstream_username,
            "ssh_upstream_username": account.ssh_upstream_username,
            "ftp_upstream_username": account.ftp_upstream_username,
            "authorized_keys": _key_summary(account.authorized_keys)}


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _next_look(renew_at: float, check_at: float | None) -> float:
    """``next_attempt`` of a valid name: its next ARI check, never after its renewal."""
    return renew_at if check_at is None else min(check_at, renew_at)
