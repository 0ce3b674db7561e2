"""FTP control-channel protocol, sans-IO: command/reply parsing, formatting, addresses, login policy.

Nothing here touches a socket or an event loop: bytes go in, events (or bytes) come out, so every
rule is unit-tested alone. The connection code wires it up roughly like this::

    reader = CommandReader()
    for event in reader.feed(data):
        if isinstance(event, CommandTooLong):
            write(format_reply(500, "Command too long."))
        elif isinstance(event, BadCommand):
            write(format_reply(500, event.reason))
        else:
            state, action = login_step(state, event)
            ...
            if isinstance(action, StartTls):
                write(format_reply(action.code, action.text))
                reader.discard_buffered()          # STARTTLS injection defence
                ...                                # then the TLS handshake

Security rules encoded here (see DESIGN.md, FTP):

* Command lines end at CRLF only and longer than :data:`MAX_COMMAND_LINE` bytes are refused
  whole; Telnet IAC sequences are stripped; NUL, stray CR and bare LF inside a line are refused
  (CRLF injection); backend replies follow the same line rule (:class:`ReplyReader`); commands
  the proxy builds itself go through :func:`format_command`, which refuses CR/LF/NUL.
* The reader pauses after every ``AUTH`` command so that plaintext pipelined behind it can be
  dropped with :meth:`CommandReader.discard_buffered` before TLS starts.
* FTP bounce: :func:`active_target` ignores the address in PORT/EPRT (the client's control
  address is always used) and refuses ports below 1024.
* :func:`check_backend_passive` refuses a backend PASV reply that points anywhere but the backend.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

from edge.directory.directory import USERNAME_RE
from edge.proxyproto import canonical_ip

__all__ = [
    "MAX_COMMAND_LINE",
    "MAX_REPLY_BYTES",
    "Action",
    "BadCommand",
    "BounceRefused",
    "Close",
    "Command",
    "CommandEvent",
    "CommandReader",
    "CommandTooLong",
    "Forward",
    "FtpError",
    "FtpSyntaxError",
    "LoginState",
    "PassiveAddressRefused",
    "ProtocolError",
    "Reply",
    "ReplyReader",
    "Respond",
    "RouteLogin",
    "StartTls",
    "active_target",
    "check_backend_passive",
    "format_command",
    "format_epsv_reply",
    "format_pasv_reply",
    "format_reply",
    "login_step",
    "parse_eprt_argument",
    "parse_epsv_reply",
    "parse_pasv_reply",
    "parse_port_argument",
]

#: Longest accepted command line in bytes, after Telnet IAC removal and excluding CRLF / LF.
MAX_COMMAND_LINE = 2048
#: Most plaintext the :class:`CommandReader` holds while paused after ``AUTH``.
MAX_PAUSED_BYTES = 64 * 1024
#: Largest reply (all lines, terminators included) a :class:`ReplyReader` accepts.
MAX_REPLY_BYTES = 64 * 1024


# ---------------------------------------------------------------------------------------------
# Errors


class FtpError(Exception):
    """Base class of every error raised by this module."""


class ProtocolError(FtpError):
    """The peer broke the protocol in a way the connection cannot recover from (close it)."""


class FtpSyntaxError(FtpError, ValueError):
    """A malformed address argument or reply field (answer 501 / treat the reply as failed)."""


class BounceRefused(FtpError):
    """A PORT/EPRT request the proxy will not connect to (FTP bounce defence)."""


class PassiveAddressRefused(FtpError):
    """A backend PASV reply pointing somewhere other than the backend itself."""


# ---------------------------------------------------------------------------------------------
# Commands (client → proxy)


@dataclass(frozen=True, slots=True)
class Command:
    """One command line: ``verb`` upper-cased (3-4 ASCII letters), ``argument`` after one space."""

    verb: str
    argument: str = ""


@dataclass(frozen=True, slots=True)
class CommandTooLong:
    """A line longer than :data:`MAX_COMMAND_LINE`; it was dropped up to its terminator."""


@dataclass(frozen=True, slots=True)
class BadCommand:
    """A line that is not an acceptable command (NUL, stray CR, invalid UTF-8, bad verb...)."""

    reason: str


CommandEvent = Command | CommandTooLong | BadCommand

_IAC = 0xFF
_DONT, _DO, _WONT, _WILL = 0xFE, 0xFD, 0xFC, 0xFB
_T_DATA, _T_IAC, _T_OPTION = 0, 1, 2
_VERB_RE = re.compile(r"[A-Za-z]{3,4}")


class CommandReader:
    """Incremental parser for the client's control stream.

    :meth:`feed` returns the events completed by the new bytes; feeding a stream in any chunking
    yields the same event sequence. Lines end with CRLF only (RFC 959): a bare LF does not end a
    line, it makes the line a :class:`BadCommand` (a proxy that split ``PASS x\nDELE f`` in two
    would run a command the backend, reached directly, refuses). Telnet IAC sequences are
    removed first (``IAC IAC`` is a literal 0xFF byte; ``IAC WILL/WONT/DO/DONT x`` and ``IAC x``
    for any other ``x`` are dropped; subnegotiation is not supported: ``IAC SB`` is dropped as a
    two-byte sequence). The line limit counts bytes after IAC removal and excludes the
    terminator, so a 2,048-byte command is accepted and a 2,049-byte one is not.

    After an ``AUTH`` command the reader *pauses*: later bytes stay buffered and no more events
    come until :meth:`discard_buffered` (TLS accepted: drop the plaintext) or :meth:`resume`
    (AUTH refused: go on parsing).
    """

    def __init__(self) -> None:
        self._raw = bytearray()  # received, not yet looked at (only non-empty while paused)
        self._line = bytearray()  # current line, IAC sequences removed
        self._telnet = _T_DATA
        self._discarding = False  # inside a too-long line: drop up to the next CRLF
        self._last_cr = False  # the last line byte seen (kept or discarded) was CR
        self._paused = False

    @property
    def paused(self) -> bool:
        """True after an ``AUTH`` command until :meth:`resume` or :meth:`discard_buffered`."""
        return self._paused

    def feed(self, data: bytes) -> list[CommandEvent]:
        """Add received bytes; return the events they complete (none while paused).

        Raises :class:`ProtocolError` if more than :data:`MAX_PAUSED_BYTES` pile up while paused.
        """
        self._raw += data
        if self._paused:
            if len(self._raw) > MAX_PAUSED_BYTES:
                raise ProtocolError("too much data pipelined behind AUTH")
            return []
        return self._pump()

    def resume(self) -> list[CommandEvent]:
        """Leave the paused state (AUTH was refused) and parse what was buffered meanwhile."""
        self._paused = False
        return self._pump()

    def after(self, command: Command, action: Action) -> list[CommandEvent]:
        """Tell the reader what :func:`login_step` made of ``command``; returns the commands
        this releases (to be handled next, before anything read later).

        Every handled command must come back here: an ``AUTH`` that did not start TLS (no
        certificate, unknown mechanism, after USER, TLS already on) resumes reading — left
        paused, every later command would wait unanswered (lftp's ``AUTH TLS``, ``502``, then
        silence). :class:`StartTls` keeps the pause for :meth:`discard_buffered`. Commands
        before the ``AUTH`` (read in the same segment) leave the pause alone: the reader stops
        right after the ``AUTH``, so the one handled while paused is that one.
        """
        if self._paused and command.verb == "AUTH" and not isinstance(action, StartTls):
            return self.resume()
        return []

    def discard_buffered(self) -> int:
        """Drop every byte received but not yet turned into an event; return how many.

        Call it right after accepting ``AUTH TLS``: anything the client pipelined in plaintext
        must never be read as if it had come through TLS (STARTTLS command injection).
        Also leaves the paused state.
        """
        dropped = len(self._raw) + len(self._line)
        self._raw.clear()
        self._line.clear()
        self._telnet = _T_DATA
        self._discarding = False
        self._last_cr = False
        self._paused = False
        return dropped

    def _pump(self) -> list[CommandEvent]:
        events: list[CommandEvent] = []
        raw = self._raw
        i, n = 0, len(raw)
        while i < n and not self._paused:
            if self._telnet == _T_DATA:
                lf = raw.find(b"\n", i)
                iac = raw.find(b"\xff", i, lf if lf >= 0 else n)
                stop = iac if iac >= 0 else (lf if lf >= 0 else n)
                self._append(raw[i:stop], events)
                i = stop
                if stop == n:
                    break
                i += 1
                if raw[stop] == _IAC:
                    self._telnet = _T_IAC
                elif self._last_cr:
                    self._end_line(events)
                else:
                    self._append(b"\n", events)  # bare LF: part of the line, refused at its end
            elif self._telnet == _T_IAC:
                byte = raw[i]
                i += 1
                if byte == _IAC:
                    self._telnet = _T_DATA
                    self._append(b"\xff", events)
                elif byte in (_WILL, _WONT, _DO, _DONT):
                    self._telnet = _T_OPTION
                else:
                    self._telnet = _T_DATA
            else:  # option byte of WILL/WONT/DO/DONT
                i += 1
                self._telnet = _T_DATA
        del raw[:i]
        return events

    def _append(self, chunk: bytes | bytearray, events: list[CommandEvent]) -> None:
        if not chunk:
            return
        self._last_cr = chunk[-1] == 0x0D
        if self._discarding:
            return
        self._line += chunk
        # One extra byte may be the CR of a CRLF terminator.
        if len(self._line) > MAX_COMMAND_LINE + 1:
            self._line.clear()
            self._discarding = True
            events.append(CommandTooLong())

    def _end_line(self, events: list[CommandEvent]) -> None:
        line = bytes(self._line)
        self._line.clear()
        self._last_cr = False
        if self._discarding:
            self._discarding = False
            return
        if line.endswith(b"\r"):
            line = line[:-1]
        if len(line) > MAX_COMMAND_LINE:
            events.append(CommandTooLong())
            return
        event = _parse_command_line(line)
        events.append(event)
        if isinstance(event, Command) and event.verb == "AUTH":
            self._paused = True


def _parse_command_line(line: bytes) -> Command | BadCommand:
    if b"\x00" in line:
        return BadCommand("NUL byte in command line")
    if b"\r" in line:
        return BadCommand("stray CR in command line")
    if b"\n" in line:
        return BadCommand("bare LF in command line")
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        return BadCommand("command line is not valid UTF-8 (RFC 2640)")
    if not text:
        return BadCommand("empty command line")
    verb, _, argument = text.partition(" ")
    if not _VERB_RE.fullmatch(verb):
        return BadCommand("malformed command verb")
    return Command(verb.upper(), argument)


def format_command(verb: str, argument: str = "") -> bytes:
    """Build one command line (UTF-8, CRLF-terminated): the only way the proxy writes commands.

    Raises ValueError if the verb is not 3-4 ASCII letters or the argument holds CR, LF or NUL.
    """
    if not _VERB_RE.fullmatch(verb):
        raise ValueError(f"invalid FTP verb {verb!r}")
    _check_field(argument, "argument")
    line = f"{verb.upper()} {argument}" if argument else verb.upper()
    return line.encode("utf-8") + b"\r\n"


def _check_field(text: str, what: str) -> None:
    if "\r" in text or "\n" in text or "\x00" in text:
        raise ValueError(f"CR, LF or NUL in FTP {what}")


# ---------------------------------------------------------------------------------------------
# Replies (backend → proxy, proxy → client)


@dataclass(frozen=True, slots=True)
class Reply:
    """One complete reply. ``lines`` hold the text after ``ddd-``/``ddd `` on the first and last
    line and intermediate lines verbatim; a single-line reply has one element. Text is decoded
    as UTF-8 with ``surrogateescape``, so :func:`format_reply` reproduces the original bytes."""

    code: int
    lines: list[str]

    @property
    def text(self) -> str:
        """All lines joined with ``\\n``."""
        return "\n".join(self.lines)


_REPLY_START_RE = re.compile(rb"([1-5][0-9][0-9])([ -]|$)")


class ReplyReader:
    """Incremental parser for the backend's replies (RFC 959 §4.2, multi-line included).

    Lines end at CRLF only. Raises :class:`ProtocolError` on a malformed first line, NUL, stray
    CR or bare LF in a line, or a reply (or pending line) larger than :data:`MAX_REPLY_BYTES`:
    a backend reply that echoes a name holding LF (``257 "/a<LF>226 x"``) must not become two
    replies, which would put the client's replies out of step with its commands.
    """

    def __init__(self, max_reply_bytes: int = MAX_REPLY_BYTES) -> None:
        self._max = max_reply_bytes
        self._buffer = bytearray()
        self._code: int | None = None  # inside a multi-line reply
        self._lines: list[str] = []
        self._size = 0  # bytes of the reply so far

    def feed(self, data: bytes) -> list[Reply]:
        """Add received bytes; return the replies they complete."""
        self._buffer += data
        replies: list[Reply] = []
        while True:
            lf = self._buffer.find(b"\r\n")
            if lf < 0:
                if b"\n" in self._buffer:  # at once: a backend ending lines with LF never ends one
                    raise ProtocolError("bare LF in reply line")
                if self._size + len(self._buffer) > self._max:
                    raise ProtocolError("reply too long")
                return replies
            raw = bytes(self._buffer[: lf + 2])
            del self._buffer[: lf + 2]
            self._size += len(raw)
            if self._size > self._max:
                raise ProtocolError("reply too long")
            reply = self._line(raw[:-2])
            if reply is not None:
                replies.append(reply)

    def _line(self, line: bytes) -> Reply | None:
        if b"\x00" in line or b"\r" in line or b"\n" in line:
            raise ProtocolError("NUL, stray CR or bare LF in reply line")
        if self._code is None:
            match = _REPLY_START_RE.match(line)
            if match is None:
                raise ProtocolError(f"malformed reply line {line[:40]!r}")
            code = int(match.group(1))
            text = line[4:].decode("utf-8", "surrogateescape")
            if match.group(2) == b"-":
                self._code, self._lines = code, [text]
                return None
            return self._finish(code, [text])
        code_bytes = b"%d" % self._code
        if line == code_bytes or line.startswith(code_bytes + b" "):
            self._lines.append(line[4:].decode("utf-8", "surrogateescape"))
            return self._finish(self._code, self._lines)
        self._lines.append(line.decode("utf-8", "surrogateescape"))
        return None

    def _finish(self, code: int, lines: list[str]) -> Reply:
        self._code, self._lines, self._size = None, [], 0
        return Reply(code, lines)


def format_reply(code: int, text: str | Sequence[str]) -> bytes:
    """Format a reply; several lines become an RFC 959 multi-line reply.

    ``text`` is a string (``\\n`` or ``\\r\\n`` separate lines) or a sequence of lines. Any other
    CR, LF or NUL raises ValueError. Intermediate lines starting with a digit get a leading space
    so they cannot be taken for the closing ``ddd `` line (reply injection).
    """
    if not 100 <= code <= 599:
        raise ValueError(f"invalid FTP reply code {code}")
    if isinstance(text, str):
        lines = text.replace("\r\n", "\n").split("\n")
    else:
        lines = list(text)
        if not lines:
            raise ValueError("a reply needs at least one line")
    for line in lines:
        _check_field(line, "reply text")
    if len(lines) == 1:
        out = [f"{code} {lines[0]}"]
    else:
        middle = [f" {line}" if line[:1].isdigit() else line for line in lines[1:-1]]
        out = [f"{code}-{lines[0]}", *middle, f"{code} {lines[-1]}"]
    return "".join(f"{line}\r\n" for line in out).encode("utf-8", "surrogateescape")


# ---------------------------------------------------------------------------------------------
# Data-channel addresses


def _byte(field: str, what: str) -> int:
    if not (field.isascii() and field.isdigit() and len(field) <= 3) or int(field) > 255:
        raise FtpSyntaxError(f"{what}: {field!r} is not a number 0-255")
    return int(field)


def _port(field: str) -> int:
    if not (field.isascii() and field.isdigit() and len(field) <= 5) or not 1 <= int(field) <= 65535:
        raise FtpSyntaxError(f"port {field!r} is not a number 1-65535")
    return int(field)


def _host_port_fields(fields: Sequence[str], what: str) -> tuple[str, int]:
    if len(fields) != 6:
        raise FtpSyntaxError(f"{what}: expected 6 comma-separated numbers, got {len(fields)}")
    numbers = [_byte(field.strip(), what) for field in fields]
    port = numbers[4] * 256 + numbers[5]
    if port == 0:
        raise FtpSyntaxError(f"{what}: port 0")
    return ".".join(str(n) for n in numbers[:4]), port


_PASV_RE = re.compile(r"(\d+(?:\s*,\s*\d+){5})")


def parse_pasv_reply(text: str) -> tuple[str, int]:
    """``(ip, port)`` from a 227 reply's text, e.g. ``Entering Passive Mode (h1,h2,h3,h4,p1,p2).``

    The six numbers are found anywhere in the text (with or without parentheses or code).
    """
    match = _PASV_RE.search(text)
    if match is None:
        raise FtpSyntaxError("no h1,h2,h3,h4,p1,p2 address in PASV reply")
    return _host_port_fields(match.group(1).split(","), "PASV reply")


def _ipv4(ip: str) -> ipaddress.IPv4Address:
    try:
        return ipaddress.IPv4Address(ip)
    except ValueError:
        raise ValueError(f"PASV needs an IPv4 address, not {ip!r}") from None


def format_pasv_reply(ip: str, port: int) -> bytes:
    """The proxy's ``227 Entering Passive Mode (h1,h2,h3,h4,p1,p2).`` reply line."""
    if not 1 <= port <= 65535:
        raise ValueError(f"invalid port {port}")
    h = str(_ipv4(ip)).replace(".", ",")
    return format_reply(227, f"Entering Passive Mode ({h},{port >> 8},{port & 0xFF}).")


