"""Per-key rate limits, brute-force bans and connection caps; sans-IO, bounded memory.

Everything here is plain bookkeeping driven by an injectable clock (``time.monotonic`` by
default), so it is tested with a fake clock and costs no timers or tasks at run time.
Keys are whatever the caller chooses: an IP string, a username, ``(site, ip)``.

Memory is bounded because edges are scanned: a sweep of millions of source addresses must
not grow a table without limit. Idle state that no longer matters (a refilled bucket, an
expired failure window or ban) is dropped as it ages, and each table holds at most
``max_keys`` entries, forgetting the least recently touched first. Forgetting is always the
lenient direction (a forgotten key starts afresh), which is the price of the bound.
"""

from __future__ import annotations

import math
import random
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Protocol

__all__ = [
    "ConnectionCap",
    "ConnectionCapExceeded",
    "DelayMimic",
    "FailureBan",
    "FailurePacer",
    "LoginLimitSettings",
    "LoginLimits",
    "LoginVerdict",
    "RateLimiter",
    "RecentFailures",
]

Clock = Callable[[], float]

DEFAULT_MAX_KEYS = 100_000


def _check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be greater than 0, got {value!r}")


class RateLimiter:
    """A token bucket per key: ``rate_per_second`` tokens refill up to ``burst``.

    A key never seen has a full bucket, so the first ``burst`` calls pass at once.
    """

    __slots__ = ("_buckets", "_burst", "_clock", "_full_after", "_max_keys", "_rate")

    def __init__(
        self,
        rate_per_second: float,
        burst: float,
        max_keys: int = DEFAULT_MAX_KEYS,
        *,
        clock: Clock = time.monotonic,
    ) -> None:
        _check_positive("rate_per_second", rate_per_second)
        if not burst >= 1:
            raise ValueError(f"burst must be at least 1 (one request), got {burst!r}")
        _check_positive("max_keys", max_keys)
        self._rate = float(rate_per_second)
        self._burst = float(burst)
        self._max_keys = max_keys
        self._clock = clock
        # Seconds after which even an empty bucket is full again: such entries carry no
        # information and are dropped.
        self._full_after = self._burst / self._rate
        # key -> [tokens, last update]; ordered by last update (oldest first).
        self._buckets: OrderedDict[Hashable, list[float]] = OrderedDict()

    def allow(self, key: Hashable) -> bool:
        """Take one token for ``key``: True if the request may proceed, False to refuse it."""
        now = self._clock()
        self._expire(now)
        tokens = self._tokens(key, now)
        if tokens >= 1.0:
            self._store(key, tokens - 1.0, now)
            return True
        self._store(key, tokens, now)
        return False

    def retry_after(self, key: Hashable) -> float:
        """Seconds until ``key`` has a token again (0.0 if it has one now); takes no token.

        Suitable for an HTTP ``Retry-After`` header after rounding up.
        """
        now = self._clock()
        tokens = self._tokens(key, now)
        if tokens >= 1.0:
            return 0.0
        return (1.0 - tokens) / self._rate

    def __len__(self) -> int:
        """Keys currently tracked (for metrics; bounded by ``max_keys``)."""
        return len(self._buckets)

    def _tokens(self, key: Hashable, now: float) -> float:
        entry = self._buckets.get(key)
        if entry is None:
            return self._burst
        tokens, last = entry
        # max(): a clock that steps backwards must not drain the bucket.
        return min(self._burst, tokens + max(0.0, now - last) * self._rate)

    def _store(self, key: Hashable, tokens: float, now: float) -> None:
        buckets = self._buckets
        if key in buckets:
            buckets.move_to_end(key)
        elif len(buckets) >= self._max_keys:
            buckets.popitem(last=False)
        buckets[key] = [tokens, now]

    def _expire(self, now: float) -> None:
        buckets = self._buckets
        horizon = now - self._full_after
        while buckets:
            _, last = next(iter(buckets.values()))
            if last > horizon:
                break
            buckets.popitem(last=False)


