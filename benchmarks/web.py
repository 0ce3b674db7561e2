"""HTTP-side scenarios: ``http`` (keep-alive, Zipf, cache on/off, vs nginx/haproxy/direct),
``workers`` (throughput vs ``--workers``) and ``tls`` (handshakes cycling SNI names)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.backends import start_http_backend
from benchmarks.core import Run, database_for, scenario, summary
from benchmarks.cpuquota import CpuQuotas, children, quota_each, quota_missing
from benchmarks.fleet import BENCH_SECRET_KEY, FleetShape, Zipf, attach_backends, provision_fleet
from benchmarks.loadgen import (
    HandshakeLoad,
    HttpLoad,
    client_context,
    run_wrk,
    tls_handshakes_multi,
    write_wrk_script,
)
from benchmarks.peers import start_haproxy_proxy, start_nginx_proxy, start_nginx_tls
from benchmarks.procs import Child, edge_toml, proxy_missing, scratch, start_edge, tool_missing
from edge.directory.secrets import KeyBox
from edge.directory.stores import store_for_url

HTTP_SECTION: dict[str, Any] = {"listen": ["127.0.0.1:0"], "access_log": "off"}
"""Our HTTP proxy as measured with ``--access-log off``."""


def http_section(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """``[http]`` for the edge: an access log file unless ``--access-log off`` (issue 5
    compares with access logging on in both the edge and nginx)."""
    if getattr(args, "access_log", "on") == "off":
        return HTTP_SECTION
    return {**HTTP_SECTION, "access_log": str(workdir / "edge-access.log")}


def nginx_access_log(args: argparse.Namespace, workdir: Path, name: str) -> str:
    """The nginx peer's ``access_log`` file ("" = off), following ``--access-log``."""
    return "" if getattr(args, "access_log", "on") == "off" else str(workdir / f"{name}-access.log")


@dataclass
class WebFleet:
    """A provisioned fleet with its HTTP backend running and attached."""

    url: str
    shape: FleetShape
    backend: Child
    workdir: Path

    def upstreams(self) -> dict[str, tuple[str, int]]:
        return {self.shape.host_name(i): (self.shape.host_address(i), self.backend.ports[str(i)])
                for i in range(self.shape.hosts)}

    def routes(self, sites: list[int]) -> dict[str, str]:
        """Request name → upstream name, for the static peers' maps."""
        return {self.shape.request_name(s): self.shape.host_name(self.shape.site_host(s))
                for s in set(sites)}


def fleet_arguments(parser: argparse.ArgumentParser, sites: int = 100_000) -> None:
    parser.add_argument("--sites", type=int, default=sites,
                        help=f"sites in the synthetic fleet (default {sites:,})")
    parser.add_argument("--hosts", type=int, default=0,
                        help="simulated backend hosts (default: sites/2000, 2..500)")
    parser.add_argument("--zipf", type=float, default=1.0, help="Zipf exponent of popularity")
    parser.add_argument("--names", type=int, default=20_000,
                        help="Zipf-drawn request names the load generator cycles through")


def shape_from(args: argparse.Namespace, certs: int = 0) -> FleetShape:
    shape = FleetShape.for_sites(args.sites, certs=certs)
    if getattr(args, "hosts", 0):
        shape = FleetShape(hosts=args.hosts, tenants=shape.tenants, sites=shape.sites,
                           accounts=shape.accounts, certs=shape.certs)
    return shape


@contextlib.asynccontextmanager
async def web_fleet(args: argparse.Namespace, run: Run, tag: str, *, certs: int = 0,
                    ) -> AsyncIterator[WebFleet]:
    """Provision (or reuse) the fleet, start the nginx backend for every host, attach it."""
    shape = shape_from(args, certs)
    with database_for(args, tag) as url, scratch(tag) as folder:
        run.progress(f"provisioning {shape.sites:,} sites, {shape.tenants:,} tenants, "
                     f"{shape.hosts} hosts, {shape.certs:,} certificates")
        load = await provision_fleet(url, shape, progress=True)
        run.data["fleet"] = {"shape": shape.as_dict(), "load": load}
        workdir = Path(folder)
        backend = await start_http_backend(workdir, [shape.host_address(i)
                                                     for i in range(shape.hosts)])
        async with backend:
            await attach_backends(url, shape, {"http": [backend.ports[str(i)]
                                                        for i in range(shape.hosts)]})
            yield WebFleet(url, shape, backend, workdir)


