"""A CPU budget per process (a cgroup CPU quota), so a 2-core machine can show how throughput
scales with worker processes.

On two cores, ``wrk``, the backend and the proxy's workers all compete for the same CPUs, so
a second worker adds nothing measurable: the machine, not the proxy, is the limit. Giving each
worker its own quota of a fraction of a core (0.2 by default) makes each one a "small core"
of its own. With n workers the proxy may use n x 0.2 cores, and if nothing inside it is
shared — accept distribution, the directory cache, the database, the master — its
throughput grows n-fold while the machine still has CPU to spare for the load generator and
the backend. nginx gets the same budget per worker in the same run, as the peer.

Needs root and a writable cgroup ``cpu`` controller: cgroup v2 (``cpu.max``) or v1
(``cpu.cfs_quota_us``). :func:`quota_missing` says why not, for the scenario to skip.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

PERIOD_US = 10_000
"""A short CFS period: a throttled worker waits at most ~8 ms for its next slice, instead of
~80 ms with the default 100 ms period, so latency percentiles stay readable."""

_V2_ROOT = Path("/sys/fs/cgroup")
_V1_ROOT = Path("/sys/fs/cgroup/cpu")


def _cpu_root() -> tuple[Path, int] | None:
    """The cgroup folder to make quota groups in, and its cgroup version."""
    controllers = _V2_ROOT / "cgroup.controllers"
    if controllers.exists() and "cpu" in controllers.read_text().split():
        return _V2_ROOT, 2
    if (_V1_ROOT / "cpu.cfs_quota_us").exists():
        return _V1_ROOT, 1
    return None


def quota_missing() -> str | None:
    """Why per-process CPU quotas cannot be set here, or None if they can."""
    found = _cpu_root()
    if found is None:
        return "no cgroup cpu controller (cgroup v2 cpu.max or v1 cpu.cfs_quota_us)"
    root, _ = found
    if not os.access(root, os.W_OK):
        return f"{root} is not writable (run as root)"
    return None


class CpuQuotas:
    """One cgroup per process, each limited to ``cores`` of a CPU. Closing moves the
    processes that are still alive back to the root group and removes the groups."""

    def __init__(self, cores: float, tag: str = "edge-bench") -> None:
        if not 0.01 <= cores <= 64:
            raise ValueError(f"a CPU quota of {cores} cores is outside 0.01..64")
        found = _cpu_root()
        if found is None:
            raise RuntimeError(quota_missing())
        self.root, self.version = found
        self.cores = cores
        self.tag = f"{tag}-{os.getpid()}"
        self.groups: list[Path] = []

    def limit(self, pid: int) -> Path:
        """Put ``pid`` (all of its threads) in a new group with this quota."""
        group = self.root / f"{self.tag}-{len(self.groups)}"
        group.mkdir()
        self.groups.append(group)
        quota = max(1000, round(self.cores * PERIOD_US))
        if self.version == 2:
            (group / "cpu.max").write_text(f"{quota} {PERIOD_US}")
        else:
            (group / "cpu.cfs_period_us").write_text(str(PERIOD_US))
            (group / "cpu.cfs_quota_us").write_text(str(quota))
        (group / "cgroup.procs").write_text(str(pid))
        return group

    def throttled_seconds(self) -> float:
        """Total time the groups' processes were held back by their quota so far."""
        total = 0
        for group in self.groups:
            with contextlib.suppress(OSError):
                for line in (group / "cpu.stat").read_text().splitlines():
                    key, _, value = line.partition(" ")
                    if key == "throttled_usec":
                        total += int(value) * 1000
                    elif key == "throttled_time":  # v1, nanoseconds
                        total += int(value)
        return total / 1e9

    def close(self) -> None:
        for group in self.groups:
            with contextlib.suppress(OSError):
                for pid in (group / "cgroup.procs").read_text().split():
                    with contextlib.suppress(OSError):
                        (self.root / "cgroup.procs").write_text(pid)
            with contextlib.suppress(OSError):
                group.rmdir()
        self.groups.clear()


def children(pid: int, *, title_prefix: str = "") -> list[int]:
    """Direct children of ``pid`` — the workers of a pre-forking server — optionally only
    those whose process title starts with ``title_prefix`` (``"nginx: worker"`` leaves out
    nginx's cache manager and loader)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            parent = int(stat[stat.rindex(")") + 2:].split()[1])
            if parent != pid:
                continue
            title = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError):
            continue
        if title.startswith(title_prefix):
            found.append(int(entry))
    return sorted(found)


@contextlib.contextmanager
def quota_each(pids: Sequence[int], cores: float) -> Iterator[CpuQuotas]:
    """Each of ``pids`` in a group of its own with ``cores`` of CPU, for the ``with`` block."""
    quotas = CpuQuotas(cores)
    try:
        for pid in pids:
            quotas.limit(pid)
        yield quotas
    finally:
        quotas.close()
