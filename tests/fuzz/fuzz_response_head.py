"""Backend response heads (httpproxy/upstream.py examine_head / HeadTemplate), against h11.

Properties: examine_head never raises; the stripped head keeps the status line and holds no
hop-by-hop header (Connection, Keep-Alive, Proxy-Connection, or one Connection names); a
"simple length" is only claimed for a head h11 reads as one Content-Length of that value
without Transfer-Encoding, and only for a strict head; a head with a bare CR or LF is never
strict, and one h11 reads without bare CR/LF is (the connection refuses the others with a 502);
a HeadTemplate answers exactly as examine_head or not at all."""

from __future__ import annotations

import sys

import h11
from _harness import instrumented, main, split

with instrumented("httpproxy.upstream"):
    from httpproxy.upstream import HeadTemplate, examine_head, is_strict_head

HOP = {b"connection", b"keep-alive", b"proxy-connection"}


def h11_view(head: bytes) -> list[tuple[bytes, bytes]] | None:
    """h11's headers for the head, or None if h11 refuses it."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/", headers=[("Host", "a")]))
    conn.receive_data(head)
    try:
        event = conn.next_event()
    except h11.RemoteProtocolError:
        return None
    if not isinstance(event, h11.Response):
        return None
    return [(bytes(k), bytes(v)) for k, v in event.headers]


def check_head(head: bytes, status: int) -> None:
    facts = examine_head(head, status)
    _, length, _, _, stripped = facts
    template = HeadTemplate.of(facts)
    if template is not None:
        assert template.match(head) == facts
    # Heads with a bare CR or LF or that h11 refuses never reach a client: llhttp refuses
    # them (a Content-Length head with bare LF is the one kind counted without llhttp).
    bare = head.replace(b"\r\n", b"").count(b"\n") + head.replace(b"\r\n", b"").count(b"\r")
    headers = h11_view(head)
    if length >= 0 and bare:
        raise AssertionError(f"simple length claimed for a head with bare CR/LF: {head!r}")
    strict = is_strict_head(head)
    if length >= 0 and not strict:
        raise AssertionError(f"simple length claimed for a head that is not strict: {head!r}")
    if bare and strict:
        raise AssertionError(f"a head with bare CR/LF counts as strict: {head!r}")
    # h11 lets control bytes (but NUL) through in values and unfolds obs-fold; RFC 9110 §5.5
    # and RFC 9112 §5.2 let a proxy refuse both, and llhttp does.
    controls = any((b < 0x20 and b not in b"\t\r\n") or b == 0x7F for b in head)
    folded = b"\n " in head or b"\n\t" in head
    if headers is not None and not bare and not controls and not folded and not strict:
        raise AssertionError(f"h11 reads it but the proxy would refuse it: {head!r}")
    if headers is not None and not bare:
        assert stripped.split(b"\r\n", 1)[0] == head.split(b"\r\n", 1)[0]
        named = {t.strip().lower() for k, v in headers if k == b"connection" for t in v.split(b",")}
        for line in stripped.split(b"\r\n")[1:]:
            name = line.partition(b":")[0].strip().lower()
            assert name not in HOP and (name not in named or name in (b"close", b"keep-alive",
                                                                      b"upgrade", b"")), line
        if length >= 0:
            lengths = [v for k, v in headers if k == b"content-length"]
            # h11 keeps the digits as sent ("01" is a valid length of 1, RFC 9110 §8.6).
            assert [int(v) for v in lengths] == [length], lengths
            assert not [k for k, _ in headers if k == b"transfer-encoding"]


def check(data: bytes) -> None:
    steer, payload = split(data)
    status = 100 + (steer[0] * 7 if steer else 100) % 500
    # The connection only examines heads that start with a checked status line.
    head = b"HTTP/1.1 %d OK\r\n" % status + payload + b"\r\n\r\n"
    head = head[:head.find(b"\r\n\r\n") + 4]  # the connection examines up to the first end
    check_head(head, status)


def seeds() -> list[bytes]:
    return [
        b"\x00Date: Mon, 07 Dec 2026 10:00:00 GMT\r\nContent-Length: 12\r\nConnection: keep-alive",
        b"\x00Content-Length: 5\r\nTransfer-Encoding: chunked",
        b"\x00Connection: close, X-Secret\r\nX-Secret: 1\r\nKeep-Alive: timeout=5",
        b"\x01\x10Server: nginx\r\nContent-Length: 0",
    ]


if __name__ == "__main__":
    main(check)
    sys.exit(0)
