"""Prometheus metrics of the SSH proxy (multiprocess-safe, like :mod:`edge.metrics`).

Connections and bytes go into the shared ``edge_connections`` / ``edge_bytes`` with
``proxy="ssh"``; what only SSH has is defined here. Each is touched once per login or per
connection, never per packet.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

LOGINS = Counter(
    "edge_ssh_logins", "SSH login attempts by method and outcome.", ["method", "outcome"])
"""``method``: password, publickey, keyboard-interactive, none. ``outcome``: success, failure
(wrong credentials, unknown user or suspended tenant: one class on purpose), banned, maintenance,
unavailable (directory down, key not cached), upstream_error (backend down, host key refused),
limit (too many sessions for the user)."""

SESSIONS = Gauge(
    "edge_ssh_sessions", "Logged-in SSH connections open now, summed over workers.",
    multiprocess_mode="livesum")

UPSTREAM_CONNECT_SECONDS = Histogram(
    "edge_ssh_upstream_connect_seconds",
    "Time to connect and log in to the backend (TCP, key exchange, authentication).",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0))

DRAINED = Counter(
    "edge_ssh_drained_sessions", "Sessions closed because their tenant moved to another host.")

PATCH_ACTIVE = Gauge(
    "edge_ssh_patch_active",
    "1 if this fix to asyncssh internals applies to the installed asyncssh, else 0 (worst worker).",
    ["patch"], multiprocess_mode="livemin")
"""Set once per worker at start (:mod:`sshproxy.patches`); 0 means that fix is off (slower)."""

__all__ = ["DRAINED", "LOGINS", "PATCH_ACTIVE", "SESSIONS", "UPSTREAM_CONNECT_SECONDS"]
