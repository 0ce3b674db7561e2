"""HTTP request filters (httpproxy.rules): every rule, the order between them, bypass attempts."""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge.directory.model import Site
from edge.errors import ValidationError
from edge.limits import RateLimiter
from httpproxy.rules import (
    HSTS_VALUE,
    CompiledFilters,
    Decision,
    Kind,
    RequestHead,
    evaluate_after_ip,
    evaluate_filters,
    ip_refusal,
    normalise_path,
    rate_limit_key,
)
from tests.support_clock import FakeClock


def sha(password: str) -> str:
    return hashlib.sha256(password.encode()).hexdigest()


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


SITE = Site("example.com", "t1")
SITE_REDIRECT = Site("example.com", "t1", https_redirect=True)
SITE_HSTS = Site("example.com", "t1", https_redirect=True, hsts=True)


def head(path: str = "/", method: str = "GET", **headers: str) -> RequestHead:
    hdrs = {"host": "example.com"}
    hdrs.update({k.replace("_", "-").lower(): v for k, v in headers.items()})
    return RequestHead(method, path, hdrs)


def run(rules: dict[str, Any], path: str = "/", method: str = "GET", ip: str = "192.0.2.10",
        scheme: str = "https", site: Site = SITE, limiter: RateLimiter | None = None,
        **headers: str) -> Decision:
    return evaluate_filters(head(path, method, **headers), ip, CompiledFilters.from_rules(rules),
                            scheme=scheme, site=site, rate_limiter=limiter)


def hdr(decision: Decision, name: str) -> str | None:
    for k, v in decision.headers:
        if k.lower() == name.lower():
            return v
    return None


# -- RequestHead ------------------------------------------------------------------------------


def test_request_head_from_pairs() -> None:
    h = RequestHead.from_pairs(b"GET", b"/x?y", [
        (b"Host", b"Example.com"), (b"User-Agent", b"curl"), (b"Cookie", b"a=1"),
        ("cookie", "b=2"), (b"Accept", b"a"), (b"ACCEPT", b"b"), (b"Authorization", b"Basic x")])
    assert h.method == "GET" and h.path == "/x?y"
    assert h.host == "Example.com" and h.user_agent == "curl"
    assert h.cookie == "a=1; b=2"
    assert h.headers["accept"] == "a, b"
    assert h.authorization == "Basic x"
    empty = RequestHead("GET", "/")
    assert empty.user_agent == "" and empty.authorization is None and empty.cookie == ""


# -- path normalisation ------------------------------------------------------------------------


@pytest.mark.parametrize(("target", "expected"), [
    ("/", "/"),
    ("/a/b", "/a/b"),
    ("/a/b/", "/a/b/"),
    ("/a/b?x=/../.git", "/a/b"),
    ("/a#frag", "/a"),
    ("/a/../.git", "/.git"),
    ("/a/./b", "/a/b"),
    ("//.git//config", "/.git/config"),
    ("/../../.git", "/.git"),
    ("/%2e%2e/.git/", "/.git/"),
    ("/%2E%2E/%2E%67%69%74", "/.git"),
    ("/%252e%252e/.git", "/.git"),            # double encoding
    ("/%25252e%25252e/.git", "/.git"),        # triple encoding
    ("/a%2f..%2f.git", "/.git"),              # encoded slashes
    ("/a%5c..%5c.git", "/.git"),              # encoded backslashes
    ("/a\\..\\.git", "/.git"),
    ("/a/..", "/"),
    ("/a/b/..", "/a/"),
    ("/a/b/.", "/a/b/"),
    ("", "/"),
    ("*", "/*"),
    ("a/b", "/a/b"),
    ("http://example.com/a/../.git?q", "/.git"),
    ("HTTPS://example.com", "/"),
    ("/caf%C3%A9", "/café"),
    ("/%ff", "/\udcff"),                      # undecodable UTF-8 kept (surrogate escape)
    ("/%ff%2525", "/\udcff%"),                # ... the same byte however many rounds follow
    # found by tests/fuzz/fuzz_rules.py: the surrogate was re-encoded as UTF-8 each round
    ("/az/%2e%2eez/%2e%2e/%2523e%FFFF%FFFFFFFFFFx#y", "/az/#e\udcffFF\udcffFFFFFFFFx"),
    ("/100%", "/100%"),                        # stray percent
    ("/%zz", "/%zz"),
    # bytes: the target as received (RequestHead.from_pairs). Raw UTF-8 is the same path as
    # its percent-encoding in any case or mix (it was read as Latin-1: "/cafÃ©").
    (b"/caf\xc3\xa9", "/café"),
    (b"/caf\xc3%a9", "/café"),
    (b"/caf%C3\xa9/", "/café/"),
    (b"/caf%25c3\xa9", "/café"),
    (b"/x/..//\xc3\xa4\\.\\b", "/ä/b"),
    # an invalid or overlong sequence is the same undecodable bytes either way, never a
    # valid character, and never a separator or dot
    (b"/caf\xe9", "/caf\udce9"),
    (b"/caf%E9", "/caf\udce9"),
    (b"/caf\xc3", "/caf\udcc3"),
    (b"/\xc0\xaf..\xc0\xaf.git", "/\udcc0\udcaf..\udcc0\udcaf.git"),
    (b"/%c0%ae%c0%ae/.git", "/\udcc0\udcae\udcc0\udcae/.git"),
    (b"/\xed\xb3\xbf", "/\udced\udcb3\udcbf"),         # UTF-8 of a surrogate: 3 bytes
])
def test_normalise_path(target: str | bytes, expected: str) -> None:
    if isinstance(target, bytes):
        target = RequestHead.from_pairs(b"GET", target, ()).path
    assert normalise_path(target) == expected


