"""Per-site content-cache decisions: sans-IO, pure; the cache store itself lives elsewhere.

The site's ``cache_policy`` JSON (validated on write by
:func:`edge.directory.rules.validate_cache_policy`) is compiled once per site into
:class:`CachePolicy` (:meth:`CachePolicy.from_policy`) and cached by the caller. Per request::

    verdict = request_cacheability(method, target, headers, policy)
    BYPASS  -> forward, never look up, never store                        X-Cache: BYPASS
    REFRESH -> forward (client no-cache, or Authorization), store if storable X-Cache: MISS
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
miss is forwarded as it is and its partial answer not stored. A request with
``Authorization`` is REFRESH: never answered from the cache without the origin's say (the
answer may be that user's), its response stored only as RFC 9111 §3.5 allows.

Storability of a response (:func:`response_storability`), RFC 9111 §3: the directives are
those of the first valid targeted field the site obeys (its ``target``, then
``CDN-Cache-Control``, RFC 9213), else ``Cache-Control``. Never stored: ``no-store``,
``private``; ``no-cache`` without a validator (ETag / Last-Modified; with one it is stored
with lifetime 0 and revalidated before every use, §4.3); ``must-understand`` with a status
we do not know; ``Set-Cookie`` unless the policy strips it (``set_cookie: "strip"``); a
request with ``Authorization`` unless ``public``/``s-maxage``/``must-revalidate`` (§3.5);
``Vary: *`` (other ``Vary`` fields make variants, :mod:`httpproxy.cache`); 206/304; above
``max_object_bytes`` when Content-Length says so (otherwise the caller stops storing once
the body exceeds ``verdict.max_bytes``).
Freshness lifetime (§4.2.1): ``s-maxage`` > ``max-age`` > ``Expires`` - ``Date`` (strict
HTTP-date, :func:`http_date`; invalid = expired) for any final status; without those, the
policy's per-status/per-path TTL (modes full/static/wordpress, counted from arrival) or, for
heuristically cacheable codes (or ``public``), a heuristic: ``heuristic_fraction`` of the
time since ``Last-Modified``, at most ``heuristic_max`` (§4.2.2). The verdict carries the
corrected initial age (§4.2.3, from ``Age`` and ``Date``) and ``stored_at = now - age``: the
store keeps that, so ``now - stored_at`` is the current age everywhere (the ``Age`` sent)
and an entry is fresh while it is below ``ttl``. Already stale on arrival: stored with
lifetime 0 when it has a validator (revalidated before use), else not stored. Stale
windows: the response's ``stale-while-revalidate=`` / ``stale-if-error=`` extensions, else
the policy's; ``must-revalidate`` / ``proxy-revalidate`` / ``no-cache`` disable both.

Stored heads drop ``policy.store_strip`` (the origin's ``Age``, our targeted fields,
``Set-Cookie`` when stripping); forwarded heads drop ``policy.forward_strip`` (our targeted
fields), both with :func:`strip_fields`. ``policy.result_headers`` are the prebuilt
``X-Cache`` / ``Cache-Status`` (RFC 9211) lines per result.
"""

from __future__ import annotations

import calendar
import dataclasses
import datetime
import enum
import functools
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

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
    "StoreTerms",
    "StoreVerdict",
    "XCache",
    "cache_key",
    "encoding_variant",
    "freshness",
    "request_cacheability",
    "response_storability",
    "store_terms",
    "verdict_at",
]

WORDPRESS_BYPASS_PATHS = ("/wp-admin", "/wp-login.php", "/wp-cron.php", "/xmlrpc.php")
WORDPRESS_BYPASS_COOKIES = ("wordpress_logged_in_", "comment_author_", "wp-postpass_",
                            "woocommerce_items_in_cart", "wp_woocommerce_session_")
