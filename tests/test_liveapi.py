"""The admin listener's live routes and a worker's control socket, in one process: bad input
gets a clear 400/404 and changes nothing, a session id never makes the master talk to a
process that is not one of its workers. (The real proxies and clients: test_live_sessions.py.)"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from edge import sessionpolicy
from edge.liveapi import LiveRoutes
from edge.sessions import ControlServer, SessionSnapshot, SessionTable, control_path

TOKEN = "a1" * 32


@dataclass
class Recorded:
    """A session that records the verdicts applied to it (no proxy behind it here)."""

    user: str
    actions: list[sessionpolicy.Action] = field(default_factory=list)

    def snapshot(self) -> SessionSnapshot:
        return SessionSnapshot(self.user, "acme", "web1", "127.0.0.1:5000", 1.0, 10, 20)

    def apply(self, action: sessionpolicy.Action) -> None:
        self.actions.append(action)


@pytest.fixture
async def live(tmp_path: Path) -> AsyncIterator[tuple[TestClient[web.Request, web.Application],
                                                      SessionTable]]:
    table = SessionTable(worker_id=0)
    control = ControlServer(table)
    await control.start(str(tmp_path))
    routes = LiveRoutes(control_dir=str(tmp_path), worker_pids=lambda: [os.getpid()],
                        metrics=lambda: b"", ping=_no_problem, workers_problem=lambda: None,
                        listeners=lambda: ["ssh"], token=lambda: TOKEN)
    app = web.Application()
    routes.add_routes(app)
    client = TestClient(TestServer(app), headers={"Authorization": f"Bearer {TOKEN}"})
    await client.start_server()
    yield client, table
    await client.close()
    await control.stop()


async def _no_problem() -> str | None:
    return None


async def test_listing_filters_and_kill_with_a_message(live: tuple[TestClient[web.Request, web.Application],
                                                                   SessionTable]) -> None:
    client, table = live
    alice, bob = Recorded("alice"), Recorded("bob")
    alice_id, _ = table.add("ssh", alice), table.add("ftp", bob)
    body = await (await client.get("/sessions", params={"user": "bob"})).json()
    assert [s["protocol"] for s in body["sessions"]] == ["ftp"] and body["errors"] == []
    response = await client.post(f"/sessions/{alice_id}/kill", json={"message": "bye"})
    assert response.status == 200
    assert alice.actions == [sessionpolicy.Action(sessionpolicy.Kind.CLOSE, "bye",
                                                  reason="killed")]
    assert bob.actions == []


@pytest.mark.parametrize(("session_id", "body", "status", "text"), [
    ("{mine}", "not json", 400, "must be JSON"),
    ("{mine}", json.dumps({"message": 5}), 400, "must be a string"),
    ("{mine}", json.dumps({"message": "two\r\nlines"}), 400, "one line"),
    ("{mine}", json.dumps({"message": "x" * 401}), 400, "at most 400"),
    # Not one of the master's workers: never asked (no socket named after an arbitrary pid).
    ("1.1", "", 404, "no live session"),
    ("-1.2", "", 404, "no live session"),
    ("12.3abc", "", 404, "no live session"),
    ("{pid}.999", "", 404, "no live session"),
])
async def test_bad_kill_requests_change_nothing(
        live: tuple[TestClient[web.Request, web.Application], SessionTable],
        session_id: str, body: str, status: int, text: str) -> None:
    client, table = live
    victim = Recorded("alice")
    mine = table.add("ssh", victim)
    target = session_id.format(mine=mine, pid=os.getpid())
    response = await client.post(f"/sessions/{target}/kill", data=body)
    assert response.status == status
    assert text in (await response.json())["error"]
    assert victim.actions == [] and len(table) == 1


async def test_control_socket_answers_garbage_with_an_error_and_keeps_serving(
        live: tuple[TestClient[web.Request, web.Application], SessionTable],
        tmp_path: Path) -> None:
    client, table = live
    for request in (b"\xff\xfe\n", b'{"op": "reboot"}\n', b"[]\n"):
        reader, writer = await asyncio.open_unix_connection(control_path(str(tmp_path),
                                                                          os.getpid()))
        writer.write(request)
        reply = json.loads(await reader.readline())
        writer.close()
        assert "error" in reply
    table.add("ssh", Recorded("alice"))
    body = await (await client.get("/sessions")).json()
    assert len(body["sessions"]) == 1


@pytest.mark.parametrize("headers", [
    # A cross-site form post (what Chromium sends for <form method=post action=http://127.0.0.1:9900/...>).
    {"Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site",
     "Content-Type": "application/x-www-form-urlencoded"},
    # A page whose name was rebound to 127.0.0.1: same-origin to the browser, Origin still sent.
    {"Origin": "http://rebound.example:9900", "Sec-Fetch-Site": "same-origin"},
    # A browser that sends only the fetch metadata.
    {"Sec-Fetch-Site": "same-site"},
])
async def test_browser_requests_cannot_list_or_kill_sessions(
        live: tuple[TestClient[web.Request, web.Application], SessionTable],
        headers: dict[str, str]) -> None:
    """Session ids are guessable (pid.serial): a web page open in an operator's browser (the
    admin port tunnelled to a laptop, or a DNS-rebinding page) must not end sessions or read
    who is connected."""
    client, table = live
    alice = Recorded("alice")
    alice_id = table.add("ssh", alice)
    response = await client.post(f"/sessions/{alice_id}/kill", data="", headers=headers)
    assert response.status == 403 and "browsers" in (await response.json())["error"]
    assert alice.actions == []
    listing = await client.get("/sessions", headers=headers)
    assert listing.status == 403 and "alice" not in await listing.text()
    # The CLI's and the admin API's own requests still work.
    assert (await client.get("/sessions")).status == 200
    assert (await client.post(f"/sessions/{alice_id}/kill")).status == 200
    assert len(alice.actions) == 1
