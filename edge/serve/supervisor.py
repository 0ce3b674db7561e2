"""The master process of ``edge serve``: binds sockets, pre-forks workers, supervises them.

Sockets: for every listen address of every enabled proxy the master binds one socket *per
worker* on the same port with ``SO_REUSEPORT`` (the first with the configured port, which
may be 0; the others with the port the kernel picked), so the kernel spreads connections
over the workers. Worker ``i`` always gets socket ``i``; a restarted worker or the worker
of the same slot in a new generation takes the same socket over, so no connection waiting
in a backlog is lost. ``SO_REUSEPORT`` would also let another process of the same user
share a port silently, so the first bind of a fixed address is preceded by a probe without
it (:func:`edge.ports.check_free`), which fails naming the process that listens there.

Signals to the master:

* SIGTERM / SIGINT: the master closes its copies of the listening sockets at once and
  forwards the signal to the workers as SIGTERM (each accepts what is already queued, closes
  its listening socket, so new connections are refused, then drains, waits up to
  ``[serve] grace_period`` for sessions, closes the rest); the master returns 0 when all
  workers have exited (workers still alive ``grace_period + 10`` s later are killed). A
  second signal kills the workers at once.
* SIGHUP: reload the configuration file. An invalid file (or a proxy that cannot be
  loaded, or an address that cannot be bound) is logged and the running configuration kept.
  A valid one starts a new generation of workers with it and, once they all accept, drains
  the old generation (nginx-style). Sockets are rebound only for addresses that changed.
* SIGUSR1: reopen log files (``[http] access_log`` when it is a path) in every worker, for
  logrotate (``config/logrotate/edge``): move the files away, then signal.

Workers that die unexpectedly are restarted in the same slot after a backoff that doubles
(0.5 s up to 30 s) while they keep dying within 10 s of starting.
A worker that stops answering the master's pings on its control socket for
``[serve] watchdog_timeout`` seconds (hung) is killed, and so restarted the same way.

Every bound listener is logged (``"listener bound"`` with ``proxy``/``address`` fields) and
announced on stdout as exactly one line::

    edge: <name> listening on <host>:<port>

``<name>`` is the proxy (``http``, ``https``, ``ssh``, ``ftp``) or ``admin``; ``<host>:<port>``
is written like :class:`~edge.config.ListenAddress` (IPv6 hosts in brackets) with the port
actually bound, so tests and scripts can use port 0 and read the real port from there.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from edge import logging as edge_logging
from edge import sessions
from edge.admin import AdminServer, render_metrics
from edge.config import EdgeConfig, ListenAddress, load_config
from edge.errors import ConfigError, EdgeError
from edge.liveapi import LiveRoutes, admin_token
from edge.ports import AddressInUse, check_free
from edge.registry import Proxy, enabled_listeners, load_proxy
from edge.serve.worker import CONFIG_EXIT, WorkerSpec, run_worker

log = logging.getLogger("edge.serve")

RESTART_BACKOFF_MIN = 0.5
RESTART_BACKOFF_MAX = 30.0
STABLE_AFTER = 10.0
"""A worker that ran this many seconds before dying is restarted without extra backoff."""
READY_TIMEOUT = 30.0
"""Seconds a new generation (on SIGHUP) has to start accepting before it is abandoned."""
KILL_AFTER_GRACE = 10.0


def watchdog_interval(timeout: float) -> float:
    """Seconds between the watchdog's pings: a few per timeout, at most every 5 s."""
    return max(0.2, min(5.0, timeout / 4)) if timeout else 5.0


_FORWARDED = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD, signal.SIGUSR1}

ListenerKey = tuple[str, ListenAddress]


def announce(name: str, host: str, port: int) -> None:
    """Print the ``edge: NAME listening on HOST:PORT`` line and log it."""
    address = str(ListenAddress(host, port))
    print(f"edge: {name} listening on {address}", flush=True)
    log.info("listener bound", extra={"proxy": name, "address": address})


@dataclass(frozen=True)
class Plan:
    """One generation's settings: what to run, where, how many times."""

    config: EdgeConfig
    workers: int
    proxies: dict[str, type[Proxy]]
    listeners: dict[str, tuple[ListenAddress, ...]]


