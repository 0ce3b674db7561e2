"""The sans-IO cache steps (httpproxy.cacheflow) and the variant/tag/URL store
(httpproxy.cache), without sockets, from the RFC text."""

from __future__ import annotations

from email.utils import formatdate

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from httpproxy.cache import MAX_VARIANTS, CacheEntry, ContentCache, entry_tags, url_key
from httpproxy.cacheflow import (
    Answer,
    RangeKind,
    answer_from_store,
    client_not_modified,
    dechunk,
    head_fields,
    invalidation_targets,
    merge_not_modified,
    not_modified_update,
    range_answer,
    revalidation_fields,
    secondary_key,
    strip_conditionals,
    vary_names,
    weak_match,
)
from httpproxy.cachepolicy import cache_key

LM = formatdate(1_700_000_000, usegmt=True)
HEAD = (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\nETag: \"a1\"\r\nLast-Modified: "
        + LM.encode() + b"\r\nCache-Control: max-age=60\r\nX-Old: 1\r\nX-Old: 2\r\n")
STORED = head_fields(HEAD)


def test_weak_comparison() -> None:
    """RFC 9110 §8.8.3.2: weak comparison ignores W/, strong comparison does not."""
    assert weak_match('W/"1"', '"1"') and weak_match('"1"', 'W/"1"') and weak_match('"1"', '"1"')
    assert not weak_match('"1"', '"2"')


@pytest.mark.parametrize(("request_fields", "expected"), [
    ({"if-none-match": '"a1"'}, True),
    ({"if-none-match": 'W/"a1"'}, True),               # weak comparison (§13.1.2)
    ({"if-none-match": '"x", "a1"'}, True),
    ({"if-none-match": "*"}, True),
    ({"if-none-match": '"x"'}, False),
    ({"if-none-match": 'a1'}, False),                   # not an entity-tag
    ({"if-modified-since": LM}, True),                  # not modified since (§13.1.3)
    ({"if-modified-since": formatdate(1_800_000_000, usegmt=True)}, True),
    ({"if-modified-since": formatdate(1_600_000_000, usegmt=True)}, False),
    ({"if-modified-since": "yesterday"}, False),        # invalid date: ignored
    ({"if-none-match": '"x"', "if-modified-since": LM}, False),  # INM wins (§13.2.2)
    ({}, False),
])
def test_client_not_modified(request_fields: dict[str, str], expected: bool) -> None:
    assert client_not_modified(b"GET", request_fields, STORED) is expected


def test_if_modified_since_only_for_get_and_head() -> None:
    """RFC 9110 §13.1.3: a recipient MUST ignore If-Modified-Since for other methods."""
    assert client_not_modified(b"HEAD", {"if-modified-since": LM}, STORED)
    assert not client_not_modified(b"POST", {"if-modified-since": LM}, STORED)


def test_not_modified_answer_keeps_the_fields_304_needs() -> None:
    """RFC 9110 §15.4.5: the 304 carries ETag, Cache-Control (and Date, Expires, Vary,
    Content-Location) as the 200 would, and no content."""
    answer = answer_from_store(b"GET", {"if-none-match": '"a1"'}, 200, HEAD, b"0123456789")
    assert answer.kind is Answer.NOT_MODIFIED and answer.body == b""
    assert answer.head.startswith(b"HTTP/1.1 304 Not Modified\r\n")
    fields = head_fields(answer.head)
    assert fields["etag"] == '"a1"' and fields["cache-control"] == "max-age=60"
    assert "content-length" not in fields and "x-old" not in fields


def test_revalidation_fields() -> None:
    """RFC 9111 §4.3.1: the stored ETag goes in If-None-Match, Last-Modified in
    If-Modified-Since; nothing without validators."""
    assert revalidation_fields(STORED) == (b'If-None-Match: "a1"\r\nIf-Modified-Since: '
                                           + LM.encode() + b"\r\n")
    assert revalidation_fields({}) == b""


def test_strip_conditionals() -> None:
    fwd = [(b"If-None-Match", b'"x"'), (b"Range", b"bytes=0-1"), (b"Accept", b"*/*"),
           (b"if-modified-since", LM.encode()), (b"If-Range", b'"x"')]
    assert strip_conditionals(fwd) == [(b"Accept", b"*/*")]


