"""The core scenarios: ``lookup``, ``propagation``, ``rss``."""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import subprocess
import sys
import time
from typing import Any

from benchmarks.core import Run, database_for, open_store, provision, scenario, summary
from edge.config import CacheConfig
from edge.directory.bulk import synthetic_site_name
from edge.directory.directory import Directory
from edge.directory.service import DirectoryService


def sample_hostnames(sites: int, count: int, seed: int = 3) -> list[str]:
    """``count`` distinct names that resolve in a fleet of ``sites`` (wildcards via a label)."""
    tenants = max(1, sites // 10)
    rng = random.Random(seed)
    picks = rng.sample(range(sites), min(count, sites))
    return [synthetic_site_name(s % tenants, s // tenants).replace("*", f"x{s}") for s in picks]


def _size_arguments(parser: argparse.ArgumentParser, default_sites: int) -> None:
    parser.add_argument("--sites", type=int, default=default_sites,
                        help=f"sites in the synthetic fleet (default {default_sites:,})")


# -- lookup ---------------------------------------------------------------------------------

def _lookup_arguments(parser: argparse.ArgumentParser) -> None:
    _size_arguments(parser, 1_000_000)
    parser.add_argument("--keys", type=int, default=100_000,
                        help="distinct hostnames in the cached working set (default 100,000)")
    parser.add_argument("--rounds", type=int, default=7, help="timed passes over the keys")
    parser.add_argument("--cold", type=int, default=2000,
                        help="cold point lookups (and as many raw SELECTs) to time")


async def _raw_select(url: str) -> tuple[Any, Any]:
    """A peer for cold lookups: one raw connection, SELECT a site row by primary key."""
    if url.startswith("sqlite:///"):
        import aiosqlite

        db = await aiosqlite.connect(url[len("sqlite:///"):])

        async def query(site_id: int) -> Any:
            async with db.execute("SELECT hostname, tenant_id, certificate_id, https_redirect, "
                                  "hsts, cache_policy, filters FROM sites WHERE id = ?",
                                  (site_id,)) as cursor:
                return await cursor.fetchone()
        return query, db.close
    import aiomysql

    from edge.directory.mysql import parse_mysql_url

    conn = await aiomysql.connect(autocommit=True, **parse_mysql_url(url))

    async def mysql_query(site_id: int) -> Any:
        async with conn.cursor() as cursor:
            await cursor.execute("SELECT hostname, tenant_id, certificate_id, https_redirect, "
                                 "hsts, cache_policy, filters FROM sites WHERE id = %s",
                                 (site_id,))
            return await cursor.fetchone()

    async def close() -> None:
        conn.close()
    return mysql_query, close


@scenario("lookup", "cached and cold site lookups vs a dict and a raw SELECT",
          quick={"sites": 20_000, "keys": 20_000, "rounds": 5, "cold": 500},
          arguments=_lookup_arguments)
async def lookup(args: argparse.Namespace, run: Run) -> None:
    with database_for(args, "lookup") as url:
        load = await provision(url, args.sites, progress=True)
        run.data["load"] = load
        if not load.get("reused"):
            run.row(f"bulk load {args.sites:,} sites (+tenants, accounts, hosts)",
                    load["seconds"], "s", digits=1)
            run.row("bulk load rate", load["rows_per_second"], "rows/s", digits=0)
        store = await open_store(url)
        try:
            keys = sample_hostnames(args.sites, args.keys)
            directory = Directory(store, CacheConfig(max_entries=2 * len(keys) + 10))
            plain: dict[str, Any] = {}
            for key in keys:  # warm the cache (and build the dict peer with the same answers)
                plain[key] = await directory.site(key)
            assert all(v is not None for v in plain.values()), "sample names must resolve"
            nowait_keys = keys  # already normalised hostnames

            async def via_site() -> float:
                start = time.perf_counter_ns()
                for key in keys:
                    await directory.site(key)
                return (time.perf_counter_ns() - start) / len(keys) / 1000

            def via_nowait() -> float:
                peek = directory.site_nowait
                start = time.perf_counter_ns()
                for key in nowait_keys:
                    peek(key)
                return (time.perf_counter_ns() - start) / len(keys) / 1000

            def via_dict() -> float:
                get = plain.get
                start = time.perf_counter_ns()
                for key in keys:
                    get(key)
                return (time.perf_counter_ns() - start) / len(keys) / 1000

            site_us, nowait_us, dict_us = [], [], []
            for _ in range(args.rounds):  # interleaved, so drift hits all three alike
                site_us.append(await via_site())
                nowait_us.append(via_nowait())
                dict_us.append(via_dict())
            d = statistics.median(dict_us)
            run.row("cached Directory.site() (median of rounds)", statistics.median(site_us),
                    "µs", ("dict.get", d), digits=3)
            run.row("cached Directory.site_nowait()", statistics.median(nowait_us), "µs",
                    ("dict.get", d), digits=3)

            # Cold: every key distinct and never asked before, so each one goes to the store.
            cold_keys = sample_hostnames(args.sites, args.cold, seed=11)
            cold_dir = Directory(store, CacheConfig())
            query, close = await _raw_select(url)
            rng = random.Random(5)
            cold_ms, raw_ms = [], []
            try:
                for key in cold_keys:
                    start = time.perf_counter_ns()
                    await cold_dir.site(key)
                    cold_ms.append((time.perf_counter_ns() - start) / 1e6)
                    site_id = rng.randrange(1, args.sites + 1)
                    start = time.perf_counter_ns()
                    await query(site_id)
                    raw_ms.append((time.perf_counter_ns() - start) / 1e6)
            finally:
                await close()
            cold, raw = summary(cold_ms), summary(raw_ms)
            run.row("cold Directory.site() p50", cold["p50"], "ms", ("raw SELECT by PK p50",
                                                                      raw["p50"]), digits=3)
            run.row("cold Directory.site() p99", cold["p99"], "ms", ("raw SELECT by PK p99",
                                                                      raw["p99"]), digits=3)
            run.data.update(cached_site_us=site_us, cached_nowait_us=nowait_us, dict_us=dict_us,
                            cold_ms=cold, raw_select_ms=raw, keys=len(keys))
        finally:
            await store.close()


# -- propagation ----------------------------------------------------------------------------

def _propagation_arguments(parser: argparse.ArgumentParser) -> None:
    _size_arguments(parser, 10_000)
    parser.add_argument("--moves", type=int, default=20, help="tenant moves to time")
    parser.add_argument("--interval", type=float, default=1.0,
                        help="change-feed poll interval of the watching process (s)")


async def _read_event(proc: asyncio.subprocess.Process, deadline: float) -> dict[str, Any]:
    """Next JSON line from the watcher process, with a deadline."""
    assert proc.stdout is not None
    text = await asyncio.wait_for(proc.stdout.readline(), deadline)
    if not text:
        raise RuntimeError("watcher exited")
    event: dict[str, Any] = json.loads(text)
    return event


@scenario("propagation", "commit of `tenant move` → another process routes to the new host",
          quick={"sites": 2_000, "moves": 5}, arguments=_propagation_arguments)
async def propagation(args: argparse.Namespace, run: Run) -> None:
    with database_for(args, "prop") as url:
        await provision(url, args.sites)
        hostname = "www.tenant1.example"  # tenant1 starts on b0002
        watcher = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "benchmarks.worker", "watch", "--database", url,
            "--hostname", hostname, "--interval", str(args.interval),
            stdout=asyncio.subprocess.PIPE)
        store = await open_store(url)
        service = DirectoryService(store)
        latencies: list[float] = []
        try:
            assert (await _read_event(watcher, 30))["event"] == "ready"
            current = (await _read_event(watcher, 30))["host"]
            hosts = [h.name for h in await store.list_hosts()]
            rng = random.Random(9)
            for _ in range(args.moves):
                # A random pause puts the commit at a random phase of the poll interval.
                await asyncio.sleep(rng.uniform(0.05, args.interval))
                target = rng.choice([h for h in hosts if h != current])
                await service.move_tenant("tenant1", target)
                committed = time.time()  # move_tenant returns after COMMIT
                event = await _read_event(watcher, 10 * args.interval + 5)
                if event.get("host") != target:
                    raise RuntimeError(f"watcher saw {event} after moving to {target}")
                latencies.append(event["t"] - committed)
                current = target
        finally:
            watcher.terminate()
            await watcher.wait()
            await store.close()
        stats = summary([x * 1000 for x in latencies])
        for key in ("p50", "p99", "max"):
            run.row(f"commit → routed to new host, {key} ({len(latencies)} moves)", stats[key],
                    "ms", ("poll interval", args.interval * 1000), digits=0)
        run.data.update(latency_ms=stats, samples_ms=[x * 1000 for x in latencies],
                        goal_ms=1000, interval=args.interval)


# -- rss ------------------------------------------------------------------------------------

def _rss_arguments(parser: argparse.ArgumentParser) -> None:
    _size_arguments(parser, 1_000_000)
    parser.add_argument("--small", type=int, default=1_000,
                        help="sites in the small directory compared against (default 1,000)")
    parser.add_argument("--repeat", type=int, default=3, help="worker starts per size")
    parser.add_argument("--database-small", default=None,
                        help="URL of a database already holding --small sites")


def _worker_rss(url: str, sites: int) -> dict[str, Any]:
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.worker", "rss", "--database", url,
         "--sites", str(sites)], capture_output=True, text=True, check=True, timeout=120)
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    total = time.perf_counter() - start  # spawn → imports → open → lookups → exit
    # Start-up = everything but the cold lookups (which depend on the database's page cache).
    result["startup_seconds"] = total - result["lookup_seconds"]
    return result


