"""The proxy's own SSH keys, and the upstream host keys it pins.

Two kinds of keys belong to the proxy:

* **host keys** (``ssh_host_{ed25519,ecdsa,rsa}_key`` in ``[ssh] host_key_dir``) that clients see.
  They are made once by ``edge init`` and copied to every machine of the fleet, so users'
  ``known_hosts`` stay valid across restarts, workers and machines. Nothing here ever replaces an
  existing key file.
* the **upstream key** the proxy logs in to backends with after a public-key login (the
  "mapping key" of sshr/sshpiper: a proxy cannot replay the client's signature). Per deployment
  (``upstream_key_file``) and optionally per host (``upstream_key_dir/<host name>``).

Pinned upstream keys live in the directory (``Host.ssh_known_hosts``) as public-key lines.
"""

from __future__ import annotations

import asyncio
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import asyncssh

from edge.config import SshConfig
from edge.errors import ConfigError

HOST_KEY_TYPES: dict[str, tuple[str, dict[str, int]]] = {
    "ed25519": ("ssh-ed25519", {}),
    "ecdsa": ("ecdsa-sha2-nistp256", {}),
    "rsa": ("ssh-rsa", {"key_size": 3072}),
}
"""File stem → (asyncssh algorithm, generation options), in the order clients are offered them."""

UPSTREAM_KEY_NAME = "upstream_key"

# One asyncssh host-key algorithm per key family: asking a server for each in turn makes it show
# every host key it has (a server presents one key per handshake).
_FETCH_ALGS = ("ssh-ed25519", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521",
               "rsa-sha2-512")


@dataclass(frozen=True, slots=True)
class KeyFile:
    """A key file ``edge init`` looked at: where, its fingerprint, whether it was just made."""

    path: Path
    fingerprint: str
    created: bool
    purpose: str


def host_key_path(directory: str | os.PathLike[str], kind: str) -> Path:
    return Path(directory) / f"ssh_host_{kind}_key"


def upstream_key_path(config: SshConfig) -> Path:
    return Path(config.upstream_key_file or Path(config.host_key_dir) / UPSTREAM_KEY_NAME)


def _ensure(path: Path, algorithm: str, options: dict[str, int], purpose: str) -> KeyFile:
    if path.exists():
        try:
            key = asyncssh.read_private_key(str(path))
        except (OSError, asyncssh.KeyImportError) as exc:
            raise ConfigError(f"{purpose} {path} exists but cannot be read ({exc}); fix or move it "
                              "away yourself: it is never replaced automatically") from None
        return KeyFile(path, key.get_fingerprint(), False, purpose)
    path.parent.mkdir(parents=True, exist_ok=True)
    key = asyncssh.generate_private_key(algorithm, comment=f"edge {purpose}", **options)
    # O_EXCL: two `edge init` running at once must not overwrite each other's key.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(key.export_private_key())
    path.with_name(path.name + ".pub").write_bytes(key.export_public_key())
    return KeyFile(path, key.get_fingerprint(), True, purpose)


def ensure_keys(config: SshConfig) -> list[KeyFile]:
    """Create every missing proxy host key and the upstream key; never touches existing files.

    Returns one :class:`KeyFile` per key (created or found) so the caller can print fingerprints.
    Raises :class:`ConfigError` if an existing file is not a readable private key.
    """
    result = [_ensure(host_key_path(config.host_key_dir, kind), alg, options, f"{kind} host key")
              for kind, (alg, options) in HOST_KEY_TYPES.items()]
    result.append(_ensure(upstream_key_path(config), "ssh-ed25519", {}, "upstream key"))
    return result


def load_host_keys(config: SshConfig) -> list[asyncssh.SSHKey]:
    """The proxy host keys present in ``host_key_dir`` (at least one, else a ConfigError)."""
    keys = []
    for kind in HOST_KEY_TYPES:
        path = host_key_path(config.host_key_dir, kind)
        if path.exists():
            try:
                keys.append(asyncssh.read_private_key(str(path)))
            except (OSError, asyncssh.KeyImportError) as exc:
                raise ConfigError(f"[ssh] host key {path}: {exc}") from None
    if not keys:
        raise ConfigError(f"[ssh] host_key_dir {config.host_key_dir!r} has no host keys: run "
                          "`edge init` once and copy the directory to every proxy machine")
    return keys


def load_upstream_key(config: SshConfig, host_name: str | None = None) -> asyncssh.SSHKey:
    """The key used to log in to ``host_name`` (its own key in ``upstream_key_dir`` if any)."""
    path = upstream_key_path(config)
    if config.upstream_key_dir and host_name:
        own = Path(config.upstream_key_dir) / host_name
        if own.exists():
            path = own
    try:
        return asyncssh.read_private_key(str(path))
    except FileNotFoundError:
        raise ConfigError(f"[ssh] upstream key {path} does not exist: run `edge init` (it creates "
                          "one) or set upstream_key_file") from None
    except (OSError, asyncssh.KeyImportError) as exc:
        raise ConfigError(f"[ssh] upstream key {path}: {exc}") from None


def parse_pinned_keys(text: str) -> list[asyncssh.SSHKey]:
    """Public keys from ``Host.ssh_known_hosts``: one per line, with or without a leading host
    pattern (plain known_hosts lines are accepted too); blank and ``#`` lines are skipped.

    Raises ValueError naming the line when a line holds no key.
    """
    keys = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        candidates = [fields]
        if len(fields) > 2:
            candidates.append(fields[1:])  # "host keytype base64 ..." (a known_hosts line)
        for fields_try in candidates:
            try:
                keys.append(asyncssh.import_public_key(" ".join(fields_try[:2])))
                break
            except (asyncssh.KeyImportError, ValueError):
                continue
        else:
            raise ValueError(f"pinned SSH key line {number} is not a public key: {line[:60]!r}")
    return keys


def pinned_lines(keys: list[asyncssh.SSHKey]) -> str:
    """``Host.ssh_known_hosts`` text for ``keys`` (one OpenSSH public-key line each)."""
    return "".join(key.export_public_key("openssh").decode() for key in keys)


async def fetch_host_keys(address: str, port: int, time_limit: float = 10.0) -> list[asyncssh.SSHKey]:
    """Every host key the SSH server at ``address:port`` presents (one handshake per family).

    Raises OSError (unreachable) or asyncssh.Error when no key could be fetched at all.
    """
    keys: list[asyncssh.SSHKey] = []
    last_error: Exception | None = None
    for alg in _FETCH_ALGS:
        try:
            async with asyncio.timeout(time_limit):
                key = await asyncssh.get_server_host_key(address, port, server_host_key_algs=[alg],
                                                         config=None)
        except (ConnectionRefusedError, TimeoutError, socket.gaierror) as exc:
            last_error = exc  # the server is not there: asking again for another family won't help
            break
        except (OSError, asyncssh.Error) as exc:
            # No key of this family: asyncssh reports a failed key exchange, OpenSSH resets.
            last_error = exc
            continue
        if key is not None and all(key != known for known in keys):
            keys.append(key)
    if not keys:
        raise last_error or OSError(f"{address}:{port} presented no SSH host key")
    return keys


__all__ = ["HOST_KEY_TYPES", "KeyFile", "ensure_keys", "fetch_host_keys", "host_key_path",
           "load_host_keys", "load_upstream_key", "parse_pinned_keys", "pinned_lines",
           "upstream_key_path"]
