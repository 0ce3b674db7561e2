"""Hardening of the HTTPS listener. Key exchange: only X25519, P-256 and P-384 (plus
X25519MLKEM768 where OpenSSL has it); a client offering only an expensive group (ffdhe8192:
~145 ms of worker CPU per handshake) or one outside Mozilla's intermediate profile fails the
handshake (the real ``openssl s_client`` against the running listener). Session resumption
without tickets. The per-address cap on connections still in the handshake."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl

import pytest

from edge.config import EdgeConfig, HttpConfig, HttpsConfig
from edge.directory.directory import Directory
from edge.directory.feed import ChangeFeed
from edge.directory.secrets import KeyBox
from edge.directory.service import DirectoryService
from edge.directory.store import SQLStore
from edge.registry import ProxyContext
from httpproxy.contexts import ContextFactory
from httpproxy.tls_openssl import OpenSslSettingError, session_cache_size, set_groups
from httpproxy.tls_server import HttpsProxy
from tests import test_http_tls
from tests.support_directory import feed_at_head, make_certificate
from tests.test_http_tls import TIMEOUT, EdgeFactory, SniEchoEngine, client_context

# The HTTPS listener fixture and uvloop (as in production) of the TLS-layer tests.
make_edge = test_http_tls.make_edge
event_loop_policy = test_http_tls.event_loop_policy

pytestmark = pytest.mark.filterwarnings("ignore:Overriding the \"event_loop_policy\" fixture")


async def s_client(port: int, *args: str) -> tuple[int, str]:
    """``openssl s_client`` to the listener (SNI www.a.test): exit code and its output."""
    proc = await asyncio.create_subprocess_exec(
        "openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "www.a.test",
        *args, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), TIMEOUT)
    return proc.returncode or 0, out.decode(errors="replace")


def _temp_key(output: str) -> str:
    for line in output.splitlines():
        if line.startswith(("Server Temp Key:", "Peer Temp Key:")):
            return line.split(":", 1)[1].strip()
    return ""


async def test_only_cheap_mozilla_groups_complete_a_handshake(make_edge: EdgeFactory) -> None:
    edge = await make_edge()
    cert = await edge.add_cert("a", ["www.a.test"])
    await edge.service.add_site("www.a.test", "acme", certificate_id=cert)
    for group, shown in (("X25519", "X25519"), ("P-256", "ECDH, prime256v1"),
                         ("P-384", "ECDH, secp384r1")):
        code, out = await s_client(edge.port, "-tls1_3", "-groups", group)
        assert code == 0, out
        assert _temp_key(out).startswith(shown), (group, out)
    for group in ("ffdhe8192", "ffdhe2048", "X448", "P-521"):
        code, out = await s_client(edge.port, "-tls1_3", "-groups", group)
        assert code != 0 and "Cipher is (NONE)" in out, (group, out)
    # TLS 1.2: the test certificate is ECDSA P-256, which a 1.2 client must list as a group.
    # (1.2 FFDHE would need DHE suites, which the cipher list does not offer.)
    for groups, shown in (("X25519:P-256", "X25519"), ("P-256", "ECDH, prime256v1"),
                          ("X448:P-521:P-256", "ECDH, prime256v1")):
        code, out = await s_client(edge.port, "-tls1_2", "-groups", groups)
        assert code == 0 and _temp_key(out).startswith(shown), (groups, out)
    # A client offering everything gets the server's first choice it supports.
    code, out = await s_client(edge.port, "-tls1_3", "-groups", "ffdhe8192:X448:P-256:X25519")
    assert code == 0 and _temp_key(out).startswith("X25519"), out


async def test_tls12_sessions_resume_without_tickets(make_edge: EdgeFactory) -> None:
    edge = await make_edge()
    cert = await edge.add_cert("a", ["www.a.test"])
    await edge.service.add_site("www.a.test", "acme", certificate_id=cert)
    code, out = await s_client(edge.port, "-tls1_2", "-groups", "X25519:P-256", "-reconnect")
    assert code == 0, out
    assert "TLS session ticket lifetime hint" not in out  # no ticket issued
    assert out.count("Reused, TLSv1.2") >= 4, out  # -reconnect: 5 more connections, same session


def test_unknown_group_and_unusable_context_fail_loudly() -> None:
    with pytest.raises(OpenSslSettingError, match="does not know the group 'ffdhe9999'"):
        ContextFactory(HttpsConfig(groups=("X25519", "ffdhe9999")))
    factory = ContextFactory(HttpsConfig())
    assert "X25519" in factory.groups and "ffdhe8192" not in factory.groups

    class NotAContext:
        options = 0
    with pytest.raises(OpenSslSettingError):
        set_groups(NotAContext(), ("X25519",))  # type: ignore[arg-type]
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    set_groups(ctx, ("P-384",))  # a context of the real ssl module is accepted
    assert session_cache_size(ctx) == 20 * 1024  # OpenSSL's default ...
    assert session_cache_size(factory.new_context()) == 256  # ... bounded on ours


async def test_per_address_cap_on_connections_in_the_handshake(
        store: SQLStore, service: DirectoryService, keybox: KeyBox) -> None:
    await service.add_host("web-a", "127.0.0.1", http_port=8081, https_port=8443)
    await service.add_tenant("acme", "web-a")
    chain, key = make_certificate(["www.a.test"], common_name="a")
    await service.add_site("www.a.test", "acme",
                           certificate_id=await service.import_certificate(chain, key))
    config = EdgeConfig(http=HttpConfig(max_connections_per_ip=2),
                        https=HttpsConfig(defer_accept=False, handshake_timeout=30.0))
    directory = Directory(store, config.cache, keybox=keybox)
    feed = await feed_at_head(ChangeFeed(directory))
    context = ProxyContext(config=config, directory=directory, feed=feed, keybox=keybox,
                           worker_id=0, logger=logging.getLogger("test.https"), name="https")
    proxy = HttpsProxy(context, engine=SniEchoEngine())
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    await proxy.start([listener])
    crowd: list[asyncio.StreamWriter] = []
    try:
        for _ in range(2):  # slow handshakes: a record header, then nothing
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"\x16\x03\x01")
            crowd.append(writer)
        acceptor = proxy._acceptor
        assert acceptor is not None and acceptor.per_address is not None
        for _ in range(100):
            if acceptor.per_address.count("127.0.0.1") == 2:
                break
            await asyncio.sleep(0.05)
        assert acceptor.per_address.count("127.0.0.1") == 2
        # The third from that address is closed at once (not held until the timeout) ...
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"\x16\x03\x01")
        assert await asyncio.wait_for(reader.read(100), 10) == b""
        writer.close()
        assert acceptor.outcomes["per_ip_cap"] == 1
        # ... while another address completes its handshake.
        sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT,
                                        source_address=("127.0.0.2", 0))
        sock.setblocking(False)
        _, other = await asyncio.wait_for(asyncio.open_connection(
            sock=sock, ssl=client_context(), server_hostname="www.a.test",
            ssl_handshake_timeout=TIMEOUT), TIMEOUT)
        assert other.get_extra_info("ssl_object").version() in ("TLSv1.3", "TLSv1.2")
        other.close()
        # A slot comes back when one of the crowd gives up.
        crowd.pop().close()
        for _ in range(100):
            if acceptor.per_address.count("127.0.0.1") == 1:
                break
            await asyncio.sleep(0.05)
        _, again = await asyncio.wait_for(asyncio.open_connection(
            "127.0.0.1", port, ssl=client_context(), server_hostname="www.a.test",
            ssl_handshake_timeout=TIMEOUT), TIMEOUT)
        again.close()
    finally:
        for writer in crowd:
            writer.close()
        await proxy.drain()
        await proxy.close()


async def test_a_client_that_closes_after_part_of_its_hello_is_let_go_at_once(
        make_edge: EdgeFactory) -> None:
    # Before: the peek found the same bytes on every wake-up (EOF keeps the socket readable),
    # so the connection spun the worker's loop until handshake_timeout.
    edge = await make_edge(defer_accept=False, handshake_timeout=30.0)
    acceptor = edge.proxy._acceptor
    assert acceptor is not None
    _, writer = await asyncio.open_connection("127.0.0.1", edge.port)
    writer.write(b"\x16\x03\x01\x02")
    await writer.drain()
    for _ in range(100):
        if acceptor.pending:
            break
        await asyncio.sleep(0.02)
    writer.write_eof()
    for _ in range(200):
        if not acceptor.pending:
            break
        await asyncio.sleep(0.025)
    assert not acceptor.pending and acceptor.outcomes["closed"] == 1
    writer.close()
