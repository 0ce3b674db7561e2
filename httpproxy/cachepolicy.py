"""Per-site content-cache decisions: sans-IO, pure; the cache store itself lives elsewhere.

The site's ``cache_policy`` JSON (validated on write by
:func:`edge.directory.rules.validate_cache_policy`) is compiled once per site into
:class:`CachePolicy` (:meth:`CachePolicy.from_policy`) and cached by the caller. Per request::

    verdict = request_cacheability(method, target, headers, policy)
    BYPASS  -> forward, never look up, never store                        X-Cache: BYPASS
    REFRESH -> forward (client sent no-cache), store the answer if storable X-Cache: MISS
    LOOKUP  -> key = cache_key(host, target, headers.get("accept-encoding"), scheme=...)
               entry found: freshness(entry.stored_at, entry.ttl, entry.swr, entry.sie, now)
                 FRESH               -> serve it                            X-Cache: HIT
                 STALE_REVALIDATE    -> serve it, refresh in the background X-Cache: STALE
                 STALE_IF_ERROR_ONLY -> forward; on a connection error or a 5xx serve the
                                        entry (X-Cache: STALE), else as a miss (X-Cache: MISS)
                 EXPIRED             -> as a miss                           X-Cache: MISS
               miss: forward (single-flight per key), then response_storability(...) decides
                     whether to store; the client sees X-Cache: MISS either way.

HEAD requests look up the GET entry (same key) but a HEAD response has no body, so
``verdict.store_on_miss`` is False for HEAD: the caller does not store what it forwards.

Client ``Cache-Control: no-cache`` / ``max-age=0`` / ``Pragma: no-cache`` is honoured as
"revalidate at the origin": REFRESH (the caller validates what it holds with a conditional
request: a 304 serves it, a 200 replaces it). The
caller's single flight per key keeps a flood of such requests from multiplying origin load.
Client ``Cache-Control: no-store`` is BYPASS. A GET with Range is LOOKUP without
``store_on_miss``: a stored full response answers it (206, :mod:`httpproxy.cacheflow`), a
miss is forwarded as it is and its partial answer not stored.

Storability of a response (:func:`response_storability`): never with ``Set-Cookie``;
never with ``Cache-Control: no-store`` or ``private``; never with ``Vary: *``; ``no-cache``
only with a validator (ETag / Last-Modified), stored with TTL 0 (revalidated before every
use, RFC 9111 §4.3); other ``Vary`` fields make variants (:mod:`httpproxy.cache`); never partial
(206) or above ``max_object_bytes`` when Content-Length says so (otherwise the caller stops
storing once the body exceeds ``verdict.max_bytes``). TTL: ``s-maxage`` > ``max-age`` >
``Expires`` (relative to ``Date``, else ``now``; minus ``Age``) > the policy: the per-path
``ttl`` of the longest matching ``paths`` prefix replaces the per-status ``ttl`` for the
statuses the status table lists (a path rule does not make other statuses cacheable).
Explicit origin freshness applies to the statuses the status table lists and to the
RFC 9110 heuristically cacheable ones (200, 203, 204, 300, 301, 308, 404, 405, 410, 414,
501). A TTL of 0 (or less) is stored as 0 when the response has a validator, else not
stored. Stale windows: the response's ``stale-while-revalidate=`` /
``stale-if-error=`` extensions, else the policy's; ``must-revalidate`` /
``proxy-revalidate`` disable both.
"""

from __future__ import annotations

import enum
import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC
from email.utils import parsedate_to_datetime
from typing import Any

from edge.directory.rules import validate_cache_policy
from httpproxy.rules import normalise_path

__all__ = [
    "HEURISTIC_STATUSES",
    "WORDPRESS_BYPASS_COOKIES",
    "WORDPRESS_BYPASS_PATHS",
    "CachePolicy",
    "Freshness",
    "RequestAction",
    "RequestVerdict",
    "StoreVerdict",
    "XCache",
    "cache_key",
    "encoding_variant",
    "freshness",
    "request_cacheability",
    "response_storability",
]

WORDPRESS_BYPASS_PATHS = ("/wp-admin", "/wp-login.php", "/wp-cron.php", "/xmlrpc.php")
WORDPRESS_BYPASS_COOKIES = ("wordpress_logged_in_", "comment_author_", "wp-postpass_",
                            "woocommerce_items_in_cart", "wp_woocommerce_session_")
HEURISTIC_STATUSES = frozenset({200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501})


class XCache(enum.Enum):
    HIT = "HIT"
    MISS = "MISS"
    STALE = "STALE"
    BYPASS = "BYPASS"