HEURISTIC_STATUSES = frozenset({200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501})
UNDERSTOOD_STATUSES = frozenset(
    {200, 201, 202, 203, 204, 205, 300, 301, 302, 303, 307, 308}
    | set(range(400, 418)) | {421, 422, 426, 428, 429, 431, 451}
    | set(range(500, 506)) | {511})
"""Final status codes whose semantics we know (RFC 9110 §15, RFC 6585, RFC 7725): what a
``must-understand`` response may be stored with (206 and 304 are never stored)."""


DEFAULT_HEURISTIC_FRACTION = 0.1
"""Mode ``standard``: 10 % of the Last-Modified age (RFC 9111 §4.2.2's typical setting)."""

_CACHE_STATUS = {"HIT": b"hit", "STALE": b"hit; detail=stale", "MISS": b"fwd=uri-miss",
                 "BYPASS": b"fwd=bypass", "REVALIDATED": b"fwd=stale; fwd-status=304"}
"""RFC 9211 §2 parameters per X-Cache result: ``hit`` (no trip to the origin), else ``fwd=``
why it went forward; a stale entry served while refreshing is a hit flagged ``detail``."""


def _result_headers(x_cache: bool, cache_status: bool) -> dict[str | None, bytes]:
    """The response lines announcing each cache result: ``X-Cache`` and/or the RFC 9211
    ``Cache-Status`` (cache name ``edge``); built once per site policy."""
    out: dict[str | None, bytes] = {None: b""}
    for result, status in _CACHE_STATUS.items():
        line = b"X-Cache: %s\r\n" % result.encode() if x_cache else b""
        if cache_status:
            line += b"Cache-Status: edge; %s\r\n" % status
        out[result] = line
    return out


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