_EPSV_RE = re.compile(r"\(([!-~])\1\1([0-9]+)\1\)")


def parse_epsv_reply(text: str) -> int:
    """The port from a 229 reply's text, ``Entering Extended Passive Mode (|||port|)``.

    Any delimiter character 33-126 is accepted (RFC 2428); the address fields must be empty.
    """
    match = _EPSV_RE.search(text)
    if match is None:
        raise FtpSyntaxError("no (|||port|) in EPSV reply")
    return _port(match.group(2))


def format_epsv_reply(port: int) -> bytes:
    """The proxy's ``229 Entering Extended Passive Mode (|||port|)`` reply line."""
    if not 1 <= port <= 65535:
        raise ValueError(f"invalid port {port}")
    return format_reply(229, f"Entering Extended Passive Mode (|||{port}|)")


def parse_port_argument(argument: str) -> tuple[str, int]:
    """``(ip, port)`` from a PORT argument ``h1,h2,h3,h4,p1,p2``."""
    return _host_port_fields(argument.strip().split(","), "PORT")


def parse_eprt_argument(argument: str) -> tuple[str, int]:
    """``(ip, port)`` from an EPRT argument ``<d>1<d>ipv4<d>port<d>`` or ``<d>2<d>ipv6<d>port<d>``.

    ``<d>`` is any character 33-126. IPv6 zone ids are refused; the ip comes back normalised.
    """
    argument = argument.strip()
    if not argument or not "!" <= argument[0] <= "~":
        raise FtpSyntaxError("EPRT: missing or invalid delimiter")
    fields = argument.split(argument[0])
    if len(fields) != 5 or fields[0] or fields[4]:
        raise FtpSyntaxError("EPRT: expected <d>proto<d>address<d>port<d>")
    proto, address, port = fields[1], fields[2], fields[3]
    try:
        if proto == "1":
            ip: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.IPv4Address(address)
        elif proto == "2":
            if "%" in address:
                raise ValueError
            ip = ipaddress.IPv6Address(address)
        else:
            raise FtpSyntaxError(f"EPRT: unsupported network protocol {proto!r}")
    except ValueError as exc:
        if isinstance(exc, FtpSyntaxError):
            raise
        raise FtpSyntaxError(f"EPRT: invalid address {address!r} for protocol {proto}") from None
    return str(ip), _port(port)