def test_304_updates_stored_fields() -> None:
    """RFC 9111 §4.3.4: each field of the 304 replaces all stored fields of that name; the
    stored framing (Content-Length) and status line stay (§3.2)."""
    merged = merge_not_modified(HEAD, b"HTTP/1.1 304 Not Modified\r\nCache-Control: max-age=5"
                                      b"\r\nX-Old: 3\r\nContent-Length: 0\r\nX-New: y\r\n")
    fields = head_fields(merged)
    assert merged.startswith(b"HTTP/1.1 200 OK\r\n") and merged.endswith(b"\r\n")
    assert fields["cache-control"] == "max-age=5" and fields["x-old"] == "3"
    assert fields["x-new"] == "y" and fields["content-length"] == "10"
    assert fields["etag"] == '"a1"'


_NAMES = st.sampled_from(["Cache-Control", "ETag", "X-Extra", "CDN-Cache-Control", "Age",
                           "Date", "Vary", "Cache-Tag", "Content-Length", "Set-Cookie"])
_LINES = st.lists(st.tuples(_NAMES, st.sampled_from(["a", "max-age=5", '"v2"', "x, y"])),
                  max_size=6)


def _head(status_line: bytes, lines: list[tuple[str, str]]) -> bytes:
    return status_line + b"".join(f"\r\n{n}: {v}".encode() for n, v in lines) + b"\r\n"


@settings(max_examples=200, deadline=None)
@given(stored=_LINES, lines_304=_LINES,
       strip=st.sampled_from([frozenset({b"cdn-cache-control", b"age"}),
                              frozenset({b"cdn-cache-control", b"age", b"set-cookie"})]))
def test_a_304_applied_twice_changes_nothing_more(stored: list[tuple[str, str]],
                                                  lines_304: list[tuple[str, str]],
                                                  strip: frozenset[bytes]) -> None:
    """RFC 9111 §4.3.4: a 304's fields replace the stored ones of the same names, so the same
    304 applied to the head it produced gives that head and those fields again: what
    ``NotModifiedUpdate.repeats`` lets the edge reuse. Not claimed (``reusable`` false) when
    the first stored head still had a field the strip set names."""
    head_304 = _head(b"HTTP/1.1 304 Not Modified", lines_304)
    first = not_modified_update(_head(b"HTTP/1.1 200 OK", stored), head_304, strip)
    again = not_modified_update(first.head, head_304, strip)
    assert first.repeats(first.head, head_304, strip) == first.reusable
    if first.reusable:
        assert again == first._replace(head_304=head_304, head=again.head)
        assert again.head == first.head
    assert not first.repeats(first.head, head_304 + b"X: 1\r\n", strip)
    copy = first.head[:1] + first.head[1:]  # equal bytes, another object
    assert not first.repeats(copy, head_304, strip)  # not the head it made


@settings(max_examples=200, deadline=None)
@given(stored=_LINES, lines_304=_LINES,
       strip=st.sampled_from([frozenset({b"cdn-cache-control", b"age"}),
                              frozenset({b"cdn-cache-control", b"age", b"date"})]),
       date=st.sampled_from(["Tue, 08 Dec 2026 01:50:00 GMT", "a"]))
def test_a_304_differing_only_in_its_date_changes_only_the_date(
        stored: list[tuple[str, str]], lines_304: list[tuple[str, str]],
        strip: frozenset[bytes], date: str) -> None:
    """RFC 9111 §4.3.4 / RFC 9110 §6.6.1: the next 304 for a resource usually differs only in
    its Date; applied to the head the last one produced it gives that head with the new Date
    line and the same other fields (``NotModifiedUpdate.redated``, what the edge reuses), the
    same as merging it in full. Not claimed for two Date lines, a stripped Date, or any other
    difference."""
    head_304 = _head(b"HTTP/1.1 304 Not Modified", lines_304)
    first = not_modified_update(_head(b"HTTP/1.1 200 OK", stored), head_304, strip)
    later = _head(b"HTTP/1.1 304 Not Modified",
                  [(n, date if n == "Date" else v) for n, v in lines_304])
    redated = first.redated(first.head, later, strip)
    full = not_modified_update(first.head, later, strip)
    single_date = sum(n == "Date" for n, _ in lines_304) == 1
    assert (redated is not None) == (first.reusable and single_date and b"date" not in strip)
    if redated is not None:
        assert redated.head == full.head and redated.fields == full.fields
        assert (redated.tags, redated.validators, redated.vary) == (
            full.tags, full.validators, full.vary)
        assert redated.head_304 == later and redated.date_line == full.date_line
        assert first.redated(first.head, later + b"X-Other: 1\r\n", strip) is None
        copy = first.head[:1] + first.head[1:]
        assert first.redated(copy, later, strip) is None  # not the head it made


