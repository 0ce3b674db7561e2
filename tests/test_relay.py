"""The byte relay, over real loopback sockets: data integrity, back-pressure, half-close,
idle timeout, connect errors, counters, TLS upstreams, and the uvloop event loop."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import errno
import hashlib
import os
import random
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import pytest
import uvloop

from edge.relay import Relay, RelayConnectError, RelayResult, SplicePump, open_relay

MiB = 1024 * 1024
LOCAL = "127.0.0.1"


# -- harness ----------------------------------------------------------------------------------


class Handover(asyncio.Protocol):
    """Stands in for a proxy protocol (FTP, HTTP) that accepts a client and later hands the
    transport to a relay. Records what it reads itself."""

    def __init__(self, accepted: asyncio.Queue[Handover]) -> None:
        self.accepted = accepted
        self.transport: asyncio.Transport | None = None
        self.received = bytearray()
        self.lost = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only look-alikes
        self.transport = cast(asyncio.Transport, transport)
        self.accepted.put_nowait(self)

    def data_received(self, data: bytes) -> None:
        self.received += data

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)


@dataclass
class Front:
    """A listener whose accepted connections are handed over to relays."""

    port: int
    accepted: asyncio.Queue[Handover] = field(default_factory=asyncio.Queue)

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, Handover]:
        reader, writer = await asyncio.open_connection(LOCAL, self.port)
        accepted = await asyncio.wait_for(self.accepted.get(), 10)
        return reader, writer, accepted


@pytest.fixture
async def front() -> AsyncIterator[Front]:
    loop = asyncio.get_running_loop()
    holder: list[Front] = []
    server = await loop.create_server(lambda: Handover(holder[0].accepted), LOCAL, 0)
    holder.append(Front(server.sockets[0].getsockname()[1]))
    async with server:
        yield holder[0]


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def start_upstream(handler: Handler) -> tuple[asyncio.Server, int]:
    server = await asyncio.start_server(handler, LOCAL, 0)
    return server, server.sockets[0].getsockname()[1]


async def echo_until_eof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while chunk := await reader.read(256 * 1024):
        writer.write(chunk)
        await writer.drain()
    writer.close()


async def send_all(writer: asyncio.StreamWriter, data: bytes, chunk: int = 1 * MiB) -> None:
    view = memoryview(data)
    for i in range(0, len(data), chunk):
        writer.write(view[i : i + chunk])
        await writer.drain()
    writer.write_eof()


async def read_all(reader: asyncio.StreamReader) -> tuple[int, str]:
    digest = hashlib.sha256()
    total = 0
    while chunk := await reader.read(1 * MiB):
        digest.update(chunk)
        total += len(chunk)
    return total, digest.hexdigest()


def payload(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOCAL, 0))
        port: int = s.getsockname()[1]
        return port


# -- data integrity ---------------------------------------------------------------------------


async def relay_echo_transfer(front: Front, size: int) -> RelayResult:
    server, port = await start_upstream(echo_until_eof)
    async with server:
        reader, writer, accepted = await front.connect()
        assert accepted.transport is not None
        relay = await open_relay(accepted.transport, LOCAL, port)
        data = payload(size, seed=size)
        _, (got, digest) = await asyncio.gather(send_all(writer, data), read_all(reader))
        writer.close()
        assert got == size
        assert digest == hashlib.sha256(data).hexdigest()
        return await asyncio.wait_for(relay.wait(), 30)


@pytest.mark.asyncio
async def test_64_mib_each_way_arrives_intact(front: Front) -> None:
    result = await relay_echo_transfer(front, 64 * MiB)
    assert result == RelayResult(64 * MiB, 64 * MiB, "eof")


def test_transfer_and_half_close_under_uvloop() -> None:
    # Production runs on uvloop, whose transports are separate code from asyncio's.
    async def main() -> RelayResult:
        loop = asyncio.get_running_loop()
        holder: list[Front] = []
        server = await loop.create_server(lambda: Handover(holder[0].accepted), LOCAL, 0)
        holder.append(Front(server.sockets[0].getsockname()[1]))
        async with server:
            return await relay_echo_transfer(holder[0], 16 * MiB)

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        result = runner.run(main())
    assert result == RelayResult(16 * MiB, 16 * MiB, "eof")


@pytest.mark.asyncio
async def test_attach_two_open_transports_with_initial_bytes(front: Front) -> None:
    # e.g. an FTP data channel: both ends already accepted by the proxy.
    reader_x, writer_x, x = await front.connect()
    reader_y, writer_y, y = await front.connect()
    writer_x.write(b"read by the old protocol ")
    for _ in range(200):  # bounded wait until the old protocol has read it
        if x.received:
            break
        await asyncio.sleep(0.01)
    assert x.transport is not None and y.transport is not None
    relay = Relay.attach(
        x.transport,
        y.transport,
        initial_a_to_b=bytes(x.received),
        initial_b_to_a=b"hello x ",
        names=("client", "data"),
    )
    writer_x.write(b"then relayed")
    writer_x.write_eof()
    writer_y.write(b"from y")
    writer_y.write_eof()
    assert await reader_y.read() == b"read by the old protocol then relayed"
    assert await reader_x.read() == b"hello x from y"
    result = await asyncio.wait_for(relay.wait(), 10)
    assert result == RelayResult(37, 14, "eof")
    writer_x.close()
    writer_y.close()


async def test_one_way_relay_ends_at_the_first_eof_after_delivering_everything(
        front: Front) -> None:
    # An FTP download: the data side sends a file and EOF; the client never sends EOF, yet
    # the transfer must end (and the client see all bytes, then EOF) for the 226 to follow.
    reader_x, writer_x, x = await front.connect()
    _reader_y, writer_y, y = await front.connect()
    assert x.transport is not None and y.transport is not None
    relay = Relay.attach(x.transport, y.transport, one_way=True, names=("client", "data"))
    payload = bytes(range(256)) * 4096
    writer_y.write(payload)
    writer_y.write_eof()
    result = await asyncio.wait_for(relay.wait(), 10)
    assert result.reason == "eof"
    assert result.bytes_b_to_a == len(payload)
    assert await asyncio.wait_for(reader_x.read(), 10) == payload
    writer_x.close()
    writer_y.close()


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as server:
        a = socket.create_connection(server.getsockname())
        b, _ = server.accept()
    return a, b


@pytest.mark.skipif(not SplicePump.available(), reason="splice(2) is Linux-only")
async def test_splice_pump_moves_a_stream_then_eof_and_a_stall_is_idle() -> None:
    loop = asyncio.get_running_loop()
    src_peer, src = _tcp_pair()
    sink, sink_peer = _tcp_pair()
    for s in (src_peer, sink_peer):
        s.setblocking(False)
    pump = SplicePump(src, sink, idle_timeout=5)
    payload = os.urandom(8 << 20)
    sender = loop.create_task(loop.sock_sendall(src_peer, payload))
    received = bytearray()
    while chunk := await asyncio.wait_for(loop.sock_recv(sink_peer, 1 << 20), 10):
        received += chunk
        if len(received) == len(payload):
            src_peer.shutdown(socket.SHUT_WR)
    await sender
    assert (await asyncio.wait_for(pump.wait(), 10)) == (len(payload), "eof")
    assert bytes(received) == payload
    src_peer.close()
    sink_peer.close()

    # A source that sends nothing: the pump gives up at the idle timeout and resets both
    # sides, so a reader never takes a truncated stream for a complete one.
    quiet, src = _tcp_pair()
    sink, reader = _tcp_pair()
    pump = SplicePump(src, sink, idle_timeout=0.2)
    assert (await asyncio.wait_for(pump.wait(), 10)) == (0, "idle")
    reader.setblocking(False)
    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(loop.sock_recv(reader, 10), 5)
    quiet.close()
    reader.close()


# -- back-pressure ----------------------------------------------------------------------------


class SlowReader(asyncio.Protocol):
    """An upstream that reads nothing until told to, then hashes everything."""

    def __init__(self, connected: asyncio.Queue[SlowReader]) -> None:
        self.connected = connected
        self.transport: asyncio.Transport | None = None
        self.digest = hashlib.sha256()
        self.total = 0
        self.eof = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.pause_reading()
        self.connected.put_nowait(self)

    def data_received(self, data: bytes) -> None:
        self.digest.update(data)
        self.total += len(data)

    def eof_received(self) -> None:
        self.eof.set_result(None)


@pytest.mark.asyncio
async def test_slow_reader_pauses_the_sender_and_bounds_relay_memory(front: Front) -> None:
    loop = asyncio.get_running_loop()
    connected: asyncio.Queue[SlowReader] = asyncio.Queue()
    server = await loop.create_server(lambda: SlowReader(connected), LOCAL, 0)
    high_water = 64 * 1024
    async with server:
        _, writer, accepted = await front.connect()
        client_side = accepted.transport
        assert client_side is not None
        relay = await open_relay(
            client_side, LOCAL, server.sockets[0].getsockname()[1], high_water=high_water
        )
        upstream = await asyncio.wait_for(connected.get(), 10)
        size = 64 * MiB
        data = payload(size, seed=7)
        writer.write(data)  # no drain: the sender pushes as fast as it can

        for _ in range(1000):  # bounded wait for the kernel buffers to fill up
            if not client_side.is_reading():
                break
            await asyncio.sleep(0.01)
        assert not client_side.is_reading(), "relay kept reading although upstream is stuck"
        # The relay holds about one high-water mark plus one read chunk, not the 64 MiB...
        assert relay.buffered <= high_water + 256 * 1024
        # ...which are still waiting on the sender's side.
        assert relay.bytes_a_to_b < size // 2
        assert writer.transport.get_write_buffer_size() > 0

        # Once the reader catches up, everything arrives and the relay resumes on its own.
        assert upstream.transport is not None
        upstream.transport.resume_reading()
        await writer.drain()
        writer.write_eof()
        await asyncio.wait_for(upstream.eof, 30)
        assert upstream.total == size
        assert upstream.digest.hexdigest() == hashlib.sha256(data).hexdigest()
        upstream.transport.close()
        result = await asyncio.wait_for(relay.wait(), 10)
        assert (result.bytes_a_to_b, result.reason) == (size, "eof")
        writer.close()


class Flood(asyncio.Protocol):
    """An upstream that sends a lot at once, as soon as it is connected."""

    def __init__(self, size: int) -> None:
        self.size = size

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        cast(asyncio.Transport, transport).write(payload(self.size, seed=11))


@pytest.mark.parametrize(
    "loop_factory", [asyncio.new_event_loop, uvloop.new_event_loop], ids=["asyncio", "uvloop"]
)
def test_back_pressure_holds_from_the_first_byte(
    loop_factory: Callable[[], asyncio.AbstractEventLoop],
) -> None:
    # The client side is already over the mark when the relay starts (a large initial
    # write) and the client never reads: the relay must not read the flooding upstream.
    # (uvloop starts reading a new connection after connection_made, undoing early pauses.)
    high_water = 64 * 1024
    size = 64 * MiB

    async def main() -> Relay:
        loop = asyncio.get_running_loop()
        holder: list[Front] = []
        front_server = await loop.create_server(lambda: Handover(holder[0].accepted), LOCAL, 0)
        holder.append(Front(front_server.sockets[0].getsockname()[1]))
        upstream = await loop.create_server(lambda: Flood(size), LOCAL, 0)
        async with front_server, upstream:
            client = socket.socket()
            client.setblocking(False)
            await loop.sock_connect(client, (LOCAL, holder[0].port))  # and never reads
            accepted = await asyncio.wait_for(holder[0].accepted.get(), 10)
            assert accepted.transport is not None
            relay = await open_relay(
                accepted.transport,
                LOCAL,
                upstream.sockets[0].getsockname()[1],
                initial_to_client=bytes(16 * MiB),
                high_water=high_water,
            )
            last, still = -1, 0
            for _ in range(1000):  # bounded: until the upstream->client count stops moving
                await asyncio.sleep(0.01)
                still = still + 1 if relay.bytes_b_to_a == last else 0
                last = relay.bytes_b_to_a
                if still >= 20:
                    break
            assert relay.bytes_b_to_a < size // 2, "relay kept reading a stuck direction"
            assert relay.buffered <= 16 * MiB + high_water + 256 * 1024
            relay.close()
            client.close()
            await asyncio.wait_for(relay.wait(), 30)
            return relay

    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(main())


# -- half-close -------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_client_eof_then_server_still_answers(front: Front) -> None:
    response = payload(3 * MiB, seed=3)

    async def answer_after_eof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.read()  # until the client's EOF arrives through the relay
        writer.write(hashlib.sha256(request).digest() + response)
        await writer.drain()
        writer.close()

    server, port = await start_upstream(answer_after_eof)
    async with server:
        reader, writer, accepted = await front.connect()
        assert accepted.transport is not None
        relay = await open_relay(accepted.transport, LOCAL, port)
        request = b"GET / HTTP/1.0\r\n\r\n" * 1000
        writer.write(request)
        writer.write_eof()
        answer = await asyncio.wait_for(reader.read(), 30)
        assert answer == hashlib.sha256(request).digest() + response
        result = await asyncio.wait_for(relay.wait(), 10)
        assert result == RelayResult(len(request), 32 + len(response), "eof")
        writer.close()


@pytest.mark.asyncio
async def test_server_eof_then_client_still_sends(front: Front) -> None:
    received: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def greet_then_listen(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 bye for now\r\n")
        writer.write_eof()
        received.set_result(await reader.read())
        writer.close()

    server, port = await start_upstream(greet_then_listen)
    async with server:
        reader, writer, accepted = await front.connect()
        assert accepted.transport is not None
        relay = await open_relay(accepted.transport, LOCAL, port)
        assert await asyncio.wait_for(reader.read(), 10) == b"220 bye for now\r\n"
        writer.write(b"still talking")
        writer.write_eof()
        assert await asyncio.wait_for(received, 10) == b"still talking"
        assert (await asyncio.wait_for(relay.wait(), 10)).reason == "eof"
        writer.close()


# -- idle, close, errors ----------------------------------------------------------------------


@pytest.mark.asyncio
async def test_idle_relay_is_closed(front: Front) -> None:
    server, port = await start_upstream(echo_until_eof)
    async with server:
        reader, writer, accepted = await front.connect()
        assert accepted.transport is not None
        relay = await open_relay(accepted.transport, LOCAL, port, idle_timeout=0.2)
        writer.write(b"ping")
        assert await reader.readexactly(4) == b"ping"
        result = await asyncio.wait_for(relay.wait(), 10)
        assert result == RelayResult(4, 4, "idle")
        with contextlib.suppress(ConnectionResetError):  # abort may reset
            assert await reader.read() == b""  # the client sees the connection end
        writer.close()


@pytest.mark.asyncio
async def test_close_with_a_reason(front: Front) -> None:
    server, port = await start_upstream(echo_until_eof)
    async with server:
        reader, writer, accepted = await front.connect()
        assert accepted.transport is not None
        relay = await open_relay(accepted.transport, LOCAL, port)
        relay.close("shutdown")
        relay.close("ignored: already closing")
        assert (await asyncio.wait_for(relay.wait(), 10)).reason == "shutdown"
        assert await reader.read() == b""
        writer.close()


@pytest.mark.asyncio
async def test_cancelling_the_waiter_ends_the_relay(front: Front) -> None:
    server, port = await start_upstream(echo_until_eof)
    async with server:
        reader, writer, accepted = await front.connect()
        assert accepted.transport is not None
        relay = await open_relay(accepted.transport, LOCAL, port)
        waiter = asyncio.create_task(relay.wait())
        await asyncio.sleep(0)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert (await asyncio.wait_for(relay.wait(), 10)).reason == "cancelled"
        with contextlib.suppress(ConnectionResetError):  # abort may reset
            assert await reader.read() == b""
        writer.close()


@pytest.mark.asyncio
async def test_upstream_reset_is_reported_as_error(front: Front) -> None:
    async def reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(5)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()  # closing with linger 0 sends RST

    server, port = await start_upstream(reset)
    async with server:
        reader, writer, accepted = await front.connect()
        assert accepted.transport is not None
        relay = await open_relay(accepted.transport, LOCAL, port)
        writer.write(b"hello")
        result = await asyncio.wait_for(relay.wait(), 10)
        assert result.reason == "error"
        assert result.error is not None and result.error.startswith("upstream:")
        assert await reader.read() == b""  # the client is closed, not left hanging
        writer.close()


@pytest.mark.asyncio
async def test_connection_refused_is_a_clear_error_and_client_is_given_back(
    front: Front,
) -> None:
    reader, writer, accepted = await front.connect()
    assert accepted.transport is not None
    port = free_port()
    with pytest.raises(RelayConnectError) as caught:
        await open_relay(accepted.transport, LOCAL, port)
    err = caught.value
    assert isinstance(err, OSError)
    assert err.errno == errno.ECONNREFUSED
    assert f"127.0.0.1:{port}" in str(err)
    assert "refused" in str(err)
    assert (err.host, err.port) == (LOCAL, port)
    # The proxy's own protocol still owns the client and can answer it.
    accepted.transport.write(b"421 Service not available\r\n")
    assert await reader.readline() == b"421 Service not available\r\n"
    writer.write(b"QUIT\r\n")
    for _ in range(200):
        if accepted.received:
            break
        await asyncio.sleep(0.01)
    assert accepted.received == b"QUIT\r\n"
    writer.close()


@pytest.mark.asyncio
async def test_counters_and_initial_bytes_in_both_directions(front: Front) -> None:
    seen_by_upstream: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def greet_and_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Speaks first, at once: its greeting must still come after initial_to_client.
        writer.write(b"220 ready\r\n")
        data = await reader.read()
        seen_by_upstream.set_result(data)
        writer.write(data[-1000:])
        writer.close()

    server, port = await start_upstream(greet_and_echo)
    async with server:
        reader, writer, accepted = await front.connect()
        assert accepted.transport is not None
        proxy_line = b"PROXY TCP4 192.0.2.1 127.0.0.1 5000 21\r\n"
        relay = await open_relay(
            accepted.transport,
            LOCAL,
            port,
            initial_to_upstream=proxy_line,
            initial_to_client=b"150 relaying\r\n",
        )
        body = payload(1000, seed=1)
        writer.write(body)
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), 10) == b"150 relaying\r\n220 ready\r\n" + body
        assert await seen_by_upstream == proxy_line + body
        result = await asyncio.wait_for(relay.wait(), 10)
        assert result == RelayResult(len(proxy_line) + 1000, 14 + 11 + 1000, "eof")
        assert relay.bytes_a_to_b == result.bytes_a_to_b
        assert relay.bytes_b_to_a == result.bytes_b_to_a
        writer.close()


# -- TLS upstream -----------------------------------------------------------------------------


def make_tls_contexts(tmp: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "backend.test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("backend.test")]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    (tmp / "cert.pem").write_bytes(cert_pem)
    (tmp / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(tmp / "cert.pem", tmp / "key.pem")
    client_ctx = ssl.create_default_context(cadata=cert_pem.decode())
    return server_ctx, client_ctx


@pytest.mark.asyncio
async def test_tls_upstream(front: Front, tmp_path: Path) -> None:
    server_ctx, client_ctx = make_tls_contexts(tmp_path)
    answer = payload(2 * MiB, seed=5)

    async def tls_backend(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line = await reader.readline()
        writer.write(line + answer)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(tls_backend, LOCAL, 0, ssl=server_ctx)
    async with server:
        reader, writer, accepted = await front.connect()
        assert accepted.transport is not None
        relay = await open_relay(
            accepted.transport,
            LOCAL,
            server.sockets[0].getsockname()[1],
            ssl=client_ctx,
            server_hostname="backend.test",
            idle_timeout=30,
        )
        writer.write(b"hello over tls\n")
        writer.write_eof()  # cannot be passed on to TLS; the answer must still come back
        assert await asyncio.wait_for(reader.read(), 10) == b"hello over tls\n" + answer
        result = await asyncio.wait_for(relay.wait(), 10)
        assert result == RelayResult(15, 15 + len(answer), "eof")
        writer.close()


@pytest.mark.asyncio
async def test_tls_verification_failure_is_a_connect_error(front: Front, tmp_path: Path) -> None:
    server_ctx, client_ctx = make_tls_contexts(tmp_path)

    async def never_reached(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(never_reached, LOCAL, 0, ssl=server_ctx)
    async with server:
        _, writer, accepted = await front.connect()
        assert accepted.transport is not None
        with pytest.raises(RelayConnectError, match="TLS handshake failed"):
            await open_relay(
                accepted.transport,
                LOCAL,
                server.sockets[0].getsockname()[1],
                ssl=client_ctx,
                server_hostname="wrong-name.test",
            )
        writer.close()