def _spell(data: bytes, choices: list[int]) -> bytes:
    # 0: the byte as is, 1: %xx, 2: %XX; "%", "?", "#" and controls always escaped (as is
    # they mean something else or are not allowed)
    out = bytearray()
    for byte, how in zip(data, choices, strict=True):
        if how == 0 and byte > 0x20 and byte != 0x7F and byte not in b"%?#":
            out.append(byte)
        else:
            out += (f"%{byte:02x}" if how == 1 else f"%{byte:02X}").encode()
    return bytes(out)


@settings(max_examples=300)
@given(data=st.binary(max_size=24), seed=st.data())
def test_raw_and_percent_encoded_bytes_normalise_equal(data: bytes, seed: st.DataObject) -> None:
    choices = seed.draw(st.lists(st.integers(0, 2), min_size=len(data), max_size=len(data)))
    raw = b"/" + _spell(data, choices)
    encoded = b"/" + _spell(data, [2] * len(data))
    paths = [normalise_path(RequestHead.from_pairs(b"GET", t, ()).path) for t in (raw, encoded)]
    assert paths[0] == paths[1], (raw, encoded)


@pytest.mark.parametrize("target", [
    b"/admin-\xc3\xa9", b"/admin-\xc3%A9/x", b"/admin-%c3\xa9", b"/\xc3\xa4/", b"/\xc3%a4/x",
])
def test_non_ascii_prefix_denied_for_raw_bytes(target: bytes) -> None:
    rules = CompiledFilters.from_rules({"path_deny": [{"prefix": "/admin-é"}, {"prefix": "/ä/"}]})
    for head in (RequestHead.from_pairs(b"GET", target, ()),
                 RequestHead.for_filters(b"GET", target, b"example.com", None, None)):
        d = evaluate_filters(head, "192.0.2.1", rules, scheme="https", site=SITE)
        assert d.kind is Kind.DENY, target


@pytest.mark.parametrize("target", [
    "/.git%00/config", "/a%00", "/a%0d%0aSet-Cookie:x", "/\x00", "/a%7f", "/a%2500",
])
def test_normalise_path_refuses_control_characters(target: str) -> None:
    assert normalise_path(target) is None


# -- IP rules ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("rules", "ip", "kind"), [
    ({"ip_deny": ["198.51.100.7"]}, "198.51.100.7", Kind.DENY),
    ({"ip_deny": ["198.51.100.7"]}, "198.51.100.8", Kind.ALLOW),
    ({"ip_deny": ["198.51.100.0/24"]}, "198.51.100.200", Kind.DENY),
    ({"ip_deny": ["198.51.100.0/24"]}, "::ffff:198.51.100.200", Kind.DENY),   # IPv4-mapped
    ({"ip_deny": ["198.51.100.0/24"]}, "[::ffff:198.51.100.1]", Kind.DENY),
    ({"ip_deny": ["::ffff:198.51.100.0/120"]}, "198.51.100.3", Kind.DENY),   # mapped CIDR
    ({"ip_deny": ["2001:db8::/32"]}, "2001:db8:1::5", Kind.DENY),
    ({"ip_deny": ["2001:db8::/32"]}, "2001:db9::5", Kind.ALLOW),
    ({"ip_deny": ["2001:db8::/32"]}, "198.51.100.1", Kind.ALLOW),
    ({"ip_deny": ["fe80::/10"]}, "fe80::1%eth0", Kind.DENY),
    ({"ip_allow": ["203.0.113.0/24"]}, "203.0.113.9", Kind.ALLOW),
    ({"ip_allow": ["203.0.113.0/24"]}, "203.0.114.9", Kind.DENY),
    ({"ip_allow": ["203.0.113.0/24"]}, "::ffff:203.0.113.9", Kind.ALLOW),
    ({"ip_allow": ["203.0.113.0/24"]}, "2001:db8::1", Kind.DENY),        # v4-only allow list
    ({"ip_allow": ["2001:db8::/48"]}, "2001:db8:0:1::1", Kind.ALLOW),
    ({"ip_allow": ["2001:db8::/48"]}, "203.0.113.9", Kind.DENY),
    ({"ip_allow": ["203.0.113.0/24"], "ip_deny": ["203.0.113.66"]}, "203.0.113.66", Kind.DENY),
    ({"ip_allow": ["203.0.113.0/24"], "ip_deny": ["203.0.113.66"]}, "203.0.113.65", Kind.ALLOW),
    ({"ip_allow": []}, "203.0.113.65", Kind.ALLOW),                      # empty: no restriction
    ({"ip_deny": ["0.0.0.0/0"]}, "10.0.0.1", Kind.DENY),
    ({"ip_deny": ["10.0.0.1"]}, "not-an-ip", Kind.DENY),                 # fail closed
    ({"ip_allow": ["10.0.0.1"]}, "", Kind.DENY),
    ({}, "not-an-ip", Kind.ALLOW),                                       # no IP rules: ignored
])
def test_ip_rules(rules: dict[str, Any], ip: str, kind: Kind) -> None:
    decision = run(rules, ip=ip)
    assert decision.kind is kind
    if kind is Kind.DENY:
        assert decision.status == 403


