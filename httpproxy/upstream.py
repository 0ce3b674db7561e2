"""Backend connections: a keep-alive pool per backend and the response side of a request.

A :class:`BackendConnection` writes one request (head and body bytes built by the client side)
and forwards the response **raw**: it finds the end of the response head itself (one
``bytes.find``), hands the head to its :class:`ResponseSink` once, then passes every later
chunk straight through while llhttp (``httptools.HttpResponseParser``, one callback:
``on_message_complete``) only finds where the message ends. No per-header callbacks, no
re-serialisation of the response. A response llhttp frames (not one plain Content-Length)
has its head read by llhttp *before* the head is forwarded: a head llhttp refuses becomes a
502, never a forwarded head followed by a cut connection.

The pool is ``dict[key, list[BackendConnection]]`` with ``pop``/``append`` (LIFO keeps the
warmest connection busy and lets the others time out), bounded per key, with an idle timeout
enforced by one sweeper per pool. A connection is reused only well within the idle time its
backend allows (its ``Keep-Alive`` header, else :data:`UNHINTED_IDLE`): a request written as
the backend closes gets no answer, and a POST cannot be retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
from typing import NamedTuple, Protocol

import httptools

__all__ = ["BackendConnection", "BackendKey", "BackendPool", "ResponseSink", "is_close_delimited"]

MAX_RESPONSE_HEAD = 65536
"""Bytes a backend's response head may take before the response counts as invalid (502)."""

BackendKey = tuple[str, int, bytes, str]
"""(address, port, PROXY header sent first or b"", TLS server name or "" for plain HTTP)."""

_FRAMING = re.compile(rb"\r\n(?:content-length|transfer-encoding)[ \t]*:", re.IGNORECASE)
_TRANSFER_CODINGS = re.compile(rb"\r\ntransfer-encoding[ \t]*:([^\r\n]*)", re.IGNORECASE)
_KEEP_ALIVE = re.compile(rb"\r\nkeep-alive[ \t]*:([^\r\n]*)", re.IGNORECASE)
_KEEP_ALIVE_PARAM = re.compile(rb"\b(timeout|max)[ \t]*=[ \t]*\"?([0-9]{1,9})", re.IGNORECASE)
_LENGTH = re.compile(rb"\r\ncontent-length[ \t]*:[ \t]*([0-9]{1,15})[ \t]*\r\n", re.IGNORECASE)
_CLOSE = re.compile(rb"\r\nconnection[ \t]*:[^\r\n]*\bclose\b", re.IGNORECASE)
_HOP = re.compile(rb"\r\n(?:connection|keep-alive|proxy-connection)[ \t]*:[^\r\n]*",
                  re.IGNORECASE)
_CONN_NAMES = re.compile(
    rb"\r\nconnection[ \t]*:(?![ \t]*(?:keep-alive|close|upgrade)[ \t]*\r)", re.IGNORECASE)
"""A Connection header naming more than keep-alive/close/upgrade: other headers to remove."""
_KEPT_TOKENS = frozenset({b"close", b"keep-alive", b"upgrade", b""})
_FIELD_VALUE = rb"[\t\x20-\x7e\x80-\xff]*+"
_STRICT_HEAD = re.compile(
    rb"HTTP/1\.[01] [0-9]{3}(?: " + _FIELD_VALUE + rb")?\r\n"
    rb"(?:[!#$%&'*+\-.^_`|~0-9A-Za-z]++:" + _FIELD_VALUE + rb"\r\n)*+(?:\r\n)?")
"""A response head as RFC 9112 writes it: every line ends in CRLF, field names are tokens,
values and the reason phrase hold no control byte but HTAB (no NUL, bare CR or LF, obs-fold).
A client splits such a head into the same lines as the proxy; one that is not may be split
differently (a bare LF hiding ``Transfer-Encoding`` next to the Content-Length the proxy
counts). Possessive quantifiers: one pass, no backtracking (~1.7 µs for a 230-byte head)."""
_STRICT_VALUE = re.compile(_FIELD_VALUE)

