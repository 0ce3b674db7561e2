"""No secret in any log line: a full session per protocol through ``edge serve`` (master and
two workers, log level debug), with real clients and real backends, then every line the
master and the workers wrote (stderr, JSON) and the HTTP access log is searched for each
secret the clients sent or the proxy holds.

Secrets: the HTTP ``Cookie`` and ``Authorization`` values (plain and HTTPS), the password
inside that Basic credential, SSH passwords (right and wrong), a secret in an SSH exec
command line and in an env value the client sends (``LC_*``, forwarded), FTP passwords (right and
wrong), the TLS private key imported into the directory (any line of its PEM body), and the
at-rest secret key."""

from __future__ import annotations

import asyncio
import base64
import ftplib
import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from edge.config import SshConfig
from edge.directory.secrets import KeyBox, generate_key
from edge.directory.service import DirectoryService
from edge.directory.stores import store_for_url
from sshproxy.hostkeys import ensure_keys, pinned_lines
from tests.support_directory import make_certificate
from tests.test_http_support import Backend as WebBackend
from tests.test_serve import EdgeServe
from tests.test_ssh_proxy import ASKPASS_ENV, AsyncsshBackend, upstream_key

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]

TIMEOUT = 60.0


def secret(label: str) -> str:
    """A value that appears nowhere by chance."""
    return f"{label}-{secrets.token_hex(12)}"


class FtpBackend:
    def __init__(self, process: asyncio.subprocess.Process, port: int) -> None:
        self.process = process
        self.port = port

    @classmethod
    async def start(cls, root: Path, user: str, password: str) -> FtpBackend:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "ftpproxy.devserver", "--root", str(root), "--name", "ftp-a",
            "--user", f"{user}:{password}", stdout=asyncio.subprocess.PIPE,
            env={**os.environ})
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), 30)
        assert line.startswith(b"LISTENING "), line
        return cls(process, int(line.split()[1]))

    async def stop(self) -> None:
        if self.process.returncode is None:
            self.process.kill()
            await self.process.wait()


async def provision(url: str, keybox: KeyBox, web: WebBackend, ssh: AsyncsshBackend, ftp: int,
                    chain: bytes, key: bytes, ftp_user: str) -> None:
    store = store_for_url(url)
    await store.open()
    try:
        await store.migrate()
        service = DirectoryService(store, keybox)
        await service.add_host("web1", "127.0.0.1", http_port=web.port, ssh_port=ssh.port,
                               ftp_port=ftp)
        await service.update_host("web1", ssh_known_hosts=pinned_lines([ssh.host_key]))
        await service.add_tenant("acme", "web1")
        await service.add_account("alice", "acme", protocols=["ssh"])
        await service.add_account("bob", "acme", protocols=["ftp"], upstream_username=ftp_user)
        cert_id = await service.import_certificate(chain, key)
        await service.add_site("www.a.test", "acme", certificate_id=cert_id)
    finally:
        await store.close()


