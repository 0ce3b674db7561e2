"""Cache-policy decisions (httpproxy.cachepolicy): bypass, storability, TTL, keys, freshness."""

from __future__ import annotations

from email.utils import formatdate
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.errors import ValidationError
from httpproxy.cachepolicy import (
    CachePolicy,
    Freshness,
    RequestAction,
    XCache,
    age_value,
    cache_key,
    corrected_initial_age,
    encoding_variant,
    freshness,
    http_date,
    request_cacheability,
    response_storability,
    strip_fields,
    targeted_directives,
)

NOW = 1_700_000_000.0
FULL = CachePolicy.from_policy({"mode": "full"})
WP = CachePolicy.from_policy({"mode": "wordpress", "bypass_cookies": ["my_session"]})
STATIC = CachePolicy.from_policy({"mode": "static"})
PATHS = CachePolicy.from_policy({
    "mode": "full", "ttl": {"200": 600, "404": 60, "301": 3600},
    "paths": [{"prefix": "/news", "ttl": 30}, {"prefix": "/news/live", "ttl": 5},
              {"prefix": "/cart", "bypass": True}, {"prefix": "/cart/static", "ttl": 900}],
    "stale_while_revalidate": 30, "stale_if_error": 300, "max_object_bytes": 1000,
})


def action(method: str, path: str, policy: CachePolicy, **headers: str) -> RequestAction:
    return request_cacheability(method, path, {k.replace("_", "-"): v for k, v in headers.items()},
                                policy).action


# -- request side ------------------------------------------------------------------------------


