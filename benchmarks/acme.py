"""ACME at scale: issue N certificates from a real pebble through ``edge serve``, and simulate
the renewal schedule of 1,000,000 names.

    python -m benchmarks.acme --names 1000 [--concurrency 8] [--database URL]
    python -m benchmarks.acme --names 0 --simulate 1000000
    python -m benchmarks.acme --names 3000 --tls-names 200 --simulate 0

Issuance: pebble (validation on, ``PEBBLE_VA_NOSLEEP=1``) validates HTTP-01 against the
edge's HTTP listener; ``edge serve --workers 1`` with ``[acme] enabled`` issues every
``--auto-cert`` name with its own loop. Reported: certificates per minute (wall), the edge's
CPU seconds per issuance (master + worker, utime+stime from /proc; the worker also answers the
challenges), pebble's CPU, the edge's RSS and the directory's size. On a shared machine the
wall figure depends on the load; the CPU figures much less.

Serving while issuing (``--tls-names K``): the edge also listens for HTTPS. The first K names
are issued first; then fresh TLS handshakes (Python client, SNI cycling over those K names,
no session reuse) alternate in batches between the edge and nginx holding the very same K
certificates: rounds while nothing is issued (idle), then while the other names are issued
(they are bulk-loaded with ``auto_cert`` at that moment). Reported per phase: the ratio of
handshakes per second and of p50/p99 latency, edge/nginx, per round (median, min-max).

Simulation: renewal times from :func:`edge.acme.issuer.renewal_time` for names issued (a) all
in the same hour (a bulk onboarding, the worst case) and (b) evenly over 90 days; reported as
the busiest hour against the mean, with the spread and without it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
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


def issue(names: int, concurrency: int, database: str | None, timeout: float,
          tls_names: int = 0, tls_seconds: float = 3.0, idle_rounds: int = 5) -> dict[str, Any]:
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
        first = min(names, tls_names) if tls_names else names
        asyncio.run(_provision(db_url, key, first, pebble.directory, str(pebble.ca_file)))
        provision_s = time.monotonic() - t0
        https_port = free_port()
        (tmp / "edge.toml").write_text(
            f'[database]\nurl = "{db_url}"\n[secrets]\nkey_file = "{tmp / "secret.key"}"\n'
            '[admin]\nlisten = ["127.0.0.1:0"]\n[serve]\nworkers = 1\n'
            f'[http]\nlisten = ["127.0.0.1:{http_port}"]\naccess_log = "off"\n'
            f'[https]\nlisten = ["127.0.0.1:{https_port}"]\n'
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
        serving: dict[str, Any] | None = None
        while time.monotonic() - started < timeout:
            time.sleep(1.0)
            counts = asyncio.run(_valid(db_url))
            done = counts.get("valid", 0) + counts.get("failing", 0)
            if done >= names:
                break
            if serving is None and tls_names and done >= first:
                all_names = [f"s{i}.bench.test" for i in range(names)]
                serving = asyncio.run(_serve_phases(
                    db_url, key, tmp, https_port, all_names[:first], all_names[first:],
                    tls_seconds, idle_rounds))
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
            **({"tls_serving": serving} if serving is not None else {}),
        }
    finally:
        if serve is not None and serve.poll() is None:
            serve.terminate()
            serve.wait(30)
        pebble.stop()


# -- serving while issuing ---------------------------------------------------------------

async def _certificates(db_url: str, key: str, names: list[str]) -> list[tuple[list[str], str,
                                                                              str]]:
    """(names, chain, key) of the issued certificates of ``names``, for nginx."""
    store = store_for_url(db_url)
    await store.open()
    keybox = KeyBox.from_text(key)
    try:
        service = DirectoryService(store, keybox)
        out = []
        for name in names:
            acme = await service.acme_name(name)
            assert acme.certificate_id is not None, name
            stored = await store.fetch_certificate(acme.certificate_id)
            assert stored is not None
            out.append(([name], stored.chain_pem.decode(),
                        keybox.decrypt(stored.key_encrypted).decode()))
        return out
    finally:
        await store.close()


async def _bulk_auto_cert(db_url: str, names: list[str]) -> None:
    from edge.directory.bulk import bulk_load

    store = store_for_url(db_url)
    await store.open()
    try:
        await bulk_load(store, [json.dumps({"kind": "site", "hostname": n, "tenant": "bench"})
                                for n in names], auto_cert=True)
    finally:
        await store.close()


async def _tls_round(edge_port: int, nginx_port: int, names: list[str],
                     seconds: float) -> dict[str, float]:
    from benchmarks.loadgen import tls_handshakes

    def pct(values: list[float], q: float) -> float:
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0

    edge = await tls_handshakes(edge_port, names, count=10**9, seconds=seconds, concurrency=8)
    nginx = await tls_handshakes(nginx_port, names, count=10**9, seconds=seconds, concurrency=8)
    return {"edge_per_s": edge.rate, "nginx_per_s": nginx.rate,
            "rate_ratio": edge.rate / nginx.rate if nginx.rate else 0.0,
            "p50_ratio": pct(edge.latencies_ms, 0.5) / max(1e-9, pct(nginx.latencies_ms, 0.5)),
            "p99_ratio": pct(edge.latencies_ms, 0.99) / max(1e-9, pct(nginx.latencies_ms, 0.99)),
            "edge_failures": edge.failures, "nginx_failures": nginx.failures}


def _summary(rounds: list[dict[str, float]]) -> dict[str, Any]:
    out: dict[str, Any] = {"rounds": len(rounds)}
    for key in ("rate_ratio", "p50_ratio", "p99_ratio", "edge_per_s", "nginx_per_s"):
        values = sorted(r[key] for r in rounds)
        if values:
            out[key] = {"median": round(statistics.median(values), 3),
                        "min": round(values[0], 3), "max": round(values[-1], 3)}
    out["failures"] = sum(int(r["edge_failures"] + r["nginx_failures"]) for r in rounds)
    return out


async def _serve_phases(db_url: str, key: str, workdir: Path, edge_port: int, served: list[str],
                        rest: list[str], seconds: float, idle_rounds: int) -> dict[str, Any]:
    from benchmarks.peers import start_nginx_tls

    certs = await _certificates(db_url, key, served)
    async with await start_nginx_tls(workdir, certs, ("127.0.0.1", 9)) as nginx:
        port = nginx.ports["https"]
        idle = [await _tls_round(edge_port, port, served, seconds) for _ in range(idle_rounds)]
        await _bulk_auto_cert(db_url, rest)
        busy = []
        while True:
            counts = await _valid(db_url)
            if counts.get("valid", 0) + counts.get("failing", 0) >= len(served) + len(rest):
                break
            busy.append(await _tls_round(edge_port, port, served, seconds))
    return {"idle": _summary(idle), "while_issuing": _summary(busy)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--names", type=int, default=1000, help="certificates to issue (0: none)")
    parser.add_argument("--concurrency", type=int, default=8, help="[acme] concurrency")
    parser.add_argument("--database", help="directory URL (default: a fresh SQLite file)")
    parser.add_argument("--timeout", type=float, default=3600.0)
    parser.add_argument("--tls-names", type=int, default=0,
                        help="measure TLS handshakes (edge vs nginx) on this many names, idle "
                             "and while the rest are issued (0: off)")
    parser.add_argument("--tls-seconds", type=float, default=3.0, help="seconds per batch")
    parser.add_argument("--simulate", type=int, default=1_000_000,
                        help="names in the renewal simulation (0: skip)")
    args = parser.parse_args(argv)
    result: dict[str, Any] = {}
    if args.names:
        result["issuance"] = issue(args.names, args.concurrency, args.database, args.timeout,
                                   args.tls_names, args.tls_seconds)
    if args.simulate:
        result["renewal_simulation"] = simulate(args.simulate)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
