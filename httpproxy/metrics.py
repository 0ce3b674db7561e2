"""Prometheus metrics of the HTTP proxy (``edge_http_*``).

The request path never calls prometheus_client: the engine counts in plain ints
(:class:`LocalStats`) and :meth:`LocalStats.export` adds the deltas once a second, the same
way :class:`edge.metrics.DirectoryExporter` does for lookups.
"""

from __future__ import annotations

from bisect import bisect_left

from prometheus_client import Counter, Gauge, Histogram

from edge.metrics import BYTES

__all__ = ["BUCKETS", "CACHE_BYTES", "CACHE_EVENTS", "CACHE_EVENT_NAMES", "CACHE_RESULTS",
           "CONNECTIONS_REFUSED", "EDGE_ERRORS", "H2_CONNECTIONS", "H2_REFUSED", "H2_STREAMS",
           "LATENCY", "LOOKUPS", "REQUESTS", "LocalHistogram", "LocalStats"]

REQUESTS = Counter("edge_http_requests", "HTTP requests answered, by status class (2xx...).",
                   ["status_class"])
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
LATENCY = Histogram("edge_http_request_duration_seconds",
                    "Seconds from the complete request head to the end of the response.",
                    buckets=BUCKETS)
CACHE_RESULTS = Counter("edge_http_cache_results",
                        "Content-cache results (X-Cache): HIT, MISS, STALE, REVALIDATED, BYPASS.", ["result"])
LOOKUPS = Counter("edge_http_site_lookups",
                  "Site lookups per request: cached (no I/O), loaded (awaited the directory), "
                  "unknown (404), error (directory unreachable).", ["outcome"])
CONNECTIONS_REFUSED = Counter("edge_http_connections_refused",
                              "Client connections turned away before any request was read: "
                              "per_ip_cap (over [http] max_connections_per_ip).", ["reason"])
H2_CONNECTIONS = Counter("edge_http2_connections", "Client connections that spoke HTTP/2.")
H2_STREAMS = Counter("edge_http2_requests",
                     "Requests answered over HTTP/2 (added when their connection closes).")
H2_REFUSED = Counter("edge_http2_refused",
                     "HTTP/2 connections ended or streams refused by a defence: flood (a rate or "
                     "size limit: rapid reset, CONTINUATION, SETTINGS/PING/empty frames), protocol "
                     "(a protocol error), malformed (a request refused with RST_STREAM).",
                     ["reason"])
CACHE_EVENT_NAMES = ("revalidations", "revalidated", "not_modified", "partial", "unsatisfiable",
                     "evictions", "invalidations", "invalidated_urls", "publish_failures")
CACHE_EVENTS = Counter(
    "edge_http_cache_events",
    "Content-cache events: revalidations (conditional requests sent to origins), revalidated "
    "(origin answered 304), not_modified (304 answered to clients from the cache), partial "
    "(206 from the cache), unsatisfiable (416 from the cache), evictions (dropped for room), "
    "invalidations (dropped by an unsafe method, a purge or a change of Vary), "
    "invalidated_urls (URLs an unsafe method invalidated), publish_failures (invalidations "
    "the change feed did not get).", ["event"])
EDGE_ERRORS = Counter("edge_http_edge_errors",
                      "5xx responses the edge answered itself (a backend's own 5xx is not "
                      "counted): the HTTP availability SLI's errors.", ["status"])
CACHE_BYTES = Gauge("edge_http_cache_bytes", "Bytes held by the content cache, summed over workers.",
                    multiprocess_mode="livesum")


