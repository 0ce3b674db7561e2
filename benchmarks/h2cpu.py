"""CPU per proxied HTTP/2 request, edge vs nginx (issue 14 §3), the way ``benchmarks.httpcpu``
measures HTTP/1.

``python -m benchmarks.h2cpu [--runs 5 --requests 20000 --idle 1000]``

* the nginx backend of ``benchmarks.httpcpu`` (1 KiB, ``Cache-Control: public, max-age=300``)
  and ``h2load -c 50 -m 10`` pinned to core 0;
* the proxy under test alone on core 1, both speaking HTTP/2 with prior knowledge (h2c: the TLS
  layer is the same OpenSSL in both, so it is left out of the protocol comparison) and keeping
  HTTP/1.1 keep-alive connections to the backend: ``edge serve --workers 1`` with
  ``[http] h2c = true``, and nginx with ``listen ... http2`` (1.22 here: ``http2 on`` came in
  1.25.1), ``keepalive 64`` upstream and ``proxy_cache`` for ``/c/``; an access log file on both;
  ``--pool N`` sets the edge's ``pool_size`` and nginx's ``keepalive`` to N (64: the edge's
  default; 500 streams in flight need up to 500 backend connections, and with 64 nginx closes
  and reopens the surplus of each burst);
* CPU time of the proxy's processes per request, cases alternating within each round; p99
  from h2load's per-request log (``--log-file``);
* memory per idle HTTP/2 connection: RSS of the proxy before and after ``--idle`` connections
  that sent the preface and SETTINGS and then wait (the edge's worker; nginx's worker), on the
  fresh processes before any load.

``--python``: only our Python (robust to other load): the engine in this process over a real
(SQLite) directory, a fake client transport and a fake pooled backend connection, each request
one HEADERS frame fed to the HTTP/2 front end, answered by the backend's 1 KiB response,
``time.process_time`` per request (best of the rounds), next to the same for HTTP/1
(``benchmarks.httpcpu --python``'s request through the HTTP/1 front end).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.httpcpu import SITES, _fmt, pin, provision, start_backend, start_nginx_proxy
from benchmarks.procs import Child, edge_toml, start_edge

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
"""The connection preface and an empty SETTINGS frame: what an idle client has sent."""


@dataclass
class Case:
    label: str
    proxy: str
    host: str
    path: str
    cpu_us: list[float] = field(default_factory=list)
    p99_ms: list[float] = field(default_factory=list)


async def start_nginx_h2(workdir: Path, backend_port: int, pool: int) -> Child:
    return await start_nginx_proxy(workdir, backend_port, http2=True, name="nginx-h2",
                                   keepalive=pool)


async def start_edge_h2(workdir: Path, url: str, pool: int) -> Child:
    folder = workdir / "edge"
    folder.mkdir()
    # Every client is 127.0.0.1: without lifting the per-address cap (256), most of the idle
    # connections would be refused (GOAWAY) and the memory per connection undercounted.
    toml = edge_toml(url, {"http": {"listen": ["127.0.0.1:0"], "h2c": True, "pool_size": pool,
                                    "max_connections_per_ip": 0,
                                    "access_log": str(folder / "access.log")}})
    return await start_edge(folder, toml, workers=1, expect=["http"])


async def h2load(port: int, host: str, path: str, requests: int, log: Path) -> tuple[int, float]:
    """(requests that succeeded, p99 ms) of one pinned h2load run (h2c prior knowledge)."""
    argv = ["taskset", "-c", "0", "h2load", "-c", "50", "-m", "10", "-n", str(requests),
            "-H", f":authority: {host}", "--log-file", str(log), f"http://127.0.0.1:{port}{path}"]
    proc = await asyncio.create_subprocess_exec(*argv, stdout=subprocess.PIPE,
                                                stderr=subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 300)
    text = out.decode()
    succeeded = 0
    for line in text.splitlines():
        if line.startswith("requests:"):
            succeeded = int(line.split("succeeded")[0].split(",")[-1].split()[0])
    elapsed = sorted(int(line.split("\t")[2]) for line in _read_and_remove(log)
                     if line.count("\t") >= 2 and line.split("\t")[1] == "200")
    if not succeeded or not elapsed:
        raise RuntimeError(f"h2load: {text[-600:]} {err.decode()[-400:]}")
    return succeeded, elapsed[int(len(elapsed) * 0.99) - 1] / 1000


def _read_and_remove(path: Path) -> list[str]:
    lines = path.read_text().splitlines()
    path.unlink()
    return lines


async def measure(case: Case, child: Child, args: argparse.Namespace, log: Path) -> None:
    before = child.cpu()
    done, p99 = await h2load(child.ports["http"], case.host, case.path, args.requests, log)
    cpu = child.cpu() - before
    if done < args.requests:
        raise RuntimeError(f"{case.label}: only {done} of {args.requests} requests succeeded")
    case.cpu_us.append(cpu / done * 1e6)
    case.p99_ms.append(p99)


async def idle_connection_kib(child: Child, count: int) -> float:
    """RSS growth per idle HTTP/2 connection (KiB): ``count`` clients that sent the preface
    and SETTINGS, read the server's SETTINGS, then wait."""
    before = child.rss_kib()
    conns = []
    for _ in range(count):
        reader, writer = await asyncio.open_connection("127.0.0.1", child.ports["http"])
        writer.write(PREFACE)
        conns.append((reader, writer))
    for reader, _ in conns:
        await asyncio.wait_for(reader.read(4096), 10)
    await asyncio.sleep(1.0)
    after = child.rss_kib()
    for reader, _ in conns:
        with contextlib.suppress(TimeoutError):  # a refused one has its GOAWAY and EOF here
            await asyncio.wait_for(reader.read(4096), 0.001)
    open_ = sum(not reader.at_eof() for reader, _ in conns)
    for _, writer in conns:
        writer.close()
    if open_ < count:
        raise RuntimeError(f"only {open_} of {count} idle connections were kept open")
    return (after - before) / count


