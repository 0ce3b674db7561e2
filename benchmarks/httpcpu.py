"""CPU per proxied HTTP request, edge vs nginx, the way issue 5 measures it.

``python -m benchmarks.httpcpu [--runs 7 --duration 4]``

* an nginx backend answering 1 KiB (``Cache-Control: public, max-age=300``), pinned to core 0;
* ``wrk -t1 -c50`` pinned to core 0, one fixed ``Host`` per run (no Lua script: the load
  generator's own CPU stays small);
* the proxy under test alone on core 1: ``edge serve --workers 1`` (one site per case: no
  filters and cache off; three filters; cache ``full``) and nginx as reverse proxy
  (``keepalive 64`` upstream, ``proxy_cache`` for ``/c/``), both with an access log file;
* issue 15's cache rows on both proxies: a hit on a response with ``Vary`` (``/v/``) and a
  revalidated hit (``/r/``, every request a 304 from the backend: :func:`start_backend`,
  :data:`REVALIDATED_PATHS`), each checked by the proxies' own X-Cache / Cache-Status;
* CPU time of the proxy's processes (``/proc`` utime+stime) divided by the requests of the
  run; the cases alternate within each round so every ratio compares the same minutes.

``--defaults`` adds the edge in its default configuration (no ``access_log`` set: the
lines go to the edge log on stderr, as journald receives them).

``--baseline DIR`` adds the edge with ``DIR`` first on ``PYTHONPATH`` (e.g. a scratch copy of
an older ``httpproxy/``) to every round, for A/B comparisons of a change.

``--python`` measures only our Python instead: the engine in this process over a real
(SQLite) directory, fake client and backend transports (no sockets, no kernel), requests fed
straight into the protocol callbacks, ``time.process_time`` per request (best of the rounds).
Robust to other load on the machine; with ``--baseline`` each round alternates between this
code and the baseline's (run in a child process).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from email.utils import formatdate
from pathlib import Path
from typing import Any

from benchmarks.procs import (
    Child,
    descendants,
    edge_toml,
    free_port,
    nginx_main_conf,
    start_edge,
    start_nginx,
)
from edge.directory.service import DirectoryService
from edge.directory.stores import store_for_url

BODY_BYTES = 1024
FILTERS = {"ip_deny": ["10.0.0.0/8", "192.168.0.0/16"], "path_deny": [{"prefix": "/wp-admin"}],
           "user_agent_deny": ["(?i)badbot"]}
"""Three filters every request passes (IP, path and user-agent checks evaluated)."""
CACHE_FULL = {"mode": "full", "ttl": {"200": 600, "404": 60}}
SITES = {"miss": ("www.miss.test", None, None), "filters": ("www.filters.test", FILTERS, None),
         "hit": ("www.hit.test", None, CACHE_FULL), "reval": ("www.reval.test", None, {"mode": "standard"})}
"""``reval``: the honest mode (origin's headers only, Cache-Status on: a new site's default)."""
REVALIDATED_PATHS = 1000
"""The revalidated rows cycle through this many URLs (``/r/N.html``): with one URL the edge's
request collapsing would let one revalidation answer every request that waits for it (wrk's
50 connections), and the row would measure mostly hits. Distinct URLs make each request a
revalidation on both proxies (the backend's 304 count per request is printed)."""
VARY_PATH = "/v/index.html"
VARY_REQUEST = ("Accept-Language: en-US,en;q=0.5",)
"""What the Vary rows send: the backend's ``/v/`` answers vary on Accept-Language."""

_REQUESTS = re.compile(r"^\s*(\d+) requests in")
_PCT = re.compile(r"^\s*(50|75|90|99)%\s+([\d.]+)(us|ms|s)\s*$")
_NON2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")


@dataclass
class Case:
    label: str
    proxy: str  # a key of the proxies dict
    host: str
    path: str
    peer: str = "nginx proxy"
    """The nginx case this one's ratios are taken against."""
    headers: tuple[str, ...] = ()
    """Request header lines wrk adds (besides Host)."""
    cycle: int = 0
    """> 0: request ``{path}{i}.html`` for i cycling through ``range(cycle)`` (a wrk script)."""
    cpu_us: list[float] = field(default_factory=list)
    p99_ms: list[float] = field(default_factory=list)
    rps: list[float] = field(default_factory=list)
    revalidations: list[float] = field(default_factory=list)
    """304s the backend sent per request of the run (revalidated cases)."""


def pin(pid: int, cpu: int) -> None:
    """Pin a process and its descendants (all threads) to one CPU."""
    for p in [pid, *descendants(pid)]:
        subprocess.run(["taskset", "-a", "-p", "-c", str(cpu), str(p)], check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def provision(url: str, backend_port: int) -> None:
    store = store_for_url(url)
    await store.open()
    try:
        await store.migrate()
        service = DirectoryService(store)
        await service.add_host("b1", "127.0.0.1", http_port=backend_port)
        await service.add_tenant("t1", "b1")
        for name, filters, policy in SITES.values():
            await service.add_site(name, "t1", filters=filters, cache_policy=policy)
    finally:
        await store.close()


async def start_backend(workdir: Path) -> Child:
    """``/r/``: ``max-age=0`` plus the file's ETag and Last-Modified, so every use of the
    stored response is a revalidation answered 304 (nginx's static module answers
    conditionals). nginx as proxy does not store ``max-age=0``: ``X-Accel-Expires: @1`` (an
    absolute time long past, nginx-only) makes it store the response already stale, and its
    ``/r/`` ignores Cache-Control. ``/v/``: ``Vary: Accept-Language``. The backend logs each
    status to ``access.log`` (:func:`backend_304s`)."""
    port = free_port()
    folder = workdir / "backend"
    folder.mkdir()
    (folder / "page.html").write_bytes(b"x" * (BODY_BYTES - 1) + b"\n")
    body = f"""
  log_format status_only '$status';
  server {{
    listen 127.0.0.1:{port} reuseport;
    access_log {folder}/access.log status_only;
    location /r/ {{
      add_header X-Accel-Expires @1;
      add_header Cache-Control "max-age=0";
      default_type text/html;
      root {folder};
      try_files /page.html =404;
    }}
    location /v/ {{
      add_header Cache-Control "public, max-age=300";
      add_header Vary Accept-Language;
      default_type text/html;
      root {folder};
      try_files /page.html =404;
    }}
    location / {{
      add_header Cache-Control "public, max-age=300";
      default_type text/html;
      root {folder};
      try_files /page.html =404;
    }}
  }}"""
    child = await start_nginx(workdir, "backend", nginx_main_conf(folder, body),
                              [("127.0.0.1", port)])
    child.ports["http"] = port
    return child


def backend_304s(workdir: Path) -> int:
    """304s the backend has answered so far (its status-only access log)."""
    try:
        return (workdir / "backend" / "access.log").read_bytes().count(b"304\n")
    except FileNotFoundError:
        return 0


async def start_nginx_proxy(workdir: Path, backend_port: int, *, log_buffer: str = "",
                            http2: bool = False, name: str = "nginx-proxy",
                            keepalive: int = 64) -> Child:
    """nginx as the peer reverse proxy (``keepalive`` idle upstream connections, like the
    edge's ``pool_size``; ``proxy_cache`` for ``/c/``); ``http2``: HTTP/2 with prior knowledge
    on its port (benchmarks.h2cpu)."""
    port = free_port()
    folder = workdir / name
    folder.mkdir()
    names = " ".join(name for name, _, _ in SITES.values())
    log_opts = f" buffer={log_buffer} flush=1s" if log_buffer else ""
    listen_opts = " http2" if http2 else ""
    streams = "\n    http2_max_concurrent_streams 128;" if http2 else ""
    body = f"""
  proxy_cache_path {folder}/cache levels=1:2 keys_zone=edge:16m max_size=256m inactive=10m;
  upstream b1 {{ server 127.0.0.1:{backend_port}; keepalive {keepalive}; }}
  server {{
    listen 127.0.0.1:{port}{listen_opts} reuseport;
    server_name {names};
    access_log {folder}/access.log combined{log_opts};{streams}
    proxy_http_version 1.1;
    proxy_set_header Connection "";
    proxy_set_header Host $host;
    proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
    proxy_set_header X-Real-IP $remote_addr;
    proxy_set_header X-Forwarded-Proto $scheme;
    proxy_set_header X-Forwarded-Host $host;
    location / {{ proxy_pass http://b1; }}
    location /c/ {{
      proxy_cache edge;
      add_header X-Cache $upstream_cache_status;
      proxy_pass http://b1;
    }}
    location /v/ {{
      proxy_cache edge;
      add_header X-Cache $upstream_cache_status;
      proxy_pass http://b1;
    }}
    location /r/ {{
      proxy_cache edge;
      proxy_cache_revalidate on;
      proxy_ignore_headers Cache-Control;
      add_header X-Cache $upstream_cache_status;
      proxy_pass http://b1;
    }}
  }}"""
    if not http2:
        body += f"""
  server {{
    listen 127.0.0.1:{port} default_server;
    return 404;
  }}"""
    child = await start_nginx(workdir, name, nginx_main_conf(folder, body),
                              [("127.0.0.1", port)])
    child.ports["http"] = port
    return child


async def start_our_edge(workdir: Path, url: str, name: str, *, pythonpath: str = "",
                         log_file: bool = True) -> Child:
    """``log_file=False``: the default ``access_log = ""`` (lines on the edge log's stderr,
    which ``spawn`` sends to a file as journald would take it)."""
    folder = workdir / name
    folder.mkdir()
    http: dict[str, object] = {"listen": ["127.0.0.1:0"]}
    sections: dict[str, dict[str, object]] = {"http": http}
    if log_file:
        http["access_log"] = str(folder / "access.log")
    else:  # the default log level and format (edge_toml's quiet "warning" drops access lines)
        sections["log"] = {"level": "info", "format": "json"}
    toml = edge_toml(url, sections)
    return await start_edge(folder, toml, workers=1, expect=["http"], pythonpath=pythonpath)


def _ms(value: str, unit: str) -> float:
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def cycle_script(path: str, count: int) -> str:
    """A wrk script requesting ``{path}{i}.html``, i = 0, 1, ..., count - 1, 0, ..."""
    script = Path(tempfile.gettempdir()) / f"edge-httpcpu-cycle-{os.getpid()}-{count}.lua"
    script.write_text(f"""local i = 0
request = function()
  i = (i + 1) % {count}
  return wrk.format(nil, "{path}" .. i .. ".html")
end
""")
    return str(script)


def request_path(case: Case) -> str:
    """One URL of ``case`` (the first of a cycling case's)."""
    return f"{case.path}0.html" if case.cycle else case.path


async def wrk(port: int, host: str, path: str, seconds: float, connections: int,
              headers: tuple[str, ...] = (), cycle: int = 0) -> tuple[int, float, int]:
    """(requests, p99 ms, non-2xx responses) of one pinned wrk run; ``cycle``: see
    :attr:`Case.cycle`."""
    extra = [arg for line in headers for arg in ("-H", line)]
    if cycle:
        extra += ["-s", cycle_script(path, cycle)]
    argv = ["taskset", "-c", "0", "wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s",
            "--latency", "-H", f"Host: {host}", *extra, f"http://127.0.0.1:{port}{path}"]
    proc = await asyncio.create_subprocess_exec(*argv, stdout=subprocess.PIPE,
                                                stderr=subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), seconds + 60)
    requests, p99, bad = 0, 0.0, 0
    for line in out.decode().splitlines():
        if m := _REQUESTS.match(line):
            requests = int(m.group(1))
        elif (m := _PCT.match(line)) and m.group(1) == "99":
            p99 = _ms(m.group(2), m.group(3))
        elif m := _NON2XX.search(line):
            bad = int(m.group(1))
    if not requests:
        raise RuntimeError(f"wrk: {out.decode()[-400:]} {err.decode()[-400:]}")
    return requests, p99, bad


async def measure(case: Case, child: Child, args: argparse.Namespace, workdir: Path) -> None:
    before, revalidated = child.cpu(), backend_304s(workdir)
    requests, p99, bad = await wrk(child.ports["http"], case.host, case.path, args.duration,
                                   args.connections, case.headers, case.cycle)
    cpu = child.cpu() - before
    if bad:
        raise RuntimeError(f"{case.label}: {bad} non-2xx responses")
    case.revalidations.append((backend_304s(workdir) - revalidated) / requests)
    case.cpu_us.append(cpu / requests * 1e6)
    case.p99_ms.append(p99)
    case.rps.append(requests / max(1, round(args.duration)))


def _fmt(values: list[float], digits: int = 1) -> str:
    med = statistics.median(values)
    return f"{med:.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def report(cases: list[Case], args: argparse.Namespace) -> None:
    by = {c.label: c for c in cases}
    nginx_proxy = statistics.median(by["nginx proxy"].cpu_us)
    nginx_p99 = statistics.median(by["nginx proxy"].p99_ms)
    print(f"\nCPU per request (µs), median (min-max) of {args.runs} alternating runs, "
          f"wrk -t1 -c{args.connections} -d{args.duration:g}s, 1 KiB responses, access log on")
    print(f"{'case':<34} {'µs/request':>22} {'vs nginx proxy':>15} {'vs nginx peer':>14} "
          f"{'p99 ms':>20} {'p99 vs nginx':>13} {'req/s':>8} {'304s/req':>9}")
    for c in cases:
        med = statistics.median(c.cpu_us)
        p99 = statistics.median(c.p99_ms)
        vs_peer = (f"{med / statistics.median(by[c.peer].cpu_us):.2f}x"
                   if c.peer != "nginx proxy" and c.peer in by else "")
        print(f"{c.label:<34} {_fmt(c.cpu_us):>22} {med / nginx_proxy:>14.2f}x {vs_peer:>14} "
              f"{_fmt(c.p99_ms, 2):>20} {p99 / nginx_p99:>12.2f}x {statistics.median(c.rps):>8.0f}"
              f" {statistics.median(c.revalidations):>9.2f}")
    # Ratios taken within each round (neighbouring minutes) are steadier than ratios of
    # medians when other load comes and goes.
    print("\nper-round ratios, median (min-max):")
    for c in cases:
        if c.proxy == "nginx" or c.peer not in by:
            continue
        peer = by[c.peer]
        ratios = [a / b for a, b in zip(c.cpu_us, peer.cpu_us, strict=True)]
        line = f"  {c.label:<32} CPU vs {peer.label:<30} {_fmt(ratios, 2)}"
        if c.peer != "nginx proxy":
            proxy = [a / b for a, b in zip(c.cpu_us, by["nginx proxy"].cpu_us, strict=True)]
            line += f"   vs nginx proxy {_fmt(proxy, 2)}"
        p99s = [a / b for a, b in zip(c.p99_ms, by["nginx proxy"].p99_ms, strict=True)]
        line += f"   p99 vs nginx proxy {_fmt(p99s, 2)}"
        base = by.get(c.label.replace("edge", "baseline", 1))
        if c.proxy == "edge" and base is not None:
            ab = [a / b for a, b in zip(c.cpu_us, base.cpu_us, strict=True)]
            line += f"   edge/baseline {_fmt(ab, 2)}"
        print(line)
    with open("/proc/loadavg") as f:
        print(f"load average at the end: {' '.join(f.read().split()[:3])}")


def edge_cases(tag: str, proxy: str) -> list[Case]:
    """The edge's rows (``tag`` "edge", "baseline" or "defaults")."""
    hit = SITES["hit"][0]
    return [Case(f"{tag} miss", proxy, SITES["miss"][0], "/index.html"),
            Case(f"{tag} miss + 3 filters", proxy, SITES["filters"][0], "/index.html"),
            Case(f"{tag} cache hit", proxy, hit, "/c/index.html", "nginx proxy_cache hit"),
            *cache_cases(tag, proxy)]


def cache_cases(tag: str, proxy: str) -> list[Case]:
    """Issue 15's rows: a hit on a response with ``Vary`` (beside the plain hit: variant
    selection must not slow the no-Vary path) and a revalidated hit (every request a 304
    from the backend, default-mode site). Their nginx peers are :func:`nginx_cache_cases`."""
    return [Case(f"{tag} cache hit, Vary", proxy, SITES["hit"][0], VARY_PATH,
                 "nginx proxy_cache hit, Vary", VARY_REQUEST),
            Case(f"{tag} revalidated hit", proxy, SITES["reval"][0], "/r/",
                 "nginx revalidated hit", cycle=REVALIDATED_PATHS)]


def nginx_cache_cases() -> list[Case]:
    return [Case("nginx proxy_cache hit, Vary", "nginx", SITES["hit"][0], VARY_PATH,
                 "nginx proxy_cache hit, Vary", VARY_REQUEST),
            Case("nginx revalidated hit", "nginx", SITES["reval"][0], "/r/",
                 "nginx revalidated hit", cycle=REVALIDATED_PATHS)]


async def cache_status(port: int, case: Case) -> str:
    """The X-Cache (or Cache-Status) a proxy answers ``case``'s request with, by curl."""
    argv = ["curl", "-s", "-o", "/dev/null", "-D", "-", "-H", f"Host: {case.host}",
            *[arg for line in case.headers for arg in ("-H", line)],
            f"http://127.0.0.1:{port}{request_path(case)}"]
    proc = await asyncio.create_subprocess_exec(*argv, stdout=subprocess.PIPE)
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    found = [line.split(":", 1)[1].strip() for line in out.decode("latin-1").splitlines()
             if line.lower().startswith(("x-cache:", "cache-status:"))]
    return "; ".join(found)


async def check_cache_status(cases: list[Case], proxies: dict[str, Child]) -> None:
    """Each cache row's request answered as the row says (HIT / REVALIDATED) by the proxy's
    own header: the rows measure what their labels claim."""
    for c in cases:
        want = "REVALIDATED" if "revalidated" in c.label else "HIT" if "hit" in c.label else ""
        if want:
            got = await cache_status(proxies[c.proxy].ports["http"], c)
            if want not in got.upper():
                raise RuntimeError(f"{c.label}: answered {got!r}, not {want}")
            print(f"  {c.label}: {got}", file=sys.stderr)


async def main_async(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="edge-httpcpu-") as folder:
        workdir = Path(folder)
        url = f"sqlite:///{workdir}/edge.sqlite3"
        children: list[Child] = []
        try:
            backend = await start_backend(workdir)
            children.append(backend)
            pin(backend.pid, 0)
            await provision(url, backend.ports["http"])
            proxies: dict[str, Child] = {}
            proxies["edge"] = await start_our_edge(workdir, url, "edge")
            if args.baseline:
                proxies["baseline"] = await start_our_edge(workdir, url, "baseline",
                                                           pythonpath=args.baseline)
            if args.defaults:
                proxies["defaults"] = await start_our_edge(workdir, url, "defaults",
                                                           log_file=False)
            proxies["nginx"] = await start_nginx_proxy(workdir, backend.ports["http"],
                                                       log_buffer=args.nginx_log_buffer)
            children.extend(proxies.values())
            for child in proxies.values():
                pin(child.pid, 1)
            cases: list[Case] = []
            edges = ["edge", "baseline"] if args.baseline else ["edge"]
            for e in edges:
                cases += edge_cases("edge" if e == "edge" else "baseline", e)
            if args.defaults:
                cases += [Case("defaults miss", "defaults", SITES["miss"][0], "/index.html"),
                          Case("defaults cache hit", "defaults", SITES["hit"][0], "/c/index.html",
                               "nginx proxy_cache hit")]
            cases += [Case("nginx proxy", "nginx", SITES["miss"][0], "/index.html"),
                      Case("nginx proxy_cache hit", "nginx", SITES["hit"][0], "/c/index.html",
                           "nginx proxy_cache hit"),
                      *nginx_cache_cases()]
            only = set(args.only.split(",")) if args.only else None
            cases = [c for c in cases if only is None or c.label in only
                     or c.label.startswith("nginx")]
            # Warm-up: directory lookups cached, pools filled, the cache entries stored.
            for c in cases:
                await wrk(proxies[c.proxy].ports["http"], c.host, c.path, 1, args.connections,
                          c.headers, c.cycle)
            await check_cache_status(cases, proxies)
            for r in range(args.runs):
                order = cases if r % 2 == 0 else cases[::-1]
                for c in order:
                    await measure(c, proxies[c.proxy], args, workdir)
                print(f"  round {r + 1}/{args.runs}: " + ", ".join(
                    f"{c.label} {c.cpu_us[-1]:.1f}" for c in cases), file=sys.stderr)
            await check_cache_status(cases, proxies)
            report(cases, args)
        finally:
            for child in reversed(children):
                child.stop()


# -- Python-only ---------------------------------------------------------------------------

# Date is now: a cache computes the response's age from it (RFC 9111 §4.2.3), and a fixed
# date would make max-age=300 stale on arrival once the date is five minutes old.
RESPONSE = (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: "
            + formatdate(usegmt=True).encode() + b"\r\n"
            b"Content-Type: text/html\r\nContent-Length: 1024\r\n"
            b"Last-Modified: Mon, 23 Nov 2026 20:00:00 GMT\r\nConnection: keep-alive\r\n"
            b'ETag: "6b049bcd-400"\r\nCache-Control: public, max-age=300\r\n'
            b"Accept-Ranges: bytes\r\n\r\n" + b"x" * 1023 + b"\n")
BROWSER = (b"User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:120.0) Gecko/20100101 Firefox/120.0\r\n"
           b"Accept: text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8\r\n"
           b"Accept-Language: en-US,en;q=0.5\r\nAccept-Encoding: gzip, deflate, br\r\n"
           b"Referer: http://www.miss.test/\r\nUpgrade-Insecure-Requests: 1\r\n"
           b"Sec-Fetch-Dest: document\r\nSec-Fetch-Mode: navigate\r\n")
NOT_MODIFIED = (b"HTTP/1.1 304 Not Modified\r\nServer: nginx/1.22.1\r\n"
                b"Date: Mon, 23 Nov 2026 20:00:00 GMT\r\n"
                b"Last-Modified: Mon, 23 Nov 2026 20:00:00 GMT\r\nConnection: keep-alive\r\n"
                b'ETag: "6b049bcd-400"\r\nCache-Control: no-cache\r\n\r\n')
"""The backend's answer to a conditional request: 304, and ``no-cache`` so the stored
response stays one that is revalidated on every use."""
VARY_RESPONSE = RESPONSE.replace(b"Accept-Ranges: bytes\r\n",
                                b"Accept-Ranges: bytes\r\nVary: Accept-Language\r\n")
PY_CASES = {"miss": (b"www.miss.test", b"/index.html", b""),
            "miss + 3 filters": (b"www.filters.test", b"/index.html", b""),
            "cache hit": (b"www.hit.test", b"/c/index.html", b""),
            "miss, browser headers": (b"www.miss.test", b"/index.html", BROWSER),
            "cache hit, Vary": (b"www.hit.test", VARY_PATH.encode(),
                                VARY_REQUEST[0].encode() + b"\r\n"),
            "revalidated hit": (b"www.hit.test", b"/r/index.html", b"")}
"""``revalidated hit``: every request sends the backend a conditional request answered 304
(RFC 9111 §4.3) and is served from the stored response (not in baselines older than
revalidation: there it is a miss and is left out of the comparison). ``cache hit, Vary``:
the stored response varies on Accept-Language, which the request sends (a variant lookup)."""
PY_RESPONSES = {"cache hit, Vary": VARY_RESPONSE}
"""What the backend answers the first request of a case with (default :data:`RESPONSE`)."""


class _FakeTransport:
    """Just enough of an asyncio transport: writes are kept (the last one) and counted."""

    def __init__(self, peer: tuple[str, int]) -> None:
        self.peer = peer
        self.writes = 0
        self.closing = False

    def write(self, data: bytes) -> None:
        self.writes += 1

    def get_extra_info(self, name: str, default: object = None) -> object:
        return {"peername": self.peer, "sockname": ("127.0.0.1", 80)}.get(name, default)

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    abort = close

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0


MANY_SITES = 100_000
"""Sites of the many-names fleet (``--names``): the ``http`` scenario's default size."""


def many_names_cases(names: int) -> tuple[Any, dict[str, list[tuple[bytes, bytes]]]]:
    """The ``http`` scenario's load in miniature: its fleet shape on one host, ``names``
    Zipf-drawn request names from the uncached (even) and the cached (odd) sites, each with
    the answer the scenario's nginx backend gives (its body names the Host, so the
    Content-Length varies). Returns (shape, label → [(request, answer)])."""
    from benchmarks.fleet import FleetShape
    from benchmarks.web import zipf_sites

    shape = FleetShape(hosts=1, tenants=MANY_SITES // 10, sites=MANY_SITES, accounts=0, certs=0)
    cases: dict[str, list[tuple[bytes, bytes]]] = {}
    for label, cached, path in (("many names, miss", False, b"/index.html"),
                                ("many names, cache hit", True, b"/c/index.html")):
        pairs = []
        for site in zipf_sites(shape, names, cached=cached):
            name = shape.request_name(site).encode()
            body = b"ok %b via 127.0.0.2:11000\n" % name
            pairs.append((b"GET %b HTTP/1.1\r\nHost: %b\r\n\r\n" % (path, name),
                          MANY_HEAD % len(body) + body))
        cases[label] = pairs
    return shape, cases


async def python_only(rounds: int, count: int, names: int = 0) -> dict[str, float]:
    """µs of Python per request for each of PY_CASES (best of ``rounds`` x ``count``), or with
    ``names`` for the cases of :func:`many_names_cases`."""
    if names:
        return await _python_many(rounds, count, names)
    import logging
    import time

    from edge.config import EdgeConfig, HttpConfig
    from edge.directory.directory import Directory
    from edge.directory.feed import ChangeFeed
    from edge.registry import ProxyContext
    try:
        from httpproxy.front_h1 import ClientConnection
    except ImportError:  # a --baseline from before the front end/exchange split
        from httpproxy.connection import ClientConnection  # type: ignore[no-redef]
    from httpproxy.server import HttpEngine
    from httpproxy.upstream import BackendConnection

    with tempfile.TemporaryDirectory(prefix="edge-httpcpu-py-") as folder:
        url = f"sqlite:///{folder}/edge.sqlite3"
        await provision(url, 8)
        store = store_for_url(url)
        await store.open()
        config = EdgeConfig(http=HttpConfig(access_log=f"{folder}/access.log"))
        directory = Directory(store, config.cache)
        feed = ChangeFeed(directory, interval=3600)
        context = ProxyContext(config=config, directory=directory, feed=feed, keybox=None,
                               worker_id=0, logger=logging.getLogger("httpcpu"), name="http")
        engine = HttpEngine(context)
        key = ("127.0.0.1", 8, b"", "")
        # The fake backend never closes: cases that never reach it (cache hits) must not
        # retire it (a backend that announces no Keep-Alive timeout is reused for 1.5 s).
        engine.pool.unhinted_idle = engine.pool.idle_timeout
        backend = BackendConnection(engine.pool, key)
        backend_transport = _FakeTransport(("127.0.0.1", 8))
        backend.connection_made(backend_transport)  # type: ignore[arg-type]
        engine.pool.release(backend)
        client = ClientConnection(engine, "http", None, None)
        client_transport = _FakeTransport(("127.0.0.1", 40000))
        client.connection_made(client_transport)  # type: ignore[arg-type]

        answer = [RESPONSE]
        """What the backend answers: a 304 once the revalidated-hit case is warm."""

        def one(request: bytes) -> None:
            client.data_received(request)
            if backend.sink is not None:  # the request reached the backend: answer it
                backend.data_received(answer[0])

        async def settle() -> None:
            # Let slow paths (a directory lookup once the cache entry expired) land.
            for _ in range(100):
                await asyncio.sleep(0.001 if client.active is not None else 0)
                if backend.sink is not None:
                    backend.data_received(answer[0])
                if client.active is None and not client.queue:
                    return

        results: dict[str, float] = {}
        for label, (host, path, extra) in PY_CASES.items():
            request = b"GET %b HTTP/1.1\r\nHost: %b\r\n%b\r\n" % (path, host, extra)
            answer[0] = PY_RESPONSES.get(label, RESPONSE)
            for _ in range(3):  # the first goes through the directory (a task): let it land
                one(request)
                await settle()
                if label == "revalidated hit" and engine.cache is not None:
                    for entry in engine.cache.entries():  # stale now: the next revalidates
                        if entry.path == "/r/index.html":
                            entry.ttl = 0.0
                    answer[0] = NOT_MODIFIED
            best = float("inf")
            for _ in range(rounds):
                spent = 0.0
                for _ in range(count // 1000 or 1):
                    started = time.process_time()
                    for _ in range(min(count, 1000)):
                        one(request)
                    spent += time.process_time() - started
                    await settle()
                best = min(best, spent / (count // 1000 or 1) / min(count, 1000) * 1e6)
            results[label] = best
        await engine.close()
        await store.close()
        return results


MANY_HEAD = (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: "
             + formatdate(usegmt=True).encode() + b"\r\nContent-Type: text/plain\r\n"
             b"Content-Length: %d\r\nConnection: keep-alive\r\n"
             b"Cache-Control: public, max-age=300\r\n\r\n")
"""The head of the ``http`` scenario's backend answer (nginx ``return 200 "ok $host ..."``)."""


async def _python_many(rounds: int, count: int, names: int) -> dict[str, float]:
    """:func:`python_only` over the many-names fleet: each request another Zipf-drawn name."""
    import logging
    import time

    from benchmarks.fleet import provision_fleet
    from edge.config import EdgeConfig, HttpConfig
    from edge.directory.directory import Directory
    from edge.directory.feed import ChangeFeed
    from edge.registry import ProxyContext
    from httpproxy.front_h1 import ClientConnection
    from httpproxy.server import HttpEngine
    from httpproxy.upstream import BackendConnection

    shape, cases = many_names_cases(names)
    defaults = os.environ.get("EDGE_HTTPCPU_DEFAULTS") == "1"
    with tempfile.TemporaryDirectory(prefix="edge-httpcpu-many-") as folder:
        url = f"sqlite:///{folder}/edge.sqlite3"
        await provision_fleet(url, shape)
        store = store_for_url(url)
        await store.open()
        config = EdgeConfig(http=HttpConfig(access_log="" if defaults else f"{folder}/access.log"))
        directory = Directory(store, config.cache)
        feed = ChangeFeed(directory, interval=3600)
        context = ProxyContext(config=config, directory=directory, feed=feed, keybox=None,
                               worker_id=0, logger=logging.getLogger("httpcpu"), name="http")
        engine = HttpEngine(context)
        backend = BackendConnection(engine.pool, (shape.host_address(0), 11000, b"", ""))
        backend.connection_made(_FakeTransport(("127.0.0.2", 11000)))  # type: ignore[arg-type]
        engine.pool.release(backend)
        client = ClientConnection(engine, "http", None, None)
        client.connection_made(_FakeTransport(("127.0.0.1", 40000)))  # type: ignore[arg-type]

        def one(request: bytes, answer: bytes) -> None:
            client.data_received(request)
            if backend.sink is not None:  # the request reached the backend: answer it
                backend.data_received(answer)

        async def settle(answer: bytes) -> None:
            for _ in range(200):  # a name's first request goes through the directory (a task)
                await asyncio.sleep(0.001 if client.active is not None else 0)
                if backend.sink is not None:
                    backend.data_received(answer)
                if client.active is None and not client.queue:
                    return

        results: dict[str, float] = {}
        for label, pairs in cases.items():
            for request, answer in pairs:  # warm-up: every name once, as the scenario does
                one(request, answer)
                await settle(answer)
            best, at = float("inf"), 0
            for _ in range(rounds):
                spent = 0.0
                for _ in range(max(1, count // 1000)):
                    batch = [pairs[(at + i) % len(pairs)] for i in range(1000)]
                    at += 1000
                    answered = engine.stats.status[2]
                    started = time.process_time()
                    for request, answer in batch:
                        one(request, answer)
                    spent += time.process_time() - started
                    await settle(batch[-1][1])
                    if engine.stats.status[2] - answered != len(batch):
                        # Errors are cheap: a round with any would flatter the figure.
                        raise SystemExit(f"{label}: {engine.stats.status[2] - answered} of "
                                         f"{len(batch)} requests answered 2xx")
                best = min(best, spent / max(1, count // 1000) / 1000 * 1e6)
            results[label] = best
        await engine.close()
        await store.close()
        return results


def python_main(args: argparse.Namespace) -> None:
    import json

    rows: dict[str, dict[str, list[float]]] = {"edge": {}, "baseline": {}}
    for r in range(args.runs):
        for who in (("edge", "baseline") if r % 2 == 0 else ("baseline", "edge")):
            if who == "baseline" and not args.baseline:
                continue
            # Run from a neutral directory: "-m" puts the working directory first on sys.path,
            # which would shadow the baseline's httpproxy with the repository's.
            root = str(Path(__file__).resolve().parent.parent)
            env = dict(os.environ, PYTHONPATH=f"{args.baseline}:{root}" if who == "baseline" else root,
                       EDGE_HTTPCPU_DEFAULTS="1" if args.defaults else "0")
            with tempfile.TemporaryDirectory(prefix="edge-httpcpu-cwd-") as cwd:
                out = subprocess.run([sys.executable, "-m", "benchmarks.httpcpu", "--python-child",
                                      str(args.count), "--names", str(args.names)], env=env,
                                     check=True, capture_output=True, cwd=cwd).stdout
            for label, value in json.loads(out).items():
                rows[who].setdefault(label, []).append(value)
    print(f"\nPython µs per request (fake transports, process_time, best of 5 x {args.count} "
          f"in each of {args.runs} processes; median (min-max) over the processes)")
    for label in rows["edge"]:
        line = f"{label:<24} edge {_fmt(rows['edge'][label], 2):>20}"
        if args.baseline and label in rows["baseline"]:
            base = rows["baseline"][label]
            ratio = statistics.median(rows["edge"][label]) / statistics.median(base)
            line += f"   baseline {_fmt(base, 2):>20}   edge/baseline {ratio:.2f}"
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=7, help="alternating rounds (default 7)")
    parser.add_argument("--duration", type=float, default=4.0, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--baseline", default="",
                        help="PYTHONPATH of an older httpproxy copy, measured alongside")
    parser.add_argument("--nginx-log-buffer", default="",
                        help="nginx access_log buffer= (e.g. 64k; default: unbuffered, "
                             "nginx's default)")
    parser.add_argument("--only", default="",
                        help="comma-separated edge case labels to run (nginx always runs)")
    parser.add_argument("--defaults", action="store_true",
                        help="also measure the edge in its default configuration (access "
                             "lines on the edge log, no access_log file); with --python "
                             "--names: measure that instead of an access_log file")
    parser.add_argument("--python", action="store_true",
                        help="Python-only cost with fake transports (see the module docstring)")
    parser.add_argument("--count", type=int, default=20_000,
                        help="--python: requests per timed round")
    parser.add_argument("--names", type=int, default=0,
                        help="--python: instead of one name per case, the http scenario's load: "
                             "this many Zipf-drawn names over 100,000 sites (e.g. 20000)")
    parser.add_argument("--python-child", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.python_child:
        import json

        import uvloop

        if os.environ.get("EDGE_HTTPCPU_DEFAULTS") == "1":
            # Access lines through the edge log (JSON on a stream), as `edge serve` has it.
            from edge import logging as edge_logging
            from edge.config import LogConfig

            edge_logging.configure(LogConfig(), open(os.devnull, "w"))  # noqa: SIM115
        print(json.dumps(uvloop.run(python_only(5, args.python_child, args.names))))
    elif args.python:
        python_main(args)
    else:
        for tool in ("wrk", "nginx", "taskset"):
            if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
                raise SystemExit(f"not installed: {tool}")
        asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