async def run(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(subprocess.run, list(argv), capture_output=True, text=True,
                                   timeout=TIMEOUT, env=env)


def ftp_session(port: int, user: str, password: str) -> list[str]:
    with ftplib.FTP() as ftp:
        ftp.connect("127.0.0.1", port, timeout=TIMEOUT)
        ftp.login(user, password)
        names = ftp.nlst()
        ftp.quit()
    return names


def ftp_wrong(port: int, user: str, password: str) -> str:
    with ftplib.FTP() as ftp:
        ftp.connect("127.0.0.1", port, timeout=TIMEOUT)
        try:
            ftp.login(user, password)
        except ftplib.error_perm as exc:
            return str(exc)
    return "logged in"


def pem_body_lines(pem: bytes) -> list[str]:
    """The base64 lines of a PEM (each long enough to be a meaningful leak on its own)."""
    return [line for line in pem.decode().splitlines()
            if line and not line.startswith("-----") and len(line) >= 16]


async def test_no_secret_in_any_log_line(tmp_path: Path) -> None:
    cookie = secret("cookie")
    basic_password = secret("basicpw")
    authorization = "Basic " + base64.b64encode(f"ann:{basic_password}".encode()).decode()
    ssh_password, ssh_wrong = secret("sshpw"), secret("sshwrong")
    ssh_command, ssh_env = secret("SECRETCMD"), secret("sshenv")
    ftp_password, ftp_wrong_password = secret("ftppw"), secret("ftpwrong")
    secret_key = generate_key()
    chain, key_pem = make_certificate(["www.a.test"], common_name="www.a.test")
    (tmp_path / "ca.pem").write_bytes(chain)

    keys = tmp_path / "hostkeys"
    ensure_keys(SshConfig(host_key_dir=str(keys)))
    web = await WebBackend("a").start()
    ssh = AsyncsshBackend("ssh-a", upstream_key(tmp_path), passwords={"alice": ssh_password})
    await ssh.start()
    (tmp_path / "ftp-root").mkdir()
    (tmp_path / "ftp-root" / "hello.txt").write_text("hello\n")
    ftp_backend = await FtpBackend.start(tmp_path / "ftp-root", "bob-upstream", ftp_password)
    url = f"sqlite:///{tmp_path / 'edge.sqlite3'}"
    await provision(url, KeyBox.from_text(secret_key), web, ssh, ftp_backend.port, chain,
                    key_pem, "bob-upstream")
    access_log = tmp_path / "access.log"
    config = (f'[database]\nurl = "{url}"\n[secrets]\nkey = "{secret_key}"\n'
              f'[admin]\nlisten = ["127.0.0.1:0"]\n[log]\nlevel = "debug"\n'
              f'[serve]\nworkers = 2\ngrace_period = 2.0\n'
              f'[http]\nlisten = ["127.0.0.1:0"]\naccess_log = "{access_log}"\n'
              f'[https]\nlisten = ["127.0.0.1:0"]\n'
              f'[ssh]\nlisten = ["127.0.0.1:0"]\nhost_key_dir = "{keys}"\n'
              f'[ftp]\nlisten = ["127.0.0.1:0"]\n')
    serve = EdgeServe(tmp_path, config, env={"EDGE_PROXY_OVERRIDES": ""})
    try:
        ports = {}
        for name in ("admin", "http", "https", "ssh", "ftp"):
            ports[name] = (await asyncio.to_thread(serve.wait_line, name, 30))[1]
        await asyncio.to_thread(serve.wait_ready, 30)

        # HTTP and HTTPS with a session cookie and credentials
        headers = ["-H", f"Cookie: session={cookie}", "-H", f"Authorization: {authorization}"]
        done = await run("curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", *headers,
                         "-H", "Host: www.a.test", f"http://127.0.0.1:{ports['http']}/p?x=1")
        assert done.stdout == "200", done.stderr
        done = await run("curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", *headers,
                         "--cacert", str(tmp_path / "ca.pem"), "--resolve",
                         f"www.a.test:{ports['https']}:127.0.0.1",
                         f"https://www.a.test:{ports['https']}/p")
        assert done.stdout == "200", done.stderr
        assert any(r["headers"].get("Cookie") == f"session={cookie}" for r in web.requests)

        # SSH password login, right and wrong
        known = tmp_path / "known_hosts"
        known.write_text("".join(f"[127.0.0.1]:{ports['ssh']} " + (keys / f"ssh_host_{k}_key.pub")
                                 .read_text() for k in ("ed25519", "ecdsa", "rsa")))
        askpass = tmp_path / "askpass"
        askpass.write_text(f"#!/bin/sh\nprintf '%s\\n' \"${ASKPASS_ENV}\"\n")
        askpass.chmod(0o755)
        base = ["ssh", "-F", "/dev/null", "-p", str(ports["ssh"]), "-o",
                f"UserKnownHostsFile={known}", "-o", "StrictHostKeyChecking=yes",
                "-o", "PreferredAuthentications=password", "-o", "NumberOfPasswordPrompts=1",
                "-o", "IdentityAgent=none", "alice@127.0.0.1"]
        for password, expect in ((ssh_password, 0), (ssh_wrong, 255)):
            env = {**os.environ, "SSH_ASKPASS": str(askpass), "SSH_ASKPASS_REQUIRE": "force",
                   ASKPASS_ENV: password}
            done = await run(*base, "exit 0", env=env)
            assert done.returncode == expect, done.stderr
        assert ("alice", ssh_password) in ssh.password_attempts
        # An exec whose command line and env carry secrets (`ssh host 'mysql -pSECRET'`)
        env = {**os.environ, "SSH_ASKPASS": str(askpass), "SSH_ASKPASS_REQUIRE": "force",
               ASKPASS_ENV: ssh_password}
        done = await run(*base[:-1], "-o", f"SetEnv=LC_EDGE_TOKEN={ssh_env}", base[-1],
                         f"exit 0 {ssh_command}", env=env)
        assert done.returncode == 0, done.stderr
        assert any(seen.command == f"exit 0 {ssh_command}"
                   and seen.env.get("LC_EDGE_TOKEN") == ssh_env for seen in ssh.seen), ssh.seen

        # FTP login and a listing, then a wrong password
        assert "hello.txt" in await asyncio.to_thread(ftp_session, ports["ftp"], "bob",
                                                      ftp_password)
        assert "530" in await asyncio.to_thread(ftp_wrong, ports["ftp"], "bob", ftp_wrong_password)
    finally:
        code = await asyncio.to_thread(serve.stop)
        await ftp_backend.stop()
        await ssh.stop()
        await web.stop()
    logs = serve.log_path.read_text(errors="replace")
    logs += access_log.read_text() if access_log.exists() else ""
    assert code == 0, logs[-3000:]
    # The run really logged at debug level, from the master and both workers, and each proxy
    # wrote lines of its own (so their log calls were part of what was searched).
    records = [json.loads(line) for line in serve.log_path.read_text().splitlines()
               if line.startswith("{")]
    assert any(r.get("level") == "debug" for r in records)
    assert {r.get("worker") for r in records} >= {None, 0, 1}
    loggers = {r.get("logger", "") for r in records}
    assert {"edge.proxy.ssh", "edge.proxy.ftp"} <= loggers, loggers
    assert '"scheme":"https"' in logs and '"scheme":"http"' in logs  # the access log
    forbidden = {
        "cookie": cookie, "authorization": authorization.split()[1],
        "basic password": basic_password, "ssh password": ssh_password,
        "wrong ssh password": ssh_wrong, "ssh exec command": ssh_command,
        "ssh env value": ssh_env, "ftp password": ftp_password,
        "wrong ftp password": ftp_wrong_password, "secret key": secret_key,
    }
    forbidden.update({f"private key line {i}": line
                      for i, line in enumerate(pem_body_lines(key_pem))})
    leaks = {what: [line for line in logs.splitlines() if value in line][:3]
             for what, value in forbidden.items() if value in logs}
    assert not leaks, leaks


def test_asyncssh_lines_off_at_debug_unless_configured() -> None:
    """`[log] level = "debug"` does not turn on asyncssh's lines (exec commands, env values);
    only `asyncssh_level` does, and it covers asyncssh's child loggers (SFTP)."""
    import logging

    from edge.config import LogConfig
    from edge.logging import configure

    root = logging.getLogger()
    saved = root.level, list(root.handlers), logging.getLogger("asyncssh").level
    try:
        configure(LogConfig(level="debug"))
        for name in ("asyncssh", "asyncssh.sftp"):
            assert not logging.getLogger(name).isEnabledFor(logging.INFO), name
        configure(LogConfig(level="debug", asyncssh_level="debug"))
        assert logging.getLogger("asyncssh.sftp").isEnabledFor(logging.DEBUG)
    finally:
        root.setLevel(saved[0])
        root.handlers[:] = saved[1]
        logging.getLogger("asyncssh").setLevel(saved[2])
