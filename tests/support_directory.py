"""Helpers for the tenant-directory tests: query counters, a held loader, a
real TCP forwarder (to cut MariaDB off for real), seed data and test certificates."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
from collections.abc import Awaitable, Callable
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from edge.directory.cache import Miss
from edge.directory.feed import ChangeFeed
from edge.directory.service import DirectoryService
from edge.directory.store import SQLStore

TABLES = ("hosts", "tenants", "accounts", "sites", "certificates", "changes")



class Counter:
    """Counts calls of one store method (wrapped on the instance, before a Directory binds it)."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def __len__(self) -> int:
        return len(self.calls)


def count_calls(store: SQLStore, method: str) -> Counter:
    """Wrap ``store.<method>`` so every call is recorded; the real query still runs."""
    real = getattr(store, method)
    counter = Counter()

    async def wrapper(*args: Any) -> Any:
        counter.calls.append(args)
        return await real(*args)

    setattr(store, method, wrapper)
    return counter


class Hold:
    """Wraps a store method: the real query runs, then the first call's answer is held until
    released (later calls, e.g. the service's own reads, pass straight through)."""

    def __init__(self, store: SQLStore, method: str) -> None:
        self.real: Callable[..., Awaitable[Any]] = getattr(store, method)
        self.queried = asyncio.Event()
        self.release = asyncio.Event()
        self.calls = 0
        self.holding = True
        setattr(store, method, self._wrapper)

    async def _wrapper(self, *args: Any) -> Any:
        self.calls += 1
        result = await self.real(*args)
        if self.holding and not self.queried.is_set():
            self.queried.set()
            await self.release.wait()
        return result

    def stop_holding(self) -> None:
        self.holding = False
        self.release.set()


def is_cached(cache: Any, key: Any) -> bool:
    """True if ``cache`` has a fresh entry (positive or negative) for ``key``."""
    return not isinstance(cache.peek(key), Miss)


async def row_counts(store: SQLStore) -> dict[str, int]:
    return {table: await store.count(table) for table in TABLES}


async def feed_at_head(feed: ChangeFeed) -> ChangeFeed:
    """Position a feed at the newest change, as ``start()`` would, without a polling task."""
    feed.cursor = await feed.directory.store.latest_change_id()
    feed.healthy = True
    return feed


async def seed(service: DirectoryService) -> None:
    """Two hosts, two tenants on host-a, accounts and sites (exact and wildcard)."""
    await service.add_host("host-a", "10.0.0.1", ssh_port=2201)
    await service.add_host("host-b", "10.0.0.2", ssh_port=2202)
    await service.add_tenant("t1", "host-a")
    await service.add_tenant("t2", "host-a")
    await service.add_account("alice", "t1")
    await service.add_account("bob", "t2", protocols=["ftp"])
    await service.add_site("www.example.com", "t1")
    await service.add_site("*.example.com", "t2")
    await service.add_site("bücher.example", "t1")


# -- a real TCP forwarder ----------------------------------------------------------------------


class TcpForwarder:
    """Accepts on 127.0.0.1 and pipes to ``target``. ``stop()`` closes the listener and aborts
    every connection (the database is then really unreachable through it); ``start()`` again
    listens on the same port."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port,
                                                  reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (OSError, asyncio.CancelledError):
                pass
            finally:
                dst.transport.abort()

        for task in (asyncio.create_task(pipe(reader, up_writer)),
                     asyncio.create_task(pipe(up_reader, writer))):
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for writer in self._writers:
            writer.transport.abort()
        self._writers.clear()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task


# -- certificates ----------------------------------------------------------------------------


def make_certificate(names: list[str] | None, *, days_valid: int = 30, expired: bool = False,
                     key: ec.EllipticCurvePrivateKey | None = None,
                     common_name: str = "test") -> tuple[bytes, bytes]:
    """A self-signed certificate (chain PEM, key PEM). ``names=None`` omits subjectAltName."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    if expired:
        not_before, not_after = now - datetime.timedelta(days=60), now - datetime.timedelta(days=1)
    else:
        not_before, not_after = now - datetime.timedelta(hours=1), now + datetime.timedelta(
            days=days_valid)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(not_before).not_valid_after(not_after))
    if names is not None:
        general: list[x509.GeneralName] = []
        for name in names:
            try:
                general.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                general.append(x509.DNSName(name))
        builder = builder.add_extension(x509.SubjectAlternativeName(general), critical=False)
    cert = builder.sign(key, hashes.SHA256())
    key_pem = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem
