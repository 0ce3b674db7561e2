"""Host headers and absolute-form authorities: what the edge routes by and sends upstream.

Sans-IO. A Host value is ``host [":" port]`` (RFC 9110 §7.2); anything else (userinfo,
a path, spaces or control characters, a port that is not digits, an empty port) is a
syntax error the caller answers with 400. A valid value is normalised once, consistently
with :mod:`edge.directory.names` (lowercase, IDNA A-labels, no trailing dot; IP literals in
their canonical spelling), and only that normalised form reaches a backend (``Host``,
``X-Forwarded-Host``, ``Forwarded``): apps build absolute links from it.
"""

from __future__ import annotations

import ipaddress
import re
from typing import NamedTuple

from edge.directory.names import hostname_or_none

__all__ = ["Authority", "forwarded_value", "parse_authority", "parse_host"]

_REG_NAME = re.compile(rb"[A-Za-z0-9._\-\x80-\xff]+")
"""Bytes a host name may have: DNS letters, digits, dot, hyphen (underscore: syntax only,
it is never a site) and UTF-8 for internationalised names. No userinfo, path, space, quote."""
_PORT = re.compile(rb"[0-9]{1,5}")
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


class Authority(NamedTuple):
    """A syntactically valid Host value, normalised as far as that is cheap."""

    name: str
    """Lowercase, without trailing dot, IDNA A-labels; dotted IPv4 or ``[IPv6]`` canonical.
    Not yet checked to be a DNS hostname: a name that is not one is simply no site (the
    directory lookup normalises through :func:`edge.directory.names.hostname_or_none` on a
    cache miss only: the warm path stays one dict lookup)."""
    port: int | None
    ip: bool = False
    """An IP literal: never a site."""

    def value(self, name: str | None = None) -> str:
        """The Host header value a backend gets (``name``: the directory's spelling)."""
        host = name or self.name
        return host if self.port is None else f"{host}:{self.port}"


def parse_host(raw: bytes) -> Authority | None:
    """A Host header value (llhttp already trimmed its whitespace); None = 400."""
    if not raw:
        return Authority("", None)  # valid (RFC 9110 §7.2: a target without authority); no site
    colon = raw.rfind(b":")
    if raw.startswith(b"["):
        literal, bracket, rest = raw[1:].partition(b"]")
        if not bracket or b"%" in literal:  # a zone id ("%eth0") means nothing to us
            return None
        try:
            address = ipaddress.IPv6Address(literal.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            return None
        name, ip = f"[{address.compressed}]", True
    else:
        text, rest = (raw, b"") if colon < 0 else (raw[:colon], raw[colon:])
        if not _REG_NAME.fullmatch(text):
            return None
        name, ip = _name(text)
        if not name:  # "." or a name with no IDNA spelling
            return None
    port: int | None = None
    if rest:
        digits = rest[1:]
        if rest[:1] != b":" or not _PORT.fullmatch(digits) or int(digits) > 65535:
            return None
        port = int(digits)
    return Authority(name, port, ip)


def _name(text: bytes) -> tuple[str, bool]:
    """(spelling, is an IPv4 literal) of a syntactically valid name; "" if not even that."""
    if text.endswith(b"."):
        text = text[:-1]
    if not text.isascii():
        try:
            unicode = text.decode("utf-8")
        except UnicodeDecodeError:
            return "", False
        return hostname_or_none(unicode) or "", False  # no IDNA spelling: not a name
    name = text.decode("ascii").lower()
    if name.rpartition(".")[2].isdigit():
        try:
            return str(ipaddress.IPv4Address(name)), True
        except ValueError:
            return name, True
    return name, False


def parse_authority(target: bytes) -> tuple[Authority, bytes] | None:
    """An absolute-form request target's authority and origin-form path (RFC 9112 §3.2.2);
    None = 400 (not http/https, userinfo, bad authority)."""
    scheme, sep, rest = target.partition(b"://")
    if not sep or scheme.lower() not in (b"http", b"https"):
        return None
    end = len(rest)
    for delimiter in (b"/", b"?", b"#"):
        found = rest.find(delimiter)
        if 0 <= found < end:
            end = found
    authority, path = rest[:end], rest[end:]
    if b"@" in authority:  # userinfo: deprecated, and how links get disguised
        return None
    parsed = parse_host(authority)
    if parsed is None:
        return None
    if not path.startswith(b"/"):
        path = b"/" + path
    return parsed, path


def forwarded_value(node: bytes, host: bytes, proto: bytes) -> bytes:
    """An RFC 7239 ``Forwarded`` element from values the edge validated itself: the client
    address (``node``: an IP), the normalised Host and the scheme; each quoted as needed."""
    for_ = b'"[' + node + b']"' if b":" in node else _quoted(node)  # IPv6 (RFC 7239 §6)
    return b"for=%b;host=%b;proto=%b" % (for_, _quoted(host, always=True), _quoted(proto))


def _quoted(value: bytes, *, always: bool = False) -> bytes:
    """``value`` as an RFC 7239 value: a token as it is (unless ``always``), else a
    quoted-string."""
    if not always and _TOKEN.fullmatch(value):
        return value
    return b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
