"""Hostile input to the sans-IO parsers, as deterministic cases the fuzz targets in
tests/fuzz/ found or guard (the properties themselves are in those targets; the existing
hypothesis tests live next to each parser's own tests)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from httpproxy.clienthello import ClientHelloError, ClientHelloReader


def refusal(pieces: list[bytes]) -> ClientHelloError:
    reader = ClientHelloReader()
    with pytest.raises(ClientHelloError) as info:
        for piece in pieces:
            reader.feed(piece)
    return info.value


@pytest.mark.parametrize("data", [b"OIOTPNS \x00HTT\r\n", b"XYZ / HTTP/1.1\r\n", b"PROXY TCP4"])
def test_clienthello_plain_http_hint_does_not_depend_on_chunking(data: bytes) -> None:
    """Bytes that are not an HTTP request get the TLS alert whether they arrive at once or
    one byte first; found by tests/fuzz/fuzz_clienthello.py (the first byte alone looked like
    the start of a method, so a split read got the plain-text "use https://" answer)."""
    whole = refusal([data])
    split = refusal([data[:1], data[1:]])
    assert (split.alert, split.plain_http) == (whole.alert, whole.plain_http)


@given(st.sampled_from([b"GET / HTTP/1.1\r\n", b"POST /x HTTP/1.1\r\n", b"OPTIONS * HTTP/1.1\r\n"]),
       st.integers(1, 6))
def test_clienthello_plain_http_is_recognised_in_any_split(request_line: bytes, cut: int) -> None:
    whole = refusal([request_line])
    split = refusal([request_line[:cut], request_line[cut:]])
    assert whole.plain_http and split.plain_http
