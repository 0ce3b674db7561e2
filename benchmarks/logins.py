"""``ssh`` and ``ftp``: concurrent logins and bulk transfers through ``edge serve`` next to the
same client talking to the same backend directly (stock OpenSSH ``ssh``/``scp`` against a
real ``sshd``; ``ftplib`` against pyftpdlib)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ftplib
import getpass
import io
import random
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.backends import host_key_line, start_ftp_backend, start_sshd
from benchmarks.core import Run, database_for, scenario, summary
from benchmarks.fleet import (
    BENCH_SECRET_KEY,
    FleetShape,
    attach_backends,
    progress_bar,
    provision_fleet,
)
from benchmarks.procs import Child, edge_toml, proxy_missing, scratch, start_edge, tool_missing
from edge.directory.service import DirectoryService
from edge.directory.stores import store_for_url

SSH_OPTIONS = ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
               "-o", "BatchMode=yes", "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=30",
               "-o", "IdentitiesOnly=yes", "-o", "ControlMaster=no", "-o", "ControlPath=none"]


@dataclass
class Target:
    """Where a client logs in: the proxy, or the backend directly."""

    name: str
    host: str
    port: int
    user: str
    server: Child


@dataclass
class Batch:
    """Outcome of ``count`` operations at ``concurrency``."""

    latencies_ms: list[float]
    failures: int
    seconds: float
    first_error: str = ""
    server_cpu: float = 0.0
    nbytes: int = 0

    @property
    def rate(self) -> float:
        return len(self.latencies_ms) / self.seconds if self.seconds else 0.0

    @property
    def mb_per_s(self) -> float:
        return self.nbytes / self.seconds / 1e6 if self.seconds else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"ok": len(self.latencies_ms), "failures": self.failures, "seconds": self.seconds,
                "rate_per_s": self.rate, "latency_ms": summary(self.latencies_ms),
                "latencies_ms": self.latencies_ms, "first_error": self.first_error,
                "server_cpu_seconds": self.server_cpu, "bytes": self.nbytes,
                "mb_per_s": self.mb_per_s}


async def batch(count: int, concurrency: int, op: Callable[[int], Awaitable[None]],
                server: Child | None = None, *, limit: float = 600.0, nbytes: int = 0,
                progress: Callable[[str], None] | None = None) -> Batch:
    """Run ``op(i)`` for i < count, ``concurrency`` at a time, bounded by ``limit`` seconds;
    ``progress`` gets a progress-bar line every 10 s."""
    latencies: list[float] = []
    failures = [0]
    first_error = [""]
    numbers = iter(range(count))
    deadline = time.monotonic() + limit

    async def worker() -> None:
        for i in numbers:
            if time.monotonic() > deadline:
                return
            start = time.perf_counter()
            try:
                await op(i)
            except Exception as exc:
                failures[0] += 1
                first_error[0] = first_error[0] or f"{type(exc).__name__}: {str(exc)[:300]}"
                continue
            latencies.append((time.perf_counter() - start) * 1000)

    async def report() -> None:
        while progress is not None:
            await asyncio.sleep(10)
            done = len(latencies) + failures[0]
            progress(f"{progress_bar(done, count)} {done}/{count} "
                     f"({failures[0]} failed)")

    before = server.cpu() if server else 0.0
    started = time.perf_counter()
    reporter = asyncio.create_task(report())
    try:
        await asyncio.gather(*(worker() for _ in range(max(1, concurrency))))
    finally:
        reporter.cancel()
    elapsed = time.perf_counter() - started
    return Batch(latencies, failures[0], elapsed, first_error[0],
                 (server.cpu() - before) if server else 0.0, nbytes * len(latencies))


async def _run(argv: list[str], stdin: Path | None = None, limit: float = 300.0) -> None:
    handle = stdin.open("rb") if stdin else None
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=handle or subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE)
        try:
            _, err = await asyncio.wait_for(proc.communicate(), limit)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise
    finally:
        if handle:
            handle.close()
    if proc.returncode:
        raise RuntimeError(f"{argv[0]} exited {proc.returncode}: {err.decode(errors='replace')[-300:]}")


def _report(run: Run, what: str, results: dict[str, Batch], unit: str = "logins/s") -> None:
    edge, direct = results.get("edge"), results["direct"]

    def value(b: Batch) -> float:
        return b.mb_per_s if unit == "MB/s" else b.rate
    if edge is not None:
        run.row(f"{what} via edge", value(edge), unit, ("direct", value(direct)), digits=1)
        run.row(f"{what} via edge p50", edge.as_dict()["latency_ms"]["p50"], "ms",
                ("direct", direct.as_dict()["latency_ms"]["p50"]), digits=1)
        run.row(f"{what} via edge p99", edge.as_dict()["latency_ms"]["p99"], "ms",
                ("direct", direct.as_dict()["latency_ms"]["p99"]), digits=1)
        run.row(f"{what} via edge failed", edge.failures, "", digits=0)
        if edge.server_cpu and unit == "MB/s" and edge.nbytes:
            run.row(f"{what}: edge CPU per GB", edge.server_cpu / edge.nbytes * 1e9, "s",
                    ("backend per GB, direct", direct.server_cpu / direct.nbytes * 1e9
                     if direct.nbytes else 0.0))
    else:
        run.row(f"{what} direct", value(direct), unit, digits=1)
        run.row(f"{what} direct p99", direct.as_dict()["latency_ms"]["p99"], "ms", digits=1)
    run.row(f"{what} direct failed", direct.failures, "", digits=0)


def _login_arguments(parser: argparse.ArgumentParser, logins: int, bulk_mb: int) -> None:
    parser.add_argument("--sites", type=int, default=10_000, help="sites in the fleet")
    parser.add_argument("--logins", type=int, default=logins, help="logins per target")
    parser.add_argument("--concurrency", type=int, default=10, help="clients at once")
    parser.add_argument("--bulk-mb", type=int, default=bulk_mb, help="MiB per bulk transfer")
    parser.add_argument("--transfers", type=int, default=3, help="bulk transfers per target")
    parser.add_argument("--workers", type=int, default=1, help="edge serve --workers")


@contextlib.asynccontextmanager
async def small_fleet(args: argparse.Namespace, run: Run, tag: str,
                      ) -> AsyncIterator[tuple[str, FleetShape, Path]]:
    shape = FleetShape.for_sites(args.sites)
    with database_for(args, tag) as url, scratch(tag) as folder:
        run.progress(f"provisioning {shape.sites:,} sites, {shape.accounts:,} accounts")
        run.data["fleet"] = {"shape": shape.as_dict(),
                             "load": await provision_fleet(url, shape, progress=True)}
        yield url, shape, Path(folder)


async def _service_call(url: str, call: Callable[[DirectoryService], Awaitable[Any]]) -> None:
    store = store_for_url(url)
    await store.open()
    try:
        await call(DirectoryService(store))
    finally:
        await store.close()


# -- ssh ------------------------------------------------------------------------------------

async def ssh_keygen(path: Path) -> str:
    """A new ed25519 key at ``path`` (in a fresh scratch folder); returns the public line."""
    await _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", path.name, "-f", str(path)])
    return path.with_suffix(".pub").read_text().strip()


@dataclass
class SshSetup:
    """sshd on host 0 of the fleet, keys, and (if built) edge serve with the ssh proxy."""

    direct: Target
    edge: Target | None
    client_key: Path
    sshd: Child
    edge_child: Child | None = None


@contextlib.asynccontextmanager
async def ssh_setup(run: Run, url: str, shape: FleetShape, workdir: Path, workers: int,
                    *, tenant: int = 0, extra_toml: dict[str, dict[str, Any]] | None = None,
                    also: tuple[str, ...] = ()) -> AsyncIterator[SshSetup]:
    """Start sshd on every host of the fleet, add account ``benchssh`` (tenant ``tenant``,
    upstream user = this user, the client's key), pin sshd's host key, start edge serve with
    the ssh proxy (and the listeners in ``also``, configured through ``extra_toml``)."""
    keys = workdir / "keys"
    keys.mkdir(exist_ok=True)
    client_pub = await ssh_keygen(keys / "client")
    host_keys = workdir / "ssh_host_keys"
    host_keys.mkdir(exist_ok=True)
    await ssh_keygen(host_keys / "ssh_host_ed25519_key")
    upstream_pub = await ssh_keygen(host_keys / "upstream_key")
    user = getpass.getuser()
    index = shape.tenant_host(tenant)
    sshd = await start_sshd(workdir, [shape.host_address(i) for i in range(shape.hosts)],
                            f"{client_pub}\n{upstream_pub}\n")
    async with sshd:
        pinned = host_key_line(workdir)
        await attach_backends(url, shape, {"ssh": [sshd.ports[str(i)]
                                                   for i in range(shape.hosts)]})

        async def account(service: DirectoryService) -> None:
            for i in range(shape.hosts):
                await service.update_host(shape.host_name(i), ssh_known_hosts=pinned)
            with contextlib.suppress(Exception):
                await service.remove_account("benchssh")
            await service.add_account("benchssh", f"tenant{tenant}", protocols=["ssh"],
                                      upstream_username=user, authorized_keys=client_pub)

        await _service_call(url, account)
        direct = Target("direct", shape.host_address(index), sshd.ports[str(index)], user, sshd)
        missing = proxy_missing("ssh")
        if missing:
            run.skip("edge ssh", missing)
            yield SshSetup(direct, None, keys / "client", sshd)
            return
        sections: dict[str, dict[str, Any]] = {
            "ssh": {"listen": ["127.0.0.1:0"], "host_key_dir": str(host_keys),
                    "max_sessions_per_user": 10_000},
            "limits": {"max_unauthenticated_per_ip": 10_000, "max_connections_per_ip": 10_000,
                       "max_failures_per_ip": 10_000, "max_failures_per_user": 10_000,
                       "max_failures_per_ip_user": 10_000}}
        for name, values in (extra_toml or {}).items():
            sections.setdefault(name, {}).update(values)
        toml = edge_toml(url, sections, secret=BENCH_SECRET_KEY)
        async with await start_edge(workdir, toml, workers=workers,
                                    expect=["ssh", *also]) as edge:
            yield SshSetup(direct, Target("edge", "127.0.0.1", edge.ports["ssh"], "benchssh",
                                          edge), keys / "client", sshd, edge)


def ssh_argv(target: Target, key: Path, *command: str) -> list[str]:
    return ["ssh", *SSH_OPTIONS, "-i", str(key), "-p", str(target.port),
            f"{target.user}@{target.host}", *command]


@scenario("ssh", "concurrent SSH logins and bulk transfers (ssh 'cat > /dev/null', scp): "
                 "stock OpenSSH through edge vs directly to the same sshd",
          quick={"sites": 1_000, "logins": 10, "concurrency": 5, "bulk_mb": 8, "transfers": 1},
          arguments=lambda p: _login_arguments(p, 200, 256))
async def ssh(args: argparse.Namespace, run: Run) -> None:
    missing = tool_missing("ssh", "scp", "ssh-keygen", "/usr/sbin/sshd")
    if missing:
        run.skip("*", missing)
        return
    async with small_fleet(args, run, "ssh") as (url, shape, workdir), \
            ssh_setup(run, url, shape, workdir, args.workers) as setup:
        payload = workdir / "payload.bin"
        with payload.open("wb") as handle:
            handle.truncate(args.bulk_mb << 20)  # sparse: reading it costs no disk I/O
        targets = [t for t in (setup.direct, setup.edge) if t is not None]
        logins: dict[str, Batch] = {}
        cats: dict[str, Batch] = {}
        scps: dict[str, Batch] = {}
        for t in targets:
            run.progress(f"{t.name}: {args.logins} logins, {args.concurrency} at a time")

            async def login(i: int, t: Target = t) -> None:
                await _run(ssh_argv(t, setup.client_key, "true"), limit=120)
            logins[t.name] = await batch(args.logins, args.concurrency, login, t.server,
                                         progress=run.progress)

            async def cat(i: int, t: Target = t) -> None:
                await _run(ssh_argv(t, setup.client_key, "cat > /dev/null"), stdin=payload)
            run.progress(f"{t.name}: {args.transfers} x {args.bulk_mb} MiB ssh 'cat > /dev/null'")
            cats[t.name] = await batch(args.transfers, 1, cat, t.server,
                                       nbytes=args.bulk_mb << 20)

            async def scp(i: int, t: Target = t) -> None:
                await _run(["scp", "-q", *SSH_OPTIONS, "-i", str(setup.client_key), "-P",
                            str(t.port), str(payload), f"{t.user}@{t.host}:/dev/null"])
            run.progress(f"{t.name}: {args.transfers} x {args.bulk_mb} MiB scp")
            scps[t.name] = await batch(args.transfers, 1, scp, t.server,
                                       nbytes=args.bulk_mb << 20)
        _report(run, "SSH logins", logins)
        _report(run, "ssh 'cat > /dev/null'", cats, "MB/s")
        _report(run, "scp upload", scps, "MB/s")
        run.data.update(logins={k: v.as_dict() for k, v in logins.items()},
                        cat={k: v.as_dict() for k, v in cats.items()},
                        scp={k: v.as_dict() for k, v in scps.items()},
                        workers=args.workers, bulk_mib=args.bulk_mb)


# -- ftp ------------------------------------------------------------------------------------

FTP_USER, FTP_UPSTREAM, FTP_PASSWORD = "benchftp", "benchftp-up", "bench-password"


def ftp_edge_toml(url: str) -> str:
    """``edge.toml`` for an FTP load test: one listener, 1,000 random passive ports, and limits
    no benchmark burst reaches (every client comes from 127.0.0.1)."""
    low = random.randrange(15_000, 30_000)
    return edge_toml(url, {
        "ftp": {"listen": ["127.0.0.1:0"], "passive_ports": [low, low + 999]},
        "limits": {"max_unauthenticated_per_ip": 10_000, "max_connections_per_ip": 10_000,
                   "max_failures_per_ip": 10_000, "max_failures_per_user": 10_000,
                   "max_failures_per_ip_user": 10_000}},
        secret=BENCH_SECRET_KEY)


def _ftp_login(target: Target) -> ftplib.FTP:
    ftp = ftplib.FTP()
    ftp.connect(target.host, target.port, timeout=60)
    ftp.login(target.user, FTP_PASSWORD)
    return ftp


def _ftp_session(target: Target, action: str, nbytes: int) -> None:
    ftp = _ftp_login(target)
    try:
        if action == "retr":
            got = [0]

            def sink(block: bytes) -> None:
                got[0] += len(block)
            ftp.retrbinary("RETR big.bin", sink, blocksize=1 << 16)
            if got[0] != nbytes:
                raise RuntimeError(f"RETR got {got[0]} bytes, expected {nbytes}")
        elif action == "stor":
            ftp.storbinary(f"STOR up-{random.getrandbits(40):x}.bin",
                           io.BytesIO(bytes(nbytes)), blocksize=1 << 16)
        ftp.quit()
    finally:
        ftp.close()


async def _ftp_login_burst(target: Target, count: int) -> Batch:
    """``count`` clients connecting and logging in at the same moment (connect, 220, USER,
    PASS, 230; then QUIT): the issue's "300 clients connect+login". Latencies are connect →
    230 per client, ``seconds`` the whole burst."""
    gate = asyncio.Event()

    async def one() -> float:
        await gate.wait()
        started = time.perf_counter()
        reader, writer = await asyncio.open_connection(target.host, target.port)
        try:
            async def expect(code: bytes) -> None:
                while True:
                    try:
                        line = await asyncio.wait_for(reader.readline(), 60)
                    except TimeoutError:
                        raise TimeoutError(f"no {code.decode()} within 60 s") from None
                    if line[:3] != code:
                        raise RuntimeError(f"expected {code.decode()}, got {line[:80]!r}")
                    if line[3:4] == b" ":
                        return
            await expect(b"220")
            writer.write(f"USER {target.user}\r\n".encode())
            await expect(b"331")
            writer.write(f"PASS {FTP_PASSWORD}\r\n".encode())
            await expect(b"230")
            elapsed = (time.perf_counter() - started) * 1000
            writer.write(b"QUIT\r\n")
            with contextlib.suppress(Exception):
                await asyncio.wait_for(reader.read(), 10)
            return elapsed
        finally:
            writer.close()

    tasks = [asyncio.create_task(one()) for _ in range(count)]
    await asyncio.sleep(0.2)  # every client waiting at the gate
    before = target.server.cpu()
    started = time.perf_counter()
    gate.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    seconds = time.perf_counter() - started
    ok = [r for r in results if isinstance(r, float)]
    errors = [r for r in results if not isinstance(r, float)]
    return Batch(ok, len(errors), seconds, f"{errors[0]!r}"[:300] if errors else "",
                 target.server.cpu() - before)


def _merged(batches: list[Batch]) -> Batch:
    """One Batch from several run at different times (times, CPU and bytes added up)."""
    return Batch([ms for b in batches for ms in b.latencies_ms], sum(b.failures for b in batches),
                 sum(b.seconds for b in batches),
                 next((b.first_error for b in batches if b.first_error), ""),
                 sum(b.server_cpu for b in batches), sum(b.nbytes for b in batches))


def _ftp_arguments(parser: argparse.ArgumentParser) -> None:
    _login_arguments(parser, 200, 64)
    parser.add_argument("--burst", type=int, default=300,
                        help="clients connecting and logging in at once")


@scenario("ftp", "concurrent FTP logins (sequenced and all at once) and RETR/STOR bulk transfers "
                 "(ftplib): through edge vs directly to the same pyftpdlib",
          quick={"sites": 1_000, "logins": 10, "concurrency": 5, "transfers": 2, "bulk_mb": 8,
                 "burst": 20},
          arguments=_ftp_arguments)
async def ftp(args: argparse.Namespace, run: Run) -> None:
    async with small_fleet(args, run, "ftp") as (url, shape, workdir):
        backend = await start_ftp_backend(workdir, [shape.host_address(i)
                                                    for i in range(shape.hosts)],
                                          FTP_UPSTREAM, FTP_PASSWORD,
                                          big_bytes=args.bulk_mb << 20)
        async with backend:
            await attach_backends(url, shape, {"ftp": [backend.ports[str(i)]
                                                       for i in range(shape.hosts)]})

            async def account(service: DirectoryService) -> None:
                with contextlib.suppress(Exception):
                    await service.remove_account(FTP_USER)
                await service.add_account(FTP_USER, "tenant0", protocols=["ftp"],
                                          upstream_username=FTP_UPSTREAM)
            await _service_call(url, account)
            targets = [Target("direct", shape.host_address(0), backend.ports["0"],
                              FTP_UPSTREAM, backend)]
            missing = proxy_missing("ftp")
            edge_child: Child | None = None
            if missing:
                run.skip("edge ftp", missing)
            else:
                toml = ftp_edge_toml(url)
                edge_child = await start_edge(workdir, toml, workers=args.workers,
                                              expect=["ftp"])
                targets.append(Target("edge", "127.0.0.1", edge_child.ports["ftp"], FTP_USER,
                                      edge_child))
            size = args.bulk_mb << 20  # big.bin in the backend's home
            logins: dict[str, Batch] = {}
            bursts: dict[str, Batch] = {}
            retrs: dict[str, Batch] = {}
            stors: dict[str, Batch] = {}
            try:
                def make(action: str, t: Target) -> Callable[[int], Awaitable[None]]:
                    async def op(i: int) -> None:
                        await asyncio.to_thread(_ftp_session, t, action, size)
                    return op
                for t in targets:
                    run.progress(f"{t.name}: {args.logins} logins, {args.concurrency} at a time")
                    logins[t.name] = await batch(args.logins, args.concurrency, make("login", t),
                                                 t.server, progress=run.progress)
                    run.progress(f"{t.name}: {args.burst} logins at once")
                    bursts[t.name] = await _ftp_login_burst(t, args.burst)
                # Transfers alternate between the targets (the machine's load changes by the
                # second; a whole series on one target after the other would compare loads).
                run.progress(f"{args.transfers} x RETR + STOR of {args.bulk_mb} MiB, "
                             f"alternating {' / '.join(t.name for t in targets)}")
                parts: dict[tuple[str, str], list[Batch]] = {}
                for _ in range(args.transfers):
                    for t in targets:
                        for action in ("retr", "stor"):
                            parts.setdefault((action, t.name), []).append(await batch(
                                1, 1, make(action, t), t.server, nbytes=size))
                retrs = {t.name: _merged(parts[("retr", t.name)]) for t in targets if parts}
                stors = {t.name: _merged(parts[("stor", t.name)]) for t in targets if parts}
            finally:
                if edge_child is not None:
                    await asyncio.to_thread(edge_child.stop)
        _report(run, "FTP logins", logins)
        _report(run, f"FTP {args.burst} logins at once", bursts)
        _report(run, f"FTP RETR {args.bulk_mb} MiB", retrs, "MB/s")
        _report(run, f"FTP STOR {args.bulk_mb} MiB", stors, "MB/s")
        run.data.update(logins={k: v.as_dict() for k, v in logins.items()},
                        burst={k: v.as_dict() for k, v in bursts.items()},
                        retr={k: v.as_dict() for k, v in retrs.items()},
                        stor={k: v.as_dict() for k, v in stors.items()}, workers=args.workers)
