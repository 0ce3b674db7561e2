"""The cached read API every proxy uses: ``account``, ``tenant``, ``host``, ``site``, ``certificate``.

Proxies never query the store themselves: they hold one :class:`Directory` per worker, which
owns one :class:`~edge.directory.cache.LookupCache` per kind and is kept current by
:class:`~edge.directory.feed.ChangeFeed`. Routes are chains of cached point lookups
(``route_for_account``, ``route_for_site``), so a tenant move is one evicted key.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from edge.config import CacheConfig
from edge.directory.breaker import Breaker
from edge.directory.cache import MISS, LookupCache, Miss
from edge.directory.model import Account, AcmeChallenge, Certificate, Change, Host, Site, Tenant
from edge.directory.names import hostname_or_none, wildcard_parent
from edge.directory.secrets import KeyBox
from edge.directory.store import SQLStore
from edge.errors import SecretsError

# Usernames the store can hold (validated on write); anything else is unknown without a query.
USERNAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._@+-]{0,127}")


@dataclass(frozen=True, slots=True)
class Route:
    """Where a login or request goes: the object, its tenant and the tenant's host."""

    tenant: Tenant
    host: Host


@dataclass(frozen=True, slots=True)
class AccountRoute(Route):
    account: Account


@dataclass(frozen=True, slots=True)
class SiteRoute(Route):
    site: Site