# -- maintenance, redirect, HSTS ---------------------------------------------------------------


def test_maintenance() -> None:
    d = run({"maintenance": True})
    assert (d.kind, d.status, hdr(d, "Retry-After")) == (Kind.MAINTENANCE, 503, "300")
    d = evaluate_filters(head(), "1.2.3.4", CompiledFilters.from_rules({"maintenance": True}),
                         scheme="https", site=SITE, maintenance_retry_after=60)
    assert hdr(d, "Retry-After") == "60"
    assert run({"maintenance": False}).kind is Kind.ALLOW


@pytest.mark.parametrize(("method", "path", "host", "status", "location"), [
    ("GET", "/a/b?q=1", "example.com", 301, "https://example.com/a/b?q=1"),
    ("HEAD", "/", "example.com", 301, "https://example.com/"),
    ("POST", "/form", "example.com", 308, "https://example.com/form"),
    ("PUT", "/x", "example.com", 308, "https://example.com/x"),
    ("GET", "/", "Example.COM:80", 301, "https://example.com/"),
    ("GET", "/", "www.example.com.", 301, "https://www.example.com/"),
    ("GET", "/", "[2001:db8::1]:80", 301, "https://[2001:db8::1]/"),
    ("GET", "/", "evil.com/x", 301, "https://example.com/"),           # invalid Host: site name
    ("GET", "/", "a@evil.com", 301, "https://example.com/"),
    ("GET", "/", "", 301, "https://example.com/"),
    ("GET", "/a b\r\nX: y", "example.com", 301, "https://example.com/a%20b%0D%0AX:%20y"),
    ("GET", "/é", "example.com", 301, "https://example.com/%C3%A9"),
    ("GET", "http://example.com/p?q", "example.com", 301, "https://example.com/p?q"),
    ("OPTIONS", "*", "example.com", 308, "https://example.com/"),
    ("GET", "//evil.com/", "example.com", 301, "https://example.com//evil.com/"),
])
def test_https_redirect(method: str, path: str, host: str, status: int, location: str) -> None:
    d = run({}, path=path, method=method, scheme="http", site=SITE_REDIRECT, host=host)
    assert (d.kind, d.status, hdr(d, "Location")) == (Kind.REDIRECT, status, location)
    assert hdr(d, "Strict-Transport-Security") is None


@pytest.mark.parametrize(("target", "location"), [
    (b"/caf\xc3\xa9?q=\xc3\xa9", "https://example.com/caf%C3%A9?q=%C3%A9"),
    (b"/caf\xe9", "https://example.com/caf%E9"),            # the byte received, not its UTF-8
])
def test_https_redirect_keeps_raw_target_bytes(target: bytes, location: str) -> None:
    h = RequestHead.from_pairs(b"GET", target, [(b"Host", b"example.com")])
    d = evaluate_filters(h, "192.0.2.1", CompiledFilters.from_rules({}), scheme="http",
                         site=SITE_REDIRECT)
    assert hdr(d, "Location") == location


def test_redirect_wildcard_site_without_valid_host_is_400() -> None:
    site = Site("*.example.com", "t1", https_redirect=True)
    d = run({}, scheme="http", site=site, host="bad host")
    assert (d.kind, d.status) == (Kind.DENY, 400)
    d = run({}, scheme="http", site=site, host="a.example.com")
    assert hdr(d, "Location") == "https://a.example.com/"


def test_no_redirect_over_https_or_when_disabled() -> None:
    assert run({}, scheme="https", site=SITE_REDIRECT).kind is Kind.ALLOW
    assert run({}, scheme="http", site=SITE).kind is Kind.ALLOW


def test_hsts_only_over_https_on_every_decision() -> None:
    d = run({}, scheme="https", site=SITE_HSTS)
    assert d.kind is Kind.ALLOW and hdr(d, "Strict-Transport-Security") == HSTS_VALUE
    d = run({"path_deny": [{"prefix": "/x"}]}, path="/x", scheme="https", site=SITE_HSTS)
    assert d.kind is Kind.DENY and hdr(d, "Strict-Transport-Security") == HSTS_VALUE
    d = run({}, scheme="https", site=SITE)
    assert d.headers == ()
    plain = Site("example.com", "t1", hsts=True)
    assert run({}, scheme="http", site=plain).headers == ()