@pytest.mark.parametrize(("policy", "method", "path", "headers", "expected", "reason"), [
    (CachePolicy.from_policy({}), "GET", "/", {}, RequestAction.BYPASS, "cache off"),
    (CachePolicy.from_policy(None), "GET", "/", {}, RequestAction.BYPASS, "cache off"),
    (CachePolicy.from_policy({"mode": "off"}), "GET", "/", {}, RequestAction.BYPASS, "cache off"),
    (FULL, "GET", "/", {}, RequestAction.LOOKUP, ""),
    (FULL, "HEAD", "/", {}, RequestAction.LOOKUP, ""),
    (FULL, "POST", "/", {}, RequestAction.BYPASS, "method not GET/HEAD"),
    (FULL, "get", "/", {}, RequestAction.BYPASS, "method not GET/HEAD"),
    (FULL, "OPTIONS", "/", {}, RequestAction.BYPASS, "method not GET/HEAD"),
    # RFC 9111 §3.5: always forwarded, stored only when the response allows it
    (FULL, "GET", "/", {"authorization": "Basic x"}, RequestAction.REFRESH, "Authorization present"),
    (FULL, "GET", "/", {"authorization": ""}, RequestAction.REFRESH, "Authorization present"),
    # answered from a stored full response (206); a miss is not stored
    (FULL, "GET", "/v.mp4", {"range": "bytes=0-"}, RequestAction.LOOKUP, "range request"),
    (FULL, "GET", "/v.mp4", {"range": "bytes=0-", "authorization": "Basic x"},
     RequestAction.REFRESH, "Authorization present"),
    (FULL, "GET", "/", {"cache-control": "no-store"}, RequestAction.BYPASS, "client no-store"),
    (FULL, "GET", "/", {"cache-control": "no-cache"}, RequestAction.REFRESH, "client no-cache"),
    (FULL, "GET", "/", {"cache-control": "max-age=0"}, RequestAction.REFRESH, "client no-cache"),
    (FULL, "GET", "/", {"cache-control": "No-Cache, foo"}, RequestAction.REFRESH, "client no-cache"),
    (FULL, "GET", "/", {"pragma": "no-cache"}, RequestAction.REFRESH, "client no-cache"),
    (FULL, "GET", "/", {"cache-control": "max-age=60"}, RequestAction.LOOKUP, ""),
    (FULL, "GET", "/a%00", {}, RequestAction.BYPASS, "invalid path"),
    # full mode caches whatever cookies the client sends (responses with Set-Cookie never are)
    (FULL, "GET", "/", {"cookie": "wordpress_logged_in_abc=1"}, RequestAction.LOOKUP, ""),
    # per-path bypass, longest prefix wins, normalised path
    (PATHS, "GET", "/cart", {}, RequestAction.BYPASS, "path rule /cart"),
    (PATHS, "GET", "/cart/x", {}, RequestAction.BYPASS, "path rule /cart"),
    (PATHS, "GET", "/x/../cart", {}, RequestAction.BYPASS, "path rule /cart"),
    (PATHS, "GET", "/%63art", {}, RequestAction.BYPASS, "path rule /cart"),
    (PATHS, "GET", "/cart/static/a.css", {}, RequestAction.LOOKUP, ""),
    (PATHS, "GET", "/news", {}, RequestAction.LOOKUP, ""),
    # wordpress
    (WP, "GET", "/", {}, RequestAction.LOOKUP, ""),
    (WP, "GET", "/wp-admin/", {}, RequestAction.BYPASS, "wordpress admin path"),
    (WP, "GET", "/wp-admin/admin-ajax.php", {}, RequestAction.BYPASS, "wordpress admin path"),
    (WP, "GET", "/wp-login.php?action=lostpassword", {}, RequestAction.BYPASS,
     "wordpress admin path"),
    (WP, "GET", "/blog/../wp-admin", {}, RequestAction.BYPASS, "wordpress admin path"),
    (WP, "GET", "//wp-admin", {}, RequestAction.BYPASS, "wordpress admin path"),
    (WP, "GET", "/%77p-login.php", {}, RequestAction.BYPASS, "wordpress admin path"),
    (WP, "GET", "/wp-cron.php", {}, RequestAction.BYPASS, "wordpress admin path"),
    (WP, "GET", "/wp-content/a.css", {}, RequestAction.LOOKUP, ""),
    (WP, "GET", "/", {"cookie": "wordpress_logged_in_123abc=admin%7C1"}, RequestAction.BYPASS,
     "cookie wordpress_logged_in_123abc"),
    (WP, "GET", "/", {"cookie": "a=1; comment_author_xyz=Ann"}, RequestAction.BYPASS,
     "cookie comment_author_xyz"),
    (WP, "GET", "/", {"cookie": "a=1;wp-postpass_abc=x"}, RequestAction.BYPASS,
     "cookie wp-postpass_abc"),
    (WP, "GET", "/", {"cookie": "woocommerce_items_in_cart=1"}, RequestAction.BYPASS,
     "cookie woocommerce_items_in_cart"),
    (WP, "GET", "/", {"cookie": "my_session=1"}, RequestAction.BYPASS, "cookie my_session"),
    (WP, "GET", "/", {"cookie": "wordpress_test_cookie=WP; _ga=1"}, RequestAction.LOOKUP, ""),
    (WP, "GET", "/", {"cookie": "x=wordpress_logged_in_"}, RequestAction.LOOKUP, ""),  # value only
    (WP, "GET", "/", {"cookie": ""}, RequestAction.LOOKUP, ""),
    (WP, "POST", "/wp-comments-post.php", {}, RequestAction.BYPASS, "method not GET/HEAD"),
    (CachePolicy.from_policy({"mode": "full", "bypass_cookies": ["sess"]}), "GET", "/",
     {"cookie": "session=1"}, RequestAction.BYPASS, "cookie session"),
    # static
    (STATIC, "GET", "/a.css", {}, RequestAction.LOOKUP, ""),
    (STATIC, "GET", "/img/A.PNG?v=3", {}, RequestAction.LOOKUP, ""),
    (STATIC, "GET", "/index.php", {}, RequestAction.BYPASS, "extension not cached in static mode"),
    (STATIC, "GET", "/", {}, RequestAction.BYPASS, "extension not cached in static mode"),
    (STATIC, "GET", "/css", {}, RequestAction.BYPASS, "extension not cached in static mode"),
    (STATIC, "GET", "/a.css/", {}, RequestAction.BYPASS, "extension not cached in static mode"),
    (STATIC, "GET", "/a.php?x=.css", {}, RequestAction.BYPASS,
     "extension not cached in static mode"),
    (STATIC, "GET", "/dir.css/file", {}, RequestAction.BYPASS,
     "extension not cached in static mode"),
    (STATIC, "GET", "/a.php%3F.css", {}, RequestAction.LOOKUP, ""),  # the file is "a.php?.css"
    (CachePolicy.from_policy({"mode": "static", "extensions": [".JS"]}), "GET", "/a.js", {},
     RequestAction.LOOKUP, ""),
    (CachePolicy.from_policy({"mode": "static", "extensions": ["js"]}), "GET", "/a.css", {},
     RequestAction.BYPASS, "extension not cached in static mode"),
    (STATIC, "GET", "/a.css", {"cache-control": "no-cache"}, RequestAction.REFRESH,
     "client no-cache"),
])
def test_request_cacheability(policy: CachePolicy, method: str, path: str,
                              headers: dict[str, str], expected: RequestAction,
                              reason: str) -> None:
    verdict = request_cacheability(method, path, headers, policy)
    assert (verdict.action, verdict.reason) == (expected, reason)
    assert verdict.x_cache is (XCache.BYPASS if expected is RequestAction.BYPASS else XCache.MISS)
    assert verdict.store_on_miss == (expected is not RequestAction.BYPASS and method == "GET"
                                     and "range" not in headers)


