"""Prometheus metrics of the FTP proxy (``edge_ftp_*``); see :mod:`edge.metrics` for the
multiprocess rules. Connections and bytes go to the shared ``edge_connections`` /
``edge_bytes`` counters (``proxy="ftp"``); these add what only FTP has. Every ``inc`` here
happens once per login, transfer or refusal, never per chunk."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

LOGINS = Counter(
    "edge_ftp_logins", "FTP logins by result.", ["result"])
"""``result``: ok, failed (wrong password or unknown user: indistinguishable on purpose),
banned (failed-login limit), unavailable (directory or backend unreachable, maintenance)."""

TRANSFERS = Counter(
    "edge_ftp_transfers", "FTP data transfers by kind and result.", ["kind", "result"])
"""``kind``: download (RETR), upload (STOR/APPE/STOU), listing (LIST/NLST/MLSD);
``result``: ok, failed (the backend refused), aborted (ABOR, timeout, peer gone)."""

TRANSFER_SECONDS = Histogram(
    "edge_ftp_transfer_seconds", "Duration of FTP data transfers.", ["kind"],
    buckets=(0.01, 0.1, 0.5, 1, 5, 15, 60, 300, 1800))

REFUSED = Counter(
    "edge_ftp_refused", "Requests the FTP proxy refused for security reasons.", ["reason"])
"""``reason``: bounce (PORT/EPRT port < 1024), port_steal (a foreign address connected to a
passive port), backend_pasv (backend PASV reply pointing elsewhere), too_long (command line),
bad_command, connection_cap (per-IP connections), unauthenticated_cap, proxy_header,
tls_required, injection (plaintext pipelined behind AUTH TLS)."""

__all__ = ["LOGINS", "REFUSED", "TRANSFERS", "TRANSFER_SECONDS"]