class StoreVerdict(NamedTuple):
    """A named tuple, not a frozen dataclass: built once per stored or revalidated response,
    and a frozen dataclass's ``__init__`` (one ``object.__setattr__`` per field) cost about
    2 µs of a revalidated hit."""

    store: bool
    reason: str = ""
    ttl: float = 0.0
    stale_while_revalidate: float = 0.0
    stale_if_error: float = 0.0
    max_bytes: int | None = None
    """Stop storing (keep streaming) when the body grows beyond this; None: no limit."""
    age: float = 0.0
    """The corrected initial age (RFC 9111 §4.2.3)."""
    stored_at: float = 0.0
    """``now - age``: the entry's ``stored_at``, so that ``now - stored_at`` is its current
    age and ``ttl`` its freshness lifetime (fresh while current age < ttl, §4.2)."""


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
    heuristic_fraction: float = 0.0
    """Heuristic freshness: this fraction of the Last-Modified age (0: none), RFC 9111 §4.2.2."""
    heuristic_max: float = 86400.0
    targets: tuple[str, ...] = ("cdn-cache-control",)
    """Targeted cache-control fields we obey (RFC 9213), highest priority first; lowercase."""
    strip_set_cookie: bool = False
    """``set_cookie: "strip"``: store responses with Set-Cookie, minus the Set-Cookie lines."""
    result_headers: Mapping[str | None, bytes] = dataclasses.field(
        default_factory=lambda: _result_headers(True, False))
    """The X-Cache / Cache-Status lines for each cache result ("HIT", "MISS", ...)."""
    forward_strip: frozenset[bytes] = frozenset({b"cdn-cache-control"})
    """Fields never forwarded to clients: the targeted fields that are ours (RFC 9213)."""
    store_strip: frozenset[bytes] = frozenset({b"cdn-cache-control", b"age"})
    """Fields dropped from a stored head (Age is recomputed on every serve, RFC 9111 §4.2.3)."""

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
        target = data.get("target")
        targets = ((target.lower(),) if target else ()) + ("cdn-cache-control",)
        strip_cookie = data.get("set_cookie") == "strip"
        forward_strip = frozenset(t.encode("ascii") for t in targets)
        store_strip = forward_strip | {b"age"} | ({b"set-cookie"} if strip_cookie else set())
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
            heuristic_fraction=float(data.get(
                "heuristic_fraction", DEFAULT_HEURISTIC_FRACTION if mode == "standard" else 0)),
            heuristic_max=float(data.get("heuristic_max", 86400)),
            targets=targets,
            strip_set_cookie=strip_cookie,
            # Cache-Status is on by default in mode standard; the older modes keep the exact
            # response bytes existing sites had (X-Cache only) unless a site asks for it.
            result_headers=_result_headers(data.get("x_cache", True),
                                           data.get("cache_status", mode == "standard")),
            forward_strip=forward_strip,
            store_strip=frozenset(store_strip),
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
_REFRESH_AUTH_GET = RequestVerdict(RequestAction.REFRESH, "Authorization present", True)
_REFRESH_AUTH_RANGE = RequestVerdict(RequestAction.REFRESH, "Authorization present", False)


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
    Range, client no-store, path rules, WordPress paths, bypass cookies, static extensions,
    then Authorization and client no-cache (both REFRESH).
    """
    if policy.mode == "off":
        return _BYPASS_OFF
    if method != "GET" and method != "HEAD":
        return _bypass("method not GET/HEAD")
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
    if "authorization" in headers:
        # Never answered from the cache without the origin (the answer may be this user's);
        # stored only when the response allows it (RFC 9111 §3.5,
        # response_storability(authorization=True)). With Range too: forwarded as it is (its
        # partial answer is not stored, so there is nothing to validate or collapse).
        if not get:
            return _REFRESH_HEAD
        return _REFRESH_AUTH_RANGE if "range" in headers else _REFRESH_AUTH_GET
    if get and "range" in headers:
        # Answered from a stored full response (httpproxy.cacheflow.range_answer); a miss is
        # forwarded with its Range and its partial answer is not stored.
        return _LOOKUP_RANGE
    if ("no-cache" in directives or directives.get("max-age") == "0"
            or "no-cache" in headers.get("pragma", "").lower()):
        return _REFRESH_GET if get else _REFRESH_HEAD
    return _LOOKUP_GET if get else _LOOKUP_HEAD


# -- response side --------------------------------------------------------------------------

DELTA_SECONDS_MAX = 2147483648
"""RFC 9111 §1.2.2: a delta-seconds value too large to represent is taken as 2^31."""

_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_LONG_DAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
_MONTHS = {m: i for i, m in enumerate(("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug",
                                       "sep", "oct", "nov", "dec"), 1)}
_TIME = r"(\d\d):(\d\d):(\d\d)"
_MON = "(" + "|".join(_MONTHS) + ")"
# RFC 9110 §5.6.7, matched case-insensitively as RFC 9111 §4.2 asks of caches; nothing else
# (no two-digit years in IMF-fixdate, no other zones, no dashes, no extra spaces).
_IMF_FIXDATE = re.compile(r"(?:" + "|".join(_DAYS) + r"), (\d\d) " + _MON + r" (\d{4}) "
                          + _TIME + " GMT", re.IGNORECASE | re.ASCII)
_RFC850_DATE = re.compile(r"(?:" + "|".join(_LONG_DAYS) + r"), (\d\d)-" + _MON + r"-(\d\d) "
                          + _TIME + " GMT", re.IGNORECASE | re.ASCII)
_ASCTIME_DATE = re.compile(r"(?:" + "|".join(_DAYS) + r") " + _MON + r" (\d\d| \d) " + _TIME
                           + r" (\d{4})", re.IGNORECASE | re.ASCII)


def http_date(value: str, now: float | None = None) -> float | None:
    """An HTTP-date (RFC 9110 §5.6.7) as Unix time, or None when it is not one.

    Accepts IMF-fixdate and the two obsolete forms recipients must read (rfc850-date,
    asctime-date), case-insensitively (RFC 9111 §4.2); refuses everything else Python's
    e-mail date parser would take (two-digit years outside rfc850-date, zones other than
    GMT, dashes, missing comma, extra spaces, one-digit hours, lists). An rfc850-date year
    that looks more than 50 years ahead of ``now`` is the same two digits in the past.
    """
    if len(value) > _LONGEST_DATE:
        return None
    matched, parsed = _fixed_form_date(value)
    if matched:
        return parsed
    m = _RFC850_DATE.fullmatch(value)
    if m is None:
        return None
    day, month, yy, hh, mm, ss = m.groups()
    current = time.gmtime(time.time() if now is None else now).tm_year
    year = current - current % 100 + int(yy)
    if year > current + 50:
        year -= 100
    return _date_value(str(year), month, day, hh, mm, ss)


_LONGEST_DATE = len("Wednesday, 09-Nov-94 08:49:37 GMT")
"""No valid HTTP-date is longer (no optional whitespace in the grammar)."""


@functools.lru_cache(maxsize=1024)
def _fixed_form_date(value: str) -> tuple[bool, float | None]:
    """IMF-fixdate or asctime-date, the forms that need no ``now``: (whether ``value`` has
    one of them, its Unix time or None when a field is out of range). Memoised: a cache
    reads the same Date / Last-Modified / Expires values again and again."""
    m = _IMF_FIXDATE.fullmatch(value)
    if m is not None:
        day, month, year, hh, mm, ss = m.groups()
    else:
        m = _ASCTIME_DATE.fullmatch(value)
        if m is None:
            return False, None
        month, day, hh, mm, ss, year = m.groups()
    return True, _date_value(year, month, day, hh, mm, ss)


def _date_value(year: str, month: str, day: str, hh: str, mm: str, ss: str) -> float | None:
    month_number = _MONTHS[month.lower()]
    hour, minute, second = int(hh), int(mm), int(ss)
    try:
        if hour > 23 or minute > 59 or second > 60:
            return None
        datetime.date(int(year), month_number, int(day))  # day exists in that month
    except ValueError:
        return None
    return float(calendar.timegm((int(year), month_number, int(day), hour, minute,
                                  min(second, 59), 0, 0, 0)))


def delta_seconds(value: str) -> int | None:
    """RFC 9111 §1.2.2 delta-seconds (1*DIGIT, capped at 2^31), or None when invalid."""
    if not value.isascii() or not value.isdigit():
        return None
    return min(int(value), DELTA_SECONDS_MAX)


def age_value(value: str | None) -> int:
    """The ``Age`` field as RFC 9111 §5.1 reads it: the first member of a list; a value that
    is not a non-negative integer is ignored (0, as if absent); too large is 2^31."""
    if not value:
        return 0
    parsed = delta_seconds(value.partition(",")[0].strip())
    return 0 if parsed is None else parsed


def corrected_initial_age(headers: Mapping[str, str], response_time: float,
                          request_time: float | None = None) -> float:
    """RFC 9111 §4.2.3 ``corrected_initial_age``: the larger of the apparent age (from
    ``Date``) and ``Age`` plus the response delay. The entry's current age is this plus its
    resident time, so storing it as ``stored_at = response_time - age`` makes
    ``now - stored_at`` the current age (what ``Age`` says on a serve)."""
    date_text = headers.get("date")
    date = http_date(date_text, response_time) if date_text else None
    apparent = max(0.0, response_time - date) if date is not None else 0.0
    delay = max(0.0, response_time - request_time) if request_time is not None else 0.0
    return max(apparent, age_value(headers.get("age")) + delay)


def _seconds(value: str) -> float | None:
    parsed = delta_seconds(value.strip())
    return None if parsed is None else float(parsed)


def _no_store(reason: str) -> StoreVerdict:
    return StoreVerdict(False, reason)


def _response_directives(headers: Mapping[str, str],
                         policy: CachePolicy) -> tuple[dict[str, str], bool]:
    """The directives that govern us, and whether they came from a targeted field: the
    first valid, non-empty targeted field the policy names (RFC 9213 §2.2: then
    ``Cache-Control`` and ``Expires`` are ignored), else ``Cache-Control``."""
    for name in policy.targets:
        value = headers.get(name)
        if value:
            parsed = targeted_directives(value)
            if parsed:
                return parsed, True
    cc = headers.get("cache-control")
    return (_directives(cc) if cc else {}), False


def _explicit_lifetime(directives: Mapping[str, str], headers: Mapping[str, str],
                       now: float, *, targeted: bool = False) -> float | str | None:
    """RFC 9111 §4.2.1 freshness lifetime: s-maxage, max-age, then Expires minus Date (an
    invalid or repeated Expires is already expired, §5.3; ignored under a targeted field,
    RFC 9213 §2.2). None: no explicit lifetime; a str: why the response cannot be stored."""
    for name in ("s-maxage", "max-age"):
        if name in directives:
            seconds = _seconds(directives[name])
            return f"invalid {name}" if seconds is None else seconds
    expires_text = headers.get("expires")
    if expires_text is None or targeted:
        return None
    expires = http_date(expires_text, now)
    if expires is None:
        return 0.0
    date_text = headers.get("date")
    date = http_date(date_text, now) if date_text else None
    return expires - (date if date is not None else now)


def _heuristic_lifetime(headers: Mapping[str, str], policy: CachePolicy, now: float) -> float:
    """RFC 9111 §4.2.2: a fraction of the time since Last-Modified, at most the policy's
    bound; 0 when the policy allows no heuristics or there is no valid Last-Modified."""
    if policy.heuristic_fraction <= 0:
        return 0.0
    modified_text = headers.get("last-modified")
    modified = http_date(modified_text, now) if modified_text else None
    if modified is None:
        return 0.0
    date_text = headers.get("date")
    date = http_date(date_text, now) if date_text else None
    since = (date if date is not None else now) - modified
    return min(max(since, 0.0) * policy.heuristic_fraction, policy.heuristic_max)


def response_storability(status: int, headers: Mapping[str, str], policy: CachePolicy,
                         now: float, *, path: str = "/", authorization: bool = False,
                         request_time: float | None = None) -> StoreVerdict:
    """May this response be stored, and for how long? (See the module docstring.)

    ``headers`` maps lowercase names to values (repeats joined with ", "); ``now`` is the
    Unix time the response arrived; ``path`` is the request-target (for the per-path TTL
    override); ``authorization``: the request carried ``Authorization`` (RFC 9111 §3.5);
    ``request_time``: when the request was sent (for the response delay, §4.2.3).
    Returns a :class:`StoreVerdict` whose ``ttl`` is the freshness lifetime and ``age`` the
    corrected initial age: store with ``stored_at = verdict.stored_at`` (``now - age``) and
    the head through ``strip_fields(head, policy.store_strip)``.
    """
    terms = store_terms(status, headers, policy, path=path, authorization=authorization)
    if isinstance(terms, StoreVerdict):
        return terms
    return verdict_at(terms, headers, policy, now, request_time)


class StoreTerms(NamedTuple):
    """What :func:`response_storability` decides from the fields alone, before the clock
    (the age and the lifetime need ``now``): the same fields, policy, path and
    Authorization give the same terms, so a response revalidated again and again by the
    same 304 computes them once (:attr:`httpproxy.cache.CacheEntry.revalidation`)."""

    status: int
    directives: Mapping[str, str]
    targeted: bool
    """``directives`` came from a targeted field (RFC 9213: Expires is then ignored)."""
    validator: bool
    max_bytes: int | None
    status_ttl: float | None
    """The operator's TTL for the status (path rule applied): used without explicit freshness."""
    heuristic: bool
    """Heuristic freshness allowed without explicit freshness (RFC 9111 §4.2.2)."""
    swr: float
    sie: float


