"""Private keys at rest: AES-256-GCM under an operator key.

The key comes from (first found wins) the environment variable named by ``[secrets] key_env``
(default ``EDGE_SECRET_KEY``), ``[secrets] key_file``, ``[secrets] key``, and finally the
default key file ``$XDG_CONFIG_HOME/edge/secret.key`` (``~/.config/edge/secret.key``) when
none of those is set: 32 random bytes, url-safe base64. ``edge init`` creates the key file
(0600, its directory 0700) when there is no key yet and never overwrites one. There is no
plaintext fallback: a missing or wrong key is a :class:`SecretsError` at start-up or at import
time.

Stored format: ``b"EK1" + key_id(8) + nonce(12) + ciphertext+tag``. ``key_id`` is a hash of the
key so a wrong key is reported as "wrong key" rather than as corrupt data.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from edge.config import SecretsConfig
from edge.errors import SecretsError

_MAGIC = b"EK1"
_AAD = b"hosting-edge private key v1"


def default_key_file(env: Mapping[str, str] | None = None) -> Path | None:
    """Where the key lives when the configuration names no key file: per user, like ssh's
    ``~/.ssh``. None without a home directory (then a key must be configured)."""
    env = os.environ if env is None else env
    base = env.get("XDG_CONFIG_HOME") or (env.get("HOME") and os.path.join(env["HOME"], ".config"))
    return Path(base) / "edge" / "secret.key" if base else None


def ensure_secret_key(config: SecretsConfig,
                      env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Make sure a secret key exists; create the key file only when no key is set anywhere.

    Returns where the key comes from: ``{"source": "env"|"inline"|"file", "path", "created",
    "env"}``. A key file is created with mode 0600 (and a missing parent directory 0700) by an
    exclusive create, so an existing key is never overwritten, even by two ``edge init`` runs
    racing. Raises :class:`SecretsError` if the key file cannot be written.
    """
    env = os.environ if env is None else env
    if config.key_env and env.get(config.key_env):
        return {"source": "env", "env": config.key_env, "path": None, "created": False}
    if config.key and not config.key_file:
        return {"source": "inline", "env": None, "path": None, "created": False}
    path = Path(config.key_file) if config.key_file else default_key_file(env)
    if path is None:
        raise SecretsError("no home directory for the default key file: set [secrets] key_file")
    created = _create_key_file(path)
    KeyBox.from_text(path.read_text())  # an existing but damaged key file fails here, early
    return {"source": "file", "env": None, "path": str(path), "created": created}


def _create_key_file(path: Path) -> bool:
    """Write a new key to ``path`` unless it exists; True if written."""
    try:
        if not path.parent.exists():
            path.parent.mkdir(mode=0o700, parents=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    except OSError as exc:
        raise SecretsError(f"cannot create the secret key file {path}: {exc.strerror}") from None
    with os.fdopen(fd, "w") as file:
        file.write(generate_key() + "\n")
    return True


def generate_key() -> str:
    """A new random key in the form the configuration expects."""
    return base64.urlsafe_b64encode(os.urandom(32)).decode("ascii")


class KeyBox:
    """Encrypts private keys with one AES-256-GCM key; decrypts with it or with one of the
    ``previous`` keys being rotated out (chosen by the stored key id)."""

    __slots__ = ("_aead", "_derive", "key_id", "previous")

    def __init__(self, key: bytes, previous: tuple[KeyBox, ...] = ()) -> None:
        if len(key) != 32:
            raise SecretsError(f"the secret key must be 32 bytes (got {len(key)}); "
                               "create one with `edge secret generate`")
        self._aead = AESGCM(key)
        self._derive = hmac.new(key, b"edge derived secrets", hashlib.sha256).digest()
        self.key_id = hashlib.sha256(b"edge key id" + key).digest()[:8]
        self.previous = previous

    def derive(self, purpose: str) -> str:
        """A secret for ``purpose`` (hex) that only holders of this key can compute: whoever
        may decrypt the stored private keys may also, e.g., use the admin listener."""
        return hmac.new(self._derive, purpose.encode(), hashlib.sha256).hexdigest()

    def needs_rotation(self, blob: bytes) -> bool:
        """True when ``blob`` was encrypted with a key other than the current one."""
        return blob[3:11] != self.key_id

    @classmethod
    def from_text(cls, text: str) -> KeyBox:
        try:
            raw = base64.urlsafe_b64decode(text.strip().encode("ascii") + b"==")
        except (ValueError, UnicodeError):
            raise SecretsError("the secret key is not valid base64; "
                               "create one with `edge secret generate`") from None
        return cls(raw)

    @classmethod
    def from_config(cls, config: SecretsConfig, env: Mapping[str, str] | None = None) -> KeyBox:
        """The key from (in order) the environment variable, ``key_file``, ``key``.

        Raises :class:`SecretsError` if none is set: storing or serving TLS keys without
        the at-rest key is refused, never silently done in plaintext.
        """
        env = os.environ if env is None else env
        current = cls._current(config, env)
        if not config.previous_key_files:
            return current
        previous = tuple(cls._from_file(path, "previous_key_files")
                         for path in config.previous_key_files)
        current.previous = previous
        return current

    @classmethod
    def _from_file(cls, path: str, setting: str) -> KeyBox:
        try:
            return cls.from_text(Path(path).read_text())
        except OSError as exc:
            raise SecretsError(f"[secrets] {setting} {path}: {exc.strerror}") from None

    @classmethod
    def _current(cls, config: SecretsConfig, env: Mapping[str, str]) -> KeyBox:
        if config.key_env and env.get(config.key_env):
            return cls.from_text(env[config.key_env])
        if config.key_file:
            return cls._from_file(config.key_file, "key_file")
        if config.key:
            return cls.from_text(config.key)
        default = default_key_file(env)
        if default is not None and default.exists():
            try:
                return cls.from_text(default.read_text())
            except OSError as exc:
                raise SecretsError(f"secret key file {default}: {exc.strerror}") from None
        raise SecretsError(
            f"no secret key for private keys at rest: set ${config.key_env or 'EDGE_SECRET_KEY'} "
            "or [secrets] key_file (create one with `edge secret generate`)")

    def encrypt(self, plaintext: bytes) -> bytes:
        nonce = os.urandom(12)
        return _MAGIC + self.key_id + nonce + self._aead.encrypt(nonce, plaintext, _AAD)

    def decrypt(self, blob: bytes) -> bytes:
        """Raises :class:`SecretsError` for a wrong key or damaged data (never returns garbage)."""
        if blob[:3] != _MAGIC or len(blob) < 3 + 8 + 12 + 16:
            raise SecretsError("stored private key is not in the encrypted format")
        box = self if blob[3:11] == self.key_id else next(
            (old for old in self.previous if old.key_id == blob[3:11]), None)
        if box is None:
            raise SecretsError("stored private key was encrypted with a different secret key "
                               "(check [secrets] / $EDGE_SECRET_KEY / previous_key_files)")
        nonce, ciphertext = blob[11:23], blob[23:]
        try:
            return box._aead.decrypt(nonce, ciphertext, _AAD)
        except InvalidTag:
            raise SecretsError("stored private key failed authentication (damaged data)") from None
