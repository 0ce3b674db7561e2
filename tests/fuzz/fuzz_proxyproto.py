"""PROXY protocol v1/v2 parser (edge/proxyproto.py).

Properties: only ProxyProtocolError; the same decision whole or in pieces; what it accepts
re-encodes to a header that parses back to the same addresses and TLVs; the parser never
keeps more than the spec's maximum header before deciding."""

from __future__ import annotations

import sys

from _harness import chunks, instrumented, main, split

with instrumented("edge.proxyproto"):
    from edge.proxyproto import (
        MAX_V2_PAYLOAD,
        TLV_CRC32C,
        V1_MAX_LINE,
        ParseResult,
        ProxyHeaderParser,
        ProxyProtocolError,
        encode_v1,
        encode_v2,
    )


def decide(data: bytes, pieces: list[bytes], required: bool) -> ParseResult | str | None:
    parser = ProxyHeaderParser(required=required)
    fed = 0
    try:
        for piece in pieces:
            fed += len(piece)
            result = parser.feed(piece)
            if result is not None:
                return ParseResult(result.header, result.remaining + data[fed:])
    except ProxyProtocolError:
        return "error"
    # Still undecided: only a prefix of a header may be pending, never more than one header.
    limit = V1_MAX_LINE if data.startswith(b"PROXY") else 16 + MAX_V2_PAYLOAD
    assert fed <= limit, fed
    return None


def check(data: bytes) -> None:
    steer, payload = split(data)
    required = bool(steer[:1]) and steer[0] & 1 == 1
    whole = decide(payload, [payload], required)
    pieced = decide(payload, chunks(payload, steer[1:]), required)
    if whole is None or pieced is None:
        # Undecided whole means undecided in pieces too (no bytes were missing).
        assert whole == pieced or (whole is None and pieced is None), (whole, pieced)
        return
    assert whole == pieced, (whole, pieced)
    if not isinstance(whole, ParseResult) or whole.header is None:
        return
    header = whole.header
    if header.command == "LOCAL" or header.source is None:
        return
    # The checksum TLV covers the original bytes (e.g. a TCP6 block holding IPv4-mapped
    # addresses re-encodes as TCP4), so it is the one TLV not carried over.
    tlvs = tuple(t for t in header.tlvs if t[0] != TLV_CRC32C)
    if header.version == 1:
        again = ProxyHeaderParser().feed(encode_v1(header.source, header.destination))
    else:
        again = ProxyHeaderParser().feed(encode_v2(header.source, header.destination, tlvs=tlvs))
    assert again is not None and again.header is not None
    assert (again.header.source, again.header.destination) == (header.source, header.destination)
    if header.version == 2:
        assert again.header.tlvs == tlvs


def seeds() -> list[bytes]:
    v4 = (("192.0.2.1", 1234), ("198.51.100.7", 443))
    v6 = (("2001:db8::1", 65535), ("2001:db8::2", 1))
    return [
        b"\x00" + encode_v1(*v4) + b"GET /",
        b"\x00" + encode_v1(*v6),
        b"\x00PROXY UNKNOWN\r\n",
        b"\x01\x01" + encode_v2(*v4, tlvs=((0x02, b"www.a.test"), (0xEA, b"x"))),
        b"\x00" + encode_v2(*v6, tlvs=((0x03, b"\x00\x00\x00\x00"),)),
        b"\x00" + encode_v2(None, None) + b"SSH-2.0-x\r\n",
    ]


if __name__ == "__main__":
    main(check)
    sys.exit(0)
