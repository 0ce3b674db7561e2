"""Bulk load of a whole fleet (hosts, tenants, accounts, sites, certificates) from JSON Lines.

``edge bulk-load FILE`` calls :func:`bulk_load`; benchmarks and the load-test harness use
:func:`synthetic_fleet` to make realistic input. One JSON object per line::

    {"kind": "host", "name": "h001", "address": "127.0.0.1", "ssh_port": 20001, ...}
    {"kind": "tenant", "name": "tenant1", "host": "h001"}
    {"kind": "certificate", "ref": "c1", "cert_pem": "-----BEGIN ...", "key_pem": "..."}
    {"kind": "site", "hostname": "www.tenant1.example", "tenant": "tenant1", "certificate": "c1"}
    {"kind": "site", "hostname": "shop.tenant1.example", "tenant": "tenant1", "auto_cert": true}
    {"kind": "account", "username": "tenant1", "tenant": "tenant1", "protocols": ["ssh"]}

Fields are those of the :class:`~edge.directory.service.DirectoryService` methods, validated by
the very same functions (imported, never copied). A record may refer to objects defined on an
earlier line or already in the database; a site's ``certificate`` is either the ``ref`` of a
certificate record in the file or the id of a stored certificate. ``"auto_cert": true`` (with
an optional ``"key_type"``) gives a site automatic certificates like ``edge site add
--auto-cert``; ``auto_cert=True`` (``edge bulk-load --auto-cert``, or the ``[acme]
auto_cert_new_sites`` policy) does so for every site of the file that has no certificate and
is not a wildcard, unless its record says ``"auto_cert": false``.

**All or nothing.** The whole file is loaded in ONE transaction: the first bad record raises
:class:`BulkLoadError` (a :class:`ValidationError`) naming its line, the transaction rolls
back and nothing is written. A 1,000,000-row InnoDB/SQLite transaction is fine; the undo log
is the "staging area".

**Speed.** Names are resolved to ids with in-memory dicts, never a query per row: ids are
assigned here (``MAX(id) + 1 ...``, read with ``FOR UPDATE`` on MySQL so a concurrent writer
waits rather than collides) and rows go out with ``executemany`` (pymysql rewrites that into
multi-row ``INSERT ... VALUES (...), (...)``), ``batch_size`` rows at a time. Identical rule
JSON (``cache_policy``/``filters``) is validated once and memoised. On success exactly one
change row ``("all", "*")`` is appended, so every proxy drops its cache (including negative
answers for the names just created) — never a million change rows.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import random
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge.directory.model import HOST_STATES, PROTOCOLS, PROXY_PROTOCOL_MODES, TENANT_STATES
from edge.directory.names import normalize_hostname
from edge.directory.rules import validate_cache_policy, validate_filters
from edge.directory.secrets import KeyBox
from edge.directory.service import (
    ACME_KEY_TYPES,
    certificate_covers,
    check_address,
    check_authorized_keys,
    check_choice,
    check_name,
    check_port,
    check_protocols,
    check_username,
    parse_certificate,
)
from edge.directory.store import HOST_COLUMNS, SQLStore, Tx, append_change
from edge.errors import EdgeError, SecretsError, ValidationError

KINDS = ("host", "tenant", "certificate", "account", "site")
"""Also the order in which pending rows are flushed: parents before children (foreign keys)."""

ProgressCallback = Callable[[str, int], None]

_FIELDS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    # kind: (required fields, optional fields)
    "host": (frozenset({"name", "address"}),
             frozenset({"ssh_port", "ftp_port", "http_port", "https_port", "state", "notice",
                        "send_proxy_protocol", "backend_tls", "ssh_insecure",
                        "ssh_known_hosts"})),
    "tenant": (frozenset({"name", "host"}), frozenset({"state"})),
    "account": (frozenset({"username", "tenant"}),
                frozenset({"protocols", "upstream_username", "authorized_keys",
                           "ssh_upstream_username", "ftp_upstream_username"})),
    "site": (frozenset({"hostname", "tenant"}),
             frozenset({"certificate", "https_redirect", "hsts", "cache_policy", "filters",
                        "auto_cert", "key_type"})),
    "certificate": (frozenset({"ref", "cert_pem", "key_pem"}), frozenset()),
}

_INSERT = {
    "host": f"INSERT INTO hosts (id, {HOST_COLUMNS}) VALUES ({', '.join('?' * 13)})",
    "tenant": "INSERT INTO tenants (id, name, host_id, state) VALUES (?, ?, ?, ?)",
    "account": ("INSERT INTO accounts (id, username, tenant_id, protocols, upstream_username, "
                "authorized_keys, ssh_upstream_username, ftp_upstream_username) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)"),
    "site": ("INSERT INTO sites (id, hostname, tenant_id, certificate_id, https_redirect, hsts, "
             "cache_policy, filters) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"),
    "certificate": ("INSERT INTO certificates (id, fingerprint, names, not_before, not_after, "
                    "chain_pem, key_encrypted) VALUES (?, ?, ?, ?, ?, ?, ?)"),
}
# kind -> (table, unique column): used for "already in the database" checks.
_TABLES = {"host": ("hosts", "name"), "tenant": ("tenants", "name"),
           "account": ("accounts", "username"), "site": ("sites", "hostname"),
           "certificate": ("certificates", "fingerprint")}


class BulkLoadError(ValidationError):
    """A refused input line; ``line`` is 1-based. Nothing was written."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(f"line {line}: {message}")
        self.line = line


