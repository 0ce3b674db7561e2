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
from collections.abc import Callable
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


def edge_stream_fd(name: str) -> int:
    """The file descriptor that :func:`configure`'s JSON handler writes to, when ``name``'s
    INFO records reach it; -1 otherwise (text format, no edge handler, level above info, a
    stream without a descriptor). Lets a hot path write JSON lines itself, in batches."""
    logger = logging.getLogger(name)
    if not logger.isEnabledFor(logging.INFO):
        return -1
    for handler in logging.getLogger().handlers:
        if getattr(handler, "_edge_handler", False) and isinstance(handler.formatter, JsonFormatter):
            stream = getattr(handler, "stream", None)
            try:
                return int(stream.fileno()) if stream is not None else -1
            except (OSError, ValueError, AttributeError):
                return -1
    return -1


def json_line_head(name: str, msg: str) -> bytes:
    """The start of a JSON log line as :class:`JsonFormatter` writes it, without ``ts``:
    ``{"level":"info","logger":…,"msg":…,"pid":…,<process fields>,`` (ends with a comma)."""
    data: dict[str, Any] = {"level": "info", "logger": name, "msg": msg, "pid": os.getpid()}
    data.update(_process_fields)
    return json.dumps(data, default=str, separators=(",", ":")).encode()[:-1] + b","


def rfc3339(created: float) -> str:
    """``created`` as the ``ts`` of a JSON log line (UTC, milliseconds)."""
    return _timestamp(created)


_reopen_hooks: list[Callable[[], None]] = []


def on_reopen(hook: Callable[[], None]) -> Callable[[], None]:
    """Call ``hook`` when log files must be reopened (SIGUSR1, after logrotate moved them).
    Returns a function that removes the hook again."""
    _reopen_hooks.append(hook)
    return lambda: _reopen_hooks.remove(hook) if hook in _reopen_hooks else None


def reopen() -> int:
    """Run every reopen hook (one failing hook does not stop the others); returns how many ran."""
    ran = 0
    for hook in list(_reopen_hooks):
        try:
            hook()
            ran += 1
        except Exception:  # a log we cannot reopen must not stop serving
            logging.getLogger("edge.logging").exception("reopening a log failed")
    return ran


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


__all__ = ["JsonFormatter", "TextFormatter", "configure", "edge_stream_fd", "json_line_head",
           "on_reopen", "reopen", "rfc3339", "set_process_fields"]
