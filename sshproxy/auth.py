"""Who may log in with which key: the account's authorized_keys and the user CAs.

Parsed ``authorized_keys`` are kept per account text (bounded), so a busy account's keys are
parsed once, and a change in the directory (new text) is a new entry by construction.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import asyncssh

from edge.errors import ConfigError

_MAX_PARSED = 10_000


class AuthorizedKeysCache:
    """``authorized_keys`` text → parsed :class:`asyncssh.SSHAuthorizedKeys`, LRU-bounded."""

    def __init__(self, max_entries: int = _MAX_PARSED) -> None:
        self._max = max_entries
        self._parsed: OrderedDict[str, asyncssh.SSHAuthorizedKeys | None] = OrderedDict()

    def get(self, text: str) -> asyncssh.SSHAuthorizedKeys | None:
        """The parsed keys, or ``None`` for empty or unparsable text (then no key matches)."""
        if text in self._parsed:
            self._parsed.move_to_end(text)
            return self._parsed[text]
        parsed: asyncssh.SSHAuthorizedKeys | None
        try:
            parsed = asyncssh.import_authorized_keys(text) if text.strip() else None
        except (asyncssh.KeyImportError, ValueError):
            parsed = None  # validated on write; an old bad row simply allows no key
        if len(self._parsed) >= self._max:
            self._parsed.popitem(last=False)
        self._parsed[text] = parsed
        return parsed


def key_allowed(keys: asyncssh.SSHAuthorizedKeys | None, key: asyncssh.SSHKey, client_ip: str,
                *, ca: bool = False) -> bool:
    """Whether ``key`` (or, with ``ca``, a certificate's signing key) is allowed from ``client_ip``.

    ``from="..."`` restrictions in authorized_keys apply; ``cert-authority`` lines count only
    for ``ca``.
    """
    if keys is None:
        return False
    return keys.validate(key, client_ip, client_ip, ca=ca) is not None


def load_user_ca_keys(path: str) -> list[asyncssh.SSHKey]:
    """The CA public keys in ``[ssh] user_ca_keys`` (empty path: no CA, certificates refused)."""
    if not path:
        return []
    try:
        keys = asyncssh.read_public_key_list(path)
    except (OSError, asyncssh.KeyImportError) as exc:
        raise ConfigError(f"[ssh] user_ca_keys {path}: {exc}") from None
    if not keys:
        raise ConfigError(f"[ssh] user_ca_keys {Path(path)} holds no public key")
    return list(keys)


__all__ = ["AuthorizedKeysCache", "key_allowed", "load_user_ca_keys"]
