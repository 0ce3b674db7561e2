"""The shipped systemd units (config/systemd/): valid for systemd, hardened, schema migration
split from serving, and `edge serve` refusing a directory it cannot read."""

from __future__ import annotations

import asyncio
import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edge.directory.schema import MIGRATIONS, MIGRATIONS_TABLE, render
from edge.directory.stores import store_for_url

ROOT = Path(__file__).resolve().parent.parent
UNITS = ROOT / "config" / "systemd"


def _unit(name: str) -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    parser.read_string((UNITS / name).read_text())
    return parser


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
@pytest.mark.parametrize("name", ["edge.service", "edge-migrate.service"])
def test_units_pass_systemd_analyze_verify(name: str, tmp_path: Path) -> None:
    """`systemd-analyze verify` checks every directive and that the command exists. The unit
    names plain `edge` (systemd's search path); here it is installed in a virtualenv, which is
    what the documented drop-in does: replace the command by the venv's absolute path."""
    edge = Path(sys.executable).parent / "edge"
    assert edge.exists(), "the project is installed in this venv with its `edge` script"
    text = (UNITS / name).read_text()
    assert "/usr/local/bin" not in text.split("[Unit]")[1]  # no hard-coded install location
    (tmp_path / name).write_text(text.replace("ExecStart=edge ", f"ExecStart={edge} "))
    proc = subprocess.run(["systemd-analyze", "verify", str(tmp_path / name)],
                          capture_output=True, text=True, timeout=60)
    # Unknown or misspelt directives are only warnings for systemd: any output is a failure.
    problems = [line for line in proc.stderr.splitlines() if name in line or "Unknown" in line]
    assert proc.returncode == 0 and not problems, proc.stderr


def test_serving_never_migrates_and_migration_is_its_own_oneshot() -> None:
    edge = _unit("edge.service")["Service"]
    migrate = _unit("edge-migrate.service")["Service"]
    assert edge["ExecStart"] == "edge serve"
    assert "ExecStartPre" not in edge  # no schema change at every (re)start
    assert (migrate["Type"], migrate["ExecStart"]) == ("oneshot", "edge migrate")
    assert edge["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert int(edge["LimitNOFILE"]) >= 65536
    assert edge["AmbientCapabilities"] == edge["CapabilityBoundingSet"] == "CAP_NET_BIND_SERVICE"
    for directive, value in (("NoNewPrivileges", "true"), ("ProtectSystem", "strict"),
                             ("PrivateTmp", "true"), ("ProtectHome", "true")):
        assert edge[directive] == value and migrate[directive] == value, directive
    assert edge["User"] == migrate["User"] == "edge"


def test_serve_refuses_a_directory_older_than_itself(tmp_path: Path) -> None:
    """What edge-migrate.service exists for: new code on an unmigrated directory says what to
    run instead of failing on its first lookup."""
    url = f"sqlite:///{tmp_path / 'old.sqlite3'}"

    async def create_version_1() -> None:
        store = store_for_url(url)
        await store.open()
        async with store.transaction() as tx:
            await tx.execute(MIGRATIONS_TABLE["sqlite"])
            for statement in MIGRATIONS[0][2]:
                await tx.execute(render(statement, "sqlite"))
            await tx.execute("INSERT INTO schema_migrations VALUES (1, 'v1', 0)")
        await store.close()

    asyncio.run(create_version_1())
    config = tmp_path / "edge.toml"
    config.write_text(f'[database]\nurl = "{url}"\n[admin]\nlisten = ["127.0.0.1:0"]\n')
    edge = [sys.executable, "-m", "edge.cli.main", "--config", str(config)]
    proc = subprocess.run([*edge, "serve"], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "schema version 1, this edge needs" in proc.stderr
    assert "run `edge migrate`" in proc.stderr
    assert subprocess.run([*edge, "migrate"], capture_output=True, timeout=60).returncode == 0
