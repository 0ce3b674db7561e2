"""FTP control-stream readers and address parsers (ftpproxy/protocol.py).

Properties: the command reader never raises (bad lines are BadCommand/CommandTooLong events),
gives the same events in any chunking, every Command has a 3-4 letter upper-case verb and an
argument without CR/LF/NUL that ``format_command`` writes back unchanged, and no line longer
than the limit gets through; the reply reader raises only ProtocolError; PORT/EPRT/PASV/EPSV
parsers raise only FtpSyntaxError, and what they accept formats back."""

from __future__ import annotations

import contextlib
import sys

from _harness import chunks, instrumented, main, split

with instrumented("ftpproxy.protocol"):
    from ftpproxy.protocol import (
        MAX_COMMAND_LINE,
        BounceRefused,
        Command,
        CommandEvent,
        CommandReader,
        FtpSyntaxError,
        ProtocolError,
        ReplyReader,
        active_target,
        format_command,
        parse_eprt_argument,
        parse_epsv_reply,
        parse_pasv_reply,
        parse_port_argument,
    )


def read_commands(pieces: list[bytes]) -> list[CommandEvent]:
    reader = CommandReader()
    events: list[CommandEvent] = []
    for piece in pieces:
        events += reader.feed(piece)
        if reader.paused:  # after AUTH: as if refused, go on (the TLS path drops the rest)
            events += reader.resume()
    return events


def check_commands(steer: bytes, payload: bytes) -> None:
    whole = read_commands([payload])
    assert read_commands(chunks(payload, steer)) == whole
    for event in whole:
        if isinstance(event, Command):
            assert 3 <= len(event.verb) <= 4 and event.verb.isascii() and event.verb.isupper()
            assert not {"\r", "\n", "\x00"} & set(event.argument), event
            line = format_command(event.verb, event.argument)
            assert len(line) <= MAX_COMMAND_LINE + 2 + 1, len(line)  # +1: the space may be added
            assert read_commands([line]) == [event] or event.verb == "AUTH"


def check_replies(steer: bytes, payload: bytes) -> None:
    reader = ReplyReader(max_reply_bytes=4096)
    try:
        for piece in chunks(payload, steer):
            for reply in reader.feed(piece):
                assert 100 <= reply.code <= 599
    except ProtocolError:
        pass


def check_addresses(payload: bytes) -> None:
    text = payload.decode("utf-8", "replace")
    for parse in (parse_port_argument, parse_eprt_argument, parse_pasv_reply):
        try:
            ip, port = parse(text)
        except FtpSyntaxError:
            continue
        assert 1 <= port <= 65535
        try:
            target = active_target("192.0.2.9", ip, port)
        except BounceRefused:
            assert port < 1024
        else:
            assert target == ("192.0.2.9", port)  # never the address the client asked for
    with contextlib.suppress(FtpSyntaxError):
        assert 1 <= parse_epsv_reply(text) <= 65535


def check(data: bytes) -> None:
    steer, payload = split(data)
    check_commands(steer, payload)
    check_replies(steer, payload)
    check_addresses(payload)


def seeds() -> list[bytes]:
    return [
        b"\x02\x03\x05USER alice\r\nPASS secret\r\nSYST\r\nFEAT\r\nPASV\r\nLIST\r\nQUIT\r\n",
        b"\x00AUTH TLS\r\nUSER x\r\n",
        b"\x00PORT 127,0,0,1,200,10\r\n",
        b"\x00|1|192.0.2.1|4000|",
        b"\x00|2|::1|4000|",
        b"\x00227 Entering Passive Mode (127,0,0,1,4,1).\r\n",
        b"\x00229 Entering Extended Passive Mode (|||6446|)\r\n",
        b"\x00220-hello\r\n220 there\r\n",
        b"\x00\xff\xfb\x01NOOP\xff\xff\r\n",
        b"\x00RETR " + b"a" * 2100 + b"\r\nNOOP\r\n",
    ]


if __name__ == "__main__":
    main(check)
    sys.exit(0)