@dataclass
class _Pending:
    """Rows of one kind waiting for the next ``executemany``, with their line numbers."""

    rows: list[tuple[Any, ...]] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)


class _Loader:
    """State of one load: name→id dicts, pending batches, counters."""

    def __init__(self, store: SQLStore, tx: Tx, keybox: KeyBox | None, batch_size: int,
                 progress: ProgressCallback | None, auto_cert: bool = False) -> None:
        self.store = store
        self.tx = tx
        self.keybox = keybox
        self.batch_size = max(1, batch_size)
        self.progress = progress
        self.next_id: dict[str, int] = {}
        self.preexisting: dict[str, bool] = {}
        self.pending = {kind: _Pending() for kind in KINDS}
        self.full = False  # some batch reached batch_size: flush after this record
        self.counts = dict.fromkeys(KINDS, 0)
        self.auto_cert = auto_cert
        self.acme_names: list[tuple[str, str, float]] = []
        """(hostname, key_type, now) of sites given automatic certificates, after the sites."""
        # Objects of this file: key -> (id, line); for duplicates "first defined on line N".
        self.host_ids: dict[str, tuple[int, int]] = {}
        self.tenant_ids: dict[str, tuple[int, int]] = {}
        self.account_lines: dict[str, int] = {}
        self.site_lines: dict[str, int] = {}
        self.cert_refs: dict[str, tuple[int, tuple[str, ...], int]] = {}
        self.fingerprints: dict[str, int] = {}
        # Objects already in the database, looked up once each.
        self.db_hosts: dict[str, int] = {}
        self.db_tenants: dict[str, int] = {}
        self.db_certs: dict[int, tuple[str, ...]] = {}
        # Memoised canonical JSON of rules: most sites share a handful of policies.
        self.policy_memo: dict[str, str] = {}
        self.filter_memo: dict[str, str] = {}

    async def start(self) -> None:
        lock = " FOR UPDATE" if self.store.dialect == "mysql" else ""
        for kind in KINDS:
            table = _TABLES[kind][0]
            row = await self.tx.fetchone(f"SELECT MAX(id) FROM {table}{lock}")
            top = int(row[0]) if row and row[0] is not None else 0
            self.next_id[kind] = top + 1
            # An empty table cannot hold duplicates: skip the per-batch "already exists" query.
            self.preexisting[kind] = top > 0
        for host_id, name in await self.tx.fetchall("SELECT id, name FROM hosts"):
            self.db_hosts[name] = int(host_id)

    def _new_id(self, kind: str) -> int:
        value = self.next_id[kind]
        self.next_id[kind] = value + 1
        return value

    def _add(self, kind: str, line: int, key: str, row: tuple[Any, ...]) -> None:
        pending = self.pending[kind]
        pending.rows.append(row)
        pending.lines.append(line)
        pending.keys.append(key)
        if len(pending.rows) >= self.batch_size:
            self.full = True

    def due(self) -> bool:
        return self.full

    async def flush(self) -> None:
        """Write every pending batch, parents first, so foreign keys always resolve."""
        for kind in KINDS:
            pending = self.pending[kind]
            if not pending.rows:
                continue
            if self.preexisting[kind]:
                await self._check_absent(kind, pending)
            await self.tx.executemany(_INSERT[kind], pending.rows)
            self.counts[kind] += len(pending.rows)
            self.pending[kind] = _Pending()
            if self.progress is not None:
                self.progress(kind, self.counts[kind])
        if self.acme_names:
            # A row left by a removed site of the same name is stale (the site was absent).
            for start in range(0, len(self.acme_names), 1000):
                chunk = [row[0] for row in self.acme_names[start:start + 1000]]
                await self.tx.execute("DELETE FROM acme_names WHERE hostname IN "
                                      f"({','.join('?' * len(chunk))})", chunk)
            await self.tx.executemany(
                "INSERT INTO acme_names (hostname, key_type, state, last_error, account, "
                "lease_owner, updated_at) VALUES (?, ?, 'pending', '', '', '', ?)",
                self.acme_names)
            self.counts["auto_cert"] = self.counts.get("auto_cert", 0) + len(self.acme_names)
            self.acme_names = []
        self.full = False

    async def _check_absent(self, kind: str, pending: _Pending) -> None:
        table, column = _TABLES[kind]
        found: set[str] = set()
        for start in range(0, len(pending.keys), 1000):
            chunk = pending.keys[start:start + 1000]
            marks = ",".join("?" * len(chunk))
            rows = await self.tx.fetchall(
                f"SELECT {column} FROM {table} WHERE {column} IN ({marks})", chunk)
            found.update(r[0] for r in rows)
        if found:
            for line, key in zip(pending.lines, pending.keys, strict=True):
                if key in found:
                    what = "a certificate with this fingerprint" if kind == "certificate" \
                        else f"{kind} {key!r}"
                    raise BulkLoadError(line, f"{what} already exists in the database")

    # -- references ----------------------------------------------------------------------

    async def host_id(self, name: str) -> int:
        if name in self.host_ids:
            return self.host_ids[name][0]
        if name in self.db_hosts:
            return self.db_hosts[name]
        raise ValidationError(f"host {name!r} does not exist (neither earlier in the file "
                              "nor in the database)")

    async def tenant_id(self, name: str) -> int:
        if name in self.tenant_ids:
            return self.tenant_ids[name][0]
        if name not in self.db_tenants:
            row = await self.tx.fetchone("SELECT id FROM tenants WHERE name = ?", (name,))
            if row is None:
                raise ValidationError(f"tenant {name!r} does not exist (neither earlier in the "
                                      "file nor in the database)")
            self.db_tenants[name] = int(row[0])
        return self.db_tenants[name]

    async def certificate(self, ref: Any) -> tuple[int, tuple[str, ...]]:
        if isinstance(ref, str):
            if ref not in self.cert_refs:
                raise ValidationError(f"certificate ref {ref!r} is not defined earlier in the file")
            cert_id, names, _ = self.cert_refs[ref]
            return cert_id, names
        if isinstance(ref, int) and not isinstance(ref, bool):
            if ref not in self.db_certs:
                row = await self.tx.fetchone("SELECT names FROM certificates WHERE id = ?", (ref,))
                if row is None:
                    raise ValidationError(f"certificate {ref} does not exist")
                self.db_certs[ref] = tuple(n for n in row[0].split(",") if n)
            return ref, self.db_certs[ref]
        raise ValidationError("certificate must be a ref (string) or a certificate id (integer)")

    # -- records -------------------------------------------------------------------------

    async def record(self, line: int, obj: dict[str, Any]) -> None:
        kind = obj.get("kind")
        if kind not in _FIELDS:
            raise ValidationError(f"kind {kind!r} must be one of {', '.join(KINDS)}")
        required, optional = _FIELDS[kind]
        present = set(obj) - {"kind"}
        missing = required - present
        if missing:
            raise ValidationError(f"{kind}: missing field {sorted(missing)[0]!r}")
        unknown = present - required - optional
        if unknown:
            raise ValidationError(f"{kind}: unknown field {sorted(unknown)[0]!r} "
                                  f"(known: {', '.join(sorted(required | optional))})")
        if kind == "host":
            await self._host(line, obj)
        elif kind == "tenant":
            await self._tenant(line, obj)
        elif kind == "account":
            await self._account(line, obj)
        elif kind == "site":
            await self._site(line, obj)
        else:
            await self._certificate(line, obj)

    async def _host(self, line: int, obj: dict[str, Any]) -> None:
        name = check_name("host", _str(obj, "name"))
        address = check_address(_str(obj, "address"))
        ports = []
        for key, default in (("ssh_port", 22), ("ftp_port", 21), ("http_port", 80),
                             ("https_port", 443)):
            ports.append(check_port("--" + key.replace("_", "-"), _int(obj, key, default)))
        state = check_choice("host state", obj.get("state", "active"), HOST_STATES)
        proxy = check_choice("send_proxy_protocol", obj.get("send_proxy_protocol", "off"),
                             PROXY_PROTOCOL_MODES)
        if name in self.host_ids:
            raise ValidationError(f"duplicate host {name!r} "
                                  f"(first on line {self.host_ids[name][1]})")
        if name in self.db_hosts:
            raise ValidationError(f"host {name!r} already exists in the database")
        host_id = self._new_id("host")
        self.host_ids[name] = (host_id, line)
        self._add("host", line, name, (
            host_id, name, address, *ports, state, _str(obj, "notice", ""),
            _str(obj, "ssh_known_hosts", ""), int(_bool(obj, "ssh_insecure")), proxy,
            int(_bool(obj, "backend_tls"))))

    async def _tenant(self, line: int, obj: dict[str, Any]) -> None:
        name = check_name("tenant", _str(obj, "name"))
        state = check_choice("tenant state", obj.get("state", "active"), TENANT_STATES)
        if name in self.tenant_ids:
            raise ValidationError(f"duplicate tenant {name!r} "
                                  f"(first on line {self.tenant_ids[name][1]})")
        host_id = await self.host_id(_str(obj, "host"))
        tenant_id = self._new_id("tenant")
        self.tenant_ids[name] = (tenant_id, line)
        self._add("tenant", line, name, (tenant_id, name, host_id, state))

    async def _account(self, line: int, obj: dict[str, Any]) -> None:
        # The same checks, in the same order and words, as DirectoryService.add_account.
        username = check_username(_str(obj, "username"))
        upstream, ssh_upstream, ftp_upstream = (
            _str(obj, key, "") for key in ("upstream_username", "ssh_upstream_username",
                                           "ftp_upstream_username"))
        for key, value in (("upstream username", upstream),
                           ("ssh upstream username", ssh_upstream),
                           ("ftp upstream username", ftp_upstream)):
            if value:
                check_username(value, key)
        protocols = obj.get("protocols", list(PROTOCOLS))
        if not isinstance(protocols, list | str):
            raise ValidationError("protocols must be a list")
        protocol_list = check_protocols(protocols)
        keys = check_authorized_keys(_str(obj, "authorized_keys", ""))
        if username in self.account_lines:
            raise ValidationError(f"duplicate account {username!r} "
                                  f"(first on line {self.account_lines[username]})")
        tenant_id = await self.tenant_id(_str(obj, "tenant"))
        self.account_lines[username] = line
        self._add("account", line, username, (
            self._new_id("account"), username, tenant_id, ",".join(protocol_list), upstream,
            keys, ssh_upstream, ftp_upstream))

    async def _site(self, line: int, obj: dict[str, Any]) -> None:
        name = normalize_hostname(_str(obj, "hostname"), allow_wildcard=True)
        policy = _memo(self.policy_memo, obj.get("cache_policy"), validate_cache_policy)
        rules = _memo(self.filter_memo, obj.get("filters"), validate_filters)
        if name in self.site_lines:
            raise ValidationError(f"duplicate site {name!r} "
                                  f"(first on line {self.site_lines[name]})")
        tenant_id = await self.tenant_id(_str(obj, "tenant"))
        certificate_id = None
        if obj.get("certificate") is not None:
            certificate_id, names = await self.certificate(obj["certificate"])
            if not certificate_covers(names, name):
                raise ValidationError(f"certificate {obj['certificate']!r} ({', '.join(names)}) "
                                      f"does not cover {name}")
        self.site_lines[name] = line
        if self._wants_auto_cert(name, obj, certificate_id):
            self.acme_names.append((name, _str(obj, "key_type", "ec256"), time.time()))
        self._add("site", line, name, (
            self._new_id("site"), name, tenant_id, certificate_id,
            int(_bool(obj, "https_redirect")), int(_bool(obj, "hsts")), policy, rules))

    def _wants_auto_cert(self, name: str, obj: dict[str, Any], certificate_id: int | None) -> bool:
        """The checks of ``DirectoryService.enable_auto_cert``, for one record."""
        wanted = _bool(obj, "auto_cert") if "auto_cert" in obj else (
            self.auto_cert and certificate_id is None and not name.startswith("*."))
        if "key_type" in obj:
            if not wanted:
                raise ValidationError("key_type is only for sites with auto_cert")
            check_choice("key_type", _str(obj, "key_type"), ACME_KEY_TYPES)
        if wanted and name.startswith("*."):
            raise ValidationError(f"{name}: wildcard certificates need DNS-01, which the edge "
                                  "does not answer; import one with `edge cert import`")
        return wanted

    async def _certificate(self, line: int, obj: dict[str, Any]) -> None:
        if self.keybox is None:
            raise SecretsError("importing a private key needs the at-rest secret key: set "
                               "$EDGE_SECRET_KEY or [secrets] key_file "
                               "(create one with `edge secret generate`)")
        ref = _str(obj, "ref")
        if not ref:
            raise ValidationError("certificate ref must not be empty")
        if ref in self.cert_refs:
            raise ValidationError(f"duplicate certificate ref {ref!r} "
                                  f"(first on line {self.cert_refs[ref][2]})")
        cert = parse_certificate(_str(obj, "cert_pem").encode(), _str(obj, "key_pem").encode())
        if cert.fingerprint in self.fingerprints:
            raise ValidationError("the same certificate is already on line "
                                  f"{self.fingerprints[cert.fingerprint]}")
        cert_id = self._new_id("certificate")
        self.cert_refs[ref] = (cert_id, cert.names, line)
        self.fingerprints[cert.fingerprint] = line
        self._add("certificate", line, cert.fingerprint, (
            cert_id, cert.fingerprint, ",".join(cert.names), cert.not_before, cert.not_after,
            cert.chain_pem, self.keybox.encrypt(cert.key_pem)))


def _str(obj: dict[str, Any], key: str, default: str | None = None) -> str:
    value = obj.get(key, default)
    if not isinstance(value, str):
        raise ValidationError(f"{key} must be a string")
    return value


def _int(obj: dict[str, Any], key: str, default: int) -> int:
    value = obj.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValidationError(f"{key} must be an integer")
    return value


def _bool(obj: dict[str, Any], key: str) -> bool:
    value = obj.get(key, False)
    if not isinstance(value, bool):
        raise ValidationError(f"{key} must be true or false")
    return value


def _memo(memo: dict[str, str], raw: Any,
          validate: Callable[[Any], dict[str, Any]]) -> str:
    """Canonical JSON of validated rules, validating each distinct input only once."""
    if raw is None:  # the common case: skip even the json.dumps of the key
        key = "\0none"
        if key in memo:
            return memo[key]
        memo[key] = json.dumps(validate(None), sort_keys=True)
        return memo[key]
    key = raw if isinstance(raw, str) else json.dumps(raw, sort_keys=True)
    cached = memo.get(key)
    if cached is None:
        cached = json.dumps(validate(raw), sort_keys=True)
        if len(memo) < 10_000:  # bounded: a file of all-different rules must not hoard memory
            memo[key] = cached
    return cached


def _open_lines(source: Iterable[str] | str | os.PathLike[str]) -> tuple[Iterable[str], Any]:
    """Lines of ``source``; a str or PathLike is a file name (``.gz`` is decompressed)."""
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        # Closed by bulk_load's ``finally`` (a context manager cannot span the generator).
        handle: Any = (io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")  # noqa: SIM115
                       if path.suffix == ".gz" else path.open(encoding="utf-8"))
        return handle, handle
    return source, None


