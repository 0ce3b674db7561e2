"""A real ACME CA for tests: :class:`edge.acme.pebble.Pebble` (also used by ``edge demo`` and
``benchmarks/acme.py``), re-exported here for the tests."""

from edge.acme.pebble import Pebble, available, free_port

__all__ = ["Pebble", "available", "free_port"]
