"""``edge sessions`` / ``edge sessions kill`` / ``edge status`` against a real ``edge serve
--workers 2`` with the stock ssh client and a real sshd, ftplib with a pyftpdlib backend, and
aiohttp's WebSocket client with an aiohttp backend: every open session of every worker is
listed, and a kill shows the operator's message in each protocol's own way."""

from __future__ import annotations

import asyncio
import ftplib
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from edge.directory.secrets import generate_key
from edge.directory.service import DirectoryService
from edge.directory.stores import store_for_url
from tests.test_serve import ROOT, EdgeServe, wait_for
from tests.test_ssh_proxy import Sshd, keys, sshd  # noqa: F401 - module fixtures used below

pytestmark = pytest.mark.timeout(180)

FTP_USER, FTP_BACKEND_USER, FTP_PASSWORD = "bob", "bob_b", "pw-of-bob"
SECRET_KEY = generate_key()
"""edge serve's and the CLI's: the admin listener's live routes want the token derived from it."""

WS_BACKEND = """
import sys
from aiohttp import web

async def ws(request):
    sock = web.WebSocketResponse()
    await sock.prepare(request)
    async for msg in sock:
        await sock.send_str("echo:" + msg.data)
    return sock

async def hello(request):
    return web.Response(text="hello from web1")

async def main():
    app = web.Application()
    app.router.add_get("/ws", ws)
    app.router.add_get("/", hello)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    print("LISTENING", site._server.sockets[0].getsockname()[1], flush=True)
    await asyncio.Event().wait()

import asyncio
asyncio.run(main())
"""


async def _start(*args: str) -> tuple[asyncio.subprocess.Process, int]:
    """A backend subprocess that prints ``LISTENING PORT``."""
    process = await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.PIPE,
                                                   cwd=ROOT)
    assert process.stdout is not None
    line = await asyncio.wait_for(process.stdout.readline(), 30)
    assert line.startswith(b"LISTENING "), line
    return process, int(line.split()[1])


async def _provision(db_url: str, ssh: Sshd, ftp_port: int, ws_port: int, user_pub: str) -> None:
    store = store_for_url(db_url)
    await store.open()
    try:
        await store.migrate()
        service = DirectoryService(store)
        await service.add_host("web1", "127.0.0.1", ssh_port=ssh.port, ftp_port=ftp_port,
                               http_port=ws_port)
        await service.update_host("web1", ssh_known_hosts=ssh.host_pub)
        await service.add_host("web2", "127.0.0.1", http_port=ws_port)
        await service.add_tenant("acme", "web1")
        await service.add_account("alice", "acme", protocols=["ssh"],
                                  upstream_username=os.environ.get("USER") or "root",
                                  authorized_keys=user_pub)
        await service.add_account(FTP_USER, "acme", protocols=["ftp"],
                                  upstream_username=FTP_BACKEND_USER)
        await service.add_site("ws.acme.test", "acme")
    finally:
        await store.close()


async def edge_cli(serve: EdgeServe, *args: str, admin: bool = True) -> tuple[int, str, str]:
    host, port = serve.listeners["admin"][-1]
    extra = ("--admin", f"http://{host}:{port}") if admin else ()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "EDGE_SECRET_KEY": SECRET_KEY}
    env.pop("EDGE_CONFIG", None)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "edge.cli.main", *args, *extra,
        cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def sessions(serve: EdgeServe, *filters: str) -> list[dict[str, Any]]:
    code, out, err = await edge_cli(serve, "sessions", "--json", *filters)
    assert code == 0, err
    rows: list[dict[str, Any]] = json.loads(out)
    return rows


