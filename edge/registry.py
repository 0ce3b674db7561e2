"""Which proxy serves which protocol, found by name and imported only when enabled.

``edge`` never imports a proxy package at module top (dependency direction is proxy → edge).
The built-in table maps a protocol (also its configuration section: ``[http]``, ``[ssh]`` ...)
to ``"module:Class"``; an installed distribution may add or replace one through the
``edge.proxies`` entry-point group::

    [project.entry-points."edge.proxies"]
    ssh = "mysshproxy.server:SshProxy"

For tests and development, :func:`register` (in-process) and ``$EDGE_PROXY_OVERRIDES``
(``"ssh=tests.echo_proxy:EchoProxy,ftp=..."``, read at lookup time so forked or spawned
``edge serve`` processes see it) take precedence over both.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import os
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from edge.config import EdgeConfig, ListenAddress, ProxyListenerConfig
from edge.errors import ConfigError
from edge.sessions import SessionTable

if TYPE_CHECKING:
    from edge.directory.directory import Directory
    from edge.directory.feed import ChangeFeed
    from edge.directory.secrets import KeyBox

ENTRY_POINT_GROUP = "edge.proxies"
OVERRIDES_ENV = "EDGE_PROXY_OVERRIDES"

BUILTIN: dict[str, str] = {
    "http": "httpproxy.server:HttpProxy",
    "https": "httpproxy.tls_server:HttpsProxy",
    "ssh": "sshproxy.server:SshProxy",
    "ftp": "ftpproxy.server:FtpProxy",
}
"""Protocol → ``"module:Class"`` of the proxies shipped in this distribution."""

_overrides: dict[str, str] = {}


@dataclass(frozen=True, slots=True)
class ProxyContext:
    """What a proxy gets from the worker that runs it (one per proxy per worker)."""

    config: EdgeConfig
    directory: Directory
    feed: ChangeFeed
    keybox: KeyBox | None
    """``None`` when no at-rest key is configured: TLS private keys cannot be read then."""
    worker_id: int
    """0..N-1, stable across restarts of the same slot."""
    logger: logging.Logger
    name: str = ""
    """The protocol this proxy was started for (``"ssh"``...)."""
    sessions: SessionTable = field(default_factory=SessionTable)
    """This worker's live sessions (``edge sessions``): add one once it is logged in."""


@runtime_checkable
class Proxy(Protocol):
    """The plug-in interface every proxy implements; one instance per worker process."""

    def __init__(self, context: ProxyContext) -> None: ...

    async def start(self, sockets: list[socket.socket]) -> None:
        """Serve on these already bound, listening sockets; returns once accepting."""

    async def drain(self) -> None:
        """Stop accepting new connections; open sessions continue. Returns at once."""

    async def wait_closed(self, timeout: float) -> None:  # noqa: ASYNC109 - the interface
        """Return when no session is left or ``timeout`` seconds have passed (no exception)."""

    async def close(self) -> None:
        """End every remaining session with the protocol's goodbye, then release resources."""

    def active_sessions(self) -> int:
        """Sessions currently open (exported as ``edge_active_sessions``)."""


class ProxyNotAvailable(ConfigError):
    """A listener is configured but its proxy cannot be imported."""


def register(name: str, target: str | None) -> None:
    """Use ``target`` (``"module:Class"``) for ``name`` in this process; ``None`` removes it."""
    if target is None:
        _overrides.pop(name, None)
    else:
        _check_target(target)
        _overrides[name] = target


def _check_target(target: str) -> None:
    module, sep, attr = target.partition(":")
    if not sep or not module or not attr:
        raise ConfigError(f"proxy target {target!r} is not \"module:Class\"")


def _env_overrides(env: Mapping[str, str]) -> dict[str, str]:
    result: dict[str, str] = {}
    for item in env.get(OVERRIDES_ENV, "").split(","):
        name, sep, target = item.strip().partition("=")
        if sep:
            _check_target(target.strip())
            result[name.strip()] = target.strip()
    return result


def _entry_points() -> dict[str, str]:
    return {ep.name: ep.value for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def proxy_targets(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """Protocol → ``"module:Class"``: built-ins < entry points < :func:`register` < env."""
    return {**BUILTIN, **_entry_points(), **_overrides,
            **_env_overrides(os.environ if env is None else env)}


def listener_config(config: EdgeConfig, name: str) -> ProxyListenerConfig | None:
    """The ``[name]`` section if it is a listener section, else ``None``."""
    section = getattr(config, name, None)
    return section if isinstance(section, ProxyListenerConfig) else None


def load_proxy(name: str, target: str | None = None) -> type[Proxy]:
    """Import the proxy class for ``name``.

    Raises :class:`ProxyNotAvailable` with one line naming the section when the module or
    class does not exist (the proxy packages are built one by one).
    """
    target = target or proxy_targets().get(name)
    if target is None:
        raise ProxyNotAvailable(f"[{name}] listen is set but no proxy is registered for {name!r}")
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
        cls = getattr(module, attr)
    except (ImportError, AttributeError) as exc:
        why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ProxyNotAvailable(f"[{name}] listen is set but the {name} proxy is not "
                                f"installed/built yet ({target}: {why})") from None
    if not isinstance(cls, type):
        raise ProxyNotAvailable(f"[{name}] proxy {target} is not a class")
    return cls


def enabled_listeners(config: EdgeConfig, only: Iterable[str] | None = None,
                      ) -> dict[str, tuple[ListenAddress, ...]]:
    """Protocol → listen addresses of every proxy to run (non-empty ``listen``, in ``only``).

    Raises :class:`ConfigError` if ``only`` names something that is not a proxy section.
    """
    names = [n for n in proxy_targets() if listener_config(config, n) is not None]
    if only is not None:
        wanted = set(only)
        unknown = wanted - set(names)
        if unknown:
            raise ConfigError(f"--only: unknown proxy {', '.join(sorted(unknown))} "
                              f"(known: {', '.join(names)})")
        names = [n for n in names if n in wanted]
    result: dict[str, tuple[ListenAddress, ...]] = {}
    for name in names:
        section = listener_config(config, name)
        if section is not None and section.listen:
            result[name] = section.listen
    return result


__all__ = ["BUILTIN", "ENTRY_POINT_GROUP", "OVERRIDES_ENV", "Proxy", "ProxyContext",
           "ProxyNotAvailable", "enabled_listeners", "listener_config", "load_proxy",
           "proxy_targets", "register"]
