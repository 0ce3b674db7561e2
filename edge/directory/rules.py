"""Schemas for the per-site JSON rules, checked on write.

A site's ``filters`` and ``cache_policy`` are validated here when an operator writes them, so
a typo is refused at the CLI with the path of the bad field, never discovered at request time.
The HTTP proxy may therefore trust the shape of what it reads. Validation returns the rules
in canonical form (defaults filled in where that removes guessing later).

filters::

    {"ip_allow": ["203.0.113.0/24"], "ip_deny": ["198.51.100.7"],
     "path_deny": [{"prefix": "/.git"}, {"regex": "\\\\.php$"}],
     "methods": ["GET", "HEAD", "POST"],
     "user_agent_deny": ["(?i)badbot"],
     "rate_limit": {"requests_per_second": 10, "burst": 20},
     "basic_auth": [{"prefix": "/admin", "realm": "staff", "users": {"ann": "<sha256 hex>"}}],
     "maintenance": false}

cache_policy::

    {"mode": "standard" | "off" | "static" | "full" | "wordpress",
     "ttl": {"200": 600, "404": 60},           # not in standard mode
     "paths": [{"prefix": "/news", "ttl": 30}, {"prefix": "/cart", "bypass": true}],
     "extensions": ["css", "js", "png"],       # static mode
     "bypass_cookies": ["wordpress_logged_in_"],
     "stale_while_revalidate": 30, "stale_if_error": 300, "max_object_bytes": 10485760,
     "heuristic_fraction": 0.1, "heuristic_max": 86400,
     "target": "Edge-Cache-Control",           # obeyed before CDN-Cache-Control (RFC 9213)
     "set_cookie": "no-store" | "strip", "x_cache": true,
     "cache_status": true}                     # default: true in standard, false elsewhere

A policy that names no mode is ``standard``: the origin's headers decide (RFC 9111), with no
TTLs of the operator's; ``full``, ``static`` and ``wordpress`` add operator TTLs for
responses that carry no freshness information (``ttl`` defaults to DEFAULT_TTL there).
"""

from __future__ import annotations

import ipaddress
import json
import math
import re
from typing import Any

from edge.errors import ValidationError

HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE"})
CACHE_MODES = ("off", "standard", "static", "full", "wordpress")
SET_COOKIE_CHOICES = ("no-store", "strip")
_FIELD_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
DEFAULT_STATIC_EXTENSIONS = ("css", "js", "png", "jpg", "jpeg", "gif", "svg", "webp", "ico",
                             "woff", "woff2", "ttf", "mp4", "pdf")
DEFAULT_TTL = {"200": 600, "404": 60}
_MAX_REGEX = 512


def _fail(path: str, message: str) -> ValidationError:
    return ValidationError(f"{path}: {message}")


