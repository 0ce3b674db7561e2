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

The receive-path fixes: asyncssh parses its input buffer (a ``bytes``) by re-slicing the *rest*
of it twice per packet (``_recv_pkthdr``/``_recv_packet``: ``self._inpbuf = self._inpbuf[n:]``),
so a 256 KiB read holding eight 32 KiB packets is copied about eight times over. In a bulk relay
that was ~14% of the proxy's CPU (py-spy). :func:`tune_receive_path` hands asyncssh the data
of one read in slices of :data:`RECEIVE_SLICE` bytes -- exactly what a TCP stream delivering
smaller segments would do, so the protocol handling cannot tell the difference -- which bounds
each re-slice to about one packet. The same wrapper gives each AES-GCM key a reused ``AESGCM``
object (asyncssh makes one per packet) and drops one copy of each received packet; it also
gives :mod:`sshproxy.fastpath` (channel data between the two legs) a decrypt from a buffer slice
and an encrypt straight into the buffer that is written.

The handshake fix: while the first key exchange runs, the same wrapper sets TCP_QUICKACK after
every read, so the client's back-to-back KEXINIT / KEX_ECDH_INIT and NEWKEYS / SERVICE_REQUEST
are not held ~40 ms by its Nagle waiting for our delayed ACK (:func:`_quickack`).

:func:`tune_connection` applies all of them to one connection.

The flow-control fix, per channel: asyncssh re-grants a paused channel's whole window on resume
while data is still queued in it, so a channel the bridge pauses and resumes could queue far more
than its window (16-19 MiB of 2 MiB measured). :func:`bound_receive_window` (the bridge calls it
for every channel it makes) keeps window granted + bytes queued within one window.
"""

from __future__ import annotations

import contextlib
import inspect
import socket
from collections.abc import Callable
from types import FunctionType, MethodType
from typing import Any, Final

import asyncssh
from asyncssh.channel import SSHChannel
from asyncssh.connection import SSHConnection
from asyncssh.constants import MSG_IGNORE
from asyncssh.crypto.cipher import GCMCipher
from asyncssh.encryption import GCMEncryption
from asyncssh.kex import get_kex_algs
from asyncssh.mac import get_mac_algs
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from edge.errors import ConfigError

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


# OpenSSH's default lists minus what ssh-audit fails (docs/ssh.md "Algorithms"): no NIST-curve
# ECDH, no SHA-1 anything, and no group exchange -- asyncssh answers a group-exchange request
# for 1024 bits with a 1024-bit group (sshd's minimum is 2048), and the fixed 2048-8192-bit
# groups below cover every client that cannot do curve25519.
KEX_ALGS: Final = _available((
    "curve25519-sha256", "curve25519-sha256@libssh.org",
    "mlkem768x25519-sha256", "sntrup761x25519-sha512", "sntrup761x25519-sha512@openssh.com",
    "diffie-hellman-group16-sha512", "diffie-hellman-group18-sha512", "diffie-hellman-group14-sha256",
), get_kex_algs())

HOST_KEY_ALGS: Final = ("ssh-ed25519", "rsa-sha2-512", "rsa-sha2-256")
"""Host-key signature algorithms the listener offers, in order: OpenSSH's defaults minus ECDSA
(NIST curves) and ``ssh-rsa`` (SHA-1); asyncssh would also offer ``ssh-rsa`` and the
``ssh-rsa-sha2-*@ssh.com`` variants for an RSA key. An ECDSA host key may stay on disk; it is
not offered."""


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


UPSTREAM_HOST_KEY_ALGS: Final = ("ssh-ed25519", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384",
                                  "ecdsa-sha2-nistp521", "rsa-sha2-512", "rsa-sha2-256")
"""Host-key signatures accepted from a backend: no ``ssh-rsa`` (SHA-1), which asyncssh would take
for a pinned RSA key (OpenSSH < 7.2 backends offer nothing else). ECDSA stays: the pinned key
is the operator's own backend's."""


def host_key_pairs(keys: list[asyncssh.SSHKey]) -> list[asyncssh.SSHKeyPair]:
    """``keys`` as key pairs that sign only with :data:`HOST_KEY_ALGS` (keys that cannot are left
    out), to pass as ``server_host_keys``.

    asyncssh offers every algorithm a key can sign with and has no server option to narrow that;
    a key pair's ``host_key_algorithms`` is what it offers, and asyncssh keeps key pair objects
    as given when it re-derives its options for each connection. Raises ``ConfigError`` when no
    key is left (only an ECDSA host key was found).
    """
    allowed = [name.encode("ascii") for name in HOST_KEY_ALGS]
    pairs = []
    for pair in asyncssh.load_keypairs(keys):
        algs = [alg for alg in allowed if alg in pair.host_key_algorithms]
        if algs:
            pair.host_key_algorithms = algs
            pairs.append(pair)
    if not pairs:
        raise ConfigError(f"[ssh] no host key for any of {', '.join(HOST_KEY_ALGS)}: "
                         "run `edge init` to create an ed25519 or RSA host key")
    return pairs


def _source(obj: Any) -> str:
    """The installed asyncssh's source of ``obj`` ("" when none is shipped: no fix applies).

    Every fix below looks at the code rather than trusting a version range: it is installed only
    where the behaviour it removes exists, and a fixed asyncssh makes it a no-op by itself.
    """
    try:
        return inspect.getsource(obj)
    except (OSError, TypeError):  # pragma: no cover - no source shipped
        return ""


def _sends_ignore_before_every_packet() -> bool:
    """Whether the installed asyncssh has the unconditional ignore packet (checked once, at import)."""
    return "self.send_packet(MSG_IGNORE, String(b''))" in _source(SSHConnection.send_packet)


IGNORE_PACKET_FIX_NEEDED: Final = _sends_ignore_before_every_packet()
"""True when the installed asyncssh (``asyncssh.__version__``) pads every packet with an ignore packet."""

_EMPTY_STRING: Final = b"\x00\x00\x00\x00"  # asyncssh.packet.String(b"")
_GCM_TAG: Final = 16
_HAS_ENCRYPT_INTO: Final = hasattr(AESGCM, "encrypt_into")  # not in older cryptography releases


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


RECEIVE_SLICE: Final = 32 * 1024
"""Bytes of input given to asyncssh's packet parser at a time (about one full data packet)."""


