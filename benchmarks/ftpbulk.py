"""Focused FTP proxy benchmark: throughput, per-transfer overhead and a login burst, with the
proxy measured against a direct connection to the same pyftpdlib backend in the same run.

``.venv/bin/python -m benchmarks.ftpbulk [--mib 64] [--rounds 5] [--logins 300]
[--idle 1000] [--baseline DIR] [--only retr,stor,ftplib,curl,latency,logins,idle]``

Targets alternate round by round (direct, edge, and with ``--baseline DIR`` a second
``edge serve`` whose ``PYTHONPATH`` starts with DIR: a copy of the packages at another
revision, for before/after comparisons in one run). Per round and target: RETR and STOR of
``--mib`` MiB with ftplib (64 KiB blocks) and with curl; ``--latency`` RETRs of a 1-byte file
on one logged-in session (the fixed cost of a transfer: PASV, data connections, 150, 226);
``--logins`` clients connecting and logging in all at once (connect, USER, PASS, QUIT);
``--idle`` logged-in sessions held open (the server's memory per idle session).
Printed: medians and ranges, ratios against direct, and the server's CPU (the edge process
tree for edge targets, the backend for direct) per GB and per login. The backend is the
harness's (:func:`benchmarks.backends.start_ftp_backend`), the directory a small SQLite fleet.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ftplib
import io
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from benchmarks.backends import start_ftp_backend
from benchmarks.core import percentile
from benchmarks.fleet import FleetShape, attach_backends, provision_fleet
from benchmarks.logins import (
    FTP_PASSWORD,
    FTP_UPSTREAM,
    FTP_USER,
    Target,
    _ftp_login,
    _ftp_login_burst,
    _ftp_session,
    _service_call,
    ftp_edge_toml,
)
from benchmarks.procs import Child, start_edge
from edge.directory.service import DirectoryService

TINY = "tiny.bin"  # 1 byte, in the backend's home


def ftplib_retr(t: Target, size: int) -> None:
    _ftp_session(t, "retr", size)


def ftplib_stor(t: Target, size: int) -> None:
    name = f"up-{random.getrandbits(40):x}.bin"
    with contextlib.closing(_ftp_login(t)) as ftp:
        ftp.storbinary(f"STOR {name}", io.BytesIO(bytes(size)), blocksize=1 << 16)
        if ftp.size(name) != size:
            raise RuntimeError("STOR: wrong size on the backend")
        ftp.delete(name)
        ftp.quit()


def _curl(t: Target, *args: str) -> None:
    url = f"ftp://{t.user}:{FTP_PASSWORD}@{t.host}:{t.port}/"
    subprocess.run(["curl", "-sS", "--fail", "--max-time", "300", *args[:-1], url + args[-1]],
                   check=True, stdout=subprocess.DEVNULL)


def curl_retr(t: Target, size: int) -> None:
    _curl(t, "-o", "/dev/null", "big.bin")


def curl_stor(t: Target, size: int, payload: Path) -> None:
    name = f"upc-{random.getrandbits(40):x}.bin"
    _curl(t, "-T", str(payload), "-Q", f"-DELE {name}", name)


def tiny_latency(t: Target, count: int) -> list[float]:
    """Milliseconds per 1-byte RETR (PASV + RETR + 226) on one logged-in session."""
    out = []
    with contextlib.closing(_ftp_login(t)) as ftp:
        ftp.voidcmd("TYPE I")
        for _ in range(count):
            started = time.perf_counter()
            data = ftp.transfercmd(f"RETR {TINY}")
            while data.recv(65536):
                pass
            data.close()
            ftp.voidresp()
            out.append((time.perf_counter() - started) * 1000)
        ftp.quit()
    return out


async def idle_sessions_kib(t: Target, count: int) -> float:
    """KiB of server memory (RSS of the edge process tree; of the backend for direct) per idle
    logged-in session: ``count`` sessions opened 50 at a time, held, then closed with QUIT."""
    sessions: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def expect(reader: asyncio.StreamReader, code: bytes) -> None:
        while True:
            line = await asyncio.wait_for(reader.readline(), 60)
            if line[:3] != code:
                raise RuntimeError(f"expected {code.decode()}, got {line[:80]!r}")
            if line[3:4] == b" ":
                return

    async def one() -> None:
        reader, writer = await asyncio.open_connection(t.host, t.port)
        sessions.append((reader, writer))
        await expect(reader, b"220")
        writer.write(f"USER {t.user}\r\nPASS {FTP_PASSWORD}\r\n".encode())
        await expect(reader, b"331")
        await expect(reader, b"230")

    await asyncio.sleep(0.5)
    before = t.server.rss_kib()
    try:
        for start in range(0, count, 50):
            await asyncio.gather(*(one() for _ in range(min(50, count - start))))
        await asyncio.sleep(1.0)
        after = t.server.rss_kib()
    finally:
        for _reader, writer in sessions:
            writer.write(b"QUIT\r\n")
        for reader, writer in sessions:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(reader.read(), 10)
            writer.close()
    return (after - before) / count


def _rounds(values: list[float]) -> str:
    """Per-round values, in round order: single rounds swing widely on a shared machine."""
    return " ".join(f"{v:.2f}" for v in values)


def _fmt(values: list[float], digits: int = 1) -> str:
    if not values:
        return "-"
    return (f"{statistics.median(values):.{digits}f} "
            f"[{min(values):.{digits}f}-{max(values):.{digits}f}]")


@contextlib.asynccontextmanager
async def ftp_setup(args: argparse.Namespace) -> AsyncIterator[tuple[list[Target], Path]]:
    """The backend, the directory and the edge serve processes; yields the targets (direct
    first) and a sparse ``--mib`` MiB payload file for curl uploads."""
    shape = FleetShape.for_sites(100)
    size = args.mib << 20
    with tempfile.TemporaryDirectory(prefix="ftpbulk-") as folder:
        workdir = Path(folder)
        url = f"sqlite:///{workdir}/dir.sqlite3"
        await provision_fleet(url, shape)
        backend = await start_ftp_backend(workdir, [shape.host_address(0)], FTP_UPSTREAM,
                                          FTP_PASSWORD, big_bytes=size)
        (workdir / "ftp-home" / TINY).write_bytes(b"x")
        payload = workdir / "payload.bin"
        with payload.open("wb") as handle:
            handle.truncate(size)
        children: list[Child] = [backend]
        try:
            await attach_backends(url, shape, {"ftp": [backend.ports["0"]]}, hosts=[0])

            async def account(service: DirectoryService) -> None:
                await service.add_account(FTP_USER, "tenant0", protocols=["ftp"],
                                          upstream_username=FTP_UPSTREAM)
            await _service_call(url, account)
            targets = [Target("direct", shape.host_address(0), backend.ports["0"], FTP_UPSTREAM,
                              backend)]
            editions = [("edge", "")] + ([("base", args.baseline)] if args.baseline else [])
            for name, pythonpath in editions:
                sub = workdir / name
                sub.mkdir()
                toml = ftp_edge_toml(url)
                child = await start_edge(sub, toml, expect=["ftp"], pythonpath=pythonpath)
                children.append(child)
                targets.append(Target(name, "127.0.0.1", child.ports["ftp"], FTP_USER, child))
            yield targets, payload
        finally:
            for child in reversed(children):
                await asyncio.to_thread(child.stop)


async def main_async(args: argparse.Namespace) -> None:
    async with ftp_setup(args) as (targets, payload):
        await _measure(args, targets, args.mib << 20, payload)


async def _measure(args: argparse.Namespace, targets: list[Target], size: int,
                   payload: Path) -> None:
    mbps: dict[tuple[str, str], list[float]] = defaultdict(list)
    cpu_gb: dict[tuple[str, str], list[float]] = defaultdict(list)
    lat: dict[str, list[float]] = defaultdict(list)
    lat_p50: dict[str, list[float]] = defaultdict(list)  # per round
    lat_cpu: dict[str, list[float]] = defaultdict(list)  # server CPU ms per transfer, per round
    burst_total: dict[str, list[float]] = defaultdict(list)
    burst_ms: dict[str, list[float]] = defaultdict(list)
    cpu_login: dict[str, list[float]] = defaultdict(list)
    idle_kib: dict[str, list[float]] = defaultdict(list)
    ops: list[tuple[str, Callable[[Target, int], None]]] = [
        ("RETR ftplib", ftplib_retr), ("STOR ftplib", ftplib_stor),
        ("RETR curl", curl_retr), ("STOR curl", lambda t, n: curl_stor(t, n, payload))]
    ops = [op for op in ops if op[0].split()[0].lower() in args.only
           and op[0].split()[1] in args.only]
    if "idle" in args.only:
        # Once, first, on fresh processes: later, memory freed by earlier rounds' sessions
        # is reused and RSS no longer grows.
        for t in targets:
            idle_kib[t.name].append(await idle_sessions_kib(t, args.idle))
    for rnd in range(args.rounds):
        order = targets[rnd % len(targets):] + targets[:rnd % len(targets)]
        for what, op in ops:
            for t in order:
                before = t.server.cpu()
                started = time.perf_counter()
                await asyncio.to_thread(op, t, size)
                seconds = time.perf_counter() - started
                mbps[(what, t.name)].append(size / seconds / 1e6)
                cpu_gb[(what, t.name)].append((t.server.cpu() - before) / size * 1e9)
        if "latency" in args.only:
            for t in order:
                try:
                    before = t.server.cpu()
                    got = await asyncio.to_thread(tiny_latency, t, args.latency)
                    lat_cpu[t.name].append((t.server.cpu() - before) / len(got) * 1000)
                    lat[t.name] += got
                    lat_p50[t.name].append(statistics.median(got))
                except ftplib.Error as exc:  # e.g. a proxy out of passive ports: say which
                    print(f"  {t.name}: 1-byte RETRs failed: {exc}", file=sys.stderr)
        if "logins" in args.only:
            for t in order:
                burst = await _ftp_login_burst(t, args.logins)
                if burst.failures:
                    print(f"  {t.name}: {burst.failures} logins failed, first: "
                          f"{burst.first_error}", file=sys.stderr)
                burst_total[t.name].append(burst.seconds)
                burst_ms[t.name] += burst.latencies_ms
                cpu_login[t.name].append(burst.server_cpu / max(1, len(burst.latencies_ms)) * 1000)
                await asyncio.sleep(0.5)
        print(f"round {rnd + 1}/{args.rounds} done, load {os.getloadavg()[0]:.2f}",
              file=sys.stderr, flush=True)
    names = [t.name for t in targets]
    print(f"\nload average {os.getloadavg()}, {args.mib} MiB, {args.rounds} rounds; "
          "median [min-max]; ratio = median of per-round target/direct; server CPU: the "
          "clock tick is 10 ms, so per-round values are coarse: the mean is over all rounds")
    for what, _ in ops:
        print(f"\n{what} MB/s")
        for n in names:
            ratios = [a / b for a, b in zip(mbps[(what, n)], mbps[(what, 'direct')], strict=True)]
            print(f"  {n:7} {_fmt(mbps[(what, n)], 0):>22}  ratio {_fmt(ratios, 2):>18}  "
                  f"server CPU s/GB {_fmt(cpu_gb[(what, n)], 2)} "
                  f"mean {statistics.fmean(cpu_gb[(what, n)]):.3f}")
            if n != "direct":
                print(f"          per-round ratios {_rounds(ratios)}")
    if lat:
        print(f"\n1-byte RETR on a logged-in session, ms ({args.latency} per round)")
        for n in names:
            print(f"  {n:7} p50 {percentile(lat[n], 50):6.2f}  p90 {percentile(lat[n], 90):6.2f}"
                  f"  ratio p50 {percentile(lat[n], 50) / percentile(lat['direct'], 50):.2f}"
                  f"  server CPU ms/transfer mean {statistics.fmean(lat_cpu[n]):.3f}")
            if n != "direct" and len(lat_p50[n]) == len(lat_p50["direct"]):
                print("          per-round p50 ratios "
                      + _rounds([a / b for a, b in zip(lat_p50[n], lat_p50["direct"], strict=True)]))
    if burst_total:
        print(f"\n{args.logins} clients logging in at once")
        for n in names:
            ratios = [a / b for a, b in zip(burst_total[n], burst_total["direct"], strict=True)]
            print(f"  {n:7} total s {_fmt(burst_total[n], 3):>22}  ratio {_fmt(ratios, 2):>18}  "
                  f"p50 {percentile(burst_ms[n], 50):6.1f} ms  p99 {percentile(burst_ms[n], 99):6.1f}"
                  f" ms  server CPU ms/login {_fmt(cpu_login[n], 2)} "
                  f"mean {statistics.fmean(cpu_login[n]):.3f}")
            if n != "direct":
                print(f"          per-round ratios {_rounds(ratios)}")

    if idle_kib:
        print(f"\n{args.idle} idle logged-in sessions on fresh servers: RSS growth per session, "
              "KiB (edge: the proxy's process tree, not the backend's sessions behind it)")
        for n in names:
            print(f"  {n:7} {statistics.median(idle_kib[n]):6.1f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ftpbulk", description=__doc__)
    parser.add_argument("--mib", type=int, default=64, help="MiB per RETR/STOR")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--latency", type=int, default=50, help="1-byte RETRs per round")
    parser.add_argument("--logins", type=int, default=300, help="clients in a login burst")
    parser.add_argument("--idle", type=int, default=1000,
                        help="idle logged-in sessions held to measure memory per session")
    parser.add_argument("--baseline", default="",
                        help="also run an edge serve with this directory first on PYTHONPATH")
    parser.add_argument("--only", default="retr,stor,ftplib,curl,latency,logins,idle",
                        help="comma-separated subset: retr stor ftplib curl latency logins idle")
    args = parser.parse_args(argv)
    args.only = set(args.only.split(","))
    if {"ftplib", "curl"}.isdisjoint(args.only):
        args.only |= {"ftplib", "curl"} if {"retr", "stor"} & args.only else set()
    if {"retr", "stor"}.isdisjoint(args.only) and {"ftplib", "curl"} & args.only:
        args.only |= {"retr", "stor"}
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()

__all__ = ["main"]
