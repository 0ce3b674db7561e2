"""TLS contexts of the FTP proxy: the client-facing FTPS context and the backend context.

Client side: one server :class:`ssl.SSLContext` per proxy serves the control connection *and*
every data connection, so a client that offers its control session on a data connection
(curl, FileZilla, lftp; servers such as vsftpd require it) resumes it: OpenSSL only resumes
sessions (and accepts tickets) issued by the same context.

Backend side: a client context that can *resume the backend control session* on backend data
connections. asyncio's ``create_connection``/``start_tls`` cannot pass ``session=`` to the
TLS object, but both asyncio's and uvloop's TLS protocols build it with
``sslcontext.wrap_bio(...)`` inside the connection's callbacks, which run in a copy of the
caller's context. :class:`ResumingClientContext` overrides ``wrap_bio`` to add the session
held in a :class:`contextvars.ContextVar`, which :func:`resuming` sets around one connect:
no shared mutable state, so concurrent sessions cannot pick up each other's TLS session.
"""

from __future__ import annotations

import contextlib
import contextvars
import ssl
from collections.abc import Iterator
from typing import Any

from edge.errors import ConfigError

__all__ = ["FtpsServerContext", "ResumingClientContext", "backend_context", "data_connection",
           "resuming", "server_context", "tls_info"]

_RESUME: contextvars.ContextVar[ssl.SSLSession | None] = contextvars.ContextVar(
    "ftpproxy_resume_session", default=None)
_NO_TICKETS: contextvars.ContextVar[bool] = contextvars.ContextVar("ftpproxy_no_tickets",
                                                                   default=False)


class ResumingClientContext(ssl.SSLContext):
    """A client context whose TLS objects resume the session set with :func:`resuming`."""

    def wrap_bio(self, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO, server_side: bool = False,
                 server_hostname: str | bytes | None = None,
                 session: ssl.SSLSession | None = None) -> ssl.SSLObject:
        if session is None and not server_side:
            session = _RESUME.get()
        return super().wrap_bio(incoming, outgoing, server_side=server_side,
                                server_hostname=server_hostname, session=session)


class FtpsServerContext(ssl.SSLContext):
    """The proxy's server context. Data connections made inside :func:`data_connection` send
    no TLS 1.3 session tickets: they resume the control session and need none, and a client
    that only writes (an upload) would never read them and close with them unread, which
    makes its kernel send a reset that can destroy the end of the upload in flight."""

    def wrap_bio(self, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO, server_side: bool = False,
                 server_hostname: str | bytes | None = None,
                 session: ssl.SSLSession | None = None) -> ssl.SSLObject:
        if not (server_side and _NO_TICKETS.get()):
            return super().wrap_bio(incoming, outgoing, server_side=server_side,
                                    server_hostname=server_hostname, session=session)
        # OpenSSL copies the context's ticket count into each new connection (SSL_new), so
        # changing it around this one synchronous call affects this connection only.
        tickets = self.num_tickets
        self.num_tickets = 0
        try:
            return super().wrap_bio(incoming, outgoing, server_side=server_side,
                                    server_hostname=server_hostname, session=session)
        finally:
            self.num_tickets = tickets


@contextlib.contextmanager
def data_connection() -> Iterator[None]:
    """Within the block, TLS server connections made with :class:`FtpsServerContext` issue no
    session tickets (hold it around the whole accept/wrap call, like :func:`resuming`)."""
    token = _NO_TICKETS.set(True)
    try:
        yield
    finally:
        _NO_TICKETS.reset(token)


@contextlib.contextmanager
def resuming(session: ssl.SSLSession | None) -> Iterator[None]:
    """Within the block, new TLS connections made with a :class:`ResumingClientContext` offer
    ``session`` (``None``: a full handshake). The TLS object is created after the TCP connect,
    in a copy of this task's context, so hold the block around the whole connect call."""
    token = _RESUME.set(session)
    try:
        yield
    finally:
        _RESUME.reset(token)


def server_context(certificate_file: str, key_file: str = "") -> FtpsServerContext:
    """The proxy's FTPS context (TLS 1.2+), shared by control and data connections.

    Raises :class:`ConfigError` naming the file when the certificate or key cannot be loaded.
    """
    context = FtpsServerContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(certificate_file, key_file or None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"[ftp] certificate_file/key_file: cannot load {certificate_file!r}"
                          f"{' / ' + repr(key_file) if key_file else ''}: {exc}") from None
    context.options |= ssl.OP_NO_COMPRESSION
    return context


def backend_context(*, verify: bool = True, ca_file: str = "") -> ResumingClientContext:
    """Client context for FTPS backends: verification on unless ``verify`` is False.

    Raises :class:`ConfigError` when ``ca_file`` cannot be loaded.
    """
    context = ResumingClientContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if verify:
        try:
            if ca_file:
                context.load_verify_locations(cafile=ca_file)
            else:
                context.load_default_certs()
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"[ftp] backend_ca_file: cannot load {ca_file!r}: {exc}") from None
    else:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def tls_info(transport: Any) -> dict[str, Any]:
    """``{"tls": version, "resumed": bool}`` of a transport, or ``{}`` when it is not TLS."""
    obj = transport.get_extra_info("ssl_object") if transport is not None else None
    if obj is None:
        return {}
    return {"tls": obj.version(), "resumed": bool(obj.session_reused)}
