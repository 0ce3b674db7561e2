"""Many mostly idle connections: does a worker give back what they cost?

``python -m benchmarks.idle [--connections 10000] [--workers 1] [--hold 5] [--soak SECONDS]``

Starts ``edge serve`` (SQLite directory, HTTP + SSH + FTP listeners) with a tiny in-process
HTTP backend, then opens ``--connections`` client connections spread evenly over the three
protocols, and round-robin over ``--sources`` loopback source addresses (127.1.x.y) so the
default per-IP caps (``[limits] max_unauthenticated_per_ip = 20``, ``max_connections_per_ip =
200``, ``[http] max_connections_per_ip = 256``) are not what is measured: the configuration
is the default one except ``login_grace_time`` (raised past ``--hold``: the default 30 s would
cut the idle SSH/FTP logins), no access log and a 1 s backend pool idle time.

* HTTP: one ``GET`` answered through the backend, then idle on keep-alive;
* SSH: banner exchanged, then idle before key exchange (a client that connected and waits);
* FTP: ``220`` greeting read, then idle before ``USER``.

It samples every worker's RSS and open file descriptors, and the proxy's own
``edge_active_sessions`` (from ``/metrics``; an SSH connection counts only once logged in,
so the SSH ones here are not in it), before, while all are open, and after they are
closed, and prints whether RSS and fds came back to within 10 % of the baseline. asyncio task
counts are not exposed by a worker, so ``edge_active_sessions`` stands for them.
``--soak S`` then keeps a third of the connections open for S seconds while cycling the rest
(connect, exchange, close) and samples RSS every second: a leak shows as a steady climb.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from benchmarks.procs import Child, descendants, edge_toml, rss_kib, scratch, start_edge

PROTOCOLS = ("http", "ssh", "ftp")
SITE = "idle.bench.test"
POOL_IDLE = 1.0
"""The HTTP backend pool's idle timeout here: its kept connections are not the clients'."""
SLACK = 0.10
"""How far above the baseline RSS and fds may stay after every connection closed."""


@dataclass(frozen=True)
class Sample:
    label: str
    rss_kib: int
    fds: int
    sessions: int


def fd_count(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def raise_nofile(needed: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, needed))
    if want > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return want


async def start_backend() -> tuple[asyncio.Server, int]:
    """An HTTP/1.1 backend answering every request head with a 2-byte body."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            while await reader.readuntil(b"\r\n\r\n"):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def provision(database: str, backend_port: int) -> None:
    from edge.directory.service import DirectoryService
    from edge.directory.stores import store_for_url

    store = store_for_url(database)
    await store.open()
    try:
        await store.migrate()
        service = DirectoryService(store, None)
        await service.add_host("idle-host", "127.0.0.1", http_port=backend_port)
        await service.add_tenant("idle", "idle-host")
        await service.add_site(SITE, "idle")
    finally:
        await store.close()


async def init_ssh_keys(workdir: Path, config: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "import sys; from edge.cli.main import main; sys.exit(main())",
        "--config", str(config), "init", "--ssh-keys", cwd=workdir,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    _, err = await proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"edge init --ssh-keys failed: {err.decode(errors='replace')}")


def source_addresses(count: int) -> list[str]:
    """``count`` loopback addresses outside 127.0.0.x (Linux routes all of 127/8 to lo)."""
    return [f"127.1.{i // 250}.{i % 250 + 1}" for i in range(count)]


async def open_one(protocol: str, port: int, source: str) -> asyncio.StreamWriter:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    if protocol == "http":
        writer.write(b"GET / HTTP/1.1\r\nHost: " + SITE.encode() + b"\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        await reader.readexactly(2)
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"HTTP answered {head[:40]!r}")
    elif protocol == "ssh":
        writer.write(b"SSH-2.0-idle_bench\r\n")
        banner = await reader.readline()
        if not banner.startswith(b"SSH-2.0-"):
            raise RuntimeError(f"SSH answered {banner[:40]!r}")
    else:
        greeting = await reader.readline()
        if not greeting.startswith(b"220"):
            raise RuntimeError(f"FTP answered {greeting[:40]!r}")
    writer.transport.pause_reading()  # idle: whatever comes next (SSH KEXINIT) stays unread
    return writer


