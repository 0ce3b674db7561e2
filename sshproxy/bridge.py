"""The SSH session bridge: one authenticated client connection's channels to one upstream connection.

asyncssh's built-in session forwarding loses the exit status and refuses sftp, so the bridge pairs
its own :class:`asyncssh.SSHServerSession` (facing the client) with an
:class:`asyncssh.SSHClientSession` (facing the upstream) per channel, both with ``encoding=None``:

* the client's requests (pty-req with terminal type/size/modes, env, shell/exec/subsystem) are
  accepted locally, then replayed upstream in one ``create_session`` when the session starts;
  if the upstream refuses, the client gets the reason on stderr and exit status 255 (what
  OpenSSH's own client exits with when a request fails);
* data and stderr (extended data) are copied as-is both ways; window-change, signals, break and
  EOF are forwarded; exit status / exit signal come back;
* flow control is end to end: when one leg's write buffer passes its high-water mark asyncssh
  calls ``pause_writing`` and we stop reading the other leg's channel, which stops its window
  adjusts, which stops the sender (``tuning.bound_receive_window`` makes that hold across
  resumes). Memory per channel is bounded by one window plus the
  write-buffer high-water mark per direction;
* ``-A`` (agent forwarding), when allowed, lets the backend use the client's ssh-agent through
  :class:`sshproxy.agent.AgentRelay`;
* ``-L`` (direct-tcpip) is relayed as a channel upstream, so it reaches the *backend's* loopback,
  never a host on the proxy's network; ``-R`` (tcpip-forward) asks the upstream for the listener.
  Both are refused unless :class:`BridgeSettings` allows them.

The server engineer's ``SSHServer`` owns one :class:`SessionLink` per client connection and
returns :meth:`SessionLink.session_requested` / :meth:`SessionLink.connection_requested` /
:meth:`SessionLink.server_requested` from the methods of the same name. The listening side must
run with :data:`sshproxy.tuning.SERVER_OPTIONS` (raw bytes sessions, no line editor).
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import ipaddress
import logging
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import asyncssh
from asyncssh import ChannelOpenError
from asyncssh.constants import OPEN_ADMINISTRATIVELY_PROHIBITED, OPEN_CONNECT_FAILED

from sshproxy import fastpath, tuning
from sshproxy.agent import AGENT_RELAY_SUPPORTED, AgentRelay

log = logging.getLogger("edge.ssh.bridge")

OnBytes = Callable[[int, int], None]
"""``on_bytes(client_to_upstream, upstream_to_client)``: called per relayed chunk; returns nothing,
must be cheap and must not raise."""

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_LOOPBACK_NAMES = frozenset({"localhost", "localhost.", "ip6-localhost"})
_FAILED_STATUS = 255  # what OpenSSH's ssh exits with on a connection or request failure


@dataclass(frozen=True, slots=True)
class BridgeSettings:
    """What a bridged client may do beyond its session channels. Safe defaults: nothing."""

    allow_local_forwarding: bool = False
    """``ssh -L``: channels to the *backend's own* loopback (127.0.0.0/8, ::1, localhost) only."""
    allow_remote_forwarding: bool = False
    """``ssh -R``: a listener on the backend, its connections brought back to the client."""
    allow_agent_forwarding: bool = False
    """``ssh -A``: the backend may use the client's ssh-agent (signatures only, while connected)."""
    env_allow: tuple[str, ...] = ("LANG", "LC_*")
    """AcceptEnv-style patterns (``*`` and ``?``) of client variables passed upstream."""
    client_env_name: str = "EDGE_CLIENT_ADDR"
    """Variable carrying the client's address upstream ("" = don't send); the upstream sshd must
    list it in AcceptEnv to see it. A client-sent variable of the same name is always dropped."""

    def __post_init__(self) -> None:
        if self.allow_agent_forwarding and not AGENT_RELAY_SUPPORTED:
            raise ValueError(f"agent forwarding cannot be relayed with the installed asyncssh "
                             f"{asyncssh.__version__} (sshproxy/agent.py); leave allow_agent_forwarding off")
        if self.client_env_name and not _ENV_NAME.fullmatch(self.client_env_name):
            raise ValueError(f"client_env_name {self.client_env_name!r} is not an environment variable "
                             "name (letters, digits, _; not starting with a digit)")
        if any(not pattern for pattern in self.env_allow):
            raise ValueError("env_allow patterns must not be empty")

    @classmethod
    def from_config(cls, ssh_config: Any) -> BridgeSettings:
        """Read the ``[ssh]`` section (:class:`edge.config.SshConfig`); missing fields keep defaults."""
        values: dict[str, Any] = {}
        for name in ("allow_local_forwarding", "allow_remote_forwarding", "allow_agent_forwarding",
                     "env_allow", "client_env_name"):
            if hasattr(ssh_config, name):
                values[name] = getattr(ssh_config, name)
        if "env_allow" in values:
            values["env_allow"] = tuple(values["env_allow"])
        return cls(**values)

    def env_allowed(self, name: str) -> bool:
        """Whether the client variable ``name`` may be passed upstream."""
        if self.client_env_name and name == self.client_env_name:
            return False
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.env_allow)

    def server_options(self) -> dict[str, Any]:
        """asyncssh keyword arguments for the listening side: :data:`tuning.SERVER_OPTIONS` plus ours."""
        return {**tuning.SERVER_OPTIONS, "agent_forwarding": self.allow_agent_forwarding,
                "x11_forwarding": False}