class RequestAction(enum.Enum):
    BYPASS = "bypass"
    """Forward; no lookup, no store. X-Cache: BYPASS."""
    LOOKUP = "lookup"
    """Look up; on a miss forward and maybe store. X-Cache per :class:`Freshness`."""
    REFRESH = "refresh"
    """Client asked for revalidation: forward, maybe store (replacing). X-Cache: MISS."""


class Freshness(enum.Enum):
    FRESH = "fresh"
    STALE_REVALIDATE = "stale_revalidate"
    STALE_IF_ERROR_ONLY = "stale_if_error_only"
    EXPIRED = "expired"


@dataclass(frozen=True, slots=True)
class RequestVerdict:
    action: RequestAction
    reason: str = ""
    store_on_miss: bool = False
    """Whether the forwarded response may be stored (GET only; HEAD has no body)."""

    @property
    def x_cache(self) -> XCache:
        """X-Cache when the request is not answered from the cache."""
        return XCache.BYPASS if self.action is RequestAction.BYPASS else XCache.MISS


@dataclass(frozen=True, slots=True)
class StoreVerdict:
    store: bool
    reason: str = ""
    ttl: float = 0.0
    stale_while_revalidate: float = 0.0
    stale_if_error: float = 0.0
    max_bytes: int | None = None
    """Stop storing (keep streaming) when the body grows beyond this; None: no limit."""


@dataclass(frozen=True, slots=True)
class PathRule:
    prefix: str
    ttl: float | None
    bypass: bool


@dataclass(frozen=True, slots=True)
class CachePolicy:
    """A site's cache policy ready for the functions below; build once per site and cache."""

    mode: str = "off"
    ttl: Mapping[int, float] | None = None
    paths: tuple[PathRule, ...] = ()
    """Longest prefix first."""
    extensions: frozenset[str] = frozenset()
    bypass_paths: tuple[str, ...] = ()
    bypass_cookies: tuple[str, ...] = ()
    stale_while_revalidate: float = 0.0
    stale_if_error: float = 0.0
    max_object_bytes: int | None = None

    @classmethod
    def from_policy(cls, policy: str | dict[str, Any] | None) -> CachePolicy:
        """Compile a site's ``cache_policy`` (validated again: idempotent on canonical input)."""
        data = validate_cache_policy(policy)
        if not data:
            return cls()
        mode = data["mode"]
        cookies = tuple(data.get("bypass_cookies", ()))
        bypass_paths: tuple[str, ...] = ()
        if mode == "wordpress":
            cookies = WORDPRESS_BYPASS_COOKIES + cookies
            bypass_paths = WORDPRESS_BYPASS_PATHS
        paths = sorted((PathRule(p["prefix"], p.get("ttl"), bool(p.get("bypass", False)))
                        for p in data.get("paths", ())), key=lambda r: len(r.prefix), reverse=True)
        return cls(
            mode=mode,
            ttl={int(k): float(v) for k, v in data.get("ttl", {}).items()},
            paths=tuple(paths),
            extensions=frozenset(data.get("extensions", ()) if mode == "static" else ()),
            bypass_paths=bypass_paths,
            bypass_cookies=tuple(c for c in cookies if c),
            stale_while_revalidate=float(data.get("stale_while_revalidate", 0)),
            stale_if_error=float(data.get("stale_if_error", 0)),
            max_object_bytes=data.get("max_object_bytes"),
        )

    def path_rule(self, path: str) -> PathRule | None:
        """The rule of the longest ``paths`` prefix matching the normalised ``path``."""
        for rule in self.paths:
            if path.startswith(rule.prefix):
                return rule
        return None


# -- request side ---------------------------------------------------------------------------

_BYPASS_OFF = RequestVerdict(RequestAction.BYPASS, "cache off")
_LOOKUP_GET = RequestVerdict(RequestAction.LOOKUP, "", True)
_LOOKUP_HEAD = RequestVerdict(RequestAction.LOOKUP, "", False)
_LOOKUP_RANGE = RequestVerdict(RequestAction.LOOKUP, "range request", False)
_REFRESH_GET = RequestVerdict(RequestAction.REFRESH, "client no-cache", True)
_REFRESH_HEAD = RequestVerdict(RequestAction.REFRESH, "client no-cache", False)


def _bypass(reason: str) -> RequestVerdict:
    return RequestVerdict(RequestAction.BYPASS, reason)


def _directives(value: str) -> dict[str, str]:
    """Cache-Control as {lowercase directive: argument ("" when none)}; first one wins."""
    out: dict[str, str] = {}
    for part in value.split(","):
        name, _, arg = part.partition("=")
        name = name.strip().lower()
        if name and name not in out:
            out[name] = arg.strip().strip('"')
    return out


