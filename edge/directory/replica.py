"""Reads from a replica, with the primary as a fallback (``[database] replica_url``).

The proxies read lookups *and* the change feed from one database (see
``DatabaseConfig.read_url``): a change row replicates in the same transaction as the rows it
describes, so a worker that sees change N also reads the rows of change N, and a move reaches
a proxy reading from a lagging replica exactly when it has replicated — never an eviction
followed by a reload of the old row.

When the replica fails (a query raises :class:`DirectoryUnavailable`), what happens depends on
``[database] replica_fallback``:

* ``"primary"`` (default): the same query, and every read after it, goes to the primary.
  Lookups and the feed switch together, so they stay consistent (the primary is ahead of
  anything the replica showed). Every ``REPLICA_RETRY`` seconds a read probes the replica; it
  is used again only once it answers *and* holds every change the primary held when the
  probe began (its ``MAX(changes.id)`` caught up): going back to a replica that is still
  behind would reload rows older than the ones already served.
* ``"stale"``: the error goes up to the directory, whose circuit breaker serves what is in
  memory (stale if need be) until the replica answers; the primary never sees the proxies'
  reads (a fleet of edges falling back at once can be more than a primary sized for writes
  should take).

Either way the switch is logged once per change of source and exported as
``edge_directory_read_source``. Writes (``transaction``) always go to the primary.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from edge.directory.store import Row, SQLStore
from edge.errors import DirectoryUnavailable

__all__ = ["REPLICA_RETRY", "ReplicaStore"]

log = logging.getLogger("edge.directory.replica")

REPLICA_RETRY = 5.0
"""Seconds between probes of a failed replica while reading from the primary."""

T = TypeVar("T")


class ReplicaStore(SQLStore):
    """An :class:`SQLStore` reading from ``replica``, falling back to ``primary`` per policy."""

    def __init__(self, replica: SQLStore, primary: SQLStore, *, fallback: str = "primary",
                 retry: float = REPLICA_RETRY,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.replica = replica
        self.primary = primary
        self.fallback = fallback
        self.dialect = replica.dialect
        self.url = replica.url
        self.retry = retry
        self.clock = clock
        self.source = "replica"
        """Where reads go now: ``"replica"`` or ``"primary"``."""
        self.switches = 0
        self._probe_at = 0.0
        self._primary_open = False

    def __repr__(self) -> str:
        return f"ReplicaStore({self.replica!r} → {self.primary!r}, fallback={self.fallback})"

    # -- driver hooks --------------------------------------------------------------------

    async def open(self) -> None:
        try:
            await self.replica.open()
        except DirectoryUnavailable as exc:
            if self.fallback != "primary":
                raise
            await self._open_primary()
            self._use_primary(exc)

    async def close(self) -> None:
        await self.replica.close()
        if self._primary_open:
            self._primary_open = False
            await self.primary.close()

    def transaction(self) -> Any:
        return self.primary.transaction()

    async def fetchone(self, sql: str, params: Sequence[Any] = ()) -> Row | None:
        return await self._read(lambda store: store.fetchone(sql, params))

    async def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        return await self._read(lambda store: store.fetchall(sql, params))

    async def migrate(self) -> list[int]:
        return await self.primary.migrate()

    # -- routing -------------------------------------------------------------------------

    async def _read(self, query: Callable[[SQLStore], Awaitable[T]]) -> T:
        if self.source == "primary":
            if self.clock() >= self._probe_at:
                await self._probe_replica()
            if self.source == "primary":
                return await query(self.primary)
        try:
            return await query(self.replica)
        except DirectoryUnavailable as exc:
            if self.fallback != "primary":
                raise
            await self._open_primary()
            self._use_primary(exc)
            return await query(self.primary)

    async def _open_primary(self) -> None:
        if not self._primary_open:
            await self.primary.open()
            self._primary_open = True

    def _use_primary(self, why: BaseException) -> None:
        self.source = "primary"
        self.switches += 1
        self._probe_at = self.clock() + self.retry
        log.warning("directory replica failed; reading from the primary", extra={
            "replica": repr(self.replica), "error": str(why)})

    async def _probe_replica(self) -> None:
        """Back to the replica if it answers and has every change the primary has now."""
        self._probe_at = self.clock() + self.retry
        try:
            wanted = await self.primary.latest_change_id()
        except DirectoryUnavailable:
            wanted = 0  # the primary is gone too: any replica that answers is better
        try:
            await self.replica.open()
            have = await self.replica.latest_change_id()
        except DirectoryUnavailable as exc:
            log.info("directory replica still unreachable", extra={"error": str(exc)})
            return
        if have < wanted:
            log.info("directory replica answers but is behind the primary", extra={
                "replica_change_id": have, "primary_change_id": wanted})
            return
        self.source = "replica"
        self.switches += 1
        log.warning("directory replica caught up; reading from it again",
                    extra={"change_id": have})
