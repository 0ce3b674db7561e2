"""``edge status`` arithmetic: counters from two readings of /metrics become rates and ratios."""

from __future__ import annotations

from dataclasses import asdict

from edge.status import parse_samples, render, summarize

BEFORE = """
# TYPE edge_http_requests counter
edge_http_requests_total{status_class="2xx"} 100
edge_http_requests_total{status_class="5xx"} 4
# TYPE edge_ssh_logins counter
edge_ssh_logins_total{method="publickey",outcome="success"} 10
edge_ssh_logins_total{method="password",outcome="failure"} 50
# TYPE edge_ftp_logins counter
edge_ftp_logins_total{result="ok"} 3
# TYPE edge_connections counter
edge_connections_total{proxy="ssh"} 60
# TYPE edge_directory_lookups counter
edge_directory_lookups_total{kind="site",outcome="hit"} 90
edge_directory_lookups_total{kind="site",outcome="miss"} 10
"""

AFTER = """
# TYPE edge_http_requests counter
edge_http_requests_total{status_class="2xx"} 300
edge_http_requests_total{status_class="5xx"} 4
# TYPE edge_ssh_logins counter
edge_ssh_logins_total{method="publickey",outcome="success"} 14
edge_ssh_logins_total{method="password",outcome="failure"} 90
# TYPE edge_ftp_logins counter
edge_ftp_logins_total{result="ok"} 3
# TYPE edge_connections counter
edge_connections_total{proxy="ssh"} 104
# TYPE edge_directory_lookups counter
edge_directory_lookups_total{kind="site",outcome="hit"} 189
edge_directory_lookups_total{kind="account",outcome="negative_hit"} 10
edge_directory_lookups_total{kind="site",outcome="miss"} 11
# TYPE edge_active_sessions gauge
edge_active_sessions{proxy="ssh"} 7
# TYPE edge_worker_up gauge
edge_worker_up 2
# TYPE edge_workers_expected gauge
edge_workers_expected 3
# TYPE edge_directory_breaker_open gauge
edge_directory_breaker_open 1
# TYPE edge_change_feed_lag_seconds gauge
edge_change_feed_lag_seconds 12.5
# TYPE edge_change_feed_healthy gauge
edge_change_feed_healthy 0
"""


def test_rates_ratios_and_states_from_two_readings() -> None:
    status = summarize(parse_samples(BEFORE), parse_samples(AFTER), 2.0,
                       listeners=["ftp", "ssh"], workers_problem="worker 2 not ready",
                       database_problem="directory unreachable: refused", lookup_latency_ms=None)
    assert status.http_requests_per_s == 100.0
    ssh = next(r for r in status.listeners if r.name == "ssh")
    ftp = next(r for r in status.listeners if r.name == "ftp")
    # Only successful logins count; failed guesses are not "logins".
    assert ssh.logins_per_s == 2.0 and ssh.connections_per_s == 22.0 and ssh.active_sessions == 7
    assert ftp.logins_per_s == 0.0
    # 99 hits + 10 negative hits of 110 lookups in the window; 189+10 of 210 since start.
    assert status.cache_hit_ratio == 109 / 110
    assert status.cache_hit_ratio_total == 199 / 210
    assert (status.workers_up, status.workers_expected) == (2, 3)
    assert not status.database_up and status.stale_serving and not status.change_feed_healthy
    text = render(asdict(status))
    assert "2/3 up (worker 2 not ready)" in text
    assert "DOWN (directory unreachable: refused), serving stale answers from memory" in text
    assert "NOT reaching the directory" in text


def test_no_lookups_in_the_window_is_no_ratio() -> None:
    same = parse_samples(AFTER)
    status = summarize(same, same, 1.0, listeners=[], workers_problem=None,
                       database_problem=None, lookup_latency_ms=0.4)
    assert status.cache_hit_ratio is None and status.database_up
