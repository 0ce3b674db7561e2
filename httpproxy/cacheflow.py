"""The content cache's exchange steps, sans-IO: variants, conditionals, revalidation, ranges,
invalidation. Pure functions over header fields and stored bytes; the request path
(:mod:`httpproxy.exchange`) calls them, the store (:mod:`httpproxy.cache`) holds entries.

Header fields are ``{lowercase name: value}`` with repeated lines joined by ``", "``
(:func:`head_fields`). Sections cited are RFC 9110 (semantics) and RFC 9111 (caching).
"""

from __future__ import annotations

import enum
import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

from httpproxy.cachepolicy import encoding_variant, http_date, strip_fields

__all__ = [
    "MAX_TAGS",
    "NOT_MODIFIED_FIELDS",
    "SAFE_METHODS",
    "Answer",
    "CachedAnswer",
    "NotModifiedUpdate",
    "RangeAnswer",
    "RangeKind",
    "answer_from_store",
    "client_not_modified",
    "dechunk",
    "entry_tags",
    "head_fields",
    "invalidation_targets",
    "merge_not_modified",
    "not_modified_head",
    "not_modified_update",
    "range_answer",
    "revalidation_fields",
    "secondary_key",
    "strip_conditionals",
    "vary_names",
    "weak_match",
]

MAX_TAGS = 32
"""Tags kept per entry (the rest are ignored)."""

SAFE_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE"})
"""RFC 9110 §9.2.1; any other method is unsafe and may invalidate (RFC 9111 §4.4)."""

NOT_MODIFIED_FIELDS = ("cache-control", "content-location", "date", "etag", "expires", "vary")
"""What a 304 carries from the stored 200 (RFC 9110 §15.4.5)."""

_NOT_UPDATED = frozenset({
    # RFC 9111 §3.2: a 304 never changes the stored framing; hop-by-hop fields are not stored.
    b"content-length", b"transfer-encoding", b"content-range", b"connection", b"keep-alive",
    b"proxy-connection", b"te", b"trailer", b"upgrade", b"age",
})

_CONDITIONALS = frozenset({b"if-none-match", b"if-modified-since", b"if-match",
                           b"if-unmodified-since", b"if-range", b"range"})


def head_fields(head: bytes) -> dict[str, str]:
    """Response (or request) head → {lowercase name: value}, repeats joined with ", ".
    The first line (status or request line) is skipped."""
    fields: dict[str, str] = {}
    for line in head.decode("latin-1").split("\r\n")[1:]:
        name, sep, value = line.partition(":")
        if not sep:
            continue
        key = name.strip().lower()
        text = value.strip()
        fields[key] = fields[key] + ", " + text if key in fields else text
    return fields


def entry_tags(fields: Mapping[str, str]) -> tuple[str, ...]:
    """Tags of a response: ``Cache-Tag`` (comma-separated) and ``Surrogate-Key``
    (space-separated), at most :data:`MAX_TAGS`, in order, without repeats."""
    tags: dict[str, None] = {}
    for tag in fields.get("cache-tag", "").split(","):
        tags[tag.strip()] = None
    for tag in fields.get("surrogate-key", "").split():
        tags[tag.strip()] = None
    tags.pop("", None)
    return tuple(tags)[:MAX_TAGS]


# -- Vary: secondary keys (RFC 9111 §4.1) -------------------------------------------------------


def vary_names(vary: str | None) -> tuple[str, ...] | None:
    """The request fields a response varies on, lowercase, sorted, unique; ``()`` without
    Vary; ``None`` for ``Vary: *`` (RFC 9111 §4.1: it always fails to match)."""
    if not vary:
        return ()
    names = {item.strip().lower() for item in vary.split(",")}
    names.discard("")
    if "*" in names:
        return None
    return tuple(sorted(names))


_MEMO_VALUE_MAX = 256
"""Longest request field value whose normal form is memoised (browsers send a few distinct
Accept-Language / User-Agent values again and again; longer ones are worked out each time)."""


def _normalise(value: str) -> str:
    # RFC 9111 §4.1: whitespace and the joining of repeated lines may be normalised.
    return _normal_form(value) if len(value) <= _MEMO_VALUE_MAX else _normal_form.__wrapped__(value)


@functools.lru_cache(maxsize=1024)
def _normal_form(value: str) -> str:
    return ",".join(" ".join(part.split()) for part in value.split(","))