def zipf_sites(shape: FleetShape, count: int, *, cached: bool, s: float = 1.0,
               seed: int = 7) -> list[int]:
    """``count`` site indexes by Zipf popularity among the cached (odd) or uncached (even)
    sites."""
    half = max(1, shape.sites // 2)
    picks = Zipf(half, s).sample(count, seed)
    return [2 * p + (1 if cached else 0) for p in picks if 2 * p + int(cached) < shape.sites]


async def measure(run: Run, label: str, child: Child | None, port: int, script: Path,
                  args: argparse.Namespace, *, connections: int | None = None,
                  threads: int = 1, host: str = "127.0.0.1", names: int = 0) -> HttpLoad:
    """Warm up, then one timed wrk run with the server's CPU time around it.

    The warm-up lasts ``--warmup`` seconds and at least until every name of the script was
    requested once (bounded by 120 s), so the timed run sees a steady state: each name's
    directory lookup already cached, as on a long-running proxy."""
    conns = connections or args.connections
    run.progress(f"{label}: warm-up {args.warmup:g} s (and one pass over {names:,} names) + "
                 f"{args.duration:g} s at {conns} connections")
    done, started = 0, time.monotonic()
    while args.warmup > 0:
        part = await run_wrk(port, script, seconds=args.warmup, connections=conns,
                             threads=threads, host=host, offset=done)
        done += part.requests
        if done >= names or time.monotonic() - started > 120 or not part.requests:
            break
    warm_seconds = time.monotonic() - started
    before = child.cpu() if child else 0.0
    load = await run_wrk(port, script, seconds=args.duration, connections=conns, threads=threads,
                         host=host)
    load.server_cpu = (child.cpu() - before) if child else 0.0
    load.extra["warmup_requests"] = done
    load.extra["warmup_seconds"] = warm_seconds
    run.progress(f"{label}: {load.rps:,.0f} req/s, p99 {load.pct(99):.2f} ms, "
                 f"{load.failed} failed")
    return load


def _load_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per timed run")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of warm-up per run")
    parser.add_argument("--connections", type=int, default=32, help="keep-alive connections")
    parser.add_argument("--workers", type=int, default=1,
                        help="edge serve --workers (and nginx worker_processes, haproxy nbthread)")


def _http_arguments(parser: argparse.ArgumentParser) -> None:
    fleet_arguments(parser)
    _load_arguments(parser)
    _access_log_argument(parser)


def _access_log_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--access-log", choices=("on", "off"), default="on",
                        help="access log to a file in the edge and the nginx peer (default on, "
                             "as issue 5 measures; haproxy logs nothing either way)")


def _report(run: Run, label: str, load: HttpLoad, peer: HttpLoad | None, peer_name: str) -> None:
    def p(value: float) -> tuple[str, float] | None:
        return (peer_name, value) if peer is not None else None

    run.row(f"{label} requests/s", load.rps, "req/s", p(peer.rps) if peer else None, digits=0)
    for q, key in ((50, "p50"), (99, "p99"), (99.9, "p99.9")):
        run.row(f"{label} latency {key}", load.pct(q), "ms", p(peer.pct(q)) if peer else None)
    if load.server_cpu:
        run.row(f"{label} CPU per request", load.cpu_us_per_request, "µs",
                p(peer.cpu_us_per_request) if peer and peer.server_cpu else None, digits=1)
    run.row(f"{label} failed requests", load.failed, "", digits=0)
    warm = load.extra.get("warmup_seconds") or 0.0
    if warm and label.startswith("edge"):  # the cold start a restart or a new box goes through
        run.row(f"{label} warm-up (cold directory cache) requests/s",
                load.extra["warmup_requests"] / warm, "req/s", digits=0)