# -- response side -----------------------------------------------------------------------------


def store(status: int = 200, policy: CachePolicy = PATHS, path: str = "/", **headers: str) -> Any:
    return response_storability(status, {k.replace("_", "-"): v for k, v in headers.items()},
                                policy, NOW, path=path)


@pytest.mark.parametrize(("headers", "reason"), [
    ({"set_cookie": "a=1"}, "Set-Cookie"),
    ({"cache_control": "no-store"}, "Cache-Control no-store"),
    ({"cache_control": "public, max-age=60, no-store"}, "Cache-Control no-store"),
    ({"cache_control": "private"}, "Cache-Control private"),
    ({"cache_control": 'private="set-cookie", max-age=60'}, "Cache-Control private"),
    ({"cache_control": "PRIVATE"}, "Cache-Control private"),
    ({"cache_control": "no-cache"}, "Cache-Control no-cache without a validator"),
    ({"vary": "*"}, "Vary *"),
    ({"vary": "Accept-Encoding, *"}, "Vary *"),
    ({"content_length": "1001"}, "larger than max_object_bytes"),
    ({"content_length": "-1"}, "invalid Content-Length"),
    ({"content_length": "12, 12"}, "invalid Content-Length"),
    ({"cache_control": "max-age=0"}, "zero ttl"),
    ({"cache_control": "s-maxage=0, max-age=60"}, "zero ttl"),
    ({"cache_control": "max-age=abc"}, "invalid max-age"),
    ({"cache_control": "max-age=60", "age": "60"}, "zero ttl"),
    ({"expires": "0"}, "zero ttl"),
    ({"expires": formatdate(NOW - 10, usegmt=True)}, "zero ttl"),
    ({"expires": "Thu, 19 Nov 1981 08:52:00 GMT"}, "zero ttl"),
])
def test_not_storable(headers: dict[str, str], reason: str) -> None:
    verdict = store(**headers)
    assert (verdict.store, verdict.reason) == (False, reason)


