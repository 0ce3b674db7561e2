"""``edge status``: a one-screen summary computed from the admin listener's own metrics.

The master already adds up every worker's metrics for ``/metrics``; the status takes two such
readings ``window`` seconds apart and turns counters into rates. No new bookkeeping in the
workers' hot paths, and the numbers are the ones the dashboards show.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
"""(sample name, sorted labels) → value."""

_LISTENER_LOGINS = {"ssh": ("edge_ssh_logins_total", "outcome", "success"),
                    "ftp": ("edge_ftp_logins_total", "result", "ok")}


def parse_samples(text: str) -> Samples:
    """Every sample of a Prometheus text exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = float(sample.value)
    return samples


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum of ``name`` over every sample whose labels include ``labels``."""
    return sum(value for (sample, have), value in samples.items()
               if sample == name and all((k, v) in have for k, v in labels.items()))


def label_values(samples: Samples, name: str, label: str) -> set[str]:
    return {dict(have)[label] for (sample, have) in samples
            if sample == name and label in dict(have)}


@dataclass(frozen=True, slots=True)
class ListenerStatus:
    name: str
    active_sessions: int
    connections_per_s: float
    logins_per_s: float | None = None
    """SSH and FTP only: successful logins."""


@dataclass(frozen=True, slots=True)
class Status:
    workers_expected: int
    workers_up: int
    workers_problem: str
    database_up: bool
    database_problem: str
    lookup_latency_ms: float | None
    """Round trip of a directory query (``SELECT 1``) from the master: what a cache miss costs
    at least. Cache hits answer from memory."""
    stale_serving: bool
    """A worker's circuit breaker is open: answers come from memory, stale if need be."""
    last_success_age_s: float
    change_feed_lag_s: float
    change_feed_healthy: bool
    cache_hit_ratio: float | None
    """Over the window (``None``: no lookups in it)."""
    cache_hit_ratio_total: float | None
    window_s: float
    http_requests_per_s: float
    """HTTP and HTTPS together: both listeners share one engine and one request counter."""
    listeners: list[ListenerStatus] = field(default_factory=list)


def _rate(before: Samples, after: Samples, window: float, name: str, **labels: str) -> float:
    delta = total(after, name, **labels) - total(before, name, **labels)
    return max(0.0, delta) / window if window > 0 else 0.0


def _hit_ratio(before: Samples | None, after: Samples) -> float | None:
    def counts(samples: Samples | None, outcomes: tuple[str, ...]) -> float:
        if samples is None:
            return 0.0
        return sum(total(samples, "edge_directory_lookups_total", outcome=o) for o in outcomes)

    hits = ("hit", "negative_hit")
    everything = (*hits, "miss", "stale", "error")
    all_ = counts(after, everything) - counts(before, everything)
    return None if all_ <= 0 else (counts(after, hits) - counts(before, hits)) / all_


def summarize(before: Samples, after: Samples, window: float, *, listeners: list[str],
              workers_problem: str | None, database_problem: str | None,
              lookup_latency_ms: float | None) -> Status:
    """The status from two metric readings ``window`` seconds apart."""
    rows = []
    for name in listeners:
        logins = _LISTENER_LOGINS.get(name)
        rows.append(ListenerStatus(
            name=name,
            active_sessions=int(total(after, "edge_active_sessions", proxy=name)),
            connections_per_s=_rate(before, after, window, "edge_connections_total", proxy=name),
            logins_per_s=(_rate(before, after, window, logins[0], **{logins[1]: logins[2]})
                          if logins else None)))
    return Status(
        workers_expected=int(total(after, "edge_workers_expected")),
        workers_up=int(total(after, "edge_worker_up")),
        workers_problem=workers_problem or "",
        database_up=database_problem is None,
        database_problem=database_problem or "",
        lookup_latency_ms=lookup_latency_ms,
        stale_serving=total(after, "edge_directory_breaker_open") > 0,
        last_success_age_s=total(after, "edge_directory_last_success_age_seconds"),
        change_feed_lag_s=total(after, "edge_change_feed_lag_seconds"),
        change_feed_healthy=total(after, "edge_change_feed_healthy") > 0,
        cache_hit_ratio=_hit_ratio(before, after),
        cache_hit_ratio_total=_hit_ratio(None, after),
        window_s=window,
        http_requests_per_s=_rate(before, after, window, "edge_http_requests_total"),
        listeners=rows)


def render(status: Mapping[str, Any]) -> str:
    """The text form of ``edge status`` (from the JSON the admin listener returns)."""
    def pct(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.1f}%"

    def num(value: float | None, unit: str = "") -> str:
        return "-" if value is None else f"{value:.1f}{unit}"

    lines = [
        f"workers:        {status['workers_up']}/{status['workers_expected']} up"
        + (f" ({status['workers_problem']})" if status["workers_problem"] else ""),
        "database:       " + ("up" if status["database_up"] else
                              f"DOWN ({status['database_problem']})")
        + (", serving stale answers from memory" if status["stale_serving"] else ""),
        f"lookup latency: {num(status['lookup_latency_ms'], ' ms')} (database round trip; "
        "cache hits answer from memory)",
        f"change feed:    lag {status['change_feed_lag_s']:.1f} s"
        + ("" if status["change_feed_healthy"] else ", NOT reaching the directory"),
        f"cache hits:     {pct(status['cache_hit_ratio'])} over {status['window_s']:g} s, "
        f"{pct(status['cache_hit_ratio_total'])} since start",
        f"http requests:  {num(status['http_requests_per_s'], '/s')} (http and https)",
        "",
        f"{'LISTENER':<10}{'SESSIONS':>10}{'CONN/S':>10}{'LOGINS/S':>10}",
    ]
    for row in status["listeners"]:
        lines.append(f"{row['name']:<10}{row['active_sessions']:>10}"
                     f"{num(row['connections_per_s']):>10}{num(row['logins_per_s']):>10}")
    return "\n".join(lines)


__all__ = ["ListenerStatus", "Samples", "Status", "parse_samples", "render", "summarize", "total"]
