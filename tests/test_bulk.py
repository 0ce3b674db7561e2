"""Bulk load: a synthetic fleet lands intact on both stores; a bad line writes nothing."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from edge.directory.bulk import BulkLoadError, bulk_load, synthetic_fleet, synthetic_site_name
from edge.directory.directory import Directory
from edge.directory.secrets import KeyBox
from edge.directory.service import DirectoryService
from edge.directory.store import SQLStore
from edge.errors import ValidationError

TABLES = ("hosts", "tenants", "accounts", "sites", "certificates", "changes")


def make_cert(*names: str) -> tuple[str, str]:
    """A self-signed certificate for ``names`` and its key, as PEM text."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM).decode(), key_pem.decode()


async def counts(store: SQLStore) -> dict[str, int]:
    return {table: await store.count(table) for table in TABLES}


def line(**record: object) -> str:
    return json.dumps(record)


async def test_synthetic_fleet_loads_and_routes(store: SQLStore, keybox: KeyBox,
                                                tmp_path: Path) -> None:
    path = tmp_path / "fleet.jsonl"
    path.write_text("\n".join(synthetic_fleet(5, 30, 200, 40)) + "\n")
    seen: list[tuple[str, int]] = []
    result = await bulk_load(store, path, keybox=keybox, batch_size=50,
                             progress=lambda kind, n: seen.append((kind, n)))
    assert result == {"host": 5, "tenant": 30, "certificate": 0, "account": 40, "site": 200}
    assert ("site", 200) in seen
    got = await counts(store)
    assert got["sites"] == 200 and got["tenants"] == 30 and got["accounts"] == 40
    assert got["changes"] == 1  # one "all" entry, not one per row
    changes = await store.fetch_changes(0)
    assert [(c.entity, c.name) for c in changes] == [("all", "*")]

    directory = Directory(store)
    # Exact: tenant 7's second site is www.tenant7.example; tenant 7 is on host 7 % 5 -> h0003.
    route = await directory.route_for_site("WWW.tenant7.example")
    assert route is not None and route.tenant.name == "tenant7"
    assert route.host.name == "h0003" and route.host.address == "127.0.0.3"
    assert route.host.ssh_port == 20002
    # Wildcard: tenant 3 (a multiple of 3) has *.tenant3.example.
    assert synthetic_site_name(3, 2) == "*.tenant3.example"
    route = await directory.route_for_site("anything.tenant3.example")
    assert route is not None and route.site.hostname == "*.tenant3.example"
    assert route.host.name == "h0004"
    assert await directory.site("nothing.tenant4.example") is None
    # Accounts: account 35 is tenant5's second account.
    account_route = await directory.route_for_account("tenant5-2")
    assert account_route is not None and account_route.host.name == "h0001"
    assert account_route.account.upstream_username == "tenant5-2"


async def test_references_to_existing_rows_and_certificates(store: SQLStore,
                                                            keybox: KeyBox) -> None:
    service = DirectoryService(store, keybox)
    await service.add_host("old", "10.0.0.1")
    await service.add_tenant("acme", "old")
    cert_pem, key_pem = make_cert("shop.acme.example", "*.acme.example")
    records = [
        line(kind="certificate", ref="c1", cert_pem=cert_pem, key_pem=key_pem),
        line(kind="site", hostname="shop.acme.example", tenant="acme", certificate="c1",
             https_redirect=True, hsts=True, cache_policy={"mode": "static"}),
        line(kind="site", hostname="*.acme.example", tenant="acme", certificate="c1"),
        line(kind="account", username="acme", tenant="acme", protocols=["ssh"]),
        line(kind="tenant", name="beta", host="old"),
    ]
    result = await bulk_load(store, records, keybox=keybox)
    assert result["site"] == 2 and result["certificate"] == 1
    directory = Directory(store, keybox=keybox)
    site = await directory.site("shop.acme.example")
    assert site is not None and site.https_redirect and site.hsts
    assert site.cache_policy["mode"] == "static" and site.certificate_id is not None
    certificate = await directory.certificate(site.certificate_id)
    assert certificate is not None and b"PRIVATE KEY" in certificate.key_pem
    # A second file may refer to the stored certificate by id.
    more = [line(kind="site", hostname="x.acme.example", tenant="beta",
                 certificate=site.certificate_id)]
    assert (await bulk_load(store, more))["site"] == 1


