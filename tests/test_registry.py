"""The proxy registry: precedence, one-line errors, which listeners are enabled."""

from __future__ import annotations

import pytest

from edge import registry
from edge.config import EdgeConfig, ListenAddress, config_from_mapping
from edge.errors import ConfigError
from edge.registry import (
    BUILTIN,
    OVERRIDES_ENV,
    Proxy,
    ProxyContext,
    ProxyNotAvailable,
    enabled_listeners,
    load_proxy,
    proxy_targets,
    register,
)


def test_builtin_targets_are_lazy_strings() -> None:
    assert set(BUILTIN) == {"http", "https", "ssh", "ftp"}
    assert all(":" in target for target in BUILTIN.values())
    import subprocess
    import sys

    # Importing the core (registry, serve, CLI) must not import any proxy package; checked in a
    # fresh interpreter because other tests in this process import the proxies.
    code = ("import sys, edge.registry, edge.serve, edge.cli.main; print(sorted(m for m in "
            "sys.modules if m.partition('.')[0] in ('sshproxy', 'ftpproxy', 'httpproxy')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_precedence_builtin_register_env() -> None:
    env = {OVERRIDES_ENV: "ssh=tests.echo_proxy:EchoProxy, extra=a.b:C"}
    try:
        register("ftp", "tests.echo_proxy:EchoProxy")
        targets = proxy_targets(env)
        assert targets["ssh"] == "tests.echo_proxy:EchoProxy"
        assert targets["ftp"] == "tests.echo_proxy:EchoProxy"
        assert targets["extra"] == "a.b:C"
        assert targets["http"] == BUILTIN["http"]
    finally:
        register("ftp", None)
    assert proxy_targets({})["ftp"] == BUILTIN["ftp"]


def test_bad_target_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="module:Class"):
        register("ssh", "no_colon")
    with pytest.raises(ConfigError):
        proxy_targets({OVERRIDES_ENV: "ssh=bad"})


def test_missing_module_names_the_section() -> None:
    with pytest.raises(ProxyNotAvailable) as info:
        load_proxy("http", "httpproxy.not_built_yet:HttpProxy")
    message = str(info.value)
    assert message.startswith("[http] listen is set but the http proxy is not installed/built yet")
    assert "\n" not in message
    with pytest.raises(ProxyNotAvailable, match="not installed/built yet"):
        load_proxy("ssh", "tests.echo_proxy:NoSuchClass")


def test_echo_proxy_satisfies_the_protocol() -> None:
    cls = load_proxy("ssh", "tests.echo_proxy:EchoProxy")
    assert isinstance(cls, type)
    for name in ("start", "drain", "wait_closed", "close", "active_sessions"):
        assert callable(getattr(cls, name))
    assert issubclass(cls, Proxy)  # runtime_checkable: methods present


def test_enabled_listeners_and_only() -> None:
    config = config_from_mapping({"ssh": {"listen": ["127.0.0.1:2222"]},
                                  "http": {"listen": ["127.0.0.1:8080"]}})
    assert enabled_listeners(config) == {"http": (ListenAddress("127.0.0.1", 8080),),
                                         "ssh": (ListenAddress("127.0.0.1", 2222),)}
    assert list(enabled_listeners(config, {"ssh", "ftp"})) == ["ssh"]
    assert enabled_listeners(EdgeConfig()) == {}
    with pytest.raises(ConfigError, match="unknown proxy smtp"):
        enabled_listeners(config, {"smtp"})


def test_context_fields() -> None:
    names = {f for f in ProxyContext.__dataclass_fields__}
    assert {"config", "directory", "feed", "keybox", "worker_id", "logger"} <= names
    assert registry.ENTRY_POINT_GROUP == "edge.proxies"