@pytest.mark.parametrize(("value", "kind", "first", "last"), [
    ("bytes=0-9", RangeKind.PARTIAL, 0, 9),
    ("bytes=10-19", RangeKind.PARTIAL, 10, 19),
    ("bytes=90-", RangeKind.PARTIAL, 90, 99),
    ("bytes=90-500", RangeKind.PARTIAL, 90, 99),      # last clipped to the length (§14.1.2)
    ("bytes=-5", RangeKind.PARTIAL, 95, 99),          # suffix
    ("bytes=-500", RangeKind.PARTIAL, 0, 99),
    ("bytes=100-", RangeKind.UNSATISFIABLE, 0, -1),   # first beyond the end (§15.5.17)
    ("bytes=-0", RangeKind.UNSATISFIABLE, 0, -1),
    ("bytes=5-1", RangeKind.FULL, 0, -1),             # invalid: ignored (§14.1.1)
    ("bytes=0-1,5-6", RangeKind.FULL, 0, -1),         # several: MAY be ignored (§14.2)
    ("items=0-1", RangeKind.FULL, 0, -1),             # unknown unit
    ("bytes=x-1", RangeKind.FULL, 0, -1),
    ("bytes=\uff11-2", RangeKind.FULL, 0, -1),       # non-ASCII digits
])
def test_range_answer(value: str, kind: RangeKind, first: int, last: int) -> None:
    answer = range_answer(b"GET", 200, {"range": value}, STORED, 100)
    assert (answer.kind, answer.first, answer.last) == (kind, first, last)


def test_range_only_for_get_on_a_200() -> None:
    """RFC 9110 §14.2: Range is ignored for methods other than GET; a stored non-200 is not
    ranged."""
    assert range_answer(b"HEAD", 200, {"range": "bytes=0-1"}, STORED, 10).kind is RangeKind.FULL
    assert range_answer(b"GET", 404, {"range": "bytes=0-1"}, STORED, 10).kind is RangeKind.FULL


@pytest.mark.parametrize(("if_range", "kind"), [
    ('"a1"', RangeKind.PARTIAL),
    ('W/"a1"', RangeKind.FULL),      # If-Range uses the strong comparison (§13.1.5)
    ('"b"', RangeKind.FULL),
    (LM, RangeKind.PARTIAL),
    (formatdate(1_600_000_000, usegmt=True), RangeKind.FULL),
    ("nonsense", RangeKind.FULL),
])
def test_if_range(if_range: str, kind: RangeKind) -> None:
    request = {"range": "bytes=0-1", "if-range": if_range}
    assert range_answer(b"GET", 200, request, STORED, 10).kind is kind


def test_partial_answer_from_a_chunked_body() -> None:
    """The stored body keeps its chunked framing; a 206 carries the content bytes, with
    Content-Length and Content-Range and without Transfer-Encoding."""
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nETag: \"c\"\r\n"
    body = b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n"
    assert dechunk(body) == b"hello world"
    answer = answer_from_store(b"GET", {"range": "bytes=3-7"}, 200, head, body)
    assert answer.kind is Answer.PARTIAL and answer.body == b"lo wo"
    fields = head_fields(answer.head)
    assert answer.head.startswith(b"HTTP/1.1 206 Partial Content\r\n")
    assert fields["content-range"] == "bytes 3-7/11" and fields["content-length"] == "5"
    assert "transfer-encoding" not in fields
    assert dechunk(b"5\r\nhel") is None and dechunk(b"zz\r\n") is None


def test_vary_names_and_secondary_keys() -> None:
    """RFC 9111 §4.1: Vary names fields case-insensitively; ``*`` never matches; values may
    be normalised (whitespace, Accept-Encoding as the forwarded variant)."""
    assert vary_names(None) == () and vary_names("") == ()
    assert vary_names("X-B, x-a ,X-A") == ("x-a", "x-b")
    assert vary_names("Accept, *") is None
    names = ("accept-encoding", "x-lang")
    base = secondary_key(names, {"accept-encoding": "gzip", "x-lang": "en"})
    assert base == secondary_key(names, {"accept-encoding": "gzip;q=1", "x-lang": "en"})
    assert base != secondary_key(names, {"accept-encoding": "br", "x-lang": "en"})
    assert base != secondary_key(names, {"accept-encoding": "gzip"})  # absent differs
    assert secondary_key(("x-lang",), {"x-lang": ""}) != secondary_key(("x-lang",), {})
    assert secondary_key(("accept",), {"accept": "a,  b"}) == secondary_key(
        ("accept",), {"accept": "a, b"})
    # Accept-Language: language ranges are case-insensitive, unordered at equal weight
    lang = ("accept-language",)
    assert secondary_key(lang, {"accept-language": "en, de"}) == secondary_key(
        lang, {"accept-language": "De,EN"})
    assert secondary_key(lang, {"accept-language": "en"}) != secondary_key(
        lang, {"accept-language": "en;q=0.5"})


