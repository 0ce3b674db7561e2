"""The proxy's leg to the backend: connect, verify the pinned host key, log in.

One :func:`connect_upstream` per client login. The credential decides how:

* a client password is passed through (``password=``): the backend's answer is the answer
  (asyncssh also answers a backend's keyboard-interactive "Password:" prompt with it);
* after a client public-key login the proxy uses its own upstream key (``client_key=``);
* keyboard-interactive is relayed prompt by prompt through a :class:`KbdIntRelay`, so backend
  2FA works.

Host keys: the backend must present one of the host's pinned keys (``Host.ssh_known_hosts``);
an unpinned or mismatched backend is refused unless the host is marked ``ssh_insecure``. The
backend's ``hostkeys-00@openssh.com`` announcements stop here (asyncssh ignores them without a
handler, and global requests are never relayed), so clients only ever see the proxy's keys.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import asyncssh

from edge.directory.model import Host
from edge.proxyproto import header_for_backend
from sshproxy.hostkeys import parse_pinned_keys
from sshproxy.tuning import CLIENT_OPTIONS, UPSTREAM_HOST_KEY_ALGS, release_connection

Challenge = tuple[str, str, str, Sequence[tuple[str, bool]]]


class UpstreamError(Exception):
    """The backend could not be used (unreachable, host key refused, protocol error).

    ``public`` is what the client is told (no internal names); ``str()`` is for the log.
    """

    def __init__(self, detail: str, public: str = "backend unavailable, try again later") -> None:
        super().__init__(detail)
        self.public = public


class UpstreamAuthFailed(UpstreamError):
    """The backend refused the credentials."""


class KbdIntRelay:
    """Carries keyboard-interactive rounds between the client leg and the upstream leg.

    The upstream client puts each challenge it receives with :meth:`ask` and waits for the
    client's answers; the server side takes events with :meth:`next_event` (a challenge, or
    ``None`` once the upstream login finished) and hands answers back with :meth:`answer`.
    """

    def __init__(self) -> None:
        self._events: asyncio.Queue[Challenge] = asyncio.Queue()
        self._answers: asyncio.Queue[list[str] | None] = asyncio.Queue()

    async def ask(self, name: str, instructions: str, lang: str,
                  prompts: Sequence[tuple[str, bool]]) -> list[str] | None:
        """Relay one challenge to the client; returns its answers (``None``: give up)."""
        await self._events.put((name, instructions, lang, list(prompts)))
        return await self._answers.get()

    async def next_challenge(self, login: asyncio.Task[Any]) -> Challenge | None:
        """The next challenge, or ``None`` when ``login`` finished first (success or error)."""
        getter = asyncio.ensure_future(self._events.get())
        try:
            await asyncio.wait({getter, login}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not getter.done():
                getter.cancel()
        return getter.result() if getter.done() and not getter.cancelled() else None

    def answer(self, responses: list[str] | None) -> None:
        self._answers.put_nowait(responses)


@dataclass(frozen=True, slots=True)
class Credential:
    """What the proxy logs in upstream with: exactly one of the three."""

    password: str | None = None
    client_key: asyncssh.SSHKey | None = None
    """The proxy's upstream key (after the client proved its own key)."""
    relay: KbdIntRelay | None = None


class _UpstreamClient(asyncssh.SSHClient):
    """The proxy's client object on the upstream connection.

    Every auth callback first awaits the credential, so the connection can be opened (TCP, key
    exchange) while the client is still authenticating to us, and each credential is offered
    once: a refusal ends the upstream login (the client's next attempt opens a fresh one).
    """

    def __init__(self, credential: asyncio.Future[Credential], handshake_done: asyncio.Future[None],
                 on_lost: Callable[[Exception | None], None] | None) -> None:
        self._credential = credential
        self._handshake_done = handshake_done
        self._on_lost = on_lost
        self._authenticated = False
        self._offered: set[str] = set()
        self._conn: asyncssh.SSHClientConnection | None = None

    def connection_made(self, conn: asyncssh.SSHClientConnection) -> None:
        self._conn = conn

    async def _wait_credential(self) -> Credential:
        # The first auth callback means banner, key exchange and host-key check are done.
        if not self._handshake_done.done():
            self._handshake_done.set_result(None)
        return await asyncio.shield(self._credential)

    async def _take(self, kind: str) -> Credential | None:
        credential = await self._wait_credential()
        if kind in self._offered:
            return None
        self._offered.add(kind)
        return credential

    def _take_once(self, kind: str) -> bool:
        if kind in self._offered:
            return False
        self._offered.add(kind)
        return True

    def auth_completed(self) -> None:
        if not self._handshake_done.done():
            self._handshake_done.set_result(None)
        self._authenticated = True

    def connection_lost(self, exc: Exception | None) -> None:
        if self._authenticated and self._on_lost is not None:
            self._on_lost(exc)
        if self._conn is not None:
            release_connection(self._conn)  # the bridge's wrappers on it (see there)
            self._conn = None

    async def public_key_auth_requested(self) -> list[asyncssh.SSHKey] | None:
        credential = await self._take("publickey")
        return [credential.client_key] if credential and credential.client_key else None

    async def password_auth_requested(self) -> str | None:
        credential = await self._take("password")
        return credential.password if credential else None

    async def kbdint_auth_requested(self) -> str | None:
        credential = await self._wait_credential()
        if credential.relay is not None:
            # One relayed round per client attempt: asyncssh would start keyboard-interactive
            # again after a refusal, relaying endless prompts into the client's one attempt
            # (unlimited guesses, never "Permission denied").
            return "" if self._take_once("kbdint-relay") else None
        # A password goes over keyboard-interactive only to backends without the password
        # method: never try the same password twice (it would count twice against the user).
        return "" if credential.password is not None and "password" not in self._offered else None

    async def kbdint_challenge_received(
            self, name: str, instructions: str, lang: str,
            prompts: Sequence[tuple[str, bool]]) -> list[str] | None:
        credential = await self._wait_credential()
        if credential.relay is not None:
            return await credential.relay.ask(name, instructions, lang, prompts)
        if not prompts:
            return []  # an informational round (e.g. a PAM message)
        # A backend that takes passwords only through keyboard-interactive (PAM): answer its one
        # password prompt with the password, once; anything else (2FA) needs a real relay.
        prompt = prompts[0][0].lower()
        if len(prompts) == 1 and ("password" in prompt or "passcode" in prompt):
            taken = await self._take("kbdint-password")
            if taken is not None and taken.password is not None:
                return [taken.password]
        return None