def make_plan(config: EdgeConfig, workers: int | None, only: set[str] | None) -> Plan:
    """Resolve the proxies to run; raises ConfigError/ProxyNotAvailable (one-line message)."""
    listeners = enabled_listeners(config, only)
    proxies = {name: load_proxy(name) for name in listeners}
    count = workers if workers is not None else config.serve.workers
    if count < 1:
        raise ConfigError(f"--workers must be at least 1 (got {count})")
    return Plan(config, count, proxies, listeners)


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(1024)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class SocketPool:
    """Listening sockets by ``(proxy, address)``: one per worker slot, all on one port."""

    def __init__(self) -> None:
        self.sockets: dict[ListenerKey, list[socket.socket]] = {}

    def ensure(self, listeners: dict[str, tuple[ListenAddress, ...]], workers: int,
               ) -> list[tuple[str, str, int]]:
        """Bind what is missing; returns ``(name, host, port)`` of newly bound addresses.

        Raises :class:`EdgeError` naming ``[name] listen ADDRESS`` if a bind fails, or the
        process holding the address if another one listens there (``SO_REUSEPORT`` would let
        us share it silently); sockets bound by this call are closed again, so a failed
        reload leaves nothing behind.
        """
        added: list[tuple[str, str, int]] = []
        created: list[tuple[ListenerKey, int]] = []
        try:
            for name, addresses in listeners.items():
                for address in addresses:
                    key = (name, address)
                    have = self.sockets.setdefault(key, [])
                    before = len(have)
                    if before == 0:
                        try:
                            check_free(address.host, address.port)
                        except AddressInUse as exc:
                            raise EdgeError(f"[{name}] listen: {exc}") from None
                    try:
                        while len(have) < workers:
                            port = have[0].getsockname()[1] if have else address.port
                            have.append(_bind(address.host, port))
                    except OSError as exc:
                        raise EdgeError(f"[{name}] listen {address}: cannot bind: "
                                        f"{exc.strerror or exc}") from None
                    finally:
                        if len(have) > before:
                            created.append((key, before))
                    if before == 0:
                        added.append((name, address.host, have[0].getsockname()[1]))
        except EdgeError:
            for key, before in created:
                for sock in self.sockets[key][before:]:
                    sock.close()
                del self.sockets[key][before:]
                if not self.sockets[key]:
                    del self.sockets[key]
            raise
        return added

    def for_slot(self, slot: int, listeners: dict[str, tuple[ListenAddress, ...]],
                 ) -> dict[str, list[socket.socket]]:
        return {name: [self.sockets[(name, a)][slot] for a in addresses]
                for name, addresses in listeners.items()}

    def all(self) -> list[socket.socket]:
        return [sock for socks in self.sockets.values() for sock in socks]

    def retain(self, plans: list[Plan]) -> None:
        """Close sockets no plan in ``plans`` uses (after the generations using them exited)."""
        for key, socks in list(self.sockets.items()):
            needed = max((p.workers for p in plans if key[1] in p.listeners.get(key[0], ())),
                         default=0)
            for sock in socks[needed:]:
                sock.close()
            del socks[needed:]
            if not socks:
                del self.sockets[key]

    def close(self) -> None:
        self.retain([])


@dataclass(eq=False)
class WorkerProc:
    """One forked worker process, as the master tracks it."""

    slot: int
    generation: Generation
    pid: int
    started: float
    ready_fd: int
    ready: bool = False
    answered: float = 0.0
    """``time.monotonic()`` of its last answer to the watchdog (or of becoming ready)."""


@dataclass(eq=False)
class Generation:
    """The workers started for one configuration (a reload starts the next generation)."""

    number: int
    plan: Plan
    workers: dict[int, WorkerProc] = field(default_factory=dict)
    failures: dict[int, int] = field(default_factory=dict)
    draining: bool = False
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    failed: bool = False

    def all_ready(self) -> bool:
        return (len(self.workers) == self.plan.workers
                and all(w.ready for w in self.workers.values()))


