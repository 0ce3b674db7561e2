"""Per-site request filters for the HTTP proxy: sans-IO, pure, one call per request.

The site's ``filters`` JSON (validated on write by :func:`edge.directory.rules.validate_filters`)
is compiled once per site into :class:`CompiledFilters` (CIDRs as integers, regexes compiled,
auth areas sorted); the caller caches that next to the :class:`~edge.directory.model.Site`
and, when the rules have a ``rate_limit``, one :class:`~edge.limits.RateLimiter` per site
(:meth:`CompiledFilters.new_rate_limiter`). Then per request::

    head = RequestHead.from_pairs(method, target, header_pairs)
    decision = evaluate_filters(head, client_ip, compiled, scheme="https", site=site,
                                rate_limiter=limiter)
    if decision.kind is Kind.ALLOW: forward, adding decision.headers to the response
    else: answer decision.status with decision.headers (reason is for the log)

Order of evaluation (the first rule that refuses wins):

1. ``ip_deny``, then ``ip_allow`` (a non-empty allow list admits only those networks).
   IPv4-mapped IPv6 clients (``::ffff:192.0.2.1``) match IPv4 CIDRs. An unparseable client
   address is refused when any IP rule exists (fail closed).
2. ``maintenance``: 503 + ``Retry-After`` (after the IP rules, so blocked clients learn
   nothing about the site).
3. HTTPS redirect when ``site.https_redirect`` and ``scheme == "http"``: 301 for GET/HEAD,
   308 otherwise (keeps method and body). Host comes from the request's Host header (port
   dropped; invalid Host → the site's own name, or 400 for a wildcard site).
4. ``methods``: 405 + ``Allow``. HEAD is implied by GET (RFC 9110 §9.3.2). Methods are
   case-sensitive, as in HTTP.
5. Path: the target is normalised (:func:`normalise_path`: query dropped, raw and
   percent-encoded bytes both read as UTF-8 (:func:`target_text`), percent-decoding
   repeated until stable, ``\\`` read as ``/``, empty and dot segments removed). A path that
   decodes to a control character (NUL, CR, LF...) is refused with 400. ``path_deny``
   prefixes then match with ``str.startswith`` (case-sensitive; write prefixes decoded), and
   regexes with ``re.search``, both on the normalised path. Denied → 403.
6. ``user_agent_deny``: ``re.search`` on the User-Agent ("" when absent) → 403.
7. ``basic_auth``: the area with the longest prefix matching the normalised path; the
   ``Authorization: Basic`` credentials (UTF-8) are checked against the SHA-256 hex of the
   password with :func:`hmac.compare_digest` (an unknown user costs the same hash and
   comparison). Missing/wrong/malformed → 401 + ``WWW-Authenticate: Basic realm="..."``.
   On success ``decision.user`` names the user (for the access log); the Authorization
   header is left for the caller to forward or strip.
8. ``rate_limit`` last, so refused requests spend no tokens: a token bucket keyed by the
   client address (IPv4 address; IPv6 by its /64, since one host owns a whole /64) in the
   site's limiter → 429 + ``Retry-After`` (whole seconds, at least 1).

Over HTTPS with ``site.hsts`` every decision (refusals included) carries
``Strict-Transport-Security``; never over plain HTTP (RFC 6797 §7.2).

Headers: :class:`RequestHead` keeps the target as UTF-8 text (:func:`target_text`) and a
mapping of lowercase ``str`` names to ``str`` values (bytes decoded as Latin-1, repeated
headers joined with ``", "``, cookies with ``"; "``).
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import hmac
import ipaddress
import math
import re
import socket
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import unquote_to_bytes

from edge.directory.rules import validate_filters
from edge.limits import Clock, RateLimiter

__all__ = [
    "FILTER_HEADERS",
    "HSTS_VALUE",
    "MAINTENANCE_RETRY_AFTER",
    "AuthArea",
    "CompiledFilters",
    "Decision",
    "Kind",
    "RequestHead",
    "SiteFlags",
    "evaluate_after_ip",
    "evaluate_filters",
    "ip_refusal",
    "normalise_path",
    "rate_limit_key",
    "target_text",
]

FILTER_HEADERS = frozenset({"host", "user-agent", "authorization"})
"""The only headers :func:`evaluate_filters` reads (see :meth:`RequestHead.for_filters`)."""
HSTS_VALUE = "max-age=31536000"
"""No ``includeSubDomains``: on shared hosting the subdomains may belong to other tenants."""
MAINTENANCE_RETRY_AFTER = 300


class Kind(enum.Enum):
    ALLOW = "allow"
    DENY = "deny"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    RATE_LIMITED = "rate_limited"
    AUTH_REQUIRED = "auth_required"
    REDIRECT = "redirect"
    MAINTENANCE = "maintenance"


Headers = tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do with a request.

    ``status`` is the response status to send, or 0 for ALLOW (forward to the backend).
    ``headers`` go on the response (for ALLOW: added to the backend's response).
    ``reason`` is a short sentence for the log, never sent as is to the client.
    """

    kind: Kind
    status: int = 0
    reason: str = ""
    headers: Headers = ()
    user: str | None = None
    """The Basic-auth user that was accepted, if an auth area applied."""

    @property
    def allowed(self) -> bool:
        return self.kind is Kind.ALLOW


