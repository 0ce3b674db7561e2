"""``ssh -A`` through the bridge: the backend's agent requests answered by the client's ssh-agent.

asyncssh has both halves but no way to join them after the fact:

* facing the client, a server connection with ``agent_forwarding=True`` answers the client's
  ``auth-agent-req@openssh.com`` by opening a private Unix listener (a fresh ``0700`` temporary
  directory) whose connections become ``auth-agent@openssh.com`` channels back to the client;
* facing the backend, a client connection sends ``auth-agent-req`` with every session it opens,
  and forwards the backend's agent channels to a Unix path, only if it was *connected* with that
  path (``agent_forward_path``) — but the bridge's upstream login happens before the client has
  said whether it wants agent forwarding.

:class:`AgentRelay` joins them: it notices the client's request (the downstream connection's
``create_agent_listener``, which asyncssh calls for every request, is wrapped on that one
connection) and, before the bridge opens an upstream session, hands the listener's path to the
upstream connection (its ``_agent_forward_path``, read by ``create_session`` and by the handler
of the backend's agent channel opens). Both internals are checked against the installed
asyncssh's source at import; if either changed, :data:`AGENT_RELAY_SUPPORTED` is False and
:class:`sshproxy.bridge.BridgeSettings` refuses ``allow_agent_forwarding`` with that reason
rather than silently doing nothing.

The grant is per connection, as in asyncssh: once the client asked on one session, every later
upstream session of that connection offers the agent to the backend (OpenSSH clients ask on the
first session of a connection or not at all). Agent *requests* carry signatures, never keys: the
backend can use the client's keys while the client is connected, which is what ``ssh -A`` means
and why ``[ssh] allow_agent_forwarding`` is off by default.
"""

from __future__ import annotations

import asyncio
from typing import Final

import asyncssh
from asyncssh.channel import SSHServerChannel
from asyncssh.connection import SSHClientConnection, SSHServerConnection

from sshproxy.tuning import _source  # the one reader of asyncssh's source for these checks


def _internals_as_expected() -> bool:
    """Whether asyncssh still reads the two internals this module sets (see the module doc)."""
    return ("await self._conn.create_agent_listener()"
            in _source(SSHServerChannel._finish_agent_req_request)
            and "bool(self._agent_forward_path)" in _source(SSHClientConnection.create_session)
            and "self.forward_unix_connection(self._agent_forward_path)"
            in _source(SSHClientConnection._process_auth_agent_at_openssh_dot_com_open)
            and hasattr(SSHServerConnection, "get_agent_path"))


AGENT_RELAY_SUPPORTED: Final = _internals_as_expected()
"""False when the installed asyncssh (``asyncssh.__version__``) changed what :class:`AgentRelay` relies on."""


class AgentRelay:
    """Joins one client connection's forwarded agent to its upstream connection.

    Construct it right after authentication, before the client's channel requests are processed
    (the downstream connection must have been created with ``agent_forwarding=True``).
    """

    def __init__(self, downstream: asyncssh.SSHServerConnection,
                 upstream: asyncssh.SSHClientConnection) -> None:
        if not AGENT_RELAY_SUPPORTED:
            raise RuntimeError(f"agent forwarding cannot be relayed with asyncssh {asyncssh.__version__}")
        self._downstream = downstream
        self._upstream = upstream
        self._listener: asyncio.Future[bool] | None = None
        create_listener = downstream.create_agent_listener

        async def create_agent_listener() -> bool:
            # asyncssh runs one task per auth-agent-req; the first creates the listener and the
            # rest share its outcome.
            if self._listener is None:
                self._listener = asyncio.ensure_future(create_listener())
            return await asyncio.shield(self._listener)

        downstream.create_agent_listener = create_agent_listener  # type: ignore[method-assign]

    async def prepare_session(self) -> bool:
        """Call just before opening an upstream session; True when it will carry the agent.

        The client's ``auth-agent-req`` precedes its shell/exec request on the same channel, and
        asyncssh starts the listener task before the session starts, so by the time the bridge
        gets here a request, if there was one, has begun; this waits for its listener.
        """
        if self._listener is None or not await asyncio.shield(self._listener):
            return False
        path = self._downstream.get_agent_path()
        if path is None:
            return False
        self._upstream._agent_forward_path = path
        return True


__all__ = ["AGENT_RELAY_SUPPORTED", "AgentRelay"]
