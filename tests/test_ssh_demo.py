"""The demo's SSH backend (``python -m sshproxy.demo``) behind the proxy, as a newcomer uses it:
password login, `hostname` naming the backend, sftp confined to the backend's directory."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import asyncssh

from edge.config import SshConfig
from sshproxy.demo import PASSWORD, USER
from sshproxy.hostkeys import ensure_keys, pinned_lines
from tests.test_ssh_proxy import free_port, make_edge


async def test_demo_backend_through_the_proxy(tmp_path: Path) -> None:
    demo_dir = tmp_path / "demo"
    ensure_keys(SshConfig(host_key_dir=str(demo_dir / "ssh")))
    port = free_port()
    backend = await asyncio.create_subprocess_exec(sys.executable, "-m", "sshproxy.demo", "demo-x",
                                                   str(port), str(demo_dir))
    try:
        key_file = demo_dir / "ssh" / "backend-demo-x_key"
        for _ in range(400):  # the backend writes its persistent host key, then listens
            if key_file.exists():
                try:
                    await asyncio.open_connection("127.0.0.1", port)
                    break
                except OSError:
                    pass
            await asyncio.sleep(0.05)
        async for edge in make_edge(tmp_path, demo_dir / "ssh", host_key_dir=str(demo_dir / "ssh")):
            await edge.service.add_host("demo-x", "127.0.0.1", ssh_port=port)
            await edge.service.update_host("demo-x", ssh_known_hosts=pinned_lines(
                [asyncssh.read_private_key(str(key_file))]))
            await edge.service.add_tenant("demo", "demo-x")
            await edge.service.add_account(USER, "demo")
            rc, out, err = await edge.ssh(USER, "hostname", password=PASSWORD)
            assert (rc, out) == (0, "demo-x\n"), err
            rc, _, err = await edge.ssh(USER, "exit 4", password=PASSWORD)
            assert rc == 4, err
            async with asyncssh.connect("127.0.0.1", edge.port, username=USER, password=PASSWORD,
                                        known_hosts=None, config=None, client_keys=[],
                                        agent_path=None) as conn, conn.start_sftp_client() as sftp:
                async with sftp.open("hello.txt", "w") as file:
                    await file.write("hi\n")
                assert "hello.txt" in await sftp.listdir(".")
            assert (demo_dir / "backends" / "demo-x" / "hello.txt").read_text() == "hi\n"
    finally:
        backend.terminate()
        await backend.wait()
