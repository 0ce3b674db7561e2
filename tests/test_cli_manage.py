"""What a newcomer operating the edge needs (issue 16 §1): a secret key that outlives the shell,
editing and removing hosts/accounts/tenants/certificates, a change log that says who changed
what, and `edge check`. Real `edge` processes on SQLite and MariaDB."""

from __future__ import annotations

import asyncio
import socket
import sqlite3
import stat
from pathlib import Path

import pytest

from edge.demo import self_signed
from edge.directory.schema import MIGRATIONS, MIGRATIONS_TABLE, render
from edge.directory.stores import store_for_url
from tests.test_cli import Edge

KEY = ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"
       " alice@laptop\n")


@pytest.fixture
def edge(sqlite_url: str, tmp_path: Path, secret_key: str) -> Edge:
    """SQLite only: the SQL is shared by both stores (tests/test_service.py runs the service
    on both); the schema migration is tested on both below."""
    e = Edge(sqlite_url, tmp_path, secret_key)
    e.run("init")
    return e


@pytest.fixture
def edge_any_db(database_url: str, tmp_path: Path, secret_key: str) -> Edge:
    """On SQLite and MariaDB: for `edge check`, whose queries are its own."""
    e = Edge(database_url, tmp_path, secret_key)
    e.run("init")
    return e


def _pem(tmp_path: Path, name: str, names: list[str], days: int = 30) -> tuple[str, str]:
    chain, key = self_signed(names, days=days)
    (tmp_path / f"{name}.crt").write_bytes(chain)
    (tmp_path / f"{name}.key").write_bytes(key)
    return str(tmp_path / f"{name}.crt"), str(tmp_path / f"{name}.key")


# -- the secret key file ------------------------------------------------------------------------

def test_init_creates_a_private_key_file_every_later_command_finds(sqlite_url: str,
                                                                   tmp_path: Path) -> None:
    e = Edge(sqlite_url, tmp_path, None)  # no $EDGE_SECRET_KEY, as in a new shell
    out = e.run("init").stdout
    key_file = e.config_home / "edge" / "secret.key"
    assert f"created {key_file}" in out
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(key_file.parent.stat().st_mode) == 0o700
    key = key_file.read_text()

    # A later command, in another process, with nothing in the environment, imports a key.
    crt, pkey = _pem(tmp_path, "c", ["www.acme.example"])
    assert e.run("cert", "import", "--cert", crt, "--key", pkey).stdout.strip().isdigit()
    # Running init again keeps the key (its certificates stay readable).
    assert f"{key_file} (kept)" in e.run("init").stdout
    assert key_file.read_text() == key
    assert "problem" not in e.run("check", "--no-connect").stdout


def test_init_writes_the_configured_key_file_and_env_still_wins(sqlite_url: str,
                                                                 tmp_path: Path,
                                                                 secret_key: str) -> None:
    database_url = sqlite_url
    key_file = tmp_path / "etc-edge" / "secret.key"
    config = tmp_path / "edge.toml"
    config.write_text(f'[secrets]\nkey_file = "{key_file}"\n')
    e = Edge(database_url, tmp_path, None)
    assert f"created {key_file}" in e.run("--config", str(config), "init").stdout
    assert not (e.config_home / "edge" / "secret.key").exists()
    crt, pkey = _pem(tmp_path, "c", ["www.acme.example"])
    e.run("--config", str(config), "cert", "import", "--cert", crt, "--key", pkey)

    # $EDGE_SECRET_KEY, when set, is used before the file (documented order): a certificate
    # stored under the file's key is then reported as encrypted with a different key.
    with_env = Edge(database_url, tmp_path, secret_key)
    out = with_env.run("--config", str(config), "init").stdout
    assert "from $EDGE_SECRET_KEY" in out
    check = with_env.run("--config", str(config), "check", "--no-connect", ok=False)
    assert check.returncode == 1 and "different secret key" in check.stdout


# -- hosts --------------------------------------------------------------------------------------

def test_host_set_changes_settings_and_remove_is_refused_while_tenants_live_there(
        edge: Edge) -> None:
    edge.run("host", "add", "web1", "--address", "10.0.0.1")
    edge.run("host", "add", "web2", "--address", "10.0.0.2")
    edge.run("host", "set", "web1", "--address", "10.0.0.11", "--ssh-port", "2222",
             "--send-proxy-protocol", "v2", "--notice", "disks on Tuesday")
    host = edge.json("host", "show", "web1")
    assert (host["address"], host["ssh_port"], host["send_proxy_protocol"], host["notice"]) == (  # type: ignore[index]
        "10.0.0.11", 2222, "v2", "disks on Tuesday")
    edge.fails("host", "set", "web1", "--https-port", "0", code=2, says="--https-port 0")
    edge.fails("host", "set", "web1", code=2, says="nothing to change")
    edge.fails("host", "set", "nope", "--address", "10.0.0.9", code=3, says="'nope' does not exist")

    for tenant in ("acme", "beta"):
        edge.run("tenant", "add", tenant, "--host", "web1")
    edge.fails("host", "remove", "web1", code=4, says="2 tenant(s): acme, beta")
    edge.run("tenant", "move", "acme", "--to", "web2", "--drain", "600")
    edge.run("tenant", "move", "beta", "--to", "web2", "--drain", "0")
    # acme's old sessions may still be open on web1 for 10 minutes.
    edge.fails("host", "remove", "web1", code=4, says="draining for 1 moved tenant(s): acme")
    edge.run("tenant", "move", "acme", "--to", "web1", "--drain", "0")
    edge.run("tenant", "move", "acme", "--to", "web2", "--drain", "0")
    edge.run("host", "remove", "web1")
    assert [h["name"] for h in edge.json("host", "list")] == ["web2"]  # type: ignore[union-attr,index]
    assert edge.json("tenant", "show", "acme")["tenant"]["host"] == "web2"  # type: ignore[index]


# -- accounts -----------------------------------------------------------------------------------

def test_account_set_keys_protocols_and_upstream_name_per_protocol(edge: Edge,
                                                                   tmp_path: Path) -> None:
    edge.run("host", "add", "web1", "--address", "10.0.0.1")
    edge.run("tenant", "add", "acme", "--host", "web1")
    edge.run("tenant", "add", "beta", "--host", "web1")
    edge.run("account", "add", "alice", "--tenant", "acme", "--upstream-username", "u1001")
    keys = tmp_path / "alice.pub"
    keys.write_text(KEY)
    edge.run("account", "set", "alice", "--ftp-upstream-username", "u1001.ftp",
             "--authorized-keys", str(keys), "--protocols", "ssh,ftp")
    [account] = edge.json("account", "list")  # type: ignore[misc]
    assert (account["upstream_username"], account["ssh_upstream_username"],
            account["ftp_upstream_username"]) == ("u1001", "", "u1001.ftp")
    assert "alice@laptop" in account["authorized_keys"]
    table = edge.run("account", "list").stdout
    assert "u1001 " in table and "u1001.ftp" in table  # SSH-UPSTREAM and FTP-UPSTREAM
    edge.run("account", "set", "alice", "--protocols", "ftp", "--tenant", "beta",
             "--authorized-keys", "none", "--ssh-upstream-username", "alice-ssh")
    [account] = edge.json("account", "list")  # type: ignore[misc]
    assert (account["protocols"], account["tenant"], account["authorized_keys"],
            account["ssh_upstream_username"]) == (["ftp"], "beta", "", "alice-ssh")
    edge.fails("account", "set", "alice", "--protocols", "telnet", code=2, says="--protocols")
    edge.fails("account", "set", "alice", "--ftp-upstream-username", "bad name", code=2,
               says="ftp upstream username")
    edge.fails("account", "set", "alice", "--tenant", "ghost", code=3, says="tenant 'ghost'")
    edge.fails("account", "set", "bob", "--protocols", "ssh", code=3, says="account 'bob'")
    # '' resets an override: FTP logins use the common upstream name again.
    edge.run("account", "set", "alice", "--ftp-upstream-username", "")
    assert edge.json("account", "list")[0]["ftp_upstream_username"] == ""  # type: ignore[index]