async def main_async(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="edge-h2cpu-") as folder:
        workdir = Path(folder)
        url = f"sqlite:///{workdir}/edge.sqlite3"
        children: list[Child] = []
        try:
            backend = await start_backend(workdir)
            children.append(backend)
            pin(backend.pid, 0)
            await provision(url, backend.ports["http"])
            proxies = {"edge": await start_edge_h2(workdir, url, args.pool),
                       "nginx": await start_nginx_h2(workdir, backend.ports["http"], args.pool)}
            children.extend(proxies.values())
            for child in proxies.values():
                pin(child.pid, 1)
            cases = [Case("edge h2 miss", "edge", SITES["miss"][0], "/index.html"),
                     Case("edge h2 cache hit", "edge", SITES["hit"][0], "/c/index.html"),
                     Case("nginx h2 proxy", "nginx", SITES["miss"][0], "/index.html"),
                     Case("nginx h2 proxy_cache hit", "nginx", SITES["hit"][0], "/c/index.html")]
            # First, on the fresh workers: after the load rounds, new connections reuse the
            # heap those rounds freed (the allocator's high-water), and RSS hardly moves.
            idle = {name: await idle_connection_kib(child, args.idle)
                    for name, child in proxies.items()} if args.idle else {}
            log = workdir / "h2load.log"
            for c in cases:  # warm-up: lookups cached, pools filled, cache entries stored
                await h2load(proxies[c.proxy].ports["http"], c.host, c.path, 2000, log)
            for r in range(args.runs):
                for c in cases if r % 2 == 0 else cases[::-1]:
                    await measure(c, proxies[c.proxy], args, log)
                print(f"  round {r + 1}/{args.runs}: " + ", ".join(
                    f"{c.label} {c.cpu_us[-1]:.1f}" for c in cases), file=sys.stderr)
            report(cases, idle, args)
        finally:
            for child in reversed(children):
                child.stop()


def report(cases: list[Case], idle: dict[str, float], args: argparse.Namespace) -> None:
    by = {c.label: c for c in cases}
    print(f"\nCPU per request (µs), median (min-max) of {args.runs} alternating runs, "
          f"h2load -c 50 -m 10 -n {args.requests} (h2c), 1 KiB responses, access log on, "
          f"pool_size = keepalive = {args.pool}")
    print(f"{'case':<26} {'µs/request':>22} {'per-round ratio vs nginx':>26} {'p99 ms':>20}")
    for c in cases:
        peer = by["nginx h2 proxy_cache hit" if "hit" in c.label else "nginx h2 proxy"]
        ratios = [a / b for a, b in zip(c.cpu_us, peer.cpu_us, strict=True)]
        p99s = [a / b for a, b in zip(c.p99_ms, peer.p99_ms, strict=True)]
        ratio = "" if c.proxy == "nginx" else f"{_fmt(ratios, 2)} (p99 {statistics.median(p99s):.2f}x)"
        print(f"{c.label:<26} {_fmt(c.cpu_us):>22} {ratio:>26} {_fmt(c.p99_ms, 2):>20}")
    for name, kib in idle.items():
        print(f"memory per idle HTTP/2 connection, {name}: {kib:.1f} KiB (RSS, {args.idle} connections)")
    with open("/proc/loadavg") as f:
        print(f"load average at the end: {' '.join(f.read().split()[:3])}")


