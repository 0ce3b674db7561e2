"""PROXY protocol v1/v2: encoders, the incremental parser, and who may send a header."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.proxyproto import (
    TLV_AUTHORITY,
    TLV_CRC32C,
    ParseResult,
    ProxyHeader,
    ProxyHeaderParser,
    ProxyHeaderPolicy,
    ProxyProtocolError,
    canonical_ip,
    encode_v1,
    encode_v2,
    header_for_backend,
    is_trusted,
)

SIG = b"\r\n\r\n\x00\r\nQUIT\n"

# An AWS Network Load Balancer header (PrivateLink): CRC32C, the VPC endpoint id TLV (0xEA)
# and NOOP padding. From aws/elastic-load-balancing-tools' compatibility tests.
AWS_NLB_HEADER = bytes.fromhex(
    "0d0a0d0a000d0a515549540a"  # signature
    "21110054"  # v2 PROXY, TCP4, 84 bytes follow
    "ac1f0771"
    "ac1f0a1f"
    "c8f20050"  # 172.31.7.113:51442 -> 172.31.10.31:80
    "030004e8d6892d"  # CRC32C
    "ea0017" + b"\x01vpce-08d2bf15fac5001c9".hex() + "040024" + "00" * 36  # NOOP
)


def parse_all(data: bytes, *, required: bool = True) -> ParseResult:
    result = ProxyHeaderParser(required=required).feed(data)
    assert result is not None
    return result


def parse_bytewise(data: bytes, *, required: bool = True) -> ParseResult:
    parser = ProxyHeaderParser(required=required)
    for i in range(len(data)):
        result = parser.feed(data[i : i + 1])
        if result is not None:
            # Bytes fed after the decision arrive in later chunks; only what was fed so far
            # can be in `remaining`.
            return ParseResult(result.header, result.remaining + data[i + 1 :])
    raise AssertionError("parser never decided")


# -- spec vectors ---------------------------------------------------------------------------


def test_v1_spec_example_encodes_and_parses() -> None:
    line = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"
    assert encode_v1(("192.168.0.1", 56324), ("192.168.0.11", 443)) == line
    result = parse_all(line + b"GET / HTTP/1.1\r\n")
    assert result.header == ProxyHeader(1, "PROXY", ("192.168.0.1", 56324), ("192.168.0.11", 443))
    assert result.remaining == b"GET / HTTP/1.1\r\n"


def test_v1_tcp6() -> None:
    line = b"PROXY TCP6 2001:DB8::1 2001:db8:0:0:0:0:0:2 65535 0\r\n"
    header = parse_all(line).header
    assert header is not None
    assert header.source == ("2001:db8::1", 65535)  # canonical form
    assert header.destination == ("2001:db8::2", 0)


def test_v1_unknown_means_use_the_socket_addresses() -> None:
    assert encode_v1(None, None) == b"PROXY UNKNOWN\r\n"
    for line in (
        b"PROXY UNKNOWN\r\n",
        b"PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff "
        b"ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n",  # 107 bytes, the maximum
    ):
        result = parse_all(line + b"SSH-2.0-x\r\n")
        assert result.header == ProxyHeader(1, "PROXY", None, None)
        assert result.remaining == b"SSH-2.0-x\r\n"


def test_v2_signature_and_layout() -> None:
    header = encode_v2(("192.0.2.1", 1234), ("198.51.100.7", 443))
    assert header[:12] == SIG
    assert header[12:16] == b"\x21\x11\x00\x0c"  # v2 PROXY, TCP over IPv4, 12 bytes
    assert header[16:] == bytes([192, 0, 2, 1, 198, 51, 100, 7]) + struct.pack("!HH", 1234, 443)


def test_v2_local_for_health_checks() -> None:
    header = encode_v2(None, None)
    assert header == SIG + b"\x20\x00\x00\x00"
    result = parse_all(header + b"rest")
    assert result.header == ProxyHeader(2, "LOCAL", None, None)
    assert result.remaining == b"rest"


def test_v2_local_ignores_the_address_block() -> None:
    body = bytes(12)
    result = parse_all(SIG + b"\x20\x11\x00\x0c" + body + b"x")
    assert result.header is not None and result.header.command == "LOCAL"
    assert result.header.source is None
    assert result.remaining == b"x"


def test_aws_nlb_header_with_checksum() -> None:
    result = parse_all(AWS_NLB_HEADER + b"GET /")
    header = result.header
    assert header is not None
    assert header.source == ("172.31.7.113", 51442)
    assert header.destination == ("172.31.10.31", 80)
    assert header.tlv(0xEA) == b"\x01vpce-08d2bf15fac5001c9"
    assert [t for t, _ in header.tlvs] == [TLV_CRC32C, 0xEA, 0x04]
    assert result.remaining == b"GET /"


def test_v2_bad_checksum_is_refused() -> None:
    tampered = bytearray(AWS_NLB_HEADER)
    tampered[19] ^= 0x01  # source address 172.31.7.113 -> .112
    with pytest.raises(ProxyProtocolError, match="checksum"):
        parse_all(bytes(tampered))


def test_v2_tlvs_round_trip() -> None:
    tlvs = ((TLV_AUTHORITY, b"www.example.jp"), (0xE0, b""), (0xE1, b"\x00" * 300))
    data = encode_v2(("2001:db8::5", 40000), ("2001:db8::1", 443), tlvs=tlvs)
    header = parse_all(data).header
    assert header is not None
    assert header.tlvs == tlvs
    assert header.tlv(TLV_AUTHORITY) == b"www.example.jp"
    assert header.tlv(0x99) is None


def test_v2_unix_and_unspec_give_no_addresses() -> None:
    unix = SIG + b"\x21\x31" + struct.pack("!H", 216) + b"/run/a".ljust(108, b"\0") * 2
    unspec = SIG + b"\x21\x00\x00\x00"
    for data in (unix, unspec):
        result = parse_all(data + b"!")
        assert result.header is not None
        assert result.header.command == "PROXY"
        assert result.header.source is None and result.header.destination is None
        assert result.remaining == b"!"


# -- encoder details --------------------------------------------------------------------------


def test_encode_accepts_peername_tuples_and_mixed_families() -> None:
    # asyncio gives 4-tuples for IPv6 peers, and link-local ones carry a scope.
    v6_peer = ("fe80::1%eth0", 5000, 0, 2)
    line = encode_v1(v6_peer, ("fe80::2", 22, 0, 2))
    assert line == b"PROXY TCP6 fe80::1 fe80::2 5000 22\r\n"
    # a dual-stack listener's view of an IPv4 client is IPv4
    assert encode_v1(("::ffff:192.0.2.9", 1), ("192.0.2.1", 2)).startswith(b"PROXY TCP4 192.0.2.9")
    # a true family mix is sent as TCP6 with the IPv4 side mapped, and parses back as IPv4
    header = parse_all(encode_v2(("2001:db8::9", 1), ("192.0.2.1", 2))).header
    assert header is not None
    assert header.source == ("2001:db8::9", 1)
    assert header.destination == ("192.0.2.1", 2)


@pytest.mark.parametrize(
    ("src", "dst", "message"),
    [
        (("192.0.2.1", 70000), ("192.0.2.2", 1), "port"),
        (("192.0.2.1", -1), ("192.0.2.2", 1), "port"),
        (("not-an-ip", 1), ("192.0.2.2", 1), "not an IP"),
        (("192.0.2.1", 1), None, "both"),
    ],
)
def test_encode_rejects_bad_input(
    src: tuple[str, int], dst: tuple[str, int] | None, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        encode_v1(src, dst)
    with pytest.raises(ValueError, match=message):
        encode_v2(src, dst)


def test_encode_v2_rejects_bad_tlvs() -> None:
    addr = ("192.0.2.1", 1)
    with pytest.raises(ValueError, match="0-255"):
        encode_v2(addr, addr, tlvs=[(256, b"")])
    with pytest.raises(ValueError, match="65535"):
        encode_v2(addr, addr, tlvs=[(1, b"x" * 70000)])
    with pytest.raises(ValueError, match="LOCAL"):
        encode_v2(None, None, tlvs=[(1, b"x")])


# -- parser behaviour -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\nUSER bob\r\n",
        b"PROXY UNKNOWN\r\n",
        AWS_NLB_HEADER + b"tail",
    ],
)
def test_byte_at_a_time_equals_all_at_once(data: bytes) -> None:
    assert parse_bytewise(data) == parse_all(data)


def test_parser_waits_for_a_complete_header() -> None:
    parser = ProxyHeaderParser()
    assert parser.feed(b"") is None
    assert parser.feed(b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c") is None
    assert parser.feed(bytes(11)) is None
    result = parser.feed(b"\x00payload")
    assert result is not None and result.remaining == b"payload"
    with pytest.raises(RuntimeError):
        parser.feed(b"more")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"GET / HTTP/1.1\r\n\r\n", "expected a PROXY protocol header"),
        (b"SSH-2.0-OpenSSH_9.6\r\n", "expected a PROXY protocol header"),
        (b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\n", "CRLF"),
        (b"PROXY TCP4 " + b"1" * 100, "longer than 107"),
        (b"PROXY UNKNOWN " + b"x" * 92 + b"\r\n", "longer than 107"),  # 108 bytes
        (b"PROXY TCP5 1.2.3.4 1.2.3.4 1 2\r\n", "unknown protocol"),
        (b"PROXY TCP4 1.2.3.4 1.2.3.4 1\r\n", "single spaces"),
        (b"PROXY TCP4  1.2.3.4 1.2.3.4 1 2\r\n", "single spaces"),
        (b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2 \r\n", "single spaces"),
        (b"PROXY TCP4 1.2.3.256 1.2.3.4 1 2\r\n", "IPv4 address"),
        (b"PROXY TCP4 01.2.3.4 1.2.3.4 1 2\r\n", "IPv4 address"),  # leading zero: octal?
        (b"PROXY TCP4 ::1 1.2.3.4 1 2\r\n", "IPv4 address"),
        (b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", "IPv6 address"),
        (b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", "IPv6 address"),
        (b"PROXY TCP4 1.2.3.4 1.2.3.4 65536 2\r\n", "port"),
        (b"PROXY TCP4 1.2.3.4 1.2.3.4 080 2\r\n", "port"),
        (b"PROXY TCP4 1.2.3.4 1.2.3.4 -1 2\r\n", "port"),
        (b"PROXY TCP4 1.2.3.4 1.2.3.4 1 +2\r\n", "port"),
        (b"PROXY TCP4 1.2.3.4 1.2.3.4 1 \xd9\xa1\r\n", "port"),  # Arabic-Indic digit one
        (b"PROXY TCP4 1.2.3.4 1.2.3.4 1\r2\r\n", "stray CR"),
        (SIG + b"\x11\x11\x00\x0c" + bytes(12), "version"),
        (SIG + b"\x22\x11\x00\x0c" + bytes(12), "command"),
        (SIG + b"\x21\x41\x00\x0c" + bytes(12), "address family"),
        (SIG + b"\x21\x13\x00\x0c" + bytes(12), "address family"),
        (SIG + b"\x21\x12\x00\x0c" + bytes(12), "datagram"),
        (SIG + b"\x21\x11\x00\x08" + bytes(8), "too short"),
        (SIG + b"\x21\x21\x00\x0c" + bytes(12), "too short"),
        (SIG + b"\x21\x11\xff\xff", "limit"),
        (SIG + b"\x21\x11\x00\x0e" + bytes(12) + b"\xe0\x00", "truncated TLV"),
        (SIG + b"\x21\x11\x00\x10" + bytes(12) + b"\xe0\x00\x05\x00", "past the end"),
        (SIG + b"\x21\x11\x00\x11" + bytes(12) + b"\x03\x00\x02\x00\x00", "4 bytes"),
    ],
)
def test_malformed_headers_are_refused(data: bytes, message: str) -> None:
    with pytest.raises(ProxyProtocolError, match=message):
        ProxyHeaderParser().feed(data)


def test_optional_mode_passes_other_bytes_through_untouched() -> None:
    for data in (b"GET / HTTP/1.1\r\n", b"SSH-2.0-OpenSSH\r\n", b"PROPFIND /", b"\r\nGET /"):
        result = parse_bytewise(data, required=False)
        assert result.header is None
        assert result.remaining == data
    # but a header that starts right and goes wrong is still an error
    with pytest.raises(ProxyProtocolError):
        ProxyHeaderParser(required=False).feed(b"PROXY TCP4 1.2.3.4\r\n")
    header = parse_all(b"PROXY UNKNOWN\r\nGET", required=False)
    assert header.header is not None and header.remaining == b"GET"


# -- property tests -------------------------------------------------------------------------

ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
ports = st.integers(0, 65535)
endpoint_pairs = st.one_of(
    st.tuples(st.tuples(ipv4, ports), st.tuples(ipv4, ports)),
    st.tuples(st.tuples(ipv6, ports), st.tuples(ipv6, ports)),
)
tlv_lists = st.lists(
    st.tuples(st.integers(0, 255).filter(lambda t: t != TLV_CRC32C), st.binary(max_size=64)),
    max_size=8,
)


def canonical(ip: str) -> str:
    addr = ipaddress.ip_address(ip)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


@given(endpoint_pairs, tlv_lists, st.binary(max_size=32), st.booleans())
@settings(max_examples=300, deadline=None)
def test_encode_parse_round_trip(
    pair: tuple[tuple[str, int], tuple[str, int]],
    tlvs: list[tuple[int, bytes]],
    payload: bytes,
    bytewise: bool,
) -> None:
    src, dst = pair
    expected_src = (canonical(src[0]), src[1])
    expected_dst = (canonical(dst[0]), dst[1])
    parse = parse_bytewise if bytewise else parse_all
    for version, data in ((1, encode_v1(src, dst)), (2, encode_v2(src, dst, tlvs=tlvs))):
        result = parse(data + payload)
        assert result.header is not None
        assert result.header.version == version
        assert result.header.command == "PROXY"
        assert result.header.source == expected_src
        assert result.header.destination == expected_dst
        assert result.header.tlvs == (tuple(tlvs) if version == 2 else ())
        assert result.remaining == payload


prefixes = st.sampled_from([b"", SIG, SIG + b"\x21", SIG + b"\x21\x11", b"PROXY ", b"PROXY TCP4 "])


@given(prefixes, st.lists(st.binary(max_size=40), max_size=8), st.booleans())
@settings(max_examples=500, deadline=None)
def test_random_bytes_never_crash(prefix: bytes, chunks: list[bytes], required: bool) -> None:
    parser = ProxyHeaderParser(required=required)
    fed = b""
    try:
        for chunk in [prefix, *chunks]:
            fed += chunk
            result = parser.feed(chunk)
            if result is not None:
                # Nothing is lost or invented: header bytes + remaining == what was fed.
                assert fed.endswith(result.remaining)
                if result.header is None:
                    assert result.remaining == fed
                break
    except ProxyProtocolError:
        pass


# -- trust ------------------------------------------------------------------------------------


def test_is_trusted() -> None:
    nets = [ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8")]
    assert is_trusted("10.1.2.3", nets)
    assert is_trusted("::ffff:10.1.2.3", nets)  # dual-stack listener
    assert is_trusted("fd12::1", nets)
    assert not is_trusted("192.0.2.1", nets)
    assert not is_trusted("::ffff:192.0.2.1", nets)
    assert not is_trusted("", nets)  # e.g. a UNIX socket peer
    assert not is_trusted("10.1.2.3", [])


def test_policy_never_parses_untrusted_peers() -> None:
    policy = ProxyHeaderPolicy("required", trusted=["10.0.0.0/8"])
    assert policy.parser_for("192.0.2.1") is None
    assert policy.expectation("192.0.2.1") == "none"
    # A spoofed header from a direct client is never looked at: the protocol gets it as-is.
    parser = policy.parser_for("10.0.0.5")
    assert parser is not None
    with pytest.raises(ProxyProtocolError):
        parser.feed(b"USER bob\r\n")  # trusted peers must send a header


def test_policy_modes() -> None:
    optional = ProxyHeaderPolicy("optional", trusted=["10.0.0.0/8", "2001:db8::/32"])
    assert optional.expectation("2001:db8::1") == "optional"
    parser = optional.parser_for("10.9.9.9")
    assert parser is not None
    assert parser.feed(b"GET / HTTP/1.1\r\n") == ParseResult(None, b"GET / HTTP/1.1\r\n")
    off = ProxyHeaderPolicy("off", trusted=["10.0.0.0/8"])
    assert off.parser_for("10.0.0.1") is None
    assert ProxyHeaderPolicy().parser_for("10.0.0.1") is None


def test_policy_configuration_errors_are_clear() -> None:
    with pytest.raises(ValueError, match="not a CIDR"):
        ProxyHeaderPolicy("required", trusted=["10.0.0.0/33"])
    with pytest.raises(ValueError, match="at least one trusted network"):
        ProxyHeaderPolicy("required")
    with pytest.raises(ValueError, match="off, optional or required"):
        ProxyHeaderPolicy("on")  # type: ignore[arg-type]


def test_header_for_backend_follows_the_host_setting() -> None:
    client, local = ("192.0.2.1", 56324), ("198.51.100.7", 443)
    assert header_for_backend("off", client, local) == b""
    assert header_for_backend("v1", client, local) == b"PROXY TCP4 192.0.2.1 198.51.100.7 56324 443\r\n"
    assert header_for_backend("v2", client, local) == encode_v2(client, local)
    # A peer that is no IP address (a UNIX socket) is announced as unknown, not an error.
    assert header_for_backend("v1", ("/run/edge.sock", 0), local) == b"PROXY UNKNOWN\r\n"
    assert header_for_backend("v2", ("/run/edge.sock", 0), local) == encode_v2(None, None)


def test_canonical_ip_gives_one_form_per_host() -> None:
    assert canonical_ip("::ffff:10.0.0.1") == canonical_ip("10.0.0.1")
    assert str(canonical_ip("fe80::1%eth0")) == "fe80::1"
    with pytest.raises(ValueError):
        canonical_ip("not-an-ip")
