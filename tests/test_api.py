"""The admin API over real HTTP, on SQLite and MariaDB: tokens and scopes, the same writes
as the CLI, refusals that write nothing, Idempotency-Key, moves as operations."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp.test_utils import TestServer

from edge.api.app import build_app
from edge.directory.secrets import KeyBox
from edge.directory.service import DirectoryService
from edge.directory.store import SQLStore
from edge.directory.tokens import TokenService, token_hash
from edge.operations import DrainOptions, Operations
from tests.support_api import Api, api
from tests.support_directory import make_certificate, row_counts

__all__ = ["api"]  # the fixture, re-exported for pytest

V1 = "/api/v1"


async def seed(api: Api) -> None:
    for name in ("web1", "web2"):
        assert (await api.call("POST", f"{V1}/hosts", body={"name": name,
                                                             "address": "127.0.0.1"})).status == 201
    assert (await api.call("POST", f"{V1}/tenants",
                           body={"name": "acme", "host": "web1"})).status == 201


async def test_requests_need_a_known_token_with_the_route_scope(api: Api) -> None:
    missing = await api.call("GET", f"{V1}/hosts", token=None)
    assert missing.status == 401 and "bearer token" in missing.body["error"]
    assert missing.headers["WWW-Authenticate"].startswith("Bearer")
    assert (await api.call("GET", f"{V1}/hosts", token="edge_not-a-real-token")).status == 401
    assert (await api.call("GET", f"{V1}/hosts", token="reader")).status == 200
    refused = await api.call("POST", f"{V1}/hosts", token="reader",
                             body={"name": "web9", "address": "127.0.0.1"})
    assert refused.status == 403 and "'write'" in refused.body["error"]
    assert (await api.call("GET", f"{V1}/hosts")).body == []
    # A removed token stops working at once (no cache of verified tokens).
    await TokenService(api.store).remove("viewer")
    assert (await api.call("GET", f"{V1}/hosts", token="reader")).status == 401


async def test_writes_are_the_cli_service_writes_and_read_back(api: Api) -> None:
    await seed(api)
    account = await api.call("POST", f"{V1}/accounts", body={
        "username": "alice", "tenant": "acme", "protocols": ["ssh"]})
    assert account.status == 201 and account.body["protocols"] == ["ssh"]
    site = await api.call("POST", f"{V1}/sites", body={"hostname": "WWW.Acme.Example.",
                                                       "tenant": "acme", "hsts": True})
    assert site.status == 201 and site.body["hostname"] == "www.acme.example"
    assert site.headers["Location"] == f"{V1}/sites/www.acme.example"
    detail = (await api.call("GET", f"{V1}/tenants/acme")).body
    assert detail["tenant"]["host"] == "web1"
    assert [a["username"] for a in detail["accounts"]] == ["alice"]
    assert [s["hostname"] for s in detail["sites"]] == ["www.acme.example"]
    assert {(c["entity"], c["name"]) for c in detail["changes"]} == {
        ("tenant", "acme"), ("account", "alice"), ("site", "www.acme.example")}
    assert {c["actor"] for c in detail["changes"]} == {"api:panel"}  # who, for the audit
    host = await api.call("PATCH", f"{V1}/hosts/web2", body={"state": "maintenance",
                                                             "notice": "disk swap"})
    assert host.body["state"] == "maintenance" and host.body["notice"] == "disk swap"
    assert (await api.store.fetch_host("web2")).state == "maintenance"  # type: ignore[union-attr]
    purge = await api.call("POST", f"{V1}/sites/www.acme.example/purge", body={"path": "/img"})
    assert purge.status == 202
    assert (await api.store.recent_changes(1))[0][0].name == "www.acme.example/img"
    assert (await api.call("DELETE", f"{V1}/accounts/alice")).status == 204
    assert await api.store.fetch_account("alice") is None


async def test_edit_and_remove_through_the_same_service_as_the_cli(api: Api) -> None:
    await seed(api)
    await api.call("POST", f"{V1}/accounts", body={"username": "alice", "tenant": "acme"})
    changed = await api.call("PATCH", f"{V1}/accounts/alice", body={
        "ssh_upstream_username": "u123", "ftp_upstream_username": "u123.ftp"})
    assert changed.status == 200
    account = await api.store.fetch_account("alice")
    assert account is not None and (account.backend_username_for("ssh"),
                                    account.backend_username_for("ftp")) == ("u123", "u123.ftp")
    history = (await api.call("GET", f"{V1}/changes?entity=account&name=alice&limit=1")).body
    assert history[0]["actor"] == "api:panel"
    assert history[0]["after"] == {"ssh_upstream_username": "u123",
                                   "ftp_upstream_username": "u123.ftp"}
    in_use = await api.call("DELETE", f"{V1}/hosts/web1")
    assert in_use.status == 409 and "acme" in in_use.body["error"]
    refused = await api.call("DELETE", f"{V1}/tenants/acme")
    assert refused.status == 409 and await api.store.fetch_tenant("acme") is not None
    removed = await api.call("DELETE", f"{V1}/tenants/acme?cascade=true")
    assert removed.status == 200 and removed.body["also_removed"] == ["account alice"]
    assert (await api.call("DELETE", f"{V1}/hosts/web1")).status == 204
    assert await api.store.fetch_host("web1") is None


async def test_certificate_rotation_in_place_and_removal(api: Api) -> None:
    await seed(api)
    chain, key = make_certificate(["www.acme.example"])
    cert_id = (await api.call("POST", f"{V1}/certificates", body={
        "chain_pem": chain.decode(), "key_pem": key.decode()})).body["id"]
    await api.call("POST", f"{V1}/sites", body={"hostname": "www.acme.example",
                                                "tenant": "acme", "certificate_id": cert_id})
    wrong, wrong_key = make_certificate(["other.example"])
    refused = await api.call("PUT", f"{V1}/certificates/{cert_id}", body={
        "chain_pem": wrong.decode(), "key_pem": wrong_key.decode()})
    assert refused.status == 422 and "www.acme.example" in refused.body["error"]
    new, new_key = make_certificate(["www.acme.example"], days_valid=90)
    rotated = await api.call("PUT", f"{V1}/certificates/{cert_id}", body={
        "chain_pem": new.decode(), "key_pem": new_key.decode()})
    assert rotated.status == 200 and rotated.body["sites"] == ["www.acme.example"]
    assert rotated.body["certificate"]["id"] == cert_id
    in_use = await api.call("DELETE", f"{V1}/certificates/{cert_id}")
    assert in_use.status == 409 and "www.acme.example" in in_use.body["error"]
    await api.call("PATCH", f"{V1}/sites/www.acme.example", body={"certificate_id": None})
    assert (await api.call("DELETE", f"{V1}/certificates/{cert_id}")).status == 204
    assert await api.store.fetch_certificate(cert_id) is None


async def test_refused_writes_say_why_and_write_nothing(api: Api) -> None:
    await seed(api)
    before = await row_counts(api.store)
    cases = [
        ("POST", "/hosts", {"name": "web1", "address": "127.0.0.1"}, 409, "already exists"),
        ("POST", "/hosts", {"name": "Bad Name", "address": "x"}, 422, "body.name"),
        ("POST", "/hosts", {"name": "web3", "address": "127.0.0.1", "ssh_port": 70000}, 422,
         "body.ssh_port"),
        ("POST", "/hosts", {"name": "web3", "address": "127.0.0.1", "colour": "red"}, 422,
         "colour"),
        ("POST", "/tenants", {"name": "beta", "host": "nowhere"}, 404, "host 'nowhere'"),
        ("POST", "/tenants/acme/move", {"to": "web1"}, 422, "already on host"),
        ("POST", "/tenants/ghost/move", {"to": "web2"}, 404, "tenant 'ghost'"),
        ("POST", "/sites", {"hostname": "bad..name", "tenant": "acme"}, 422, ""),
        ("POST", "/certificates", {"chain_pem": "nope", "key_pem": "nope"}, 422, "certificate"),
        ("PATCH", "/hosts/web1", {}, 422, "body"),
    ]
    for method, path, body, status, says in cases:
        answer = await api.call(method, V1 + path, body=body)
        assert answer.status == status, (path, body, answer)
        assert says in answer.body["error"], answer.body
    bad_json = await api.call("POST", f"{V1}/hosts", data=b"{not json")
    assert bad_json.status == 400 and "not JSON" in bad_json.body["error"]
    assert (await api.call("GET", f"{V1}/tenants?limit=0")).status == 422
    assert (await api.call("GET", f"{V1}/operations/abc")).status == 422
    assert await row_counts(api.store) == before


async def test_certificate_import_keeps_the_key_encrypted(api: Api) -> None:
    chain, key = make_certificate(["www.acme.example"])
    answer = await api.call("POST", f"{V1}/certificates",
                            body={"chain_pem": chain.decode(), "key_pem": key.decode()})
    assert answer.status == 201 and answer.body["names"] == ["www.acme.example"]
    stored = await api.store.fetch_certificate(answer.body["id"])
    assert stored is not None and b"PRIVATE KEY" not in stored.key_encrypted
    again = await api.call("POST", f"{V1}/certificates",
                           body={"chain_pem": chain.decode(), "key_pem": key.decode()})
    assert again.status == 409


async def test_idempotency_key_replays_the_first_answer_and_refuses_reuse(api: Api) -> None:
    await seed(api)
    key = {"Idempotency-Key": "panel-req-1"}
    first = await api.call("POST", f"{V1}/tenants", body={"name": "beta", "host": "web2"},
                           headers=key)
    changes = (await api.store.recent_changes(1))[0][0].id
    again = await api.call("POST", f"{V1}/tenants", body={"name": "beta", "host": "web2"},
                           headers=key)
    assert (first.status, again.status) == (201, 201)
    assert again.body == first.body and again.headers["Idempotency-Replayed"] == "true"
    assert (await api.store.recent_changes(1))[0][0].id == changes  # not written twice
    other = await api.call("POST", f"{V1}/tenants", body={"name": "gamma", "host": "web2"},
                           headers=key)
    assert other.status == 422 and "different request" in other.body["error"]
    assert await api.store.fetch_tenant("gamma") is None
    # A refusal is an answer too: replayed, not re-run.
    dup = {"Idempotency-Key": "panel-req-2"}
    refused = [await api.call("POST", f"{V1}/tenants", body={"name": "acme", "host": "web1"},
                              headers=dup) for _ in range(2)]
    assert [r.status for r in refused] == [409, 409]
    assert refused[1].headers.get("Idempotency-Replayed") == "true"
    # Keys belong to a token: another token's same key is a new request.
    other_token = (await TokenService(api.store).add("panel2", "read,write")).secret
    fresh = await api.call("POST", f"{V1}/tenants", token=other_token,
                           body={"name": "delta", "host": "web2"}, headers=key)
    assert fresh.status == 201
    bad = await api.call("POST", f"{V1}/tenants", body={"name": "eps", "host": "web2"},
                         headers={"Idempotency-Key": "has space"})
    assert bad.status == 422 and "Idempotency-Key" in bad.body["error"]


async def test_concurrent_retries_with_one_key_write_once(api: Api) -> None:
    await seed(api)
    headers = {"Idempotency-Key": "race"}
    answers = await asyncio.gather(*(api.call("POST", f"{V1}/tenants/acme/move",
                                              body={"to": "web2", "drain_seconds": 60},
                                              headers=headers) for _ in range(5)))
    statuses = sorted(a.status for a in answers)
    assert statuses.count(202) >= 1 and set(statuses) <= {202, 409}, [a.body for a in answers]
    assert len({a.body["id"] for a in answers if a.status == 202}) == 1
    assert len(await api.store.fetchall("SELECT id FROM operations")) == 1


async def test_move_returns_an_operation_that_is_polled_and_streamed(api: Api) -> None:
    await seed(api)
    started = await api.call("POST", f"{V1}/tenants/acme/move",
                             body={"to": "web2", "drain_seconds": 1.5})
    assert started.status == 202
    op = started.body
    assert (op["kind"], op["target"], op["state"], op["phase"]) == (
        "tenant-move", "web1", "done", "draining")
    assert op["params"] == {"tenant": "acme", "to": "web2", "drain": 1.5, "force": False}
    assert op["steps"] == {"pending": 0, "done": 1, "skipped": 0, "total": 1}
    assert started.headers["Location"] == f"{V1}/operations/{op['id']}"
    tenant = await api.store.fetch_tenant("acme")
    assert tenant is not None and (tenant.host, tenant.previous_host) == ("web2", "web1")
    # The CLI sees the same operation (one operations table for both).
    assert [o.id for o in await Operations(api.store).list_operations()] == [op["id"]]
    polled = await api.call("GET", started.headers["Location"], token="reader")
    assert polled.body["phase"] == "draining"
    stream = await api.call("GET", f"{V1}/operations/{op['id']}/events", token="reader")
    assert stream.headers["Content-Type"].startswith("application/x-ndjson")
    lines = [json.loads(line) for line in stream.body.splitlines()]
    assert lines[-1]["phase"] == "finished" and lines[-1]["drain_progress"] == 1.0
    assert all(line["phase"] == "draining" for line in lines[:-1]) and len(lines) >= 2
    assert lines[0]["drain_progress"] < 1.0
    listed = (await api.call("GET", f"{V1}/operations?state=done")).body
    assert [o["id"] for o in listed] == [op["id"]] and listed[0]["phase"] == "finished"
    assert (await api.call("GET", f"{V1}/operations/999")).status == 404
    refused = await api.call("POST", f"{V1}/tenants/acme/move", body={"to": "web2"})
    assert refused.status == 422 and "already on host" in refused.body["error"]
    assert len(await Operations(api.store).list_operations()) == 1  # no record of a non-move


async def test_host_drain_runs_in_the_background_and_is_idempotent(api: Api) -> None:
    await seed(api)
    await api.call("POST", f"{V1}/tenants", body={"name": "beta", "host": "web1"})
    started = await api.call("POST", f"{V1}/hosts/web1/drain",
                             body={"to": "web2", "drain_seconds": 0})
    assert started.status == 202 and started.body["kind"] == "host-drain"
    assert started.body["steps"]["total"] == 2
    stream = await api.call("GET", f"{V1}/operations/{started.body['id']}/events")
    last = json.loads(stream.body.splitlines()[-1])
    assert (last["state"], last["phase"], last["steps"]["done"]) == ("done", "finished", 2)
    assert {t.host for t in await api.store.list_tenants()} == {"web2"}
    again = await api.call("POST", f"{V1}/hosts/web1/drain", body={"to": "web2"})
    assert again.status == 204  # nothing left on web1: nothing written
    assert len(await Operations(api.store).list_operations()) == 1
    busy = await api.call("POST", f"{V1}/hosts/web2/drain", body={"to": "web1",
                                                                   "rate_per_minute": 0})
    assert busy.status == 422 and "rate_per_minute" in busy.body["error"]


async def test_an_api_start_resumes_a_drain_an_earlier_process_left_running(
        store: SQLStore, keybox: KeyBox) -> None:
    """Planned but never run (the API or the command died after planning): a fresh API
    process finishes it without being asked."""
    service = DirectoryService(store)
    for host in ("web1", "web2"):
        await service.add_host(host, "127.0.0.1")
    for tenant in ("acme", "beta"):
        await service.add_tenant(tenant, "web1")
    op = await Operations(store).start_host_drain("web1", DrainOptions(to="web2", drain=0))
    assert op is not None and op.state == "running" and op.progress["pending"] == 2
    server = TestServer(build_app(store, keybox), host="127.0.0.1")
    await server.start_server()
    try:
        for _ in range(100):
            if (await Operations(store).get(op.id)).state == "done":
                break
            await asyncio.sleep(0.05)
    finally:
        await server.close()
    assert (await Operations(store).get(op.id)).progress["done"] == 2
    assert {t.host for t in await store.list_tenants()} == {"web2"}


async def test_sessions_need_the_sessions_scope_and_a_running_edge(api: Api) -> None:
    assert (await api.call("GET", f"{V1}/sessions")).status == 403  # read,write only
    token = (await TokenService(api.store).add("support", "sessions")).secret
    answer = await api.call("GET", f"{V1}/sessions", token=token)
    assert answer.status == 503 and "edge serve" in answer.body["error"]


async def test_the_console_cookie_reads_but_cannot_write(api: Api) -> None:
    cookie = {"Cookie": f"edge_console={api.writer}"}
    assert (await api.call("GET", f"{V1}/hosts", token=None, headers=cookie)).status == 200
    write = await api.call("POST", f"{V1}/hosts", token=None, headers=cookie,
                           body={"name": "web9", "address": "127.0.0.1"})
    assert write.status == 401 and "writes need a bearer token" in write.body["error"]
    assert await api.store.fetch_host("web9") is None


# -- the CLI: tokens and `edge admin serve` ---------------------------------------------------

def _edge(tmp_path: Path, url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_")}
    env["EDGE_DATABASE_URL"] = url
    return subprocess.run([sys.executable, "-m", "edge.cli.main", *args], env=env,
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)


async def test_token_add_shows_the_secret_once_and_stores_its_hash(
        sqlite_url: str, tmp_path: Path, store_at: SQLStore) -> None:
    added = _edge(tmp_path, sqlite_url, "token", "add", "panel", "--scope", "read,write")
    assert added.returncode == 0, added.stderr
    secret = added.stdout.strip()
    assert secret.startswith("edge_") and "shown only now" in added.stderr
    rows = await store_at.fetchall("SELECT name, token_sha256, scopes FROM api_tokens")
    assert rows == [("panel", token_hash(secret), "read,write")]
    listed = _edge(tmp_path, sqlite_url, "token", "list")
    assert "panel" in listed.stdout and secret not in listed.stdout
    bad = _edge(tmp_path, sqlite_url, "token", "add", "x", "--scope", "read,admin")
    assert bad.returncode == 2 and "unknown: admin" in bad.stderr
    assert _edge(tmp_path, sqlite_url, "token", "remove", "panel").returncode == 0
    assert await store_at.fetchall("SELECT name FROM api_tokens") == []


@pytest.fixture
async def store_at(sqlite_url: str, tmp_path: Path) -> AsyncIterator[SQLStore]:
    from edge.directory.stores import store_for_url

    assert _edge(tmp_path, sqlite_url, "init").returncode == 0
    store = store_for_url(sqlite_url)
    await store.open()
    yield store
    await store.close()


def test_admin_serve_refuses_a_non_loopback_address_without_tls(sqlite_url: str,
                                                                tmp_path: Path) -> None:
    assert _edge(tmp_path, sqlite_url, "init").returncode == 0
    proc = _edge(tmp_path, sqlite_url, "admin", "serve", "--listen", "0.0.0.0:0")
    assert proc.returncode == 2
    assert "is not loopback" in proc.stderr and "certificate_file" in proc.stderr


def test_admin_serve_over_tls_with_curl(sqlite_url: str, tmp_path: Path) -> None:
    """The real command, over HTTPS, answering stock curl; SIGTERM stops it cleanly."""
    chain, key = make_certificate(["localhost", "127.0.0.1"])
    (tmp_path / "api.pem").write_bytes(chain)
    (tmp_path / "api.key").write_bytes(key)
    assert _edge(tmp_path, sqlite_url, "init").returncode == 0
    secret = _edge(tmp_path, sqlite_url, "token", "add", "ops", "--scope", "read").stdout.strip()
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_")}
    env["EDGE_DATABASE_URL"] = sqlite_url
    proc = subprocess.Popen([sys.executable, "-m", "edge.cli.main", "admin", "serve", "--listen",
                             "127.0.0.1:0", "--tls-cert", str(tmp_path / "api.pem"),
                             "--tls-key", str(tmp_path / "api.key")],
                            env=env, cwd=tmp_path, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        url = line.split(" on ", 1)[1].split("/api/v1", 1)[0]
        assert url.startswith("https://127.0.0.1:")
        curl = ["curl", "-sS", "--cacert", str(tmp_path / "api.pem"), "-H",
                f"Authorization: Bearer {secret}", url + "/api/v1/hosts"]
        out = subprocess.run(curl, capture_output=True, text=True, timeout=30)
        assert out.returncode == 0 and json.loads(out.stdout) == [], out.stderr
        plain = subprocess.run(["curl", "-sS", url.replace("https", "http") + "/api/v1/hosts"],
                               capture_output=True, text=True, timeout=30)
        assert "Bearer" not in plain.stdout  # no clear-text answer on the TLS port
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0


async def test_sqlite_reads_of_other_requests_never_see_uncommitted_rows(sqlite_url: str) -> None:
    """The API shares one SQLite connection between requests: a GET arriving while another
    request's transaction is open waits for it, instead of reading rows it then rolls back."""
    from edge.directory.stores import store_for_url

    store = store_for_url(sqlite_url)
    await store.open()
    await store.migrate()
    inside, release = asyncio.Event(), asyncio.Event()

    async def refused_write() -> None:
        async with store.transaction() as tx:
            await tx.execute("INSERT INTO hosts (name, address, notice, ssh_known_hosts) "
                             "VALUES ('ghost', '127.0.0.1', '', '')")
            inside.set()
            await release.wait()
            raise ValueError("refused after the insert")

    writer = asyncio.create_task(refused_write())
    await inside.wait()
    reader = asyncio.create_task(store.list_hosts())
    await asyncio.sleep(0.2)
    release.set()
    with pytest.raises(ValueError):
        await writer
    assert await reader == []
    await store.close()


