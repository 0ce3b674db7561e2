"""The `edge` CLI as an operator uses it: real processes, real SQLite and MariaDB."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from edge.cli.main import build_parser
from edge.config import EdgeConfig
from edge.demo import self_signed
from edge.directory.schema import MIGRATIONS, render_all

ROOT = Path(__file__).resolve().parent.parent
TABLES = ("hosts", "tenants", "accounts", "sites", "certificates", "changes")


class Edge:
    """Runs `python -m edge.cli.main` against one database."""

    def __init__(self, database_url: str, tmp_path: Path, secret: str | None) -> None:
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith("EDGE_")}
        self.env["EDGE_DATABASE_URL"] = database_url
        # Its own home for the default secret key file (`edge init` creates one there when
        # no key is set): one Edge's key never leaks into another's.
        self.config_home = tmp_path / f"config-home-{id(self):x}"
        self.env["XDG_CONFIG_HOME"] = str(self.config_home)
        if secret:
            self.env["EDGE_SECRET_KEY"] = secret
        self.tmp = tmp_path

    def run(self, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([sys.executable, "-m", "edge.cli.main", *args], env=self.env,
                              capture_output=True, text=True, timeout=60, cwd=self.tmp)
        if ok:
            assert proc.returncode == 0, proc.stderr
        return proc

    def json(self, *args: str) -> object:
        return json.loads(self.run(*args, "--json").stdout)

    def counts(self) -> dict[str, int]:
        # Read through the product itself: list commands page through everything.
        import asyncio

        from edge.directory.stores import store_for_url

        async def count() -> dict[str, int]:
            store = store_for_url(self.env["EDGE_DATABASE_URL"])
            await store.open()
            try:
                return {t: await store.count(t) for t in TABLES}
            finally:
                await store.close()

        return asyncio.run(count())

    def fails(self, *args: str, code: int, says: str) -> None:
        """The command fails with one line naming the problem, and changes nothing."""
        before = self.counts()
        proc = self.run(*args, ok=False)
        assert proc.returncode == code, (proc.returncode, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1, proc.stderr
        assert lines[0].startswith("edge: error: ")
        assert says in lines[0], lines[0]
        assert proc.stdout == ""
        assert self.counts() == before


@pytest.fixture
def edge(database_url: str, tmp_path: Path, secret_key: str) -> Edge:
    e = Edge(database_url, tmp_path, secret_key)
    e.run("init")
    return e


def test_init_is_idempotent_and_commands_need_it(database_url: str, tmp_path: Path) -> None:
    e = Edge(database_url, tmp_path, None)
    proc = e.run("host", "list", ok=False)
    assert proc.returncode != 0 and "run `edge init` first" in proc.stderr
    assert e.json("init")["applied"] == [v for v, _, _ in MIGRATIONS]  # type: ignore[index]
    assert e.json("init")["applied"] == []  # type: ignore[index]
    assert e.json("host", "list") == []


def test_hosts_tenants_accounts_sites_round_trip(edge: Edge, tmp_path: Path) -> None:
    edge.run("host", "add", "web1", "--address", "127.0.0.1", "--http-port", "8080")
    edge.run("host", "add", "web2", "--address", "::1", "--send-proxy-protocol", "v2")
    edge.run("tenant", "add", "acme", "--host", "web1")
    keys = tmp_path / "keys.pub"
    keys.write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"
                    " alice@laptop\n")
    edge.run("account", "add", "alice", "--tenant", "acme", "--protocols", "ssh",
             "--authorized-keys", str(keys))
    edge.run("site", "add", "WWW.Acme.Example.", "--tenant", "acme", "--hsts",
             "--filters", '{"methods": ["get", "head"]}')
    hosts = edge.json("host", "list")
    assert [h["name"] for h in hosts] == ["web1", "web2"]  # type: ignore[index,union-attr]
    assert hosts[1]["address"] == "::1" and hosts[1]["send_proxy_protocol"] == "v2"  # type: ignore[index]
    [account] = edge.json("account", "list")  # type: ignore[misc]
    assert account["protocols"] == ["ssh"] and "alice@laptop" in account["authorized_keys"]
    [site] = edge.json("site", "list")  # type: ignore[misc]
    assert site["hostname"] == "www.acme.example"  # normalised
    assert site["filters"] == {"methods": ["GET", "HEAD"]} and site["hsts"] is True
    shown = edge.json("tenant", "show", "acme")
    assert shown == {"tenant": {"name": "acme", "host": "web1", "state": "active",
                                "previous_host": None, "drain_deadline": None},
                     "accounts": ["alice"], "sites": ["www.acme.example"]}
    # Human output is a table with the names in it.
    assert "www.acme.example" in edge.run("site", "list").stdout
    # the cache's RFC 9111 mode by name alone
    edge.run("site", "set", "www.acme.example", "--cache-policy", "standard")
    [site] = edge.json("site", "list")  # type: ignore[misc]
    assert site["cache_policy"] == {"mode": "standard", "ttl": {}}

    assert edge.run("route", "shop.ACME.example.", ok=False).returncode == 3  # no wildcard
    route = edge.json("route", "www.acme.example")
    assert route["host"]["name"] == "web1" and route["tenant"]["name"] == "acme"  # type: ignore[index]
    assert "-> host web1" in edge.run("route", "--account", "alice").stdout
    moved = edge.json("tenant", "move", "acme", "--to", "web2", "--drain", "30")
    assert edge.json("route", "www.acme.example")["host"]["name"] == "web2"  # type: ignore[index]
    assert moved["host"] == "web2" and moved["previous_host"] == "web1"  # type: ignore[index]
    edge.run("host", "set-state", "web1", "maintenance", "--notice", "disk swap")
    assert edge.json("host", "show", "web1")["state"] == "maintenance"  # type: ignore[index]
    edge.run("site", "remove", "www.acme.example")
    edge.run("account", "remove", "alice")
    assert edge.json("site", "list") == [] and edge.json("account", "list") == []


def test_bad_input_is_one_line_and_writes_nothing(edge: Edge, tmp_path: Path) -> None:
    edge.run("host", "add", "web1", "--address", "127.0.0.1")
    edge.run("tenant", "add", "acme", "--host", "web1")
    edge.fails("tenant", "add", "beta", "--host", "nope", code=3, says="host 'nope' does not exist")
    edge.fails("host", "add", "web1", "--address", "10.0.0.1", code=4, says="already exists")
    edge.fails("host", "add", "Bad Name", "--address", "10.0.0.1", code=2, says="host name")
    edge.fails("host", "add", "web9", "--address", "not an address!", code=2, says="--address")
    edge.fails("host", "add", "web9", "--address", "10.0.0.9", "--ssh-port", "70000", code=2,
               says="--ssh-port 70000")
    edge.fails("site", "add", "a.example", "--tenant", "acme", "--filters", "{not json",
               code=2, says="filters: not valid JSON")
    edge.fails("site", "add", "a.example", "--tenant", "acme", "--filters",
               '{"ip_allow": ["300.1.1.1"]}', code=2, says="filters.ip_allow[0]")
    edge.fails("site", "add", "a.example", "--tenant", "acme", "--cache-policy",
               '{"mode": "everything"}', code=2, says="cache_policy.mode")
    edge.fails("site", "add", "a..example", "--tenant", "acme", code=2, says="not a valid hostname")
    edge.fails("site", "add", "a.example", "--tenant", "ghost", code=3, says="tenant 'ghost'")
    edge.fails("tenant", "move", "acme", "--to", "web1", code=2, says="already on host")
    edge.fails("account", "remove", "nobody", code=3, says="account 'nobody' does not exist")
    bad_keys = tmp_path / "bad.pub"
    bad_keys.write_text("ssh-ed25519 not-base64!!\n")
    edge.fails("account", "add", "bob", "--tenant", "acme", "--authorized-keys", str(bad_keys),
               code=2, says="authorized keys")


def test_certificates(edge: Edge, tmp_path: Path) -> None:
    edge.run("host", "add", "web1", "--address", "127.0.0.1")
    edge.run("tenant", "add", "acme", "--host", "web1")
    chain, key = self_signed(["www.acme.example", "*.acme.example"])
    _, other_key = self_signed(["www.acme.example"])
    (tmp_path / "c.pem").write_bytes(chain)
    (tmp_path / "k.pem").write_bytes(key)
    (tmp_path / "other.pem").write_bytes(other_key)
    c, k, other = (str(tmp_path / n) for n in ("c.pem", "k.pem", "other.pem"))
    edge.fails("cert", "import", "--cert", c, "--key", other, code=2,
               says="private key does not match the certificate")
    no_secret = Edge(edge.env["EDGE_DATABASE_URL"], tmp_path, None)
    no_secret.fails("cert", "import", "--cert", c, "--key", k, code=6, says="EDGE_SECRET_KEY")
    cert_id = edge.run("cert", "import", "--cert", c, "--key", k).stdout.strip()
    assert cert_id.isdigit()
    edge.fails("cert", "import", "--cert", c, "--key", k, code=4,
               says=f"already imported as id {cert_id}")
    [listed] = edge.json("cert", "list")  # type: ignore[misc]
    assert listed["names"] == ["www.acme.example", "*.acme.example"] and not listed["expired"]
    edge.run("site", "add", "shop.acme.example", "--tenant", "acme", "--certificate", cert_id)
    edge.fails("site", "add", "acme.example", "--tenant", "acme", "--certificate", cert_id,
               code=2, says="does not cover acme.example")
    edge.run("site", "set", "shop.acme.example", "--certificate", "none", "--https-redirect")
    [site] = edge.json("site", "list")  # type: ignore[misc]
    assert site["certificate_id"] is None and site["https_redirect"] is True
    # The key is stored encrypted: its PEM body never appears in the database.
    if edge.env["EDGE_DATABASE_URL"].startswith("sqlite:///"):
        raw = Path(edge.env["EDGE_DATABASE_URL"][len("sqlite:///"):]).read_bytes()
        body = key.splitlines()[1]
        assert body not in raw


def test_every_command_has_help() -> None:
    parser = build_parser()

    def leaves(p: argparse.ArgumentParser, path: list[str]) -> list[list[str]]:
        found = []
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    found += leaves(child, [*path, name])
        return found or [path]

    commands = leaves(parser, [])
    assert len(commands) >= 20
    for command in commands:
        proc = subprocess.run([sys.executable, "-m", "edge.cli.main", *command, "--help"],
                              capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0 and "usage: edge" in proc.stdout, command


def test_bad_config_names_the_key(tmp_path: Path) -> None:
    config = tmp_path / "edge.toml"
    config.write_text('[cache]\nttl = "soon"\n')
    proc = subprocess.run([sys.executable, "-m", "edge.cli.main", "--config", str(config),
                           "host", "list"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"edge: error: {config}: [cache] ttl: expected a number, got 'soon'"


def test_example_config_documents_every_setting_with_its_default() -> None:
    data = tomllib.loads((ROOT / "config" / "edge.example.toml").read_text())
    defaults = EdgeConfig()
    for section in dataclasses.fields(EdgeConfig):
        if section.name == "source":
            continue
        value = getattr(defaults, section.name)
        documented = set(data.get(section.name, {}))
        assert documented == {f.name for f in dataclasses.fields(value)}, section.name
    from edge.config import load_config

    assert load_config(ROOT / "config" / "edge.example.toml").replace(source="x") == \
        defaults.replace(source="x")


def test_shipped_mysql_schema_is_current() -> None:
    assert (ROOT / "config" / "mysql-schema.sql").read_text() == render_all("mysql")


def test_changes_list_and_prune(edge: Edge) -> None:
    edge.run("host", "add", "web1", "--address", "127.0.0.1")
    edge.run("host", "add", "web2", "--address", "127.0.0.2")
    edge.run("tenant", "add", "acme", "--host", "web1")
    edge.run("tenant", "move", "acme", "--to", "web2")
    newest = edge.json("changes", "list")
    assert [(c["entity"], c["name"]) for c in newest][:2] == [  # type: ignore[index,union-attr]
        ("tenant", "acme"), ("tenant", "acme")]
    edge.fails("changes", "prune", "--older-than", "10s", code=2, says="at least 60 seconds")
    edge.fails("changes", "prune", "--older-than", "soon", code=2, says="not a duration")
    assert edge.json("changes", "prune", "--older-than", "1d") == {"removed": 0}
    # Age every row, then prune: all but the newest go, so ids keep growing afterwards.
    import asyncio

    from edge.directory.stores import store_for_url

    async def age() -> None:
        store = store_for_url(edge.env["EDGE_DATABASE_URL"])
        await store.open()
        async with store.transaction() as tx:
            await tx.execute("UPDATE changes SET created_at = created_at - ?", (86400 * 30,))
        await store.close()

    asyncio.run(age())
    top = newest[0]["id"]  # type: ignore[index]
    assert edge.json("changes", "prune", "--older-than", "7d") == {"removed": len(newest) - 1}
    assert [c["id"] for c in edge.json("changes", "list")] == [top]  # type: ignore[union-attr]
    edge.run("tenant", "move", "acme", "--to", "web1")
    assert edge.json("changes", "list")[0]["id"] > top  # type: ignore[index]



class InProcess:
    """``edge.cli.main.main`` called in this process (no interpreter start-up per command),
    against one database; returns what an operator sees: exit code, stdout, stderr."""

    def __init__(self, database_url: str, capsys: pytest.CaptureFixture[str]) -> None:
        self.url = database_url
        self.capsys = capsys

    def __call__(self, *args: str) -> tuple[int, str, str]:
        from edge.cli.main import main

        self.capsys.readouterr()
        code = main([*args, "--database", self.url])
        out, err = self.capsys.readouterr()
        return code, out, err

    def ok(self, *args: str) -> str:
        code, out, err = self(*args)
        assert code == 0, err
        return out


@pytest.fixture
def cli(database_url: str, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> InProcess:
    for key in [k for k in os.environ if k.startswith("EDGE_")]:
        monkeypatch.delenv(key)
    run = InProcess(database_url, capsys)
    run.ok("init")
    return run


# Each row runs once without and once with --json ("{m}" becomes "text"/"json", so a write
# that succeeds does so in both modes); the exit code must not depend on the mode.
EXIT_CODE_TABLE: list[tuple[int, tuple[str, ...]]] = [
    (0, ("host", "list")),
    (0, ("host", "add", "new-{m}", "--address", "10.0.0.9")),
    (0, ("route", "www.acme.example")),
    (0, ("tenant", "show", "acme")),
    (2, ("host", "add", "bad-{m}", "--address", "not an address!")),
    (2, ("site", "add", "a..example", "--tenant", "acme")),
    (2, ("changes", "prune", "--older-than", "soon")),
    (2, ("tenant", "move", "acme", "--to", "web1")),
    (3, ("route", "unknown.example")),
    (3, ("route", "--account", "nobody")),
    (3, ("host", "show", "ghost")),
    (3, ("account", "remove", "nobody")),
    (3, ("tenant", "move", "acme", "--to", "ghost")),
    (4, ("host", "add", "web1", "--address", "10.0.0.1")),
    (4, ("tenant", "move", "acme", "--to", "dead")),
]


def test_exit_codes_do_not_depend_on_json(cli: InProcess) -> None:
    cli.ok("host", "add", "web1", "--address", "127.0.0.1")
    cli.ok("host", "add", "dead", "--address", "127.0.0.2")
    cli.ok("host", "set-state", "dead", "down")
    cli.ok("tenant", "add", "acme", "--host", "web1")
    cli.ok("site", "add", "www.acme.example", "--tenant", "acme")
    for expected, args in EXIT_CODE_TABLE:
        text = cli(*(a.format(m="text") for a in args))
        as_json = cli(*(a.format(m="json") for a in args), "--json")
        assert (text[0], as_json[0]) == (expected, expected), (args, text, as_json)
        if expected:  # the same one error line in both modes, nothing on stdout
            assert text[1] == as_json[1] == ""
            assert text[2] == as_json[2] and text[2].startswith("edge: error: ")
        else:
            json.loads(as_json[1])


def test_tenant_move_onto_a_host_not_active_needs_force(cli: InProcess) -> None:
    cli.ok("host", "add", "web1", "--address", "127.0.0.1")
    cli.ok("host", "add", "web2", "--address", "127.0.0.2")
    cli.ok("tenant", "add", "acme", "--host", "web1")
    changes = json.loads(cli.ok("changes", "list", "--json"))
    for state in ("down", "maintenance"):
        cli.ok("host", "set-state", "web2", state)
        for mode in ((), ("--json",)):
            code, out, err = cli("tenant", "move", "acme", "--to", "web2", *mode)
            assert (code, out) == (4, ""), (code, out, err)
            assert err == (f"edge: error: host 'web2' is {state}: moving tenant 'acme' there "
                           "would turn its users away (--force to move anyway)\n")
    # Nothing written: still on web1, no change row but the two host state changes.
    shown = json.loads(cli.ok("tenant", "show", "acme", "--json"))
    assert shown["tenant"]["host"] == "web1" and shown["tenant"]["previous_host"] is None
    after = json.loads(cli.ok("changes", "list", "--json"))
    assert [(c["entity"], c["name"]) for c in after[:-len(changes)]] == [("host", "web2")] * 2
    moved = json.loads(cli.ok("tenant", "move", "acme", "--to", "web2", "--force", "--json"))
    assert moved["host"] == "web2" and moved["drain_seconds"] == 300


def test_tenant_move_drains_for_300_seconds_by_default(cli: InProcess) -> None:
    import time

    cli.ok("host", "add", "web1", "--address", "127.0.0.1")
    cli.ok("host", "add", "web2", "--address", "127.0.0.2")
    cli.ok("tenant", "add", "acme", "--host", "web1")
    before = time.time()
    text = cli.ok("tenant", "move", "acme", "--to", "web2")
    assert "sessions on web1 are closed after 300 s (at " in text, text
    deadline = json.loads(cli.ok("tenant", "show", "acme", "--json"))["tenant"]["drain_deadline"]
    assert before + 299 <= deadline <= time.time() + 301
    moved = json.loads(cli.ok("tenant", "move", "acme", "--to", "web1", "--drain", "15m",
                              "--json"))
    assert moved["drain_seconds"] == 900
    assert "closed after 0 s" in cli.ok("tenant", "move", "acme", "--to", "web2", "--drain", "0")


def test_cache_purge_by_path_url_and_tag(edge: Edge) -> None:
    """``edge cache purge`` writes one change-feed row per purge (what every worker applies);
    bad input is one line and writes nothing."""
    edge.run("host", "add", "web1", "--address", "127.0.0.1")
    edge.run("tenant", "add", "acme", "--host", "web1")
    edge.run("site", "add", "*.acme.test", "--tenant", "acme")
    edge.run("cache", "purge", "*.acme.test", "--path", "/news")
    edge.run("cache", "purge", "shop.acme.test", "--url", "/cart?id=1")  # under the wildcard
    edge.run("cache", "purge", "*.acme.test", "--tag", "product-42")
    newest = edge.json("changes", "list")
    assert [(c["entity"], c["name"]) for c in newest][:3] == [  # type: ignore[index,union-attr]
        ("purge-tag", "*.acme.test product-42"), ("purge-url", "shop.acme.test/cart?id=1"),
        ("purge", "*.acme.test/news")]
    edge.fails("cache", "purge", "other.test", "--url", "/x", code=3, says="no site serves")
    edge.fails("cache", "purge", "*.acme.test", "--url", "/x", code=2, says="wildcard")
    edge.fails("cache", "purge", "*.acme.test", "--tag", "a b", code=2, says="one tag")
    edge.fails("cache", "purge", "shop.acme.test", "--url", "x", code=2, says="--url")
    edge.fails("cache", "purge", "*.acme.test", "--tag", "t", "--path", "/", code=2,
               says="at most one")


def test_maintenance_until_is_checked_stored_and_listed_with_its_end(edge: Edge) -> None:
    edge.run("host", "add", "web1", "--address", "127.0.0.1")
    edge.fails("host", "set-state", "web1", "maintenance", "--until", "2020-01-01T00:00Z",
               code=2, says="--until must be in the future")
    edge.fails("host", "set-state", "web1", "down", "--until", "+1h", code=2,
               says="--until applies only to the maintenance state")
    edge.fails("host", "set-state", "web1", "maintenance", "--until", "tomorrow", code=2,
               says="expected e.g. 2026-12-08T06:00Z or +2h")
    out = edge.run("host", "set-state", "web1", "maintenance", "--until", "2099-06-01T06:00Z",
                   "--notice", "disks").stdout
    assert "until 2099-06-01T06:00:00Z" in out
    assert "maintenance until 2099-06-01T06:00:00Z" in edge.run("host", "list").stdout
    shown = edge.json("host", "show", "web1")
    assert shown["maintenance_until"] == 4083976800.0  # type: ignore[index]
    edge.run("host", "set-state", "web1", "maintenance", "--until", "+1s")
    time.sleep(1.2)
    assert "active (maintenance ended " in edge.run("host", "list").stdout