async def bulk_load(store: SQLStore, lines: Iterable[str] | str | os.PathLike[str], *,
                    keybox: KeyBox | None = None, batch_size: int = 5000,
                    progress: ProgressCallback | None = None,
                    auto_cert: bool = False) -> dict[str, int]:
    """Load JSON Lines records into the directory, all or nothing; returns counts per kind.

    ``lines`` is an iterable of lines (a list, an open file) or a file name (``str`` or
    :class:`os.PathLike`; ``.gz`` accepted). ``keybox`` is needed only if the file has
    certificate records. ``progress(kind, rows_written_so_far)`` is called after each batch.
    ``auto_cert``: see the module docstring; the counts then include ``auto_cert``.

    Raises :class:`BulkLoadError` (a :class:`ValidationError`; ``.line`` is the line number)
    for the first bad record, and nothing is written. Database failures surface as the
    store's :class:`DirectoryUnavailable` / :class:`ConflictError`, also with nothing written.
    """
    iterable, handle = _open_lines(lines)
    try:
        async with store.transaction() as tx:
            loader = _Loader(store, tx, keybox, batch_size, progress, auto_cert)
            await loader.start()
            for number, text in enumerate(iterable, start=1):
                if not text.strip():
                    continue
                try:
                    obj = json.loads(text)
                except ValueError as exc:
                    raise BulkLoadError(number, f"not valid JSON ({exc})") from None
                if not isinstance(obj, dict):
                    raise BulkLoadError(number, "each line must be a JSON object")
                try:
                    await loader.record(number, obj)
                except BulkLoadError:
                    raise
                except EdgeError as exc:
                    raise BulkLoadError(number, str(exc)) from None
                if loader.due():
                    await loader.flush()
            await loader.flush()
            if any(loader.counts.values()):
                # One entry for the whole load: every proxy clears its caches, including the
                # negative answers it may hold for the names that now exist.
                await append_change(tx, "all", "*", actor="bulk-load")
        return loader.counts
    finally:
        if handle is not None:
            handle.close()


