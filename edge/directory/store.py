"""The SQL store behind the directory: one implementation of every query, two drivers.

:class:`SQLStore` holds all SQL (written once with ``?`` placeholders); the SQLite and
MySQL/MariaDB subclasses only supply connections, transactions and error translation. That is
what makes "the same behaviour on both stores" true by construction, and the shared test-suite
checks it.

Failures to reach the database surface as :class:`~edge.errors.DirectoryUnavailable`; unique
and foreign-key violations as :class:`~edge.errors.ConflictError`.
"""

from __future__ import annotations

import abc
import json
import time
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

from edge.directory import schema
from edge.directory.model import (
    Account,
    AcmeAccount,
    AcmeChallenge,
    AcmeName,
    Change,
    ChangeRecord,
    Host,
    Site,
    StoredCertificate,
    Tenant,
)

Row = tuple[Any, ...]

HOST_COLUMNS = ("name, address, ssh_port, ftp_port, http_port, https_port, state, notice, "
                "ssh_known_hosts, ssh_insecure, send_proxy_protocol, backend_tls")
HOST_READ_COLUMNS = HOST_COLUMNS + ", maintenance_until"
"""What reads select: ``maintenance_until`` (migration 3) is set only by ``set-state``."""
ACCOUNT_SELECT = ("SELECT a.username, t.name, a.protocols, a.upstream_username, "
                   "a.authorized_keys, a.ssh_upstream_username, a.ftp_upstream_username "
                   "FROM accounts a JOIN tenants t ON t.id = a.tenant_id")
_TENANT_SELECT = ("SELECT t.name, h.name, t.state, p.name, t.drain_deadline FROM tenants t "
                  "JOIN hosts h ON h.id = t.host_id LEFT JOIN hosts p ON p.id = t.previous_host_id")
_SITE_SELECT = ("SELECT s.hostname, t.name, s.certificate_id, s.https_redirect, s.hsts, "
                "s.cache_policy, s.filters FROM sites s JOIN tenants t ON t.id = s.tenant_id")
_CERT_SELECT = ("SELECT id, fingerprint, names, not_before, not_after, chain_pem, key_encrypted "
                "FROM certificates")
ACME_NAME_SELECT = ("SELECT hostname, key_type, state, certificate_id, renew_at, failures, "
                    "next_attempt, last_error, account, orders, lease_owner, lease_until "
                    "FROM acme_names")
ACME_ACCOUNT_SELECT = ("SELECT name, directory_url, priority, environment, key_encrypted, "
                       "account_url, eab_kid, email, failures, next_attempt, last_error FROM acme_accounts")


