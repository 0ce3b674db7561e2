"""Per-site JSON rules: canonical forms, every refusal names the bad field, and arbitrary
JSON never raises anything but ValidationError."""

from __future__ import annotations

import contextlib
import json
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.directory.rules import (
    DEFAULT_STATIC_EXTENSIONS,
    DEFAULT_TTL,
    validate_cache_policy,
    validate_filters,
)
from edge.errors import ValidationError

SHA = "a" * 64


@pytest.mark.parametrize(("given_", "expected"), [
    (None, {}), ("", {}), ("{}", {}), ({}, {}),
    ({"ip_allow": ["203.0.113.7/24", "198.51.100.7", "2001:db8::1"]},
     {"ip_allow": ["203.0.113.0/24", "198.51.100.7/32", "2001:db8::1/128"]}),
    ({"ip_deny": []}, {"ip_deny": []}),
    ({"path_deny": [{"prefix": "/.git"}, {"regex": r"\.php$"}]},
     {"path_deny": [{"prefix": "/.git"}, {"regex": r"\.php$"}]}),
    ({"methods": ["get", "Head", "POST"]}, {"methods": ["GET", "HEAD", "POST"]}),
    ({"user_agent_deny": ["(?i)badbot"]}, {"user_agent_deny": ["(?i)badbot"]}),
    ({"rate_limit": {"requests_per_second": 10}},
     {"rate_limit": {"requests_per_second": 10, "burst": 10}}),
    ({"rate_limit": {"requests_per_second": 0.5}},
     {"rate_limit": {"requests_per_second": 0.5, "burst": 1}}),
    ({"rate_limit": {"requests_per_second": 2.5, "burst": 7}},
     {"rate_limit": {"requests_per_second": 2.5, "burst": 7}}),
    ({"basic_auth": [{"users": {"ann": SHA}}]},
     {"basic_auth": [{"prefix": "/", "realm": "restricted", "users": {"ann": SHA}}]}),
    ({"basic_auth": [{"prefix": "/admin", "realm": "staff", "users": {"ann": SHA}}]},
     {"basic_auth": [{"prefix": "/admin", "realm": "staff", "users": {"ann": SHA}}]}),
    ({"maintenance": True}, {"maintenance": True}),
    ('{"methods": ["get"], "maintenance": false}', {"methods": ["GET"], "maintenance": False}),
])
def test_filters_canonical(given_: Any, expected: dict[str, Any]) -> None:
    assert validate_filters(given_) == expected
    assert validate_filters(json.dumps(expected)) == expected  # canonical form is stable


