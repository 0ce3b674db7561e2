"""Edge configuration: one TOML file, strictly validated.

Every setting has a safe default (so an empty file is a valid configuration that serves
nothing but the loopback admin listener), every key is typed, and an unknown key or a bad
value is a :class:`~edge.errors.ConfigError` naming ``[section] key``. Proxy packages read
their own section from :class:`EdgeConfig`; adding a setting means adding a field here and a
line in ``config/edge.example.toml``.

Precedence: command-line flags > environment (``EDGE_CONFIG``, ``EDGE_DATABASE_URL``,
``EDGE_SECRET_KEY``) > file > defaults.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge.errors import ConfigError

DEFAULT_DATABASE_URL = "sqlite:///edge.sqlite3"


@dataclass(frozen=True, slots=True)
class ListenAddress:
    """One ``HOST:PORT`` a listener binds; port 0 picks a free port (tests)."""

    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> ListenAddress:
        """Parse ``"127.0.0.1:8080"``, ``"[::1]:8080"`` or ``":8080"`` (all addresses)."""
        host, sep, port_text = text.rpartition(":")
        if not sep or not port_text.isdigit():
            raise ValueError(f"{text!r} is not HOST:PORT")
        port = int(port_text)
        if not 0 <= port <= 65535:
            raise ValueError(f"port {port} in {text!r} is out of range 0-65535")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
            ipaddress.IPv6Address(host)
        host = host or "0.0.0.0"
        return cls(host, port)

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class DatabaseConfig:
    url: str = DEFAULT_DATABASE_URL
    """``sqlite:///path`` (embedded default) or ``mysql://user:pass@host:port/db``."""
    replica_url: str = ""
    """Optional read replica the proxies use for lookups *and* the change feed."""
    replica_fallback: str = "primary"
    """When the replica fails: ``"primary"`` reads from ``url`` until the replica answers and
    has caught up; ``"stale"`` serves what the workers hold in memory (the primary never sees
    the proxies' reads). See :mod:`edge.directory.replica`."""
    pool_size: int = 10
    connect_timeout: float = 3.0
    query_timeout: float = 2.0

    @property
    def read_url(self) -> str:
        """Where the proxies read. The change feed must read the same database as the lookups:
        a change row replicates in order with the rows it describes, so a worker that sees
        change N on the replica also reads the new rows there — never an eviction followed by
        a reload of the old row from a lagging replica. Writes (the CLI) always use ``url``."""
        return self.replica_url or self.url


@dataclass(frozen=True, slots=True)
class SecretsConfig:
    key: str = ""
    """Base64 (url-safe) 256-bit AES-GCM key for private keys at rest. Prefer key_file or env."""
    key_file: str = ""
    key_env: str = "EDGE_SECRET_KEY"
    previous_key_files: tuple[str, ...] = ()
    """Files of keys that are being rotated out: accepted for decrypting what they encrypted,
    never used to encrypt (``edge secret rotate`` re-encrypts every stored key with the current
    one; then remove them). See docs/operations.md, "Rotate the secret key"."""


@dataclass(frozen=True, slots=True)
class AdminConfig:
    listen: tuple[ListenAddress, ...] = (ListenAddress("127.0.0.1", 9900),)


@dataclass(frozen=True, slots=True)
class ApiConfig:
    """``edge admin serve``: the admin HTTP API and web console (a process of its own)."""

    listen: tuple[ListenAddress, ...] = (ListenAddress("127.0.0.1", 9901),)
    certificate_file: str = ""
    """PEM chain for HTTPS; required when any listen address is not loopback (tokens and
    the console cookie must not cross a network in clear text)."""
    key_file: str = ""
    """PEM private key for certificate_file ("" = the key is in certificate_file)."""

    def __post_init__(self) -> None:
        if self.key_file and not self.certificate_file:
            raise ConfigError("[api] key_file: set certificate_file too")
        exposed = [str(a) for a in self.listen if not is_loopback(a.host)]
        if exposed and not self.certificate_file:
            raise ConfigError(f"[api] listen: {', '.join(exposed)} is not loopback; set "
                              "certificate_file (and key_file) so the API is served over TLS")


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost``: addresses no other machine can reach."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True, slots=True)
class ServeConfig:
    workers: int = 1
    grace_period: float = 30.0
    """Seconds SIGTERM waits for open sessions before closing them."""
    maintenance_drain: float = 300.0
    """Seconds open SSH/FTP sessions on a host put in maintenance are kept before they are
    closed with the host's notice (see edge.sessionpolicy)."""
    watchdog_timeout: float = 30.0
    """Seconds a worker may leave the master's pings on its control socket unanswered before
    it is killed and restarted (0 = never): a hung worker keeps its share of new connections
    (its SO_REUSEPORT socket) waiting forever otherwise."""

    def __post_init__(self) -> None:
        if self.watchdog_timeout < 0:
            raise ConfigError("[serve] watchdog_timeout: must be 0 (off) or more seconds; got "
                              f"{self.watchdog_timeout!r}")


