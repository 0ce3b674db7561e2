"""Rate limits, brute-force bans and connection caps, driven by a fake clock."""

from __future__ import annotations

import random

import pytest

from edge.limits import (
    ConnectionCap,
    ConnectionCapExceeded,
    DelayMimic,
    FailureBan,
    FailurePacer,
    LoginLimits,
    LoginLimitSettings,
    RateLimiter,
)
from tests.support_clock import FakeClock

# -- RateLimiter ------------------------------------------------------------------------------


def test_burst_then_refill_at_rate() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rate_per_second=2, burst=5, clock=clock)
    assert [limiter.allow("1.2.3.4") for _ in range(6)] == [True] * 5 + [False]
    clock.advance(0.49)  # 0.98 tokens: not yet
    assert not limiter.allow("1.2.3.4")
    clock.advance(0.01)
    assert limiter.allow("1.2.3.4")
    assert not limiter.allow("1.2.3.4")
    clock.advance(100)  # refills only up to the burst
    assert sum(limiter.allow("1.2.3.4") for _ in range(10)) == 5


def test_keys_are_independent() -> None:
    clock = FakeClock()
    limiter = RateLimiter(1, 1, clock=clock)
    assert limiter.allow("a")
    assert not limiter.allow("a")
    assert limiter.allow("b")


def test_retry_after_says_when_the_next_request_passes() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rate_per_second=0.5, burst=2, clock=clock)
    assert limiter.retry_after("k") == 0.0
    assert limiter.allow("k") and limiter.allow("k")
    assert limiter.retry_after("k") == pytest.approx(2.0)
    clock.advance(1.5)
    assert limiter.retry_after("k") == pytest.approx(0.5)
    assert not limiter.allow("k")  # a refused request does not push the time back
    assert limiter.retry_after("k") == pytest.approx(0.5)
    clock.advance(0.5)
    assert limiter.retry_after("k") == 0.0
    assert limiter.allow("k")


def test_clock_stepping_back_does_not_drain_or_crash() -> None:
    clock = FakeClock()
    limiter = RateLimiter(1, 2, clock=clock)
    assert limiter.allow("k")
    clock.advance(-50)
    assert limiter.allow("k")
    assert not limiter.allow("k")


def test_rate_limiter_memory_is_bounded_under_a_scan() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rate_per_second=1, burst=3, max_keys=1000, clock=clock)
    for i in range(100_000):
        assert limiter.allow(f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}")
        assert len(limiter) <= 1000
    # idle keys whose bucket is full again are dropped on their own
    clock.advance(10)
    limiter.allow("one more")
    assert len(limiter) == 1


def test_rate_limiter_rejects_nonsense_settings() -> None:
    with pytest.raises(ValueError, match="rate_per_second"):
        RateLimiter(0, 1)
    with pytest.raises(ValueError, match="burst"):
        RateLimiter(1, 0.5)


# -- FailureBan -------------------------------------------------------------------------------


def test_ban_after_max_failures_within_the_window() -> None:
    clock = FakeClock()
    ban = FailureBan(max_failures=3, window_seconds=60, ban_seconds=600, clock=clock)
    assert ban.record_failure("1.2.3.4") == 0.0
    clock.advance(10)
    assert ban.record_failure("1.2.3.4") == 0.0
    assert ban.banned_for("1.2.3.4") == 0.0
    clock.advance(10)
    assert ban.record_failure("1.2.3.4") == 600.0
    assert ban.banned_for("1.2.3.4") == 600.0
    assert ban.banned_for("5.6.7.8") == 0.0
    clock.advance(599)
    assert ban.banned_for("1.2.3.4") == pytest.approx(1.0)
    clock.advance(1)
    assert ban.banned_for("1.2.3.4") == 0.0
    # after the ban the count starts from zero
    assert ban.record_failure("1.2.3.4") == 0.0


def test_failures_outside_the_window_do_not_count() -> None:
    clock = FakeClock()
    ban = FailureBan(max_failures=3, window_seconds=60, ban_seconds=600, clock=clock)
    for _ in range(10):  # one failure every 31 s: never three within 60 s
        assert ban.record_failure("k") == 0.0
        clock.advance(31)
    assert ban.banned_for("k") == 0.0


def test_success_resets_failures_but_not_a_ban() -> None:
    clock = FakeClock()
    ban = FailureBan(max_failures=3, window_seconds=60, ban_seconds=600, clock=clock)
    ban.record_failure("k")
    ban.record_failure("k")
    ban.record_success("k")
    assert ban.record_failure("k") == 0.0
    ban.record_failure("k")
    assert ban.record_failure("k") > 0
    ban.record_success("k")  # a banned client must not learn that a guess was right
    assert ban.banned_for("k") == 600.0


