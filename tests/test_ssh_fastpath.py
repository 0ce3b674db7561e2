"""The channel-data short path between the bridge's legs (sshproxy/fastpath.py).

Same harness as tests/test_ssh_bridge.py: a minimal asyncssh front bridging to a real sshd,
stock OpenSSH and asyncssh clients. What a user would notice if the short path were wrong:
bytes lost, reordered or corrupted (checksums both ways, also while every leg rekeys), flow
control gone (a pausing reader must still hold at most one window), or asyncssh's own path
never being left (then nothing got faster: counted here).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import tomllib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncssh
import pytest
from asyncssh.channel import SSHChannel
from prometheus_client import REGISTRY

from sshproxy import fastpath, patches, tuning
from sshproxy.bridge import BridgeSettings
from tests.test_ssh_bridge import (
    TIMEOUT,
    Front,
    Sshd,
    _StopAndGoSession,
    both_ways_with_checksums,
    front,
    peak_bytes_held_by_a_pausing_reader,
    run,
    running_front,
    ssh_args,
    sshd,
)

__all__ = ["front", "sshd"]  # fixtures shared with tests/test_ssh_bridge.py

MIB = 1024 * 1024


# No skip for an asyncssh the short path does not cover: that install would lose about half the
# relay throughput, so the suite fails instead (and pyproject.toml pins the checked version).


def _pinned_asyncssh() -> str:
    """The asyncssh requirement in pyproject.toml's dependencies."""
    pyproject = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())
    return next(dep for dep in pyproject["project"]["dependencies"] if dep.startswith("asyncssh"))


def test_installed_asyncssh_is_covered_by_every_patch() -> None:
    assert asyncssh.__version__ in patches.CHECKED_ASYNCSSH, (
        f"asyncssh {asyncssh.__version__} is installed; sshproxy/fastpath.py and tuning.py were "
        f"checked against {patches.CHECKED_ASYNCSSH}: re-check them and add the version")
    off = [name for name, active in patches.patch_status().items() if not active]
    assert off == [], f"fixes to asyncssh internals that do not apply to this install: {off}"
    assert _pinned_asyncssh() == f"asyncssh=={patches.CHECKED_ASYNCSSH[-1]}"