def _create_version_1(url: str) -> None:
    """A directory as the previous release left it: only migration 1."""
    async def create() -> None:
        store = store_for_url(url)
        await store.open()
        try:
            async with store.transaction() as tx:
                await tx.execute(MIGRATIONS_TABLE[store.dialect])
                _, description, statements = MIGRATIONS[0]
                for statement in statements:
                    await tx.execute(render(statement, store.dialect))
                await tx.execute("INSERT INTO schema_migrations VALUES (1, ?, 0)", (description,))
                await tx.execute("INSERT INTO hosts (name, address, notice, ssh_known_hosts) "
                                 "VALUES ('web1', '10.0.0.1', '', '')")
                await tx.execute("INSERT INTO tenants (name, host_id) VALUES ('acme', 1)")
                await tx.execute("INSERT INTO accounts (username, tenant_id, protocols, "
                                 "upstream_username, authorized_keys) "
                                 "VALUES ('alice', 1, 'ssh,ftp', 'u1001', '')")
        finally:
            await store.close()

    asyncio.run(create())


def test_migrate_upgrades_an_old_directory_keeping_upstream_names(database_url: str,
                                                                  tmp_path: Path) -> None:
    _create_version_1(database_url)
    e = Edge(database_url, tmp_path, None)
    e.fails("account", "list", code=1, says="run `edge migrate` first")
    assert e.json("migrate")["applied"] == [v for v, _, _ in MIGRATIONS[1:]]  # type: ignore[index]
    [account] = e.json("account", "list")  # type: ignore[misc]
    assert account["upstream_username"] == "u1001"
    assert "u1001" in e.run("account", "list").stdout.split("\n")[1].split()[3:5]
    assert e.json("migrate")["applied"] == []  # type: ignore[index]


# -- tenants and certificates -------------------------------------------------------------------

def test_tenant_remove_is_refused_with_its_sites_and_accounts_unless_cascade(edge: Edge) -> None:
    edge.run("host", "add", "web1", "--address", "10.0.0.1")
    edge.run("tenant", "add", "acme", "--host", "web1")
    edge.run("tenant", "add", "empty", "--host", "web1")
    edge.run("account", "add", "alice", "--tenant", "acme")
    edge.run("site", "add", "www.acme.example", "--tenant", "acme")
    edge.fails("tenant", "remove", "acme", code=4,
               says="1 site(s): www.acme.example; 1 account(s): alice")
    edge.run("tenant", "remove", "empty")
    out = edge.run("tenant", "remove", "acme", "--cascade").stdout
    assert "site www.acme.example" in out and "account alice" in out
    assert edge.json("tenant", "list") == [] and edge.json("site", "list") == []
    assert edge.run("route", "www.acme.example", ok=False).returncode == 3
    # Every removed object has its change row, so every proxy's cache forgets it.
    removed = {(c["entity"], c["name"]) for c in edge.json("changes", "list")  # type: ignore[union-attr]
               if c["after"] is None and c["before"] is not None}  # type: ignore[index]
    assert {("site", "www.acme.example"), ("account", "alice"), ("tenant", "acme")} <= removed


