"""Per-site and per-Host state an exchange reads on every request: :class:`SiteState` (a site's
compiled filters, rate limiter, cache policy and memos) and :class:`Route` (what one Host
header's bytes are routed to, resolved once), with the named memo types.

Kept apart from :mod:`httpproxy.server` (which owns and bounds them) so the exchange can name
them without importing the engine.
"""

from __future__ import annotations

from typing import NamedTuple

from edge.directory.model import Host, Site, Tenant
from edge.limits import RateLimiter
from httpproxy.cachepolicy import CachePolicy, RequestVerdict
from httpproxy.rules import CompiledFilters, Decision
from httpproxy.upstream import BackendKey

__all__ = ["CacheMemo", "CacheMemoKey", "FilterMemo", "FilterMemoKey", "Route", "SiteState"]

SITE_STATES_MAX = 100_000
"""Compiled per-site states kept per worker (oldest dropped first)."""


CacheMemoKey = tuple[bytes, bytes, str, bytes | None, str]
"""What a cache decision depends on for a request without cache-relevant headers: (method,
target, Host, Accept-Encoding, scheme). A plain tuple: built on every request, never read."""


class CacheMemo(NamedTuple):
    """A remembered cache decision (:attr:`SiteState.cache_memo`)."""

    verdict: RequestVerdict
    variant: bytes
    """The Accept-Encoding variant sent to the backend (:func:`~httpproxy.cachepolicy.encoding_variant`)."""
    key: bytes
    """The content cache key."""


CACHE_MEMO_MAX = 4096
"""Remembered cache decisions per site (see SiteState.cache_memo); cleared when full."""
FILTER_MEMO_MAX = 1024
"""Remembered filter outcomes per site (see SiteState.filter_memo); cleared when full."""
MEMO_ENTRIES_MAX = 262_144
"""Entries all sites' memos together (cache decisions, filter outcomes, IP-rule verdicts) may
gain in one worker before every site's memos are forgotten (:meth:`HttpEngine.memo_grew`).
Each site's own bound alone would let a scan over many sites, with many distinct URLs or
client addresses, grow them with the number of sites; with the key bound
(``exchange.MEMO_KEY_BYTES``) this keeps them under a few hundred MiB whatever arrives."""


FilterMemoKey = tuple[str, bytes, bytes, bytes | None, bytes | None]
"""The inputs a site's filters read after the IP rules: (scheme, method, target, User-Agent if
the rules read it, Host if they read it). A plain tuple: built on every request, never read."""


class FilterMemo(NamedTuple):
    """A remembered filter outcome (:attr:`SiteState.filter_memo`)."""

    decision: Decision
    headers: bytes
    """The response header lines the decision adds (``Name: value\r\n`` each), as bytes."""



class SiteState:
    """A site's compiled filters, rate limiter and cache policy (rebuilt when the site changes)."""

    __slots__ = ("_log_route", "_log_route_for", "cache_memo", "evaluate_filters", "filter_memo",
                 "filters", "limiter", "memo_filters", "memo_host", "memo_user_agent", "policy",
                 "site")

    def __init__(self, site: Site) -> None:
        self.site = site
        self.filters = CompiledFilters.from_rules(site.filters)
        self.limiter: RateLimiter | None = self.filters.new_rate_limiter()
        self.policy = CachePolicy.from_policy(site.cache_policy)
        # Most sites have no rules: skip building a RequestHead for them entirely.
        self.evaluate_filters = bool(site.filters) or site.https_redirect or site.hsts
        self._log_route = b""
        self._log_route_for: tuple[Tenant, Host] | None = None
        self.cache_memo: dict[CacheMemoKey, CacheMemo] = {}
        """(method, target, Host, Accept-Encoding, scheme) → (verdict, encoding variant, cache key) for
        requests without cache-relevant headers; cleared when full."""
        # After the IP rules, evaluate_filters() is a pure function of the scheme, the method,
        # the target and three headers, except for the rate limit (it spends a token, per
        # client) and Basic auth (the memo would hold credentials): without those, that part's
        # outcome is remembered per request shape (any client), and only the inputs the rules
        # actually read are part of the key.
        filters = self.filters
        self.memo_filters = self.limiter is None and not filters.auth_areas
        self.memo_user_agent = bool(filters.ua_deny)
        self.memo_host = site.https_redirect
        self.filter_memo: dict[FilterMemoKey, FilterMemo] = {}
        """(scheme, method, target, User-Agent if read, Host if read) → (the decision of
        :func:`httpproxy.rules.evaluate_after_ip`, the response headers it adds as bytes)."""

    def memo_entries(self) -> int:
        """Entries in this site's memos (cache decisions, filter outcomes, IP verdicts)."""
        return len(self.cache_memo) + len(self.filter_memo) + len(self.filters.ip_verdicts)

    def forget_memos(self) -> None:
        self.cache_memo.clear()
        self.filter_memo.clear()
        self.filters.ip_verdicts.clear()

    def log_route(self, tenant: Tenant, host: Host) -> bytes:
        """The access log's site/tenant/host fields, built once per route."""
        cached = self._log_route_for
        if cached is None or cached[0] is not tenant or cached[1] is not host:
            self._log_route_for = (tenant, host)
            self._log_route = (f'"site":"{self.site.hostname}","tenant":"{tenant.name}",'
                               f'"host":"{host.name}"').encode()
        return self._log_route


ROUTES_MAX = 10_000
"""Resolved Host headers remembered per worker (see :class:`Route`); the oldest is dropped
when full."""


class Route:
    """What a request with exactly these Host header bytes is routed to, resolved once.

    Only routes whose site, tenant and host were all fresh in the directory cache and whose
    tenant and host are active are remembered. :attr:`HttpEngine.routes` is cleared on every
    change the feed applies, and a route is used only until ``expires``: the first expiry of
    the directory cache answers it was resolved from. So a route is never older than a change
    the directory has seen and never outlives the directory cache's own TTL.

    (It used to be cleared once a second instead. With thousands of Host names in use, that
    sent every name's first request of each second through the full lookup again, and made a
    proxied request with 20,000 names cost ~1.6x one with a single name.)
    """

    __slots__ = ("backend_key", "expires", "fwd_parts", "host", "host_json", "host_str",
                 "log_route", "site", "state", "tenant")

    def __init__(self, host_str: str, site: Site, tenant: Tenant, host: Host, state: SiteState,
                 backend_key: BackendKey | None, host_json: bytes, expires: float) -> None:
        self.expires = expires
        """On the directory's clock (:attr:`edge.directory.directory.Directory.clock`)."""
        self.host_str = host_str
        self.site = site
        self.tenant = tenant
        self.host = host
        self.state = state
        self.backend_key = backend_key
        """The pool key, unless the host wants a PROXY header (that depends on the client)."""
        self.host_json = host_json
        self.log_route = state.log_route(tenant, host)
        self.fwd_parts: tuple[bytes, bytes, bytes] | None = None
        """The Host's pieces of the X-Forwarded block, made by the first exchange that needs
        them (``httpproxy.exchange._forwarded_host_parts``)."""