def _cookie_names(cookie: str) -> list[str]:
    return [part.split("=", 1)[0].strip() for part in cookie.split(";")]


def request_cacheability(method: str, path: str, headers: Mapping[str, str],
                         policy: CachePolicy) -> RequestVerdict:
    """May this request be answered from / stored in the cache? (See the module docstring.)

    ``path`` is the raw request-target; ``headers`` maps lowercase names to values
    (:attr:`httpproxy.rules.RequestHead.headers`). Checks, in order: mode off, method,
    Authorization, Range, client no-store, path rules, WordPress paths, bypass cookies,
    static extensions, then client no-cache (REFRESH).
    """
    if policy.mode == "off":
        return _BYPASS_OFF
    if method != "GET" and method != "HEAD":
        return _bypass("method not GET/HEAD")
    if "authorization" in headers:
        return _bypass("Authorization present")
    cc = headers.get("cache-control")
    directives = _directives(cc) if cc else {}
    if "no-store" in directives:
        return _bypass("client no-store")
    npath = normalise_path(path)
    if npath is None:
        return _bypass("invalid path")
    if policy.paths:
        rule = policy.path_rule(npath)
        if rule is not None and rule.bypass:
            return _bypass(f"path rule {rule.prefix}")
    if policy.bypass_paths and npath.startswith(policy.bypass_paths):
        return _bypass("wordpress admin path")
    if policy.bypass_cookies:
        cookie = headers.get("cookie")
        if cookie:
            for name in _cookie_names(cookie):
                if name.startswith(policy.bypass_cookies):
                    return _bypass(f"cookie {name[:64]}")
    if policy.mode == "static":
        last = npath.rsplit("/", 1)[-1]
        dot = last.rfind(".")
        if dot < 0 or last[dot + 1:].lower() not in policy.extensions:
            return _bypass("extension not cached in static mode")
    get = method == "GET"
    if get and "range" in headers:
        # Answered from a stored full response (httpproxy.cacheflow.range_answer); a miss is
        # forwarded with its Range and its partial answer is not stored.
        return _LOOKUP_RANGE
    if ("no-cache" in directives or directives.get("max-age") == "0"
            or "no-cache" in headers.get("pragma", "").lower()):
        return _REFRESH_GET if get else _REFRESH_HEAD
    return _LOOKUP_GET if get else _LOOKUP_HEAD


# -- response side --------------------------------------------------------------------------


def _seconds(value: str) -> float | None:
    value = value.strip()
    if not value.isascii() or not value.isdigit():
        return None
    return float(value)


def _http_date(value: str) -> float | None:
    try:
        parsed = parsedate_to_datetime(value)
        if parsed.tzinfo is None:  # "-0000": UTC, not local time
            parsed = parsed.replace(tzinfo=UTC)
        return parsed.timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def _no_store(reason: str) -> StoreVerdict:
    return StoreVerdict(False, reason)


