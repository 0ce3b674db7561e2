"""Hostname normalisation: the one place that decides what a hostname is.

Sites are stored, looked up, compared with SNI and with Host headers only after
:func:`normalize_hostname`, so ``WWW.Example.COM.``, ``www.example.com`` and ``bücher.de`` /
``xn--bcher-kva.de`` each have exactly one spelling in the directory.
"""

from __future__ import annotations

import re

from edge.errors import ValidationError

_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
_MAX_HOSTNAME = 253


def _to_ascii(label: str) -> str:
    if label.isascii():
        return label.lower()
    try:
        return label.encode("idna").decode("ascii").lower()
    except UnicodeError as exc:
        raise ValidationError(f"hostname label {label!r} is not valid IDNA: {exc}") from None


def normalize_hostname(name: str, *, allow_wildcard: bool = False) -> str:
    """Return the canonical form of a hostname: lowercase, A-labels, no trailing dot.

    Raises :class:`ValidationError` for anything that is not a DNS hostname (IP literals,
    ports, empty labels, underscores, labels over 63 octets, names over 253). A leading ``*.``
    is accepted only with ``allow_wildcard`` and only as the whole first label.
    """
    text = name.strip()
    if text.endswith("."):
        text = text[:-1]
    if not text:
        raise ValidationError("hostname is empty")
    labels = text.split(".")
    wildcard = labels[0] == "*"
    if wildcard:
        if not allow_wildcard:
            raise ValidationError(f"{name!r}: a wildcard is not allowed here")
        labels = labels[1:]
        if len(labels) < 2:
            raise ValidationError(f"{name!r}: a wildcard needs at least two labels after '*.'")
    ascii_labels = [_to_ascii(label) for label in labels]
    for label in ascii_labels:
        if not _LABEL.match(label):
            raise ValidationError(f"{name!r} is not a valid hostname (bad label {label!r})")
    if ascii_labels[-1].isdigit():
        raise ValidationError(f"{name!r} looks like an IP address, not a hostname")
    result = ".".join(ascii_labels)
    if wildcard:
        result = "*." + result
    if len(result) > _MAX_HOSTNAME:
        raise ValidationError(f"{name!r} is longer than {_MAX_HOSTNAME} characters")
    return result


def hostname_or_none(name: str) -> str | None:
    """Normalise a name from the network (SNI, Host header); ``None`` if it is not a hostname.

    The hot path uses this: a garbage Host header is an unknown site, not an exception.
    """
    try:
        return normalize_hostname(name)
    except ValidationError:
        return None


def wildcard_parent(hostname: str) -> str | None:
    """The parent whose ``*.parent`` wildcard would cover ``hostname`` (one label only).

    ``a.example.com`` → ``example.com``; ``example.com`` → ``None`` (a wildcard needs two labels
    after ``*.``, so ``*.com`` can never exist).
    """
    _, dot, parent = hostname.partition(".")
    if not dot or "." not in parent:
        return None
    return parent
