"""Log output for ``edge serve``: one JSON object per line (default) or plain text.

JSON lines carry ``ts`` (RFC 3339, UTC, milliseconds), ``level``, ``logger``, ``msg``, ``pid``,
the process fields set with :func:`set_process_fields` (``worker``, ``generation`` in a worker)
and every ``extra={...}`` field the caller passed, so a log pipeline can filter on them
without parsing messages. Exceptions go into ``exc`` as one string.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any, TextIO

from edge.config import LogConfig

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message", "asctime", "taskName"}

_process_fields: dict[str, Any] = {}


def set_process_fields(**fields: Any) -> None:
    """Add fields to every record this process logs (e.g. ``worker=2``); replaces older ones."""
    _process_fields.clear()
    _process_fields.update(fields)


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD and not k.startswith("_")}


def _timestamp(created: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{int(created % 1 * 1000):03d}Z"


class JsonFormatter(logging.Formatter):
    """One JSON object per line; values that JSON cannot hold are written with ``str()``."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {"ts": _timestamp(record.created), "level": record.levelname.lower(),
                                "logger": record.name, "msg": record.getMessage(),
                                "pid": record.process or os.getpid()}
        data.update(_process_fields)
        data.update(_extras(record))
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str, separators=(",", ":"))


class TextFormatter(logging.Formatter):
    """``TS LEVEL logger: msg key=value ...`` for people reading a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        fields = {**_process_fields, **_extras(record)}
        tail = "".join(f" {k}={v}" for k, v in fields.items())
        line = (f"{_timestamp(record.created)} {record.levelname.lower():7} {record.name}: "
                f"{record.getMessage()}{tail}")
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def configure(config: LogConfig, stream: TextIO | None = None) -> None:
    """Route the root logger to ``stream`` (stderr) with the configured level and format.

    Safe to call again (on SIGHUP reload): the previous handler installed here is replaced.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_edge_handler", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if config.format == "json" else TextFormatter())
    handler._edge_handler = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(config.level.upper())
    # aiohttp logs every admin request at INFO; scrapes every few seconds are noise.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    # asyncssh's INFO/DEBUG lines carry exec commands, subsystems and env values (user
    # secrets); a level on its package logger covers every child and every future message,
    # where a filter on message texts would miss the next one asyncssh adds.
    logging.getLogger("asyncssh").setLevel(config.asyncssh_level.upper())


__all__ = ["JsonFormatter", "TextFormatter", "configure", "set_process_fields"]