@pytest.mark.parametrize(("rules", "path"), [
    ("{", "filters: not valid JSON"),
    ("[1, 2]", "filters: must be a JSON object"),
    ('"text"', "filters: must be a JSON object"),
    ({"bogus": 1}, "filters: unknown field 'bogus'"),
    ({"ip_allow": "10.0.0.0/8"}, "filters.ip_allow: must be a list of strings"),
    ({"ip_allow": [1]}, "filters.ip_allow: must be a list of strings"),
    ({"ip_allow": ["10.0.0.0/8", "nope"]}, r"filters.ip_allow\[1\]: 'nope' is not"),
    ({"ip_deny": ["300.1.1.1"]}, r"filters.ip_deny\[0\]"),
    ({"ip_deny": ["10.0.0.0/33"]}, r"filters.ip_deny\[0\]"),
    ({"path_deny": {"prefix": "/x"}}, "filters.path_deny: must be a list"),
    ({"path_deny": ["/x"]}, r"filters.path_deny\[0\]: must be a JSON object"),
    ({"path_deny": [{}]}, r"filters.path_deny\[0\]: needs exactly one"),
    ({"path_deny": [{"prefix": "/a", "regex": "b"}]}, r"filters.path_deny\[0\]: needs exactly"),
    ({"path_deny": [{"glob": "*"}]}, r"filters.path_deny\[0\]: unknown field 'glob'"),
    ({"path_deny": [{"prefix": "x"}]}, r"filters.path_deny\[0\].prefix: must be a path"),
    ({"path_deny": [{"regex": "("}]}, r"filters.path_deny\[0\].regex: invalid regex"),
    ({"path_deny": [{"regex": 5}]}, r"filters.path_deny\[0\].regex: must be a string"),
    ({"path_deny": [{"regex": "a" * 513}]}, r"filters.path_deny\[0\].regex: regex longer"),
    ({"methods": ["GET", "FETCH"]}, "filters.methods: unknown method 'FETCH'"),
    ({"methods": "GET"}, "filters.methods: must be a list of strings"),
    ({"user_agent_deny": ["ok", "[unclosed"]}, r"filters.user_agent_deny\[1\]: invalid regex"),
    ({"rate_limit": 5}, "filters.rate_limit: must be a JSON object"),
    ({"rate_limit": {}}, "filters.rate_limit: needs 'requests_per_second'"),
    ({"rate_limit": {"requests_per_second": 0}},
     "filters.rate_limit.requests_per_second: must be >="),
    ({"rate_limit": {"requests_per_second": "5"}},
     "filters.rate_limit.requests_per_second: must be a number"),
    ({"rate_limit": {"requests_per_second": True}},
     "filters.rate_limit.requests_per_second: must be a number"),
    ({"rate_limit": {"requests_per_second": 5, "burst": 1.5}},
     "filters.rate_limit.burst: must be an integer"),
    ({"rate_limit": {"requests_per_second": 5, "burst": 0}}, "filters.rate_limit.burst: must be"),
    ({"rate_limit": {"requests_per_second": 5, "per": "minute"}},
     "filters.rate_limit: unknown field 'per'"),
    ({"basic_auth": {}}, "filters.basic_auth: must be a list"),
    ({"basic_auth": [{"prefix": "/"}]}, r"filters.basic_auth\[0\].users: must be a non-empty"),
    ({"basic_auth": [{"users": {}}]}, r"filters.basic_auth\[0\].users: must be a non-empty"),
    ({"basic_auth": [{"users": {"ann": "secret"}}]},
     r"filters.basic_auth\[0\].users.ann: must be the SHA-256"),
    ({"basic_auth": [{"users": {"ann": SHA.upper()}}]}, r"filters.basic_auth\[0\].users.ann"),
    ({"basic_auth": [{"users": {"ann": SHA}, "prefix": "admin"}]},
     r"filters.basic_auth\[0\].prefix: must be a path"),
    ({"basic_auth": [{"users": {"ann": SHA}, "password": "x"}]},
     r"filters.basic_auth\[0\]: unknown field 'password'"),
    ({"maintenance": "yes"}, "filters.maintenance: must be true or false"),
    ({"maintenance": 1}, "filters.maintenance: must be true or false"),
])
def test_filters_refused(rules: Any, path: str) -> None:
    with pytest.raises(ValidationError, match="^" + path):
        validate_filters(rules)


