"""On-demand certificates at the first TLS handshake (``[acme] on_demand``, off by default).

The HTTPS proxy calls :meth:`OnDemand.obtain` only for a name the directory *has* as a site
without a certificate: the directory answers the question Caddy's ``ask`` endpoint exists
for, through the same cached lookup as every handshake. A random SNI is unknown to the
directory, so it never gets here and never costs an ACME request.

Bounds: the client waits at most ``on_demand_wait`` seconds (and never past its handshake
deadline), then gets the alert ``internal_error``; orders are rate limited per tenant and in
total **fleet-wide**, by token buckets in the directory (``acme_budgets``: every worker of
every machine takes from the same rows), behind the same figures as per-worker buckets of
:mod:`edge.limits` that spare the directory a write for attempts a worker refuses anyway;
concurrent handshakes for one name share one attempt, and the directory lease keeps the other
workers and machines from ordering it too (they wait for the certificate the lease holder
installs).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from edge.acme.issuer import Issuer
from edge.config import EdgeConfig
from edge.directory.directory import Directory
from edge.directory.model import Certificate, Site
from edge.directory.secrets import KeyBox
from edge.directory.service import DirectoryService
from edge.directory.store import SQLStore
from edge.directory.stores import store_for_url
from edge.errors import EdgeError
from edge.limits import RateLimiter

log = logging.getLogger("edge.acme.ondemand")

WAIT_POLL = 0.2
"""Seconds between looks at the directory while another process holds the name's lease."""

RECENT_SECONDS = 10.0
"""How long a certificate just obtained is handed out again without a new attempt: until the
change feed (about a second) brings it to this worker's directory cache, every handshake for
the name still looks certificate-less and would spend the rate limits again."""
RECENT_MAX = 1000


class OnDemand:
    """One per HTTPS proxy (worker) when ``[acme] on_demand`` is on."""

    def __init__(self, config: EdgeConfig, directory: Directory, keybox: KeyBox) -> None:
        acme = config.acme
        self.config = config
        self.directory = directory
        self.keybox = keybox
        self.per_tenant = RateLimiter(acme.on_demand_per_tenant / 60.0,
                                      max(1.0, acme.on_demand_per_tenant))
        self.overall = RateLimiter(acme.on_demand_total / 60.0, max(1.0, acme.on_demand_total))
        self._store: SQLStore | None = None
        self._issuer: Issuer | None = None
        self._flights: dict[str, asyncio.Task[Certificate | None]] = {}
        self._recent: dict[str, tuple[Certificate, float]] = {}
        self.refused = 0
        """Attempts refused by the rate limits (tests and metrics read it)."""

    async def obtain(self, site: Site, timeout: float) -> Certificate | None:  # noqa: ASYNC109
        """The site's certificate, issued now if need be; None when it could not be had
        within ``timeout`` seconds (or a rate limit refused the attempt)."""
        if site.hostname.startswith("*."):
            # Every random name under a wildcard site lands here, and ACME issues wildcards by
            # DNS-01 only: no attempt, so such a flood spends none of the rate limits below.
            return None
        recent = self._recent.get(site.hostname)
        if recent is not None and recent[1] > time.monotonic():
            return recent[0]
        flight = self._flights.get(site.hostname)
        if flight is None:
            if not self.overall.allow("all") or not self.per_tenant.allow(site.tenant):
                self.refused += 1
                log.warning("on-demand certificate for %s refused: rate limit", site.hostname)
                return None
            flight = asyncio.get_running_loop().create_task(self._obtain(site))
            self._flights[site.hostname] = flight
            flight.add_done_callback(lambda done: self._landed(site.hostname, done))
        wait = min(timeout, self.config.acme.on_demand_wait)
        try:
            return await asyncio.wait_for(asyncio.shield(flight), max(0.0, wait))
        except TimeoutError:
            return None

    def _landed(self, hostname: str, flight: asyncio.Task[Certificate | None]) -> None:
        self._flights.pop(hostname, None)
        if flight.cancelled() or flight.exception() is not None:
            return
        certificate = flight.result()
        now = time.monotonic()
        if len(self._recent) >= RECENT_MAX:
            self._recent = {k: v for k, v in self._recent.items() if v[1] > now}
        if certificate is not None and len(self._recent) < RECENT_MAX:
            self._recent[hostname] = (certificate, now + RECENT_SECONDS)

    async def _obtain(self, site: Site) -> Certificate | None:
        issuer = await self._get_issuer()
        service = issuer.service
        acme = self.config.acme
        try:
            if not (await service.take_acme_budget("all", acme.on_demand_total)
                    and await service.take_acme_budget(f"tenant:{site.tenant}",
                                                       acme.on_demand_per_tenant)):
                self.refused += 1
                log.warning("on-demand certificate for %s refused: fleet-wide rate limit",
                            site.hostname)
                return None
            await service.enable_auto_cert(site.hostname)
            outcome = await issuer.issue(site.hostname, only_if_due=True)
        except EdgeError as exc:
            log.warning("on-demand certificate for %s: %s", site.hostname, exc)
            return None
        if not outcome.ok and not outcome.skipped:
            return None
        # Issued here, or by the process holding the lease: wait for its certificate id.
        deadline = time.monotonic() + self.config.acme.order_timeout
        while time.monotonic() < deadline:
            name = await service.acme_name(site.hostname)
            if name.certificate_id is not None:
                return await self.directory.certificate(name.certificate_id)
            if name.state == "failing" and name.lease_until < time.time():
                return None
            await asyncio.sleep(WAIT_POLL)
        return None

    async def _get_issuer(self) -> Issuer:
        if self._issuer is None:
            # Writes go to the primary: the worker's own store may be a read replica.
            store = store_for_url(self.config.database.url, self.config.database)
            await store.open()
            self._store = store
            self._issuer = Issuer(DirectoryService(store, self.keybox), self.config.acme,
                                  self.keybox)
        return self._issuer

    async def close(self) -> None:
        for flight in list(self._flights.values()):
            flight.cancel()
        if self._store is not None:
            with contextlib.suppress(Exception):
                await self._store.close()
