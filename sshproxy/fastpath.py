"""A short path for channel data between the two legs of the bridge (asyncssh 2.24.1 only).

Why: relaying one 32 KiB ``SSH_MSG_CHANNEL_DATA`` packet through asyncssh cost ~100 us of
Python on top of the crypto and the socket calls (py-spy, docs/ssh-bridge.md): ``_recv_pkthdr``
and ``_recv_packet`` re-slice the input buffer per packet, build an ``SSHPacket``, walk the
packet-type checks, format a packet log line that is dropped unless debug level 3 is on, and
dispatch to ``_process_data`` -> ``_accept_data`` -> ``_deliver_data``; the other leg's
``write`` copies the data into a ``bytearray``, queues it, ``_flush_send_buf`` slices it out
again, ``String()``, ``send_packet`` on the channel and on the connection each join it once
more, the padding step once more, and the AES-GCM shim three times.

What it does, only for the channels the bridge marks with :func:`enable_channel` and only in
the common case; everything else takes asyncssh's own path, unchanged:

* **receive, any cipher** (:func:`enable_connection`: an instance attribute wrapping the
  connection's ``_recv_packet``): the packet is decrypted as asyncssh does it. If it is channel
  data for a marked channel that is open and not closing, within the receive window, well
  formed, and asyncssh's debug logging is below level 2, it is taken as
  ``SSHChannel._accept_data`` takes it: queued if the channel is paused (its window charged, no
  adjust: ``tuning.bound_receive_window`` then grants window back as the queue drains, exactly
  as before), else delivered to the session after the window adjust ``_deliver_data`` would
  send. The two other packets a bulk transfer brings are taken too: a window adjust for a marked
  channel (``_process_window_adjust``: the send window grows, queued data goes out) and
  ``SSH_MSG_IGNORE`` (which asyncssh peers send before every packet; nothing to do). Anything
  else -- other packet types, extended data, EOF, close, a window overrun, a
  malformed packet, a failed tag -- goes to asyncssh's ``_recv_packet`` with the plaintext
  already decrypted (:func:`_hand_over`; the cipher state has moved on, so it must not decrypt
  twice), which then does everything as usual, errors included.
* **receive, AES-GCM** (wrapping ``_recv_data``, over ``tuning.tune_receive_path``'s): the
  whole read is parsed in place -- lengths read at an offset, ciphertext + tag decrypted from a
  ``memoryview`` of the input (``tuning._fast_gcm``'s ``_edge_open``) -- instead of asyncssh
  copying the rest of its buffer twice per packet. The first packet that is not one of the
  above, and everything after it in that read, go to asyncssh's parser (as above); the next read
  comes back here, also when asyncssh stopped inside a packet (its header step only moved the
  unencrypted first block aside, which is put back).
* **send** (:func:`enable_channel`: instance attributes wrapping the channel's ``write`` and
  ``_flush_send_buf``): raw data that fits the peer's window and maximum packet, on a channel
  that is open with nothing queued ahead of it (so order with earlier data, extended data, EOF
  and close holds), on a connection past authentication with no key exchange due or running, no
  compression and no CBC cipher (where asyncssh's ignore packets are wanted), is built into one
  packet with ``SSHConnection.send_packet``'s padding rule, sequence number and rekey byte
  count and sealed straight into the buffer that is written (``_edge_seal``). Data queued behind
  a full window is sent the same way when the window opens; asyncssh's ``_flush_send_buf`` then
  still runs for what is left (extended data), the write-buffer water marks, EOF and close.

The bytes on the wire are what asyncssh sends (with ``tuning.drop_redundant_ignore_packets``),
bar the random padding. Installed only for the asyncssh versions in :data:`VERSIONS` whose
source still has each piece of code replicated here (:data:`FASTPATH_SUPPORTED`), and only on
channel classes that override none of the methods it stands in for; elsewhere both functions
are no-ops and asyncssh runs as shipped.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any, Final

import asyncssh
from asyncssh.channel import SSHChannel
from asyncssh.connection import SSHConnection
from asyncssh.constants import MSG_CHANNEL_DATA, MSG_CHANNEL_WINDOW_ADJUST, MSG_IGNORE
from asyncssh.encryption import GCMEncryption
from asyncssh.logging import SSHLogger
from asyncssh.misc import DisconnectError

from sshproxy import tuning

VERSIONS: Final = ("2.24.1",)
"""asyncssh versions whose packet path this module was written against and tested with."""


def _replicates_installed_asyncssh() -> bool:
    """Whether the installed asyncssh is a version in :data:`VERSIONS` *and* its source has each
    piece of code this module replicates (so an edited install also turns it off)."""
    if asyncssh.__version__ not in VERSIONS:
        return False
    src = tuning._source
    recv = src(SSHConnection._recv_packet)
    send = src(SSHConnection.send_packet)
    return all((
        "rem = 4 + self._pktlen + self._recv_macsize - self._recv_blocksize" in recv,
        "seq, self._packet, rest, 4, mac)" in recv,
        "orig_payload = packet_data[1:-packet_data[0]]" in recv,
        "self._recv_handler = self._recv_packet" in src(SSHConnection._recv_pkthdr),
        "self._packet = self._inpbuf[:self._recv_blocksize]" in src(SSHConnection._recv_pkthdr),
        "return first_block, first_block[:header_len]" in src(GCMEncryption.decrypt_header),
        "self._recv_seq = (seq + 1) & 0xffffffff" in src(SSHConnection._finish_recv_packet),
        "self._recv_handler = self._recv_pkthdr" in src(SSHConnection._finish_recv_packet),
        "padlen = -(self._send_enchdrlen + len(payload)) % self._send_blocksize" in send,
        "packet = Byte(padlen) + payload + os.urandom(padlen)" in send,
        "packet, mac = self._send_encryption.encrypt_packet(seq, hdr, packet)" in send,
        "self._send(packet + mac)" in send,
        "self._rekey_bytes_sent += pktlen" in send,
        "if datalen > self._recv_window:" in src(SSHChannel._process_data),
        "self._send_window += adjust" in src(SSHChannel._process_window_adjust),
        "if self._recv_state not in {'open', 'eof_pending', 'eof'}:"
        in src(SSHChannel._process_window_adjust),
        "if b'Cisco' not in self._server_version:" in src(SSHConnection._process_ignore),
        "if self._send_state in {'close_pending', 'closed'}:" in src(SSHChannel._accept_data),
        "if self._recv_window < self._init_recv_window / 2:" in src(SSHChannel._deliver_data),
        "self.send_packet(MSG_CHANNEL_DATA, String(data))" in src(SSHChannel._flush_send_buf),
        "payload = UInt32(self._send_chan) + b''.join(args)" in src(SSHChannel.send_packet),
        "self._send_buf.append((bytearray(encoded_data), datatype))" in src(SSHChannel.write),
    ))


FASTPATH_SUPPORTED: Final = _replicates_installed_asyncssh()
"""True when :func:`enable_connection` / :func:`enable_channel` install anything."""
ENABLED = FASTPATH_SUPPORTED
"""Switch read when a connection or channel is enabled (benchmarks turn it off for A/B runs)."""

_DATA: Final = MSG_CHANNEL_DATA
_GCM_TAG: Final = 16
_PKTHDR: Final = SSHConnection._recv_pkthdr
_MARK: Final = "_edge_fast"
_IGNORED: Final = object()
_ADJUSTABLE: Final = ("open", "eof_pending", "eof")  # SSHChannel._process_window_adjust's states
_REPLICATED: Final = ("_process_data", "_accept_data", "_deliver_data", "_process_window_adjust",
                      "write", "_flush_send_buf", "send_packet")
"""Channel methods the short path stands in for: a channel class overriding any (TUN/TAP) keeps asyncssh's."""