@pytest.mark.parametrize(("given_", "expected"), [
    (None, {}), ("", {}), ({}, {}),
    ({"mode": "off"}, {"mode": "off", "ttl": DEFAULT_TTL}),
    ({"mode": "static"},
     {"mode": "static", "ttl": DEFAULT_TTL, "extensions": list(DEFAULT_STATIC_EXTENSIONS)}),
    ({"mode": "static", "extensions": [".CSS", "Js"]},
     {"mode": "static", "ttl": DEFAULT_TTL, "extensions": ["css", "js"]}),
    ({"mode": "off", "ttl": {"200": 5}}, {"mode": "off", "ttl": {"200": 5}}),
    ("standard", {"mode": "standard", "ttl": {}}),    # a bare mode name (CLI shorthand)
    (" full ", {"mode": "full", "ttl": DEFAULT_TTL}),
    # no mode: standard (RFC 9111 as the origin says), no TTLs of ours
    ({"stale_if_error": 60}, {"mode": "standard", "ttl": {}, "stale_if_error": 60}),
    ({"mode": "standard", "target": "Edge-Cache-Control", "set_cookie": "strip",
      "heuristic_fraction": 0.2, "heuristic_max": 3600, "x_cache": False, "cache_status": True},
     {"mode": "standard", "ttl": {}, "target": "edge-cache-control", "set_cookie": "strip",
      "heuristic_fraction": 0.2, "heuristic_max": 3600, "x_cache": False, "cache_status": True}),
    ({"mode": "full", "ttl": {"200": 60, "301": 3600.5}},
     {"mode": "full", "ttl": {"200": 60, "301": 3600.5}}),
    ({"mode": "wordpress", "bypass_cookies": ["wordpress_logged_in_"],
      "paths": [{"prefix": "/news", "ttl": 30}, {"prefix": "/cart", "bypass": True}],
      "stale_while_revalidate": 30, "stale_if_error": 300, "max_object_bytes": 10485760},
     {"mode": "wordpress", "ttl": DEFAULT_TTL, "bypass_cookies": ["wordpress_logged_in_"],
      "paths": [{"prefix": "/news", "ttl": 30}, {"prefix": "/cart", "bypass": True}],
      "stale_while_revalidate": 30, "stale_if_error": 300, "max_object_bytes": 10485760}),
])
def test_cache_policy_canonical(given_: Any, expected: dict[str, Any]) -> None:
    assert validate_cache_policy(given_) == expected
    assert validate_cache_policy(json.dumps(expected)) == expected


@pytest.mark.parametrize(("policy", "path"), [
    ("{bad", "cache_policy: not valid JSON"),
    ("[]", "cache_policy: must be a JSON object"),
    ({"mood": "full"}, "cache_policy: unknown field 'mood'"),
    ({"mode": "everything"},
     "cache_policy.mode: must be one of off, standard, static, full, wordpress"),
    ({"ttl": {"200": 5}}, "cache_policy.ttl: mode standard follows the origin's headers"),
    ({"mode": "standard", "paths": [{"prefix": "/a", "ttl": 1}]},
     r"cache_policy.paths\[0\].ttl: mode standard takes no operator TTLs"),
    ({"heuristic_fraction": 2}, "cache_policy.heuristic_fraction: must be <= 1"),
    ({"heuristic_max": -1}, "cache_policy.heuristic_max: must be >= 0"),
    ({"target": "Cache-Control"}, "cache_policy.target: must be a header field name other"),
    ({"target": "bad name"}, "cache_policy.target: must be a header field name"),
    ({"set_cookie": "keep"}, "cache_policy.set_cookie: must be one of no-store, strip"),
    ({"x_cache": "yes"}, "cache_policy.x_cache: must be true or false"),
    ({"mode": None}, "cache_policy.mode: must be one of"),
    ({"ttl": 60}, "cache_policy.ttl: must be a JSON object"),
    ({"ttl": {"600": 1}}, "cache_policy.ttl: unknown field '600'"),
    ({"ttl": {"ok": 1}}, "cache_policy.ttl: unknown field 'ok'"),
    ({"ttl": {"200": -1}}, "cache_policy.ttl.200: must be >= 0"),
    ({"ttl": {"200": "60"}}, "cache_policy.ttl.200: must be a number"),
    ({"paths": {}}, "cache_policy.paths: must be a list"),
    ({"paths": [{"prefix": "/a"}]}, r"cache_policy.paths\[0\]: needs 'ttl' or 'bypass'"),
    ({"paths": [{"ttl": 3}]}, r"cache_policy.paths\[0\].prefix: must be a path"),
    ({"paths": [{"prefix": "/a", "ttl": 1}, {"prefix": "b", "ttl": 1}]},
     r"cache_policy.paths\[1\].prefix"),
    ({"paths": [{"prefix": "/a", "bypass": "yes"}]}, r"cache_policy.paths\[0\].bypass: must be"),
    ({"paths": [{"prefix": "/a", "ttl": -5}]}, r"cache_policy.paths\[0\].ttl: must be >= 0"),
    ({"paths": [{"prefix": "/a", "cookie": 1}]}, r"cache_policy.paths\[0\]: unknown field"),
    ({"extensions": "css"}, "cache_policy.extensions: must be a list of strings"),
    ({"bypass_cookies": [1]}, "cache_policy.bypass_cookies: must be a list of strings"),
    ({"stale_while_revalidate": -1}, "cache_policy.stale_while_revalidate: must be >= 0"),
    ({"stale_if_error": "1h"}, "cache_policy.stale_if_error: must be a number"),
    ({"max_object_bytes": 0}, "cache_policy.max_object_bytes: must be >= 1"),
    ({"max_object_bytes": 1.5}, "cache_policy.max_object_bytes: must be an integer"),
])
def test_cache_policy_refused(policy: Any, path: str) -> None:
    with pytest.raises(ValidationError, match="^" + path):
        validate_cache_policy(policy)