class SiteFlags(Protocol):
    """The part of :class:`edge.directory.model.Site` the filters read."""

    @property
    def hostname(self) -> str: ...
    @property
    def https_redirect(self) -> bool: ...
    @property
    def hsts(self) -> bool: ...


@dataclass(frozen=True, slots=True)
class RequestHead:
    """Method, raw request-target and headers of one request.

    ``path`` is the request-target as received (origin-form ``/a/b?q``; absolute-form and
    ``*`` are tolerated), as text: from bytes through :func:`target_text`. ``headers`` maps
    lowercase names to values; build it with :meth:`from_pairs` from h11/httptools-style
    ``(name, value)`` pairs.
    """

    method: str
    path: str
    headers: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_pairs(cls, method: str | bytes, target: str | bytes,
                   pairs: Iterable[tuple[str | bytes, str | bytes]]) -> RequestHead:
        headers: dict[str, str] = {}
        for raw_name, raw_value in pairs:
            name = (raw_name.decode("latin-1") if isinstance(raw_name, bytes) else raw_name).lower()
            value = raw_value.decode("latin-1") if isinstance(raw_value, bytes) else raw_value
            if name in headers:
                headers[name] += ("; " if name == "cookie" else ", ") + value
            else:
                headers[name] = value
        return cls(method.decode("latin-1") if isinstance(method, bytes) else method,
                   target_text(target) if isinstance(target, bytes) else target, headers)

    @classmethod
    def for_filters(cls, method: bytes, target: bytes, host: bytes | None, user_agent: bytes | None,
                    authorization: bytes | None) -> RequestHead:
        """A head holding only :data:`FILTER_HEADERS` (values as received, repeats already
        joined): what :func:`evaluate_filters` needs, without decoding every header."""
        headers: dict[str, str] = {}
        if host is not None:
            headers["host"] = host.decode("latin-1")
        if user_agent is not None:
            headers["user-agent"] = user_agent.decode("latin-1")
        if authorization is not None:
            headers["authorization"] = authorization.decode("latin-1")
        return cls(method.decode("latin-1"), target_text(target), headers)

    @property
    def host(self) -> str:
        return self.headers.get("host", "")

    @property
    def user_agent(self) -> str:
        return self.headers.get("user-agent", "")

    @property
    def authorization(self) -> str | None:
        return self.headers.get("authorization")

    @property
    def cookie(self) -> str:
        return self.headers.get("cookie", "")


# -- path normalisation --------------------------------------------------------------------

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_MAX_DECODE_ROUNDS = 4


def _strip_target(target: str) -> str:
    """The path part of a request-target (no query, no fragment, no scheme://authority)."""
    path = target.partition("?")[0]
    if "#" in path:
        path = path.partition("#")[0]
    if path.startswith("/"):
        return path
    low = path[:8].lower()
    if low.startswith(("http://", "https://")):
        slash = path.find("/", path.index("//") + 2)
        return path[slash:] if slash >= 0 else "/"
    return "/" + path


def target_text(target: bytes) -> str:
    """A request-target's bytes as the text the path rules match: UTF-8, each undecodable
    byte (invalid or overlong sequence) as a surrogate escape (0xFF -> U+DCFF).

    Percent-decoding produces the same form, so a raw ``é`` and ``%C3%A9`` are one path, as
    in nginx (which compares bytes); an invalid sequence stays distinct from every valid
    character, so it neither matches a rule written for one nor hides one (lossless)."""
    return target.decode("utf-8", "surrogateescape")