def _normalise_languages(value: str) -> str:
    # Language ranges are case-insensitive (RFC 4647 §2) and, at equal weight, unordered
    # (RFC 9110 §12.5.4 ranks by q only): "en, de" and "De, EN" are one variant.
    if len(value) <= _MEMO_VALUE_MAX:
        return _language_form(value)
    return _language_form.__wrapped__(value)


@functools.lru_cache(maxsize=1024)
def _language_form(value: str) -> str:
    return ",".join(sorted("".join(part.split()).lower() for part in value.split(",")))


def secondary_key(names: tuple[str, ...], request: Mapping[str, str]) -> bytes:
    """What a request must repeat to be served a response that varies on ``names``.

    Accept-Encoding is compared as the encoding variant the edge forwards
    (:func:`httpproxy.cachepolicy.encoding_variant`), so ``gzip`` and ``gzip;q=1`` share a
    variant; Accept-Language without case and order; an absent field differs from an
    empty one."""
    parts = []
    for name in names:
        value = request.get(name)
        if name == "accept-encoding":
            parts.append(encoding_variant(value))
        elif name == "accept-language" and value is not None:
            parts.append(_normalise_languages(value))
        else:
            parts.append("\1" if value is None else _normalise(value))
    return "\0".join(parts).encode("utf-8", "surrogatepass")


# -- validators and client conditionals (RFC 9110 §13) -------------------------------------------


def _etags(value: str) -> list[str]:
    """The entity-tags of an If-None-Match / If-Match list (``*`` kept as it is)."""
    tags = []
    rest = value.strip()
    while rest:
        rest = rest.lstrip(", \t")
        if not rest:
            break
        if rest.startswith("*"):
            tags.append("*")
            rest = rest[1:]
            continue
        weak = rest.startswith("W/")
        body = rest[2:] if weak else rest
        if not body.startswith('"'):
            break  # malformed: stop (the field is then not matched beyond this point)
        end = body.find('"', 1)
        if end < 0:
            break
        tags.append(("W/" if weak else "") + body[: end + 1])
        rest = body[end + 1:]
    return tags


def _opaque(tag: str) -> str:
    return tag[2:] if tag.startswith("W/") else tag


def weak_match(a: str, b: str) -> bool:
    """RFC 9110 §8.8.3.2 weak comparison: the opaque tags match, W/ ignored."""
    return _opaque(a.strip()) == _opaque(b.strip())


def _strong_match(a: str, b: str) -> bool:
    a, b = a.strip(), b.strip()
    return not a.startswith("W/") and a == b


def _date(value: str | None) -> float | None:
    """A strict HTTP-date (RFC 9110 §5.6.7, the one parser of :mod:`httpproxy.cachepolicy`);
    None when absent or invalid (an invalid If-Modified-Since is ignored, §13.1.3)."""
    return http_date(value) if value else None


def client_not_modified(method: bytes, request: Mapping[str, str], stored: Mapping[str, str]
                        ) -> bool:
    """Whether a stored 200 answers this request with 304 Not Modified.

    RFC 9110 §13.2.2: If-None-Match first (weak comparison, §13.1.2; ``*`` matches any
    stored representation); only without it, If-Modified-Since for GET/HEAD (§13.1.3),
    compared with the stored Last-Modified, else its Date (RFC 9111 §4.3.2). An invalid
    date is ignored."""
    inm = request.get("if-none-match")
    if inm is not None:
        etag = stored.get("etag")
        return any(tag == "*" or (etag is not None and weak_match(tag, etag))
                   for tag in _etags(inm))
    if method not in (b"GET", b"HEAD"):
        return False
    since = _date(request.get("if-modified-since"))
    if since is None:
        return False
    modified = _date(stored.get("last-modified")) or _date(stored.get("date"))
    return modified is not None and modified <= since


def not_modified_head(stored_head: bytes) -> bytes:
    """A 304's status line and fields (no blank line) from a stored response's head."""
    lines = [b"HTTP/1.1 304 Not Modified"]
    for line in stored_head.split(b"\r\n")[1:]:
        name = line.partition(b":")[0].strip().lower()
        if name.decode("latin-1") in NOT_MODIFIED_FIELDS or name == b"last-modified":
            lines.append(line)
    return b"\r\n".join(lines) + b"\r\n"


# -- revalidation (RFC 9111 §4.3) --------------------------------------------------------------