@pytest.mark.parametrize(("status", "headers", "path", "ttl"), [
    (200, {}, "/", 600),                                               # status table
    (404, {}, "/", 60),
    (301, {}, "/", 3600),
    (200, {}, "/news/a", 30),                                          # path override
    (200, {}, "/news/live/x", 5),                                      # longest prefix
    (404, {}, "/news/a", 30),                                          # path replaces status ttl
    (200, {}, "/x/../news", 30),                                       # normalised
    (200, {"cache_control": "max-age=120"}, "/news", 120),             # origin wins
    (200, {"cache_control": "max-age=120, s-maxage=7"}, "/", 7),        # s-maxage over max-age
    (200, {"cache_control": "public, max-age=\"90\""}, "/", 90),
    (200, {"cache_control": "max-age=120", "expires": "0"}, "/", 120),  # max-age over Expires
    (200, {"cache_control": "max-age=120", "age": "20"}, "/", 120),    # lifetime; age apart
    (200, {"expires": formatdate(NOW + 50, usegmt=True)}, "/", 50),
    (200, {"expires": formatdate(NOW + 500, usegmt=True),
           "date": formatdate(NOW + 400, usegmt=True)}, "/", 100),     # relative to Date
    (200, {"vary": "Accept-Encoding"}, "/", 600),
    (200, {"vary": "accept-encoding, "}, "/", 600),
    (200, {"vary": "Cookie"}, "/", 600),                               # a variant (RFC 9111 §4.1)
    (200, {"vary": "Accept-Encoding, User-Agent"}, "/", 600),
    (200, {"content_length": "1000"}, "/", 600),
    (200, {"cache_control": "public"}, "/", 600),
    (410, {"cache_control": "max-age=10"}, "/", 10),                   # heuristic status
    (204, {"cache_control": "s-maxage=10"}, "/", 10),
])
def test_storable_ttl(status: int, headers: dict[str, str], path: str, ttl: float) -> None:
    verdict = store(status, path=path, **headers)
    assert verdict.store, verdict
    assert verdict.ttl == pytest.approx(ttl, abs=1)
    assert verdict.max_bytes == 1000


STANDARD = CachePolicy.from_policy("standard")


@pytest.mark.parametrize(("policy", "headers", "ttl", "age"), [
    # RFC 9111 §5.2.2.4: no-cache with a validator is stored, never fresh, whatever max-age
    # or the operator's TTL say, and without freshness information of its own
    (PATHS, {"cache_control": "no-cache", "etag": '"a"'}, 0, 0),
    (PATHS, {"cache_control": "no-cache, max-age=600", "last_modified": "x"}, 0, 0),
    (STANDARD, {"cache_control": "no-cache", "etag": '"a"'}, 0, 0),
    # §4.2 / §4.2.3: stale on arrival with a validator: kept for revalidation, its lifetime
    # and age as they are (the stale windows count from the true age)
    (PATHS, {"cache_control": "max-age=60", "age": "90", "etag": '"a"'}, 60, 90),
    (PATHS, {"cache_control": "max-age=0", "etag": '"a"'}, 0, 0),
    (PATHS, {"expires": "0", "etag": '"a"'}, 0, 0),  # invalid Expires: already expired
])
def test_stored_only_to_be_revalidated(policy: CachePolicy, headers: dict[str, str],
                                       ttl: float, age: float) -> None:
    verdict = store(policy=policy, **headers)
    assert verdict.store, verdict
    assert (verdict.ttl, verdict.age, verdict.stored_at) == (ttl, age, NOW - age)
    assert freshness(verdict.stored_at, verdict.ttl, verdict.stale_while_revalidate,
                     verdict.stale_if_error, NOW) is not Freshness.FRESH
    if "no-cache" in headers.get("cache_control", ""):
        assert (verdict.stale_while_revalidate, verdict.stale_if_error) == (0, 0)


def test_no_cache_without_any_freshness_source_is_not_stored() -> None:
    """RFC 9111 §3: no-cache alone does not make a status storable (none of §3's conditions)."""
    verdict = store(500, policy=STANDARD, cache_control="no-cache", etag='"a"')
    assert (verdict.store, verdict.reason) == (False, "status 500 has no explicit freshness")


@pytest.mark.parametrize(("status", "headers", "reason"), [
    (500, {}, "status 500 has no explicit freshness"),
    (302, {}, "status 302 has no explicit freshness"),
    (302, {"cache_control": "max-age=60"}, None),         # RFC 9111 §3: explicit, any status
    (503, {"cache_control": "max-age=60"}, None),
    (206, {"cache_control": "max-age=60"}, "status 206"),
    (304, {"cache_control": "max-age=60"}, "status 304"),
    (200, {}, None),
])
def test_status_rules(status: int, headers: dict[str, str], reason: str | None) -> None:
    verdict = store(status, **headers)
    if reason is None:
        assert verdict.store
    else:
        assert (verdict.store, verdict.reason) == (False, reason)


def test_path_ttl_does_not_make_other_statuses_cacheable() -> None:
    assert not store(500, path="/news").store


def test_off_policy_never_stores() -> None:
    assert response_storability(200, {}, CachePolicy.from_policy({}), NOW).reason == "cache off"


