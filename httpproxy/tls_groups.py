"""Key-exchange groups of a server :class:`ssl.SSLContext` (OpenSSL ``SSL_CTX_set1_groups_list``).

Why: OpenSSL's default list includes ffdhe2048-8192, secp521r1 and X448. A client may pick
any of them, and one ffdhe8192 handshake costs ~145 ms of worker CPU (X25519: ~1.3 ms), so a
few client loops asking for it starve every other HTTPS request of the worker; Mozilla's
intermediate profile also allows only X25519, P-256 and P-384.

Python's :mod:`ssl` has no call for it before 3.15 (``SSLContext.set_groups``):
``set_ecdh_curve`` sets one curve and leaves the FFDHE groups on. So, unless the context has
``set_groups``, we call ``SSL_CTX_ctrl(ctx, SSL_CTRL_SET_GROUPS_LIST, 0, list)`` (what the
``SSL_CTX_set1_groups_list`` macro expands to in OpenSSL 1.1.1 and 3.x) through ctypes on the
``SSL_CTX *`` that CPython's ``PySSLContext`` holds right after its object header (checked
against CPython 3.11-3.13). Before that pointer is used, it must pass a check: OpenSSL's
``SSL_CTX_get_options`` on it must equal the context's ``options``; anything else raises
:class:`TlsGroupsError` instead of writing through a wrong pointer. The tests prove the list
is active with real handshakes (``tests/test_http_tls_groups.py``).
"""

from __future__ import annotations

import _ssl
import ctypes
import ssl
from functools import cache

from edge.errors import EdgeError

__all__ = ["OPTIONAL_GROUPS", "TlsGroupsError", "available_groups", "set_groups"]

OPTIONAL_GROUPS = frozenset({"X25519MLKEM768"})
"""Groups left out (not an error) when the OpenSSL in use does not know them: the hybrid
post-quantum group arrived in OpenSSL 3.5."""
_SSL_CTRL_SET_GROUPS_LIST = 92  # OpenSSL 1.1.1 and 3.x (ssl.h); never renumbered
_CTX_POINTER_OFFSET = object.__basicsize__  # PySSLContext: PyObject_HEAD, then SSL_CTX *ctx


class TlsGroupsError(EdgeError):
    """The key-exchange groups cannot be set (refuse to serve rather than offer OpenSSL's
    default groups)."""


class _LibSsl:
    def __init__(self) -> None:
        # _ssl links the very libssl its contexts come from: resolve through its handle.
        lib = ctypes.CDLL(_ssl.__file__)
        try:
            self.ctrl = lib.SSL_CTX_ctrl
            self.get_options = lib.SSL_CTX_get_options
            self.clear_errors = lib.ERR_clear_error
        except AttributeError as exc:
            raise TlsGroupsError(f"libssl used by Python lacks {exc}: cannot set TLS groups") from None
        self.ctrl.argtypes = (ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_char_p)
        self.ctrl.restype = ctypes.c_long
        self.get_options.argtypes = (ctypes.c_void_p,)
        # uint64_t in OpenSSL 3, unsigned long in 1.1.1: the same 64 bits on LP64 Linux.
        self.get_options.restype = ctypes.c_uint64


@cache
def _libssl() -> _LibSsl:
    return _LibSsl()


def _ctx_pointer(ctx: ssl.SSLContext) -> int:
    if not isinstance(ctx, _ssl._SSLContext):
        raise TlsGroupsError(f"not an _ssl context: {type(ctx)!r}")
    pointer = ctypes.c_void_p.from_address(id(ctx) + _CTX_POINTER_OFFSET).value
    if not pointer or _libssl().get_options(pointer) != int(ctx.options):
        raise TlsGroupsError("cannot find the SSL_CTX of an ssl.SSLContext (CPython layout "
                             "changed?): TLS groups not set")
    return pointer


def _apply(ctx: ssl.SSLContext, groups: str) -> bool:
    setter = getattr(ctx, "set_groups", None)
    if setter is not None:  # Python 3.15+
        try:
            setter(groups)
        except (ssl.SSLError, ValueError):
            return False
        return True
    lib = _libssl()
    if lib.ctrl(_ctx_pointer(ctx), _SSL_CTRL_SET_GROUPS_LIST, 0, groups.encode("ascii")) == 1:
        return True
    lib.clear_errors()  # else the next ssl call in this thread would report this failure
    return False


@cache
def available_groups(wanted: tuple[str, ...]) -> tuple[str, ...]:
    """``wanted`` without the :data:`OPTIONAL_GROUPS` this OpenSSL does not know.

    Raises :class:`TlsGroupsError` for another unknown group or when nothing is left."""
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    kept = []
    for group in wanted:
        if _apply(probe, group):
            kept.append(group)
        elif group not in OPTIONAL_GROUPS:
            raise TlsGroupsError(f"[https] groups: OpenSSL ({ssl.OPENSSL_VERSION}) does not know "
                                 f"the group {group!r}")
    if not kept:
        raise TlsGroupsError("[https] groups: no usable key-exchange group")
    return tuple(kept)


def set_groups(ctx: ssl.SSLContext, groups: tuple[str, ...]) -> None:
    """Offer exactly ``groups`` (in this order of preference) on ``ctx``.

    Raises :class:`TlsGroupsError` when they cannot be set: never serve with the defaults."""
    names = available_groups(groups)
    if not _apply(ctx, ":".join(names)):
        raise TlsGroupsError(f"OpenSSL refused the group list {':'.join(names)!r}")