class Supervisor:
    """The master's event loop: admin listener, worker generations, signals."""

    def __init__(self, config: EdgeConfig, plan: Plan, *, workers_override: int | None,
                 only: set[str] | None, multiproc_dir: str, control_dir: str = "") -> None:
        self.config = config
        self.plan = plan
        self._workers_override = workers_override
        self._only = only
        self._multiproc_dir = multiproc_dir
        self._control_dir = control_dir
        """Where workers put their control sockets (edge.sessions); "" = none."""
        self._database_override = _database_override(config)
        self.pool = SocketPool()
        self.generations: list[Generation] = []
        self.current: Generation | None = None
        self._by_pid: dict[int, WorkerProc] = {}
        self._next_generation = 1
        self.stopping = False
        self.exit_code = 0
        """What :meth:`run` returns: 0, or CONFIG_EXIT when a worker rejected the configuration."""
        self._all_exited = asyncio.Event()
        self._reloading = False
        self._reload_again = False
        self._admin: AdminServer | None = None

    # -- lifecycle -----------------------------------------------------------------------

    async def run(self) -> int:
        """Serve until stopped; returns the exit code (0). Raises EdgeError on start-up."""
        loop = asyncio.get_running_loop()

        def admin_expected() -> int:
            return self.plan.workers if self.plan.proxies else 0

        admin = AdminServer(database=lambda: self.config.database, workers=self.workers_problem,
                            expected_workers=admin_expected, multiproc_dir=self._multiproc_dir)
        self._admin = admin
        admin.live = LiveRoutes(
            # Ready workers only (a starting one has no control socket yet), draining
            # generations included: their sessions are still open.
            control_dir=self._control_dir,
            worker_pids=lambda: sorted(pid for pid, proc in self._by_pid.items() if proc.ready),
            metrics=lambda: render_metrics(self._multiproc_dir, admin_expected()),
            ping=admin.ping, workers_problem=self.workers_problem,
            listeners=lambda: sorted(self.plan.listeners),
            token=lambda: admin_token(self.config.secrets))
        try:
            bound = await admin.start(self.config.admin.listen)
        except OSError as exc:
            raise EdgeError(str(exc.strerror or exc)) from None
        try:
            # Bind every listener before announcing any: a start that fails (an address in
            # use) prints only its error, no "listening" line a script could take at its word.
            added = self.pool.ensure(self.plan.listeners, self.plan.workers)
            for host, port in bound:
                announce("admin", host, port)
            for name, host, port in added:
                announce(name, host, port)
            if not self.plan.proxies:
                log.warning("no proxy enabled: serving only the admin listener")
            loop.add_signal_handler(signal.SIGTERM, self.stop, "SIGTERM")
            loop.add_signal_handler(signal.SIGINT, self.stop, "SIGINT")
            loop.add_signal_handler(signal.SIGHUP, self.request_reload)
            loop.add_signal_handler(signal.SIGCHLD, self._reap)
            loop.add_signal_handler(signal.SIGUSR1, self.reopen_logs)
            self._start_generation(self.plan)
            watchdog = asyncio.create_task(self._watchdog())
            try:
                await self._all_exited.wait()
            finally:
                watchdog.cancel()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD,
                        signal.SIGUSR1):
                loop.remove_signal_handler(sig)
            self._kill_all(signal.SIGKILL)
            await admin.stop()
            self.pool.close()
        log.info("stopped")
        return self.exit_code

    async def _watchdog(self) -> None:
        """Ping every ready worker's control socket; SIGKILL one silent for longer than
        ``[serve] watchdog_timeout``, so that the usual restart takes its slot (and its
        listening socket, with the connections queued there) over. A hung worker (stuck in
        a call that never returns, a loop that never yields, SIGSTOP) would otherwise keep
        its share of new connections waiting forever while /readyz says ready."""
        while not self.stopping:
            timeout = self.config.serve.watchdog_timeout
            await asyncio.sleep(watchdog_interval(timeout))
            if not timeout or not self._control_dir or self.stopping:
                continue
            procs = [p for p in self._by_pid.values() if p.ready]
            # A worker without a control socket (it failed to start, or it closed it while
            # draining) cannot be watched: never killed for that (its log said why).
            watched = [self._has_control_socket(p.pid) for p in procs]
            replies = await asyncio.gather(*(
                sessions.ask_worker(self._control_dir, p.pid, {"op": "ping"}) for p in procs))
            now = time.monotonic()
            for proc, reply, watch in zip(procs, replies, watched, strict=True):
                if reply.get("pong") or not watch:
                    proc.answered = now
                elif now - proc.answered > timeout and self._by_pid.get(proc.pid) is proc:
                    log.error("worker has not answered for %.0f s; killing it", now - proc.answered,
                              extra={"worker": proc.slot, "worker_pid": proc.pid,
                                     "generation": proc.generation.number})
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(proc.pid, signal.SIGKILL)

    def _has_control_socket(self, pid: int) -> bool:
        return os.path.exists(sessions.control_path(self._control_dir, pid))

    def reopen_logs(self) -> None:
        """SIGUSR1 (logrotate's postrotate): every worker reopens its log files."""
        edge_logging.reopen()
        live = list(self._by_pid)
        for pid in live:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGUSR1)
        log.info("SIGUSR1: reopening log files", extra={"workers": len(live)})

    def stop(self, why: str = "stop") -> None:
        """First call: drain gracefully; second: kill the workers now."""
        if self.stopping:
            log.warning("%s again: killing workers now", why)
            self._kill_all(signal.SIGKILL)
            return
        self.stopping = True
        # Stop listening at once: while the master holds a copy of a listening socket the
        # kernel keeps queueing connections nobody will accept (reset when we exit), instead
        # of refusing them so that clients and load balancers retry elsewhere. Each worker
        # closes its own copy once its backlog is accepted (worker.stop_listening).
        self.pool.close()
        live = list(self._by_pid.values())
        log.info("%s: stopping", why, extra={"workers": len(live)})
        if not live:
            self._all_exited.set()
            return
        grace = max(w.generation.plan.config.serve.grace_period for w in live)
        self._kill_all(signal.SIGTERM)
        asyncio.get_running_loop().call_later(grace + KILL_AFTER_GRACE, self._kill_all,
                                              signal.SIGKILL)

    def _kill_all(self, sig: signal.Signals) -> None:
        for pid in list(self._by_pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def workers_problem(self) -> str | None:
        """For /readyz: ``None`` if every slot of the current generation is up, else why."""
        if self.stopping:
            return "shutting down"
        gen = self.current
        if gen is None or not gen.plan.proxies:
            return None
        missing = [str(s) for s in range(gen.plan.workers)
                   if s not in gen.workers or not gen.workers[s].ready]
        if missing:
            return f"worker slot(s) {', '.join(missing)} not serving (starting or restarting)"
        timeout = self.config.serve.watchdog_timeout
        silent_for = 2 * watchdog_interval(timeout) + sessions.CONTROL_TIMEOUT
        silent = [str(s) for s, w in sorted(gen.workers.items())
                  if timeout and time.monotonic() - w.answered > silent_for]
        if silent:
            return f"worker slot(s) {', '.join(silent)} not answering (hung?)"
        return None

    # -- workers -------------------------------------------------------------------------

    def _start_generation(self, plan: Plan) -> Generation:
        gen = Generation(self._next_generation, plan)
        self._next_generation += 1
        self.generations.append(gen)
        if plan.proxies:
            for slot in range(plan.workers):
                self._spawn(gen, slot)
        else:
            gen.ready.set()
        if self.current is None:
            self.current = gen
        return gen

    def _spawn(self, gen: Generation, slot: int) -> None:
        if self.stopping or gen.draining or gen.failed or slot in gen.workers:
            return
        if self._admin is not None and self._admin.pinging:
            # Never fork while a helper thread of the readiness ping may hold a lock the
            # child would need (SQLite); pings are short, try again shortly.
            asyncio.get_running_loop().call_later(0.05, self._spawn, gen, slot)
            return
        plan = gen.plan
        own = self.pool.for_slot(slot, plan.listeners)
        own_ids = {id(s) for socks in own.values() for s in socks}
        others = [s for s in self.pool.all() if id(s) not in own_ids]
        admin_sockets = self._admin.sockets if self._admin is not None else []
        read_fd, write_fd = os.pipe()
        spec = WorkerSpec(worker_id=slot, generation=gen.number, config=plan.config,
                          proxies=plan.proxies, sockets=own, ready_fd=write_fd,
                          control_dir=self._control_dir)
        sys.stdout.flush()
        sys.stderr.flush()
        # Block the signals the worker will handle until its own loop has installed handlers,
        # so a SIGTERM arriving right after fork is not swallowed by the master's handlers.
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _FORWARDED)
        try:
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the child never returns from run_worker
                os.close(read_fd)
                # Drop other slots' and the admin sockets: a retired address must be free
                # as soon as the master closes it, not when the last worker exits.
                for sock in [*others, *admin_sockets]:
                    with contextlib.suppress(OSError):
                        os.close(sock.detach())
                run_worker(spec)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        os.close(write_fd)
        proc = WorkerProc(slot, gen, pid, time.monotonic(), read_fd)
        gen.workers[slot] = proc
        self._by_pid[pid] = proc
        asyncio.get_running_loop().add_reader(read_fd, self._on_ready_pipe, proc)
        log.info("worker spawned", extra={"worker": slot, "generation": gen.number,
                                          "worker_pid": pid})

    def _on_ready_pipe(self, proc: WorkerProc) -> None:
        try:
            data = os.read(proc.ready_fd, 16)
        except OSError:
            data = b""
        if b"R" in data:
            proc.ready = True
            proc.answered = time.monotonic()
            if proc.generation.all_ready():
                proc.generation.ready.set()
        if not data or proc.ready:
            self._close_ready_fd(proc)

    def _close_ready_fd(self, proc: WorkerProc) -> None:
        if proc.ready_fd >= 0:
            asyncio.get_running_loop().remove_reader(proc.ready_fd)
            with contextlib.suppress(OSError):
                os.close(proc.ready_fd)
            proc.ready_fd = -1

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            proc = self._by_pid.pop(pid, None)
            if proc is not None:
                self._worker_exited(proc, status)

    def _worker_exited(self, proc: WorkerProc, status: int) -> None:
        from prometheus_client import multiprocess

        with contextlib.suppress(Exception):
            multiprocess.mark_process_dead(proc.pid, self._multiproc_dir)  # type: ignore[no-untyped-call]
        self._close_ready_fd(proc)
        gen = proc.generation
        gen.workers.pop(proc.slot, None)
        code = os.waitstatus_to_exitcode(status)
        extra = {"worker": proc.slot, "generation": gen.number, "worker_pid": proc.pid,
                 "exit_code": code}
        if self.stopping or gen.draining:
            log.info("worker exited", extra=extra)
        elif not proc.ready and gen is not self.current:
            # A new generation that cannot start: give up on it, keep the old one.
            log.error("new worker exited before serving", extra=extra)
            gen.failed = True
            gen.ready.set()
        elif not proc.ready and code == CONFIG_EXIT:
            # The worker already logged which setting is wrong; restarting cannot fix it.
            log.error("a worker rejected the configuration; stopping", extra=extra)
            self.exit_code = CONFIG_EXIT
            self.stop("configuration error")
        else:
            lived = time.monotonic() - proc.started
            failures = 1 if lived >= STABLE_AFTER else gen.failures.get(proc.slot, 0) + 1
            gen.failures[proc.slot] = failures
            delay = min(RESTART_BACKOFF_MAX, RESTART_BACKOFF_MIN * 2 ** (failures - 1))
            log.error("worker died unexpectedly; restarting", extra={**extra, "restart_in": delay})
            asyncio.get_running_loop().call_later(delay, self._spawn, gen, proc.slot)
        if not gen.workers and (gen.draining or gen.failed or self.stopping):
            self._generation_done(gen)

    def _signal_generation(self, gen: Generation, sig: signal.Signals) -> None:
        """Send ``sig`` to every worker of ``gen``; a generation with none left is done."""
        for proc in gen.workers.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, sig)
        if not gen.workers:
            self._generation_done(gen)

    def _generation_done(self, gen: Generation) -> None:
        if gen in self.generations:
            self.generations.remove(gen)
        self.pool.retain([g.plan for g in self.generations])
        if self.stopping and not self._by_pid:
            self._all_exited.set()

    # -- reload --------------------------------------------------------------------------

    def request_reload(self) -> None:
        if self.stopping:
            return
        if self._reloading:
            self._reload_again = True
            return
        self._reloading = True
        task = asyncio.get_running_loop().create_task(self._reload_loop(), name="edge-reload")
        task.add_done_callback(_log_task_failure)

    async def _reload_loop(self) -> None:
        try:
            while True:
                self._reload_again = False
                await self.reload()
                if not self._reload_again or self.stopping:
                    return
        finally:
            self._reloading = False

    async def reload(self) -> bool:
        """Apply the configuration file again; returns whether the new one is now serving."""
        source = self.config.source
        if not _is_file(source):
            log.warning("SIGHUP: configuration did not come from a file (%s); nothing to reload",
                        source or "defaults")
            return False
        try:
            config = load_config(source)
            if self._database_override is not None:
                config = config.replace(database=dataclasses.replace(
                    config.database, url=self._database_override))
            plan = make_plan(config, self._workers_override, self._only)
        except EdgeError as exc:
            log.error("SIGHUP: invalid configuration, keeping the running one: %s", exc)
            return False
        old = self.current
        try:
            added = self.pool.ensure(plan.listeners, plan.workers)
        except EdgeError as exc:
            log.error("SIGHUP: keeping the running configuration: %s", exc)
            return False
        from edge.logging import configure

        configure(config.log)
        admin = self._admin
        assert admin is not None
        if admin.addresses != config.admin.listen:
            await admin.stop()
            try:
                bound = await admin.start(config.admin.listen)
            except OSError as exc:
                log.error("SIGHUP: admin listener: %s; keeping %s", exc,
                          ", ".join(map(str, admin.addresses)))
                bound = await admin.start(admin.addresses)
            else:
                for host, port in bound:
                    announce("admin", host, port)
        gen = self._start_generation(plan)
        try:
            await asyncio.wait_for(gen.ready.wait(), READY_TIMEOUT)
        except TimeoutError:
            gen.failed = True
        if gen.failed or self.stopping:
            if gen.failed:
                log.error("SIGHUP: new workers did not start; keeping the running configuration",
                          extra={"generation": gen.number})
            gen.failed = True
            self._signal_generation(gen, signal.SIGKILL)
            return False
        for name, host, port in added:
            announce(name, host, port)
        self.config, self.plan, self.current = config, plan, gen
        if old is not None and old is not gen:
            old.draining = True
            self._signal_generation(old, signal.SIGTERM)
        log.info("configuration reloaded", extra={"generation": gen.number,
                                                  "proxies": sorted(plan.proxies)})
        return True