def active_target(client_control_ip: str, requested_ip: str, requested_port: int) -> tuple[str, int]:
    """Where to connect for a client's PORT/EPRT: always the client's own control address.

    ``requested_ip`` is deliberately ignored (FTP bounce: a client could otherwise make the
    proxy connect anywhere). Ports below 1024 raise :class:`BounceRefused`. An IPv4-mapped
    control address is returned as plain IPv4.
    """
    del requested_ip  # never used: the whole point
    if not 1024 <= requested_port <= 65535:
        raise BounceRefused(f"active-mode port {requested_port} refused")
    return str(canonical_ip(client_control_ip)), requested_port


def check_backend_passive(
    backend_ip: str, reply_ip: str, reply_port: int, *, allow_unspecified: bool = False
) -> tuple[str, int]:
    """Validate a backend's PASV answer; return ``(backend_ip, port)`` to connect to.

    The reply must name the backend's own address (compared after IPv4-mapped normalisation)
    and a port of 1024 or more, else :class:`PassiveAddressRefused`. ``0.0.0.0`` (a common
    quirk of servers bound to the wildcard address) is refused by default — connecting to it
    would reach the proxy's own host — and with ``allow_unspecified=True`` it means "same
    address". The address returned is always ``backend_ip``, never the reply's.
    """
    try:
        reply = canonical_ip(reply_ip)
    except ValueError:
        raise PassiveAddressRefused(f"backend passive address {reply_ip!r} is invalid") from None
    backend = canonical_ip(backend_ip)
    if reply != backend and not (allow_unspecified and reply.is_unspecified):
        raise PassiveAddressRefused(f"backend {backend} offered passive address {reply}")
    if not 1024 <= reply_port <= 65535:
        raise PassiveAddressRefused(f"backend {backend} offered passive port {reply_port}")
    return backend_ip, reply_port


