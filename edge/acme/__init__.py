"""Automatic certificates over ACME (RFC 8555): client, issuance and renewal (docs/tls.md)."""