class FailureBan:
    """fail2ban-style: ``max_failures`` within ``window_seconds`` bans a key for
    ``ban_seconds``.

    The window slides (the last ``max_failures`` failure times are kept). A success clears
    the failures but not an active ban: a banned client should not be able to find out
    whether a guess was right.
    """

    __slots__ = ("_ban", "_bans", "_clock", "_failures", "_max_failures", "_max_keys")

    def __init__(
        self,
        max_failures: int,
        window_seconds: float,
        ban_seconds: float,
        max_keys: int = DEFAULT_MAX_KEYS,
        *,
        clock: Clock = time.monotonic,
    ) -> None:
        if max_failures < 1:
            raise ValueError(f"max_failures must be at least 1, got {max_failures!r}")
        _check_positive("window_seconds", window_seconds)
        _check_positive("ban_seconds", ban_seconds)
        _check_positive("max_keys", max_keys)
        self._max_failures = max_failures
        self._ban = float(ban_seconds)
        self._max_keys = max_keys
        self._clock = clock
        self._failures = RecentFailures(window_seconds, max_failures, max_keys, clock=clock)
        # key -> ban end; every ban lasts ban_seconds, so insertion order is expiry order and
        # the table is cleaned from the front. Kept apart from _failures so that a flood of
        # fresh keys evicts half-counted keys long before it can evict a ban.
        self._bans: OrderedDict[Hashable, float] = OrderedDict()

    def record_failure(self, key: Hashable) -> float:
        """Count a failure; returns the ban now in force for ``key`` in seconds (0.0: none)."""
        now = self._clock()
        self._expire(now)
        until = self._bans.get(key)
        if until is not None:
            return until - now  # already banned: failures while banned do not extend it
        if self._failures.record(key) >= self._max_failures:
            self._failures.forget(key)
            if len(self._bans) >= self._max_keys:
                self._bans.popitem(last=False)  # the ban closest to its end anyway
            self._bans[key] = now + self._ban
            return self._ban
        return 0.0

    def record_success(self, key: Hashable) -> None:
        """Forget ``key``'s failures (an active ban stays until it expires)."""
        self._failures.forget(key)

    def banned_for(self, key: Hashable) -> float:
        """Seconds left on ``key``'s ban; 0.0 when it is not banned."""
        now = self._clock()
        self._expire(now)
        until = self._bans.get(key)
        return 0.0 if until is None else until - now

    def __len__(self) -> int:
        """Keys currently tracked, failing or banned (for metrics)."""
        return len(self._failures) + len(self._bans)

    def _expire(self, now: float) -> None:
        bans = self._bans
        while bans:
            until = next(iter(bans.values()))
            if until > now:
                break
            bans.popitem(last=False)
        self._failures.drop_expired(now)


class ConnectionCapExceeded(Exception):
    """Raised by :meth:`ConnectionCap.hold` when ``key`` already has its maximum."""

    def __init__(self, key: Hashable, limit: int) -> None:
        super().__init__(f"too many connections from {key} (limit {limit})")
        self.key = key
        self.limit = limit


class ConnectionCap:
    """At most ``max_per_key`` concurrent holders per key.

    Only keys with at least one holder are stored, so memory follows the number of open
    connections, which the listener bounds anyway.
    """

    __slots__ = ("_counts", "_max")

    def __init__(self, max_per_key: int) -> None:
        if max_per_key < 1:
            raise ValueError(f"max_per_key must be at least 1, got {max_per_key!r}")
        self._max = max_per_key
        self._counts: dict[Hashable, int] = {}

    @property
    def max_per_key(self) -> int:
        return self._max

    def try_acquire(self, key: Hashable) -> bool:
        """Take a slot: True if taken (call :meth:`release` later), False if at the cap."""
        count = self._counts.get(key, 0)
        if count >= self._max:
            return False
        self._counts[key] = count + 1
        return True

    def release(self, key: Hashable) -> None:
        """Give a slot back. Releasing a key with no slots does nothing (never negative)."""
        count = self._counts.get(key, 0)
        if count <= 1:
            self._counts.pop(key, None)
        else:
            self._counts[key] = count - 1

    def count(self, key: Hashable) -> int:
        """Slots currently held by ``key``."""
        return self._counts.get(key, 0)

    def __len__(self) -> int:
        """Keys holding at least one slot."""
        return len(self._counts)

    @contextmanager
    def hold(self, key: Hashable) -> Iterator[None]:
        """``with cap.hold(ip):`` holds a slot for the block; raises
        :class:`ConnectionCapExceeded` (before the block runs) when at the cap."""
        if not self.try_acquire(key):
            raise ConnectionCapExceeded(key, self._max)
        try:
            yield
        finally:
            self.release(key)


