"""The lookup cache in front of the store: what makes request-time lookups affordable.

One :class:`LookupCache` per kind of object. Each is

* a bounded LRU (``max_entries``) with a TTL for answers and a shorter one for *negative*
  answers (unknown names are the common case under scanning);
* **single-flight**: however many connections ask for a missing key at once, one store query
  runs; it runs in its own task, so a waiter that is cancelled (client gone) does not cancel
  the query the others are waiting for;
* **stale-if-error**: when the store raises :class:`DirectoryUnavailable`, an expired answer
  is served (counted in ``stats.stale``) for up to ``stale_if_error`` seconds past expiry; a
  key never seen raises, and the proxy turns that into its "temporarily unavailable" error;
* **circuit breaker** (:class:`~edge.directory.breaker.Breaker`, shared by a directory's
  caches): after a failed query, expired answers are served from memory without asking the
  store and cold keys raise at once, until a background probe reaches the database again;
* **refresh while serving** (``refresh_window``): an answer that expired less than
  ``refresh_window`` seconds ago is still served, and the first such use starts one background
  query for it (counted in ``stats.refreshes``), so a name in use never waits for the
  directory when its TTL runs out; positive answers' TTLs are also spread over
  ``[ttl * (1 - ttl_spread), ttl]``, so answers loaded together (a warm-up, a restart) do not all
  expire in the same second. Both only shorten or bridge the TTL, which is the safety net
  behind the change feed: the feed still evicts a changed key at once.

Eviction is exact: :meth:`LookupCache.evict` is what the change feed calls. A load that was
already running when its key was evicted still answers its waiters but is not stored, so an
answer read just before a change can never outlive the change.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from edge.directory.breaker import Breaker
from edge.errors import DirectoryUnavailable

K = TypeVar("K")
V = TypeVar("V")


class CacheStats:
    """Plain counters (read by the metrics collector; no locks on the hot path)."""

    __slots__ = ("errors", "evictions", "hits", "loads", "misses", "negative_hits", "refreshes",
                 "stale")

    def __init__(self) -> None:
        self.hits = 0
        self.negative_hits = 0
        self.misses = 0
        self.loads = 0
        self.stale = 0
        self.refreshes = 0
        self.errors = 0
        self.evictions = 0

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}


class _Entry(Generic[V]):
    __slots__ = ("expires", "value")

    def __init__(self, value: V | None, expires: float) -> None:
        self.value = value
        self.expires = expires


class Miss:
    """Marker returned by :meth:`LookupCache.peek` when the key has no fresh entry."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "MISS"


MISS = Miss()


def _retrieve_exception(task: asyncio.Task[object]) -> None:
    if not task.cancelled():
        task.exception()