def test_a_patch_that_is_off_is_logged_and_exported(monkeypatch: pytest.MonkeyPatch,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("test.ssh.patches")
    assert patches.report_patches(log) == dict.fromkeys(patches.patch_status(), True)
    assert _gauge("fastpath") == 1 and _gauge("aes_gcm") == 1
    assert not [r for r in caplog.records if r.name == log.name]
    # What an asyncssh whose code differs from the checked one does to the flags.
    monkeypatch.setattr(fastpath, "FASTPATH_SUPPORTED", False)
    monkeypatch.setattr(tuning, "GCM_FIX_NEEDED", False)
    with caplog.at_level(logging.WARNING, logger=log.name):
        patches.report_patches(log)
    assert _gauge("fastpath") == 0 and _gauge("aes_gcm") == 0 and _gauge("receive_slices") == 1
    warned = [r.getMessage() for r in caplog.records if r.name == log.name]
    assert len(warned) == 2 and all("is OFF for asyncssh" in line for line in warned)
    assert "'fastpath'" in warned[1] and "'aes_gcm'" in warned[0]


def _gauge(patch: str) -> float | None:
    return REGISTRY.get_sample_value("edge_ssh_patch_active", {"patch": patch})


@pytest.fixture
def accepted() -> Iterator[list[int]]:
    """Counts calls of asyncssh's ``SSHChannel._accept_data``: every data packet asyncssh itself
    dispatches to a channel goes through it, the short path's never do."""
    calls = [0]
    original = SSHChannel._accept_data

    def counting(self: Any, data: bytes, datatype: Any = None) -> None:
        calls[0] += 1
        original(self, data, datatype)

    SSHChannel._accept_data = counting  # type: ignore[method-assign]
    try:
        yield calls
    finally:
        SSHChannel._accept_data = original  # type: ignore[method-assign]


async def test_bulk_both_ways_intact_and_off_asyncssh_path(front: Front, accepted: list[int]) -> None:
    """16 MiB up and down through stock ssh: checksums match, and (almost) no data packet took
    asyncssh's dispatch (the 512 packets each way would otherwise all count)."""
    data = os.urandom(16 * MIB)
    up = await run(ssh_args(front, "sha256sum"), stdin=data)
    assert up.returncode == 0, up.stderr
    assert up.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()
    down = await run(ssh_args(front, 'f=$(mktemp) && head -c 16777216 /dev/urandom > "$f" && '
                                     'sha256sum < "$f" >&2 && cat "$f"; rm -f "$f"'))
    assert down.returncode == 0 and len(down.stdout) == 16 * MIB
    assert hashlib.sha256(down.stdout).hexdigest() == down.stderr.split()[0].decode()
    # Four legs x 512 packets of 32 KiB went by; a few small ones (e.g. before the upstream
    # channel existed) may still take asyncssh's path.
    assert accepted[0] < 100, f"{accepted[0]} data packets went through asyncssh's dispatch"
    assert front.links[0].stats.bytes_up == 16 * MIB and front.links[1].stats.bytes_down > 16 * MIB  # counted


async def test_switched_off_everything_takes_asyncssh_path(front: Front, accepted: list[int],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The counter above does see asyncssh's path (so the previous test means something)."""
    monkeypatch.setattr(fastpath, "ENABLED", False)
    data = os.urandom(4 * MIB)
    result = await run(ssh_args(front, "sha256sum"), stdin=data)
    assert result.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()
    assert accepted[0] >= 128


async def test_stdout_stderr_order_and_exit_status(front: Front) -> None:
    """Extended data (stderr) takes asyncssh's path and data the short one: each stream keeps its
    order, EOF and the exit status still come last."""
    script = "for i in $(seq 1 200); do echo out$i; echo err$i >&2; done; head -c 3000000 /dev/zero; exit 3"
    result = await run(ssh_args(front, script))
    assert result.returncode == 3
    lines = result.stdout[:-3000000].decode().split()
    assert lines == [f"out{i}" for i in range(1, 201)]
    assert result.stdout[-3000000:] == b"\0" * 3000000
    assert result.stderr.decode().split() == [f"err{i}" for i in range(1, 201)]


@pytest.fixture
async def rekeying_front(sshd: Sshd, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Front]:
    monkeypatch.setitem(tuning.CLIENT_OPTIONS, "rekey_bytes", 512 * 1024)  # the upstream leg
    # ... and the client-facing leg.
    async with running_front(sshd, tmp_path, BridgeSettings(), rekey_bytes=512 * 1024) as front:
        yield front


async def test_proxy_legs_rekey_during_bulk_data(rekeying_front: Front) -> None:
    """The short path sends nothing once a key exchange is due, so asyncssh starts it and holds
    the data until it is done: 8 MiB each way with both proxy legs rekeying every 512 KiB."""
    data = os.urandom(8 * MIB)
    async with asyncssh.connect(
            "127.0.0.1", rekeying_front.port, username="root", known_hosts=None, config=None,
            client_keys=[str(rekeying_front.client_key)], agent_path=None, **tuning.CLIENT_OPTIONS) as conn:
        await asyncio.wait_for(conn.run("true"), TIMEOUT)
        link = rekeying_front.links[0]
        legs = [link.upstream, link.downstream]
        first_keys = [leg._send_encryption for leg in legs]  # type: ignore[union-attr]
        await both_ways_with_checksums(conn, data)
        for leg, keys in zip(legs, first_keys, strict=True):
            assert leg._send_encryption is not keys, "no rekey happened"  # type: ignore[union-attr]
            # Each rekey started as soon as it was due, not a window of short-path packets later.
            assert leg._rekey_bytes_sent <= 512 * 1024 + 64 * 1024  # type: ignore[union-attr]


class _StopAndGo(_StopAndGoSession):
    """The bridge tests' stop-and-go reader (window bound on) with the short path on its channel."""

    def __init__(self) -> None:
        super().__init__(fixed=True)

    def connection_made(self, chan: asyncssh.SSHServerChannel[bytes]) -> None:
        super().connection_made(chan)
        assert fastpath.enable_channel(chan)
        assert not fastpath.enable_channel(chan)  # a second call changes nothing


async def test_a_pausing_short_path_reader_holds_at_most_one_window() -> None:
    """Data that arrives for a paused channel is queued by the short path as asyncssh would, and
    window is granted back only as it is taken: never more than one window held."""

    def tune(conn: asyncssh.SSHClientConnection, chan: asyncssh.SSHClientChannel[bytes]) -> None:
        tuning.tune_connection(conn)
        assert fastpath.enable_channel(chan)

    peak, sessions = await peak_bytes_held_by_a_pausing_reader(True, 24 * MIB, session=_StopAndGo,
                                                               tune=tune)
    server_chan = sessions[0]._chan
    assert server_chan is not None and server_chan.__dict__.get("_edge_fast")
    assert peak <= tuning.WINDOW, f"{peak / MIB:.1f} MiB held behind a {tuning.WINDOW // MIB} MiB window"


def test_other_asyncssh_versions_get_no_short_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The replicated code is only trusted for the versions it was checked against."""
    assert fastpath._replicates_installed_asyncssh()
    monkeypatch.setattr(asyncssh, "__version__", "2.99.0")
    assert not fastpath._replicates_installed_asyncssh()


async def test_both_ways_at_once_stays_on_the_in_place_parser(front: Front) -> None:
    """Data and window adjusts interleave on every leg when a command echoes its input: each
    window adjust hands the rest of a read to asyncssh's parser, which then usually stops inside
    a packet. The next read must come back to the in-place parser (not stay on asyncssh's), and
    every byte must come back intact."""
    data = os.urandom(8 * MIB)
    async with asyncssh.connect(
            "127.0.0.1", front.port, username="root", known_hosts=None, config=None,
            client_keys=[str(front.client_key)], agent_path=None, **tuning.CLIENT_OPTIONS) as conn:
        await asyncio.wait_for(conn.run("true"), TIMEOUT)
        link = front.links[0]
        parsed_by_asyncssh = [0]
        for leg in (link.upstream, link.downstream):
            assert leg is not None
            inner = leg._recv_packet  # type: ignore[attr-defined]

            def counted(inner: Any = inner) -> bool:
                parsed_by_asyncssh[0] += 1
                return bool(inner())

            leg._recv_packet = counted  # type: ignore[attr-defined]
        result = await asyncio.wait_for(conn.run("cat", input=data, encoding=None), TIMEOUT)
        assert result.stdout == data
    packets = 4 * len(data) // (32 * 1024)  # two directions, two legs each
    assert link.upstream.get_extra_info("recv_cipher") == "aes128-gcm@openssh.com"
    assert parsed_by_asyncssh[0] < packets // 3, f"{parsed_by_asyncssh[0]} of ~{packets} packets"