def revalidation_fields(stored: Mapping[str, str]) -> bytes:
    """The conditional fields to send the origin for a stored response (RFC 9111 §4.3.1):
    If-None-Match with its ETag, If-Modified-Since with its Last-Modified; b"" when it has
    no validator (then it cannot be revalidated, only fetched again)."""
    out = b""
    etag = stored.get("etag")
    if etag:
        out += b"If-None-Match: " + etag.encode("latin-1") + b"\r\n"
    modified = stored.get("last-modified")
    if modified:  # sent as stored: an origin ignores a date it cannot parse (RFC 9110 §13.1.3)
        out += b"If-Modified-Since: " + modified.encode("latin-1") + b"\r\n"
    return out


def strip_conditionals(fields: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """A request's forwarded fields without its own conditionals and Range: the edge asks the
    origin for the full response (or its own revalidation) and answers those itself."""
    return [pair for pair in fields if pair[0].lower() not in _CONDITIONALS]


def merge_not_modified(stored_head: bytes, head_304: bytes) -> bytes:
    """The stored head updated by a 304 (RFC 9111 §4.3.4): every field the 304 carries
    replaces all stored lines of that name, except framing and hop-by-hop fields (§3.2).
    The stored status line is kept."""
    # Heads reach the cache only through the strict response parser (token names, no
    # whitespace before the colon), so a name is what precedes the first colon.
    names: set[bytes] = set()
    updates: list[bytes] = []
    for line in head_304.split(b"\r\n")[1:]:
        colon = line.find(b":")
        if colon > 0:
            name = line[:colon].lower()
            if name not in _NOT_UPDATED:
                names.add(name)
                updates.append(line)
    if not updates:
        return stored_head
    kept = strip_fields(stored_head, frozenset(names))
    return kept + b"\r\n".join(updates) + b"\r\n"


class NotModifiedUpdate(NamedTuple):
    """What a 304 makes of a stored response (RFC 9111 §4.3.4), before the freshness
    decision (which depends on the time it arrived)."""

    head_304: bytes
    strip: frozenset[bytes]
    """The store_strip set ``head`` was stripped with."""
    head: bytes
    """The head to store: the stored head merged with the 304, minus ``strip``."""
    fields: dict[str, str]
    """The merged fields (with the 304's targeted ones), and the 304's own ``Age``: the age
    restarts from the 304 (RFC 9111 §4.2.3)."""
    tags: tuple[str, ...]
    validators: bytes
    vary: tuple[str, ...] | None
    reusable: bool
    """Merging ``head_304`` into ``head`` again would give this same update (the stored head
    it came from had no field ``strip`` names)."""
    date_line: bytes
    """The 304's Date line (CRLF first), when it has exactly one and ``head`` has it once;
    else b"" (then :meth:`redated` never applies)."""

    def repeats(self, stored_head: bytes, head_304: bytes, strip: frozenset[bytes]) -> bool:
        """Whether applying ``head_304`` to ``stored_head`` gives this update again: the same
        304 bytes on the head this update produced. Merging replaces every field the 304
        carries with the 304's lines, so a second merge of the same 304 changes nothing; an
        origin's 304s for one resource repeat byte for byte within a second (their Date)."""
        return (self.reusable and stored_head is self.head and head_304 == self.head_304
                and strip == self.strip)

    def redated(self, stored_head: bytes, head_304: bytes, strip: frozenset[bytes]
                ) -> NotModifiedUpdate | None:
        """This update for a 304 that differs from :attr:`head_304` only in its one Date line,
        applied to the head this update produced: the same head with that Date line (the
        304's Date replaces the stored one, and nothing else depends on it), the fields with
        that Date. None when that is not the case (then merge in full)."""
        if not (self.date_line and self.reusable and stored_head is self.head
                and strip == self.strip):
            return None
        found = _DATE_LINE.search(head_304)
        if found is None or _DATE_LINE.search(head_304, found.end()) is not None:
            return None
        start, end = found.span()
        if head_304[:start] + self.date_line + head_304[end:] != self.head_304:
            return None
        line = found.group()
        head = self.head.replace(self.date_line + b"\r\n", line + b"\r\n", 1)
        fields = dict(self.fields)
        fields["date"] = line.partition(b":")[2].decode("latin-1").strip()
        return self._replace(head_304=head_304, head=head, fields=fields, date_line=line)


_AGE_LINE = re.compile(rb"\r\nage:([^\r]*)", re.IGNORECASE)
_DATE_LINE = re.compile(rb"\r\ndate:[^\r]*", re.IGNORECASE)


def not_modified_update(stored_head: bytes, head_304: bytes, strip: frozenset[bytes]
                        ) -> NotModifiedUpdate:
    """The stored head updated by a 304 (:func:`merge_not_modified`), its fields, tags,
    validators and Vary names, and the head to store (minus ``strip``)."""
    merged = merge_not_modified(stored_head, head_304)
    fields = head_fields(merged)
    # The 304's own Age (merge_not_modified keeps no Age line), read by one pattern.
    age = _AGE_LINE.search(head_304)
    if age is not None:
        fields["age"] = age.group(1).decode("latin-1").strip()
    head = strip_fields(merged, strip)
    reusable = len(strip_fields(stored_head, strip)) == len(stored_head)
    dates = _DATE_LINE.findall(head_304)
    date_line = dates[0] if len(dates) == 1 and head.count(dates[0] + b"\r\n") == 1 else b""
    return NotModifiedUpdate(head_304, strip, head, fields, entry_tags(fields),
                             revalidation_fields(fields), vary_names(fields.get("vary")), reusable,
                             date_line)


# -- ranges (RFC 9110 §14) --------------------------------------------------------------------


class RangeKind(enum.Enum):
    FULL = "full"
    """Ignore Range: serve the whole stored response (200)."""
    PARTIAL = "partial"
    """206 with one byte range."""
    UNSATISFIABLE = "unsatisfiable"
    """416 with Content-Range: bytes */length."""


@dataclass(frozen=True, slots=True)
class RangeAnswer:
    kind: RangeKind
    first: int = 0
    last: int = -1
    """Inclusive byte positions of a PARTIAL answer."""


_FULL = RangeAnswer(RangeKind.FULL)


def _one_range(value: str, length: int) -> RangeAnswer:
    unit, sep, spec = value.partition("=")
    if not sep or unit.strip().lower() != "bytes" or "," in spec:
        return _FULL  # other units and multiple ranges: a server MAY ignore Range (§14.2)
    first_text, dash, last_text = spec.strip().partition("-")
    if not dash:
        return _FULL
    first_text, last_text = first_text.strip(), last_text.strip()
    if not (first_text.isascii() and last_text.isascii()):
        return _FULL
    if not first_text:  # suffix range: the last N bytes (§14.1.2)
        if not last_text.isdigit():
            return _FULL
        suffix = int(last_text)
        if suffix == 0 or length == 0:
            return RangeAnswer(RangeKind.UNSATISFIABLE)
        return RangeAnswer(RangeKind.PARTIAL, max(0, length - suffix), length - 1)
    if not first_text.isdigit() or (last_text and not last_text.isdigit()):
        return _FULL
    first = int(first_text)
    if last_text and int(last_text) < first:
        return _FULL  # invalid range-spec: the field is ignored (§14.1.1)
    last = int(last_text) if last_text else length - 1
    if first >= length:
        return RangeAnswer(RangeKind.UNSATISFIABLE)
    return RangeAnswer(RangeKind.PARTIAL, first, min(last, length - 1))


def range_answer(method: bytes, status: int, request: Mapping[str, str],
                 stored: Mapping[str, str], length: int) -> RangeAnswer:
    """How to answer a request's Range from a stored response of ``length`` content bytes.

    Only GET with a stored 200 is ranged (§14.2). If-Range (§13.1.5) keeps the Range only
    when its entity-tag strongly matches the stored ETag or its date equals the stored
    Last-Modified; otherwise the whole response is sent."""
    value = request.get("range")
    if value is None or method != b"GET" or status != 200:
        return _FULL
    if_range = request.get("if-range")
    if if_range is not None:
        if_range = if_range.strip()
        if if_range.startswith(('"', "W/")):
            etag = stored.get("etag")
            if etag is None or not _strong_match(if_range, etag):
                return _FULL
        else:
            date, modified = _date(if_range), _date(stored.get("last-modified"))
            if date is None or modified is None or date != modified:
                return _FULL
    return _one_range(value, length)


def dechunk(body: bytes) -> bytes | None:
    """The content of a chunked body (trailers dropped); None if the framing is broken."""
    out: list[bytes] = []
    pos = 0
    while True:
        end = body.find(b"\r\n", pos)
        if end < 0:
            return None
        size_text = body[pos:end].partition(b";")[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            return None
        if size == 0:
            return b"".join(out)
        start = end + 2
        out.append(body[start:start + size])
        if body[start + size:start + size + 2] != b"\r\n":
            return None
        pos = start + size + 2


# -- invalidation (RFC 9111 §4.4) ---------------------------------------------------------------


def _same_origin_target(value: str, host: str, target: str) -> str | None:
    """A Location / Content-Location value as an origin-form target when it names the same
    host as the request (relative references resolved against ``target``); else None."""
    value = value.strip()
    if not value:
        return None
    lower = value.lower()
    if lower.startswith(("http://", "https://")):
        rest = value.split("://", 1)[1]
        authority, slash, path = rest.partition("/")
        name = authority.rpartition("@")[2]
        name = name.partition(":")[0] if not name.startswith("[") else name
        if name.lower().rstrip(".") != host.lower().partition(":")[0].rstrip("."):
            return None
        return "/" + path if slash else "/"
    if value.startswith("//"):
        return None  # scheme-relative to another authority: not resolved, not trusted
    if value.startswith("/"):
        return value
    base = target.partition("?")[0]
    return base[: base.rfind("/") + 1] + value


def invalidation_targets(method: bytes, status: int, host: str, target: str,
                         response: Mapping[str, str]) -> list[str]:
    """The targets (origin-form, on ``host``) a response invalidates: for an unsafe method
    answered with a non-error status (2xx or 3xx), the request target and the same-origin
    Location and Content-Location (RFC 9111 §4.4). Empty otherwise."""
    if method in SAFE_METHODS or not 200 <= status < 400:
        return []
    targets = [target]
    for name in ("location", "content-location"):
        value = response.get(name)
        if value:
            other = _same_origin_target(value, host, target)
            if other is not None and other not in targets:
                targets.append(other)
    return targets


# -- answering a request from a stored response ---------------------------------------------------


class Answer(enum.Enum):
    STORED = "stored"
    NOT_MODIFIED = "not_modified"
    PARTIAL = "partial"
    UNSATISFIABLE = "unsatisfiable"


@dataclass(frozen=True, slots=True)
class CachedAnswer:
    """What to send for a request answered from a stored response: ``head`` (status line and
    fields, each ending in CRLF, no blank line) and ``body`` (b"" for HEAD and 304)."""

    kind: Answer
    head: bytes
    body: bytes


def _without(head: bytes, names: frozenset[bytes]) -> list[bytes]:
    return [line for line in head.rstrip(b"\r\n").split(b"\r\n")[1:]
            if line.partition(b":")[0].strip().lower() not in names]


_FRAMING = frozenset({b"content-length", b"transfer-encoding", b"content-range"})


def answer_from_store(method: bytes, request: Mapping[str, str], status: int, head: bytes,
                      body: bytes) -> CachedAnswer:
    """Answer a request carrying conditionals or Range from a stored response.

    Order as RFC 9110 §13.2.2: a matching If-None-Match / If-Modified-Since on a stored 200
    is a 304 (§15.4.5); otherwise a satisfiable single Range on a stored 200 is a 206
    (§14.2, §15.3.7), an unsatisfiable one a 416 (§15.5.17); otherwise the stored response."""
    head_only = method == b"HEAD"
    if status != 200:
        return CachedAnswer(Answer.STORED, head, b"" if head_only else body)
    stored = head_fields(head)
    if client_not_modified(method, request, stored):
        return CachedAnswer(Answer.NOT_MODIFIED, not_modified_head(head), b"")
    if "range" not in request or head_only:
        return CachedAnswer(Answer.STORED, head, b"" if head_only else body)
    content: bytes | None = body
    if "chunked" in stored.get("transfer-encoding", "").lower():
        content = dechunk(body)
    if content is None:
        return CachedAnswer(Answer.STORED, head, body)
    ranged = range_answer(method, status, request, stored, len(content))
    if ranged.kind is RangeKind.FULL:
        return CachedAnswer(Answer.STORED, head, body)
    lines = _without(head, _FRAMING)
    if ranged.kind is RangeKind.UNSATISFIABLE:
        lines[:0] = [b"HTTP/1.1 416 Range Not Satisfiable"]
        lines += [b"Content-Range: bytes */%d" % len(content), b"Content-Length: 0"]
        return CachedAnswer(Answer.UNSATISFIABLE, b"\r\n".join(lines) + b"\r\n", b"")
    part = content[ranged.first:ranged.last + 1]
    lines[:0] = [b"HTTP/1.1 206 Partial Content"]
    lines += [b"Content-Range: bytes %d-%d/%d" % (ranged.first, ranged.last, len(content)),
              b"Content-Length: %d" % len(part)]
    return CachedAnswer(Answer.PARTIAL, b"\r\n".join(lines) + b"\r\n", part)
