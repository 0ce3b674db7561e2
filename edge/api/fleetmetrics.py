"""What the console shows live about this machine's ``edge serve``: one scrape of its admin
listener's ``/metrics`` (the same numbers Prometheus gets), summarised.

Counters are totals since the edge started; rates over time windows are Prometheus's job
(the dashboards), not the console's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

SCRAPE_TIMEOUT = 1.5
"""Seconds the console waits for the edge's /metrics before showing the page without it."""


@dataclass
class LocalMetrics:
    workers: int = 0
    active_sessions: dict[str, int] = field(default_factory=dict)
    http_requests: float = 0
    http_5xx: float = 0
    ssh_logins: float = 0
    ssh_edge_failures: float = 0
    """Logins the edge failed (directory or backend unavailable), not users' wrong passwords."""
    ftp_logins: float = 0
    ftp_unavailable: float = 0

    @staticmethod
    def ratio_text(part: float, whole: float) -> str:
        return "-" if whole == 0 else f"{part / whole:.1%}"


_SSH_EDGE_FAILURES = ("unavailable", "upstream_error")


def summarise(text: str) -> LocalMetrics:
    """The console's numbers from a Prometheus text exposition."""
    out = LocalMetrics()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels, value = sample.labels, sample.value
            name = sample.name
            if name == "edge_worker_up":
                out.workers = int(value)
            elif name == "edge_active_sessions":
                out.active_sessions[labels.get("proxy", "?")] = int(value)
            elif name == "edge_http_requests_total":
                out.http_requests += value
                out.http_5xx += value if labels.get("status_class") == "5xx" else 0
            elif name == "edge_ssh_logins_total":
                out.ssh_logins += value
                out.ssh_edge_failures += value if labels.get("outcome") in _SSH_EDGE_FAILURES else 0
            elif name == "edge_ftp_logins_total":
                out.ftp_logins += value
                out.ftp_unavailable += value if labels.get("result") == "unavailable" else 0
    return out


async def scrape_local_edge(url: str) -> LocalMetrics | None:
    """One scrape of ``url``; ``None`` when no edge answers there (or ``url`` is empty)."""
    if not url:
        return None
    try:
        timeout = aiohttp.ClientTimeout(total=SCRAPE_TIMEOUT)
        async with aiohttp.ClientSession(timeout=timeout) as session, \
                session.get(url) as response:
            if response.status != 200:
                return None
            return summarise(await response.text())
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return None


__all__ = ["LocalMetrics", "scrape_local_edge", "summarise"]