@pytest.fixture
async def stack(tmp_path: Path, keys: Path, sshd: Sshd) -> AsyncIterator[EdgeServe]:  # noqa: F811
    (tmp_path / "ftp-root").mkdir()
    ftp, ftp_port = await _start(sys.executable, "-m", "ftpproxy.devserver", "--root",
                                 str(tmp_path / "ftp-root"), "--name", "a", "--user",
                                 f"{FTP_BACKEND_USER}:{FTP_PASSWORD}")
    ws, ws_port = await _start(sys.executable, "-c", WS_BACKEND)
    db_url = f"sqlite:///{tmp_path / 'edge.sqlite3'}"
    await _provision(db_url, sshd, ftp_port, ws_port, (keys / "user.pub").read_text())
    config = (f'[database]\nurl = "{db_url}"\n[admin]\nlisten = ["127.0.0.1:0"]\n'
              f'[serve]\nworkers = 2\ngrace_period = 2.0\n'
              f'[ssh]\nlisten = ["127.0.0.1:0"]\nhost_key_dir = "{keys / "hostkeys"}"\n'
              f'[ftp]\nlisten = ["127.0.0.1:0"]\n[http]\nlisten = ["127.0.0.1:0"]\n')
    serve = EdgeServe(tmp_path, config, env={"EDGE_PROXY_OVERRIDES": "",
                                             "EDGE_SECRET_KEY": SECRET_KEY})
    try:
        serve.wait_line("admin")
        for name in ("ssh", "ftp", "http"):  # in whatever order they are printed
            if name not in serve.listeners:
                serve.wait_line(name)
        serve.wait_ready(30)
        yield serve
    finally:
        serve.stop(30)
        serve.kill()
        for process in (ftp, ws):
            process.kill()
            await process.wait()


