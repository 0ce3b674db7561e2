"""The local pebble that ``edge demo`` and the ACME tests start picks its ports free and binds
them moments later; on a busy machine a port can be taken in between."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from edge.acme import pebble as pebble_module
from edge.acme.pebble import Pebble

pytestmark = pytest.mark.skipif(not pebble_module.available() and not os.environ.get("CI"),
                                reason="pebble is not installed")


def test_a_port_taken_between_pick_and_bind_starts_pebble_on_new_ones(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Someone binds pebble's listening port after it was picked: pebble still comes up (on
    other ports) instead of `edge demo` failing with "address already in use"."""
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", 0))
    squatter.listen()
    taken = squatter.getsockname()[1]
    picks: list[int] = []
    real_free_port = pebble_module.free_port

    def first_pick_taken(kind: int = socket.SOCK_STREAM) -> int:
        port = taken if not picks else real_free_port(kind)
        picks.append(port)
        return port

    monkeypatch.setattr(pebble_module, "free_port", first_pick_taken)
    try:
        ca = Pebble(tmp_path / "pebble", http_port=real_free_port(), tls_port=real_free_port())
        try:
            assert ca.port != taken and picks[0] == taken
            assert ca.root_pem().startswith(b"-----BEGIN CERTIFICATE-----")
        finally:
            ca.stop()
    finally:
        squatter.close()
