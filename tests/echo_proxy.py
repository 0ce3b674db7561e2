"""A test-only proxy for the process-model tests: a line echo server.

On connect it greets with ``hello worker=<id> pid=<pid>``; each line is echoed back as
``echo <line>``; on :meth:`close` (grace period over) it sends ``bye shutting down`` and
closes. With ``ECHO_PROXY_REJECT_CONFIG`` set, ``start`` raises ConfigError.
Register it with ``EDGE_PROXY_OVERRIDES=ssh=tests.echo_proxy:EchoProxy``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket

from edge import metrics
from edge.errors import ConfigError
from edge.registry import ProxyContext


class EchoProxy:
    def __init__(self, context: ProxyContext) -> None:
        self.context = context
        self.servers: list[asyncio.Server] = []
        self.sessions: set[asyncio.StreamWriter] = set()
        self._idle = asyncio.Event()
        self._idle.set()

    async def start(self, sockets: list[socket.socket]) -> None:
        if os.environ.get("ECHO_PROXY_REJECT_CONFIG"):
            raise ConfigError("[ssh] host_key_dir /nonexistent: no host keys (run `edge init`)")
        for sock in sockets:
            self.servers.append(await asyncio.start_server(self._handle, sock=sock))

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        metrics.CONNECTIONS.labels(proxy=self.context.name).inc()
        self.sessions.add(writer)
        self._idle.clear()
        try:
            writer.write(f"hello worker={self.context.worker_id} pid={os.getpid()}\n".encode())
            await writer.drain()
            while line := await reader.readline():
                writer.write(b"echo " + line)
                await writer.drain()
                metrics.BYTES.labels(proxy=self.context.name, direction="upstream").inc(len(line))
        except (ConnectionError, OSError):
            pass
        finally:
            self.sessions.discard(writer)
            if not self.sessions:
                self._idle.set()
            writer.close()

    async def drain(self) -> None:
        for server in self.servers:
            server.close()

    async def wait_closed(self, timeout: float) -> None:  # noqa: ASYNC109
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout)

    async def close(self) -> None:
        for writer in list(self.sessions):
            with contextlib.suppress(Exception):
                writer.write(b"bye shutting down\n")
                await writer.drain()
            writer.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), 2.0)

    def active_sessions(self) -> int:
        return len(self.sessions)
