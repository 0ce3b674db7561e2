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
    Host,
    Tenant,
)
from edge.directory.names import normalize_hostname, wildcard_parent
from edge.directory.rules import validate_cache_policy, validate_filters
from edge.directory.secrets import KeyBox
from edge.directory.store import (
    ACCOUNT_SELECT,
    HOST_COLUMNS,
    HOST_READ_COLUMNS,
    SQLStore,
    Tx,
    account_from_row,
    append_change,
    host_from_row,
)
from edge.errors import ConflictError, NotFoundError, ValidationError

DEFAULT_MOVE_DRAIN = 300.0
"""Seconds ``edge tenant move`` leaves sessions on the old host by default: long enough for
most uploads and deploys to finish, short enough that the old host can be emptied."""

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
            await self._change(tx, "site", name, {"tenant": row[0] if row else None,
                                                  "certificate_id": row[1] if row else None},
                               None)

    async def purge_cache(self, hostname: str, path: str = "") -> None:
        """Ask every worker's HTTP cache to drop a site's objects (all, or one path prefix)."""
        name = normalize_hostname(hostname, allow_wildcard=True)
        if path and not path.startswith("/"):
            raise ValidationError("--path must start with '/'")
        async with self.store.transaction() as tx:
            await self._id(tx, "sites", "hostname", name, "site")
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

    def _require_keybox(self) -> KeyBox:
        if self.keybox is None:
            from edge.errors import SecretsError

            raise SecretsError("importing a private key needs the at-rest secret key: set "
                               "$EDGE_SECRET_KEY or [secrets] key_file "
                               "(`edge init` creates one)")
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
