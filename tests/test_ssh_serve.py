"""The SSH proxy under `edge serve` (registry, pre-forked workers, admin /metrics, JSON logs),
with the stock ssh client and a real sshd backend."""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path

from edge.directory.service import DirectoryService
from edge.directory.stores import store_for_url
from tests.test_serve import EdgeServe, http_get, metric_value, wait_for
from tests.test_ssh_proxy import Sshd, keys, sshd  # noqa: F401 - module fixtures used below


def _provision(db_url: str, server: Sshd, user_pub: str) -> None:
    async def go() -> None:
        store = store_for_url(db_url)
        await store.open()
        try:
            await store.migrate()
            service = DirectoryService(store)
            await service.add_host("web1", "127.0.0.1", ssh_port=server.port)
            await service.update_host("web1", ssh_known_hosts=server.host_pub)
            await service.add_tenant("acme", "web1")
            await service.add_account("alice", "acme", protocols=["ssh"],
                                      upstream_username=os.environ.get("USER") or "root",
                                      authorized_keys=user_pub)
        finally:
            await store.close()

    asyncio.run(go())


def test_ssh_login_through_edge_serve_with_two_workers(tmp_path: Path, keys: Path,  # noqa: F811
                                                       sshd: Sshd) -> None:  # noqa: F811
    db_url = f"sqlite:///{tmp_path / 'edge.sqlite3'}"
    _provision(db_url, sshd, (keys / "user.pub").read_text())
    config = (f'[database]\nurl = "{db_url}"\n[admin]\nlisten = ["127.0.0.1:0"]\n'
              f'[serve]\nworkers = 2\ngrace_period = 5.0\n'
              f'[ssh]\nlisten = ["127.0.0.1:0"]\nhost_key_dir = "{keys / "hostkeys"}"\n')
    serve = EdgeServe(tmp_path, config, env={"EDGE_PROXY_OVERRIDES": ""})
    try:
        serve.wait_line("admin")
        _, port = serve.wait_line("ssh")
        serve.wait_ready(30)
        known = tmp_path / "known_hosts"
        known.write_text("".join(f"[127.0.0.1]:{port} " + (keys / "hostkeys" / f"ssh_host_{k}_key.pub")
                                 .read_text() for k in ("ed25519", "ecdsa", "rsa")))
        base = ["ssh", "-F", "/dev/null", "-p", str(port), "-o", f"UserKnownHostsFile={known}",
                "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
                "-o", "IdentityAgent=none", "-i", str(keys / "user")]
        for _ in range(3):  # several logins: whichever worker the kernel picks serves it
            done = subprocess.run([*base, "alice@127.0.0.1", "echo $EDGE_CLIENT_ADDR; exit 5"],
                                  capture_output=True, text=True, timeout=60)
            assert done.returncode == 5 and done.stdout.startswith("127.0.0.1 "), done.stderr
        wrong = subprocess.run([*base, "mallory@127.0.0.1", "true"], capture_output=True, text=True,
                               timeout=60)
        assert wrong.returncode == 255 and "Permission denied" in wrong.stderr

        def exported() -> str | None:
            status, text = http_get(serve.url("/metrics"))
            return text if status == 200 and 'outcome="failure"' in text else None

        text = wait_for(exported, 20, "SSH login metrics")
        assert metric_value(text, 'edge_ssh_logins_total{method="publickey",outcome="success"}') == 3
        assert metric_value(text, 'edge_connections_total{proxy="ssh"}') == 4
        assert metric_value(text, "edge_ssh_upstream_connect_seconds_count") == 3
        for patch in ("ignore_packets", "receive_slices", "aes_gcm", "receive_window", "fastpath"):
            assert metric_value(text, f'edge_ssh_patch_active{{patch="{patch}"}}') == 1, patch
        lines = wait_for(lambda: [r for r in serve.records() if r.get("event") == "ssh_connection"]
                         if len([r for r in serve.records() if r.get("event") == "ssh_connection"]) == 4
                         else None, 20, "4 connection log lines")
        ok = [r for r in lines if r["outcome"] == "logged in"]
        assert len(ok) == 3 and all(r["exit_status"] == 5 and r["host"] == "web1" for r in ok)
        assert {r["worker"] for r in lines} <= {0, 1}
    finally:
        assert serve.stop() == 0


def test_sigterm_closes_open_ssh_sessions_with_a_message_after_the_grace_period(
        tmp_path: Path, keys: Path, sshd: Sshd) -> None:  # noqa: F811
    db_url = f"sqlite:///{tmp_path / 'edge.sqlite3'}"
    _provision(db_url, sshd, (keys / "user.pub").read_text())
    config = (f'[database]\nurl = "{db_url}"\n[admin]\nlisten = ["127.0.0.1:0"]\n'
              f'[serve]\ngrace_period = 1.0\n'
              f'[ssh]\nlisten = ["127.0.0.1:0"]\nhost_key_dir = "{keys / "hostkeys"}"\n')
    serve = EdgeServe(tmp_path, config, env={"EDGE_PROXY_OVERRIDES": ""})
    try:
        serve.wait_line("admin")
        _, port = serve.wait_line("ssh")
        serve.wait_ready(30)
        client = subprocess.Popen(
            ["ssh", "-F", "/dev/null", "-p", str(port), "-o", "StrictHostKeyChecking=no",
             "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
             "-o", "IdentityAgent=none", "-i", str(keys / "user"), "alice@127.0.0.1",
             "echo started; sleep 120"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert client.stdout is not None
        assert client.stdout.readline() == "started\n"
        assert serve.stop(30) == 0
        _, err = client.communicate(timeout=30)
        assert client.returncode == 255
        assert "the proxy is restarting; please reconnect" in err
    finally:
        serve.kill()
