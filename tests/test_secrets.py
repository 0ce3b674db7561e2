"""Private keys at rest: AES-GCM round trip, wrong key, damaged data, where the key comes from."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from edge.config import SecretsConfig
from edge.directory.secrets import KeyBox, generate_key
from edge.errors import SecretsError

PEM = (b"-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg\n"
       b"-----END PRIVATE KEY-----\n")


def test_round_trip_and_fresh_nonces(keybox: KeyBox) -> None:
    blob = keybox.encrypt(PEM)
    assert PEM not in blob and b"PRIVATE KEY" not in blob
    assert keybox.decrypt(blob) == PEM
    assert keybox.encrypt(PEM) != blob  # random nonce each time
    assert keybox.decrypt(keybox.encrypt(b"")) == b""


def test_same_key_text_decrypts(secret_key: str) -> None:
    blob = KeyBox.from_text(secret_key).encrypt(PEM)
    assert KeyBox.from_text(secret_key + "\n").decrypt(blob) == PEM


def test_wrong_key_is_reported_as_a_different_key(keybox: KeyBox) -> None:
    blob = keybox.encrypt(PEM)
    other = KeyBox.from_text(generate_key())
    with pytest.raises(SecretsError, match="different secret key"):
        other.decrypt(blob)


@pytest.mark.parametrize("where", [11, 15, 23, 30, -1])
def test_tampered_ciphertext_is_refused(keybox: KeyBox, where: int) -> None:
    blob = bytearray(keybox.encrypt(PEM))
    blob[where] ^= 0x01
    with pytest.raises(SecretsError, match="failed authentication"):
        keybox.decrypt(bytes(blob))


@pytest.mark.parametrize("blob", [b"", b"EK1", PEM, b"EK0" + bytes(60)])
def test_not_encrypted_data_is_refused(keybox: KeyBox, blob: bytes) -> None:
    with pytest.raises(SecretsError, match="not in the encrypted format"):
        keybox.decrypt(blob)


def test_truncated_blob_is_refused(keybox: KeyBox) -> None:
    blob = keybox.encrypt(PEM)
    with pytest.raises(SecretsError):
        keybox.decrypt(blob[:-5])


@pytest.mark.parametrize("text", ["not base64 !!!", base64.urlsafe_b64encode(b"short").decode(),
                                  "", "é"])
def test_bad_key_text(text: str) -> None:
    with pytest.raises(SecretsError, match="edge secret generate"):
        KeyBox.from_text(text)


def test_missing_key_names_the_variable() -> None:
    with pytest.raises(SecretsError, match=r"\$EDGE_SECRET_KEY") as info:
        KeyBox.from_config(SecretsConfig(), env={})
    assert "key_file" in str(info.value)
    with pytest.raises(SecretsError, match=r"\$MY_KEY"):
        KeyBox.from_config(SecretsConfig(key_env="MY_KEY"), env={"EDGE_SECRET_KEY": "x"})


def test_key_sources_in_order(tmp_path: Path) -> None:
    env_key, file_key, inline_key = generate_key(), generate_key(), generate_key()
    key_file = tmp_path / "edge.key"
    key_file.write_text(file_key + "\n")
    config = SecretsConfig(key=inline_key, key_file=str(key_file))
    ids = {name: KeyBox.from_text(k).key_id for name, k in
           (("env", env_key), ("file", file_key), ("inline", inline_key))}
    assert KeyBox.from_config(config, env={"EDGE_SECRET_KEY": env_key}).key_id == ids["env"]
    assert KeyBox.from_config(config, env={"EDGE_SECRET_KEY": ""}).key_id == ids["file"]
    assert KeyBox.from_config(SecretsConfig(key=inline_key), env={}).key_id == ids["inline"]
    custom = SecretsConfig(key_env="OTHER_KEY", key=inline_key)
    assert KeyBox.from_config(custom, env={"OTHER_KEY": env_key}).key_id == ids["env"]


def test_key_from_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    key = generate_key()
    monkeypatch.setenv("EDGE_SECRET_KEY", key)
    box = KeyBox.from_config(SecretsConfig())
    assert KeyBox.from_text(key).decrypt(box.encrypt(PEM)) == PEM


def test_unreadable_key_file_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope.key"
    with pytest.raises(SecretsError, match=r"\[secrets\] key_file .*nope.key"):
        KeyBox.from_config(SecretsConfig(key_file=str(missing)), env={})
