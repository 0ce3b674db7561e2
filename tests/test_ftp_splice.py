"""The zero-copy pump under FTP's plain transfers (:class:`edge.splice.SplicePump`), on both
event loops: a sink slower than the source (an upload to a backend that writes to disk), a
transfer where both sides keep up, and a small file that is already there when the pump
starts. The peers run in threads with blocking sockets, like a client and a backend would."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from edge.splice import SplicePump

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(not SplicePump.available(), reason="splice(2) and epoll are Linux-only"),
    pytest.mark.filterwarnings("ignore:Overriding the \"event_loop_policy\" fixture"),
]


@pytest.fixture(params=["uvloop", "asyncio"])
def event_loop_policy(request: pytest.FixtureRequest) -> asyncio.AbstractEventLoopPolicy:
    import uvloop

    if request.param == "asyncio":
        return asyncio.DefaultEventLoopPolicy()
    return uvloop.EventLoopPolicy()


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as server:
        a = socket.create_connection(server.getsockname())
        b, _ = server.accept()
    return a, b


class Peer(threading.Thread):
    """Sends ``payload`` then EOF, or reads everything (optionally pausing first)."""

    def __init__(self, sock: socket.socket, *, payload: bytes = b"", pause: float = 0.0,
                 block: int = 1 << 16) -> None:
        super().__init__(daemon=True)
        self.sock, self.payload, self.pause, self.block = sock, payload, pause, block
        self.received = hashlib.sha256()
        self.count = 0

    def run(self) -> None:
        if self.payload:
            with contextlib.suppress(OSError):  # the test may reset it on purpose
                self.sock.sendall(self.payload)
                self.sock.shutdown(socket.SHUT_WR)
            return
        time.sleep(self.pause)
        while chunk := self.sock.recv(self.block):
            self.received.update(chunk)
            self.count += len(chunk)


@pytest.fixture
def pairs() -> Iterator[list[socket.socket]]:
    opened: list[socket.socket] = []
    yield opened
    for sock in opened:
        sock.close()


def _thread_cpu() -> float:
    return time.thread_time()


async def test_slow_sink_is_waited_for_without_spinning(pairs: list[socket.socket]) -> None:
    # Upload shape: the source has far more than fits in the pipe and the sockets' buffers,
    # the sink reads nothing for a while. The pump must then sleep (no busy loop on a
    # readable source or a full sink), and deliver every byte, then EOF, once the sink reads.
    client, src = _tcp_pair()
    sink, backend = _tcp_pair()
    pairs += [client, backend]
    payload = os.urandom(48 << 20)
    sender = Peer(client, payload=payload)
    reader = Peer(backend, pause=1.0)
    sender.start()
    reader.start()
    pump = SplicePump(src, sink, idle_timeout=10)
    await asyncio.sleep(0.2)  # buffers fill up
    cpu = _thread_cpu()
    await asyncio.sleep(0.6)  # the sink still reads nothing
    assert _thread_cpu() - cpu < 0.1, "the pump spun while the sink was full"
    assert await asyncio.wait_for(pump.wait(), 30) == (len(payload), "eof")
    await asyncio.to_thread(reader.join, 10)
    await asyncio.to_thread(sender.join, 10)
    assert reader.count == len(payload)
    assert reader.received.digest() == hashlib.sha256(payload).digest()


async def test_fast_transfer_leaves_the_loop_to_others(pairs: list[socket.socket]) -> None:
    # Both sides keep up: the pump must still give the event loop back regularly (other
    # sessions' commands), not move the whole file in one callback.
    client, src = _tcp_pair()
    sink, backend = _tcp_pair()
    pairs += [client, backend]
    payload = os.urandom(64 << 20)
    sender = Peer(client, payload=payload)
    reader = Peer(backend, block=1 << 20)
    ticks = 0
    stop = asyncio.Event()

    async def ticker() -> None:
        nonlocal ticks
        while not stop.is_set():
            ticks += 1
            await asyncio.sleep(0)

    tick_task = asyncio.create_task(ticker())
    sender.start()
    reader.start()
    pump = SplicePump(src, sink, idle_timeout=10)
    started = ticks
    assert await asyncio.wait_for(pump.wait(), 30) == (len(payload), "eof")
    stop.set()
    await tick_task
    await asyncio.to_thread(reader.join, 10)
    assert reader.received.digest() == hashlib.sha256(payload).digest()
    assert ticks - started >= 5, "the pump held the event loop for the whole transfer"


async def test_small_file_already_sent_moves_at_once(pairs: list[socket.socket]) -> None:
    # A backend that sent its 1-byte file and closed before the pump exists (the usual case
    # for small files): the byte and the EOF go through without waiting for the loop.
    client, src = _tcp_pair()
    sink, backend = _tcp_pair()
    pairs += [client, backend]
    client.sendall(b"x")
    client.shutdown(socket.SHUT_WR)
    await asyncio.sleep(0.05)
    pump = SplicePump(src, sink, idle_timeout=10)
    assert pump.count == 1  # moved inside the constructor
    assert await asyncio.wait_for(pump.wait(), 5) == (1, "eof")
    backend.settimeout(5)
    assert backend.recv(10) == b"x"
    assert backend.recv(10) == b""


async def test_sink_gone_mid_transfer_is_an_error(pairs: list[socket.socket]) -> None:
    # The reading side resets the connection while the source still sends: the pump ends
    # with "error" (the FTP session then answers 426), it does not wait for the idle timeout.
    client, src = _tcp_pair()
    sink, backend = _tcp_pair()
    pairs.append(client)
    sender = Peer(client, payload=os.urandom(64 << 20))
    sender.start()
    pump = SplicePump(src, sink, idle_timeout=30)
    await asyncio.sleep(0.2)
    backend.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    backend.close()
    count, reason = await asyncio.wait_for(pump.wait(), 10)
    assert reason == "error"
    assert pump.error is not None and pump.error.startswith("sink:")
    assert count < 64 << 20
    await asyncio.to_thread(sender.join, 10)  # reset by the pump's abort of the source
    assert not sender.is_alive()