@dataclass(frozen=True, slots=True)
class CacheConfig:
    max_entries: int = 200_000
    """Per kind (accounts, tenants, hosts, sites, certificates)."""
    ttl: float = 300.0
    """Seconds a positive answer is trusted without the change feed (a safety net)."""
    negative_ttl: float = 30.0
    stale_if_error: float = 86_400.0
    """Seconds past expiry an answer is still served while the directory is unreachable."""
    refresh_window: float = 60.0
    """Seconds past expiry an answer in use is still served while one background query
    refreshes it (0 = a request whose answer expired waits for the directory)."""
    ttl_spread: float = 0.1
    """Answers loaded together expire spread over the last this-fraction of `ttl` (0 = exactly `ttl`)."""

    change_poll_interval: float = 1.0
    max_certificates: int = 10_000
    probe_interval: float = 0.5
    """Seconds before the first probe of a directory that failed (circuit breaker open)."""
    probe_interval_max: float = 30.0
    """Probes back off (doubling) up to this many seconds apart while it stays down."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.ttl_spread < 1.0:
            raise ConfigError(f"[cache] ttl_spread: must be at least 0 and below 1; got {self.ttl_spread!r}")
        if not 0.0 < self.probe_interval <= self.probe_interval_max:
            raise ConfigError("[cache] probe_interval: must be above 0 and at most "
                              f"probe_interval_max; got {self.probe_interval!r}, "
                              f"{self.probe_interval_max!r}")


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    max_failures_per_ip: int = 10
    max_failures_per_user: int = 5
    """Failures for one username (any addresses) before its password logins are slowed."""
    max_failures_per_ip_user: int = 5
    """Failures for one username from one address before that pair is banned."""
    user_slowdown_max: float = 8.0
    """Cap in seconds of the per-user slowdown (1, 2, 4 ... s per further failure)."""
    failure_delay_max: float = 10.0
    """Cap in seconds of the failure deadline learned from backends' refusal times."""
    failure_window: float = 300.0
    ban_seconds: float = 600.0
    max_unauthenticated_per_ip: int = 20
    max_connections_per_ip: int = 200
    login_grace_time: float = 30.0


@dataclass(frozen=True, slots=True)
class ProxyListenerConfig:
    listen: tuple[ListenAddress, ...] = ()
    """Empty means this proxy is off."""
    trusted_proxies: tuple[str, ...] = ()
    """CIDRs of load balancers allowed to send a PROXY protocol header."""
    idle_timeout: float = 600.0


