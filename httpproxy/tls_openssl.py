"""OpenSSL context settings Python's :mod:`ssl` lacks: key-exchange groups
(``SSL_CTX_set1_groups_list``) and the session cache size (``SSL_CTX_sess_set_cache_size``).

Groups, why: OpenSSL's default list includes ffdhe2048-8192, secp521r1 and X448. A client may pick
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
:class:`OpenSslSettingError` instead of writing through a wrong pointer. The tests prove the list
is active with real handshakes (``tests/test_http_tls_groups.py``).

Session cache, why: with session tickets off, TLS 1.2 sessions resume from OpenSSL's
server-side cache, one per context (certificate) and worker, 20,480 sessions by default;
with ``[https] context_cache_size`` contexts that default would let a handshake flood pin
hundreds of MiB. ``SSL_CTX_sess_set_cache_size`` is the same ``SSL_CTX_ctrl`` call.
"""

from __future__ import annotations

import _ssl
import ctypes
import ssl
from functools import cache

from edge.errors import EdgeError

__all__ = ["OPTIONAL_GROUPS", "OpenSslSettingError", "available_groups", "session_cache_size",
           "set_groups", "set_session_cache_size"]

OPTIONAL_GROUPS = frozenset({"X25519MLKEM768"})
"""Groups left out (not an error) when the OpenSSL in use does not know them: the hybrid
post-quantum group arrived in OpenSSL 3.5."""
_SSL_CTRL_SET_GROUPS_LIST = 92  # OpenSSL 1.1.1 and 3.x (ssl.h); never renumbered
_SSL_CTRL_SET_SESS_CACHE_SIZE = 42
_SSL_CTRL_GET_SESS_CACHE_SIZE = 43
_CTX_POINTER_OFFSET = object.__basicsize__  # PySSLContext: PyObject_HEAD, then SSL_CTX *ctx


class OpenSslSettingError(EdgeError):
    """An OpenSSL setting cannot be applied (refuse to serve rather than run with OpenSSL's
    defaults, e.g. its expensive key-exchange groups)."""


class _LibSsl:
    def __init__(self) -> None:
        # _ssl links the very libssl its contexts come from: resolve through its handle.
        lib = ctypes.CDLL(_ssl.__file__)
        try:
            self.ctrl = lib.SSL_CTX_ctrl
            self.get_options = lib.SSL_CTX_get_options
            self.clear_errors = lib.ERR_clear_error
        except AttributeError as exc:
            raise OpenSslSettingError(f"libssl used by Python lacks {exc}: cannot set TLS groups") from None
        self.ctrl.argtypes = (ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p)
        self.ctrl.restype = ctypes.c_long
        self.get_options.argtypes = (ctypes.c_void_p,)
        # uint64_t in OpenSSL 3, unsigned long in 1.1.1: the same 64 bits on LP64 Linux.
        self.get_options.restype = ctypes.c_uint64


@cache
def _libssl() -> _LibSsl:
    return _LibSsl()


def _ctx_pointer(ctx: ssl.SSLContext) -> int:
    if not isinstance(ctx, _ssl._SSLContext):
        raise OpenSslSettingError(f"not an _ssl context: {type(ctx)!r}")
    pointer = ctypes.c_void_p.from_address(id(ctx) + _CTX_POINTER_OFFSET).value
    if not pointer or _libssl().get_options(pointer) != int(ctx.options):
        raise OpenSslSettingError("cannot find the SSL_CTX of an ssl.SSLContext (CPython layout "
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
    text = ctypes.create_string_buffer(groups.encode("ascii"))
    if lib.ctrl(_ctx_pointer(ctx), _SSL_CTRL_SET_GROUPS_LIST, 0, ctypes.addressof(text)) == 1:
        return True
    lib.clear_errors()  # else the next ssl call in this thread would report this failure
    return False


@cache
def available_groups(wanted: tuple[str, ...]) -> tuple[str, ...]:
    """``wanted`` without the :data:`OPTIONAL_GROUPS` this OpenSSL does not know.

    Raises :class:`OpenSslSettingError` for another unknown group or when nothing is left."""
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    kept = []
    for group in wanted:
        if _apply(probe, group):
            kept.append(group)
        elif group not in OPTIONAL_GROUPS:
            raise OpenSslSettingError(f"[https] groups: OpenSSL ({ssl.OPENSSL_VERSION}) does not know "
                                 f"the group {group!r}")
    if not kept:
        raise OpenSslSettingError("[https] groups: no usable key-exchange group")
    return tuple(kept)


def set_groups(ctx: ssl.SSLContext, groups: tuple[str, ...]) -> None:
    """Offer exactly ``groups`` (in this order of preference) on ``ctx``.

    Raises :class:`OpenSslSettingError` when they cannot be set: never serve with the defaults."""
    names = available_groups(groups)
    if not _apply(ctx, ":".join(names)):
        raise OpenSslSettingError(f"OpenSSL refused the group list {':'.join(names)!r}")


def set_session_cache_size(ctx: ssl.SSLContext, sessions: int) -> None:
    """Keep at most ``sessions`` TLS sessions in ``ctx``'s server-side cache (0: OpenSSL's
    "no limit", so callers pass at least 1)."""
    pointer = _ctx_pointer(ctx)
    _libssl().ctrl(pointer, _SSL_CTRL_SET_SESS_CACHE_SIZE, sessions, None)
    if session_cache_size(ctx) != sessions:
        raise OpenSslSettingError(f"OpenSSL did not take the session cache size {sessions}")


def session_cache_size(ctx: ssl.SSLContext) -> int:
    """The session cache size OpenSSL has for ``ctx``."""
    return int(_libssl().ctrl(_ctx_pointer(ctx), _SSL_CTRL_GET_SESS_CACHE_SIZE, 0, None))
