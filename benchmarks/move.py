"""``move``: ``edge tenant move`` while HTTP (and SSH) load runs through ``edge serve``.

Reports, per move, the time from the CLI's commit until *every* worker routes the tenant to
its new host, and the failed HTTP requests / SSH sessions over the whole run (goal: 0 failed
HTTP requests). Which host answered is visible in the backend's body (``via ADDRESS:PORT``);
probes go out on fresh connections, which SO_REUSEPORT spreads over all workers, so the last
probe answered by the old host bounds the slowest worker.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import time
from pathlib import Path
from typing import Any

from benchmarks.core import Run, scenario, summary
from benchmarks.fleet import BENCH_SECRET_KEY
from benchmarks.loadgen import HttpLoad, http_get, run_wrk, write_wrk_script
from benchmarks.logins import SshSetup, ssh_argv, ssh_setup
from benchmarks.procs import (
    Child,
    edge_command,
    edge_toml,
    proxy_missing,
    start_edge,
    tool_missing,
)
from benchmarks.web import WebFleet, fleet_arguments, web_fleet

VIA = re.compile(rb"via ([0-9.]+):(\d+)")


def _move_arguments(parser: argparse.ArgumentParser) -> None:
    fleet_arguments(parser, 20_000)
    parser.add_argument("--moves", type=int, default=10, help="tenant moves during the load")
    parser.add_argument("--workers", type=int, default=2, help="edge serve --workers")
    parser.add_argument("--connections", type=int, default=16, help="wrk keep-alive connections")
    parser.add_argument("--settle", type=float, default=2.0,
                        help="seconds of only-new-host answers that end a move's probing")
    parser.add_argument("--drain", type=float, default=30.0,
                        help="edge tenant move --drain: seconds sessions on the old host "
                             "may go on")
    parser.add_argument("--ssh-sessions", type=int, default=4,
                        help="concurrent SSH session loops during the moves (if the ssh proxy "
                             "is built)")


async def _cli_move(toml: str, tenant: str, host: str, drain: float) -> float:
    """``edge tenant move TENANT --to HOST``; returns the time it exited (after COMMIT)."""
    proc = await asyncio.create_subprocess_exec(
        *edge_command(), "tenant", "move", tenant, "--to", host, "--drain", str(drain),
        "--config", toml,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _, err = await proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"edge tenant move failed: {err.decode()[-300:]}")
    return time.time()


async def _wrk_until(stop: asyncio.Event, port: int, script: Path, connections: int,
                     chunk: float = 2.0) -> HttpLoad:
    """wrk in back-to-back ``chunk``-second runs until ``stop`` is set (so the load covers
    every move however long it takes); counts, errors and statuses are summed, latency
    percentiles are the worst chunk's."""
    total: HttpLoad | None = None
    while not stop.is_set():
        part = await run_wrk(port, script, seconds=chunk, connections=connections)
        if total is None:
            total = part
            continue
        total.requests += part.requests
        total.seconds += part.seconds
        for key, value in part.errors.items():
            total.errors[key] = total.errors.get(key, 0) + value
        statuses = total.extra.setdefault("statuses", {})
        for code, n in part.extra.get("statuses", {}).items():
            statuses[code] = statuses.get(code, 0) + n
        total.cdf = [(p, max(a, b)) for (p, a), (_, b) in zip(total.cdf, part.cdf, strict=True)]
    assert total is not None
    return total


async def _probe_until_moved(port: int, hostnames: list[str], new_port: int, committed: float,
                             settle: float, limit: float = 30.0) -> dict[str, Any]:
    """Probe the tenant's names in turn on fresh connections until ``settle`` seconds of
    only-new answers; returns ``seconds`` = commit → first answer after the last old-host
    answer, and every answer that was not a 200 (name, status)."""
    switched: float | None = None
    probes = old = failed = 0
    bad: list[tuple[str, int]] = []
    deadline = time.time() + limit
    while time.time() < deadline:
        hostname = hostnames[probes % len(hostnames)]
        try:
            status, body = await http_get(port, hostname, fresh=True)
        except OSError:
            failed += 1
            await asyncio.sleep(0.01)
            continue
        now = time.time()
        probes += 1
        match = VIA.search(body)
        if status == 200 and match and int(match.group(2)) == new_port:
            if switched is None:
                switched = now
            elif now - switched >= settle:
                break
        else:
            old += 1
            switched = None
            if status != 200 and len(bad) < 20:
                bad.append((hostname, status))
        await asyncio.sleep(0.005)
    return {"seconds": (switched - committed) if switched else None, "probes": probes,
            "old_answers": old, "failed_probes": failed, "not_200": bad}