def _reslices_input_per_packet() -> bool:
    """Whether the installed asyncssh parses packets the way :func:`tune_receive_path` expects
    (checked against 2.24.1): ``data_received`` appends to the ``bytes`` ``_inpbuf`` and calls
    ``_recv_data``, which parses until the buffer is short, re-slicing the rest per packet."""
    received = _source(SSHConnection.data_received)
    return ("self._inpbuf += data" in received and "self._recv_data()" in received
            and "while self._inpbuf and self._recv_handler()" in _source(SSHConnection._recv_data)
            and "self._inpbuf = self._inpbuf[self._recv_blocksize:]" in _source(SSHConnection._recv_pkthdr))


def _gcm_builds_a_key_per_packet() -> bool:
    """Whether asyncssh's AES-GCM shim is the one :func:`_fast_gcm` replaces (checked against
    2.24.1): a new ``AESGCM(key)`` per packet, the IV counter in ``_iv``, the ciphertext handed
    over as ``first[header_len:] + rest`` and joined again with the tag."""
    return ("AESGCM(self._key).encrypt(self._iv, data, header)" in _source(GCMCipher.encrypt_and_sign)
            and "AESGCM(self._key).decrypt(self._iv, data + mac, header)"
            in _source(GCMCipher.verify_and_decrypt)
            and "invocation + 1) & 0xffffffffffffffff" in _source(GCMCipher._update_iv)
            and "self._iv = self._iv[:4] + invocation.to_bytes(8, 'big')" in _source(GCMCipher._update_iv)
            and "first[header_len:] + rest, mac" in _source(GCMEncryption.decrypt_packet)
            and "return self._cipher.encrypt_and_sign(header, packet)"
            in _source(GCMEncryption.encrypt_packet))


RECEIVE_FIX_NEEDED: Final = _reslices_input_per_packet()
"""True when the installed asyncssh's receive path is the one :func:`tune_receive_path` bounds."""
GCM_FIX_NEEDED: Final = _gcm_builds_a_key_per_packet()
"""True when the installed asyncssh's AES-GCM shim is the one :func:`_fast_gcm` replaces."""