# -- methods -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("methods", "method", "kind"), [
    (["GET", "POST"], "GET", Kind.ALLOW),
    (["GET", "POST"], "HEAD", Kind.ALLOW),          # implied by GET
    (["GET", "POST"], "POST", Kind.ALLOW),
    (["GET", "POST"], "DELETE", Kind.METHOD_NOT_ALLOWED),
    (["GET", "POST"], "get", Kind.METHOD_NOT_ALLOWED),   # methods are case-sensitive
    (["GET", "POST"], "PROPFIND", Kind.METHOD_NOT_ALLOWED),
    (["POST"], "HEAD", Kind.METHOD_NOT_ALLOWED),
    (["post"], "POST", Kind.ALLOW),                 # validation upper-cases the rules
])
def test_methods(methods: list[str], method: str, kind: Kind) -> None:
    d = run({"methods": methods}, method=method)
    assert d.kind is kind
    if kind is Kind.METHOD_NOT_ALLOWED:
        assert d.status == 405
        allow = hdr(d, "Allow")
        assert allow is not None
        expected = {m.upper() for m in methods} | ({"HEAD"} if "GET" in methods else set())
        assert set(allow.split(", ")) == expected


def test_no_method_rule_allows_anything() -> None:
    assert run({}, method="BREW").kind is Kind.ALLOW


# -- path_deny ---------------------------------------------------------------------------------

GIT = {"path_deny": [{"prefix": "/.git"}, {"regex": r"\.(?:sql|bak)$"}, {"prefix": "/private/"}]}


@pytest.mark.parametrize(("path", "kind"), [
    ("/.git", Kind.DENY),
    ("/.git/config", Kind.DENY),
    ("/.gitignore", Kind.DENY),                 # plain prefix semantics
    ("/.GIT/config", Kind.ALLOW),               # case-sensitive (Linux file systems)
    ("/%2e%2e/.git/", Kind.DENY),
    ("/a/../.git", Kind.DENY),
    ("/a/b/../../.git/HEAD", Kind.DENY),
    ("//.git/config", Kind.DENY),
    ("/./.git", Kind.DENY),
    ("/%2egit/config", Kind.DENY),
    ("/%2Egit/config", Kind.DENY),
    ("/%2E%47%49%54", Kind.ALLOW),               # decodes to /.GIT
    ("/%2e%67%69%74/config", Kind.DENY),
    ("/%252egit", Kind.DENY),
    ("/x%2f..%2f.git", Kind.DENY),
    ("/x\\..\\.git", Kind.DENY),
    ("/x%5C..%5C.git", Kind.DENY),
    ("/.git%00", Kind.DENY),                    # NUL: 400
    ("/x%00/../.git", Kind.DENY),
    ("/static/.git-info/../app.js", Kind.ALLOW),
    ("/x?/.git", Kind.ALLOW),                   # the query is not the path
    ("/dump.sql", Kind.DENY),
    ("/dump%2esql", Kind.DENY),
    ("/dump.sql?x", Kind.DENY),
    ("/dump.sql/", Kind.ALLOW),
    ("/dump.sqlx", Kind.ALLOW),
    ("/private", Kind.ALLOW),
    ("/private/", Kind.DENY),
    ("/private//x", Kind.DENY),
    ("/public/../private/x", Kind.DENY),
    ("http://example.com/.git/config", Kind.DENY),
    ("/", Kind.ALLOW),
])
def test_path_deny(path: str, kind: Kind) -> None:
    d = run(GIT, path=path)
    assert d.kind is kind, d
    if kind is Kind.DENY:
        assert d.status in (400, 403)


def test_nul_in_path_is_400_even_without_path_rules() -> None:
    d = run({}, path="/a%00b")
    assert (d.kind, d.status) == (Kind.DENY, 400)


# -- user agent --------------------------------------------------------------------------------


@pytest.mark.parametrize(("ua", "kind"), [
    ("Mozilla/5.0", Kind.ALLOW),
    ("BadBot/1.0", Kind.DENY),
    ("xx badbot xx", Kind.DENY),
    ("sqlmap/1.5", Kind.DENY),
    (None, Kind.ALLOW),
    ("", Kind.ALLOW),
])
def test_user_agent_deny(ua: str | None, kind: Kind) -> None:
    rules = {"user_agent_deny": ["(?i)badbot", "^sqlmap"]}
    d = run(rules, user_agent=ua) if ua is not None else run(rules)
    assert d.kind is kind
    if kind is Kind.DENY:
        assert d.status == 403


def test_user_agent_deny_matching_empty_agent() -> None:
    assert run({"user_agent_deny": ["^$"]}).kind is Kind.DENY


# -- basic auth --------------------------------------------------------------------------------

AUTH = {"basic_auth": [
    {"prefix": "/admin", "realm": "staff", "users": {"ann": sha("s3cret"), "bob": sha("pässwörd")}},
    {"prefix": "/admin/super", "realm": "root \"zone\"", "users": {"root": sha("toor")}},
]}


