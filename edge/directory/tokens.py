"""Bearer tokens for the admin API (``edge token add/list/remove``).

A token is ``edge_`` + 43 url-safe characters (256 random bits). The directory keeps only its
SHA-256, so the token is shown once, when created; a leaked database grants no API access. A
fast hash is right here (unlike for passwords): 256 random bits cannot be guessed, so there is
nothing for a slow hash to slow down.

Scopes: ``read`` (every GET), ``write`` (changes to the directory, moves, purges),
``sessions`` (listing and closing live sessions). A write does not imply read.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

from edge.directory.service import check_name
from edge.directory.store import SQLStore
from edge.errors import ConflictError, NotFoundError, ValidationError

SCOPES = ("read", "write", "sessions")
TOKEN_PREFIX = "edge_"


@dataclass(frozen=True, slots=True)
class Token:
    """A token as stored (never the secret itself)."""

    name: str
    scopes: frozenset[str]
    created_at: float

    def allows(self, scope: str) -> bool:
        return scope in self.scopes


@dataclass(frozen=True, slots=True)
class NewToken:
    """What :meth:`TokenService.add` returns: the only time the secret is known."""

    token: Token
    secret: str


def token_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def check_scopes(scopes: str | list[str]) -> frozenset[str]:
    """``"read,write"`` or a list → the set of scopes; refuses unknown ones and an empty set."""
    items = [s.strip() for s in scopes.split(",")] if isinstance(scopes, str) else list(scopes)
    chosen = frozenset(s for s in items if s)
    unknown = sorted(chosen - set(SCOPES))
    if unknown or not chosen:
        raise ValidationError(f"--scope must be a comma list of {', '.join(SCOPES)}"
                              + (f" (unknown: {', '.join(unknown)})" if unknown else ""))
    return chosen


class TokenService:
    """Create, list, remove and check API tokens (one transaction each)."""

    def __init__(self, store: SQLStore) -> None:
        self.store = store

    async def add(self, name: str, scopes: str | list[str]) -> NewToken:
        check_name("token", name)
        chosen = check_scopes(scopes)
        secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
        now = time.time()
        async with self.store.transaction() as tx:
            if await tx.fetchone("SELECT id FROM api_tokens WHERE name = ?", (name,)):
                raise ConflictError(f"token {name!r} already exists (remove it first to rotate)")
            await tx.execute("INSERT INTO api_tokens (name, token_sha256, scopes, created_at) "
                             "VALUES (?, ?, ?, ?)",
                             (name, token_hash(secret), ",".join(sorted(chosen)), now))
        return NewToken(Token(name, chosen, now), secret)

    async def list(self) -> list[Token]:
        rows = await self.store.fetchall(
            "SELECT name, scopes, created_at FROM api_tokens ORDER BY name")
        return [_token(row) for row in rows]

    async def remove(self, name: str) -> None:
        async with self.store.transaction() as tx:
            if not await tx.fetchone("SELECT id FROM api_tokens WHERE name = ?", (name,)):
                raise NotFoundError(f"token {name!r} does not exist")
            await tx.execute("DELETE FROM api_tokens WHERE name = ?", (name,))

    async def verify(self, secret: str) -> Token | None:
        """The token for ``secret``, or ``None`` when it is unknown (or removed)."""
        if not secret.startswith(TOKEN_PREFIX) or len(secret) > 200:
            return None
        digest = token_hash(secret)
        row = await self.store.fetchone(
            "SELECT name, scopes, created_at, token_sha256 FROM api_tokens "
            "WHERE token_sha256 = ?", (digest,))
        # The lookup is by hash, so timing reveals nothing about the secret; compare anyway
        # in constant time in case a driver ever matches case-insensitively.
        if row is None or not hmac.compare_digest(str(row[3]), digest):
            return None
        return _token(row)


def _token(row: tuple[object, ...]) -> Token:
    scopes = frozenset(s for s in str(row[1]).split(",") if s)
    return Token(str(row[0]), scopes, float(row[2]))  # type: ignore[arg-type]


__all__ = ["SCOPES", "NewToken", "Token", "TokenService", "check_scopes", "token_hash"]
