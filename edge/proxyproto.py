"""PROXY protocol v1 and v2 (HAProxy's spec), sans-IO: encoders and an incremental parser.

Sending (towards a backend whose host row says ``send_proxy_protocol``)::

    transport.write(encode_v2(client_peername, our_sockname))

Receiving (behind a load balancer)::

    policy = ProxyHeaderPolicy("required", trusted=config.trusted_proxies)
    parser = policy.parser_for(peer_ip)      # None: untrusted peer, never look for a header
    ...
    result = parser.feed(data)               # None: need more bytes
    if result is not None:
        client = result.header.source if result.header and result.header.source else peer
        protocol.data_received(result.remaining)

A header is only ever looked for in the first bytes of a connection and only from trusted
networks: anyone else could otherwise claim any client address (and dodge per-IP limits).
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "MAX_V2_PAYLOAD",
    "TLV_ALPN",
    "TLV_AUTHORITY",
    "TLV_CRC32C",
    "TLV_NOOP",
    "TLV_UNIQUE_ID",
    "ParseResult",
    "ProxyHeader",
    "ProxyHeaderParser",
    "ProxyHeaderPolicy",
    "ProxyProtocolError",
    "SockAddr",
    "canonical_ip",
    "encode_v1",
    "encode_v2",
    "header_for_backend",
    "is_trusted",
]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
SockAddr = tuple[str, int] | tuple[str, int, int, int]
"""What ``transport.get_extra_info("peername"/"sockname")`` returns for TCP (IPv6 has 4 items)."""

V1_MAX_LINE = 107
"""Longest v1 line the spec allows, CRLF included ("PROXY UNKNOWN" with two full IPv6)."""
MAX_V2_PAYLOAD = 4096
"""Largest v2 address+TLV block accepted. The wire format allows 65535; real load balancers
send well under 1 KiB, and a bound keeps a misbehaving peer from making us buffer 64 KiB."""

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_V1_PREFIX = b"PROXY "

TLV_ALPN = 0x01
TLV_AUTHORITY = 0x02
"""The host name the client asked for (TLS SNI), UTF-8."""
TLV_CRC32C = 0x03
"""Checksum of the whole header; verified by the parser when present."""
TLV_NOOP = 0x04
TLV_UNIQUE_ID = 0x05

_CMD_LOCAL = 0x0
_CMD_PROXY = 0x1
_FAM_UNSPEC = 0x00
_FAM_TCP4 = 0x11
_FAM_UDP4 = 0x12
_FAM_TCP6 = 0x21
_FAM_UDP6 = 0x22
_FAM_UNIX_STREAM = 0x31
_FAM_UNIX_DGRAM = 0x32
_ADDRESS_BLOCK = {_FAM_UNSPEC: 0, _FAM_TCP4: 12, _FAM_TCP6: 36, _FAM_UNIX_STREAM: 216}


class ProxyProtocolError(ValueError):
    """The first bytes of a connection are not an acceptable PROXY protocol header.

    The message says what was wrong; the connection should be closed without a reply.
    """


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """A parsed PROXY header.

    ``source``/``destination`` are ``(ip, port)`` of the original client and the address it
    connected to, the ip in canonical text form (IPv4-mapped IPv6 given as IPv4). They are
    ``None`` when the sender does not know them (v1 ``UNKNOWN``, v2 ``LOCAL`` health checks,
    v2 UNSPEC or UNIX families): the receiver then uses the socket's own addresses, as the
    spec requires.
    """

    version: Literal[1, 2]
    command: Literal["PROXY", "LOCAL"]
    source: tuple[str, int] | None
    destination: tuple[str, int] | None
    tlvs: tuple[tuple[int, bytes], ...] = ()

    def tlv(self, kind: int) -> bytes | None:
        """The value of the first TLV of type ``kind``, or ``None`` if absent."""
        for t, value in self.tlvs:
            if t == kind:
                return value
        return None


@dataclass(frozen=True, slots=True)
class ParseResult:
    """What :meth:`ProxyHeaderParser.feed` returns once it has decided.

    ``header`` is ``None`` when no header was present (only possible when the parser was
    created with ``required=False``); ``remaining`` holds every byte after the header (or all
    bytes, when there was none): hand it to the real protocol.
    """

    header: ProxyHeader | None
    remaining: bytes


# -- encoding -----------------------------------------------------------------------------


def encode_v1(source: SockAddr | None, destination: SockAddr | None) -> bytes:
    """A v1 line such as ``b"PROXY TCP4 192.0.2.1 198.51.100.7 56324 443\\r\\n"``.

    Pass both addresses as ``(ip, port)`` (peername-style 4-tuples are fine), or both as
    ``None`` for ``PROXY UNKNOWN``. Mixed IPv4/IPv6 pairs are sent as TCP6 with the IPv4 side
    mapped (``::ffff:a.b.c.d``), as HAProxy does. Raises ``ValueError`` for bad input.
    """
    if source is None and destination is None:
        return b"PROXY UNKNOWN\r\n"
    src_ip, src_port, dst_ip, dst_port = _endpoints(source, destination)
    family = "TCP4" if src_ip.version == 4 else "TCP6"
    return f"PROXY {family} {src_ip} {dst_ip} {src_port} {dst_port}\r\n".encode("ascii")


def header_for_backend(mode: str, source: SockAddr | None, destination: SockAddr | None) -> bytes:
    """The header a host's ``send_proxy_protocol`` setting asks for (``"v1"``/``"v2"``;
    ``"off"`` gives ``b""``), from the client's address to the proxy's local address.

    An endpoint that cannot be encoded (a UNIX-socket peer) gives ``PROXY UNKNOWN`` / a v2
    ``LOCAL`` header rather than an error: the backend then logs the proxy's own address.
    """
    if mode == "off":
        return b""
    encode = encode_v2 if mode == "v2" else encode_v1
    try:
        return encode(source, destination)
    except ValueError:
        return encode(None, None)


def encode_v2(
    source: SockAddr | None,
    destination: SockAddr | None,
    *,
    tlvs: Iterable[tuple[int, bytes]] = (),
) -> bytes:
    """A binary v2 header for a TCP connection, optionally followed by TLVs.

    Both addresses ``None`` gives a ``LOCAL`` header (a health check or a connection the
    sender made itself; the receiver uses the real endpoints), which carries no TLVs.
    Raises ``ValueError`` for bad addresses, ports, TLV types (0-255) or sizes.
    """
    tlv_block = bytearray()
    for kind, value in tlvs:
        if not 0 <= kind <= 0xFF:
            raise ValueError(f"PROXY v2 TLV type must be 0-255, got {kind}")
        if len(value) > 0xFFFF:
            raise ValueError(f"PROXY v2 TLV {kind:#04x} value is {len(value)} bytes (max 65535)")
        tlv_block += struct.pack("!BH", kind, len(value)) + value
    if source is None and destination is None:
        if tlv_block:
            raise ValueError("a PROXY v2 LOCAL header carries no TLVs")
        return V2_SIGNATURE + bytes((0x20 | _CMD_LOCAL, _FAM_UNSPEC, 0, 0))
    src_ip, src_port, dst_ip, dst_port = _endpoints(source, destination)
    fam = _FAM_TCP4 if src_ip.version == 4 else _FAM_TCP6
    body = src_ip.packed + dst_ip.packed + struct.pack("!HH", src_port, dst_port) + tlv_block
    if len(body) > 0xFFFF:
        raise ValueError(f"PROXY v2 header too large ({len(body)} bytes after the fixed part)")
    return V2_SIGNATURE + struct.pack("!BBH", 0x20 | _CMD_PROXY, fam, len(body)) + body


def _endpoints(
    source: SockAddr | None, destination: SockAddr | None
) -> tuple[IPAddress, int, IPAddress, int]:
    if source is None or destination is None:
        raise ValueError("give both source and destination, or neither (unknown/LOCAL)")
    src_ip = _encodable_ip(source[0])
    dst_ip = _encodable_ip(destination[0])
    if src_ip.version != dst_ip.version:
        # A dual-stack listener can see an IPv6 client on an IPv4-reachable address (or the
        # reverse); the header has one family, so express the IPv4 side as IPv4-mapped IPv6.
        src_ip = _as_v6(src_ip)
        dst_ip = _as_v6(dst_ip)
    return src_ip, _encodable_port(source[1]), dst_ip, _encodable_port(destination[1])


def canonical_ip(text: str) -> IPAddress:
    """``text`` as one form per host: the "%scope" of a link-local peername dropped and an
    IPv4-mapped IPv6 address (``::ffff:10.0.0.1`` from a dual-stack socket) made IPv4.

    Every comparison of client addresses (trusted networks, "same client", bounce checks)
    goes through this, so one host is never two. Raises ValueError if ``text`` is no address.
    """
    ip = ipaddress.ip_address(text.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _encodable_ip(text: str) -> IPAddress:
    try:
        return canonical_ip(text)
    except ValueError:
        raise ValueError(f"not an IP address: {text!r}") from None


def _as_v6(ip: IPAddress) -> ipaddress.IPv6Address:
    if isinstance(ip, ipaddress.IPv6Address):
        return ip
    return ipaddress.IPv6Address(b"\x00" * 10 + b"\xff\xff" + ip.packed)


def _encodable_port(port: int) -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 0xFFFF:
        raise ValueError(f"port must be an integer 0-65535, got {port!r}")
    return port


# -- parsing ------------------------------------------------------------------------------


class ProxyHeaderParser:
    """Incremental parser for the header at the start of one connection.

    Feed it the connection's bytes as they arrive; :meth:`feed` returns ``None`` while it
    needs more, then a :class:`ParseResult` exactly once. With ``required=True`` anything
    that is not a valid v1 or v2 header raises :class:`ProxyProtocolError`; with
    ``required=False`` bytes that cannot start a header are returned untouched with
    ``header=None`` (but something that starts like a header and then goes wrong still
    raises: the trusted sender is broken). Use one parser per connection.
    """

    __slots__ = ("_buf", "_done", "_required")

    def __init__(self, *, required: bool = True) -> None:
        self._buf = bytearray()
        self._required = required
        self._done = False

    def feed(self, data: bytes) -> ParseResult | None:
        """Add bytes; return ``None`` (need more) or the result. Raises ProxyProtocolError."""
        if self._done:
            raise RuntimeError("ProxyHeaderParser.feed() called after it returned a result")
        self._buf += data
        buf = self._buf
        if buf.startswith(V2_SIGNATURE):
            result = self._parse_v2()
        elif buf.startswith(_V1_PREFIX):
            result = self._parse_v1()
        elif V2_SIGNATURE.startswith(buf[:12]) or _V1_PREFIX.startswith(buf[:6]):
            return None  # still a prefix of one of the signatures
        elif self._required:
            raise ProxyProtocolError(
                f"expected a PROXY protocol header first, got {bytes(buf[:16])!r}"
            )
        else:
            result = ParseResult(None, bytes(buf))
        if result is not None:
            self._done = True
            self._buf = bytearray()
        return result

    def _parse_v1(self) -> ParseResult | None:
        buf = self._buf
        end = buf.find(b"\r\n", 0, V1_MAX_LINE)
        if end < 0:
            if b"\n" in buf[:V1_MAX_LINE]:
                raise ProxyProtocolError("PROXY v1 header line must end with CRLF")
            if len(buf) >= V1_MAX_LINE:
                raise ProxyProtocolError(f"PROXY v1 header line longer than {V1_MAX_LINE} bytes")
            return None
        line = bytes(buf[:end])
        header = _parse_v1_line(line)
        return ParseResult(header, bytes(buf[end + 2 :]))

    def _parse_v2(self) -> ParseResult | None:
        buf = self._buf
        if len(buf) < 16:
            return None
        ver_cmd, fam, length = struct.unpack_from("!BBH", buf, 12)
        if ver_cmd >> 4 != 2:
            raise ProxyProtocolError(f"PROXY v2 header has unsupported version {ver_cmd >> 4}")
        command = ver_cmd & 0x0F
        if command not in (_CMD_LOCAL, _CMD_PROXY):
            raise ProxyProtocolError(f"PROXY v2 header has unknown command {command:#x}")
        if length > MAX_V2_PAYLOAD:
            raise ProxyProtocolError(
                f"PROXY v2 header announces {length} bytes of addresses/TLVs "
                f"(limit {MAX_V2_PAYLOAD})"
            )
        total = 16 + length
        if len(buf) < total:
            return None
        raw = bytes(buf[:total])
        remaining = bytes(buf[total:])
        if command == _CMD_LOCAL:
            # The spec says to discard the whole block, family included, for LOCAL.
            return ParseResult(ProxyHeader(2, "LOCAL", None, None), remaining)
        return ParseResult(_parse_v2_proxy(raw, fam), remaining)


def _parse_v1_line(line: bytes) -> ProxyHeader:
    # line is everything before CRLF, starting with b"PROXY "
    if b"\r" in line or b"\n" in line:
        raise ProxyProtocolError("PROXY v1 header line contains a stray CR or LF")
    parts = line.split(b" ")
    proto = parts[1]
    if proto == b"UNKNOWN":
        # The spec says to ignore whatever follows UNKNOWN on the line.
        return ProxyHeader(1, "PROXY", None, None)
    if proto not in (b"TCP4", b"TCP6"):
        raise ProxyProtocolError(
            f"PROXY v1 header has unknown protocol {proto[:16]!r} (expected TCP4, TCP6, UNKNOWN)"
        )
    if len(parts) != 6:
        raise ProxyProtocolError(
            "PROXY v1 header must be 'PROXY TCP4|TCP6 SRC DST SPORT DPORT' separated by "
            "single spaces"
        )
    version = 4 if proto == b"TCP4" else 6
    src = _v1_address(parts[2], version)
    dst = _v1_address(parts[3], version)
    sport = _v1_port(parts[4])
    dport = _v1_port(parts[5])
    return ProxyHeader(1, "PROXY", (src, sport), (dst, dport))


def _v1_address(field: bytes, version: int) -> str:
    try:
        text = field.decode("ascii")
        # ipaddress would accept an IPv6 "%scope" suffix; the header format has none.
        if "%" in text:
            raise ValueError(text)
        ip: IPAddress = ipaddress.IPv4Address(text) if version == 4 else ipaddress.IPv6Address(text)
    except ValueError:
        raise ProxyProtocolError(
            f"PROXY v1 header has an invalid IPv{version} address {field[:45]!r}"
        ) from None
    return _client_ip_text(ip)


def _client_ip_text(ip: IPAddress) -> str:
    # An IPv4 client reached through an IPv6 hop is an IPv4 client: report it as such, so
    # per-IP limits and logs see one form of each address.
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def _v1_port(field: bytes) -> int:
    # Decimal 0-65535 without leading zeros (the spec forbids them to avoid octal confusion).
    if (
        not 1 <= len(field) <= 5
        or not field.isdigit()
        or (len(field) > 1 and field[0:1] == b"0")
        or int(field) > 0xFFFF
    ):
        raise ProxyProtocolError(f"PROXY v1 header has an invalid port {field[:8]!r}")
    return int(field)


def _parse_v2_proxy(raw: bytes, fam: int) -> ProxyHeader:
    if fam in (_FAM_UDP4, _FAM_UDP6, _FAM_UNIX_DGRAM):
        raise ProxyProtocolError(
            "PROXY v2 header describes a datagram connection; this listener is TCP"
        )
    block = _ADDRESS_BLOCK.get(fam)
    if block is None:
        raise ProxyProtocolError(f"PROXY v2 header has unknown address family {fam:#04x}")
    length = len(raw) - 16
    if length < block:
        raise ProxyProtocolError(
            f"PROXY v2 header too short for its address family ({length} < {block} bytes)"
        )
    source: tuple[str, int] | None = None
    destination: tuple[str, int] | None = None
    if fam == _FAM_TCP4:
        sport, dport = struct.unpack_from("!HH", raw, 24)
        source = (str(ipaddress.IPv4Address(raw[16:20])), sport)
        destination = (str(ipaddress.IPv4Address(raw[20:24])), dport)
    elif fam == _FAM_TCP6:
        sport, dport = struct.unpack_from("!HH", raw, 48)
        source = (_client_ip_text(ipaddress.IPv6Address(raw[16:32])), sport)
        destination = (_client_ip_text(ipaddress.IPv6Address(raw[32:48])), dport)
    # UNSPEC and UNIX stream: no IP to report, the receiver falls back to the socket's own.
    tlvs = _parse_tlvs(raw, 16 + block)
    return ProxyHeader(2, "PROXY", source, destination, tlvs)


def _parse_tlvs(raw: bytes, offset: int) -> tuple[tuple[int, bytes], ...]:
    tlvs: list[tuple[int, bytes]] = []
    end = len(raw)
    while offset < end:
        if end - offset < 3:
            raise ProxyProtocolError("PROXY v2 header has a truncated TLV")
        kind, size = struct.unpack_from("!BH", raw, offset)
        start = offset + 3
        if start + size > end:
            raise ProxyProtocolError(f"PROXY v2 TLV {kind:#04x} runs past the end of the header")
        value = raw[start : start + size]
        if kind == TLV_CRC32C:
            _check_crc32c(raw, start, value)
        tlvs.append((kind, value))
        offset = start + size
    return tuple(tlvs)


def _check_crc32c(raw: bytes, start: int, value: bytes) -> None:
    if len(value) != 4:
        raise ProxyProtocolError("PROXY v2 CRC32C TLV must be 4 bytes")
    # The checksum covers the whole header with the checksum field itself zeroed.
    zeroed = raw[:start] + b"\x00\x00\x00\x00" + raw[start + 4 :]
    if _crc32c(zeroed) != int.from_bytes(value, "big"):
        raise ProxyProtocolError("PROXY v2 header checksum (CRC32C TLV) does not match")


def _make_crc32c_table() -> tuple[int, ...]:
    table = []
    for i in range(256):
        crc = i
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC32C_TABLE = _make_crc32c_table()


def _crc32c(data: bytes) -> int:
    # Headers are at most a few KiB and checksums are rare, so a table loop is plenty.
    crc = 0xFFFFFFFF
    table = _CRC32C_TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


# -- who may send a header ----------------------------------------------------------------


def is_trusted(peer_ip: str, networks: Sequence[IPNetwork]) -> bool:
    """True if ``peer_ip`` lies in one of ``networks``.

    IPv4-mapped IPv6 peers (``::ffff:10.0.0.1`` from a dual-stack socket) are matched as
    IPv4. Anything that is not an IP address (a UNIX socket peer, ``None``-ish text) is
    untrusted rather than an error, because this decides what a stranger may claim.
    """
    try:
        ip = canonical_ip(peer_ip)
    except ValueError:
        return False
    return any(ip in net for net in networks)


ProxyMode = Literal["off", "optional", "required"]
Expectation = Literal["required", "optional", "none"]


class ProxyHeaderPolicy:
    """Which connections may or must start with a PROXY header.

    ``mode`` applies to peers inside ``trusted`` (CIDR strings or network objects):

    * ``"off"``: nobody's bytes are ever parsed as a header;
    * ``"optional"``: a trusted peer may send one; bytes that cannot start a header are passed
      through. Only sensible for protocols where the client speaks first (HTTP, SSH): an FTP
      client waits for our greeting, so "optional" would stall it;
    * ``"required"``: a trusted peer must send one, or the connection is refused.

    Untrusted peers are never parsed, in any mode: their bytes go to the protocol as they
    are, so a spoofed ``PROXY ...`` line is just a bad command there.
    """

    __slots__ = ("_mode", "_networks")

    def __init__(self, mode: ProxyMode = "off", trusted: Iterable[str | IPNetwork] = ()) -> None:
        if mode not in ("off", "optional", "required"):
            raise ValueError(f"PROXY protocol mode must be off, optional or required; got {mode!r}")
        networks: list[IPNetwork] = []
        for item in trusted:
            if isinstance(item, str):
                try:
                    networks.append(ipaddress.ip_network(item.strip(), strict=False))
                except ValueError:
                    raise ValueError(
                        f"trusted proxy network {item!r} is not a CIDR like 10.0.0.0/8 or fd00::/8"
                    ) from None
            else:
                networks.append(item)
        if mode != "off" and not networks:
            raise ValueError(
                f"PROXY protocol mode {mode!r} needs at least one trusted network "
                '(the load balancers\' addresses, e.g. trusted_proxies = ["10.0.0.0/8"])'
            )
        self._mode: ProxyMode = mode
        self._networks: tuple[IPNetwork, ...] = tuple(networks)

    @property
    def mode(self) -> ProxyMode:
        return self._mode

    @property
    def networks(self) -> tuple[IPNetwork, ...]:
        return self._networks

    def expectation(self, peer_ip: str) -> Expectation:
        """``"required"``, ``"optional"`` or ``"none"`` (do not parse) for this peer."""
        if self._mode == "off" or not is_trusted(peer_ip, self._networks):
            return "none"
        return self._mode

    def parser_for(self, peer_ip: str) -> ProxyHeaderParser | None:
        """A fresh parser for a connection from ``peer_ip``, or ``None`` when no header may
        be accepted from it (then hand the connection's bytes straight to the protocol)."""
        expectation = self.expectation(peer_ip)
        if expectation == "none":
            return None
        return ProxyHeaderParser(required=expectation == "required")