@pytest.mark.parametrize(("path", "authorization", "kind", "user"), [
    ("/public", None, Kind.ALLOW, None),
    ("/admin", None, Kind.AUTH_REQUIRED, None),
    ("/admin/x", basic("ann", "s3cret"), Kind.ALLOW, "ann"),
    ("/admin/x", basic("bob", "pässwörd"), Kind.ALLOW, "bob"),
    ("/admin/x", basic("ann", "wrong"), Kind.AUTH_REQUIRED, None),
    ("/admin/x", basic("nobody", "s3cret"), Kind.AUTH_REQUIRED, None),
    ("/admin/x", basic("ann", ""), Kind.AUTH_REQUIRED, None),
    ("/admin/x", basic("", ""), Kind.AUTH_REQUIRED, None),
    ("/admin/x", "basic " + base64.b64encode(b"ann:s3cret").decode(), Kind.ALLOW, "ann"),
    ("/admin/x", "  Basic   " + base64.b64encode(b"ann:s3cret").decode() + " ", Kind.ALLOW, "ann"),
    ("/admin/x", "Basic !!!notbase64", Kind.AUTH_REQUIRED, None),
    ("/admin/x", "Basic " + base64.b64encode(b"ann:s3cret").decode()[:-2], Kind.AUTH_REQUIRED, None),
    ("/admin/x", "Basic " + base64.b64encode(b"anns3cret").decode(), Kind.AUTH_REQUIRED, None),
    ("/admin/x", "Basic " + base64.b64encode(b"\xff\xfe:\xff").decode(), Kind.AUTH_REQUIRED, None),
    ("/admin/x", "Basic é", Kind.AUTH_REQUIRED, None),
    ("/admin/x", "Basic", Kind.AUTH_REQUIRED, None),
    ("/admin/x", "Bearer abc", Kind.AUTH_REQUIRED, None),
    ("/admin/x", "", Kind.AUTH_REQUIRED, None),
    ("/admin/x", basic("ann", "s3cret:extra"), Kind.AUTH_REQUIRED, None),  # password has colon
    # the longest prefix decides: ann is not valid in /admin/super
    ("/admin/super/x", basic("ann", "s3cret"), Kind.AUTH_REQUIRED, None),
    ("/admin/super/x", basic("root", "toor"), Kind.ALLOW, "root"),
    ("/admin/x", basic("root", "toor"), Kind.AUTH_REQUIRED, None),
    # normalisation applies: dot segments cannot step out of (or around) an area
    ("/public/../admin/x", None, Kind.AUTH_REQUIRED, None),
    ("/%61dmin/x", None, Kind.AUTH_REQUIRED, None),
    ("//admin", None, Kind.AUTH_REQUIRED, None),
    ("/admin/super/../x", basic("ann", "s3cret"), Kind.ALLOW, "ann"),
])
def test_basic_auth(path: str, authorization: str | None, kind: Kind, user: str | None) -> None:
    extra = {"authorization": authorization} if authorization is not None else {}
    d = run(AUTH, path=path, **extra)
    assert d.kind is kind, d
    assert d.user == user
    if kind is Kind.AUTH_REQUIRED:
        assert d.status == 401
        realm = "root \\\"zone\\\"" if path.startswith("/admin/super") else "staff"
        assert hdr(d, "WWW-Authenticate") == f'Basic realm="{realm}", charset="UTF-8"'


def test_basic_auth_password_with_colon() -> None:
    rules = {"basic_auth": [{"prefix": "/", "users": {"u": sha("a:b")}}]}
    assert run(rules, authorization=basic("u", "a:b")).user == "u"
    d = run(rules)
    assert hdr(d, "WWW-Authenticate") == 'Basic realm="restricted", charset="UTF-8"'


# -- rate limit --------------------------------------------------------------------------------

RL = {"rate_limit": {"requests_per_second": 0.5, "burst": 2}}


def test_rate_limit_with_fake_clock_and_retry_after() -> None:
    clock = FakeClock()
    compiled = CompiledFilters.from_rules(RL)
    limiter = compiled.new_rate_limiter(clock=clock)
    assert limiter is not None

    def go(ip: str = "192.0.2.1") -> Decision:
        return evaluate_filters(head(), ip, compiled, scheme="https", site=SITE,
                                rate_limiter=limiter)

    assert [go().kind for _ in range(2)] == [Kind.ALLOW, Kind.ALLOW]
    d = go()
    assert (d.kind, d.status, hdr(d, "Retry-After")) == (Kind.RATE_LIMITED, 429, "2")
    clock.advance(0.5)  # 0.25 tokens: 1.5 s to go, rounded up
    assert hdr(go(), "Retry-After") == "2"
    clock.advance(1.0)  # 0.75 tokens: 0.5 s to go -> 1
    assert hdr(go(), "Retry-After") == "1"
    clock.advance(0.5)
    assert go().kind is Kind.ALLOW
    assert go("192.0.2.2").kind is Kind.ALLOW  # per client
    # the IPv4-mapped form of a client shares its bucket
    assert go("::ffff:192.0.2.1").kind is Kind.RATE_LIMITED


