"""ClientHello peeking: real hellos (Python ssl, openssl s_client, curl), fragmentation, garbage."""

from __future__ import annotations

import datetime
import random
import shutil
import socket
import ssl
import struct
import subprocess
from collections.abc import Iterable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge.directory.names import hostname_or_none
from httpproxy.clienthello import (
    ALERT_DESCRIPTIONS,
    ClientHello,
    ClientHelloError,
    ClientHelloReader,
    alert_bytes,
)

LONG_NAME = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 61])  # 253 characters
assert len(LONG_NAME) == 253


# --------------------------------------------------------------------------- helpers


def real_hello(
    server_hostname: str | None,
    *,
    alpn: list[str] | None = None,
    minimum: ssl.TLSVersion | None = None,
    maximum: ssl.TLSVersion | None = None,
) -> tuple[bytes, ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO]:
    """Python's ssl client's first flight; also the client objects to finish a handshake."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(alpn)
    if minimum is not None:
        ctx.minimum_version = minimum
    if maximum is not None:
        ctx.maximum_version = maximum
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = ctx.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    with pytest.raises(ssl.SSLWantReadError):
        client.do_handshake()
    return outgoing.read(), client, incoming, outgoing


def hello_bytes(server_hostname: str | None, **kwargs: object) -> bytes:
    return real_hello(server_hostname, **kwargs)[0]  # type: ignore[arg-type]


def feed_all(data: bytes, chunks: Iterable[int] | None = None, **kwargs: int) -> ClientHello | None:
    """Feed ``data`` in pieces of the given sizes (the rest at the end); the last result."""
    reader = ClientHelloReader(**kwargs)
    result = None
    pos = 0
    for size in [*(chunks or ()), len(data)]:
        if pos >= len(data) and pos > 0:
            break
        piece = data[pos : pos + size]
        pos += len(piece)
        assert result is None
        result = reader.feed(piece)
    return result


def handshake_message(hello: bytes) -> bytes:
    """The handshake message of a hello that fits one record."""
    assert hello[0] == 22
    (length,) = struct.unpack("!H", hello[3:5])
    assert len(hello) == 5 + length
    return hello[5:]


def frame(message: bytes, sizes: Iterable[int] = (), version: bytes = b"\x03\x01") -> bytes:
    """Wrap a handshake message in records of the given fragment sizes (the rest in the last)."""
    out = bytearray()
    pos = 0
    for size in [*sizes, len(message)]:
        piece = message[pos : pos + size]
        if not piece:
            continue
        pos += len(piece)
        out += bytes((22,)) + version + struct.pack("!H", len(piece)) + piece
    assert pos == len(message)
    return bytes(out)


def ext(ext_type: int, data: bytes) -> bytes:
    return struct.pack("!HH", ext_type, len(data)) + data


def sni_ext(*names: bytes, name_type: int = 0) -> bytes:
    entries = b"".join(bytes((name_type,)) + struct.pack("!H", len(n)) + n for n in names)
    return ext(0, struct.pack("!H", len(entries)) + entries)


def alpn_ext(*names: bytes) -> bytes:
    body = b"".join(bytes((len(n),)) + n for n in names)
    return ext(16, struct.pack("!H", len(body)) + body)


def versions_ext(*versions: int) -> bytes:
    body = b"".join(struct.pack("!H", v) for v in versions)
    return ext(43, bytes((len(body),)) + body)


def hello_body(
    extensions: list[bytes] | None,
    *,
    legacy_version: int = 0x0303,
    session_id: bytes = b"",
    ciphers: bytes = b"\x13\x01\x13\x02",
    compression: bytes = b"\x00",
) -> bytes:
    body = struct.pack("!H", legacy_version) + bytes(32)
    body += bytes((len(session_id),)) + session_id
    body += struct.pack("!H", len(ciphers)) + ciphers
    body += bytes((len(compression),)) + compression
    if extensions is not None:
        block = b"".join(extensions)
        body += struct.pack("!H", len(block)) + block
    return body


def synthetic(extensions: list[bytes] | None, **kwargs: object) -> bytes:
    """A one-record hello around a hand-built body (for cases real clients never send)."""
    body = hello_body(extensions, **kwargs)  # type: ignore[arg-type]
    return frame(b"\x01" + len(body).to_bytes(3, "big") + body)


def parse(data: bytes) -> ClientHello:
    result = ClientHelloReader().feed(data)
    assert result is not None
    return result


def refused(data: bytes, **kwargs: int) -> ClientHelloError:
    with pytest.raises(ClientHelloError) as info:
        feed_all(data, **kwargs)
    assert info.value.alert in ALERT_DESCRIPTIONS
    return info.value


TYPICAL = hello_bytes("www.example.com", alpn=["h2", "http/1.1"])
NO_SNI = hello_bytes(None)
CORPUS = [
    TYPICAL,
    NO_SNI,
    hello_bytes(LONG_NAME),
    hello_bytes("bücher.example", maximum=ssl.TLSVersion.TLSv1_2),
    hello_bytes("tls13.example", alpn=["http/1.1"], minimum=ssl.TLSVersion.TLSv1_3),
]


# --------------------------------------------------------------------------- real Python hellos


@pytest.mark.parametrize(("hostname", "expected"), [
    ("www.example.com", "www.example.com"),
    ("Mixed.Case.Example", "Mixed.Case.Example"),  # kept as sent; the caller normalises
    ("bücher.example", "xn--bcher-kva.example"),  # Python's ssl sends the A-label
    ("xn--r8jz45g.jp", "xn--r8jz45g.jp"),
    ("a.b", "a.b"),
    (LONG_NAME, LONG_NAME),
    ("x" * 63 + ".example", "x" * 63 + ".example"),
])
def test_real_hello_server_name(hostname: str, expected: str) -> None:
    hello = parse(TYPICAL if hostname == "www.example.com" else hello_bytes(hostname))
    assert hello.server_name == expected
    assert hello.rejected_server_name is None
    assert hostname_or_none(expected) == expected.lower()


def test_real_hello_fields() -> None:
    hello = parse(TYPICAL)
    assert hello.alpn == ("h2", "http/1.1")
    assert hello.tls_versions == (0x0304, 0x0303)
    assert hello.legacy_version == 0x0303
    assert hello.raw == TYPICAL


def test_no_sni() -> None:
    hello = parse(NO_SNI)
    assert hello.server_name is None
    assert hello.rejected_server_name is None
    assert hello.alpn == ()


@pytest.mark.parametrize(("minimum", "maximum", "versions"), [
    (None, ssl.TLSVersion.TLSv1_2, ()),  # a TLS 1.2-only client sends no supported_versions
    (ssl.TLSVersion.TLSv1_3, None, (0x0304,)),
    (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3, (0x0304, 0x0303)),
])
def test_tls_versions(
    minimum: ssl.TLSVersion | None, maximum: ssl.TLSVersion | None, versions: tuple[int, ...]
) -> None:
    hello = parse(hello_bytes("v.example", minimum=minimum, maximum=maximum, alpn=["http/1.1"]))
    assert hello.tls_versions == versions
    assert hello.alpn == ("http/1.1",)
    assert hello.server_name == "v.example"


def test_ip_literal_sni_is_treated_as_none() -> None:
    # Python's ssl does not send IP literals; build them by hand (curl, old libs, scanners).
    for literal in (b"192.0.2.1", b"::1", b"[::1]", b"*.example.com", b"bad_label.example",
                    b" padded.example", b"caf\xc3\xa9.example", b"a..b", b"x" * 64 + b".com"):
        hello = parse(synthetic([sni_ext(literal)]))
        assert hello.server_name is None, literal
        assert hello.rejected_server_name is not None
    assert parse(synthetic([sni_ext(b"192.0.2.1")])).rejected_server_name == "192.0.2.1"
    assert parse(synthetic([sni_ext(b"caf\xc3\xa9.example")])).rejected_server_name == (
        "caf\\xc3\\xa9.example"
    )


def test_trailing_dot_kept_as_sent() -> None:
    assert parse(synthetic([sni_ext(b"example.com.")])).server_name == "example.com."


def test_hello_without_extensions() -> None:
    hello = parse(synthetic(None, legacy_version=0x0301))
    assert (hello.server_name, hello.alpn, hello.tls_versions) == (None, (), ())
    assert hello.legacy_version == 0x0301


def test_grease_versions_dropped_and_alpn_bytes_round_trip() -> None:
    hello = parse(synthetic([
        ext(0x0A0A, b""),
        versions_ext(0x3A3A, 0x0304, 0x0303),
        alpn_ext(b"h2", b"\xff\x00weird"),
        ext(0x1A1A, b"\x00"),
        sni_ext(b"g.example"),
    ]))
    assert hello.tls_versions == (0x0304, 0x0303)
    assert hello.alpn == ("h2", "\xff\x00weird")
    assert hello.server_name == "g.example"


# --------------------------------------------------------------------------- fragmentation


@pytest.mark.parametrize("data", CORPUS, ids=range(len(CORPUS)))
def test_byte_at_a_time(data: bytes) -> None:
    reader = ClientHelloReader()
    for i in range(len(data) - 1):
        assert reader.feed(data[i : i + 1]) is None
    hello = reader.feed(data[-1:])
    assert hello is not None
    assert hello.raw == data
    assert hello == parse(data)


def test_empty_feeds_need_more() -> None:
    reader = ClientHelloReader()
    assert reader.feed(b"") is None
    assert reader.feed(TYPICAL[:3]) is None
    assert reader.feed(b"") is None
    assert reader.buffered == 3
    assert reader.feed(TYPICAL[3:]) is not None


@given(data=st.sampled_from(CORPUS), cuts=st.lists(st.integers(0, 2000), max_size=20))
def test_random_chunks(data: bytes, cuts: list[int]) -> None:
    points = sorted({c % (len(data) + 1) for c in cuts})
    sizes = [b - a for a, b in zip([0, *points], points, strict=False)]
    hello = feed_all(data, sizes)
    assert hello is not None
    assert hello.raw == data
    assert hello == parse(data)


@given(data=st.sampled_from(CORPUS), st_data=st.data())
def test_split_across_records(data: bytes, st_data: st.DataObject) -> None:
    message = handshake_message(data)
    count = st_data.draw(st.integers(2, 5))
    cuts = sorted(st_data.draw(st.lists(
        st.integers(1, len(message) - 1), min_size=count - 1, max_size=count - 1, unique=True)))
    sizes = [b - a for a, b in zip([0, *cuts], cuts, strict=False)]
    reframed = frame(message, sizes)
    assert reframed.count(b"\x16\x03\x01") >= count
    chunking = st_data.draw(st.lists(st.integers(1, 300), max_size=10))
    hello = feed_all(reframed, chunking)
    assert hello is not None
    assert hello.raw == reframed
    whole = parse(data)
    assert (hello.server_name, hello.alpn, hello.tls_versions) == (
        whole.server_name, whole.alpn, whole.tls_versions)


def test_handshake_header_split_across_records() -> None:
    message = handshake_message(TYPICAL)
    for first in (1, 2, 3, 4, 5):
        assert parse(frame(message, [first, 1, 1])).server_name == "www.example.com"


def test_bytes_after_the_hello_are_replayed() -> None:
    ccs = b"\x14\x03\x03\x00\x01\x01"  # middlebox-compat change_cipher_spec in the same read
    hello = parse(TYPICAL + ccs)
    assert hello.raw == TYPICAL + ccs
    reader = ClientHelloReader()
    assert reader.feed(TYPICAL + ccs) is not None
    with pytest.raises(RuntimeError):
        reader.feed(b"more")


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("request_line", [
    b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n", b"POST /form HTTP/1.1\r\n", b"HEAD / HTTP/1.0\r\n",
    b"PUT /x HTTP/1.1\r\n", b"DELETE /x HTTP/1.1\r\n", b"OPTIONS * HTTP/1.1\r\n",
    b"PATCH /x HTTP/1.1\r\n", b"CONNECT a:443 HTTP/1.1\r\n", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
])
def test_plain_http_detected(request_line: bytes) -> None:
    exc = refused(request_line)
    assert exc.plain_http
    assert "plain HTTP" in str(exc)
    # Byte-at-a-time, decided as soon as the method and its space are in (not on the first
    # byte: "P" may start "POST " or "PROXY TCP4", which is no HTTP request).
    method_and_space = request_line.index(b" ") + 1
    reader = ClientHelloReader()
    for i in range(method_and_space - 1):
        assert reader.feed(request_line[i:i + 1]) is None
    with pytest.raises(ClientHelloError) as info:
        reader.feed(request_line[method_and_space - 1:method_and_space])
    assert info.value.plain_http


@pytest.mark.parametrize("garbage", [
    b"\x00\x00\x00", b"SSH-2.0-OpenSSH_9.6\r\n", b"\x15\x03\x03\x00\x02\x02\x28",
    b"\x17\x03\x03\x00\x05hello", b"get / HTTP/1.1\r\n", b"GEX",
])
def test_not_tls(garbage: bytes) -> None:
    exc = refused(garbage)
    assert not exc.plain_http
    assert exc.alert == "unexpected_message"


def test_sslv2_compatible_hello_refused() -> None:
    # SSLv2 CLIENT-HELLO header: 2-byte length with the high bit set, msg type 1, version 3.1.
    v2 = bytes.fromhex("802e0103010015000000100000390000380000350000160000130000") + bytes(16)
    exc = refused(v2)
    assert exc.alert == "protocol_version"
    assert "SSLv2" in str(exc)


def test_max_bytes() -> None:
    exc = refused(TYPICAL, max_bytes=len(TYPICAL) - 1)
    assert exc.alert == "illegal_parameter"
    assert "limit" in str(exc)
    assert feed_all(TYPICAL, max_bytes=len(TYPICAL)) is not None
    # Refused as soon as the record header shows it cannot fit, before the bytes arrive.
    reader = ClientHelloReader(max_bytes=100)
    with pytest.raises(ClientHelloError):
        reader.feed(TYPICAL[:5])
    # A handshake length announcing more than the limit is refused from its header too.
    big = frame(b"\x01\x00\x40\x00" + bytes(200), [100])  # 16 KiB promised, split in records
    reader = ClientHelloReader(max_bytes=4096)
    with pytest.raises(ClientHelloError):
        reader.feed(big[:120])
    # Endless tiny records: the buffered total is capped.
    message = handshake_message(hello_bytes(LONG_NAME))
    tiny = frame(message, [1] * len(message))
    assert len(tiny) == 6 * len(message)
    assert parse(tiny).server_name == LONG_NAME
    refused(tiny, max_bytes=len(tiny) - 10)
    with pytest.raises(ValueError):
        ClientHelloReader(max_bytes=4)


def test_error_is_sticky() -> None:
    reader = ClientHelloReader()
    with pytest.raises(ClientHelloError) as first:
        reader.feed(b"GET / HTTP/1.1\r\n")
    with pytest.raises(ClientHelloError) as second:
        reader.feed(TYPICAL)
    assert second.value is first.value


def corrupt(data: bytes, offset: int, value: bytes) -> bytes:
    return data[:offset] + value + data[offset + len(value) :]


def record_with(message: bytes) -> bytes:
    return b"\x16\x03\x01" + struct.pack("!H", len(message)) + message


def test_length_inconsistencies() -> None:
    message = handshake_message(TYPICAL)
    body = message[4:]
    # Handshake length shorter than the record: trailing bytes in the record.
    short = b"\x01" + (len(body) - 1).to_bytes(3, "big") + body
    assert refused(record_with(short)).alert == "unexpected_message"
    # Handshake length longer than sent, followed by a non-handshake record.
    longer = b"\x01" + (len(body) + 10).to_bytes(3, "big") + body
    assert refused(record_with(longer) + alert_bytes("close_notify")).alert == "unexpected_message"
    # ... or simply truncated: need more.
    assert ClientHelloReader().feed(record_with(longer)) is None
    # Record-level: zero length, over 2^14, wrong version major, wrong handshake type.
    assert refused(b"\x16\x03\x01\x00\x00").alert == "unexpected_message"
    assert refused(b"\x16\x03\x01\x40\x01").alert == "record_overflow"
    assert refused(corrupt(TYPICAL, 1, b"\x02")).alert == "protocol_version"
    assert refused(corrupt(TYPICAL, 5, b"\x02")).alert == "unexpected_message"  # ServerHello
    # Body-level: extensions block length, session id > 32, odd cipher suites, no compression.
    bad_ext_len = synthetic([sni_ext(b"a.example")])
    ext_len_at = len(bad_ext_len) - len(sni_ext(b"a.example")) - 2
    for delta in (-1, 1):
        value = len(sni_ext(b"a.example")) + delta
        assert refused(corrupt(bad_ext_len, ext_len_at, struct.pack("!H", value))).alert == "decode_error"
    assert refused(synthetic([], session_id=bytes(33))).alert == "decode_error"
    assert refused(synthetic([], ciphers=b"\x13")).alert == "decode_error"
    assert refused(synthetic([], ciphers=b"")).alert == "decode_error"
    assert refused(synthetic([], compression=b"")).alert == "decode_error"
    assert refused(synthetic(None, legacy_version=0x0200)).alert == "protocol_version"
    assert refused(frame(b"\x01\x00\x00\x05" + b"\x03\x03abc")).alert == "decode_error"
    # Truncated at every point after the fixed fields, with consistent outer lengths.
    full = hello_body([sni_ext(b"t.example"), alpn_ext(b"h2")], session_id=bytes(32))
    for cut in range(len(full)):
        body = full[:cut]
        data = frame(b"\x01" + len(body).to_bytes(3, "big") + body) if body else b""
        if not data:
            continue
        try:
            feed_all(data)
        except ClientHelloError as exc:
            assert exc.alert in {"decode_error", "protocol_version"}


@pytest.mark.parametrize(("extensions", "alert"), [
    ([sni_ext(b"a.example"), sni_ext(b"b.example")], "illegal_parameter"),  # duplicate extension
    ([alpn_ext(b"h2"), ext(5, b""), alpn_ext(b"h2")], "illegal_parameter"),
    ([ext(0xFF01, b"\x00"), ext(0xFF01, b"\x00")], "illegal_parameter"),  # unknown ones too
    ([sni_ext(b"a.example", name_type=1)], "illegal_parameter"),  # not host_name
    ([sni_ext(b"a.example", b"b.example")], "illegal_parameter"),  # two host_names
    ([sni_ext(b"")], "decode_error"),
    ([ext(0, b"")], "decode_error"),
    ([ext(0, b"\x00\x00")], "decode_error"),
    ([ext(0, b"\x00\x05\x00\x00\x09abc")], "decode_error"),
    ([ext(0, b"\x00\x04\x00\x00\x09abc")], "decode_error"),
    ([ext(0, b"\x00\x02\x00\x00")], "decode_error"),
    ([ext(16, b"")], "decode_error"),
    ([ext(16, b"\x00\x00")], "decode_error"),
    ([ext(16, b"\x00\x03\x00h2")], "decode_error"),
    ([ext(16, b"\x00\x03\x03h2")], "decode_error"),
    ([ext(43, b"")], "decode_error"),
    ([ext(43, b"\x03\x03\x04\x03")], "decode_error"),
    ([ext(43, b"\x00")], "decode_error"),
    ([ext(43, b"\x04\x03\x04")], "decode_error"),
    ([ext(0, b"\x00")], "decode_error"),
    ([b"\x00\x00\x00"], "decode_error"),  # truncated extension header
    ([b"\x00\x10\x00\x09\x00"], "decode_error"),  # extension overruns
])
def test_malformed_extensions(extensions: list[bytes], alert: str) -> None:
    assert refused(synthetic(extensions)).alert == alert


# --------------------------------------------------------------------------- fuzzing


def assert_total(data: bytes, sizes: list[int], **kwargs: int) -> None:
    """Only None, a ClientHello whose raw is exactly what was fed, or ClientHelloError."""
    reader = ClientHelloReader(**kwargs)
    fed = bytearray()
    pos = 0
    try:
        for size in [*sizes, len(data)]:
            piece = data[pos : pos + size]
            pos += len(piece)
            fed += piece
            result = reader.feed(piece)
            if result is not None:
                assert result.raw == bytes(fed)
                assert result.server_name is None or hostname_or_none(result.server_name)
                assert all(isinstance(v, int) for v in result.tls_versions)
                return
    except ClientHelloError as exc:
        assert exc.alert in ALERT_DESCRIPTIONS
        assert exc.message


mutation = st.tuples(st.sampled_from(["set", "insert", "delete"]), st.integers(0, 4000), st.integers(0, 255))


def mutate(data: bytes, mutations: list[tuple[str, int, int]]) -> bytes:
    out = bytearray(data)
    for kind, where, value in mutations:
        i = where % (len(out) + 1)
        if kind == "set" and i < len(out):
            out[i] = value
        elif kind == "insert":
            out.insert(i, value)
        elif kind == "delete" and i < len(out):
            del out[i]
    return bytes(out)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.sampled_from(CORPUS), mutations=st.lists(mutation, min_size=1, max_size=8),
       sizes=st.lists(st.integers(1, 700), max_size=6), max_bytes=st.sampled_from([16384, 600, 64]))
def test_random_mutations_only_raise_clienthelloerror(
    data: bytes, mutations: list[tuple[str, int, int]], sizes: list[int], max_bytes: int
) -> None:
    assert_total(mutate(data, mutations), sizes, max_bytes=max_bytes)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.sampled_from(CORPUS), mutations=st.lists(mutation, min_size=1, max_size=8),
       records=st.integers(1, 4))
def test_body_mutations_with_consistent_framing(
    data: bytes, mutations: list[tuple[str, int, int]], records: int
) -> None:
    # Re-frame after mutating the body so that the ClientHello parser itself is exercised.
    body = mutate(handshake_message(data)[4:], mutations)
    message = b"\x01" + len(body).to_bytes(3, "big") + body
    step = max(1, len(message) // records)
    assert_total(frame(message, [step] * (records - 1)), [])


def outcome(data: bytes, sizes: list[int]) -> tuple[object, ...]:
    """What a reader decides for ``data`` fed in pieces: the hello's fields or the alert."""
    try:
        hello = feed_all(data, sizes)
    except ClientHelloError as exc:
        return ("alert", exc.alert, exc.plain_http)
    if hello is None:
        return ("more",)
    return (hello.server_name, hello.alpn, hello.tls_versions, hello.raw, hello.legacy_version,
            hello.rejected_server_name)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.sampled_from(CORPUS), mutations=st.lists(mutation, max_size=6),
       framing=st.lists(mutation, max_size=2))
