"""Server-side HTTP/2 protocol CPU per request, per framing/HPACK engine (issue 14 §3).

The protocol work alone, no sockets and no proxying: a client (the pure-Python ``h2`` package,
outside the timed part) prepares ``--connections`` connections' worth of request bytes, ``--streams``
concurrent GETs per round, as a browser or ``h2load -m`` sends them; the timed part is what the
edge's HTTP/2 front end does per request with each engine: feed the bytes, read the events,
answer each stream with a 200 head (5 headers) and a 1 KiB body, collect the bytes to send.

    .venv/bin/python -m benchmarks.h2engine [--requests 20000] [--streams 10]

Prints CPU µs per request (``time.process_time``) for each engine that is installed.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import h2.config
import h2.connection
import h2.events

BODY = b"x" * 1024
RESPONSE_HEADERS = [(b":status", b"200"), (b"content-type", b"text/plain"),
                    (b"content-length", b"1024"), (b"server", b"edge"),
                    (b"date", b"Mon, 07 Dec 2026 22:00:00 GMT")]


def _client_rounds(rounds: int, streams: int) -> tuple[bytes, list[bytes]]:
    """The connection preface and ``rounds`` chunks of ``streams`` request HEADERS each."""
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    # A reading client: the connection window never limits the answers (2 GiB).
    client.increment_flow_control_window(2**31 - 1 - 65535)
    preface = client.data_to_send()
    chunks = []
    for _ in range(rounds):
        for _ in range(streams):
            sid = client.get_next_available_stream_id()
            client.send_headers(sid, [(b":method", b"GET"), (b":scheme", b"https"),
                                      (b":authority", b"www.example.com"), (b":path", b"/index.html"),
                                      (b"user-agent", b"h2load"), (b"accept", b"*/*")],
                                end_stream=True)
        chunks.append(client.data_to_send())
    return preface, chunks


def run_h2(preface: bytes, chunks: list[bytes]) -> int:
    server = h2.connection.H2Connection(h2.config.H2Configuration(
        client_side=False, header_encoding=None, validate_inbound_headers=True))
    server.initiate_connection()
    server.receive_data(preface)
    server.data_to_send()
    answered = 0
    for chunk in chunks:
        for event in server.receive_data(chunk):
            if isinstance(event, h2.events.RequestReceived):
                server.send_headers(event.stream_id, RESPONSE_HEADERS)
                server.send_data(event.stream_id, BODY, end_stream=True)
                answered += 1
        server.data_to_send()
    return answered


def run_ngh2(preface: bytes, chunks: list[bytes]) -> int:
    import ngh2

    server = ngh2.Connection(ngh2.Role.SERVER)
    server.initiate_connection()
    server.receive_data(preface)
    server.events()
    server.data_to_send()
    answered = 0
    request_received = ngh2.RequestReceived
    for chunk in chunks:
        server.receive_data(chunk)
        for event in server.events():
            if type(event) is request_received:
                sid = event.stream_id
                server.send_response(sid, RESPONSE_HEADERS)
                server.send_data(sid, BODY, end_stream=True)
                answered += 1
        server.data_to_send()
    return answered


ENGINES: dict[str, Callable[[bytes, list[bytes]], int]] = {"h2": run_h2, "ngh2": run_ngh2}


def measure(name: str, requests: int, streams: int) -> float | None:
    """CPU µs per request for one engine, or None when it is not installed."""
    if name == "ngh2":
        try:
            import ngh2  # noqa: F401
        except ImportError:
            return None
    preface, chunks = _client_rounds(requests // streams, streams)
    run = ENGINES[name]
    run(preface, chunks[:10])  # warm-up
    start = time.process_time()
    answered = run(preface, chunks)
    spent = time.process_time() - start
    assert answered == len(chunks) * streams, (name, answered)
    return spent / answered * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--streams", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    for name in ENGINES:
        samples = [measure(name, args.requests, args.streams) for _ in range(args.repeat)]
        if samples[0] is None:
            print(f"{name:6} not installed")
            continue
        best = min(s for s in samples if s is not None)
        print(f"{name:6} {best:7.1f} µs CPU per request (best of {args.repeat}: "
              + ", ".join(f"{s:.1f}" for s in samples if s is not None) + ")")


if __name__ == "__main__":
    main()
