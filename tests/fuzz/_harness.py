"""What every fuzz target here shares.

A target module defines ``check(data: bytes) -> None``, which raises only when a property
breaks (an exception the parser does not document, a round trip that differs, work beyond a
bound), and ``seeds()``, valid inputs so the fuzzer starts inside the format. Run one::

    python tests/fuzz/fuzz_proxyproto.py -atheris_runs=5000 [corpus_dir] [crash_file]

(libFuzzer flags; a file argument replays that input). tests/test_fuzz_targets.py runs each
for a bounded number of inputs.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path


def write_seeds(directory: Path, seeds: list[bytes]) -> None:
    """Seed inputs as a libFuzzer corpus directory."""
    directory.mkdir(parents=True, exist_ok=True)
    for i, seed in enumerate(seeds):
        (directory / f"seed-{i:03d}").write_bytes(seed)


Check = Callable[[bytes], None]


def instrumented(*packages: str) -> AbstractContextManager[object]:
    """Imports inside this block get atheris's coverage counters (only these packages: the
    parsers, not asyncio or the stdlib) when a target runs as the fuzzer. Imported by pytest
    (tests/test_hostile_parsers.py runs each ``check`` under hypothesis) or without atheris it
    does nothing."""
    if not Path(sys.argv[0]).name.startswith("fuzz_"):
        return contextlib.nullcontext()
    try:
        import atheris
    except ImportError:
        return contextlib.nullcontext()
    return atheris.instrument_imports(include=list(packages))  # type: ignore[no-any-return]


def main(check: Check) -> None:
    import atheris

    atheris.Setup(sys.argv, check)
    atheris.Fuzz()


def chunks(data: bytes, cuts: bytes) -> list[bytes]:
    """``data`` cut at the offsets the fuzzer chose (each byte of ``cuts`` is a piece size)."""
    pieces, pos = [], 0
    for size in cuts:
        if pos >= len(data):
            break
        pieces.append(data[pos:pos + size + 1])
        pos += size + 1
    if pos < len(data):
        pieces.append(data[pos:])
    return pieces


def split(data: bytes) -> tuple[bytes, bytes]:
    """The first byte says how many following bytes steer the harness (cut sizes, flags);
    the rest is the input for the parser."""
    if not data:
        return b"", b""
    n = data[0] % 16
    return data[1:1 + n], data[1 + n:]