def _text_bytes(text: str) -> bytes:
    # surrogateescape first: an undecodable byte (U+DCFF) must become that byte again, not
    # the UTF-8 of the surrogate, or "%FF" would normalise differently depending on how
    # many decode rounds the rest of the path needs.
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate a str caller passed
        return text.encode("utf-8", "surrogatepass")


def _decode_once(path: str) -> str:
    return unquote_to_bytes(_text_bytes(path)).decode("utf-8", "surrogateescape")


def normalise_path(target: str) -> str | None:
    """The decoded, normalised path of ``target`` for matching; None if it is unacceptable.

    ``target`` is text as :func:`target_text` makes it from the bytes received (a Latin-1
    reading would make a raw ``é`` differ from ``%C3%A9``). Drops query and fragment,
    percent-decodes until stable (so double encoding cannot hide a dot segment either;
    undecodable UTF-8 bytes become surrogate escapes), reads ``\\`` as ``/``, merges repeated
    slashes and removes ``.`` and ``..`` segments (never above the root). None when the
    decoded path holds a control character such as NUL.
    A trailing slash (or a trailing dot segment) is kept as a trailing slash.
    """
    path = _strip_target(target)
    if ("%" not in path and "\\" not in path and "//" not in path and "/." not in path
            and _CONTROL.search(path) is None):
        return path
    for _ in range(_MAX_DECODE_ROUNDS):
        if "%" not in path:
            break
        decoded = _decode_once(path)
        if decoded == path:
            break
        path = decoded
    if _CONTROL.search(path) is not None:
        return None
    segments = path.replace("\\", "/").split("/")
    out: list[str] = []
    for seg in segments:
        if seg == "" or seg == ".":
            continue
        if seg == "..":
            if out:
                out.pop()
            continue
        out.append(seg)
    if not out:
        return "/"
    trailing = segments[-1] in ("", ".", "..")
    return "/" + "/".join(out) + ("/" if trailing else "")


# -- IP addresses ---------------------------------------------------------------------------

_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")
_IPNet = ipaddress.IPv4Network | ipaddress.IPv6Network
Networks = tuple[tuple[int, int], ...]  # (network int, mask int)


def _parse_ip(client_ip: str) -> tuple[int, int] | None:
    """(4 or 6, address as int) with IPv4-mapped IPv6 as IPv4; None if not an address.

    ``socket.inet_pton`` rather than :mod:`ipaddress`: ten times faster per request.
    Brackets and an IPv6 zone (``%eth0``) are ignored.
    """
    text = client_ip
    try:
        if ":" not in text:
            return 4, int.from_bytes(socket.inet_pton(socket.AF_INET, text), "big")
        if text.startswith("[") and text.endswith("]"):
            text = text[1:-1]
        text = text.partition("%")[0]
        value = int.from_bytes(socket.inet_pton(socket.AF_INET6, text), "big")
    except (OSError, ValueError):  # ValueError: embedded NUL
        return None
    if value >> 32 == 0xFFFF:
        return 4, value & 0xFFFFFFFF
    return 6, value


def _unmap(net: _IPNet) -> _IPNet:
    if isinstance(net, ipaddress.IPv6Network) and net.subnet_of(_MAPPED):
        v4 = ipaddress.IPv4Address(int(net.network_address) & 0xFFFFFFFF)
        return ipaddress.IPv4Network(f"{v4}/{net.prefixlen - 96}")
    return net


def _compile_networks(cidrs: Iterable[str]) -> tuple[Networks, Networks]:
    v4: list[tuple[int, int]] = []
    v6: list[tuple[int, int]] = []
    for cidr in cidrs:
        net = _unmap(ipaddress.ip_network(cidr, strict=False))
        (v4 if net.version == 4 else v6).append((int(net.network_address), int(net.netmask)))
    return tuple(v4), tuple(v6)


def _in_networks(value: int, nets: Networks) -> bool:
    return any(value & mask == network for network, mask in nets)


IP_VERDICTS_MAX = 65536
"""Client addresses whose IP-rule outcome a compiled rule set remembers."""
_IP_PASS, _IP_UNPARSEABLE, _IP_DENIED, _IP_NOT_ALLOWED = range(4)