KEEP_ALIVE_MARGIN = 1.0
"""Seconds before a backend's announced keep-alive timeout when its connection stops being
reused (at most half that timeout): the backend's clock starts when it has written the
response, ours when we read its end, and the next request must reach it before it closes."""
UNHINTED_IDLE = 1.5
"""Seconds a connection whose backend announced no keep-alive timeout may idle before reuse.
Apache (``KeepAliveTimeout`` 5 s), Node (5 s) and Tomcat announce theirs; of the common
servers that do not, gunicorn closes first (2 s; uvicorn and hypercorn 5 s, nginx 75 s). A
longer idle risks a 502 on a request that cannot be retried (POST); a shorter one costs only
a new connection to a backend that is idle anyway."""


class KeepAlive(NamedTuple):
    """A backend's ``Keep-Alive: timeout=N, max=M`` response header (RFC 2068 §19.7.1.1)."""

    timeout: float
    """Seconds the backend keeps the connection open while idle; -1: not announced."""
    max: int
    """Requests it will still take on the connection (Apache counts down to 0); -1: not
    announced."""


NO_KEEP_ALIVE_HINT = KeepAlive(-1.0, -1)


def keep_alive_hint(head: bytes) -> KeepAlive:
    """What a response head's ``Keep-Alive`` headers announce (the smallest of each value)."""
    values = _KEEP_ALIVE.findall(head)
    if not values:
        return NO_KEEP_ALIVE_HINT
    timeout, requests = -1, -1
    for name, digits in _KEEP_ALIVE_PARAM.findall(b",".join(values)):
        value = int(digits)
        if name.lower() == b"timeout":
            timeout = value if timeout < 0 else min(timeout, value)
        else:
            requests = value if requests < 0 else min(requests, value)
    return KeepAlive(float(timeout), requests)


class HeadFacts(NamedTuple):
    """What :func:`examine_head` finds in a final response head (made once per distinct head:
    a connection reuses its last one while the backend sends the same head)."""

    head: bytes
    """The head as received."""
    length: int
    """Its simple body length (see :func:`examine_head`), or -1: llhttp frames the body."""
    close: bool
    """It says ``Connection: close``."""
    status: int
    stripped: bytes
    """The head without hop-by-hop headers: what the client is sent."""


_new_facts = tuple.__new__
"""``_new_facts(HeadFacts, (...))``: HeadFacts for the cost of a tuple (once per response)."""


def examine_head(head: bytes, status: int) -> HeadFacts:
    """Everything the proxy needs from a final response head, examined in one place (each
    backend connection remembers the last result: identical heads are examined once).

    *Simple length*: the body length of an HTTP/1.1 response framed by exactly one plain
    ``Content-Length`` (no ``Transfer-Encoding``, a status that has a body), else -1 and llhttp
    frames it. Most backend responses are such: counting their body bytes ourselves skips
    feeding every byte to llhttp and its callback (about 5 % of the CPU of a proxied 1 KiB
    request). Anything unusual (two framing headers, a malformed value, HTTP/1.0, 204/304)
    goes to llhttp.

    Only a strict head (:func:`is_strict_head`) gets a simple length: the proxy forwards
    what it counts, so the client must read the same lines.

    *Stripped head*: without ``Connection``, ``Keep-Alive``, ``Proxy-Connection`` and the
    headers ``Connection`` names (RFC 9110 §7.6.1); the status line is kept whatever it says.

    One C-level regex scan per question, ~3.5 µs for an nginx head. Measured and not taken:
    one alternation scan with a Python loop over its matches (4.8 µs), and substring
    searches on the head lower-cased once (3.4 µs).
    """
    length = -1
    if status not in (204, 304) and head.startswith(b"HTTP/1.1 "):
        match = _LENGTH.search(head)
        if (match is not None and len(_FRAMING.findall(head)) == 1
                and _STRICT_HEAD.fullmatch(head) is not None):
            length = int(match.group(1))
    stripped, hop_headers = _HOP.subn(b"", head)
    if not hop_headers:
        return HeadFacts(head, length, False, status, head)
    close = _CLOSE.search(head) is not None
    if _CONN_NAMES.search(head) is not None:
        named: set[bytes] = set()
        for match in _HOP.finditer(head):
            name, _, value = match.group()[2:].partition(b":")
            if name.strip().lower() == b"connection":
                named.update(token.strip().lower() for token in value.split(b","))
        named -= _KEPT_TOKENS
        if named:
            lines = stripped.split(b"\r\n")
            stripped = b"\r\n".join(line for i, line in enumerate(lines)
                                    if i == 0 or line.partition(b":")[0].strip().lower() not in named)
    return HeadFacts(head, length, close, status, stripped)


