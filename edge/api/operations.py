"""How the admin API shows and runs long operations (:mod:`edge.operations`, shared with the
CLI's ``edge host drain`` and ``edge operations``).

An operation has two phases an operator cares about: ``moving`` (its steps — tenant moves —
being committed) and ``draining`` (sessions still open on the old hosts, closed by every proxy
``params["drain"]`` seconds after each move; see :mod:`edge.sessionpolicy`). The second phase
is *derived* from the stored steps and the clock, so every API process (and a restarted one)
reports the same thing without a background task.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from edge.directory.bulk import bulk_load
from edge.directory.secrets import KeyBox
from edge.directory.service import DEFAULT_MOVE_DRAIN, iso
from edge.directory.store import SQLStore
from edge.errors import EdgeError
from edge.operations import BULK_LOAD, HOST_DRAIN, Operation, Operations

log = logging.getLogger("edge.api")

PHASES = ("loading", "moving", "draining", "finished", "failed")
INTERRUPTED = ("interrupted: the API process ended during the load; nothing was written "
               "(a load is all or nothing), send it again")
RESUME_RETRY = 60.0
"""Seconds a background run keeps retrying an unreachable directory before it gives up (the
operation stays resumable: the next API start or ``edge operations resume`` continues it)."""


def drain_until(op: Operation) -> float | None:
    """When the sessions of the last committed move are closed (``None``: nothing moved)."""
    moved = [s.done_at for s in op.steps if s.state == "done" and s.done_at is not None]
    if not moved:
        return None
    return max(moved) + float(op.params.get("drain", DEFAULT_MOVE_DRAIN))


def phase(op: Operation, now: float) -> str:
    if op.state == "failed":
        return "failed"
    if op.state != "done":
        return "loading" if op.kind == BULK_LOAD else "moving"
    until = drain_until(op)
    return "draining" if until is not None and now < until else "finished"


def _fraction(part: float, whole: float) -> float:
    return 1.0 if whole <= 0 else round(min(1.0, max(0.0, part / whole)), 3)


def view(op: Operation, now: float | None = None) -> dict[str, Any]:
    """The JSON the API returns (schema ``Operation``)."""
    now = time.time() if now is None else now
    progress = op.progress
    until = drain_until(op)
    drain = float(op.params.get("drain", DEFAULT_MOVE_DRAIN))
    drained = 0.0 if until is None else _fraction(now - (until - drain), drain)
    return {"id": op.id, "kind": op.kind, "target": op.target, "state": op.state,
            "phase": phase(op, now), "error": op.error, "params": op.params,
            "created_at": iso(op.created_at), "updated_at": iso(op.updated_at),
            "steps": progress,
            "moves": [{"seq": st.seq, "tenant": st.tenant, "to": st.to_host, "state": st.state}
                      for st in op.steps],
            "moves_progress": _fraction(progress["done"] + progress["skipped"], progress["total"]),
            "drain_until": None if until is None else iso(until),
            "drain_progress": drained if op.state == "done" else 0.0}


class Runner:
    """Runs operations to their end in background tasks of the API process."""

    def __init__(self, operations: Operations) -> None:
        self.operations = operations
        self.tasks: set[asyncio.Task[None]] = set()

    def start(self, operation_id: int) -> None:
        task = asyncio.create_task(self._run(operation_id))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _run(self, operation_id: int) -> None:
        try:
            await self.operations.resume(operation_id, retry_for=RESUME_RETRY)
        except Exception:  # the operation stays resumable; say why it stopped
            log.exception("operation %s stopped; it stays resumable", operation_id)

    async def resume_unfinished(self) -> None:
        """At start: continue drains a previous API process left ``running``; its loads
        were rolled back with it, so they are marked failed."""
        for op in await self.operations.list_operations(state="running", limit=1000):
            if op.kind == HOST_DRAIN:
                self.start(op.id)
            elif op.kind == BULK_LOAD:
                await self.operations.finish(op.id, "failed", INTERRUPTED)

    def start_bulk_load(self, operation_id: int, store: SQLStore, keybox: KeyBox | None,
                        lines: list[str]) -> None:
        """Run a load recorded as ``operation_id`` in the background; its counts (or the
        first bad line) end up in the operation."""
        task = asyncio.create_task(self._load(operation_id, store, keybox, lines))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _load(self, operation_id: int, store: SQLStore, keybox: KeyBox | None,
                    lines: list[str]) -> None:
        started = time.monotonic()
        try:
            counts = await bulk_load(store, lines, keybox=keybox)
        except EdgeError as exc:
            await self.operations.finish(operation_id, "failed", str(exc))
            return
        except Exception:
            log.exception("bulk load %s failed", operation_id)
            await self.operations.finish(operation_id, "failed", "internal error (logged)")
            return
        await self.operations.finish(operation_id, "done", params={
            "lines": len(lines), "counts": counts,
            "seconds": round(time.monotonic() - started, 3)})

    async def stop(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        for task in list(self.tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


__all__ = ["PHASES", "Runner", "drain_until", "phase", "view"]