async def python_only(rounds: int, count: int) -> dict[str, float]:
    """µs of Python per request over HTTP/2 (miss, cache hit) and HTTP/1 (miss), best of
    ``rounds`` x ``count``."""
    import logging
    import time

    import h2.config
    import h2.connection

    from benchmarks.httpcpu import RESPONSE, _FakeTransport
    from edge.config import EdgeConfig, HttpConfig
    from edge.directory.directory import Directory
    from edge.directory.feed import ChangeFeed
    from edge.directory.stores import store_for_url
    from edge.registry import ProxyContext
    from httpproxy.front_h1 import ClientConnection
    from httpproxy.http2 import H2Connection
    from httpproxy.server import HttpEngine
    from httpproxy.upstream import BackendConnection

    with tempfile.TemporaryDirectory(prefix="edge-h2cpu-py-") as folder:
        url = f"sqlite:///{folder}/edge.sqlite3"
        await provision(url, 8)
        store = store_for_url(url)
        await store.open()
        config = EdgeConfig(http=HttpConfig(access_log=f"{folder}/access.log"))
        directory = Directory(store, config.cache)
        context = ProxyContext(config=config, directory=directory,
                               feed=ChangeFeed(directory, interval=3600), keybox=None,
                               worker_id=0, logger=logging.getLogger("h2cpu"), name="http")
        engine = HttpEngine(context)
        # The fake backend never closes: cases that never reach it (cache hits) must not
        # retire it (a backend that announces no Keep-Alive timeout is reused for 1.5 s).
        engine.pool.unhinted_idle = engine.pool.idle_timeout
        backend = BackendConnection(engine.pool, ("127.0.0.1", 8, b"", ""))
        backend.connection_made(_FakeTransport(("127.0.0.1", 8)))  # type: ignore[arg-type]
        engine.pool.release(backend)

        def h2_round(host: str, path: str) -> float:
            """One fresh HTTP/2 connection, ``count`` requests one after another."""
            front = H2Connection(engine, "http", None, None)
            front.connection_made(_FakeTransport(("127.0.0.1", 40000)))  # type: ignore[arg-type]
            client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
            client.initiate_connection()
            client.increment_flow_control_window(2**31 - 1 - 65535)
            front.data_received(client.data_to_send())
            frames = []
            for _ in range(count):
                sid = client.get_next_available_stream_id()
                client.send_headers(sid, [(":method", "GET"), (":scheme", "http"),
                                          (":authority", host), (":path", path),
                                          ("user-agent", "h2load"), ("accept", "*/*")],
                                    end_stream=True)
                frames.append(client.data_to_send())
            started = time.process_time()
            for frame in frames:
                front.data_received(frame)
                if backend.sink is not None:
                    backend.data_received(RESPONSE)
                front._flush()  # what the loop's call_soon would run
            spent = time.process_time() - started
            front.shutdown()
            return spent / count * 1e6

        def h1_round(host: str, path: str) -> float:
            conn = ClientConnection(engine, "http", None, None)
            conn.connection_made(_FakeTransport(("127.0.0.1", 40000)))  # type: ignore[arg-type]
            request = b"GET %b HTTP/1.1\r\nHost: %b\r\n\r\n" % (path.encode(), host.encode())
            started = time.process_time()
            for _ in range(count):
                conn.data_received(request)
                if backend.sink is not None:
                    backend.data_received(RESPONSE)
            spent = time.process_time() - started
            conn.shutdown()
            return spent / count * 1e6

        cases = {"HTTP/2 miss": (h2_round, SITES["miss"][0], "/index.html"),
                 "HTTP/2 cache hit": (h2_round, SITES["hit"][0], "/c/index.html"),
                 "HTTP/1.1 miss": (h1_round, SITES["miss"][0], "/index.html"),
                 "HTTP/1.1 cache hit": (h1_round, SITES["hit"][0], "/c/index.html")}
        results = {label: float("inf") for label in cases}
        for run, host, path in cases.values():  # warm: routes looked up, cache filled
            run(host, path)
            await asyncio.sleep(0.05)
            run(host, path)
        for _ in range(rounds):
            for label, (run, host, path) in cases.items():
                results[label] = min(results[label], run(host, path))
                await asyncio.sleep(0)
        await engine.close()
        await store.close()
        return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--idle", type=int, default=1000, help="idle connections (0: skip)")
    parser.add_argument("--pool", type=int, default=64,
                        help="idle backend connections kept: edge pool_size = nginx keepalive")
    parser.add_argument("--python", action="store_true", help="Python-only cost (see above)")
    args = parser.parse_args()
    if args.python:
        import uvloop

        results = uvloop.run(python_only(args.runs, 1000))
        print(f"\nPython µs per request (fake transports, process_time, best of {args.runs} x 1000)")
        for label, value in results.items():
            print(f"{label:<22} {value:6.2f}")
        return
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
