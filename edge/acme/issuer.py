"""Issuance and renewal: which name, which CA, when, and what happens on failure.

One :class:`Issuer` per ``edge serve`` (in worker 0, see docs/tls.md) and per CLI command.
For a name it

1. takes the fleet-wide lease in the directory (``acme_names.lease_owner``): of several edge
   processes, on one machine or many, exactly one places an order for a name at a time;
2. tries the accounts of ``[acme] environment`` by priority (primary CA, then fallbacks),
   skipping accounts that are backing off (CA down or rate limited);
3. publishes challenge answers through the directory (every worker answers them), runs the
   order in a thread (:mod:`edge.acme.client`), stores the certificate, points the site at it
   and marks the name valid in one transaction (the change feed makes it live everywhere);
4. on failure records the CA's text and backs off: ``backoff_base * 2**(failures-1)``, at
   most ``backoff_max``, per name; per account for account-wide failures (CA down, 429/503);
   never sooner than the CA's ``Retry-After`` (RFC 8555 §6.6) asks.

The renewal time is the CA's ARI suggestion when it gives one, else ``renew_fraction`` (2/3)
of the lifetime, spread by a per-name offset so that names issued together do not all fall
due in the same minute (see benchmarks/acme.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from acme.client import ClientV2 as AcmeClient

from edge import metrics
from edge.acme import client
from edge.acme.client import AcmeFailure
from edge.config import AcmeConfig, EdgeConfig
from edge.directory.model import AcmeAccount, AcmeName
from edge.directory.secrets import KeyBox
from edge.directory.service import DirectoryService
from edge.directory.stores import store_for_url
from edge.errors import EdgeError, NotFoundError

log = logging.getLogger("edge.acme")

SPREAD = 0.1
"""Renewal times are spread over this fraction of the lifetime after the 2/3 point."""

CLIENT_MAX_AGE = 3600.0
"""Seconds an ACME client (the CA's directory, a TLS connection, nonces) is reused for the
orders of one worker thread before it is made afresh."""

STATE_COUNT_INTERVAL = 60.0
"""Seconds between two counts of names by state for ``edge_acme_names``: the count scans the
whole table (0.6 s at 1,000,000 names on SQLite), too much for every ``poll_interval``. A
loop configured to poll faster than every 10 s counts every sixth round instead."""


@dataclass(frozen=True, slots=True)
class Outcome:
    hostname: str
    ok: bool
    text: str
    """The certificate id on success, else the CA's error text (or why nothing was tried)."""
    skipped: bool = False
    """Nothing was done because another process holds the name or renewed it meanwhile."""
    retry_after: float = 0.0
    """Seconds the CA asked us to wait (its ``Retry-After``; 0: none)."""


def backoff(config: AcmeConfig, failures: int) -> float:
    """Seconds to wait after ``failures`` consecutive failures."""
    return float(min(config.backoff_max, config.backoff_base * 2 ** max(0, failures - 1)))


def renewal_time(config: AcmeConfig, hostname: str, not_before: float, not_after: float,
                 ari: float | None) -> float:
    """When to renew: the CA's ARI time if it gave one, else at ``renew_fraction`` of the
    lifetime plus a stable per-name offset of up to ``SPREAD`` of it (no renewal burst)."""
    if ari is not None:
        return ari
    lifetime = max(0.0, not_after - not_before)
    offset = int.from_bytes(hashlib.sha256(hostname.encode()).digest()[:4], "big") / 2 ** 32
    fraction = min(config.renew_fraction + SPREAD * offset, 0.95)
    return not_before + lifetime * fraction


def _due(name: AcmeName, now: float) -> bool:
    """The same test as ``DirectoryService.due_acme_names`` (lease aside)."""
    return name.next_attempt <= now and (name.certificate_id is None or name.renew_at <= now)


def owner_id() -> str:
    """This process in lease rows: host and pid (readable in ``edge cert status``)."""
    return f"{socket.gethostname()[:40]}:{os.getpid()}"


class Issuer:
    def __init__(self, service: DirectoryService, config: AcmeConfig, keybox: KeyBox, *,
                 owner: str | None = None,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.service = service
        self.config = config
        self.keybox = keybox
        self.owner = owner or owner_id()
        self._slots = asyncio.Semaphore(max(1, config.concurrency))
        self._counted_at: float | None = None
        self._clients = threading.local()
        """Per worker thread: account URL -> (client, made at): one directory fetch, TLS
        connection and nonce supply for many orders instead of one each."""
        self._monotonic = monotonic

    # -- one name --------------------------------------------------------------------------

    async def issue(self, hostname: str, *, only_if_due: bool = False) -> Outcome:
        """Issue (or renew) now for one name, if no other process holds its lease.
        ``only_if_due``: skip it unless it is still due once the lease is ours (another
        process may have renewed it between our look at the due list and the lease)."""
        name = await self.service.acme_name(hostname)
        if not await self.service.lease_acme_name(name.hostname, self.owner,
                                                  self.config.lease_seconds):
            return Outcome(name.hostname, False, "another edge process is working on this name",
                           skipped=True)
        try:
            name = await self.service.acme_name(hostname)  # as of now that the lease is ours
            if only_if_due and not _due(name, time.time()):
                return Outcome(name.hostname, True, "renewed meanwhile by another edge process",
                               skipped=True)
            async with self._slots:
                return await self._issue_leased(name)
        finally:
            await self.service.release_acme_name(name.hostname, self.owner)

    async def _issue_leased(self, name: AcmeName) -> Outcome:
        now = time.time()
        accounts = [a for a in await self.service.acme_accounts()
                    if a.environment == self.config.environment]
        if not accounts:
            text = (f"no ACME account for environment {self.config.environment!r} "
                    "(`edge acme account add --directory URL`)")
            await self._failed(name, text, "no_account")
            return Outcome(name.hostname, False, text)
        usable = [a for a in accounts if a.next_attempt <= now]
        if not usable:
            first = min(a.next_attempt for a in accounts)
            text = "every CA account is backing off: " + "; ".join(
                f"{a.name}: {a.last_error}" for a in accounts)
            await self.service.record_acme_failure(name.hostname, text, first)
            metrics.ACME_ORDERS.labels(outcome="account_backoff").inc()
            return Outcome(name.hostname, False, text)
        errors: list[str] = []
        retry_after = 0.0
        for account in usable:
            outcome = await self._try_account(name, account)
            if outcome.ok:
                return outcome
            errors.append(f"{account.name}: {outcome.text}")
            retry_after = max(retry_after, outcome.retry_after)
        text = "; ".join(errors)
        await self._failed(name, text, None, retry_after)
        return Outcome(name.hostname, False, text, retry_after=retry_after)

    async def _replaces(self, name: AcmeName, account: AcmeAccount) -> str:
        """The ARI id of the certificate a renewal replaces, for the CA that issued it."""
        if name.certificate_id is None or name.account != account.name:
            return ""
        stored = await self.service.store.fetch_certificate(name.certificate_id)
        return "" if stored is None else client.ari_certificate_id(stored.chain_pem)

    async def _try_account(self, name: AcmeName, account: AcmeAccount) -> Outcome:
        loop = asyncio.get_running_loop()
        service = self.service
        replaces = await self._replaces(name, account)

        def publish(token: str, hostname: str, key_authorization: str) -> None:
            asyncio.run_coroutine_threadsafe(
                service.put_challenge(token, hostname, key_authorization), loop).result(30)

        def run() -> client.Issued:
            try:
                return client.issue(self._client(account), name.hostname, name.key_type,
                                    publish, challenge=self.config.challenge,
                                    timeout=self.config.order_timeout, replaces=replaces)
            except AcmeFailure as exc:
                if exc.account_wide:  # start afresh next time (new connection, directory)
                    self._thread_clients().pop(account.account_url, None)
                raise

        await service.count_acme_order(name.hostname)
        started = time.monotonic()
        try:
            issued = await asyncio.to_thread(run)
        except AcmeFailure as exc:
            metrics.ACME_ORDERS.labels(outcome=exc.kind).inc()
            log.warning("ACME order for %s at %s failed: %s", name.hostname, account.name, exc)
            if exc.account_wide:
                wait = max(exc.retry_after, backoff(self.config, account.failures + 1))
                await service.record_acme_account_result(account.name, error=str(exc),
                                                         retry_at=time.time() + wait)
            return Outcome(name.hostname, False, str(exc), retry_after=exc.retry_after)
        finally:
            await self._clear_challenges(name.hostname)
        metrics.ACME_ORDER_SECONDS.observe(time.monotonic() - started)
        # A window already past for a certificate issued this minute (a CA's slip) must not
        # make the name due again at once, order after order: wait one back-off step.
        renew_at = max(renewal_time(self.config, name.hostname, issued.not_before,
                                    issued.not_after, issued.advice.renew_at),
                       time.time() + backoff(self.config, 1))
        try:
            certificate_id = await service.install_acme_certificate(
                name.hostname, issued.chain_pem, issued.key_pem, renew_at=renew_at,
                account=account.name, check_at=issued.advice.check_at)
        except (EdgeError, NotFoundError) as exc:
            metrics.ACME_ORDERS.labels(outcome="install_failed").inc()
            return Outcome(name.hostname, False, f"storing the certificate failed: {exc}")
        if account.failures:
            await service.record_acme_account_result(account.name)
        metrics.ACME_ORDERS.labels(outcome="issued").inc()
        log.info("certificate %d issued for %s by %s", certificate_id, name.hostname, account.name)
        return Outcome(name.hostname, True, str(certificate_id))

    def _thread_clients(self) -> dict[str, tuple[AcmeClient, float]]:
        clients: dict[str, tuple[AcmeClient, float]] | None = getattr(self._clients, "by_account",
                                                                      None)
        if clients is None:
            clients = self._clients.by_account = {}
        return clients

    def _client(self, account: AcmeAccount) -> AcmeClient:
        """This thread's client for ``account`` (runs in the order's thread)."""
        clients = self._thread_clients()
        cached = clients.get(account.account_url)
        if cached is not None and time.monotonic() - cached[1] < CLIENT_MAX_AGE:
            return cached[0]
        acme = client.connect(account.directory_url, self.keybox.decrypt(account.key_encrypted),
                              account.account_url, ca_file=self.config.ca_file)
        clients[account.account_url] = (acme, time.monotonic())
        return acme

    async def _failed(self, name: AcmeName, text: str, outcome: str | None,
                      retry_after: float = 0.0) -> None:
        """Back the name off: never sooner than the CA's ``Retry-After`` asks."""
        wait = max(retry_after, backoff(self.config, name.failures + 1))
        await self.service.record_acme_failure(name.hostname, text, time.time() + wait)
        if outcome is not None:
            metrics.ACME_ORDERS.labels(outcome=outcome).inc()

    async def _clear_challenges(self, hostname: str) -> None:
        """Challenge answers are only needed while the CA validates."""
        await self.service.delete_challenges_for(hostname)

    # -- the loop --------------------------------------------------------------------------

    async def run_due(self, limit: int = 100) -> list[Outcome]:
        """Work on every name due now (up to ``limit``), ``concurrency`` at a time."""
        due = await self.service.due_acme_names(time.time(), limit)
        results = await asyncio.gather(*(self.issue(n.hostname, only_if_due=True) for n in due),
                                       return_exceptions=True)
        outcomes = []
        for name, result in zip(due, results, strict=True):
            if isinstance(result, BaseException):
                # One name's directory error must not stop the others (their leases are
                # released by issue() either way).
                log.warning("ACME: %s: %s", name.hostname, result)
                outcomes.append(Outcome(name.hostname, False, str(result)))
            else:
                outcomes.append(result)
        return outcomes

    async def recheck_renewal_info(self, limit: int = 100) -> int:
        """Ask the CAs' renewal information (ARI) again for valid names whose time to ask
        came (as the CA's ``Retry-After`` said): a CA may move the window earlier (e.g. before
        a mass revocation), and then the name falls due. Returns how many were asked."""
        names = await self.service.acme_names_to_recheck(time.time(), limit)
        accounts = {a.name: a for a in await self.service.acme_accounts()}
        asked = 0
        for account_name in sorted({n.account for n in names}):
            group = [n for n in names if n.account == account_name]
            account = accounts.get(account_name)
            if account is None:  # the issuing account is gone: only the 2/3 rule is left
                for name in group:
                    await self._advise(name, client.RenewalAdvice(None, None))
                continue
            asked += await self._recheck_at(account, group)
        return asked

    async def _recheck_at(self, account: AcmeAccount, names: list[AcmeName]) -> int:
        chains = {}
        for name in names:
            assert name.certificate_id is not None
            stored = await self.service.store.fetch_certificate(name.certificate_id)
            if stored is not None:
                chains[name.hostname] = stored.chain_pem

        def run() -> dict[str, client.RenewalAdvice]:
            acme = client.connect(account.directory_url, self.keybox.decrypt(account.key_encrypted),
                                  account.account_url, ca_file=self.config.ca_file)
            return {host: client.renewal_advice(acme, chain) for host, chain in chains.items()}

        try:
            advice = await asyncio.to_thread(run)
        except AcmeFailure as exc:
            log.warning("ACME renewal information from %s: %s", account.name, exc)
            advice = {host: client.RenewalAdvice(None, time.time() + 3600) for host in chains}
        for name in names:
            await self._advise(name, advice.get(name.hostname, client.RenewalAdvice(None, None)))
        return len(advice)

    async def _advise(self, name: AcmeName, advice: client.RenewalAdvice) -> None:
        assert name.certificate_id is not None
        renew_at = name.renew_at if advice.renew_at is None else advice.renew_at
        await self.service.record_renewal_advice(name.hostname, name.certificate_id, renew_at,
                                                 advice.check_at)

    async def run_forever(self) -> None:
        """``edge serve``: look for due names every ``poll_interval`` seconds."""
        while True:
            try:
                await self.run_due()
                await self.recheck_renewal_info()
                await self.export_metrics()
            except EdgeError as exc:
                log.warning("ACME loop: %s", exc)
            except Exception:
                log.exception("ACME loop failed")
            await asyncio.sleep(self.config.poll_interval)

    async def export_metrics(self) -> None:
        """Account back-off every call; names by state every ``STATE_COUNT_INTERVAL``."""
        now = self._monotonic()
        interval = min(STATE_COUNT_INTERVAL, 6 * self.config.poll_interval)
        if self._counted_at is None or now - self._counted_at >= interval:
            self._counted_at = now
            counts = await self.service.acme_state_counts()
            for state in ("pending", "valid", "failing"):
                metrics.ACME_NAMES.labels(state=state).set(counts.get(state, 0))
        accounts = await self.service.acme_accounts()
        now = time.time()
        for account in accounts:
            metrics.ACME_ACCOUNT_BACKOFF.labels(account=account.name).set(
                max(0.0, account.next_attempt - now))


async def run_in_worker(config: EdgeConfig, keybox: KeyBox) -> None:
    """The ``edge serve`` loop, with its own store on the write URL (the worker's own store
    may be a read replica)."""
    store = store_for_url(config.database.url, config.database)
    while True:
        try:
            await store.open()
            break
        except EdgeError as exc:
            log.warning("ACME loop waits for the directory: %s", exc)
            await asyncio.sleep(5)
    try:
        await Issuer(DirectoryService(store, keybox), config.acme, keybox).run_forever()
    finally:
        await store.close()