def test_whole_hello_decided_as_when_fed_in_pieces(
    data: bytes, mutations: list[tuple[str, int, int]], framing: list[tuple[str, int, int]]
) -> None:
    # A hello arriving in one read takes the reader's fast path; fed in two reads it takes the
    # reassembling one. Both must accept the same hellos and send the same alerts.
    body = mutate(handshake_message(data)[4:], mutations)
    single = frame(b"\x01" + len(body).to_bytes(3, "big") + body, [])
    single = mutate(single[:12], framing) + single[12:]  # record and handshake headers too
    assert outcome(single, []) == outcome(single, [len(single) - 1])


@given(st.binary(max_size=600), st.lists(st.integers(1, 100), max_size=5))
def test_random_bytes(data: bytes, sizes: list[int]) -> None:
    assert_total(data, sizes)
    assert_total(b"\x16\x03\x01" + data, sizes)


@given(st.lists(st.binary(max_size=40), max_size=6))
def test_random_extensions(payloads: list[bytes]) -> None:
    rng = random.Random(len(payloads))
    exts = [ext(rng.choice([0, 16, 43, 0x2A2A, 65281]), p) for p in payloads]
    assert_total(synthetic(exts), [])


# --------------------------------------------------------------------------- alerts


def test_alert_bytes() -> None:
    assert alert_bytes("unrecognized_name") == b"\x15\x03\x03\x00\x02\x02\x70"
    assert alert_bytes("decode_error")[-1] == 50
    assert alert_bytes("handshake_failure")[-1] == 40
    assert alert_bytes("protocol_version")[-1] == 70
    assert alert_bytes("internal_error")[-1] == 80
    with pytest.raises(ValueError):
        alert_bytes("no_such_alert")
    with pytest.raises(ValueError):
        ClientHelloError("no_such_alert", "x")