@pytest.mark.parametrize(("method", "status", "fields", "expected"), [
    (b"POST", 200, {}, ["/a/b?x"]),
    (b"DELETE", 204, {"location": "/c"}, ["/a/b?x", "/c"]),
    (b"PUT", 201, {"content-location": "d"}, ["/a/b?x", "/a/d"]),          # relative
    (b"POST", 303, {"location": "http://www.x.test:8080/e?f"}, ["/a/b?x", "/e?f"]),
    (b"POST", 200, {"location": "https://other.test/e"}, ["/a/b?x"]),     # another origin
    (b"POST", 200, {"location": "//other.test/e"}, ["/a/b?x"]),
    (b"PATCH", 200, {}, ["/a/b?x"]),                                       # any unsafe method
    (b"POST", 404, {"location": "/c"}, []),                                # error: nothing
    (b"POST", 500, {}, []),
    (b"GET", 200, {"location": "/c"}, []),                                 # safe method
    (b"OPTIONS", 200, {}, []),
])
def test_invalidation_targets(method: bytes, status: int, fields: dict[str, str],
                              expected: list[str]) -> None:
    """RFC 9111 §4.4: a non-error response to an unsafe method invalidates the target URI and
    Location / Content-Location when they share its origin."""
    assert invalidation_targets(method, status, "www.x.test", "/a/b?x", fields) == expected


@settings(max_examples=200)
@given(st.text(max_size=60), st.text(max_size=60), st.text(max_size=30))
def test_parsers_never_raise(value: str, other: str, method: str) -> None:
    request = {"if-none-match": value, "if-modified-since": other, "range": value,
               "if-range": other}
    client_not_modified(method.encode(), request, {"etag": other, "last-modified": value})
    range_answer(b"GET", 200, request, {"etag": other}, len(value))
    invalidation_targets(b"POST", 200, "h.test", "/" + other, {"location": value})
    vary_names(value)
    dechunk(value.encode())


# -- the store: variants, URLs, tags --------------------------------------------------------------


def _entry(target: str, *, site: str = "s.test", host: str = "s.test", variant: str = "",
           vary: tuple[str, ...] = (), tags: tuple[str, ...] = (), body: bytes = b"x",
           scheme: str = "http", ae: str | None = None) -> CacheEntry:
    key = cache_key(host, target, ae, scheme=scheme)
    secondary = secondary_key(vary, {"x-v": variant}) if vary else b""
    return CacheEntry(key, site, target.partition("?")[0], 200, b"HTTP/1.1 200 OK\r\n", body,
                      ttl=60, swr=0, sie=0, vary=vary, secondary=secondary, tags=tags)


def test_variants_are_selected_and_bounded() -> None:
    cache = ContentCache(1 << 20)
    for i in range(MAX_VARIANTS + 3):
        assert cache.put(_entry("/v", vary=("x-v",), variant=str(i)))
    primary = cache_key("s.test", "/v", None, scheme="http")
    assert cache.get(primary) is None and cache.has_variants(primary)
    assert len(cache) == MAX_VARIANTS and cache.evictions == 3
    assert cache.select(primary, {"x-v": "0"}) is None                  # the oldest went
    found = cache.select(primary, {"x-v": str(MAX_VARIANTS + 2)})
    assert found is not None and found.vary == ("x-v",)
    # the resource stops varying: a plain response replaces every variant
    assert cache.put(_entry("/v"))
    assert len(cache) == 1 and not cache.has_variants(primary) and cache.get(primary) is not None
    assert cache.put(_entry("/v", vary=("x-v",), variant="a"))           # and back
    assert len(cache) == 1 and cache.get(primary) is None


def test_byte_bound_counts_every_variant() -> None:
    cache = ContentCache(10_000, max_object_bytes=5_000)
    for i in range(10):
        cache.put(_entry("/v", vary=("x-v",), variant=str(i), body=b"b" * 1_000))
    assert cache.size <= 10_000 and 0 < len(cache) < 10
    assert cache.size == sum(e.size for e in cache.entries())


