"""``scale``: memory, start-up and reload of ``edge serve`` as the directory grows (1k / 100k /
1M sites) next to nginx with 1k / 10k / 100k static ``server`` blocks (the static way)."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import time
from pathlib import Path
from typing import Any

from benchmarks.core import Run, database_for, scenario
from benchmarks.fleet import BENCH_SECRET_KEY, FleetShape, attach_backends, provision_fleet
from benchmarks.loadgen import http_get
from benchmarks.procs import (
    Child,
    descendants,
    edge_toml,
    free_port,
    nginx_main_conf,
    proxy_missing,
    pss_kib,
    rss_kib,
    scratch,
    start_edge,
    start_nginx,
    tool_missing,
)


def _scale_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 100_000, 1_000_000],
                        help="sites in the directory, one fleet each")
    parser.add_argument("--nginx-sizes", type=int, nargs="+", default=[1_000, 10_000, 100_000],
                        help="static nginx server blocks (two names each)")
    parser.add_argument("--repeat", type=int, default=3, help="starts per size")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--requests", type=int, default=200,
                        help="requests over distinct sites after start-up (if the http proxy "
                             "is built), so the RSS includes a warm cache")


def children(pid: int) -> set[int]:
    return set(descendants(pid)) - {pid}


async def reload_seconds(child: Child, limit: float = 600.0) -> tuple[float, int]:
    """SIGHUP the master; seconds until all its old workers are gone and new ones run, and
    the peak RSS (KiB) of the whole tree meanwhile (old and new generations overlap)."""
    old = children(child.pid)
    peak = rss_kib(child.pid)
    started = time.perf_counter()
    os.kill(child.pid, signal.SIGHUP)
    while time.perf_counter() - started < limit:
        await asyncio.sleep(0.02)
        peak = max(peak, rss_kib(child.pid))
        now = children(child.pid)
        if now and not (now & old):
            return time.perf_counter() - started, peak
    raise RuntimeError(f"{child.name} did not finish reloading within {limit:.0f} s")


def nginx_static_conf(folder: Path, blocks: int, port: int, backend: tuple[str, int]) -> str:
    servers = "\n".join(
        f"  server {{ listen 127.0.0.1:{port}; server_name tenant{i}.example "
        f"www.tenant{i}.example; location / {{ proxy_pass http://{backend[0]}:{backend[1]}; }} }}"
        for i in range(blocks))
    return nginx_main_conf(folder, servers)


@scenario("scale", "RSS, start-up and reload of edge serve with 1k/100k/1M sites vs nginx with "
                   "1k/10k/100k static server blocks",
          quick={"sizes": [1_000, 5_000], "nginx_sizes": [100, 1_000], "repeat": 1,
                 "requests": 50},
          arguments=_scale_arguments)
async def scale(args: argparse.Namespace, run: Run) -> None:
    http_missing = proxy_missing("http")
    if http_missing:
        run.skip("edge http", f"{http_missing}: measuring edge serve with the admin listener "
                              "and the directory only")
    edge: dict[int, dict[str, Any]] = {}
    with scratch("scale") as folder:
        workdir = Path(folder)
        for size in args.sizes:
            shape = FleetShape.for_sites(size)
            # --database holds the largest fleet only; the smaller ones are temporary.
            own = argparse.Namespace(**{**vars(args), "database": args.database
                                        if size == max(args.sizes) else None})
            with database_for(own, f"scale{size}") as url:
                run.progress(f"provisioning {size:,} sites")
                load = await provision_fleet(url, shape, progress=True)
                # Hosts point at a port nobody listens on: start-up and RSS do not need them.
                await attach_backends(url, shape, {"http": [free_port()] * shape.hosts},
                                      hosts=[0])
                sections = {} if http_missing else {"http": {"listen": ["127.0.0.1:0"],
                                                               "access_log": "off"}}
                toml = edge_toml(url, sections, secret=BENCH_SECRET_KEY)
                samples = []
                for _ in range(args.repeat):
                    async with await start_edge(workdir, toml, workers=args.workers,
                                                expect=[] if http_missing else ["http"]) as child:
                        await asyncio.sleep(1.0)  # let start-up helpers exit first
                        sample: dict[str, Any] = {"startup_s": child.started_seconds,
                                                  "rss_kib": rss_kib(child.pid),
                                                  "pss_kib": pss_kib(child.pid),
                                                  "processes": len(descendants(child.pid))}
                        if not http_missing:
                            for s in range(0, size, max(1, size // args.requests)):
                                await http_get(child.ports["http"], shape.request_name(s))
                            sample["rss_after_requests_kib"] = rss_kib(child.pid)
                            sample["pss_after_requests_kib"] = pss_kib(child.pid)
                        sample["reload_s"], sample["reload_peak_kib"] = await reload_seconds(child)
                        samples.append(sample)
                edge[size] = {"samples": samples, "load": load}
                run.progress(f"edge serve, {size:,} sites: "
                             f"{statistics.median(s['rss_kib'] for s in samples) / 1024:.1f} MiB, "
                             f"start {statistics.median(s['startup_s'] for s in samples):.2f} s")
        nginx: dict[int, dict[str, Any]] = {}
        if tool_missing("nginx"):
            run.skip("nginx", tool_missing("nginx") or "")
        else:
            backend = ("127.0.0.2", free_port("127.0.0.2"))
            for blocks in args.nginx_sizes:
                samples = []
                for _ in range(args.repeat):
                    port = free_port()
                    sub = workdir / f"nginx-{blocks}"
                    sub.mkdir(exist_ok=True)
                    conf = nginx_static_conf(sub, blocks, port, backend)
                    started = time.perf_counter()
                    async with await start_nginx(workdir, f"nginx-{blocks}", conf,
                                                 [("127.0.0.1", port)], limit=600) as child:
                        startup = time.perf_counter() - started
                        await asyncio.sleep(1.0)
                        sample = {"startup_s": startup, "rss_kib": rss_kib(child.pid),
                                  "pss_kib": pss_kib(child.pid),
                                  "processes": len(descendants(child.pid))}
                        sample["reload_s"], sample["reload_peak_kib"] = await reload_seconds(child)
                        samples.append(sample)
                nginx[blocks] = {"samples": samples}
                run.progress(f"nginx, {blocks:,} server blocks: "
                             f"{statistics.median(s['rss_kib'] for s in samples) / 1024:.1f} MiB, "
                             f"start {statistics.median(s['startup_s'] for s in samples):.2f} s")

    def med(d: dict[str, Any], key: str) -> float:
        return float(statistics.median(s[key] for s in d["samples"]))

    # Pair sizes by position: 1k/100k/1M sites against 1k/10k/100k server blocks.
    pairs = dict(zip(args.sizes, [n for n in args.nginx_sizes if n in nginx], strict=False))
    for size in args.sizes:
        d = edge[size]
        blocks = pairs.get(size)
        peer = nginx[blocks] if blocks is not None else None
        label = f"nginx {blocks:,} blocks" if blocks is not None else ""
        warm = "pss_after_requests_kib" in d["samples"][0]
        run.row(f"edge serve memory (PSS), {size:,} sites" + (" after requests" if warm else ""),
                med(d, "pss_after_requests_kib" if warm else "pss_kib") / 1024, "MiB",
                (label, med(peer, "pss_kib") / 1024) if peer else None, digits=1)
        run.row(f"edge serve RSS sum, {size:,} sites", med(d, "rss_kib") / 1024, "MiB",
                (label, med(peer, "rss_kib") / 1024) if peer else None, digits=1)
        run.row(f"edge serve start-up, {size:,} sites", med(d, "startup_s"), "s",
                (label, med(peer, "startup_s")) if peer else None)
        run.row(f"edge serve reload (SIGHUP → new workers), {size:,} sites", med(d, "reload_s"),
                "s", (label, med(peer, "reload_s")) if peer else None)
        run.row(f"edge serve peak RSS during reload, {size:,} sites",
                med(d, "reload_peak_kib") / 1024, "MiB",
                (label, med(peer, "reload_peak_kib") / 1024) if peer else None, digits=1)
    for blocks, d in nginx.items():
        run.row(f"nginx memory (PSS), {blocks:,} server blocks", med(d, "pss_kib") / 1024, "MiB",
                digits=1)
        run.row(f"nginx RSS sum, {blocks:,} server blocks", med(d, "rss_kib") / 1024, "MiB",
                digits=1)
        run.row(f"nginx start-up, {blocks:,} server blocks", med(d, "startup_s"), "s")
        run.row(f"nginx reload, {blocks:,} server blocks", med(d, "reload_s"), "s")
        run.row(f"nginx peak RSS during reload, {blocks:,} blocks", med(d, "reload_peak_kib") / 1024,
                "MiB", digits=1)
    run.data.update(edge={str(k): v for k, v in edge.items()},
                    nginx={str(k): v for k, v in nginx.items()}, workers=args.workers,
                    edge_proxies="admin only" if http_missing else "http")