def test_alert_is_understood_by_a_real_tls_client() -> None:
    _, client, incoming, _ = real_hello("unknown.example")
    incoming.write(alert_bytes("unrecognized_name"))
    with pytest.raises(ssl.SSLError) as info:
        client.do_handshake()
    assert "UNRECOGNIZED_NAME" in str(info.value).upper()


# --------------------------------------------------------------------------- replay into real TLS


@pytest.fixture(scope="module")
def server_context(tmp_path_factory: pytest.TempPathFactory) -> ssl.SSLContext:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "replay.example")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("replay.example")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    directory: Path = tmp_path_factory.mktemp("tls")
    (directory / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "key.pem").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(directory / "cert.pem", directory / "key.pem")
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    return ctx


@pytest.mark.parametrize(("minimum", "maximum", "records"), [
    (None, None, 1),
    (None, None, 4),
    (None, ssl.TLSVersion.TLSv1_2, 1),
    (None, ssl.TLSVersion.TLSv1_2, 3),
    (ssl.TLSVersion.TLSv1_3, None, 2),
])
def test_raw_replays_into_a_real_tls_server(
    server_context: ssl.SSLContext, minimum: ssl.TLSVersion | None, maximum: ssl.TLSVersion | None,
    records: int,
) -> None:
    first_flight, client, c_in, c_out = real_hello(
        "replay.example", alpn=["h2", "http/1.1"], minimum=minimum, maximum=maximum)
    if records > 1:  # re-frame the real hello: the TLS server must accept the fragmentation
        message = handshake_message(first_flight)
        step = len(message) // records + 1
        first_flight = frame(message, [step] * (records - 1))
    reader = ClientHelloReader()
    hello = None
    rng = random.Random(records)
    pos = 0
    while hello is None:
        size = rng.randint(1, 200)
        hello = reader.feed(first_flight[pos : pos + size])
        pos += size
    assert hello.server_name == "replay.example"
    assert hello.raw == first_flight

    seen: list[str | None] = []
    server_context.sni_callback = lambda _obj, name, _ctx: seen.append(name)  # type: ignore[assignment,misc,return-value]
    s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    server = server_context.wrap_bio(s_in, s_out, server_side=True)
    s_in.write(hello.raw)  # the server sees the ClientHello only through the replay
    done = {"client": False, "server": False}
    for _ in range(10):
        for label, obj in (("server", server), ("client", client)):
            if not done[label]:
                try:
                    obj.do_handshake()
                    done[label] = True
                except ssl.SSLWantReadError:
                    pass
        c_in.write(s_out.read())
        s_in.write(c_out.read())
        if all(done.values()):
            break
    assert all(done.values())
    assert seen == ["replay.example"]
    assert server.selected_alpn_protocol() == client.selected_alpn_protocol() == "h2"
    client.write(b"ping")
    s_in.write(c_out.read())
    assert server.read(4) == b"ping"
    server_context.sni_callback = None


