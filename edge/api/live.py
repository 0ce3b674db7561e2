"""Live sessions for the admin API: asked of this machine's ``edge serve`` master, whose
admin listener collects them from every worker (:mod:`edge.liveapi`, :mod:`edge.sessions`).

The API adds what that loopback listener lacks: a token with the ``sessions`` scope, and
request checks. A fleet of machines is one API call per machine (each runs its own
``edge admin serve`` next to its ``edge serve``).
"""

from __future__ import annotations

from typing import Any

import aiohttp

from edge.errors import EdgeError, NotFoundError, ValidationError
from edge.liveapi import auth_headers

TIMEOUT = 10.0
"""Seconds to wait for the edge's answer (it asks every worker, each with its own timeout)."""


class EdgeUnreachable(EdgeError):
    """The local ``edge serve`` admin listener did not answer (HTTP 503)."""


async def call_edge(base: str, method: str, path: str, *, token: str | None,
                    params: dict[str, str] | None = None,
                    body: dict[str, Any] | None = None) -> Any:
    """The JSON answer of ``edge serve``'s admin listener (``token``: :func:`edge.liveapi.token_of`
    this process's secret key); raises NotFoundError for its 404,
    ValidationError for its 400, EdgeUnreachable when it is not there."""
    if not base:
        raise EdgeUnreachable("no [admin] listen address is configured for the local edge serve")
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT)) as client, \
                client.request(method, base + path, params=params, json=body,
                               headers=auth_headers(token)) as response:
            answer = await response.json(content_type=None)
            status = response.status
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        raise EdgeUnreachable(f"the local edge serve at {base} did not answer: "
                              f"{exc or type(exc).__name__}") from None
    if status == 404:
        raise NotFoundError(str(answer.get("error", "not found")))
    if status == 400:
        raise ValidationError(str(answer.get("error", "refused")))
    if status != 200:
        raise EdgeUnreachable(f"the local edge serve answered {status}: "
                              f"{answer.get('error', '')}")
    return answer


__all__ = ["EdgeUnreachable", "call_edge"]