def _is_file(path: str) -> bool:
    # A stat on a local path; not worth a thread even inside the event loop.
    return bool(path) and Path(path).is_file()


def _log_task_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("reload failed", exc_info=task.exception())


def _database_override(config: EdgeConfig) -> str | None:
    """The database URL given by flag/environment (kept across reloads), if any."""
    if not _is_file(config.source):
        return None
    try:
        from_file = load_config(config.source, env={}).database.url
    except EdgeError:
        return None
    return config.database.url if config.database.url != from_file else None


def _prepare_metrics_dir() -> tuple[str, dict[str, str | None]]:
    """A fresh PROMETHEUS_MULTIPROC_DIR, set before any worker creates a metric value."""
    path = tempfile.mkdtemp(prefix="edge-metrics-")
    saved = {"PROMETHEUS_MULTIPROC_DIR": os.environ.get("PROMETHEUS_MULTIPROC_DIR")}
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    from prometheus_client import values

    # prometheus_client picks its value class when first imported; if that happened before
    # the variable was set (an embedding program), pick again so workers write files.
    values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]
    if "edge.metrics" in sys.modules:
        log.warning("edge.metrics was imported before serve(); unlabelled metrics of "
                    "workers may be missing from /metrics")
    return path, saved


def serve(config: EdgeConfig, *, workers: int | None = None, only: set[str] | None = None) -> int:
    """Run the master until SIGTERM/SIGINT; returns the exit code (0 after a clean stop).

    ``workers`` overrides ``[serve] workers``; ``only`` restricts the proxies run (names of
    listener sections). Raises :class:`~edge.errors.EdgeError` with a one-line message for
    start-up problems: a bad ``only``, a configured proxy that is not installed/built
    (:class:`~edge.registry.ProxyNotAvailable`), an address that cannot be bound.
    """
    from edge.logging import configure

    configure(config.log)
    path, saved = _prepare_metrics_dir()
    # Mode 0700 (mkdtemp): only this user may list or end sessions through worker sockets.
    control_dir = tempfile.mkdtemp(prefix="edge-control-")
    try:
        plan = make_plan(config, workers, only)
        # Loading the proxies imported edge.metrics here in the master, which created files
        # for its unlabelled gauges; the master is no worker, so drop them (workers start
        # their own files on first use after the fork).
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(os.getpid(), path)  # type: ignore[no-untyped-call]
        supervisor = Supervisor(config, plan, workers_override=workers, only=only,
                                multiproc_dir=path, control_dir=control_dir)
        return asyncio.run(supervisor.run())
    finally:
        shutil.rmtree(path, ignore_errors=True)
        shutil.rmtree(control_dir, ignore_errors=True)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


__all__ = ["Plan", "SocketPool", "Supervisor", "announce", "make_plan", "serve"]
