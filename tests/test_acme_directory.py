"""The ACME tables on both stores (SQLite and real MariaDB): the fleet-wide lease, due names,
back-off, certificate install with change rows, challenges through the cached lookup path,
account keys encrypted at rest. No CA here: tests/test_acme.py runs the real pebble."""

from __future__ import annotations

import asyncio

import pytest

from edge.acme.client import new_private_key
from edge.acme.issuer import backoff, renewal_time
from edge.config import AcmeConfig
from edge.directory.directory import Directory
from edge.directory.model import Change
from edge.directory.secrets import KeyBox
from edge.directory.service import DirectoryService
from edge.directory.store import SQLStore
from edge.directory.stores import store_for_url
from edge.errors import NotFoundError, ValidationError
from tests.support_directory import make_certificate


async def _site(service: DirectoryService, name: str = "www.a.test") -> None:
    await service.add_host("web", "127.0.0.1")
    await service.add_tenant("ta", "web")
    await service.add_site(name, "ta")


async def test_lease_lets_exactly_one_of_many_racers_in(service: DirectoryService,
                                                        database_url: str, keybox: KeyBox) -> None:
    """Eight edge processes (each its own connection) grab the same name at once."""
    await _site(service)
    await service.enable_auto_cert("www.a.test")
    stores = [store_for_url(database_url) for _ in range(8)]
    for racer in stores:
        await racer.open()
    try:
        results = await asyncio.gather(*(
            DirectoryService(racer, keybox).lease_acme_name("www.a.test", f"edge{i}", 60)
            for i, racer in enumerate(stores)))
    finally:
        for racer in stores:
            await racer.close()
    assert results.count(True) == 1
    holder = f"edge{results.index(True)}"
    assert await service.lease_acme_name("www.a.test", holder, 60)  # the holder may extend
    assert not await service.lease_acme_name("www.a.test", "late", 60)
    await service.release_acme_name("www.a.test", holder)
    assert await service.lease_acme_name("www.a.test", "late", 60)


async def test_due_names_back_off_and_install(service: DirectoryService, store: SQLStore) -> None:
    await _site(service)
    with pytest.raises(NotFoundError):
        await service.enable_auto_cert("nosuch.test")
    with pytest.raises(ValidationError, match="DNS-01"):
        await service.add_site("*.w.test", "ta")
        await service.enable_auto_cert("*.w.test")
    name = await service.enable_auto_cert("www.a.test")
    assert name.state == "pending" and name.key_type == "ec256"
    assert [n.hostname for n in await service.due_acme_names(1e9)] == ["www.a.test"]
    await service.record_acme_failure("www.a.test", "urn:ietf:params:acme:error:connection: "
                                      "refused", 2e9)
    assert await service.due_acme_names(1e9) == []  # backing off
    failing = await service.acme_names(failing=True)
    assert failing[0].failures == 1 and "refused" in failing[0].last_error
    chain, key = make_certificate(["www.a.test"])
    latest = await store.latest_change_id()
    cert_id = await service.install_acme_certificate("www.a.test", chain, key,
                                                     renew_at=1.5e9, account="pebble")
    changes = await store.fetch_changes(latest)
    assert [(c.entity, c.name) for c in changes] == [("certificate", str(cert_id)),
                                                       ("site", "www.a.test")]
    name = await service.acme_name("www.a.test")
    assert (name.state, name.certificate_id, name.failures, name.last_error) == (
        "valid", cert_id, 0, "")
    assert (await store.fetch_site_pair("www.a.test", None))[0].certificate_id == cert_id  # type: ignore[union-attr]
    assert await service.due_acme_names(1.4e9) == []
    assert [n.hostname for n in await service.due_acme_names(1.6e9)] == ["www.a.test"]
    other, other_key = make_certificate(["other.test"])
    with pytest.raises(ValidationError, match="does not cover"):
        await service.install_acme_certificate("www.a.test", other, other_key, renew_at=0,
                                               account="pebble")


async def test_challenge_through_the_cached_lookup(service: DirectoryService,
                                                   store: SQLStore) -> None:
    directory = Directory(store)
    try:
        assert await directory.challenge("tok") is None  # cached as unknown ...
        await service.put_challenge("tok", "www.a.test", "tok.thumb")
        assert await directory.challenge("tok") is None
        directory.apply_change(Change(0, "challenge", "tok"))  # ... until the feed evicts it
        answer = await directory.challenge("tok")
        assert answer is not None and answer.key_authorization == "tok.thumb"
        await service.delete_challenges_for("www.a.test")
        directory.apply_change(Change(0, "challenge", "tok"))
        assert await directory.challenge("tok") is None
        await service.put_challenge("old", "www.a.test", "x", ttl=-1)  # expired: not served
        assert await directory.challenge("old") is None
    finally:
        await directory.close()


