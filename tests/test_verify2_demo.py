"""``edge demo`` that fails half-way through starting its parts leaves nothing running."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edge.demo import DemoPart, load_parts


def starts_a_backend(demo_dir: Path) -> DemoPart:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    (demo_dir / "backend.pid").write_text(str(proc.pid))
    return DemoPart(config="", commands="", processes=[proc])


def fails_to_start(demo_dir: Path) -> DemoPart:
    raise AssertionError("pebble did not start")  # what edge.acme.demo raised here


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A terminated child not yet reaped by anyone is a zombie: not running.
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"


def test_a_part_that_fails_stops_the_backends_already_started(tmp_path: Path) -> None:
    # Seen: pebble lost its management port to another process; the HTTP/SSH/FTP demo
    # backends stayed up, and every later `./dev demo` said "127.0.0.1:2201 is in use".
    module = Path(__file__).stem
    sys.modules.setdefault(module, sys.modules[__name__])
    with pytest.raises(AssertionError, match="pebble"):
        load_parts(tmp_path, (f"{module}:starts_a_backend", f"{module}:fails_to_start"))
    pid = int((tmp_path / "backend.pid").read_text())
    try:
        deadline = time.monotonic() + 10
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(pid), "the demo backend is still running"
    finally:
        if _alive(pid):
            os.kill(pid, 9)
