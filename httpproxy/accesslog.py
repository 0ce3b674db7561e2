"""Access log: one JSON object per request.

Three sinks (``[http] access_log``):

* ``""`` (the default): the lines go where ``edge serve`` logs (stderr: a terminal, journald,
  a container's log driver) as JSON log lines of the ``edge.http.access`` logger — the same
  ``ts``/``level``/``logger``/``msg``/``pid``/``worker`` fields as every other edge log line,
  plus the request's fields at the top level. They are written by this buffer, not by
  ``logging`` per request (several times the CPU of the request itself), in writes of whole
  lines of at most ``PIPE_BUF`` bytes so that workers sharing one pipe never interleave
  inside a line. With ``[log] format = "text"`` (people at a terminal) or a level above
  ``info`` they go through ``logging`` as before.
* a path: appended to that file through the same buffer; ``SIGUSR1`` to ``edge serve``
  reopens it (logrotate: move the file, then ``kill -USR1``; see config/logrotate).
* ``"off"``: none.

The per-request cost on a busy server is one tuple appended by :meth:`AccessLog.add`: lines
are formatted in one batch at flush time (once a second or every :data:`FLUSH_LINES`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import select
import time
from collections.abc import Callable
from typing import Any

from edge import logging as edge_logging

__all__ = ["AccessLog", "stream_head", "stream_ts"]

_log = logging.getLogger("edge.http.access")
FLUSH_BYTES = 65536
FLUSH_INTERVAL = 1.0
Formatter = Callable[[Any], bytes]
FLUSH_LINES = 256
"""Lines queued (:meth:`AccessLog.add`) before a flush."""
STREAM_WRITE_MAX = select.PIPE_BUF
"""Largest single write to a shared stream: writes up to PIPE_BUF to a pipe are atomic, so
lines from several workers never mix (a file opened with O_APPEND has no such limit)."""
LOGGER_NAME = "edge.http.access"

_head: tuple[int, bytes] = (-1, b"")
_second: tuple[int, bytes] = (-1, b"")


def stream_head() -> bytes:
    """``{"level":"info","logger":"edge.http.access","msg":"request","pid":…,`` for this
    process (recomputed after a fork)."""
    global _head
    pid = os.getpid()
    if _head[0] != pid:
        _head = (pid, edge_logging.json_line_head(LOGGER_NAME, "request"))
    return _head[1]


def stream_ts(ts: float) -> bytes:
    """``ts`` as the quoted RFC 3339 string the edge log uses (one strftime per second)."""
    global _second
    whole = int(ts)
    if _second[0] != whole:
        _second = (whole, edge_logging.rfc3339(whole)[:-5].encode())
    return b'"%b.%03dZ"' % (_second[1], int(ts % 1 * 1000))


class AccessLog:
    """Where finished requests are recorded; :meth:`record` never raises on I/O errors."""

    __slots__ = ("_buffer", "_fd", "_size", "_timer", "_unhook", "buffered", "enabled",
                 "formatter", "path", "stream")

    def __init__(self, target: str, formatter: Formatter | None = None, *,
                 stream_fd: int = -1) -> None:
        """``stream_fd``: for ``target == ""``, the descriptor the edge log writes to
        (:func:`edge.logging.edge_stream_fd`), or -1 to send lines through ``logging``."""
        self.path = target if target not in ("", "off") else ""
        self.enabled = target != "off"
        self._fd = -1
        self.stream = False
        """True when lines go to the edge log's own stream (not ours: never closed)."""
        self._unhook: Callable[[], None] | None = None
        if self.path:
            self._fd = self._open()
            self._unhook = edge_logging.on_reopen(self.reopen)
        elif self.enabled and stream_fd >= 0:
            self._fd = stream_fd
            self.stream = True
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
            if self.stream:
                _write_lines(self._fd, data)
            else:
                os.write(self._fd, data)
        except OSError as exc:  # a full disk must not stop serving
            _log.warning("access log %s: write failed: %s", self.path or "stream", exc)

    def _open(self) -> int:
        return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)

    def reopen(self) -> None:
        """Flush, then write to a new file at :attr:`path` (logrotate moved the old one away).
        If the path cannot be opened, keep writing to the old file and say so."""
        if not self.path or self._fd < 0:
            return
        self.flush()
        try:
            fd = self._open()
        except OSError as exc:
            _log.warning("access log %s: reopen failed, keeping the old file: %s", self.path, exc)
            return
        old, self._fd = self._fd, fd
        os.close(old)

    def close(self) -> None:
        self.flush()
        if self._unhook is not None:
            self._unhook()
            self._unhook = None
        if self._fd >= 0:
            if not self.stream:
                os.close(self._fd)
            self._fd = -1
            self.buffered = False


def _write_lines(fd: int, data: bytes) -> None:
    """Write ``data`` (whole lines) in writes of whole lines of at most STREAM_WRITE_MAX
    bytes (a longer line alone in its own write)."""
    start, end = 0, len(data)
    while start < end:
        stop = end if end - start <= STREAM_WRITE_MAX else data.rfind(
            b"\n", start, start + STREAM_WRITE_MAX) + 1
        if stop <= start:  # one line longer than STREAM_WRITE_MAX
            stop = data.find(b"\n", start) + 1 or end
        view = memoryview(data)[start:stop]
        while view:
            view = view[os.write(fd, view):]
        start = stop
