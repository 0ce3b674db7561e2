"""The admin listener of ``edge serve`` as another local user sees it: loopback is reachable by
everyone on the machine, so listing and ending sessions needs the token derived from the secret
key, while ``edge sessions`` / ``edge status`` from the operator's shell need no extra flag."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from edge.directory.secrets import generate_key
from tests.test_serve import ROOT, EdgeServe, http_get, make_db

pytestmark = pytest.mark.timeout(120)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _config(tmp: Path, name: str, db_url: str, port: int) -> Path:
    key_file = tmp / f"{name}.key"
    key_file.write_text(generate_key() + "\n")
    key_file.chmod(0o600)
    path = tmp / f"{name}.toml"
    path.write_text(f'[database]\nurl = "{db_url}"\n[secrets]\nkey_file = "{key_file}"\n'
                    f'[admin]\nlisten = ["127.0.0.1:{port}"]\n[serve]\nworkers = 2\n')
    return path


def _edge(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_")}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-m", "edge.cli.main", "--config", str(config), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


def _request(url: str, method: str = "GET", token: str | None = None) -> int:
    request = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def test_local_users_without_the_key_cannot_list_or_kill_sessions(tmp_path: Path) -> None:
    db_url = make_db(tmp_path / "directory.sqlite3")
    port = _free_port()
    config = _config(tmp_path, "edge", db_url, port)
    serve = EdgeServe(tmp_path, config.read_text())
    try:
        serve.wait_line("admin")
        serve.wait_ready(30)
        # Anyone on the box: curl to 127.0.0.1 with no credentials, or a made-up token.
        for path, method in (("/sessions", "GET"), ("/sessions/1.1/kill", "POST"),
                             ("/status", "GET")):
            assert _request(serve.url(path), method) == 401, path
            assert _request(serve.url(path), method, token="0" * 64) == 401, path
        # Probes and the metrics scrape stay open (they carry no user data).
        assert http_get(serve.url("/healthz"))[0] == 200
        assert http_get(serve.url("/metrics"))[0] == 200

        # The operator's shell: the same configuration, no extra flag.
        listed = _edge(config, "sessions", "--json")
        assert listed.returncode == 0, listed.stderr
        assert json.loads(listed.stdout) == []
        status = _edge(config, "status", "--window", "0.2", "--json")
        assert status.returncode == 0, status.stderr

        # Someone with a key of their own (not edge serve's): refused, and told why, not
        # shown an empty list.
        other = _config(tmp_path, "other", db_url, port)
        refused = _edge(other, "sessions")
        assert refused.returncode != 0
        assert "admin token" in refused.stderr and "ID" not in refused.stdout
    finally:
        serve.stop(30)
        serve.kill()
