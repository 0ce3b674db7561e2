"""Worker memory after floods of SSH connections that never log in (issue 13).

``python -m benchmarks.sshflood [--rounds 4] [--connections 1000] [--width 50] [--root DIR]``

Starts ``edge serve --workers 1`` with only the SSH listener (a fresh SQLite directory, fresh
host keys, ``max_unauthenticated_per_ip`` raised so every connection reaches asyncssh), then per
round opens ``--connections`` connections, ``--width`` at a time, each sending its
identification line, reading the proxy's and leaving; prints the worker's RSS at the start and
3 s after each round. ``--root DIR``: run the code of another checkout (e.g. the old commit in
a ``git worktree``) with this interpreter. Bounded: rounds x connections, 20 s per connection.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LISTENING = re.compile(r"edge: ssh listening on (\S+):(\d+)")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


async def flood(port: int, connections: int, width: int) -> None:
    async def one() -> None:
        with contextlib.suppress(OSError, TimeoutError):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"SSH-2.0-flood\r\n")
            await asyncio.wait_for(reader.readline(), 20)
            writer.close()

    for start in range(0, connections, width):
        await asyncio.gather(*(one() for _ in range(min(width, connections - start))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--width", type=int, default=50)
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent)
    args = parser.parse_args()
    root = args.root.resolve()
    tmp = Path(tempfile.mkdtemp(prefix="sshflood-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_")}
    env["PYTHONPATH"] = str(root)
    edge = [sys.executable, "-c", "import sys; from edge.cli.main import main; sys.exit(main())"]
    config = tmp / "edge.toml"
    config.write_text(f'[database]\nurl = "sqlite:///{tmp / "edge.sqlite3"}"\n[serve]\nworkers = 1\n'
                      f'[limits]\nmax_unauthenticated_per_ip = 1000000\n'
                      f'[ssh]\nlisten = ["127.0.0.1:0"]\nhost_key_dir = "{tmp / "keys"}"\n')
    subprocess.run([*edge, "init", "--config", str(config)], cwd=root, env=env, check=True,
                   stdout=subprocess.DEVNULL)
    serve = subprocess.Popen([*edge, "serve", "--config", str(config)], cwd=root, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert serve.stdout is not None
        port = 0
        deadline = time.monotonic() + 60
        while not port and time.monotonic() < deadline:
            match = LISTENING.search(serve.stdout.readline())
            port = int(match.group(2)) if match else 0
        if not port:
            raise RuntimeError("edge serve did not start")
        time.sleep(3)
        worker = int(subprocess.run(["pgrep", "-P", str(serve.pid)], capture_output=True, text=True,
                                    check=True).stdout.split()[0])
        figures = [f"start {rss_mib(worker):.1f}"]
        for index in range(args.rounds):
            asyncio.run(flood(port, args.connections, args.width))
            time.sleep(3)
            figures.append(f"round {index + 1}: {rss_mib(worker):.1f}")
        print(f"{root}: worker RSS MiB, {args.connections} connections per round: " + ", ".join(figures))
    finally:
        serve.terminate()
        try:
            serve.wait(30)
        except subprocess.TimeoutExpired:
            serve.kill()


if __name__ == "__main__":
    main()
