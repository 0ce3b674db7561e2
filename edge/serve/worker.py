"""One worker process: a uvloop event loop running the enabled proxies on inherited sockets.

Life of a worker (entered right after ``os.fork()`` in the master, never returns):

1. reset what the fork copied from the master (signal handlers, the running-loop marker);
2. open the directory store; if the database is unreachable, keep retrying in the background
   (lookups answer DirectoryUnavailable meanwhile) instead of exiting, so a database outage
   never turns into a restart loop;
3. start the change feed and each proxy on its sockets, then write ``R`` to the ready pipe;
4. on SIGTERM: accept what the kernel already queued, close every listening socket (new
   connections are refused from then on), drain, wait up to ``[serve] grace_period`` for sessions,
   close the rest with each protocol's goodbye, exit 0. SIGINT is ignored: Ctrl-C reaches
   the whole process group and the master turns it into an orderly SIGTERM.

The worker also exits (gracefully) if the master disappears, so no orphan keeps a port.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
import struct
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from edge.config import EdgeConfig
from edge.directory.directory import Directory
from edge.directory.feed import ChangeFeed
from edge.directory.secrets import KeyBox
from edge.directory.store import SQLStore
from edge.directory.stores import store_for_url
from edge.errors import ConfigError, EdgeError, SecretsError
from edge.registry import Proxy, ProxyContext
from edge.sessions import ControlServer, SessionTable

if TYPE_CHECKING:
    from edge.metrics import DirectoryExporter

log = logging.getLogger("edge.serve.worker")

STORE_RETRY_MAX = 10.0
"""Longest wait (seconds) between attempts to open an unreachable directory store."""
BACKLOG_WAIT = 1.0
"""Longest wait (seconds) on SIGTERM for the proxies to accept connections already queued."""
_BACKLOG_POLL = 0.005
_TCPI_UNACKED = 24
"""Offset of ``tcpi_unacked`` in ``struct tcp_info``: a listener's accept queue length."""


@dataclass
class WorkerSpec:
    """Everything a worker needs, prepared by the master before the fork."""

    worker_id: int
    generation: int
    config: EdgeConfig
    proxies: dict[str, type[Proxy]]
    sockets: dict[str, list[socket.socket]]
    """Protocol → this worker's listening sockets (one per listen address)."""
    ready_fd: int = -1
    """Write end of a pipe; the worker writes ``R`` once its proxies accept."""
    master_pid: int = field(default_factory=os.getpid)
    control_dir: str = ""
    """Where to serve this worker's control socket (edge.sessions); "" = none."""


CONFIG_EXIT = 78
"""Exit status of a worker whose proxy refused its configuration at start (``EX_CONFIG``)."""


def run_worker(spec: WorkerSpec) -> None:
    """Run the worker in the freshly forked child and ``os._exit`` with its status."""
    code = 1
    try:
        _reset_after_fork()
        from edge.logging import set_process_fields

        set_process_fields(worker=spec.worker_id, generation=spec.generation)
        import uvloop

        loop = uvloop.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            code = loop.run_until_complete(_main(spec))
        finally:
            loop.close()
    except ConfigError as exc:
        # A setting the proxy cannot work with (e.g. missing SSH host keys): restarting the
        # worker cannot fix it, so say so and let the master stop instead of looping.
        log.error("worker %d cannot start: %s", spec.worker_id, exc)
        code = CONFIG_EXIT
    except BaseException:
        log.exception("worker %d crashed", spec.worker_id)
        code = 1
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        # Never return into the master's stack frames (they belong to the other process).
        os._exit(code)