TEMPLATE_TRIES = 4
"""Heads in a row that may miss a connection's :class:`HeadTemplate` before it stops making one."""
_DATE_VALUE = re.compile(rb"\r\ndate[ \t]*:[ \t]*([^\r\n]*?)[ \t]*\r\n", re.IGNORECASE)


class HeadTemplate:
    """A backend's next response head is usually its last one with another ``Date`` and
    another ``Content-Length``: this recognises exactly that case and derives the head's
    facts from the last :func:`examine_head` in ~1 µs instead of ~3.5.

    The last head is kept as the bytes around those two values (``pre`` | date | ``mid`` |
    digits | ``post``). A new head matches only if it is those same bytes around a date of
    the same length of field-value bytes (no CR, LF, NUL), and 1-15 ASCII digits. It then has the same header
    lines in the same order, so the same framing (one plain Content-Length), the same
    ``Connection`` verdict and the same hop-by-hop lines, each inside one of the three parts
    (a value never spans a line break). Anything else is examined in full. A head whose
    ``Connection`` names other headers to drop gets no template (one of those could be
    ``Date``)."""

    __slots__ = ("close", "date_at", "date_len", "last_date", "last_prefix", "last_raw", "mid",
                 "post", "pre", "status", "stripped")

    def __init__(self, pre: bytes, date_len: int, mid: bytes, post: bytes, close: bool,
                 status: int, stripped: tuple[bytes, bytes, bytes]) -> None:
        self.pre = pre
        self.date_at = len(pre)
        self.date_len = date_len
        self.mid = mid
        self.post = post
        self.close = close
        self.status = status
        self.stripped = stripped
        self.last_date: bytes | None = None
        """The last date value :meth:`match` checked (heads within one second share it)."""
        self.last_prefix = b""
        """The stripped head up to the length digits for :attr:`last_date`."""
        self.last_raw = b"\xff"
        """The head as received up to the length digits for :attr:`last_date` (no head starts
        with the initial value)."""

    @classmethod
    def of(cls, facts: HeadFacts) -> HeadTemplate | None:
        """The template of an examined head, or None if it is not of the usual kind."""
        head, length, close, status, _ = facts
        if length < 0 or _CONN_NAMES.search(head) is not None:
            return None
        value = _LENGTH.search(head)
        if value is None:
            return None
        length_at, length_end = value.span(1)
        date = _DATE_VALUE.search(head, 0, length_at)  # a Date line before Content-Length
        if date is not None and len(_DATE_VALUE.findall(head)) == 1:
            date_at, date_end = date.span(1)
        else:
            date_at = date_end = length_at  # no Date to vary: only the length may
        pre, mid, post = head[:date_at], head[date_end:length_at], head[length_end:]
        return cls(pre, date_end - date_at, mid, post, close, status,
                   (_HOP.sub(b"", pre), _HOP.sub(b"", mid), _HOP.sub(b"", post)))

    def match(self, head: bytes) -> HeadFacts | None:
        """The facts of ``head`` if it is this template's head with another date and length."""
        post = self.post
        raw = self.last_raw
        if head.startswith(raw) and head.endswith(post):
            # The last matched head's bytes up to its length (the same second): only the
            # digits between the two parts are new.
            digits = head[len(raw):len(head) - len(post)]
            if 0 < len(digits) <= 15 and digits.isdigit():
                return _new_facts(HeadFacts, (head, int(digits), self.close, self.status,
                                              self.last_prefix + digits + self.stripped[2]))
        pre = self.pre
        if not head.startswith(pre) or not head.endswith(post):
            return None
        mid_at = self.date_at + self.date_len
        digits_at = mid_at + len(self.mid)
        digits = head[digits_at:len(head) - len(post)]
        if (not 0 < len(digits) <= 15 or not digits.isdigit()
                or head[mid_at:digits_at] != self.mid):
            return None
        date = head[self.date_at:mid_at]
        if date != self.last_date:
            if _STRICT_VALUE.fullmatch(date) is None:  # the rest of the head was strict
                return None
            spre, smid, _ = self.stripped
            self.last_date, self.last_prefix = date, spre + date + smid
            self.last_raw = head[:digits_at]
        return _new_facts(HeadFacts, (head, int(digits), self.close, self.status,
                                      self.last_prefix + digits + self.stripped[2]))