def _ip_verdict(compiled: CompiledFilters, client_ip: str) -> int:
    """The IP rules' outcome for ``client_ip`` (memoised per compiled rule set)."""
    memo = compiled.ip_verdicts
    verdict = memo.get(client_ip)
    if verdict is not None:
        return verdict
    parsed = _parse_ip(client_ip)
    if parsed is None:
        verdict = _IP_UNPARSEABLE
    else:
        version, value = parsed
        if version == 4:
            deny, allow = compiled.deny_v4, compiled.allow_v4
        else:
            deny, allow = compiled.deny_v6, compiled.allow_v6
        if deny and _in_networks(value, deny):
            verdict = _IP_DENIED
        elif compiled.has_allow_list and not (allow and _in_networks(value, allow)):
            verdict = _IP_NOT_ALLOWED
        else:
            verdict = _IP_PASS
    if len(memo) >= IP_VERDICTS_MAX:
        memo.clear()
    memo[client_ip] = verdict
    return verdict


def rate_limit_key(client_ip: str) -> str:
    """The rate-limit bucket of a client: its IPv4 address, or the /64 of an IPv6 address."""
    if ":" not in client_ip:
        return client_ip
    parsed = _parse_ip(client_ip)
    if parsed is None:
        return client_ip
    version, value = parsed
    if version == 4:
        return str(ipaddress.IPv4Address(value))
    return str(ipaddress.IPv6Address(value & ~((1 << 64) - 1))) + "/64"


# -- compiled rules -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AuthArea:
    prefix: str
    realm: str
    users: Mapping[str, str]
    challenge: Headers


def _quote_realm(realm: str) -> str:
    clean = _CONTROL.sub("", realm).replace("\\", "\\\\").replace('"', '\\"')
    return f'Basic realm="{clean}", charset="UTF-8"'


@dataclass(frozen=True, slots=True)
class CompiledFilters:
    """A site's filters ready for :func:`evaluate_filters`; build once per site and cache."""

    allow_v4: Networks = ()
    allow_v6: Networks = ()
    deny_v4: Networks = ()
    deny_v6: Networks = ()
    has_ip_rules: bool = False
    has_allow_list: bool = False
    maintenance: bool = False
    methods: frozenset[str] | None = None
    allow_header: str = ""
    deny_prefixes: tuple[str, ...] = ()
    deny_regexes: tuple[re.Pattern[str], ...] = ()
    ua_deny: tuple[re.Pattern[str], ...] = ()
    auth_areas: tuple[AuthArea, ...] = ()
    """Longest prefix first."""
    rate_limit: tuple[float, int] | None = None
    """(requests per second, burst)."""
    ip_verdicts: dict[str, int] = field(default_factory=dict, compare=False, repr=False)
    """Client address → outcome of the IP rules (:func:`_ip_verdict`), memoised: a client
    sends many requests, and parsing its address and matching the networks each time cost
    as much as all other filters together. Bounded (cleared when full)."""

    @classmethod
    def from_rules(cls, rules: str | dict[str, Any] | None) -> CompiledFilters:
        """Compile a site's ``filters``; validates again (idempotent on canonical rules),
        so a bad document raises :class:`edge.errors.ValidationError` here, not per request."""
        data = validate_filters(rules)
        allow_v4, allow_v6 = _compile_networks(data.get("ip_allow", ()))
        deny_v4, deny_v6 = _compile_networks(data.get("ip_deny", ()))
        methods: frozenset[str] | None = None
        allow_header = ""
        if "methods" in data:
            listed = list(dict.fromkeys(data["methods"]))
            if "GET" in listed and "HEAD" not in listed:
                listed.insert(listed.index("GET") + 1, "HEAD")
            methods = frozenset(listed)
            allow_header = ", ".join(listed)
        prefixes = tuple(r["prefix"] for r in data.get("path_deny", ()) if "prefix" in r)
        regexes = tuple(re.compile(r["regex"]) for r in data.get("path_deny", ()) if "regex" in r)
        ua = tuple(re.compile(p) for p in data.get("user_agent_deny", ()))
        areas = sorted(
            (AuthArea(a["prefix"], a["realm"], dict(a["users"]),
                      (("WWW-Authenticate", _quote_realm(a["realm"])),))
             for a in data.get("basic_auth", ())),
            key=lambda a: len(a.prefix), reverse=True)
        rl = data.get("rate_limit")
        return cls(
            allow_v4=allow_v4, allow_v6=allow_v6, deny_v4=deny_v4, deny_v6=deny_v6,
            has_ip_rules=bool(allow_v4 or allow_v6 or deny_v4 or deny_v6),
            has_allow_list=bool(allow_v4 or allow_v6),
            maintenance=bool(data.get("maintenance", False)),
            methods=methods, allow_header=allow_header,
            deny_prefixes=prefixes, deny_regexes=regexes, ua_deny=ua,
            auth_areas=tuple(areas),
            rate_limit=(float(rl["requests_per_second"]), int(rl["burst"])) if rl else None,
        )

    def new_rate_limiter(self, *, clock: Clock = time.monotonic,
                         max_keys: int = 100_000) -> RateLimiter | None:
        """A fresh per-site limiter for these rules, or None when they have no rate limit."""
        if self.rate_limit is None:
            return None
        rps, burst = self.rate_limit
        return RateLimiter(rps, burst, max_keys, clock=clock)