@pytest.mark.parametrize(("headers", "swr", "sie"), [
    ({}, 30, 300),                                                             # policy
    ({"cache_control": "max-age=60, stale-while-revalidate=5"}, 5, 300),      # extension wins
    ({"cache_control": "max-age=60, stale-if-error=7"}, 30, 7),
    ({"cache_control": "max-age=60, stale-if-error=x"}, 30, 0),
    ({"cache_control": "max-age=60, must-revalidate, stale-if-error=7"}, 0, 0),
    ({"cache_control": "max-age=60, proxy-revalidate"}, 0, 0),
    # RFC 9111 §5.2.2.10: s-maxage implies proxy-revalidate: not the policy's windows...
    ({"cache_control": "s-maxage=60"}, 0, 0),
    # ... but the origin's own RFC 5861 permissions
    ({"cache_control": "s-maxage=60, stale-while-revalidate=9"}, 9, 0),
])
def test_stale_windows(headers: dict[str, str], swr: float, sie: float) -> None:
    verdict = store(**headers)
    assert (verdict.stale_while_revalidate, verdict.stale_if_error) == (swr, sie)


def test_stale_windows_default_zero_and_no_size_limit() -> None:
    verdict = store(policy=FULL)
    assert verdict.store and verdict.ttl == 600
    assert (verdict.stale_while_revalidate, verdict.stale_if_error, verdict.max_bytes) == (0, 0, None)


def test_ttl_table_defaults() -> None:
    policy = CachePolicy.from_policy({"mode": "full"})
    assert dict(policy.ttl or {}) == {200: 600.0, 404: 60.0}


def test_from_policy_validates() -> None:
    with pytest.raises(ValidationError):
        CachePolicy.from_policy({"mode": "sometimes"})
    assert CachePolicy.from_policy('{"mode": "static"}').extensions >= {"css", "js"}
    assert FULL.extensions == frozenset()


# -- keys --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("accept", "variant"), [
    (None, "identity"),
    ("", "identity"),
    ("gzip", "gzip"),
    ("gzip, deflate, br", "br"),
    ("br;q=0, gzip", "gzip"),
    ("gzip;q=0", "identity"),
    ("GZIP", "gzip"),
    ("deflate", "identity"),
    ("*", "br"),
    ("*;q=0, gzip", "gzip"),
    ("*, br;q=0", "gzip"),
    ("identity", "identity"),
    ("x-gzip", "gzip"),
    ("gzip;q=bogus", "identity"),
    ("gzip ; q=0.5 , br ; q=0.001", "br"),
    (",,,;;;", "identity"),
])
def test_encoding_variant(accept: str | None, variant: str) -> None:
    assert encoding_variant(accept) == variant


def test_cache_key() -> None:
    base = cache_key("example.com", "/a?b=1", "gzip, br")
    assert isinstance(base, bytes)
    assert cache_key("EXAMPLE.com:443", "/a?b=1", "br") == base
    assert cache_key("example.com.", "/a?b=1", "br;q=1, gzip") == base
    assert cache_key("example.com", "/a?b=2", "br") != base
    assert cache_key("example.com", "/a", "br") != base
    assert cache_key("example.com", "/a?b=1", "gzip") != base
    assert cache_key("example.com", "/a?b=1", None) != base
    assert cache_key("other.com", "/a?b=1", "br") != base
    assert cache_key("example.com", "/a?b=1", "br", scheme="http") != cache_key(
        "example.com", "/a?b=1", "br", scheme="https")
    assert cache_key("[2001:db8::1]:443", "/", None) == cache_key("[2001:db8::1]", "/", None)
    assert cache_key("example.com", "/\ud800", None)  # lone surrogates do not raise


@settings(max_examples=200)
@given(st.text(max_size=20), st.text(max_size=20), st.text(max_size=20), st.text(max_size=20))
def test_cache_key_injective_across_fields(h1: str, p1: str, h2: str, p2: str) -> None:
    # Hosts normalise (case, port, NUL dropped) but distinct paths never share a key.
    if cache_key(h1, p1, None) == cache_key(h2, p2, None):
        assert p1 == p2


