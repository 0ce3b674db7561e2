"""The Prometheus metrics of the whole project, defined once here.

``edge serve`` runs prometheus_client in multiprocess mode: the master sets
``PROMETHEUS_MULTIPROC_DIR`` to a fresh directory *before* this module is imported anywhere,
every worker writes its values to per-pid files there, and the admin listener in the master
adds them up (:func:`edge.admin.render_metrics`). Consequences for users of this module:

* counters are summed over all workers, dead ones included (no count is lost on restart);
* gauges say how they are combined (``multiprocess_mode``): ``livesum`` adds live workers,
  ``livemax``/``livemin`` take the extreme over live workers; a dead worker's gauges are
  dropped by the master (``mark_process_dead``).

Hot paths must not call prometheus per event: the lookup cache keeps plain int counters that
:class:`DirectoryExporter` copies here once a second; proxies count connections (one ``inc``
per connection) and bytes once per finished relay, not per chunk.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

from prometheus_client import Counter, Gauge, Histogram

DIRECTORY_LOOKUPS = Counter(
    "edge_directory_lookups", "Directory cache lookups by kind and outcome.",
    ["kind", "outcome"])
"""``outcome``: hit, negative_hit (cached "does not exist"), miss (loaded from the store),
stale (served past expiry while the store is unreachable), error (nothing to serve)."""

DIRECTORY_CACHE_ENTRIES = Gauge(
    "edge_directory_cache_entries", "Entries in the directory cache, summed over workers.",
    ["kind"], multiprocess_mode="livesum")

CHANGE_FEED_LAG = Gauge(
    "edge_change_feed_lag_seconds",
    "Seconds since the change feed last read the change log (worst live worker).",
    multiprocess_mode="livemax")

CHANGE_FEED_HEALTHY = Gauge(
    "edge_change_feed_healthy",
    "1 if every live worker's change feed reached the directory on its last poll, else 0.",
    multiprocess_mode="livemin")

DIRECTORY_BREAKER_OPEN = Gauge(
    "edge_directory_breaker_open",
    "1 if any live worker's directory circuit breaker is open (database failed; answers are "
    "served from memory, stale if need be, until a probe reaches it), else 0.",
    multiprocess_mode="livemax")

DIRECTORY_LAST_SUCCESS_AGE = Gauge(
    "edge_directory_last_success_age_seconds",
    "Seconds since a query last reached the directory database (worst live worker; 0 before "
    "the first).", multiprocess_mode="livemax")

DIRECTORY_READ_SOURCE = Gauge(
    "edge_directory_read_source",
    "1 for the database live workers read lookups and the change feed from: primary, or "
    "replica ([database] replica_url); both 1 while workers disagree.", ["source"],
    multiprocess_mode="livemax")

CONNECTIONS = Counter(
    "edge_connections", "Client connections accepted, by proxy.", ["proxy"])

ACTIVE_SESSIONS = Gauge(
    "edge_active_sessions", "Sessions open now, by proxy, summed over workers.", ["proxy"],
    multiprocess_mode="livesum")

BYTES = Counter(
    "edge_bytes", "Bytes relayed, by proxy and direction (upstream: client to backend, "
    "downstream: backend to client).", ["proxy", "direction"])

WORKER_UP = Gauge(
    "edge_worker_up", "Worker processes serving (each live worker contributes 1).",
    multiprocess_mode="livesum")

# CacheStats field → ``outcome`` label. ``loads`` and ``evictions`` are not lookups.
_OUTCOMES: Mapping[str, str] = {"hits": "hit", "negative_hits": "negative_hit", "misses": "miss",
                                "stale": "stale", "errors": "error"}


class DirectoryExporter:
    """Copies :meth:`Directory.stats` into the counters above as deltas since the last call."""

    def __init__(self) -> None:
        self._last: dict[tuple[str, str], int] = {}

    def export(self, stats: Mapping[str, Mapping[str, int]]) -> None:
        """Add what changed since the previous call; returns nothing, never raises on zeros."""
        for kind, counters in stats.items():
            for field, outcome in _OUTCOMES.items():
                value = counters.get(field, 0)
                previous = self._last.get((kind, field), 0)
                # A cleared cache keeps its counters, but be safe if one ever goes backwards.
                delta = value - previous if value >= previous else value
                if delta:
                    DIRECTORY_LOOKUPS.labels(kind=kind, outcome=outcome).inc(delta)
                elif (kind, field) not in self._last:
                    # Create the series at 0 so dashboards see every kind from the start.
                    DIRECTORY_LOOKUPS.labels(kind=kind, outcome=outcome)
                self._last[(kind, field)] = value
            DIRECTORY_CACHE_ENTRIES.labels(kind=kind).set(counters.get("entries", 0))


def export_feed(healthy: bool, last_poll: float, now: float | None = None) -> None:
    """Set the change-feed gauges; ``last_poll`` is a ``time.time()`` (0: never polled)."""
    now = time.time() if now is None else now
    CHANGE_FEED_HEALTHY.set(1 if healthy else 0)
    CHANGE_FEED_LAG.set(max(0.0, now - last_poll) if last_poll else 0.0)


def export_breaker(is_open: bool, seconds_since_success: float) -> None:
    """Set the circuit-breaker gauges (see :class:`edge.directory.breaker.Breaker`)."""
    DIRECTORY_BREAKER_OPEN.set(1 if is_open else 0)
    DIRECTORY_LAST_SUCCESS_AGE.set(seconds_since_success)


def export_read_source(source: str) -> None:
    """Set ``edge_directory_read_source`` (see :mod:`edge.directory.replica`)."""
    for name in ("primary", "replica"):
        DIRECTORY_READ_SOURCE.labels(source=name).set(1 if name == source else 0)


__all__ = ["ACTIVE_SESSIONS", "BYTES", "CHANGE_FEED_HEALTHY", "CHANGE_FEED_LAG", "CONNECTIONS",
           "DIRECTORY_BREAKER_OPEN", "DIRECTORY_CACHE_ENTRIES", "DIRECTORY_LAST_SUCCESS_AGE",
           "DIRECTORY_LOOKUPS", "DIRECTORY_READ_SOURCE", "WORKER_UP", "DirectoryExporter",
           "export_breaker", "export_feed", "export_read_source"]



ACME_ORDERS = Counter(
    "edge_acme_orders", "ACME orders by outcome.", ["outcome"])
"""``outcome``: issued, validation (the CA could not validate), rejected (the CA refused),
rate_limited, unreachable (CA down), timeout, account_backoff (no CA usable now),
no_account, install_failed."""

ACME_ORDER_SECONDS = Histogram(
    "edge_acme_order_seconds", "Seconds from new order to certificate, successful orders.",
    buckets=(1, 2, 5, 10, 20, 30, 60, 120, 300))

ACME_NAMES = Gauge(
    "edge_acme_names", "Names with automatic certificates, by state (pending, valid, failing).",
    ["state"], multiprocess_mode="livemax")

ACME_ACCOUNT_BACKOFF = Gauge(
    "edge_acme_account_backoff_seconds",
    "Seconds until an ACME account (CA) is tried again after a CA-wide failure or rate limit.",
    ["account"], multiprocess_mode="livemax")