# -- evaluation -----------------------------------------------------------------------------

_HOST = re.compile(r"(?:[a-z0-9_-]{1,63}\.)*[a-z0-9_-]{1,63}\.?|\[[0-9a-f:.]+\]")
_PORT = re.compile(r":[0-9]{1,5}$")
_UNSAFE_IN_LOCATION = re.compile(r"[^\x21-\x7e]")
_HSTS: Headers = (("Strict-Transport-Security", HSTS_VALUE),)
_ALLOW_PLAIN = Decision(Kind.ALLOW)
_ALLOW_HSTS = Decision(Kind.ALLOW, headers=_HSTS)
_DUMMY_DIGEST = "0" * 64


def _redirect_host(head: RequestHead, site: SiteFlags) -> str | None:
    host = head.headers.get("host", "").strip().lower()
    host = _PORT.sub("", host)
    if host and _HOST.fullmatch(host):
        return host.rstrip(".")
    fallback = site.hostname.lower()
    if fallback and "*" not in fallback:
        return fallback
    return None


def _location_path(target: str) -> str:
    if not target.startswith("/"):
        low = target[:8].lower()
        if low.startswith(("http://", "https://")):
            slash = target.find("/", target.index("//") + 2)
            target = target[slash:] if slash >= 0 else "/"
        else:
            target = "/"
    if _UNSAFE_IN_LOCATION.search(target) is None:
        return target
    return _UNSAFE_IN_LOCATION.sub(
        lambda m: "".join(f"%{b:02X}" for b in _text_bytes(m.group())), target)


def _basic_user(authorization: str | None, area: AuthArea) -> str | None:
    """The user if ``authorization`` holds valid Basic credentials for ``area``."""
    if not authorization:
        return None
    scheme, _, param = authorization.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        text = base64.b64decode(param.strip(), validate=True).decode("utf-8")
    except (binascii.Error, ValueError):  # bad base64, non-ASCII input, bad UTF-8
        return None
    user, sep, password = text.partition(":")
    if not sep:
        return None
    expected = area.users.get(user)
    digest = hashlib.sha256(password.encode("utf-8", "surrogatepass")).hexdigest()
    ok = hmac.compare_digest(digest, expected if expected is not None else _DUMMY_DIGEST)
    return user if ok and expected is not None else None


def _refuse(kind: Kind, status: int, reason: str, headers: Headers, hsts: Headers) -> Decision:
    return Decision(kind, status, reason, headers + hsts if hsts else headers)


def evaluate_filters(
    head: RequestHead,
    client_ip: str,
    compiled: CompiledFilters,
    *,
    scheme: str,
    site: SiteFlags,
    rate_limiter: RateLimiter | None = None,
    maintenance_retry_after: int = MAINTENANCE_RETRY_AFTER,
) -> Decision:
    """Apply ``compiled`` to one request; see the module docstring for the order.

    ``rate_limiter`` is the site's limiter (``compiled.new_rate_limiter()``); without one the
    rate limit is not applied. Never raises on any method, path, header or address text.
    """
    # 1. IP deny / allow.
    if compiled.has_ip_rules:
        refused = ip_refusal(client_ip, compiled, scheme=scheme, site=site)
        if refused is not None:
            return refused
    return evaluate_after_ip(head, client_ip, compiled, scheme=scheme, site=site,
                             rate_limiter=rate_limiter,
                             maintenance_retry_after=maintenance_retry_after)


