"""The admin API on a real loopback port (aiohttp server and client), with tokens."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from edge.api.app import build_app
from edge.directory.secrets import KeyBox
from edge.directory.store import SQLStore
from edge.directory.tokens import TokenService


@dataclass
class Answer:
    status: int
    body: Any
    headers: dict[str, str]


@dataclass
class Api:
    base: str
    session: aiohttp.ClientSession
    store: SQLStore
    writer: str
    """A read,write token."""
    reader: str
    """A read-only token."""

    async def call(self, method: str, path: str, *, token: str | None = "writer",
                   body: Any = None, data: bytes | None = None,
                   headers: dict[str, str] | None = None) -> Answer:
        """``token``: "writer", "reader", a literal secret, or None for no Authorization."""
        sent = dict(headers or {})
        if token is not None:
            secret = {"writer": self.writer, "reader": self.reader}.get(token, token)
            sent["Authorization"] = f"Bearer {secret}"
        if body is not None:
            data = json.dumps(body).encode()
            sent["Content-Type"] = "application/json"
        async with self.session.request(method, self.base + path, data=data,
                                        headers=sent) as response:
            text = await response.text()
            parsed = json.loads(text) if text and response.content_type == "application/json" \
                else text
            return Answer(response.status, parsed, dict(response.headers))


@pytest.fixture
async def api(store: SQLStore, keybox: KeyBox) -> AsyncIterator[Api]:
    tokens = TokenService(store)
    writer = (await tokens.add("panel", "read,write")).secret
    reader = (await tokens.add("viewer", "read")).secret
    server = TestServer(build_app(store, keybox), host="127.0.0.1")
    await server.start_server()
    async with aiohttp.ClientSession() as session:
        yield Api(str(server.make_url("")).rstrip("/"), session, store, writer, reader)
    await server.close()
