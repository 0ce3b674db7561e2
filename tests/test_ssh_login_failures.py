"""SSH login failures as an attacker and as a user see them: failure timing that does not tell
accounts apart, bans per source (never a lockout of the account), and the stock client's
"Permission denied" after its own number of password prompts.

Clients: stock ``ssh`` where the user's experience is asserted, asyncssh where many timed
attempts are needed (one process each would cost seconds). Backends: the asyncssh backend of
test_ssh_proxy with a configurable refusal delay (a real sshd with PAM refuses after ~2.7 s).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import asyncssh
import pytest

from edge.config import LimitsConfig
from tests.support_timing import inseparable
from tests.test_ssh_proxy import (  # noqa: F401 - keys is a fixture
    ASKPASS_ENV,
    AsyncsshBackend,
    Edge,
    keys,
    make_edge,
    provision,
    run,
    upstream_key,
)

pytestmark = pytest.mark.timeout(180)

NO_LIMITS = LimitsConfig(max_failures_per_ip=100_000, max_failures_per_ip_user=100_000,
                         max_failures_per_user=100_000, max_unauthenticated_per_ip=1000)
UNKNOWN, WRONG = "unknown user", "wrong password"


@pytest.fixture
async def slow_backend(keys: Path) -> AsyncIterator[AsyncsshBackend]:  # noqa: F811
    server = AsyncsshBackend("backend-a", upstream_key(keys), refusal_delay=0.5)
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def fast_backend(keys: Path) -> AsyncIterator[AsyncsshBackend]:  # noqa: F811
    server = AsyncsshBackend("backend-a", upstream_key(keys))
    await server.start()
    yield server
    await server.stop()


@pytest.fixture(params=[0.5, 0.0], ids=["slow", "fast"])
async def refusing_backend(keys: Path,  # noqa: F811
                           request: pytest.FixtureRequest) -> AsyncIterator[AsyncsshBackend]:
    """Refuses wrong passwords after 0.5 s (past the edge's 0.3 s delay) or at once."""
    server = AsyncsshBackend("backend-a", upstream_key(keys), refusal_delay=request.param)
    await server.start()
    yield server
    await server.stop()


class _TimedClient(asyncssh.SSHClient):
    """Notes when the password leaves the client: the timing starts there, not at TCP connect."""

    def __init__(self, password: str) -> None:
        self.password = password
        self.sent = 0.0

    def password_auth_requested(self) -> str | None:
        if self.sent:
            return None  # one attempt per connection
        self.sent = time.monotonic()
        return self.password


async def password_attempt(port: int, user: str, password: str, source: str = "127.0.0.1",
                           ) -> tuple[bool, float]:
    """One password attempt with asyncssh: (logged in, seconds from password to answer)."""
    client = _TimedClient(password)
    try:
        conn = await asyncio.wait_for(asyncssh.connect(
            "127.0.0.1", port, username=user, known_hosts=None, client_factory=lambda: client,
            preferred_auth="password", client_keys=None, agent_path=None, config=None,
            local_addr=(source, 0)), 60)
    except asyncssh.PermissionDenied:
        return False, time.monotonic() - client.sent
    elapsed = time.monotonic() - client.sent
    conn.close()
    await conn.wait_closed()
    return True, elapsed


async def interleaved(measure: Callable[[str], Awaitable[float]], lanes: int = 6,
                      rounds: int = 10) -> tuple[list[float], list[float]]:
    """``measure(user)`` 30 times for unknown users and 30 for alice, interleaved over
    ``lanes`` concurrent clients (load affects both kinds alike)."""
    samples: dict[str, list[float]] = {UNKNOWN: [], WRONG: []}

    async def lane(index: int) -> None:
        for i in range(rounds):
            kind = (UNKNOWN, WRONG)[(index + i) % 2]
            samples[kind].append(await measure(f"nobody{index}x{i}" if kind == UNKNOWN else "alice"))

    await asyncio.gather(*(lane(i) for i in range(lanes)))
    return samples[UNKNOWN], samples[WRONG]


async def failure_time(port: int, user: str) -> float:
    ok, elapsed = await password_attempt(port, user, "nope")
    assert not ok
    return elapsed


@pytest.mark.slow
async def test_unknown_user_and_wrong_password_take_the_same_time(
        tmp_path: Path, keys: Path, refusing_backend: AsyncsshBackend) -> None:  # noqa: F811
    """A backend that refuses after 0.5 s (past the 0.3 s configured delay) used to answer
    wrong passwords 0.2 s later than unknown users, every time: a perfect user list."""
    backend = refusing_backend
    async for edge in make_edge(tmp_path, keys, limits=NO_LIMITS):
        await provision(edge, backend)
        result, unknown, wrong = await inseparable(
            partial(interleaved, partial(failure_time, edge.port)))
        summary = (f"unknown user {sorted(unknown)[15]:.3f} s (median), wrong password "
                   f"{sorted(wrong)[15]:.3f} s: KS {result}")
        assert result.pvalue > 0.05, summary
        floor = edge.proxy.config.auth_failure_delay
        assert min(unknown + wrong) >= floor, summary
        if backend.refusal_delay:
            # Every failure waits as long as the backend takes to refuse, except those answered
            # before the proxy had seen any refusal (at most the 3 lanes that begin unknown).
            early = [t for t in unknown + wrong if t < backend.refusal_delay]
            assert len(early) <= 3, summary


async def test_attacker_cannot_lock_a_user_out(tmp_path: Path, keys: Path,  # noqa: F811
                                               slow_backend: AsyncsshBackend) -> None:
    """Failures for alice from 127.0.0.1 ban that source (even with her right password, which
    never reaches the backend and is refused at a normal failure's time), while alice logs in
    with her key from 127.0.0.2 at once and with her password from 127.0.0.3."""
    backend = slow_backend
    limits = LimitsConfig(max_failures_per_ip=3, max_failures_per_user=3, user_slowdown_max=1.0)
    async for edge in make_edge(tmp_path, keys, limits=limits):
        await provision(edge, backend)
        failed = [await password_attempt(edge.port, "alice", "guess") for _ in range(3)]
        assert not any(ok for ok, _ in failed)
        asked = len(backend.password_attempts)
        # The per-user slowdown (1 s after 3 failures) is for everyone who types alice's
        # password, so a fourth real failure from another address is the fair comparison.
        normal = await password_attempt(edge.port, "alice", "guess", "127.0.0.4")
        banned = await password_attempt(edge.port, "alice", "alice-pw")
        assert not normal[0] and not banned[0]
        assert len(backend.password_attempts) == asked + 1  # the banned try never left the proxy
        assert abs(banned[1] - normal[1]) < 0.2, (banned, normal, failed)
        assert all(abs(banned[1] - 1.0 - t) < 0.2 for _, t in failed), (banned, failed)

        args = edge.ssh_args("alice", key=edge.user_key)
        started = time.monotonic()
        rc, out, err = await run(*args[:-1], "-o", "BindAddress=127.0.0.2", "-o",
                                 "PreferredAuthentications=publickey", args[-1], "whoami")
        assert (rc, out) == (0, "backend-a alice\n"), err
        assert time.monotonic() - started < 5.0  # a key login is not slowed down

        ok, _ = await password_attempt(edge.port, "alice", "alice-pw", "127.0.0.3")
        assert ok  # slowed (1 s), never locked out
        reasons = [line["reason"] for line in await edge.log_lines()]
        assert "too many failed logins from 127.0.0.1" in reasons


class _KbdIntClient(asyncssh.SSHClient):
    """Times the keyboard-interactive prompt: from asking for the method to the challenge."""

    def __init__(self) -> None:
        self.asked = 0.0
        self.prompt_after = 0.0

    def kbdint_auth_requested(self) -> str | None:
        if self.asked:
            return None
        self.asked = time.monotonic()
        return ""

    def kbdint_challenge_received(self, name: str, instructions: str, lang: str,
                                  prompts: Any) -> list[str] | None:
        if not self.prompt_after:
            self.prompt_after = time.monotonic() - self.asked
        return ["nope"] * len(prompts)


async def prompt_time(port: int, user: str) -> float:
    client = _KbdIntClient()
    with pytest.raises(asyncssh.PermissionDenied):
        await asyncio.wait_for(asyncssh.connect(
            "127.0.0.1", port, username=user, known_hosts=None, client_factory=lambda: client,
            preferred_auth="keyboard-interactive", client_keys=None, agent_path=None,
            config=None), 60)
    assert client.prompt_after
    return client.prompt_after


@pytest.mark.slow
async def test_keyboard_interactive_prompt_comes_as_late_for_unknown_users(
        tmp_path: Path, keys: Path) -> None:  # noqa: F811
    """A backend that takes 0.3 s to show its first prompt (PAM starting): unknown users got
    their fake prompt at once, a tell before any password was typed."""
    backend = AsyncsshBackend("backend-a", upstream_key(keys), challenge_delay=0.3)
    await backend.start()
    try:
        async for edge in make_edge(tmp_path, keys, limits=NO_LIMITS):
            await provision(edge, backend)

            result, unknown, known = await inseparable(
                partial(interleaved, partial(prompt_time, edge.port)))
            summary = (f"prompt for unknown user {sorted(unknown)[15]:.3f} s (median), known "
                       f"{sorted(known)[15]:.3f} s: KS {result}")
            assert result.pvalue > 0.05, summary
    finally:
        await backend.stop()


def _askpass_env(edge: Edge, password: str) -> dict[str, str]:
    return {**os.environ, "SSH_ASKPASS": str(edge.tmp / "askpass"),
            "SSH_ASKPASS_REQUIRE": "force", ASKPASS_ENV: password}


@pytest.mark.parametrize("method", ["keyboard-interactive", "password"])
async def test_wrong_password_ends_in_permission_denied_after_the_clients_prompts(
        tmp_path: Path, keys: Path, fast_backend: AsyncsshBackend, method: str) -> None:  # noqa: F811
    """The stock client used to be re-prompted (keyboard-interactive relayed round after round,
    each a backend login) until the 30 s login timeout, then saw "Connection closed"; the log
    had one line, auth_method=none, "Login timeout expired"."""
    async for edge in make_edge(tmp_path, keys):
        await provision(edge, fast_backend)
        args = edge.ssh_args("alice", batch=False)
        started = time.monotonic()
        rc, out, err = await run(*args[:-1], "-o", f"PreferredAuthentications={method}",
                                 "-o", "NumberOfPasswordPrompts=2", args[-1], "whoami",
                                 env=_askpass_env(edge, "nope"), time_limit=25)
        elapsed = time.monotonic() - started
        assert rc == 255 and out == "", err
        assert "alice@127.0.0.1: Permission denied (publickey,keyboard-interactive,password)." in err
        assert elapsed < 15, f"{elapsed:.1f} s"
        assert len(fast_backend.password_attempts) == 2  # each prompt one backend login
        failures = [r.__dict__ for r in edge.records if getattr(r, "event", "") == "ssh_login_failed"]
        assert len(failures) == 2, failures
        for line in failures:
            assert (line["user"], line["auth_method"]) == ("alice", method)
            assert line["client"].startswith("127.0.0.1:") and "nope" not in str(line)
        connection: dict[str, Any] = (await edge.log_lines())[-1]
        assert (connection["auth_method"], connection["outcome"]) == (method, "login failed")
        # Counted like any failure: two more and this address is banned (default limits 5).
        assert edge.proxy.limits.by_ip_user.banned_for(("127.0.0.1", "alice")) == 0
        for _ in range(3):
            await password_attempt(edge.port, "alice", "nope")
        assert edge.proxy.limits.by_ip_user.banned_for(("127.0.0.1", "alice")) > 0
