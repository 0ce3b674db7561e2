"""`edge demo` as a newcomer runs it (the README's first command, minus the venv set-up), and
the commands it prints and the README's operating section, pasted into a fresh shell.

The demo listens on fixed, documented ports (so its printed commands can be pasted); the test
skips when one of them is taken on this machine rather than fight over it.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
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


async def _asyncssh_hostname(known_hosts: Path) -> str:
    async with asyncssh.connect("127.0.0.1", 2222, username="demo", password="demo",
                                known_hosts=str(known_hosts)) as conn:
        result = await conn.run("hostname", check=True)
        return str(result.stdout).strip()


def fresh_shell(tmp_path: Path) -> dict[str, str]:
    """The environment of a new terminal: no activated virtualenv, no EDGE_* variables."""
    (tmp_path / "home").mkdir(exist_ok=True)
    return {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": str(tmp_path / "home"), "XDG_CONFIG_HOME": str(tmp_path / "home" / ".config"),
            "LANG": "C.UTF-8", "TERM": "dumb"}


def paste(line: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run one command line as a user pasting it into bash, in the repository."""
    return subprocess.run(["bash", "-c", line], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def _printed(output: str, marker: str) -> list[str]:
    """The command lines of the demo banner containing ``marker``, without the label column
    and the explanation in parentheses after them."""
    found = []
    for line in output.splitlines():
        if marker not in line:
            continue
        command = re.sub(r"^\s*[a-z ]+:\s{2,}", "", line).strip()
        command = re.split(r"\s{2,}\(", command)[0]
        found.append(command)
    return found


def _ssh_backend(output: str, demo_dir: Path, env: dict[str, str]) -> str:
    """Which backend the demo's SSH login reaches, the way its banner says to ask."""
    if (demo_dir / "ssh" / "client_key").exists():  # real sshd backends
        [line] = _printed(output, "echo $EDGE_DEMO_BACKEND")
        proc = paste(line.replace("ssh ", "ssh -o BatchMode=yes ", 1), env)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip()
    return asyncio.run(_asyncssh_hostname(demo_dir / "ssh" / "known_hosts"))


def _eventually(check: object, want: str, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    got = ""
    while time.monotonic() < deadline:
        got = check()  # type: ignore[operator]
        if want in got:
            return got
        time.sleep(0.3)
    raise AssertionError(f"{want!r} not in {got!r}")


def _start_demo(demo_dir: Path, log_path: Path, *extra: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("EDGE_CONFIG", None)
    env.pop("EDGE_DATABASE_URL", None)
    log = log_path.open("wb")  # a file, not a pipe: the demo logs more than a pipe buffers
    try:
        return subprocess.Popen([*EDGE, "demo", "--dir", str(demo_dir), *extra],
                                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    finally:
        log.close()


def _stop_demo(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    proc.wait(timeout=60)
    # The demo's backends stop with it: every port is free again.
    deadline = time.monotonic() + 15
    while [p for p in DEMO_PORTS if not _port_free(p)] and time.monotonic() < deadline:
        time.sleep(0.3)
    assert [p for p in DEMO_PORTS if not _port_free(p)] == []


def _banner(log_path: Path, timeout: float = 60) -> str:
    for port in (8000, 2222, 2121):  # serving, not only printed
        _wait_port(port)
    deadline = time.monotonic() + timeout
    while "Ctrl-C stops the demo" not in log_path.read_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    return log_path.read_text()


def test_demo_serves_every_protocol_and_follows_a_move(tmp_path: Path) -> None:
    taken = [p for p in DEMO_PORTS if not _port_free(p)]
    if taken:
        pytest.skip(f"demo ports in use on this machine: {taken}")
    demo_dir = tmp_path / "demo"
    shell = fresh_shell(tmp_path)
    log_path = tmp_path / "demo.log"
    proc = _start_demo(demo_dir, log_path, "--duration", "120")
    try:
        for port in (8000, 8400, 2222, 2121, 8081, 8082, 2101, 2102, 2201, 2202):
            _wait_port(port)
        output = _banner(log_path)
        assert "backend demo-a" in _eventually(lambda: _http("shop.demo.test"), "demo-a")
        assert "demo-b" in _http("www.other.test")
        assert "demo-a" in _http("www.demo.test", 8400, tls=True)
        assert "demo-a" in _eventually(_ftp_hello, "demo-a")
        assert _ssh_backend(output, demo_dir, shell) == "demo-a"

        # Every `edge` line the banner prints works when pasted into a new terminal in the
        # repository (no `edge: command not found`), the move last.
        edge_lines = _printed(output, " --config ")
        assert len(edge_lines) >= 8 and any("tenant move demo --to demo-b" in c
                                            for c in edge_lines), output
        for line in sorted(edge_lines, key=lambda c: "tenant move" in c):
            pasted = paste(line, shell)
            assert pasted.returncode == 0, (line, pasted.stderr)
        _eventually(lambda: _http("shop.demo.test"), "demo-b")
        _eventually(_ftp_hello, "demo-b")
        assert _ssh_backend(output, demo_dir, shell) == "demo-b"
        if (demo_dir / "ssh" / "client_key").exists():
            _real_sshd_tools(output, shell, tmp_path)
    finally:
        _stop_demo(proc)
    output = log_path.read_text()
    assert re.search(r"curl .*http://127\.0\.0\.1:8000/", output), output
    assert "ssh " in output and "ftp://" in output

    # A restart shows where the tenant is now (demo-b), not the first run's layout ...
    proc = _start_demo(demo_dir, log_path, "--duration", "60")
    try:
        again = _banner(log_path)
        assert "matched by *.demo.test -> demo-b" in again
        assert "tenant move demo --to demo-a" in again and "(backend demo-b)" in again
    finally:
        _stop_demo(proc)
    # ... and --reset starts from scratch.
    proc = _start_demo(demo_dir, log_path, "--reset", "--duration", "60")
    try:
        fresh = _banner(log_path)
        assert "matched by *.demo.test -> demo-a" in fresh
        assert "tenant move demo --to demo-b" in fresh
    finally:
        _stop_demo(proc)


def _real_sshd_tools(output: str, shell: dict[str, str], tmp_path: Path) -> None:
    """With openssh-server installed the demo backend is a real sshd: scp and rsync work
    through the proxy exactly as printed."""
    [scp] = _printed(output, "scp ")
    proc = paste(scp.replace("scp ", "scp -o BatchMode=yes ", 1), shell)
    assert proc.returncode == 0, proc.stderr
    copied = Path("/tmp/edge-demo-README.md")
    assert copied.read_bytes() == (ROOT / "README.md").read_bytes()
    copied.unlink()
    [rsync] = _printed(output, "rsync ")
    proc = paste(rsync, shell)
    assert proc.returncode == 0, proc.stderr
    assert (Path("/tmp/edge-demo-docs") / "architecture.md").exists()
    shutil.rmtree("/tmp/edge-demo-docs")


def _operating_commands() -> list[str]:
    """The README's "Operating it" block as logical command lines (continuations joined)."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Operating it", 1)[1]
    block = section.split("```sh", 1)[1].split("```", 1)[0]
    commands, pending = [], ""
    for raw in block.splitlines():
        line = raw.split("  #", 1)[0].rstrip() if not raw.lstrip().startswith("#") else ""
        if not line.strip():
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        commands.append((pending + line).strip())
        pending = ""
    return commands


def test_readme_operating_commands_run_in_a_fresh_shell(tmp_path: Path) -> None:
    """Pasted one by one into a new terminal in the repository (the block's own set-up lines
    first), no command is "not found", and each fails, if at all, with one `edge: error:`
    line (files like alice.pub are the reader's). `edge serve` and `edge host pin-ssh-key`,
    which would serve forever or dial the example's backends, are checked with --help."""
    commands = _operating_commands()
    setup = [c for c in commands
             if c.startswith(("export ", "source ", ". ", "PATH=", "mkdir ", "cd "))]
    assert setup and any("EDGE_DATABASE_URL" in c for c in setup)
    shell = fresh_shell(tmp_path)
    results = {}
    for command in commands:
        if command in setup:
            continue
        if command.startswith(("edge serve", "edge host pin-ssh-key")):
            command += " --help"
        proc = paste("; ".join([*setup, command]), shell)
        results[command] = proc
        assert proc.returncode != 127 and "command not found" not in proc.stderr, command
        if proc.returncode:
            assert proc.stderr.startswith("edge: error: "), (command, proc.stderr)
    assert results["edge init"].returncode == 0
    assert "created" in results["edge init"].stdout  # the secret key file
    assert results["edge tenant add acme --host web1"].returncode == 0
    assert results["edge tenant move acme --to web2 --drain 15m"].returncode == 0
    assert (tmp_path / "home" / "edge-lab" / "edge.sqlite3").exists()