def _obj(path: str, value: Any, keys: set[str]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _fail(path, "must be a JSON object")
    unknown = set(value) - keys
    if unknown:
        raise _fail(path, f"unknown field {sorted(unknown)[0]!r} (known: {', '.join(sorted(keys))})")
    return value


def _str_list(path: str, value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _fail(path, "must be a list of strings")
    return list(value)


def _number(path: str, value: Any, *, minimum: float = 0, integer: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or (
            integer and not isinstance(value, int)) or not math.isfinite(value):
        # json.loads accepts NaN and Infinity; neither is a usable rate, TTL or size.
        raise _fail(path, "must be an integer" if integer else "must be a number")
    if value < minimum:
        raise _fail(path, f"must be >= {minimum}")
    return value


def _regex(path: str, pattern: Any) -> str:
    if not isinstance(pattern, str):
        raise _fail(path, "must be a string")
    if len(pattern) > _MAX_REGEX:
        raise _fail(path, f"regex longer than {_MAX_REGEX} characters")
    try:
        re.compile(pattern)
    except (re.error, OverflowError, RecursionError) as exc:
        # OverflowError: a repeat count like a{4294967296}; RecursionError: absurd nesting.
        raise _fail(path, f"invalid regex: {exc}") from None
    return pattern


def _prefix(path: str, value: Any) -> str:
    if not isinstance(value, str) or not value.startswith("/"):
        raise _fail(path, "must be a path starting with '/'")
    return value


def _cidrs(path: str, value: Any) -> list[str]:
    out = []
    for i, item in enumerate(_str_list(path, value)):
        try:
            out.append(str(ipaddress.ip_network(item, strict=False)))
        except ValueError:
            raise _fail(f"{path}[{i}]", f"{item!r} is not an IP address or CIDR") from None
    return out


def _parse(text_or_obj: str | dict[str, Any] | None, what: str) -> dict[str, Any]:
    if text_or_obj is None or text_or_obj == "":
        return {}
    if isinstance(text_or_obj, dict):
        return text_or_obj
    try:
        value = json.loads(text_or_obj)
    except json.JSONDecodeError as exc:
        raise ValidationError(f"{what}: not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ValidationError(f"{what}: must be a JSON object")
    return value


def validate_filters(rules: str | dict[str, Any] | None) -> dict[str, Any]:
    """Check a site's filter rules; returns them canonicalised or raises ValidationError."""
    data = _obj("filters", _parse(rules, "filters"), {
        "ip_allow", "ip_deny", "path_deny", "methods", "user_agent_deny", "rate_limit",
        "basic_auth", "maintenance"})
    out: dict[str, Any] = {}
    for key in ("ip_allow", "ip_deny"):
        if key in data:
            out[key] = _cidrs(f"filters.{key}", data[key])
    if "path_deny" in data:
        items = data["path_deny"]
        if not isinstance(items, list):
            raise _fail("filters.path_deny", "must be a list of {\"prefix\"} or {\"regex\"} objects")
        rules_out = []
        for i, item in enumerate(items):
            p = f"filters.path_deny[{i}]"
            item = _obj(p, item, {"prefix", "regex"})
            if len(item) != 1:
                raise _fail(p, "needs exactly one of 'prefix' or 'regex'")
            if "prefix" in item:
                rules_out.append({"prefix": _prefix(f"{p}.prefix", item["prefix"])})
            else:
                rules_out.append({"regex": _regex(f"{p}.regex", item["regex"])})
        out["path_deny"] = rules_out
    if "methods" in data:
        methods = [m.upper() for m in _str_list("filters.methods", data["methods"])]
        bad = [m for m in methods if m not in HTTP_METHODS]
        if bad:
            raise _fail("filters.methods", f"unknown method {bad[0]!r}")
        out["methods"] = methods
    if "user_agent_deny" in data:
        out["user_agent_deny"] = [_regex(f"filters.user_agent_deny[{i}]", p)
                                  for i, p in enumerate(_str_list("filters.user_agent_deny",
                                                                  data["user_agent_deny"]))]
    if "rate_limit" in data:
        rl = _obj("filters.rate_limit", data["rate_limit"], {"requests_per_second", "burst"})
        if "requests_per_second" not in rl:
            raise _fail("filters.rate_limit", "needs 'requests_per_second'")
        rps = _number("filters.rate_limit.requests_per_second", rl["requests_per_second"],
                      minimum=0.001)
        burst = _number("filters.rate_limit.burst", rl.get("burst", max(1, int(rps))), minimum=1,
                        integer=True)
        out["rate_limit"] = {"requests_per_second": rps, "burst": burst}
    if "basic_auth" in data:
        if not isinstance(data["basic_auth"], list):
            raise _fail("filters.basic_auth", "must be a list")
        areas = []
        for i, area in enumerate(data["basic_auth"]):
            p = f"filters.basic_auth[{i}]"
            area = _obj(p, area, {"prefix", "realm", "users"})
            users = area.get("users")
            if not isinstance(users, dict) or not users:
                raise _fail(f"{p}.users", "must be a non-empty object of user: sha256-hex")
            for user, digest in users.items():
                if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
                    raise _fail(f"{p}.users.{user}", "must be the SHA-256 hex of the password")
            areas.append({"prefix": _prefix(f"{p}.prefix", area.get("prefix", "/")),
                          "realm": str(area.get("realm", "restricted")), "users": dict(users)})
        out["basic_auth"] = areas
    if "maintenance" in data:
        if not isinstance(data["maintenance"], bool):
            raise _fail("filters.maintenance", "must be true or false")
        out["maintenance"] = data["maintenance"]
    return out


def validate_cache_policy(policy: str | dict[str, Any] | None) -> dict[str, Any]:
    """Check a site's cache policy; returns it canonicalised or raises ValidationError.
    A bare mode name (``standard``, ``off``, ...) is short for ``{"mode": NAME}``."""
    if isinstance(policy, str) and policy.strip() in CACHE_MODES:
        policy = {"mode": policy.strip()}
    data = _obj("cache_policy", _parse(policy, "cache_policy"), {
        "mode", "ttl", "paths", "extensions", "bypass_cookies", "stale_while_revalidate",
        "stale_if_error", "max_object_bytes", "heuristic_fraction", "heuristic_max", "target",
        "set_cookie", "x_cache", "cache_status"})
    if not data:
        return {}
    mode = data.get("mode", "standard")
    if mode not in CACHE_MODES:
        raise _fail("cache_policy.mode", f"must be one of {', '.join(CACHE_MODES)}")
    out: dict[str, Any] = {"mode": mode}
    ttl = _obj("cache_policy.ttl", data.get("ttl", {} if mode == "standard" else DEFAULT_TTL),
               set(map(str, range(100, 600))))
    out["ttl"] = {status: _number(f"cache_policy.ttl.{status}", seconds)
                  for status, seconds in ttl.items()}
    if "paths" in data:
        if not isinstance(data["paths"], list):
            raise _fail("cache_policy.paths", "must be a list")
        paths = []
        for i, rule in enumerate(data["paths"]):
            p = f"cache_policy.paths[{i}]"
            rule = _obj(p, rule, {"prefix", "ttl", "bypass"})
            item: dict[str, Any] = {"prefix": _prefix(f"{p}.prefix", rule.get("prefix"))}
            if "ttl" in rule:
                item["ttl"] = _number(f"{p}.ttl", rule["ttl"])
            if "bypass" in rule:
                if not isinstance(rule["bypass"], bool):
                    raise _fail(f"{p}.bypass", "must be true or false")
                item["bypass"] = rule["bypass"]
            if len(item) == 1:
                raise _fail(p, "needs 'ttl' or 'bypass'")
            paths.append(item)
        out["paths"] = paths
    if "extensions" in data:
        out["extensions"] = [e.lower().lstrip(".") for e in
                             _str_list("cache_policy.extensions", data["extensions"])]
    elif mode == "static":
        out["extensions"] = list(DEFAULT_STATIC_EXTENSIONS)
    if "bypass_cookies" in data:
        out["bypass_cookies"] = _str_list("cache_policy.bypass_cookies", data["bypass_cookies"])
    for key in ("stale_while_revalidate", "stale_if_error"):
        if key in data:
            out[key] = _number(f"cache_policy.{key}", data[key])
    if "max_object_bytes" in data:
        out["max_object_bytes"] = _number("cache_policy.max_object_bytes",
                                          data["max_object_bytes"], minimum=1, integer=True)
    _validate_cache_extras(data, out)
    if mode == "standard":
        _refuse_operator_ttls(out)
    return out


def _refuse_operator_ttls(out: dict[str, Any]) -> None:
    """Mode standard lets the origin's headers alone set lifetimes: no TTLs of ours."""
    if out["ttl"]:
        raise _fail("cache_policy.ttl", "mode standard follows the origin's headers; "
                    "operator TTLs need mode full, static or wordpress")
    for i, rule in enumerate(out.get("paths", ())):
        if "ttl" in rule:
            raise _fail(f"cache_policy.paths[{i}].ttl", "mode standard takes no operator "
                        "TTLs (use mode full, static or wordpress)")


def _validate_cache_extras(data: dict[str, Any], out: dict[str, Any]) -> None:
    """Heuristics, the targeted field, Set-Cookie handling and the status headers."""
    if "heuristic_fraction" in data:
        fraction = _number("cache_policy.heuristic_fraction", data["heuristic_fraction"])
        if fraction > 1:
            raise _fail("cache_policy.heuristic_fraction", "must be <= 1")
        out["heuristic_fraction"] = fraction
    if "heuristic_max" in data:
        out["heuristic_max"] = _number("cache_policy.heuristic_max", data["heuristic_max"])
    if "target" in data:
        target = data["target"]
        if not isinstance(target, str) or not _FIELD_NAME.fullmatch(target) or \
                target.lower() in ("cache-control", "cdn-cache-control"):
            raise _fail("cache_policy.target", "must be a header field name other than "
                        "Cache-Control and CDN-Cache-Control (e.g. Edge-Cache-Control)")
        out["target"] = target.lower()
    if "set_cookie" in data:
        if data["set_cookie"] not in SET_COOKIE_CHOICES:
            raise _fail("cache_policy.set_cookie", f"must be one of {', '.join(SET_COOKIE_CHOICES)}")
        out["set_cookie"] = data["set_cookie"]
    for key in ("x_cache", "cache_status"):
        if key in data:
            if not isinstance(data[key], bool):
                raise _fail(f"cache_policy.{key}", "must be true or false")
            out[key] = data[key]
