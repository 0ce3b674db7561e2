"""Long-running admin operations the API hands back an id for (``GET /operations/{id}``).

Today one kind: ``tenant-move``. The move itself is one directory write
(:meth:`DirectoryService.move_tenant`); what takes time is the drain — sessions on the old
host stay until the tenant's ``drain_deadline``, then every proxy closes them (see
:mod:`edge.sessionpolicy`). So an operation's state is *derived* from the clock and the stored
deadline rather than advanced by a background task: it is the same after an API restart or
crash, and a second API process reports it identically.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from edge.directory.model import Tenant
from edge.directory.service import DirectoryService, iso
from edge.directory.store import SQLStore
from edge.errors import NotFoundError

_SELECT = "SELECT id, kind, target, actor, detail, created_at, deadline FROM api_operations"


@dataclass(frozen=True, slots=True)
class Operation:
    id: int
    kind: str
    target: str
    actor: str
    detail: dict[str, Any]
    created_at: float
    deadline: float

    def state(self, now: float) -> str:
        return "succeeded" if now >= self.deadline else "running"

    def progress(self, now: float) -> float:
        span = self.deadline - self.created_at
        return 1.0 if span <= 0 else round(min(1.0, max(0.0, (now - self.created_at) / span)), 3)

    def view(self, now: float | None = None) -> dict[str, Any]:
        """The JSON the API returns (schema ``Operation``)."""
        now = time.time() if now is None else now
        return {"id": self.id, "kind": self.kind, "target": self.target, "actor": self.actor,
                "state": self.state(now), "progress": self.progress(now),
                "created_at": iso(self.created_at), "deadline": iso(self.deadline),
                "detail": self.detail}


def _from_row(row: tuple[Any, ...]) -> Operation:
    return Operation(int(row[0]), str(row[1]), str(row[2]), str(row[3]), json.loads(row[4]),
                     float(row[5]), float(row[6]))


class Operations:
    """Start and look up operations (rows in ``api_operations``)."""

    def __init__(self, store: SQLStore) -> None:
        self.store = store

    async def move_tenant(self, service: DirectoryService, name: str, to_host: str, *,
                          drain: float, force: bool, actor: str) -> Operation:
        """Move the tenant now; returns the operation that tracks its drain."""
        tenant: Tenant = await service.move_tenant(name, to_host, drain=drain, force=force)
        detail = {"tenant": tenant.name, "from": tenant.previous_host, "to": tenant.host,
                  "drain_seconds": drain}
        now = time.time()
        deadline = tenant.drain_deadline if tenant.drain_deadline is not None else now
        async with self.store.transaction() as tx:
            op_id = await tx.execute(
                "INSERT INTO api_operations (kind, target, actor, detail, created_at, deadline) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                ("tenant-move", tenant.name, actor, json.dumps(detail), now, deadline))
        return Operation(int(op_id), "tenant-move", tenant.name, actor, detail, now, deadline)

    async def get(self, op_id: int) -> Operation:
        row = await self.store.fetchone(_SELECT + " WHERE id = ?", (op_id,))
        if row is None:
            raise NotFoundError(f"operation {op_id} does not exist")
        return _from_row(row)

    async def recent(self, limit: int = 50, target: str | None = None) -> list[Operation]:
        where, params = ("WHERE target = ? ", (target,)) if target is not None else ("", ())
        rows = await self.store.fetchall(
            f"{_SELECT} {where}ORDER BY id DESC LIMIT {int(limit)}", params)
        return [_from_row(r) for r in rows]


__all__ = ["Operation", "Operations"]