def test_rate_limit_ipv6_keyed_by_64() -> None:
    assert rate_limit_key("2001:db8:1:2:3::4") == rate_limit_key("2001:db8:1:2:ffff::1")
    assert rate_limit_key("2001:db8:1:2::1") == "2001:db8:1:2::/64"
    assert rate_limit_key("2001:db8:1:3::1") != rate_limit_key("2001:db8:1:2::1")
    assert rate_limit_key("::ffff:10.0.0.1") == "10.0.0.1"
    assert rate_limit_key("10.0.0.1") == "10.0.0.1"
    assert rate_limit_key("garbage:") == "garbage:"
    clock = FakeClock()
    limiter = RateLimiter(1, 1, clock=clock)
    compiled = CompiledFilters.from_rules({})
    first = evaluate_filters(head(), "2001:db8::1", compiled, scheme="https", site=SITE,
                             rate_limiter=limiter)
    second = evaluate_filters(head(), "2001:db8::2", compiled, scheme="https", site=SITE,
                              rate_limiter=limiter)
    assert (first.kind, second.kind) == (Kind.ALLOW, Kind.RATE_LIMITED)


def test_no_rate_limiter_without_rule() -> None:
    assert CompiledFilters.from_rules({}).new_rate_limiter() is None
    assert CompiledFilters.from_rules(RL).rate_limit == (0.5, 2)


# -- ordering ----------------------------------------------------------------------------------

EVERYTHING = {
    "ip_deny": ["198.51.100.7"],
    "maintenance": True,
    "methods": ["GET"],
    "path_deny": [{"prefix": "/.git"}],
    "user_agent_deny": ["badbot"],
    "basic_auth": [{"prefix": "/", "realm": "r", "users": {"u": sha("p")}}],
    "rate_limit": {"requests_per_second": 1, "burst": 1},
}


@pytest.mark.parametrize(("change", "request_kwargs", "kind"), [
    ({}, {"ip": "198.51.100.7", "scheme": "http"}, Kind.DENY),          # ip before all
    ({}, {"scheme": "http"}, Kind.MAINTENANCE),                          # maintenance before redirect
    ({"maintenance": False}, {"scheme": "http", "method": "POST"}, Kind.REDIRECT),  # before method
    ({"maintenance": False}, {"method": "POST", "path": "/.git"}, Kind.METHOD_NOT_ALLOWED),
    ({"maintenance": False}, {"path": "/.git", "user_agent": "badbot"}, Kind.DENY),
    ({"maintenance": False}, {"user_agent": "badbot"}, Kind.DENY),       # ua before auth
    ({"maintenance": False}, {}, Kind.AUTH_REQUIRED),
    ({"maintenance": False}, {"authorization": basic("u", "p")}, Kind.ALLOW),
])
def test_order(change: dict[str, Any], request_kwargs: dict[str, Any], kind: Kind) -> None:
    rules = {**EVERYTHING, **change}
    kwargs = dict(request_kwargs)
    d = run(rules, site=SITE_REDIRECT, limiter=RateLimiter(1, 1, clock=FakeClock()), **kwargs)
    assert d.kind is kind, d


def test_refused_requests_spend_no_tokens() -> None:
    clock = FakeClock()
    compiled = CompiledFilters.from_rules({**EVERYTHING, "maintenance": False})
    limiter = compiled.new_rate_limiter(clock=clock)

    def go(**headers: str) -> Kind:
        return evaluate_filters(head(**headers), "192.0.2.1", compiled, scheme="https",
                                site=SITE, rate_limiter=limiter).kind

    for _ in range(5):
        assert go() is Kind.AUTH_REQUIRED
        assert go(user_agent="badbot") is Kind.DENY
        assert evaluate_filters(head("/.git"), "192.0.2.1", compiled, scheme="https",
                                site=SITE, rate_limiter=limiter).kind is Kind.DENY
    assert go(authorization=basic("u", "p")) is Kind.ALLOW  # the one token is still there
    assert go(authorization=basic("u", "p")) is Kind.RATE_LIMITED


def test_allow_decisions_are_shared_constants() -> None:
    compiled = CompiledFilters.from_rules({})
    a = evaluate_filters(head(), "1.2.3.4", compiled, scheme="https", site=SITE)
    b = evaluate_filters(head("/x"), "1.2.3.4", compiled, scheme="https", site=SITE)
    assert a is b and a.allowed and a.status == 0


def test_from_rules_validates() -> None:
    with pytest.raises(ValidationError):
        CompiledFilters.from_rules({"path_deny": [{"prefix": "no-slash"}]})
    assert CompiledFilters.from_rules(None) == CompiledFilters.from_rules("")
    assert CompiledFilters.from_rules('{"maintenance": true}').maintenance


# -- properties --------------------------------------------------------------------------------