class LookupCache(Generic[K, V]):
    """A bounded, TTL'd, single-flight, stale-if-error cache for one kind of lookup.

    ``loader(key)`` must return the object or ``None`` (unknown: cached negatively) and raise
    :class:`DirectoryUnavailable` when the store cannot answer.
    """

    def __init__(self, name: str, loader: Callable[[K], Awaitable[V | None]], *,
                 max_entries: int, ttl: float, negative_ttl: float, stale_if_error: float,
                 refresh_window: float = 0.0, ttl_spread: float = 0.0,
                 breaker: Breaker | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not 0.0 <= ttl_spread < 1.0:
            raise ValueError(f"ttl_spread must be in [0, 1), got {ttl_spread!r}")
        self.name = name
        self._loader = loader
        self.max_entries = max_entries
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        self.stale_if_error = stale_if_error
        self.refresh_window = refresh_window
        self.ttl_spread = ttl_spread
        self._clock = clock
        self.breaker = breaker
        self._entries: OrderedDict[K, _Entry[V]] = OrderedDict()
        self._inflight: dict[K, asyncio.Task[V | None]] = {}
        self._evicted_in_flight: set[K] = set()
        self._watched: dict[K, int] = {}
        self._evicted_watched: set[K] = set()
        self._clears = 0
        self.stats = CacheStats()

    def __len__(self) -> int:
        return len(self._entries)

    def peek(self, key: K) -> V | Miss | None:
        """The cached answer (possibly ``None``) or :data:`MISS`; never waits for the store.

        Protocol-level code calls this first so a hit costs no coroutine. An answer inside its
        refresh window counts as a hit and starts its background refresh (needs a running loop).
        """
        entry = self._entries.get(key)
        if entry is None:
            return MISS
        now = self._clock()
        if entry.expires <= now:
            if self.breaker is not None and self.breaker.open:
                # Known down: answer from memory now rather than wait for a timeout.
                if now >= entry.expires + self.stale_if_error:
                    return MISS
                self.stats.stale += 1
                self._entries.move_to_end(key)
                return entry.value
            if not self._refreshing(key, entry, now):
                return MISS
        self._entries.move_to_end(key)
        if entry.value is None:
            self.stats.negative_hits += 1
        else:
            self.stats.hits += 1
        return entry.value

    def expiry(self, key: K) -> float:
        """When the cached answer for ``key`` expires, on this cache's clock (``-inf`` if none
        is cached). Lets a caller that keeps something derived from answers (the HTTP proxy's
        remembered routes) keep it no longer than the answers themselves."""
        entry = self._entries.get(key)
        return entry.expires if entry is not None else float("-inf")

    def _refreshing(self, key: K, entry: _Entry[V], now: float) -> bool:
        """Whether the expired ``entry`` may still be served while a refresh of it runs."""
        if entry.value is None or now >= entry.expires + self.refresh_window:
            return False  # unknown names are cheap to ask again; too old to be served
        if key not in self._inflight:
            try:
                task = asyncio.get_running_loop().create_task(self._load(key))
            except RuntimeError:  # no event loop (a tool reading the cache): load in get()
                return False
            task.add_done_callback(_retrieve_exception)
            self._inflight[key] = task
            self.stats.refreshes += 1
        return True

    async def get(self, key: K) -> V | None:
        """The answer for ``key``: cached if fresh, else loaded once for all concurrent callers."""
        value = self.peek(key)
        if not isinstance(value, Miss):
            return value
        self.stats.misses += 1
        if self.breaker is not None and self.breaker.open:
            self.stats.errors += 1
            raise DirectoryUnavailable(
                f"{self.breaker.last_error} (circuit open: no {self.name} answer cached for "
                f"{key!r})")
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.ensure_future(self._load(key))
            # Every waiter may be gone (clients disconnected) before a failure arrives.
            task.add_done_callback(_retrieve_exception)
            self._inflight[key] = task
        return await asyncio.shield(task)

    async def _load(self, key: K) -> V | None:
        try:
            self.stats.loads += 1
            try:
                value = await self._loader(key)
            except DirectoryUnavailable as exc:
                if self.breaker is not None:
                    self.breaker.failure(exc)
                self.stats.errors += 1
                entry = self._entries.get(key)
                if entry is not None and self._clock() < entry.expires + self.stale_if_error:
                    self.stats.stale += 1
                    return entry.value
                raise
            if self.breaker is not None:
                self.breaker.success()
            if key in self._evicted_in_flight:
                return value
            self.put(key, value)
            return value
        finally:
            self._inflight.pop(key, None)
            self._evicted_in_flight.discard(key)

    def put(self, key: K, value: V | None) -> None:
        """Store an answer (used by loaders that learn about several keys in one query)."""
        if value is None:
            ttl = self.negative_ttl
        elif self.ttl_spread:
            ttl = self.ttl * (1.0 - self.ttl_spread * random.random())
        else:
            ttl = self.ttl
        self._entries[key] = _Entry(value, self._clock() + ttl)
        self._entries.move_to_end(key)
        if len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def watch(self, key: K) -> int:
        """Start a load of ``key`` done *outside* this cache (see :meth:`put_watched`).

        Returns a token. Every ``watch`` must be paired with exactly one ``put_watched``
        (with ``None`` as value and ``store=False`` if the load failed).
        """
        self._watched[key] = self._watched.get(key, 0) + 1
        return self._clears

    def put_watched(self, key: K, value: V | None, token: int, *, store: bool = True) -> None:
        """Store a value loaded since :meth:`watch` unless ``key`` was evicted meanwhile.

        This is how a loader that learns a second key in the same query (a site query also
        answers its wildcard) avoids caching an answer that a change made stale mid-flight.
        """
        remaining = self._watched[key] - 1
        evicted = key in self._evicted_watched or token != self._clears
        if remaining:
            self._watched[key] = remaining
        else:
            del self._watched[key]
            self._evicted_watched.discard(key)
        if store and not evicted:
            self.put(key, value)

    def evict(self, key: K) -> None:
        """Forget ``key`` (change feed); a load already running for it will not be stored."""
        if self._entries.pop(key, None) is not None:
            self.stats.evictions += 1
        if key in self._inflight:
            self._evicted_in_flight.add(key)
        if key in self._watched:
            self._evicted_watched.add(key)

    def clear(self) -> None:
        self.stats.evictions += len(self._entries)
        self._entries.clear()
        self._evicted_in_flight.update(self._inflight)
        self._clears += 1