@scenario("rss", "RSS and start-up of a worker-like process: small vs large directory",
          quick={"sites": 20_000, "repeat": 2}, arguments=_rss_arguments)
async def rss(args: argparse.Namespace, run: Run) -> None:
    measured: dict[int, list[dict[str, Any]]] = {}
    small_args = argparse.Namespace(**{**vars(args), "database": args.database_small})
    with database_for(small_args, "rss_small") as small_url, \
            database_for(args, "rss_large") as large_url:
        for url, sites in ((small_url, args.small), (large_url, args.sites)):
            await provision(url, sites, progress=True)
        for _ in range(args.repeat):  # alternate sizes so drift affects both alike
            for url, sites in ((small_url, args.small), (large_url, args.sites)):
                result = await asyncio.to_thread(_worker_rss, url, sites)
                assert result["found"] == result["lookups"], result
                measured.setdefault(sites, []).append(result)
    small = statistics.median(r["rss_kib"] for r in measured[args.small]) / 1024
    large = statistics.median(r["rss_kib"] for r in measured[args.sites]) / 1024
    run.row(f"worker RSS, {args.sites:,} sites", large, "MiB",
            (f"{args.small:,} sites", small), digits=1)
    for label, key in (("open (store+Directory+feed)", "open_seconds"),
                       ("start-up (spawn → ready → exit, without lookups)", "startup_seconds"),
                       ("1000 cold route lookups", "lookup_seconds")):
        s = statistics.median(r[key] for r in measured[args.small]) * 1000
        large_value = statistics.median(r[key] for r in measured[args.sites]) * 1000
        run.row(f"{label}, {args.sites:,} sites", large_value, "ms",
                (f"{args.small:,} sites", s), digits=0)
    run.data.update(workers={str(k): v for k, v in measured.items()}, rss_mib_small=small,
                    rss_mib_large=large, goal="large within 10% of small")
