"""The benchmark harness keeps working: `python -m benchmarks --quick all` runs and writes
complete JSON results. Figures are never asserted here (timing goals live in benchmarks/)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_quick_benchmarks_write_complete_results(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "all", "--engine", "sqlite",
         "--results-dir", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    results = {p.name.split("-")[0]: json.loads(p.read_text()) for p in tmp_path.glob("*.json")}
    assert set(results) == {"lookup", "propagation", "rss"}
    for name, result in results.items():
        assert {"scenario", "args", "machine", "results", "table"} <= set(result), name
        assert result["machine"]["cpu_count"] >= 1 and result["machine"]["python"], name
        assert result["results"], name  # raw figures present
        # Every compared row names its peer and a ratio measured in the same run.
        compared = [row for row in result["table"] if row["peer"]]
        assert compared and all(row["ratio"] for row in compared), name
    assert "== lookup ==" in proc.stdout and "== propagation ==" in proc.stdout