@dataclass(frozen=True, slots=True)
class HttpConfig(ProxyListenerConfig):
    """HTTP request handling; also read by the [https] listener (same engine)."""

    max_header_size: int = 32768
    """Bytes of request line + headers; more is refused with 431."""
    max_body_size: int = 104_857_600
    """Bytes of request body; a larger Content-Length (or streamed body) gets 413. 0 = no limit."""
    header_timeout: float = 10.0
    """Seconds to receive a whole request head once it started (slowloris) → 408."""
    keepalive_timeout: float = 75.0
    """Seconds an idle client keep-alive connection is kept between requests (a new connection
    gets ``header_timeout`` for its first byte)."""
    max_connections_per_ip: int = 256
    """Open client connections (plain and TLS together, per worker) from one client address,
    after PROXY protocol; more are answered 429 and closed. 0 = no cap."""
    backend_connect_timeout: float = 5.0
    backend_timeout: float = 60.0
    """Seconds without any byte from the backend while a response is due → 504."""
    pool_size: int = 64
    """Idle keep-alive connections kept per backend host and port, per worker."""
    pool_idle_timeout: float = 30.0
    cache_max_bytes: int = 268_435_456
    """Content-cache size per worker (bytes, LRU); 0 disables the cache for every site."""
    error_page_brand: str = "hosting edge"
    """Name shown at the bottom of the proxy's own error pages."""
    access_log: str = ""
    """"" = access log through the edge logger (JSON lines); a path = buffered JSON-lines file;
    "off" = none."""
    backend_ca_file: str = ""
    """PEM CA bundle that verifies backends of hosts with backend_tls; "" = the system CAs."""
    allow_trace: bool = False
    """Forward TRACE requests; false (default) answers them 405 (TRACE echoes cookies and
    Authorization back to the page that sent it: cross-site tracing)."""
    h2c: bool = False
    """Serve HTTP/2 with prior knowledge (cleartext) on the plain listener too, next to HTTP/1
    (not together with trusted_proxies: the PROXY header comes first there)."""
    h2_max_concurrent_streams: int = 100
    """HTTP/2 streams open at once per connection (SETTINGS_MAX_CONCURRENT_STREAMS); more are
    refused (RST_STREAM REFUSED_STREAM)."""
    h2_stream_window: int = 262_144
    """Request body bytes a client may send per HTTP/2 stream before the backend took them
    (SETTINGS_INITIAL_WINDOW_SIZE; the connection window is this times the stream limit)."""
    h2_stream_buffer: int = 65_536
    """Response bytes queued per HTTP/2 stream for a client whose window is full, before reading
    from that stream's backend pauses (a slow reader never makes the edge hold a response)."""
    h2_reset_burst: int = 200
    h2_reset_rate: int = 33
    """Token bucket on streams a client resets (burst, per second); past it the connection ends
    with GOAWAY ENHANCE_YOUR_CALM (rapid reset, CVE-2023-44487)."""
    h2_max_outbound_ack: int = 1000
    """SETTINGS/PING acknowledgements queued for a client that does not read them before its
    connection ends, and the burst of SETTINGS/PING frames a connection may send at once
    (SETTINGS and PING floods)."""
    h2_control_rate: int = 100
    """SETTINGS/PING frames per second a connection may send after that burst; past it GOAWAY."""


@dataclass(frozen=True, slots=True)
class HttpsConfig(ProxyListenerConfig):
    handshake_timeout: float = 10.0
    """Seconds from accept to an established TLS session (ClientHello, lookup, handshake)."""
    context_cache_size: int = 1000
    """SSLContexts kept per worker (one per certificate; ~20 KiB and ~1 ms to build each)."""
    http2: bool = True
    """Offer HTTP/2 (ALPN ``h2``) next to ``http/1.1``; false offers HTTP/1.1 only."""
    default_certificate: str = ""
    """Served for no SNI / unknown SNI / a site without certificate: a site hostname or a
    certificate id (digits). "" refuses those handshakes with the alert unrecognized_name."""
    max_client_hello: int = 16384
    """Bytes a ClientHello (with its record headers) may take; a bigger one is refused."""
    min_tls_version: str = "1.2"
    """"1.2" or "1.3"."""
    ciphers: str = "ECDHE+AESGCM:ECDHE+CHACHA20"
    """OpenSSL cipher list for TLS 1.2 (TLS 1.3 suites are OpenSSL's, all AEAD)."""
    session_tickets: bool = False
    """Issue session tickets. Off (Mozilla's advice): Python cannot set or rotate ticket keys,
    so they would be per worker and live as long as it (no forward secrecy for resumed
    sessions). TLS 1.2 sessions still resume from each worker's session-ID cache."""
    session_cache_size: int = 256
    """TLS sessions kept for resumption per certificate context and worker (OpenSSL's default,
    20,480, times context_cache_size contexts could pin hundreds of MiB under a flood)."""
    groups: tuple[str, ...] = ("X25519MLKEM768", "X25519", "P-256", "P-384")
    """Key-exchange groups offered, preferred first (OpenSSL names). X25519MLKEM768 is left
    out where OpenSSL lacks it (before 3.5); any other unknown name is a startup error."""
    max_pending_handshakes: int = 10000
    """Connections per worker still before an established TLS session; more are closed."""
    defer_accept: bool = True
    """TCP_DEFER_ACCEPT: the kernel accepts a connection once its ClientHello arrived."""

    def __post_init__(self) -> None:
        # Checked here (not in the generic _check) so the TLS rules stay in one section.
        import ssl

        if self.min_tls_version not in ("1.2", "1.3"):
            raise ConfigError(f'[https] min_tls_version: must be "1.2" or "1.3"; got '
                              f"{self.min_tls_version!r}")
        if self.context_cache_size < 1:
            raise ConfigError("[https] context_cache_size: must be at least 1")
        if self.session_cache_size < 1:
            raise ConfigError("[https] session_cache_size: must be at least 1")
        if self.max_client_hello < 512:
            raise ConfigError("[https] max_client_hello: must be at least 512 bytes "
                              "(real ClientHellos are 200-2000 bytes)")
        from edge.directory.names import hostname_or_none

        default = self.default_certificate
        if default and not default.isdigit() and hostname_or_none(default) is None:
            raise ConfigError(f"[https] default_certificate: {default!r} is neither a site "
                              "hostname nor a certificate id")
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).set_ciphers(self.ciphers)
        except ssl.SSLError:
            raise ConfigError(f"[https] ciphers: OpenSSL accepts no cipher in "
                              f"{self.ciphers!r}") from None


