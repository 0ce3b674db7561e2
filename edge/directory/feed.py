"""The change feed: how a write on any machine reaches every proxy process within ~1 s.

Every write appends ``(id, entity, name)`` to ``changes`` in its own transaction. Each worker
polls ``WHERE id > cursor`` every ``change_poll_interval`` seconds and evicts exactly those
keys, then tells subscribers (the HTTP cache purges, the SSH/FTP proxies drain sessions of a
moved tenant). No broker, no extra component: only indexed reads on the database the proxies
already use.

Auto-increment ids are handed out at insert but become visible at commit, so on MySQL a
change can appear *behind* the cursor (id 10 commits after id 11 was read). Such holes are
remembered as gaps and asked for explicitly for ``gap_timeout`` seconds, so a slow
transaction's change is not lost.

A database outage loses nothing: the cursor stays where it was, so the first poll that reaches
the database again returns (and applies) every change committed meanwhile, and the gap clock
restarts then (a writer's transaction can be stuck for as long as the database was). The
feed's polls also report to the directory's circuit breaker, so a successful poll closes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from edge.directory.directory import Directory
from edge.directory.model import Change
from edge.errors import DirectoryUnavailable

log = logging.getLogger("edge.directory.feed")

ChangeSubscriber = Callable[[Change], None]


class ChangeFeed:
    """Polls the store's change log and applies it to a :class:`Directory`."""

    def __init__(self, directory: Directory, *, interval: float = 1.0, gap_timeout: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.directory = directory
        self.interval = interval
        self.gap_timeout = gap_timeout
        self._clock = clock
        self.cursor: int | None = None
        self._gaps: dict[int, float] = {}
        self._subscribers: list[ChangeSubscriber] = []
        self._task: asyncio.Task[None] | None = None
        self.healthy = False
        self.applied = 0
        self.last_poll: float = 0.0
        self.failures = 0

    def subscribe(self, callback: ChangeSubscriber) -> None:
        """``callback(change)`` runs after the cache evicted it; it must not block or raise."""
        self._subscribers.append(callback)

    async def start(self) -> None:
        """Begin at the newest change (the cache is empty, so older changes do not matter)."""
        try:
            self.cursor = await self.directory.store.latest_change_id()
            self.healthy = True
        except DirectoryUnavailable as exc:
            # Serve from whatever can be loaded later; catch up once the database answers.
            log.warning("change feed: cannot read cursor yet: %s", exc)
        self._task = asyncio.create_task(self._run(), name="edge-change-feed")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.poll_once()
            except DirectoryUnavailable:
                pass  # poll_once recorded it
            except Exception:  # a bug must not stop eviction forever
                log.exception("change feed: unexpected error")

    async def poll_once(self) -> int:
        """Read and apply new changes; returns how many were applied."""
        try:
            return await self._poll()
        except DirectoryUnavailable as exc:
            self.failures += 1
            if self.healthy:
                log.warning("change feed: directory unreachable: %s", exc)
            self.healthy = False
            self.directory.breaker.failure(exc)
            raise

    async def _poll(self) -> int:
        store = self.directory.store
        if self.cursor is None:
            # Started while the database was down: everything cached since may be stale.
            self.cursor = await store.latest_change_id()
            self._apply(Change(0, "all", "*"))
        now = self._clock()
        if self.healthy:  # during an outage a gap's transaction cannot commit either
            for gap, since in list(self._gaps.items()):
                if now - since > self.gap_timeout:
                    del self._gaps[gap]
        changes = await store.fetch_changes(self.cursor, tuple(self._gaps))
        self.last_poll = time.time()
        if not self.healthy:
            log.info("change feed: directory reachable again")
            now = self._clock()
            self._gaps = dict.fromkeys(self._gaps, now)
        self.healthy = True
        self.directory.breaker.success()
        for change in changes:
            if change.id in self._gaps:
                del self._gaps[change.id]
            elif change.id > self.cursor:
                for missing in range(self.cursor + 1, min(change.id, self.cursor + 1001)):
                    self._gaps.setdefault(missing, now)
                self.cursor = change.id
            self._apply(change)
        return len(changes)

    def _apply(self, change: Change) -> None:
        self.directory.apply_change(change)
        self.applied += 1
        for callback in self._subscribers:
            try:
                callback(change)
            except Exception:
                log.exception("change feed subscriber failed on %s", change)