def is_strict_head(head: bytes) -> bool:
    """True if ``head`` (status line and header lines, blank line optional) is one every
    client reads as the proxy does; any other is refused (502), never forwarded."""
    return _STRICT_HEAD.fullmatch(head) is not None


def is_close_delimited(head: bytes, status: int) -> bool:
    """True if a response with this head (to a non-HEAD request) ends when the connection
    closes (RFC 9112 §6.3): a status that has a body, and either a ``Transfer-Encoding``
    whose last coding is not ``chunked`` (llhttp then reads to EOF too) or no framing header
    at all."""
    if status < 200 or status in (204, 304):
        return False
    codings: list[bytes] = _TRANSFER_CODINGS.findall(head)
    if codings:
        return codings[-1].rpartition(b",")[2].strip().lower() != b"chunked"
    return _FRAMING.search(head) is None


class ResponseSink(Protocol):
    """Receives one response from a :class:`BackendConnection` (the client connection, or a
    background cache refresh). Methods return nothing and must not raise."""

    def response_info(self, raw: bytes) -> None:
        """A complete 1xx head (not 101), blank line included."""

    def response_start(self, conn: BackendConnection, status: int, head: bytes, rest: bytes) -> None:
        """The final head: status line and header lines each ending in CRLF, *without* the
        blank line and without hop-by-hop headers (:func:`examine_head`; framing headers are
        kept); ``rest`` is what followed in the same read (body bytes). The sink may
        call ``conn.abort()`` to drop the response (no further calls then)."""

    def response_body(self, data: bytes) -> None:
        """More raw body bytes (chunked framing and trailers included, as sent)."""

    def response_end(self, conn: BackendConnection, reusable: bool) -> None:
        """The response is complete; the sink releases or closes ``conn``."""

    def response_failed(self, conn: BackendConnection, kind: str) -> None:
        """No (complete) response: ``kind`` is "reset" (closed before any byte), "timeout",
        "invalid" (not HTTP) or "truncated" (closed mid-response). ``conn`` is closed."""

    def response_upgrade(self, conn: BackendConnection, head: bytes, rest: bytes) -> None:
        """101 Switching Protocols: ``conn`` left the pool; the sink owns its transport."""

    def backend_paused(self) -> None:
        """The backend's write buffer is full: stop reading the request body."""

    def backend_resumed(self) -> None: ...