# --------------------------------------------------------------------------- real clients


def capture_first_flight(command: list[str], listener: socket.socket) -> ClientHello:
    """Run a TLS client against ``listener``; parse what it sends; kill it."""
    proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        listener.settimeout(15)
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(15)
            reader = ClientHelloReader()
            while True:
                chunk = conn.recv(4096)
                assert chunk, "client closed before sending a full ClientHello"
                hello = reader.feed(chunk)
                if hello is not None:
                    conn.sendall(alert_bytes("handshake_failure"))
                    return hello
    finally:
        proc.kill()
        proc.wait(timeout=10)


@pytest.fixture
def listener() -> Iterable[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    with sock:
        yield sock


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI not installed")
@pytest.mark.parametrize(("extra", "alpn", "versions"), [
    ([], ("h2", "http/1.1"), (0x0304, 0x0303)),  # and older ones, depending on the build
    (["-tls1_2"], ("h2", "http/1.1"), ()),
    (["-tls1_3"], ("h2", "http/1.1"), (0x0304,)),
])
def test_openssl_s_client(
    listener: socket.socket, extra: list[str], alpn: tuple[str, ...], versions: tuple[int, ...]
) -> None:
    port = listener.getsockname()[1]
    hello = capture_first_flight(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "s-client.example",
         "-alpn", "h2,http/1.1", *extra], listener)
    assert hello.server_name == "s-client.example"
    assert hello.alpn == alpn
    assert hello.tls_versions[: len(versions)] == versions
    assert bool(hello.tls_versions) == bool(versions)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI not installed")
