"""Per-site rule validation and compilation (edge/directory/rules.py, httpproxy/rules.py,
httpproxy/cachepolicy.py) and the request-side checks the filters run on.

Properties: validation raises only ValidationError; whatever it accepts compiles (filters and
cache policy) and validates again to the same canonical form; normalise_path never raises,
returns None or a path starting with "/" with no "." or ".." segment and no control
character, and is idempotent; a compiled filter set evaluates any request without raising."""

from __future__ import annotations

import json
import sys

from _harness import instrumented, main, split

with instrumented("edge.directory.rules", "httpproxy.rules", "httpproxy.cachepolicy"):
    from edge.directory.rules import validate_cache_policy, validate_filters
    from edge.errors import ValidationError
    from httpproxy.cachepolicy import CachePolicy
    from httpproxy.rules import CompiledFilters, RequestHead, evaluate_filters, normalise_path


class _Site:
    hostname = "www.a.test"
    https_redirect = False
    hsts = False


def check_path(target: str) -> None:
    path = normalise_path(target)
    if path is None:
        return
    assert path.startswith("/"), path
    assert not any(seg in (".", "..") for seg in path.split("/")), path
    assert not any(ord(c) < 0x20 or ord(c) == 0x7F for c in path), path
    # A decoded "%", "?" or "#" is part of the path, but read again as a target it starts an
    # escape, a query or a fragment: only paths without them must come back unchanged.
    assert normalise_path(path) in (path, None) or any(c in path for c in "%?#"), path


def check_rules(text: str, target: str) -> None:
    try:
        filters = validate_filters(text)
    except ValidationError:
        filters = None
    if filters is not None:
        assert validate_filters(json.dumps(filters)) == filters
        compiled = CompiledFilters.from_rules(filters)
        head = RequestHead.from_pairs("GET", target, [("Host", "www.a.test"),
                                                      ("Authorization", target)])
        evaluate_filters(head, "192.0.2.1", compiled, site=_Site(), scheme="http")
    try:
        policy = validate_cache_policy(text)
    except ValidationError:
        return
    assert validate_cache_policy(json.dumps(policy)) == policy
    CachePolicy.from_policy(policy)


def check(data: bytes) -> None:
    steer, payload = split(data)
    text = payload.decode("utf-8", "replace")
    check_path(text)
    check_rules(text, steer.decode("latin-1") or "/")


def seeds() -> list[bytes]:
    return [
        b"\x00" + json.dumps({"ip_allow": ["203.0.113.0/24"], "path_deny": [{"prefix": "/.git"},
                             {"regex": "\\.php$"}], "methods": ["GET"],
                             "rate_limit": {"requests_per_second": 10, "burst": 20}}).encode(),
        b"\x00" + json.dumps({"basic_auth": [{"prefix": "/admin", "realm": "staff",
                                              "users": {"ann": "0" * 64}}]}).encode(),
        b"\x00" + json.dumps({"mode": "static", "ttl": {"200": 600},
                              "paths": [{"prefix": "/cart", "bypass": True}]}).encode(),
        b"\x00/a/%2e%2e/%252e%252e/b//c\\d?x#y",
        b"\x00/az/%2e%2eez/%2e%2e/%2523e%FFFF%FFFFFFFFFFx#y",
    ]


if __name__ == "__main__":
    main(check)
    sys.exit(0)
