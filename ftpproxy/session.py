"""One client's FTP session: the control-channel protocol and the coroutine that drives it.

The sans-IO rules live in :mod:`ftpproxy.protocol`; this module wires them to sockets:

* :class:`FtpSession` is the asyncio Protocol of the client's control connection. Bytes go
  (after an optional PROXY header from a trusted load balancer) into a
  :class:`~ftpproxy.protocol.CommandReader`; the events it yields are handled strictly in order
  by :meth:`FtpSession.run`, one coroutine per session.
* USER is looked up in the directory (cached) and answered ``331`` by the proxy itself, the
  same text for known and unknown names; on PASS the proxy connects to the account's host
  (PROXY header, AUTH TLS as configured), replays USER with the backend user name and passes
  PASS through. Every failed login, whatever the reason, is the same ``530`` after the same
  delay.
* After login, commands are replayed (only re-formatted fields, never raw bytes) and replies
  relayed; PASV/EPSV/PORT/EPRT and the transfer commands are the proxy's own
  (:meth:`FtpSession._transfer`): the backend is always used passively and every data
  connection goes through the proxy.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections import deque
from dataclasses import replace
from typing import TYPE_CHECKING, Any, NoReturn, cast

from edge import sessionpolicy
from edge.directory.directory import AccountRoute
from edge.errors import DirectoryUnavailable
from edge.proxyproto import ProxyHeaderParser, ProxyProtocolError, header_for_backend
from edge.relay import Relay, SplicePump
from edge.sessions import SessionSnapshot
from ftpproxy import metrics
from ftpproxy.backend import BackendControl, BackendError, BackendGone
from ftpproxy.data import (
    HoldProtocol,
    PassiveListener,
    connect_hold,
    connect_socket,
    start_relay,
    wrap_socket,
)
from ftpproxy.protocol import (
    BadCommand,
    BounceRefused,
    Close,
    Command,
    CommandEvent,
    CommandReader,
    CommandTooLong,
    Forward,
    FtpSyntaxError,
    LoginState,
    PassiveAddressRefused,
    ProtocolError,
    Reply,
    Respond,
    RouteLogin,
    StartTls,
    active_target,
    check_backend_passive,
    format_epsv_reply,
    format_pasv_reply,
    format_reply,
    login_step,
    parse_eprt_argument,
    parse_epsv_reply,
    parse_pasv_reply,
    parse_port_argument,
)
from ftpproxy.tls import resuming, tls_info
from ftpproxy.waiting import DeadlineWaiter

if TYPE_CHECKING:
    from ftpproxy.server import FtpProxy

__all__ = ["FtpSession"]

TRANSFER_KINDS = {"RETR": "download", "STOR": "upload", "APPE": "upload", "STOU": "upload",
                  "LIST": "listing", "NLST": "listing", "MLSD": "listing"}
#: Client commands queued before the proxy stops reading the control connection.
MAX_QUEUED_EVENTS = 32
GREETING = "FTP proxy ready."
LOGIN_INCORRECT = "Login incorrect."
PASSWORD_REQUIRED = "Password required."


class _Tick:
    """Queued when a transfer ends, so the session loop re-arms its idle timeout."""


_TICK: Any = _Tick()


class _SessionEnd(Exception):
    """Leave the session loop (the client was already told why)."""


class _PassiveRefused(Exception):
    """The backend did not enter passive mode (its reply was not 227/229)."""


class FtpSession(asyncio.Protocol):
    """The client's control connection (one instance per connection)."""

    def __init__(self, proxy: FtpProxy) -> None:
        self.proxy = proxy
        self.transport: asyncio.Transport | None = None
        self.client_ip = ""
        self.client_port = 0
        self.local: tuple[str, int] = ("", 0)
        self._reader = CommandReader()
        self._events: deque[CommandEvent | None] = deque()
        self._wake = DeadlineWaiter()  # login/idle timeouts without a timeout object per wait
        self._header: ProxyHeaderParser | None = None
        self._header_done: asyncio.Future[None] | None = None
        self.state = LoginState(tls_available=proxy.tls_context is not None,
                                tls_required=proxy.config.require_tls)
        self.route: AccountRoute | None = None
        self.username = ""
        self.backend: BackendControl | None = None
        self.logged_in = False
        self._passive: PassiveListener | None = None
        self._active: tuple[str, int] | None = None
        self._epsv_all = False
        self._transfer_task: asyncio.Task[None] | None = None
        self._relay: Relay | SplicePump | None = None
        self._aborting = False
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self._slots: list[str] = []  # limits released at the end: "conn", "unauth"
        self.started = time.time()
        self.bytes_up = 0
        self.bytes_down = 0
        self.transfers = 0
        self.result = "closed"
        self.session_id = ""
        """Id in the worker's live-session table (``edge sessions``), once logged in."""
        self._drain_handle: asyncio.TimerHandle | None = None
        self._prefetch: asyncio.Task[tuple[BackendControl, Reply]] | None = None
        self._backend_pasv: asyncio.Task[tuple[str, int]] | None = None

    # -- asyncio callbacks (client control connection) ----------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername") or ("", 0)
        self.client_ip, self.client_port = str(peer[0]), int(peer[1])
        sock = transport.get_extra_info("sockname") or ("", 0)
        self.local = (str(sock[0]), int(sock[1]))
        self._header = self.proxy.header_policy.parser_for(self.client_ip)
        if self._header is not None:
            self._header_done = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(self.run(), name=f"ftp-session-{self.client_ip}")

    def data_received(self, data: bytes) -> None:
        if self._header is not None:
            try:
                result = self._header.feed(data)
            except ProxyProtocolError as exc:
                metrics.REFUSED.labels(reason="proxy_header").inc()
                self._log_warning("bad PROXY header from trusted peer", error=str(exc))
                self.result = "bad_proxy_header"
                if self.transport is not None:
                    self.transport.abort()  # no reply: the peer does not speak PROXY
                return
            if result is None:
                return
            self._header = None
            if result.header is not None and result.header.source is not None:
                self.client_ip, self.client_port = result.header.source
            if result.header is not None and result.header.destination is not None:
                self.local = result.header.destination
            assert self._header_done is not None
            if not self._header_done.done():
                self._header_done.set_result(None)
            data = result.remaining
            if not data:
                return
        try:
            events = self._reader.feed(data)
        except ProtocolError:
            metrics.REFUSED.labels(reason="injection").inc()
            self._push(None)
            return
        for event in events:
            self._push(event)
        if len(self._events) > MAX_QUEUED_EVENTS and self.transport is not None:
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        self._push(None)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._push(None)
        if self._header_done is not None and not self._header_done.done():
            self._header_done.set_result(None)

    def _push(self, event: CommandEvent | None) -> None:
        self._events.append(event)
        self._wake.wake()

    async def _next_event(self, wait: float | None) -> CommandEvent | None:
        """The next client event (``None``: the connection ended); TimeoutError after ``wait``."""
        while not self._events:
            await self._wake.wait(wait)
        event = self._events.popleft()
        if len(self._events) <= MAX_QUEUED_EVENTS // 2 and self.transport is not None \
                and not self.transport.is_closing() and not self.transport.is_reading():
            self.transport.resume_reading()
        return event

    @property
    def _reply_wait(self) -> float:
        """Seconds to wait for a backend's answer to a command (``backend_reply_timeout``)."""
        return self.proxy.config.backend_reply_timeout

    # -- output --------------------------------------------------------------------------------

    def reply(self, code: int, text: str | list[str]) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(format_reply(code, text))

    def _forward_reply(self, reply: Reply) -> None:
        self.reply(reply.code, reply.lines)

    # -- the session ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Drive the session until the client leaves, a limit ends it, or it is terminated."""
        proxy, config = self.proxy, self.proxy.config
        try:
            if self._header_done is not None:
                try:
                    await asyncio.wait_for(asyncio.shield(self._header_done), proxy.login_grace_time)
                except TimeoutError:
                    metrics.REFUSED.labels(reason="proxy_header").inc()
                    raise _SessionEnd from None
                if self._closing or self.transport is None or self.transport.is_closing():
                    raise _SessionEnd
            if not proxy.connection_cap.try_acquire(self.client_ip):
                metrics.REFUSED.labels(reason="connection_cap").inc()
                self._end(421, "Too many connections from your address.", "connection_cap")
            self._slots.append("conn")
            if not proxy.limits.unauthenticated.try_acquire(self.client_ip):
                metrics.REFUSED.labels(reason="unauthenticated_cap").inc()
                self._end(421, "Too many connections from your address.", "unauthenticated_cap")
            self._slots.append("unauth")
            self.reply(220, GREETING)
            login_deadline = time.monotonic() + proxy.login_grace_time
            while True:
                if self._transfer_task is not None:
                    timeout = None
                elif not self.logged_in:
                    timeout = max(0.0, login_deadline - time.monotonic())
                else:
                    timeout = config.idle_timeout
                try:
                    event = await self._next_event(timeout)
                except TimeoutError:
                    if self.logged_in:
                        self._end(421, "Idle timeout, closing control connection.", "idle")
                    self._end(421, "Login timeout, closing control connection.", "login_timeout")
                if event is None:
                    raise _SessionEnd
                if event is _TICK:
                    continue  # a transfer ended: the idle timeout applies again
                await self._handle(event)
        except _SessionEnd:
            pass
        except DirectoryUnavailable:
            self.result = "directory_unavailable"
            self.reply(421, "Service temporarily unavailable, try again later.")
        except Exception:
            self.result = "error"
            self.proxy.logger.exception("ftp session failed", extra=self._fields())
            self.reply(421, "Internal error, closing control connection.")
        finally:
            await self._cleanup()

    def _end(self, code: int, text: str, result: str) -> NoReturn:
        """Tell the client ``code text`` and leave the session loop."""
        if not self._closing:  # terminate() already said why
            self.result = result
            self.reply(code, text)
        raise _SessionEnd

    async def _handle(self, event: CommandEvent) -> None:
        if isinstance(event, CommandTooLong):
            metrics.REFUSED.labels(reason="too_long").inc()
            self.reply(500, "Command too long.")
            return
        if isinstance(event, BadCommand):
            metrics.REFUSED.labels(reason="bad_command").inc()
            self.reply(500, f"Syntax error: {event.reason}.")
            return
        if self._transfer_task is not None:
            if event.verb == "ABOR":
                self._abort_transfer()
            await self._wait_transfer()
        if self._closing:
            raise _SessionEnd
        state, action = login_step(self.state, event)
        self.state = state
        self._events.extendleft(reversed(self._reader.after(event, action)))
        if isinstance(action, Respond):
            if event.verb == "PASS" and action.code == 530:
                await self._login_failed(time.monotonic(), "malformed user name")
            else:
                if action.code == 530 and event.verb == "USER":
                    metrics.REFUSED.labels(reason="tls_required").inc()
                self.reply(action.code, action.text)
        elif isinstance(action, Close):
            self._end(action.code, action.text, "quit")
        elif isinstance(action, StartTls):
            await self._start_tls(action)
        elif isinstance(action, RouteLogin):
            await self._user(action.username)
        elif isinstance(action, Forward):
            if event.verb == "PASS" and self.logged_in:
                self.reply(503, "Already logged in.")
            elif event.verb == "PASS":
                await self._pass(event.argument)
            elif not self.logged_in:
                self.reply(530, "Please login with USER and PASS.")
            else:
                await self._command(event)

    # -- TLS on the control connection --------------------------------------------------------

    async def _start_tls(self, action: StartTls) -> None:
        context = self.proxy.tls_context
        assert context is not None and self.transport is not None
        self.reply(action.code, action.text)
        dropped = self._reader.discard_buffered()
        if dropped or any(e is not None for e in self._events):
            # Plaintext pipelined behind AUTH TLS must never count as sent over TLS.
            metrics.REFUSED.labels(reason="injection").inc()
            self._log_warning("discarded plaintext pipelined behind AUTH TLS", bytes=dropped)
            self._events = deque(e for e in self._events if e is None or e is _TICK)
        loop = asyncio.get_running_loop()
        try:
            transport = await loop.start_tls(self.transport, self, context, server_side=True,
                                             ssl_handshake_timeout=self.proxy.login_grace_time)
        except (OSError, TimeoutError, ConnectionError) as exc:
            self.result = "tls_failed"
            self._log_warning("TLS handshake with client failed", error=str(exc))
            raise _SessionEnd from None
        if transport is None:
            raise _SessionEnd
        self.transport = transport

    # -- login --------------------------------------------------------------------------------

    async def _user(self, username: str) -> None:
        if self.backend is not None:
            # A new USER starts a new login: the old backend session ends.
            if self.logged_in:
                self.proxy.unwatch(self)
            self._drop_backend_passive()
            self.backend.close()
            self.backend = None
            self.logged_in = False
        self._cancel_prefetch()
        self.username = username
        route = await self.proxy.directory.route_for_account(username)
        if route is not None and "ftp" not in route.account.protocols:
            route = None
        self.route = route
        # The same answer, as fast, for every name; the backend login starts behind it while
        # the client sends its password (it is only used once PASS arrives).
        self.reply(331, PASSWORD_REQUIRED)
        if (route is not None and route.tenant.state == "active" and route.host.state == "active"
                and self.proxy.limits.check_login(self.client_ip, username).allowed):
            self._prefetch = asyncio.create_task(self._prepare_backend(route),
                                                 name="ftp-backend-login")

    async def _prepare_backend(self, route: AccountRoute) -> tuple[BackendControl, Reply]:
        """Connect to the account's host and replay USER; returns the backend's answer."""
        backend = await self._connect_backend(route)
        try:
            reply = await backend.command("USER", route.account.backend_username_for("ftp"), self._reply_wait)
        except BaseException:
            backend.abort()
            raise
        return backend, reply

    def _cancel_prefetch(self) -> None:
        task, self._prefetch = self._prefetch, None
        if task is None:
            return
        if not task.done():
            task.cancel()
        elif not task.cancelled() and task.exception() is None:
            task.result()[0].abort()

    async def _pass(self, password: str) -> None:
        proxy, username, route = self.proxy, self.username, self.route
        # Many addresses guessing one account slow it down (never lock it): for every name,
        # known or not, before anything is checked, so the wait itself tells nothing.
        hold = proxy.limits.user_delay(username or None)
        if hold > 0:
            await asyncio.sleep(hold)
        started = time.monotonic()
        verdict = proxy.limits.check_login(self.client_ip, username)
        if not verdict.allowed:
            self.proxy.login_counters["banned"].inc()
            self._log_warning("login refused by failed-login limits", reason=verdict.reason)
            await self._login_failed(started, verdict.reason, count=False)
            return
        if route is None or route.tenant.state != "active":
            await self._login_failed(started, "unknown user or suspended tenant")
            return
        host = route.host
        if sessionpolicy.host_state(host) != "active":  # a passed --until counts as active
            self.proxy.login_counters["unavailable"].inc()
            notice = sessionpolicy.host_notice(host)
            self._end(421, notice, "maintenance")
        task, self._prefetch = self._prefetch, None
        try:
            backend, reply = await (task if task is not None else self._prepare_backend(route))
        except (BackendError, BackendGone, TimeoutError) as exc:
            self.proxy.login_counters["unavailable"].inc()
            self.proxy.logger.warning("ftp backend unavailable", extra={**self._fields(),
                                                                        "error": str(exc)})
            self._end(421, "Service not available, try again later.", "backend_unavailable")
        self.backend = backend
        try:
            if reply.code == 331:
                reply = await backend.command("PASS", password, self._reply_wait)
        except (BackendGone, TimeoutError):
            self.proxy.login_counters["unavailable"].inc()
            self._end(421, "Service not available, try again later.", "backend_unavailable")
        if 200 <= reply.code < 300:
            self.logged_in = True
            proxy.limits.login_succeeded(self.client_ip, username)
            self._release("unauth")
            self.proxy.login_counters["ok"].inc()
            proxy.watch(self)
            self._forward_reply(reply)
            return
        if reply.code == 421:
            self.proxy.login_counters["unavailable"].inc()
            self._end(421, "Service not available, try again later.", "backend_unavailable")
        backend.close()
        self.backend = None
        await self._login_failed(started, f"backend answered {reply.code}", refused=True)

    async def _login_failed(self, started: float, why: str, *, count: bool = True,
                            refused: bool = False) -> None:
        """The one answer to every failed login: ``530`` at the common failure deadline
        (``edge.limits.FailurePacer``), which a backend's refusal (``refused``) teaches."""
        proxy = self.proxy
        self._cancel_prefetch()
        verdict = proxy.limits.check_login(self.client_ip, self.username or None)
        if count:
            self.proxy.login_counters["failed"].inc()
            verdict = proxy.limits.login_failed(self.client_ip, self.username or None)
        self.proxy.logger.info("ftp login failed", extra={**self._fields(), "reason": why})
        self.state = replace(self.state, routed_user=None, rejected_user=False)
        self.route = None
        pace = proxy.limits.pace
        elapsed = time.monotonic() - started
        if refused:
            pace.record_refusal(elapsed)
        delay = pace.answer_after(elapsed) - elapsed
        if delay > 0:
            await asyncio.sleep(delay)
        self.reply(530, LOGIN_INCORRECT)
        if not verdict.allowed:
            # The session goes on as after any failure (its next PASS fails the same way, the
            # login grace time ends it): hanging up would tell the client it is banned.
            self.result = "banned"

    async def _connect_backend(self, route: AccountRoute) -> BackendControl:
        """Connect, send the PROXY header, read the greeting, and do AUTH TLS if configured."""
        host, config = route.host, self.proxy.config
        first = header_for_backend(host.send_proxy_protocol, (self.client_ip, self.client_port),
                                   self.local)
        async with self.proxy.connect_slot(host.address, host.ftp_port):
            backend = await BackendControl.connect(host.address, host.ftp_port,
                                                   connect_timeout=config.backend_connect_timeout,
                                                   on_event=self._backend_event, first_bytes=first)
            try:
                greeting = await backend.final_reply(config.backend_connect_timeout)
            except BaseException:
                backend.abort()
                raise
        try:
            if greeting.code != 220:
                raise BackendError(f"backend greeting {greeting.code} {greeting.text!r}")
            if host.backend_tls:
                reply = await backend.command("AUTH", "TLS", config.backend_connect_timeout)
                if reply.code != 234:
                    raise BackendError(f"backend refused AUTH TLS: {reply.code} {reply.text!r}")
                await backend.start_tls(self.proxy.backend_tls_context, host.address,
                                        config.backend_connect_timeout)
                for verb, arg in (("PBSZ", "0"), ("PROT", "P")):
                    reply = await backend.command(verb, arg, config.backend_connect_timeout)
                    if reply.code != 200:
                        raise BackendError(f"backend refused {verb} {arg}: {reply.code}")
        except (BackendGone, TimeoutError) as exc:
            backend.abort()
            raise BackendError(f"backend {host.name}: {exc or 'no answer'}") from None
        except BackendError:
            backend.abort()
            raise
        return backend

    def _backend_event(self) -> None:
        """The backend said something nobody asked for, or went away, between commands."""
        backend = self.backend
        if backend is None or self._closing or self._transfer_task is not None:
            return
        if self._backend_pasv is not None and not self._backend_pasv.done():
            return  # the answer to the PASV sent ahead, its task not yet waiting for it
        for reply in backend.pending():
            self._forward_reply(reply)
            if reply.code == 421:
                self.terminate(None, "backend_closed")
                return
        if backend.gone is not None and self.logged_in:
            self.terminate("Backend connection lost, closing control connection.", "backend_lost")

    # -- commands after login -----------------------------------------------------------------

    async def _command(self, cmd: Command) -> None:
        verb, arg = cmd.verb, cmd.argument
        if verb in TRANSFER_KINDS:
            # The transfer takes the backend passive address asked for at PASV/PORT time.
            task = asyncio.create_task(self._transfer(cmd), name="ftp-transfer")
            self._transfer_task = task
            task.add_done_callback(self._transfer_done)
            return
        # Anything else is sent to the backend after the answer to a PASV asked for ahead.
        await self._settle_backend_passive()
        if verb in ("PASV", "EPSV"):
            await self._open_passive(verb, arg)
        elif verb in ("PORT", "EPRT"):
            self._set_active(verb, arg)
        elif verb == "FEAT":
            await self._feat()
        else:
            await self._relay_command(cmd)
            if verb == "QUIT":
                raise _SessionEnd

    async def _relay_command(self, cmd: Command) -> None:
        backend = self._backend()
        try:
            backend.send(cmd.verb, cmd.argument)
            while True:
                reply = await backend.reply(self._reply_wait)
                self._forward_reply(reply)
                if reply.code >= 200:
                    if cmd.verb == "QUIT":
                        self.result = "quit"
                    return
        except (BackendGone, TimeoutError):
            if cmd.verb == "QUIT":
                raise _SessionEnd from None
            self._end(421, "Backend connection lost, closing control connection.", "backend_lost")

    async def _feat(self) -> None:
        """The backend's features, with the proxy's own TLS and data-channel ones."""
        backend = self._backend()
        try:
            reply = await backend.command("FEAT", "", self._reply_wait)
        except (BackendGone, TimeoutError):
            self._end(421, "Backend connection lost, closing control connection.", "backend_lost")
        if reply.code != 211 or len(reply.lines) < 2:
            self._forward_reply(reply)
            return
        ours = ["EPRT", "EPSV", "PASV"]
        if self.state.tls_available:
            ours += ["AUTH TLS", "PBSZ", "PROT"]
        skip = ("AUTH", "PBSZ", "PROT", "EPRT", "EPSV", "PASV", "CCC", "REIN")
        lines = [line for line in reply.lines[1:-1]
                 if line.strip().split(" ", 1)[0].upper() not in skip]
        self.reply(211, [reply.lines[0], *lines, *(f" {f}" for f in ours), reply.lines[-1]])

    def _backend(self) -> BackendControl:
        if self.backend is None:
            self._end(421, "Backend connection lost, closing control connection.", "backend_lost")
        return self.backend

    # -- data channels ------------------------------------------------------------------------

    def _clear_data_mode(self) -> None:
        if self._passive is not None:
            self._passive.close()
            self._passive = None
        self._active = None

    async def _open_passive(self, verb: str, arg: str) -> None:
        arg = arg.strip().upper()
        if verb == "EPSV" and arg == "ALL":
            self._epsv_all = True
            self.reply(200, "EPSV ALL ok.")
            return
        if verb == "PASV" and self._epsv_all:
            self.reply(503, "PASV not allowed after EPSV ALL.")
            return
        local_ip = self.local[0]
        mapped = local_ip.removeprefix("::ffff:") if "." in local_ip else local_ip
        if verb == "EPSV" and arg not in ("", "1", "2"):
            self.reply(522, "Network protocol not supported, use (1,2).")
            return
        if verb == "EPSV" and arg and (arg == "1") != ("." in mapped):
            self.reply(522, "Network protocol not supported on this connection.")
            return
        masquerade = self.proxy.config.masquerade_address
        if verb == "PASV" and not masquerade and ":" in mapped:
            self.reply(425, "PASV needs IPv4; use EPSV.")
            return
        self._clear_data_mode()
        self._start_backend_passive()
        # Bind the address the client reached (the socket's own, not a PROXY header's).
        sock = self.transport.get_extra_info("sockname") if self.transport else None
        bind_ip = str(sock[0]) if sock else local_ip
        try:
            listener = await PassiveListener.open(bind_ip, self.proxy.config.passive_ports,
                                                  self.client_ip, self._foreign_data_peer)
        except OSError as exc:
            self._log_warning("no passive port", error=str(exc))
            self.reply(425, "Cannot open passive connection, try again.")
            return
        self._passive = listener
        if verb == "PASV":
            self.transport_write(format_pasv_reply(masquerade or mapped, listener.port))
        else:
            self.transport_write(format_epsv_reply(listener.port))

    def transport_write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def _foreign_data_peer(self, peer_ip: str) -> None:
        metrics.REFUSED.labels(reason="port_steal").inc()
        self._log_warning("connection to a passive port from a foreign address dropped",
                          peer=peer_ip)

    def _set_active(self, verb: str, arg: str) -> None:
        if self._epsv_all:
            self.reply(503, f"{verb} not allowed after EPSV ALL.")
            return
        try:
            ip, port = parse_port_argument(arg) if verb == "PORT" else parse_eprt_argument(arg)
            target = active_target(self.client_ip, ip, port)
        except BounceRefused:
            metrics.REFUSED.labels(reason="bounce").inc()
            self.reply(504, f"{verb} to ports below 1024 refused.")
            return
        except FtpSyntaxError as exc:
            self.reply(501, f"Syntax error in {verb} argument: {exc}.")
            return
        self._clear_data_mode()
        self._start_backend_passive()
        self._active = target
        self.reply(200, f"{verb} command successful.")

    # The backend's passive address is asked for as soon as the client has chosen its data
    # mode, not when the transfer command arrives: the backend's PASV round trip then overlaps
    # the client's own (reading 227, connecting, sending RETR) instead of adding to each
    # transfer. Only PASV is sent ahead; the backend data connection is still made for the
    # transfer command, so a data mode the client never uses leaves nothing open but the
    # backend's passive port (which its next PASV replaces, as when a client does the same).

    def _start_backend_passive(self) -> None:
        """Send PASV to the backend now (before the client has its answer: clients connect
        and send RETR within a fraction of a millisecond); its answer is awaited in a task."""
        backend = self.backend
        self._drop_backend_passive()  # an unused earlier answer (already settled)
        if backend is None or backend.gone is not None:
            return  # the transfer will find out and say so
        verb = self._backend_passive_verb(backend)
        backend.send(verb)
        task = asyncio.create_task(self._backend_passive_reply(backend), name="ftp-backend-pasv")
        task.add_done_callback(self._backend_passive_done)
        self._backend_pasv = task

    def _backend_passive_done(self, task: asyncio.Task[tuple[str, int]]) -> None:
        # A backend that went away while the PASV sent ahead waited (_backend_event held back)
        # ends the session now, as between any other commands. Only then: by the time this
        # runs, the session may already wait for its next command's reply, which a general
        # _backend_event would take as unsolicited.
        backend = self.backend
        if backend is not None and backend.gone is not None:
            self._backend_event()

    async def _settle_backend_passive(self) -> None:
        """Wait until a PASV sent ahead has its answer, so that the next command's reply is
        not taken for it (its outcome stays in the task for the transfer)."""
        task = self._backend_pasv
        if task is not None and not task.done():
            await asyncio.wait([task])

    def _drop_backend_passive(self) -> None:
        task, self._backend_pasv = self._backend_pasv, None
        if task is None:
            return
        if task.done():
            if not task.cancelled():
                task.exception()  # retrieved: an unused failure is not an error to log
        else:
            task.cancel()

    async def _ask_backend_passive(self) -> tuple[str, int]:
        """PASV (EPSV for IPv6 hosts) to the backend; its checked address.

        Raises BackendGone/TimeoutError (no backend), :class:`_PassiveRefused`, FtpSyntaxError
        or PassiveAddressRefused (a reply pointing anywhere but the backend itself).
        """
        backend = self.backend
        if backend is None:
            raise BackendGone("no backend session")
        backend.send(self._backend_passive_verb(backend))
        return await self._backend_passive_reply(backend)

    @staticmethod
    def _backend_passive_verb(backend: BackendControl) -> str:
        ipv6 = ":" in backend.peer_ip and not backend.peer_ip.startswith("::ffff:")
        return "EPSV" if ipv6 else "PASV"

    async def _backend_passive_reply(self, backend: BackendControl) -> tuple[str, int]:
        """The backend's answer to PASV/EPSV, checked (see :meth:`_ask_backend_passive`)."""
        reply = await backend.final_reply(self._reply_wait)
        if reply.code == 227:
            ip, port = parse_pasv_reply(reply.text)
        elif reply.code == 229:
            ip, port = backend.peer_ip, parse_epsv_reply(reply.text)
        else:
            raise _PassiveRefused(f"{reply.code} {reply.text}")
        return check_backend_passive(backend.peer_ip, ip, port)

    def _transfer_done(self, task: asyncio.Task[None]) -> None:
        if self._transfer_task is task:
            self._transfer_task = None
            self._aborting = False
        self._push(_TICK)

    def _abort_transfer(self) -> None:
        self._aborting = True
        if self._relay is not None:
            self._relay.close("aborted")
        if self._passive is not None:
            self._passive.close()

    async def _wait_transfer(self) -> None:
        task = self._transfer_task
        if task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await task
            self._transfer_task = None
            self._aborting = False

    async def _transfer(self, cmd: Command) -> None:
        """Run one transfer command (a task, so that ABOR can interrupt it); the client gets
        exactly one final reply, sent only once the data has been fully delivered."""
        kind = TRANSFER_KINDS[cmd.verb]
        started = time.monotonic()
        result, nbytes, extra = "failed", 0, dict[str, Any]()
        try:
            result, nbytes, extra = await self._do_transfer(cmd)
        except _SessionEnd:
            result = "aborted"
            self._closing_after_transfer()
        except asyncio.CancelledError:
            result = "aborted"
            raise
        finally:
            duration = time.monotonic() - started
            self.proxy.transfer_counters[(kind, result)].inc()
            self.proxy.transfer_seconds[kind].observe(duration)
            self.transfers += 1
            self.proxy.logger.info("ftp transfer", extra={
                **self._fields(), "command": cmd.verb, "path": cmd.argument[:256], "bytes": nbytes,
                "duration": round(duration, 3), "result": result, **extra})

    def _closing_after_transfer(self) -> None:
        # The transfer found the backend gone: the session cannot go on.
        self._closing = True
        self._push(None)

    async def _do_transfer(self, cmd: Command) -> tuple[str, int, dict[str, Any]]:
        config, backend = self.proxy.config, self._backend()
        kind = TRANSFER_KINDS[cmd.verb]
        passive, active = self._passive, self._active
        self._passive, self._active = None, None
        if passive is None and active is None:
            self.reply(425, "Use PORT, PASV, EPRT or EPSV first.")
            return "failed", 0, {}
        client_sock: socket.socket | None = None
        backend_sock: socket.socket | None = None
        client_side: tuple[asyncio.Transport, HoldProtocol] | None = None
        backend_side: tuple[asyncio.Transport, HoldProtocol] | None = None
        pasv_task, self._backend_pasv = self._backend_pasv, None
        try:
            # 1. The backend, always passive (asked at PASV/PORT time); its answer must point
            #    at itself.
            try:
                ip, port = await (pasv_task if pasv_task is not None
                                  else self._ask_backend_passive())
            except (BackendGone, TimeoutError):
                self.reply(426, "Backend connection lost; transfer aborted.")
                raise _SessionEnd from None
            except _PassiveRefused:
                self.reply(425, "Cannot open data connection on the server side.")
                return "failed", 0, {}
            except (FtpSyntaxError, PassiveAddressRefused) as exc:
                metrics.REFUSED.labels(reason="backend_pasv").inc()
                self._log_warning("backend passive reply refused", error=str(exc))
                self.reply(425, "Cannot open data connection on the server side.")
                return "failed", 0, {}
            # 2. The client's data connection (already there for passive clients).
            try:
                if passive is not None:
                    client_sock = await passive.accept(config.data_connect_timeout)
                else:
                    assert active is not None
                    client_sock = await connect_socket(*active, config.data_connect_timeout)
            except (OSError, TimeoutError) as exc:
                self.reply(425, "Cannot open data connection.")
                return "failed", 0, {"error": f"client data connection: {exc or 'timeout'}"}
            # 3. The backend's data connection (TLS, resuming the control session, if FTPS).
            host = self.route.host if self.route is not None else None
            backend_tls = host is not None and host.backend_tls
            # Neither side TLS: splice(2) moves the bytes without them entering Python.
            splice = not backend_tls and self.state.prot == "C" and SplicePump.available()
            control_ssl = backend.ssl_object
            try:
                if splice:
                    backend_sock = await connect_socket(ip, port, config.backend_connect_timeout)
                else:
                    assert host is not None
                    with resuming(control_ssl.session if control_ssl is not None else None):
                        backend_side = await connect_hold(
                            ip, port, config.backend_connect_timeout,
                            ssl=self.proxy.backend_tls_context if backend_tls else None,
                            server_hostname=host.address if backend_tls else None)
            except (OSError, TimeoutError) as exc:
                self.reply(425, "Cannot open data connection on the server side.")
                return "failed", 0, {"error": f"backend data connection: {exc or 'timeout'}"}
            # 4. The command itself.
            try:
                backend.send(cmd.verb, cmd.argument)
                reply = await backend.reply(self._reply_wait)
            except (BackendGone, TimeoutError):
                self.reply(426, "Backend connection lost; transfer aborted.")
                raise _SessionEnd from None
            self._forward_reply(reply)
            if reply.code >= 200:
                return "failed", 0, {}
            # 5. Move the data; the final reply comes once it is delivered.
            extra: dict[str, Any] = {}
            if splice:
                assert backend_sock is not None
                sock, client_sock, bsock, backend_sock = client_sock, None, backend_sock, None
                source, sink = (bsock, sock) if kind != "upload" else (sock, bsock)
                pump = SplicePump(source, sink, idle_timeout=config.transfer_timeout)
                self._relay = pump
                moved, reason = await pump.wait()
                self._relay = None
                up, down = (moved, 0) if kind == "upload" else (0, moved)
                if pump.error:
                    extra["error"] = pump.error
            else:
                assert backend_side is not None
                # TLS towards the client starts after the 1xx: clients begin it only then.
                sock, client_sock = client_sock, None
                client_side = await self._client_data_transport(sock)
                if client_side is None:
                    return await self._finish_failed(backend_side, "TLS on the data connection failed")
                extra.update({f"client_{k}": v for k, v in tls_info(client_side[0]).items()})
                extra.update({f"backend_{k}": v for k, v in tls_info(backend_side[0]).items()})
                relay_or_counts = await start_relay(client_side, backend_side,
                                                    idle_timeout=config.transfer_timeout)
                client_side = backend_side = None  # the relay owns them now
                if isinstance(relay_or_counts, Relay):
                    self._relay = relay_or_counts
                    outcome = await relay_or_counts.wait()
                    self._relay = None
                    up, down, reason = outcome.bytes_a_to_b, outcome.bytes_b_to_a, outcome.reason
                    if outcome.error:
                        extra["error"] = outcome.error
                else:
                    (up, down), reason = relay_or_counts, "eof"
            self.bytes_up += up
            self.bytes_down += down
            self.proxy.bytes_up.inc(up)
            self.proxy.bytes_down.inc(down)
            nbytes = up if kind == "upload" else down
            extra["relay"] = reason
            try:
                final = await backend.final_reply(config.transfer_timeout)
            except (BackendGone, TimeoutError):
                self.reply(426, "Backend connection lost; transfer aborted.")
                raise _SessionEnd from None
            if self._aborting or reason != "eof":
                # ABOR, the transfer timeout or a broken data connection: whatever the
                # backend concluded, the client did not get (or send) the whole file.
                text = "Transfer timed out" if reason == "idle" else "Data connection closed"
                self.reply(426, f"{text}; transfer aborted.")
                return "aborted", nbytes, extra
            self._forward_reply(final)
            return ("ok" if 200 <= final.code < 300 else "failed"), nbytes, extra
        finally:
            for side in (client_side, backend_side):
                if side is not None:
                    side[0].abort()
            for raw_sock in (client_sock, backend_sock):
                if raw_sock is not None:
                    raw_sock.close()
            if passive is not None:
                passive.close()

    async def _client_data_transport(self, sock: socket.socket,
                                     ) -> tuple[asyncio.Transport, HoldProtocol] | None:
        """The client's data socket as a transport: TLS (server side, same context as the
        control connection, so its session resumes) when PROT P is in force."""
        context = self.proxy.tls_context if self.state.prot == "P" else None
        try:
            return await wrap_socket(sock, tls=context,
                                     handshake_timeout=self.proxy.config.data_connect_timeout)
        except (OSError, TimeoutError, ConnectionError) as exc:
            self._log_warning("TLS on client data connection failed", error=str(exc))
            sock.close()
            return None

    async def _finish_failed(self, backend_side: tuple[asyncio.Transport, HoldProtocol],
                             why: str) -> tuple[str, int, dict[str, Any]]:
        backend_side[0].abort()
        with contextlib.suppress(BackendGone, TimeoutError):
            await self._backend().final_reply(self._reply_wait)
        self.reply(426, f"{why}; transfer aborted.")
        return "aborted", 0, {"error": why}

    # -- ending --------------------------------------------------------------------------------

    def snapshot(self) -> SessionSnapshot:
        """Returns who this session is and the bytes of its finished transfers."""
        route = self.route
        return SessionSnapshot(
            user=self.username, tenant=route.tenant.name if route else "",
            host=route.host.name if route else "",
            client=f"{self.client_ip}:{self.client_port}", since=self.started,
            bytes_up=self.bytes_up, bytes_down=self.bytes_down)

    def apply(self, action: sessionpolicy.Action) -> None:
        """Apply a session-policy verdict (directory change, operator kill): ``421``."""
        if action.kind is sessionpolicy.Kind.CLOSE:
            self.terminate(action.message, action.reason)
        elif action.kind is sessionpolicy.Kind.DRAIN:
            self.schedule_terminate(action.deadline - time.time(), action.message, action.reason)
        else:
            self.cancel_scheduled_terminate()

    def terminate(self, text: str | None, result: str) -> None:
        """End the session now (drain deadline, maintenance, shutdown): ``421 text`` to the
        client (``None``: the reply was already sent), running transfer aborted."""
        if self._closing:
            return
        self._closing = True
        self.result = result
        if text is not None:
            self.reply(421, text)
        if self.transport is not None:
            self.transport.close()  # after the 421 is flushed; later replies are dropped
        if self._relay is not None:
            self._relay.close("terminated")
        if self._transfer_task is not None:
            self._transfer_task.cancel()
        if self.backend is not None:
            self.backend.abort()  # wakes a command waiting for the backend
        self._push(None)

    def schedule_terminate(self, delay: float, text: str, result: str) -> None:
        """:meth:`terminate` after ``delay`` seconds (the first schedule wins)."""
        if self._drain_handle is not None or self._closing:
            return
        loop = asyncio.get_running_loop()
        self._drain_handle = loop.call_later(max(0.0, delay), self.terminate, text, result)

    def cancel_scheduled_terminate(self) -> None:
        """Forget a :meth:`schedule_terminate` (the change behind it was undone)."""
        if self._drain_handle is not None:
            self._drain_handle.cancel()
            self._drain_handle = None

    async def _cleanup(self) -> None:
        self._closing = True
        self._wake.close()
        if self._drain_handle is not None:
            self._drain_handle.cancel()
        if self._transfer_task is not None:
            self._transfer_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._transfer_task
        self._clear_data_mode()
        self._cancel_prefetch()
        self._drop_backend_passive()
        if self.backend is not None:
            self.backend.close()
        if self.transport is not None:
            self.transport.close()
        self._release("conn")
        self._release("unauth")
        self.proxy.forget(self)
        self.proxy.logger.info("ftp session", extra={
            **self._fields(), "duration": round(time.time() - self.started, 3),
            "bytes_up": self.bytes_up, "bytes_down": self.bytes_down,
            "transfers": self.transfers, "result": self.result})

    def _release(self, slot: str) -> None:
        if slot in self._slots:
            self._slots.remove(slot)
            if slot == "conn":
                self.proxy.connection_cap.release(self.client_ip)
            else:
                self.proxy.limits.unauthenticated.release(self.client_ip)

    def close_now(self) -> None:
        """Abort the control connection (used when the proxy shuts down for good)."""
        if self.transport is not None:
            self.transport.abort()

    @property
    def task(self) -> asyncio.Task[None] | None:
        return self._task

    # -- logging -------------------------------------------------------------------------------

    def _fields(self) -> dict[str, Any]:
        route = self.route
        return {"proxy": "ftp", "client": self.client_ip, "user": self.username or None,
                "tenant": route.tenant.name if route else None,
                "host": route.host.name if route else None}

    def _log_warning(self, message: str, **fields: Any) -> None:
        self.proxy.logger.warning(f"ftp: {message}", extra={**self._fields(), **fields})
