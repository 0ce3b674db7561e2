"""ftpproxy.protocol: the sans-IO FTP control-channel rules, tested without any socket."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ftpproxy.protocol import (
    MAX_COMMAND_LINE,
    MAX_REPLY_BYTES,
    BadCommand,
    BounceRefused,
    Close,
    Command,
    CommandReader,
    CommandTooLong,
    Forward,
    FtpSyntaxError,
    LoginState,
    PassiveAddressRefused,
    ProtocolError,
    Reply,
    ReplyReader,
    Respond,
    RouteLogin,
    StartTls,
    active_target,
    check_backend_passive,
    format_command,
    format_epsv_reply,
    format_pasv_reply,
    format_reply,
    login_step,
    parse_eprt_argument,
    parse_epsv_reply,
    parse_pasv_reply,
    parse_port_argument,
)


def feed_all(data: bytes) -> list[object]:
    return list(CommandReader().feed(data))


def feed_bytewise(data: bytes) -> list[object]:
    reader = CommandReader()
    events: list[object] = []
    for i in range(len(data)):
        events += reader.feed(data[i : i + 1])
    return events


# --- CommandReader ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"USER alice\r\n", [Command("USER", "alice")]),
        (b"user alice\r\n", [Command("USER", "alice")]),
        (b"user alice\n", []),  # a bare LF does not end a line
        (b"NOOP\r\n", [Command("NOOP", "")]),
        (b"STOR my file.txt\r\n", [Command("STOR", "my file.txt")]),
        (b"CWD  two spaces\r\n", [Command("CWD", " two spaces")]),
        ("RETR ファイル.txt\r\n".encode(), [Command("RETR", "ファイル.txt")]),
        (b"NOOP\r\nSYST\nQUIT\r\n", [Command("NOOP"), BadCommand("bare LF in command line")]),
        (b"NOOP", []),  # incomplete line: nothing yet
        (b"\r\n", [BadCommand("empty command line")]),
        (b"NO\r\n", [BadCommand("malformed command verb")]),
        (b"XXXXX\r\n", [BadCommand("malformed command verb")]),
        (b"US3R a\r\n", [BadCommand("malformed command verb")]),
        (b"RETR \xff\xfe\x01\r\n", [Command("RETR", "")]),  # IAC DONT x stripped: see IAC tests
        (b"RETR \xff\xfe\r\n", []),  # IAC DONT takes the CR as its option: the LF is bare
    ],
)
def test_command_table(data: bytes, expected: list[object]) -> None:
    assert feed_all(data) == expected
    assert feed_bytewise(data) == expected


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"\xff\xf4\xff\xf2ABOR\r\n", [Command("ABOR")]),  # IAC IP, IAC DM (RFC 959 abort)
        (b"NO\xff\xfb\x01OP\r\n", [Command("NOOP")]),  # IAC WILL ECHO mid-line
        (b"NO\xff\xfd\x0aOP\r\n", [Command("NOOP")]),  # IAC DO <LF>: option byte is not a newline
        (b"NO\xff\xfe\x0dOP\r\n", [Command("NOOP")]),  # IAC DONT <CR>
        (b"NO\xff\xfc\xffOP\r\n", [Command("NOOP")]),  # IAC WONT 255
        (b"MKD a\xff\xffb\r\n", [BadCommand("command line is not valid UTF-8 (RFC 2640)")]),
        ("MKD é".encode()[:-1] + b"\xff\xff" + b"\r\n", [BadCommand(
            "command line is not valid UTF-8 (RFC 2640)")]),
        (b"\xff\xf1NOOP\r\n", [Command("NOOP")]),  # IAC NOP
        (b"\xff", []),
    ],
)
def test_iac_handling(data: bytes, expected: list[object]) -> None:
    assert feed_all(data) == expected
    assert feed_bytewise(data) == expected


def test_iac_iac_is_a_literal_ff_byte() -> None:
    reader = CommandReader()
    # No UTF-8 text contains 0xFF, so a literal 0xFF ends in BadCommand; IAC IAC must still yield
    # exactly one byte and not swallow the byte after it (the next command parses normally).
    events = reader.feed(b"MKD \xff\xffab\r\nNOOP\r\n")
    assert events == [BadCommand("command line is not valid UTF-8 (RFC 2640)"), Command("NOOP")]


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"USER a\x00b\r\n", "NUL byte in command line"),
        (b"USER a\rPASS b\r\n", "stray CR in command line"),
        (b"USER a\r\r\n", "stray CR in command line"),
        (b"RETR \xc3\x28\r\n", "command line is not valid UTF-8 (RFC 2640)"),
        # A bare LF never ends a command: the whole line up to CRLF is one refused line.
        (b"PASS secret\nDELE hello.txt\r\n", "bare LF in command line"),
        (b"USER a\n\r\n", "bare LF in command line"),
        (b"\nDELE x\r\n", "bare LF in command line"),
        (b"NOOP\xff\r\nDELE x\r\n", "bare LF in command line"),  # IAC CR: the CR is telnet's
        (b"NOOP\r\xff\xff\nDELE x\r\n", "stray CR in command line"),  # CR, literal 0xFF, LF
    ],
)
def test_injection_refused(data: bytes, reason: str) -> None:
    assert feed_all(data) == [BadCommand(reason)]
    assert feed_bytewise(data) == [BadCommand(reason)]


@pytest.mark.parametrize("terminator", [b"\r\n", b"\r\xff\xf1\n"])
def test_line_limit_boundary(terminator: bytes) -> None:
    ok = b"STOR " + b"a" * (MAX_COMMAND_LINE - 5)
    assert len(ok) == MAX_COMMAND_LINE
    assert feed_all(ok + terminator) == [Command("STOR", "a" * (MAX_COMMAND_LINE - 5))]
    too_long = ok + b"a"
    for feed in (feed_all, feed_bytewise):
        assert feed(too_long + terminator + b"NOOP\r\n") == [CommandTooLong(), Command("NOOP")]


def test_too_long_line_rest_is_not_interpreted() -> None:
    # The tail of an over-long line looks like a command; it must be discarded, not parsed.
    data = b"SITE " + b"x" * 5000 + b"\r\nDELE everything\r\nNOOP\r\n"
    reader = CommandReader()
    events = reader.feed(data[:3000]) + reader.feed(data[3000:])
    assert events == [CommandTooLong(), Command("DELE", "everything"), Command("NOOP")]
    data = b"SITE " + b"x" * 5000 + b"DELE everything\r\nNOOP\r\n"
    assert feed_all(data) == [CommandTooLong(), Command("NOOP")]
    assert feed_bytewise(data) == [CommandTooLong(), Command("NOOP")]


def test_too_long_line_reported_before_terminator_and_memory_bounded() -> None:
    reader = CommandReader()
    assert reader.feed(b"A" * (MAX_COMMAND_LINE + 2)) == [CommandTooLong()]
    for _ in range(100):
        assert reader.feed(b"B" * 10_000) == []
    assert reader.discard_buffered() == 0  # nothing kept of the over-long line
    assert reader.feed(b"x\r\nNOOP\r\n") == [BadCommand("malformed command verb"), Command("NOOP")]


def test_iac_does_not_count_towards_line_limit() -> None:
    line = b"STOR " + b"a" * (MAX_COMMAND_LINE - 5)
    assert feed_all(b"\xff\xf1" * 100 + line + b"\r\n") == [Command("STOR", "a" * (MAX_COMMAND_LINE - 5))]


def test_auth_pauses_and_discard_drops_pipelined_plaintext() -> None:
    reader = CommandReader()
    rest = b"USER evil\r\nPASS x\r\n"
    assert reader.feed(b"AUTH TLS\r\n" + rest) == [Command("AUTH", "TLS")]
    assert reader.paused
    assert reader.feed(b"NOOP\r\n") == []
    assert reader.discard_buffered() == len(rest) + len(b"NOOP\r\n")
    assert not reader.paused
    assert reader.feed(b"USER alice\r\n") == [Command("USER", "alice")]


def test_auth_pause_bytewise_and_partial_line_dropped() -> None:
    reader = CommandReader()
    events: list[object] = []
    for byte in b"auth tls\r\nUSER ev":
        events += reader.feed(bytes([byte]))
    assert events == [Command("AUTH", "tls")]
    assert reader.discard_buffered() == len(b"USER ev")
    assert reader.feed(b"il\r\n") == [BadCommand("malformed command verb")]


def test_resume_after_refused_auth_parses_buffered_commands() -> None:
    reader = CommandReader()
    assert reader.feed(b"AUTH KERBEROS\r\nNOOP\r\nAUTH TLS\r\nSYST\r\n") == [Command("AUTH", "KERBEROS")]
    assert reader.resume() == [Command("NOOP"), Command("AUTH", "TLS")]
    assert reader.resume() == [Command("SYST")]


def test_paused_buffer_is_bounded() -> None:
    reader = CommandReader()
    reader.feed(b"AUTH TLS\r\n")
    with pytest.raises(ProtocolError):
        reader.feed(b"x" * (70 * 1024))


command_streams = st.lists(
    st.one_of(
        st.sampled_from([b"NOOP\r\n", b"USER bob\n", b"\xff\xf4", b"\xff\xfb\x01", b"\xff\xff", b"\r",
                         b"\n", b"\x00", b"RETR f\xc3\xa9\r\n", b"a" * 700, b"\xff"]),
        st.binary(max_size=40),
    ),
    max_size=12,
).map(b"".join)


@given(command_streams, st.lists(st.integers(min_value=1, max_value=50), max_size=30))
def test_any_chunking_gives_the_same_events(data: bytes, cuts: list[int]) -> None:
    data = data.replace(b"AUTH", b"HTUA").replace(b"auth", b"htua")  # pausing tested elsewhere
    whole = feed_all(data)
    reader = CommandReader()
    chunked: list[object] = []
    pos = 0
    for cut in cuts:
        chunked += reader.feed(data[pos : pos + cut])
        pos += cut
    chunked += reader.feed(data[pos:])
    assert chunked == whole
    assert feed_bytewise(data) == whole
    for event in whole:
        if isinstance(event, Command):
            assert "\r" not in event.argument and "\n" not in event.argument
            assert "\x00" not in event.argument


# --- format_command --------------------------------------------------------------------------


def test_format_command() -> None:
    assert format_command("user", "alice") == b"USER alice\r\n"
    assert format_command("PASV") == b"PASV\r\n"
    assert format_command("RETR", "é") == "RETR é\r\n".encode()
    for bad in ("a\r\nDELE x", "a\nb", "a\rb", "a\x00b"):
        with pytest.raises(ValueError):
            format_command("USER", bad)
    for verb in ("", "US ER", "USER\r\n", "TOOLONG", "U1"):
        with pytest.raises(ValueError):
            format_command(verb)


@given(st.sampled_from(["USER", "RETR", "STOR", "CWD"]),
       st.text(st.characters(codec="utf-8", exclude_characters="\r\n\x00"), max_size=50))
def test_format_command_round_trips(verb: str, argument: str) -> None:
    assert feed_all(format_command(verb, argument)) == [Command(verb, argument)]


# --- replies ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"220 Welcome\r\n", [Reply(220, ["Welcome"])]),
        (b"200\r\n", [Reply(200, [""])]),
        (b"211-Features:\r\n EPRT\r\n UTF8\r\n211 End\r\n",
         [Reply(211, ["Features:", " EPRT", " UTF8", "End"])]),
        (b"230-Hello\r\n230-more\r\n230 Done\r\n", [Reply(230, ["Hello", "230-more", "Done"])]),
        (b"230-a\r\n220 not the end\r\n230\r\n", [Reply(230, ["a", "220 not the end", ""])]),
        (b"150 Opening\r\n226 Done\r\n", [Reply(150, ["Opening"]), Reply(226, ["Done"])]),
        (b"257 \"/caf\xe9\" created\r\n", [Reply(257, ['"/caf\udce9" created'])]),
    ],
)
def test_reply_table(data: bytes, expected: list[Reply]) -> None:
    assert ReplyReader().feed(data) == expected
    reader = ReplyReader()
    bytewise: list[Reply] = []
    for byte in data:
        bytewise += reader.feed(bytes([byte]))
    assert bytewise == expected


@pytest.mark.parametrize("data", [b"hello\r\n", b"22 x\r\n", b"620 x\r\n", b"220x\r\n", b"220 a\x00\r\n",
                                  b"220 a\rb\r\n",
                                  # a bare LF never ends a reply line: no reply can be injected
                                  b"331 Password required\n",
                                  b'257 "/a\n226 Transfer complete." created\r\n',
                                  b"211-x\r\n a\n211 End\r\n"])
def test_malformed_reply(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        ReplyReader().feed(data)


def test_reply_size_limit() -> None:
    reader = ReplyReader()
    reader.feed(b"211-start\r\n")
    with pytest.raises(ProtocolError):
        for _ in range(MAX_REPLY_BYTES // 10 + 1):
            reader.feed(b"line lin\r\n")
    with pytest.raises(ProtocolError):
        ReplyReader().feed(b"220 " + b"x" * MAX_REPLY_BYTES)  # no terminator yet, already too big
    # a large reply under the limit is fine, and the counter resets per reply
    reader = ReplyReader()
    for _ in range(3):
        body = b"".join(b" line\r\n" for _ in range(MAX_REPLY_BYTES // 8))
        (reply,) = reader.feed(b"211-x\r\n" + body + b"211 end\r\n")
        assert reply.code == 211


def test_format_reply() -> None:
    assert format_reply(220, "Welcome") == b"220 Welcome\r\n"
    assert format_reply(211, ["Features:", " UTF8", "End"]) == b"211-Features:\r\n UTF8\r\n211 End\r\n"
    assert format_reply(230, "a\nb\r\nc") == b"230-a\r\nb\r\n230 c\r\n"
    # a digit-led intermediate line cannot close the reply early (reply injection)
    assert format_reply(230, "a\n226 Fake\nc") == b"230-a\r\n 226 Fake\r\n230 c\r\n"
    for bad in ("a\rb", "a\x00b"):
        with pytest.raises(ValueError):
            format_reply(200, bad)
    for lines in (["a\nb"], ["a", "b\r"], []):
        with pytest.raises(ValueError):
            format_reply(200, lines)
    for code in (99, 600, 0):
        with pytest.raises(ValueError):
            format_reply(code, "x")


reply_line = st.text(st.characters(codec="utf-8", exclude_characters="\r\n\x00"),
                     max_size=30)


@given(st.integers(min_value=100, max_value=599), st.lists(reply_line, min_size=1, max_size=6))
def test_reply_round_trip(code: int, lines: list[str]) -> None:
    (reply,) = ReplyReader().feed(format_reply(code, lines))
    assert reply.code == code
    expected = list(lines)
    for i in range(1, len(lines) - 1):
        if lines[i][:1].isdigit():
            expected[i] = " " + lines[i]
    assert reply.lines == expected


def test_reply_non_utf8_round_trips() -> None:
    raw = b"257 \"/caf\xe9\"\r\n"
    (reply,) = ReplyReader().feed(raw)
    assert format_reply(reply.code, reply.lines) == raw


# --- addresses -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Entering Passive Mode (192,168,1,2,4,1).", ("192.168.1.2", 1025)),
        ("227 Entering Passive Mode (10,0,0,1,255,255)", ("10.0.0.1", 65535)),
        ("=127,0,0,1,200,10", ("127.0.0.1", 51210)),
        ("Entering Passive Mode (10, 0, 0, 1, 4, 0)", ("10.0.0.1", 1024)),
    ],
)
def test_parse_pasv_reply(text: str, expected: tuple[str, int]) -> None:
    assert parse_pasv_reply(text) == expected


@pytest.mark.parametrize("text", ["Entering Passive Mode", "(1,2,3,4,5)", "(256,0,0,1,4,1)", "(1,2,3,4,0,0)",
                                  "(1,2,3,4,5,999)", "(1,2,3,4,0001,1)"])
def test_parse_pasv_reply_malformed(text: str) -> None:
    with pytest.raises(FtpSyntaxError):
        parse_pasv_reply(text)


def test_format_pasv_reply() -> None:
    assert format_pasv_reply("203.0.113.5", 50001) == b"227 Entering Passive Mode (203,0,113,5,195,81).\r\n"
    for ip, port in (("::1", 5000), ("1.2.3.4", 0), ("1.2.3.4", 65536), ("nope", 5000)):
        with pytest.raises(ValueError):
            format_pasv_reply(ip, port)


@given(st.ip_addresses(v=4), st.integers(min_value=1, max_value=65535))
def test_pasv_round_trip(ip: object, port: int) -> None:
    (reply,) = ReplyReader().feed(format_pasv_reply(str(ip), port))
    assert reply.code == 227
    assert parse_pasv_reply(reply.text) == (str(ip), port)


@pytest.mark.parametrize(
    ("text", "port"),
    [("Entering Extended Passive Mode (|||6446|)", 6446), ("229 ok (!!!1!)", 1), ("(###65535#)", 65535)],
)
def test_parse_epsv_reply(text: str, port: int) -> None:
    assert parse_epsv_reply(text) == port


@pytest.mark.parametrize("text", ["Entering Extended Passive Mode", "(||6446|)", "(|||0|)", "(|||65536|)",
                                  "(|1|2|6446|)", "(|||6446!)", "(   6446 )", "(|||12345678|)"])
def test_parse_epsv_reply_malformed(text: str) -> None:
    with pytest.raises(FtpSyntaxError):
        parse_epsv_reply(text)


@given(st.integers(min_value=1, max_value=65535))
def test_epsv_round_trip(port: int) -> None:
    (reply,) = ReplyReader().feed(format_epsv_reply(port))
    assert reply.code == 229
    assert parse_epsv_reply(reply.text) == port


@pytest.mark.parametrize(
    ("arg", "expected"),
    [("192,168,0,10,19,137", ("192.168.0.10", 5001)), (" 1,2,3,4,0,1 ", ("1.2.3.4", 1))],
)
def test_parse_port_argument(arg: str, expected: tuple[str, int]) -> None:
    assert parse_port_argument(arg) == expected


@pytest.mark.parametrize("arg", ["", "1,2,3,4,5", "1,2,3,4,5,6,7", "1,2,3,256,0,21", "a,b,c,d,e,f",
                                 "1,2,3,4,0,0", "1,2,3,-4,0,21", "1,2,3,4,+1,1",
                                 "\u0661,2,3,4,5,6"])
def test_parse_port_argument_malformed(arg: str) -> None:
    with pytest.raises(FtpSyntaxError):
        parse_port_argument(arg)


@given(st.ip_addresses(v=4), st.integers(min_value=1, max_value=65535))
def test_port_round_trip(ip: object, port: int) -> None:
    arg = f"{str(ip).replace('.', ',')},{port >> 8},{port & 255}"
    assert parse_port_argument(arg) == (str(ip), port)


@pytest.mark.parametrize(
    ("arg", "expected"),
    [
        ("|1|132.235.1.2|6275|", ("132.235.1.2", 6275)),
        ("|2|1080::8:800:200C:417A|5282|", ("1080::8:800:200c:417a", 5282)),
        ("!2!::1!2121!", ("::1", 2121)),
        ("~1~10.0.0.1~65535~", ("10.0.0.1", 65535)),
    ],
)
def test_parse_eprt_argument(arg: str, expected: tuple[str, int]) -> None:
    assert parse_eprt_argument(arg) == expected


@pytest.mark.parametrize("arg", ["", "|1|1.2.3.4|5|6|", "|1|1.2.3.4|5", "1|1|1.2.3.4|5|", "|3|1.2.3.4|5|",
                                 "|1|::1|5000|", "|2|1.2.3.4|5000|", "|1|1.2.3.4|0|", "|1|1.2.3.4|65536|",
                                 "|1|1.2.3.256|5000|", "|2|fe80::1%eth0|5000|", " |1|1.2.3.4|x|",
                                 "\x7f1\x7f1.2.3.4\x7f5000\x7f"])
def test_parse_eprt_argument_malformed(arg: str) -> None:
    with pytest.raises(FtpSyntaxError):
        parse_eprt_argument(arg)


@given(st.ip_addresses(), st.integers(min_value=1, max_value=65535),
       st.sampled_from("|!#$%&'()*+,-/;<=>?@[\\]^_`{}~"))
def test_eprt_round_trip(ip: object, port: int, d: str) -> None:
    proto = 1 if ":" not in str(ip) else 2
    assert parse_eprt_argument(f"{d}{proto}{d}{ip}{d}{port}{d}") == (str(ip), port)


# --- policy ----------------------------------------------------------------------------------


def test_active_target_ignores_requested_ip() -> None:
    assert active_target("198.51.100.7", "10.0.0.1", 5001) == ("198.51.100.7", 5001)
    assert active_target("::ffff:198.51.100.7", "127.0.0.1", 1024) == ("198.51.100.7", 1024)
    assert active_target("2001:db8::1", "2001:db8::2", 65535) == ("2001:db8::1", 65535)


@pytest.mark.parametrize("port", [0, 1, 21, 22, 25, 1023, 65536])
def test_active_target_refuses_privileged_ports(port: int) -> None:
    with pytest.raises(BounceRefused):
        active_target("198.51.100.7", "198.51.100.7", port)


def test_check_backend_passive() -> None:
    assert check_backend_passive("10.1.0.5", "10.1.0.5", 40000) == ("10.1.0.5", 40000)
    assert check_backend_passive("10.1.0.5", "::ffff:10.1.0.5", 40000) == ("10.1.0.5", 40000)
    assert check_backend_passive("10.1.0.5", "0.0.0.0", 40000, allow_unspecified=True) == ("10.1.0.5", 40000)


@pytest.mark.parametrize(
    ("reply_ip", "port"),
    [("10.1.0.6", 40000), ("127.0.0.1", 40000), ("0.0.0.0", 40000), ("169.254.169.254", 40000),
     ("10.1.0.5", 22), ("10.1.0.5", 0), ("10.1.0.5", 70000), ("garbage", 40000)],
)
def test_check_backend_passive_refused(reply_ip: str, port: int) -> None:
    with pytest.raises(PassiveAddressRefused):
        check_backend_passive("10.1.0.5", reply_ip, port)


# --- login state machine ---------------------------------------------------------------------


def run(commands: list[str], state: LoginState | None = None) -> tuple[LoginState, list[object]]:
    state = state or LoginState()
    actions: list[object] = []
    for line in commands:
        verb, _, arg = line.partition(" ")
        state, action = login_step(state, Command(verb, arg))
        actions.append(action)
    return state, actions


@pytest.mark.parametrize(
    ("commands", "expected"),
    [
        (["USER alice"], [RouteLogin("alice")]),
        (["USER alice", "PASS secret", "LIST"], [RouteLogin("alice"), Forward(), Forward()]),
        (["PASS x"], [Respond(503, "Login with USER first.")]),
        (["LIST"], [Respond(530, "Please login with USER and PASS.")]),
        (["RETR /etc/passwd"], [Respond(530, "Please login with USER and PASS.")]),
        (["USER bad/name", "PASS x"], [Respond(331, "Password required."), Respond(530, "Login incorrect.")]),
        (["USER ../x"], [Respond(331, "Password required.")]),
        (["USER"], [Respond(501, "USER needs a user name.")]),
        (["SYST", "NOOP", "OPTS UTF8 ON", "OPTS MLST type"],
         [Respond(215, "UNIX Type: L8"), Respond(200, "NOOP ok."), Respond(200, "Always in UTF8 mode."),
          Respond(501, "Option not understood.")]),
        (["QUIT"], [Close(221, "Goodbye.")]),
        (["USER alice", "QUIT"], [RouteLogin("alice"), Forward()]),
        (["PBSZ 0"], [Respond(503, "PBSZ not allowed on insecure control connection.")]),
        (["PROT P"], [Respond(503, "PROT not allowed on insecure control connection.")]),
        (["AUTH TLS", "PROT P"],
         [StartTls(234, "AUTH TLS successful."), Respond(503, "PBSZ required first.")]),
        (["AUTH TLS", "PBSZ 0", "PROT P", "USER alice", "PASS x"],
         [StartTls(234, "AUTH TLS successful."), Respond(200, "PBSZ=0"),
          Respond(200, "Protection level set to P."), RouteLogin("alice"), Forward()]),
        (["AUTH SSL"], [StartTls(234, "AUTH SSL successful.")]),
        (["AUTH tls", "AUTH TLS"],
         [StartTls(234, "AUTH TLS successful."), Respond(503, "Already using TLS.")]),
        (["AUTH GSSAPI"], [Respond(504, "AUTH type not supported.")]),
        (["USER alice", "AUTH TLS"], [RouteLogin("alice"), Respond(503, "AUTH must come before USER.")]),
        (["AUTH TLS", "PBSZ x"],
         [StartTls(234, "AUTH TLS successful."), Respond(501, "PBSZ needs a decimal argument.")]),
        (["AUTH TLS", "PBSZ 0", "PROT S", "PROT Q"],
         [StartTls(234, "AUTH TLS successful."), Respond(200, "PBSZ=0"),
          Respond(536, "Protection level not supported."), Respond(504, "Unknown protection level.")]),
        (["USER alice", "CCC", "REIN"], [RouteLogin("alice"), Respond(533, "CCC not allowed."),
                                         Respond(502, "REIN not implemented.")]),
    ],
)
def test_login_transitions(commands: list[str], expected: list[object]) -> None:
    assert run(commands)[1] == expected


def test_login_state_fields() -> None:
    state, _ = run(["AUTH TLS", "PBSZ 0", "PROT P", "USER alice"])
    assert state.tls and state.pbsz and state.prot == "P" and state.routed_user == "alice" and state.routed
    state, _ = run(["PROT C"], state)
    assert state.prot == "C"
    assert run(["USER x/y"])[0].rejected_user
    assert not run(["USER x/y", "USER alice"])[0].rejected_user


def test_pbsz_prot_are_never_forwarded_after_login() -> None:
    # they protect the client <-> proxy data channels, so the proxy always answers them itself
    state, actions = run(["AUTH TLS", "USER alice", "PASS x", "PBSZ 0", "PROT P", "FEAT"])
    assert actions[3:] == [Respond(200, "PBSZ=0"), Respond(200, "Protection level set to P."), Forward()]
    assert state.prot == "P"


def test_tls_required_and_unavailable() -> None:
    required = LoginState(tls_required=True)
    assert run(["USER alice"], required)[1] == [Respond(530, "Policy requires TLS: use AUTH TLS first.")]
    assert run(["AUTH TLS", "USER alice"], required)[1][1] == RouteLogin("alice")
    no_tls = LoginState(tls_available=False)
    assert run(["AUTH TLS"], no_tls)[1] == [Respond(502, "AUTH not available.")]
    (feat,) = run(["FEAT"], no_tls)[1]
    assert isinstance(feat, Respond) and "AUTH" not in feat.text


def test_feat_before_login_is_a_valid_multiline_reply() -> None:
    (action,) = run(["FEAT"])[1]
    assert isinstance(action, Respond)
    (reply,) = ReplyReader().feed(format_reply(action.code, action.text))
    assert reply.code == 211
    assert " AUTH TLS" in reply.lines and " EPSV" in reply.lines


@given(st.lists(st.tuples(st.sampled_from(["USER", "PASS", "AUTH", "PBSZ", "PROT", "FEAT", "SYST", "QUIT",
                                           "NOOP", "OPTS", "LIST", "RETR", "CCC", "REIN"]),
                          st.sampled_from(["", "alice", "TLS", "0", "P", "C", "bad name", "UTF8 ON"])),
                max_size=12))
def test_login_invariants(steps: list[tuple[str, str]]) -> None:
    state = LoginState()
    for verb, arg in steps:
        before = state
        state, action = login_step(state, Command(verb, arg))
        if not before.routed and verb not in ("USER", "PASS"):
            assert not isinstance(action, Forward | RouteLogin)  # nothing reaches a backend pre-login
        if isinstance(action, RouteLogin):
            assert action.username == arg.strip() and " " not in action.username
        if state.prot == "P" or state.pbsz:
            assert state.tls
        if isinstance(action, StartTls):
            assert not before.tls and not before.routed


# --- reader + login state machine together -----------------------------------------------------

login_lines = st.sampled_from([
    "AUTH TLS", "AUTH SSL", "AUTH GSSAPI", "AUTH", "auth tls", "USER alice", "USER bad/name", "USER",
    "PASS x", "OPTS UTF8 ON", "OPTS MLST type", "FEAT", "SYST", "NOOP", "PBSZ 0", "PBSZ x", "PROT P",
    "PROT S", "CCC", "REIN", "LIST", "RETR f", "PASV", "PORT 1,2,3,4,5,6", "ABOR", "SITE HELP", "QUIT",
])


@given(st.lists(login_lines, max_size=15), st.sampled_from([(True, False), (True, True), (False, False)]))
def test_every_pipelined_command_gets_exactly_one_action(lines: list[str],
                                                         tls: tuple[bool, bool]) -> None:
    """However a client pipelines its login (one segment, as lftp does), each command yields one
    action, in order, until TLS starts or the session closes: none is left waiting unanswered
    (a refused AUTH once left the reader paused and the client without any further reply)."""
    reader = CommandReader()
    state = LoginState(tls_available=tls[0], tls_required=tls[1])
    pending = list(reader.feed(b"".join(line.encode() + b"\r\n" for line in lines)))
    handled: list[str] = []
    ended = False  # TLS started (the rest is discarded) or the session closed
    while pending and not ended:
        event = pending.pop(0)
        assert isinstance(event, Command)
        state, action = login_step(state, event)
        handled.append(f"{event.verb} {event.argument}".strip())
        if isinstance(action, Respond | StartTls | Close):
            assert 100 <= action.code <= 599
        pending[:0] = reader.after(event, action)
        ended = isinstance(action, StartTls | Close)
    assert [h.upper() for h in handled] == [line.upper() for line in lines[:len(handled)]]
    if not ended:
        assert len(handled) == len(lines) and not reader.paused