def test_failures_while_banned_do_not_extend_the_ban() -> None:
    clock = FakeClock()
    ban = FailureBan(max_failures=1, window_seconds=60, ban_seconds=100, clock=clock)
    ban.record_failure("k")
    clock.advance(40)
    assert ban.record_failure("k") == pytest.approx(60.0)
    assert ban.banned_for("k") == pytest.approx(60.0)


def test_failure_ban_memory_is_bounded_and_keeps_bans() -> None:
    clock = FakeClock()
    ban = FailureBan(max_failures=2, window_seconds=60, ban_seconds=600, max_keys=1000, clock=clock)
    ban.record_failure("attacker")
    ban.record_failure("attacker")
    for i in range(100_000):  # one failure each from a scan of many addresses
        ban.record_failure(i)
        assert len(ban) <= 2001
    assert ban.banned_for("attacker") == 600.0  # the flood did not evict the ban
    clock.advance(61)  # windows expire: half-counted keys are dropped
    assert ban.banned_for("attacker") > 0
    assert len(ban) == 1
    clock.advance(600)
    assert ban.banned_for("attacker") == 0.0
    assert len(ban) == 0


# -- ConnectionCap ----------------------------------------------------------------------------


def test_connection_cap() -> None:
    cap = ConnectionCap(max_per_key=2)
    assert cap.try_acquire("ip")
    assert cap.try_acquire("ip")
    assert not cap.try_acquire("ip")
    assert cap.try_acquire("other")
    assert cap.count("ip") == 2
    cap.release("ip")
    assert cap.try_acquire("ip")
    for _ in range(5):  # over-releasing never goes negative nor leaves keys behind
        cap.release("ip")
    cap.release("never-seen")
    assert cap.count("ip") == 0
    assert len(cap) == 1  # only "other" still holds a slot
    assert cap.try_acquire("ip") and cap.try_acquire("ip") and not cap.try_acquire("ip")


def test_connection_cap_context_manager() -> None:
    cap = ConnectionCap(max_per_key=1)
    with cap.hold("ip"):
        assert cap.count("ip") == 1
        with (
            pytest.raises(ConnectionCapExceeded, match="too many connections from ip"),
            cap.hold("ip"),
        ):
            pass  # pragma: no cover
        assert cap.count("ip") == 1  # the refused attempt did not release ours
    assert cap.count("ip") == 0 and len(cap) == 0
    with pytest.raises(RuntimeError), cap.hold("ip"):
        raise RuntimeError("session crashed")
    assert cap.count("ip") == 0


# -- LoginLimits ------------------------------------------------------------------------------


def test_login_limits_defaults_are_safe() -> None:
    s = LoginLimitSettings()
    assert (s.max_failures_per_ip, s.max_failures_per_user, s.max_failures_per_ip_user) == (10, 5, 5)
    assert (s.user_slowdown_max, s.failure_delay_max) == (8.0, 10.0)
    assert (s.failure_window, s.ban_seconds) == (300.0, 600.0)
    assert s.max_unauthenticated_per_ip == 20
    assert LoginLimits().unauthenticated.max_per_key == 20


def test_many_addresses_guessing_one_user_slow_it_down_but_never_lock_it_out() -> None:
    """Anyone could lock alice out by failing five times; now failures from many addresses
    only slow her password logins (1, 2, 4 ... s, capped), and nobody is banned for them."""
    clock = FakeClock()
    limits = LoginLimits(LoginLimitSettings(user_slowdown_max=8.0), clock=clock)
    delays = []
    for i in range(12):
        delays.append(limits.user_delay("alice"))
        limits.login_failed(f"198.51.100.{i}", "alice")
    assert delays == [0, 0, 0, 0, 0, 1, 2, 4, 8, 8, 8, 8]
    for ip in ("203.0.113.7", "198.51.100.0"):
        assert limits.check_login(ip, "alice").allowed  # slowed, not locked out
    assert limits.user_delay("bob") == 0.0  # other users unaffected
    limits.login_succeeded("203.0.113.7", "alice")
    assert limits.user_delay("alice") == 8.0  # alice's success does not lift an attack's slowdown
    clock.advance(301)
    assert limits.user_delay("alice") == 0.0  # it fades with the window


def test_one_address_guessing_one_user_bans_that_pair_only() -> None:
    clock = FakeClock()
    limits = LoginLimits(LoginLimitSettings(max_failures_per_ip_user=3), clock=clock)
    verdicts = [limits.login_failed("192.0.2.9", "alice") for _ in range(3)]
    assert [v.allowed for v in verdicts] == [True, True, False]
    verdict = limits.check_login("192.0.2.9", "alice")
    assert not verdict.allowed and "alice" in verdict.reason and "192.0.2.9" in verdict.reason
    assert verdict.retry_after == 600.0
    assert limits.check_login("192.0.2.9", "bob").allowed  # same address, another user
    assert limits.check_login("192.0.2.10", "alice").allowed  # alice from elsewhere


