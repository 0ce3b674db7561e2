"""Versioned schema migrations, one list for both dialects.

Each migration is a list of statements written once with ``{placeholders}`` for the few
type names that differ between SQLite and MySQL/MariaDB. ``edge init`` applies the ones a
database has not seen yet (recorded in ``schema_migrations``), so it is idempotent and safe to
run on every deploy. ``config/mysql-schema.sql`` is this file rendered for MySQL (``edge
schema --dialect mysql``); a test keeps the two in step.
"""

from __future__ import annotations

from typing import Literal

Dialect = Literal["sqlite", "mysql"]

_TYPES: dict[Dialect, dict[str, str]] = {
    "sqlite": {
        "pk": "INTEGER PRIMARY KEY AUTOINCREMENT",
        "name": "TEXT",
        "text": "TEXT",
        "blob": "BLOB",
        "bool": "INTEGER",
        "table_options": "",
        "label": "TEXT",
    },
    "mysql": {
        "pk": "BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY",
        "name": "VARCHAR(255) CHARACTER SET ascii COLLATE ascii_bin",
        "text": "MEDIUMTEXT",
        "blob": "MEDIUMBLOB",
        "bool": "TINYINT(1)",
        "table_options": " ENGINE=InnoDB DEFAULT CHARSET=utf8mb4",
        "label": "VARCHAR(255)",
    },
}

