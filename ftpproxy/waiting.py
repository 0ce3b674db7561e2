"""One waiter with a lazy deadline timer, for the control connections' per-command waits."""

from __future__ import annotations

import asyncio


class DeadlineWaiter:
    """Wait for :meth:`wake` with a timeout, keeping one timer across waits.

    Why not ``asyncio.timeout`` per wait: a login makes 4-5 waits on each control connection and
    the idle timeout moves forward at every command, so a timeout object (created, pushed on the
    loop's heap, cancelled) per wait was ~12% of the proxy's CPU in a 300-login burst (py-spy,
    Python 3.11). Here a wait only records its deadline; the one timer behind it is rescheduled
    when it would fire too late for a new deadline, and re-arms itself when it fires before the
    current one. Replies and commands come in well under a second against timeouts of a minute,
    so a session usually schedules one timer.
    """

    __slots__ = ("_deadline", "_future", "_timer")

    def __init__(self) -> None:
        self._future: asyncio.Future[None] | None = None
        self._deadline: float | None = None
        self._timer: asyncio.TimerHandle | None = None

    @property
    def waiting(self) -> bool:
        """Whether a :meth:`wait` is in progress."""
        return self._future is not None

    def wake(self) -> bool:
        """End the current wait; returns False when nobody was waiting."""
        future = self._future
        if future is None:
            return False
        if not future.done():
            future.set_result(None)
        return True

    async def wait(self, seconds: float | None) -> None:
        """Return at the next :meth:`wake`; raise TimeoutError after ``seconds``."""
        loop = asyncio.get_running_loop()
        self._future = future = loop.create_future()
        self._deadline = None if seconds is None else loop.time() + seconds
        if self._deadline is not None:
            self._arm(loop, self._deadline)
        try:
            await future
        finally:
            self._future = None
            self._deadline = None

    def close(self) -> None:
        """Cancel the timer (the connection is over)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _arm(self, loop: asyncio.AbstractEventLoop, deadline: float) -> None:
        timer = self._timer
        if timer is not None and timer.when() <= deadline:
            return  # fires first, then re-arms for the deadline (see _fired)
        if timer is not None:
            timer.cancel()
        self._timer = loop.call_at(deadline, self._fired)

    def _fired(self) -> None:
        self._timer = None
        future, deadline = self._future, self._deadline
        if future is None or deadline is None or future.done():
            return  # nobody waits with a deadline: the next wait arms the timer again
        loop = asyncio.get_running_loop()
        if loop.time() < deadline:
            self._timer = loop.call_at(deadline, self._fired)
        else:
            future.set_exception(TimeoutError())