class Directory:
    """Cached lookups over one store. One instance per worker process; not thread-safe."""

    def __init__(self, store: SQLStore, config: CacheConfig | None = None, *,
                 keybox: KeyBox | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.clock = clock
        """The clock every lookup cache's expiry times are on (see :meth:`route_expiry`)."""
        self.config = config = config or CacheConfig()
        self.keybox = keybox
        self.breaker = Breaker(store.ping, probe_interval=config.probe_interval,
                               probe_interval_max=config.probe_interval_max)
        """Shared by every cache below and the change feed: one view of "is the database up"."""

        def cache(name: str, loader: Callable[..., Any],
                  size: int | None = None) -> LookupCache[Any, Any]:
            return LookupCache(name, loader,
                               max_entries=size or config.max_entries, ttl=config.ttl,
                               negative_ttl=config.negative_ttl,
                               stale_if_error=config.stale_if_error,
                               refresh_window=config.refresh_window,
                               ttl_spread=config.ttl_spread, breaker=self.breaker,
                               clock=clock)

        self.accounts: LookupCache[str, Account] = cache("account", store.fetch_account)
        self.tenants: LookupCache[str, Tenant] = cache("tenant", store.fetch_tenant)
        self.hosts: LookupCache[str, Host] = cache("host", store.fetch_host)
        self.sites: LookupCache[str, Site] = cache("site", self._load_site)
        self.wildcards: LookupCache[str, Site] = cache("wildcard", self._load_wildcard)
        self.certificates: LookupCache[int, Certificate] = cache(
            "certificate", self._load_certificate, config.max_certificates)
        self.challenges: LookupCache[str, AcmeChallenge] = cache(
            "acme_challenge", store.fetch_challenge, 1000)
        """Pending ACME challenge answers (edge.acme), evicted by ``challenge`` changes."""
        self.caches: tuple[LookupCache, ...] = (  # type: ignore[type-arg]
            self.accounts, self.tenants, self.hosts, self.sites, self.wildcards,
            self.certificates, self.challenges)

    # -- loaders -------------------------------------------------------------------------

    async def _load_site(self, hostname: str) -> Site | None:
        parent = wildcard_parent(hostname)
        if parent is None:
            exact, _ = await self.store.fetch_site_pair(hostname, None)
            return exact
        # One query answers both questions; remember the wildcard too, unless a change to
        # "*.parent" arrived while the query ran.
        token = self.wildcards.watch(parent)
        loaded = False
        try:
            exact, wild = await self.store.fetch_site_pair(hostname, "*." + parent)
            loaded = True
        finally:
            self.wildcards.put_watched(parent, wild if loaded else None, token, store=loaded)
        return exact

    async def _load_wildcard(self, parent: str) -> Site | None:
        site, _ = await self.store.fetch_site_pair("*." + parent, None)
        return site

    async def _load_certificate(self, certificate_id: int) -> Certificate | None:
        stored = await self.store.fetch_certificate(certificate_id)
        if stored is None:
            return None
        if self.keybox is None:
            raise SecretsError("a certificate was requested but no secret key is configured "
                               "([secrets] / $EDGE_SECRET_KEY)")
        return Certificate(id=stored.id, fingerprint=stored.fingerprint, names=stored.names,
                           not_before=stored.not_before, not_after=stored.not_after,
                           chain_pem=stored.chain_pem, key_pem=self.keybox.decrypt(
                               stored.key_encrypted))

    # -- read API ------------------------------------------------------------------------

    async def account(self, username: str) -> Account | None:
        """The account for a login name, or ``None``. Raises DirectoryUnavailable."""
        if not USERNAME_RE.fullmatch(username):
            return None
        return await self.accounts.get(username)

    async def tenant(self, name: str) -> Tenant | None:
        return await self.tenants.get(name)

    async def host(self, name: str) -> Host | None:
        return await self.hosts.get(name)

    async def certificate(self, certificate_id: int) -> Certificate | None:
        return await self.certificates.get(certificate_id)

    async def challenge(self, token: str) -> AcmeChallenge | None:
        """A pending ACME challenge answer (unexpired), or ``None``."""
        answer = await self.challenges.get(token)
        if answer is None or answer.expires_at < time.time():
            return None
        return answer

    def site_nowait(self, hostname: str) -> Site | Miss | None:
        """A cached answer for an already-normalised hostname, or :data:`MISS` (no I/O)."""
        exact = self.sites.peek(hostname)
        if isinstance(exact, Miss) or exact is not None:
            return exact
        parent = wildcard_parent(hostname)
        return None if parent is None else self.wildcards.peek(parent)

    def route_expiry(self, hostname: str, site: Site, tenant: Tenant) -> float:
        """When the first of the cached answers that resolved ``hostname`` (already
        normalised) to ``site`` → ``tenant`` → its host expires, on :attr:`clock`: whatever is
        derived from that route must not be used past it. For a wildcard match the exact
        name's negative answer counts too."""
        expires = min(self.sites.expiry(hostname), self.tenants.expiry(site.tenant),
                      self.hosts.expiry(tenant.host))
        if site.hostname != hostname:
            parent = wildcard_parent(hostname)
            expires = min(expires, self.wildcards.expiry(parent) if parent else float("-inf"))
        return expires

    async def site(self, hostname: str) -> Site | None:
        """The site serving ``hostname``: exact match first, then ``*.parent`` (one label).

        ``hostname`` may be raw (SNI, Host header): it is normalised here, and a name that is
        not a hostname is simply unknown.
        """
        # Cache keys are only ever canonical names, so a hit on the raw string proves it was
        # canonical: the common case skips normalisation (IDNA, per-label checks) entirely.
        cached = self.site_nowait(hostname)
        if not isinstance(cached, Miss):
            return cached
        name = hostname_or_none(hostname)
        if name is None:
            return None
        if name != hostname:
            cached = self.site_nowait(name)
            if not isinstance(cached, Miss):
                return cached
        exact = await self.sites.get(name)
        if exact is not None:
            return exact
        parent = wildcard_parent(name)
        return None if parent is None else await self.wildcards.get(parent)

    async def _route(self, tenant_name: str) -> tuple[Tenant, Host] | None:
        tenant = await self.tenants.get(tenant_name)
        if tenant is None:
            return None
        host = await self.hosts.get(tenant.host)
        return None if host is None else (tenant, host)

    async def route_for_account(self, username: str) -> AccountRoute | None:
        """Account → tenant → host, all cached; ``None`` if any link is missing."""
        account = await self.account(username)
        if account is None:
            return None
        route = await self._route(account.tenant)
        return None if route is None else AccountRoute(route[0], route[1], account)

    async def route_for_site(self, hostname: str) -> SiteRoute | None:
        """Site (exact, then wildcard) → tenant → host; ``None`` if unknown."""
        site = await self.site(hostname)
        if site is None:
            return None
        route = await self._route(site.tenant)
        return None if route is None else SiteRoute(route[0], route[1], site)

    # -- change feed ---------------------------------------------------------------------

    def apply_change(self, change: Change) -> None:
        """Evict exactly what ``change`` names (called by the change feed)."""
        entity, name = change.entity, change.name
        if entity == "account":
            self.accounts.evict(name)
        elif entity == "tenant":
            self.tenants.evict(name)
        elif entity == "host":
            self.hosts.evict(name)
        elif entity == "site":
            if name.startswith("*."):
                self.wildcards.evict(name[2:])
            else:
                self.sites.evict(name)
        elif entity == "certificate":
            self.certificates.evict(int(name))
        elif entity == "challenge":
            self.challenges.evict(name)
        elif entity == "all":
            for cache in self.caches:
                cache.clear()
        # Other entities (e.g. "purge") are for subscribers of the feed, not the lookup cache.

    async def close(self) -> None:
        """Stop the breaker's background probe (the store is closed by its owner)."""
        await self.breaker.close()

    def stats(self) -> dict[str, dict[str, int]]:
        return {cache.name: {**cache.stats.as_dict(), "entries": len(cache)}
                for cache in self.caches}


__all__ = ["MISS", "AccountRoute", "Directory", "Route", "SiteRoute"]