MIGRATIONS: list[tuple[int, str, list[str]]] = [
    (1, "tenant directory", [
        """CREATE TABLE hosts (
            id {pk},
            name {name} NOT NULL,
            address {name} NOT NULL,
            ssh_port INTEGER NOT NULL DEFAULT 22,
            ftp_port INTEGER NOT NULL DEFAULT 21,
            http_port INTEGER NOT NULL DEFAULT 80,
            https_port INTEGER NOT NULL DEFAULT 443,
            state VARCHAR(16) NOT NULL DEFAULT 'active',
            notice {text} NOT NULL,
            ssh_known_hosts {text} NOT NULL,
            ssh_insecure {bool} NOT NULL DEFAULT 0,
            send_proxy_protocol VARCHAR(4) NOT NULL DEFAULT 'off',
            backend_tls {bool} NOT NULL DEFAULT 0,
            UNIQUE (name)
        ){table_options}""",
        """CREATE TABLE tenants (
            id {pk},
            name {name} NOT NULL,
            host_id BIGINT NOT NULL REFERENCES hosts (id),
            state VARCHAR(16) NOT NULL DEFAULT 'active',
            previous_host_id BIGINT NULL REFERENCES hosts (id),
            drain_deadline DOUBLE NULL,
            UNIQUE (name)
        ){table_options}""",
        "CREATE INDEX tenants_host ON tenants (host_id)",
        """CREATE TABLE accounts (
            id {pk},
            username {name} NOT NULL,
            tenant_id BIGINT NOT NULL REFERENCES tenants (id),
            protocols VARCHAR(32) NOT NULL DEFAULT 'ssh,ftp',
            upstream_username {name} NOT NULL,
            authorized_keys {text} NOT NULL,
            UNIQUE (username)
        ){table_options}""",
        "CREATE INDEX accounts_tenant ON accounts (tenant_id)",
        """CREATE TABLE certificates (
            id {pk},
            fingerprint CHAR(64) NOT NULL,
            names {text} NOT NULL,
            not_before DOUBLE NOT NULL,
            not_after DOUBLE NOT NULL,
            chain_pem {blob} NOT NULL,
            key_encrypted {blob} NOT NULL,
            UNIQUE (fingerprint)
        ){table_options}""",
        """CREATE TABLE sites (
            id {pk},
            hostname {name} NOT NULL,
            tenant_id BIGINT NOT NULL REFERENCES tenants (id),
            certificate_id BIGINT NULL REFERENCES certificates (id),
            https_redirect {bool} NOT NULL DEFAULT 0,
            hsts {bool} NOT NULL DEFAULT 0,
            cache_policy {text} NOT NULL,
            filters {text} NOT NULL,
            UNIQUE (hostname)
        ){table_options}""",
        "CREATE INDEX sites_tenant ON sites (tenant_id)",
        """CREATE TABLE changes (
            id {pk},
            entity VARCHAR(16) NOT NULL,
            name {name} NOT NULL,
            created_at DOUBLE NOT NULL
        ){table_options}""",
    ]),
    # Per-protocol upstream usernames: an SSH login and an FTP login of the same account may
    # have different names on the backend (e.g. ``u123`` for SSH, ``u123.ftp`` for a virtual
    # FTP user). '' means "use upstream_username" (which itself defaults to the username).
    # Change rows say who changed what: ``actor`` (cli:user@host, api:token, bulk-load) and
    # ``detail`` (JSON {"before": {...}, "after": {...}} of the fields that changed).
    (2, "per-protocol upstream usernames; change actor and detail", [
        "ALTER TABLE accounts ADD COLUMN ssh_upstream_username {name} NOT NULL DEFAULT ''",
        "ALTER TABLE accounts ADD COLUMN ftp_upstream_username {name} NOT NULL DEFAULT ''",
        "ALTER TABLE changes ADD COLUMN actor {label} NOT NULL DEFAULT ''",
        "ALTER TABLE changes ADD COLUMN detail {text} NULL",
    ]),
    (3, "maintenance windows and operations", [
        "ALTER TABLE hosts ADD COLUMN maintenance_until DOUBLE NULL",
        # One row per long operation (a host drain); its plan is one row per step, so a
        # resumed run continues exactly where the last committed step left it.
        """CREATE TABLE operations (
            id {pk},
            kind VARCHAR(32) NOT NULL,
            target {name} NOT NULL,
            params {text} NOT NULL,
            state VARCHAR(16) NOT NULL,
            error {text} NOT NULL,
            created_at DOUBLE NOT NULL,
            updated_at DOUBLE NOT NULL
        ){table_options}""",
        "CREATE INDEX operations_target ON operations (kind, target)",
        """CREATE TABLE operation_steps (
            operation_id BIGINT NOT NULL REFERENCES operations (id),
            seq INTEGER NOT NULL,
            tenant {name} NOT NULL,
            to_host {name} NOT NULL,
            state VARCHAR(16) NOT NULL,
            done_at DOUBLE NULL,
            PRIMARY KEY (operation_id, seq)
        ){table_options}""",
    ]),
    (4, "admin api tokens and idempotency keys", [
        # Only a SHA-256 of each token is stored: tokens are 256 random bits, so a fast hash
        # is enough (nothing to brute-force), and a leaked database grants no API access.
        """CREATE TABLE api_tokens (
            id {pk},
            name {name} NOT NULL,
            token_sha256 CHAR(64) NOT NULL,
            scopes VARCHAR(64) NOT NULL,
            created_at DOUBLE NOT NULL,
            UNIQUE (name),
            UNIQUE (token_sha256)
        ){table_options}""",
        """CREATE TABLE api_idempotency (
            id {pk},
            token_name {name} NOT NULL,
            idem_key {name} NOT NULL,
            request_sha256 CHAR(64) NOT NULL,
            status INTEGER NOT NULL,
            response {text} NOT NULL,
            created_at DOUBLE NOT NULL,
            UNIQUE (token_name, idem_key)
        ){table_options}""",
    ]),
    (5, "acme certificates", [
        # One row per ACME account (CA): several CAs, tried by ascending priority.
        """CREATE TABLE acme_accounts (
            id {pk},
            name {name} NOT NULL,
            directory_url {text} NOT NULL,
            priority INTEGER NOT NULL DEFAULT 0,
            environment VARCHAR(16) NOT NULL DEFAULT 'production',
            key_encrypted {blob} NOT NULL,
            account_url {text} NOT NULL,
            eab_kid {text} NOT NULL,
            email {text} NOT NULL,
            failures INTEGER NOT NULL DEFAULT 0,
            next_attempt DOUBLE NOT NULL DEFAULT 0,
            last_error {text} NOT NULL,
            created_at DOUBLE NOT NULL,
            UNIQUE (name)
        ){table_options}""",
        # One row per name with automatic certificates: its state, back-off and the lease
        # that makes one edge process (of the whole fleet) work on it at a time.
        """CREATE TABLE acme_names (
            id {pk},
            hostname {name} NOT NULL,
            key_type VARCHAR(16) NOT NULL DEFAULT 'ec256',
            state VARCHAR(16) NOT NULL DEFAULT 'pending',
            certificate_id BIGINT NULL REFERENCES certificates (id),
            renew_at DOUBLE NOT NULL DEFAULT 0,
            failures INTEGER NOT NULL DEFAULT 0,
            next_attempt DOUBLE NOT NULL DEFAULT 0,
            last_error {text} NOT NULL,
            account {name} NOT NULL,
            orders INTEGER NOT NULL DEFAULT 0,
            lease_owner {name} NOT NULL,
            lease_until DOUBLE NOT NULL DEFAULT 0,
            updated_at DOUBLE NOT NULL,
            UNIQUE (hostname)
        ){table_options}""",
        "CREATE INDEX acme_names_due ON acme_names (next_attempt, renew_at)",
        # Pending challenge answers every edge worker serves: HTTP-01 by token, TLS-ALPN-01
        # by "tls-alpn-01:" + hostname.
        """CREATE TABLE acme_challenges (
            id {pk},
            token {name} NOT NULL,
            hostname {name} NOT NULL,
            key_authorization {text} NOT NULL,
            expires_at DOUBLE NOT NULL,
            UNIQUE (token)
        ){table_options}""",
    ]),
    (6, "acme on-demand budgets", [
        # Fleet-wide token buckets for on-demand issuance ("all", "tenant:NAME"): every worker
        # of every machine takes from the same row (edge/acme/ondemand.py).
        """CREATE TABLE acme_budgets (
            id {pk},
            name {name} NOT NULL,
            tokens DOUBLE NOT NULL,
            updated_at DOUBLE NOT NULL,
            taker {name} NOT NULL,
            UNIQUE (name)
        ){table_options}""",
    ]),
]

SCHEMA_VERSION = MIGRATIONS[-1][0]

MIGRATIONS_TABLE = {
    "sqlite": "CREATE TABLE IF NOT EXISTS schema_migrations "
              "(version INTEGER PRIMARY KEY, description TEXT NOT NULL, applied_at DOUBLE NOT NULL)",
    "mysql": "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER NOT NULL PRIMARY KEY, "
             "description VARCHAR(255) NOT NULL, applied_at DOUBLE NOT NULL) ENGINE=InnoDB",
}


def render(statement: str, dialect: Dialect) -> str:
    return statement.format(**_TYPES[dialect])


def render_all(dialect: Dialect) -> str:
    """The whole schema as a SQL script (what ``edge schema`` prints)."""
    lines = [f"-- hosting edge tenant directory, schema version {SCHEMA_VERSION} ({dialect})",
             "-- generated by `edge schema`; apply with `edge init` rather than by hand.", "",
             MIGRATIONS_TABLE[dialect] + ";"]
    for version, description, statements in MIGRATIONS:
        lines.append(f"\n-- migration {version}: {description}")
        lines.extend(render(s, dialect) + ";" for s in statements)
        lines.append(f"INSERT INTO schema_migrations VALUES ({version}, '{description}', 0);")
    return "\n".join(lines) + "\n"
