"""Live sessions across the workers of one ``edge serve``: list them, end one with a message.

Each worker keeps a :class:`SessionTable` (``ProxyContext.sessions``). A proxy adds a session
once it knows who it is (SSH after authentication, FTP after login, HTTP when a WebSocket
upgrade is relayed) and removes it when it ends; an HTTP/2 connection registers the same way
(protocol ``"h2"``): implement :class:`LiveSession` and call :meth:`SessionTable.add`.

How the CLI reaches live workers: every worker serves a small control socket (a Unix socket
``<control_dir>/<pid>.sock`` in a directory the master creates with mode 0700, one JSON
request line, one JSON reply line). The master's admin listener (``GET /sessions``,
``POST /sessions/{id}/kill``) asks every live worker it supervises and merges the answers;
``edge sessions`` asks the admin listener. Why this and not a shared file the workers publish
to: a kill must reach the one process that holds the session *now*, and a listing must not be
up to a second old; a socket per worker answers both with no polling and costs nothing while
nobody asks. The master knows exactly which pids are its live workers, so a dead worker's
socket is never asked. A fleet of machines is queried the same way, one admin listener per
machine (docs/operations.md).

Ending a session goes through :func:`edge.sessionpolicy.kill`: the proxy applies it like any
other policy verdict (SSH disconnect message and stderr line, FTP ``421``, WebSocket close
frame).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Protocol

from edge import sessionpolicy

log = logging.getLogger("edge.sessions")

CONTROL_TIMEOUT = 2.0
"""Seconds the master waits for one worker's control answer."""
MAX_REQUEST = 64 * 1024
"""Longest control request line (bytes): a kill message is short."""
PROTOCOLS = ("ssh", "ftp", "websocket", "h2")


@dataclass(frozen=True, slots=True)
class SessionSnapshot:
    """What a live session says about itself right now (no id: the table assigns it)."""

    user: str
    """Login name (SSH/FTP); for HTTP the site hostname (there is no user)."""
    tenant: str
    host: str
    """The backend host the session is routed to."""
    client: str
    """``ip:port`` of the client (the address a PROXY header named, if any)."""
    since: float
    """Unix time the session began."""
    bytes_up: int
    """Client → backend so far (FTP: of finished transfers)."""
    bytes_down: int


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """One row of ``edge sessions``."""

    id: str
    """``<worker pid>.<serial>``: unique on this machine while the worker lives."""
    protocol: str
    worker: int
    user: str
    tenant: str
    host: str
    client: str
    since: float
    bytes_up: int
    bytes_down: int


_FIELDS = tuple(f.name for f in fields(SessionInfo))


class LiveSession(Protocol):
    """What a proxy's session object offers the table."""

    def snapshot(self) -> SessionSnapshot:
        """Returns the session's current user, route, client and byte counts."""

    def apply(self, action: sessionpolicy.Action) -> None:
        """Apply a session-policy verdict (keep, drain at a deadline, close now)."""


class SessionTable:
    """The live sessions of one worker, by id."""

    def __init__(self, worker_id: int = 0) -> None:
        self.worker_id = worker_id
        self._sessions: dict[str, tuple[str, LiveSession]] = {}
        self._serial = 0

    def add(self, protocol: str, session: LiveSession) -> str:
        """Register ``session``; returns its id (pass it to :meth:`remove` when it ends)."""
        self._serial += 1
        session_id = f"{os.getpid()}.{self._serial}"
        self._sessions[session_id] = (protocol, session)
        return session_id

    def remove(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)

    def of_protocol(self, protocol: str) -> list[LiveSession]:
        """The live sessions of one protocol (for a proxy applying the session policy)."""
        return [session for proto, session in self._sessions.values() if proto == protocol]

    def __len__(self) -> int:
        return len(self._sessions)

    def list(self) -> list[SessionInfo]:
        rows = []
        for session_id, (protocol, session) in self._sessions.items():
            snap = session.snapshot()
            rows.append(SessionInfo(session_id, protocol, self.worker_id, snap.user, snap.tenant,
                                    snap.host, snap.client, snap.since, snap.bytes_up,
                                    snap.bytes_down))
        return rows

    def kill(self, session_id: str, message: str = "") -> bool:
        """End one session with ``message`` shown to its user; ``False`` if it is not here."""
        entry = self._sessions.get(session_id)
        if entry is None:
            return False
        protocol, session = entry
        log.info("session killed by an operator", extra={
            "event": "session_killed", "session": session_id, "protocol": protocol,
            "user": session.snapshot().user})
        session.apply(sessionpolicy.kill(message))
        return True


# -- worker side: the control socket ---------------------------------------------------------

def control_path(control_dir: str, pid: int) -> str:
    return str(Path(control_dir) / f"{pid}.sock")


