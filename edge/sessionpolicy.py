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
| anything else                 | as before                             | kept                         |

The proxies only translate: :func:`decide` says keep/drain/close with a message and a deadline,
and each proxy says goodbye in its protocol (SSH disconnect message, FTP ``421``). A host's
``notice`` is only shown while it is in maintenance: one left over from a maintenance is not
the reason a host is down.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from edge.directory.model import Host, Tenant

MOVED_TEXT = "This account has moved to another server; please reconnect."
SUSPENDED_TEXT = "This account is not available."
MAINTENANCE_TEXT = "The server for this account is under maintenance; please try again later."
DOWN_TEXT = "The server for this account is not reachable right now; please try again later."

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


def host_notice(host: Host) -> str:
    """What users are told about ``host`` when it is not serving."""
    if host.state == "maintenance":
        return host.notice or MAINTENANCE_TEXT
    return DOWN_TEXT


def admit(tenant: Tenant, host: Host) -> Admission:
    """The "new connections" column of the table."""
    if tenant.state != "active":
        return Admission(False, "suspended", SUSPENDED_TEXT)
    if host.state != "active":
        return Admission(False, "maintenance" if host.state == "maintenance" else "down",
                         host_notice(host))
    return ADMITTED


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
    if host_now is None or host_now.state not in ("active", "maintenance"):
        return Action(Kind.CLOSE, DOWN_TEXT, reason="down")
    if host_now.state == "maintenance":
        return Action(Kind.DRAIN, host_notice(host_now), now + maintenance_drain,
                      reason="maintenance")
    return KEEP


__all__ = ["ADMITTED", "DEFAULT_MAINTENANCE_DRAIN", "DOWN_TEXT", "KEEP", "MAINTENANCE_TEXT",
           "MOVED_TEXT", "SUSPENDED_TEXT", "Action", "Admission", "Kind", "admit", "decide",
           "host_notice"]