def known_hosts_for(host: Host) -> tuple[list[asyncssh.SSHKey], list[Any], list[Any]] | None:
    """asyncssh ``known_hosts`` for ``host``: its pinned keys, or ``None`` (no check) if insecure.

    Raises :class:`UpstreamError` when nothing is pinned and the host is not marked insecure.
    """
    if host.ssh_insecure:
        return None
    try:
        keys = parse_pinned_keys(host.ssh_known_hosts)
    except ValueError as exc:
        raise UpstreamError(f"host {host.name}: {exc}") from None
    if not keys:
        raise UpstreamError(f"host {host.name} has no pinned SSH host key: run "
                            f"`edge host pin-ssh-key {host.name}` (or mark it --ssh-insecure)")
    return keys, [], []


def _host_key_algs(host: Host, known_hosts: tuple[list[asyncssh.SSHKey], list[Any], list[Any]] | None,
                   ) -> list[str]:
    """The host-key signatures to accept from ``host``: its pinned keys' (in their order, as
    asyncssh would choose) within :data:`UPSTREAM_HOST_KEY_ALGS`, or all of those if insecure."""
    if known_hosts is None:
        return list(UPSTREAM_HOST_KEY_ALGS)
    algs = list(dict.fromkeys(name for key in known_hosts[0] for alg in key.sig_algorithms
                              if (name := alg.decode("ascii")) in UPSTREAM_HOST_KEY_ALGS))
    if not algs:
        raise UpstreamError(f"host {host.name}: no pinned SSH host key of a type the proxy accepts "
                            f"({', '.join(UPSTREAM_HOST_KEY_ALGS)}): re-pin with `edge host "
                            f"pin-ssh-key {host.name}`")
    return algs


async def _open_socket(host: Host, client: tuple[str, int]) -> socket.socket:
    """A TCP connection to the host's SSH port, with the PROXY header for ``client`` already
    sent if the host asks for one (the caller bounds the time)."""
    loop = asyncio.get_running_loop()
    try:  # the usual case, an IP literal, needs no resolver thread hop per login
        ip = ipaddress.ip_address(host.address)
        family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
        address: tuple[Any, ...] = (host.address, host.ssh_port)
    except ValueError:
        infos = await loop.getaddrinfo(host.address, host.ssh_port, type=socket.SOCK_STREAM)
        family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, address)
        if host.send_proxy_protocol != "off":
            local = sock.getsockname()[:2]
            header = header_for_backend(host.send_proxy_protocol, client, local)
            await loop.sock_sendall(sock, header)
    except BaseException:
        sock.close()
        raise
    return sock


@dataclass(frozen=True, slots=True)
class LoginTimeouts:
    """How long the backend may take; its silence must never outlast the client's patience."""

    handshake: float = 10.0
    """TCP connect, PROXY header, banner, key exchange and host-key check, from the start."""
    auth: float = 10.0
    """The backend's answer to a credential, from the moment the credential is known."""
    relay: float = 120.0
    """Like ``auth`` for a keyboard-interactive relay (a person answers the prompts); also the
    life of a login still waiting for its credential (asyncssh's ``login_timeout``)."""