def _reset_after_fork() -> None:
    # The master's loop installed its own signal handlers and wakeup fd; they point at a
    # self-pipe this process must not use.
    with contextlib.suppress(ValueError):
        signal.set_wakeup_fd(-1)
    for sig in (signal.SIGTERM, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    # Ctrl-C and a terminal hangup reach the whole process group; the master decides.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    # We were forked from inside the master's running loop (asyncio 3.11 does not reset it).
    asyncio.events._set_running_loop(None)


GC_THRESHOLDS = (50_000, 20, 100)
"""Generation sizes for the cyclic GC in workers (CPython's default is (2000, 10, 10))."""


def _tune_gc() -> None:
    # A worker keeps large, long-lived caches (directory entries, cached HTTP responses,
    # SSLContexts) and allocates many short-lived objects per request. With the default
    # thresholds, full collections walk every cached object several times a second under load
    # and stall the loop for tens of milliseconds (p99.9 latency). Freezing what start-up
    # created and collecting young objects less often keeps those pauses rare; reference
    # counting still frees everything that is not a cycle at once. Cycles now wait long for a
    # full collection, so what a connection leaves behind must not be one (see
    # sshproxy.tuning.release_connection: a flood of dead SSH connections had kept ~14 MiB).
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


async def _keep_store_open(store: SQLStore, opened: asyncio.Event) -> None:
    """Try to open the store until it works, backing off to :data:`STORE_RETRY_MAX` seconds."""
    delay = 0.5
    warned = False
    while True:
        try:
            await store.open()
        except EdgeError as exc:
            if not warned:
                log.warning("directory unreachable, retrying: %s", exc)
                warned = True
        except Exception:
            log.exception("opening the directory store failed")
        else:
            if warned:
                log.info("directory reachable again")
            opened.set()
            return
        await asyncio.sleep(delay)
        delay = min(delay * 2, STORE_RETRY_MAX)


async def _main(spec: WorkerSpec) -> int:
    # Imported here, not at the top: the master must set PROMETHEUS_MULTIPROC_DIR before
    # this module is first imported (importing edge.serve must not create metric values).
    from edge import metrics

    config = spec.config
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    # The master blocked these around fork() so none is lost before the handler exists.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT, signal.SIGHUP,
                                                signal.SIGCHLD})

    store = store_for_url(config.database.read_url, config.database)
    opened = asyncio.Event()
    opener = asyncio.create_task(_keep_store_open(store, opened), name="edge-store-open")
    # Give a reachable database a moment so the feed starts with a cursor (no full flush).
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.shield(opened.wait()), timeout=config.database.connect_timeout)
    try:
        keybox: KeyBox | None = KeyBox.from_config(config.secrets)
    except SecretsError as exc:
        keybox = None
        log.info("no secret key: TLS private keys cannot be read (%s)", exc)
    directory = Directory(store, config.cache, keybox=keybox)
    feed = ChangeFeed(directory, interval=config.cache.change_poll_interval)
    await feed.start()

    table = SessionTable(spec.worker_id)
    proxies: dict[str, Proxy] = {}
    for name, cls in spec.proxies.items():
        context = ProxyContext(config=config, directory=directory, feed=feed, keybox=keybox,
                               worker_id=spec.worker_id, name=name,
                               logger=logging.getLogger(f"edge.proxy.{name}"), sessions=table)
        proxy = cls(context)
        await proxy.start(spec.sockets.get(name, []))
        proxies[name] = proxy
    control = ControlServer(table)
    if spec.control_dir:
        try:
            await control.start(spec.control_dir)
        except OSError as exc:  # serving matters more than `edge sessions`: no restart loop
            log.error("control socket unavailable, `edge sessions` will miss this worker: %s", exc)
    # The other slots' sockets were closed right after fork; ours now belong to the proxies.
    metrics.WORKER_UP.set(1)
    if spec.ready_fd >= 0:
        with contextlib.suppress(OSError):
            os.write(spec.ready_fd, b"R")
            os.close(spec.ready_fd)
    _tune_gc()
    log.info("worker started", extra={"proxies": sorted(proxies)})

    exporter = metrics.DirectoryExporter()
    stats_task = asyncio.create_task(_export_loop(spec, directory, feed, proxies, exporter, stop),
                                     name="edge-metrics-export")
    await stop.wait()

    grace = config.serve.grace_period
    log.info("worker draining", extra={"grace_period": grace,
                                        "sessions": sum(p.active_sessions() for p in proxies.values())})
    await stop_listening(spec.sockets, proxies)
    await asyncio.gather(*(p.wait_closed(grace) for p in proxies.values()))
    left = sum(p.active_sessions() for p in proxies.values())
    if left:
        log.info("grace period over, closing sessions", extra={"sessions": left})
    await asyncio.gather(*(p.close() for p in proxies.values()), return_exceptions=True)
    metrics.WORKER_UP.set(0)
    await control.stop()
    stats_task.cancel()
    opener.cancel()
    await feed.stop()
    await directory.close()
    with contextlib.suppress(Exception):
        await store.close()
    log.info("worker stopped")
    return 0


def accept_queue(sock: socket.socket) -> int:
    """Connections the kernel completed on listener ``sock`` that nobody accepted yet."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCPI_UNACKED + 4)
    except OSError:
        return 0
    return int(struct.unpack_from("I", info, _TCPI_UNACKED)[0])


async def stop_listening(sockets: dict[str, list[socket.socket]],
                         proxies: dict[str, Proxy]) -> None:
    """Close this worker's listening sockets without resetting connections already queued.

    Closing the last copy of a listener resets whatever waits in its accept queue, so let the
    proxies accept that first (bounded by :data:`BACKLOG_WAIT`). The master closed its copies
    already, so once we close ours the kernel refuses new connections.
    """
    listeners = [sock for socks in sockets.values() for sock in socks]
    for _ in range(int(BACKLOG_WAIT / _BACKLOG_POLL)):
        if not any(accept_queue(s) for s in listeners if s.fileno() >= 0):
            break
        await asyncio.sleep(_BACKLOG_POLL)
    for proxy in proxies.values():
        await proxy.drain()
    # A listener still open after drain() is one the proxy leaves to us: close it, or the
    # kernel keeps queueing connections that are reset when the worker exits. First let
    # cancelled accept tasks run their clean-up (it refers to the fd number).
    for _ in range(3):
        await asyncio.sleep(0)
    for sock in listeners:
        if sock.fileno() >= 0:
            sock.close()


async def _export_loop(spec: WorkerSpec, directory: Directory, feed: ChangeFeed,
                       proxies: dict[str, Proxy], exporter: DirectoryExporter,
                       stop: asyncio.Event) -> None:
    """Once a second: copy cache counters and session counts to the metrics; watch the master."""
    from edge import metrics
    while not stop.is_set():
        try:
            exporter.export(directory.stats())
            metrics.export_feed(feed.healthy, feed.last_poll, time.time())
            metrics.export_breaker(directory.breaker.open,
                                   directory.breaker.seconds_since_success())
            for name, proxy in proxies.items():
                metrics.ACTIVE_SESSIONS.labels(proxy=name).set(proxy.active_sessions())
        except Exception:
            log.exception("exporting metrics failed")
        if os.getppid() != spec.master_pid:
            log.warning("master process is gone; shutting down")
            stop.set()
            return
        await asyncio.sleep(1.0)


__all__ = ["CONFIG_EXIT", "WorkerSpec", "accept_queue", "run_worker", "stop_listening"]