@pytest.mark.parametrize("bad, message", [
    ('{"kind": "site", "hostname": "bad_name!.example", "tenant": "tenant0"}', "hostname"),
    ('{"kind": "site", "hostname": "z.example", "tenant": "nobody"}', "tenant 'nobody'"),
    ('{"kind": "site", "hostname": "www.tenant1.example", "tenant": "tenant1"}', "duplicate site"),
    ('{"kind": "site", "hostname": "q.example", "tenant": "tenant1", "filters": {"nope": 1}}',
     "nope"),
    ('{"kind": "account", "username": "x", "tenant": "tenant0", "protocols": ["telnet"]}',
     "protocols"),
    ('{"kind": "host", "name": "h9", "address": "10.0.0.9", "ssh_port": 70000}', "port"),
    ('{"kind": "spaceship"}', "kind"),
    ("not json", "JSON"),
])
async def test_bad_line_names_line_and_writes_nothing(store: SQLStore, keybox: KeyBox,
                                                      bad: str, message: str) -> None:
    await DirectoryService(store).add_host("pre", "10.0.0.1")
    before = await counts(store)
    good = list(synthetic_fleet(2, 5, 20, 5))
    bad_line = len(good) + 1
    records = [*good, bad, *synthetic_fleet(1, 0, 0, 0)]
    with pytest.raises(ValidationError) as info:
        await bulk_load(store, records, keybox=keybox, batch_size=4)  # batches already flushed
    assert isinstance(info.value, BulkLoadError) and info.value.line == bad_line
    assert f"line {bad_line}:" in str(info.value) and message in str(info.value)
    assert await counts(store) == before


async def test_duplicate_hostname_in_file_is_a_clear_error(store: SQLStore) -> None:
    records = [*synthetic_fleet(1, 2, 4, 0),
               line(kind="site", hostname="TENANT1.example.", tenant="tenant0")]
    with pytest.raises(BulkLoadError, match=r"line 8: duplicate site 'tenant1.example' "
                                            r"\(first on line 5\)"):
        await bulk_load(store, records)
    assert await store.count("sites") == 0


async def test_site_already_in_database_is_refused(store: SQLStore) -> None:
    await bulk_load(store, synthetic_fleet(1, 2, 4, 0))
    before = await counts(store)
    records = [line(kind="tenant", name="new", host="h0001"),
               line(kind="site", hostname="fresh.example", tenant="new"),
               line(kind="site", hostname="www.tenant0.example", tenant="new")]
    with pytest.raises(BulkLoadError, match=r"line 3: site 'www\.tenant0\.example' already exists"):
        await bulk_load(store, records)
    assert await counts(store) == before


async def test_certificate_with_mismatched_key_is_refused(store: SQLStore,
                                                          keybox: KeyBox) -> None:
    cert_pem, _ = make_cert("a.example")
    _, other_key = make_cert("a.example")
    records = [*synthetic_fleet(1, 1, 1, 0),
               line(kind="certificate", ref="c", cert_pem=cert_pem, key_pem=other_key)]
    with pytest.raises(BulkLoadError, match="line 4: private key does not match"):
        await bulk_load(store, records, keybox=keybox)
    assert await counts(store) == dict.fromkeys(TABLES, 0)


async def test_certificate_must_cover_site_and_needs_keybox(store: SQLStore,
                                                            keybox: KeyBox) -> None:
    cert_pem, key_pem = make_cert("a.example")
    cert = line(kind="certificate", ref="c", cert_pem=cert_pem, key_pem=key_pem)
    records = [*synthetic_fleet(1, 1, 0, 0), cert,
               line(kind="site", hostname="b.example", tenant="tenant0", certificate="c")]
    with pytest.raises(BulkLoadError,
                       match=r"line 4: certificate 'c' .* does not cover b\.example"):
        await bulk_load(store, records, keybox=keybox)
    with pytest.raises(BulkLoadError, match=r"line 3: .*secret key"):
        await bulk_load(store, records)
    assert await store.count("certificates") == 0


def test_synthetic_fleet_is_deterministic_and_unique() -> None:
    first = list(synthetic_fleet(3, 10, 100, 12, seed=5))
    assert first == list(synthetic_fleet(3, 10, 100, 12, seed=5))
    names = [json.loads(x)["hostname"] for x in first if '"site"' in x]
    assert len(names) == len(set(names)) == 100
    assert any(n.startswith("*.") for n in names) and any(n.startswith("www.") for n in names)
