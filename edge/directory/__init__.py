"""The tenant directory: model, stores (SQLite, MySQL/MariaDB), cache, change feed, writes.

Hot path (proxies): :class:`Directory` (cached reads) kept fresh by :class:`ChangeFeed`.
Operator path (CLI, bulk load): :class:`DirectoryService` (validated writes + change log).
"""

from edge.directory.directory import AccountRoute, Directory, Route, SiteRoute
from edge.directory.feed import ChangeFeed
from edge.directory.model import Account, Certificate, Change, Host, Site, Tenant
from edge.directory.names import normalize_hostname
from edge.directory.stores import store_for_url

__all__ = ["Account", "AccountRoute", "Certificate", "Change", "ChangeFeed", "Directory", "Host",
           "Route", "Site", "SiteRoute", "Tenant", "normalize_hostname", "store_for_url"]