def store_terms(status: int, headers: Mapping[str, str], policy: CachePolicy, *,
                path: str = "/", authorization: bool = False) -> StoreTerms | StoreVerdict:
    """The clock-free part of :func:`response_storability`: its terms, or a refusal."""
    if policy.mode == "off":
        return _no_store("cache off")
    if status == 206 or status == 304 or status < 200:
        return _no_store(f"status {status}")
    if "set-cookie" in headers and not policy.strip_set_cookie:
        return _no_store("Set-Cookie")
    directives, targeted = _response_directives(headers, policy)
    refusing: tuple[str, ...] = ("no-store", "private")
    if "must-understand" in directives:
        # RFC 9111 §5.2.2.3: store only a status code we understand, and then no-store
        # (there for caches that do not know must-understand) does not apply.
        if status not in UNDERSTOOD_STATUSES:
            return _no_store(f"must-understand with status {status}")
        refusing = ("private",)
    for name in refusing:
        if name in directives:
            return _no_store(f"Cache-Control {name}")
    if authorization and not ("public" in directives or "s-maxage" in directives
                              or "must-revalidate" in directives):
        return _no_store("Authorization without public, s-maxage or must-revalidate")
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

    # No explicit freshness: the operator's TTL for the status (full/static/wordpress
    # overrides), else a heuristic for the codes RFC 9110 §15.1 lets caches guess for.
    status_ttl = policy.ttl.get(status) if policy.ttl else None
    if status_ttl is not None and policy.paths:
        npath = normalise_path(path)
        rule = policy.path_rule(npath) if npath is not None else None
        if rule is not None and rule.ttl is not None:
            status_ttl = rule.ttl
    swr, sie = policy.stale_while_revalidate, policy.stale_if_error
    if "s-maxage" in directives:
        # RFC 9111 §5.2.2.10: s-maxage carries proxy-revalidate for shared caches, so our
        # own stale windows do not apply; the origin's explicit stale-* below still do
        # (RFC 5861 permissions, the usual "s-maxage=60, stale-while-revalidate=30").
        swr = sie = 0.0
    if ("must-revalidate" in directives or "proxy-revalidate" in directives
            or "no-cache" in directives):
        swr = sie = 0.0
    else:
        if "stale-while-revalidate" in directives:
            swr = _seconds(directives["stale-while-revalidate"]) or 0.0
        if "stale-if-error" in directives:
            sie = _seconds(directives["stale-if-error"]) or 0.0
    return StoreTerms(status, directives, targeted, validator, max_bytes, status_ttl,
                      status in HEURISTIC_STATUSES or "public" in directives, swr, sie)


