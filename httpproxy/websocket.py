"""A relayed WebSocket connection as a live session (``edge sessions``, ``sessions kill``).

Once the backend answered ``101`` the connection is a byte relay (:mod:`edge.relay`); the
proxy does not parse frames. Ending it for an operator sends the client a close frame
(RFC 6455 §5.5.1, status 1001 "going away" with the message as reason) and then closes both
sides. The frame goes between two relayed writes: should the backend be in the middle of a
long frame at that instant, the client sees a protocol error instead of the reason (the
connection ends either way).
"""

from __future__ import annotations

import asyncio
import struct

from edge import sessionpolicy
from edge.relay import Relay
from edge.sessions import SessionSnapshot

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

    def snapshot(self) -> SessionSnapshot:
        """Returns the route and client of the upgrade with the relay's live byte counts."""
        s = self._snapshot
        return SessionSnapshot(s.user, s.tenant, s.host, s.client, s.since,
                               self.relay.bytes_a_to_b, self.relay.bytes_b_to_a)

    def apply(self, action: sessionpolicy.Action) -> None:
        """Only ``CLOSE`` acts (an operator's kill): close frame, then the relay ends."""
        if action.kind is not sessionpolicy.Kind.CLOSE or self.relay.result is not None:
            return
        if not self.client.is_closing():
            self.client.write(close_frame(action.message))
        self.relay.close(action.reason or "closed")


__all__ = ["GOING_AWAY", "WebSocketSession", "close_frame"]
