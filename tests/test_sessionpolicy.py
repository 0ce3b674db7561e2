"""The table of what a directory change does to open sessions and new connections (pure)."""

from __future__ import annotations

import pytest

from edge.directory.model import Host, Tenant
from edge.sessionpolicy import (
    DOWN_TEXT,
    KILLED_TEXT,
    MAINTENANCE_TEXT,
    MOVED_TEXT,
    SUSPENDED_TEXT,
    Action,
    Admission,
    Kind,
    admit,
    decide,
    host_state,
    kill,
)

NOW = 1_000_000.0


def host(state: str = "active", notice: str = "", name: str = "host-a") -> Host:
    return Host(name=name, address="10.0.0.1", state=state, notice=notice)  # type: ignore[arg-type]


def tenant(state: str = "active", on: str = "host-a", previous: str | None = None,
           drain_deadline: float | None = None) -> Tenant:
    return Tenant(name="t1", host=on, state=state, previous_host=previous,  # type: ignore[arg-type]
                  drain_deadline=drain_deadline)


@pytest.mark.parametrize(("tenant_now", "host_now", "expected"), [
    # nothing that matters changed
    (tenant(), host(), Action(Kind.KEEP)),
    # tenant moved, with a drain time: closed at the move's deadline
    (tenant(on="host-b", previous="host-a", drain_deadline=NOW + 60), host(),
     Action(Kind.DRAIN, MOVED_TEXT, NOW + 60, "drained")),
    # moved without a drain time (or from another host since): closed now, with the message
    (tenant(on="host-b"), host(), Action(Kind.DRAIN, MOVED_TEXT, NOW, "drained")),
    # suspended or deleted tenant: closed now, whatever the host
    (tenant(state="suspended"), host(), Action(Kind.CLOSE, SUSPENDED_TEXT, 0.0, "suspended")),
    (tenant(state="suspended", on="host-b"), host(),
     Action(Kind.CLOSE, SUSPENDED_TEXT, 0.0, "suspended")),
    (None, host(), Action(Kind.CLOSE, SUSPENDED_TEXT, 0.0, "suspended")),
    # host in maintenance: kept for the drain time, then closed with the host's notice
    (tenant(), host("maintenance", "back at 18:00"),
     Action(Kind.DRAIN, "back at 18:00", NOW + 300, "maintenance")),
    (tenant(), host("maintenance"), Action(Kind.DRAIN, MAINTENANCE_TEXT, NOW + 300, "maintenance")),
    # host down (or deleted): closed now; a notice left from a maintenance is not shown
    (tenant(), host("down", "back at 18:00"), Action(Kind.CLOSE, DOWN_TEXT, 0.0, "down")),
    (tenant(), None, Action(Kind.CLOSE, DOWN_TEXT, 0.0, "down")),
], ids=["unchanged", "moved-with-drain", "moved-now", "suspended", "suspended-and-moved",
        "deleted", "maintenance-notice", "maintenance-default", "down-old-notice", "host-deleted"])
def test_open_sessions(tenant_now: Tenant | None, host_now: Host | None, expected: Action) -> None:
    assert decide("host-a", tenant_now, host_now, now=NOW, maintenance_drain=300.0) == expected


@pytest.mark.parametrize(("tenant_now", "host_now", "expected"), [
    (tenant(), host(), Admission(True)),
    (tenant(state="suspended"), host(), Admission(False, "suspended", SUSPENDED_TEXT)),
    (tenant(), host("maintenance", "back at 18:00"),
     Admission(False, "maintenance", "back at 18:00")),
    (tenant(), host("maintenance"), Admission(False, "maintenance", MAINTENANCE_TEXT)),
    (tenant(), host("down", "back at 18:00"), Admission(False, "down", DOWN_TEXT)),
], ids=["active", "suspended", "maintenance-notice", "maintenance-default", "down-old-notice"])
def test_new_connections(tenant_now: Tenant, host_now: Host, expected: Admission) -> None:
    assert admit(tenant_now, host_now) == expected


def windowed(until: float, notice: str = "disks") -> Host:
    return Host(name="host-a", address="10.0.0.1", state="maintenance", notice=notice,
                maintenance_until=until)


def test_a_maintenance_window_ends_at_its_until_without_any_directory_change() -> None:
    window = windowed(NOW + 600)
    assert host_state(window, NOW) == "maintenance"
    assert admit(tenant(), window, NOW) == Admission(False, "maintenance", "disks")
    assert host_state(window, NOW + 600) == "active"
    assert admit(tenant(), window, NOW + 600) == Admission(True)
    # Sessions: drained with the notice only if the window outlasts the drain time ...
    assert decide("host-a", tenant(), window, now=NOW, maintenance_drain=300) == Action(
        Kind.DRAIN, "disks", NOW + 300, "maintenance")
    # ... kept when it ends first (closing them would be for nothing), and after it ended.
    assert decide("host-a", tenant(), window, now=NOW, maintenance_drain=900) == Action(Kind.KEEP)
    assert decide("host-a", tenant(), window, now=NOW + 601) == Action(Kind.KEEP)
    # A down host stays down whatever an old until says.
    down = Host(name="host-a", address="10.0.0.1", state="down", maintenance_until=NOW - 1)
    assert host_state(down, NOW) == "down"


def test_an_operator_kill_closes_now_with_the_message_or_a_default() -> None:
    assert kill("back at 06:00") == Action(Kind.CLOSE, "back at 06:00", reason="killed")
    assert kill("  ") == Action(Kind.CLOSE, KILLED_TEXT, reason="killed")
