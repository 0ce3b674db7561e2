"""``edge admin serve``: run the admin API and console until SIGTERM/SIGINT.

A process of its own rather than routes in ``edge serve``'s master: the master forks workers
and so keeps no database connection (and no SQLite helper thread) open, while the API needs
one for every request; a slow or crashing API must not stall the supervisor that restarts
workers; and the API can be upgraded, restarted or run on a separate control machine without
touching the proxies. It reaches the proxies only through the directory (the change feed
carries every write to every worker) and reads the local edge's ``/metrics`` for the console.
"""

from __future__ import annotations

import asyncio
import signal
import ssl
from collections.abc import Callable

from aiohttp import web

from edge.api.app import build_app
from edge.config import ApiConfig, EdgeConfig, ListenAddress
from edge.directory.secrets import KeyBox
from edge.directory.store import SQLStore


def tls_context(config: ApiConfig) -> ssl.SSLContext | None:
    if not config.certificate_file:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(config.certificate_file, config.key_file or None)
    return context


def edge_admin_url(config: EdgeConfig) -> str:
    """The local ``edge serve`` admin listener's base URL ("" when it has none)."""
    if not config.admin.listen:
        return ""
    address = config.admin.listen[0]
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(address.host, address.host)
    return f"http://{ListenAddress(host, address.port)}"


async def serve_api(config: EdgeConfig, store: SQLStore, keybox: KeyBox | None, *,
                    on_ready: Callable[[list[str]], None] | None = None,
                    stop: asyncio.Event | None = None) -> None:
    """Serve until ``stop`` is set (default: SIGTERM or SIGINT); ``on_ready`` gets the URLs."""
    app = build_app(store, keybox, edge_admin=edge_admin_url(config))
    context = tls_context(config.api)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    stop = stop or _signal_event()
    try:
        for address in config.api.listen:
            await web.TCPSite(runner, address.host, address.port, ssl_context=context,
                              reuse_address=True).start()
        scheme = "https" if context else "http"
        urls = [f"{scheme}://{ListenAddress(str(a[0]), int(a[1]))}" for a in runner.addresses]
        if on_ready is not None:
            on_ready(urls)
        await stop.wait()
    finally:
        await runner.cleanup()


def _signal_event() -> asyncio.Event:
    event = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, event.set)
    return event


__all__ = ["edge_admin_url", "serve_api", "tls_context"]