def _fast_gcm(encryption: object) -> bool:
    """Give one connection's AES-GCM encryption object (one direction, one key) a reused
    ``AESGCM`` and one copy less per received packet; returns whether it was one to tune.

    asyncssh builds ``AESGCM(key)`` for every packet (an OpenSSL context fetch each time) and
    copies the received ciphertext twice before decrypting. Measured per 32 KiB packet: encrypt
    16 -> 11 us, decrypt 28 -> 16 us. The output, the IV sequence and a failed tag (``None``,
    which asyncssh turns into its MAC error) are exactly asyncssh's. Instance attributes on
    this object only; a rekey makes a new object, tuned again when seen. ``_edge_open`` and
    ``_edge_seal`` are the same operations without asyncssh's packet split (for
    :mod:`sshproxy.fastpath`).
    """
    if type(encryption) is not GCMEncryption or getattr(encryption, "_edge_tuned", False):
        return False
    cipher: Any = encryption._cipher
    aead = AESGCM(cipher._key)
    # GCMCipher._update_iv, without its method call and re-parse of the counter per packet:
    # 4 fixed bytes + a 64-bit big-endian invocation counter (checked in _gcm_builds_a_key_per_packet).
    fixed: bytes = cipher._iv[:4]
    invocation = [int.from_bytes(cipher._iv[4:], "big")]

    def update_iv() -> None:
        invocation[0] = count = (invocation[0] + 1) & 0xFFFFFFFFFFFFFFFF
        cipher._iv = fixed + count.to_bytes(8, "big")

    def encrypt_packet(seq: int, header: bytes, packet: bytes) -> tuple[bytes, bytes]:
        sealed = aead.encrypt(cipher._iv, packet, header)
        update_iv()
        return header + sealed[:-_GCM_TAG], sealed[-_GCM_TAG:]

    def decrypt_packet(seq: int, first: bytes, rest: bytes, header_len: int,
                       mac: bytes) -> bytes | None:
        try:
            plain: bytes | None = aead.decrypt(cipher._iv, b"".join((first[header_len:], rest, mac)),
                                               first[:header_len])
        except InvalidTag:
            plain = None
        update_iv()
        return plain

    def seal(header: bytes, packet: bytes) -> bytearray:
        """``header + b"".join(encrypt_packet(seq, header, packet))`` -- the packet as sent --
        built in one buffer: ``encrypt_packet``'s pair costs three more copies of the packet
        (tag split, header join, asyncssh's ``packet + mac``). Used by :mod:`sshproxy.fastpath`."""
        wire = bytearray(len(header) + len(packet) + _GCM_TAG)
        wire[:len(header)] = header
        aead.encrypt_into(cipher._iv, packet, header, memoryview(wire)[len(header):])
        update_iv()
        return wire

    def open_packet(header: bytes, sealed: memoryview) -> bytes | None:
        """``decrypt_packet`` for a packet whose ciphertext and tag are one buffer already (a
        slice of the input): no join. Used by :mod:`sshproxy.fastpath`."""
        try:
            plain: bytes | None = aead.decrypt(cipher._iv, sealed, header)
        except InvalidTag:
            plain = None
        update_iv()
        return plain

    encryption_: Any = encryption
    encryption_.encrypt_packet = encrypt_packet
    encryption_.decrypt_packet = decrypt_packet
    encryption_._edge_open = open_packet
    if _HAS_ENCRYPT_INTO:
        encryption_._edge_seal = seal
    encryption_._edge_tuned = True
    return True