# -- freshness ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("age", "ttl", "swr", "sie", "expected"), [
    (0, 60, 0, 0, Freshness.FRESH),
    (59.9, 60, 0, 0, Freshness.FRESH),
    (60, 60, 0, 0, Freshness.EXPIRED),
    (60, 60, 30, 0, Freshness.STALE_REVALIDATE),
    (89, 60, 30, 300, Freshness.STALE_REVALIDATE),
    (90, 60, 30, 300, Freshness.STALE_IF_ERROR_ONLY),
    (359, 60, 30, 300, Freshness.STALE_IF_ERROR_ONLY),
    (360, 60, 30, 300, Freshness.EXPIRED),
    (70, 60, 30, 5, Freshness.STALE_REVALIDATE),      # sie shorter than swr
    (95, 60, 30, 5, Freshness.EXPIRED),
    (-100, 60, 0, 0, Freshness.FRESH),                 # stored "in the future"
])
def test_freshness(age: float, ttl: float, swr: float, sie: float, expected: Freshness) -> None:
    assert freshness(NOW, ttl, swr, sie, NOW + age) is expected


@settings(max_examples=300)
@given(st.dictionaries(st.sampled_from(["cache-control", "expires", "date", "age", "vary",
                                        "content-length", "set-cookie"]), st.text(max_size=40)),
       st.integers(100, 599), st.text(max_size=30), st.text(max_size=30))
def test_never_raises(headers: dict[str, str], status: int, path: str, method: str) -> None:
    for policy in (FULL, WP, STATIC, PATHS):
        verdict = response_storability(status, headers, policy, NOW, path=path)
        assert verdict.store in (True, False)
        if verdict.store:
            assert verdict.ttl - verdict.age > 0 and verdict.stored_at == NOW - verdict.age
        request_cacheability(method, path, headers, policy)
        encoding_variant(headers.get("vary"))


# -- RFC 9110 §5.6.7 dates, RFC 9111 §5.1 Age, RFC 9213 targeted fields ------------------------


@pytest.mark.parametrize(("value", "expected"), [
    ("Sun, 06 Nov 1994 08:49:37 GMT", 784111777.0),      # IMF-fixdate
    ("Sunday, 06-Nov-94 08:49:37 GMT", 784111777.0),     # rfc850-date
    ("Sun Nov  6 08:49:37 1994", 784111777.0),           # asctime-date
    ("SUN, 06 NOV 1994 08:49:37 gmt", 784111777.0),      # RFC 9111 §4.2: case-insensitive
    ("Tue, 19 Jan 2038 03:14:08 GMT", 2147483648.0),     # past 32 bits
    ("Sun, 06 Nov 1994 08:49:37 UTC", None),
    ("Sun, 06 Nov 1994 08:49:37 +0000", None),
    ("Sun, 06 Nov 94 08:49:37 GMT", None),               # two-digit year outside rfc850-date
    ("Sun 06 Nov 1994 08:49:37 GMT", None),
    ("Sun,  06 Nov 1994 08:49:37 GMT", None),
    ("Sun, 06-Nov-1994 08:49:37 GMT", None),
    ("Sun, 06 Nov 1994 8:49:37 GMT", None),
    ("Sun, 06 Nov 1994 08.49.37 GMT", None),
    ("Sun, 31 Feb 1994 08:49:37 GMT", None),
    ("Sun, 06 Nov 1994 24:00:00 GMT", None),
    ("Sun, 06 Nov 1994 08:49:37 GMT, Sun, 06 Nov 1994 08:49:38 GMT", None),
    ("Sun, 06 Nov 1994 08:49:37 GMT ", None),            # the caller strips OWS
    ("Sun, \uff10\uff16 Nov 1994 08:49:37 GMT", None),  # non-ASCII digits
    ("0", None), ("", None),
])
def test_http_date(value: str, expected: float | None) -> None:
    """RFC 9110 §5.6.7: exactly the three HTTP-date forms, nothing else."""
    assert http_date(value) == expected


