"""The proxy's own responses (errors, redirects, refusals): small, branded, never leaking internals.

Every page is built from a status, the configured brand and fixed text: no backend name,
address, exception or request data ever appears in one. Bodies are cached per (status, brand).
"""

from __future__ import annotations

import html
import time
from email.utils import formatdate
from functools import lru_cache
from typing import NamedTuple

__all__ = ["REASONS", "Page", "http_date", "page", "response"]

REASONS: dict[int, tuple[str, str]] = {
    301: ("Moved Permanently", "This page has moved."),
    308: ("Permanent Redirect", "This page has moved."),
    400: ("Bad Request", "The request could not be understood."),
    401: ("Unauthorized", "This area needs a user name and password."),
    403: ("Forbidden", "Access to this page is not allowed."),
    404: ("Not Found", "No site is served under this name here."),
    405: ("Method Not Allowed", "This method is not allowed here."),
    408: ("Request Timeout", "The request took too long to arrive."),
    413: ("Content Too Large", "The request body is larger than allowed."),
    417: ("Expectation Failed", "This Expect value is not supported."),
    421: ("Misdirected Request", "This name is not served on this connection."),
    429: ("Too Many Requests", "Too many requests; please slow down."),
    431: ("Request Header Fields Too Large", "The request headers are too large."),
    501: ("Not Implemented", "This request is not supported."),
    502: ("Bad Gateway", "The web server for this site is not reachable right now."),
    503: ("Service Unavailable", "This site is in maintenance; please try again later."),
    504: ("Gateway Timeout", "The web server for this site took too long to answer."),
    505: ("HTTP Version Not Supported", "Only HTTP/1.0 and HTTP/1.1 are served here."),
}

_date_cache: list[object] = [0, b""]


def http_date() -> bytes:
    """The current time as an IMF-fixdate (``Date`` header value), recomputed once a second."""
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache[0] = now
        _date_cache[1] = formatdate(now, usegmt=True).encode("ascii")
    value = _date_cache[1]
    assert isinstance(value, bytes)
    return value


@lru_cache(maxsize=128)
def _body(status: int, brand: str, text: str) -> bytes:
    reason, default_text = REASONS.get(status, ("Error", "The request could not be served."))
    title = f"{status} {reason}"
    t, m, b = html.escape(title), html.escape(text or default_text), html.escape(brand)
    return (
        f"<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{t}</title></head>"
        f"<body style=\"font-family:sans-serif;margin:3em\"><h1>{t}</h1><p>{m}</p>"
        f"<hr><p><small>{b}</small></p></body></html>\n"
    ).encode()


def response(status: int, brand: str, *, headers: tuple[tuple[str, str], ...] = (),
             close: bool = False, head_only: bool = False, text: str = "",
             keep_alive_header: bool = False) -> bytes:
    """A whole HTTP/1.1 response (head and, unless ``head_only``, body) as one bytes write.

    ``headers`` are added as given (values must not hold CR/LF: the callers pass fixed text
    or values built by :mod:`httpproxy.rules`); ``close`` adds ``Connection: close``;
    ``keep_alive_header`` adds ``Connection: keep-alive`` (HTTP/1.0 clients).
    """
    reason = REASONS.get(status, ("Error", ""))[0]
    body = _body(status, brand, text)
    lines = [f"HTTP/1.1 {status} {reason}\r\n".encode("ascii"),
             b"Date: " + http_date() + b"\r\n",
             b"Content-Type: text/html; charset=utf-8\r\n",
             b"Content-Length: %d\r\n" % len(body),
             b"Cache-Control: no-store\r\n"]
    for name, value in headers:
        lines.append(f"{name}: {value}\r\n".encode("latin-1", "replace"))
    if close:
        lines.append(b"Connection: close\r\n")
    elif keep_alive_header:
        lines.append(b"Connection: keep-alive\r\n")
    lines.append(b"\r\n")
    if not head_only:
        lines.append(body)
    return b"".join(lines)


class Page(NamedTuple):
    """One of our pages in parts, for a front end to frame: ``head`` is the status line and
    header lines (each ending in CRLF, no blank line, no ``Connection``), ``body`` the HTML."""

    head: bytes
    body: bytes


def page(status: int, brand: str, *, headers: tuple[tuple[str, str], ...] = (),
         text: str = "") -> Page:
    """The page :func:`response` would send, as a :class:`Page` (head lines and body apart)."""
    whole = response(status, brand, headers=headers, head_only=True, text=text)
    return Page(whole[:-2], _body(status, brand, text))