def test_openssl_s_client_ip_literal(listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    hello = capture_first_flight(["openssl", "s_client", "-connect", f"127.0.0.1:{port}"], listener)
    assert hello.server_name is None  # either no SNI or the IP literal, refused as a name


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
@pytest.mark.parametrize("hostname", ["curl.example", "xn--bcher-kva.example"])
def test_curl(listener: socket.socket, hostname: str) -> None:
    port = listener.getsockname()[1]
    hello = capture_first_flight(
        ["curl", "-sk", "--max-time", "10", "--resolve", f"{hostname}:{port}:127.0.0.1",
         f"https://{hostname}:{port}/"], listener)
    assert hello.server_name == hostname
    assert "http/1.1" in hello.alpn
    assert 0x0303 in hello.tls_versions or hello.legacy_version == 0x0303


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
def test_curl_ip_literal(listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    hello = capture_first_flight(["curl", "-sk", "--max-time", "10", f"https://127.0.0.1:{port}/"],
                                 listener)
    assert hello.server_name is None


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
def test_curl_plain_http_to_tls_port(listener: socket.socket) -> None:
    port = listener.getsockname()[1]
    with pytest.raises(ClientHelloError) as info:
        capture_first_flight(["curl", "-s", "--max-time", "10", f"http://127.0.0.1:{port}/"], listener)
    assert info.value.plain_http