# ---------------------------------------------------------------------------------------------
# Login policy: what the proxy answers itself before (and around) routing


@dataclass(frozen=True, slots=True)
class Respond:
    """Send this reply to the client (``text`` may hold ``\\n`` for a multi-line reply)."""

    code: int
    text: str


@dataclass(frozen=True, slots=True)
class RouteLogin:
    """Look up ``username``, connect to its host (if not already there), replay USER."""

    username: str


@dataclass(frozen=True, slots=True)
class Forward:
    """Not a login concern: hand the command to the routed session (relay / data channels)."""


@dataclass(frozen=True, slots=True)
class StartTls:
    """Send the reply, :meth:`CommandReader.discard_buffered`, then start TLS with the client."""

    code: int
    text: str


@dataclass(frozen=True, slots=True)
class Close:
    """Send the reply and close the connection."""

    code: int
    text: str


Action = Respond | RouteLogin | Forward | StartTls | Close

_TLS_MECHANISMS = frozenset({"TLS", "SSL", "TLS-C", "TLS-P"})
_FEATURES = ("AUTH TLS", "PBSZ", "PROT", "UTF8", "EPRT", "EPSV", "PASV")


@dataclass(frozen=True, slots=True)
class LoginState:
    """The part of a control connection the proxy handles itself (immutable; see :func:`login_step`).

    ``tls_available``: the proxy has a certificate for explicit FTPS. ``tls_required``: USER is
    refused before ``AUTH TLS``. ``routed_user``: the last USER sent on to a backend.
    ``rejected_user``: the last USER was malformed; PASS then fails exactly like a wrong one.
    """

    tls_available: bool = True
    tls_required: bool = False
    tls: bool = False
    pbsz: bool = False
    prot: Literal["C", "P"] = "C"
    routed_user: str | None = None
    rejected_user: bool = False

    @property
    def routed(self) -> bool:
        """True once a USER has been routed to a backend."""
        return self.routed_user is not None