@dataclass(frozen=True, slots=True)
class SshConfig(ProxyListenerConfig):
    host_key_dir: str = "ssh_host_keys"
    """Proxy host keys (ssh_host_{ed25519,ecdsa,rsa}_key) written by `edge init`; shared by the fleet."""
    upstream_key_file: str = ""
    """Private key the proxy logs in upstream with after public-key auth; "" = <host_key_dir>/upstream_key."""
    upstream_key_dir: str = ""
    """Optional per-host upstream keys: <dir>/<host name> overrides upstream_key_file for that host."""
    user_ca_keys: str = ""
    """File of CA public keys whose OpenSSH user certificates are accepted ("" = certificates off)."""
    upstream_connect_timeout: float = 10.0
    """Seconds a backend gets for its handshake (TCP, banner, key exchange), and again from a
    credential being known to its answer; then the client hears "backend unavailable"."""
    auth_failure_delay: float = 1.0
    """Every failed login answers after at least this long, whatever the cause (no user enumeration)."""
    max_sessions_per_user: int = 10
    """Concurrent logged-in connections per account (per worker process)."""
    allow_local_forwarding: bool = False
    """`ssh -L` through the proxy, only ever to the backend's own loopback (sshproxy/bridge.py)."""
    allow_remote_forwarding: bool = False
    """`ssh -R`: a listener on the backend (per its sshd's GatewayPorts), brought back to the client."""
    allow_agent_forwarding: bool = False
    """`ssh -A`: the backend may ask the client's ssh-agent for signatures while the client is connected."""
    env_allow: tuple[str, ...] = ("LANG", "LC_*")
    """AcceptEnv-style patterns of client environment variables passed to the backend."""
    client_env_name: str = "EDGE_CLIENT_ADDR"
    """Env var carrying "client-ip client-port" to the backend (its sshd must AcceptEnv it); "" = off."""


@dataclass(frozen=True, slots=True)
class FtpConfig(ProxyListenerConfig):
    passive_ports: tuple[int, int] = (50000, 50999)
    masquerade_address: str = ""
    """IPv4 address put in PASV replies; "" = the address the client connected to."""
    certificate_file: str = ""
    """PEM chain of the proxy's own FTPS certificate; "" = no AUTH TLS (plain FTP only)."""
    key_file: str = ""
    """PEM private key for certificate_file ("" = the key is in certificate_file)."""
    require_tls: bool = False
    """Refuse USER before AUTH TLS (needs certificate_file)."""
    data_connect_timeout: float = 30.0
    """Seconds a client has to open the data connection after PASV/EPSV (and for PORT/EPRT)."""
    transfer_timeout: float = 300.0
    """Seconds a data transfer may make no progress before it is aborted (426)."""
    backend_connect_timeout: float = 10.0
    """Seconds to reach a backend host and get its 220 greeting (then the login gets 421)."""
    login_failure_delay: float = 2.0
    """Every failed login answers 530 no sooner than this after PASS, known user or not."""
    backend_tls_verify: bool = True
    """Verify FTPS backends' certificates (hosts with backend_tls) against backend_ca_file."""
    backend_ca_file: str = ""
    """CA bundle for backend certificates; "" = the system's trust store."""
    backend_reply_timeout: float = 60.0
    """Seconds the proxy waits for a backend's answer to a command (then 421, session ends)."""

    def __post_init__(self) -> None:
        if self.require_tls and not self.certificate_file:
            raise ConfigError("[ftp] require_tls: needs certificate_file (the proxy's FTPS certificate)")
        if self.key_file and not self.certificate_file:
            raise ConfigError("[ftp] key_file: set certificate_file too")
        if self.masquerade_address:
            try:
                ipaddress.IPv4Address(self.masquerade_address)
            except ValueError:
                raise ConfigError(f"[ftp] masquerade_address: {self.masquerade_address!r} is not an "
                                  "IPv4 address (PASV replies can only carry IPv4)") from None
        for name in ("data_connect_timeout", "transfer_timeout", "backend_connect_timeout",
                     "backend_reply_timeout"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"[ftp] {name}: must be greater than 0")