@dataclass(slots=True)
class BridgeStats:
    """Counters for the connection's log line; updated as data flows."""

    channels_opened: int = 0
    bytes_up: int = 0
    """Client to upstream."""
    bytes_down: int = 0
    """Upstream to client."""
    exit_status: int | None = None
    """Exit status of the last session channel that reported one."""
    exit_signal: str | None = None
    """Exit signal of the last session channel that died of one."""
    agent_forwarded: bool = False
    """The client's ssh-agent was offered to the backend (``ssh -A`` with forwarding allowed)."""
    open_failures: list[str] = field(default_factory=list)


def is_backend_loopback(host: str) -> bool:
    """Whether ``host`` names the backend's own loopback (where ``-L`` may go)."""
    name = host.strip().lower()
    if name in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name.strip("[]")).is_loopback
    except ValueError:
        return False


class SessionLink:
    """Bridges one authenticated client connection's channels to one upstream asyncssh.SSHClientConnection."""

    def __init__(self, upstream: asyncssh.SSHClientConnection, *, client_address: str,
                 settings: BridgeSettings, on_bytes: OnBytes | None = None,
                 downstream: asyncssh.SSHServerConnection | None = None) -> None:
        """``downstream`` (the client connection) is needed only for ``-R``; without it -R is refused."""
        self.upstream = upstream
        self.downstream = downstream
        self.client_address = client_address
        self.settings = settings
        self.stats = BridgeStats()
        self._on_bytes = on_bytes
        self._sessions: set[_ClientFacingSession] = set()
        self._closed_reason: str | None = None
        self._agent = (AgentRelay(downstream, upstream)
                       if settings.allow_agent_forwarding and downstream is not None else None)
        # Both legs' packet path (a no-op where already applied or not needed).
        for conn in (upstream, downstream):
            if conn is not None:
                tuning.tune_connection(conn)

    # -- what the SSHServer returns -------------------------------------------------------------

    def session_requested(self) -> asyncssh.SSHServerSession[bytes]:
        """A fresh session object for a client ``session`` channel."""
        if self._closed_reason is not None:
            raise ChannelOpenError(OPEN_CONNECT_FAILED, f"session closed: {self._closed_reason}")
        self.stats.channels_opened += 1
        return _ClientFacingSession(self)

    def connection_requested(self, dest_host: str, dest_port: int, orig_host: str,
                             orig_port: int) -> Awaitable[asyncssh.SSHTCPSession[bytes]]:
        """``ssh -L``: an awaitable giving the client-side TCP session, or raises ChannelOpenError.

        asyncssh awaits the result before confirming the channel, so an upstream refusal reaches
        the client as a channel open failure with the upstream's reason.
        """
        if not self.settings.allow_local_forwarding:
            raise ChannelOpenError(OPEN_ADMINISTRATIVELY_PROHIBITED,
                                   "port forwarding is disabled on this proxy")
        if not is_backend_loopback(dest_host):
            raise ChannelOpenError(OPEN_ADMINISTRATIVELY_PROHIBITED,
                                   f"port forwarding is allowed only to localhost, not to {dest_host}")
        if self._closed_reason is not None:
            raise ChannelOpenError(OPEN_CONNECT_FAILED, f"session closed: {self._closed_reason}")
        self.stats.channels_opened += 1
        return self._open_direct(dest_host, dest_port, orig_host, orig_port)

    async def _open_direct(self, dest_host: str, dest_port: int, orig_host: str,
                           orig_port: int) -> asyncssh.SSHTCPSession[bytes]:
        client_side = _TcpHalf(self, upstream_leg=False)
        upstream_side = _TcpHalf(self, upstream_leg=True)
        client_side.peer, upstream_side.peer = upstream_side, client_side
        try:
            await self.upstream.create_connection(
                lambda: upstream_side, dest_host, dest_port, orig_host, orig_port,
                window=tuning.WINDOW, max_pktsize=tuning.MAX_PACKET)
        except ChannelOpenError as exc:
            self.stats.open_failures.append(f"direct-tcpip {dest_host}:{dest_port}: {exc.reason}")
            raise
        except (OSError, asyncssh.Error) as exc:
            raise ChannelOpenError(OPEN_CONNECT_FAILED, f"upstream connection failed: {exc}") from None
        return client_side

    def server_requested(self, listen_host: str, listen_port: int) -> bool | Awaitable[asyncssh.SSHListener]:
        """``ssh -R``: False (refused) or an awaitable listener opened on the upstream."""
        if not self.settings.allow_remote_forwarding or self.downstream is None:
            return False
        if self._closed_reason is not None:
            return False
        return self._open_remote_listener(listen_host, listen_port)

    async def _open_remote_listener(self, listen_host: str, listen_port: int) -> asyncssh.SSHListener:
        downstream = self.downstream
        assert downstream is not None

        def factory(orig_host: str, orig_port: int) -> Awaitable[asyncssh.SSHTCPSession[bytes]]:
            return self._open_forwarded(downstream, listen_host, listener_port(), orig_host, orig_port)

        listener: asyncssh.SSHListener | None = None

        def listener_port() -> int:
            return listener.get_port() if listener is not None and listen_port == 0 else listen_port

        listener = await self.upstream.create_server(factory, listen_host, listen_port,
                                                     window=tuning.WINDOW, max_pktsize=tuning.MAX_PACKET)
        return listener

    async def _open_forwarded(self, downstream: asyncssh.SSHServerConnection, listen_host: str,
                              listen_port: int, orig_host: str,
                              orig_port: int) -> asyncssh.SSHTCPSession[bytes]:
        upstream_side = _TcpHalf(self, upstream_leg=True)
        client_side = _TcpHalf(self, upstream_leg=False)
        client_side.peer, upstream_side.peer = upstream_side, client_side
        self.stats.channels_opened += 1
        try:
            await downstream.create_connection(lambda: client_side, listen_host, listen_port,
                                               orig_host, orig_port,
                                               window=tuning.WINDOW, max_pktsize=tuning.MAX_PACKET)
        except (OSError, asyncssh.Error) as exc:
            raise ChannelOpenError(OPEN_CONNECT_FAILED, f"client refused the forwarded connection: {exc}") \
                from None
        return upstream_side

    # -- lifetime ------------------------------------------------------------------------------

    def close(self, reason: str) -> None:
        """Tell every open session why (on its stderr), end it with status 255 and close upstream."""
        if self._closed_reason is not None:
            return
        self._closed_reason = reason
        for session in list(self._sessions):
            session.abort(reason)
        self.upstream.close()

    async def wait_closed(self) -> None:
        """Wait until the upstream connection has closed."""
        await self.upstream.wait_closed()

    @property
    def closed(self) -> bool:
        return self._closed_reason is not None

    # -- used by the halves --------------------------------------------------------------------

    def _count(self, up: int, down: int) -> None:
        self.stats.bytes_up += up
        self.stats.bytes_down += down
        if self._on_bytes is not None:
            self._on_bytes(up, down)

    def _environment(self, client_env: Mapping[bytes, bytes]) -> dict[bytes | str, bytes | str]:
        env: dict[bytes | str, bytes | str] = {}
        for key, value in client_env.items():
            try:
                name = key.decode("ascii")
            except UnicodeDecodeError:
                continue
            if self.settings.env_allowed(name):
                env[key] = value
        if self.settings.client_env_name:
            env[self.settings.client_env_name] = self.client_address
        return env


