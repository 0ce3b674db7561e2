"""ACME at scale: issue N certificates from a real pebble through ``edge serve``, and simulate
the renewal schedule of 1,000,000 names.

    python -m benchmarks.acme --names 1000 [--concurrency 8] [--database URL]
    python -m benchmarks.acme --names 0 --simulate 1000000

Issuance: pebble (validation on, ``PEBBLE_VA_NOSLEEP=1``) validates HTTP-01 against the
edge's HTTP listener; ``edge serve --workers 1`` with ``[acme] enabled`` issues every
``--auto-cert`` name with its own loop. Reported: certificates per minute (wall), the edge's
CPU seconds per issuance (master + worker, utime+stime from /proc; the worker also answers the
challenges), pebble's CPU, the edge's RSS and the directory's size. On a shared machine the
wall figure depends on the load; the CPU figures much less.

Simulation: renewal times from :func:`edge.acme.issuer.renewal_time` for names issued (a) all
in the same hour (a bulk onboarding, the worst case) and (b) evenly over 90 days; reported as
the busiest hour against the mean, with the spread and without it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from benchmarks.procs import cpu_seconds, free_port, rss_kib
from edge.acme import client
from edge.acme.issuer import renewal_time
from edge.config import AcmeConfig
from edge.directory.secrets import KeyBox, generate_key
from edge.directory.service import DirectoryService
from edge.directory.stores import store_for_url

ROOT = Path(__file__).resolve().parent.parent
DAY = 86400.0


def simulate(names: int, lifetime_days: float = 90.0) -> dict[str, Any]:
    """Renewals per hour for ``names`` certificates (see the module docstring)."""
    config = AcmeConfig()
    lifetime = lifetime_days * DAY
    out: dict[str, Any] = {"names": names, "lifetime_days": lifetime_days}
    for label, issued_at in (("issued_in_one_hour", lambda i: (i % 3600) * 1.0),
                             ("issued_evenly", lambda i: i * lifetime / names)):
        spread: Counter[int] = Counter()
        naive: Counter[int] = Counter()
        for i in range(names):
            start = issued_at(i)
            host = f"site{i}.example"
            spread[int(renewal_time(config, host, start, start + lifetime, None) // 3600)] += 1
            naive[int((start + lifetime * config.renew_fraction) // 3600)] += 1
        hours = max(spread) - min(spread) + 1
        out[label] = {"peak_per_hour": max(spread.values()),
                      "mean_per_hour": round(names / hours, 1),
                      "window_hours": hours,
                      "peak_per_hour_without_spread": max(naive.values())}
    return out


async def _provision(db_url: str, key: str, names: int, pebble_dir: str, ca_file: str) -> None:
    store = store_for_url(db_url)
    await store.open()
    try:
        await store.migrate()
        service = DirectoryService(store, KeyBox.from_text(key))
        await service.add_host("web", "127.0.0.1", http_port=9)
        await service.add_tenant("bench", "web")
        registered = await asyncio.to_thread(client.register, pebble_dir, ca_file=ca_file)
        await service.add_acme_account("pebble", pebble_dir, registered.key_pem,
                                       account_url=registered.account_url)
        for i in range(names):
            name = await service.add_site(f"s{i}.bench.test", "bench")
            await service.enable_auto_cert(name)
    finally:
        await store.close()


async def _valid(db_url: str) -> dict[str, int]:
    store = store_for_url(db_url)
    await store.open()
    try:
        return await DirectoryService(store).acme_state_counts()
    finally:
        await store.close()


def issue(names: int, concurrency: int, database: str | None, timeout: float) -> dict[str, Any]:
    from edge.acme.pebble import Pebble  # the same loopback pebble the tests use

    tmp = Path(tempfile.mkdtemp(prefix="edge-acme-bench-"))
    db_url = database or f"sqlite:///{tmp / 'directory.sqlite3'}"
    key = generate_key()
    (tmp / "secret.key").write_text(key)
    http_port = free_port()
    pebble = Pebble(tmp / "pebble", http_port=http_port, tls_port=free_port())
    serve: subprocess.Popen[bytes] | None = None
    try:
        t0 = time.monotonic()
        asyncio.run(_provision(db_url, key, names, pebble.directory, str(pebble.ca_file)))
        provision_s = time.monotonic() - t0
        (tmp / "edge.toml").write_text(
            f'[database]\nurl = "{db_url}"\n[secrets]\nkey_file = "{tmp / "secret.key"}"\n'
            '[admin]\nlisten = ["127.0.0.1:0"]\n[serve]\nworkers = 1\n'
            f'[http]\nlisten = ["127.0.0.1:{http_port}"]\naccess_log = "off"\n'
            f'[log]\nlevel = "warning"\n[acme]\nenabled = true\nca_file = "{pebble.ca_file}"\n'
            f'poll_interval = 0.2\nconcurrency = {concurrency}\n')
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        env.pop("EDGE_CONFIG", None)
        env.pop("EDGE_DATABASE_URL", None)
        pebble_cpu0 = cpu_seconds(pebble.proc.pid)
        started = time.monotonic()
        with (tmp / "serve.log").open("wb") as serve_log:  # the child keeps its own copy
            serve = subprocess.Popen(
                [sys.executable, "-m", "edge.cli.main", "serve", "--config",
                 str(tmp / "edge.toml")], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                stderr=serve_log)
        counts: dict[str, int] = {}
        while time.monotonic() - started < timeout:
            time.sleep(1.0)
            counts = asyncio.run(_valid(db_url))
            if counts.get("valid", 0) + counts.get("failing", 0) >= names:
                break
        wall = time.monotonic() - started
        edge_cpu = cpu_seconds(serve.pid)
        edge_rss = rss_kib(serve.pid)
        pebble_cpu = cpu_seconds(pebble.proc.pid) - pebble_cpu0
        valid = counts.get("valid", 0)
        db_path = tmp / "directory.sqlite3"
        return {
            "names": names, "concurrency": concurrency, "valid": valid,
            "failing": counts.get("failing", 0), "wall_seconds": round(wall, 1),
            "certificates_per_minute": round(valid / wall * 60, 1) if wall else 0,
            "edge_cpu_seconds": round(edge_cpu, 2),
            "edge_cpu_ms_per_issuance": round(edge_cpu / valid * 1000, 1) if valid else None,
            "pebble_cpu_ms_per_issuance": round(pebble_cpu / valid * 1000, 1) if valid else None,
            "edge_rss_mib": round(edge_rss / 1024, 1),
            "directory_bytes": db_path.stat().st_size if db_path.exists() else None,
            "provision_seconds": round(provision_s, 1),
            "database": "sqlite" if database is None else "given",
        }
    finally:
        if serve is not None and serve.poll() is None:
            serve.terminate()
            serve.wait(30)
        pebble.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--names", type=int, default=1000, help="certificates to issue (0: none)")
    parser.add_argument("--concurrency", type=int, default=8, help="[acme] concurrency")
    parser.add_argument("--database", help="directory URL (default: a fresh SQLite file)")
    parser.add_argument("--timeout", type=float, default=3600.0)
    parser.add_argument("--simulate", type=int, default=1_000_000,
                        help="names in the renewal simulation (0: skip)")
    args = parser.parse_args(argv)
    result: dict[str, Any] = {}
    if args.names:
        result["issuance"] = issue(args.names, args.concurrency, args.database, args.timeout)
    if args.simulate:
        result["renewal_simulation"] = simulate(args.simulate)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