def test_rfc850_year_is_at_most_50_years_ahead() -> None:
    """RFC 9110 §5.6.7: a two-digit year more than 50 years ahead is in the past century."""
    now = http_date("Sun, 06 Nov 2026 00:00:00 GMT")
    assert http_date("Saturday, 01-Jan-77 00:00:00 GMT", now) == 220924800.0  # 1977, not 2077
    assert http_date("Wednesday, 01-Jan-70 00:00:00 GMT", now) == http_date(
        "Wed, 01 Jan 2070 00:00:00 GMT")                                      # 44 years ahead
    assert http_date("Sunday, 01-Jan-68 00:00:00 GMT", now) == http_date(
        "Sun, 01 Jan 2068 00:00:00 GMT")


@pytest.mark.parametrize(("value", "expected"), [
    (None, 0), ("", 0), ("30", 30), ("30, 3", 30), (" 7 ", 7), ("abc", 0), ("-1", 0),
    ("1.5", 0), ("2147483647", 2147483647), ("99999999999999", 2147483648),
])
def test_age_value(value: str | None, expected: int) -> None:
    """RFC 9111 §5.1: first member of a list; not a non-negative integer: ignored;
    §1.2.2: too large is 2^31."""
    assert age_value(value) == expected


def test_age_from_date_and_age_field() -> None:
    """RFC 9111 §4.2.3: corrected_initial_age = max(apparent age, Age + response delay)."""
    headers = {"date": formatdate(NOW - 50, usegmt=True), "age": "20"}
    assert corrected_initial_age(headers, NOW) == 50
    assert corrected_initial_age(headers, NOW, request_time=NOW - 40) == 60
    assert corrected_initial_age({"date": formatdate(NOW + 50, usegmt=True)}, NOW) == 0
    verdict = store(cache_control="max-age=120", age="20")
    assert (verdict.ttl, verdict.age, verdict.stored_at) == (120, 20, NOW - 20)


@pytest.mark.parametrize(("value", "expected"), [
    ("max-age=60", {"max-age": "60"}),
    ("max-age=60, private", {"max-age": "60", "private": ""}),
    ("foo, max-age=60;x=1, bar=?0", {"foo": "", "max-age": "60"}),
    ('no-cache="x", s-maxage=5', {"no-cache": "x", "s-maxage": "5"}),
    ("max-age=1, max-age=9", {"max-age": "9"}),           # RFC 8941 §3.2: last one wins
    ("max-age=99999999999", {"max-age": "2147483648"}),
    ("MaX-aGe=60", None), ("max-age =60", None), ("max-age= 60", None),
    ('max-age="60"', None), ("max-age=6.0", None), ("max-age=-1", None),
    ("max-age=60, &&", None), ("max-age=60,", None), ("", {}),
])
def test_targeted_directives(value: str, expected: dict[str, str] | None) -> None:
    """RFC 9213 §2.1: a Structured Fields Dictionary; invalid (or a lifetime that is not a
    non-negative Integer) means the whole field is ignored."""
    assert targeted_directives(value) == expected


def test_targeted_field_replaces_cache_control() -> None:
    """RFC 9213 §2.2: the first valid targeted field of the cache's list wins over
    Cache-Control; an invalid one is skipped."""
    policy = CachePolicy.from_policy({"mode": "standard", "target": "Edge-Cache-Control"})
    both = {"cache-control": "no-store", "cdn-cache-control": "max-age=30"}
    assert response_storability(200, both, policy, NOW).ttl == 30
    both["edge-cache-control"] = "max-age=90"
    assert response_storability(200, both, policy, NOW).ttl == 90
    both["edge-cache-control"] = "max-age=bad"
    assert response_storability(200, both, policy, NOW).ttl == 30
    assert not response_storability(200, {"cache-control": "max-age=60",
                                          "cdn-cache-control": "private"}, policy, NOW).store


