"""asyncssh settings for both legs of the proxy, and the one packet-path fix we apply.

Both legs (client -> proxy, proxy -> upstream) are encrypted by this process, so every cipher
choice costs twice. Measured on loopback (docs/ssh-bridge.md):

* **AES-GCM first.** asyncssh prefers chacha20-poly1305, which it runs three times slower than
  the AES-GCM it gets from OpenSSL (AES-NI). In SSH the *client's* list decides, so on the
  upstream leg (we are the client) putting AES-GCM first is enough. On the listening leg a stock
  OpenSSH client asks for chacha20 first, so we do not offer chacha20 there at all; OpenSSH then
  picks aes128-ctr with umac-64-etm, which costs about what AES-GCM does. Every OpenSSH since 6.2
  (2013) and PuTTY since 0.76 speak AES-GCM; every SSH client speaks AES-CTR.
* **curve25519 key exchange first** on both legs: fast, and the same on both so setup through
  the proxy costs what a direct login costs. Post-quantum ``mlkem768x25519`` stays offered after
  it for clients that ask for it.
* **2 MiB window / 32 KiB packets** (asyncssh's defaults, stated here so they are a decision):
  16 MiB windows and 256 KiB packets were consistently slower in the bridge.
* **No compression** offered: zlib costs more CPU than loopback/LAN bandwidth saves.

The packet-path fix: asyncssh (2.24 here; the installed version's code is checked) sends an
empty ``SSH_MSG_IGNORE`` before *every* packet once encryption is on
(``SSHConnection.send_packet``: "If we're encrypting and we have no data outstanding, insert an
ignore packet" -- but the "no data outstanding" check is missing). That is the old
countermeasure against the CBC-mode chosen-plaintext attack on SSH (Bellare/Kohno/Namprempre;
OpenSSH did the same for CBC only). With the AEAD and CTR ciphers we negotiate it protects
nothing and doubles the packets to encrypt and write. :func:`drop_redundant_ignore_packets`
removes it for one connection, and only when the negotiated cipher is not CBC.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, Final

import asyncssh
from asyncssh.connection import SSHConnection
from asyncssh.constants import MSG_IGNORE
from asyncssh.kex import get_kex_algs
from asyncssh.mac import get_mac_algs

MIB: Final = 1024 * 1024

WINDOW: Final = 2 * MIB
"""SSH channel receive window (bytes) for the channels the bridge opens on either leg."""
MAX_PACKET: Final = 32 * 1024
"""Largest channel data packet (bytes) the bridge accepts."""

_AES_GCM: Final = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")
_AES_CTR: Final = ("aes128-ctr", "aes192-ctr", "aes256-ctr")
_CHACHA: Final = ("chacha20-poly1305@openssh.com",)


def _available(names: tuple[str, ...], installed: list[bytes]) -> tuple[str, ...]:
    """``names`` minus what this asyncssh cannot do (umac needs libnettle, mlkem a recent
    asyncssh), order kept: asyncssh refuses to start with an algorithm it does not know."""
    have = {name.decode("ascii") for name in installed}
    return tuple(name for name in names if name in have)


KEX_ALGS: Final = _available((
    "curve25519-sha256", "curve25519-sha256@libssh.org",
    "mlkem768x25519-sha256",
    "ecdh-sha2-nistp256", "ecdh-sha2-nistp384", "ecdh-sha2-nistp521",
    "diffie-hellman-group-exchange-sha256",
    "diffie-hellman-group16-sha512", "diffie-hellman-group18-sha512", "diffie-hellman-group14-sha256",
), get_kex_algs())


# Used only with AES-CTR (the GCM ciphers carry their own tag). A stock OpenSSH client lists
# aes128-ctr before the GCM ciphers and umac-64-etm first among MACs, so that pair is what it
# gets from the listening leg; measured per 32 KiB packet it costs about what AES-GCM does,
# where hmac-sha2-256-etm costs 50% more and chacha20-poly1305 three times as much.
MAC_ALGS: Final = _available((
    "umac-64-etm@openssh.com", "umac-128-etm@openssh.com",
    "hmac-sha2-256-etm@openssh.com", "hmac-sha2-512-etm@openssh.com",
    "hmac-sha2-256", "hmac-sha2-512",
), get_mac_algs())

SERVER_OPTIONS: Final[dict[str, Any]] = {
    "kex_algs": list(KEX_ALGS),
    "encryption_algs": list(_AES_GCM + _AES_CTR),
    "mac_algs": list(MAC_ALGS),
    "compression_algs": ["none"],
    # What the bridge needs from the listening side: raw bytes, no line editor in the way,
    # PTY requests passed to the bridge, channels sized like the upstream ones.
    "encoding": None,
    "line_editor": False,
    "allow_pty": True,
    "x11_forwarding": False,
    "agent_forwarding": False,
    "window": WINDOW,
    "max_pktsize": MAX_PACKET,
}
"""asyncssh keyword arguments for the listening leg (``asyncssh.listen``/``SSHServerConnectionOptions``)."""

CLIENT_OPTIONS: Final[dict[str, Any]] = {
    "kex_algs": list(KEX_ALGS),
    # Upstreams are ours to configure but may be old: chacha20 stays as a last resort.
    "encryption_algs": list(_AES_GCM + _AES_CTR + _CHACHA),
    "mac_algs": list(MAC_ALGS),
    "compression_algs": ["none"],
}
"""asyncssh keyword arguments for the upstream leg (``asyncssh.connect``)."""

SESSION_OPTIONS: Final[dict[str, Any]] = {"window": WINDOW, "max_pktsize": MAX_PACKET, "encoding": None}
"""Keyword arguments for every session channel the bridge opens upstream (``create_session``)."""


def _sends_ignore_before_every_packet() -> bool:
    """Whether the installed asyncssh has the unconditional ignore packet (checked once, at import).

    We look at the code rather than trust a version range: the override below is only installed
    where the behaviour it removes exists, and a fixed asyncssh makes it a no-op by itself.
    """
    try:
        source = inspect.getsource(SSHConnection.send_packet)
    except (OSError, TypeError):  # pragma: no cover - no source shipped
        return False
    return "self.send_packet(MSG_IGNORE, String(b''))" in source


IGNORE_PACKET_FIX_NEEDED: Final = _sends_ignore_before_every_packet()
"""True when the installed asyncssh (``asyncssh.__version__``) pads every packet with an ignore packet."""

_EMPTY_STRING: Final = b"\x00\x00\x00\x00"  # asyncssh.packet.String(b"")


Connection = asyncssh.SSHClientConnection | asyncssh.SSHServerConnection


def drop_redundant_ignore_packets(conn: Connection) -> bool:
    """Stop ``conn`` sending the empty ignore packet before each packet; returns whether installed.

    Call it once per connection, any time (e.g. from ``connection_made``; a second call is a
    no-op). The override is an instance attribute that wraps asyncssh's own ``send_packet``; it
    drops exactly the packets asyncssh inserts (``MSG_IGNORE`` with an empty string), and keeps
    them while a CBC cipher is in use, where they are the countermeasure they were written as.
    Nothing else in asyncssh sends an empty ignore packet.
    """
    if not IGNORE_PACKET_FIX_NEEDED or getattr(conn.send_packet, "_edge_tuned", False):
        return False
    original: Callable[..., None] = conn.send_packet
    cbc: bool | None = None  # decided at the first padding packet, i.e. once encryption is on

    def send_packet(pkttype: int, *args: bytes, handler: Any = None) -> None:
        nonlocal cbc
        if pkttype == MSG_IGNORE and args == (_EMPTY_STRING,):
            # A connection's algorithm lists never change, so a rekey negotiates the same cipher:
            # deciding once keeps a dictionary lookup off the per-packet path.
            if cbc is None:
                cbc = _cbc(conn)
            if not cbc:
                return
        original(pkttype, *args, handler=handler)

    send_packet._edge_tuned = True  # type: ignore[attr-defined]
    conn.send_packet = send_packet  # type: ignore[method-assign]
    return True


def _cbc(conn: Connection) -> bool:
    cipher = conn.get_extra_info("send_cipher") or ""
    return str(cipher).endswith("-cbc") or "-cbc@" in str(cipher)


__all__ = [
    "CLIENT_OPTIONS", "IGNORE_PACKET_FIX_NEEDED", "KEX_ALGS", "MAX_PACKET", "SERVER_OPTIONS",
    "SESSION_OPTIONS", "WINDOW", "drop_redundant_ignore_packets",
]
