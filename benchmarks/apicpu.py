"""CPU time per admin-API request: ``python -m benchmarks.apicpu``.

Provisions a SQLite directory (``--hosts`` hosts, ``--tenants`` tenants with a site and an
account each) through the bulk loader, starts the real ``edge admin serve`` as a subprocess,
drives each endpoint with ``wrk`` (bounded by ``--seconds`` and ``--connections``) and reads
the server process's user+system CPU time from ``/proc/PID/stat`` before and after: the
figure is server CPU milliseconds per answered request, which stays meaningful on a shared,
busy machine where wall-clock throughput does not. Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from edge.directory.bulk import bulk_load
from edge.directory.stores import store_for_url
from edge.directory.tokens import TokenService

ROOT = Path(__file__).resolve().parent.parent
TICKS = os.sysconf("SC_CLK_TCK")
ENDPOINTS = ("/api/v1/hosts", "/api/v1/tenants?limit=100", "/api/v1/tenants/t00000042",
             "/api/v1/operations", "/api/openapi.json")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime


async def provision(url: str, hosts: int, tenants: int) -> str:
    lines = [json.dumps({"kind": "host", "name": f"web{h:03d}", "address": "127.0.0.1"})
             for h in range(hosts)]
    for t in range(tenants):
        name = f"t{t:08d}"
        lines += [json.dumps({"kind": "tenant", "name": name, "host": f"web{t % hosts:03d}"}),
                  json.dumps({"kind": "site", "hostname": f"www.{name}.example", "tenant": name}),
                  json.dumps({"kind": "account", "username": name, "tenant": name})]
    store = store_for_url(url)
    await store.open()
    try:
        await store.migrate()
        await bulk_load(store, lines)
        return (await TokenService(store).add("bench", "read,write")).secret
    finally:
        await store.close()


def wrk(url: str, token: str, seconds: float, connections: int) -> int:
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "-H",
                          f"Authorization: Bearer {token}", url],
                         capture_output=True, text=True, timeout=seconds + 30, check=True).stdout
    match = re.search(r"(\d+) requests in", out)
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if bad:
        raise SystemExit(f"{url}: {bad[1]} non-2xx answers")
    return int(match[1]) if match else 0


def run(args: argparse.Namespace) -> int:
    if shutil.which("wrk") is None:
        print("skipped: wrk is not installed", file=sys.stderr)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/edge.sqlite3"
        token = asyncio.run(provision(url, args.hosts, args.tenants))
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_")}
        env["EDGE_DATABASE_URL"] = url
        server = subprocess.Popen([sys.executable, "-m", "edge.cli.main", "admin", "serve",
                                   "--listen", "127.0.0.1:0"], cwd=ROOT, env=env,
                                  stdout=subprocess.PIPE, text=True)
        try:
            assert server.stdout is not None
            base = server.stdout.readline().split(" on ", 1)[1].split("/api/v1", 1)[0]
            print(f"{args.hosts} hosts, {args.tenants} tenants; wrk -c{args.connections} "
                  f"{args.seconds:g}s per endpoint; load average {os.getloadavg()[0]:.2f}")
            print(f"{'endpoint':36} {'requests':>9} {'CPU ms/request':>15}")
            for path in ENDPOINTS:
                before, started = cpu_seconds(server.pid), time.monotonic()
                count = wrk(base + path, token, args.seconds, args.connections)
                used = cpu_seconds(server.pid) - before
                print(f"{path:36} {count:9d} {1000 * used / max(count, 1):15.3f}"
                      f"   ({time.monotonic() - started:.1f} s)")
        finally:
            server.terminate()
            server.wait(20)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.apicpu", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hosts", type=int, default=50)
    parser.add_argument("--tenants", type=int, default=10000)
    parser.add_argument("--seconds", type=int, default=5, help="per endpoint (wrk takes whole seconds)")
    parser.add_argument("--connections", type=int, default=4)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
