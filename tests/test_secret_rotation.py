"""Rotating the at-rest secret key: new key current, old key in ``previous_key_files``, then
``edge secret rotate`` re-encrypts every stored private key (docs/operations.md)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from edge.config import SecretsConfig
from edge.demo import self_signed
from edge.directory.secrets import KeyBox, generate_key
from edge.directory.stores import store_for_url
from edge.errors import SecretsError
from tests.test_cli import Edge


def stored_keys(url: str) -> list[bytes]:
    async def read() -> list[bytes]:
        store = store_for_url(url)
        await store.open()
        try:
            return [bytes(r[0]) for r in await store.fetchall(
                "SELECT key_encrypted FROM certificates ORDER BY id")]
        finally:
            await store.close()

    return asyncio.run(read())


def test_rotate_reencrypts_every_key_under_the_new_one_and_is_idempotent(
        database_url: str, tmp_path: Path) -> None:
    old, new = generate_key(), generate_key()
    (tmp_path / "old.key").write_text(old)
    (tmp_path / "new.key").write_text(new)
    edge = Edge(database_url, tmp_path, old)
    edge.run("init")
    pems = []
    for n in range(3):
        chain, key = self_signed([f"www.site{n}.example"])
        (tmp_path / f"c{n}.pem").write_bytes(chain)
        (tmp_path / f"k{n}.pem").write_bytes(key)
        edge.run("cert", "import", "--cert", str(tmp_path / f"c{n}.pem"),
                 "--key", str(tmp_path / f"k{n}.pem"))
        pems.append(key)

    # The new key alone cannot read what the old one wrote: rotate refuses, changes nothing.
    new_only = tmp_path / "new-only.toml"
    new_only.write_text(f'[secrets]\nkey_file = "{tmp_path / "new.key"}"\n')
    edge.env.pop("EDGE_SECRET_KEY")
    before = stored_keys(database_url)
    proc = edge.run("--config", str(new_only), "secret", "rotate", ok=False)
    assert proc.returncode != 0 and "previous_key_files" in proc.stderr
    assert stored_keys(database_url) == before

    rotating = tmp_path / "rotating.toml"
    rotating.write_text(f'[secrets]\nkey_file = "{tmp_path / "new.key"}"\n'
                        f'previous_key_files = ["{tmp_path / "old.key"}"]\n')
    assert edge.json("--config", str(rotating), "secret", "rotate") == {
        "reencrypted": 3, "already_current": 0}
    assert edge.json("--config", str(rotating), "secret", "rotate") == {
        "reencrypted": 0, "already_current": 3}

    new_box = KeyBox.from_config(SecretsConfig(key_file=str(tmp_path / "new.key")), env={})
    assert [new_box.decrypt(blob) for blob in stored_keys(database_url)] == pems
    old_box = KeyBox.from_text(old)
    for blob in stored_keys(database_url):
        try:
            old_box.decrypt(blob)
        except SecretsError:
            continue
        raise AssertionError("a key is still readable with the retired secret key")