@pytest.mark.parametrize(("status", "headers", "ttl"), [
    (200, {"last_modified": formatdate(NOW - 1000, usegmt=True)}, 100),
    (404, {"last_modified": formatdate(NOW - 1000, usegmt=True)}, 100),
    (200, {"last_modified": formatdate(NOW - 10**8, usegmt=True)}, 86400),  # bounded
    (200, {"last_modified": formatdate(NOW - 1000, usegmt=True),
           "date": formatdate(NOW - 10, usegmt=True)}, 99),      # from Date; age apart
    (302, {"last_modified": formatdate(NOW - 1000, usegmt=True)}, None),  # not heuristic
    (302, {"last_modified": formatdate(NOW - 1000, usegmt=True), "cache_control": "public"}, 100),
    (200, {"last_modified": "yesterday"}, None),
    (200, {}, None),
])
def test_heuristic_freshness(status: int, headers: dict[str, str], ttl: float | None) -> None:
    """RFC 9111 §4.2.2: without explicit freshness, a fraction (here 10 %) of the time since
    Last-Modified, bounded, for heuristically cacheable codes (RFC 9110 §15.1) or public."""
    verdict = store(status, CachePolicy.from_policy({"mode": "standard"}), **headers)
    assert verdict.store is (ttl is not None)
    if ttl is not None:
        assert verdict.ttl == pytest.approx(ttl)


def test_status_headers_per_site() -> None:
    """X-Cache and RFC 9211 Cache-Status are on by default in mode standard, each can be
    switched off or on."""
    both = CachePolicy.from_policy({"mode": "standard"}).result_headers
    assert both["HIT"] == b"X-Cache: HIT\r\nCache-Status: edge; hit\r\n"
    assert both["MISS"] == b"X-Cache: MISS\r\nCache-Status: edge; fwd=uri-miss\r\n"
    assert both[None] == b""
    quiet = CachePolicy.from_policy({"mode": "standard", "x_cache": False,
                                     "cache_status": False}).result_headers
    assert set(quiet.values()) == {b""}
    # the older modes keep their responses byte for byte unless asked
    assert FULL.result_headers["HIT"] == b"X-Cache: HIT\r\n"
    assert CachePolicy.from_policy({"mode": "wordpress", "cache_status": True}).result_headers[
        "BYPASS"] == b"X-Cache: BYPASS\r\nCache-Status: edge; fwd=bypass\r\n"


def test_strip_fields() -> None:
    head = (b"HTTP/1.1 200 OK\r\nAge: 5\r\nCDN-Cache-Control: max-age=1\r\n"
            b"cdn-cache-control-x: y\r\nX-Age: 1\r\nSet-Cookie: a=b")
    assert strip_fields(head, frozenset({b"age", b"cdn-cache-control", b"set-cookie"})) == (
        b"HTTP/1.1 200 OK\r\ncdn-cache-control-x: y\r\nX-Age: 1")
    assert strip_fields(head, frozenset()) is head


def test_targeted_field_ignores_expires() -> None:
    """RFC 9213 §2.2: when a targeted field is used, Cache-Control and Expires are ignored;
    an empty targeted field is not used."""
    future = formatdate(NOW + 3600, usegmt=True)
    policy = CachePolicy.from_policy({"mode": "standard"})
    assert not response_storability(200, {"cdn-cache-control": "public", "expires": future},
                                    policy, NOW).store
    assert response_storability(200, {"cdn-cache-control": "", "expires": future},
                                policy, NOW).ttl == pytest.approx(3600)


def test_operator_ttl_counts_from_arrival() -> None:
    """An operator TTL (mode full) is kept for its length after arrival even when the origin
    says the response is already older (Age, or a Date behind our clock); the age is still
    what a hit reports (RFC 9111 §4.2.3)."""
    verdict = store(age="900")
    assert verdict.store and verdict.ttl - verdict.age == 600 and verdict.age == 900


@pytest.mark.parametrize(("status", "cc", "stored"), [
    (200, "max-age=60, no-store, must-understand", True),
    (404, "max-age=60, no-store, must-understand", True),
    (599, "max-age=60, no-store, must-understand", False),
    (599, "max-age=60, must-understand", False),
    (599, "max-age=60", True),                              # §3: explicit freshness, any status
    (200, "max-age=60, private, must-understand", False),
])
def test_must_understand(status: int, cc: str, stored: bool) -> None:
    """RFC 9111 §5.2.2.3: with must-understand a response is stored only when the cache
    understands its status code, and then no-store is ignored."""
    policy = CachePolicy.from_policy({"mode": "standard"})
    assert response_storability(status, {"cache-control": cc}, policy, NOW).store is stored
