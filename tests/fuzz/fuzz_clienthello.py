"""TLS ClientHello reader (httpproxy/clienthello.py).

Properties: only ClientHelloError; the same decision whole or in pieces; never more than
``max_bytes`` buffered before deciding; an accepted hello replays exactly the bytes fed and
its server name is a normalisable hostname or None."""

from __future__ import annotations

import contextlib
import ssl
import sys

from _harness import chunks, instrumented, main, split

with instrumented("httpproxy.clienthello"):
    from edge.directory.names import hostname_or_none
    from httpproxy.clienthello import ClientHello, ClientHelloError, ClientHelloReader

MAX_BYTES = 4096


def decide(pieces: list[bytes]) -> ClientHello | str | None:
    reader = ClientHelloReader(max_bytes=MAX_BYTES)
    fed = b""
    try:
        for piece in pieces:
            fed += piece
            hello = reader.feed(piece)
            if hello is not None:
                assert hello.raw == fed
                return hello
    except ClientHelloError as exc:
        # (plain_http, the hint, may differ by chunking: see test_hostile_parsers.py)
        return f"error:{exc.alert}"
    assert reader.buffered <= MAX_BYTES, reader.buffered
    return None


def check(data: bytes) -> None:
    steer, payload = split(data)
    whole = decide([payload])
    pieced = decide(chunks(payload, steer))
    if isinstance(whole, ClientHello) and isinstance(pieced, ClientHello):
        assert (whole.server_name, whole.alpn, whole.tls_versions) == (
            pieced.server_name, pieced.alpn, pieced.tls_versions)
        if whole.server_name is not None:
            assert hostname_or_none(whole.server_name) is not None
    elif whole is None or pieced is None:
        # undecided whole: the pieces may decide no differently
        assert whole is None and pieced is None, (whole, pieced)
    else:
        assert whole == pieced, (whole, pieced)


def _real_hello(server_name: str | None, alpn: list[str] | None = None) -> bytes:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = ctx.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with contextlib.suppress(ssl.SSLWantReadError):
        client.do_handshake()
    return outgoing.read()


def seeds() -> list[bytes]:
    return [
        b"\x00" + _real_hello("www.a.test", ["h2", "http/1.1"]),
        b"\x00" + _real_hello(None),
        b"\x03\x05\x30\x80" + _real_hello("b.test"),
        b"\x00GET / HTTP/1.1\r\n",
    ]


if __name__ == "__main__":
    main(check)
    sys.exit(0)
