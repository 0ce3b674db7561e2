"""Access log: one JSON object per request.

Three sinks (``[http] access_log``): ``""`` sends each line through the ``edge.http.access``
logger (so it lands wherever ``edge serve`` logs, with ``extra`` fields), a path appends to
that file through a buffer flushed every second or every 64 KiB (the cheap choice for busy
servers), and ``"off"`` drops them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from typing import Any

__all__ = ["AccessLog"]

_log = logging.getLogger("edge.http.access")
FLUSH_BYTES = 65536
FLUSH_INTERVAL = 1.0


class AccessLog:
    """Where finished requests are recorded; :meth:`record` never raises on I/O errors."""

    __slots__ = ("_buffer", "_fd", "_size", "_timer", "buffered", "enabled", "path")

    def __init__(self, target: str) -> None:
        self.path = target if target not in ("", "off") else ""
        self.enabled = target != "off"
        self._fd = -1
        if self.path:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        self.buffered = self._fd >= 0
        """True when lines go to our own buffer (callers may then format lines themselves)."""
        self._buffer: list[bytes] = []
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

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._buffer or self._fd < 0:
            return
        data = b"".join(self._buffer)
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
