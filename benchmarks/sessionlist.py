"""What ``edge sessions`` costs a worker: CPU per listed session, and per login/logout.

``.venv/bin/python -m benchmarks.sessionlist [--sessions 10000] [--rounds 5]``

Registers ``--sessions`` sessions in a :class:`edge.sessions.SessionTable`, serves it on a
real control socket (:class:`edge.sessions.ControlServer`) and lists it with
:func:`edge.sessions.list_sessions`, as the admin listener does. Printed: the worker-side CPU
of one listing (it runs in the serving loop, so it is the stall traffic on that worker sees),
the CPU of one listing end to end (both sides in this process), and the CPU of one
``add``+``remove`` (paid once per login). CPU time, not wall time: the machine is shared.
The sessions are stand-ins with a fixed snapshot (no proxy behind them): what is measured is
the table, the JSON and the socket, not a proxy.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time

from edge import sessionpolicy
from edge.sessions import ControlServer, SessionSnapshot, SessionTable, list_sessions


class _Session:
    def snapshot(self) -> SessionSnapshot:
        return SessionSnapshot("alice", "acme", "web17", "192.0.2.10:51234", 1.7e9, 123456, 654321)

    def apply(self, action: sessionpolicy.Action) -> None:
        pass


async def _run(sessions: int, rounds: int) -> None:
    table = SessionTable(0)
    for _ in range(sessions):
        table.add("ssh", _Session())
    server = ControlServer(table)
    worker_side = []
    for _ in range(rounds):
        started = time.process_time()
        json.dumps(server.answer({"op": "sessions"}))
        worker_side.append(time.process_time() - started)
    with tempfile.TemporaryDirectory() as control_dir:
        await server.start(control_dir)
        both = []
        for _ in range(rounds):
            started = time.process_time()
            listing = await list_sessions(control_dir, [os.getpid()])
            both.append(time.process_time() - started)
            assert len(listing.sessions) == sessions
        await server.stop()
    started = time.process_time()
    for _ in range(100_000):
        table.remove(table.add("ssh", _Session()))
    churn = (time.process_time() - started) / 100_000
    best_worker, best_both = min(worker_side), min(both)
    print(f"sessions listed:            {sessions}")
    print(f"worker side, one listing:   {best_worker * 1e3:.1f} ms CPU "
          f"({best_worker / sessions * 1e6:.1f} us per session)")
    print(f"end to end, one listing:    {best_both * 1e3:.1f} ms CPU "
          f"({best_both / sessions * 1e6:.1f} us per session)")
    print(f"add + remove (per login):   {churn * 1e9:.0f} ns CPU")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    asyncio.run(_run(args.sessions, args.rounds))


if __name__ == "__main__":
    main()