def ip_refusal(client_ip: str, compiled: CompiledFilters, *, scheme: str,
               site: SiteFlags) -> Decision | None:
    """Step 1 of :func:`evaluate_filters` alone: the refusal the IP rules give ``client_ip``,
    or None when they let it through (or there are none)."""
    if not compiled.has_ip_rules:
        return None
    verdict = _ip_verdict(compiled, client_ip)
    if verdict == _IP_PASS:
        return None
    hsts = _HSTS if site.hsts and scheme == "https" else ()
    if verdict == _IP_UNPARSEABLE:
        return _refuse(Kind.DENY, 403, f"unparseable client address {client_ip[:64]!r}", (), hsts)
    if verdict == _IP_DENIED:
        return _refuse(Kind.DENY, 403, f"client {client_ip} in ip_deny", (), hsts)
    return _refuse(Kind.DENY, 403, f"client {client_ip} not in ip_allow", (), hsts)


def evaluate_after_ip(
    head: RequestHead,
    client_ip: str,
    compiled: CompiledFilters,
    *,
    scheme: str,
    site: SiteFlags,
    rate_limiter: RateLimiter | None = None,
    maintenance_retry_after: int = MAINTENANCE_RETRY_AFTER,
) -> Decision:
    """Steps 2-8 of :func:`evaluate_filters` (everything after the IP rules).

    Without ``rate_limiter`` the outcome does not depend on ``client_ip`` and is a pure
    function of the scheme, the method, the target and the Host, User-Agent and
    Authorization headers, so a caller may remember it per such request shape."""
    hsts = _HSTS if site.hsts and scheme == "https" else ()

    # 2. Maintenance.
    if compiled.maintenance:
        return _refuse(Kind.MAINTENANCE, 503, "site in maintenance",
                       (("Retry-After", str(maintenance_retry_after)),), hsts)

    method = head.method
    # 3. HTTPS redirect.
    if site.https_redirect and scheme == "http":
        host = _redirect_host(head, site)
        if host is None:
            return Decision(Kind.DENY, 400, "missing or invalid Host for the HTTPS redirect")
        status = 301 if method in ("GET", "HEAD") else 308
        return Decision(Kind.REDIRECT, status, "https_redirect",
                        (("Location", f"https://{host}{_location_path(head.path)}"),))

    # 4. Methods.
    if compiled.methods is not None and method not in compiled.methods:
        return _refuse(Kind.METHOD_NOT_ALLOWED, 405, f"method {method[:32]!r} not allowed",
                       (("Allow", compiled.allow_header),), hsts)

    # 5. Path.
    path = normalise_path(head.path)
    if path is None:
        return _refuse(Kind.DENY, 400, "control character in path", (), hsts)
    if compiled.deny_prefixes and path.startswith(compiled.deny_prefixes):
        return _refuse(Kind.DENY, 403, "path_deny prefix", (), hsts)
    for pattern in compiled.deny_regexes:
        if pattern.search(path) is not None:
            return _refuse(Kind.DENY, 403, f"path_deny regex {pattern.pattern!r}", (), hsts)

    # 6. User agent.
    if compiled.ua_deny:
        agent = head.headers.get("user-agent", "")
        for pattern in compiled.ua_deny:
            if pattern.search(agent) is not None:
                return _refuse(Kind.DENY, 403, f"user_agent_deny {pattern.pattern!r}", (), hsts)

    # 7. Basic auth: the longest matching prefix decides.
    user: str | None = None
    for area in compiled.auth_areas:
        if path.startswith(area.prefix):
            user = _basic_user(head.headers.get("authorization"), area)
            if user is None:
                return _refuse(Kind.AUTH_REQUIRED, 401, f"basic auth for realm {area.realm!r}",
                               area.challenge, hsts)
            break

    # 8. Rate limit, last.
    if rate_limiter is not None:
        key = rate_limit_key(client_ip)
        if not rate_limiter.allow(key):
            wait = max(1, math.ceil(rate_limiter.retry_after(key)))
            return _refuse(Kind.RATE_LIMITED, 429, "rate limited",
                           (("Retry-After", str(wait)),), hsts)

    if user is not None:
        return Decision(Kind.ALLOW, headers=hsts, user=user)
    return _ALLOW_HSTS if hsts else _ALLOW_PLAIN
