"""LookupCache on its own (a plain async loader function, a fake clock): TTLs, negative
answers, LRU bound, single-flight, cancellation, stale-if-error and exact eviction."""

from __future__ import annotations

import asyncio

import pytest

from edge.directory.cache import MISS, LookupCache
from edge.errors import DirectoryUnavailable
from tests.support_clock import FakeClock


class Source:
    """A loader backed by a dict; ``down`` makes it fail like an unreachable database."""

    def __init__(self, data: dict[str, str]) -> None:
        self.data = data
        self.calls: list[str] = []
        self.down = False
        self.gate: asyncio.Event | None = None

    async def __call__(self, key: str) -> str | None:
        self.calls.append(key)
        if self.gate is not None:
            await self.gate.wait()
        if self.down:
            raise DirectoryUnavailable("directory database test: connection refused")
        return self.data.get(key)


def make(source: Source, clock: FakeClock, **kw: float) -> LookupCache[str, str]:
    args = {"max_entries": 100, "ttl": 60.0, "negative_ttl": 10.0, "stale_if_error": 600.0}
    args.update(kw)
    return LookupCache("test", source, clock=clock, **args)  # type: ignore[arg-type]


async def test_hit_miss_and_ttl() -> None:
    clock, source = FakeClock(), Source({"a": "A"})
    cache = make(source, clock)
    assert cache.peek("a") is MISS
    assert await cache.get("a") == "A"
    assert await cache.get("a") == "A"
    assert source.calls == ["a"]
    assert (cache.stats.hits, cache.stats.misses, cache.stats.loads) == (1, 1, 1)
    clock.advance(59.9)
    assert cache.peek("a") == "A"
    clock.advance(0.2)
    assert cache.peek("a") is MISS
    source.data["a"] = "A2"
    assert await cache.get("a") == "A2"
    assert source.calls == ["a", "a"]


async def test_negative_answers_use_negative_ttl() -> None:
    clock, source = FakeClock(), Source({})
    cache = make(source, clock)
    assert await cache.get("x") is None
    assert await cache.get("x") is None
    assert cache.stats.negative_hits == 1 and source.calls == ["x"]
    clock.advance(10.1)
    source.data["x"] = "X"
    assert await cache.get("x") == "X"


async def test_lru_bound_drops_least_recently_used() -> None:
    clock, source = FakeClock(), Source({k: k.upper() for k in "abcd"})
    cache = make(source, clock, max_entries=3)
    for key in "abc":
        await cache.get(key)
    cache.peek("a")  # a is now most recently used
    await cache.get("d")
    assert len(cache) == 3
    assert cache.peek("b") is MISS
    assert cache.peek("a") == "A" and cache.peek("c") == "C" and cache.peek("d") == "D"


async def test_single_flight_and_cancellation() -> None:
    clock, source = FakeClock(), Source({"k": "V"})
    source.gate = asyncio.Event()
    cache = make(source, clock)
    tasks = [asyncio.create_task(cache.get("k")) for _ in range(100)]
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    for task in tasks[::2]:
        task.cancel()
    source.gate.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert source.calls == ["k"]
    assert all(isinstance(r, asyncio.CancelledError) for r in results[::2])
    assert all(r == "V" for r in results[1::2])
    assert cache.peek("k") == "V"


async def test_failure_reaches_every_waiter_and_is_not_cached() -> None:
    clock, source = FakeClock(), Source({"k": "V"})
    source.down = True
    cache = make(source, clock)
    results = await asyncio.gather(*(cache.get("k") for _ in range(10)), return_exceptions=True)
    assert all(isinstance(r, DirectoryUnavailable) for r in results)
    assert source.calls == ["k"] and cache.stats.errors == 1
    source.down = False
    assert await cache.get("k") == "V"


async def test_stale_if_error_window() -> None:
    clock, source = FakeClock(), Source({"k": "V"})
    cache = make(source, clock, ttl=60, stale_if_error=600)
    assert await cache.get("k") == "V"
    source.down = True
    clock.advance(60 + 599)
    assert await cache.get("k") == "V"
    assert cache.stats.stale == 1
    clock.advance(2)
    with pytest.raises(DirectoryUnavailable, match="connection refused"):
        await cache.get("k")
    with pytest.raises(DirectoryUnavailable):
        await cache.get("never-seen")


async def test_evict_and_clear_are_exact() -> None:
    clock, source = FakeClock(), Source({"a": "A", "b": "B"})
    cache = make(source, clock)
    await cache.get("a")
    await cache.get("b")
    cache.evict("a")
    cache.evict("zzz")  # unknown keys are fine
    assert cache.peek("a") is MISS and cache.peek("b") == "B"
    assert cache.stats.evictions == 1
    cache.clear()
    assert len(cache) == 0


async def test_evicted_or_cleared_while_loading_is_not_stored() -> None:
    for how in ("evict", "clear"):
        clock, source = FakeClock(), Source({"k": "old"})
        source.gate = asyncio.Event()
        cache = make(source, clock)
        task = asyncio.create_task(cache.get("k"))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        cache.evict("k") if how == "evict" else cache.clear()
        source.data["k"] = "new"
        source.gate.set()
        assert await task == "new"  # the loader read after the change here, still not stored
        assert cache.peek("k") is MISS, how
        assert await cache.get("k") == "new"
        assert cache.peek("k") == "new"
