"""The content cache store: a bytes-bounded LRU of whole responses and their variants,
indexed by site, URL and tag, plus single flight.

Decisions (what may be looked up or stored, for how long) are sans-IO in
:mod:`httpproxy.cachepolicy` and :mod:`httpproxy.cacheflow`; this module only holds entries.
An entry keeps the response as the backend sent it, minus hop-by-hop headers: ``head``
(status line and header lines, each ending in CRLF, without the blank line) and ``body``
(raw, chunked framing included), so a hit is one bytes join and one write.

Keys. The primary key is :func:`httpproxy.cachepolicy.cache_key` (scheme, host, encoding
variant, target). A response without ``Vary`` is stored under its primary key, so the
no-Vary hit is one dict lookup (:meth:`ContentCache.get`). A response with ``Vary`` is a
*variant*: stored under primary key + secondary key (:func:`httpproxy.cacheflow.secondary_key`
of the fields it names), found by :meth:`ContentCache.select`; at most
:data:`MAX_VARIANTS` per primary key (the least recently used goes first). Storing a plain
response drops the URL's variants and the reverse (the resource changed how it varies).

Indexes. Every entry is indexed by its site (``edge cache purge HOSTNAME [--path P]``), by
its URL without scheme and variant (invalidation, RFC 9111 §4.4, and ``--url``), and by each
of its tags (``Cache-Tag`` / ``Surrogate-Key`` response fields, ``--tag``; a tag belongs to
one site, so a purge never reaches another site's objects). The byte bound
(``max_bytes``) counts every variant.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from typing import NamedTuple, TypeVar

from httpproxy.cacheflow import NotModifiedUpdate, entry_tags, secondary_key
from httpproxy.cachepolicy import CachePolicy, StoreTerms

__all__ = ["MAX_VARIANTS", "CacheEntry", "ContentCache", "Flight", "Revalidation", "entry_tags",
           "url_key"]

ENTRY_OVERHEAD = 256
"""Bytes charged per entry beyond head and body (objects, key, index)."""
MAX_VARIANTS = 16
"""Variants kept per primary key (URL + encoding): a response varying on a field with many
values (User-Agent, Cookie) cannot fill the cache with one URL."""
_K = TypeVar("_K")
_ENCODINGS = (b"br", b"gzip", b"identity")
"""The encoding variants of :func:`httpproxy.cachepolicy.encoding_variant`."""


def url_key(primary: bytes) -> bytes:
    """The URL part of a primary key (host NUL target): what invalidation and URL purges
    name, across schemes and encoding variants."""
    parts = primary.split(b"\0", 3)
    return parts[1] + b"\0" + parts[3] if len(parts) == 4 else primary


class Revalidation(NamedTuple):
    """The last 304 applied to an entry and what it decided, for the next revalidation
    answered by the same 304 (but for its Date): the merge (``update``) and the clock-free
    storage terms (``terms``, for this policy, target and Authorization) are reused; only the
    lifetime and age are computed again (:func:`httpproxy.cachepolicy.verdict_at`)."""

    update: NotModifiedUpdate
    policy: CachePolicy
    target: bytes
    authorization: bool
    terms: StoreTerms

    def reuse(self, stored_head: bytes, head_304: bytes, policy: CachePolicy, target: bytes,
              authorization: bool) -> NotModifiedUpdate | None:
        """The update ``head_304`` makes of ``stored_head`` when this memo knows it: the same
        304 again, or one that differs only in its Date (:meth:`NotModifiedUpdate.redated`),
        for the same policy, target and Authorization; None otherwise."""
        if (policy is not self.policy or target != self.target
                or authorization != self.authorization):
            return None
        update = self.update
        if update.repeats(stored_head, head_304, policy.store_strip):
            return update
        return update.redated(stored_head, head_304, policy.store_strip)


class CacheEntry:
    """One stored response. ``stored_at`` is Unix time; ``vary`` names the request fields a
    variant was selected by (``()``: not a variant); ``key`` is where it is stored."""

    __slots__ = (
        "body",
        "head",
        "key",
        "path",
        "primary",
        "revalidation",
        "sie",
        "site",
        "size",
        "status",
        "stored_at",
        "swr",
        "tags",
        "ttl",
        "validators",
        "vary",
    )

    def __init__(self, key: bytes, site: str, path: str, status: int, head: bytes, body: bytes,
                 *, ttl: float, swr: float, sie: float, stored_at: float | None = None,
                 vary: tuple[str, ...] = (), secondary: bytes = b"",
                 tags: tuple[str, ...] = (), validators: bytes = b"") -> None:
        self.primary = key
        self.key = key + b"\0\0" + secondary if vary else key
        self.site = site
        self.path = path
        self.status = status
        self.head = head
        self.body = body
        self.ttl = ttl
        self.swr = swr
        self.sie = sie
        self.vary = vary
        self.tags = tags
        self.validators = validators
        """The conditional fields that revalidate it (cacheflow.revalidation_fields)."""
        self.revalidation: Revalidation | None = None
        """The last 304 applied to it: see :class:`Revalidation`."""
        self.stored_at = time.time() if stored_at is None else stored_at
        self.size = len(head) + len(body) + len(self.key) + ENTRY_OVERHEAD


Waiter = Callable[["CacheEntry | None"], None]


class Flight:
    """A miss (or a revalidation) being fetched; other requests for the key wait here
    instead of going upstream.

    Waiters are called with the stored entry, or ``None`` when nothing was stored (then
    each waiter forwards its request itself). Waiters must not raise.
    """

    __slots__ = ("done", "waiters")

    def __init__(self) -> None:
        self.waiters: list[Waiter] = []
        self.done = False


class ContentCache:
    """Per-worker LRU bounded by ``max_bytes``. Not thread-safe (one event loop).

    ``evictions`` (dropped for room) and ``invalidations`` (dropped by an unsafe method, a
    purge or a change of variance) count entries, for the metrics."""

    def __init__(self, max_bytes: int, *, max_object_bytes: int | None = None) -> None:
        self.max_bytes = max_bytes
        self.max_object_bytes = max_object_bytes if max_object_bytes is not None else max_bytes // 8
        self.size = 0
        self.evictions = 0
        self.invalidations = 0
        self._entries: OrderedDict[bytes, CacheEntry] = OrderedDict()
        self._by_site: dict[str, dict[bytes, None]] = {}
        self._by_url: dict[bytes, dict[bytes, None]] = {}
        self._by_tag: dict[tuple[str, str], dict[bytes, None]] = {}
        self._variants: dict[bytes, dict[bytes, None]] = {}
        """primary key → its variants' keys, least recently stored first."""
        self._flights: dict[bytes, Flight] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def entries(self) -> list[CacheEntry]:
        """Every entry, least recently used first (for tests and the admin view)."""
        return list(self._entries.values())

    def get(self, key: bytes) -> CacheEntry | None:
        """The response stored without Vary under primary ``key``."""
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def get_identity(self, key: bytes) -> CacheEntry | None:
        """A response stored for the same URL under another encoding variant whose content
        is not encoded (no Content-Encoding): usable for any request. Browsers send
        ``Accept-Encoding: identity`` with Range requests (Fetch standard), so the full
        response a normal request stored is found for them."""
        parts = key.split(b"\0", 3)
        if len(parts) != 4:
            return None
        for variant in _ENCODINGS:
            if variant != parts[2]:
                entry = self._entries.get(b"\0".join((parts[0], parts[1], variant, parts[3])))
                if entry is not None and b"\r\ncontent-encoding:" not in entry.head.lower():
                    self._entries.move_to_end(entry.key)
                    return entry
        return None

    def has_variants(self, key: bytes) -> bool:
        return key in self._variants

    def select(self, key: bytes, request: Mapping[str, str]) -> CacheEntry | None:
        """The variant of primary ``key`` whose Vary fields this request repeats (RFC 9111
        §4.1); the most recently stored one when several match. ``request``: lowercase
        field names → values."""
        keys = self._variants.get(key)
        if not keys:
            return None
        for variant_key in reversed(keys):
            entry = self._entries[variant_key]
            if entry.key == key + b"\0\0" + secondary_key(entry.vary, request):
                self._entries.move_to_end(variant_key)
                return entry
        return None

    def put(self, entry: CacheEntry) -> bool:
        """Store ``entry`` (replacing one with the same key); False when it is too big."""
        if entry.size > self.max_object_bytes or entry.size > self.max_bytes:
            return False
        primary = entry.primary
        if entry.vary:
            if primary in self._entries:
                self._drop(primary, counter="invalidations")
            variants = self._variants.get(primary)
            if variants is not None and entry.key not in variants and len(variants) >= MAX_VARIANTS:
                self._drop(next(iter(variants)), counter="evictions")
        elif primary in self._variants:
            for key in list(self._variants[primary]):
                self._drop(key, counter="invalidations")
        self.remove(entry.key)
        key = entry.key
        self._entries[key] = entry
        self._by_site.setdefault(entry.site, {})[key] = None
        self._by_url.setdefault(url_key(primary), {})[key] = None
        for tag in entry.tags:
            self._by_tag.setdefault((entry.site, tag), {})[key] = None
        if entry.vary:
            self._variants.setdefault(primary, {})[key] = None
        self.size += entry.size
        while self.size > self.max_bytes and self._entries:
            self._drop(next(iter(self._entries)), counter="evictions")
        return True

    def update(self, entry: CacheEntry, head: bytes, *, ttl: float, swr: float, sie: float,
               stored_at: float, tags: tuple[str, ...], validators: bytes) -> bool:
        """Give a stored entry a new head and freshness in place (a 304 updated it; same key,
        same content). False when ``entry`` is no longer the one stored under its key."""
        key = entry.key
        if self._entries.get(key) is not entry:
            return False
        if tags != entry.tags:
            for tag in entry.tags:
                self._unindex(self._by_tag, (entry.site, tag), key)
            for tag in tags:
                self._by_tag.setdefault((entry.site, tag), {})[key] = None
            entry.tags = tags
        grown = len(head) - len(entry.head)
        entry.head, entry.ttl, entry.swr, entry.sie = head, ttl, swr, sie
        entry.stored_at, entry.validators = stored_at, validators
        entry.size += grown
        self.size += grown
        self._entries.move_to_end(key)
        while self.size > self.max_bytes and len(self._entries) > 1:
            self._drop(next(iter(self._entries)), counter="evictions")
        return True

    def _drop(self, key: bytes, *, counter: str) -> None:
        if key in self._entries:
            setattr(self, counter, getattr(self, counter) + 1)
            self.remove(key)

    @staticmethod
    def _unindex(index: dict[_K, dict[bytes, None]], name: _K, key: bytes) -> None:
        keys = index.get(name)
        if keys is not None:
            keys.pop(key, None)
            if not keys:
                del index[name]

    def remove(self, key: bytes) -> None:
        entry = self._entries.pop(key, None)
        if entry is None:
            return
        self.size -= entry.size
        self._unindex(self._by_site, entry.site, key)
        self._unindex(self._by_url, url_key(entry.primary), key)
        for tag in entry.tags:
            self._unindex(self._by_tag, (entry.site, tag), key)
        if entry.vary:
            self._unindex(self._variants, entry.primary, key)

    def _drop_all(self, keys: Iterable[bytes]) -> int:
        doomed = list(keys)
        for key in doomed:
            self._drop(key, counter="invalidations")
        return len(doomed)

    def purge(self, site: str, path_prefix: str = "") -> int:
        """Drop the objects stored for ``site`` (a site hostname, ``*.x`` for a wildcard
        site) whose path starts with ``path_prefix``; returns how many."""
        keys = self._by_site.get(site)
        if not keys:
            return 0
        return self._drop_all(k for k in list(keys) if self._entries[k].path.startswith(path_prefix))

    def purge_url(self, url: bytes) -> int:
        """Drop every scheme, encoding and variant stored for ``url`` (:func:`url_key`:
        host NUL target); returns how many."""
        return self._drop_all(self._by_url.get(url, ()))

    def purge_tag(self, site: str, tag: str) -> int:
        """Drop ``site``'s objects tagged ``tag``; returns how many."""
        return self._drop_all(self._by_tag.get((site, tag), ()))

    def clear(self) -> None:
        self._entries.clear()
        self._by_site.clear()
        self._by_url.clear()
        self._by_tag.clear()
        self._variants.clear()
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

