"""Metric definitions and the cheap export of the cache's plain counters."""

from __future__ import annotations

from prometheus_client import REGISTRY

from edge import metrics
from edge.admin import render_metrics


def sample(name: str, **labels: str) -> float:
    value = REGISTRY.get_sample_value(name, labels)
    return 0.0 if value is None else value


def test_exporter_adds_deltas_only() -> None:
    exporter = metrics.DirectoryExporter()
    base_hit = sample("edge_directory_lookups_total", kind="tkind", outcome="hit")
    base_miss = sample("edge_directory_lookups_total", kind="tkind", outcome="miss")
    stats = {"tkind": {"hits": 5, "negative_hits": 1, "misses": 2, "loads": 2, "stale": 0,
                       "errors": 0, "evictions": 0, "entries": 7}}
    exporter.export(stats)
    exporter.export(stats)  # nothing changed: nothing added
    assert sample("edge_directory_lookups_total", kind="tkind", outcome="hit") == base_hit + 5
    assert sample("edge_directory_lookups_total", kind="tkind", outcome="miss") == base_miss + 2
    assert sample("edge_directory_cache_entries", kind="tkind") == 7
    # Series exist at zero from the first export.
    assert REGISTRY.get_sample_value("edge_directory_lookups_total",
                                     {"kind": "tkind", "outcome": "error"}) is not None
    stats["tkind"] = {**stats["tkind"], "hits": 9, "entries": 3}
    exporter.export(stats)
    assert sample("edge_directory_lookups_total", kind="tkind", outcome="hit") == base_hit + 9
    assert sample("edge_directory_cache_entries", kind="tkind") == 3


def test_feed_gauges() -> None:
    metrics.export_feed(True, 100.0, now=102.5)
    assert sample("edge_change_feed_healthy") == 1
    assert sample("edge_change_feed_lag_seconds") == 2.5
    metrics.export_feed(False, 0.0, now=5.0)
    assert sample("edge_change_feed_healthy") == 0
    assert sample("edge_change_feed_lag_seconds") == 0


def test_names() -> None:
    names = {m._name for m in (metrics.DIRECTORY_LOOKUPS, metrics.DIRECTORY_CACHE_ENTRIES,
                               metrics.CHANGE_FEED_LAG, metrics.CHANGE_FEED_HEALTHY,
                               metrics.CONNECTIONS, metrics.ACTIVE_SESSIONS, metrics.BYTES,
                               metrics.WORKER_UP)}
    assert names == {"edge_directory_lookups", "edge_directory_cache_entries",
                     "edge_change_feed_lag_seconds", "edge_change_feed_healthy",
                     "edge_connections", "edge_active_sessions", "edge_bytes", "edge_worker_up"}


def test_render_without_multiprocess_dir_has_expected_workers(tmp_path: object) -> None:
    body = render_metrics(str(tmp_path), expected_workers=3).decode()
    assert "edge_workers_expected 3.0" in body


def test_shipped_alert_rules_use_only_exported_metrics() -> None:
    """An alert on a metric name we never export would silently never fire."""
    import re
    from pathlib import Path

    import edge.metrics
    from edge.admin import render_metrics

    exported = set()
    for collector in list(edge.metrics.__dict__.values()):
        describe = getattr(collector, "describe", None)
        if callable(describe) and hasattr(collector, "_name"):
            for family in describe():
                exported.add(family.name)
                exported.update(sample.name for sample in family.samples)
                if family.type == "counter":
                    exported.add(family.name + "_total")
    # The master adds its own families to the exposition.
    exposition = render_metrics(expected_workers=1, directory_up=True).decode()
    exported.update(re.findall(r"^# TYPE (\S+)", exposition, re.MULTILINE))
    rules = (Path(__file__).resolve().parent.parent / "config" / "prometheus" /
             "edge-alerts.yml").read_text()
    used = set(re.findall(r"\b(edge_[a-z_]+)\b", rules))
    assert used, "no metrics referenced"
    assert used <= exported, used - exported