async def test_account_key_is_encrypted_at_rest(service: DirectoryService, store: SQLStore,
                                                keybox: KeyBox) -> None:
    key = new_private_key("ec256")
    await service.add_acme_account("le", "https://ca.test/dir", key, account_url="https://ca/1",
                                   eab_kid="kid1", priority=1)
    row = await store.fetchone("SELECT key_encrypted FROM acme_accounts WHERE name = 'le'")
    assert row is not None and key not in bytes(row[0]) and b"PRIVATE KEY" not in bytes(row[0])
    (account,) = await service.acme_accounts()
    assert keybox.decrypt(account.key_encrypted) == key
    assert (account.eab_kid, account.environment, account.priority) == ("kid1", "production", 1)
    await service.record_acme_account_result("le", error="rateLimited", retry_at=5.0)
    (account,) = await service.acme_accounts()
    assert (account.failures, account.next_attempt, account.last_error) == (1, 5.0, "rateLimited")


def test_backoff_doubles_up_to_the_cap() -> None:
    config = AcmeConfig(backoff_base=60, backoff_max=3600)
    assert [backoff(config, n) for n in (1, 2, 3, 7, 20)] == [60, 120, 240, 3600, 3600]


def test_renewal_time_two_thirds_spread_or_ari() -> None:
    config = AcmeConfig()
    day = 86400.0
    times = [renewal_time(config, f"n{i}.test", 0.0, 90 * day, None) for i in range(1000)]
    assert all(60 * day <= t <= 69 * day for t in times)  # 2/3, spread over 10 % of 90 days
    assert max(times) - min(times) > 8 * day
    assert renewal_time(config, "n.test", 0.0, 90 * day, 12345.0) == 12345.0


async def test_concurrent_writes_of_one_process_queue(service: DirectoryService) -> None:
    """The issuer runs several orders at once over one store: on SQLite (one connection)
    their transactions used to fail with "cannot start a transaction within a transaction"."""
    await asyncio.gather(*(service.put_challenge(f"t{i}", "www.a.test", f"t{i}.k")
                           for i in range(10)))
    rows = await service.store.fetchall("SELECT token FROM acme_challenges")
    assert len(rows) == 10


def test_renewal_simulation_spreads_a_bulk_onboarding() -> None:
    """benchmarks/acme.py's simulation, small: names issued within one hour fall due over
    about nine days (no hour gets more than twice the mean) instead of all in one hour."""
    from benchmarks.acme import simulate

    result = simulate(20_000)["issued_in_one_hour"]
    assert result["peak_per_hour_without_spread"] == 20_000
    assert result["window_hours"] >= 200
    assert result["peak_per_hour"] <= 2 * result["mean_per_hour"]


async def test_bulk_load_gives_automatic_certificates(service: DirectoryService,
                                                      store: SQLStore) -> None:
    """``edge bulk-load --auto-cert`` (``auto_cert=True``) and a record's ``"auto_cert"``:
    the sites get ACME names like ``site add --auto-cert``, wildcards and sites with a
    certificate aside; nothing else when neither asks (bulk-load used to ignore it)."""
    import json

    from edge.directory.bulk import BulkLoadError, bulk_load

    await _site(service, "old.test")
    chain, key = make_certificate(["own.test"])
    cert_id = await service.import_certificate(chain, key)
    records = [
        {"kind": "site", "hostname": "rsa.test", "tenant": "ta", "auto_cert": True,
         "key_type": "rsa2048"},
        {"kind": "site", "hostname": "plain.test", "tenant": "ta"},
        {"kind": "site", "hostname": "own.test", "tenant": "ta", "certificate": cert_id},
        {"kind": "site", "hostname": "*.wild.test", "tenant": "ta"},
        {"kind": "site", "hostname": "optout.test", "tenant": "ta", "auto_cert": False},
    ]
    lines = [json.dumps(r) for r in records]
    counts = await bulk_load(store, lines[:2])
    assert counts["auto_cert"] == 1
    assert [(n.hostname, n.key_type) for n in await service.acme_names()] == [
        ("rsa.test", "rsa2048")]
    await service.remove_site("plain.test")
    await service.remove_site("rsa.test")
    assert await service.acme_names() == []  # no order for a removed site
    counts = await bulk_load(store, lines, auto_cert=True)
    assert counts["site"] == 5 and counts["auto_cert"] == 2
    due = await service.due_acme_names(1e12)
    assert sorted((n.hostname, n.key_type) for n in due) == [
        ("plain.test", "ec256"), ("rsa.test", "rsa2048")]
    for bad, message in (({"hostname": "*.w2.test", "auto_cert": True}, "DNS-01"),
                         ({"hostname": "k.test", "key_type": "rsa2048"}, "only for sites"),
                         ({"hostname": "k.test", "auto_cert": True, "key_type": "dsa"},
                          "key_type")):
        with pytest.raises(BulkLoadError, match=message):
            await bulk_load(store, [json.dumps({"kind": "site", "tenant": "ta", **bad})])