# -- synthetic fleets -----------------------------------------------------------------------

_POLICIES: tuple[dict[str, Any] | None, ...] = (
    None,
    {"mode": "static"},
    {"mode": "wordpress", "ttl": {"200": 300}},
    {"mode": "full", "paths": [{"prefix": "/cart", "bypass": True}]},
)
_FILTERS: tuple[dict[str, Any] | None, ...] = (
    None,
    {"path_deny": [{"prefix": "/.git"}]},
    {"ip_deny": ["198.51.100.7"], "methods": ["GET", "HEAD", "POST"]},
    {"rate_limit": {"requests_per_second": 10, "burst": 20}},
)


def synthetic_host(index: int) -> dict[str, Any]:
    """Host ``index`` (0-based) of a synthetic fleet: ``h0001`` on 127.0.0.x, distinct ports.

    Deterministic so a load-test harness can start fake backends at the same endpoints:
    address ``127.0.0.{index % 250 + 1}``, ports ssh 20000+i, ftp 30000+i, http 40000+i,
    https 50000+i (i < 10000).
    """
    return {"kind": "host", "name": f"h{index + 1:04d}", "address": f"127.0.0.{index % 250 + 1}",
            "ssh_port": 20000 + index, "ftp_port": 30000 + index,
            "http_port": 40000 + index, "https_port": 50000 + index}