class RecentFailures:
    """How many failures each key had within the last ``window_seconds`` (counted up to
    ``max_count``; more would not change any decision). Bounded like the other tables."""

    __slots__ = ("_clock", "_failures", "_max_count", "_max_keys", "_window")

    def __init__(self, window_seconds: float, max_count: int, max_keys: int = DEFAULT_MAX_KEYS,
                 *, clock: Clock = time.monotonic) -> None:
        _check_positive("window_seconds", window_seconds)
        _check_positive("max_count", max_count)
        _check_positive("max_keys", max_keys)
        self._window = float(window_seconds)
        self._max_count = max_count
        self._max_keys = max_keys
        self._clock = clock
        # key -> recent failure times; ordered by latest failure (oldest first).
        self._failures: OrderedDict[Hashable, deque[float]] = OrderedDict()

    def record(self, key: Hashable) -> int:
        """Count a failure; returns the failures now within the window."""
        now = self._clock()
        self.drop_expired(now)
        failures = self._failures.pop(key, None)
        if failures is None:
            if len(self._failures) >= self._max_keys:
                self._failures.popitem(last=False)
            failures = deque(maxlen=self._max_count)
        failures.append(now)
        self._failures[key] = failures
        return self._trim(failures, now)

    def forget(self, key: Hashable) -> None:
        self._failures.pop(key, None)

    def count(self, key: Hashable) -> int:
        now = self._clock()
        self.drop_expired(now)
        failures = self._failures.get(key)
        return 0 if failures is None else self._trim(failures, now)

    def __len__(self) -> int:
        return len(self._failures)

    def _trim(self, failures: deque[float], now: float) -> int:
        horizon = now - self._window
        while failures and failures[0] <= horizon:
            failures.popleft()
        return len(failures)

    def drop_expired(self, now: float) -> None:
        """Forget keys whose latest failure left the window (memory only: counts trim themselves)."""
        failures = self._failures
        horizon = now - self._window
        while failures:
            latest = next(iter(failures.values()))[-1]
            if latest > horizon:
                break
            failures.popitem(last=False)