class Tx(Protocol):
    """A database transaction handed out by :meth:`SQLStore.transaction`."""

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run one statement; returns the last inserted row id (0 if none)."""

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None: ...

    async def fetchone(self, sql: str, params: Sequence[Any] = ()) -> Row | None: ...

    async def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[Row]: ...


def host_from_row(row: Row) -> Host:
    return Host(name=row[0], address=row[1], ssh_port=int(row[2]), ftp_port=int(row[3]),
                http_port=int(row[4]), https_port=int(row[5]), state=row[6], notice=row[7],
                ssh_known_hosts=row[8], ssh_insecure=bool(row[9]), send_proxy_protocol=row[10],
                backend_tls=bool(row[11]),
                maintenance_until=None if len(row) < 13 or row[12] is None else float(row[12]))


def tenant_from_row(row: Row) -> Tenant:
    return Tenant(name=row[0], host=row[1], state=row[2], previous_host=row[3],
                  drain_deadline=None if row[4] is None else float(row[4]))


def account_from_row(row: Row) -> Account:
    protocols = frozenset(p for p in row[2].split(",") if p)
    return Account(username=row[0], tenant=row[1], protocols=protocols,
                   upstream_username=row[3], authorized_keys=row[4],
                   ssh_upstream_username=row[5], ftp_upstream_username=row[6])


def site_from_row(row: Row) -> Site:
    return Site(hostname=row[0], tenant=row[1], certificate_id=row[2],
                https_redirect=bool(row[3]), hsts=bool(row[4]),
                cache_policy=json.loads(row[5]) if row[5] else {},
                filters=json.loads(row[6]) if row[6] else {})


def certificate_from_row(row: Row) -> StoredCertificate:
    return StoredCertificate(id=int(row[0]), fingerprint=row[1],
                             names=tuple(n for n in row[2].split(",") if n),
                             not_before=float(row[3]), not_after=float(row[4]),
                             chain_pem=bytes(row[5]), key_encrypted=bytes(row[6]))


def acme_name_from_row(row: Row) -> AcmeName:
    return AcmeName(hostname=row[0], key_type=row[1], state=row[2],
                    certificate_id=None if row[3] is None else int(row[3]),
                    renew_at=float(row[4]), failures=int(row[5]), next_attempt=float(row[6]),
                    last_error=row[7], account=row[8], orders=int(row[9]), lease_owner=row[10],
                    lease_until=float(row[11]))


def acme_account_from_row(row: Row) -> AcmeAccount:
    return AcmeAccount(name=row[0], directory_url=row[1], priority=int(row[2]),
                       environment=row[3], key_encrypted=bytes(row[4]), account_url=row[5],
                       eab_kid=row[6], email=row[7], failures=int(row[8]),
                       next_attempt=float(row[9]), last_error=row[10])


class SQLStore(abc.ABC):
    """Queries shared by every SQL backend; subclasses provide the driver.

    Reads run outside explicit transactions (autocommit), so the change-feed poller always
    sees newly committed rows rather than a repeatable-read snapshot.
    """

    dialect: schema.Dialect
    url: str

    # -- driver hooks --------------------------------------------------------------------

    @abc.abstractmethod
    async def open(self) -> None:
        """Connect (or create the file); raises DirectoryUnavailable if it cannot."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    def transaction(self) -> Any:
        """``async with store.transaction() as tx:`` commit on success, roll back on error."""

    @abc.abstractmethod
    async def fetchone(self, sql: str, params: Sequence[Any] = ()) -> Row | None: ...

    @abc.abstractmethod
    async def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[Row]: ...

    async def __aenter__(self) -> SQLStore:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- schema --------------------------------------------------------------------------

    async def migrate(self) -> list[int]:
        """Apply pending migrations; returns the versions applied (empty if up to date)."""
        async with self.transaction() as tx:
            await tx.execute(schema.MIGRATIONS_TABLE[self.dialect])
        applied: list[int] = []
        for version, description, statements in schema.MIGRATIONS:
            async with self.transaction() as tx:
                row = await tx.fetchone(
                    "SELECT version FROM schema_migrations WHERE version = ?", (version,))
                if row is not None:
                    continue
                for statement in statements:
                    await tx.execute(schema.render(statement, self.dialect))
                await tx.execute("INSERT INTO schema_migrations VALUES (?, ?, ?)",
                                 (version, description, time.time()))
                applied.append(version)
        return applied

    async def schema_version(self) -> int:
        """The highest applied migration, 0 for an empty database."""
        try:
            row = await self.fetchone("SELECT MAX(version) FROM schema_migrations")
        except Exception as exc:
            if self._is_missing_table(exc):
                return 0
            raise
        return int(row[0]) if row and row[0] is not None else 0

    def _is_missing_table(self, exc: BaseException) -> bool:
        text = str(exc).lower()
        return "no such table" in text or "doesn't exist" in text

    async def ping(self) -> None:
        """Raises DirectoryUnavailable unless a trivial query succeeds (used by /readyz)."""
        await self.fetchone("SELECT 1")

    # -- hot-path reads (only on cache misses) -------------------------------------------

    async def fetch_account(self, username: str) -> Account | None:
        row = await self.fetchone(ACCOUNT_SELECT + " WHERE a.username = ?", (username,))
        return None if row is None else account_from_row(row)

    async def fetch_tenant(self, name: str) -> Tenant | None:
        row = await self.fetchone(_TENANT_SELECT + " WHERE t.name = ?", (name,))
        return None if row is None else tenant_from_row(row)

    async def fetch_host(self, name: str) -> Host | None:
        row = await self.fetchone(f"SELECT {HOST_READ_COLUMNS} FROM hosts WHERE name = ?", (name,))
        return None if row is None else host_from_row(row)

    async def fetch_site_pair(self, hostname: str,
                              wildcard: str | None) -> tuple[Site | None, Site | None]:
        """The exact site for ``hostname`` and the ``wildcard`` site, in one query."""
        if wildcard is None:
            row = await self.fetchone(_SITE_SELECT + " WHERE s.hostname = ?", (hostname,))
            return (None if row is None else site_from_row(row)), None
        rows = await self.fetchall(_SITE_SELECT + " WHERE s.hostname IN (?, ?)",
                                   (hostname, wildcard))
        exact = wild = None
        for row in rows:
            if row[0] == hostname:
                exact = site_from_row(row)
            else:
                wild = site_from_row(row)
        return exact, wild

    async def fetch_certificate(self, certificate_id: int) -> StoredCertificate | None:
        row = await self.fetchone(_CERT_SELECT + " WHERE id = ?", (certificate_id,))
        return None if row is None else certificate_from_row(row)

    async def fetch_challenge(self, token: str) -> AcmeChallenge | None:
        row = await self.fetchone("SELECT token, hostname, key_authorization, expires_at "
                                  "FROM acme_challenges WHERE token = ?", (token,))
        return None if row is None else AcmeChallenge(row[0], row[1], row[2], float(row[3]))

    # -- change feed ---------------------------------------------------------------------

    async def recent_changes(self, limit: int = 50) -> list[tuple[Change, float]]:
        """The newest changes, newest first, with their commit time (for operators)."""
        rows = await self.fetchall(
            f"SELECT id, entity, name, created_at FROM changes ORDER BY id DESC LIMIT {int(limit)}")
        return [(Change(int(r[0]), r[1], r[2]), float(r[3])) for r in rows]

    async def change_records(self, limit: int = 50, *, entity: str | None = None,
                             name: str | None = None) -> list[ChangeRecord]:
        """The newest changes, newest first, with who made them and what they changed
        (``edge changes list``); optionally only one entity kind and/or one object."""
        where, params = [], []
        if entity is not None:
            where.append("entity = ?")
            params.append(entity)
        if name is not None:
            where.append("name = ?")
            params.append(name)
        clause = f" WHERE {' AND '.join(where)}" if where else ""
        rows = await self.fetchall(
            f"SELECT id, entity, name, created_at, actor, detail FROM changes{clause} "
            f"ORDER BY id DESC LIMIT {int(limit)}", params)
        return [change_record_from_row(r) for r in rows]

    async def latest_change_id(self) -> int:
        row = await self.fetchone("SELECT MAX(id) FROM changes")
        return int(row[0]) if row and row[0] is not None else 0

    async def fetch_changes(self, after: int, also: Sequence[int] = (),
                            limit: int = 5000) -> list[Change]:
        """Changes with id > ``after`` plus the specific ids in ``also`` (gaps being watched)."""
        if also:
            marks = ",".join("?" * len(also))
            sql = (f"SELECT id, entity, name FROM changes WHERE id > ? OR id IN ({marks}) "
                   f"ORDER BY id LIMIT {int(limit)}")
            rows = await self.fetchall(sql, (after, *also))
        else:
            rows = await self.fetchall(
                f"SELECT id, entity, name FROM changes WHERE id > ? ORDER BY id LIMIT {int(limit)}",
                (after,))
        return [Change(int(r[0]), r[1], r[2]) for r in rows]

    # -- listing (operator commands; paged, so 1,000,000 sites never load at once) --------

    async def list_hosts(self) -> list[Host]:
        return [host_from_row(r) for r in
                await self.fetchall(f"SELECT {HOST_READ_COLUMNS} FROM hosts ORDER BY name")]

    async def list_tenants(self, *, host: str | None = None, after: str = "",
                           limit: int = 1000) -> list[Tenant]:
        where, params = "WHERE t.name > ?", [after]
        if host is not None:
            where += " AND h.name = ?"
            params.append(host)
        rows = await self.fetchall(
            f"{_TENANT_SELECT} {where} ORDER BY t.name LIMIT {int(limit)}", params)
        return [tenant_from_row(r) for r in rows]

    async def list_accounts(self, *, tenant: str | None = None, after: str = "",
                            limit: int = 1000) -> list[Account]:
        where, params = "WHERE a.username > ?", [after]
        if tenant is not None:
            where += " AND t.name = ?"
            params.append(tenant)
        rows = await self.fetchall(
            f"{ACCOUNT_SELECT} {where} ORDER BY a.username LIMIT {int(limit)}", params)
        return [account_from_row(r) for r in rows]

    async def list_sites(self, *, tenant: str | None = None, after: str = "",
                         limit: int = 1000) -> list[Site]:
        where, params = "WHERE s.hostname > ?", [after]
        if tenant is not None:
            where += " AND t.name = ?"
            params.append(tenant)
        rows = await self.fetchall(
            f"{_SITE_SELECT} {where} ORDER BY s.hostname LIMIT {int(limit)}", params)
        return [site_from_row(r) for r in rows]

    async def list_certificates(self, *, after: int = 0,
                                limit: int = 1000) -> list[StoredCertificate]:
        rows = await self.fetchall(
            f"{_CERT_SELECT} WHERE id > ? ORDER BY id LIMIT {int(limit)}", (after,))
        return [certificate_from_row(r) for r in rows]

    async def tenants_per_host(self) -> dict[str, int]:
        """How many tenants each host serves (hosts without tenants are absent)."""
        rows = await self.fetchall("SELECT h.name, COUNT(*) FROM tenants t "
                                   "JOIN hosts h ON h.id = t.host_id GROUP BY h.name")
        return {str(r[0]): int(r[1]) for r in rows}

    async def changes_about(self, names: dict[str, Sequence[str]],
                            limit: int = 20) -> list[ChangeRecord]:
        """The newest changes whose (entity, name) is in ``names`` (entity → names), newest
        first, with actor and before/after: a tenant's history is its own row plus its
        accounts' and sites'."""
        clauses, params = [], []
        for entity, values in names.items():
            if values:
                clauses.append(f"(entity = ? AND name IN ({','.join('?' * len(values))}))")
                params += [entity, *values]
        if not clauses:
            return []
        rows = await self.fetchall(
            f"SELECT id, entity, name, created_at, actor, detail FROM changes WHERE "
            f"{' OR '.join(clauses)} ORDER BY id DESC LIMIT {int(limit)}", params)
        return [change_record_from_row(r) for r in rows]

    async def count(self, table: str) -> int:
        if table not in ("hosts", "tenants", "accounts", "sites", "certificates", "changes",
                         "acme_names", "acme_accounts", "acme_challenges"):
            raise ValueError(f"unknown table {table}")
        row = await self.fetchone(f"SELECT COUNT(*) FROM {table}")
        return int(row[0]) if row else 0


def append_change_sql() -> str:
    return "INSERT INTO changes (entity, name, created_at, actor, detail) VALUES (?, ?, ?, ?, ?)"


async def append_change(tx: Tx, entity: str, name: str, *, actor: str = "",
                        before: dict[str, Any] | None = None,
                        after: dict[str, Any] | None = None) -> None:
    """Record a change in the same transaction as the write it describes.

    ``before``/``after`` are the fields the write changed (None for "did not exist" / "was
    removed"); they are for operators reading ``edge changes list``; the proxies read only
    entity and name.
    """
    detail = None
    if before is not None or after is not None:
        detail = json.dumps({"before": before, "after": after}, sort_keys=True, default=str)
    await tx.execute(append_change_sql(), (entity, name, time.time(), actor[:255], detail))


def change_record_from_row(row: Row) -> ChangeRecord:
    detail = json.loads(row[5]) if row[5] else {}
    return ChangeRecord(id=int(row[0]), entity=row[1], name=row[2], at=float(row[3]),
                        actor=row[4] or "", before=detail.get("before"),
                        after=detail.get("after"))


__all__ = ["HOST_COLUMNS", "HOST_READ_COLUMNS", "SQLStore", "Tx", "append_change"]