def synthetic_site_name(tenant: int, slot: int) -> str:
    """The ``slot``-th site of tenant ``tenant`` (both 0-based) in :func:`synthetic_fleet`.

    slot 0 ``tenantN.example``, 1 ``www.tenantN.example``, 2 ``*.tenantN.example`` (every third
    tenant; others ``shop.tenantN.example``), then pairs ``dK-tenantN.example.net`` /
    ``www.dK-tenantN.example.net``.
    """
    base = f"tenant{tenant}.example"
    if slot == 0:
        return base
    if slot == 1:
        return "www." + base
    if slot == 2:
        return ("*." if tenant % 3 == 0 else "shop.") + base
    domain = f"d{(slot - 3) // 2}-tenant{tenant}.example.net"
    return domain if (slot - 3) % 2 == 0 else "www." + domain


def synthetic_fleet(hosts: int, tenants: int, sites: int, accounts: int, *,
                    seed: int = 1) -> Iterator[str]:
    """JSON Lines for a realistic fleet, in load order (hosts, tenants, sites, accounts).

    Tenant ``tenantN`` (N from 0) lives on host ``N % hosts``; sites are dealt round-robin
    over tenants (site ``s`` belongs to tenant ``s % tenants`` as its slot ``s // tenants``, see
    :func:`synthetic_site_name`), so with 1,000,000 sites and 100,000 tenants each tenant has
    10. Account ``a`` belongs to tenant ``a % tenants`` (``tenantN``, then ``tenantN-2``...).
    ``seed`` varies the per-site flags and rules, never the names.
    """
    if hosts < 1 or (tenants < 1 and (sites or accounts)):
        raise ValueError("a fleet needs at least one host, and a tenant for sites/accounts")
    rng = random.Random(seed)
    dumps = json.JSONEncoder(separators=(",", ":")).encode
    for h in range(hosts):
        yield dumps(synthetic_host(h))
    for t in range(tenants):
        yield dumps({"kind": "tenant", "name": f"tenant{t}", "host": f"h{t % hosts + 1:04d}"})
    policies = [dumps(p) for p in _POLICIES]
    for s in range(sites):
        tenant, slot = s % tenants, s // tenants
        redirect = rng.random() < 0.3
        # Most sites use defaults; the rest draw from a few shared rule sets, as in real life.
        policy = policies[rng.randrange(len(policies))] if rng.random() < 0.2 else None
        rules = _FILTERS[rng.randrange(len(_FILTERS))] if rng.random() < 0.1 else None
        record: dict[str, Any] = {"kind": "site", "hostname": synthetic_site_name(tenant, slot),
                                  "tenant": f"tenant{tenant}"}
        if redirect:
            record["https_redirect"] = True
            record["hsts"] = rng.random() < 0.5
        if policy is not None:
            record["cache_policy"] = json.loads(policy)
        if rules is not None:
            record["filters"] = rules
        yield dumps(record)
    for a in range(accounts):
        tenant, nth = a % tenants, a // tenants
        username = f"tenant{tenant}" if nth == 0 else f"tenant{tenant}-{nth + 1}"
        protocols = ["ftp", "ssh"] if rng.random() < 0.7 else [rng.choice(("ssh", "ftp"))]
        yield dumps({"kind": "account", "username": username, "tenant": f"tenant{tenant}",
                     "protocols": protocols, "upstream_username": username})


__all__ = ["KINDS", "BulkLoadError", "bulk_load", "synthetic_fleet", "synthetic_host",
           "synthetic_site_name"]