class _ClientFacingSession(asyncssh.SSHServerSession[bytes]):
    """The client's session channel; opens and drives its twin on the upstream."""

    def __init__(self, link: SessionLink) -> None:
        self._link = link
        self._chan: asyncssh.SSHServerChannel[bytes] | None = None
        self._up: asyncssh.SSHClientChannel[bytes] | None = None
        self._term: tuple[str, tuple[int, int, int, int], Mapping[int, int]] | None = None
        self._command: str | None = None
        self._subsystem: str | None = None
        # Client input that arrived before the upstream channel was ready (at most one window).
        self._pending: list[bytes] = []
        self._pending_eof = False
        self._pending_size: tuple[int, int, int, int] | None = None
        self._pending_signals: list[str] = []
        self._client_full = False  # the client's channel is over its write high-water mark
        self._finished = False

    # asyncssh callbacks: requests are accepted here and replayed upstream in session_started.

    def connection_made(self, chan: asyncssh.SSHServerChannel[bytes]) -> None:
        self._chan = chan
        tuning.bound_receive_window(chan)  # pausing must bound what is queued (see there)
        fastpath.enable_channel(chan)  # channel data skips most of asyncssh (see there)
        self._link._sessions.add(self)

    def pty_requested(self, term_type: str, term_size: tuple[int, int, int, int],
                      term_modes: Mapping[int, int]) -> bool:
        self._term = (term_type, term_size, dict(term_modes))
        return True

    def shell_requested(self) -> bool:
        return True

    def exec_requested(self, command: str) -> bool:
        self._command = command
        return True

    def subsystem_requested(self, subsystem: str) -> bool:
        self._subsystem = subsystem
        return True

    def session_started(self) -> None:
        assert self._chan is not None
        task = asyncio.get_running_loop().create_task(self._open_upstream())
        task.add_done_callback(_log_task_error)

    async def _open_upstream(self) -> None:
        chan = self._chan
        assert chan is not None
        env = self._link._environment(chan.get_environment_bytes())
        kwargs: dict[str, Any] = dict(tuning.SESSION_OPTIONS)
        if self._term is not None:
            term_type, term_size, term_modes = self._term
            kwargs.update(request_pty="force", term_type=term_type, term_size=term_size,
                          term_modes=term_modes)
        else:
            kwargs["request_pty"] = False
        agent = self._link._agent
        if agent is not None and await agent.prepare_session():
            self._link.stats.agent_forwarded = True
        try:
            up, _ = await self._link.upstream.create_session(
                lambda: _UpstreamFacingSession(self), self._command, subsystem=self._subsystem,
                env=env, **kwargs)
        except ChannelOpenError as exc:
            self._link.stats.open_failures.append(f"session: {exc.reason}")
            self._fail(f"the server refused the session: {exc.reason}")
            return
        except (OSError, asyncssh.Error) as exc:
            self._fail(f"the server is unreachable: {exc}")
            return
        if self._finished:  # the client went away while we were opening
            up.close()
            return
        self._up = up
        if self._client_full:  # upstream output arrived before we had the channel to pause
            up.pause_reading()
        if self._pending_size is not None:
            up.change_terminal_size(*self._pending_size)
        for name in self._pending_signals:
            up.send_signal(name)
        pending, self._pending = self._pending, []
        for data in pending:
            self._link._count(len(data), 0)
            up.write(data)
        if self._pending_eof:
            up.write_eof()
        chan.resume_reading()

    def data_received(self, data: bytes, datatype: int | None) -> None:
        up = self._up
        if up is None:
            self._pending.append(data)
            assert self._chan is not None
            self._chan.pause_reading()
            return
        self._link._count(len(data), 0)
        up.write(data)

    def eof_received(self) -> bool:
        if self._up is None:
            self._pending_eof = True
        else:
            self._up.write_eof()
        return True  # keep the channel half open: output still flows to the client

    def terminal_size_changed(self, width: int, height: int, pixwidth: int, pixheight: int) -> None:
        if self._up is None:
            self._pending_size = (width, height, pixwidth, pixheight)
        else:
            self._up.change_terminal_size(width, height, pixwidth, pixheight)

    def signal_received(self, signal: str) -> None:
        if self._up is None:
            self._pending_signals.append(signal)
        else:
            self._up.send_signal(signal)

    def break_received(self, msec: int) -> bool:
        if self._up is None:
            return False
        self._up.send_break(msec)
        return True

    def pause_writing(self) -> None:
        self._client_full = True
        if self._up is not None:
            self._up.pause_reading()

    def resume_writing(self) -> None:
        self._client_full = False
        if self._up is not None:
            self._up.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self._finished = True
        self._link._sessions.discard(self)
        if self._up is not None:
            self._up.close()
        if self._chan is not None:
            tuning.release_wrappers(self._chan)  # see tuning.release_connection

    # -- called by the upstream twin and the link --------------------------------------------

    def write_from_upstream(self, data: bytes, datatype: int | None) -> None:
        chan = self._chan
        if chan is None or self._finished:
            return
        self._link._count(0, len(data))
        try:  # hot path: no context manager per packet
            chan.write(data, datatype)
        except OSError:  # the client closed its side; its connection_lost closes the upstream twin
            self._finished = True

    def upstream_eof(self) -> None:
        if self._chan is not None and not self._finished:
            self._chan.write_eof()

    def upstream_closed(self, status: int | None, signal: tuple[str, bool, str, str] | None,
                        exc: Exception | None) -> None:
        """The upstream channel ended: end the client's the same way (or with 255 on an error)."""
        chan = self._chan
        if chan is None or self._finished:
            return
        if signal is not None:
            name, core_dumped, msg, lang = signal
            self._link.stats.exit_signal = name
            chan.exit_with_signal(name, core_dumped, msg, lang)
        elif status is not None:
            self._link.stats.exit_status = status
            chan.exit(status)
        elif exc is not None or self._link.closed:
            reason = self._link._closed_reason or f"connection to the server lost: {exc}"
            self._fail(reason)
        else:
            chan.close()

    def abort(self, reason: str) -> None:
        self._fail(reason)

    def _fail(self, message: str) -> None:
        chan = self._chan
        if chan is None or self._finished:
            return
        with contextlib.suppress(OSError):
            chan.write_stderr(f"\r\nedge: {message}\r\n".encode())
        self._link.stats.exit_status = _FAILED_STATUS
        chan.exit(_FAILED_STATUS)