async def _ssh_loops(setup: SshSetup, sessions: int, stop: asyncio.Event,
                     ) -> dict[str, Any]:
    """``sessions`` loops of ``ssh benchssh@edge 'sleep 1; echo ok'`` until ``stop``; every
    session that does not print ``ok`` and exit 0 is a failure."""
    assert setup.edge is not None
    target = setup.edge
    counts = {"ok": 0, "failed": 0}
    errors: list[str] = []

    async def loop() -> None:
        while not stop.is_set():
            proc = await asyncio.create_subprocess_exec(
                *ssh_argv(target, setup.client_key, "sleep 1; echo ok"),
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE)
            try:
                out, err = await asyncio.wait_for(proc.communicate(), 60)
            except TimeoutError:
                proc.kill()
                out, err = b"", b"timed out after 60 s"
                await proc.wait()
            if proc.returncode == 0 and out.strip() == b"ok":
                counts["ok"] += 1
            else:
                counts["failed"] += 1
                if len(errors) < 5:
                    errors.append(f"exit {proc.returncode}: {err.decode(errors='replace')[-200:]}")

    await asyncio.gather(*(loop() for _ in range(sessions)))
    return {**counts, "errors": errors}


@scenario("move", "edge tenant move during HTTP (+SSH) load: time until every worker routes "
                  "to the new host, failed requests/sessions (goal 0 failed HTTP)",
          quick={"sites": 1_000, "moves": 3, "names": 500, "settle": 1.0, "ssh_sessions": 2},
          arguments=_move_arguments)
async def move(args: argparse.Namespace, run: Run) -> None:
    missing = tool_missing("wrk", "nginx") or proxy_missing("http")
    if missing:
        run.skip("*", missing)
        return
    ssh_missing = proxy_missing("ssh") or tool_missing("ssh", "/usr/sbin/sshd", "ssh-keygen")
    if ssh_missing:
        run.skip("ssh", ssh_missing)
    if args.hosts == 1:
        raise SystemExit("move needs at least 2 hosts")
    async with web_fleet(args, run, "move") as fleet:
        shape = fleet.shape
        access_log = fleet.workdir / "access.log"
        http_section: dict[str, dict[str, Any]] = {
            "http": {"listen": ["127.0.0.1:0"], "access_log": str(access_log)},
            "cache": {"change_poll_interval": 1.0}}
        if ssh_missing:
            toml_text = edge_toml(fleet.url, http_section, secret=BENCH_SECRET_KEY)
            async with await start_edge(fleet.workdir, toml_text, workers=args.workers,
                                        expect=["http"]) as edge:
                await _moves(args, run, fleet, edge, None)
        else:
            async with ssh_setup(run, fleet.url, shape, fleet.workdir, args.workers,
                                 extra_toml=http_section, also=("http",)) as setup:
                assert setup.edge_child is not None
                await _moves(args, run, fleet, setup.edge_child, setup)
        failures = _failed_requests(access_log)  # complete now: edge has stopped
        run.data["failed_requests_log"] = failures
        for entry in failures[:5]:
            run.progress(f"failed request in the access log: {entry}")