def test_cert_remove_refused_while_used_and_replace_rotates_every_site(edge: Edge,
                                                                       tmp_path: Path) -> None:
    edge.run("host", "add", "web1", "--address", "10.0.0.1")
    edge.run("tenant", "add", "acme", "--host", "web1")
    old = edge.run("cert", "import", *_cert_args(tmp_path, "old", ["*.acme.example"])).stdout
    cert_id = old.strip()
    for site in ("www.acme.example", "shop.acme.example"):
        edge.run("site", "add", site, "--tenant", "acme", "--certificate", cert_id)
    edge.fails("cert", "remove", cert_id, code=4,
               says="2 site(s): shop.acme.example, www.acme.example")
    # A new certificate that does not cover every site using the old one is refused.
    edge.fails("cert", "replace", cert_id, *_cert_args(tmp_path, "narrow", ["www.acme.example"]),
               code=2, says="does not cover 1 site(s): shop.acme.example")
    before = edge.json("cert", "list")[0]["fingerprint"]  # type: ignore[index]
    out = edge.run("cert", "replace", cert_id,
                   *_cert_args(tmp_path, "new", ["*.acme.example"], days=90)).stdout
    assert "2 site(s)" in out
    [cert] = edge.json("cert", "list")  # type: ignore[misc]
    assert cert["id"] == int(cert_id) and cert["fingerprint"] != before
    assert [s["certificate_id"] for s in edge.json("site", "list")] == [int(cert_id)] * 2  # type: ignore[index,union-attr]
    [change] = edge.json("changes", "list", "--entity", "certificate", "--limit", "1")  # type: ignore[misc]
    assert change["before"]["fingerprint"] == before
    assert change["after"]["fingerprint"] == cert["fingerprint"]
    edge.run("site", "set", "www.acme.example", "--certificate", "none")
    edge.run("site", "remove", "shop.acme.example")
    edge.run("cert", "remove", cert_id)
    assert edge.json("cert", "list") == []
    edge.fails("cert", "remove", cert_id, code=3, says="does not exist")


def _cert_args(tmp_path: Path, name: str, names: list[str], days: int = 30) -> list[str]:
    crt, key = _pem(tmp_path, name, names, days)
    return ["--cert", crt, "--key", key]


# -- the change log -----------------------------------------------------------------------------

def test_changes_list_says_who_changed_what_before_and_after(edge: Edge) -> None:
    edge.run("host", "add", "web1", "--address", "10.0.0.1")
    edge.run("host", "add", "web2", "--address", "10.0.0.2")
    edge.run("tenant", "add", "acme", "--host", "web1")
    edge.run("tenant", "move", "acme", "--to", "web2", "--drain", "0")
    edge.run("host", "set", "web2", "--ssh-port", "2200")
    edge.env["SUDO_USER"] = "alice"  # `sudo edge ...` run by alice is alice's change
    edge.run("host", "set-state", "web1", "maintenance", "--notice", "disk swap")

    [state, port, move, *_] = edge.json("changes", "list")  # type: ignore[misc]
    actor = f"cli:alice@{socket.gethostname()}"
    assert state["actor"] == actor and state["entity"] == "host" and state["name"] == "web1"
    assert state["before"] == {"state": "active", "notice": ""}
    assert state["after"] == {"state": "maintenance", "notice": "disk swap"}
    assert port["before"] == {"ssh_port": 22} and port["after"] == {"ssh_port": 2200}
    assert move["before"] == {"host": "web1"} and move["after"]["host"] == "web2"
    assert move["actor"].startswith("cli:") and move["actor"].endswith(socket.gethostname())
    table = edge.run("changes", "list", "--entity", "tenant", "--name", "acme").stdout
    assert "host: web1 → web2" in table and "added" in table and "ACTOR" in table
    assert "web2" not in edge.run("changes", "list", "--entity", "tenant", "--name",
                                  "nobody").stdout


# -- edge check ---------------------------------------------------------------------------------

