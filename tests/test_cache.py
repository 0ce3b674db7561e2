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


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_expired_answer_in_use_is_served_while_one_refresh_runs() -> None:
    """Inside ``refresh_window`` past expiry, callers get the answer at once and one background
    query replaces it; nobody waits for the directory."""
    clock, source = FakeClock(), Source({"a": "A"})
    cache = make(source, clock, refresh_window=30.0)
    assert await cache.get("a") == "A"
    clock.advance(61)
    source.data["a"] = "A2"
    source.gate = asyncio.Event()  # the refresh query hangs until released
    assert cache.peek("a") == "A"
    assert await asyncio.wait_for(cache.get("a"), 1) == "A"  # get() does not wait either
    await settle()
    assert source.calls == ["a", "a"] and cache.stats.refreshes == 1  # one query for both
    source.gate.set()
    await settle()
    assert cache.peek("a") == "A2"
    assert cache.stats.refreshes == 1 and source.calls == ["a", "a"]


async def test_refresh_window_is_bounded_and_skips_unknown_names() -> None:
    clock, source = FakeClock(), Source({"a": "A"})
    cache = make(source, clock, refresh_window=30.0)
    assert await cache.get("a") == "A"
    assert await cache.get("ghost") is None
    clock.advance(60 + 30)  # past the window: too old to serve
    assert cache.peek("a") is MISS
    assert cache.peek("ghost") is MISS  # negative answers are not served past their TTL
    await settle()
    assert source.calls == ["a", "ghost"] and cache.stats.refreshes == 0


async def test_key_evicted_during_its_refresh_is_not_stored() -> None:
    clock, source = FakeClock(), Source({"a": "A"})
    cache = make(source, clock, refresh_window=30.0)
    assert await cache.get("a") == "A"
    clock.advance(61)
    source.gate = asyncio.Event()
    assert cache.peek("a") == "A"
    cache.evict("a")  # the change feed: "a" changed while its refresh was running
    source.data["a"] = "A2"
    source.gate.set()
    await settle()
    assert cache.peek("a") is MISS
    assert await cache.get("a") == "A2"


async def test_failed_refresh_keeps_serving_inside_the_window() -> None:
    clock, source = FakeClock(), Source({"a": "A"})
    cache = make(source, clock, refresh_window=30.0)
    assert await cache.get("a") == "A"
    clock.advance(61)
    source.down = True
    assert cache.peek("a") == "A"
    await settle()
    assert cache.stats.errors == 1
    assert cache.peek("a") == "A"  # still inside the window: served, another refresh tried
    await settle()
    assert cache.stats.errors == 2 and cache.stats.refreshes == 2


async def test_ttl_spread_spreads_expiry_but_never_beyond_ttl() -> None:
    clock, source = FakeClock(), Source({f"k{i}": "v" for i in range(200)})
    cache = make(source, clock, ttl_spread=0.5)
    for i in range(200):
        assert await cache.get(f"k{i}") == "v"
    clock.advance(45)  # between 30 s and 60 s: some expired, some not
    expired = sum(cache.peek(f"k{i}") is MISS for i in range(200))
    assert 20 < expired < 180
    clock.advance(15.01)
    assert all(cache.peek(f"k{i}") is MISS for i in range(200))
    with pytest.raises(ValueError, match="ttl_spread"):
        make(source, clock, ttl_spread=1.0)


async def test_expiry_tells_when_an_answer_stops_being_fresh() -> None:
    """What a caller keeping something derived from an answer (the HTTP proxy's remembered
    routes) bounds it by: the answer's own expiry, negative answers included."""
    clock, source = FakeClock(), Source({"a": "A"})
    cache = make(source, clock)
    assert cache.expiry("a") == float("-inf")  # nothing cached: nothing to keep
    await cache.get("a")
    await cache.get("unknown")
    assert cache.expiry("a") == clock.now + 60.0
    assert cache.expiry("unknown") == clock.now + 10.0
    cache.evict("a")
    assert cache.expiry("a") == float("-inf")
