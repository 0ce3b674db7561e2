"""HTTP request heads: llhttp (httptools, as httpproxy/front_h1.py drives it) against h11, and
the routing key the edge derives from Host (httpproxy.exchange._host_name +
edge.directory.names.hostname_or_none).

Properties: the parser raises only HttpParserError (or HttpParserUpgrade); a head llhttp
accepts in strict mode that h11 also accepts has the same method, target and headers; the
routing key of any Host value is None or a plain lower-case DNS name (no userinfo, port,
path, whitespace or trailing dot), so no Host spelling routes to a name not in canonical form."""

from __future__ import annotations

import re
import sys

import h11
import httptools
from _harness import instrumented, main, split

with instrumented("httpproxy.exchange", "edge.directory.names"):
    from edge.directory.names import hostname_or_none
    from httpproxy.exchange import _host_name

_CANONICAL = re.compile(r"(\*\.)?[a-z0-9-]+(\.[a-z0-9-]+)*")


class _Collect:
    def __init__(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.complete = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.complete = True


def llhttp_view(head: bytes) -> tuple[bytes, bytes, list[tuple[bytes, bytes]]] | None:
    sink = _Collect()
    parser = httptools.HttpRequestParser(sink)
    try:
        parser.feed_data(head)
    except httptools.HttpParserUpgrade:
        pass
    except httptools.HttpParserError:
        return None
    if not sink.complete:
        return None
    return parser.get_method(), sink.url, sink.headers


def h11_view(head: bytes) -> tuple[bytes, bytes, list[tuple[bytes, bytes]]] | None:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(head)
    try:
        event = conn.next_event()
    except h11.RemoteProtocolError:
        return None
    if not isinstance(event, h11.Request):
        return None
    return bytes(event.method), bytes(event.target), [(bytes(k), bytes(v)) for k, v in
                                                      event.headers.raw_items()]


def check_route_key(value: bytes) -> None:
    key = hostname_or_none(_host_name(value))
    if key is not None:
        assert _CANONICAL.fullmatch(key), key


def check(data: bytes) -> None:
    _, payload = split(data)
    check_route_key(payload[:300])
    head = payload if payload.endswith(b"\r\n\r\n") else payload + b"\r\n\r\n"
    ours, theirs = llhttp_view(head), h11_view(head)
    if ours is not None and theirs is not None and b"\n" not in head.replace(b"\r\n", b""):
        method, target, headers = ours
        assert (method, target) == theirs[:2], (ours, theirs)
        assert [(k.lower(), v.strip(b" \t")) for k, v in headers] == [
            (k.lower(), v) for k, v in theirs[2]], (ours, theirs)


def seeds() -> list[bytes]:
    return [
        b"\x00GET /a?b HTTP/1.1\r\nHost: www.a.test\r\nCookie: s=1\r\n\r\n",
        b"\x00POST / HTTP/1.1\r\nHost: WWW.A.TEST.:8080\r\nContent-Length: 3\r\n\r\n",
        b"\x00GET http://u@www.b.test/ HTTP/1.1\r\nHost: www.a.test\r\n\r\n",
        b"\x00www.a.test@www.b.test:80",
        b"\x00[::1]:80",
    ]


if __name__ == "__main__":
    main(check)
    sys.exit(0)
