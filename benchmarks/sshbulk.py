"""Focused SSH proxy benchmark: bulk throughput both ways and session setup, through ``edge
serve`` against a direct OpenSSH connection to the same sshd, in the same run.

``.venv/bin/python -m benchmarks.sshbulk [--mib 512] [--rounds 5] [--logins 20]
[--baseline DIR] [--workers 1] [--also-workers N] [--parallel 1] [--only up,down,setup,phases]
[--front-ab --variants all,fast]``

The client is the stock ``ssh`` with the same algorithms on every path (the fair comparison:
``-c aes128-gcm@openssh.com -o KexAlgorithms=curve25519-sha256``). Per round and target
(targets alternate their order round by round): ``ssh 'cat > /dev/null' < FILE`` (up, a sparse
file of ``--mib`` MiB), ``ssh 'head -c N /dev/zero'`` (down), each ``--parallel`` times at once,
and ``--logins`` sequential ``ssh ... true`` (setup; with ``phases`` in ``--only`` also an
``ssh -vvv`` timeline of the same logins: key exchange, key accepted, channel, exit status).
Targets: ``direct`` (sshd), ``edge`` (this tree's ``edge serve``), with ``--baseline DIR``
``base``: a second ``edge serve`` whose ``PYTHONPATH`` starts with DIR (a copy of the packages
at another revision, e.g. ``git show HEAD:sshproxy/x.py``), for before/after comparisons in one
run, and with ``--also-workers N`` ``edge-wN``: this tree with N workers (scaling).

``--front-ab`` measures instead the CPU of an in-process bridge front
(:class:`sshproxy.bridge.SessionLink` between an asyncssh listener and the same sshd, uvloop,
stock ``ssh`` as the client), alternating run by run between the packet-path fixes of
:mod:`sshproxy.tuning` switched on one by one and :mod:`sshproxy.fastpath` (the switches are
``tuning``'s ``*_FIX_NEEDED`` flags and ``fastpath.ENABLED``, read when a connection or channel
is tuned). Only this process's CPU is counted, so the figure is the relay's own cost per MiB.

Printed: MiB/s medians and ranges, the per-round ratio against direct (and, with
``--baseline``, of this tree against the baseline, speed and CPU), the server's CPU ms per
MiB (the edge process tree for edge targets: both legs' crypto; sshd for direct) and per login,
and the setup p50 with its difference from direct. CPU per unit is the robust figure on a shared
machine; wall-clock figures move with the load. sshd, keys and the edge configuration come from
the harness (the pieces :func:`benchmarks.logins.ssh_setup` uses), the directory is a small
SQLite fleet.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import os
import resource
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

from benchmarks.backends import host_key_line, start_sshd
from benchmarks.core import percentile
from benchmarks.fleet import BENCH_SECRET_KEY, FleetShape, attach_backends, provision_fleet
from benchmarks.logins import Target, _service_call, ssh_argv, ssh_keygen
from benchmarks.procs import Child, edge_toml, start_edge
from edge.directory.service import DirectoryService

ALGORITHMS = ["-c", "aes128-gcm@openssh.com", "-o", "KexAlgorithms=curve25519-sha256"]
MIB = 1 << 20


def _argv(t: Target, key: Path, command: str) -> list[str]:
    argv = ssh_argv(t, key, command)
    return [argv[0], *ALGORITHMS, *argv[1:]]


async def _ssh(t: Target, key: Path, command: str, *, stdin: Path | None = None,
               expect_bytes: int = -1, limit: float = 600.0) -> None:
    with contextlib.ExitStack() as stack:
        source = stack.enter_context(stdin.open("rb")) if stdin is not None else asyncio.subprocess.DEVNULL
        proc = await asyncio.create_subprocess_exec(
            *_argv(t, key, command), stdin=source,
            stdout=asyncio.subprocess.PIPE if expect_bytes >= 0 else asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE)
        got = 0
        if expect_bytes >= 0:
            assert proc.stdout is not None
            while chunk := await asyncio.wait_for(proc.stdout.read(1 << 20), limit):
                got += len(chunk)
        assert proc.stderr is not None
        err = await asyncio.wait_for(proc.stderr.read(), limit)
        code = await asyncio.wait_for(proc.wait(), limit)
        if code != 0:
            raise RuntimeError(f"{t.name}: ssh {command!r} exited {code}: {err.decode(errors='replace')}")
        if expect_bytes >= 0 and got != expect_bytes:
            raise RuntimeError(f"{t.name}: got {got} bytes, expected {expect_bytes}")


@contextlib.asynccontextmanager
async def ssh_bench_setup(args: argparse.Namespace) -> AsyncIterator[tuple[list[Target], Path, Path]]:
    """sshd, a small SQLite directory, the edge serve processes; yields (targets with direct
    first, the client key, a sparse ``--mib`` MiB payload)."""
    shape = FleetShape.for_sites(100)
    with tempfile.TemporaryDirectory(prefix="sshbulk-") as folder:
        workdir = Path(folder)
        url = f"sqlite:///{workdir}/dir.sqlite3"
        await provision_fleet(url, shape)
        keys = workdir / "keys"
        keys.mkdir()
        client_pub = await ssh_keygen(keys / "client")
        host_keys = workdir / "ssh_host_keys"
        host_keys.mkdir()
        await ssh_keygen(host_keys / "ssh_host_ed25519_key")
        upstream_pub = await ssh_keygen(host_keys / "upstream_key")
        sshd = await start_sshd(workdir, [shape.host_address(0)], f"{client_pub}\n{upstream_pub}\n")
        payload = workdir / "payload.bin"
        with payload.open("wb") as handle:
            handle.truncate(args.mib * MIB)
        children: list[Child] = [sshd]
        try:
            await attach_backends(url, shape, {"ssh": [sshd.ports["0"]]}, hosts=[0])
            pinned = host_key_line(workdir)

            async def account(service: DirectoryService) -> None:
                await service.update_host(shape.host_name(0), ssh_known_hosts=pinned)
                await service.add_account("benchssh", "tenant0", protocols=["ssh"],
                                          upstream_username=getpass.getuser(), authorized_keys=client_pub)
            await _service_call(url, account)
            targets = [Target("direct", shape.host_address(0), sshd.ports["0"], getpass.getuser(), sshd)]
            editions = [("edge", "", args.workers)] + (
                [("base", args.baseline, args.workers)] if args.baseline else []) + (
                [(f"edge-w{args.also_workers}", "", args.also_workers)] if args.also_workers else [])
            for name, pythonpath, workers in editions:
                sub = workdir / name
                sub.mkdir()
                toml = edge_toml(url, {
                    "ssh": {"listen": ["127.0.0.1:0"], "host_key_dir": str(host_keys),
                            "max_sessions_per_user": 10_000},
                    "limits": {"max_unauthenticated_per_ip": 10_000, "max_connections_per_ip": 10_000,
                               "max_failures_per_ip": 10_000, "max_failures_per_user": 10_000,
                               "max_failures_per_ip_user": 10_000}},
                    secret=BENCH_SECRET_KEY)
                child = await start_edge(sub, toml, workers=workers, expect=["ssh"], pythonpath=pythonpath)
                children.append(child)
                targets.append(Target(name, "127.0.0.1", child.ports["ssh"], "benchssh", child))
            for t in targets:  # warm up: first login fills the directory cache, loads keys
                await _ssh(t, keys / "client", "true")
            yield targets, keys / "client", payload
        finally:
            for child in reversed(children):
                await asyncio.to_thread(child.stop)


PHASES = ("Connection established", "SSH2_MSG_NEWKEYS received", "Server accepts key",
          "channel 0: new", "Sending command", "exit-status")
"""``ssh -vvv`` lines whose arrival times make the setup timeline (``--only phases``)."""


async def _phases(t: Target, key: Path) -> dict[str, float]:
    """Milliseconds from starting ``ssh -vvv ... true`` to the first line of each of :data:`PHASES`."""
    argv = _argv(t, key, "true")
    argv.insert(1, "-vvv")
    started = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL,
                                                stdout=asyncio.subprocess.DEVNULL,
                                                stderr=asyncio.subprocess.PIPE)
    assert proc.stderr is not None
    seen: dict[str, float] = {}
    async for raw in proc.stderr:
        line = raw.decode(errors="replace")
        for mark in PHASES:
            if mark not in seen and mark in line:
                seen[mark] = (time.perf_counter() - started) * 1000
    if await asyncio.wait_for(proc.wait(), 60):
        raise RuntimeError(f"{t.name}: ssh -vvv true failed")
    seen["end"] = (time.perf_counter() - started) * 1000
    return seen


def _fmt(values: list[float], digits: int = 1) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):.{digits}f} [{min(values):.{digits}f}-{max(values):.{digits}f}]"


async def _measure(args: argparse.Namespace, targets: list[Target], key: Path, payload: Path) -> None:
    size = args.mib * MIB
    mibps: dict[tuple[str, str], list[float]] = defaultdict(list)
    cpu_mib: dict[tuple[str, str], list[float]] = defaultdict(list)
    setup_ms: dict[str, list[float]] = defaultdict(list)
    setup_p50: dict[str, list[float]] = defaultdict(list)
    cpu_login: dict[str, list[float]] = defaultdict(list)
    phases: dict[str, list[dict[str, float]]] = defaultdict(list)
    ops: list[tuple[str, Callable[[Target], Awaitable[None]]]] = [
        ("up", lambda t: _ssh(t, key, "cat > /dev/null", stdin=payload)),
        ("down", lambda t: _ssh(t, key, f"head -c {size} /dev/zero", expect_bytes=size)),
    ]
    ops = [op for op in ops if op[0] in args.only]
    loads: list[float] = []
    for rnd in range(args.rounds):
        order = targets[rnd % len(targets):] + targets[:rnd % len(targets)]
        for what, op in ops:
            for t in order:
                before = t.server.cpu()
                started = time.perf_counter()
                await asyncio.gather(*(op(t) for _ in range(args.parallel)))
                seconds = time.perf_counter() - started
                total = size * args.parallel
                mibps[(what, t.name)].append(total / MIB / seconds)
                cpu_mib[(what, t.name)].append((t.server.cpu() - before) * 1000 / (total / MIB))
        if "setup" in args.only:
            for t in order:
                before = t.server.cpu()
                ms = []
                for _ in range(args.logins):
                    started = time.perf_counter()
                    await _ssh(t, key, "true")
                    ms.append((time.perf_counter() - started) * 1000)
                cpu_login[t.name].append((t.server.cpu() - before) * 1000 / args.logins)
                setup_ms[t.name] += ms
                setup_p50[t.name].append(statistics.median(ms))
        if "phases" in args.only:
            for t in order:
                for _ in range(args.logins):
                    phases[t.name].append(await _phases(t, key))
        loads.append(os.getloadavg()[0])
        print(f"round {rnd + 1}/{args.rounds} done, load {loads[-1]:.2f}", file=sys.stderr, flush=True)
    names = [t.name for t in targets]
    print(f"\nload average (1 min) during the run {_fmt(loads, 2)}; {args.mib} MiB x {args.parallel} "
          f"parallel, {args.rounds} rounds, edge --workers {args.workers}; median [min-max]; "
          "ratio = per-round target/direct")
    for what, _ in ops:
        print(f"\nbulk {what}: MiB/s (aggregate)")
        for n in names:
            ratios = [a / b for a, b in zip(mibps[(what, n)], mibps[(what, "direct")], strict=True)]
            print(f"  {n:7} {_fmt(mibps[(what, n)], 0):>20}  ratio {_fmt(ratios, 2):>18}  "
                  f"server CPU ms/MiB {_fmt(cpu_mib[(what, n)], 2)}")
        if "base" in names:  # the before/after comparison, round by round
            for n in names:
                if n in ("direct", "base"):
                    continue
                speed = [a / b for a, b in zip(mibps[(what, n)], mibps[(what, "base")], strict=True)]
                cpu = [a / b for a, b in zip(cpu_mib[(what, n)], cpu_mib[(what, "base")], strict=True)]
                print(f"  {n:7} / base per round: MiB/s {_fmt(speed, 2)}  CPU ms/MiB {_fmt(cpu, 2)}")
    if setup_ms:
        print(f"\nsetup: ssh ... true, {args.logins} sequential per round, ms")
        for n in names:
            deltas = [a - b for a, b in zip(setup_p50[n], setup_p50["direct"], strict=True)]
            print(f"  {n:7} p50 {percentile(setup_ms[n], 50):6.1f}  p90 {percentile(setup_ms[n], 90):6.1f}"
                  f"  per-round p50 - direct {_fmt(deltas, 1):>22}  server CPU ms/login "
                  f"{_fmt(cpu_login[n], 1)}")
    if phases:
        print("\nsetup timeline: ssh -vvv ... true, median ms from the start of ssh to the first line with")
        for mark in (*PHASES, "end"):
            cells = [f"{statistics.median([p[mark] for p in phases[n] if mark in p] or [0.0]):7.1f}"
                     for n in names]
            print(f"  {' '.join(cells)}  {mark}")
        print(f"  {' '.join(f'{n:>7}' for n in names)}")


FRONT_VARIANTS: dict[str, tuple[bool, bool, bool, bool]] = {
    # name: (tuning.IGNORE_PACKET_FIX_NEEDED, RECEIVE_FIX_NEEDED, GCM_FIX_NEEDED, fastpath.ENABLED)
    # -- each only if supported
    "asyncssh": (False, False, False, False),
    "ignore": (True, False, False, False),
    "ignore+slices": (True, True, False, False),
    "ignore+gcm": (True, False, True, False),
    "all": (True, True, True, False),
    "fast": (True, True, True, True),
}


class _BenchFront:
    """An in-process bridge front: any client key, upstream login to sshd at ``begin_auth``."""

    def __init__(self, sshd_port: int, upstream_key: Path, user: str) -> None:
        self.sshd_port, self.upstream_key, self.user = sshd_port, upstream_key, user

    def factory(self) -> object:
        import asyncssh

        from sshproxy import tuning
        from sshproxy.bridge import BridgeSettings, SessionLink
        front = self

        class Server(asyncssh.SSHServer):
            link: SessionLink | None = None
            conn: asyncssh.SSHServerConnection | None = None
            upstream: asyncio.Task[asyncssh.SSHClientConnection] | None = None

            def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
                self.conn = conn

            def begin_auth(self, username: str) -> bool:
                self.upstream = asyncio.ensure_future(asyncssh.connect(
                    "127.0.0.1", front.sshd_port, username=front.user, client_keys=[str(front.upstream_key)],
                    known_hosts=None, config=None, agent_path=None, **tuning.CLIENT_OPTIONS))
                return True

            def public_key_auth_supported(self) -> bool:
                return True

            async def validate_public_key(self, username: str, key: object) -> bool:
                assert self.upstream is not None and self.conn is not None
                self.link = SessionLink(await self.upstream, client_address="127.0.0.1 0",
                                        settings=BridgeSettings(), downstream=self.conn)
                return True

            def session_requested(self) -> asyncssh.SSHServerSession[bytes]:
                assert self.link is not None
                return self.link.session_requested()

            def connection_lost(self, exc: Exception | None) -> None:
                if self.link is not None:
                    self.link.close("client disconnected")

        return Server()


async def front_ab(args: argparse.Namespace) -> None:
    import asyncssh

    from sshproxy import fastpath, tuning
    from sshproxy.bridge import BridgeSettings
    supported = (tuning.IGNORE_PACKET_FIX_NEEDED, tuning.RECEIVE_FIX_NEEDED, tuning.GCM_FIX_NEEDED,
                 fastpath.FASTPATH_SUPPORTED)
    variants = [v for v in args.variants.split(",") if v]
    size = args.mib * MIB
    with tempfile.TemporaryDirectory(prefix="sshbulk-front-") as folder:
        workdir = Path(folder)
        keys = workdir / "keys"
        keys.mkdir()
        client_pub = await ssh_keygen(keys / "client")
        sshd = await start_sshd(workdir, ["127.0.0.1"], f"{client_pub}\n")
        payload = workdir / "payload.bin"
        with payload.open("wb") as handle:
            handle.truncate(size)
        front = _BenchFront(sshd.ports["0"], keys / "client", getpass.getuser())
        acceptor = await asyncssh.listen(
            "127.0.0.1", 0, server_factory=front.factory,
            server_host_keys=[asyncssh.generate_private_key("ssh-ed25519")], config=None,
            **BridgeSettings().server_options())
        target = Target("front", "127.0.0.1", acceptor.get_port(), "bench", sshd)
        cpu: dict[tuple[str, str], list[float]] = defaultdict(list)
        try:
            for rnd in range(args.rounds):
                order = variants[rnd % len(variants):] + variants[:rnd % len(variants)]
                for name in order:
                    flags = FRONT_VARIANTS[name]
                    (tuning.IGNORE_PACKET_FIX_NEEDED, tuning.RECEIVE_FIX_NEEDED,  # type: ignore[misc]
                     tuning.GCM_FIX_NEEDED, fastpath.ENABLED) = (
                        a and b for a, b in zip(flags, supported, strict=True))
                    for what, command, stdin, expect in (
                            ("up", "cat > /dev/null", payload, -1),
                            ("down", f"head -c {size} /dev/zero", None, size)):
                        if what not in args.only:
                            continue
                        before = resource.getrusage(resource.RUSAGE_SELF)
                        await _ssh(target, keys / "client", command, stdin=stdin, expect_bytes=expect)
                        after = resource.getrusage(resource.RUSAGE_SELF)
                        used = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
                        cpu[(what, name)].append(used * 1000 / args.mib)
                print(f"round {rnd + 1}/{args.rounds} done, load {os.getloadavg()[0]:.2f}", file=sys.stderr,
                      flush=True)
        finally:
            (tuning.IGNORE_PACKET_FIX_NEEDED, tuning.RECEIVE_FIX_NEEDED,  # type: ignore[misc]
             tuning.GCM_FIX_NEEDED, fastpath.ENABLED) = supported
            acceptor.close()
            await asyncio.to_thread(sshd.stop)
    print(f"\nin-process front CPU ms per MiB relayed ({args.mib} MiB, {args.rounds} rounds, "
          f"load {os.getloadavg()}); median [min-max]; vs = per-round ratio to the first variant")
    for what in ("up", "down"):
        if what not in args.only:
            continue
        print(f"\nbulk {what}")
        for name in variants:
            ratios = [a / b for a, b in zip(cpu[(what, name)], cpu[(what, variants[0])], strict=True)]
            print(f"  {name:14} {_fmt(cpu[(what, name)], 2):>22}  vs {_fmt(ratios, 3)}")


async def main_async(args: argparse.Namespace) -> None:
    if args.front_ab:
        await front_ab(args)
        return
    async with ssh_bench_setup(args) as (targets, key, payload):
        await _measure(args, targets, key, payload)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sshbulk", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=512, help="MiB per bulk transfer")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--logins", type=int, default=20, help="sequential ssh true per round and target")
    parser.add_argument("--parallel", type=int, default=1, help="bulk transfers at once")
    parser.add_argument("--workers", type=int, default=1, help="edge serve --workers")
    parser.add_argument("--also-workers", type=int, default=0,
                        help="also run this tree's edge serve with this many workers (target edge-wN)")
    parser.add_argument("--baseline", default="",
                        help="also run an edge serve with this directory first on PYTHONPATH")
    parser.add_argument("--only", default="up,down,setup",
                        help="comma-separated subset: up down setup phases")
    parser.add_argument("--front-ab", action="store_true",
                        help="CPU per MiB of an in-process bridge front, tuning variants alternated")
    parser.add_argument("--variants", default="all,fast",
                        help=f"--front-ab variants, first = reference: {', '.join(FRONT_VARIANTS)}")
    args = parser.parse_args(argv)
    args.only = set(args.only.split(","))
    if args.front_ab:
        import uvloop
        uvloop.run(main_async(args))
    else:
        asyncio.run(main_async(args))


if __name__ == "__main__":
    main()

__all__ = ["main"]
