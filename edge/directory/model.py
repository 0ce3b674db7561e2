"""What the tenant directory returns: frozen, slotted dataclasses, safe to share and cache.

Relations are by *name* (a tenant's ``host`` is the host's name), so a hot-path route is a
chain of cached point lookups: ``account(username) -> tenant(account.tenant) -> host(tenant.host)``
for SSH/FTP and ``site(hostname) -> tenant -> host`` for HTTP. Moving a tenant is therefore one
row change and one change-feed entry, however many sites and accounts it has.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

HostState = Literal["active", "maintenance", "down"]
TenantState = Literal["active", "suspended"]
ProxyProtocolMode = Literal["off", "v1", "v2"]
Protocol = Literal["ssh", "ftp"]

HOST_STATES: tuple[HostState, ...] = ("active", "maintenance", "down")
TENANT_STATES: tuple[TenantState, ...] = ("active", "suspended")
PROXY_PROTOCOL_MODES: tuple[ProxyProtocolMode, ...] = ("off", "v1", "v2")
PROTOCOLS: tuple[Protocol, ...] = ("ssh", "ftp")


@dataclass(frozen=True, slots=True)
class Host:
    """A backend machine that serves tenants."""

    name: str
    address: str
    ssh_port: int = 22
    ftp_port: int = 21
    http_port: int = 80
    https_port: int = 443
    state: HostState = "active"
    notice: str = ""
    """Text shown to users while the host is in maintenance (FTP 421 text, SSH banner)."""
    ssh_known_hosts: str = ""
    """Pinned upstream SSH host keys, OpenSSH known_hosts public-key lines."""
    ssh_insecure: bool = False
    """Skip upstream host-key verification; only for hosts an operator explicitly marks."""
    send_proxy_protocol: ProxyProtocolMode = "off"
    backend_tls: bool = False
    """Speak TLS to this host's FTP/HTTP backends (certificates verified)."""
    maintenance_until: float | None = None
    """Unix time a maintenance window ends (``set-state ... --until``); from then on the host
    counts as active (:func:`edge.sessionpolicy.host_state`). ``None``: until changed."""


@dataclass(frozen=True, slots=True)
class Tenant:
    """A customer; every account and site of the tenant lives on ``host``."""

    name: str
    host: str
    state: TenantState = "active"
    previous_host: str | None = None
    """Set by ``tenant move``: sessions still open there are drained."""
    drain_deadline: float | None = None
    """Unix time after which sessions on ``previous_host`` are closed."""


@dataclass(frozen=True, slots=True)
class Account:
    """A login (SSH and/or FTP) that belongs to a tenant."""

    username: str
    tenant: str
    protocols: frozenset[str] = frozenset({"ssh", "ftp"})
    upstream_username: str = ""
    """The name used on the backend; defaults to ``username`` when empty."""
    authorized_keys: str = ""
    """OpenSSH authorized_keys text the proxy checks client keys against."""
    ssh_upstream_username: str = ""
    """The name on the backend for SSH logins; '' means :attr:`upstream_username`."""
    ftp_upstream_username: str = ""
    """The name on the backend for FTP logins; '' means :attr:`upstream_username`."""

    @property
    def backend_username(self) -> str:
        """The protocol-independent backend name (``upstream_username`` or the username)."""
        return self.upstream_username or self.username

    def backend_username_for(self, protocol: str) -> str:
        """The name the proxy logs in with on the backend for ``protocol`` (ssh or ftp)."""
        per_protocol = {"ssh": self.ssh_upstream_username,
                        "ftp": self.ftp_upstream_username}.get(protocol, "")
        return per_protocol or self.backend_username


@dataclass(frozen=True, slots=True)
class Site:
    """A hostname (or ``*.example.com`` wildcard) served for a tenant."""

    hostname: str
    tenant: str
    certificate_id: int | None = None
    https_redirect: bool = False
    hsts: bool = False
    cache_policy: dict[str, Any] = field(default_factory=dict, hash=False, compare=True)
    filters: dict[str, Any] = field(default_factory=dict, hash=False, compare=True)


@dataclass(frozen=True, slots=True)
class Certificate:
    """A certificate chain with its private key (decrypted only in memory)."""

    id: int
    fingerprint: str
    """SHA-256 of the leaf certificate's DER, lowercase hex."""
    names: tuple[str, ...]
    not_before: float
    not_after: float
    chain_pem: bytes
    key_pem: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class StoredCertificate:
    """A certificate row as stored: the private key still encrypted."""

    id: int
    fingerprint: str
    names: tuple[str, ...]
    not_before: float
    not_after: float
    chain_pem: bytes
    key_encrypted: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class Change:
    """One entry of the change feed: ``entity`` is account/tenant/host/site/certificate/purge/all."""

    id: int
    entity: str
    name: str


@dataclass(frozen=True, slots=True)
class ChangeRecord:
    """A change as operators see it (``edge changes list``): when, who, and what changed."""

    id: int
    entity: str
    name: str
    at: float
    """Unix time of the commit."""
    actor: str = ""
    """Who or what made it: ``cli:user@host``, ``api:<token name>``, ``bulk-load``, ..."""
    before: dict[str, Any] | None = field(default=None, hash=False, compare=True)
    """The changed fields before the write (None: the object did not exist)."""
    after: dict[str, Any] | None = field(default=None, hash=False, compare=True)
    """The changed fields after the write (None: the object was removed)."""