async def _bounded(login: asyncio.Task[asyncssh.SSHClientConnection], handshake: asyncio.Future[None],
                   credential: asyncio.Future[Credential], timeouts: LoginTimeouts,
                   where: str) -> asyncssh.SSHClientConnection:
    """``login``'s connection, or :class:`UpstreamError` when a step overruns its timeout.

    The wait for the credential itself (the client typing a password) is not the backend's
    time: it is bounded by the client's own login grace time, which cancels this.
    """
    loop = asyncio.get_running_loop()
    started = loop.time()
    known_at = [started] if credential.done() else []
    credential.add_done_callback(lambda _: known_at.append(loop.time()))
    first: set[asyncio.Future[Any]] = {login, handshake}
    await asyncio.wait(first, timeout=timeouts.handshake, return_when=asyncio.FIRST_COMPLETED)
    if not (login.done() or handshake.done()):
        raise UpstreamError(f"{where} did not complete the SSH handshake within {timeouts.handshake:g} s")
    then: set[asyncio.Future[Any]] = {login, credential}
    await asyncio.wait(then, return_when=asyncio.FIRST_COMPLETED)
    if not login.done():
        limit = timeouts.relay if credential.result().relay is not None else timeouts.auth
        await asyncio.wait({login}, timeout=known_at[0] + limit - loop.time())
        if not login.done():
            raise UpstreamError(f"{where} did not answer the login within {limit:g} s")
    return login.result()


async def connect_upstream(host: Host, username: str, credential: Credential | Awaitable[Credential], *,
                           client: tuple[str, int], timeouts: LoginTimeouts = LoginTimeouts(),
                           on_lost: Callable[[Exception | None], None] | None = None,
                           ) -> asyncssh.SSHClientConnection:
    """Log in to ``host`` as ``username`` with ``credential``.

    ``credential`` may still be pending (an awaitable): the TCP connection and key exchange then
    run while the client authenticates to the proxy, and the login waits for it. ``timeouts``
    bound the handshake and the backend's answer (:class:`LoginTimeouts`). ``on_lost(exc)`` is
    called if the logged-in connection later drops (must not raise). Raises
    :class:`UpstreamAuthFailed` when the backend refuses the credential and
    :class:`UpstreamError` for everything else (with a detail for the log).
    """
    known_hosts = known_hosts_for(host)
    host_key_algs = _host_key_algs(host, known_hosts)
    pending: asyncio.Future[Credential] = asyncio.ensure_future(credential) if not isinstance(
        credential, Credential) else asyncio.get_running_loop().create_future()
    if isinstance(credential, Credential):
        pending.set_result(credential)
    handshake: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    options: dict[str, Any] = dict(
        CLIENT_OPTIONS, username=username, known_hosts=known_hosts, server_host_key_algs=host_key_algs,
        # Our callbacks decide what is offered; password before keyboard-interactive so a plain
        # password never goes through a prompt we would have to interpret.
        preferred_auth="publickey,password,keyboard-interactive",
        public_key_auth=True, password_auth=True, kbdint_auth=True, client_keys=[],
        # Nothing from this machine's ~/.ssh may leak into a login on a user's behalf.
        config=None, agent_path=None, ignore_encrypted=True, gss_host=None,
        x509_trusted_certs=None, connect_timeout=None, login_timeout=timeouts.relay,
        client_factory=lambda: _UpstreamClient(pending, handshake, on_lost))
    where = f"{host.name} ({host.address}:{host.ssh_port})"

    async def login() -> asyncssh.SSHClientConnection:
        sock = await _open_socket(host, client)
        try:
            return await asyncssh.connect(sock=sock, **options)
        except (asyncssh.Error, OSError) as exc:
            # asyncssh keeps the exception in the dead connection, and its traceback holds
            # asyncssh's frame holding the connection: a cycle (see tuning.release_connection).
            exc.__traceback__ = None
            raise

    task = asyncio.ensure_future(login())
    try:
        return await _bounded(task, handshake, pending, timeouts, where)
    except asyncssh.PermissionDenied as exc:
        raise UpstreamAuthFailed(f"{where} refused the login of {username!r}: {exc.reason}") from None
    except asyncssh.HostKeyNotVerifiable as exc:
        raise UpstreamError(f"{where} presented a host key that is not pinned ({exc.reason}); if "
                            f"the backend was reinstalled, check and re-pin with `edge host "
                            f"pin-ssh-key {host.name}`",
                            "backend host key verification failed; the operator must check "
                            "this server") from None
    except asyncssh.DisconnectError as exc:
        raise UpstreamError(f"{where} disconnected during login: {exc.reason}") from None
    except (OSError, TimeoutError) as exc:
        raise UpstreamError(f"{where} unreachable: {exc.strerror or exc or type(exc).__name__}",
                            ) from None
    finally:
        if not task.done():
            task.cancel()  # asyncssh aborts the half-made connection and closes the socket


__all__ = ["Credential", "KbdIntRelay", "LoginTimeouts", "UpstreamAuthFailed", "UpstreamError",
           "connect_upstream", "known_hosts_for"]
