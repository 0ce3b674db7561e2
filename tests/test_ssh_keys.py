"""SSH proxy keys and pins as an operator handles them: `edge init` makes the proxy's keys once
and never replaces them; `edge host pin-ssh-key` fetches a real sshd's host keys and pins them."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import asyncssh
import pytest

from edge.config import SshConfig
from edge.directory.stores import store_for_url
from sshproxy.hostkeys import ensure_keys, load_host_keys, parse_pinned_keys, pinned_lines
from tests.test_ssh_proxy import SSHD, start_sshd


def edge_cli(tmp: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_")}
    env["EDGE_DATABASE_URL"] = f"sqlite:///{tmp / 'edge.sqlite3'}"
    return subprocess.run([sys.executable, "-m", "edge.cli.main", *args], env=env, cwd=tmp,
                          capture_output=True, text=True, timeout=60, input=stdin)


def test_edge_init_creates_ssh_keys_once_and_never_replaces_them(tmp_path: Path) -> None:
    config = tmp_path / "edge.toml"
    config.write_text('[ssh]\nlisten = ["127.0.0.1:0"]\nhost_key_dir = "keys"\n')
    first = edge_cli(tmp_path, "init", "--config", str(config))
    assert first.returncode == 0, first.stderr
    files = {p.name: p.read_bytes() for p in (tmp_path / "keys").iterdir()}
    assert {"ssh_host_ed25519_key", "ssh_host_ecdsa_key", "ssh_host_rsa_key", "upstream_key"} <= set(files)
    assert oct((tmp_path / "keys" / "ssh_host_ed25519_key").stat().st_mode & 0o777) == "0o600"
    ssh_lines = [line for line in first.stdout.splitlines() if line.startswith("ssh ")]
    fingerprints = [line.split(": ")[1].split()[0] for line in ssh_lines]
    assert len(fingerprints) == 4 and all(f.startswith("SHA256:") for f in fingerprints)
    assert sum("(created)" in line for line in ssh_lines) == 4

    second = edge_cli(tmp_path, "init", "--config", str(config))
    assert second.returncode == 0, second.stderr
    ssh_lines = [line for line in second.stdout.splitlines() if line.startswith("ssh ")]
    assert sum("(kept)" in line for line in ssh_lines) == 4
    assert [line.split(": ")[1].split()[0] for line in ssh_lines] == fingerprints
    assert {p.name: p.read_bytes() for p in (tmp_path / "keys").iterdir()} == files
    keys = load_host_keys(SshConfig(host_key_dir=str(tmp_path / "keys")))
    assert [k.get_algorithm() for k in keys] == ["ssh-ed25519", "ecdsa-sha2-nistp256", "ssh-rsa"]


def test_unreadable_key_file_is_an_error_not_a_new_key(tmp_path: Path) -> None:
    (tmp_path / "ssh_host_keys").mkdir()  # the default [ssh] host_key_dir
    broken = tmp_path / "ssh_host_keys" / "ssh_host_ed25519_key"
    broken.write_text("not a key\n")
    result = edge_cli(tmp_path, "init", "--ssh-keys", "--database", f"sqlite:///{tmp_path / 'x.db'}")
    assert result.returncode != 0
    assert "ssh_host_ed25519_key" in result.stderr and "never replaced" in result.stderr
    assert broken.read_text() == "not a key\n"


def test_init_without_ssh_listener_makes_no_keys(tmp_path: Path) -> None:
    result = edge_cli(tmp_path, "init")
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "ssh_host_keys").exists()


def test_pinned_keys_accept_known_hosts_lines_and_reject_garbage() -> None:
    a = asyncssh.generate_private_key("ssh-ed25519")
    b = asyncssh.generate_private_key("ecdsa-sha2-nistp256")
    text = pinned_lines([a, b])
    assert [k.public_data for k in parse_pinned_keys(text)] == [a.public_data, b.public_data]
    known_hosts = "# pinned by hand\n[10.0.0.1]:22 " + a.export_public_key().decode() + "\n"
    assert [k.public_data for k in parse_pinned_keys(known_hosts)] == [a.public_data]
    with pytest.raises(ValueError, match="line 1"):
        parse_pinned_keys("ssh-ed25519 notbase64\n")


@pytest.mark.skipif(not os.path.exists(SSHD) or os.geteuid() != 0, reason="needs openssh-server as root")
def test_pin_ssh_key_fetches_every_host_key_of_a_real_sshd(tmp_path: Path) -> None:
    sshd = start_sshd(tmp_path / "sshd", "", key_types=("ed25519", "ecdsa", "rsa"))
    try:
        assert edge_cli(tmp_path, "init").returncode == 0
        added = edge_cli(tmp_path, "host", "add", "web1", "--address", "127.0.0.1",
                         "--ssh-port", str(sshd.port))
        assert added.returncode == 0, added.stderr
        # Not on a terminal and no --yes: show the fingerprints, pin nothing.
        refused = edge_cli(tmp_path, "host", "pin-ssh-key", "web1")
        assert refused.returncode != 0 and "--yes" in refused.stderr
        assert refused.stderr.count("SHA256:") == 3
        assert _pinned(tmp_path) == ""
        pinned = edge_cli(tmp_path, "host", "pin-ssh-key", "web1", "--yes")
        assert pinned.returncode == 0, pinned.stderr
        expected = {asyncssh.import_public_key(line).public_data for line in sshd.host_pub.splitlines()}
        assert {k.public_data for k in parse_pinned_keys(_pinned(tmp_path))} == expected
        for line in sshd.host_pub.splitlines():
            assert asyncssh.import_public_key(line).get_fingerprint() in pinned.stdout
    finally:
        sshd.process.terminate()
        sshd.process.wait(10)


def test_pin_ssh_key_of_an_unreachable_host_is_one_clear_error(tmp_path: Path) -> None:
    assert edge_cli(tmp_path, "init").returncode == 0
    assert edge_cli(tmp_path, "host", "add", "web1", "--address", "127.0.0.1",
                    "--ssh-port", "1").returncode == 0
    result = edge_cli(tmp_path, "host", "pin-ssh-key", "web1", "--yes")
    assert result.returncode != 0
    assert result.stderr.startswith("edge: error: cannot fetch SSH host keys of web1 from 127.0.0.1:1")


def _pinned(tmp: Path) -> str:
    async def read() -> str:
        store = store_for_url(f"sqlite:///{tmp / 'edge.sqlite3'}")
        await store.open()
        try:
            host = await store.fetch_host("web1")
            assert host is not None
            return host.ssh_known_hosts
        finally:
            await store.close()

    return asyncio.run(read())


def test_ensure_keys_is_idempotent_in_process(tmp_path: Path) -> None:
    config = SshConfig(host_key_dir=str(tmp_path / "k"))
    first = ensure_keys(config)
    second = ensure_keys(config)
    assert [k.fingerprint for k in first] == [k.fingerprint for k in second]
    assert all(k.created for k in first) and not any(k.created for k in second)


def test_per_host_upstream_key_overrides_the_deployment_key(tmp_path: Path) -> None:
    from sshproxy.hostkeys import load_upstream_key

    config = SshConfig(host_key_dir=str(tmp_path / "k"), upstream_key_dir=str(tmp_path / "per-host"))
    default = {k.purpose: k for k in ensure_keys(config)}["upstream key"]
    (tmp_path / "per-host").mkdir()
    own = asyncssh.generate_private_key("ssh-ed25519")
    (tmp_path / "per-host" / "web9").write_bytes(own.export_private_key())
    assert load_upstream_key(config, "web9").public_data == own.public_data
    assert load_upstream_key(config, "web1").get_fingerprint() == default.fingerprint
