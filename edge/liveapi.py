"""The admin listener's live view: ``/sessions``, ``/sessions/{id}/kill``, ``/status``.

Served by the master (:class:`edge.admin.AdminServer`), loopback by default, like
``/metrics``. Loopback is not a boundary on a shared machine (any local user can connect), so
these routes also want ``Authorization: Bearer TOKEN`` where TOKEN is derived from the secret
key (:func:`admin_token`): whoever can read the key (the ``edge`` user, root) can list and end
sessions, with no extra flag, since ``edge sessions`` reads the same key as every other
``edge`` command; anyone else gets 401. An ``edge serve`` with no secret key refuses them (403).

* ``GET /sessions?host=&user=&protocol=`` → ``{"sessions": [...], "errors": [...]}`` from every
  live worker (:mod:`edge.sessions`); ``errors`` names workers that did not answer.
* ``POST /sessions/{id}/kill`` (JSON body ``{"message": "..."}``, optional) → 200
  ``{"killed": id}``, 404 if no live worker has that session.
* ``GET /status?window=1`` → :class:`edge.status.Status` as JSON (two metric readings
  ``window`` seconds apart, 0.2 to 10).

A request a browser made (it carries ``Origin`` or ``Sec-Fetch-Site``) gets 403: no web page an
operator has open, nor one that rebinds its DNS name to 127.0.0.1, can list or end sessions
through the operator's browser (the CLI and the admin API never send those headers).
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict

from aiohttp import web

from edge import sessions, status
from edge.config import SecretsConfig
from edge.directory.secrets import KeyBox
from edge.errors import SecretsError

TOKEN_PURPOSE = "edge serve admin listener: live routes"
"""What :meth:`KeyBox.derive` is asked for: the admin listener's bearer token."""

MAX_MESSAGE = 400
"""Longest kill message (characters): it ends up in an SSH disconnect / FTP 421 line."""


Handler = Callable[[web.Request], Awaitable[web.Response]]


def admin_token(secrets: SecretsConfig) -> str | None:
    """The bearer token of the live routes, from the secret key; None when there is no key."""
    try:
        return token_of(KeyBox.from_config(secrets))
    except SecretsError:
        return None


def token_of(keybox: KeyBox) -> str:
    return keybox.derive(TOKEN_PURPOSE)


def auth_headers(token: str | None) -> dict[str, str]:
    """Headers a client of the live routes sends (none without a key: it will get 401)."""
    return {"Authorization": f"Bearer {token}"} if token else {}


class LiveRoutes:
    """The handlers; the supervisor gives them its live worker pids and metric readings."""

    def __init__(self, *, control_dir: str, worker_pids: Callable[[], list[int]],
                 metrics: Callable[[], bytes], ping: Callable[[], Awaitable[str | None]],
                 workers_problem: Callable[[], str | None],
                 listeners: Callable[[], list[str]],
                 token: Callable[[], str | None]) -> None:
        self.control_dir = control_dir
        self._token = token
        self._pids = worker_pids
        self._metrics = metrics
        self._ping = ping
        self._workers_problem = workers_problem
        self._listeners = listeners

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/sessions", self._guarded(self.list_sessions))
        app.router.add_post("/sessions/{id}/kill", self._guarded(self.kill_session))
        app.router.add_get("/status", self._guarded(self.status))

    async def list_sessions(self, request: web.Request) -> web.Response:
        """200 with every live session matching the query's filters."""
        query = request.query
        listing = await sessions.list_sessions(self.control_dir, self._pids(),
                                               host=query.get("host"), user=query.get("user"),
                                               protocol=query.get("protocol"))
        rows = [asdict(s) for s in listing.sessions]
        return web.json_response({"sessions": rows, "errors": listing.errors})

    async def kill_session(self, request: web.Request) -> web.Response:
        """200 ``{"killed": id}``; 404 when no live worker holds it; 400 on a bad body."""
        session_id = request.match_info["id"]
        message = ""
        if request.can_read_body:
            try:
                body = await request.json()
            except ValueError:
                return _error(400, "the body must be JSON: {\"message\": \"...\"}")
            if not isinstance(body, dict) or not isinstance(body.get("message", ""), str):
                return _error(400, "\"message\" must be a string")
            message = body.get("message", "")
        if len(message) > MAX_MESSAGE or any(c in message for c in "\r\n\0"):
            return _error(400, f"the message must be one line of at most {MAX_MESSAGE} characters")
        if not await sessions.kill_session(self.control_dir, self._pids(), session_id, message):
            return _error(404, f"no live session {session_id!r} (ended already?)")
        return web.json_response({"killed": session_id})

    async def status(self, request: web.Request) -> web.Response:
        """200 with the status over ``?window=`` seconds (default 1)."""
        try:
            window = min(10.0, max(0.2, float(request.query.get("window", "1"))))
        except ValueError:
            return _error(400, "window must be a number of seconds")
        before = status.parse_samples(self._metrics().decode())
        started = time.monotonic()
        problem = await self._ping()
        latency = None if problem else (time.monotonic() - started) * 1000
        await asyncio.sleep(max(0.0, window - (time.monotonic() - started)))
        after = status.parse_samples(self._metrics().decode())
        result = status.summarize(before, after, window, listeners=self._listeners(),
                                  workers_problem=self._workers_problem(),
                                  database_problem=problem, lookup_latency_ms=latency)
        return web.json_response(asdict(result))

    def _guarded(self, handler: Handler) -> Handler:
        """``handler``, refusing requests a browser sent (403: cross-site form posts and
        fetches, and DNS-rebound pages, carry ``Origin`` or ``Sec-Fetch-Site``; session ids
        are guessable, ``pid.serial``) and requests without the admin token (401)."""
        async def checked(request: web.Request) -> web.Response:
            if "Origin" in request.headers or "Sec-Fetch-Site" in request.headers:
                return _error(403, "requests from web browsers are refused here; use edge "
                                   "sessions or the admin API")
            expected = self._token()
            if expected is None:
                return _error(403, "this edge serve has no secret key, so the live view is "
                                   "locked: create one with `edge init`")
            header = request.headers.get("Authorization", "")
            given = header[7:].strip() if header[:7].lower() == "bearer " else ""
            if not hmac.compare_digest(given.encode(), expected.encode()):
                return _error(401, "the admin token is missing or wrong: run edge sessions / "
                                   "edge status as a user who can read edge serve's secret key "
                                   "(the same [secrets] settings)",
                              headers={"WWW-Authenticate": "Bearer"})
            return await handler(request)
        return checked


def _error(code: int, text: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": text}, status=code, headers=headers)


__all__ = ["LiveRoutes", "admin_token", "auth_headers", "token_of"]
