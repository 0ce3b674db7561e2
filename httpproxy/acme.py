"""ACME challenge answers served by the edge itself, on every worker (docs/tls.md).

* **HTTP-01** (RFC 8555 §8.3): :mod:`httpproxy.acme_http01` (called by the exchange).
* **TLS-ALPN-01** (RFC 8737): a ClientHello offering only ``acme-tls/1`` gets a
  self-signed certificate for the SNI carrying the ``id-pe-acmeIdentifier`` extension
  (SHA-256 of the key authorization); the connection ends after the handshake.

The hooks in :mod:`httpproxy.exchange` (through :mod:`httpproxy.acme_http01`) and
:mod:`httpproxy.tls_server` are one call each.
"""

from __future__ import annotations

import asyncio
import datetime
import functools
import hashlib
import logging
import ssl
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from edge.directory.names import hostname_or_none
from edge.errors import DirectoryUnavailable
from httpproxy.contexts import load_chain_from_memory

if TYPE_CHECKING:
    from edge.directory.directory import Directory
    from httpproxy.clienthello import ClientHello
    from httpproxy.tls import PendingConnection

__all__ = ["ALPN_PROTOCOL", "challenge_certificate", "is_tls_alpn01",
           "serve_tls_alpn01", "tls_alpn01_token"]

log = logging.getLogger("edge.acme.challenges")

ALPN_PROTOCOL = "acme-tls/1"
ACME_IDENTIFIER_OID = x509.ObjectIdentifier("1.3.6.1.5.5.7.1.31")


def tls_alpn01_token(hostname: str) -> str:
    """The directory key under which a TLS-ALPN-01 answer for ``hostname`` is published."""
    return "tls-alpn-01:" + hostname


# -- TLS-ALPN-01 ----------------------------------------------------------------------------

def is_tls_alpn01(hello: ClientHello) -> bool:
    """RFC 8737 §3: the validation hello offers ``acme-tls/1`` and nothing else."""
    return hello.alpn == (ALPN_PROTOCOL,) and hello.server_name is not None


def challenge_certificate(hostname: str, key_authorization: str) -> tuple[bytes, bytes]:
    """A self-signed certificate (PEM chain, PEM key) for the TLS-ALPN-01 answer."""
    key = ec.generate_private_key(ec.SECP256R1())
    digest = hashlib.sha256(key_authorization.encode("ascii")).digest()
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
            # The extension's value is DER: OCTET STRING (0x04), 32 bytes, the digest.
            .add_extension(x509.UnrecognizedExtension(ACME_IDENTIFIER_OID,
                                                      b"\x04\x20" + digest), critical=True)
            .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


class _CloseAfterHandshake(asyncio.Protocol):
    """The validation connection carries no application data: close once TLS is up."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


async def serve_tls_alpn01(directory: Directory, connection: PendingConnection,
                           hello: ClientHello) -> None:
    """Handshake with the challenge certificate of ``hello``'s SNI, or refuse with the alert
    ``unrecognized_name`` when no answer is published for it (returns None)."""
    name = hostname_or_none(hello.server_name or "")
    try:
        answer = None if name is None else await directory.challenge(
            tls_alpn01_token(name))
    except DirectoryUnavailable:
        connection.refuse("internal_error", "unavailable")
        return
    if connection.closed:
        return
    if answer is None or name is None:
        connection.refuse("unrecognized_name", "unrecognized_name")
        return
    chain, key = challenge_certificate(name, answer.key_authorization)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols([ALPN_PROTOCOL])
    load_chain_from_memory(ctx, chain, key)
    remaining = connection.remaining()
    if remaining <= 0:
        connection.close("timeout")
        return
    sock = connection.detach()
    loop = asyncio.get_running_loop()
    try:
        await loop.connect_accepted_socket(functools.partial(_CloseAfterHandshake), sock,
                                           ssl=ctx, ssl_handshake_timeout=remaining)
    except (OSError, ssl.SSLError, TimeoutError, EOFError) as exc:
        log.debug("TLS-ALPN-01 handshake for %s failed: %s", name, exc)
        connection.finish("tls_error")
        return
    connection.finish("acme_tls_alpn")
