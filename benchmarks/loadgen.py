"""Load generators: wrk with a Lua script (Host headers by Zipf popularity), a TLS handshake
generator cycling SNI names (wrk cannot vary SNI), and small asyncio HTTP probes.

Every generator is bounded in time *and* count and only talks to loopback addresses.
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

WRK = "/usr/bin/wrk"
CDF_POINTS = (1, 5, 10, 20, 30, 40, 50, 60, 70, 75, 80, 85, 90, 95, 97, 98, 99, 99.5, 99.9,
              99.95, 99.99)

_LUA = """
local hosts = {%(hosts)s}
local n = #hosts
local i = 0
local path = %(path)s
init = function(args)
  -- each wrk thread starts at a different point of the (shuffled, Zipf-drawn) list
  i = math.floor(#args > 0 and tonumber(args[1]) or 0)
end
%(statuses)s
request = function()
  i = i + 1
  return wrk.format("GET", path, {["Host"] = hosts[(i %% n) + 1]})
end
done = function(summary, latency, requests)
  local e = summary.errors
  local points = {%(points)s}
  local cdf = {}
  for _, p in ipairs(points) do
    cdf[#cdf + 1] = string.format('[%%s,%%d]', p, latency:percentile(p))
  end
  io.write(string.format(
    'WRKJSON {"requests":%%d,"duration_us":%%d,"bytes":%%d,"connect":%%d,"read":%%d,'
    .. '"write":%%d,"status":%%d,"timeout":%%d,"mean_us":%%f,"max_us":%%d,"cdf":[%%s]}\\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status,
    e.timeout, latency.mean, latency.max, table.concat(cdf, ",")))
  if threads then
    local parts = {}
    local total = {}
    for _, t in ipairs(threads) do
      for code, n in pairs(t:get("statuses")) do total[code] = (total[code] or 0) + n end
    end
    for code, n in pairs(total) do parts[#parts + 1] = string.format('"%%d":%%d', code, n) end
    io.write('WRKSTATUS {' .. table.concat(parts, ",") .. '}\\n')
  end
end
"""


@dataclass
class HttpLoad:
    """What one wrk run measured (latencies in ms)."""

    requests: int
    seconds: float
    errors: dict[str, int]
    cdf: list[tuple[float, float]]
    server_cpu: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def pct(self, q: float) -> float:
        for point, value in self.cdf:
            if point >= q:
                return value
        return self.cdf[-1][1] if self.cdf else float("nan")

    @property
    def failed(self) -> int:
        return sum(self.errors.values())

    @property
    def cpu_us_per_request(self) -> float:
        return self.server_cpu / self.requests * 1e6 if self.requests else float("nan")

    def as_dict(self) -> dict[str, Any]:
        return {"requests": self.requests, "seconds": self.seconds, "rps": self.rps,
                "errors": self.errors, "p50_ms": self.pct(50), "p99_ms": self.pct(99),
                "p999_ms": self.pct(99.9), "latency_cdf_ms": self.cdf,
                "server_cpu_seconds": self.server_cpu,
                "cpu_us_per_request": self.cpu_us_per_request, **self.extra}


_STATUSES = """
threads = {}
statuses = {}
setup = function(thread) table.insert(threads, thread) end
response = function(status, headers, body) statuses[status] = (statuses[status] or 0) + 1 end
"""


def write_wrk_script(path: Path, hosts: Sequence[str], url_path: str = "/", *,
                     statuses: bool = False) -> Path:
    """The Lua script: ``hosts`` cycled as Host headers; with ``statuses`` every response's
    status is tallied (slower: wrk then parses each response for the script)."""
    quoted = ",".join(json.dumps(h) for h in hosts)
    path.write_text(_LUA % {"hosts": quoted, "path": json.dumps(url_path),
                            "statuses": _STATUSES if statuses else "",
                            "points": ",".join(str(p) for p in CDF_POINTS)})
    return path


async def run_wrk(port: int, script: Path, *, seconds: float, connections: int = 32,
                  threads: int = 1, host: str = "127.0.0.1", timeout_s: int = 5,
                  offset: int = 0) -> HttpLoad:
    """``wrk`` keep-alive load for ``seconds`` against ``http://host:port``; the script's
    name list is cycled from position ``offset`` on."""
    argv = [WRK, "-t", str(threads), "-c", str(max(connections, threads)), "-d",
            f"{max(1, round(seconds))}s", "--timeout", f"{timeout_s}s", "-s", str(script),
            f"http://{host}:{port}/", "--", str(offset)]
    proc = await asyncio.create_subprocess_exec(*argv, stdout=subprocess.PIPE,
                                                stderr=subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), seconds + 60)
    statuses: dict[str, int] = {}
    for line in out.decode(errors="replace").splitlines():
        if line.startswith("WRKSTATUS "):
            statuses = json.loads(line[len("WRKSTATUS "):])
    for line in out.decode(errors="replace").splitlines():
        if line.startswith("WRKJSON "):
            data = json.loads(line[len("WRKJSON "):])
            errors = {k: int(data[k]) for k in ("connect", "read", "write", "status", "timeout")}
            # wrk's percentile(100) is not the maximum: close the CDF with latency.max.
            cdf = [(float(p), v / 1000) for p, v in data["cdf"]] + [(100.0, data["max_us"] / 1000)]
            return HttpLoad(int(data["requests"]), data["duration_us"] / 1e6, errors, cdf,
                            extra={"statuses": statuses, "mean_ms": data["mean_us"] / 1000,
                                   "max_ms": data["max_us"] / 1000, "bytes": data["bytes"]})
    raise RuntimeError(f"wrk printed no result: {out.decode()[-500:]} {err.decode()[-500:]}")


# -- TLS handshakes -------------------------------------------------------------------------

def client_context() -> ssl.SSLContext:
    """A client that never reuses sessions (each connection is a full handshake) and does not
    verify: the benchmark measures the server's handshake cost, not a CA setup."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


@dataclass
class HandshakeLoad:
    handshakes: int
    failures: int
    seconds: float
    latencies_ms: list[float]
    server_cpu: float = 0.0
    first_error: str = ""

    @property
    def rate(self) -> float:
        return self.handshakes / self.seconds if self.seconds else 0.0

    @property
    def per_cpu_second(self) -> float:
        return self.handshakes / self.server_cpu if self.server_cpu else float("nan")


async def tls_handshakes(port: int, names: Sequence[str], *, count: int, seconds: float,
                         concurrency: int = 16, host: str = "127.0.0.1") -> HandshakeLoad:
    """Full TLS handshakes cycling through ``names`` as SNI; stops after ``count`` handshakes
    or ``seconds``, whichever is first. A handshake = TCP connect → TLS finished → close."""
    ctx = client_context()
    latencies: list[float] = []
    failures = [0]
    first_error = [""]
    deadline = time.monotonic() + seconds
    counter = iter(range(count))

    async def one_client() -> None:
        for i in counter:
            if time.monotonic() > deadline:
                return
            start = time.perf_counter()
            try:
                _, writer = await asyncio.wait_for(asyncio.open_connection(
                    host, port, ssl=ctx, server_hostname=names[i % len(names)]), 10)
            except (OSError, ssl.SSLError, TimeoutError) as exc:
                failures[0] += 1
                first_error[0] = first_error[0] or f"{type(exc).__name__}: {exc}"
                continue
            latencies.append((time.perf_counter() - start) * 1000)
            writer.transport.abort()  # no close_notify round trip: only the handshake counts

    started = time.perf_counter()
    await asyncio.gather(*(one_client() for _ in range(concurrency)))
    return HandshakeLoad(len(latencies), failures[0], time.perf_counter() - started, latencies,
                         first_error=first_error[0])


async def tls_handshakes_multi(port: int, names: Sequence[str], *, count: int, seconds: float,
                               concurrency: int = 16, clients: int = 1,
                               host: str = "127.0.0.1", offset: int = 0) -> HandshakeLoad:
    """:func:`tls_handshakes` from ``clients`` processes at once (one Python client process
    tops out at a few hundred handshakes/s), results merged.

    The ``count`` handshakes use the names from position ``offset`` on (cyclically), split into
    one contiguous slice per client: ``count = len(names)`` visits every name once, and a
    caller that advances ``offset`` by ``count`` each time keeps cycling through all of them."""
    if clients <= 1:
        start = offset % len(names)
        return await tls_handshakes(port, [*names[start:], *names[:start]], count=count,
                                    seconds=seconds, concurrency=concurrency, host=host)
    share = max(1, count // clients)
    import sys
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".names", delete=False) as handle:
        handle.write("\n".join(names))
    try:
        procs = [await asyncio.create_subprocess_exec(
            sys.executable, "-m", "benchmarks.loadgen", "tls", "--host", host, "--port",
            str(port), "--names", handle.name, "--count", str(share),
            "--seconds", str(seconds), "--concurrency", str(max(1, concurrency // clients)),
            "--offset", str(offset + i * share), stdout=subprocess.PIPE) for i in range(clients)]
        outputs = await asyncio.gather(*(asyncio.wait_for(p.communicate(), seconds + 60)
                                         for p in procs))
    finally:
        os.unlink(handle.name)
    parts = [json.loads(out.decode().strip().splitlines()[-1]) for out, _ in outputs]
    return HandshakeLoad(sum(p["handshakes"] for p in parts), sum(p["failures"] for p in parts),
                         max(p["seconds"] for p in parts),
                         [x for p in parts for x in p["latencies_ms"]],
                         first_error=next((p["first_error"] for p in parts if p["first_error"]),
                                          ""))


def _tls_main(argv: Sequence[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m benchmarks.loadgen tls")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--names", required=True, help="file: one SNI name per line")
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--offset", type=int, default=0, help="start at this name")
    args = parser.parse_args(argv)
    names = Path(args.names).read_text().split()
    names = names[args.offset % len(names):] + names[:args.offset % len(names)]
    load = asyncio.run(tls_handshakes(args.port, names, count=args.count, seconds=args.seconds,
                                      concurrency=args.concurrency, host=args.host))
    print(json.dumps({"handshakes": load.handshakes, "failures": load.failures,
                      "seconds": load.seconds, "latencies_ms": load.latencies_ms,
                      "first_error": load.first_error}), flush=True)


# -- simple HTTP probes ---------------------------------------------------------------------

async def http_get(port: int, hostname: str, path: str = "/", *, host: str = "127.0.0.1",
                   limit: float = 10.0, fresh: bool = False) -> tuple[int, bytes]:
    """One ``GET`` on a fresh connection: (status, body). Raises OSError on failure.

    ``fresh`` sends ``Cache-Control: no-cache`` so a caching proxy asks the origin."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), limit)
    extra = "Cache-Control: no-cache\r\nPragma: no-cache\r\n" if fresh else ""
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {hostname}\r\n{extra}"
                     "Connection: close\r\n\r\n".encode())
        data = await asyncio.wait_for(reader.read(-1), limit)
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    try:
        status = int(head.split(b" ", 2)[1])
    except (IndexError, ValueError):
        raise OSError(f"not an HTTP response: {data[:80]!r}") from None
    return status, body


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] != ["tls"]:
        raise SystemExit("usage: python -m benchmarks.loadgen tls --port PORT --names FILE ...")
    _tls_main(sys.argv[2:])