def verdict_at(terms: StoreTerms, headers: Mapping[str, str], policy: CachePolicy, now: float,
               request_time: float | None = None) -> StoreVerdict:
    """The part of :func:`response_storability` that needs the clock: lifetime and age."""
    directives = terms.directives
    lifetime = _explicit_lifetime(directives, headers, now, targeted=terms.targeted)
    if isinstance(lifetime, str):
        return _no_store(lifetime)
    age = corrected_initial_age(headers, now, request_time)
    if lifetime is None:
        if terms.status_ttl is not None:
            # The operator's TTL counts from arrival here, whatever Age or a skewed Date say
            # (the Age sent on hits still tells the truth).
            lifetime = terms.status_ttl + age
        elif terms.heuristic:
            lifetime = _heuristic_lifetime(headers, policy, now)
            if lifetime <= 0 and "no-cache" not in directives:
                return _no_store("no freshness information")
        else:
            return _no_store(f"status {terms.status} has no explicit freshness")
    if "no-cache" in directives:
        lifetime = 0.0  # RFC 9111 §5.2.2.4: stored (validator checked above), never fresh
    if lifetime - age <= 0:
        # Stale on arrival: worth keeping only when a 304 can make it usable again (§4.3);
        # the lifetime stays as it is so that the stale windows count from the true age.
        if not terms.validator:
            return _no_store("zero ttl")
        lifetime = max(lifetime, 0.0)

    return StoreVerdict(True, "", lifetime, terms.swr, terms.sie, terms.max_bytes, age,
                        now - age)