def test_purge_url_drops_every_scheme_encoding_and_variant_of_that_url_only() -> None:
    cache = ContentCache(1 << 20)
    cache.put(_entry("/p?q=1", scheme="http"))
    cache.put(_entry("/p?q=1", scheme="https", ae="gzip"))
    cache.put(_entry("/p?q=1", scheme="https", vary=("x-v",), variant="a"))
    cache.put(_entry("/p?q=2"))
    cache.put(_entry("/p?q=1", host="other.test", site="other.test"))
    url = url_key(cache_key("S.test.", "/p?q=1", None))
    assert cache.purge_url(url) == 3
    assert sorted(e.primary.split(b"\0")[3] for e in cache.entries()) == [b"/p?q=1", b"/p?q=2"]
    assert cache.invalidations == 3


def test_purge_tag_stays_within_the_site() -> None:
    cache = ContentCache(1 << 20)
    cache.put(_entry("/a", tags=("red", "blue")))
    cache.put(_entry("/b", tags=("blue",)))
    cache.put(_entry("/c", host="o.test", site="o.test", tags=("red",)))
    assert cache.purge_tag("s.test", "red") == 1
    assert cache.purge_tag("s.test", "red") == 0
    assert cache.purge_tag("s.test", "blue") == 1
    assert [e.path for e in cache.entries()] == ["/c"]
    cache.clear()
    assert cache.size == 0 and cache.purge_tag("o.test", "red") == 0


def test_entry_tags() -> None:
    assert entry_tags({"cache-tag": "a, b,,a", "surrogate-key": "c  b d"}) == ("a", "b", "c", "d")
    assert entry_tags({"cache-tag": ",".join(str(i) for i in range(100))})[-1] == "31"
    assert entry_tags({}) == ()


def test_invalidation_flood_is_coalesced_per_site() -> None:
    """A burst of unsafe requests to many URLs of one site becomes one site purge in the
    change feed (every worker of the fleet reads each row), other sites' URLs stay exact."""
    from httpproxy.server import PUBLISH_SITE_MAX, HttpEngine

    pending = {("invalidate", f"www.a.test/p{i}"): "www.a.test" for i in range(PUBLISH_SITE_MAX + 1)}
    pending[("invalidate", "www.b.test/x")] = "www.b.test"
    assert HttpEngine._coalesce(pending) == [("invalidate", "www.b.test/x"), ("purge", "www.a.test")]
    few = {("invalidate", "www.a.test/1"): "www.a.test", ("purge", "www.c.test"): "www.c.test"}
    assert HttpEngine._coalesce(few) == list(few)


def test_identity_content_serves_a_request_of_another_encoding() -> None:
    """A Range request (Fetch sends ``Accept-Encoding: identity`` with it) finds the full
    response a ``gzip`` request stored, but only when that content is not encoded."""
    cache = ContentCache(1 << 20)
    plain = _entry("/f", ae="gzip")
    cache.put(plain)
    identity_key = cache_key("s.test", "/f", None, scheme="http")
    assert cache.get(identity_key) is None and cache.get_identity(identity_key) is plain
    encoded = CacheEntry(cache_key("s.test", "/g", "br", scheme="http"), "s.test", "/g", 200,
                         b"HTTP/1.1 200 OK\r\nContent-Encoding: br\r\n", b"x", ttl=60, swr=0,
                         sie=0)
    cache.put(encoded)
    assert cache.get_identity(cache_key("s.test", "/g", None, scheme="http")) is None


def test_update_in_place_keeps_size_and_tag_indexes_true() -> None:
    """A 304's merge updates the stored entry in place: the byte count follows the new head
    and tag purges see the new tags only."""
    cache = ContentCache(1 << 20)
    entry = _entry("/u", tags=("old",))
    cache.put(entry)
    head = b"HTTP/1.1 200 OK\r\nCache-Tag: new\r\nETag: \"2\"\r\n"
    assert cache.update(entry, head, ttl=5, swr=0, sie=0, stored_at=1.0, tags=("new",),
                        validators=b'If-None-Match: "2"\r\n')
    assert cache.size == sum(e.size for e in cache.entries()) == entry.size
    assert entry.head == head and entry.ttl == 5 and entry.stored_at == 1.0
    assert cache.purge_tag("s.test", "old") == 0 and cache.purge_tag("s.test", "new") == 1
    assert not cache.update(entry, head, ttl=5, swr=0, sie=0, stored_at=1.0, tags=(),
                            validators=b"")  # no longer stored