@scenario("http", "keep-alive HTTP, Zipf Host headers, cache on/off: edge vs nginx, haproxy, "
                  "direct to the backend (wrk)",
          quick={"sites": 2_000, "duration": 2.0, "warmup": 1.0, "names": 2_000,
                 "connections": 16},
          arguments=_http_arguments)
async def http(args: argparse.Namespace, run: Run) -> None:
    missing = tool_missing("wrk", "nginx")
    if missing:
        run.skip("*", missing)
        return
    async with web_fleet(args, run, "http") as fleet:
        shape = fleet.shape
        results: dict[str, dict[str, Any]] = {}
        edge_missing = proxy_missing("http")
        haproxy_missing = tool_missing("haproxy")
        if edge_missing:
            run.skip("edge", edge_missing)
        if haproxy_missing:
            run.skip("haproxy", haproxy_missing)
        for mode in ("off", "on"):
            sites = zipf_sites(shape, args.names, cached=mode == "on", s=args.zipf)
            path = "/c/index.html" if mode == "on" else "/index.html"
            script = write_wrk_script(fleet.workdir / f"zipf-{mode}.lua",
                                      [shape.request_name(s) for s in sites], path)
            routes = fleet.routes(sites)
            loads: dict[str, HttpLoad] = {}
            loads["direct"] = await measure(run, f"direct (cache {mode})", fleet.backend,
                                            fleet.backend.ports["0"], script, args,
                                            host=shape.host_address(0), names=len(sites))
            if not edge_missing:
                toml = edge_toml(fleet.url, {"http": http_section(args, fleet.workdir)},
                                 secret=BENCH_SECRET_KEY)
                async with await start_edge(fleet.workdir, toml, workers=args.workers,
                                            expect=["http"]) as edge:
                    loads["edge"] = await measure(run, f"edge (cache {mode})", edge,
                                                  edge.ports["http"], script, args,
                                                  names=len(sites))
            async with await start_nginx_proxy(
                    fleet.workdir, routes, fleet.upstreams(), workers=args.workers,
                    access_log=nginx_access_log(args, fleet.workdir, f"nginx-{mode}")) as nginx:
                loads["nginx"] = await measure(run, f"nginx (cache {mode})", nginx,
                                               nginx.ports["http"], script, args,
                                               names=len(sites))
            if not haproxy_missing:
                async with await start_haproxy_proxy(fleet.workdir, routes, fleet.upstreams(),
                                                     threads=args.workers) as haproxy:
                    loads["haproxy"] = await measure(run, f"haproxy (cache {mode})", haproxy,
                                                     haproxy.ports["http"], script, args,
                                                     names=len(sites))
            for name, load in loads.items():
                peer = None if name == "nginx" else loads["nginx"]
                _report(run, f"{name}, cache {mode}:", load, peer, "nginx")
            results[f"cache_{mode}"] = {
                "distinct_names": len(routes), "path": path,
                "targets": {name: load.as_dict() for name, load in loads.items()}}
        run.data.update(results=results, workers=args.workers, connections=args.connections,
                        duration=args.duration, access_log=args.access_log)


# -- workers --------------------------------------------------------------------------------

def _workers_arguments(parser: argparse.ArgumentParser) -> None:
    fleet_arguments(parser, 10_000)
    _load_arguments(parser)
    _access_log_argument(parser)
    parser.add_argument("--max-workers", type=int, default=0,
                        help="largest --workers to try (default: number of CPUs, or 4 with "
                             "--cpu-per-worker)")
    parser.add_argument("--cpu-per-worker", type=float, default=0.0,
                        help="give every worker process (edge and nginx) a CPU quota of this "
                             "many cores, e.g. 0.2, so scaling shows on a machine whose cores "
                             "the load generator and backend also need (benchmarks/cpuquota.py;"
                             " needs root). 0 = no quota")


async def _workers_of(child: Child, count: int, title_prefix: str = "") -> list[int]:
    """The ``count`` worker processes of a pre-forking server, once all have started."""
    deadline = time.monotonic() + 30
    while True:
        pids = children(child.pid, title_prefix=title_prefix)
        if len(pids) == count:
            return pids
        if time.monotonic() > deadline:
            raise RuntimeError(f"{child.name}: expected {count} workers, found {pids}")
        await asyncio.sleep(0.1)


