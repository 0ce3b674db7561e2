"""Access log: one JSON object per request.

Three sinks (``[http] access_log``): ``""`` sends each line through the ``edge.http.access``
logger (so it lands wherever ``edge serve`` logs, with ``extra`` fields), a path appends to
that file through a buffer flushed every second or every 64 KiB (the cheap choice for busy
servers), and ``"off"`` drops them.

The per-request cost on a busy server is one tuple appended by :meth:`AccessLog.add`: lines
are formatted in one batch at flush time (once a second or every :data:`FLUSH_LINES`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Callable
from typing import Any

__all__ = ["AccessLog"]

_log = logging.getLogger("edge.http.access")
FLUSH_BYTES = 65536
FLUSH_INTERVAL = 1.0
Formatter = Callable[[Any], bytes]
FLUSH_LINES = 256
"""Lines queued (:meth:`AccessLog.add`) before a flush."""


class AccessLog:
    """Where finished requests are recorded; :meth:`record` never raises on I/O errors."""

    __slots__ = ("_buffer", "_fd", "_size", "_timer", "buffered", "enabled", "formatter", "path")

    def __init__(self, target: str, formatter: Formatter | None = None) -> None:
        self.path = target if target not in ("", "off") else ""
        self.enabled = target != "off"
        self._fd = -1
        if self.path:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        self.buffered = self._fd >= 0
        """True when lines go to our own buffer (callers may then format lines themselves)."""
        self.formatter = formatter
        """Turns what :meth:`add` was given into one line (newline included); must not raise."""
        self._buffer: list[bytes | tuple[Any, ...]] = []
        self._size = 0
        self._timer: asyncio.TimerHandle | None = None

    def record(self, fields: dict[str, Any]) -> None:
        """Write one request's fields (JSON-serialisable values)."""
        if self._fd < 0:
            _log.info("request", extra=fields)
            return
        fields["ts"] = round(time.time(), 3)
        self.write_line(json.dumps(fields, separators=(",", ":")).encode() + b"\n")

    def write_line(self, line: bytes) -> None:
        """Append one already formatted JSON line (ending in a newline) to the buffer."""
        self._buffer.append(line)
        self._size += len(line)
        if self._size >= FLUSH_BYTES:
            self.flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(FLUSH_INTERVAL, self.flush)

    def add(self, values: tuple[Any, ...]) -> None:
        """Queue one line: ``formatter(values)``, called at the next flush (so the values must
        not change meanwhile: bytes, str, numbers, frozen objects)."""
        buffer = self._buffer
        buffer.append(values)
        # Once per request: only the line count decides (lines from write_line() count as
        # lines here too, and their bytes there), and only the line that found the buffer
        # empty arms the flush timer.
        count = len(buffer)
        if count == 1:
            if self._timer is None:
                self._timer = asyncio.get_running_loop().call_later(FLUSH_INTERVAL, self.flush)
        elif count >= FLUSH_LINES:
            self.flush()

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._buffer or self._fd < 0:
            return
        formatter = self.formatter
        if formatter is None:
            data = b"".join([item for item in self._buffer if type(item) is bytes])
        else:
            data = b"".join([item if type(item) is bytes else formatter(item)
                             for item in self._buffer])
        self._buffer.clear()
        self._size = 0
        try:
            os.write(self._fd, data)
        except OSError as exc:  # a full disk must not stop serving
            _log.warning("access log %s: write failed: %s", self.path, exc)

    def close(self) -> None:
        self.flush()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            self.buffered = False