# -- targeted Cache-Control (RFC 9213) ------------------------------------------------------

_SF_KEY = re.compile(r"[a-z*][a-z0-9_.*-]*", re.ASCII)
_SF_BARE = re.compile(
    r"-?[0-9]{1,15}(?:\.[0-9]{1,3})?"          # integer or decimal
    r'|"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\["\\])*"'  # string
    r"|[A-Za-z*][!#$%&'*+.^_`|~0-9A-Za-z:/-]*"    # token
    r"|:[A-Za-z0-9+/=]*:"                      # byte sequence
    r"|\?[01]", re.ASCII)                        # boolean
_INTEGER_DIRECTIVES = ("max-age", "s-maxage", "stale-while-revalidate", "stale-if-error")


def _sf_members(value: str) -> list[tuple[str, str]] | None:
    """An RFC 8941 Dictionary as (key, bare item text; "?1" for a bare key), parameters
    dropped; None when it is not a valid one."""
    members: list[tuple[str, str]] = []
    pos, end = 0, len(value)
    while pos < end:
        m = _SF_KEY.match(value, pos)
        if m is None:
            return None
        key, pos = m.group(), m.end()
        item = "?1"
        if pos < end and value[pos] == "=":
            v = _SF_BARE.match(value, pos + 1)
            if v is None:
                return None
            item, pos = v.group(), v.end()
        while pos < end and value[pos] == ";":  # parameters: ;key[=bare-item]
            p = _SF_KEY.match(value, pos + 1)
            if p is None:
                return None
            pos = p.end()
            if pos < end and value[pos] == "=":
                v = _SF_BARE.match(value, pos + 1)
                if v is None:
                    return None
                pos = v.end()
        members.append((key, item))
        while pos < end and value[pos] in " \t":
            pos += 1
        if pos == end:
            break
        if value[pos] != ",":
            return None
        pos += 1
        while pos < end and value[pos] in " \t":
            pos += 1
        if pos == end:
            return None  # trailing comma
    return members