@contextlib.asynccontextmanager
async def _budget(child: Child, count: int, cores: float,
                  title_prefix: str = "") -> AsyncIterator[CpuQuotas | None]:
    """Each worker of ``child`` limited to ``cores`` for the block (no limit if 0)."""
    if not cores:
        yield None
        return
    with quota_each(await _workers_of(child, count, title_prefix), cores) as quotas:
        yield quotas


@scenario("workers", "HTTP throughput vs edge serve --workers 1..N (nginx worker_processes "
                     "1..N in the same run)",
          quick={"sites": 1_000, "duration": 2.0, "warmup": 1.0, "names": 1_000,
                 "max_workers": 2, "connections": 16},
          arguments=_workers_arguments)
async def workers(args: argparse.Namespace, run: Run) -> None:
    import os

    missing = tool_missing("wrk", "nginx")
    if not missing and args.cpu_per_worker:
        missing = quota_missing()
    if missing:
        run.skip("*", missing)
        return
    top = args.max_workers or (4 if args.cpu_per_worker else os.cpu_count() or 1)
    cores = args.cpu_per_worker
    edge_missing = proxy_missing("http")
    if edge_missing:
        run.skip("edge", edge_missing)
    async with web_fleet(args, run, "workers") as fleet:
        sites = zipf_sites(fleet.shape, args.names, cached=False, s=args.zipf)
        script = write_wrk_script(fleet.workdir / "zipf.lua",
                                  [fleet.shape.request_name(s) for s in sites])
        routes = fleet.routes(sites)
        series: dict[str, dict[int, dict[str, Any]]] = {"edge": {}, "nginx": {}}
        for n in range(1, top + 1):
            conns = args.connections * n
            threads = min(n, 2)
            if not edge_missing:
                toml = edge_toml(fleet.url, {"http": http_section(args, fleet.workdir)},
                                 secret=BENCH_SECRET_KEY)
                async with await start_edge(fleet.workdir, toml, workers=n,
                                            expect=["http"]) as edge, \
                        _budget(edge, n, cores) as quotas:
                    # Each worker has its own directory cache and SO_REUSEPORT spreads
                    # connections, not names: 3n passes leave a worker without a given name
                    # with probability (1 - 1/n)^3n ~ 5 %, instead of one pass's (1 - 1/n).
                    load = await measure(run, f"edge --workers {n}", edge, edge.ports["http"],
                                         script, args, connections=conns, threads=threads,
                                         names=len(sites) * (3 * n if n > 1 else 1))
                    series["edge"][n] = _with_budget(load.as_dict(), quotas)
            async with await start_nginx_proxy(
                    fleet.workdir, routes, fleet.upstreams(), workers=n, name=f"nginx-w{n}",
                    access_log=nginx_access_log(args, fleet.workdir, f"nginx-w{n}")) as nginx, \
                    _budget(nginx, n, cores, "nginx: worker") as quotas:
                load = await measure(run, f"nginx worker_processes {n}", nginx,
                                     nginx.ports["http"], script, args, connections=conns,
                                     threads=threads, names=len(sites))
                series["nginx"][n] = _with_budget(load.as_dict(), quotas)
        budget = f", {cores:g} core each" if cores else ""
        for n in range(1, top + 1):
            peer = series["nginx"][n]["rps"]
            if n in series["edge"]:
                run.row(f"edge --workers {n}{budget}, requests/s", series["edge"][n]["rps"],
                        "req/s", (f"nginx {n} workers", peer), digits=0)
            else:
                run.row(f"nginx worker_processes {n}{budget}, requests/s", peer, "req/s",
                        digits=0)
        # Scaling efficiency: throughput of ``top`` workers over ``top`` times one worker's. 1.0 is
        # n-fold throughput from n workers (nothing shared holds them back).
        efficiency = {name: points[top]["rps"] / (top * points[1]["rps"])
                      for name, points in series.items()
                      if top > 1 and 1 in points and top in points and points[1]["rps"]}
        if "edge" in efficiency:
            run.row(f"edge scaling efficiency, {top} workers vs {top} x 1", efficiency["edge"],
                    "", ("nginx", efficiency["nginx"]), digits=2)
        elif "nginx" in efficiency:
            run.row(f"nginx scaling efficiency, {top} workers vs {top} x 1",
                    efficiency["nginx"], "", digits=2)
        run.data.update(series=series, max_workers=top, cpu_per_worker=cores,
                        scaling_efficiency=efficiency)


