"""config/prometheus and config/grafana against the real tools and the metrics we export.

``promtool check rules`` and ``promtool test rules`` (Debian's prometheus package) run on the
alert and SLO rules; every PromQL expression in the rules and the Grafana dashboard may use
only metrics and labels the edge exports (or the rules record).
"""

from __future__ import annotations

import importlib
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client import REGISTRY

from tests.conftest import IN_CI

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS = ROOT / "config" / "prometheus"
DASHBOARD = ROOT / "config" / "grafana" / "edge-dashboard.json"
PROMTOOL = shutil.which("promtool")
METRIC_MODULES = ("edge.metrics", "httpproxy.metrics", "httpproxy.tls_metrics",
                  "sshproxy.metrics", "ftpproxy.metrics")
MASTER_ONLY = {"edge_workers_expected": set(), "edge_directory_up": set()}
"""Gauges the admin listener adds at scrape time (edge.admin.render_metrics)."""
ALWAYS = {"instance", "job"}
_FUNCS_AND_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or",
                    "unless", "bool", "offset"}


def promtool() -> str:
    if PROMTOOL is None:
        if IN_CI:
            pytest.fail("promtool not installed (Debian package prometheus)")
        pytest.skip("promtool not installed")
    return PROMTOOL


def exported() -> dict[str, set[str]]:
    """Every series name the edge exports → its label names."""
    for module in METRIC_MODULES:
        importlib.import_module(module)
    names: dict[str, set[str]] = {k: set(v) for k, v in MASTER_ONLY.items()}
    # prometheus_client has no public listing of collectors with their label names.
    for collector in list(REGISTRY._collector_to_names):
        for family in collector.describe() if hasattr(collector, "describe") else []:
            if not family.name.startswith("edge_"):
                continue
            labels = set(getattr(collector, "_labelnames", ()))
            suffixes = {"counter": ["_total", "_created"], "histogram": ["_bucket", "_count",
                        "_sum", "_created"], "gauge": [""]}.get(family.type, [""])
            for suffix in suffixes:
                names[family.name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    return names


def rule_files() -> list[Path]:
    return sorted(p for p in PROMETHEUS.glob("*.yml") if not p.name.endswith(".test.yml"))


def recorded() -> dict[str, set[str]]:
    names: dict[str, set[str]] = {}
    for path in rule_files():
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                if "record" in rule:
                    names.setdefault(rule["record"], set()).update(rule.get("labels", {}))
    return names


def expressions() -> list[tuple[str, str]]:
    found = []
    for path in rule_files():
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                found.append((f"{path.name}: {rule.get('record') or rule.get('alert')}", rule["expr"]))
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel.get("targets", []):
            found.append((f"dashboard: {panel['title']}", target["expr"]))
    return found


_MATCHERS = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)?\s*\{([^}]*)\}")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")


def check(expr: str, known: dict[str, set[str]]) -> list[str]:
    """What in ``expr`` names a metric or a label the edge does not export."""
    problems = []
    text = re.sub(r'"[^"]*"', '""', expr)
    used: set[str] = set()
    for match in _MATCHERS.finditer(text):
        name, body = match.group(1), match.group(2)
        for label in re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)", body):
            if name and name in known and label not in known[name] | ALWAYS:
                problems.append(f"{name} has no label {label}")
    bare = _MATCHERS.sub(lambda m: m.group(1) or "", text)
    grouped = set()
    for match in _GROUPING.finditer(bare):
        grouped |= {g.strip() for g in match.group(1).split(",") if g.strip()}
    bare = _GROUPING.sub("", bare)
    bare = re.sub(r"\[[^\]]*\]", "", bare)
    for token in re.finditer(r"(?<![\w.:])([a-zA-Z_:][a-zA-Z0-9_:]*)(?![\w:])(?!\s*\()", bare):
        name = token.group(1)
        if name in _FUNCS_AND_WORDS or name.startswith("$"):
            continue
        if name not in known:
            problems.append(f"unknown metric {name}")
        used.add(name)
    labels = set().union(*(known.get(n, set()) for n in used)) | ALWAYS
    problems += [f"grouping by {g}, a label none of {sorted(used)} has" for g in grouped - labels]
    return problems


def test_every_query_uses_only_exported_metrics_and_labels() -> None:
    known = exported() | recorded()
    assert "edge_http_edge_errors_total" in known and "edge_ssh_logins_total" in known
    problems = [f"{where}: {p}" for where, expr in expressions() for p in check(expr, known)]
    assert problems == []


def test_the_checker_catches_a_wrong_name_and_a_wrong_label() -> None:
    known = exported() | recorded()
    assert check('sum(rate(edge_http_request_total[5m]))', known) == [
        "unknown metric edge_http_request_total"]
    assert check('sum by (direction) (rate(edge_ftp_transfers_total[5m]))', known)
    assert check('rate(edge_ftp_logins_total{outcome="ok"}[5m])', known)


def test_promtool_checks_the_rules() -> None:
    result = subprocess.run([promtool(), "check", "rules", *map(str, rule_files())],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_of_the_slo_alerts() -> None:
    """Fast and slow burns page and ticket; user-caused failures and a backend's own 5xx
    do not spend the edge's budget (config/prometheus/edge-slo.test.yml)."""
    result = subprocess.run([promtool(), "test", "rules", "edge-slo.test.yml"], cwd=PROMETHEUS,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_queries_parse_with_promtool(tmp_path: Path) -> None:
    """Each dashboard query through Prometheus's own parser (as a recording rule)."""
    rules = [{"record": f"dashboard:query_{n}", "expr": expr.replace("$instance", ".*")}
             for n, (where, expr) in enumerate(expressions()) if where.startswith("dashboard")]
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run([promtool(), "check", "rules", str(path)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
