"""Prometheus metrics of the HTTP proxy (``edge_http_*``).

The request path never calls prometheus_client: the engine counts in plain ints
(:class:`LocalStats`) and :meth:`LocalStats.export` adds the deltas once a second, the same
way :class:`edge.metrics.DirectoryExporter` does for lookups.
"""

from __future__ import annotations

from bisect import bisect_left

from prometheus_client import Counter, Gauge, Histogram

from edge.metrics import BYTES

__all__ = ["BUCKETS", "CACHE_BYTES", "CACHE_RESULTS", "LATENCY", "LOOKUPS", "REQUESTS",
           "LocalStats"]

REQUESTS = Counter("edge_http_requests", "HTTP requests answered, by status class (2xx...).",
                   ["status_class"])
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
LATENCY = Histogram("edge_http_request_duration_seconds",
                    "Seconds from the complete request head to the end of the response.",
                    buckets=BUCKETS)
CACHE_RESULTS = Counter("edge_http_cache_results",
                        "Content-cache results (X-Cache): HIT, MISS, STALE, BYPASS.", ["result"])
LOOKUPS = Counter("edge_http_site_lookups",
                  "Site lookups per request: cached (no I/O), loaded (awaited the directory), "
                  "unknown (404), error (directory unreachable).", ["outcome"])
CACHE_BYTES = Gauge("edge_http_cache_bytes", "Bytes held by the content cache, summed over workers.",
                    multiprocess_mode="livesum")


class LocalStats:
    """Plain counters the hot path increments; :meth:`export` publishes them."""

    __slots__ = ("_sent", "buckets", "cache", "latency_sum", "lookups", "status", "traffic")

    def __init__(self) -> None:
        self.status = [0] * 6  # index: status // 100
        self.buckets = [0] * (len(BUCKETS) + 1)  # non-cumulative; last = +Inf
        self.latency_sum = 0.0
        self.cache: dict[str, int] = {"HIT": 0, "MISS": 0, "STALE": 0, "BYPASS": 0}
        self.lookups: dict[str, int] = {"cached": 0, "loaded": 0, "unknown": 0, "error": 0}
        self.traffic: dict[str, list[int]] = {"http": [0, 0], "https": [0, 0]}
        """proxy → [downstream bytes, upstream bytes], exported to ``edge_bytes`` (edge.metrics);
        a connection keeps its proxy's list so counting costs two list additions."""
        self._sent: dict[str, float] = {}

    def observe(self, status: int, seconds: float) -> None:
        self.status[min(status // 100, 5)] += 1
        self.latency_sum += seconds
        self.buckets[bisect_left(BUCKETS, seconds)] += 1

    def _delta(self, key: str, value: float) -> float:
        previous = self._sent.get(key, 0)
        self._sent[key] = value
        return value - previous

    def export(self, cache_bytes: int) -> None:
        """Add what changed since the last call to the Prometheus metrics; never raises on 0."""
        for cls in range(1, 6):
            delta = self._delta(f"s{cls}", self.status[cls])
            if delta:
                REQUESTS.labels(status_class=f"{cls}xx").inc(delta)
        for name, value in self.cache.items():
            delta = self._delta("c" + name, value)
            if delta:
                CACHE_RESULTS.labels(result=name).inc(delta)
        for name, value in self.lookups.items():
            delta = self._delta("l" + name, value)
            if delta:
                LOOKUPS.labels(outcome=name).inc(delta)
        # prometheus_client has no bulk observe: add to the histogram's own bucket and sum
        # values (its documented structure since 0.4), which keeps multiprocess mode working.
        buckets = getattr(LATENCY, "_buckets", None)
        total = getattr(LATENCY, "_sum", None)
        if buckets is not None and total is not None:
            for i, value in enumerate(self.buckets):
                delta = self._delta(f"b{i}", value)
                if delta:
                    buckets[i].inc(delta)
            delta_sum = self._delta("sum", self.latency_sum)
            if delta_sum:
                total.inc(delta_sum)
        for proxy, counts in self.traffic.items():
            for direction, value in zip(("downstream", "upstream"), counts, strict=True):
                delta = self._delta(f"y{proxy}{direction}", value)
                if delta:
                    BYTES.labels(proxy=proxy, direction=direction).inc(delta)
        CACHE_BYTES.set(cache_bytes)
