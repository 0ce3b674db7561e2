"""The admin HTTP API and web console (``edge admin serve``); see docs/operations.md."""
