"""The content cache store: a bytes-bounded LRU of whole responses, plus single-flight.

Decisions (what may be looked up or stored, for how long) are sans-IO in
:mod:`httpproxy.cachepolicy`; this module only holds entries. An entry keeps the response as
the backend sent it, minus hop-by-hop headers: ``head`` (status line and header lines, each
ending in CRLF, without the blank line) and ``body`` (raw, chunked framing included), so a
hit is one bytes join and one write.

Entries are indexed by the site that stored them, so ``edge cache purge HOSTNAME [--path P]``
(a ``purge`` change ``HOSTNAME`` + ``P`` in the feed) drops exactly that site's objects.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

__all__ = ["CacheEntry", "ContentCache", "Flight"]

ENTRY_OVERHEAD = 256
"""Bytes charged per entry beyond head and body (objects, key, index)."""


class CacheEntry:
    """One stored response. ``stored_at`` is Unix time."""

    __slots__ = (
        "body",
        "head",
        "key",
        "path",
        "sie",
        "site",
        "size",
        "status",
        "stored_at",
        "swr",
        "ttl",
    )

    def __init__(self, key: bytes, site: str, path: str, status: int, head: bytes, body: bytes,
                 *, ttl: float, swr: float, sie: float, stored_at: float | None = None) -> None:
        self.key = key
        self.site = site
        self.path = path
        self.status = status
        self.head = head
        self.body = body
        self.ttl = ttl
        self.swr = swr
        self.sie = sie
        self.stored_at = time.time() if stored_at is None else stored_at
        self.size = len(head) + len(body) + len(key) + ENTRY_OVERHEAD


Waiter = Callable[["CacheEntry | None"], None]


class Flight:
    """A miss being fetched; other requests for the key wait here instead of going upstream.

    Waiters are called with the stored entry, or ``None`` when nothing was stored (then
    each waiter forwards its request itself). Waiters must not raise.
    """

    __slots__ = ("done", "waiters")

    def __init__(self) -> None:
        self.waiters: list[Waiter] = []
        self.done = False


class ContentCache:
    """Per-worker LRU bounded by ``max_bytes``. Not thread-safe (one event loop)."""

    def __init__(self, max_bytes: int, *, max_object_bytes: int | None = None) -> None:
        self.max_bytes = max_bytes
        self.max_object_bytes = max_object_bytes if max_object_bytes is not None else max_bytes // 8
        self.size = 0
        self._entries: OrderedDict[bytes, CacheEntry] = OrderedDict()
        self._by_site: dict[str, dict[bytes, None]] = {}
        self._flights: dict[bytes, Flight] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def entries(self) -> list[CacheEntry]:
        """Every entry, least recently used first (for tests and the admin view)."""
        return list(self._entries.values())

    def get(self, key: bytes) -> CacheEntry | None:
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def put(self, entry: CacheEntry) -> bool:
        """Store ``entry`` (replacing one with the same key); False when it is too big."""
        if entry.size > self.max_object_bytes or entry.size > self.max_bytes:
            return False
        self.remove(entry.key)
        self._entries[entry.key] = entry
        self._by_site.setdefault(entry.site, {})[entry.key] = None
        self.size += entry.size
        while self.size > self.max_bytes and self._entries:
            self.remove(next(iter(self._entries)))
        return True

    def remove(self, key: bytes) -> None:
        entry = self._entries.pop(key, None)
        if entry is None:
            return
        self.size -= entry.size
        keys = self._by_site.get(entry.site)
        if keys is not None:
            keys.pop(key, None)
            if not keys:
                del self._by_site[entry.site]

    def purge(self, site: str, path_prefix: str = "") -> int:
        """Drop the objects stored for ``site`` (a site hostname, ``*.x`` for a wildcard
        site) whose path starts with ``path_prefix``; returns how many."""
        keys = self._by_site.get(site)
        if not keys:
            return 0
        doomed = [k for k in keys if self._entries[k].path.startswith(path_prefix)]
        for key in doomed:
            self.remove(key)
        return len(doomed)

    def clear(self) -> None:
        self._entries.clear()
        self._by_site.clear()
        self.size = 0

    # -- single flight ---------------------------------------------------------------------

    def flight(self, key: bytes) -> Flight | None:
        """The fetch in progress for ``key``, if any."""
        return self._flights.get(key)

    def begin_flight(self, key: bytes) -> Flight:
        flight = Flight()
        self._flights[key] = flight
        return flight

    def end_flight(self, key: bytes, flight: Flight, entry: CacheEntry | None) -> None:
        """Finish ``flight`` and call its waiters with ``entry`` (``None``: nothing stored)."""
        if flight.done:
            return
        flight.done = True
        if self._flights.get(key) is flight:
            del self._flights[key]
        waiters, flight.waiters = flight.waiters, []
        for waiter in waiters:
            waiter(entry)
