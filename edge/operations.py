"""Long operations kept in the directory: a host drain (move every tenant off a host).

An operation is a row in ``operations`` plus its plan, one row per step in
``operation_steps`` (tenant → target host), written in one transaction when it starts. Running
it executes the pending steps in order; each step's tenant move and the step's ``done`` mark
commit in the *same* transaction, so:

* a crash of the command, of the edge or of the database between two steps loses nothing and
  repeats nothing: the next run (``edge host drain`` again, or ``edge operations resume``)
  continues at the first pending step;
* two runners of one operation never move a tenant twice: a step is claimed under its row lock
  (``FOR UPDATE`` on MySQL; SQLite serialises writers with ``BEGIN IMMEDIATE``) and a step
  already done is skipped;
* starting a drain of a host that already has an unfinished one returns that one (same
  destination; a new ``--rate``/``--drain`` applies from then on) instead of planning again;
  a drain of a host with no tenants left writes
  nothing: running the same command twice does nothing the second time.

Each move is :meth:`DirectoryService.move_tenant_in` with the drain's ``--drain`` deadline,
so open sessions on the old host are drained exactly as ``edge tenant move`` drains them.
``--rate N/min`` spaces the moves by the time of the last *committed* move, so a resumed
drain keeps the pace.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from edge.directory.service import DEFAULT_MOVE_DRAIN, DirectoryService
from edge.directory.store import SQLStore, Tx
from edge.errors import ConflictError, DirectoryUnavailable, NotFoundError, ValidationError

log = logging.getLogger("edge.operations")

HOST_DRAIN = "host-drain"
BULK_LOAD = "bulk-load"
"""A JSON Lines load through the admin API: no steps (a load is all or nothing); ``params``
gets the counts when it is done."""
TENANT_MOVE = "tenant-move"
"""One tenant moved (the admin API's ``POST /tenants/{name}/move``): a one-step operation whose
step commits with the move itself; its target is the host the tenant left."""
UNFINISHED = ("running", "failed")
"""States a later run resumes (``failed``: a step could not be done; fix the cause, rerun)."""
STEP_STATES = ("pending", "done", "skipped")
RETRY_DELAY_MAX = 5.0


@dataclass(frozen=True, slots=True)
class Step:
    seq: int
    tenant: str
    to_host: str
    state: str
    """``pending``, ``done`` (moved by this operation) or ``skipped`` (it had left the host
    by other means before its turn)."""
    done_at: float | None = None


@dataclass(frozen=True, slots=True)
class Operation:
    """One long operation as stored (``edge operations show``)."""

    id: int
    kind: str
    target: str
    params: dict[str, Any]
    state: str
    """``running`` (not finished: a runner may be working on it, or it was interrupted),
    ``failed`` (stopped at a step it could not do, see ``error``), ``done``."""
    error: str
    created_at: float
    updated_at: float
    steps: list[Step] = field(default_factory=list)

    @property
    def progress(self) -> dict[str, int]:
        counts = Counter(step.state for step in self.steps)
        return {state: counts.get(state, 0) for state in STEP_STATES} | {"total": len(self.steps)}


@dataclass(frozen=True, slots=True)
class DrainOptions:
    to: str | None = None
    """Every tenant to this host; ``None``: spread over the other active hosts."""
    rate: float | None = None
    """Moves per minute; ``None``: as fast as the database allows."""
    drain: float = DEFAULT_MOVE_DRAIN
    """Seconds open sessions are kept on the old host after each move (``tenant move --drain``)."""

    def as_params(self) -> dict[str, Any]:
        return {"to": self.to, "rate": self.rate, "drain": self.drain}


def parse_rate(text: str) -> float:
    """``"30/min"``, ``"2/s"``, ``"120/h"`` or a bare number (per minute) → moves per minute."""
    number, _, unit = text.strip().partition("/")
    per = {"": 1.0, "min": 1.0, "m": 1.0, "s": 60.0, "sec": 60.0, "h": 1 / 60}.get(unit.strip())
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if per is None or not value > 0:
        raise ValidationError(f"--rate {text!r}: expected N/min (or N/s, N/h), N > 0")
    return value * per


class Operations:
    """Start, run, list and show operations (the CLI and the admin API both use this)."""

    def __init__(self, store: SQLStore, service: DirectoryService | None = None, *,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self.store = store
        self.service = service or DirectoryService(store)
        self._sleep = sleep

    # -- reading -------------------------------------------------------------------------

    async def get(self, operation_id: int) -> Operation:
        row = await self.store.fetchone(
            "SELECT id, kind, target, params, state, error, created_at, updated_at "
            "FROM operations WHERE id = ?", (operation_id,))
        if row is None:
            raise NotFoundError(f"operation {operation_id} does not exist")
        steps = [Step(int(r[0]), r[1], r[2], r[3], None if r[4] is None else float(r[4]))
                 for r in await self.store.fetchall(
                     "SELECT seq, tenant, to_host, state, done_at FROM operation_steps "
                     "WHERE operation_id = ? ORDER BY seq", (operation_id,))]
        return _operation(row, steps)

    async def list_operations(self, *, limit: int = 50,
                              state: str | None = None) -> list[Operation]:
        """The newest operations first, each with its steps."""
        where, params = ("WHERE state = ? ", [state]) if state else ("", [])
        rows = await self.store.fetchall(
            "SELECT id FROM operations " + where + "ORDER BY id DESC LIMIT ?", (*params, limit))
        return [await self.get(int(r[0])) for r in rows]

    # -- starting ------------------------------------------------------------------------

    async def start_host_drain(self, host: str, options: DrainOptions) -> Operation | None:
        """Plan the drain of ``host`` (or return its unfinished drain); ``None``: no tenant
        is left on ``host``, nothing was written."""
        await self._check_drain(host, options)
        async with self.store.transaction() as tx:
            row = await tx.fetchone(
                "SELECT id, params FROM operations WHERE kind = ? AND target = ? AND state IN "
                "(?, ?) ORDER BY id LIMIT 1", (HOST_DRAIN, host, *UNFINISHED))
            if row is not None:
                operation_id = int(row[0])
                if json.loads(row[1]).get("to") != options.to:
                    raise ConflictError(
                        f"host {host!r} already has an unfinished drain (operation "
                        f"{operation_id}) to {json.loads(row[1]).get('to') or 'the spread'}: "
                        f"`edge operations resume {operation_id}` continues it")
                # Same destination: the pace and drain time given now apply from here on.
                await tx.execute("UPDATE operations SET params = ? WHERE id = ?",
                                 (json.dumps(options.as_params()), operation_id))
            else:
                tenants = [r[0] for r in await tx.fetchall(
                    "SELECT t.name FROM tenants t JOIN hosts h ON h.id = t.host_id "
                    "WHERE h.name = ? ORDER BY t.name", (host,))]
                if not tenants:
                    return None
                plan = await self._plan(tx, host, tenants, options.to)
                operation_id = await self._insert(tx, host, options, plan)
        return await self.get(operation_id)

    async def _check_drain(self, host: str, options: DrainOptions) -> None:
        if options.drain < 0:
            raise ValidationError("--drain must not be negative")
        await self.service.get_host(host)
        if options.to is not None:
            if options.to == host:
                raise ValidationError(f"--to {host!r} is the host being drained")
            target = await self.service.get_host(options.to)
            if target.state != "active":
                raise ConflictError(f"host {options.to!r} is {target.state}: moving tenants there "
                                    "would turn their users away")

    async def _plan(self, tx: Tx, host: str, tenants: list[str],
                    to: str | None) -> list[tuple[str, str]]:
        """(tenant, target) per tenant: ``to``, or the least-loaded active host each time."""
        if to is not None:
            return [(tenant, to) for tenant in tenants]
        rows = await tx.fetchall(
            "SELECT h.name, COUNT(t.id) FROM hosts h LEFT JOIN tenants t ON t.host_id = h.id "
            "WHERE h.state = 'active' AND h.name <> ? GROUP BY h.name", (host,))
        load = {str(r[0]): int(r[1]) for r in rows}
        if not load:
            raise ConflictError(f"--spread: no other active host to move {host!r}'s tenants to")
        plan = []
        for tenant in tenants:
            target = min(load, key=lambda name: (load[name], name))
            load[target] += 1
            plan.append((tenant, target))
        return plan

    async def _insert(self, tx: Tx, host: str, options: DrainOptions,
                      plan: list[tuple[str, str]]) -> int:
        now = time.time()
        operation_id = await tx.execute(
            "INSERT INTO operations (kind, target, params, state, error, created_at, updated_at) "
            "VALUES (?, ?, ?, 'running', '', ?, ?)",
            (HOST_DRAIN, host, json.dumps(options.as_params()), now, now))
        await tx.executemany(
            "INSERT INTO operation_steps (operation_id, seq, tenant, to_host, state, done_at) "
            "VALUES (?, ?, ?, ?, 'pending', NULL)",
            [(operation_id, seq, tenant, target) for seq, (tenant, target) in enumerate(plan, 1)])
        return int(operation_id)

    async def move_tenant(self, tenant: str, to_host: str, *, drain: float = DEFAULT_MOVE_DRAIN,
                          force: bool = False) -> Operation:
        """Move one tenant now, recorded as a finished one-step operation in the same
        transaction (so the record exists exactly when the move happened). What remains is the
        drain of its old sessions, ``params["drain"]`` seconds after the step's ``done_at``."""
        if drain < 0:
            raise ValidationError("--drain must not be negative")
        async with self.store.transaction() as tx:
            row = await tx.fetchone("SELECT h.name FROM tenants t JOIN hosts h ON "
                                    "h.id = t.host_id WHERE t.name = ?", (tenant,))
            await self.service.move_tenant_in(tx, tenant, to_host, drain=drain, force=force)
            now = time.time()
            params = {"tenant": tenant, "to": to_host, "drain": drain, "force": force}
            operation_id = await tx.execute(
                "INSERT INTO operations (kind, target, params, state, error, created_at, "
                "updated_at) VALUES (?, ?, ?, 'done', '', ?, ?)",
                (TENANT_MOVE, str(row[0]) if row else "", json.dumps(params), now, now))
            await tx.execute(
                "INSERT INTO operation_steps (operation_id, seq, tenant, to_host, state, done_at) "
                "VALUES (?, 1, ?, ?, 'done', ?)", (operation_id, tenant, to_host, now))
        return await self.get(int(operation_id))

    async def record(self, kind: str, target: str, params: dict[str, Any]) -> Operation:
        """A ``running`` operation without steps, for work its caller runs (a bulk load);
        the caller ends it with :meth:`finish`."""
        now = time.time()
        async with self.store.transaction() as tx:
            operation_id = await tx.execute(
                "INSERT INTO operations (kind, target, params, state, error, created_at, "
                "updated_at) VALUES (?, ?, ?, 'running', '', ?, ?)",
                (kind, target, json.dumps(params), now, now))
        return await self.get(int(operation_id))

    async def finish(self, operation_id: int, state: str, error: str = "",
                     params: dict[str, Any] | None = None) -> None:
        """End a :meth:`record`-ed operation (``done`` or ``failed``), optionally with new
        ``params`` (what it did)."""
        if params is not None:
            async with self.store.transaction() as tx:
                await tx.execute("UPDATE operations SET params = ? WHERE id = ?",
                                 (json.dumps(params), operation_id))
        await self._set_state(operation_id, state, error)

    # -- running -------------------------------------------------------------------------

    async def resume(self, operation_id: int, *, retry_for: float = 0.0,
                     on_step: Callable[[Step], None] | None = None) -> Operation:
        """Run the pending steps of an operation to its end; returns it as stored then.

        A step that cannot be done (its target host is no longer active) stops the operation
        as ``failed`` with the reason. An unreachable database is retried for ``retry_for``
        seconds (backing off), then :class:`DirectoryUnavailable` propagates; the operation
        stays resumable. ``on_step`` is called after each committed step.
        """
        operation = await self.get(operation_id)
        if operation.state == "done":
            return operation
        await self._set_state(operation_id, "running", "")
        params = operation.params
        rate = params.get("rate")
        last = max((s.done_at or 0.0 for s in operation.steps if s.state == "done"), default=0.0)
        for step in operation.steps:
            if step.state != "pending":
                continue
            if rate and last:
                await self._sleep(max(0.0, last + 60.0 / float(rate) - time.time()))
            try:
                done = await self._retrying(retry_for, lambda s=step: self._do_step(  # type: ignore[misc]
                    operation, s, float(params.get("drain", DEFAULT_MOVE_DRAIN))))
            except (ConflictError, NotFoundError, ValidationError) as exc:
                await self._set_state(operation_id, "failed", f"step {step.seq} "
                                      f"({step.tenant} -> {step.to_host}): {exc}")
                return await self.get(operation_id)
            if done.state == "done":
                last = done.done_at or time.time()
            if on_step is not None:
                on_step(done)
        await self._retrying(retry_for, lambda: self._set_state(operation_id, "done", ""))
        return await self.get(operation_id)

    async def _retrying(self, retry_for: float, call: Callable[[], Awaitable[Any]]) -> Any:
        deadline = time.monotonic() + retry_for
        delay = 0.25
        while True:
            try:
                return await call()
            except DirectoryUnavailable as exc:
                if time.monotonic() + delay > deadline:
                    raise
                log.warning("directory unavailable, retrying in %.2g s: %s", delay, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_DELAY_MAX)

    async def _do_step(self, operation: Operation, step: Step, drain: float) -> Step:
        """Claim and execute one step in one transaction; returns it as committed."""
        lock = " FOR UPDATE" if self.store.dialect == "mysql" else ""
        async with self.store.transaction() as tx:
            row = await tx.fetchone(
                "SELECT state FROM operation_steps WHERE operation_id = ? AND seq = ?" + lock,
                (operation.id, step.seq))
            if row is None or row[0] != "pending":  # another runner did it meanwhile
                return Step(step.seq, step.tenant, step.to_host, str(row[0] if row else "skipped"))
            where = await tx.fetchone(
                "SELECT h.name FROM tenants t JOIN hosts h ON h.id = t.host_id WHERE t.name = ?",
                (step.tenant,))
            now = time.time()
            state = "skipped"
            if where is not None and where[0] == operation.target:
                to_host = await self._target(tx, operation, step)
                await self.service.move_tenant_in(tx, step.tenant, to_host, drain=drain)
                step = Step(step.seq, step.tenant, to_host, "done", now)
                state = "done"
            await tx.execute(
                "UPDATE operation_steps SET state = ?, to_host = ?, done_at = ? "
                "WHERE operation_id = ? AND seq = ?",
                (state, step.to_host, now, operation.id, step.seq))
            await tx.execute("UPDATE operations SET updated_at = ? WHERE id = ?",
                             (now, operation.id))
        log.info("drain step", extra={"operation": operation.id, "tenant": step.tenant,
                                      "to": step.to_host, "state": state})
        return Step(step.seq, step.tenant, step.to_host, state, now)

    async def _target(self, tx: Tx, operation: Operation, step: Step) -> str:
        """The planned host, or with ``--spread`` the least-loaded active host if the planned
        one is no longer active (with ``--to`` the move then fails: the operator chose it)."""
        row = await tx.fetchone("SELECT state FROM hosts WHERE name = ?", (step.to_host,))
        if (row is not None and row[0] == "active") or operation.params.get("to"):
            return step.to_host
        plan = await self._plan(tx, operation.target, [step.tenant], None)
        return plan[0][1]

    async def _set_state(self, operation_id: int, state: str, error: str) -> None:
        async with self.store.transaction() as tx:
            await tx.execute("UPDATE operations SET state = ?, error = ?, updated_at = ? "
                             "WHERE id = ?", (state, error, time.time(), operation_id))


def _operation(row: Any, steps: list[Step]) -> Operation:
    return Operation(id=int(row[0]), kind=row[1], target=row[2], params=json.loads(row[3]),
                     state=row[4], error=row[5], created_at=float(row[6]),
                     updated_at=float(row[7]), steps=steps)


__all__ = ["BULK_LOAD", "HOST_DRAIN", "TENANT_MOVE", "DrainOptions", "Operation", "Operations",
           "Step", "parse_rate"]
