"""ACME HTTP-01 (RFC 8555 §8.3), answered by the edge itself on every worker (docs/tls.md).

``GET /.well-known/acme-challenge/TOKEN`` on the HTTP listener is answered with the key
authorization the issuer (:mod:`edge.acme`) published in the directory, looked up through the
cached lookup path (``Directory.challenge``), before redirects, filters and routing: a site
whose rules redirect or deny everything can still prove control.

Only the edge's own answers are taken out of the request path: a token the directory holds
*for the Host asked for*. Every other request under the prefix (a token of a customer who runs
certbot on the backend for a site without ``--auto-cert``, a static file, a token published
for another host) is an ordinary request: routed by its Host through redirects and filters to
that site's backend, or refused like any request for an unknown site, so the prefix is no
route to anywhere the Host does not already lead.

The exchange calls :func:`answer_http01` (one line in ``Exchange.start``); this module sees
the exchange only through :class:`ChallengeRequest`, so it imports nothing of the request
path (no import cycle, tests/test_http_imports.py).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, Protocol

from edge.directory.cache import Miss
from edge.directory.model import AcmeChallenge
from edge.directory.names import hostname_or_none
from edge.errors import DirectoryUnavailable
from httpproxy import pages

if TYPE_CHECKING:
    from edge.directory.directory import Directory

__all__ = ["PREFIX", "ChallengeRequest", "answer_http01"]

log = logging.getLogger("edge.acme.challenges")

PREFIX = b"/.well-known/acme-challenge/"
_TOKEN_RE = re.compile(rb"[A-Za-z0-9_-]{1,200}")


class ChallengeServices(Protocol):
    directory: Directory

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None: ...


class ChallengeRequest(Protocol):
    """What HTTP-01 needs of a request (:class:`httpproxy.exchange.Exchange` is one)."""

    method: bytes
    target: bytes
    host_raw: bytes | None

    @property
    def services(self) -> ChallengeServices: ...

    def refuse_status(self, status: int, reason: str,
                      headers: tuple[tuple[str, str], ...] = ()) -> None: ...

    def answer_local(self, status: int, head: bytes, body: bytes) -> None: ...

    def route_request(self) -> None:
        """Go on as an ordinary request (route by Host, filters, backend)."""


def answer_http01(exchange: ChallengeRequest) -> bool:
    """Answer ``exchange`` if it asks for an answer the edge published. Returns True when it
    took the request (answered now, or it goes on after a lookup), False when the request is
    an ordinary one."""
    if not exchange.target.startswith(PREFIX) or exchange.method not in (b"GET", b"HEAD"):
        return False
    token = exchange.target[len(PREFIX):]
    host = hostname_or_none(_host_only(exchange.host_raw or b""))
    if not _TOKEN_RE.fullmatch(token) or host is None:
        return False
    key = token.decode("ascii")
    directory = exchange.services.directory
    cached = directory.challenges.peek(key)
    if isinstance(cached, Miss):
        exchange.services.spawn(_answer_slow(exchange, key, host))
        return True
    return _reply(exchange, cached, host)


async def _answer_slow(exchange: ChallengeRequest, token: str, host: str) -> None:
    try:
        answer = await exchange.services.directory.challenge(token)
    except DirectoryUnavailable as exc:
        log.warning("ACME challenge lookup failed: %s", exc)
        exchange.refuse_status(503, "directory unavailable", (("Retry-After", "5"),))
        return
    if not _reply(exchange, answer, host):
        exchange.route_request()


def _reply(exchange: ChallengeRequest, answer: AcmeChallenge | None, host: str) -> bool:
    """Answer with the key authorization if ``answer`` is ours for ``host``; False: it is
    not (the request is an ordinary one)."""
    if answer is None or answer.hostname != host or answer.expires_at < time.time():
        return False
    body = answer.key_authorization.encode("ascii")
    head = (b"HTTP/1.1 200 OK\r\nDate: " + pages.http_date() +
            b"\r\nContent-Type: application/octet-stream\r\nContent-Length: %d\r\n"
            b"Cache-Control: no-store\r\n" % len(body))
    exchange.answer_local(200, head, body)
    return True


def _host_only(raw: bytes) -> str:
    """The name of a Host header value (port dropped); "" if it is not ASCII."""
    try:
        text = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        return ""
    if text.startswith("["):
        return ""  # an IP literal never has a challenge
    return text.rsplit(":", 1)[0] if text.count(":") == 1 else text