def _logging_quiet() -> bool:
    """asyncssh logs per data packet only at debug level 2 and up: then take its path, logs and all."""
    level: int = SSHLogger._debug_level
    return level < 2


def _hand_over(enc: Any, plain: bytes | None) -> None:
    """Make ``enc``'s next ``decrypt_packet`` call return ``plain`` (once, then it is itself
    again): asyncssh's own path then processes a packet this module already decrypted -- the
    cipher state has moved on, so it must not be decrypted twice."""
    had = enc.__dict__.get("decrypt_packet")

    def once(*_: object) -> bytes | None:
        if had is None:
            del enc.decrypt_packet
        else:
            enc.decrypt_packet = had
        return plain

    enc.decrypt_packet = once


def enable_connection(conn: tuning.Connection) -> bool:
    """Let ``conn`` deliver channel data straight to the sessions of channels marked with
    :func:`enable_channel`; returns whether installed (a second call is a no-op)."""
    if not ENABLED or conn.__dict__.get(_MARK):
        return False
    tuning.tune_connection(conn)  # first: its receive wrapper goes under this one
    state: Any = conn
    original_packet: Callable[[], bool] = state._recv_packet
    original_data: Callable[[], None] = state._recv_data  # tuning.tune_receive_path's, if installed
    channels: dict[int, Any] = state._channels

    def channel_for(plain: bytes | None) -> Any:
        """The marked channel this decrypted packet is ordinary data for, else None."""
        # (padding length 0 gives asyncssh an empty payload, an error: left to it)
        if plain is None or len(plain) < 10 or plain[1] != _DATA or not plain[0]:
            return None
        chan = channels.get(int.from_bytes(plain[2:6], "big"))
        if (chan is None or not chan.__dict__.get(_MARK)
                or not 0 < int.from_bytes(plain[6:10], "big") <= chan._recv_window
                or 10 + int.from_bytes(plain[6:10], "big") != len(plain) - plain[0]
                or chan._recv_state != "open" or chan._send_state in ("close_pending", "closed")
                or (chan._recv_buf and not chan._recv_paused)  # mid-flush: keep the order simple
                or not _logging_quiet()):
            return None
        return chan

    def take(chan: Any, plain: bytes, seq: int) -> None:
        """SSHConnection._finish_recv_packet, then SSHChannel._accept_data (+ _deliver_data) for
        a raw-bytes channel. The parser's state is final before the session runs, so a session
        that raises leaves it where asyncssh would."""
        state._auth_final = True
        if state._transport:
            state._recv_seq = (seq + 1) & 0xFFFFFFFF
        state._recv_handler = state._recv_pkthdr
        data = plain[10:len(plain) - plain[0]]
        window = chan._recv_window - len(data)
        if chan._recv_paused:  # queued until resume_reading; no window adjust meanwhile
            chan._recv_window = window
            chan._recv_buf.append((data, None))
            return
        init = chan._init_recv_window
        if window < init / 2:
            chan.send_packet(MSG_CHANNEL_WINDOW_ADJUST, (init - window).to_bytes(4, "big"))
            window = init
        chan._recv_window = window
        chan._session.data_received(data, None)

    def control_for(plain: bytes | None) -> Any:
        """For the two other packets a bulk transfer brings -- a window adjust for a marked
        channel, and ``SSH_MSG_IGNORE`` (asyncssh peers send one before every packet) -- what
        :func:`take_control` needs; None for anything else (or anything malformed)."""
        if plain is None or len(plain) < 6 or not plain[0] or not _logging_quiet():
            return None
        end = len(plain) - plain[0]
        if plain[1] == MSG_IGNORE:  # SSHConnection._process_ignore: a string, nothing after it
            if 6 + int.from_bytes(plain[2:6], "big") == end and b"Cisco" not in state._server_version:
                return _IGNORED
            return None
        if plain[1] == MSG_CHANNEL_WINDOW_ADJUST and end == 10:
            chan = channels.get(int.from_bytes(plain[2:6], "big"))
            if chan is not None and chan.__dict__.get(_MARK) and chan._recv_state in _ADJUSTABLE:
                return chan
        return None

    def take_control(what: Any, plain: bytes, seq: int) -> None:
        """SSHConnection._finish_recv_packet, then nothing (ignore) or
        SSHChannel._process_window_adjust (the window grows, queued data is sent)."""
        if state._transport:
            state._recv_seq = (seq + 1) & 0xFFFFFFFF
        state._recv_handler = state._recv_pkthdr
        if what is _IGNORED:
            return
        state._auth_final = True
        what._send_window += int.from_bytes(plain[6:10], "big")
        what._flush_send_buf()

    def recv_packet() -> bool:
        # Any cipher: decrypt as asyncssh does, take channel data, hand anything else back.
        enc = state._recv_encryption
        if enc is None or state._decompressor is not None:
            return original_packet()
        macsize: int = state._recv_macsize
        rem: int = 4 + state._pktlen + macsize - state._recv_blocksize
        inp: bytes = state._inpbuf
        if len(inp) < rem:
            return False
        seq: int = state._recv_seq
        plain: bytes | None = enc.decrypt_packet(seq, state._packet, inp[:rem - macsize], 4,
                                                 inp[rem - macsize:rem])
        chan = channel_for(plain)
        control = None if chan is not None else control_for(plain)
        if chan is None and control is None:
            _hand_over(enc, plain)
            return original_packet()
        assert plain is not None
        state._inpbuf = inp[rem:]
        state._packet = b""
        if chan is not None:
            take(chan, plain, seq)
        else:
            take_control(control, plain, seq)
        return True

    def recv_data() -> None:
        # AES-GCM tuned by tuning._fast_gcm: parse the whole read in place. asyncssh (and
        # tuning.tune_receive_path, which feeds it 32 KiB at a time) copies the rest of the
        # buffer twice per packet and the ciphertext once more to decrypt it; here the length
        # is read at an offset and the ciphertext + tag decrypted straight from a memoryview.
        enc = state._recv_encryption
        opener = getattr(enc, "_edge_open", None)
        if opener is None or state._decompressor is not None:
            original_data()
            return
        handler = state._recv_handler
        if handler == state._recv_packet:
            # asyncssh's parser stopped inside a packet (after a hand-over, a read ended in the
            # middle of one): its header step only moved the first block into ``_packet`` (an
            # AES-GCM header is not encrypted), so putting it back resumes here, at the packet's
            # start -- else every later read would end mid-packet and stay on asyncssh's path.
            state._inpbuf = state._packet + state._inpbuf
            state._packet = b""
            state._recv_handler = state._recv_pkthdr
        elif getattr(handler, "__func__", None) is not _PKTHDR:  # e.g. waiting for an async handler
            original_data()
            return
        data: bytes = state._inpbuf
        size = len(data)
        view = memoryview(data)
        limit: int = state._max_recv_pktlen
        offset = 0
        hand = False  # whether asyncssh's path takes over at ``offset``
        state._reset_keepalive_timer()
        try:
            while size - offset >= 4:
                head = data[offset:offset + 4]
                end = offset + 4 + int.from_bytes(head, "big") + _GCM_TAG
                if end - offset - 4 - _GCM_TAG > limit:
                    hand = True  # too long: asyncssh's error
                    break
                if end > size:
                    break  # incomplete: wait for more
                seq = state._recv_seq
                plain = opener(head, view[offset + 4:end])
                chan = channel_for(plain)
                control = None if chan is not None else control_for(plain)
                if chan is None and control is None:  # anything else: asyncssh's path from here on
                    _hand_over(enc, plain)
                    hand = True
                    break
                assert plain is not None
                offset = end
                if chan is not None:
                    take(chan, plain, seq)
                else:
                    take_control(control, plain, seq)
                if state._transport is None:  # closed by what the session did: stop, as asyncssh does
                    break
        except DisconnectError as exc:  # what SSHConnection._recv_data does with errors
            state._inpbuf = data[offset:]
            state._send_disconnect(exc.code, exc.reason, exc.lang)
            state._force_close(exc)
            return
        except Exception:  # asyncssh's own catch-all, same handling
            state._inpbuf = data[offset:]
            state.internal_error()
            return
        state._inpbuf = data[offset:] if offset else data
        if hand:
            original_data()

    state._recv_packet = recv_packet
    state._recv_data = recv_data
    state.__dict__[_MARK] = True
    return True