def _ssh(serve: EdgeServe, key_dir: Path, command: str = "echo started; sleep 120",
         ) -> subprocess.Popen[str]:
    port = serve.listeners["ssh"][-1][1]
    return subprocess.Popen(
        ["ssh", "-F", "/dev/null", "-p", str(port), "-o", "StrictHostKeyChecking=no",
         "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
         "-o", "IdentityAgent=none", "-o", "LogLevel=ERROR", "-i", str(key_dir / "user"),
         "alice@127.0.0.1", command],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _ftp(serve: EdgeServe) -> ftplib.FTP:
    ftp = ftplib.FTP(timeout=30)
    ftp.connect("127.0.0.1", serve.listeners["ftp"][-1][1])
    ftp.login(FTP_USER, FTP_PASSWORD)
    return ftp


async def test_sessions_of_every_worker_are_listed_and_killed_with_a_message(
        stack: EdgeServe, keys: Path) -> None:  # noqa: F811
    serve = stack
    ssh_clients = [_ssh(serve, keys) for _ in range(3)]
    for client in ssh_clients:
        assert client.stdout is not None
        assert await asyncio.to_thread(client.stdout.readline) == "started\n"
    ftps = [await asyncio.to_thread(_ftp, serve) for _ in range(3)]
    http_port = serve.listeners["http"][-1][1]
    async with aiohttp.ClientSession() as session, session.ws_connect(
            f"http://127.0.0.1:{http_port}/ws", headers={"Host": "ws.acme.test"}) as ws:
        await ws.send_str("ping")
        assert (await asyncio.wait_for(ws.receive(), 10)).data == "echo:ping"

        rows = await sessions(serve)
        by_protocol = {p: [r for r in rows if r["protocol"] == p]
                       for p in ("ssh", "ftp", "websocket")}
        assert {p: len(v) for p, v in by_protocol.items()} == {"ssh": 3, "ftp": 3, "websocket": 1}
        assert len({r["id"] for r in rows}) == 7
        assert all(r["tenant"] == "acme" and r["host"] == "web1" for r in rows)
        assert all(r["client"].startswith("127.0.0.1:") and r["worker"] in (0, 1) for r in rows)
        assert {r["user"] for r in by_protocol["ssh"]} == {"alice"}
        assert {r["user"] for r in by_protocol["ftp"]} == {FTP_USER}
        assert by_protocol["websocket"][0]["user"] == "ws.acme.test"
        assert by_protocol["websocket"][0]["bytes_up"] > 0  # the ping went up
        assert all(r["bytes_down"] > 0 for r in by_protocol["ssh"])  # "started" came down
        # The ids name the worker pid: sessions of both workers are in one listing.
        assert {r["id"].split(".")[0] for r in rows} <= {str(p) for p in _worker_pids(serve)}

        # A second USER/PASS on a logged-in FTP connection is one session, not two.
        await asyncio.to_thread(ftps[2].login, FTP_USER, FTP_PASSWORD)
        assert len(await sessions(serve, "--protocol", "ftp")) == 3
        by_protocol["ftp"] = await sessions(serve, "--protocol", "ftp")

        # Filters.
        assert [r["user"] for r in await sessions(serve, "--user", "alice")] == ["alice"] * 3
        assert await sessions(serve, "--host", "web9") == []
        code, text, _ = await edge_cli(serve, "sessions")
        assert code == 0 and text.splitlines()[0].split()[:3] == ["ID", "PROTO", "USER"]
        assert len(text.splitlines()) == 8

        # SSH: the message reaches the user (stderr of the open session / disconnect reason).
        victim = by_protocol["ssh"][0]
        code, _, err = await edge_cli(serve, "sessions", "kill", victim["id"], "--message",
                                      "disk swap on web1, back at 06:00")
        assert code == 0, err
        killed = await asyncio.to_thread(
            wait_for, lambda: [c for c in ssh_clients if c.poll() is not None], 15, "ssh end")
        assert len(killed) == 1
        _, err = killed[0].communicate(timeout=10)
        assert killed[0].returncode == 255 and "disk swap on web1, back at 06:00" in err

        # FTP: a 421 with the message.
        ftp_victim = by_protocol["ftp"][0]
        code, _, err = await edge_cli(serve, "sessions", "kill", ftp_victim["id"], "--message",
                                      "FTP closed for maintenance")
        assert code == 0, err
        replies = []
        for ftp in ftps:
            try:
                replies.append(await asyncio.to_thread(ftp.voidcmd, "NOOP"))
            except ftplib.error_temp as exc:
                replies.append(f"ERR {exc}")
        assert [r for r in replies if r.startswith("ERR")] == ["ERR 421 FTP closed for maintenance"]

        # WebSocket: a close frame 1001 with the message.
        code, _, err = await edge_cli(serve, "sessions", "kill", by_protocol["websocket"][0]["id"])
        assert code == 0, err
        msg = await asyncio.wait_for(ws.receive(), 10)
        assert msg.type == aiohttp.WSMsgType.CLOSE
        assert msg.data == 1001 and msg.extra == "This session was closed by an administrator."

    # Gone from the listing (the WebSocket client closed its side too).
    left = await asyncio.to_thread(wait_for, lambda: _count(serve) == 4 or None, 20, "4 left")
    assert left
    # Unknown / already killed ids: exit 3 with the reason; a message with a newline: refused.
    code, _, err = await edge_cli(serve, "sessions", "kill", victim["id"])
    assert code == 3 and "no live session" in err
    code, _, err = await edge_cli(serve, "sessions", "kill", "nonsense")
    assert code == 3
    remaining = (await sessions(serve))[0]["id"]
    code, _, err = await edge_cli(serve, "sessions", "kill", remaining, "--message", "a\nb")
    assert code == 2 and "one line" in err

    # edge status: workers, sessions per listener, database up.
    code, out, err = await edge_cli(serve, "status", "--json", "--window", "0.5")
    assert code == 0, err
    status = json.loads(out)
    assert status["workers_up"] == 2 and status["workers_expected"] == 2
    assert status["database_up"] is True and status["stale_serving"] is False
    assert status["lookup_latency_ms"] is not None
    listeners = {row["name"]: row for row in status["listeners"]}
    assert set(listeners) == {"ssh", "ftp", "http"}
    assert listeners["ssh"]["active_sessions"] == 2 and listeners["ftp"]["active_sessions"] == 2
    code, out, _ = await edge_cli(serve, "status")
    assert code == 0 and "workers:        2/2 up" in out and "database:       up" in out

    for client in ssh_clients:
        client.kill()
        client.wait()
    for ftp in ftps:
        ftp.close()


async def test_maintenance_window_is_shown_by_all_three_protocols_and_ends_by_itself(
        stack: EdgeServe, keys: Path, tmp_path: Path) -> None:  # noqa: F811
    serve = stack
    notice = "web1 gets new disks until 06:00 UTC"
    db_url = f"sqlite:///{tmp_path / 'edge.sqlite3'}"
    code, out, err = await edge_cli(serve, "host", "set-state", "web1", "maintenance",
                                    "--until", "+6s", "--notice", notice, "--database", db_url,
                                    "--json", admin=False)
    assert code == 0, err
    until = json.loads(out)["maintenance_until"]
    assert 0 < until - time.time() <= 6
    await asyncio.sleep(2.5)  # the change feed polls once a second

    ssh = await asyncio.to_thread(_ssh_once, serve, keys)
    assert ssh.returncode == 255 and notice in ssh.stderr
    with pytest.raises(ftplib.error_temp, match=f"421 {notice}"):
        await asyncio.to_thread(_ftp, serve)
    status, headers, body = await _http(serve)
    assert status == 503 and notice in body
    assert 0 < int(headers["Retry-After"]) <= 6

    # No directory change: the window ends at --until on every worker.
    await asyncio.sleep(max(0.0, until + 0.2 - time.time()))
    ssh = await asyncio.to_thread(_ssh_once, serve, keys)
    assert ssh.returncode == 0 and ssh.stdout == "started\n", ssh.stderr
    ftp = await asyncio.to_thread(_ftp, serve)
    ftp.quit()
    status, _, body = await _http(serve)
    assert status == 200 and body == "hello from web1"


async def test_an_open_websocket_is_drained_when_its_tenant_moves(
        stack: EdgeServe, tmp_path: Path) -> None:
    serve = stack
    db_url = f"sqlite:///{tmp_path / 'edge.sqlite3'}"
    http_port = serve.listeners["http"][-1][1]
    async with aiohttp.ClientSession() as session, session.ws_connect(
            f"http://127.0.0.1:{http_port}/ws", headers={"Host": "ws.acme.test"}) as ws:
        await ws.send_str("ping")
        assert (await asyncio.wait_for(ws.receive(), 10)).data == "echo:ping"
        code, _, err = await edge_cli(serve, "host", "drain", "web1", "--to", "web2", "--drain",
                                      "2s", "--database", db_url, admin=False)
        assert code == 0, err
        moved_at = time.monotonic()
        msg = await asyncio.wait_for(ws.receive(), 15)
        waited = time.monotonic() - moved_at
        assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 1001
        assert msg.extra == "This account has moved to another server; please reconnect."
        assert waited > 0.5  # at the move's drain deadline, not at once
    assert await asyncio.to_thread(wait_for, lambda: _count(serve) == 0 or None, 20, "none left")


def _ssh_once(serve: EdgeServe, key_dir: Path) -> subprocess.CompletedProcess[str]:
    client = _ssh(serve, key_dir, command="echo started")
    out, err = client.communicate(timeout=60)
    return subprocess.CompletedProcess(client.args, client.returncode, out, err)


async def _http(serve: EdgeServe) -> tuple[int, dict[str, str], str]:
    port = serve.listeners["http"][-1][1]
    async with aiohttp.ClientSession() as session, session.get(
            f"http://127.0.0.1:{port}/", headers={"Host": "ws.acme.test"}) as response:
        return response.status, dict(response.headers), await response.text()


def _count(serve: EdgeServe) -> int:
    async def go() -> int:
        return len(await sessions(serve))
    return asyncio.run(go())


def _worker_pids(serve: EdgeServe) -> set[int]:
    children = Path(f"/proc/{serve.proc.pid}/task/{serve.proc.pid}/children").read_text()
    return {int(p) for p in children.split()}


async def test_admin_listener_unreachable_is_a_clear_error(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("EDGE_CONFIG", None)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "edge.cli.main", "sessions", "--admin", "http://127.0.0.1:9",
        cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 5
    assert b"no answer from the admin listener at http://127.0.0.1:9/sessions" in err
