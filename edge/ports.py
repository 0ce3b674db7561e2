"""Is a listen address free, and if not, which process holds it (Linux ``/proc``).

The master binds its listeners with ``SO_REUSEPORT`` so that workers share a port; the kernel
then also lets a *second* ``edge serve`` of the same user bind the same port and silently
split the connections with the first. So before the first bind of an address we try to bind
it without ``SO_REUSEPORT``: that fails while anyone listens there, and we say who.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
from pathlib import Path
from typing import NamedTuple

from edge.config import ListenAddress
from edge.errors import EdgeError

_LISTEN = "0A"
"""``st`` of a listening socket in ``/proc/net/tcp``."""


class Holder(NamedTuple):
    """A process that has a listening socket open."""

    pid: int
    command: str


class AddressInUse(EdgeError):
    """A listen address is taken by another process (named when ``/proc`` lets us see it)."""


def check_free(host: str, port: int) -> None:
    """Raise :class:`AddressInUse` if something listens on ``host:port`` (port 0: never)."""
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # SO_REUSEADDR: a port whose old connections are in TIME_WAIT is free to listen on.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise AddressInUse(in_use_message(host, port)) from None
            # Anything else (EADDRNOTAVAIL, EACCES) the real bind reports in its own words.


def in_use_message(host: str, port: int) -> str:
    """``HOST:PORT is in use by pid N (COMMAND)`` (or ``by another process``)."""
    holder = find_holder(port)
    who = f"pid {holder.pid} ({holder.command})" if holder else "another process"
    return f"{ListenAddress(host, port)} is in use by {who}"


def find_holder(port: int) -> Holder | None:
    """The process listening on TCP ``port``: the parent when a process tree shares the socket
    (an ``edge serve`` master and its workers); ``None`` if ``/proc`` does not tell us."""
    inodes = _listening_inodes(port)
    if not inodes:
        return None
    pids = _pids_with_sockets(inodes)
    if not pids:
        return None
    roots = [pid for pid in pids if _ppid(pid) not in pids]
    pid = min(roots or pids)
    return Holder(pid, _command(pid))


def _listening_inodes(port: int) -> set[str]:
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if (len(fields) > 9 and fields[3] == _LISTEN
                        and int(fields[1].rsplit(":", 1)[1], 16) == port):
                    inodes.add(fields[9])
    return inodes


def _pids_with_sockets(inodes: set[str]) -> set[int]:
    wanted = {f"socket:[{inode}]" for inode in inodes}
    pids: set[int] = set()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            fds = os.listdir(f"/proc/{entry.name}/fd")
        except OSError:  # another user's process, or gone
            continue
        for fd in fds:
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{entry.name}/fd/{fd}") in wanted:
                    pids.add(int(entry.name))
                    break
    return pids


def _ppid(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def _command(pid: int, limit: int = 80) -> str:
    """The command line as a person typed it: ``edge serve ...`` rather than the interpreter
    and the full path of the console script."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return "?"
    argv = [a for a in argv if a]
    if len(argv) > 1 and Path(argv[0]).name.startswith("python") and argv[1][:1] != "-":
        argv = argv[1:]  # `python /venv/bin/edge serve`: the script is the command
    if argv:
        argv[0] = Path(argv[0]).name
    text = " ".join(argv) or "?"
    return text if len(text) <= limit else text[:limit - 3] + "..."


__all__ = ["AddressInUse", "Holder", "check_free", "find_holder", "in_use_message"]