class FailurePacer:
    """When a failed login is answered, so that every failure looks the same from outside.

    Without it a proxy leaks which accounts exist: it refuses an unknown user by itself, but a
    known user's wrong password only when the backend says so, and backends take their time
    (sshd with PAM ~2.7 s, pyftpdlib 3 s). So every failure, real or not, is answered at one
    deadline from the attempt's start: the slowest real refusal seen lately (any backend), at
    least ``floor`` and at most ``cap``, plus a random 0-10%. A real refusal slower than that
    deadline is answered when it comes (plus the same jitter) and raises the deadline for what
    follows; so the two kinds of failure differ only while the proxy has not yet seen a backend
    refuse, or when a backend beats its own record.

    The maximum rather than a mean: any real refusal later than the deadline is a tell, and the
    price of a high deadline is only that a mistyped password costs a few seconds more.
    "Lately" is the last ``samples`` refusals *and* every refusal of the last
    ``window_seconds``: not time alone, or the first slow refusal after a quiet spell would
    stand out; not count alone, or an attacker could flush a slow backend's refusals out with
    quick failures on an account of their own just before probing a name.
    """

    __slots__ = ("_cap", "_clock", "_floor", "_random", "_recent", "_samples", "_window")

    JITTER = 0.1
    """Fraction of the deadline drawn at random per answer: blurs the little left (event-loop
    wake-ups, a record refusal) that could tell failures apart."""
    MAX_KEPT = 4096
    """Refusals kept at most (a flood within the window keeps its slowest plus the newest)."""

    def __init__(self, floor: float, cap: float, samples: int = 32, window_seconds: float = 300.0,
                 rng: random.Random | None = None, *, clock: Clock = time.monotonic) -> None:
        if floor < 0:
            raise ValueError(f"the failure delay must be at least 0, got {floor!r}")
        _check_positive("samples", samples)
        self._floor = float(floor)
        self._cap = max(float(cap), self._floor)
        self._samples = samples
        self._window = float(window_seconds)
        self._clock = clock
        # (time, seconds), oldest first.
        self._recent: deque[tuple[float, float]] = deque()
        self._random = rng or random.SystemRandom()

    def record_refusal(self, seconds: float) -> None:
        """A backend refused a login ``seconds`` after the attempt started."""
        now = self._clock()
        self._expire(now)
        recent = self._recent
        if len(recent) >= self.MAX_KEPT:
            # Drop the quickest of the old half: the maximum is what matters.
            old = list(recent)[: len(recent) // 2]
            quickest = min(range(len(old)), key=lambda i: old[i][1])
            del recent[quickest]
        recent.append((now, min(max(0.0, seconds), self._cap)))

    def deadline(self) -> float:
        """Seconds from an attempt's start at which failures are answered now (no jitter)."""
        self._expire(self._clock())
        slowest = max((seconds for _, seconds in self._recent), default=0.0)
        return min(self._cap, max(self._floor, slowest))

    def answer_after(self, elapsed: float = 0.0) -> float:
        """Seconds from the attempt's start to answer a failure that is known ``elapsed`` s in."""
        base = max(self.deadline(), elapsed)
        return base + self._random.uniform(0.0, self.JITTER * base)

    def _expire(self, now: float) -> None:
        recent = self._recent
        horizon = now - self._window
        while len(recent) > self._samples and recent[0][0] <= horizon:
            recent.popleft()


class DelayMimic:
    """Recent durations of a real step, to give a faked step (for an unknown user) the same
    duration: each fake draws one of the last ``samples`` real ones (0 before any was seen).

    Drawing from what was observed, rather than waiting for a maximum as :class:`FailurePacer`
    does, because this step is on the way to successful logins too: real ones are not slowed.
    """

    __slots__ = ("_random", "_recent")

    def __init__(self, samples: int = 32, rng: random.Random | None = None) -> None:
        self._recent: deque[float] = deque(maxlen=samples)
        self._random = rng or random.SystemRandom()

    def record(self, seconds: float) -> None:
        self._recent.append(max(0.0, seconds))

    def draw(self) -> float:
        return self._random.choice(self._recent) if self._recent else 0.0


class _LimitsConfigLike(Protocol):
    # Structural view of edge.config.LimitsConfig, so this module does not import the config.
    @property
    def max_failures_per_ip(self) -> int: ...
    @property
    def max_failures_per_ip_user(self) -> int: ...
    @property
    def max_failures_per_user(self) -> int: ...
    @property
    def user_slowdown_max(self) -> float: ...
    @property
    def failure_window(self) -> float: ...
    @property
    def ban_seconds(self) -> float: ...
    @property
    def max_unauthenticated_per_ip(self) -> int: ...
    @property
    def failure_delay_max(self) -> float: ...


@dataclass(frozen=True, slots=True)
class LoginLimitSettings:
    """Brute-force limits for one login-speaking proxy; the defaults are safe to run with.

    Field names match ``[limits]`` in the configuration file.
    """

    max_failures_per_ip: int = 10
    """Failed logins from one IP (any usernames) within ``failure_window`` before a ban."""
    max_failures_per_user: int = 5
    """Failed logins for one username (from any IPs) within ``failure_window`` after which
    that user's password logins are slowed down (never locked: see ``user_slowdown_max``)."""
    failure_window: float = 300.0
    ban_seconds: float = 600.0
    max_unauthenticated_per_ip: int = 20
    """Connections from one IP that have not logged in yet (password spraying in parallel)."""
    max_failures_per_ip_user: int = 5
    """Failed logins for one username from one IP within ``failure_window`` before that pair
    is banned (the same address may still log in as other users until its own limit)."""
    user_slowdown_max: float = 8.0
    """Cap in seconds on the per-user slowdown (1 s, 2 s, 4 s ... per further failure)."""
    failure_delay_max: float = 10.0
    """Cap in seconds on the learned failure deadline (:class:`FailurePacer`)."""
    max_keys: int = DEFAULT_MAX_KEYS
    """Per table; bounds memory under address scans."""

    @classmethod
    def from_config(cls, limits: _LimitsConfigLike) -> LoginLimitSettings:
        """Settings from the ``[limits]`` section (``edge.config.LimitsConfig``)."""
        names = [f.name for f in fields(cls) if f.name != "max_keys"]
        return cls(**{name: getattr(limits, name) for name in names})


@dataclass(frozen=True, slots=True)
class LoginVerdict:
    """Whether a login attempt may proceed.

    When ``allowed`` is False, ``reason`` is a sentence for the log (not for the client:
    tell the client the same thing as for a wrong password) and ``retry_after`` the seconds
    until the ban ends.
    """

    allowed: bool
    reason: str = ""
    retry_after: float = 0.0


_ALLOWED = LoginVerdict(True)


class LoginLimits:
    """Brute-force protection for a login-speaking proxy (SSH, FTP).

    Per connection::

        if not limits.unauthenticated.try_acquire(ip): refuse the connection
        ... per password attempt:  sleep limits.user_delay(username) first, then
                                   verdict = limits.check_login(ip, username)
        ... on the answer:         limits.login_failed(ip, username) / login_succeeded(...)
                                   failures answered per limits.pace
        release the unauthenticated slot on login success or on disconnect (once).

    Bans are per source only: per IP (one address guessing many accounts) and per IP and
    username (one address guessing one account). Many addresses guessing one account slow
    that account's password logins down instead (:meth:`user_delay`): a ban per username
    would let anyone lock any user out with a few wrong passwords. Key logins are never
    slowed (a key cannot be guessed). Usernames are used as given; normalise them first if
    the directory does.
    """

    __slots__ = ("by_ip", "by_ip_user", "by_user", "pace", "settings", "unauthenticated")

    def __init__(
        self, settings: LoginLimitSettings | None = None, *, failure_delay: float = 1.0,
        clock: Clock = time.monotonic
    ) -> None:
        s = settings or LoginLimitSettings()
        self.settings = s
        self.by_ip = FailureBan(
            s.max_failures_per_ip, s.failure_window, s.ban_seconds, s.max_keys, clock=clock
        )
        self.by_ip_user = FailureBan(
            s.max_failures_per_ip_user, s.failure_window, s.ban_seconds, s.max_keys, clock=clock
        )
        # Counted up to where the slowdown reaches its cap; more changes nothing.
        steps = max(1, math.ceil(math.log2(max(1.0, s.user_slowdown_max))) + 1)
        self.by_user = RecentFailures(
            s.failure_window, s.max_failures_per_user + steps, s.max_keys, clock=clock
        )
        self.pace = FailurePacer(failure_delay, s.failure_delay_max,
                                 window_seconds=s.failure_window, clock=clock)
        self.unauthenticated = ConnectionCap(s.max_unauthenticated_per_ip)

    def check_login(self, ip: str, username: str | None = None) -> LoginVerdict:
        """May ``ip`` try to log in as ``username`` now? (``None``: username not known yet.)"""
        seconds = self.by_ip.banned_for(ip)
        if seconds > 0:
            return LoginVerdict(False, f"too many failed logins from {ip}", seconds)
        if username is not None:
            seconds = self.by_ip_user.banned_for((ip, username))
            if seconds > 0:
                return LoginVerdict(
                    False, f"too many failed logins for user {username!r} from {ip}", seconds
                )
        return _ALLOWED

    def user_delay(self, username: str | None) -> float:
        """Seconds to hold a password attempt for ``username`` before it is checked: 0 until
        ``max_failures_per_user`` recent failures, then 1, 2, 4 ... up to ``user_slowdown_max``.

        Applied to every password attempt for the name (known or not, banned or not, right or
        wrong), so it slows guessing without telling anything, and costs the real user at most
        the cap.
        """
        if username is None:
            return 0.0
        s = self.settings
        excess = self.by_user.count(username) - s.max_failures_per_user
        if excess < 0:
            return 0.0
        return float(min(s.user_slowdown_max, 2.0 ** min(excess, 32)))

    def login_failed(self, ip: str, username: str | None = None) -> LoginVerdict:
        """Record a failed login; returns the verdict for the next attempt (disconnect now
        if it is not allowed)."""
        self.by_ip.record_failure(ip)
        if username is not None:
            self.by_ip_user.record_failure((ip, username))
            self.by_user.record(username)
        return self.check_login(ip, username)

    def login_succeeded(self, ip: str, username: str) -> None:
        """Record a successful login: clears the failure counts of the IP (an active ban stays).

        The per-user count stays: the real user logging in must not reset an attacker's
        slowdown elsewhere; it fades with ``failure_window``.
        """
        self.by_ip.record_success(ip)
        self.by_ip_user.record_success((ip, username))
