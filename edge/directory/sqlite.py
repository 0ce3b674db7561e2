"""SQLite store (aiosqlite): the embedded default for ``edge demo`` and single boxes.

WAL mode lets every worker process read while the CLI writes; writes take ``BEGIN IMMEDIATE``
so two writers queue on the busy timeout instead of failing on a lock upgrade.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiosqlite

from edge.directory.store import Row, SQLStore
from edge.errors import ConflictError, DirectoryUnavailable


def _translate(exc: sqlite3.Error, path: str) -> Exception:
    if isinstance(exc, sqlite3.IntegrityError):
        return ConflictError(str(exc))
    hint = " (run `edge init`)" if "no such table" in str(exc) else ""
    return DirectoryUnavailable(f"directory database {path}: {exc}{hint}")


class _SQLiteTx:
    __slots__ = ("_db",)

    def __init__(self, db: aiosqlite.Connection) -> None:
        self._db = db

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        cursor = await self._db.execute(sql, params)
        rowid = cursor.lastrowid or 0
        await cursor.close()
        return rowid

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        await self._db.executemany(sql, rows)

    async def fetchone(self, sql: str, params: Sequence[Any] = ()) -> Row | None:
        async with self._db.execute(sql, params) as cursor:
            row = await cursor.fetchone()
        return None if row is None else tuple(row)

    async def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        async with self._db.execute(sql, params) as cursor:
            return [tuple(r) for r in await cursor.fetchall()]


class SQLiteStore(SQLStore):
    """A directory in one SQLite file."""

    dialect = "sqlite"

    def __init__(self, path: str, *, busy_timeout: float = 5.0) -> None:
        self.path = path
        self.url = f"sqlite:///{path}"
        self.busy_timeout = busy_timeout
        self._db: aiosqlite.Connection | None = None
        self._tx_lock = asyncio.Lock()
        """One connection carries one transaction at a time: concurrent writers (the admin
        API's requests) queue here instead of failing with "transaction within a transaction"."""
        self._tx_owner: asyncio.Task[Any] | None = None
        """The task inside the open transaction: a read by any other task waits for its end,
        so it never sees rows the transaction may still roll back."""

    async def open(self) -> None:
        if self._db is not None:
            return
        if self.path != ":memory:":
            parent = Path(self.path).parent
            if not parent.is_dir():
                raise DirectoryUnavailable(
                    f"directory database {self.path}: folder {parent} does not exist")
        try:
            db = await aiosqlite.connect(self.path, isolation_level=None,
                                         timeout=self.busy_timeout)
            await db.execute("PRAGMA journal_mode=WAL")
            await db.execute("PRAGMA foreign_keys=ON")
            await db.execute("PRAGMA synchronous=NORMAL")
        except sqlite3.Error as exc:
            raise _translate(exc, self.path) from None
        self._db = db

    async def close(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            await db.close()

    def _conn(self) -> aiosqlite.Connection:
        if self._db is None:
            raise DirectoryUnavailable(f"directory database {self.path} is not open")
        return self._db

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[_SQLiteTx]:
        async with self._tx_lock:
            self._tx_owner = asyncio.current_task()
            try:
                async with self._transaction() as tx:
                    yield tx
            finally:
                self._tx_owner = None

    async def _read_committed(self) -> None:
        """Wait while another task's transaction is open on this connection (reads between
        its statements would see its uncommitted rows). Costs nothing when none is open."""
        while self._tx_owner is not None and self._tx_owner is not asyncio.current_task():
            async with self._tx_lock:
                pass

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[_SQLiteTx]:
        db = self._conn()
        try:
            await db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise _translate(exc, self.path) from None
        try:
            yield _SQLiteTx(db)
        except BaseException as exc:
            await db.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                raise _translate(exc, self.path) from None
            raise
        else:
            try:
                await db.execute("COMMIT")
            except sqlite3.Error as exc:
                await db.execute("ROLLBACK")
                raise _translate(exc, self.path) from None

    async def fetchone(self, sql: str, params: Sequence[Any] = ()) -> Row | None:
        await self._read_committed()
        try:
            return await _SQLiteTx(self._conn()).fetchone(sql, params)
        except sqlite3.Error as exc:
            raise _translate(exc, self.path) from None

    async def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        await self._read_committed()
        try:
            return await _SQLiteTx(self._conn()).fetchall(sql, params)
        except sqlite3.Error as exc:
            raise _translate(exc, self.path) from None
