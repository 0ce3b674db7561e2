"""Tenant isolation, SSH: user names that try to name another host or tenant, and every
channel type that could reach a host other than the tenant's own shell (stdio forwarding
``ssh -W``, ``-L`` direct-tcpip, ``-R``, agent forwarding), with the stock OpenSSH client (and
asyncssh for names the stock client cannot send). Tenant acme (alice) lives on an asyncssh
backend; tenant t2's host and a third address are trap listeners recording any connection."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncssh
import pytest

from edge.config import LimitsConfig
from tests.test_isolation_ftp import Trap
from tests.test_ssh_proxy import (  # noqa: F401 - the module-scoped keys fixture
    AsyncsshBackend,
    Edge,
    keys,
    make_edge,
    provision,
    upstream_key,
)

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
async def edge(tmp_path: Path, keys: Path) -> AsyncIterator[Edge]:  # noqa: F811
    # Failures must not end in a ban here: each name has to be routed (or not) on its own.
    limits = LimitsConfig(max_failures_per_ip=1000, max_failures_per_user=1000)
    async for value in make_edge(tmp_path, keys, limits=limits):
        yield value


@pytest.fixture
async def backend(keys: Path) -> AsyncIterator[AsyncsshBackend]:  # noqa: F811
    server = AsyncsshBackend("backend-a", upstream_key(keys))
    await server.start()
    yield server
    await server.stop()


@contextlib.contextmanager
def traps() -> Iterator[tuple[Trap, Trap]]:
    """Tenant t2's SSH host (on loopback, in the directory) and a third address (127.0.0.2)."""
    host_b, third = Trap("127.0.0.1"), Trap("127.0.0.2")
    try:
        yield host_b, third
    finally:
        host_b.close()
        third.close()


async def two_tenants(edge: Edge, backend: AsyncsshBackend, host_b: Trap) -> None:
    await provision(edge, backend)
    await edge.service.add_host("host-b", "127.0.0.1", ssh_port=host_b.port)
    await edge.service.add_tenant("t2", "host-b")
    await edge.service.add_account("bob", "t2", protocols=["ssh"],
                                   authorized_keys=edge.user_key.with_suffix(".pub").read_text())


STOCK_TRICKS = ["alice@host-b", "alice%host-b", "alice+host-b", "host-b:alice", "alice/bob",
                "ALICE", "alice.", "alice@127.0.0.2"]
# (asyncssh's client refuses control characters such as NUL in a user name itself: SASLprep)
# ("-oProxyCommand=..." as the positional user@host would be read by the stock client itself as
# an option, a client-side hazard, and it refuses shell metacharacters itself: those names are
# sent to the proxy from asyncssh instead.)
RAW_TRICKS = ["-oProxyCommand=nc 127.0.0.2 22", "alice;bob", "alice bob", " alice", "alice ", "alice\u00a0"]


async def test_user_names_never_reach_another_host(edge: Edge, backend: AsyncsshBackend) -> None:
    with traps() as (host_b, third):
        await two_tenants(edge, backend, host_b)
        for user in STOCK_TRICKS:
            rc, _, err = await edge.ssh(user, "whoami")
            assert rc == 255 and "Permission denied" in err, (user, err)
        for user in RAW_TRICKS:
            with pytest.raises((asyncssh.PermissionDenied, asyncssh.ProtocolError,
                                asyncssh.DisconnectError)):
                async with asyncssh.connect(
                        "127.0.0.1", edge.port, username=user, known_hosts=None, config=None,
                        client_keys=[str(edge.user_key)], agent_path=None, password="x"):
                    pass
        await asyncio.sleep(0.5)
        assert host_b.seen == [] and third.seen == []
        assert backend.seen == [] and backend.password_attempts == []


async def test_channels_to_other_hosts_are_refused(edge: Edge, backend: AsyncsshBackend) -> None:
    """alice is logged in (her own backend works) and asks for every kind of channel to t2's
    host and to a third address: each refused (forwarding is off by default), nothing
    connects to either, and her session is unharmed."""
    with traps() as (host_b, third):
        await two_tenants(edge, backend, host_b)
        targets = [("127.0.0.1", host_b.port), ("127.0.0.2", third.port),
                   ("localhost", host_b.port)]
        # stock ssh: -W (stdio forwarding = direct-tcpip) to each target
        for address, port in targets:
            args = [*edge.ssh_args("alice", key=edge.user_key), "-W", f"{address}:{port}"]
            done = await asyncio.to_thread(subprocess.run, args, capture_output=True,
                                           stdin=subprocess.DEVNULL, timeout=60)
            assert done.returncode != 0 and done.stdout == b"", done.stderr
        # asyncssh: direct-tcpip, remote listen, and an agent request, on one connection
        async with asyncssh.connect("127.0.0.1", edge.port, username="alice", known_hosts=None,
                                    config=None, client_keys=[str(edge.user_key)],
                                    agent_path=None) as conn:
            for address, port in targets:
                with pytest.raises(asyncssh.ChannelOpenError):
                    await conn.open_connection(address, port)
            with pytest.raises(asyncssh.ChannelListenError):
                await conn.forward_remote_port("127.0.0.2", 0, "127.0.0.2", third.port)
            result = await conn.run("whoami", check=False)
            assert result.exit_status == 0 and result.stdout == "backend-a alice\n"
        rc, out, err = await edge.ssh("alice", "whoami")
        assert (rc, out) == (0, "backend-a alice\n"), err
        await asyncio.sleep(0.5)
        assert host_b.seen == [] and third.seen == []
