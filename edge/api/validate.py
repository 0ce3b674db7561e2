"""Check a request against its OpenAPI operation (the document is the one schema).

:func:`query` and :func:`body` raise :class:`~edge.errors.ValidationError` (HTTP 422) naming
the offending field, or :class:`BadRequest` (400) for a body that is not JSON at all.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

from jsonschema import Draft202012Validator

from edge.api.openapi import SCHEMAS
from edge.errors import EdgeError, ValidationError

BULK_RECORD = {"$ref": "#/components/schemas/BulkRecord"}

MAX_BODY = 1 << 20
"""Largest JSON request body read (a certificate chain with its key fits many times over)."""
MAX_BULK_BODY = 256 << 20
"""Largest JSON Lines body of ``POST /bulk-load`` (read into memory; bigger loads: the CLI)."""


class BadRequest(EdgeError):
    """The body is not a JSON document (HTTP 400)."""


@lru_cache(maxsize=256)
def _validator(schema_json: str) -> Draft202012Validator:
    schema = json.loads(schema_json)
    return Draft202012Validator({**schema, "components": {"schemas": SCHEMAS}})


def check(schema: dict[str, Any], value: Any, where: str) -> None:
    """Raise ValidationError with the first (most specific) problem, if any."""
    validator = _validator(json.dumps(schema, sort_keys=True))
    error = next(iter(sorted(validator.iter_errors(value), key=lambda e: e.path)), None)
    if error is None:
        return
    path = ".".join(str(p) for p in error.absolute_path)
    field = f"{where}.{path}" if path else where
    message = error.message if len(error.message) < 200 else error.message[:200] + "..."
    raise ValidationError(f"{field}: {message}")


def query(operation: Mapping[str, Any], params: Mapping[str, str]) -> dict[str, Any]:
    """The documented query parameters present, converted to their schema's type."""
    out: dict[str, Any] = {}
    known = {p["name"] for p in operation.get("parameters", ()) if p["in"] == "query"}
    unknown = sorted(set(params) - known)
    if unknown:  # a typo (?hots=web1) must not silently list everything
        raise ValidationError(f"query.{unknown[0][:50]}: unknown parameter"
                              + (f" (this route takes {', '.join(sorted(known))})" if known
                                 else " (this route takes none)"))
    for param in operation.get("parameters", ()):
        name = param["name"]
        if param["in"] != "query" or name not in params:
            continue
        raw = params[name]
        value: Any = raw
        if param["schema"].get("type") == "integer":
            try:
                value = int(raw)
            except ValueError:
                raise ValidationError(f"query.{name}: {raw!r} is not an integer") from None
        check(param["schema"], value, f"query.{name}")
        out[name] = value
    return out


def json_lines(raw: bytes) -> list[str]:
    """The lines of a JSON Lines body, each checked to be a JSON object (422 naming the first
    that is not: refused before anything is accepted); what the records mean is checked by
    the loader."""
    try:
        lines = raw.decode().splitlines()
    except UnicodeDecodeError as exc:
        raise BadRequest(f"request body is not UTF-8: {exc}") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise ValidationError(f"body line {number}: not valid JSON ({exc})") from None
        if not isinstance(record, dict):
            raise ValidationError(f"body line {number}: each line must be a JSON object")
        check(BULK_RECORD, record, f"body line {number}")
    if not any(line.strip() for line in lines):
        raise ValidationError("body: no records (one JSON object per line)")
    return lines


def body(operation: Mapping[str, Any], raw: bytes) -> dict[str, Any]:
    """The JSON body checked against the operation's request schema ({} if it takes none)."""
    request_body = operation.get("requestBody")
    if request_body is None:
        return {}
    if "application/x-ndjson" in request_body["content"]:
        return {"lines": json_lines(raw)}
    try:
        value = json.loads(raw or b"null")
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"request body is not JSON: {exc}") from None
    check(request_body["content"]["application/json"]["schema"], value, "body")
    assert isinstance(value, dict)  # every request schema is an object
    return value


__all__ = ["MAX_BODY", "MAX_BULK_BODY", "BadRequest", "body", "check", "query"]