PROPERTY_RULES = CompiledFilters.from_rules({
    "ip_allow": ["0.0.0.0/0", "::/0"], "ip_deny": ["10.0.0.0/8", "2001:db8::/32"],
    "path_deny": [{"prefix": "/.git"}, {"regex": r"\.php$"}],
    "methods": ["GET", "POST"], "user_agent_deny": ["(?i)bot"],
    "basic_auth": [{"prefix": "/admin", "users": {"a": sha("b")}}],
    "rate_limit": {"requests_per_second": 100, "burst": 100},
})


@dataclass(frozen=True)
class FlagSite:
    hostname: str
    https_redirect: bool
    hsts: bool


text = st.text(st.characters(codec="utf-8"), max_size=40) | st.text(max_size=40)
ips = st.ip_addresses().map(str) | st.text(max_size=40) | st.ip_addresses(v=4).map(
    lambda a: f"::ffff:{a}")


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(method=text, path=text, host=text, ua=text, auth=text, ip=ips, scheme=st.sampled_from(
    ["http", "https"]), redirect=st.booleans(), hsts=st.booleans(),
    hostname=st.sampled_from(["example.com", "*.example.com", ""]))
def test_evaluate_filters_never_raises(method: str, path: str, host: str, ua: str, auth: str,
                                       ip: str, scheme: str, redirect: bool, hsts: bool,
                                       hostname: str) -> None:
    h = RequestHead(method, path, {"host": host, "user-agent": ua, "authorization": auth})
    limiter = PROPERTY_RULES.new_rate_limiter(clock=FakeClock())
    d = evaluate_filters(h, ip, PROPERTY_RULES, scheme=scheme,
                         site=FlagSite(hostname, redirect, hsts), rate_limiter=limiter)
    assert isinstance(d.kind, Kind)
    for name, value in d.headers:
        assert "\r" not in value and "\n" not in value, (name, value)
    d2 = evaluate_filters(h, ip, CompiledFilters.from_rules({}), scheme=scheme,
                          site=FlagSite(hostname, redirect, hsts))
    assert isinstance(d2.kind, Kind)


@settings(max_examples=200)
@given(st.lists(st.tuples(st.binary(max_size=20), st.binary(max_size=40)), max_size=5),
       st.binary(max_size=60))
def test_from_pairs_and_evaluate_never_raise_on_bytes(pairs: list[tuple[bytes, bytes]],
                                                     target: bytes) -> None:
    h = RequestHead.from_pairs(b"GET", target, pairs)
    evaluate_filters(h, "192.0.2.1", PROPERTY_RULES, scheme="http", site=SITE_HSTS)


SEGMENT = st.text(st.characters(codec="ascii", categories=["L", "N"]) | st.sampled_from(
    list("-_~.!$&'()*+,;=:@")), min_size=1, max_size=8).filter(lambda s: s not in (".", ".."))


def _encode(ch: str, how: int) -> str:
    # 0: as is, 1: %xx lowercase, 2: %XX uppercase, 3: double-encoded
    if how == 0 and ch not in "%?#":
        return ch
    code = "".join(f"%{b:02x}" for b in ch.encode())
    if how == 2:
        return code.upper()
    if how == 3:
        return code.replace("%", "%25")
    return code


@st.composite
def equivalent_path(draw: st.DrawFn, path: str) -> str:
    """``path`` re-spelt: random percent-encoding (any case, double), extra ``./``,
    ``x/../`` detours, doubled slashes and backslashes for separators."""
    segments = path.split("/")[1:]
    out: list[str] = []
    for seg in segments:
        for _ in range(draw(st.integers(0, 2))):
            out.append(draw(st.sampled_from([".", "%2e", "%2E", "%252e"])))
        if draw(st.booleans()):
            junk = draw(SEGMENT)
            out.append(junk)
            out.append(draw(st.sampled_from(["..", "%2e%2e", "%2E.", ".%2e", "%252e%252e"])))
        out.append("".join(_encode(ch, draw(st.integers(0, 3))) for ch in seg))
    result = ""
    for seg in out:
        sep = draw(st.sampled_from(["/", "/", "//", "\\", "%2f", "%5C"]))
        result += sep + seg
    if result and not result.startswith("/"):
        result = "/" + result
    return result or "/"


DENIED_PREFIXES = ["/.git", "/private/", "/wp-config.php", "/a b/ü"]
DENY_RULES = CompiledFilters.from_rules({"path_deny": [{"prefix": p} for p in DENIED_PREFIXES]})


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), prefix=st.sampled_from(DENIED_PREFIXES),
       tail=st.lists(SEGMENT, max_size=3))
def test_denied_prefix_denied_under_any_encoding(data: st.DataObject, prefix: str,
                                                 tail: list[str]) -> None:
    path = prefix + "/".join(tail) if prefix.endswith("/") else prefix + "".join(
        "/" + t for t in tail)
    spelt = data.draw(equivalent_path(path))
    query = data.draw(st.sampled_from(["", "?x=1", "?/../../ok"]))
    d = evaluate_filters(RequestHead("GET", spelt + query, {}), "192.0.2.1", DENY_RULES,
                         scheme="https", site=SITE)
    assert d.kind is Kind.DENY, (path, spelt)