def _with_budget(result: dict[str, Any], quotas: CpuQuotas | None) -> dict[str, Any]:
    if quotas is not None:
        result.update(cpu_per_worker=quotas.cores, throttled_seconds=quotas.throttled_seconds())
    return result


# -- tls ------------------------------------------------------------------------------------

def _tls_arguments(parser: argparse.ArgumentParser) -> None:
    fleet_arguments(parser, 100_000)
    parser.add_argument("--certs", type=int, default=10_000,
                        help="certificates in the fleet (one per tenant, the first tenants)")
    parser.add_argument("--sni", type=int, nargs="+", default=[10, 1000, 10_000],
                        help="distinct SNI names cycled per run (one per certificate)")
    parser.add_argument("--handshakes", type=int, default=4000,
                        help="timed handshakes per server and SNI set, over all rounds")
    parser.add_argument("--rounds", type=int, default=6,
                        help="alternating edge/nginx batches the timed handshakes are split into")
    parser.add_argument("--duration", type=float, default=30.0,
                        help="seconds per batch (bound)")
    parser.add_argument("--concurrency", type=int, default=16,
                        help="handshakes in flight (over all client processes)")
    parser.add_argument("--clients", type=int, default=2,
                        help="client processes (one Python process tops out at a few hundred "
                             "handshakes/s)")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--context-cache", type=int, default=10_000,
                        help="[https] context_cache_size of edge serve (SSL contexts kept)")
    parser.add_argument("--nginx-certs", type=int, default=10_000,
                        help="largest SNI set also served by nginx (its config preloads them)")
    parser.add_argument("--edge-tickets", action="store_true",
                        help="turn the edge's TLS session tickets on (off by default, like nginx "
                             "in this comparison and like the product default)")


async def directory_certificates(url: str, count: int) -> list[tuple[list[str], str, str]]:
    """The first ``count`` certificates of the directory as (names, chain PEM, key PEM)."""
    keybox = KeyBox.from_text(BENCH_SECRET_KEY)
    store = store_for_url(url)
    await store.open()
    try:
        out: list[tuple[list[str], str, str]] = []
        after = 0
        while len(out) < count:
            page = await store.list_certificates(after=after, limit=min(1000, count - len(out)))
            if not page:
                break
            for cert in page:
                out.append((list(cert.names), cert.chain_pem.decode(),
                            keybox.decrypt(cert.key_encrypted).decode()))
            after = page[-1].id
        return out
    finally:
        await store.close()


@dataclass
class HandshakeTally:
    """One server's timed handshakes for one SNI set, summed over the alternating rounds."""

    handshakes: int = 0
    failures: int = 0
    seconds: float = 0.0
    server_cpu: float = 0.0
    first_error: str = ""
    latencies_ms: list[float] = field(default_factory=list)
    rounds: list[float] = field(default_factory=list)
    """Handshakes per server CPU-second of each round."""

    def add(self, load: HandshakeLoad) -> None:
        self.handshakes += load.handshakes
        self.failures += load.failures
        self.seconds += load.seconds
        self.server_cpu += load.server_cpu
        self.first_error = self.first_error or load.first_error
        self.latencies_ms += load.latencies_ms
        self.rounds.append(load.per_cpu_second)

    @property
    def per_cpu_second(self) -> float:
        return self.handshakes / self.server_cpu if self.server_cpu else float("nan")

    def as_dict(self) -> dict[str, Any]:
        return {"handshakes": self.handshakes, "failures": self.failures,
                "seconds": self.seconds, "server_cpu": self.server_cpu,
                "per_cpu_second": self.per_cpu_second, "rounds": self.rounds,
                "latency_ms": summary(self.latencies_ms), "first_error": self.first_error}


