"""Open a store from a database URL (the only place that knows the URL schemes)."""

from __future__ import annotations

from edge.config import DatabaseConfig
from edge.directory.store import SQLStore
from edge.errors import ConfigError


def store_for_url(url: str, config: DatabaseConfig | None = None) -> SQLStore:
    """A store (not yet opened) for ``sqlite:///path`` or ``mysql://user:pass@host:port/db``."""
    config = config or DatabaseConfig(url=url)
    if url.startswith("sqlite:///"):
        from edge.directory.sqlite import SQLiteStore

        return SQLiteStore(url[len("sqlite:///"):] or ":memory:")
    if url.startswith(("mysql://", "mariadb://")):
        from edge.directory.mysql import MySQLStore

        return MySQLStore(url, pool_size=config.pool_size,
                          connect_timeout=config.connect_timeout,
                          query_timeout=config.query_timeout)
    raise ConfigError(f"database url {url!r}: expected sqlite:///PATH or "
                      "mysql://user:pass@host:port/database")


def read_store(config: DatabaseConfig) -> SQLStore:
    """The store the proxies read from: the primary, or the replica with the primary as its
    fallback (:class:`edge.directory.replica.ReplicaStore`)."""
    if not config.replica_url:
        return store_for_url(config.url, config)
    from edge.directory.replica import ReplicaStore

    return ReplicaStore(store_for_url(config.replica_url, config), store_for_url(config.url, config),
                        fallback=config.replica_fallback)
