"""Hostname normalisation: one spelling per name, garbage refused (or None on the hot path)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge.directory.names import hostname_or_none, normalize_hostname, wildcard_parent
from edge.errors import ValidationError


@pytest.mark.parametrize(("raw", "canonical"), [
    ("example.com", "example.com"),
    ("WWW.Example.COM", "www.example.com"),
    ("www.example.com.", "www.example.com"),
    ("  www.example.com  ", "www.example.com"),
    ("bücher.example", "xn--bcher-kva.example"),
    ("BÜCHER.example", "xn--bcher-kva.example"),
    ("xn--bcher-kva.example", "xn--bcher-kva.example"),
    ("例え.jp", "xn--r8jz45g.jp"),
    ("a-b.c0.example", "a-b.c0.example"),
    ("localhost", "localhost"),
    ("1host.example", "1host.example"),
    ("a" * 63 + ".com", "a" * 63 + ".com"),
])
def test_normalize_hostname(raw: str, canonical: str) -> None:
    assert normalize_hostname(raw) == canonical
    assert hostname_or_none(raw) == canonical
    assert normalize_hostname(canonical) == canonical  # idempotent


@pytest.mark.parametrize(("raw", "canonical"), [
    ("*.Example.COM.", "*.example.com"),
    ("*.bücher.example", "*.xn--bcher-kva.example"),
])
def test_wildcards_only_when_allowed(raw: str, canonical: str) -> None:
    assert normalize_hostname(raw, allow_wildcard=True) == canonical
    with pytest.raises(ValidationError, match="wildcard is not allowed"):
        normalize_hostname(raw)
    assert hostname_or_none(raw) is None


@pytest.mark.parametrize(("raw", "message"), [
    ("", "empty"), (".", "empty"), ("   ", "empty"),
    ("a..b", "bad label"), ("-a.com", "bad label"), ("a-.com", "bad label"),
    ("under_score.com", "bad label"), ("a b.com", "bad label"), ("example.com:80", "bad label"),
    ("x" * 64 + ".com", "bad label"), ("[::1]", "bad label"),
    ("10.0.0.1", "IP address"), ("example.123", "IP address"),
    (("abcdefgh." * 30) + "com", "longer than 253"),
])
def test_refused_hostnames(raw: str, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        normalize_hostname(raw)
    assert hostname_or_none(raw) is None


@pytest.mark.parametrize("raw", ["*.com", "*", "a.*.example.com", "**.example.com",
                                 "*example.com"])
def test_refused_wildcards(raw: str) -> None:
    with pytest.raises(ValidationError):
        normalize_hostname(raw, allow_wildcard=True)


@pytest.mark.parametrize(("name", "parent"), [
    ("a.example.com", "example.com"), ("a.b.example.com", "b.example.com"),
    ("example.com", None), ("localhost", None),
])
def test_wildcard_parent(name: str, parent: str | None) -> None:
    assert wildcard_parent(name) == parent


@given(st.text(max_size=80))
def test_hostname_or_none_never_raises(text: str) -> None:
    result = hostname_or_none(text)
    if result is not None:
        assert result == result.lower() and result.isascii() and not result.endswith(".")
        assert normalize_hostname(result) == result
