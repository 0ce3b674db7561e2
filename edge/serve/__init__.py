"""The process model of ``edge serve``: a master (:mod:`edge.serve.supervisor`) that binds
the listening sockets, runs the admin listener and pre-forks workers
(:mod:`edge.serve.worker`), each running the enabled proxies in one uvloop event loop.

Importing ``edge.serve`` imports no proxy package: proxies are loaded through :mod:`edge.registry`.
"""

from __future__ import annotations

from edge.serve.supervisor import serve

__all__ = ["serve"]