async def negotiated(port: int, name: str) -> str:
    """The protocol version and cipher suite the benchmark client gets from ``port``, so the
    table shows that both servers did the same work (e.g. nginx 1.22 stops at TLS 1.2 unless
    told otherwise)."""
    _, writer = await asyncio.wait_for(asyncio.open_connection(
        "127.0.0.1", port, ssl=client_context(), server_hostname=name), 10)
    try:
        tls = writer.get_extra_info("ssl_object")
        cipher = tls.cipher() if tls is not None else None
        return f"{tls.version() if tls else '?'} {cipher[0] if cipher else '?'}"
    finally:
        writer.transport.abort()


async def tls_rounds(run: Run, servers: dict[str, tuple[Child, int]], names: list[str],
                     args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Warm every server with one pass over ``names`` (its CPU reported as the cold cost),
    then ``--rounds`` alternating batches on each, so that the load of a shared machine
    hits every server alike. Returns each server's tally and warm-up figures."""
    out: dict[str, dict[str, Any]] = {}
    for label, (child, port) in servers.items():
        run.progress(f"{label}: warm-up pass over {len(names):,} SNI names")
        before = child.cpu()
        warm = await tls_handshakes_multi(port, names, count=len(names), seconds=600,
                                          concurrency=args.concurrency, clients=args.clients)
        cpu = child.cpu() - before
        out[label] = {"warmup": {"handshakes": warm.handshakes, "failures": warm.failures,
                                 "server_cpu": cpu, "seconds": warm.seconds,
                                 "cpu_ms_per_handshake": 1000 * cpu / max(1, warm.handshakes)},
                      "rss_kib": child.rss_kib()}
    tallies = {label: HandshakeTally() for label in servers}
    batch = max(1, args.handshakes // max(1, args.rounds))
    # Each round goes on where the server's previous one stopped: the timed handshakes use
    # min(--handshakes, len(names)) distinct names, not the same batch of names every round.
    position = dict.fromkeys(servers, 0)
    for r in range(max(1, args.rounds)):
        order = list(servers.items())
        if r % 2:
            order.reverse()  # neither server always runs right after the other
        for label, (child, port) in order:
            before = child.cpu()
            load = await tls_handshakes_multi(port, names, count=batch, seconds=args.duration,
                                              concurrency=args.concurrency, clients=args.clients,
                                              offset=position[label])
            position[label] += load.handshakes + load.failures
            load.server_cpu = child.cpu() - before
            tallies[label].add(load)
        run.progress("round " + str(r + 1) + ": " + ", ".join(
            f"{label} {t.rounds[-1]:,.0f}" for label, t in tallies.items())
            + " handshakes per server CPU-second")
    for label, tally in tallies.items():
        out[label].update(tally.as_dict())
        out[label]["timed_distinct_names"] = min(position[label], len(names))
        out[label]["rss_kib_after"] = servers[label][0].rss_kib()
    return out


@scenario("tls", "fresh TLS handshakes cycling N SNI names (asyncio generator): edge HTTPS "
                 "vs nginx with the same certificates, both warm, alternating batches; "
                 "handshakes per CPU-second",
          quick={"sites": 2_000, "certs": 100, "sni": [10, 100], "handshakes": 400,
                 "rounds": 2, "duration": 5.0, "nginx_certs": 100, "context_cache": 100,
                 "concurrency": 8, "clients": 1},
          arguments=_tls_arguments)
async def tls(args: argparse.Namespace, run: Run) -> None:
    missing = tool_missing("nginx")
    if missing:
        run.skip("*", missing)
        return
    edge_missing = proxy_missing("https")
    if edge_missing:
        run.skip("edge", edge_missing)
    sizes = sorted({min(n, args.certs) for n in args.sni})
    async with web_fleet(args, run, "tls", certs=args.certs) as fleet, \
            contextlib.AsyncExitStack() as stack:
        shape = fleet.shape
        upstream = (shape.host_address(0), fleet.backend.ports["0"])
        servers: dict[str, tuple[Child, int]] = {}
        started: dict[str, float] = {}
        if not edge_missing:
            # Like with like: nginx runs with session tickets off (peers.start_nginx_tls), so
            # the edge's TLS 1.3 tickets (two per handshake by default) are off here too.
            toml = edge_toml(fleet.url, {"https": {"listen": ["127.0.0.1:0"],
                                                   "context_cache_size": args.context_cache,
                                                   "session_tickets": args.edge_tickets}},
                             secret=BENCH_SECRET_KEY)
            edge = await stack.enter_async_context(await start_edge(
                fleet.workdir, toml, workers=args.workers, expect=["https"]))
            servers["edge"] = (edge, edge.ports["https"])
            started["edge"] = edge.started_seconds
        # nginx preloads every certificate it may serve (static server blocks): the very
        # certificates and keys of the directory, read back and decrypted.
        top = min(max(sizes), args.nginx_certs)
        certs = await directory_certificates(fleet.url, top)
        run.progress(f"nginx: starting with {top:,} server blocks")
        begin = time.perf_counter()
        nginx = await stack.enter_async_context(await start_nginx_tls(
            fleet.workdir, certs, upstream, workers=args.workers))
        started["nginx"] = time.perf_counter() - begin
        results: dict[int, dict[str, dict[str, Any]]] = {}
        protocols = {label: await negotiated(port, "www.tenant0.example")
                     for label, (_, port) in {**servers, "nginx": (nginx, nginx.ports["https"])}.items()}
        for label, text in protocols.items():
            run.text_row(f"{label} negotiates (client: Python ssl, X25519 by default)", text)
        if len(set(protocols.values())) > 1:
            run.progress(f"WARNING: the servers negotiate different protocols: {protocols}")
        for n in sizes:
            present = dict(servers)
            if n <= top:
                present["nginx"] = (nginx, nginx.ports["https"])
            results[n] = await tls_rounds(run, present, [f"www.tenant{t}.example"
                                                         for t in range(n)], args)
        for n in sizes:
            edge_r, nginx_r = results[n].get("edge"), results[n].get("nginx")
            peer = ("nginx", nginx_r["per_cpu_second"]) if nginx_r else None
            for label, r in results[n].items():
                if label == "nginx" and edge_r:
                    continue
                run.row(f"{label} handshakes per CPU-second, {n} SNI names (rounds "
                        f"{min(r['rounds']):,.0f}-{max(r['rounds']):,.0f})",
                        r["per_cpu_second"], "hs/cpu-s", peer if label == "edge" else None,
                        digits=0)
                run.row(f"{label} handshake p50, {n} SNI names", r["latency_ms"]["p50"], "ms",
                        ("nginx", nginx_r["latency_ms"]["p50"]) if nginx_r and label == "edge"
                        else None)
                run.row(f"{label} handshake p99, {n} SNI names", r["latency_ms"]["p99"], "ms",
                        ("nginx", nginx_r["latency_ms"]["p99"]) if nginx_r and label == "edge"
                        else None)
                run.row(f"{label} failed handshakes, {n} SNI names", r["failures"], "", digits=0)
                run.row(f"{label} distinct SNI names in the timed rounds, {n} names",
                        r["timed_distinct_names"], "", digits=0)
            if edge_r:
                run.row(f"edge first-handshake CPU (cold: lookup, key, context), {n} names",
                        edge_r["warmup"]["cpu_ms_per_handshake"], "ms")
            for label, r in results[n].items():
                run.row(f"{label} RSS after {n} names warm", r["rss_kib_after"] / 1024, "MiB",
                        digits=0)
        for label, seconds in started.items():
            run.row(f"{label} start-up (spawn to accepting)", seconds, "s")
        # By server, then by SNI set size (the shape benchmarks/plot.py reads).
        by_server: dict[str, dict[str, Any]] = {}
        for n, per_server in results.items():
            for label, r in per_server.items():
                by_server.setdefault(label, {})[str(n)] = r
        run.data.update(results=by_server, sizes=sizes,
                        workers=args.workers, context_cache_size=args.context_cache,
                        edge_session_tickets=args.edge_tickets, started_seconds=started,
                        protocols=protocols)
