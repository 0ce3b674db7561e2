"""The access log of a real ``edge serve``: the default sink (the edge log on stderr) and
reopening a log file on SIGUSR1 (logrotate).

Requests go to a site that is not in the directory (404): every request is still logged, and
no backend is needed.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from httpproxy import accesslog
from tests.test_serve import ROOT, make_db, wait_for

pytestmark = [pytest.mark.timeout(90), pytest.mark.slow]


class Serve:
    """``edge serve`` with stderr on a pipe (as journald or a container runtime reads it)."""

    def __init__(self, tmp: Path, http: str, log: str = "") -> None:
        db_url = make_db(tmp / "directory.sqlite3")
        config = tmp / "edge.toml"
        config.write_text(f'[database]\nurl = "{db_url}"\n[admin]\nlisten = ["127.0.0.1:0"]\n'
                          f'[serve]\nworkers = 2\n[http]\nlisten = ["127.0.0.1:0"]\n{http}\n'
                          f"[log]\n{log}\n")
        env = {**os.environ, "PYTHONPATH": str(ROOT), "EDGE_PROXY_OVERRIDES": ""}
        env.pop("EDGE_CONFIG", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "import sys; from edge.cli.main import main; sys.exit(main())",
             "serve", "--config", str(config)], cwd=ROOT, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.stderr: list[bytes] = []
        threading.Thread(target=self._drain_stderr, daemon=True).start()
        assert self.proc.stdout is not None
        self.port = 0
        for raw in self.proc.stdout:
            line = raw.decode()
            if line.startswith("edge: http listening on"):
                self.port = int(line.rsplit(":", 1)[1])
                break
        assert self.port, b"".join(self.stderr).decode(errors="replace")[-2000:]

    def _drain_stderr(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            self.stderr.append(raw)

    def get(self, path: str) -> int:
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}",
                                         headers={"Host": "nowhere.example"})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return int(response.status)
        except urllib.error.HTTPError as exc:
            return exc.code

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=30)
        time.sleep(0.2)  # the stderr reader takes the last lines
        return code

    def access_lines(self) -> list[dict[str, object]]:
        return [record for record in map(json.loads, self.stderr)
                if record.get("logger") == "edge.http.access"]


def test_default_access_lines_are_whole_json_edge_log_lines_from_every_worker(tmp_path: Path) -> None:
    """The default sink writes each request as one JSON line of the edge log (the fields of
    every edge log line, ``ts`` as RFC 3339 text, the request's fields beside them); two
    workers writing long lines into one pipe never mix inside a line."""
    serve = Serve(tmp_path, "")
    try:
        paths = [f"/{n}/" + "p" * (900 + n % 97) for n in range(400)]  # under the 1 KiB cut
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            statuses = list(pool.map(serve.get, paths))
        assert set(statuses) == {404}
    finally:
        assert serve.stop() == 0
    for raw in serve.stderr:  # every line of the stream parses: nothing interleaved
        json.loads(raw)
    lines = serve.access_lines()
    assert sorted(str(r["path"]) for r in lines) == sorted(paths)
    first = lines[0]
    assert isinstance(first["ts"], str) and first["ts"].endswith("Z") and "T" in first["ts"]
    assert first["level"] == "info" and first["msg"] == "request"
    assert {r["worker"] for r in lines} <= {0, 1} and isinstance(first["pid"], int)
    assert first["status"] == 404 and first["host_header"] == "nowhere.example"
    assert first["method"] == "GET" and first["client"] == "127.0.0.1"


def test_no_access_lines_when_the_log_level_is_above_info(tmp_path: Path) -> None:
    serve = Serve(tmp_path, "", log='level = "warning"')
    try:
        assert serve.get("/quiet") == 404
    finally:
        assert serve.stop() == 0
    assert serve.access_lines() == []


def test_sigusr1_reopens_the_access_log_file_after_logrotate_moved_it(tmp_path: Path) -> None:
    """logrotate's ``postrotate kill -USR1``: lines after the signal go to a new file at the
    configured path; none is lost and the server keeps running."""
    path = tmp_path / "access.log"
    serve = Serve(tmp_path, f'access_log = "{path}"')
    try:
        assert serve.get("/before") == 404
        wait_for(lambda: path.exists() and b"/before" in path.read_bytes(), 5, "the first line")
        path.rename(tmp_path / "access.log.1")
        serve.proc.send_signal(signal.SIGUSR1)
        wait_for(lambda: path.exists(), 5, "the reopened file")
        assert serve.get("/after") == 404
        wait_for(lambda: b"/after" in path.read_bytes(), 5, "the line after the rotation")
        assert serve.proc.poll() is None
    finally:
        assert serve.stop() == 0
    assert b"/after" not in (tmp_path / "access.log.1").read_bytes()
    assert b"/before" not in path.read_bytes()


def test_stream_writes_are_whole_lines_within_pipe_buf(monkeypatch: pytest.MonkeyPatch) -> None:
    """What keeps lines whole on a shared pipe: each write holds whole lines and at most
    PIPE_BUF bytes, except a single longer line, written alone."""
    writes: list[bytes] = []
    real_write = os.write
    monkeypatch.setattr(accesslog.os, "write",
                        lambda fd, data: writes.append(bytes(data)) or real_write(fd, data))
    read_end, write_end = os.pipe()
    received: list[bytes] = []

    def read_all() -> None:
        while chunk := os.read(read_end, 1 << 16):
            received.append(chunk)

    reader = threading.Thread(target=read_all, daemon=True)
    reader.start()
    lines = [b"x" * (n * 37 % 900) + b"\n" for n in range(300)] + [b"y" * 9000 + b"\n"]
    try:
        accesslog._write_lines(write_end, b"".join(lines))
    finally:
        os.close(write_end)
        reader.join(5)
        os.close(read_end)
    assert b"".join(received) == b"".join(lines)
    for data in writes:
        assert data.endswith(b"\n")
        assert len(data) <= select.PIPE_BUF or data.count(b"\n") == 1