def targeted_directives(value: str) -> dict[str, str] | None:
    """A targeted cache-control field (RFC 9213 §2.1: an RFC 8941 Dictionary) as
    {directive: argument ("" when none)}, last value of a repeated key winning (RFC 8941
    §3.2); None when the field is invalid (then it is ignored as a whole, §2.2), including a
    freshness directive whose value is not a non-negative integer."""
    members = _sf_members(value.strip(" \t"))
    if members is None:
        return None
    out: dict[str, str] = {}
    for key, item in members:
        if key in _INTEGER_DIRECTIVES:
            if not item.isdigit():
                return None
            item = str(min(int(item), DELTA_SECONDS_MAX))
        elif item in ("?1", "?0"):
            if item == "?0":
                out.pop(key, None)  # a false boolean is the directive's absence
                continue
            item = ""
        out[key] = item.strip('"')
    return out


@functools.lru_cache(maxsize=256)
def _field_lines(names: frozenset[bytes]) -> re.Pattern[bytes]:
    # One compiled pattern per set: the policies' strip sets and the few sets of names an
    # origin's 304s carry (cacheflow.merge_not_modified).
    alternatives = b"|".join(re.escape(n) for n in sorted(names))
    return re.compile(rb"\r\n(?:" + alternatives + rb")[ \t]*:[^\r]*", re.IGNORECASE)


def strip_fields(head: bytes, names: frozenset[bytes]) -> bytes:
    """``head`` (status line, then field lines each after a CRLF, no final blank line)
    without the field lines whose lowercase names are in ``names`` (one C-level scan)."""
    return _field_lines(names).sub(b"", head) if names else head


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