@dataclass(frozen=True, slots=True)
class LogConfig:
    level: str = "info"
    format: str = "json"
    asyncssh_level: str = "warning"
    """asyncssh logs exec commands, subsystem names and env values at INFO/DEBUG: those lines
    can carry a user's credentials (``ssh host 'mysql -pSECRET'``), so they stay off unless an
    operator lowers this for debugging."""


@dataclass(frozen=True, slots=True)
class AcmeConfig:
    """Automatic certificates (edge.acme, docs/tls.md "Automatic certificates")."""

    enabled: bool = False
    """Run the issuance/renewal loop in the master of ``edge serve``."""
    environment: str = "production"
    """Use the ACME accounts of this environment: ``production`` or ``staging``."""
    challenge: str = "http-01"
    """The challenge type answered first: ``http-01`` or ``tls-alpn-01``."""
    ca_file: str = ""
    """Extra CA certificates (PEM) trusted for ACME directories (a private CA, pebble)."""
    poll_interval: float = 10.0
    """Seconds between looks for due names."""
    concurrency: int = 4
    """Orders in flight at once per edge process."""
    lease_seconds: float = 300.0
    """How long one process owns a name while it works on it (the fleet-wide lock)."""
    order_timeout: float = 90.0
    """Seconds an order may take (validation + finalisation) before it counts as failed."""
    renew_fraction: float = 2 / 3
    """Renew once this fraction of the lifetime has passed (unless the CA's ARI says other)."""
    auto_cert_new_sites: bool = False
    """Policy: ``edge site add`` marks every new site (not wildcards) ``--auto-cert``."""
    on_demand: bool = False
    """Issue at the first TLS handshake for a site in the directory without a certificate."""
    on_demand_wait: float = 10.0
    """Longest a first client waits for its on-demand certificate (then: alert)."""
    on_demand_per_tenant: float = 10.0
    on_demand_total: float = 60.0
    """On-demand orders per minute, per tenant and in total, fleet-wide (directory buckets)."""
    backoff_base: float = 60.0
    backoff_max: float = 86_400.0
    """Back-off after failures: base * 2^(failures-1), at most max, per name and per account."""


