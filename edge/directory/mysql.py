"""MySQL/MariaDB store (aiomysql, pooled): production.

Connections run in autocommit so point reads and the change-feed poll never sit in an old
REPEATABLE READ snapshot; writes open explicit transactions. A query that overruns
``query_timeout`` closes its connection (its protocol state is unknown after cancellation)
and surfaces as :class:`DirectoryUnavailable`, which the cache turns into stale-if-error.
"""

from __future__ import annotations

import asyncio
import warnings
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import unquote, urlsplit

import aiomysql
import pymysql

from edge.directory.store import Row, SQLStore
from edge.errors import ConfigError, ConflictError, DirectoryUnavailable

_INTEGRITY = (pymysql.err.IntegrityError,)
_UNAVAILABLE = (pymysql.err.OperationalError, pymysql.err.InterfaceError,
                pymysql.err.InternalError, pymysql.err.ProgrammingError, OSError,
                asyncio.TimeoutError)


def _sql(statement: str) -> str:
    # The shared SQL uses '?'; pymysql uses pyformat. No shared statement has a literal '%'.
    return statement.replace("?", "%s")


class _MySQLTx:
    __slots__ = ("_cursor",)

    def __init__(self, cursor: aiomysql.Cursor) -> None:
        self._cursor = cursor

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        await self._cursor.execute(_sql(sql), tuple(params) or None)
        return int(self._cursor.lastrowid or 0)

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        # pymysql rewrites INSERT ... VALUES into multi-row statements: the bulk-load fast path.
        await self._cursor.executemany(_sql(sql), [tuple(r) for r in rows])

    async def fetchone(self, sql: str, params: Sequence[Any] = ()) -> Row | None:
        await self._cursor.execute(_sql(sql), tuple(params) or None)
        row = await self._cursor.fetchone()
        return None if row is None else tuple(row)

    async def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        await self._cursor.execute(_sql(sql), tuple(params) or None)
        return [tuple(r) for r in await self._cursor.fetchall()]


def parse_mysql_url(url: str) -> dict[str, Any]:
    """``mysql://user:pass@host:port/db`` → aiomysql connect arguments."""
    parts = urlsplit(url)
    if parts.scheme not in ("mysql", "mariadb") or not parts.path.strip("/"):
        raise ConfigError(f"database url {url!r}: expected mysql://user:pass@host:port/database")
    try:
        port = parts.port or 3306
    except ValueError:
        raise ConfigError(f"database url {url!r}: bad port") from None
    return {"host": parts.hostname or "127.0.0.1", "port": port,
            "user": unquote(parts.username or "root"), "password": unquote(parts.password or ""),
            "db": parts.path.strip("/")}


class MySQLStore(SQLStore):
    """A directory in a MySQL/MariaDB database, through a bounded connection pool."""

    dialect = "mysql"

    def __init__(self, url: str, *, pool_size: int = 10, connect_timeout: float = 3.0,
                 query_timeout: float = 2.0) -> None:
        self.url = url
        self._args = parse_mysql_url(url)
        self.pool_size = pool_size
        self.connect_timeout = connect_timeout
        self.query_timeout = query_timeout
        self._pool: aiomysql.Pool | None = None

    def __repr__(self) -> str:
        a = self._args
        return f"MySQLStore({a['user']}@{a['host']}:{a['port']}/{a['db']})"

    def _unavailable(self, exc: BaseException) -> DirectoryUnavailable:
        a = self._args
        detail = str(exc) or type(exc).__name__
        return DirectoryUnavailable(f"directory database {a['host']}:{a['port']}/{a['db']}: {detail}")

    async def open(self) -> None:
        if self._pool is not None:
            return
        try:
            self._pool = await aiomysql.create_pool(
                minsize=0, maxsize=self.pool_size, autocommit=True, charset="utf8mb4",
                connect_timeout=self.connect_timeout, pool_recycle=3600, **self._args)
            # Fail at start-up, with a clear message, rather than on the first lookup.
            await self.fetchone("SELECT 1")
        except _UNAVAILABLE as exc:
            await self.close()
            raise self._unavailable(exc) from None

    async def migrate(self) -> list[int]:
        # "CREATE TABLE IF NOT EXISTS schema_migrations" warns on every run after the first.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", pymysql.err.Warning)
            return await super().migrate()

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            pool.close()
            await pool.wait_closed()

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[aiomysql.Connection]:
        # The pool this connection came from, even if close() runs meanwhile: its
        # wait_closed() waits for this very release.
        pool = self._pool
        if pool is None:
            raise DirectoryUnavailable(f"{self!r} is not open")
        try:
            conn = await asyncio.wait_for(pool.acquire(), self.connect_timeout)
        except _UNAVAILABLE as exc:
            raise self._unavailable(exc) from None
        healthy = False
        try:
            yield conn
            healthy = True
        finally:
            if not healthy:
                conn.close()  # unknown protocol state: never hand it to the next query
            pool.release(conn)

    async def _read(self, sql: str, params: Sequence[Any], one: bool) -> Any:
        try:
            async with self._connection() as conn, conn.cursor() as cursor:
                tx = _MySQLTx(cursor)
                query = tx.fetchone(sql, params) if one else tx.fetchall(sql, params)
                return await asyncio.wait_for(query, self.query_timeout)
        except _INTEGRITY as exc:
            raise ConflictError(str(exc)) from None
        except _UNAVAILABLE as exc:
            raise self._unavailable(exc) from None

    async def fetchone(self, sql: str, params: Sequence[Any] = ()) -> Row | None:
        result: Row | None = await self._read(sql, params, True)
        return result

    async def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        result: list[Row] = await self._read(sql, params, False)
        return result

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[_MySQLTx]:
        try:
            async with self._connection() as conn:
                await conn.begin()
                try:
                    async with conn.cursor() as cursor:
                        yield _MySQLTx(cursor)
                except BaseException:
                    await conn.rollback()
                    raise
                await conn.commit()
        except _INTEGRITY as exc:
            raise ConflictError(str(exc)) from None
        except _UNAVAILABLE as exc:
            raise self._unavailable(exc) from None
