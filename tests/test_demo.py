"""`edge demo` as a newcomer runs it (the README's first command, minus the venv set-up).

The demo listens on fixed, documented ports (so its printed commands can be pasted); the test
skips when one of them is taken on this machine rather than fight over it.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import asyncssh
import pytest

ROOT = Path(__file__).resolve().parent.parent
EDGE = [sys.executable, "-c", "import sys; from edge.cli.main import main; sys.exit(main())"]
DEMO_PORTS = (8000, 8400, 2222, 2121, 8081, 8082, 2101, 2102, 2201, 2202)


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _wait_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"nothing listens on {port}")


def _http(host: str, port: int = 8000, tls: bool = False) -> str:
    if tls:
        out = subprocess.run(["curl", "-sk", "--resolve", f"{host}:{port}:127.0.0.1",
                              f"https://{host}:{port}/"], capture_output=True, timeout=20)
        return out.stdout.decode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/", headers={"Host": host})
    with urllib.request.urlopen(request, timeout=10) as response:
        return str(response.read().decode())


def _ftp_hello() -> str:
    out = subprocess.run(["curl", "-s", "ftp://demo:demo@127.0.0.1:2121/hello.txt"],
                         capture_output=True, timeout=30)
    return out.stdout.decode()


async def _ssh_hostname(known_hosts: Path) -> str:
    async with asyncssh.connect("127.0.0.1", 2222, username="demo", password="demo",
                                known_hosts=str(known_hosts)) as conn:
        result = await conn.run("hostname", check=True)
        return str(result.stdout).strip()


def _eventually(check: object, want: str, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    got = ""
    while time.monotonic() < deadline:
        got = check()  # type: ignore[operator]
        if want in got:
            return got
        time.sleep(0.3)
    raise AssertionError(f"{want!r} not in {got!r}")


def test_demo_serves_every_protocol_and_follows_a_move(tmp_path: Path) -> None:
    taken = [p for p in DEMO_PORTS if not _port_free(p)]
    if taken:
        pytest.skip(f"demo ports in use on this machine: {taken}")
    demo_dir = tmp_path / "demo"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("EDGE_CONFIG", None)
    env.pop("EDGE_DATABASE_URL", None)
    log_path = tmp_path / "demo.log"
    log = log_path.open("wb")  # a file, not a pipe: the demo logs more than a pipe buffers
    proc = subprocess.Popen([*EDGE, "demo", "--dir", str(demo_dir), "--duration", "90"],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        for port in (8000, 8400, 2222, 2121, 8081, 8082, 2101, 2102, 2201, 2202):
            _wait_port(port)
        assert "backend demo-a" in _eventually(lambda: _http("shop.demo.test"), "demo-a")
        assert "demo-b" in _http("www.other.test")
        assert "demo-a" in _http("www.demo.test", 8400, tls=True)
        assert "demo-a" in _eventually(_ftp_hello, "demo-a")
        known_hosts = demo_dir / "ssh" / "known_hosts"
        assert "demo-a" in asyncio.run(_ssh_hostname(known_hosts))

        config = demo_dir / "edge.toml"
        if Path("/usr/bin/pebble").exists():  # the local CA issues secure.demo.test
            def issued() -> str:
                status = subprocess.run([*EDGE, "--config", str(config), "cert", "status"],
                                        cwd=ROOT, env=env, capture_output=True, timeout=30)
                return status.stdout.decode()
            assert "valid" in _eventually(issued, "secure.demo.test  valid", 30)
            secure = subprocess.run(
                ["curl", "-sS", "--cacert", str(demo_dir / "pebble-root.pem"), "--resolve",
                 "secure.demo.test:8400:127.0.0.1", "https://secure.demo.test:8400/"],
                capture_output=True, timeout=20)
            assert b"demo-a" in secure.stdout, secure.stderr
        moved = subprocess.run([*EDGE, "--config", str(config),
                                "tenant", "move", "demo", "--to", "demo-b"],
                               cwd=ROOT, env=env, capture_output=True, timeout=30)
        assert moved.returncode == 0, moved.stderr
        _eventually(lambda: _http("shop.demo.test"), "demo-b")
        _eventually(_ftp_hello, "demo-b")
        assert "demo-b" in asyncio.run(_ssh_hostname(known_hosts))
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        log.close()
    output = log_path.read_text()
    assert re.search(r"curl .*http://127\.0\.0\.1:8000/", output), output
    assert "ssh " in output and "ftp://" in output
    # The demo's backends stop with it: every port is free again.
    deadline = time.monotonic() + 15
    while [p for p in DEMO_PORTS if not _port_free(p)] and time.monotonic() < deadline:
        time.sleep(0.3)
    assert [p for p in DEMO_PORTS if not _port_free(p)] == []
