"""What a directory change does to sessions: one sans-IO policy that SSH, FTP and HTTP apply.

| change                        | new connections                       | open sessions                |
|-------------------------------|---------------------------------------|------------------------------|
| tenant moved to another host  | new host                              | drained: message, closed at  |
|                               |                                       | the move's drain deadline    |
| tenant suspended (or deleted) | refused like an unknown user          | closed with a message        |
| host → maintenance            | the host's notice (SSH banner,        | kept until ``maintenance_    |
|                               | FTP 421, HTTP 503 + Retry-After)      | drain`` from now, then closed|
|                               |                                       | with the notice              |
| host → down (or deleted)      | refused (SSH disconnect, FTP 421,     | closed                       |
|                               | HTTP 502), never with a stale notice  |                              |
| maintenance ``--until`` passed| as if active again                    | kept                         |
| an operator kills one session | -                                     | closed with their message    |
| anything else                 | as before                             | kept                         |

The proxies only translate: :func:`decide` says keep/drain/close with a message and a deadline,
and each proxy says goodbye in its protocol (SSH disconnect message, FTP ``421``, WebSocket
close frame). A host's
``notice`` is only shown while it is in maintenance: one left over from a maintenance is not
the reason a host is down.

A maintenance window with an end (``hosts.maintenance_until``) is evaluated here, at use time,
by :func:`host_state`: every worker reads the same row and the same clock, so no
job has to flip the row back at the end, the window ends on time while the database is away,
and the cached host record stays valid (it does not change at the end of the window).
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass

from edge.directory.model import Host, Tenant

MOVED_TEXT = "This account has moved to another server; please reconnect."
SUSPENDED_TEXT = "This account is not available."
MAINTENANCE_TEXT = "The server for this account is under maintenance; please try again later."
DOWN_TEXT = "The server for this account is not reachable right now; please try again later."
KILLED_TEXT = "This session was closed by an administrator."

DEFAULT_MAINTENANCE_DRAIN = 300.0


class Kind(enum.Enum):
    KEEP = "keep"
    DRAIN = "drain"
    """Close at ``deadline`` with ``message`` (the session may finish what it is doing)."""
    CLOSE = "close"
    """Close now with ``message``."""


@dataclass(frozen=True, slots=True)
class Action:
    kind: Kind
    message: str = ""
    deadline: float = 0.0
    """Unix time at which a drained session is closed (``DRAIN`` only)."""
    reason: str = ""
    """Short machine-readable cause for logs (drained, suspended, maintenance, down)."""


KEEP = Action(Kind.KEEP)


@dataclass(frozen=True, slots=True)
class Admission:
    """Whether a new connection to a route may proceed; the refusal text if not."""

    allowed: bool
    reason: str = ""
    """``suspended`` (answer like an unknown user), ``maintenance`` or ``down``."""
    message: str = ""


ADMITTED = Admission(True)


def host_state(host: Host, now: float | None = None) -> str:
    """``host.state``, except ``"active"`` once a maintenance window's ``--until`` has passed."""
    until = host.maintenance_until
    if (host.state == "maintenance" and until is not None
            and (time.time() if now is None else now) >= until):
        return "active"
    return host.state


def host_notice(host: Host) -> str:
    """What users are told about ``host`` when it is not serving."""
    if host.state == "maintenance":
        return host.notice or MAINTENANCE_TEXT
    return DOWN_TEXT


def admit(tenant: Tenant, host: Host, now: float | None = None) -> Admission:
    """The "new connections" column of the table."""
    if tenant.state != "active":
        return Admission(False, "suspended", SUSPENDED_TEXT)
    state = host_state(host, now)
    if state != "active":
        return Admission(False, "maintenance" if state == "maintenance" else "down",
                         host_notice(host))
    return ADMITTED


def kill(message: str = "") -> Action:
    """An operator ends one session (``edge sessions kill``): closed now with ``message``."""
    return Action(Kind.CLOSE, message.strip() or KILLED_TEXT, reason="killed")


def decide(host_before: str, tenant_now: Tenant | None, host_now: Host | None, *, now: float,
           maintenance_drain: float = DEFAULT_MAINTENANCE_DRAIN) -> Action:
    """The "open sessions" column: what to do with a session routed to ``host_before`` given the
    tenant's current record and the current record of ``host_before`` (``None``: deleted)."""
    if tenant_now is None or tenant_now.state != "active":
        return Action(Kind.CLOSE, SUSPENDED_TEXT, reason="suspended")
    if tenant_now.host != host_before:
        deadline = now
        if tenant_now.previous_host == host_before and tenant_now.drain_deadline:
            deadline = tenant_now.drain_deadline
        return Action(Kind.DRAIN, MOVED_TEXT, deadline, reason="drained")
    state = None if host_now is None else host_state(host_now, now)
    if host_now is None or state not in ("active", "maintenance"):
        return Action(Kind.CLOSE, DOWN_TEXT, reason="down")
    if state == "maintenance":
        until = host_now.maintenance_until
        if until is not None and until <= now + maintenance_drain:
            return KEEP  # the window ends before the drain would: nothing to close
        return Action(Kind.DRAIN, host_notice(host_now), now + maintenance_drain,
                      reason="maintenance")
    return KEEP


__all__ = ["ADMITTED", "DEFAULT_MAINTENANCE_DRAIN", "DOWN_TEXT", "KEEP", "KILLED_TEXT",
           "MAINTENANCE_TEXT", "MOVED_TEXT", "SUSPENDED_TEXT", "Action", "Admission", "Kind",
           "admit", "decide", "host_notice", "host_state", "kill"]