def enable_channel(chan: SSHChannel[Any]) -> bool:
    """Mark ``chan`` (raw bytes, on a connection with :func:`enable_connection`) for the short
    path both ways; returns whether installed. Call it from the session's ``connection_made``."""
    state: Any = chan
    cls = type(chan)
    if (not ENABLED or state._encoding is not None or state.__dict__.get(_MARK) or state._conn is None
            or any(getattr(cls, name) is not getattr(SSHChannel, name) for name in _REPLICATED)):
        return False
    conn: Any = state._conn
    enable_connection(conn)
    original_write: Callable[..., None] = chan.write
    original_flush: Callable[[], None] = state._flush_send_buf
    cbc: list[object] = [None, False]  # [send encryption object, whether it is CBC]
    urandom = os.urandom
    monotonic = time.monotonic

    def sendable() -> bool:
        """Whether ``conn.send_packet`` would send a channel data packet as is, right now."""
        if not (conn._kex_complete and conn._auth_complete) or conn._deferred_packets \
                or conn._compressor is not None or conn._rekey_bytes_sent >= conn._rekey_bytes \
                or (conn._rekey_seconds and monotonic() >= conn._rekey_time) or not _logging_quiet():
            return False
        enc = conn._send_encryption
        if enc is None or not getattr(conn.send_packet, "_edge_tuned", False):
            return False
        if cbc[0] is not enc:
            cbc[:] = [enc, tuning._cbc(conn)]
        return not cbc[1]

    def send_data(data: bytes | bytearray) -> None:
        """SSHChannel.send_packet(MSG_CHANNEL_DATA, String(data)) -> SSHConnection.send_packet,
        with the packet joined once and sealed once (the caller checked :func:`sendable`)."""
        size = len(data)
        state._send_window -= size
        padlen = -(conn._send_enchdrlen + 9 + size) % conn._send_blocksize
        if padlen < 4:
            padlen += conn._send_blocksize
        pktlen = 10 + size + padlen
        header = pktlen.to_bytes(4, "big")
        packet = b"".join((bytes((padlen, _DATA)), state._send_chan.to_bytes(4, "big"),
                           size.to_bytes(4, "big"), data, urandom(padlen)))
        enc = conn._send_encryption
        seq = conn._send_seq
        seal = getattr(enc, "_edge_seal", None)
        if seal is not None:
            wire = seal(header, packet)
        else:
            sealed, mac = enc.encrypt_packet(seq, header, packet)
            wire = sealed + mac
        conn._send(wire)
        conn._send_seq = (seq + 1) & 0xFFFFFFFF
        conn._rekey_bytes_sent += pktlen

    def write(data: bytes, datatype: int | None = None) -> None:
        size = len(data)
        if (datatype is None and size and state._send_state == "open" and not state._send_buf
                and size <= state._send_window and size <= state._send_pktsize and sendable()):
            send_data(data)
            return
        original_write(data, datatype)

    def flush_send_buf() -> None:
        # What asyncssh's loop does for the raw data at the head of the queue (a window adjust
        # arrived, or write queued behind a full window); extended data, and the water marks,
        # EOF and close that follow, are left to asyncssh's own _flush_send_buf.
        send_buf: list[tuple[bytearray, int | None]] = state._send_buf
        while (send_buf and state._send_window and send_buf[0][1] is None
               and state._send_chan is not None and sendable()):
            pktsize = min(state._send_window, state._send_pktsize)
            buf = send_buf[0][0]
            if len(buf) > pktsize:
                data = buf[:pktsize]
                del buf[:pktsize]
            else:
                data = buf
                del send_buf[0]
            state._send_buf_len -= len(data)
            send_data(data)
        original_flush()

    write._edge_tuned = True  # type: ignore[attr-defined]
    state.write = write
    state._flush_send_buf = flush_send_buf
    state.__dict__[_MARK] = True
    return True


__all__ = ["ENABLED", "FASTPATH_SUPPORTED", "VERSIONS", "enable_channel", "enable_connection"]
