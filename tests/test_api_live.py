"""The admin API and console next to a real ``edge serve --workers 2``: live sessions of
every worker listed through the API (``sessions`` scope), one closed with a message the FTP
user sees (421), the console's fleet page showing sessions per host and the edge's metrics,
and a tenant move through the API reaching the running proxies via the change feed.

Real parts: ``edge serve`` and ``edge admin serve`` subprocesses, a pyftpdlib backend, stock
ftplib clients, SQLite directory.
"""

from __future__ import annotations

import asyncio
import ftplib
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from edge.directory.secrets import generate_key
from edge.directory.service import DirectoryService
from edge.directory.stores import store_for_url
from edge.directory.tokens import TokenService
from tests.test_api_console import CHROMIUM, shots
from tests.test_live_sessions import FTP_BACKEND_USER, FTP_PASSWORD, FTP_USER, _start
from tests.test_serve import ROOT, EdgeServe

pytestmark = pytest.mark.timeout(120)
__all__ = ["shots"]  # the fixture, re-exported for pytest


@dataclass
class Stack:
    serve: EdgeServe
    api: str
    token: str
    """read, write and sessions."""


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    backends = []
    for name in ("a", "b"):
        (tmp_path / f"ftp-{name}").mkdir()
    (tmp_path / "ftp-b" / "on-web2.txt").write_text("web2\n")
    for name in ("a", "b"):
        backends.append(await _start(sys.executable, "-m", "ftpproxy.devserver", "--root",
                                     str(tmp_path / f"ftp-{name}"), "--name", name, "--user",
                                     f"{FTP_BACKEND_USER}:{FTP_PASSWORD}"))
    db_url = f"sqlite:///{tmp_path / 'edge.sqlite3'}"
    store = store_for_url(db_url)
    await store.open()
    await store.migrate()
    service = DirectoryService(store)
    for host, (_, port) in zip(("web1", "web2"), backends, strict=True):
        await service.add_host(host, "127.0.0.1", ftp_port=port)
    await service.add_tenant("acme", "web1")
    await service.add_account(FTP_USER, "acme", protocols=["ftp"],
                              upstream_username=FTP_BACKEND_USER)
    token = (await TokenService(store).add("ops", "read,write,sessions")).secret
    await store.close()
    key_file = tmp_path / "secret.key"  # edge serve's and the API's: the admin token comes from it
    key_file.write_text(generate_key())
    secrets = f'[secrets]\nkey_file = "{key_file}"\n'
    config = (f'[database]\nurl = "{db_url}"\n{secrets}[admin]\nlisten = ["127.0.0.1:0"]\n'
              f'[serve]\nworkers = 2\ngrace_period = 2.0\n[ftp]\nlisten = ["127.0.0.1:0"]\n')
    serve = EdgeServe(tmp_path, config, env={"EDGE_PROXY_OVERRIDES": ""})
    try:
        serve.wait_line("admin")
        serve.wait_line("ftp")
        serve.wait_ready(30)
        admin_host, admin_port = serve.listeners["admin"][-1]
        # The API reads [admin] listen to find this edge: give it the port serve bound.
        api_config = tmp_path / "api.toml"
        api_config.write_text(f'[database]\nurl = "{db_url}"\n{secrets}[admin]\nlisten = '
                              f'["{admin_host}:{admin_port}"]\n[api]\nlisten = ["127.0.0.1:0"]\n')
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_")}
        api_proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "edge.cli.main", "admin", "serve", "--config", str(api_config),
            cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE)
        assert api_proc.stdout is not None
        line = (await asyncio.wait_for(api_proc.stdout.readline(), 30)).decode()
        api = line.split(" on ", 1)[1].split("/api/v1", 1)[0]
        try:
            yield Stack(serve, api, token)
        finally:
            api_proc.terminate()
            assert await asyncio.wait_for(api_proc.wait(), 20) == 0
    finally:
        serve.stop(30)
        serve.kill()
        for process, _ in backends:
            process.kill()
            await process.wait()


def _ftp(serve: EdgeServe) -> ftplib.FTP:
    ftp = ftplib.FTP(timeout=30)
    ftp.connect("127.0.0.1", serve.listeners["ftp"][-1][1])
    ftp.login(FTP_USER, FTP_PASSWORD)
    return ftp