class LocalHistogram:
    """A Prometheus histogram observed in plain numbers; :meth:`export` adds what changed.

    prometheus_client has no bulk observe, so :meth:`export` adds the deltas to the
    histogram's own per-bucket values and sum (``_upper_bounds``, ``_buckets``, ``_sum``: its
    structure since 0.4, checked against the installed 0.26; this keeps multiprocess mode
    working). With a prometheus_client that lacks them, every value is observed directly.
    """

    __slots__ = ("_bounds", "_buckets", "_direct", "_histogram", "_sent", "_sent_sum", "_sum",
                 "counts", "sum")

    def __init__(self, histogram: Histogram) -> None:
        self._histogram = histogram
        bounds = getattr(histogram, "_upper_bounds", None)
        buckets = getattr(histogram, "_buckets", None)
        total = getattr(histogram, "_sum", None)
        self._direct = not (isinstance(bounds, list) and isinstance(buckets, list)
                            and len(bounds) == len(buckets) and bounds and total is not None)
        self._bounds: tuple[float, ...] = () if self._direct else tuple(bounds)  # type: ignore[arg-type]
        self._buckets = buckets
        self._sum = total
        self.counts = [0] * len(self._bounds)
        """Observations per bucket, not cumulative (index = first bound >= the value)."""
        self.sum = 0.0
        self._sent = [0] * len(self._bounds)
        self._sent_sum = 0.0

    def observe(self, value: float) -> None:
        if self._direct:
            self._histogram.observe(value)
            return
        self.sum += value
        # The last bound is +Inf, so the index is always in range (Histogram.observe picks the
        # same bucket: the first whose bound is >= the value).
        self.counts[bisect_left(self._bounds, value)] += 1

    def export(self) -> None:
        """Add the observations since the last call to the Prometheus histogram."""
        if self._direct:
            return
        assert self._buckets is not None and self._sum is not None
        for i, count in enumerate(self.counts):
            if count != self._sent[i]:
                self._buckets[i].inc(count - self._sent[i])
                self._sent[i] = count
        if self.sum != self._sent_sum:
            self._sum.inc(self.sum - self._sent_sum)
            self._sent_sum = self.sum


class LocalStats:
    """Plain counters the hot path increments; :meth:`export` publishes them."""

    __slots__ = ("_sent", "cache", "cache_events", "edge_errors", "latency", "lookups", "refused",
                 "status", "traffic")

    def __init__(self) -> None:
        self.status = [0] * 6  # index: status // 100
        self.latency = LocalHistogram(LATENCY)
        self.cache: dict[str, int] = {"HIT": 0, "MISS": 0, "STALE": 0, "BYPASS": 0,
                                      "REVALIDATED": 0}
        self.cache_events: dict[str, int] = dict.fromkeys(CACHE_EVENT_NAMES, 0)
        self.lookups: dict[str, int] = {"cached": 0, "loaded": 0, "unknown": 0, "error": 0}
        self.refused: dict[str, int] = {"per_ip_cap": 0}
        self.edge_errors: dict[int, int] = {}
        """Status → 5xx answers the edge made itself (its own error pages)."""
        self.traffic: dict[str, list[int]] = {"http": [0, 0], "https": [0, 0]}
        """proxy → [downstream bytes, upstream bytes], exported to ``edge_bytes`` (edge.metrics);
        a connection keeps its proxy's list so counting costs two list additions."""
        self._sent: dict[str, float] = {}

    def observe(self, status: int, seconds: float) -> None:
        self.status[min(status // 100, 5)] += 1
        self.latency.observe(seconds)

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
        for name, value in self.cache_events.items():
            delta = self._delta("e" + name, value)
            if delta > 0:
                CACHE_EVENTS.labels(event=name).inc(delta)
        for name, value in self.lookups.items():
            delta = self._delta("l" + name, value)
            if delta:
                LOOKUPS.labels(outcome=name).inc(delta)
        for name, value in self.refused.items():
            delta = self._delta("r" + name, value)
            if delta:
                CONNECTIONS_REFUSED.labels(reason=name).inc(delta)
        for status, value in self.edge_errors.items():
            delta = self._delta(f"e{status}", value)
            if delta:
                EDGE_ERRORS.labels(status=str(status)).inc(delta)
        self.latency.export()
        for proxy, counts in self.traffic.items():
            for direction, value in zip(("downstream", "upstream"), counts, strict=True):
                delta = self._delta(f"y{proxy}{direction}", value)
                if delta:
                    BYTES.labels(proxy=proxy, direction=direction).inc(delta)
        CACHE_BYTES.set(cache_bytes)
