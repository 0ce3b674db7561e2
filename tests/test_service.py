"""DirectoryService writes on both stores: refused writes raise the right error, name the
problem, and leave every table (including ``changes``) unchanged; certificates are checked."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from edge.config import CacheConfig
from edge.directory.directory import Directory
from edge.directory.service import DirectoryService, certificate_covers
from edge.directory.store import SQLStore
from edge.errors import ConflictError, EdgeError, NotFoundError, SecretsError, ValidationError
from tests.support_directory import make_certificate, row_counts, seed

Op = Callable[[DirectoryService], Awaitable[Any]]

REFUSED: list[tuple[str, Op, type[EdgeError], str]] = [
    # unknown objects
    ("tenant_on_unknown_host", lambda s: s.add_tenant("t9", "nohost"), NotFoundError,
     "host 'nohost' does not exist"),
    ("move_to_unknown_host", lambda s: s.move_tenant("t1", "nohost"), NotFoundError, "nohost"),
    ("move_unknown_tenant", lambda s: s.move_tenant("t9", "host-b"), NotFoundError, "t9"),
    ("update_unknown_host", lambda s: s.update_host("nohost", notice="x"), NotFoundError,
     "nohost"),
    ("state_unknown_host", lambda s: s.set_host_state("nohost", "down"), NotFoundError, "nohost"),
    ("account_unknown_tenant", lambda s: s.add_account("carol", "t9"), NotFoundError, "t9"),
    ("remove_unknown_account", lambda s: s.remove_account("carol"), NotFoundError, "carol"),
    ("site_unknown_tenant", lambda s: s.add_site("x.test", "t9"), NotFoundError, "t9"),
    ("remove_unknown_site", lambda s: s.remove_site("x.test"), NotFoundError, "x.test"),
    ("site_unknown_certificate", lambda s: s.add_site("x.test", "t1", certificate_id=999),
     NotFoundError, "certificate 999"),
    # duplicates
    ("duplicate_host", lambda s: s.add_host("host-a", "10.9.9.9"), ConflictError, "host-a"),
    ("duplicate_tenant", lambda s: s.add_tenant("t1", "host-b"), ConflictError, "t1"),
    ("duplicate_account", lambda s: s.add_account("alice", "t2"), ConflictError, "alice"),
    ("duplicate_site", lambda s: s.add_site("WWW.Example.COM.", "t2"), ConflictError,
     "www.example.com"),
    ("duplicate_idna_site", lambda s: s.add_site("xn--bcher-kva.example", "t2"), ConflictError,
     "xn--bcher-kva.example"),
    ("duplicate_wildcard", lambda s: s.add_site("*.EXAMPLE.com", "t1"), ConflictError,
     r"\*.example.com"),
    # bad input
    ("bad_host_name", lambda s: s.add_host("Host A", "10.0.0.9"), ValidationError, "host name"),
    ("bad_address", lambda s: s.add_host("h9", "not an address"), ValidationError, "--address"),
    ("bad_port", lambda s: s.add_host("h9", "10.0.0.9", ssh_port=70000), ValidationError,
     "--ssh-port 70000"),
    ("bad_host_state", lambda s: s.add_host("h9", "10.0.0.9", state="broken"), ValidationError,
     "host state"),
    ("bad_update_field", lambda s: s.update_host("host-a", colour="red"), ValidationError,
     "unknown host field 'colour'"),
    ("bad_update_state", lambda s: s.set_host_state("host-a", "asleep"), ValidationError,
     "host state 'asleep'"),
    ("until_not_maintenance", lambda s: s.set_host_state("host-a", "down", until=4e9),
     ValidationError, "--until applies only to the maintenance state"),
    ("until_in_the_past", lambda s: s.set_host_state("host-a", "maintenance", until=1.0),
     ValidationError, "--until must be in the future"),
    ("bad_update_port", lambda s: s.update_host("host-a", https_port=0), ValidationError,
     "--https-port"),
    ("move_to_same_host", lambda s: s.move_tenant("t1", "host-a"), ValidationError,
     "already on host"),
    ("negative_drain", lambda s: s.move_tenant("t1", "host-b", drain=-1), ValidationError,
     "--drain"),
    ("bad_tenant_state", lambda s: s.set_tenant_state("t1", "gone"), ValidationError,
     "tenant state"),
    ("bad_username", lambda s: s.add_account("bad user", "t1"), ValidationError, "username"),
    ("bad_protocols", lambda s: s.add_account("carol", "t1", protocols=["ssh", "http"]),
     ValidationError, "--protocols"),
    ("no_protocols", lambda s: s.add_account("carol", "t1", protocols=[]), ValidationError,
     "--protocols"),
    ("bad_authorized_keys", lambda s: s.add_account("carol", "t1", authorized_keys="ssh-rsa !!"),
     ValidationError, "authorized keys"),
    ("bad_hostname", lambda s: s.add_site("exa mple.com", "t1"), ValidationError, "hostname"),
    ("ip_as_site", lambda s: s.add_site("10.0.0.1", "t1"), ValidationError, "IP address"),
    ("malformed_json_filters", lambda s: s.add_site("x.test", "t1", filters="{"),
     ValidationError, "filters: not valid JSON"),
    ("unknown_filter_field", lambda s: s.add_site("x.test", "t1", filters={"allow": []}),
     ValidationError, "filters: unknown field 'allow'"),
    ("bad_regex", lambda s: s.add_site("x.test", "t1",
                                       filters='{"path_deny": [{"regex": "(["}]}'),
     ValidationError, r"filters.path_deny\[0\].regex"),
    ("bad_cidr", lambda s: s.add_site("x.test", "t1", filters={"ip_deny": ["1.2.3.0/40"]}),
     ValidationError, r"filters.ip_deny\[0\]"),
    ("bad_cache_policy", lambda s: s.add_site("x.test", "t1",
                                              cache_policy='{"mode": "full", "ttl": {"200": -1}}'),
     ValidationError, "cache_policy.ttl.200"),
    ("update_site_bad_filters", lambda s: s.update_site("www.example.com",
                                                        filters={"methods": ["BREW"]}),
     ValidationError, "filters.methods"),
    ("update_site_unknown_field", lambda s: s.update_site("www.example.com", owner="x"),
     ValidationError, "unknown site field 'owner'"),
    ("update_unknown_site", lambda s: s.update_site("nosuch.test", hsts=True), NotFoundError,
     "nosuch.test"),
    ("update_site_unknown_tenant", lambda s: s.update_site("www.example.com", tenant="t9"),
     NotFoundError, "t9"),
    ("purge_bad_path", lambda s: s.purge_cache("www.example.com", "nope"), ValidationError,
     "--path"),
]


@pytest.mark.parametrize(("op", "error", "message"), [(o, e, m) for _, o, e, m in REFUSED],
                         ids=[name for name, _, _, _ in REFUSED])
async def test_refused_write_changes_nothing(service: DirectoryService, store: SQLStore, op: Op,
                                             error: type[EdgeError], message: str) -> None:
    await seed(service)
    before = await row_counts(store)
    sites_before = await store.list_sites()
    tenants_before = await store.list_tenants()
    hosts_before = await store.list_hosts()
    with pytest.raises(error, match=message):
        await op(service)
    assert await row_counts(store) == before
    assert await store.list_sites() == sites_before
    assert await store.list_tenants() == tenants_before
    assert await store.list_hosts() == hosts_before


async def test_every_write_appends_one_change(service: DirectoryService, store: SQLStore) -> None:
    await seed(service)
    changes = await store.count("changes")
    assert changes == 9
    await service.update_site("www.example.com", hsts=True, filters={"maintenance": True})
    await service.purge_cache("www.example.com", "/news")
    feed = await store.fetch_changes(changes)
    assert [(c.entity, c.name) for c in feed] == [("site", "www.example.com"),
                                                  ("purge", "www.example.com/news")]
    site = (await store.fetch_site_pair("www.example.com", None))[0]
    assert site is not None and site.hsts and site.filters == {"maintenance": True}


# -- certificates ------------------------------------------------------------------------------


async def test_certificate_import_and_lookup(service: DirectoryService, store: SQLStore,
                                             keybox: Any) -> None:
    await seed(service)
    chain, key = make_certificate(["www.example.com", "*.example.com", "Shop.Example.COM"])
    cert_id = await service.import_certificate(chain, key)
    await service.update_site("www.example.com", certificate_id=cert_id)
    stored = await store.fetch_certificate(cert_id)
    assert stored is not None
    assert stored.names == ("www.example.com", "*.example.com", "shop.example.com")
    assert b"PRIVATE KEY" not in stored.key_encrypted
    directory = Directory(store, CacheConfig(), keybox=keybox)
    site = await directory.site("www.example.com")
    assert site is not None and site.certificate_id == cert_id
    cert = await directory.certificate(cert_id)
    assert cert is not None and b"BEGIN PRIVATE KEY" in cert.key_pem
    # without the at-rest key, a certificate cannot be served
    with pytest.raises(SecretsError):
        await Directory(store, CacheConfig()).certificate(cert_id)
    before = await row_counts(store)
    with pytest.raises(ConflictError, match=f"already imported as id {cert_id}"):
        await service.import_certificate(chain, key)
    assert await row_counts(store) == before


@pytest.mark.parametrize(("make", "message"), [
    (lambda: (make_certificate(["a.example.com"])[0],
              make_certificate(["a.example.com"])[1]), "does not match the certificate"),
    (lambda: make_certificate(["a.example.com"], expired=True), "certificate expired"),
    (lambda: make_certificate(None), "no DNS hostnames"),
    (lambda: make_certificate(["10.0.0.1"]), "no DNS hostnames"),
    (lambda: (b"not a pem", make_certificate(["a.example.com"])[1]), "not a PEM certificate"),
    (lambda: (make_certificate(["a.example.com"])[0], b"garbage"), "cannot load"),
])
async def test_refused_certificates(service: DirectoryService, store: SQLStore, make: Any,
                                    message: str) -> None:
    await seed(service)
    chain, key = make()
    before = await row_counts(store)
    with pytest.raises(ValidationError, match=message):
        await service.import_certificate(chain, key)
    assert await row_counts(store) == before


async def test_import_without_secret_key_is_refused(store: SQLStore) -> None:
    chain, key = make_certificate(["a.example.com"])
    with pytest.raises(SecretsError, match="EDGE_SECRET_KEY"):
        await DirectoryService(store).import_certificate(chain, key)
    assert await store.count("certificates") == 0


@pytest.mark.parametrize(("hostname", "ok"), [
    ("a.example.com", True), ("www.example.com", True), ("example.com", False),
    ("a.b.example.com", False), ("*.example.com", True), ("other.test", False),
    ("exact.test", True),
])
async def test_site_certificate_must_cover_hostname(service: DirectoryService, store: SQLStore,
                                                    hostname: str, ok: bool) -> None:
    await service.add_host("h", "10.0.0.1")
    await service.add_tenant("t", "h")
    chain, key = make_certificate(["*.example.com", "exact.test"],
                                  key=ec.generate_private_key(ec.SECP384R1()))
    cert_id = await service.import_certificate(chain, key)
    before = await row_counts(store)
    if ok:
        assert await service.add_site(hostname, "t", certificate_id=cert_id) == hostname
        return
    with pytest.raises(ValidationError, match=f"does not cover {hostname}"):
        await service.add_site(hostname, "t", certificate_id=cert_id)
    assert await row_counts(store) == before


async def test_wildcard_site_needs_wildcard_certificate(service: DirectoryService,
                                                        store: SQLStore) -> None:
    await service.add_host("h", "10.0.0.1")
    await service.add_tenant("t", "h")
    await service.add_site("www.example.com", "t")
    cert_id = await service.import_certificate(*make_certificate(["www.example.com"]))
    before = await row_counts(store)
    with pytest.raises(ValidationError, match=r"does not cover \*.example.com"):
        await service.add_site("*.example.com", "t", certificate_id=cert_id)
    other_id = await service.import_certificate(*make_certificate(["other.test"]))
    before = await row_counts(store)
    with pytest.raises(ValidationError, match=r"does not cover www\.example\.com"):
        await service.update_site("www.example.com", certificate_id=other_id)
    assert await row_counts(store) == before


def test_certificate_covers() -> None:
    assert certificate_covers(["*.example.com"], "a.example.com")
    assert not certificate_covers(["*.example.com"], "example.com")
    assert not certificate_covers(["*.example.com"], "a.b.example.com")
    assert certificate_covers(["*.example.com"], "*.example.com")
    assert not certificate_covers(["a.example.com"], "*.example.com")


async def test_a_maintenance_until_is_stored_and_cleared_by_the_next_state_change(
        service: DirectoryService) -> None:
    await seed(service)
    host = await service.set_host_state("host-a", "maintenance", "disks", until=4e9)
    assert host.maintenance_until == 4e9 and (await service.get_host("host-a")).notice == "disks"
    assert (await service.store.fetch_host("host-a")).maintenance_until == 4e9  # type: ignore[union-attr]
    host = await service.set_host_state("host-a", "maintenance")
    assert host.maintenance_until is None
