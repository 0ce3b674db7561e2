"""The load-test harness keeps working: `python -m benchmarks --quick all --plot` (with even
smaller counts through --set) runs every scenario and writes complete JSON results and charts.
Figures are never asserted here (timing goals live in benchmarks/)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.__main__ import ORDER
from benchmarks.fleet import FleetShape, Zipf, fleet_lines, provision_fleet

ROOT = Path(__file__).resolve().parent.parent

# Tiny counts on top of --quick: the point is that every part starts, measures and stops.
TINY = [
    "lookup.sites=5000", "lookup.keys=2000", "lookup.rounds=2", "lookup.cold=200",
    "propagation.moves=2", "rss.repeat=1", "rss.sites=5000",
    "http.duration=1", "http.warmup=0",
    "workers.duration=1", "workers.warmup=0",
    "tls.sni=[10]", "tls.handshakes=60",
    "ssh.logins=3", "ssh.concurrency=3", "ssh.bulk_mb=2",
    "ftp.logins=3", "ftp.bulk_mb=1", "ftp.transfers=1",
    "move.moves=1", "move.settle=0.5", "move.ssh_sessions=1",
    "scale.sizes=[1000,2000]", "scale.nginx_sizes=[100,200]",
]
CHARTS = {"http": "latency-cdf", "workers": "throughput-vs-workers", "tls": "handshakes-vs-certs",
          "scale": "rss-vs-sites", "ssh": "login-cdf", "ftp": "login-cdf",
          "move": "move-propagation"}


@pytest.mark.slow
def test_quick_benchmarks_write_complete_results(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, "-m", "benchmarks", "all", "--quick", "--plot", "--engine", "sqlite",
            "--results-dir", str(tmp_path)]
    for item in TINY:
        argv += ["--set", item]
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = {p.name.split("-")[0]: json.loads(p.read_text()) for p in tmp_path.glob("*.json")}
    assert set(results) == set(ORDER)
    for name, result in results.items():
        assert {"scenario", "args", "machine", "results", "skipped", "table"} <= set(result), name
        machine = result["machine"]
        assert machine["cpu_count"] >= 1 and machine["python"] and machine["tools"], name
        failed = {k: v for k, v in result["skipped"].items() if "failed:" in v}
        assert not failed, f"{name} crashed: {failed} {result['results'].get('error', '')}"
        if "*" in result["skipped"]:  # the whole scenario could not run here: say why
            assert result["skipped"]["*"].startswith("skipped: "), name
            continue
        assert result["results"], name  # raw samples present
        assert result["table"], name
        # Every compared row names its peer and a ratio measured in the same run.
        compared = [row for row in result["table"] if row["peer"]]
        assert all(row["ratio"] for row in compared), name
        for part, reason in result["skipped"].items():
            assert reason.startswith("skipped: ") and len(reason) > 12, (name, part)
        if name in CHARTS:
            assert list(tmp_path.glob(f"{name}-*-{CHARTS[name]}.png")), name
    http = results["http"]
    if "*" not in http["skipped"]:
        for mode in ("cache_off", "cache_on"):
            targets = http["results"]["results"][mode]["targets"]
            # nginx and the direct run always happen; edge unless reported as skipped.
            assert {"direct", "nginx"} <= set(targets)
            assert "edge" in targets or "edge" in http["skipped"]
            for load in targets.values():
                assert load["requests"] > 0 and load["latency_cdf_ms"], mode
    assert "== lookup ==" in proc.stdout and "== http ==" in proc.stdout


def test_fleet_shape_names_resolve_and_zipf_is_skewed(tmp_path: Path) -> None:
    shape = FleetShape(hosts=3, tenants=20, sites=100, accounts=25, certs=5)
    url = f"sqlite:///{tmp_path}/fleet.sqlite3"
    result = asyncio.run(provision_fleet(url, shape))
    assert result["counts"] == {"host": 3, "tenant": 20, "certificate": 5, "account": 25,
                                "site": 100}
    assert asyncio.run(provision_fleet(url, shape))["reused"] is True
    lines = [json.loads(line) for line in fleet_lines(shape)]
    sites = [r for r in lines if r["kind"] == "site"]
    assert any(r["hostname"].startswith("*.") for r in sites)  # wildcards exist
    assert all(r.get("certificate") is None or r["tenant"] in {f"tenant{t}" for t in range(5)}
               for r in sites)
    assert {tuple(r["protocols"]) for r in lines if r["kind"] == "account"} >= {("ftp", "ssh")}
    draws = Zipf(1000).sample(20_000)
    counts = sorted((draws.count(i) for i in set(draws)), reverse=True)
    assert counts[0] > 20 * counts[len(counts) // 2]  # a few hot sites, a long tail


def test_a_crashing_scenario_is_recorded_and_the_others_still_run(tmp_path: Path) -> None:
    """One broken scenario must not lose the others' results: it is saved as skipped with
    the reason and the traceback."""
    import argparse

    from benchmarks.__main__ import run_one
    from benchmarks.core import SCENARIOS, scenario

    @scenario("broken-for-test", "raises")
    async def broken(args: argparse.Namespace, run: object) -> None:
        raise RuntimeError("backend exploded")

    try:
        args = argparse.Namespace(engine="sqlite", database=None, quick=True,
                                  results_dir=str(tmp_path), plot=False)
        path = run_one("broken-for-test", args, {})
    finally:
        SCENARIOS.pop("broken-for-test")
    result = json.loads(path.read_text())
    assert result["skipped"]["*"] == "skipped: failed: RuntimeError: backend exploded"
    assert "backend exploded" in result["results"]["error"]


def test_edge_toml_is_valid_config_and_drops_settings_this_version_lacks(tmp_path: Path) -> None:
    from benchmarks.procs import edge_toml
    from edge.config import load_config

    text = edge_toml("sqlite:///x.sqlite3", {"http": {"listen": ["127.0.0.1:0"],
                                                      "no_such_setting": 1}},
                     secret="YmVuY2htYXJrLW9ubHktc2VjcmV0LWtleS0zMmJ5dGU=")
    (tmp_path / "edge.toml").write_text(text)
    config = load_config(tmp_path / "edge.toml")
    assert str(config.http.listen[0]) == "127.0.0.1:0"
    assert str(config.admin.listen[0]) == "127.0.0.1:0"  # never the fixed default admin port
    assert "no_such_setting" not in text


@pytest.mark.slow
def test_fleet_feed_benchmark_runs_and_every_edge_follows_the_move(mysql_url: str) -> None:
    """benchmarks.fleet_feed with 3 edges and 1 move (its own database, dropped after)."""
    server = mysql_url.rsplit("/", 1)[0] + "/"
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.fleet_feed", "--edges", "3", "--idle", "1",
         "--moves", "1", "--interval", "0.2", "--url", server],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
        timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["edges"] == 3 and summary["move_all_edges_ms_max"] < 30_000