def _listening_port() -> tuple[socket.socket, int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock, sock.getsockname()[1]


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_check_passes_a_healthy_directory_and_lists_every_problem(edge_any_db: Edge,
                                                                 tmp_path: Path) -> None:
    edge = edge_any_db
    server, port = _listening_port()
    try:
        config = tmp_path / "edge.toml"
        config.write_text('[http]\nlisten = ["127.0.0.1:0"]\n')  # only HTTP is proxied here
        edge.run("host", "add", "web1", "--address", "127.0.0.1", "--http-port", str(port))
        edge.run("tenant", "add", "acme", "--host", "web1")
        edge.run("cert", "import", *_cert_args(tmp_path, "ok", ["*.acme.example"], days=90))
        edge.run("site", "add", "www.acme.example", "--tenant", "acme", "--certificate", "1")
        ok = edge.run("--config", str(config), "check")
        assert "OK" in ok.stdout

        edge.run("host", "add", "web2", "--address", "127.0.0.1", "--http-port",
                 str(_closed_port()))
        edge.run("cert", "import", *_cert_args(tmp_path, "soon", ["shop.acme.example"], days=5))
        bad = edge.run("--config", str(config), "check", ok=False)
        assert bad.returncode == 1
        assert "error: host web2: http backend 127.0.0.1:" in bad.stdout
        assert "unreachable" in bad.stdout
        assert "error: certificate 2 (shop.acme.example): expires in 5 day(s)" in bad.stdout
        assert bad.stdout.count("error:") == 2, bad.stdout
        # --days moves the expiry threshold; --json is for scripts.
        report = edge.run("--config", str(config), "check", "--days", "3", "--json", ok=False)
        import json

        found = json.loads(report.stdout)
        assert found["ok"] is False
        assert [f["subject"] for f in found["findings"]] == ["host web2"]

        # With the SSH proxy on, every host needs pinned host keys.
        ssh_config = tmp_path / "ssh.toml"
        ssh_config.write_text('[ssh]\nlisten = ["127.0.0.1:0"]\n'
                              f'host_key_dir = "{tmp_path / "keys"}"\n')
        ssh = edge.run("--config", str(ssh_config), "check", "--no-connect", ok=False)
        assert "error: host web1: no pinned SSH host keys" in ssh.stdout
        # ... and the proxy's own keys, which `edge serve` would refuse to start without.
        assert "error: ssh proxy: [ssh] host_key_dir" in ssh.stdout
        assert "has no host keys: run `edge init`" in ssh.stdout
        edge.run("--config", str(ssh_config), "init")
        assert "ssh proxy" not in edge.run("--config", str(ssh_config), "check", "--no-connect",
                                           ok=False).stdout
        edge.run("host", "set", "web1", "--ssh-insecure")
        edge.run("host", "set", "web2", "--ssh-insecure")
        assert "pinned" not in edge.run("--config", str(ssh_config), "check", "--no-connect",
                                        ok=False).stdout
    finally:
        server.close()


def test_check_finds_rows_pointing_at_missing_rows_and_uncovered_sites(edge: Edge,
                                                                      tmp_path: Path) -> None:
    """What the service never writes but a hand-edited or half-restored MySQL can hold."""
    edge.run("host", "add", "web1", "--address", "127.0.0.1")
    edge.run("tenant", "add", "acme", "--host", "web1")
    edge.run("cert", "import", *_cert_args(tmp_path, "c", ["www.acme.example"], days=90))
    edge.run("site", "add", "www.acme.example", "--tenant", "acme", "--certificate", "1")

    # sqlite3 without `PRAGMA foreign_keys`, as a careless restore script would.
    with sqlite3.connect(edge.env["EDGE_DATABASE_URL"][len("sqlite:///"):]) as db:
        db.execute("UPDATE sites SET hostname = 'other.example'")
        db.execute("INSERT INTO accounts (username, tenant_id, protocols, upstream_username, "
                   "authorized_keys) VALUES ('ghost', 999, 'ssh', '', '')")
    out = edge.run("check", "--no-connect", ok=False).stdout
    assert "error: account ghost: its tenant does not exist" in out
    assert "error: site other.example: certificate 1 (www.acme.example) does not cover it" in out
