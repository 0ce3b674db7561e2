"""The SSH proxy: listener, routing at ``begin_auth``, authentication, protection, drain.

Per client connection (:class:`ClientConnection`, asyncssh's ``SSHServer`` for it):

1. accept; a PROXY header is read first from trusted load balancers only; at most
   ``[limits] max_unauthenticated_per_ip`` connections per IP may be logging in at once;
2. ``begin_auth(username)``: cached ``route_for_account``. Host in maintenance/down: an auth
   banner saying so, then disconnect. Directory down and the name not cached: disconnect with
   "temporarily unavailable". Unknown user, suspended tenant, account without ``ssh``: nothing
   is said; every later attempt fails exactly like a wrong password, after the same delay;
3. authentication: password passed through (the backend decides); public key checked against
   the account's ``authorized_keys`` (or a user CA), then the proxy logs in upstream with its
   own key as ``account.backend_username``; keyboard-interactive relayed round by round;
4. after login, a :class:`sshproxy.bridge.SessionLink` carries the channels;
5. directory changes (change feed) are applied to open sessions by :mod:`edge.sessionpolicy`:
   a moved tenant's sessions drain, a suspended tenant's and a down host's are closed, a host in
   maintenance keeps them for ``[serve] maintenance_drain``; the disconnect says why.

One JSON log line per connection when it ends (user, client, host, method, outcome, channels,
bytes, duration, exit status, reason).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncssh

from edge import metrics as edge_metrics
from edge import sessionpolicy
from edge.directory.directory import AccountRoute
from edge.directory.model import Change
from edge.errors import DirectoryUnavailable
from edge.limits import ConnectionCap, DelayMimic, LoginLimits, LoginLimitSettings
from edge.proxyproto import ProxyHeaderParser, ProxyHeaderPolicy, ProxyProtocolError
from edge.registry import ProxyContext
from edge.sessions import SessionSnapshot
from sshproxy import metrics
from sshproxy.auth import AuthorizedKeysCache, key_allowed, load_user_ca_keys
from sshproxy.bridge import BridgeSettings, SessionLink
from sshproxy.hostkeys import load_host_keys, load_upstream_key
from sshproxy.patches import report_patches
from sshproxy.tuning import host_key_pairs, release_connection, tune_connection
from sshproxy.upstream import (
    Challenge,
    Credential,
    KbdIntRelay,
    LoginTimeouts,
    UpstreamAuthFailed,
    UpstreamError,
    connect_upstream,
)

PROXY = "ssh"
SERVER_VERSION = "edge"
"""Software version in our SSH identification string (``SSH-2.0-edge``)."""
UNAVAILABLE_TEXT = "service temporarily unavailable, please try again shortly"
SHUTDOWN_TEXT = "the proxy is restarting; please reconnect"
PROXY_HEADER_MAX = 536  # a v2 header with generous TLVs; v1 is at most 107 bytes
_FAKE_CHALLENGE: Challenge = ("", "", "", [("Password: ", False)])
_Login = asyncio.Task[asyncssh.SSHClientConnection]


@dataclass(slots=True)
class _Admission:
    """One accepted socket before asyncssh takes it: the real client and its login slot."""

    client: tuple[str, int]
    release: Callable[[], None]


class SshProxy:
    """The registry's ``ssh`` proxy: one per worker process."""

    def __init__(self, context: ProxyContext) -> None:
        self.context = context
        self.config = config = context.config.ssh
        self.log = context.logger
        self.host_keys = host_key_pairs(load_host_keys(config))
        load_upstream_key(config)  # fail at start-up, not at the first public-key login
        self.user_ca_keys = load_user_ca_keys(config.user_ca_keys)
        self.limits = LoginLimits(LoginLimitSettings.from_config(context.config.limits),
                                  failure_delay=config.auth_failure_delay)
        self.user_sessions = ConnectionCap(max(1, config.max_sessions_per_user))
        # How long backends take to show their first keyboard-interactive prompt, so the fake
        # prompt for an unknown user comes as late (else the prompt's speed names accounts).
        self.kbdint_prompt = DelayMimic()
        self.bridge_settings = BridgeSettings.from_config(config)
        self.authorized_keys = AuthorizedKeysCache()
        self.proxy_policy = (ProxyHeaderPolicy("optional", config.trusted_proxies)
                             if config.trusted_proxies else ProxyHeaderPolicy())
        self.connections: set[ClientConnection] = set()
        self._admissions: dict[tuple[str, int], _Admission] = {}
        self._options: asyncssh.SSHServerConnectionOptions | None = None
        self._accept_tasks: list[asyncio.Task[None]] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._listeners: list[socket.socket] = []
        self._idle = asyncio.Event()
        self._idle.set()
        context.feed.subscribe(self._on_change)

    # -- Proxy interface -------------------------------------------------------------------

    async def start(self, sockets: list[socket.socket]) -> None:
        limits = self.context.config.limits
        self._options = await asyncssh.SSHServerConnectionOptions.construct(
            **self.bridge_settings.server_options(),
            server_host_keys=self.host_keys, server_factory=self._new_connection,
            server_version=SERVER_VERSION, login_timeout=limits.login_grace_time, allow_scp=False,
            # We answer per key in validate_public_key; never read a file as the proxy's user.
            authorized_client_keys=None)
        report_patches(self.log)
        for sock in sockets:
            sock.setblocking(False)
            self._listeners.append(sock)
            self._accept_tasks.append(asyncio.create_task(self._accept(sock), name="ssh-accept"))

    async def drain(self) -> None:
        for task in self._accept_tasks:
            task.cancel()
        self._accept_tasks.clear()

    async def wait_closed(self, timeout: float) -> None:  # noqa: ASYNC109 - the interface
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout)

    async def close(self) -> None:
        await self.drain()
        for connection in list(self.connections):
            connection.close(SHUTDOWN_TEXT)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), 5.0)

    def active_sessions(self) -> int:
        return sum(1 for c in self.connections if c.authenticated)

    # -- accepting -------------------------------------------------------------------------

    async def _accept(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, peer = await loop.sock_accept(listener)
            except OSError as exc:  # EMFILE and friends: back off instead of spinning
                self.log.warning("ssh accept failed: %s", exc)
                await asyncio.sleep(0.1)
                continue
            self._spawn(self._serve(sock, (str(peer[0]), int(peer[1]))))

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, sock: socket.socket, peer: tuple[str, int]) -> None:
        edge_metrics.CONNECTIONS.labels(proxy=PROXY).inc()
        client = peer
        expectation = self.proxy_policy.expectation(peer[0])
        if expectation != "none":
            try:
                client = await asyncio.wait_for(
                    _read_proxy_header(sock, expectation == "required", peer),
                    self.context.config.limits.login_grace_time)
            except (ProxyProtocolError, TimeoutError, OSError) as exc:
                self.log.info("ssh: bad PROXY header from %s: %s", peer[0], exc,
                              extra={"client": peer[0]})
                sock.close()
                return
        cap = self.limits.unauthenticated
        if not cap.try_acquire(client[0]):
            self.log.info("ssh: refused %s: too many connections logging in at once", client[0],
                          extra={"client": client[0], "reason": "max_unauthenticated_per_ip"})
            sock.close()
            return
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                cap.release(client[0])

        self._admissions[peer] = _Admission(client, release)
        try:
            conn = await asyncssh.run_server(sock, options=self._options)
        except (asyncssh.Error, OSError, TimeoutError) as exc:
            # The ClientConnection logged why (login failed, timed out, client left). asyncssh
            # keeps this exception in the dead connection's waiter, and its traceback holds
            # asyncssh's frame holding the connection: a cycle (see release_connection).
            exc.__traceback__ = None
            return
        finally:
            self._admissions.pop(peer, None)
            # Idempotent: after a login the slot is already free; after a failure before
            # asyncssh made a connection object nobody else would free it.
            release()
        with contextlib.suppress(Exception):
            await conn.wait_closed()

    def _new_connection(self) -> ClientConnection:
        return ClientConnection(self)

    def _admission(self, peer: tuple[str, int]) -> _Admission:
        admission = self._admissions.pop(peer, None)
        return admission or _Admission(peer, lambda: None)

    # -- bookkeeping -----------------------------------------------------------------------

    def _opened(self, connection: ClientConnection) -> None:
        self.connections.add(connection)
        self._idle.clear()

    def _closed(self, connection: ClientConnection) -> None:
        self.connections.discard(connection)
        if not self.connections:
            self._idle.set()

    # -- drain on tenant moves -------------------------------------------------------------

    def _on_change(self, change: Change) -> None:
        """Change-feed subscriber: returns at once; the session policy is applied in a task."""
        if change.entity not in ("tenant", "host", "all"):
            return
        affected = [c for c in self.connections if c.authenticated and c.route is not None
                    and (change.entity == "all"
                         or (change.entity == "tenant" and c.route.tenant.name == change.name)
                         or (change.entity == "host" and c.route.host.name == change.name))]
        if affected:
            self._spawn(self._recheck(affected))

    async def _recheck(self, connections: list[ClientConnection]) -> None:
        directory = self.context.directory
        for connection in connections:
            route = connection.route
            assert route is not None
            try:
                tenant = await directory.tenant(route.tenant.name)
                host = await directory.host(route.host.name)
            except DirectoryUnavailable:
                continue  # keep serving; the next change re-checks
            action = sessionpolicy.decide(
                route.host.name, tenant, host, now=time.time(),
                maintenance_drain=self.context.config.serve.maintenance_drain)
            connection.apply(action)