@dataclass(frozen=True, slots=True)
class EdgeConfig:
    """The whole configuration; sections mirror the TOML tables."""

    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    secrets: SecretsConfig = field(default_factory=SecretsConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    https: HttpsConfig = field(default_factory=HttpsConfig)
    ssh: SshConfig = field(default_factory=SshConfig)
    ftp: FtpConfig = field(default_factory=FtpConfig)
    log: LogConfig = field(default_factory=LogConfig)
    acme: AcmeConfig = field(default_factory=AcmeConfig)
    source: str = ""
    """Where this configuration came from (file path or "defaults"); not a TOML key."""

    def replace(self, **changes: Any) -> EdgeConfig:
        return dataclasses.replace(self, **changes)


_CHOICES: dict[tuple[str, str], tuple[str, ...]] = {
    ("database", "replica_fallback"): ("primary", "stale"),
    ("log", "level"): ("debug", "info", "warning", "error"),
    ("log", "format"): ("json", "text"),
    ("log", "asyncssh_level"): ("debug", "info", "warning", "error"),
    ("acme", "environment"): ("production", "staging"),
    ("acme", "challenge"): ("http-01", "tls-alpn-01"),
}
_SECTIONS: dict[str, type] = {f.name: f.type for f in dataclasses.fields(EdgeConfig) if f.name != "source"}  # type: ignore[misc]


def _section_types() -> dict[str, type]:
    hints = typing.get_type_hints(EdgeConfig)
    return {name: hints[name] for name in _SECTIONS}


def _coerce(where: str, hint: Any, value: Any) -> Any:
    """Convert a TOML value to the field's type or raise ValueError saying what was expected."""
    origin = typing.get_origin(hint)
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError(f"expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ValueError(f"expected a string, got {value!r}")
        return value
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, list):
            raise ValueError(f"expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(where, args[0], item) for item in value)
        if len(value) != len(args):
            raise ValueError(f"expected a list of {len(args)} items, got {value!r}")
        return tuple(_coerce(where, a, v) for a, v in zip(args, value, strict=True))
    if hint is ListenAddress:
        if not isinstance(value, str):
            raise ValueError(f"expected \"HOST:PORT\", got {value!r}")
        return ListenAddress.parse(value)
    if origin in (types.UnionType, typing.Union):
        raise ValueError("union types are not supported in config")
    raise ValueError(f"unsupported type {hint!r}")


def _check(section: str, key: str, value: Any) -> None:
    choices = _CHOICES.get((section, key))
    if choices and value not in choices:
        raise ValueError(f"must be one of {', '.join(choices)}; got {value!r}")
    if isinstance(value, int | float) and not isinstance(value, bool) and value < 0:
        raise ValueError(f"must not be negative; got {value!r}")
    if (section, key) == ("serve", "workers") and value < 1:
        raise ValueError("must be at least 1")
    if key == "trusted_proxies":
        for cidr in value:
            ipaddress.ip_network(cidr, strict=False)
    if (section, key) == ("ftp", "passive_ports") and not 1024 <= value[0] <= value[1] <= 65535:
        raise ValueError("must be [LOW, HIGH] with 1024 <= LOW <= HIGH <= 65535")


def config_from_mapping(data: dict[str, Any], source: str = "<mapping>") -> EdgeConfig:
    """Build a validated :class:`EdgeConfig` from parsed TOML.

    Raises :class:`ConfigError` naming ``[section] key`` for an unknown key or a bad value.
    """
    section_types = _section_types()
    sections: dict[str, Any] = {}
    for section, table in data.items():
        if section not in section_types:
            known = ", ".join(sorted(section_types))
            raise ConfigError(f"{source}: unknown section [{section}] (known: {known})")
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: [{section}] must be a table")
        cls = section_types[section]
        hints = typing.get_type_hints(cls)
        values: dict[str, Any] = {}
        for key, raw in table.items():
            if key not in hints:
                known = ", ".join(sorted(hints))
                raise ConfigError(f"{source}: unknown key [{section}] {key} (known: {known})")
            try:
                value = _coerce(f"[{section}] {key}", hints[key], raw)
                _check(section, key, value)
            except ValueError as exc:
                raise ConfigError(f"{source}: [{section}] {key}: {exc}") from None
            values[key] = value
        sections[section] = cls(**values)
    return EdgeConfig(**sections, source=source)


def load_config(path: str | os.PathLike[str] | None = None, *, database_url: str | None = None,
                env: typing.Mapping[str, str] | None = None) -> EdgeConfig:
    """Load the configuration the way every ``edge`` command does.

    ``path`` falls back to ``$EDGE_CONFIG``; with neither, defaults are used. ``database_url``
    (the ``--database`` flag) beats ``$EDGE_DATABASE_URL`` which beats ``[database] url``.
    """
    env = os.environ if env is None else env
    path = path or env.get("EDGE_CONFIG") or None
    if path is not None:
        file = Path(path)
        try:
            data = tomllib.loads(file.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {file} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{file}: not valid TOML: {exc}") from None
        config = config_from_mapping(data, str(file))
    else:
        config = EdgeConfig(source="defaults")
    url = database_url or env.get("EDGE_DATABASE_URL")
    if url:
        config = config.replace(database=dataclasses.replace(config.database, url=url))
    return config
