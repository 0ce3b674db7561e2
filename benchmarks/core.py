"""Shared machinery: scenario registry, fleet provisioning, statistics, results, tables."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from edge.directory.store import SQLStore
from edge.directory.stores import store_for_url

RESULTS_DIR = Path(__file__).resolve().parent / "results"
DEFAULT_MYSQL = os.environ.get("EDGE_BENCH_MYSQL_URL", "mysql://root@127.0.0.1:3306/")

Runner = Callable[[argparse.Namespace, "Run"], Awaitable[None]]


@dataclass
class Scenario:
    """One registered benchmark: ``python -m benchmarks NAME``."""

    name: str
    help: str
    run: Runner
    add_arguments: Callable[[argparse.ArgumentParser], None] = lambda parser: None
    quick: dict[str, Any] = field(default_factory=dict)
    """Argument overrides for ``--quick`` (small sizes; the whole quick run stays < 2 min)."""


SCENARIOS: dict[str, Scenario] = {}


def scenario(name: str, help: str, *, quick: dict[str, Any] | None = None,
             arguments: Callable[[argparse.ArgumentParser], None] | None = None
             ) -> Callable[[Runner], Runner]:
    """Decorator registering ``async def run(args, run)`` as a scenario."""
    def register(func: Runner) -> Runner:
        SCENARIOS[name] = Scenario(name, help, func, arguments or (lambda parser: None),
                                   quick or {})
        return func
    return register


# -- statistics -----------------------------------------------------------------------------

def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of ``values``."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def summary(values: Sequence[float]) -> dict[str, float]:
    return {"n": len(values), "median": statistics.median(values) if values else float("nan"),
            "p50": percentile(values, 50), "p99": percentile(values, 99),
            "p99.9": percentile(values, 99.9),
            "max": max(values) if values else float("nan")}


# -- results --------------------------------------------------------------------------------

def machine_info() -> dict[str, Any]:
    versions: dict[str, str | None] = {}
    for dist in ("hosting-edge", "aiomysql", "PyMySQL", "aiosqlite", "uvloop", "cryptography",
                 "aiohttp", "asyncssh", "pyftpdlib"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    return {"cpu_count": os.cpu_count(), "machine": platform.machine(),
            "load_average": os.getloadavg(), "tools": tool_versions(),
            "memory_kib": _meminfo_total(),
            "platform": platform.platform(), "python": sys.version.split()[0],
            "implementation": platform.python_implementation(), "versions": versions}


_TOOLS = {"nginx": ["/usr/sbin/nginx", "-v"], "haproxy": ["/usr/sbin/haproxy", "-v"],
          "wrk": ["/usr/bin/wrk", "--version"], "openssh": ["ssh", "-V"]}


def tool_versions() -> dict[str, str | None]:
    """First line each peer tool prints about its version (``None``: not installed)."""
    import subprocess

    out: dict[str, str | None] = {}
    for name, argv in _TOOLS.items():
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            out[name] = None
            continue
        text = (proc.stdout + proc.stderr).strip().splitlines()
        out[name] = text[0] if text else None
    return out


def _meminfo_total() -> int:
    try:
        with open("/proc/meminfo") as meminfo:
            return int(meminfo.readline().split()[1])
    except (OSError, ValueError, IndexError):
        return 0


@dataclass
class Run:
    """What one scenario run collects: table rows for the console and data for JSON."""

    scenario: str
    args: dict[str, Any]
    rows: list[tuple[str, str, str, str]] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    """Part (``"edge"``, ``"haproxy"``, or ``"*"`` for the whole scenario) → why it did not
    run, e.g. ``"http proxy not built"``; written to the JSON as ``"skipped"``."""
    started: float = field(default_factory=time.perf_counter)

    def skip(self, part: str, reason: str) -> None:
        """Record that ``part`` did not run (and say so on the console)."""
        self.skipped[part] = reason
        self.progress(f"skipped {part}: {reason}")

    def progress(self, message: str) -> None:
        """One progress line on stderr, with the time since the scenario started."""
        print(f"  [{self.scenario} {time.perf_counter() - self.started:6.1f} s] {message}",
              file=sys.stderr, flush=True)

    def text_row(self, metric: str, value: str, peer: str = "", ratio: str = "") -> None:
        self.rows.append((metric, value, peer, ratio))

    def row(self, metric: str, value: float, unit: str, peer: tuple[str, float] | None = None,
            *, digits: int = 2) -> None:
        """A table row; with ``peer`` (name, value) the ratio value/peer is shown too."""
        peer_text = ratio = ""
        if peer is not None:
            peer_text = f"{peer[0]}: {peer[1]:.{digits}f} {unit}"
            ratio = f"{value / peer[1]:.2f}x" if peer[1] else "-"
        self.rows.append((metric, f"{value:.{digits}f} {unit}", peer_text, ratio))

    def save(self, results_dir: Path = RESULTS_DIR) -> Path:
        results_dir.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%S")
        path = results_dir / f"{self.scenario}-{stamp}.json"
        document = {"scenario": self.scenario, "time": time.time(), "args": self.args,
                    "machine": machine_info(), "results": self.data,
                    "skipped": {k: f"skipped: {v}" for k, v in self.skipped.items()},
                    "table": [dict(zip(("metric", "value", "peer", "ratio"), r, strict=True))
                              for r in self.rows]}
        path.write_text(json.dumps(document, indent=2, default=str) + "\n")
        return path

    def print_table(self) -> None:
        headers = ("metric", "value", "peer (same run)", "ratio")
        widths = [max(len(h), *(len(r[i]) for r in self.rows)) if self.rows else len(h)
                  for i, h in enumerate(headers)]
        print(f"\n== {self.scenario} ==")
        print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
        print("  ".join("-" * w for w in widths))
        for r in self.rows:
            print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
        for part, reason in self.skipped.items():
            print(f"skipped {part}: {reason}")


# -- databases and fleets -------------------------------------------------------------------

def _mysql_admin(url: str) -> Any:
    import pymysql

    from edge.directory.mysql import parse_mysql_url

    args = parse_mysql_url(url.rstrip("/") + "/x" if url.rstrip("/").count("/") < 3 else url)
    return pymysql.connect(host=args["host"], port=args["port"], user=args["user"],
                           password=args["password"], autocommit=True, connect_timeout=3)


@contextmanager
def temporary_database(kind: str, tag: str) -> Iterator[str]:
    """A fresh database URL (``edge_bench_*`` on MariaDB, or a temp SQLite file), removed after."""
    if kind == "sqlite":
        import tempfile

        with tempfile.TemporaryDirectory(prefix="edge-bench-") as folder:
            yield f"sqlite:///{folder}/bench.sqlite3"
        return
    base = DEFAULT_MYSQL if kind == "mysql" else kind
    name = f"edge_bench_{tag}_{uuid.uuid4().hex[:8]}"
    admin = _mysql_admin(base)
    with admin.cursor() as cursor:
        cursor.execute(f"CREATE DATABASE {name}")
    root = base.rstrip("/")
    if root.count("/") >= 3:  # a URL with a database part: keep server and credentials only
        root = root.rsplit("/", 1)[0]
    try:
        yield f"{root}/{name}"
    finally:
        with admin.cursor() as cursor:
            cursor.execute(f"DROP DATABASE IF EXISTS {name}")
        admin.close()


async def provision(url: str, sites: int, *, progress: bool = False) -> dict[str, Any]:
    """Make ``url`` hold the synthetic fleet of ``sites`` sites (:meth:`FleetShape.for_sites`:
    10 sites and 1 account per tenant, <= 500 hosts; 1,000,000 sites → 500 hosts, 100,000
    tenants, the target fleet); returns load figures. A database already holding exactly
    that fleet is reused (load 1M sites once, pass it with ``--database`` to later runs)."""
    from benchmarks.fleet import FleetShape, provision_fleet

    return await provision_fleet(url, FleetShape.for_sites(sites), progress=progress)


async def open_store(url: str) -> SQLStore:
    store = store_for_url(url)
    await store.open()
    return store


@contextmanager
def database_for(args: argparse.Namespace, tag: str) -> Iterator[str]:
    """The database a scenario uses: ``--database URL`` as given (kept), else a temporary one
    on ``--engine`` (mysql: the local MariaDB; sqlite: a temp file), dropped afterwards."""
    if args.database:
        yield args.database
    else:
        with temporary_database(args.engine, tag) as url:
            yield url


def rss_kib() -> int:
    """This process's resident set size (KiB), from /proc."""
    with open("/proc/self/status") as status:
        for text in status:
            if text.startswith("VmRSS:"):
                return int(text.split()[1])
    return 0


def run_async(coro: Awaitable[None]) -> None:
    asyncio.run(coro)  # type: ignore[arg-type]