def tune_receive_path(conn: Connection) -> bool:
    """Make ``conn`` parse each read in :data:`RECEIVE_SLICE` pieces and use the reused-key
    AES-GCM of :func:`_fast_gcm` in both directions; returns whether installed.

    Like :func:`drop_redundant_ignore_packets`, an instance attribute wrapping asyncssh's own
    ``_recv_data`` (``data_received`` itself cannot be wrapped: uvloop binds it when the
    transport is made). asyncssh's parser keeps its state between calls, as it must for data
    split across reads, so feeding it in pieces is what a stream of smaller TCP segments does.
    Once the connection is closed (``_force_close``: a protocol error, a MAC failure, a
    disconnect) the rest is left unparsed in the buffer, as asyncssh's own loop leaves it.
    New keys are only ever taken into use while received packets are processed (``NEWKEYS``),
    so checking for a new encryption object here, once per piece, finds every one; packets in
    between go through asyncssh's own code, which produces the same bytes. Until encryption is
    on, it also sets TCP_QUICKACK after each piece (:func:`_quickack`).
    """
    if not (RECEIVE_FIX_NEEDED or GCM_FIX_NEEDED) or getattr(conn._recv_data, "_edge_tuned", False):
        return False
    original: Callable[[], None] = conn._recv_data
    step = RECEIVE_SLICE if RECEIVE_FIX_NEEDED else 1 << 62
    gcm = GCM_FIX_NEEDED
    state: Any = conn
    seen: list[object] = [None, None]  # the send / receive encryption objects last tuned
    quickack = _tcp_socket(conn)

    def parse() -> None:
        original()
        if state._recv_encryption is None and quickack is not None:
            # Still in the first key exchange: ACK the peer's next segment at once (see _quickack).
            _quickack(quickack)
        if gcm:
            send, recv = state._send_encryption, state._recv_encryption
            if send is not seen[0]:
                seen[0] = send
                _fast_gcm(send)
            if recv is not seen[1]:
                seen[1] = recv
                _fast_gcm(recv)

    def recv_data() -> None:
        data = state._inpbuf
        if len(data) <= 2 * step:
            parse()
            return
        view = memoryview(data)
        state._inpbuf = data[:step]
        parse()
        for start in range(step, len(data), step):
            if state._transport is None:  # closed while parsing: asyncssh stops here too
                state._inpbuf += view[start:]
                return
            state._inpbuf += view[start:start + step]
            parse()

    recv_data._edge_tuned = True  # type: ignore[attr-defined]
    state._recv_data = recv_data
    return True


def _grants_window_for_queued_data() -> bool:
    """Whether the installed asyncssh (checked against 2.24.1) re-opens a paused channel's whole
    window on resume: ``_accept_data`` subtracts every received packet from ``_recv_window``, the
    paused ones included, and ``_deliver_data``, run for the first queued packet, grants back
    ``_init_recv_window - _recv_window`` -- which counts the packets still queued behind it as
    consumed."""
    deliver = _source(SSHChannel._deliver_data)
    return ("adjust = self._init_recv_window - self._recv_window" in deliver
            and "self._recv_window -= len(data)" in _source(SSHChannel._accept_data)
            and "self._deliver_data(*self._recv_buf.pop(0))" in _source(SSHChannel._flush_recv_buf))


WINDOW_FIX_NEEDED: Final = _grants_window_for_queued_data()


def bound_receive_window(chan: SSHChannel[Any]) -> bool:
    """Make ``chan`` grant window only for data its session has really taken; returns whether installed.

    Why: the bridge pauses reading one leg's channel while the other leg cannot keep up, and
    resumes it when that leg drains. With asyncssh's own accounting (see
    :func:`_grants_window_for_queued_data`) every resume hands the sender a full new window
    while up to a window of data is still queued here, and the next pause queues that too: a
    paused channel's buffer grew to 16-19 MiB (of a 2 MiB window) relaying 256 MiB, and the
    proxy's RSS with it (``test_memory_bounded_during_large_transfer``). The wrapper counts the
    still-queued bytes as not yet received while asyncssh decides on the adjust, so the window
    granted plus the bytes queued never exceed one window -- what ``pause_reading`` documents.
    Outside a resume nothing is queued and asyncssh's code runs unchanged. An instance attribute
    (like the connection fixes above), so nothing outside the proxy's own channels changes.
    """
    if not WINDOW_FIX_NEEDED or getattr(chan._deliver_data, "_edge_tuned", False):
        return False
    deliver: Callable[[bytes, Any], None] = chan._deliver_data
    flush: Callable[..., None] = chan._flush_recv_buf
    state: Any = chan
    queued = [0]  # bytes still in _recv_buf behind the packet being delivered (only during a flush)

    def flush_recv_buf(*args: Any) -> None:
        # Summed once per resume, not per packet: a resume can deliver a whole window of packets.
        queued[0] = sum(len(item[0]) for item in state._recv_buf)
        try:
            flush(*args)
        finally:
            queued[0] = 0

    def deliver_data(data: bytes, datatype: Any) -> None:
        if not queued[0]:  # the usual case: not resuming from a pause
            deliver(data, datatype)
            return
        queued[0] -= len(data)
        behind = queued[0]
        state._recv_window += behind
        try:
            deliver(data, datatype)
        finally:
            state._recv_window -= behind

    deliver_data._edge_tuned = True  # type: ignore[attr-defined]
    state._deliver_data = deliver_data
    state._flush_recv_buf = flush_recv_buf
    return True