class ControlServer:
    """One worker's control socket: answers ``sessions``, ``kill`` and ``ping`` requests."""

    def __init__(self, table: SessionTable) -> None:
        self.table = table
        self._server: asyncio.AbstractServer | None = None
        self.path = ""

    async def start(self, control_dir: str) -> None:
        self.path = control_path(control_dir, os.getpid())
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # a reused pid's leftover
        self._server = await asyncio.start_unix_server(self._serve, path=self.path,
                                                       limit=MAX_REQUEST)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        with contextlib.suppress(OSError):
            os.unlink(self.path)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), CONTROL_TIMEOUT)
            reply = self.answer(json.loads(line))
        except (ValueError, TimeoutError, asyncio.LimitOverrunError) as exc:
            reply = {"error": f"bad control request: {exc}"}
        writer.write(json.dumps(reply).encode() + b"\n")
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()

    def answer(self, request: Any) -> dict[str, Any]:
        """Returns the JSON reply to one request (``{"error": ...}`` for a bad one)."""
        op = request.get("op") if isinstance(request, dict) else None
        if op == "sessions":
            # Filtered here and not dataclasses.asdict (a deep copy per row): this runs in the
            # serving loop (about 5 us per session listed).
            wanted = {k: v if isinstance(v, str) else None
                      for k, v in request.items() if k in ("host", "user", "protocol")}
            return {"sessions": [{name: getattr(s, name) for name in _FIELDS}
                                 for s in self.table.list() if matches(s, **wanted)]}
        if op == "ping":  # the master's watchdog: answering proves this loop runs
            return {"pong": True}
        if op == "kill" and isinstance(request.get("id"), str):
            message = request.get("message") or ""
            return {"killed": self.table.kill(request["id"], str(message))}
        return {"error": f"unknown control request {op!r}"}


# -- master side: ask every live worker ------------------------------------------------------

async def ask_worker(control_dir: str, pid: int, request: dict[str, Any]) -> dict[str, Any]:
    """Send one request to worker ``pid``; returns its reply or ``{"error": ...}``."""
    async def _ask() -> dict[str, Any]:
        reader, writer = await asyncio.open_unix_connection(control_path(control_dir, pid),
                                                            limit=2**26)
        try:
            writer.write(json.dumps(request).encode() + b"\n")
            await writer.drain()
            reply = json.loads(await reader.readline())
            return reply if isinstance(reply, dict) else {"error": "bad reply"}
        finally:
            writer.close()

    try:
        return await asyncio.wait_for(_ask(), CONTROL_TIMEOUT)
    except (OSError, ValueError, TimeoutError) as exc:
        return {"error": f"worker {pid} did not answer: {exc}"}


@dataclass(frozen=True, slots=True)
class SessionListing:
    sessions: list[SessionInfo]
    errors: list[str]
    """Workers that did not answer (their sessions are missing from ``sessions``)."""


async def list_sessions(control_dir: str, pids: Iterable[int], *, host: str | None = None,
                        user: str | None = None, protocol: str | None = None) -> SessionListing:
    """Every live session of the workers ``pids`` that :func:`matches` the filters, oldest
    first."""
    request: dict[str, Any] = {"op": "sessions", "host": host, "user": user,
                               "protocol": protocol}
    replies = await asyncio.gather(*(ask_worker(control_dir, pid, request) for pid in pids))
    sessions: list[SessionInfo] = []
    errors: list[str] = []
    for reply in replies:
        if "error" in reply:
            errors.append(str(reply["error"]))
            continue
        sessions.extend(SessionInfo(**row) for row in reply.get("sessions", []))
    sessions.sort(key=lambda s: (s.since, s.id))
    return SessionListing(sessions, errors)


def owner_pid(session_id: str) -> int | None:
    """The worker pid a session id names, ``None`` for a malformed id."""
    pid, dot, serial = session_id.partition(".")
    if not (dot and pid.isdigit() and serial.isdigit()):
        return None
    return int(pid)


async def kill_session(control_dir: str, pids: Iterable[int], session_id: str,
                       message: str) -> bool:
    """Ask the worker that owns ``session_id`` to end it; ``False`` if no live worker has it."""
    pid = owner_pid(session_id)
    if pid is None or pid not in set(pids):
        return False
    reply = await ask_worker(control_dir, pid, {"op": "kill", "id": session_id,
                                                "message": message})
    return bool(reply.get("killed"))


def matches(session: SessionInfo, *, host: str | None = None, user: str | None = None,
            protocol: str | None = None) -> bool:
    """The ``edge sessions --host/--user/--protocol`` filters (``None``: any)."""
    return ((host is None or session.host == host) and (user is None or session.user == user)
            and (protocol is None or session.protocol == protocol))


__all__ = ["CONTROL_TIMEOUT", "PROTOCOLS", "ControlServer", "LiveSession", "SessionInfo",
           "SessionListing", "SessionSnapshot", "SessionTable", "ask_worker", "control_path",
           "kill_session", "list_sessions", "matches", "owner_pid"]
