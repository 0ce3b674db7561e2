"""A fleet through one worker: requests on one connection for ever other sites, and backend
answers that differ in their length (the body names the site). Playbook style (no sockets,
see tests/test_http_playbook.py): the engine, directory, front end, exchange and backend
connection are the real ones, the transports record.

What the backend and the client see must not depend on the Host the connection asked for
before: the X-Forwarded block is built from per-route and per-client pieces, and a backend
head that only differs from the last in its date and length skips the full examination.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.test_http_playbook import Play, playbook

SITES = ("www.a.test", "b.test", "www.c.test")
DATE = b"Tue, 08 Dec 2026 01:00:00 GMT"


def _answer(body: bytes, *, status: bytes = b"200 OK", date: bytes = DATE) -> bytes:
    """What the http benchmark's nginx backend answers (``return 200 "ok $host ..."``)."""
    return (b"HTTP/1.1 " + status + b"\r\nServer: nginx/1.22.1\r\nDate: " + date +
            b"\r\nContent-Type: text/plain\r\nContent-Length: %d\r\nConnection: keep-alive\r\n"
            b"Cache-Control: public, max-age=300\r\n\r\n" % len(body) + body)


def _client_head(body: bytes, *, status: bytes = b"200 OK", date: bytes = DATE) -> bytes:
    """The head the client is sent for :func:`_answer` (hop-by-hop Connection dropped)."""
    return (b"HTTP/1.1 " + status + b"\r\nServer: nginx/1.22.1\r\nDate: " + date +
            b"\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n"
            b"Cache-Control: public, max-age=300\r\n\r\n" % len(body))


@pytest.fixture
async def fleet(tmp_path: Path) -> AsyncIterator[Play]:
    async with playbook(tmp_path, SITES) as fixture:
        yield fixture


@pytest.mark.parametrize(("ip", "node"), [("127.0.0.1", b"127.0.0.1"), ("::1", b'"[::1]"')])
async def test_each_request_tells_the_backend_its_own_host_and_client(
        fleet: Play, ip: str, node: bytes) -> None:
    client, wire = fleet.client(ip=ip)
    for name in (*SITES, *SITES[::-1], SITES[1], SITES[1]):
        client.data_received(b"GET / HTTP/1.1\r\nHost: %b\r\n\r\n" % name.encode())
        await fleet.settle()
        backend, bwire = fleet.backends.opened[-1]
        host = name.encode()
        assert bwire.take() == (
            b"GET / HTTP/1.1\r\nHost: %b\r\nX-Forwarded-For: %b\r\nX-Real-IP: %b\r\n"
            b"X-Forwarded-Proto: http\r\nX-Forwarded-Host: %b\r\n"
            b'Forwarded: for=%b;host="%b";proto=http\r\n\r\n'
            % (host, ip.encode(), ip.encode(), host, node, host))
        backend.data_received(_answer(b"ok " + host))
        assert wire.take().endswith(b"\r\n\r\nok " + host)
    assert len(fleet.backends.opened) == 1


async def test_answers_of_other_lengths_each_reach_the_client_with_their_own_head(
        fleet: Play) -> None:
    client, wire = fleet.client()
    later = b"Tue, 08 Dec 2026 01:00:01 GMT"
    answers = [(b"ok www.a.test", b"200 OK", DATE), (b"ok b.test", b"200 OK", DATE),
               (b"ok " + b"x" * 120, b"200 OK", DATE), (b"ok b.test", b"200 OK", later),
               (b"", b"200 OK", later), (b"gone", b"404 Not Found", later),
               (b"ok www.c.test", b"200 OK", later)]
    for n, (body, status, date) in enumerate(answers):
        client.data_received(b"GET /%d HTTP/1.1\r\nHost: %b\r\n\r\n"
                             % (n, SITES[n % len(SITES)].encode()))
        await fleet.settle()
        backend, bwire = fleet.backends.opened[-1]
        assert bwire.take().startswith(b"GET /%d " % n)
        backend.data_received(_answer(body, status=status, date=date))
        assert wire.take() == _client_head(body, status=status, date=date) + body
    assert len(fleet.backends.opened) == 1 and not wire.closed


@pytest.mark.parametrize("bad", [
    _answer(b"ok", date=b"Tue, 08 Dec 2026 01:00\r\n01 GMT"),  # a header line through the date
    _answer(b"ok").replace(b"Content-Length: 2", b"Content-Length: 2\r\nContent-Length: 9"),
    _answer(b"ok").replace(b"Content-Length: 2", b"Content-Length: +2"),
])
async def test_a_head_like_the_last_but_not_strict_is_refused(fleet: Play, bad: bytes) -> None:
    client, wire = fleet.client()
    client.data_received(b"GET / HTTP/1.1\r\nHost: www.a.test\r\n\r\n")
    await fleet.settle()
    backend, _ = fleet.backends.opened[-1]
    backend.data_received(_answer(b"ok www.a.test"))
    assert wire.take().endswith(b"ok www.a.test")
    client.data_received(b"GET / HTTP/1.1\r\nHost: b.test\r\n\r\n")
    await fleet.settle()
    backend.data_received(bad)
    await fleet.settle()
    out = wire.take()
    assert out.startswith(b"HTTP/1.1 502 Bad Gateway\r\n") and b"ok" not in out.split(b"\r\n\r\n")[1]