def login_step(state: LoginState, command: Command) -> tuple[LoginState, Action]:
    """Pure transition: what the proxy does with ``command`` in ``state``.

    * ``USER name`` → :class:`RouteLogin` if ``name`` matches the directory's username rule,
      else ``331`` now and ``530`` after PASS (identical to an unknown user).
    * ``PASS`` → :class:`Forward` once routed; ``530`` after a rejected USER; ``503`` before USER.
    * ``AUTH TLS|SSL`` → :class:`StartTls` (234) before USER; ``503`` once TLS is on or after USER;
      ``504`` for other mechanisms; ``502`` without a certificate.
    * ``PBSZ``/``PROT`` are always the proxy's (they protect the client ↔ proxy data channels):
      ``503`` before TLS or PROT before PBSZ; ``PBSZ n`` → ``200 PBSZ=0``; ``PROT C|P`` → 200;
      ``PROT S|E`` → 536. ``CCC`` (533) and ``REIN`` (502) are refused.
    * Before routing the proxy answers ``FEAT``, ``SYST``, ``NOOP``, ``OPTS UTF8 ON`` and ``QUIT``
      (:class:`Close`), and ``530 Please login with USER and PASS.`` to everything else.
    * After routing everything else is :class:`Forward`.
    """
    verb, arg = command.verb, command.argument.strip()
    if verb == "USER":
        return _user(state, arg)
    if verb == "PASS":
        if state.rejected_user:
            return replace(state, rejected_user=False), Respond(530, "Login incorrect.")
        if state.routed:
            return state, Forward()
        return state, Respond(503, "Login with USER first.")
    if verb == "AUTH":
        return _auth(state, arg.upper())
    if verb == "PBSZ":
        if not state.tls:
            return state, Respond(503, "PBSZ not allowed on insecure control connection.")
        if not (arg.isascii() and arg.isdigit()):
            return state, Respond(501, "PBSZ needs a decimal argument.")
        return replace(state, pbsz=True), Respond(200, "PBSZ=0")
    if verb == "PROT":
        return _prot(state, arg.upper())
    if verb == "CCC":
        return state, Respond(533, "CCC not allowed.")
    if verb == "REIN":
        return state, Respond(502, "REIN not implemented.")
    if state.routed:
        return state, Forward()
    if verb == "QUIT":
        return state, Close(221, "Goodbye.")
    if verb == "NOOP":
        return state, Respond(200, "NOOP ok.")
    if verb == "SYST":
        return state, Respond(215, "UNIX Type: L8")
    if verb == "FEAT":
        return state, Respond(211, "\n".join(["Features:", *(f" {f}" for f in _features(state)), "End"]))
    if verb == "OPTS":
        if " ".join(arg.upper().split()) in ("UTF8 ON", "UTF8"):
            return state, Respond(200, "Always in UTF8 mode.")
        return state, Respond(501, "Option not understood.")
    return state, Respond(530, "Please login with USER and PASS.")


