"""The directory's circuit breaker: once the database has failed, no request waits for it.

A database that *hangs* (stopped process, dropped packets) is worse than one that refuses: every
query waits the full connect/query timeout before failing. Without a breaker each expired cache
entry pays that wait on the request path, and a route is a chain of three lookups.

:class:`Breaker` is shared by every lookup cache of one :class:`~edge.directory.Directory`
(they all use the same store). After a failed query it is *open*: caches answer from memory at
once (stale answers up to ``[cache] stale_if_error`` past expiry, :class:`DirectoryUnavailable`
for keys never seen) and one background task probes the database with exponential back-off.
The first successful probe (or any successful query, such as the change feed's poll) closes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from edge.errors import DirectoryUnavailable

log = logging.getLogger("edge.directory.breaker")


class Breaker:
    """Open after a failure, closed after a success; probes in the background while open."""

    def __init__(self, probe: Callable[[], Awaitable[object]], *, probe_interval: float = 0.5,
                 probe_interval_max: float = 30.0) -> None:
        if probe_interval <= 0 or probe_interval_max < probe_interval:
            raise ValueError("need 0 < probe_interval <= probe_interval_max")
        self._probe = probe
        self.probe_interval = probe_interval
        self.probe_interval_max = probe_interval_max
        self.open = False
        self.opened_at = 0.0
        """``time.time()`` when the breaker last opened."""
        self.last_success = 0.0
        """``time.time()`` of the last query that reached the database (0: none yet)."""
        self.probes = 0
        self.last_error = ""
        """Why the database last failed (repeated to callers refused while open)."""
        self._task: asyncio.Task[None] | None = None

    def success(self) -> None:
        self.last_success = time.time()
        if self.open:
            self.open = False
            log.info("directory reachable again; circuit breaker closed",
                     extra={"outage_seconds": round(self.last_success - self.opened_at, 1)})

    def failure(self, exc: BaseException) -> None:
        """A query failed: open (if closed) and make sure one probe task runs."""
        self.last_error = str(exc) or type(exc).__name__
        if not self.open:
            self.open = True
            self.opened_at = time.time()
            log.warning("directory unreachable; circuit breaker open, serving from memory: %s",
                        exc)
        if self._task is None or self._task.done():
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return  # no loop (a tool): the next query on a loop probes for real
            self._task = loop.create_task(self._run_probes(), name="edge-directory-probe")

    def seconds_since_success(self, now: float | None = None) -> float:
        """Age of the last successful query (0 before the first one)."""
        if not self.last_success:
            return 0.0
        return max(0.0, (time.time() if now is None else now) - self.last_success)

    async def _run_probes(self) -> None:
        delay = self.probe_interval
        while self.open:
            await asyncio.sleep(delay)
            if not self.open:
                return  # something else (the change feed) reached the database meanwhile
            self.probes += 1
            try:
                await self._probe()
            except DirectoryUnavailable as exc:
                self.last_error = str(exc) or type(exc).__name__
                delay = min(delay * 2, self.probe_interval_max)
                continue
            except Exception:  # a bug in the probe must not leave the breaker open forever
                log.exception("directory probe failed unexpectedly")
                delay = min(delay * 2, self.probe_interval_max)
                continue
            self.success()

    async def close(self) -> None:
        """Stop probing (worker shutdown)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


__all__ = ["Breaker"]
