"""Shared fixtures: the same directory tests run against SQLite and the real MariaDB.

MariaDB comes from ``$EDGE_TEST_MYSQL_URL`` (default ``mysql://root@127.0.0.1:3306/test``).
Each test gets its own freshly created database. When the server is unreachable the MySQL
variants are skipped on a developer machine but **fail** under ``CI=true``.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pymysql
import pytest

from edge.directory.secrets import KeyBox, generate_key
from edge.directory.service import DirectoryService
from edge.directory.store import SQLStore
from edge.directory.stores import store_for_url

MYSQL_URL = os.environ.get("EDGE_TEST_MYSQL_URL", "mysql://root@127.0.0.1:3306/test")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _mysql_admin() -> pymysql.connections.Connection:
    from edge.directory.mysql import parse_mysql_url

    args = parse_mysql_url(MYSQL_URL)
    return pymysql.connect(host=args["host"], port=args["port"], user=args["user"],
                           password=args["password"], connect_timeout=3, autocommit=True)


def mysql_unreachable_reason() -> str | None:
    try:
        _mysql_admin().close()
    except pymysql.err.MySQLError as exc:
        return f"MariaDB at {MYSQL_URL} unreachable: {exc}"
    return None


@pytest.fixture(scope="session")
def mysql_available() -> None:
    reason = mysql_unreachable_reason()
    if reason is not None:
        if IN_CI:
            pytest.fail(reason + " (CI=true: MariaDB tests must not be skipped)")
        pytest.skip(reason)


@pytest.fixture
def mysql_url(mysql_available: None) -> Iterator[str]:
    """URL of a fresh, empty MariaDB database, dropped after the test."""
    from edge.directory.mysql import parse_mysql_url

    name = "edge_test_" + uuid.uuid4().hex[:12]
    admin = _mysql_admin()
    with admin.cursor() as cursor:
        cursor.execute(f"CREATE DATABASE {name}")
    args = parse_mysql_url(MYSQL_URL)
    auth = args["user"] + (":" + args["password"] if args["password"] else "")
    yield f"mysql://{auth}@{args['host']}:{args['port']}/{name}"
    with admin.cursor() as cursor:
        cursor.execute(f"DROP DATABASE IF EXISTS {name}")
    admin.close()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'edge.sqlite3'}"


@pytest.fixture(params=["sqlite", pytest.param("mysql", marks=pytest.mark.mysql)])
def database_url(request: pytest.FixtureRequest) -> str:
    """Parametrised over both stores: every test using it runs on SQLite and on MariaDB."""
    if request.param == "sqlite":
        return str(request.getfixturevalue("sqlite_url"))
    return str(request.getfixturevalue("mysql_url"))


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[SQLStore]:
    """An opened, migrated store on each backend."""
    s = store_for_url(database_url)
    await s.open()
    await s.migrate()
    yield s
    await s.close()


@pytest.fixture
def secret_key() -> str:
    return generate_key()


@pytest.fixture
def keybox(secret_key: str) -> KeyBox:
    return KeyBox.from_text(secret_key)


@pytest.fixture
def service(store: SQLStore, keybox: KeyBox) -> DirectoryService:
    return DirectoryService(store, keybox)


@pytest.fixture(autouse=True, scope="session")
def _private_config_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The default secret key file lives under $XDG_CONFIG_HOME: tests (and the `edge`
    processes they start, which inherit the environment) use a private one, never read or
    create the real user's key."""
    old = os.environ.get("XDG_CONFIG_HOME")
    os.environ["XDG_CONFIG_HOME"] = str(tmp_path_factory.mktemp("config-home"))
    yield
    if old is None:
        os.environ.pop("XDG_CONFIG_HOME", None)
    else:
        os.environ["XDG_CONFIG_HOME"] = old
