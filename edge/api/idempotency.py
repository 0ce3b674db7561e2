"""``Idempotency-Key`` for API writes: a control panel can retry a write after a timeout
without doing it twice.

Keys are per token. The first request with a key stores a placeholder, runs, then stores its
status and body; a retry with the same key and the same request (method, path, query, body)
gets the stored answer back with ``Idempotency-Replayed: true``; the same key with another
request is refused (422); a retry while the first is still running gets 409 (retry later).
Answers of 5xx are not stored (nothing was written; the retry should run). Keys expire after
:data:`KEY_TTL`. A placeholder left by a crashed API process is dropped after
:data:`IN_FLIGHT_TTL`, after which the write runs again (the service refuses what would
duplicate: an existing name, a move to where the tenant already is).
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from typing import Any

from edge.directory.store import SQLStore
from edge.errors import ConflictError, EdgeError, ValidationError

log = logging.getLogger("edge.api")

KEY_TTL = 86400.0
IN_FLIGHT_TTL = 300.0
_IN_FLIGHT = 0
"""The status stored while the first request with a key is still running."""


@dataclass(frozen=True, slots=True)
class Stored:
    """A finished request's answer, replayed for a retry."""

    status: int
    body: str


def request_digest(method: str, path_qs: str, body: bytes) -> str:
    digest = hashlib.sha256(f"{method} {path_qs}\n".encode())
    digest.update(body)
    return digest.hexdigest()


PURGE_EVERY = 60.0
"""Seconds between sweeps of expired keys (a sweep is its own transaction, never part of a
request's: on MySQL a range DELETE next to concurrent INSERTs of one key deadlocks)."""


class IdempotencyKeys:
    def __init__(self, store: SQLStore) -> None:
        self.store = store
        self._last_purge = 0.0

    async def begin(self, token: str, key: str, digest: str) -> Stored | None:
        """``None``: run the request (a placeholder now holds the key); else the stored answer.

        Raises ConflictError while another request with the key runs, ValidationError when the
        key was used for a different request.
        """
        now = time.time()
        await self._purge(now)
        row = await self._claim(token, key, digest, now)
        if row is None:
            return None
        if row[0] != digest:
            raise ValidationError(f"Idempotency-Key {key!r} was already used for a different "
                                  "request (method, path or body); use a new key")
        if int(row[1]) == _IN_FLIGHT:
            raise ConflictError(f"a request with Idempotency-Key {key!r} is still running; "
                                "retry in a moment")
        return Stored(int(row[1]), str(row[2]))

    async def _claim(self, token: str, key: str, digest: str,
                     now: float) -> tuple[Any, ...] | None:
        """``None`` after inserting our placeholder, else the row that holds the key. The
        insert comes first: of concurrent twins exactly one wins the unique index."""
        try:
            async with self.store.transaction() as tx:
                await tx.execute("INSERT INTO api_idempotency (token_name, idem_key, "
                                 "request_sha256, status, response, created_at) "
                                 "VALUES (?, ?, ?, ?, '', ?)",
                                 (token, key, digest, _IN_FLIGHT, now))
            return None
        except ConflictError:
            pass
        row = await self.store.fetchone("SELECT request_sha256, status, response FROM "
                                        "api_idempotency WHERE token_name = ? AND idem_key = ?",
                                        (token, key))
        # Gone meanwhile (swept, or a 5xx freed it): the key is in flux; the client retries.
        return tuple(row) if row is not None else (digest, _IN_FLIGHT, "")

    async def _purge(self, now: float) -> None:
        """Drop expired keys and abandoned placeholders, at most every :data:`PURGE_EVERY`."""
        if now - self._last_purge < PURGE_EVERY:
            return
        self._last_purge = now
        try:
            async with self.store.transaction() as tx:
                await tx.execute("DELETE FROM api_idempotency WHERE created_at < ? OR "
                                 "(status = ? AND created_at < ?)",
                                 (now - KEY_TTL, _IN_FLIGHT, now - IN_FLIGHT_TTL))
        except EdgeError as exc:  # a sweep that loses a lock race waits for the next one
            log.warning("idempotency key sweep skipped: %s", exc)

    async def finish(self, token: str, key: str, status: int, body: str) -> None:
        """Store the answer (or, for a 5xx, free the key so a retry runs)."""
        async with self.store.transaction() as tx:
            if status >= 500:
                await tx.execute("DELETE FROM api_idempotency WHERE token_name = ? AND "
                                 "idem_key = ?", (token, key))
            else:
                await tx.execute("UPDATE api_idempotency SET status = ?, response = ? "
                                 "WHERE token_name = ? AND idem_key = ?",
                                 (status, body, token, key))


__all__ = ["IdempotencyKeys", "Stored", "request_digest"]