class _UpstreamFacingSession(asyncssh.SSHClientSession[bytes]):
    """The upstream twin of one client session channel."""

    def __init__(self, twin: _ClientFacingSession) -> None:
        self._twin = twin
        self._chan: asyncssh.SSHClientChannel[bytes] | None = None
        self._status: int | None = None
        self._signal: tuple[str, bool, str, str] | None = None
        self._eof = False

    def connection_made(self, chan: asyncssh.SSHClientChannel[bytes]) -> None:
        self._chan = chan
        tuning.bound_receive_window(chan)
        fastpath.enable_channel(chan)

    def data_received(self, data: bytes, datatype: int | None) -> None:
        self._twin.write_from_upstream(data, datatype)

    def eof_received(self) -> bool:
        # Held until the channel closes: a client whose input is already at EOF closes the channel
        # as soon as it sees our EOF, and a closed channel can no longer carry the exit status
        # (OpenSSH's multiplexing master then reports 255). sshd itself sends EOF and exit status
        # together when the command ends, so holding it costs nothing in practice.
        self._eof = True
        return True

    def exit_status_received(self, status: int) -> None:
        self._status = status

    def exit_signal_received(self, signal: str, core_dumped: bool, msg: str, lang: str) -> None:
        self._signal = (signal, core_dumped, msg, lang)

    def pause_writing(self) -> None:
        if self._twin._chan is not None:
            self._twin._chan.pause_reading()

    def resume_writing(self) -> None:
        if self._twin._chan is not None:
            self._twin._chan.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._eof:
            self._twin.upstream_eof()
        self._twin.upstream_closed(self._status, self._signal, exc)
        if self._chan is not None:
            tuning.release_wrappers(self._chan)