async def test_names_are_counted_by_state_once_a_minute(service: DirectoryService,
                                                        keybox: KeyBox,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The count behind ``edge_acme_names`` scans every name (0.6 s at 1,000,000 on SQLite):
    edge serve's loop (every ``poll_interval``, 10 s) runs it at most once a minute; it
    used to run it on every round."""
    from edge.acme.issuer import Issuer

    clock = [1000.0]
    calls = []
    real = service.acme_state_counts

    async def counting() -> dict[str, int]:
        calls.append(clock[0])
        return await real()
    monkeypatch.setattr(service, "acme_state_counts", counting)
    issuer = Issuer(service, AcmeConfig(poll_interval=10.0), keybox, monotonic=lambda: clock[0])
    for _ in range(13):  # two minutes of rounds, ten seconds apart
        await issuer.export_metrics()
        clock[0] += 10.0
    assert calls == [1000.0, 1060.0, 1120.0]


async def test_renewal_information_checks_are_kept_per_name(service: DirectoryService) -> None:
    """A valid name's next ARI check (``check_at``) lists it for a re-check then (never after
    its renewal); the CA's new advice moves ``renew_at`` and the next check; a name without
    ARI (``check_at`` None) is never listed before it is due."""
    await _site(service, "ari.test")
    await service.add_site("noari.test", "ta")
    for name in ("ari.test", "noari.test"):
        await service.enable_auto_cert(name)
    chain, key = make_certificate(["ari.test"])
    cert_id = await service.install_acme_certificate("ari.test", chain, key, renew_at=5000.0,
                                                     account="le", check_at=1000.0)
    other, other_key = make_certificate(["noari.test"])
    await service.install_acme_certificate("noari.test", other, other_key, renew_at=5000.0,
                                           account="le")
    assert await service.acme_names_to_recheck(999.0) == []
    assert [n.hostname for n in await service.acme_names_to_recheck(1001.0)] == ["ari.test"]
    assert await service.due_acme_names(1001.0) == []  # a check is not a renewal
    await service.record_renewal_advice("ari.test", cert_id, 3000.0, 9000.0)
    name = await service.acme_name("ari.test")
    assert (name.renew_at, name.next_attempt) == (3000.0, 3000.0)  # never after renew_at
    assert await service.acme_names_to_recheck(2999.0) == []
    assert [n.hostname for n in await service.due_acme_names(3001.0)] == ["ari.test"]
    await service.record_renewal_advice("ari.test", cert_id + 99, 1.0, 1.0)  # stale: no-op
    assert (await service.acme_name("ari.test")).renew_at == 3000.0


async def test_on_demand_budget_is_shared_by_the_fleet(service: DirectoryService,
                                                       database_url: str, keybox: KeyBox) -> None:
    """Two edge machines (each its own connection) take from one tenant's budget of two a
    minute: together they get two orders, then one more every thirty seconds."""
    others = [store_for_url(database_url) for _ in range(2)]
    for other in others:
        await other.open()
    try:
        machines = [DirectoryService(other, keybox) for other in others]
        taken = [await machines[i % 2].take_acme_budget("tenant:ta", 2.0, now=1000.0 + i)
                 for i in range(6)]
        assert taken.count(True) == 2 and taken[:2] == [True, True]
        assert await machines[1].take_acme_budget("tenant:tb", 2.0, now=1006.0)  # its own
        assert await machines[0].take_acme_budget("tenant:ta", 2.0, now=1036.0)
        assert not await machines[1].take_acme_budget("tenant:ta", 2.0, now=1037.0)
        racers = await asyncio.gather(*(machines[i % 2].take_acme_budget("all", 3.0, now=2000.0)
                                        for i in range(8)))
        assert racers.count(True) == 3
    finally:
        for other in others:
            await other.close()