async def screenshot_fleet(stack: Stack, shots: Path) -> None:
    """The fleet page in Chromium with live numbers (docs/console-fleet-live.png)."""
    from playwright.async_api import async_playwright

    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = await browser.new_page(viewport={"width": 1200, "height": 800})
        await page.goto(stack.api + "/console/login")
        await page.fill("input[name=token]", stack.token)
        async with page.expect_navigation():
            await page.click("main button")
        assert "FTP sessions open" in await page.inner_text("main")
        await page.screenshot(path=str(shots / "console-fleet-live.png"), full_page=True)
        await browser.close()


async def test_sessions_kill_console_and_move_against_a_running_edge(stack: Stack,
                                                                     shots: Path) -> None:
    auth = {"Authorization": f"Bearer {stack.token}"}
    ftps = [await asyncio.to_thread(_ftp, stack.serve) for _ in range(2)]
    async with aiohttp.ClientSession(headers=auth) as http:
        async with http.get(f"{stack.api}/api/v1/sessions?protocol=ftp") as response:
            assert response.status == 200
            listing = await response.json()
        rows = listing["sessions"]
        assert listing["errors"] == [] and len(rows) == 2
        assert {(r["user"], r["tenant"], r["host"]) for r in rows} == {(FTP_USER, "acme", "web1")}

        # The console's fleet page: sessions per host and this edge's numbers.
        async with http.get(f"{stack.api}/console/", headers={
                "Cookie": f"edge_console={stack.token}"}) as response:
            page = await response.text()
        # web1: 1 tenant, 2 live sessions (web2: none of either)
        assert ('>web1</a></td><td>127.0.0.1</td><td><span class="state-active">active</span>'
                "</td><td>1</td><td>2</td>") in page
        assert ('>web2</a></td><td>127.0.0.1</td><td><span class="state-active">active</span>'
                "</td><td>0</td><td>0</td>") in page
        assert "FTP sessions open" in page and "(2 workers)" in page

        await screenshot_fleet(stack, shots)

        async with http.post(f"{stack.api}/api/v1/sessions/{rows[0]['id']}/kill",
                             json={"message": "moving you to a faster host"}) as response:
            assert response.status == 200, await response.text()
        replies = []
        for ftp in ftps:
            try:
                replies.append(await asyncio.to_thread(ftp.voidcmd, "NOOP"))
            except ftplib.error_temp as exc:
                replies.append(f"ERR {exc}")
        assert [r for r in replies if r.startswith("ERR")] == [
            "ERR 421 moving you to a faster host"]
        async with http.post(f"{stack.api}/api/v1/sessions/{rows[0]['id']}/kill",
                             json={}) as response:
            assert response.status == 404

        # A move through the API: new FTP logins land on web2's backend within the change
        # feed's poll interval (the marker file exists only in web2's root).
        async with http.post(f"{stack.api}/api/v1/tenants/acme/move",
                             json={"to": "web2", "drain_seconds": 0}) as response:
            assert response.status == 202
        listing = []
        for _ in range(50):
            ftp = await asyncio.to_thread(_ftp, stack.serve)
            listing = await asyncio.to_thread(ftp.nlst)
            ftp.close()
            if "on-web2.txt" in listing:
                break
            await asyncio.sleep(0.2)
        assert "on-web2.txt" in listing
    for ftp in ftps:
        ftp.close()


def test_the_api_cpu_benchmark_runs_small() -> None:
    """``python -m benchmarks.apicpu`` against the real ``edge admin serve`` (tiny: the
    figures in benchmarks/README.md come from the full run)."""
    import shutil
    import subprocess

    if shutil.which("wrk") is None:
        pytest.skip("wrk is not installed")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.apicpu", "--hosts", "2",
                           "--tenants", "50", "--seconds", "1", "--connections", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = [line.split() for line in proc.stdout.splitlines() if line.startswith("/api/")]
    assert len(rows) == 5 and all(int(r[1]) > 0 and float(r[2]) > 0 for r in rows), proc.stdout
