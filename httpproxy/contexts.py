"""SSLContexts for the HTTPS edge: one factory, one bounded LRU keyed by certificate.

Every context is built by :class:`ContextFactory` from the ``[https]`` section, so ALPN
(``http/1.1`` only: the forwarder speaks HTTP/1.1), cipher list, key-exchange groups
(:mod:`httpproxy.tls_openssl`), minimum version, options and session-ticket policy are
identical for every site; only the certificate chain differs.

**Private keys never touch a filesystem in plaintext.** :meth:`ssl.SSLContext.load_cert_chain`
only reads paths, so the decrypted chain + key are written to an anonymous ``memfd`` (RAM
only, no name in any filesystem, closed right after loading) and loaded through
``/proc/self/fd/N``. The alternative, a password-encrypted PEM handed to OpenSSL with a
one-time password, would cost a KDF run per load (milliseconds) and still needs a path for
the chain; memfd is both cheaper and simpler. Linux only, like ``SO_REUSEPORT``.

Building a context costs ~1 ms of CPU (OpenSSL 3 ``SSL_CTX_new`` + PEM decoding) and ~20 KiB,
so :class:`ContextCache` keeps ``[https] context_cache_size`` of them, least recently used
first out. An entry is valid only for the exact certificate (id *and* SHA-256 fingerprint)
it was built from: a rotated certificate can never be answered with a stale context, and the
change feed evicts a changed certificate's entry at once (:meth:`ContextCache.on_change`).
"""

from __future__ import annotations

import os
import ssl
from collections import OrderedDict

from edge.config import HttpsConfig
from edge.directory.model import Certificate, Change
from edge.errors import EdgeError
from httpproxy.tls_openssl import available_groups, set_groups, set_session_cache_size

__all__ = ["ContextCache", "ContextFactory", "TlsCertificateError"]

_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
ALPN_PROTOCOLS = ("h2", "http/1.1")
"""Offered in this order ([https] http2 = false: HTTP/1.1 only); a client that offers neither
still gets HTTP/1.1 (no ALPN answer)."""


class TlsCertificateError(EdgeError):
    """A certificate from the directory cannot be loaded into OpenSSL (the handshake using it
    is refused with ``internal_error``; the message names the certificate id)."""


class ContextFactory:
    """Builds every server-side :class:`ssl.SSLContext` of the HTTPS edge the same way."""

    def __init__(self, config: HttpsConfig) -> None:
        self.config = config
        self.minimum_version = _VERSIONS[config.min_tls_version]
        self.groups = available_groups(config.groups)  # raises OpenSslSettingError: fail at start
        self.builds = 0

    def new_context(self) -> ssl.SSLContext:
        """A context with every setting applied but no certificate yet."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = self.minimum_version
        ctx.set_ciphers(self.config.ciphers)
        ctx.set_alpn_protocols(list(ALPN_PROTOCOLS if self.config.http2 else ALPN_PROTOCOLS[1:]))
        set_groups(ctx, self.groups)
        # PROTOCOL_TLS_SERVER already sets NO_COMPRESSION, SINGLE_(EC)DH_USE and
        # CIPHER_SERVER_PREFERENCE; renegotiation is a DoS lever and HTTP/1.1 does not need it.
        ctx.options |= ssl.OP_NO_RENEGOTIATION
        if not self.config.session_tickets:
            ctx.options |= ssl.OP_NO_TICKET
            ctx.num_tickets = 0
        set_session_cache_size(ctx, self.config.session_cache_size)
        return ctx

    def build(self, certificate: Certificate) -> ssl.SSLContext:
        """A context serving ``certificate``. Raises :class:`TlsCertificateError`."""
        ctx = self.new_context()
        try:
            load_chain_from_memory(ctx, certificate.chain_pem, certificate.key_pem)
        except (ssl.SSLError, OSError, ValueError) as exc:
            raise TlsCertificateError(
                f"certificate {certificate.id} ({', '.join(certificate.names)}) cannot be loaded "
                f"into OpenSSL: {exc}; re-import it with `edge cert import`") from None
        self.builds += 1
        return ctx


def load_chain_from_memory(ctx: ssl.SSLContext, chain_pem: bytes, key_pem: bytes) -> None:
    """``ctx.load_cert_chain`` from bytes, through an anonymous memfd (never a disk file)."""
    fd = os.memfd_create("edge-tls-chain", os.MFD_CLOEXEC)
    try:
        data = memoryview(chain_pem.rstrip(b"\n") + b"\n" + key_pem)
        while data:
            data = data[os.write(fd, data):]
        # The key follows the chain in the same "file": OpenSSL reads the certificates, then
        # the first private key, and checks that it matches the leaf.
        ctx.load_cert_chain(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


class _Entry:
    __slots__ = ("context", "fingerprint")

    def __init__(self, fingerprint: str, context: ssl.SSLContext) -> None:
        self.fingerprint = fingerprint
        self.context = context


class ContextCache:
    """Bounded LRU of contexts, by certificate id, valid only for the same fingerprint.

    ``hits`` / ``misses`` / ``evictions`` are plain counters (exported by the proxy).
    """

    def __init__(self, factory: ContextFactory, max_entries: int) -> None:
        if max_entries < 1:
            raise ValueError("a context cache needs room for at least one context")
        self.factory = factory
        self.max_entries = max_entries
        self._entries: OrderedDict[int, _Entry] = OrderedDict()
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, certificate_id: object) -> bool:
        return certificate_id in self._entries

    def get(self, certificate: Certificate) -> ssl.SSLContext:
        """The context for exactly this certificate, built on a miss.

        Raises :class:`TlsCertificateError` when it cannot be built (nothing is cached then).
        """
        entry = self._entries.get(certificate.id)
        if entry is not None and entry.fingerprint == certificate.fingerprint:
            self._entries.move_to_end(certificate.id)
            self.hits += 1
            return entry.context
        self.misses += 1
        context = self.factory.build(certificate)
        self._entries[certificate.id] = _Entry(certificate.fingerprint, context)
        self._entries.move_to_end(certificate.id)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
            self.evictions += 1
        return context

    def evict(self, certificate_id: int) -> None:
        if self._entries.pop(certificate_id, None) is not None:
            self.evictions += 1

    def clear(self) -> None:
        self.evictions += len(self._entries)
        self._entries.clear()

    def on_change(self, change: Change) -> None:
        """Change-feed subscriber: drop the context of a changed certificate (returns None,
        never raises on an unrelated change)."""
        if change.entity == "certificate":
            try:
                self.evict(int(change.name))
            except ValueError:
                self.clear()  # unparseable id: be safe rather than serve a stale context
        elif change.entity == "all":
            self.clear()
