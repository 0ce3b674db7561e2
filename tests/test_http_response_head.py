"""``httpproxy.upstream.examine_head``: the one-scan examination of a backend's response head
(body framing, ``Connection: close``, hop-by-hop stripping) against a reference written the
way the proxy used to do it, with one regex per question, on generated heads that include
the shapes smuggling and response splitting are made of."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from httpproxy.upstream import HeadTemplate, examine_head, is_strict_head

# -- the reference: five separate scans, as before examine_head ------------------------------

_FRAMING = re.compile(rb"\r\n(?:content-length|transfer-encoding)[ \t]*:", re.IGNORECASE)
_CLOSE = re.compile(rb"\r\nconnection[ \t]*:[^\r\n]*\bclose\b", re.IGNORECASE)
_LENGTH = re.compile(rb"\r\ncontent-length[ \t]*:[ \t]*([0-9]{1,15})[ \t]*\r\n", re.IGNORECASE)
_CONN_NAMES = re.compile(
    rb"\r\nconnection[ \t]*:(?![ \t]*(?:keep-alive|close|upgrade)[ \t]*\r)", re.IGNORECASE)
_RESP_HOP = re.compile(rb"\r\n(?:connection|keep-alive|proxy-connection)[ \t]*:[^\r\n]*",
                       re.IGNORECASE)


_TOKEN = frozenset(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_VALUE = frozenset(b"\t" + bytes(range(0x20, 0x7F)) + bytes(range(0x80, 0x100)))


def reference_strict(head: bytes) -> bool:
    """RFC 9112 line by line: CRLF line ends, token names, values without control bytes."""
    if not head.endswith(b"\r\n"):
        return False
    status_line, *lines = head[:-2].split(b"\r\n")
    if not all(b in _VALUE for b in status_line):
        return False
    for line in lines:
        name, colon, value = line.partition(b":")
        if not colon or not name or not all(b in _TOKEN for b in name):
            return False
        if not all(b in _VALUE for b in value):
            return False
    return True


def reference_length(head: bytes, status: int) -> int:
    if status in (204, 304) or not head.startswith(b"HTTP/1.1 ") or not reference_strict(head):
        return -1
    match = _LENGTH.search(head)
    if match is None or len(_FRAMING.findall(head)) != 1:
        return -1
    return int(match.group(1))


def reference_strip(head: bytes) -> bytes:
    names: set[bytes] = set()
    for match in _RESP_HOP.finditer(head):
        name, _, value = match.group()[2:].partition(b":")
        if name.strip().lower() == b"connection":
            names.update(t.strip().lower() for t in value.split(b","))
    head = _RESP_HOP.sub(b"", head)
    names -= {b"close", b"keep-alive", b"upgrade", b""}
    if names:
        lines = head.split(b"\r\n")
        head = b"\r\n".join(ln for i, ln in enumerate(lines)
                            if i == 0 or ln.partition(b":")[0].strip().lower() not in names)
    return head


# -- generated heads ------------------------------------------------------------------------

NAMES = [b"Content-Length", b"content-length", b"CONTENT-LENGTH ", b"Transfer-Encoding",
         b"Connection", b"connection", b"Keep-Alive", b"Proxy-Connection", b"X-Secret",
         b"x-secret", b"Date", b"Server", b"Set-Cookie", b"Upgrade", b"Content-Length-X",
         b"Connection-Info", b"Transfer-Encoding-X", b"Keep-Alive-Y"]
VALUES = [b"0", b"12", b" 1024 ", b"\t7\t", b"12, 12", b"-1", b"1e3", b"1234567890123456",
          b"chunked", b"close", b"keep-alive", b"Keep-Alive, close", b"x-secret", b"upgrade",
          b"X-Secret, close", b"foo-close", b"timeout=5", b"", b"12\nX: y", b"a\rb",
          b"Mon, 23 Nov 2026 00:00:00 GMT"]
STATUS_LINES = [b"HTTP/1.1 200 OK", b"HTTP/1.0 200 OK", b"HTTP/1.1 204 No Content",
                b"HTTP/1.1 304 Not Modified", b"HTTP/1.1 404 Not Found"]

fields = st.lists(st.tuples(st.sampled_from(NAMES), st.sampled_from([b":", b" :", b": ", b":\t"]),
                            st.sampled_from(VALUES)), max_size=8)


def build(status_line: bytes, parts: list[tuple[bytes, bytes, bytes]]) -> bytes:
    return status_line + b"\r\n" + b"".join(n + sep + v + b"\r\n" for n, sep, v in parts)


@settings(max_examples=4000, deadline=None)
@given(st.sampled_from(STATUS_LINES), fields)
def test_examine_head_agrees_with_one_scan_per_question(status_line: bytes,
                                                        parts: list[tuple[bytes, bytes, bytes]]) -> None:
    head = build(status_line, parts)
    status = int(head[9:12])
    raw, length, close, seen_status, stripped = examine_head(head, status)
    assert raw is head and seen_status == status
    assert length == reference_length(head, status)
    assert close == (_CLOSE.search(head) is not None)
    assert stripped == reference_strip(head)


def test_what_a_client_is_sent_and_how_the_body_is_framed() -> None:
    """The cases by name: what reaches the client, and whether the proxy counts the body."""
    head = (b"HTTP/1.1 200 OK\r\nDate: x\r\nConnection: keep-alive, X-Secret\r\n"
            b"X-Secret: internal\r\nKeep-Alive: timeout=5\r\nContent-Length: 5\r\n")
    _, length, close, _, stripped = examine_head(head, 200)
    assert (length, close) == (5, False)
    assert stripped == b"HTTP/1.1 200 OK\r\nDate: x\r\nContent-Length: 5\r\n"
    # Two lengths, or a length beside chunked: llhttp decides (and refuses), never us.
    assert examine_head(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 5\r\n", 200)[1] == -1
    assert examine_head(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n"
                        b"Transfer-Encoding: chunked\r\n", 200)[1] == -1
    assert examine_head(b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n", 200)[1] == -1
    assert examine_head(b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n", 204)[1] == -1
    # A bare LF inside the value is not a plain length.
    assert examine_head(b"HTTP/1.1 200 OK\r\nContent-Length: 5\nX: y\r\n", 200)[1] == -1
    closing = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n"
    assert examine_head(closing, 200)[2] is True
    assert examine_head(closing, 200)[4] == b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n"


# -- the per-connection template (HeadTemplate) ----------------------------------------------

DATES = st.binary(min_size=29, max_size=29) | st.sampled_from(
    [b"Tue, 24 Nov 2026 02:14:01 GMT", b"Tue, 24 Nov 2026\r\nX: 1:01 GMT",
     b"Tue, 24 Nov 2026 02:1\n:01 GMT", b"0\r\nTransfer-Encoding: chunked",
     b"\r\nConnection: close, x-secret", b"\r\nContent-Length: 5\r\nX-Y: zzz"])
LENGTHS = st.sampled_from([b"0", b"7", b"1234", b"999999999999999", b"1234567890123456", b"",
                           b"12a", b" 12", b"\xd9\xa3", b"12\r\nTransfer-Encoding: chunked"])


def _with_values(head: bytes, date: bytes | None, length: bytes) -> bytes:
    """``head`` with its first Date value (unless ``date`` is None) and its Content-Length
    digits replaced."""
    date_match = re.search(rb"\r\nDate: ([^\r\n]*)\r\n", head)
    if date_match is not None and date is not None:
        head = head[:date_match.start(1)] + date + head[date_match.end(1):]
    length_match = re.search(rb"\r\nContent-Length: ([0-9]+)\r\n", head)
    if length_match is not None:
        head = head[:length_match.start(1)] + length + head[length_match.end(1):]
    return head


@settings(max_examples=3000, deadline=None)
@given(fields, st.booleans(), DATES, LENGTHS, st.sampled_from(STATUS_LINES), fields)
def test_a_template_answers_as_examine_head_would_or_not_at_all(
        before: list[tuple[bytes, bytes, bytes]], with_date: bool, date: bytes, length: bytes,
        other_status: bytes, other: list[tuple[bytes, bytes, bytes]]) -> None:
    base = [(b"Date", b": ", b"Tue, 24 Nov 2026 02:14:00 GMT")] if with_date else []
    first = build(b"HTTP/1.1 200 OK", [*base, *before, (b"Content-Length", b": ", b"47")])
    template = HeadTemplate.of(examine_head(first, 200))
    if template is None:  # e.g. a second framing header among the generated ones
        assert examine_head(first, 200)[1] == -1 or _CONN_NAMES.search(first)
        return
    for head in (_with_values(first, date, length), build(other_status, other)):
        status = int(head[9:12])
        facts = template.match(head)
        assert facts is None or facts == examine_head(head, status), head
    if not any(name.strip().lower() == b"date" for name, _, _ in before):
        # The usual case, one Date line and a new length, does fit (a second Date line
        # leaves the date out of the template: only the length may vary then).
        plain = _with_values(first, b"Wed, 25 Nov 2026 03:15:01 GMT" if with_date else None,
                             b"1234")
        assert template.match(plain) == examine_head(plain, 200)


@settings(max_examples=1500, deadline=None)
@given(st.lists(st.tuples(DATES, LENGTHS, st.booleans()), min_size=1, max_size=8))
def test_a_template_answers_every_head_of_a_run_as_examine_head_would(
        run: list[tuple[bytes, bytes, bool]]) -> None:
    # A fleet's answers through one backend connection: the same head with the site's own
    # length, the date changing now and then (the template remembers the last date it
    # checked). Each head, the valid or the smuggling ones, gets examine_head's facts or none.
    first = (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Tue, 24 Nov 2026 02:14:00 GMT"
             b"\r\nContent-Type: text/plain\r\nContent-Length: 47\r\nConnection: keep-alive\r\n"
             b"Cache-Control: public, max-age=300\r\n")
    template = HeadTemplate.of(examine_head(first, 200))
    assert template is not None
    for date, length, same_date in run:
        head = _with_values(first, None if same_date else date, length)
        facts = template.match(head)
        assert facts is None or facts == examine_head(head, 200), head
        valid = re.fullmatch(rb"[0-9]{1,15}", length) and (
            same_date or re.fullmatch(rb"[\t\x20-\x7e\x80-\xff]*", date))
        if valid:
            assert facts == examine_head(head, 200), head


# -- strict heads: the only ones forwarded -----------------------------------------------------

@pytest.mark.parametrize("head", [
    b"HTTP/1.1 200 OK\r\nX-A: a\nTransfer-Encoding: chunked\r\nContent-Length: 20\r\n",  # bare LF
    b"HTTP/1.1 200 OK\r\nX-A: a\rTransfer-Encoding: chunked\r\nContent-Length: 20\r\n",  # bare CR
    b"HTTP/1.1 200 OK\r\nX-A: a\x00\r\nContent-Length: 20\r\n",
    b"HTTP/1.1 200 OK\r\nX-A: a\r\n b\r\nContent-Length: 20\r\n",  # obs-fold
    b"HTTP/1.1 200 OK\r\nX\xff: a\r\nContent-Length: 20\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length : 20\r\n",
    b"HTTP/1.1 200 OK\r\n: a\r\nContent-Length: 20\r\n",
    b"HTTP/1.1 200 OK\r\nno colon\r\nContent-Length: 20\r\n",
    b"HTTP/1.1 200 O\x00K\r\nContent-Length: 20\r\n",
    b"HTTP/1.1 200 OK\r\nX-A: \x7f\r\nContent-Length: 20\r\n",
    # the fuzz crash input (tests/fuzz/fuzz_response_head.py)
    b"HTTP/1.1 200 OK\r\nDate: Mod, 07 Dec:\nConten00 GMT\r\nContent-Length: 11\r\n"
    b"Con\xff\xff\xff\xffion: keep-alive\r\n",
])
def test_a_head_that_is_not_strict_gets_no_simple_length(head: bytes) -> None:
    assert not is_strict_head(head)
    assert examine_head(head, 200)[1] == -1
    assert HeadTemplate.of(examine_head(head, 200)) is None


@pytest.mark.parametrize("head", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n", b"HTTP/1.1 200\r\nContent-Length: 5\r\n",
    b"HTTP/1.0 404 Not Found\r\n", b"HTTP/1.1 200 OK\r\nX-A: caf\xc3\xa9\t \r\nX-B:\r\n\r\n",
])
def test_a_strict_head_is_accepted(head: bytes) -> None:
    assert is_strict_head(head)


def test_a_template_does_not_let_a_control_byte_in_through_the_date() -> None:
    first = b"HTTP/1.1 200 OK\r\nDate: Mon, 07 Dec 2026 10:00:00 GMT\r\nContent-Length: 5\r\n"
    template = HeadTemplate.of(examine_head(first, 200))
    assert template is not None
    assert template.match(first.replace(b"10:00:00", b"10:00:01")) is not None
    for bad in (b"10:00\n01", b"10:00\x0001", b"10:00\r01", b"10:00\x0b01"):
        assert template.match(first.replace(b"10:00:00", bad)) is None