def _failed_requests(path: Path, keep: int = 20) -> list[dict[str, Any]]:
    """Access-log entries (edge's ``[http] access_log`` JSON lines, flushed when it stops) of
    requests answered with a status >= 400, so a failure during a move can be traced to a
    name, a site/tenant/host and a time."""
    found: list[dict[str, Any]] = []
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return found
    for text in lines:
        try:
            entry = json.loads(text)
        except ValueError:
            continue
        if isinstance(entry, dict) and int(entry.get("status") or 0) >= 400:
            found.append(entry)
            if len(found) >= keep:
                break
    return found


async def _moves(args: argparse.Namespace, run: Run, fleet: WebFleet, edge: Child,
                 ssh: SshSetup | None) -> None:
    shape = fleet.shape
    movers = list(range(min(args.moves, shape.tenants)))
    names = [shape.request_name(s) for s in range(shape.sites)
             if shape.site_tenant(s) in set(movers)][:2000]
    script = write_wrk_script(fleet.workdir / "movers.lua", names, statuses=True)
    config = str(fleet.workdir / "edge.toml")
    run.progress(f"wrk on {len(names)} names of {len(movers)} tenants, "
                 f"{args.moves} moves (drain {args.drain:g} s), {args.workers} workers"
                 + (f", {args.ssh_sessions} SSH session loops" if ssh else ""))
    stop = asyncio.Event()
    load_task = asyncio.create_task(_wrk_until(stop, edge.ports["http"], script,
                                               args.connections))
    ssh_task = asyncio.create_task(_ssh_loops(ssh, args.ssh_sessions, stop)) if ssh else None
    await asyncio.sleep(1.0)
    moves: list[dict[str, Any]] = []
    where = {t: shape.tenant_host(t) for t in movers}
    for i in range(args.moves):
        tenant = movers[i % len(movers)]
        target = (where[tenant] + 1) % shape.hosts
        committed = await _cli_move(config, f"tenant{tenant}", shape.host_name(target),
                                    args.drain)
        where[tenant] = target
        result = await _probe_until_moved(
            edge.ports["http"], [shape.request_name(s) for s in range(tenant, shape.sites,
                                                                      shape.tenants)],
            fleet.backend.ports[str(target)], committed, args.settle)
        result.update(tenant=f"tenant{tenant}", to=target)
        moves.append(result)
        run.progress(f"move {i + 1}/{args.moves}: tenant{tenant} → {shape.host_name(target)}: "
                     f"all workers after {(result['seconds'] or float('nan')) * 1000:.0f} ms "
                     f"({result['probes']} probes"
                     + (f", not 200: {result['not_200']}" if result["not_200"] else "") + ")")
    stop.set()
    load = await load_task
    sessions = await ssh_task if ssh_task else None
    run.progress(f"wrk: {load.requests} requests, failed: {load.errors}, "
                 f"statuses: {load.extra.get('statuses')}")
    latencies = [m["seconds"] * 1000 for m in moves if m["seconds"] is not None]
    stats = summary(latencies)
    for key in ("p50", "max"):
        run.row(f"commit → every worker routes to the new host, {key} ({len(latencies)} "
                "moves)", stats[key], "ms", ("poll interval", 1000.0), digits=0)
    run.row("moves that never converged", len(moves) - len(latencies), "", digits=0)
    run.row("HTTP requests during the moves", load.requests, "", digits=0)
    run.row("failed HTTP requests (goal 0)", load.failed, "", digits=0)
    for code, n in sorted(load.extra.get("statuses", {}).items()):
        if not code.startswith(("2", "3")):
            run.row(f"  of which HTTP {code}", n, "", digits=0)
    run.row("failed probe connections", sum(m["failed_probes"] for m in moves), "", digits=0)
    run.row("probe answers other than 200", sum(len(m["not_200"]) for m in moves), "", digits=0)
    if sessions is not None:
        run.row("SSH sessions during the moves", sessions["ok"] + sessions["failed"], "",
                digits=0)
        run.row(f"failed SSH sessions (drain {args.drain:g} s)", sessions["failed"], "",
                digits=0)
    run.data.update(moves=moves, propagation_ms=stats, http=load.as_dict(), ssh=sessions,
                    workers=args.workers, drain=args.drain,
                    goal={"failed_http": 0, "propagation_ms": 1000})
