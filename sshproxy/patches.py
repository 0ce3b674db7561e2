"""Which of our fixes to asyncssh's internals are active, said at start-up and as a metric.

:mod:`sshproxy.tuning` and :mod:`sshproxy.fastpath` replicate or wrap private asyncssh code
and switch themselves off, per fix, when the installed asyncssh is not the code they were
checked against. Off is safe (asyncssh runs as shipped) but costs throughput -- the fast path
alone is about half of it (docs/ssh-bridge.md) -- so an install that loses one must not do so
quietly: each worker logs a warning per fix that is off and exports
``edge_ssh_patch_active{patch}`` (1 on, 0 off). ``pyproject.toml`` pins asyncssh to
:data:`CHECKED_ASYNCSSH`, and ``tests/test_ssh_fastpath.py`` fails on any other version.
"""

from __future__ import annotations

import logging
from typing import Final

import asyncssh

from sshproxy import fastpath, metrics, tuning

CHECKED_ASYNCSSH: Final = fastpath.VERSIONS
"""asyncssh versions every fix was checked against (pinned in pyproject.toml)."""


def patch_status() -> dict[str, bool]:
    """Each fix by name (the metric's ``patch`` label) -> whether it applies to this asyncssh."""
    return {
        "ignore_packets": tuning.IGNORE_PACKET_FIX_NEEDED,
        "receive_slices": tuning.RECEIVE_FIX_NEEDED,
        "aes_gcm": tuning.GCM_FIX_NEEDED,
        "receive_window": tuning.WINDOW_FIX_NEEDED,
        "fastpath": fastpath.FASTPATH_SUPPORTED,
    }


def report_patches(log: logging.Logger) -> dict[str, bool]:
    """Export :func:`patch_status` as the gauge and warn once per fix that is off; returns it."""
    status = patch_status()
    for name, active in status.items():
        metrics.PATCH_ACTIVE.labels(patch=name).set(1 if active else 0)
        if not active:
            log.warning("ssh: asyncssh fix %r is OFF for asyncssh %s (checked against %s): the proxy "
                        "works but relays slower; install a checked asyncssh version",
                        name, asyncssh.__version__, ", ".join(CHECKED_ASYNCSSH),
                        extra={"patch": name, "asyncssh": asyncssh.__version__})
    return status


__all__ = ["CHECKED_ASYNCSSH", "patch_status", "report_patches"]
