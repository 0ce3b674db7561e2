"""Hostile input to the sans-IO parsers: deterministic cases the fuzz targets in tests/fuzz/
found, and each target's properties run under hypothesis too (so they hold in the suite even
without atheris). Each parser's older hypothesis tests live next to its own tests."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import given, settings
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


# -- the fuzz targets' properties under hypothesis (no atheris needed) -------------------------

FUZZ = Path(__file__).resolve().parent / "fuzz"
HYPOTHESIS_TARGETS = ["fuzz_proxyproto", "fuzz_ftp", "fuzz_clienthello", "fuzz_request_head",
                      "fuzz_response_head", "fuzz_rules"]


def fuzz_target(name: str) -> ModuleType:
    if str(FUZZ) not in sys.path:
        sys.path.insert(0, str(FUZZ))
    return importlib.import_module(name)


@pytest.mark.parametrize("name", HYPOTHESIS_TARGETS)
def test_fuzz_target_properties_under_hypothesis(name: str) -> None:
    target = fuzz_target(name)
    seeds = target.seeds()

    @settings(max_examples=300, deadline=None, database=None)
    @given(st.one_of(st.binary(max_size=600),
                     st.builds(lambda seed, cut, junk: seed[:cut] + junk + seed[cut:],
                               st.sampled_from(seeds), st.integers(0, 600),
                               st.binary(max_size=8))))
    def run(data: bytes) -> None:
        target.check(data)

    for seed in seeds:
        target.check(seed)
    run()
