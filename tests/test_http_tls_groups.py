"""Key exchange of the HTTPS listener: only X25519, P-256 and P-384 (plus X25519MLKEM768 where
OpenSSL has it). A client offering only an expensive group (ffdhe8192: ~145 ms of worker CPU
per handshake) or one outside Mozilla's intermediate profile fails the handshake; checked with
the real ``openssl s_client`` against the running listener, TLS 1.3 and 1.2."""

from __future__ import annotations

import asyncio
import ssl

import pytest

from edge.config import HttpsConfig
from httpproxy.contexts import ContextFactory
from httpproxy.tls_openssl import OpenSslSettingError, session_cache_size, set_groups
from tests import test_http_tls
from tests.test_http_tls import TIMEOUT, EdgeFactory

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