def _tcp_socket(conn: Connection) -> Any:
    sock = conn.get_extra_info("socket")
    if sock is None or not hasattr(socket, "TCP_QUICKACK") or sock.family not in (socket.AF_INET,
                                                                                  socket.AF_INET6):
        return None
    return sock


def _quickack(sock: Any) -> None:
    """ACK the next incoming segment immediately instead of after Linux's delayed-ACK timer.

    During the key exchange both sides send small packets back to back, and an OpenSSH client
    leaves Nagle on until a session starts: its KEX_ECDH_INIT waits until its KEXINIT is ACKed.
    asyncssh sends its own KEXINIT as soon as it has the client's version, so when the
    client's KEXINIT arrives it has nothing to send and the kernel delays the ACK (~40 ms on
    Linux loopback), stalling every login by that much. sshd sends its KEXINIT in answer to the
    client's, which carries the ACK. TCP_QUICKACK is not sticky, hence set after every read
    until encryption is on.
    """
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)


def tune_connection(conn: Connection) -> None:
    """Apply this module's packet-path fixes to ``conn`` (either leg; a second call is a no-op)."""
    drop_redundant_ignore_packets(conn)
    tune_receive_path(conn)


def _no_more_packets() -> bool:
    return False


def release_wrappers(obj: object) -> None:
    """Drop the instance-attribute wrappers installed on ``obj`` (a closed connection or channel);
    its class's own methods take over again. Their closures hold ``obj``: a reference cycle."""
    attrs = vars(obj)
    for name, value in list(attrs.items()):
        if isinstance(value, FunctionType | MethodType) and hasattr(type(obj), name):
            del attrs[name]


def release_connection(conn: Connection) -> None:
    """Break the reference cycles a closed ``conn`` is part of, so reference counting frees it.

    Why: a worker runs the cyclic GC rarely (``edge.serve.worker.GC_THRESHOLDS``), so a dead
    connection left as cyclic garbage stays in memory: a flood of 1,000 connections that never
    logged in grew a worker by ~11-20 MiB per round, for good. The cycles: every wrapper
    installed on the connection (this module's, :mod:`sshproxy.fastpath`'s, the server's key
    check) is an instance attribute whose closure holds the connection (:func:`release_wrappers`),
    and asyncssh keeps its packet parser step as a bound method on the connection
    (``_recv_handler``), replaced by one that parses nothing (asyncssh has emptied its input
    buffer by then). Call it once the connection is closed (``connection_lost``).
    """
    release_wrappers(conn)
    vars(conn)["_recv_handler"] = _no_more_packets


def _cbc(conn: Connection) -> bool:
    cipher = conn.get_extra_info("send_cipher") or ""
    return str(cipher).endswith("-cbc") or "-cbc@" in str(cipher)


__all__ = [
    "CLIENT_OPTIONS", "GCM_FIX_NEEDED", "HOST_KEY_ALGS", "IGNORE_PACKET_FIX_NEEDED", "KEX_ALGS", "MAX_PACKET",
    "RECEIVE_FIX_NEEDED", "RECEIVE_SLICE", "SERVER_OPTIONS", "SESSION_OPTIONS", "UPSTREAM_HOST_KEY_ALGS",
    "WINDOW",
    "WINDOW_FIX_NEEDED", "bound_receive_window", "drop_redundant_ignore_packets",
    "host_key_pairs", "release_connection", "release_wrappers", "tune_connection", "tune_receive_path",
]
