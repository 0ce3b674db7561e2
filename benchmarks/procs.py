"""Processes a scenario starts and measures: ``edge serve``, nginx, haproxy, sshd, backends.

Everything binds loopback addresses only, on ports the kernel picked (never fixed ports), and
is stopped by the scenario that started it (``async with``). CPU time and RSS are read from
``/proc`` for a process *and its descendants* (the proxy's pre-forked workers, nginx's
workers), so "CPU per request" compares whole servers.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import dataclasses
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from edge.config import EdgeConfig
from edge.registry import ProxyNotAvailable, load_proxy

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024
LISTENING = re.compile(r"^edge: (\S+) listening on (.+):(\d+)$")


class Unavailable(Exception):
    """A part a scenario needs is missing (proxy not built, tool not installed): the scenario
    records ``skipped: <reason>`` instead of failing."""


def proxy_missing(name: str) -> str | None:
    """``None`` if ``edge serve`` can run the ``name`` proxy, else why not (one line)."""
    try:
        load_proxy(name)
    except ProxyNotAvailable as exc:
        return f"{name} proxy not built ({str(exc).split(': ', 1)[-1][:160]})"
    except Exception as exc:  # a half-written module must not take the harness down
        return f"{name} proxy fails to import: {type(exc).__name__}: {str(exc)[:160]}"
    return None


def tool_missing(*names: str) -> str | None:
    missing = [n for n in names if shutil.which(n) is None and not Path(n).exists()]
    return f"not installed: {', '.join(missing)}" if missing else None


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (for tools that cannot bind port 0 themselves)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


# -- /proc accounting -----------------------------------------------------------------------

def _stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()  # fields from "state" (3rd) on


def descendants(pid: int) -> list[int]:
    """``pid`` and every live descendant."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat(int(entry))
            if fields is not None:
                children.setdefault(int(fields[1]), []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        todo.extend(children.get(current, ()))
    return out


def cpu_seconds(pid: int) -> float:
    """User+system CPU seconds of ``pid`` and its live descendants (and reaped children)."""
    total = 0
    for p in descendants(pid):
        fields = _stat(p)
        if fields is not None:  # utime stime cutime cstime = fields 14..17 → index 11..14
            total += sum(int(v) for v in fields[11:15])
    return total / CLK_TCK


def rss_kib(pid: int) -> int:
    """Resident set size (KiB) of ``pid`` and its live descendants."""
    total = 0
    for p in descendants(pid):
        fields = _stat(p)
        if fields is not None:
            total += int(fields[21]) * PAGE_KIB  # rss in pages = field 24
    return total


def pss_kib(pid: int) -> int:
    """Proportional set size (KiB) of ``pid`` and its live descendants: pages shared between
    a master and its forked workers count once in total, unlike a sum of RSS."""
    total = 0
    for p in descendants(pid):
        try:
            with open(f"/proc/{p}/smaps_rollup") as rollup:
                for text in rollup:
                    if text.startswith("Pss:"):
                        total += int(text.split()[1])
                        break
        except OSError:
            continue
    return total


# -- a child process with a log file --------------------------------------------------------

@dataclass
class Child:
    """A started server process; ``stop()`` ends it (and its process group)."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    ports: dict[str, int] = field(default_factory=dict)
    started_seconds: float = 0.0

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def rss_kib(self) -> int:
        return rss_kib(self.pid)

    def log_tail(self, chars: int = 1500) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
        _RUNNING.pop(self.proc.pid, None)
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)

    async def __aenter__(self) -> Child:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await asyncio.to_thread(self.stop)


_RUNNING: dict[int, Child] = {}
"""Children started and not stopped yet: stopped at exit, whatever ends the harness."""


def _load_prctl() -> Any:
    import ctypes

    try:
        return ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _load_prctl()  # loaded before any fork: the child only calls it


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL it if the harness dies (even by SIGKILL). Spawned
    from the main thread only (PR_SET_PDEATHSIG follows the forking *thread*)."""
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def stop_all() -> None:
    """Stop every child still running (atexit, and on SIGTERM/SIGHUP via the entry point)."""
    for child in list(_RUNNING.values()):
        with contextlib.suppress(Exception):
            child.stop(timeout=5)


atexit.register(stop_all)


def spawn(name: str, argv: Sequence[str], workdir: Path, *, stdout: int | IO[bytes] | None = None,
          env: dict[str, str] | None = None) -> Child:
    """Start ``argv`` in its own process group, stderr (and stdout unless given) to a log.

    The process group is ended by :meth:`Child.stop`, at harness exit, and the group leader
    is killed by the kernel if the harness is killed outright."""
    log = workdir / f"{name}.log"
    handle = log.open("ab")
    proc = subprocess.Popen(list(argv), stdout=stdout if stdout is not None else handle,
                            stderr=handle, stdin=subprocess.DEVNULL, start_new_session=True,
                            cwd=workdir, env=env, preexec_fn=_die_with_parent)
    handle.close()
    child = Child(name, proc, log)
    _RUNNING[proc.pid] = child
    return child


async def wait_port(host: str, port: int, limit: float = 30.0, child: Child | None = None) -> None:
    """Until ``host:port`` accepts a TCP connection (or raise, with the child's log)."""
    deadline = time.monotonic() + limit
    while True:
        try:
            _, writer = await asyncio.open_connection(host, port)
            writer.close()
            return
        except OSError:
            if child is not None and child.proc.poll() is not None:
                raise RuntimeError(f"{child.name} exited ({child.proc.returncode}): "
                                   f"{child.log_tail()}") from None
            if time.monotonic() > deadline:
                raise RuntimeError(f"{host}:{port} not accepting after {limit:.0f} s"
                                   + (f": {child.log_tail()}" if child else "")) from None
            await asyncio.sleep(0.05)


# -- edge serve -----------------------------------------------------------------------------

def edge_command() -> list[str]:
    script = Path(sys.executable).parent / "edge"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from edge.cli.main import main; sys.exit(main())"]


def edge_toml(database: str, sections: dict[str, dict[str, Any]], *, secret: str = "") -> str:
    """An edge.toml: database, admin on a free loopback port, quiet logs, then ``sections``."""
    data: dict[str, dict[str, Any]] = {
        "database": {"url": database},
        "admin": {"listen": ["127.0.0.1:0"]},
        "log": {"level": "warning"},
    }
    if secret:
        data["secrets"] = {"key": secret}
    for name, values in sections.items():
        section = getattr(EdgeConfig(), name)
        fields = {f.name for f in dataclasses.fields(section)}
        unknown = sorted(set(values) - fields)
        if unknown:  # a proxy renamed a setting: run with its default rather than not at all
            print(f"  (edge.toml: [{name}] has no {', '.join(unknown)} in this version; "
                  "using the defaults)", file=sys.stderr)
        data.setdefault(name, {}).update({k: v for k, v in values.items() if k in fields})
    lines = []
    for name, values in data.items():
        lines.append(f"[{name}]")
        for key, value in values.items():
            lines.append(f"{key} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


async def start_edge(workdir: Path, toml: str, *, workers: int = 1, expect: Sequence[str] = (),
                     limit: float = 60.0, pythonpath: str = "") -> Child:
    """``edge serve --config ... --workers N``; returns once every proxy in ``expect`` has
    printed ``edge: NAME listening on HOST:PORT`` and accepts (``child.ports[NAME]``).

    ``child.started_seconds`` is spawn → all listeners accepting. ``pythonpath`` (e.g. a copy of
    the packages at another revision, for the benchmarks' ``--baseline``) becomes the child's
    ``PYTHONPATH``, so it imports that code instead of this tree's.
    """
    config = workdir / "edge.toml"
    config.write_text(toml)
    started = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": pythonpath} if pythonpath else None
    child = spawn("edge", [*edge_command(), "serve", "--config", str(config),
                           "--workers", str(workers)], workdir, stdout=subprocess.PIPE, env=env)
    assert child.proc.stdout is not None
    stdout = child.proc.stdout
    wanted = set(expect) | {"admin"}

    def read_ports() -> None:
        for raw in stdout:
            match = LISTENING.match(raw.decode(errors="replace").strip())
            if match:
                child.ports[match.group(1)] = int(match.group(3))
                if wanted <= set(child.ports):
                    return

    try:
        await asyncio.wait_for(asyncio.to_thread(read_ports), limit)
        if not wanted <= set(child.ports):
            raise RuntimeError(f"edge serve exited ({child.proc.wait()}): {child.log_tail()}")
        for name in expect:
            await wait_port("127.0.0.1", child.ports[name], limit, child)
    except BaseException:
        child.stop(signal.SIGKILL)
        raise
    child.started_seconds = time.perf_counter() - started
    # Keep draining stdout so a chatty proxy never blocks on a full pipe.
    threading_drain(stdout)
    return child


def threading_drain(stream: IO[bytes]) -> None:
    """Read ``stream`` to its end in a daemon thread (discarding it)."""
    import threading

    def drain() -> None:
        for _ in stream:
            pass

    threading.Thread(target=drain, daemon=True).start()


# -- nginx / haproxy ------------------------------------------------------------------------

NGINX = "/usr/sbin/nginx"
HAPROXY = "/usr/sbin/haproxy"


def nginx_main_conf(workdir: Path, body: str, *, workers: int = 1) -> str:
    # Workers run as root: the scratch folders (cache, temp files) are private to root.
    return f"""
user root;
worker_processes {workers};
pid {workdir}/nginx.pid;
error_log {workdir}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {workdir}/nginx-body;
  proxy_temp_path {workdir}/nginx-proxy;
  fastcgi_temp_path {workdir}/nginx-fastcgi;
  uwsgi_temp_path {workdir}/nginx-uwsgi;
  scgi_temp_path {workdir}/nginx-scgi;
  keepalive_requests 1000000;
  server_names_hash_max_size 1048576;
  server_names_hash_bucket_size 128;
  map_hash_max_size 1048576;
  map_hash_bucket_size 128;
{body}
}}
"""


async def start_nginx(workdir: Path, name: str, conf: str, ports: Sequence[tuple[str, int]],
                      limit: float = 120.0) -> Child:
    """nginx in the foreground with ``conf``; returns once every ``(host, port)`` accepts."""
    folder = workdir / name
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "nginx.conf"
    path.write_text(conf)
    started = time.perf_counter()
    child = spawn(name, [NGINX, "-p", str(folder), "-c", str(path), "-g", "daemon off;"], folder)
    try:
        for host, port in ports:
            await wait_port(host, port, limit, child)
    except BaseException:
        child.stop(signal.SIGKILL)
        raise
    child.started_seconds = time.perf_counter() - started
    return child


async def start_haproxy(workdir: Path, name: str, conf: str, ports: Sequence[tuple[str, int]],
                        limit: float = 60.0) -> Child:
    folder = workdir / name
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "haproxy.cfg"
    path.write_text(conf)
    child = spawn(name, [HAPROXY, "-f", str(path), "-db"], folder)
    try:
        for host, port in ports:
            await wait_port(host, port, limit, child)
    except BaseException:
        child.stop(signal.SIGKILL)
        raise
    return child


def scratch(prefix: str) -> tempfile.TemporaryDirectory[str]:
    return tempfile.TemporaryDirectory(prefix=f"edge-bench-{prefix}-")
