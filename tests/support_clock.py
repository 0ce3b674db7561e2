"""A clock for the sans-IO code that takes ``clock=`` (caches, limits, filters)."""

from __future__ import annotations


class FakeClock:
    """An injectable monotonic clock that only moves when the test says so."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
