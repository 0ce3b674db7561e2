"""edge.config: strict TOML validation naming ``[section] key``, listen parsing, precedence."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from edge.config import (
    DEFAULT_DATABASE_URL,
    EdgeConfig,
    ListenAddress,
    config_from_mapping,
    load_config,
)
from edge.errors import ConfigError


def test_empty_config_is_defaults() -> None:
    config = config_from_mapping({})
    assert config.database.url == DEFAULT_DATABASE_URL
    assert config.admin.listen == (ListenAddress("127.0.0.1", 9900),)
    assert config.http.listen == () and config.ssh.listen == ()
    assert config.cache == EdgeConfig().cache


def test_full_sections_are_typed() -> None:
    config = config_from_mapping({
        "database": {"url": "mysql://u:p@db:3306/edge", "pool_size": 4, "query_timeout": 1},
        "cache": {"ttl": 60, "negative_ttl": 5.5},
        "http": {"listen": ["127.0.0.1:0", "[::1]:8080", ":80"],
                 "trusted_proxies": ["10.0.0.0/8"]},
        "ftp": {"passive_ports": [40000, 40100]},
        "log": {"level": "debug", "format": "text"},
        "serve": {"workers": 4},
    })
    assert config.database.pool_size == 4
    assert config.database.query_timeout == 1.0 and isinstance(config.database.query_timeout,
                                                               float)
    assert config.cache.ttl == 60.0 and config.cache.negative_ttl == 5.5
    assert config.http.listen == (ListenAddress("127.0.0.1", 0), ListenAddress("::1", 8080),
                                  ListenAddress("0.0.0.0", 80))
    assert config.ftp.passive_ports == (40000, 40100)
    assert config.serve.workers == 4


@pytest.mark.parametrize(("text", "host", "port", "shown"), [
    ("127.0.0.1:8080", "127.0.0.1", 8080, "127.0.0.1:8080"),
    ("[::1]:0", "::1", 0, "[::1]:0"),
    ("[2001:db8::5]:443", "2001:db8::5", 443, "[2001:db8::5]:443"),
    (":22", "0.0.0.0", 22, "0.0.0.0:22"),
    ("localhost:65535", "localhost", 65535, "localhost:65535"),
])
def test_listen_parsing(text: str, host: str, port: int, shown: str) -> None:
    address = ListenAddress.parse(text)
    assert (address.host, address.port) == (host, port)
    assert str(address) == shown
    assert ListenAddress.parse(str(address)) == address


@pytest.mark.parametrize("text", ["127.0.0.1", "127.0.0.1:", "host:http", "host:65536",
                                  "host:-1", "[nothost]:80", "[::1]", ""])
def test_listen_refused(text: str) -> None:
    with pytest.raises(ValueError):
        ListenAddress.parse(text)
    with pytest.raises(ConfigError, match=r"\[admin\] listen"):
        config_from_mapping({"admin": {"listen": [text]}})


@pytest.mark.parametrize(("data", "message"), [
    ({"proxy": {}}, r"unknown section \[proxy\]"),
    ({"database": {"uri": "x"}}, r"unknown key \[database\] uri"),
    ({"cache": {"ttl_seconds": 1}}, r"unknown key \[cache\] ttl_seconds"),
    ({"database": "sqlite:///x"}, r"\[database\] must be a table"),
    ({"cache": {"ttl": "5"}}, r"\[cache\] ttl: expected a number"),
    ({"cache": {"ttl": True}}, r"\[cache\] ttl: expected a number"),
    ({"cache": {"ttl": -1}}, r"\[cache\] ttl: must not be negative"),
    ({"cache": {"refresh_window": -1}}, r"\[cache\] refresh_window: must not be negative"),
    ({"cache": {"ttl_spread": 1}}, r"\[cache\] ttl_spread: must be at least 0 and below 1"),
    ({"serve": {"workers": 2.5}}, r"\[serve\] workers: expected an integer"),
    ({"serve": {"workers": True}}, r"\[serve\] workers: expected an integer"),
    ({"serve": {"workers": 0}}, r"\[serve\] workers: must be at least 1"),
    ({"database": {"url": 5}}, r"\[database\] url: expected a string"),
    ({"http": {"listen": "127.0.0.1:80"}}, r"\[http\] listen: expected a list"),
    ({"http": {"listen": [80]}}, r"\[http\] listen: expected \"HOST:PORT\""),
    ({"http": {"trusted_proxies": ["10.0.0.0/33"]}}, r"\[http\] trusted_proxies"),
    ({"ftp": {"passive_ports": [50000]}}, r"\[ftp\] passive_ports: expected a list of 2"),
    ({"ftp": {"passive_ports": [100, 200]}}, r"\[ftp\] passive_ports: must be \[LOW, HIGH\]"),
    ({"ftp": {"passive_ports": [60000, 50000]}}, r"\[ftp\] passive_ports"),
    ({"log": {"level": "verbose"}}, r"\[log\] level: must be one of debug, info"),
    ({"log": {"format": "xml"}}, r"\[log\] format"),
])
def test_refused_config_names_section_and_key(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_from_mapping(data, "edge.toml")


def test_load_config_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml", env={})
    bad = tmp_path / "bad.toml"
    bad.write_text("[database\nurl = 1\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad, env={})
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("[cache]\nttll = 3\n")
    with pytest.raises(ConfigError, match=r"unknown.toml: unknown key \[cache\] ttll"):
        load_config(unknown, env={})


def test_precedence_flag_env_file(tmp_path: Path) -> None:
    file = tmp_path / "edge.toml"
    file.write_text('[database]\nurl = "sqlite:///from-file.db"\n[cache]\nttl = 7\n')
    other = tmp_path / "other.toml"
    other.write_text('[database]\nurl = "sqlite:///from-other.db"\n')

    assert load_config(env={}).source == "defaults"
    assert load_config(env={}).database.url == DEFAULT_DATABASE_URL
    # EDGE_CONFIG names the file when no path is given
    config = load_config(env={"EDGE_CONFIG": str(file)})
    assert (config.source, config.database.url, config.cache.ttl) == (
        str(file), "sqlite:///from-file.db", 7.0)
    # an explicit path beats EDGE_CONFIG
    assert load_config(other, env={"EDGE_CONFIG": str(file)}).database.url == (
        "sqlite:///from-other.db")
    # EDGE_DATABASE_URL beats the file, and keeps the file's other settings
    env = {"EDGE_CONFIG": str(file), "EDGE_DATABASE_URL": "sqlite:///from-env.db"}
    config = load_config(env=env)
    assert config.database.url == "sqlite:///from-env.db" and config.cache.ttl == 7.0
    # --database beats both
    assert load_config(env=env, database_url="sqlite:///from-flag.db").database.url == (
        "sqlite:///from-flag.db")
    # an empty variable does not count
    assert load_config(file, env={"EDGE_DATABASE_URL": ""}).database.url == (
        "sqlite:///from-file.db")


def test_process_environment_is_the_default(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    file = tmp_path / "edge.toml"
    file.write_text('[database]\nurl = "sqlite:///f.db"\n')
    monkeypatch.setenv("EDGE_CONFIG", str(file))
    monkeypatch.setenv("EDGE_DATABASE_URL", "sqlite:///e.db")
    assert load_config().database.url == "sqlite:///e.db"
    monkeypatch.delenv("EDGE_DATABASE_URL")
    assert load_config().database.url == "sqlite:///f.db"


def test_example_config_is_valid() -> None:
    example = Path(__file__).resolve().parent.parent / "config" / "edge.example.toml"
    config = load_config(example, env={})
    assert config.source == str(example)


def test_proxies_read_the_replica_when_one_is_configured() -> None:
    from edge.config import config_from_mapping

    primary = "mysql://edge@db1:3306/edge"
    assert config_from_mapping({"database": {"url": primary}}).database.read_url == primary
    replica = "mysql://edge@db2:3306/edge"
    config = config_from_mapping({"database": {"url": primary, "replica_url": replica}})
    assert config.database.read_url == replica and config.database.url == primary