async def open_many(count: int, ports: dict[str, int], sources: Sequence[str],
                    concurrency: int = 200) -> list[asyncio.StreamWriter]:
    gate = asyncio.Semaphore(concurrency)

    kinds = list(ports)

    async def one(i: int) -> asyncio.StreamWriter:
        kind = kinds[i % len(kinds)]
        source = sources[(i // len(kinds)) % len(sources)]
        async with gate:
            return await asyncio.wait_for(open_one(kind, ports[kind], source), 60)

    return list(await asyncio.gather(*(one(i) for i in range(count))))


async def close_all(writers: Sequence[asyncio.StreamWriter]) -> None:
    for writer in writers:
        writer.close()
    await asyncio.gather(*(w.wait_closed() for w in writers), return_exceptions=True)


async def active_sessions(admin_port: int) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", admin_port)
    writer.write(b"GET /metrics HTTP/1.0\r\n\r\n")
    text = (await asyncio.wait_for(reader.read(), 10)).decode(errors="replace")
    writer.close()
    return int(sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("edge_active_sessions{")))


def worker_pids(edge: Child) -> list[int]:
    """The workers (every process under the master), not the master itself."""
    return [pid for pid in descendants(edge.pid) if pid != edge.pid]


async def sample(label: str, edge: Child) -> Sample:
    workers = worker_pids(edge)
    return Sample(label, sum(rss_kib(p) for p in workers), sum(fd_count(p) for p in workers),
                  await active_sessions(edge.ports["admin"]))


async def settle(edge: Child, limit: float = 30.0) -> None:
    """Wait until the proxy's session count stops changing (opens and closes are seen
    asynchronously; metrics reach the master once a second)."""
    deadline = time.monotonic() + limit
    last = -1
    while time.monotonic() < deadline:
        now = await active_sessions(edge.ports["admin"])
        if now == last:
            return
        last = now
        await asyncio.sleep(1.5)


async def soak(edge: Child, ports: dict[str, int], sources: Sequence[str], connections: int,
               seconds: float) -> list[int]:
    """A third held open, the rest cycled, RSS sampled each second; returns the RSS series."""
    held = await open_many(connections // 3, ports, sources)
    series: list[int] = []
    stop = time.monotonic() + seconds
    while time.monotonic() < stop:
        batch = await open_many(max(3, connections // 30), ports, sources)
        await close_all(batch)
        series.append(sum(rss_kib(p) for p in worker_pids(edge)))
        await asyncio.sleep(1)
    await close_all(held)
    return series


async def one_round(edge: Child, ports: dict[str, int], args: argparse.Namespace,
                    round_no: int) -> tuple[float, Sample, Sample]:
    """Open every connection, hold them idle, close them; (seconds to open, during, after)."""
    started = time.perf_counter()
    writers = await open_many(args.connections, ports, source_addresses(args.sources))
    opened = time.perf_counter() - started
    await settle(edge)
    await asyncio.sleep(args.hold)
    during = await sample(f"{round_no}: {args.hold:g} s idle", edge)
    await close_all(writers)
    await settle(edge)
    await asyncio.sleep(POOL_IDLE + 2)  # pooled backend connections closed too
    return opened, during, await sample(f"{round_no}: after close", edge)


def returned(before: Sample, after: Sample) -> bool:
    return (after.rss_kib <= before.rss_kib * (1 + SLACK)
            and after.fds <= before.fds * (1 + SLACK) and after.sessions <= before.sessions)


async def run(args: argparse.Namespace) -> int:
    limit = raise_nofile(args.connections + 1000)
    if limit < args.connections + 100:
        print(f"RLIMIT_NOFILE hard limit {limit} is below --connections {args.connections}")
        return 2
    backend, backend_port = await start_backend()
    with scratch("idle") as tmp:
        workdir = Path(tmp)
        database = f"sqlite:///{workdir / 'edge.sqlite3'}"
        await provision(database, backend_port)
        big = float(args.hold + 600)
        toml = edge_toml(database, {
            "limits": {"login_grace_time": big},
            "http": {"listen": ["127.0.0.1:0"], "access_log": "off",
                     "pool_idle_timeout": POOL_IDLE},
            "ssh": {"listen": ["127.0.0.1:0"], "host_key_dir": str(workdir / "keys")},
            "ftp": {"listen": ["127.0.0.1:0"]},
        })
        (workdir / "edge.toml").write_text(toml)
        await init_ssh_keys(workdir, workdir / "edge.toml")
        async with await start_edge(workdir, toml, workers=args.workers,
                                    expect=PROTOCOLS) as edge:
            ports = {p: edge.ports[p] for p in args.protocols}
            await asyncio.sleep(1)
            before = await sample("before", edge)
            samples = [before]
            opened = 0.0
            for round_no in range(1, args.rounds + 1):
                seconds, during, after = await one_round(edge, ports, args, round_no)
                opened = opened or seconds
                samples += [during, after]
            report(args, samples, opened)
            ok = returned(before, samples[-1])
            print(f"returned to baseline (RSS and fds within {SLACK:.0%}, no extra sessions): "
                  f"{'yes' if ok else 'NO'}")
            if args.rounds > 1:
                first, last = samples[2], samples[-1]
                stable = last.rss_kib <= first.rss_kib * (1 + SLACK) and last.fds <= first.fds
                print(f"after round {args.rounds} vs round 1 (RSS within {SLACK:.0%}, fds): "
                      f"{'stable' if stable else 'GROWING'} ({first.rss_kib / 1024:.1f} → "
                      f"{last.rss_kib / 1024:.1f} MiB)")
            if args.soak:
                series = await soak(edge, ports, source_addresses(args.sources),
                                    args.connections, args.soak)
                print(f"soak {args.soak:g} s: RSS KiB first {series[0]}, max {max(series)}, "
                      f"last {series[-1]} ({len(series)} samples)")
    backend.close()
    return 0


def report(args: argparse.Namespace, samples: list[Sample], opened: float) -> None:
    n = args.connections
    kinds = {"http": "HTTP keep-alive", "ssh": "SSH pre-kex", "ftp": "FTP pre-USER"}
    print(f"{n} connections (evenly {', '.join(kinds[p] for p in args.protocols)}) "
          f"on {args.workers} worker(s), opened in {opened:.1f} s")
    print(f"{'':<24}{'worker RSS MiB':>16}{'fds':>8}{'sessions':>10}")
    for s in samples:
        print(f"{s.label:<24}{s.rss_kib / 1024:>16.1f}{s.fds:>8}{s.sessions:>10}")
    base, during = samples[0], samples[1]
    if n:
        print(f"per connection: {(during.rss_kib - base.rss_kib) * 1024 / n:.0f} bytes RSS, "
              f"{(during.fds - base.fds) / n:.2f} fds")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.idle", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", type=int, default=10000)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--sources", type=int, default=1000,
                        help="loopback source addresses the clients spread over (per-IP caps)")
    parser.add_argument("--protocols", type=lambda v: v.split(","), default=list(PROTOCOLS),
                        help="comma-separated subset of http,ssh,ftp (default: all three)")
    parser.add_argument("--hold", type=float, default=5.0, help="seconds all stay open idle")
    parser.add_argument("--rounds", type=int, default=2,
                        help="open/hold/close this many times (growth after round 1 = leak)")
    parser.add_argument("--soak", type=float, default=0.0, help="then cycle for this long")
    args = parser.parse_args(argv)
    if not args.protocols or set(args.protocols) - set(PROTOCOLS):
        parser.error("--protocols: a comma-separated subset of http,ssh,ftp")
    if not 1 <= args.sources <= 250 * 256:
        parser.error("--sources: 1 to 64000")
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
