"""Peek at a TLS ClientHello before any TLS engine exists: sans-IO, pure, no sockets.

The HTTPS accept loop cannot use a synchronous ``sni_callback`` (it must *await* the cached
directory lookup to pick the site's :class:`ssl.SSLContext`), so it reads the ClientHello
itself first::

    reader = ClientHelloReader()
    while (hello := reader.feed(await stream.read(4096))) is None:
        ...                                   # (EOF before a hello: just close)
    # ClientHelloError: write alert_bytes(exc.alert) (or, if exc.plain_http, a plain-text
    # "400 use https://" answer) and close.
    name = hostname_or_none(hello.server_name) if hello.server_name else None
    ctx = await contexts.for_site(name)       # unknown site -> alert_bytes("unrecognized_name")
    incoming.write(hello.raw)                 # replay every byte read so far into ssl.MemoryBIO
    tls = ctx.wrap_bio(incoming, outgoing, server_side=True)

What the reader does:

* buffers the TLS plaintext record(s) carrying the ClientHello handshake message; the message
  may be fragmented over several records (all of content type ``handshake``; any other record
  before the message is complete is refused, as RFC 8446 §5.1 requires);
* returns :class:`ClientHello` once the message is complete, with ``raw`` = every byte fed so
  far (including anything the client sent after the hello's last record, e.g. a
  ``change_cipher_spec`` or 0-RTT record in the same read), to replay into the TLS engine;
* refuses with :class:`ClientHelloError` (carrying the TLS alert to send) anything that is not
  a well-formed ClientHello: plain HTTP on the TLS port (``exc.plain_http`` is True, so the
  caller may answer with a 400 hint instead of an alert), SSLv2-compatible hellos, record or
  handshake length inconsistencies, trailing bytes after the hello inside its last record,
  more than ``max_bytes`` buffered, malformed or duplicate extensions (RFC 8446 §4.2),
  malformed ``server_name`` / ``application_layer_protocol_negotiation`` /
  ``supported_versions`` bodies, and an SNI entry whose name type is not ``host_name``.

SNI that is *present but not a DNS hostname* (an IP literal — forbidden by RFC 6066 §3 — a
wildcard, non-ASCII bytes, whitespace, bad labels) is **not** an error: clients such as curl or
older libraries do send IP literals, and the correct behaviour is "as if no SNI was sent" (the
default certificate, or ``unrecognized_name`` if the caller has none). The reader then returns
``server_name=None`` and the offending value (for logs only, with non-ASCII bytes
backslash-escaped) in :attr:`ClientHello.rejected_server_name`. A valid ``server_name`` is kept
exactly as sent (case, trailing dot); the caller normalises it with
:func:`edge.directory.names.hostname_or_none`, which is also the validity test used here.

Only the fields the proxy routes on are decoded; everything else (cipher suites, key shares,
PSKs, extension ordering rules) is left to the real TLS engine that receives ``raw``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from edge.directory.names import hostname_or_none
from edge.errors import EdgeError

__all__ = [
    "ALERT_DESCRIPTIONS",
    "ClientHello",
    "ClientHelloError",
    "ClientHelloReader",
    "alert_bytes",
]

#: TLS alert descriptions (RFC 8446 §6, plus the SSL 3 / TLS 1.2 ones still sent in practice).
ALERT_DESCRIPTIONS: dict[str, int] = {
    "close_notify": 0,
    "unexpected_message": 10,
    "bad_record_mac": 20,
    "record_overflow": 22,
    "handshake_failure": 40,
    "bad_certificate": 42,
    "unsupported_certificate": 43,
    "certificate_revoked": 44,
    "certificate_expired": 45,
    "certificate_unknown": 46,
    "illegal_parameter": 47,
    "unknown_ca": 48,
    "access_denied": 49,
    "decode_error": 50,
    "decrypt_error": 51,
    "protocol_version": 70,
    "insufficient_security": 71,
    "internal_error": 80,
    "inappropriate_fallback": 86,
    "user_canceled": 90,
    "missing_extension": 109,
    "unsupported_extension": 110,
    "unrecognized_name": 112,
    "bad_certificate_status_response": 113,
    "unknown_psk_identity": 115,
    "certificate_required": 116,
    "no_application_protocol": 120,
}

_CONTENT_HANDSHAKE = 22
_HANDSHAKE_CLIENT_HELLO = 1
_RECORD_HEADER = 5
_HANDSHAKE_HEADER = 4
_MAX_PLAINTEXT = 1 << 14  # RFC 8446 §5.1: TLSPlaintext.length MUST NOT exceed 2^14

_TWO_U16 = struct.Struct("!HH")

_EXT_SERVER_NAME = 0
_EXT_ALPN = 16
_EXT_SUPPORTED_VERSIONS = 43
_NAME_TYPE_HOST_NAME = 0
_ROUTED_EXTENSIONS = frozenset((_EXT_SERVER_NAME, _EXT_ALPN, _EXT_SUPPORTED_VERSIONS))

# Request lines a browser or script sends when it speaks plain HTTP to the TLS port
# (``PRI`` is the HTTP/2 prior-knowledge preface).
_HTTP_METHODS = (
    b"GET ", b"HEAD ", b"POST ", b"PUT ", b"DELETE ", b"OPTIONS ", b"PATCH ", b"CONNECT ",
    b"TRACE ", b"PRI ",
)


class ClientHelloError(EdgeError):
    """The bytes are not an acceptable TLS ClientHello.

    ``alert`` is a key of :data:`ALERT_DESCRIPTIONS`: the caller sends
    ``alert_bytes(exc.alert)`` and closes. ``plain_http`` is True when the client is evidently
    speaking plain HTTP to the TLS port; the caller may then answer with a plain-text
    ``400`` hint ("use https://") instead of a TLS alert. It is decided as early as
    possible, from the bytes seen so far (the first byte, ``G`` of ``GET``, may be enough):
    a connection refused either way, it only selects the kinder answer.
    """

    def __init__(self, alert: str, message: str, *, plain_http: bool = False) -> None:
        if alert not in ALERT_DESCRIPTIONS:
            raise ValueError(f"unknown TLS alert {alert!r}")
        super().__init__(message)
        self.alert = alert
        self.message = message
        self.plain_http = plain_http


# Not frozen: a frozen dataclass sets each field through object.__setattr__, which cost ~1.5 %
# of a whole TLS handshake's CPU in the HTTPS accept loop. Treat instances as read-only.
@dataclass(slots=True)
class ClientHello:
    """What the proxy needs from a ClientHello, plus the bytes to replay into the TLS engine.

    ``server_name``: the SNI host_name as sent (ASCII, not normalised), or None when the client
    sent no SNI or sent one that is not a DNS hostname (then ``rejected_server_name`` holds it,
    for logging). ``alpn``: the ALPN protocol names in client preference order (decoded as
    Latin-1, so any byte string round-trips), empty without the extension. ``tls_versions``:
    the ``supported_versions`` extension (e.g. ``(0x0304, 0x0303)``) without GREASE values,
    empty without the extension (a TLS 1.2-or-older client; see ``legacy_version``).
    ``legacy_version``: ClientHello.legacy_version (0x0303 for TLS 1.2 and 1.3 clients).
    ``raw``: every byte fed to the reader, in order.
    """

    server_name: str | None
    alpn: tuple[str, ...]
    tls_versions: tuple[int, ...]
    raw: bytes
    legacy_version: int = 0x0303
    rejected_server_name: str | None = None


def alert_bytes(description: str) -> bytes:
    """A complete TLS fatal alert record for ``description`` (a key of :data:`ALERT_DESCRIPTIONS`).

    Sent in the clear before any TLS engine exists, e.g. ``alert_bytes("unrecognized_name")``
    when the SNI names no site. Raises :class:`ValueError` for an unknown description.
    """
    try:
        code = ALERT_DESCRIPTIONS[description]
    except KeyError:
        raise ValueError(f"unknown TLS alert {description!r}") from None
    # ContentType alert (21), legacy_record_version 0x0303, length 2, level fatal (2), code.
    return bytes((21, 3, 3, 0, 2, 2, code))


def _looks_like_http(prefix: bytes) -> bool | None:
    """True if ``prefix`` starts with an HTTP request line's method and space, None if it is
    still too short to tell (a part of one, as "P" of "POST "), else False. Waiting for the
    whole method makes the verdict the same however the bytes are split (at most 8 bytes)."""
    undecided = False
    for method in _HTTP_METHODS:
        if prefix.startswith(method):
            return True
        undecided = undecided or method.startswith(prefix)
    return None if undecided else False


class ClientHelloReader:
    """Incremental ClientHello reader: call :meth:`feed` with each chunk read from the socket.

    ``max_bytes`` bounds what is buffered before the hello is complete (records included);
    a bigger hello is refused. Real hellos are 200-2000 bytes; post-quantum key shares push
    them past 1800, so keep the limit well above that. After :meth:`feed` has returned a
    :class:`ClientHello` or raised :class:`ClientHelloError`, the reader is finished: a further
    ``feed`` re-raises the same error, or raises :class:`RuntimeError` after success.
    """

    __slots__ = ("_buf", "_done", "_error", "_hs", "_hs_len", "_pos", "max_bytes")

    def __init__(self, max_bytes: int = 16384) -> None:
        if max_bytes < _RECORD_HEADER + _HANDSHAKE_HEADER:
            raise ValueError("max_bytes is too small to hold any ClientHello")
        self.max_bytes = max_bytes
        self._buf = bytearray()  # everything fed so far (becomes ``raw``)
        self._pos = 0  # offset in _buf of the next record header not yet consumed
        self._hs = bytearray()  # handshake message bytes reassembled from record fragments
        self._hs_len = -1  # total handshake message length (header included), once known
        self._done = False
        self._error: ClientHelloError | None = None

    @property
    def buffered(self) -> int:
        """Bytes fed so far."""
        return len(self._buf)

    def feed(self, data: bytes) -> ClientHello | None:
        """Add ``data``; return the :class:`ClientHello` once complete, None if more is needed.

        Raises :class:`ClientHelloError` when the bytes cannot be (the start of) an acceptable
        ClientHello; the decision is made as early as the bytes allow.
        """
        if self._error is not None:
            raise self._error
        if self._done:
            raise RuntimeError("ClientHelloReader.feed() called after the ClientHello was returned")
        try:
            if not self._buf:
                hello = self._whole(data)
                if hello is not None:
                    return hello
            return self._feed(data)
        except ClientHelloError as exc:
            self._error = exc
            raise

    def _whole(self, data: bytes) -> ClientHello | None:
        """Fast path for what nearly every client sends: one handshake record holding exactly
        one complete ClientHello, nothing before or after it. Parsed straight from ``data``
        without the reassembly buffers (measured: a few % of a handshake's CPU in the accept
        loop). None: anything else, left to the general path, which decides exactly as before."""
        n = len(data)
        if n < _RECORD_HEADER + _HANDSHAKE_HEADER or data[0] != _CONTENT_HANDSHAKE \
                or data[1] != 3 or data[5] != _HANDSHAKE_CLIENT_HELLO:
            return None
        length = (data[3] << 8) | data[4]
        if n != _RECORD_HEADER + length or length > _MAX_PLAINTEXT or n > self.max_bytes \
                or ((data[6] << 16) | (data[7] << 8) | data[8]) + _HANDSHAKE_HEADER != length:
            return None
        self._done = True
        raw = bytes(data)
        self._buf += raw  # ``buffered`` counts it, as on the general path
        return self._parse(raw[_RECORD_HEADER + _HANDSHAKE_HEADER:], raw)

    def _fail(self, alert: str, message: str) -> ClientHelloError:
        return ClientHelloError(alert, message)

    def _feed(self, data: bytes) -> ClientHello | None:
        buf = self._buf
        buf += data
        if buf and buf[0] != _CONTENT_HANDSHAKE:
            self._check_first_bytes(bytes(buf[:8]))  # raises unless more bytes could tell
            return None
        while True:
            pos = self._pos
            if len(buf) - pos < _RECORD_HEADER:
                break
            content_type = buf[pos]
            major = buf[pos + 1]
            length = (buf[pos + 3] << 8) | buf[pos + 4]
            if content_type != _CONTENT_HANDSHAKE:
                raise self._fail(
                    "unexpected_message",
                    f"TLS record of content type {content_type} inside the ClientHello "
                    "(handshake records only until the hello is complete)",
                )
            if major != 3:
                raise self._fail(
                    "protocol_version", f"TLS record version {major}.{buf[pos + 2]} is not 3.x"
                )
            if length == 0:
                raise self._fail("unexpected_message", "zero-length handshake record fragment")
            if length > _MAX_PLAINTEXT:
                raise self._fail(
                    "record_overflow", f"TLS record of {length} bytes exceeds 2^14 bytes"
                )
            end = pos + _RECORD_HEADER + length
            if end > self.max_bytes:
                raise self._too_big(end)
            if len(buf) < end:
                break
            self._hs += buf[pos + _RECORD_HEADER : end]
            self._pos = end
            hs = self._hs
            if self._hs_len < 0 and len(hs) >= _HANDSHAKE_HEADER:
                if hs[0] != _HANDSHAKE_CLIENT_HELLO:
                    raise self._fail(
                        "unexpected_message",
                        f"handshake message type {hs[0]} where a ClientHello (1) was expected",
                    )
                self._hs_len = _HANDSHAKE_HEADER + ((hs[1] << 16) | (hs[2] << 8) | hs[3])
                # Each further record costs at least its header: bound the total early.
                if end + self._hs_len - len(hs) > self.max_bytes:
                    raise self._too_big(end + self._hs_len - len(hs))
            if self._hs_len >= 0 and len(hs) >= self._hs_len:
                if len(hs) > self._hs_len:
                    raise self._fail(
                        "unexpected_message",
                        f"{len(hs) - self._hs_len} bytes after the ClientHello in its last record",
                    )
                self._done = True
                return self._parse(bytes(hs[_HANDSHAKE_HEADER:]))
        if len(buf) > self.max_bytes:
            raise self._too_big(len(buf))
        return None

    def _too_big(self, size: int) -> ClientHelloError:
        return self._fail(
            "illegal_parameter",
            f"ClientHello needs at least {size} bytes, over the {self.max_bytes}-byte limit",
        )

    def _check_first_bytes(self, head: bytes) -> None:
        """Refuse a stream not starting with a handshake record; say why (HTTP? SSLv2?).
        Returns only when ``head`` may be the start of an HTTP method: more bytes decide."""
        http = _looks_like_http(head)
        if http is None:
            return
        if http:
            raise ClientHelloError(
                "unexpected_message",
                "plain HTTP request sent to the TLS port "
                f"(starts with {head.split(b' ', 1)[0][:8]!r}); use https://",
                plain_http=True,
            )
        if head[0] & 0x80:
            raise self._fail(
                "protocol_version", "SSLv2-compatible ClientHello refused (SSL 2.0 record header)"
            )
        raise self._fail(
            "unexpected_message",
            f"not a TLS handshake record (first byte 0x{head[0]:02x}, expected 0x16)",
        )

    def _parse(self, body: bytes, raw: bytes | None = None) -> ClientHello:
        """Decode the ClientHello body (after the 4-byte handshake header); ``raw``: every byte
        fed (default: the reassembly buffer)."""
        n = len(body)
        # legacy_version (2) + random (32) + session id length (1)
        if n < 35:
            raise self._fail("decode_error", "ClientHello too short for version and random")
        legacy_version = (body[0] << 8) | body[1]
        if body[0] != 3:
            raise self._fail("protocol_version", f"ClientHello legacy_version 0x{legacy_version:04x}")
        p = 34
        sid_len = body[p]
        p += 1
        if sid_len > 32:
            raise self._fail("decode_error", f"session id of {sid_len} bytes (max 32)")
        p += sid_len
        if p + 2 > n:
            raise self._fail("decode_error", "ClientHello truncated in the session id")
        cs_len = (body[p] << 8) | body[p + 1]
        p += 2
        if cs_len < 2 or cs_len % 2:
            raise self._fail("decode_error", f"cipher_suites length {cs_len} is not even and >= 2")
        p += cs_len
        if p + 1 > n:
            raise self._fail("decode_error", "ClientHello truncated in the cipher suites")
        comp_len = body[p]
        p += 1
        if comp_len < 1:
            raise self._fail("decode_error", "empty compression_methods")
        p += comp_len
        if p > n:
            raise self._fail("decode_error", "ClientHello truncated in the compression methods")
        server_name: str | None = None
        rejected: str | None = None
        alpn: tuple[str, ...] = ()
        versions: tuple[int, ...] = ()
        if p < n:  # extensions are optional (pre-TLS 1.2 clients may send none)
            if p + 2 > n:
                raise self._fail("decode_error", "ClientHello truncated in the extensions length")
            ext_total = (body[p] << 8) | body[p + 1]
            p += 2
            if p + ext_total != n:
                raise self._fail(
                    "decode_error",
                    f"extensions length {ext_total} but {n - p} bytes remain in the ClientHello",
                )
            seen: set[int] = set()
            unpack = _TWO_U16.unpack_from  # one call per extension header: this loop is hot
            while p < n:
                if p + 4 > n:
                    raise self._fail("decode_error", "truncated extension header")
                ext_type, ext_len = unpack(body, p)
                p += 4
                end = p + ext_len
                if end > n:
                    raise self._fail(
                        "decode_error", f"extension {ext_type} of {ext_len} bytes overruns the hello"
                    )
                if ext_type in seen:
                    raise self._fail("illegal_parameter", f"duplicate extension {ext_type}")
                seen.add(ext_type)
                if ext_type in _ROUTED_EXTENSIONS:  # one test for the many others
                    if ext_type == _EXT_SERVER_NAME:
                        server_name, rejected = self._parse_sni(body[p:end])
                    elif ext_type == _EXT_ALPN:
                        alpn = self._parse_alpn(body[p:end])
                    else:
                        versions = self._parse_versions(body[p:end])
                p = end
        return ClientHello(
            server_name=server_name,
            alpn=alpn,
            tls_versions=versions,
            raw=bytes(self._buf) if raw is None else raw,
            legacy_version=legacy_version,
            rejected_server_name=rejected,
        )

    def _parse_sni(self, data: bytes) -> tuple[str | None, str | None]:
        """RFC 6066 §3 ServerNameList -> (valid host name or None, rejected name or None)."""
        if len(data) < 2 or ((data[0] << 8) | data[1]) != len(data) - 2:
            raise self._fail("decode_error", "server_name list length does not match the extension")
        if len(data) == 2:
            raise self._fail("decode_error", "empty server_name list")
        p, n = 2, len(data)
        name: bytes | None = None
        while p < n:
            if p + 3 > n:
                raise self._fail("decode_error", "truncated server_name entry")
            name_type = data[p]
            length = (data[p + 1] << 8) | data[p + 2]
            p += 3
            if p + length > n:
                raise self._fail("decode_error", "server_name entry overruns the list")
            if name_type != _NAME_TYPE_HOST_NAME:
                raise self._fail(
                    "illegal_parameter", f"server_name entry of name type {name_type} (not host_name)"
                )
            if name is not None:
                raise self._fail("illegal_parameter", "more than one host_name in server_name")
            if length == 0:
                raise self._fail("decode_error", "empty host_name in server_name")
            name = data[p : p + length]
            p += length
        assert name is not None  # the list is non-empty and every entry is a host_name
        if name.isascii():
            text = name.decode("ascii")
            if _is_hostname(text):
                return text, None
            return None, text
        return None, name.decode("ascii", "backslashreplace")

    def _parse_alpn(self, data: bytes) -> tuple[str, ...]:
        """RFC 7301 ProtocolNameList -> names (Latin-1 decoded)."""
        if len(data) < 2 or ((data[0] << 8) | data[1]) != len(data) - 2 or len(data) == 2:
            raise self._fail("decode_error", "ALPN protocol list length is wrong or empty")
        names: list[str] = []
        p, n = 2, len(data)
        while p < n:
            length = data[p]
            p += 1
            if length == 0 or p + length > n:
                raise self._fail("decode_error", "empty or overrunning ALPN protocol name")
            names.append(data[p : p + length].decode("latin-1"))
            p += length
        return tuple(names)

    def _parse_versions(self, data: bytes) -> tuple[int, ...]:
        """RFC 8446 §4.2.1 supported_versions (client form) -> versions, GREASE removed."""
        if not data or data[0] != len(data) - 1 or data[0] < 2 or data[0] % 2:
            raise self._fail("decode_error", "supported_versions length is wrong")
        versions = struct.unpack_from(f"!{len(data) // 2}H", data, 1)
        # Without RFC 8701 GREASE values (0x0A0A, 0x1A1A, ... 0xFAFA).
        return tuple(v for v in versions if (v & 0x0F0F) != 0x0A0A or (v >> 8) != (v & 0xFF))


_VALID_NAMES: dict[str, bool] = {}
_VALID_NAMES_MAX = 65536


def _is_hostname(text: str) -> bool:
    """``hostname_or_none`` as a validity test, memoised: the same few names arrive in most
    handshakes, and the full check (per-label regex, IDNA) costs more than the rest of the
    parse. Bounded: a scanner sending random names only ever clears the memo."""
    valid = _VALID_NAMES.get(text)
    if valid is None:
        valid = text == text.strip() and hostname_or_none(text) is not None
        if len(_VALID_NAMES) >= _VALID_NAMES_MAX:
            _VALID_NAMES.clear()
        _VALID_NAMES[text] = valid
    return valid