def test_per_ip_ban_stops_one_address_guessing_many_users() -> None:
    clock = FakeClock()
    limits = LoginLimits(clock=clock)
    verdicts = [limits.login_failed("192.0.2.66", f"user{i}") for i in range(10)]
    assert all(v.allowed for v in verdicts[:-1])
    assert not verdicts[-1].allowed  # the 10th failure bans at once
    verdict = limits.check_login("192.0.2.66", "somebody")
    assert not verdict.allowed and "192.0.2.66" in verdict.reason
    assert limits.check_login("192.0.2.66").retry_after == 600.0  # username not known yet
    clock.advance(600)
    assert limits.check_login("192.0.2.66", "somebody").allowed


def test_success_clears_counts_and_window_expires() -> None:
    clock = FakeClock()
    limits = LoginLimits(LoginLimitSettings(max_failures_per_ip_user=3), clock=clock)
    limits.login_failed("192.0.2.1", "carol")
    limits.login_failed("192.0.2.1", "carol")
    limits.login_succeeded("192.0.2.1", "carol")
    limits.login_failed("192.0.2.1", "carol")
    limits.login_failed("192.0.2.1", "carol")
    assert limits.check_login("192.0.2.1", "carol").allowed
    clock.advance(301)  # outside the 300 s window: the two failures no longer count
    limits.login_failed("192.0.2.1", "carol")
    assert limits.check_login("192.0.2.1", "carol").allowed


def test_settings_from_config_section() -> None:
    class Section:  # the shape of edge.config.LimitsConfig
        max_failures_per_ip = 3
        max_failures_per_user = 2
        failure_window = 60.0
        ban_seconds = 30.0
        max_unauthenticated_per_ip = 4
        max_connections_per_ip = 200
        login_grace_time = 30.0
        max_failures_per_ip_user = 2
        user_slowdown_max = 4.0
        failure_delay_max = 5.0

    settings = LoginLimitSettings.from_config(Section())
    assert settings == LoginLimitSettings(3, 2, 60.0, 30.0, 4, 2, 4.0, 5.0)


# -- FailurePacer ----------------------------------------------------------------------------


def test_failure_deadline_covers_the_slowest_recent_refusal_within_floor_and_cap() -> None:
    clock = FakeClock()
    pace = FailurePacer(floor=1.0, cap=5.0, samples=3, window_seconds=300.0,
                        rng=random.Random(7), clock=clock)
    assert pace.deadline() == 1.0  # nothing seen yet: the configured delay
    pace.record_refusal(0.2)
    assert pace.deadline() == 1.0  # fast backends: the floor
    pace.record_refusal(2.7)  # sshd with PAM
    assert pace.deadline() == 2.7
    pace.record_refusal(60.0)
    assert pace.deadline() == 5.0  # a backend hanging for a minute does not set the pace
    for _ in range(10):
        pace.record_refusal(0.1)
    # Quick failures (an attacker's own account) do not flush the slow ones within the window.
    assert pace.deadline() == 5.0
    clock.advance(301)
    assert pace.deadline() == 1.0  # older than the window and not among the last 3: gone
    pace.record_refusal(2.7)
    clock.advance(3600)
    assert pace.deadline() == 2.7  # a quiet spell forgets nothing: the last 3 always count
    for _ in range(3):
        pace.record_refusal(0.1)
    assert pace.deadline() == 1.0
    answers = [pace.answer_after() for _ in range(200)]
    assert 1.0 <= min(answers) < 1.02 and 1.08 < max(answers) <= 1.1  # 0-10% jitter
    assert 3.0 <= pace.answer_after(3.0) <= 3.3  # a refusal past the deadline: when it came


def test_failure_pacer_memory_is_bounded_and_keeps_the_slowest() -> None:
    clock = FakeClock()
    pace = FailurePacer(floor=0.1, cap=10.0, clock=clock)
    pace.record_refusal(4.0)
    for _ in range(2 * FailurePacer.MAX_KEPT):
        pace.record_refusal(0.2)
    assert len(pace._recent) <= FailurePacer.MAX_KEPT
    assert pace.deadline() == 4.0


def test_delay_mimic_draws_only_what_it_saw_lately() -> None:
    mimic = DelayMimic(samples=3, rng=random.Random(3))
    assert mimic.draw() == 0.0  # nothing seen: no delay rather than a guess
    for seconds in (5.0, 0.2, 0.3, 0.4):
        mimic.record(seconds)
    draws = {mimic.draw() for _ in range(100)}
    assert draws == {0.2, 0.3, 0.4}  # the oldest aged out
