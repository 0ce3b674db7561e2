"""FTP login failures as an attacker and as a user see them: failure timing that does not tell
accounts apart (pyftpdlib backends that refuse slowly or at once), bans per source instead of
locking the account, one log line and one count per failed PASS.

Clients are raw control connections (the timing starts when PASS is sent) through FtpProxy to
real pyftpdlib backends, as in test_ftp_proxy.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from prometheus_client import REGISTRY

from edge.config import LimitsConfig
from tests.support_timing import inseparable
from tests.test_ftp_proxy import (  # noqa: F401 - fixtures
    PASSWORD,
    USER,
    Backends,
    Edge,
    EdgeFactory,
    backends,
    edges,
    provision,
    raw,
    run,
    sqlite_store,
)

pytestmark = pytest.mark.timeout(180)

NO_LIMITS = LimitsConfig(max_failures_per_ip=100_000, max_failures_per_ip_user=100_000,
                         max_failures_per_user=100_000, max_unauthenticated_per_ip=1000,
                         max_connections_per_ip=1000)
UNKNOWN, WRONG = "unknown user", "wrong password"
INCORRECT = b"530 Login incorrect.\r\n"


def attempt(edge: Edge, user: str, password: str, source: str = "127.0.0.1") -> tuple[bytes, float]:
    """One login on a fresh control connection: (PASS reply, seconds from PASS to reply).
    After a 530 the session must go on like after any failure (a hang-up says "banned")."""
    with raw(edge.port, source) as c:
        c.reply()
        assert c.cmd(f"USER {user}").startswith(b"331")
        started = time.monotonic()
        reply = c.cmd(f"PASS {password}")
        elapsed = time.monotonic() - started
        if reply.startswith(b"530"):
            assert c.cmd("USER again").startswith(b"331"), "the session ended after a 530"
        return reply, elapsed


async def failure_times(edge: Edge, lanes: int = 6, rounds: int = 10) -> tuple[list[float], list[float]]:
    """30 unknown-user and 30 wrong-password failures, interleaved over concurrent clients."""
    samples: dict[str, list[float]] = {UNKNOWN: [], WRONG: []}

    def lane(index: int) -> None:
        for i in range(rounds):
            kind = (UNKNOWN, WRONG)[(index + i) % 2]
            reply, elapsed = attempt(edge, f"nobody{index}x{i}" if kind == UNKNOWN else USER, "nope")
            assert reply == INCORRECT
            samples[kind].append(elapsed)

    await asyncio.gather(*(asyncio.to_thread(lane, i) for i in range(lanes)))
    return samples[UNKNOWN], samples[WRONG]


@pytest.mark.slow
@pytest.mark.parametrize("refusal", [0.5, 0.0], ids=["slow", "fast"])
async def test_unknown_user_and_wrong_password_take_the_same_time(
        edges: EdgeFactory, backends: Backends, refusal: float) -> None:  # noqa: F811
    """pyftpdlib waits ``auth_failed_timeout`` (3 s by default) before its 530; the proxy
    answered unknown users after login_failure_delay (here 0.2 s) and wrong passwords after
    the backend's delay: a perfect user list."""
    backend = await backends.start(extra=("--auth-failed-delay", str(refusal)))
    await provision(edges.service, backend)
    edge = await edges.start(limits=NO_LIMITS)
    # A worker in service has seen its backends refuse; a fresh one answers its very first
    # failures at the floor (the cold start docs/reliability.md owns up to). Warm it the way
    # traffic would, so the samples compare the steady state.
    await asyncio.gather(*(asyncio.to_thread(attempt, edge, USER, "nope") for _ in range(6)))
    result, unknown, wrong = await inseparable(lambda: failure_times(edge))
    summary = (f"unknown user {sorted(unknown)[15]:.3f} s (median), wrong password "
               f"{sorted(wrong)[15]:.3f} s: KS {result}")
    assert result.pvalue > 0.05, summary
    assert min(unknown + wrong) >= edge.config.ftp.login_failure_delay, summary
    if refusal:
        # As long as the backend takes, except before the proxy had seen any refusal.
        assert len([t for t in unknown + wrong if t < refusal]) <= 3, summary


async def test_attacker_cannot_lock_a_user_out(edges: EdgeFactory, backends: Backends) -> None:  # noqa: F811
    """Failures for alice from 127.0.0.1 ban that source (her right password is refused there
    without reaching the backend, at a normal failure's time); from 127.0.0.3 she logs in."""
    backend = await backends.start(extra=("--auth-failed-delay", "0.5"))
    await provision(edges.service, backend)
    limits = LimitsConfig(max_failures_per_ip=3, max_failures_per_user=3, user_slowdown_max=1.0)
    edge = await edges.start(limits=limits)

    def scenario() -> None:
        failed = [attempt(edge, USER, "guess") for _ in range(3)]
        assert all(reply == INCORRECT for reply, _ in failed)
        # After 3 failures everyone typing alice's password waits 1 s first (the slowdown),
        # so a fourth real failure from elsewhere is the fair comparison for the banned one.
        normal = attempt(edge, USER, "guess", "127.0.0.4")
        banned = attempt(edge, USER, PASSWORD)
        assert normal[0] == banned[0] == INCORRECT
        assert abs(banned[1] - normal[1]) < 0.2, (banned, normal, failed)
        assert all(abs(banned[1] - 1.0 - t) < 0.2 for _, t in failed), (banned, failed)
        reply, elapsed = attempt(edge, USER, PASSWORD, "127.0.0.3")
        assert reply.startswith(b"230") and elapsed < 5.0, (reply, elapsed)

    await run(scenario)
    refused = edge.log.find("ftp: login refused by failed-login limits", user=USER)
    assert [r.client for r in refused] == ["127.0.0.1"]  # type: ignore[attr-defined]


async def test_each_failed_pass_is_logged_and_counted_once(
        edges: EdgeFactory, backends: Backends) -> None:  # noqa: F811
    backend = await backends.start()
    await provision(edges.service, backend)
    edge = await edges.start()
    delay = edge.config.ftp.login_failure_delay

    def failed() -> float:
        return REGISTRY.get_sample_value("edge_ftp_logins_total", {"result": "failed"}) or 0.0

    def scenario() -> list[tuple[bytes, float]]:
        answers = []
        with raw(edge.port) as c:
            c.reply()
            for user in (USER, "nobody"):
                c.cmd(f"USER {user}")
                started = time.monotonic()
                answers.append((c.cmd("PASS wrong-pw"), time.monotonic() - started))
        return answers

    before = failed()
    answers = await run(scenario)
    assert [reply for reply, _ in answers] == [INCORRECT, INCORRECT]
    assert all(elapsed >= delay for _, elapsed in answers), answers
    assert failed() - before == 2
    lines = edge.log.find("ftp login failed")
    assert [(r.user, r.client) for r in lines] == [(USER, "127.0.0.1"), ("nobody", "127.0.0.1")]  # type: ignore[attr-defined]
    assert all("wrong-pw" not in str(r.__dict__) for r in edge.log.records)
    assert edge.proxy.limits.by_ip.banned_for("127.0.0.1") == 0