def _features(state: LoginState) -> tuple[str, ...]:
    if state.tls_available:
        return _FEATURES
    return tuple(f for f in _FEATURES if f not in ("AUTH TLS", "PBSZ", "PROT"))


def _user(state: LoginState, name: str) -> tuple[LoginState, Action]:
    if not name:
        return state, Respond(501, "USER needs a user name.")
    if state.tls_required and not state.tls:
        return state, Respond(530, "Policy requires TLS: use AUTH TLS first.")
    if not USERNAME_RE.fullmatch(name):
        return replace(state, rejected_user=True), Respond(331, "Password required.")
    return replace(state, routed_user=name, rejected_user=False), RouteLogin(name)


def _auth(state: LoginState, mechanism: str) -> tuple[LoginState, Action]:
    if not state.tls_available:
        return state, Respond(502, "AUTH not available.")
    if mechanism not in _TLS_MECHANISMS:
        return state, Respond(504, "AUTH type not supported.")
    if state.tls:
        return state, Respond(503, "Already using TLS.")
    if state.routed or state.rejected_user:
        return state, Respond(503, "AUTH must come before USER.")
    return replace(state, tls=True, pbsz=False, prot="C"), StartTls(234, f"AUTH {mechanism} successful.")


def _prot(state: LoginState, level: str) -> tuple[LoginState, Action]:
    if not state.tls:
        return state, Respond(503, "PROT not allowed on insecure control connection.")
    if not state.pbsz:
        return state, Respond(503, "PBSZ required first.")
    if level in ("C", "P"):
        prot: Literal["C", "P"] = "P" if level == "P" else "C"
        return replace(state, prot=prot), Respond(200, f"Protection level set to {level}.")
    if level in ("S", "E"):
        return state, Respond(536, "Protection level not supported.")
    return state, Respond(504, "Unknown protection level.")