def response_storability(status: int, headers: Mapping[str, str], policy: CachePolicy,
                         now: float, *, path: str = "/") -> StoreVerdict:
    """May this response be stored, and for how long? (See the module docstring.)

    ``headers`` maps lowercase names to values; ``now`` is Unix time; ``path`` is the
    request-target (for the per-path TTL override).
    """
    if policy.mode == "off":
        return _no_store("cache off")
    if status == 206:
        return _no_store("partial content")
    if "set-cookie" in headers:
        return _no_store("Set-Cookie")
    cc = headers.get("cache-control")
    directives = _directives(cc) if cc else {}
    for name in ("no-store", "private"):
        if name in directives:
            return _no_store(f"Cache-Control {name}")
    vary = headers.get("vary")
    if vary and any(item.strip() == "*" for item in vary.split(",")):
        return _no_store("Vary *")  # never matches a later request (RFC 9111 §4.1)
    # Responses that need revalidation on every use (no-cache, or no freshness left) are kept
    # when they have a validator: a 304 from the origin then serves them (RFC 9111 §4.3).
    validator = "etag" in headers or "last-modified" in headers
    if "no-cache" in directives and not validator:
        return _no_store("Cache-Control no-cache without a validator")
    max_bytes = policy.max_object_bytes
    length_text = headers.get("content-length")
    if length_text is not None:
        length = _seconds(length_text)
        if length is None:
            return _no_store("invalid Content-Length")
        if max_bytes is not None and length > max_bytes:
            return _no_store("larger than max_object_bytes")

    status_ttl = policy.ttl.get(status) if policy.ttl else None
    ttl: float | None = None
    explicit = False
    for name in ("s-maxage", "max-age"):
        if name in directives:
            ttl = _seconds(directives[name])
            if ttl is None:
                return _no_store(f"invalid {name}")
            explicit = True
            break
    if ttl is None and "expires" in headers:
        explicit = True
        expires = _http_date(headers["expires"])
        if expires is None:
            ttl = 0.0  # an invalid Expires means "already expired" (RFC 9111 §5.3)
        else:
            date = _http_date(headers["date"]) if "date" in headers else None
            ttl = expires - (date if date is not None else now)
    if "no-cache" in directives:
        explicit = True  # RFC 9111 §5.2.2.4: stored (validator checked above), never fresh
        ttl = 0.0
    if explicit:
        if status_ttl is None and status not in HEURISTIC_STATUSES:
            return _no_store(f"status {status} not cacheable")
        age = _seconds(headers.get("age", "")) or 0.0
        ttl = (ttl or 0.0) - age
    else:
        if status_ttl is None:
            return _no_store(f"status {status} has no ttl")
        ttl = status_ttl
        if policy.paths:
            npath = normalise_path(path)
            rule = policy.path_rule(npath) if npath is not None else None
            if rule is not None and rule.ttl is not None:
                ttl = rule.ttl
    if "no-cache" in directives:
        ttl = 0.0  # whatever max-age says: never used without a successful revalidation
    if ttl <= 0:
        if not validator:
            return _no_store("zero ttl")
        ttl = 0.0

    swr, sie = policy.stale_while_revalidate, policy.stale_if_error
    if ("must-revalidate" in directives or "proxy-revalidate" in directives
            or "no-cache" in directives):
        swr = sie = 0.0
    else:
        if "stale-while-revalidate" in directives:
            swr = _seconds(directives["stale-while-revalidate"]) or 0.0
        if "stale-if-error" in directives:
            sie = _seconds(directives["stale-if-error"]) or 0.0
    return StoreVerdict(True, "", ttl, swr, sie, max_bytes)


# -- keys and freshness ---------------------------------------------------------------------

_CODING = re.compile(r"\s*([A-Za-z0-9*_-]+)\s*(?:;\s*q\s*=\s*([0-9.]+))?\s*")


@functools.lru_cache(maxsize=512)
def encoding_variant(accept_encoding: str | None) -> str:
    """The single variant cached for this Accept-Encoding: ``br``, ``gzip`` or ``identity``.

    The caller forwards cache-eligible requests with ``Accept-Encoding`` set to this
    variant, so the stored body is exactly that coding (``Vary: Accept-Encoding``).
    """
    if not accept_encoding:
        return "identity"
    accepted: dict[str, float] = {}
    for part in accept_encoding.split(","):
        m = _CODING.fullmatch(part)
        if m is None:
            continue
        q = 1.0
        if m.group(2) is not None:
            try:
                q = float(m.group(2))
            except ValueError:
                continue
        accepted.setdefault(m.group(1).lower(), q)
    star = accepted.get("*", 0.0)
    for coding in ("br", "gzip"):
        if accepted.get(coding, star) > 0:
            return coding
    if accepted.get("x-gzip", 0.0) > 0:
        return "gzip"
    return "identity"


def cache_key(host: str, path: str, accept_encoding: str | None, *, scheme: str = "") -> bytes:
    """The cache key: scheme, lowercase host (no port, no trailing dot), the encoding
    variant, then the raw request-target (query included, not normalised: distinct URLs
    never share an entry). The fields before the path cannot hold NUL, so keys never
    collide across fields."""
    host = host.strip().lower()
    if not host.startswith("["):
        host = host.partition(":")[0]
    elif "]:" in host:
        host = host[: host.index("]:") + 1]
    host = host.rstrip(".").replace("\0", "")
    variant = encoding_variant(accept_encoding)
    scheme = scheme.lower().replace("\0", "")
    return f"{scheme}\0{host}\0{variant}\0{path}".encode("utf-8", "surrogatepass")


def freshness(entry_stored_at: float, ttl: float, swr: float, sie: float,
              now: float) -> Freshness:
    """Where a stored entry stands at ``now`` (all Unix seconds; a future store time is
    fresh). FRESH while age < ttl; STALE_REVALIDATE while age < ttl + swr;
    STALE_IF_ERROR_ONLY while age < ttl + sie; EXPIRED after."""
    age = now - entry_stored_at
    if age < ttl:
        return Freshness.FRESH
    if age < ttl + swr:
        return Freshness.STALE_REVALIDATE
    if age < ttl + sie:
        return Freshness.STALE_IF_ERROR_ONLY
    return Freshness.EXPIRED
