"""Prometheus metrics of the HTTPS accept loop (prometheus_client multiprocess mode, like
:mod:`edge.metrics`). One ``inc``/``observe`` per handshake; cache counters are copied from
plain integers once a second by :meth:`httpproxy.tls_server.HttpsProxy.export_metrics`."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

HANDSHAKES = Counter(
    "edge_https_handshakes", "TLS connections by how the handshake ended.", ["outcome"])
"""``outcome``: ok, default_certificate (ok, served the [https] default_certificate),
unrecognized_name (no site/certificate for the SNI: alert 112), plain_http (answered 400),
bad_hello (malformed or oversized ClientHello: alert), protocol_version (the client offers
no TLS version >= [https] min_tls_version: alert), tls_error (OpenSSL refused the
handshake), timeout, closed (client left before finishing), unavailable (directory down and
SNI not cached: alert internal_error), certificate_error (stored certificate unusable),
proxy_header (bad PROXY protocol header from a trusted peer), overloaded
([https] max_pending_handshakes reached), per_ip_cap (the client address already has
[http] max_connections_per_ip connections in the handshake: closed at once), on_demand (ok,
with a certificate issued at this handshake), on_demand_failed (no on-demand certificate in
time: alert internal_error), acme_tls_alpn (a CA's TLS-ALPN-01 validation handshake)."""

OUTCOMES = ("ok", "default_certificate", "unrecognized_name", "plain_http", "bad_hello",
            "protocol_version", "tls_error", "timeout", "closed", "unavailable",
            "certificate_error", "proxy_header", "overloaded", "per_ip_cap", "on_demand",
            "on_demand_failed", "acme_tls_alpn")

HANDSHAKE_SECONDS = Histogram(
    "edge_https_handshake_seconds",
    "Seconds from accept to an established TLS session (ClientHello, lookup, handshake).",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0))

CONTEXT_CACHE = Counter(
    "edge_https_context_cache", "SSLContext cache lookups by result (hit, miss).", ["result"])

CONTEXT_CACHE_ENTRIES = Gauge(
    "edge_https_context_cache_entries", "SSLContexts held, summed over workers.",
    multiprocess_mode="livesum")

PENDING_HANDSHAKES = Gauge(
    "edge_https_pending_handshakes", "Connections before an established TLS session, summed "
    "over workers.", multiprocess_mode="livesum")

__all__ = ["CONTEXT_CACHE", "CONTEXT_CACHE_ENTRIES", "HANDSHAKES", "HANDSHAKE_SECONDS", "OUTCOMES",
           "PENDING_HANDSHAKES"]