async def test_bulk_load_is_an_operation_all_or_nothing(api: Api) -> None:
    good = "\n".join(json.dumps(r) for r in (
        {"kind": "host", "name": "bulk1", "address": "127.0.0.1"},
        {"kind": "tenant", "name": "bt1", "host": "bulk1"},
        {"kind": "account", "username": "bt1", "tenant": "bt1"})).encode()
    started = await api.call("POST", f"{V1}/bulk-load", data=good,
                             headers={"Content-Type": "application/x-ndjson"})
    assert started.status == 202 and started.body["kind"] == "bulk-load"
    assert started.body["phase"] in ("loading", "finished")
    stream = await api.call("GET", f"{V1}/operations/{started.body['id']}/events")
    done = json.loads(stream.body.splitlines()[-1])
    assert (done["state"], done["phase"]) == ("done", "finished")
    assert {k: v for k, v in done["params"]["counts"].items() if v} == {
        "host": 1, "tenant": 1, "account": 1}
    assert (await api.store.fetch_tenant("bt1")) is not None

    before = await row_counts(api.store)
    fresh = good.replace(b"bulk1", b"bulk2").replace(b'"bt1"', b'"bt2"')
    syntax = await api.call("POST", f"{V1}/bulk-load", data=fresh + b"\n{not json}\n")
    assert syntax.status == 422 and "line 4" in syntax.body["error"]  # refused up front
    orphan = fresh + b'\n{"kind": "tenant", "name": "bt3", "host": "nowhere"}\n'
    failed = await api.call("POST", f"{V1}/bulk-load", data=orphan)
    assert failed.status == 202
    stream = await api.call("GET", f"{V1}/operations/{failed.body['id']}/events")
    last = json.loads(stream.body.splitlines()[-1])
    assert (last["state"], last["phase"]) == ("failed", "failed")
    assert "line 4" in last["error"] and "nowhere" in last["error"]
    assert await row_counts(api.store) == before  # nothing of the bad load was written


async def test_a_load_cut_off_by_an_api_restart_is_marked_failed(store: SQLStore,
                                                                 keybox: KeyBox) -> None:
    op = await Operations(store).record("bulk-load", "", {"lines": 10})
    server = TestServer(build_app(store, keybox), host="127.0.0.1")
    await server.start_server()
    await server.close()
    after = await Operations(store).get(op.id)
    assert after.state == "failed" and "nothing was written" in after.error