class BackendConnection(asyncio.Protocol):
    """One keep-alive connection to a backend; serves one request at a time."""

    __slots__ = ("_buf", "_checking", "_head", "_head_done", "_held_end", "_last_framing", "_loop",
                 "_misfits", "_parser", "_remaining", "_template", "_timer", "close_delimited",
                 "closed", "head_request",
                 "idle_limit", "idle_since", "idle_until", "key", "last_io", "max_uses", "pool",
                 "responded", "sink", "status", "transport", "uses")

    def __init__(self, pool: BackendPool, key: BackendKey) -> None:
        self.pool = pool
        self.key = key
        self._loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self.sink: ResponseSink | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._buf = b""
        self._head = b""
        self._head_done = False
        self._checking = False
        """llhttp is reading a response head before it is forwarded (see data_received)."""
        self._held_end: bool | None = None
        """The response ended with its head while _checking: its keep-alive verdict, to be
        reported once the head is forwarded."""
        self._remaining = -1
        """Body bytes still to come of a Content-Length response we frame ourselves; -1 while
        llhttp frames the response (chunked, close-delimited, unusual heads)."""
        self._timer: asyncio.TimerHandle | None = None
        self.closed = False
        self.close_delimited = False
        self.head_request = False
        self.responded = False
        self.idle_since = 0.0
        self.last_io = 0.0
        self.status = 0
        self.uses = 0
        self.idle_limit = pool.idle_limit(NO_KEEP_ALIVE_HINT)
        """Seconds this connection may idle in the pool (its backend's last Keep-Alive)."""
        self.max_uses = 1 << 62
        """Requests after which it is not reused (its backend's Keep-Alive ``max``)."""
        self.idle_until = 0.0
        self._template: HeadTemplate | None = None
        self._misfits = 0
        """Heads in a row that did not fit the template (templates stop after TEMPLATE_TRIES)."""
        self._last_framing = HeadFacts(b"", -1, False, 0, b"")
        """:func:`examine_head` of this connection's last final response head: identical
        heads (same Date second) are examined once; the next response with that head skips the
        status line checks too."""

    # -- use -----------------------------------------------------------------------------

    def send(self, sink: ResponseSink, data: bytes, *, head_request: bool) -> None:
        """Write a request (head and whatever body is ready) and route its response to ``sink``."""
        self.sink = sink
        self.head_request = head_request
        self.responded = False
        self._head_done = False
        self._remaining = -1
        self._buf = b""
        self.uses += 1
        self.last_io = self._loop.time()
        if self._timer is None:
            self._timer = self._loop.call_at(self.last_io + self.pool.response_timeout, self._check)
        assert self.transport is not None
        # A response whose last bytes filled a slow client's buffer ended with reading paused
        # (Exchange.pause_response) and nobody left to resume it: this response must be read.
        self.transport.resume_reading()
        self.transport.write(data)

    def write(self, data: bytes) -> None:
        """More request body bytes."""
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def abort(self) -> None:
        """Drop the connection now (a response we do not want the rest of)."""
        self.sink = None
        self.closed = True
        self._cancel_timer()
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        self.sink = None
        self.closed = True
        self._cancel_timer()
        if self.transport is not None:
            self.transport.close()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check(self) -> None:
        self._timer = None
        sink = self.sink
        if sink is None or self.closed:
            return
        due = self.last_io + self.pool.response_timeout
        if self._loop.time() < due:
            self._timer = self._loop.call_at(due, self._check)
            return
        self.abort()
        sink.response_failed(self, "timeout")

    # -- asyncio callbacks --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        sink = self.sink
        if sink is None:  # bytes while idle: the backend is confused; never reuse it
            self.abort()
            self.pool.discard(self)
            return
        self.last_io = self._loop.time()
        if self._head_done:
            remaining = self._remaining
            if remaining < 0:
                sink.response_body(data)
                if self.sink is not None:
                    self._feed(data)
                return
            remaining -= len(data)
            if remaining > 0:
                self._remaining = remaining
                sink.response_body(data)
                return
            self._remaining = -1
            if remaining < 0:
                # More bytes than the response's length: never forwarded, never reused.
                sink.response_body(data[:remaining])
                if self.sink is not None:
                    self._message_done(False)
                return
            sink.response_body(data)
            if self.sink is not None:
                self._message_done(not self._last_framing.close)
            return
        buf = self._buf + data if self._buf else data
        end = buf.find(b"\r\n\r\n")
        framing = self._last_framing
        head = buf[:end + 2] if end >= 0 else b""
        template = self._template
        if head and not self.head_request and (
                head == framing.head or (template is not None and self._matched(template, head))):
            # The same head as this connection's previous response, or that head with another
            # date and length (a fleet's answers: the body names the site), whose status
            # line was checked then: only those checks are skipped.
            framing = self._last_framing
            status = framing.status
            self.responded = True
        else:
            status = self._read_status(sink, buf, end)
            if status < 0:
                return
            buf = self._buf
            end = buf.find(b"\r\n\r\n")
            head = buf[:end + 2]
        self._buf = b""
        self._head_done = True
        self.status = status
        self._head = head
        rest = buf[end + 4:]
        if status == 101:
            self.sink = None
            self._cancel_timer()
            self.pool.discard(self)
            sink.response_upgrade(self, head, rest)
            return
        if head != framing.head:
            facts = self._examine(head, status)
            if facts is None:
                self._fail("invalid")
                return
            framing = self._last_framing = facts
        length = -1 if self.head_request else framing.length
        extra = False
        if length >= 0:
            remaining = length - len(rest)
            if remaining < 0:  # more bytes than the response's length: dropped, no reuse
                rest = rest[:length]
                extra = True
                remaining = 0
        elif not self.head_request:
            # llhttp frames this response: it reads the head before anything reaches the
            # client, so a head it refuses (ambiguous or invalid framing) becomes a 502
            # instead of a forwarded head followed by a cut connection.
            self._held_end = None
            self._checking = True
            try:
                self._parser.feed_data(buf[:end + 4])
            except httptools.HttpParserError:
                self._fail("invalid")
                return
            finally:
                self._checking = False
            if self._held_end is not None and rest:
                # The response ended with its head: what follows is not part of it and is
                # never forwarded; the connection is not reused.
                rest = b""
                self._held_end = False
        sink.response_start(self, status, framing.stripped, rest)
        if self.sink is None:
            return
        if length >= 0:
            if remaining > 0:
                self._remaining = remaining
            else:
                self._message_done(not extra and not self._last_framing.close)
            return
        if self.head_request:
            # A response to HEAD has no body whatever its headers say; llhttp cannot be told
            # that, so the head never reaches this parser and the next response gets a new one.
            self._parser = httptools.HttpResponseParser(self)
            self._message_done(not rest and not framing.close)
            return
        held = self._held_end
        if held is not None:  # no body (204, 304, Content-Length: 0 that llhttp framed, ...)
            self._held_end = None
            self._message_done(held)
            return
        if rest:
            try:
                self._parser.feed_data(rest)
            except httptools.HttpParserError:
                self._fail("truncated")

    def _matched(self, template: HeadTemplate, head: bytes) -> bool:
        """True if ``head`` fits this connection's template (then its facts are the last)."""
        facts = template.match(head)  # its status line is part of the template: a final one
        if facts is None:
            return False
        self._misfits = 0
        self._last_framing = facts
        return True

    def _examine(self, head: bytes, status: int) -> HeadFacts | None:
        """:func:`examine_head`, through this connection's :class:`HeadTemplate` when it fits;
        None for a head that is not strict (:func:`is_strict_head`)."""
        template = self._template
        if template is not None:
            facts = template.match(head)  # its status line is part of the template
            if facts is not None:
                self._misfits = 0
                return facts
            self._misfits += 1
        facts = examine_head(head, status)
        # Keep-Alive is read with the rest of a new head: a head that matches the last one or
        # its template has the same Keep-Alive line.
        hint = keep_alive_hint(head)
        self.idle_limit = self.pool.idle_limit(hint)
        if hint.max >= 0:
            self.max_uses = self.uses + hint.max
        # A simple length was only given to a strict head; any other is checked here, as
        # llhttp lets some through (controls in the reason phrase) and never sees a response
        # to HEAD.
        if facts.length < 0 and not is_strict_head(head):
            return None
        # A backend whose heads differ in more than Date and Content-Length (ETag, cookies)
        # would pay for a template per response: stop trying after a few misfits in a row.
        self._template = HeadTemplate.of(facts) if self._misfits < TEMPLATE_TRIES else None
        return facts

    def _read_status(self, sink: ResponseSink, buf: bytes, end: int) -> int:
        """Check the status line of the response in ``buf`` (``end``: where its head ends, or
        -1) and pass 1xx heads (not 101) on. Returns the final status with ``self._buf`` set to
        the bytes from that response's head on, or -1 when there is nothing more to do now
        (head incomplete, refused, or the sink went away)."""
        while True:
            if end < 0:
                if len(buf) > MAX_RESPONSE_HEAD:
                    self._fail("invalid")
                else:
                    self._buf = buf
                return -1
            if not buf.startswith(b"HTTP/1.") or buf[12:13] not in (b" ", b"\r"):
                self._fail("invalid")
                return -1
            try:
                status = int(buf[9:12])
            except ValueError:
                self._fail("invalid")
                return -1
            self.responded = True
            if 100 <= status < 200 and status != 101:
                informational = buf[:end + 4]
                buf = buf[end + 4:]
                sink.response_info(informational)
                self._feed(informational)
                if self.sink is None:
                    return -1
                if not buf:
                    self._buf = b""
                    return -1
                end = buf.find(b"\r\n\r\n")
                continue
            self._buf = buf
            return status

    def _feed(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            self._fail("invalid" if not self._head_done else "truncated")

    def on_message_complete(self) -> None:
        """llhttp callback: the response (or a 1xx before it) ended."""
        if self._head_done:
            # _message_done() inlined: this runs once per proxied request.
            sink = self.sink
            if sink is None:
                return
            if self._checking:
                self._held_end = self._parser.should_keep_alive()
                return
            self.sink = None
            self._head_done = False
            sink.response_end(self, self._parser.should_keep_alive())

    def _message_done(self, reusable: bool) -> None:
        sink = self.sink
        if sink is None:
            return
        self.sink = None
        self._head_done = False
        self._remaining = -1
        # The response timer stays armed: it finds no sink and lapses, and the next send()
        # re-arms it only then; no timer is created or cancelled per request.
        sink.response_end(self, reusable)

    def _fail(self, kind: str) -> None:
        sink = self.sink
        self.abort()
        self.pool.discard(self)
        if sink is not None:
            sink.response_failed(self, kind)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._cancel_timer()
        self.pool.discard(self)
        sink = self.sink
        if sink is None:
            return
        self.sink = None
        if self._head_done:
            # A close-delimited response ends at EOF; a reset (a backend that crashed with our
            # request bytes unread) is no end: the client must not take that body as whole.
            if (exc is None and not self.head_request
                    and is_close_delimited(self._head, self.status)):
                self.close_delimited = True
                sink.response_end(self, False)
            else:
                sink.response_failed(self, "truncated")
        elif self.responded or self._buf:
            sink.response_failed(self, "truncated" if self.responded else "invalid")
        else:
            sink.response_failed(self, "reset")

    def pause_writing(self) -> None:
        if self.sink is not None:
            self.sink.backend_paused()

    def resume_writing(self) -> None:
        if self.sink is not None:
            self.sink.backend_resumed()


SURPLUS_FACTOR = 16
"""Idle connections a key may hold for a moment, in multiples of the pool's ``size``."""
SURPLUS_GRACE = 1.0
"""Seconds an idle connection beyond the pool's ``size`` is kept for the next burst."""


class BackendPool:
    """Idle keep-alive connections per :data:`BackendKey`, and how new ones are made: up to
    ``size`` per key for ``idle_timeout``, and up to ``SURPLUS_FACTOR`` times that for
    ``SURPLUS_GRACE`` after a burst."""

    def __init__(self, *, size: int, idle_timeout: float, connect_timeout: float,
                 response_timeout: float, ca_file: str = "") -> None:
        self.loop = asyncio.get_running_loop()
        self.size = size
        self.idle_timeout = idle_timeout
        self.connect_timeout = connect_timeout
        self.response_timeout = response_timeout
        self._idle: dict[BackendKey, list[BackendConnection]] = {}
        self._sweeper: asyncio.TimerHandle | None = None
        self._trimmer: asyncio.TimerHandle | None = None
        """Armed while some key has more than ``size`` idle connections."""
        self._tls: ssl.SSLContext | None = None
        self.ca_file = ca_file
        self.connects = 0
        self.unhinted_idle = UNHINTED_IDLE
        """Seconds a connection whose backend announced no keep-alive timeout is reused."""

    def idle_limit(self, hint: KeepAlive) -> float:
        """Seconds a connection may idle before reuse after a response announcing ``hint``."""
        if hint.timeout < 0:
            return min(self.idle_timeout, self.unhinted_idle)
        return min(self.idle_timeout, hint.timeout - min(KEEP_ALIVE_MARGIN, hint.timeout / 2))

    def acquire_nowait(self, key: BackendKey) -> BackendConnection | None:
        """An idle connection for ``key`` (the most recently used), or ``None``. One past its
        idle limit is closed instead: its backend may be closing it as the request is sent.
        One the backend closed or half-closed is already closing (its EOF was read)."""
        idle = self._idle.get(key)
        if not idle:
            return None
        now = self.loop.time()
        while idle:
            conn = idle.pop()
            if conn.closed or conn.transport is None or conn.transport.is_closing():
                continue
            if now < conn.idle_until:
                return conn
            conn.close()
        return None

    async def connect(self, key: BackendKey) -> BackendConnection:
        """A new connection (PROXY header already written). Raises OSError or TimeoutError."""
        address, port, proxy_header, server_name = key
        context: ssl.SSLContext | None = None
        if server_name:
            if self._tls is None:
                # Certificates are always verified against the site's name (never "insecure").
                self._tls = ssl.create_default_context(cafile=self.ca_file or None)
            context = self._tls
        self.connects += 1
        if proxy_header and context is not None:
            # The PROXY header goes before the TLS ClientHello: connect plain, then start TLS.
            transport, conn = await asyncio.wait_for(self.loop.create_connection(
                lambda: BackendConnection(self, key), address, port), self.connect_timeout)
            transport.write(proxy_header)
            tls = await asyncio.wait_for(self.loop.start_tls(
                transport, conn, context, server_hostname=server_name), self.connect_timeout)
            assert tls is not None
            conn.transport = tls
            return conn
        transport, conn = await asyncio.wait_for(self.loop.create_connection(
            lambda: BackendConnection(self, key), address, port, ssl=context,
            server_hostname=server_name or None), self.connect_timeout)
        if proxy_header:
            transport.write(proxy_header)
        return conn

    def release(self, conn: BackendConnection) -> None:
        """Keep ``conn`` for reuse (or close it when the pool for its key is full)."""
        if conn.closed or conn.transport is None or conn.transport.is_closing():
            return
        if conn.idle_limit <= 0 or conn.uses >= conn.max_uses:
            conn.close()  # its backend's Keep-Alive allows no further request
            return
        idle = self._idle.get(conn.key)
        if idle is None:
            idle = self._idle[conn.key] = []
        if len(idle) >= self.size:
            # A burst of responses ending in one loop iteration (HTTP/2 streams, many clients)
            # leaves more idle connections than ``size`` for a moment, and the next burst wants
            # them back: closing them at once made every burst connect anew (half the CPU of a
            # proxied request at 500 streams in flight). The surplus waits ``SURPLUS_GRACE``.
            if len(idle) >= self.size * SURPLUS_FACTOR:
                conn.close()
                return
            if self._trimmer is None:
                self._trimmer = self.loop.call_later(SURPLUS_GRACE, self._trim)
        # The time of its response's last bytes is now, without another clock read.
        conn.idle_since = conn.last_io or self.loop.time()
        conn.idle_until = conn.idle_since + conn.idle_limit
        idle.append(conn)
        if self._sweeper is None:
            self._sweeper = self.loop.call_later(self.idle_timeout / 2 or 1.0, self._sweep)

    def _trim(self) -> None:
        """Close idle connections beyond ``size`` that waited ``SURPLUS_GRACE`` unused (the
        oldest first: the list's front, as reuse takes its end)."""
        self._trimmer = None
        cutoff = self.loop.time() - SURPLUS_GRACE
        for idle in self._idle.values():
            while len(idle) > self.size and idle[0].idle_since <= cutoff:
                idle.pop(0).close()
            if len(idle) > self.size and self._trimmer is None:
                self._trimmer = self.loop.call_later(SURPLUS_GRACE, self._trim)

    def discard(self, conn: BackendConnection) -> None:
        idle = self._idle.get(conn.key)
        if idle is not None:
            with contextlib.suppress(ValueError):
                idle.remove(conn)

    def idle_count(self) -> int:
        return sum(len(v) for v in self._idle.values())

    def _sweep(self) -> None:
        self._sweeper = None
        now = self.loop.time()
        for key, idle in list(self._idle.items()):
            keep = [c for c in idle if c.idle_until > now and not c.closed]
            for conn in idle:
                if conn not in keep:
                    conn.close()
            if keep:
                self._idle[key] = keep
            else:
                del self._idle[key]
        if self._idle:
            self._sweeper = self.loop.call_later(self.idle_timeout / 2 or 1.0, self._sweep)

    def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        if self._trimmer is not None:
            self._trimmer.cancel()
            self._trimmer = None
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()
