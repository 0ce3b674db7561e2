"""httpproxy.contexts: one factory for every SSLContext, a bounded LRU keyed by certificate id
and fingerprint, change-feed eviction, private keys loaded from memory only."""

from __future__ import annotations

import contextlib
import os
import ssl
from pathlib import Path

import pytest

from edge.config import HttpsConfig
from edge.directory.model import Certificate, Change
from httpproxy.contexts import ContextCache, ContextFactory, TlsCertificateError
from tests.support_directory import make_certificate


def cert(cert_id: int, names: list[str], fingerprint: str | None = None) -> Certificate:
    chain, key = make_certificate(names)
    return Certificate(id=cert_id, fingerprint=fingerprint or f"fp{cert_id}-{names[0]}",
                       names=tuple(names), not_before=0.0, not_after=0.0, chain_pem=chain,
                       key_pem=key)


def served_names(ctx: ssl.SSLContext) -> list[str]:
    """Handshake in memory with ``ctx`` and return the SAN DNS names of the served certificate."""
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    c = client.wrap_bio(c_in, c_out, server_hostname="x.test")
    s = ctx.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(10):
        for side in (c, s):
            with contextlib.suppress(ssl.SSLWantReadError):
                side.do_handshake()
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if c.version() and s.version():
            break
    from cryptography import x509

    der = c.getpeercert(binary_form=True)
    assert der is not None
    san = x509.load_der_x509_certificate(der).extensions.get_extension_for_class(
        x509.SubjectAlternativeName)
    return san.value.get_values_for_type(x509.DNSName)


def test_factory_contexts_share_every_setting() -> None:
    factory = ContextFactory(HttpsConfig(min_tls_version="1.3", session_tickets=False))
    a, b = factory.build(cert(1, ["a.test"])), factory.build(cert(2, ["b.test"]))
    for ctx in (a, b):
        assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3
        assert ctx.options & ssl.OP_NO_TICKET and ctx.num_tickets == 0
        assert ctx.options & ssl.OP_NO_RENEGOTIATION and ctx.options & ssl.OP_NO_COMPRESSION
    assert [c["name"] for c in a.get_ciphers()] == [c["name"] for c in b.get_ciphers()]
    assert served_names(a) == ["a.test"] and served_names(b) == ["b.test"]
    assert factory.builds == 2


def test_keys_are_loaded_without_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Nothing is written to the working directory or the temp directory while loading.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    before = set(os.listdir(tmp_path))
    opened = set(os.listdir("/proc/self/fd"))
    ContextFactory(HttpsConfig()).build(cert(1, ["a.test"]))
    assert set(os.listdir(tmp_path)) == before
    assert set(os.listdir("/proc/self/fd")) <= opened | {str(max(map(int, opened)) + 1)}


def test_unloadable_certificate_is_an_actionable_error() -> None:
    good = cert(7, ["a.test"])
    _, other_key = make_certificate(["b.test"])
    broken = Certificate(id=7, fingerprint="x", names=("a.test",), not_before=0, not_after=0,
                         chain_pem=good.chain_pem, key_pem=other_key)
    cache = ContextCache(ContextFactory(HttpsConfig()), 4)
    with pytest.raises(TlsCertificateError, match=r"certificate 7 \(a.test\).*edge cert import"):
        cache.get(broken)
    assert len(cache) == 0


def test_lru_bound_and_fingerprint_guard() -> None:
    cache = ContextCache(ContextFactory(HttpsConfig()), 2)
    one, two, three = cert(1, ["one.test"]), cert(2, ["two.test"]), cert(3, ["three.test"])
    ctx_one = cache.get(one)
    assert cache.get(one) is ctx_one
    cache.get(two)
    cache.get(one)  # one is now the most recently used
    cache.get(three)  # evicts two
    assert 2 not in cache and 1 in cache and 3 in cache and len(cache) == 2
    assert (cache.hits, cache.misses, cache.evictions) == (2, 3, 1)
    # Same id, another certificate (fingerprint): never the stale context.
    replaced = cert(1, ["new-one.test"], fingerprint="another")
    ctx_new = cache.get(replaced)
    assert ctx_new is not ctx_one and served_names(ctx_new) == ["new-one.test"]


def test_change_feed_evicts_changed_certificates() -> None:
    cache = ContextCache(ContextFactory(HttpsConfig()), 10)
    for i in (1, 2, 3):
        cache.get(cert(i, [f"c{i}.test"]))
    cache.on_change(Change(1, "certificate", "2"))
    assert 2 not in cache and len(cache) == 2
    cache.on_change(Change(2, "site", "c1.test"))  # a site change keeps certificates
    assert len(cache) == 2
    cache.on_change(Change(3, "all", "*"))  # bulk load
    assert len(cache) == 0