# -- arbitrary JSON -------------------------------------------------------------------------

FILTER_KEYS = ["ip_allow", "ip_deny", "path_deny", "methods", "user_agent_deny", "rate_limit",
               "basic_auth", "maintenance", "prefix", "regex", "requests_per_second", "burst",
               "users", "realm"]
POLICY_KEYS = ["mode", "ttl", "paths", "extensions", "bypass_cookies", "stale_while_revalidate",
               "stale_if_error", "max_object_bytes", "prefix", "bypass", "200", "404", "static"]
SCALARS = (st.none() | st.booleans() | st.integers(-10**20, 10**20)
           | st.floats(allow_nan=False, allow_infinity=False)
           | st.sampled_from(["", "/", "/x", "GET", "get", "10.0.0.0/8", "::1", "(", "a" * 64,
                              "static", "full", "off", "wordpress", "css"])
           | st.text(max_size=8))


def json_values(keys: list[str]) -> st.SearchStrategy[Any]:
    return st.recursive(SCALARS, lambda children: st.lists(children, max_size=4) | st.dictionaries(
        st.sampled_from(keys) | st.text(max_size=4), children, max_size=5), max_leaves=25)


def _only_validation_errors(validate: Any, value: Any) -> None:
    for form in (value, json.dumps(value)) if isinstance(value, dict) else (json.dumps(value),):
        try:
            result = validate(form)
        except ValidationError:
            continue
        json.dumps(result)  # canonical rules are JSON again
        assert validate(result) == result


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(FILTER_KEYS), json_values(FILTER_KEYS), max_size=5)
       | json_values(FILTER_KEYS))
def test_random_filters_raise_only_validation_error(value: Any) -> None:
    _only_validation_errors(validate_filters, value)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(POLICY_KEYS), json_values(POLICY_KEYS), max_size=5)
       | json_values(POLICY_KEYS))
def test_random_cache_policies_raise_only_validation_error(value: Any) -> None:
    _only_validation_errors(validate_cache_policy, value)


@given(st.text(max_size=40))
def test_random_text_raises_only_validation_error(text: str) -> None:
    for validate in (validate_filters, validate_cache_policy):
        with contextlib.suppress(ValidationError):
            validate(text)


# -- holes found by this suite, now fixed ------------------------------------------------


@pytest.mark.parametrize("text", ['{"rate_limit": {"requests_per_second": Infinity}}',
                                  '{"rate_limit": {"requests_per_second": NaN}}'])
def test_non_finite_rate_is_a_validation_error(text: str) -> None:
    with pytest.raises(ValidationError, match=r"filters\.rate_limit\.requests_per_second"):
        validate_filters(text)


def test_nan_ttl_is_refused() -> None:
    assert math.isnan(float("nan"))
    with pytest.raises(ValidationError, match=r"cache_policy\.ttl\.200"):
        validate_cache_policy('{"ttl": {"200": NaN}}')


def test_huge_repeat_regex_is_a_validation_error() -> None:
    with pytest.raises(ValidationError, match=r"filters.path_deny\[0\].regex"):
        validate_filters({"path_deny": [{"regex": "a{4294967296}"}]})