_FILTER_RULES = {
    "ip_deny": ["10.0.0.0/8", "2001:db8::/32"], "ip_allow": ["0.0.0.0/0", "::/0"],
    "path_deny": [{"prefix": "/admin"}, {"regex": r"\.env$"}], "methods": ["GET", "POST"],
    "user_agent_deny": ["(?i)badbot"],
    "basic_auth": [{"prefix": "/private", "realm": "R", "users": {"u": sha("pw")}}],
}


@pytest.mark.parametrize(("method", "target", "pairs", "client"), [
    ("GET", "/", [("Host", "example.com"), ("User-Agent", "curl/8")], "192.0.2.1"),
    ("GET", "/", [("Host", "example.com")], "10.1.2.3"),
    ("GET", "/", [("Host", "example.com")], "2001:db8::1"),
    ("GET", "/", [("Host", "example.com")], "::ffff:10.0.0.1"),
    ("GET", "/", [("Host", "example.com")], "not-an-ip"),
    ("DELETE", "/", [("Host", "example.com")], "192.0.2.1"),
    ("GET", "/%61dmin/x", [("Host", "example.com")], "192.0.2.1"),
    ("GET", "/app/.env", [("Host", "example.com")], "192.0.2.1"),
    ("GET", "/", [("Host", "example.com"), ("User-Agent", "x"), ("User-Agent", "BadBot/1")],
     "192.0.2.1"),
    ("GET", "/private/a", [("Host", "example.com"), ("Authorization", basic("u", "pw"))],
     "192.0.2.1"),
    ("GET", "/private/a", [("Host", "example.com"), ("Authorization", basic("u", "no"))],
     "192.0.2.1"),
    ("GET", "/private/a", [("Host", "example.com"), ("Cookie", "a=b")], "192.0.2.1"),
])
@pytest.mark.parametrize("site", [SITE, SITE_REDIRECT, SITE_HSTS])
def test_filter_head_decides_like_the_full_head(method: str, target: str,
                                                pairs: list[tuple[str, str]], client: str,
                                                site: Site) -> None:
    """The proxy hands evaluate_filters a head with only FILTER_HEADERS (repeats joined as
    from_pairs joins them); every decision, and the IP outcome remembered per client, is the
    one the full head gets."""
    compiled = CompiledFilters.from_rules(_FILTER_RULES)
    raw = [(n.encode(), v.encode()) for n, v in pairs]

    def joined(name: str) -> bytes | None:
        values = [v for n, v in raw if n.lower() == name.encode()]
        return b", ".join(values) if values else None

    small = RequestHead.for_filters(method.encode(), target.encode(), joined("host"),
                                    joined("user-agent"), joined("authorization"))
    full = RequestHead.from_pairs(method, target, pairs)
    for scheme in ("http", "https"):
        expected = evaluate_filters(full, client, CompiledFilters.from_rules(_FILTER_RULES),
                                    scheme=scheme, site=site)
        for _ in range(2):  # the second time the client's IP outcome is remembered
            assert evaluate_filters(small, client, compiled, scheme=scheme, site=site) == expected


_SPLIT_RULES = CompiledFilters.from_rules({
    "ip_allow": ["0.0.0.0/0", "::/0"], "ip_deny": ["10.0.0.0/8", "2001:db8::/32"],
    "path_deny": [{"prefix": "/.git"}, {"regex": r"\.php$"}], "methods": ["GET", "POST"],
    "user_agent_deny": ["(?i)bot"], "maintenance": False,
})


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(method=st.sampled_from(["GET", "HEAD", "POST", "PUT"]) | text, path=text, host=text,
       ua=text, ip=ips, other_ip=ips, scheme=st.sampled_from(["http", "https"]),
       redirect=st.booleans(), hsts=st.booleans(),
       hostname=st.sampled_from(["example.com", "*.example.com"]))
def test_ip_step_then_the_rest_decides_like_evaluate_filters(
        method: str, path: str, host: str, ua: str, ip: str, other_ip: str, scheme: str,
        redirect: bool, hsts: bool, hostname: str) -> None:
    """The proxy checks the IP rules (ip_refusal) and remembers the rest (evaluate_after_ip)
    per request shape, for any client: the split gives evaluate_filters' decision, and without
    a rate limit the rest does not depend on the client address."""
    h = RequestHead(method, path, {"host": host, "user-agent": ua})
    site = FlagSite(hostname, redirect, hsts)
    expected = evaluate_filters(h, ip, _SPLIT_RULES, scheme=scheme, site=site)
    refused = ip_refusal(ip, _SPLIT_RULES, scheme=scheme, site=site)
    rest = evaluate_after_ip(h, ip, _SPLIT_RULES, scheme=scheme, site=site)
    assert (refused if refused is not None else rest) == expected
    assert evaluate_after_ip(h, other_ip, _SPLIT_RULES, scheme=scheme, site=site) == rest