class _TcpHalf(asyncssh.SSHTCPSession[bytes]):
    """One side of a forwarded TCP channel pair (-L or -R); copies to its peer with back-pressure."""

    def __init__(self, link: SessionLink, *, upstream_leg: bool) -> None:
        self._link = link
        self._upstream_leg = upstream_leg  # this half's channel is on the upstream connection
        self.peer: _TcpHalf | None = None
        self.chan: asyncssh.SSHTCPChannel[bytes] | None = None
        self._pending: list[bytes] = []
        self._pending_eof = False
        self._closed = False

    def connection_made(self, chan: asyncssh.SSHTCPChannel[bytes]) -> None:
        self.chan = chan
        tuning.bound_receive_window(chan)
        fastpath.enable_channel(chan)
        peer = self.peer
        assert peer is not None
        # The peer may have received data before this side's channel was confirmed.
        pending, peer._pending = peer._pending, []
        for data in pending:
            self._write(data)
        if peer._pending_eof:
            chan.write_eof()
        if peer.chan is not None:
            peer.chan.resume_reading()
        if peer._closed:
            chan.close()

    def _write(self, data: bytes) -> None:
        assert self.chan is not None
        if self._upstream_leg:
            self._link._count(len(data), 0)
        else:
            self._link._count(0, len(data))
        try:  # hot path: no context manager per packet
            self.chan.write(data)
        except OSError:  # our channel is closing; its connection_lost closes the peer
            self._closed = True

    def data_received(self, data: bytes, datatype: int | None) -> None:
        peer = self.peer
        assert peer is not None
        if peer.chan is None:
            self._pending.append(data)
            if self.chan is not None:
                self.chan.pause_reading()
            return
        peer._write(data)

    def eof_received(self) -> bool:
        peer = self.peer
        assert peer is not None
        if peer.chan is None:
            self._pending_eof = True
        else:
            peer.chan.write_eof()
        return True

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.chan is not None:
            self.peer.chan.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.chan is not None:
            self.peer.chan.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        if self.peer is not None and self.peer.chan is not None:
            self.peer.chan.close()
        if self.chan is not None:
            tuning.release_wrappers(self.chan)


def _log_task_error(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("ssh bridge: opening the upstream session failed", exc_info=task.exception())


__all__ = ["BridgeSettings", "BridgeStats", "OnBytes", "SessionLink", "is_backend_loopback"]