class ClientConnection(asyncssh.SSHServer):
    """asyncssh's ``SSHServer`` for one client: routing, authentication, then the bridge."""

    def __init__(self, proxy: SshProxy) -> None:
        self.proxy = proxy
        self.conn: asyncssh.SSHServerConnection | None = None
        self.client: tuple[str, int] = ("", 0)
        self.admission_release: Callable[[], None] = lambda: None
        self.started = time.monotonic()
        self.since = time.time()
        self.session_id = ""
        """Id in the worker's live-session table (``edge sessions``), once logged in."""
        self.username = ""
        self.route: AccountRoute | None = None
        self.banned = ""
        self.authenticated = False
        self.method = "none"
        self.outcome = "closed before login"
        self.reason = ""
        self.upstream: asyncssh.SSHClientConnection | None = None
        self.link: SessionLink | None = None
        self.bytes_up = 0
        self.bytes_down = 0
        self._holds_user_slot = False
        self._key_failures = 0
        self._kbdint: tuple[KbdIntRelay, _Login] | None = None
        self._early: tuple[asyncio.Future[Credential], _Login] | None = None
        self._fake_kbdint = False
        self._drain_handle: asyncio.TimerHandle | None = None
        self._idle_handle: asyncio.TimerHandle | None = None
        self._last_activity = self.started
        self._closing = False

    # -- asyncssh callbacks ----------------------------------------------------------------

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self.conn = conn
        peer = conn.get_extra_info("peername")
        admission = self.proxy._admission((str(peer[0]), int(peer[1])))
        self.client = admission.client
        self.admission_release = admission.release
        tune_connection(conn)
        # The upstream login after a public-key login must wait until asyncssh has verified the
        # client's signature; SSHServer.validate_public_key is also asked for unsigned key
        # queries, so we wrap the connection's check, which sees the signature.
        check = conn.validate_public_key

        async def validate_public_key(username: str, key_data: bytes, msg: bytes,
                                      signature: bytes) -> bool:
            if not await check(username, key_data, msg, signature):
                self._key_failures += 1
                return False
            return await self._login_with_key() if msg else True

        conn.validate_public_key = validate_public_key  # type: ignore[method-assign]
        self.proxy._opened(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True  # the upstream closing below must not try to disconnect us again
        for handle in (self._drain_handle, self._idle_handle):
            if handle is not None:
                handle.cancel()
        if self._kbdint is not None:
            self._kbdint[1].cancel()
        self._cancel_early_upstream()
        if self.link is not None:
            self.link.close(self.reason or "client disconnected")
        elif self.upstream is not None:
            self.upstream.close()
        if not self.authenticated:
            if exc is not None and not self.reason:
                self.reason = str(exc) or type(exc).__name__
            if self._key_failures and self.outcome == "closed before login" and self.username:
                # Only wrong keys were offered: one failed login, not one per key.
                self._fail_count("publickey")
        else:
            metrics.SESSIONS.dec()
            self.proxy.context.sessions.remove(self.session_id)
        if self._holds_user_slot:
            self.proxy.user_sessions.release(self.route.account.username if self.route else "")
        self.admission_release()
        self._log_close(exc)
        self.proxy._closed(self)
        if self.conn is not None:
            release_connection(self.conn)
            self.conn = None
        self.link = self.upstream = None  # the link's byte counter is our bound method: a cycle

    async def begin_auth(self, username: str) -> bool:
        self.username = username
        self.route = None
        self.banned = ""
        self._cancel_early_upstream()
        verdict = self.proxy.limits.check_login(self.client[0], username)
        if not verdict.allowed:
            self.banned = verdict.reason
            return True
        try:
            route = await self.proxy.context.directory.route_for_account(username)
        except DirectoryUnavailable as exc:
            self._refuse("unavailable", f"directory unavailable: {exc}", UNAVAILABLE_TEXT,
                         asyncssh.DISC_SERVICE_NOT_AVAILABLE)
            return True
        if (route is None or "ssh" not in route.account.protocols
                or route.tenant.state != "active"):
            return True  # fails later exactly like a wrong password
        if sessionpolicy.host_state(route.host) != "active":  # a passed --until counts as active
            text = sessionpolicy.host_notice(route.host)
            assert self.conn is not None
            with contextlib.suppress(OSError):
                self.conn.send_auth_banner(text.rstrip("\n") + "\n")
            self.route = route
            # The reason repeats the text: clients run with LogLevel=ERROR hide banners.
            self._refuse("maintenance", f"host {route.host.name} is {route.host.state}",
                         text.strip().splitlines()[0], asyncssh.DISC_BY_APPLICATION)
            return True
        self.route = route
        self._start_early_upstream()
        return True

    def auth_completed(self) -> None:
        assert self.conn is not None and self.upstream is not None
        self.authenticated = True
        self.outcome = "logged in"
        self.admission_release()
        self.proxy.limits.login_succeeded(self.client[0], self.username)
        metrics.LOGINS.labels(method=self.method, outcome="success").inc()
        metrics.SESSIONS.inc()
        self.session_id = self.proxy.context.sessions.add("ssh", self)
        # "ip port", like OpenSSH's SSH_CLIENT, so backends can log the real source.
        self.link = SessionLink(self.upstream, client_address=f"{self.client[0]} {self.client[1]}",
                                settings=self.proxy.bridge_settings, on_bytes=self._count,
                                downstream=self.conn)
        if self.proxy.config.idle_timeout > 0:
            self._last_activity = time.monotonic()
            self._schedule_idle_check(self.proxy.config.idle_timeout)

    def session_requested(self) -> asyncssh.SSHServerSession[bytes]:
        assert self.link is not None
        return self.link.session_requested()

    def connection_requested(self, dest_host: str, dest_port: int, orig_host: str,
                             orig_port: int) -> Any:
        assert self.link is not None
        return self.link.connection_requested(dest_host, dest_port, orig_host, orig_port)

    def server_requested(self, listen_host: str, listen_port: int) -> Any:
        assert self.link is not None
        return self.link.server_requested(listen_host, listen_port)

    # -- public key ------------------------------------------------------------------------

    def public_key_auth_supported(self) -> bool:
        return True

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        """Whether ``key`` is in the account's authorized_keys (asked before and after the
        client signs; the upstream login happens after, in the connection-level check)."""
        if not self._may_try():
            return False
        assert self.route is not None
        keys = self.proxy.authorized_keys.get(self.route.account.authorized_keys)
        return key_allowed(keys, key, self.client[0])

    def validate_ca_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        """Whether ``key`` may sign user certificates: a configured user CA or a
        ``cert-authority`` line of the account (asyncssh then checks the principal)."""
        if not self._may_try():
            return False
        assert self.route is not None
        if any(key == ca for ca in self.proxy.user_ca_keys):
            return True
        keys = self.proxy.authorized_keys.get(self.route.account.authorized_keys)
        return key_allowed(keys, key, self.client[0], ca=True)

    async def _login_with_key(self) -> bool:
        """The client proved its key: log in upstream with the proxy's own key."""
        route = self.route
        assert route is not None
        try:
            key = load_upstream_key(self.proxy.config, route.host.name)
        except Exception as exc:
            self._refuse("upstream_error", str(exc), "proxy misconfigured, contact support",
                         asyncssh.DISC_SERVICE_NOT_AVAILABLE, method="publickey")
            return False
        try:
            self.upstream = await self._connect(Credential(client_key=key))
        except UpstreamError as exc:
            # Also UpstreamAuthFailed: the backend refusing the proxy's key is an operator
            # problem, never the user's; say so instead of "Permission denied".
            self._refuse("upstream_error", str(exc), exc.public if not isinstance(
                exc, UpstreamAuthFailed) else "the server refused the proxy's login; contact support",
                asyncssh.DISC_SERVICE_NOT_AVAILABLE, method="publickey")
            return False
        return self._admit("publickey")

    # -- password --------------------------------------------------------------------------

    def password_auth_supported(self) -> bool:
        return True

    async def validate_password(self, username: str, password: str) -> bool:
        started = await self._password_attempt()
        if not self._may_try():
            return await self._failed("password", started)
        try:
            self.upstream = await self._connect(Credential(password=password))
        except UpstreamAuthFailed:
            return await self._failed("password", started, refused=True)
        except UpstreamError as exc:
            self._refuse("upstream_error", str(exc), exc.public, asyncssh.DISC_SERVICE_NOT_AVAILABLE,
                         method="password")
            return False
        return self._admit("password")

    # -- keyboard-interactive --------------------------------------------------------------

    def kbdint_auth_supported(self) -> bool:
        return True

    async def get_kbdint_challenge(self, username: str, lang: str,
                                   submethods: str) -> Challenge | bool:
        started = await self._password_attempt()
        if self._kbdint is not None:
            self._kbdint[1].cancel()
            self._kbdint = None
        if not self._may_try():
            # Ask like a real backend would, then fail: the same dialogue as a wrong password.
            self._fake_kbdint = True
            await asyncio.sleep(self.proxy.kbdint_prompt.draw())
            return _FAKE_CHALLENGE
        self._fake_kbdint = False
        relay = KbdIntRelay()
        task = asyncio.ensure_future(self._connect(Credential(relay=relay)))
        self._kbdint = (relay, task)
        answer = await self._kbdint_step(started)
        if not isinstance(answer, bool):
            self.proxy.kbdint_prompt.record(time.monotonic() - started)
        return answer

    async def validate_kbdint_response(self, username: str,  # type: ignore[override]
                                       responses: list[str]) -> Challenge | bool:
        started = time.monotonic()
        if self._fake_kbdint or self._kbdint is None:
            self._fake_kbdint = False
            return await self._failed("keyboard-interactive", started)
        self._kbdint[0].answer(list(responses))
        return await self._kbdint_step(started)

    async def _kbdint_step(self, started: float) -> Challenge | bool:
        assert self._kbdint is not None
        relay, task = self._kbdint
        challenge = await relay.next_challenge(task)
        if challenge is not None:
            return challenge
        self._kbdint = None
        try:
            self.upstream = task.result()
        except UpstreamAuthFailed:
            return await self._failed("keyboard-interactive", started, refused=True)
        except UpstreamError as exc:
            self._refuse("upstream_error", str(exc), exc.public,
                         asyncssh.DISC_SERVICE_NOT_AVAILABLE, method="keyboard-interactive")
            return False
        return self._admit("keyboard-interactive")

    # -- shared steps ----------------------------------------------------------------------

    async def _password_attempt(self) -> float:
        """Start a guessable attempt (password, keyboard-interactive): wait out the user's
        slowdown, take up a ban placed since ``begin_auth``; returns the attempt's start for
        the failure deadline."""
        limits = self.proxy.limits
        delay = limits.user_delay(self.username or None)
        if delay > 0:
            await asyncio.sleep(delay)
        verdict = limits.check_login(self.client[0], self.username or None)
        if not verdict.allowed and not self.banned:
            self.banned = verdict.reason
        return time.monotonic()

    def _may_try(self) -> bool:
        """A login may go on: known routable account, not banned, connection not refused."""
        return self.route is not None and not self.banned and not self._closing

    def _start_early_upstream(self) -> None:
        """Open the upstream connection (TCP, key exchange) while the client authenticates.

        Its login waits for the first credential the client gives; that saves the backend's
        handshake time on every login. It costs no more than a wrong password already does (one
        upstream login attempt), and only accounts that exist and are routable get one. A backend
        that fails here is reported when the client gives its credential (``_connect``).
        """
        self._cancel_early_upstream()
        route = self.route
        assert route is not None
        credential: asyncio.Future[Credential] = asyncio.get_running_loop().create_future()
        task = asyncio.ensure_future(connect_upstream(
            route.host, route.account.backend_username_for("ssh"), credential, client=self.client,
            timeouts=self._login_timeouts(), on_lost=self._upstream_lost))
        task.add_done_callback(_retrieve)
        self._early = (credential, task)

    def _login_timeouts(self) -> LoginTimeouts:
        config = self.proxy.config
        return LoginTimeouts(handshake=config.upstream_connect_timeout,
                             auth=config.upstream_connect_timeout,
                             relay=max(config.upstream_connect_timeout,
                                       self.proxy.context.config.limits.login_grace_time))

    def _cancel_early_upstream(self) -> None:
        if self._early is None:
            return
        _, task = self._early
        self._early = None
        if not task.done():
            task.cancel()
        elif not task.cancelled() and task.exception() is None:
            task.result().close()  # logged in but never used (e.g. the client left)

    async def _connect(self, credential: Credential) -> asyncssh.SSHClientConnection:
        """Log in upstream with ``credential``: on the early connection if it is still unused,
        else on a new one. Raises UpstreamAuthFailed / UpstreamError."""
        route = self.route
        assert route is not None
        started = time.monotonic()
        try:
            if self._early is not None:
                pending, task = self._early
                self._early = None  # one credential per upstream login
                if not pending.done():
                    pending.set_result(credential)
                    return await task
                task.cancel()
            return await connect_upstream(
                route.host, route.account.backend_username_for("ssh"), credential, client=self.client,
                timeouts=self._login_timeouts(), on_lost=self._upstream_lost)
        finally:
            metrics.UPSTREAM_CONNECT_SECONDS.observe(time.monotonic() - started)

    def _admit(self, method: str) -> bool:
        """Upstream login done: take a per-user session slot or refuse."""
        assert self.route is not None
        self.method = method
        if not self.proxy.user_sessions.try_acquire(self.route.account.username):
            if self.upstream is not None:
                self.upstream.close()
                self.upstream = None
            self._refuse("limit", "max_sessions_per_user reached",
                         "too many sessions for this account; close one and retry",
                         asyncssh.DISC_TOO_MANY_CONNECTIONS, method=method)
            return False
        self._holds_user_slot = True
        return True

    async def _failed(self, method: str, started: float, *, refused: bool = False) -> bool:
        """A failed attempt: count it, answer False at the common failure deadline.

        ``refused``: the backend said no (its time teaches the deadline); otherwise the proxy
        decided alone (unknown user, ban) and must look exactly like such a refusal.
        """
        self._fail_count(method)
        pace = self.proxy.limits.pace
        elapsed = time.monotonic() - started
        if refused:
            pace.record_refusal(elapsed)
        delay = pace.answer_after(elapsed) - elapsed
        if delay > 0:
            await asyncio.sleep(delay)
        return False

    def _fail_count(self, method: str) -> None:
        outcome = "banned" if self.banned else "failure"
        metrics.LOGINS.labels(method=method, outcome=outcome).inc()
        self.method = method
        self.outcome = "login failed"
        self.reason = self.banned or ("unknown user or not allowed" if self.route is None
                                      else "wrong credentials")
        # One line per failed attempt (the connection's line comes only at its end): operators
        # see each guess. Never the password.
        self.proxy.log.info("ssh login failed", extra={
            "event": "ssh_login_failed", "user": self.username, "auth_method": method,
            "client": f"{self.client[0]}:{self.client[1]}", "reason": self.reason})
        verdict = self.proxy.limits.login_failed(self.client[0], self.username or None)
        if not verdict.allowed and not self.banned:
            self.banned = verdict.reason
            self.proxy.log.warning("ssh: %s: banning for %.0f s", verdict.reason, verdict.retry_after,
                                   extra={"client": self.client[0], "user": self.username})

    def _refuse(self, outcome: str, reason: str, public: str, code: int, *,
                method: str = "none") -> None:
        """End the connection with ``public`` as the disconnect reason (logged as ``reason``)."""
        metrics.LOGINS.labels(method=method, outcome=outcome).inc()
        self.method = method if method != "none" else self.method
        self.outcome = outcome
        self.reason = reason
        self._closing = True
        if self.conn is not None:
            self.conn.disconnect(code, public)

    def _upstream_lost(self, exc: Exception | None) -> None:
        """The logged-in upstream connection dropped: end the client's connection with a reason."""
        if self._closing:
            return
        why = "the server closed the connection" if exc is None else f"connection to the server lost: {exc}"
        if self.link is not None:
            self.link.close(why)
        self.reason = self.reason or why
        self._closing = True
        if self.conn is not None:
            self.conn.disconnect(asyncssh.DISC_CONNECTION_LOST, why)

    def _count(self, up: int, down: int) -> None:
        self.bytes_up += up
        self.bytes_down += down
        self._last_activity = time.monotonic()

    # asyncssh has no idle timeout: one timer per connection, re-armed from the last activity
    # (bytes either way), so busy sessions cost nothing per packet.
    def _schedule_idle_check(self, delay: float) -> None:
        self._idle_handle = asyncio.get_running_loop().call_later(delay, self._idle_check)

    def _idle_check(self) -> None:
        timeout = self.proxy.config.idle_timeout
        idle = time.monotonic() - self._last_activity
        if idle >= timeout:
            self.close(f"idle for {timeout:.0f} s, closing the connection")
        else:
            self._schedule_idle_check(timeout - idle)

    # -- drain / shutdown ------------------------------------------------------------------

    def snapshot(self) -> SessionSnapshot:
        """Returns who this session is and what it moved so far (``edge sessions``)."""
        route = self.route
        return SessionSnapshot(
            user=self.username, tenant=route.tenant.name if route else "",
            host=route.host.name if route else "", client=f"{self.client[0]}:{self.client[1]}",
            since=self.since, bytes_up=self.bytes_up, bytes_down=self.bytes_down)

    def apply(self, action: sessionpolicy.Action) -> None:
        """Apply the session policy's verdict (a directory change, an operator's kill)."""
        if action.kind is sessionpolicy.Kind.KEEP:
            if self._drain_handle is not None:  # e.g. the host's maintenance ended
                self._drain_handle.cancel()
                self._drain_handle = None
        elif action.kind is sessionpolicy.Kind.CLOSE:
            self.close(action.message)
        else:
            self.drain_at(action.deadline, action.message)

    def drain_at(self, deadline: float, message: str) -> None:
        """Close this session at ``deadline`` (Unix time) with ``message`` (the first wins)."""
        if self._drain_handle is not None or self._closing:
            return
        delay = max(0.0, deadline - time.time())
        loop = asyncio.get_running_loop()
        self._drain_handle = loop.call_later(delay, self._drained, message)

    def _drained(self, message: str) -> None:
        metrics.DRAINED.inc()
        self.close(message)

    def close(self, reason: str) -> None:
        """Tell the client ``reason`` (on open sessions' stderr and as disconnect reason), close."""
        if self._closing:
            return
        self._closing = True
        self.reason = reason
        if self.link is not None:
            self.link.close(reason)
        if self.conn is not None:
            self.conn.disconnect(asyncssh.DISC_BY_APPLICATION, reason)

    def _log_close(self, exc: Exception | None) -> None:
        route = self.route
        stats = self.link.stats if self.link is not None else None
        if self.bytes_up:
            edge_metrics.BYTES.labels(proxy=PROXY, direction="upstream").inc(self.bytes_up)
        if self.bytes_down:
            edge_metrics.BYTES.labels(proxy=PROXY, direction="downstream").inc(self.bytes_down)
        self.proxy.log.info(
            "ssh connection closed", extra={
                "event": "ssh_connection", "user": self.username,
                "client": f"{self.client[0]}:{self.client[1]}",
                "host": route.host.name if route is not None else "",
                "tenant": route.tenant.name if route is not None else "",
                "auth_method": self.method, "outcome": self.outcome,
                "channels": stats.channels_opened if stats else 0,
                "bytes_up": self.bytes_up, "bytes_down": self.bytes_down,
                "duration": round(time.monotonic() - self.started, 3),
                "exit_status": stats.exit_status if stats else None,
                "exit_signal": stats.exit_signal if stats else None,
                "agent_forwarded": stats.agent_forwarded if stats else False,
                "reason": self.reason or ("client disconnected" if exc is None else str(exc))})


def _retrieve(task: asyncio.Task[Any]) -> None:
    """Done-callback: an early upstream login nobody awaited must not log "never retrieved"."""
    if not task.cancelled():
        task.exception()


async def _read_proxy_header(sock: socket.socket, required: bool,
                             peer: tuple[str, int]) -> tuple[str, int]:
    """Consume exactly the PROXY header from ``sock`` (peeking, so SSH bytes stay queued).

    Returns the client address it names (the peer itself for ``LOCAL``/``UNKNOWN`` or when a
    trusted peer sent no header). Raises ProxyProtocolError on a malformed header.
    """
    loop = asyncio.get_running_loop()
    while True:
        await _wait_readable(loop, sock)
        data = sock.recv(PROXY_HEADER_MAX, socket.MSG_PEEK)
        if not data:
            raise ProxyProtocolError("connection closed before the PROXY header")
        # A fresh parser each time: it is fed the whole peeked prefix.
        result = ProxyHeaderParser(required=required).feed(data)
        if result is not None:
            consumed = len(data) - len(result.remaining)
            if consumed:
                sock.recv(consumed)
            header = result.header
            if header is not None and header.source is not None:
                return (str(header.source[0]), int(header.source[1]))
            return peer
        if len(data) >= PROXY_HEADER_MAX:
            raise ProxyProtocolError("PROXY header too long")
        await asyncio.sleep(0.01)  # more of the header is on its way (peek cannot wait for it)


async def _wait_readable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    ready = loop.create_future()

    def readable() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(sock.fileno(), readable)
    try:
        await ready
    finally:
        loop.remove_reader(sock.fileno())


__all__ = ["ClientConnection", "SshProxy"]
