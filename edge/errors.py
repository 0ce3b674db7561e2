"""Exceptions with messages an operator or user can act on.

Every error the CLI prints is one of these; the CLI shows ``str(exc)`` as a single line and
exits non-zero, so messages name the offending thing and, where possible, the fix.
"""

from __future__ import annotations


class EdgeError(Exception):
    """Base class for all errors the edge raises on purpose."""

    exit_code = 1


class ConfigError(EdgeError):
    """The configuration file or environment is invalid; the message names the key."""

    exit_code = 2


class ValidationError(EdgeError):
    """Input to a directory write was refused; nothing was written."""

    exit_code = 2


class NotFoundError(EdgeError):
    """A named object (host, tenant, account, site, certificate) does not exist."""

    exit_code = 3


class ConflictError(EdgeError):
    """A write would duplicate a unique name or break a reference."""

    exit_code = 4


class DirectoryUnavailable(EdgeError):
    """The tenant directory could not be reached and no cached answer exists.

    Proxies turn this into their protocol's "temporarily unavailable" error.
    """

    exit_code = 5


class SecretsError(EdgeError):
    """The at-rest encryption key is missing or wrong."""

    exit_code = 6
