"""A relayed WebSocket connection as a live session (``edge sessions``, ``sessions kill``).

Once the backend answered ``101`` the connection is a byte relay (:mod:`edge.relay`); the
proxy does not parse frames. Directory changes reach it through the session policy like SSH
and FTP sessions (:func:`on_change`): a moved tenant's WebSockets are closed at the move's
drain deadline, a suspended tenant's or a down host's at once. Ending it sends the client a close frame
(RFC 6455 §5.5.1, status 1001 "going away" with the message as reason) and then closes both
sides. The frame goes between two relayed writes: should the backend be in the middle of a
long frame at that instant, the client sees a protocol error instead of the reason (the
connection ends either way).
"""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from edge import sessionpolicy
from edge.errors import DirectoryUnavailable
from edge.relay import Relay
from edge.sessions import SessionSnapshot

if TYPE_CHECKING:
    from edge.directory.model import Change
    from edge.registry import ProxyContext

GOING_AWAY = 1001
MAX_REASON = 123
"""A control frame's payload is at most 125 bytes: 2 for the status code, 123 for the text."""


def close_frame(message: str, code: int = GOING_AWAY) -> bytes:
    """An unmasked (server-to-client) close frame carrying ``code`` and ``message``."""
    reason = message.encode()[:MAX_REASON].decode("utf-8", "ignore").encode()
    payload = struct.pack("!H", code) + reason
    return bytes((0x88, len(payload))) + payload


class WebSocketSession:
    """What the session table sees of one upgraded connection."""

    def __init__(self, relay: Relay, client: asyncio.Transport, snapshot: SessionSnapshot) -> None:
        self.relay = relay
        self.client = client
        self._snapshot = snapshot
        self._drain: asyncio.TimerHandle | None = None

    @property
    def tenant(self) -> str:
        return self._snapshot.tenant

    @property
    def host(self) -> str:
        return self._snapshot.host

    def snapshot(self) -> SessionSnapshot:
        """Returns the route and client of the upgrade with the relay's live byte counts."""
        s = self._snapshot
        return SessionSnapshot(s.user, s.tenant, s.host, s.client, s.since,
                               self.relay.bytes_a_to_b, self.relay.bytes_b_to_a)

    def apply(self, action: sessionpolicy.Action) -> None:
        """Close now (close frame, then the relay ends), at a drain deadline, or keep."""
        if action.kind is sessionpolicy.Kind.KEEP:
            if self._drain is not None:  # e.g. the host's maintenance ended
                self._drain.cancel()
                self._drain = None
        elif action.kind is sessionpolicy.Kind.CLOSE:
            self.close(action.message, action.reason)
        elif self._drain is None:  # the first deadline wins, as for SSH and FTP
            delay = max(0.0, action.deadline - time.time())
            self._drain = asyncio.get_running_loop().call_later(
                delay, self.close, action.message, action.reason)

    def close(self, message: str, reason: str) -> None:
        if self.relay.result is not None:
            return
        if not self.client.is_closing():
            self.client.write(close_frame(message))
        self.relay.close(reason or "closed")


def on_change(context: ProxyContext, change: Change,
              spawn: Callable[[Coroutine[Any, Any, None]], None]) -> None:
    """Feed subscriber part (returns at once): re-check the WebSockets a change may concern."""
    if change.entity not in ("tenant", "host", "all"):
        return
    affected = [s for s in context.sessions.of_protocol("websocket")
                if isinstance(s, WebSocketSession)
                and (change.entity == "all"
                     or (change.entity == "tenant" and s.tenant == change.name)
                     or (change.entity == "host" and s.host == change.name))]
    if affected:
        spawn(_recheck(context, affected))


async def _recheck(context: ProxyContext, sessions: list[WebSocketSession]) -> None:
    for session in sessions:
        try:
            tenant = await context.directory.tenant(session.tenant)
            host = await context.directory.host(session.host)
        except DirectoryUnavailable:
            continue  # keep it; the next change re-checks
        session.apply(sessionpolicy.decide(
            session.host, tenant, host, now=time.time(),
            maintenance_drain=context.config.serve.maintenance_drain))


__all__ = ["GOING_AWAY", "WebSocketSession", "close_frame", "on_change"]
