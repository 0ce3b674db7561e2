"""The DirectoryService operations an operator needs after day one (issue 16 §1), on SQLite and
MariaDB: removal refused while something depends on the object (with the list), tenant removal
with --cascade, per-protocol upstream usernames, certificate rotation in place, and change
rows that carry who changed what."""

from __future__ import annotations

import json

import pytest

from edge.demo import self_signed
from edge.directory.bulk import bulk_load
from edge.directory.directory import Directory
from edge.directory.service import DirectoryService
from edge.directory.store import SQLStore
from edge.errors import ConflictError, ValidationError


async def _fleet(service: DirectoryService) -> None:
    await service.add_host("web1", "10.0.0.1")
    await service.add_host("web2", "10.0.0.2")
    await service.add_tenant("acme", "web1")
    await service.add_account("alice", "acme", upstream_username="u1")
    await service.add_site("www.acme.example", "acme")


async def test_removals_refused_with_what_depends_on_them(store: SQLStore,
                                                          service: DirectoryService) -> None:
    await _fleet(service)
    with pytest.raises(ConflictError, match=r"host 'web1' still has 1 tenant\(s\): acme"):
        await service.remove_host("web1")
    with pytest.raises(ConflictError, match=r"1 site\(s\): www.acme.example; "
                                            r"1 account\(s\): alice"):
        await service.remove_tenant("acme")
    assert await store.count("tenants") == 1 and await store.count("sites") == 1
    removed = await service.remove_tenant("acme", cascade=True)
    assert removed == ["site www.acme.example", "account alice"]
    await service.remove_host("web1")
    assert [h.name for h in await store.list_hosts()] == ["web2"]
    # Nothing routes to the removed objects any more.
    directory = Directory(store)
    assert await directory.route_for_account("alice") is None
    assert await directory.route_for_site("www.acme.example") is None


async def test_upstream_username_per_protocol(store: SQLStore, service: DirectoryService) -> None:
    await _fleet(service)
    account = await service.update_account("alice", ftp_upstream_username="u1.ftp")
    assert (account.backend_username_for("ssh"), account.backend_username_for("ftp")) == (
        "u1", "u1.ftp")
    account = await service.update_account("alice", upstream_username="", protocols=["ssh"],
                                            ssh_upstream_username="u1.ssh")
    assert (account.backend_username_for("ssh"), account.backend_username_for("ftp")) == (
        "u1.ssh", "u1.ftp")
    assert account.protocols == frozenset({"ssh"})
    account = await service.update_account("alice", ssh_upstream_username="",
                                            ftp_upstream_username="")
    assert account.backend_username_for("ssh") == account.backend_username_for("ftp") == "alice"
    with pytest.raises(ValidationError, match="nothing to change"):
        await service.update_account("alice")

    # The bulk loader takes the same fields.
    line = {"kind": "account", "username": "bob", "tenant": "acme",
            "ssh_upstream_username": "b.ssh", "ftp_upstream_username": "b.ftp"}
    await bulk_load(store, [json.dumps(line)])
    bob = await service.get_account("bob")
    assert (bob.backend_username_for("ssh"), bob.backend_username_for("ftp")) == ("b.ssh", "b.ftp")


async def test_certificate_replaced_in_place_reaches_the_proxies(
        store: SQLStore, service: DirectoryService) -> None:
    await _fleet(service)
    old_id = await service.import_certificate(*self_signed(["*.acme.example"]))
    await service.update_site("www.acme.example", certificate_id=old_id)
    directory = Directory(store, keybox=service.keybox)
    cursor = await store.latest_change_id()
    before = await directory.certificate(old_id)
    assert before is not None
    with pytest.raises(ConflictError, match=r"used by 1 site\(s\): www.acme.example"):
        await service.remove_certificate(old_id)
    narrow = self_signed(["www.acme.example"])
    await service.add_site("shop.acme.example", "acme", certificate_id=old_id)
    with pytest.raises(ValidationError, match=r"does not cover 1 site\(s\): shop.acme.example"):
        await service.replace_certificate(old_id, *narrow)

    chain, key = self_signed(["*.acme.example", "acme.example"], days=90)
    assert await service.replace_certificate(old_id, chain, key) == [
        "shop.acme.example", "www.acme.example"]
    # A proxy applies the change rows (as its feed does) and loads the new certificate,
    # under the same id every site points at.
    for change in await store.fetch_changes(cursor):
        directory.apply_change(change)
    after = await directory.certificate(old_id)
    assert after is not None and after.fingerprint != before.fingerprint
    assert after.chain_pem == chain and "acme.example" in after.names
    assert after.key_pem != before.key_pem
    await directory.close()


async def test_change_rows_carry_actor_and_before_after(store: SQLStore,
                                                        service: DirectoryService) -> None:
    panel = DirectoryService(store, service.keybox, actor="api:panel")
    await _fleet(service)
    await panel.update_host("web1", notice="disk swap", ssh_port=2222)
    await panel.move_tenant("acme", "web2", drain=0)
    await panel.remove_account("alice")
    [removed, moved, edited, *_] = await store.change_records(10)
    assert {r.actor for r in (removed, moved, edited)} == {"api:panel"}
    assert (edited.entity, edited.name) == ("host", "web1")
    assert edited.before == {"notice": "", "ssh_port": 22}
    assert edited.after == {"notice": "disk swap", "ssh_port": 2222}
    assert moved.before == {"host": "web1"} and moved.after is not None
    assert moved.after["host"] == "web2"
    assert removed.after is None and removed.before is not None
    assert removed.before["upstream_username"] == "u1"
    assert [r.name for r in await store.change_records(5, entity="tenant")] == ["acme", "acme"]
