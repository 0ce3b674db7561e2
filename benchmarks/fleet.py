"""Synthetic hosting fleets for load tests: shape, certificates, Zipf popularity, provisioning.

``python -m benchmarks provision --hosts 500 --tenants 100000 --sites 1000000 --accounts 100000
--certs 10000`` (and :func:`provision_fleet`) loads such a fleet through the bulk-load path of
the core (:func:`edge.directory.bulk.bulk_load`, one transaction).

Shape (deterministic for a given :class:`FleetShape`, so a load generator can name sites
without asking the database):

* hosts ``b0001``... on ``127.0.0.2``..``127.0.0.251`` (loopback only). Their ports are
  placeholders until a scenario starts its backends (which bind free ports) and calls
  :func:`attach_backends`; a reused fleet is re-attached the same way.
* tenant ``tenantN`` on host ``N % hosts``; sites dealt round-robin over tenants with
  :func:`edge.directory.bulk.synthetic_site_name` (apex, ``www.``, a wildcard ``*.`` for every
  third tenant, extra domains), i.e. "a few sites per tenant";
* the first ``certs`` tenants get one certificate covering ``tenantN.example`` and
  ``*.tenantN.example``, attached to every site of theirs it covers. All certificates are
  signed by one throw-away CA and share a small pool of P-256 keys, so 10,000 take seconds;
* accounts ``tenantN`` (then ``tenantN-2``...) with ssh+ftp (70 %) or one of them;
* odd sites have the cache policy ``{"mode": "full"}``, even sites none (cache on/off);
* popularity: :class:`Zipf` over site ranks (rank 1 = hottest), ranks shuffled over sites.
"""

from __future__ import annotations

import bisect
import datetime
import itertools
import json
import random
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from edge.directory.bulk import bulk_load, synthetic_site_name
from edge.directory.secrets import KeyBox
from edge.directory.service import DirectoryService
from edge.directory.stores import store_for_url

BENCH_SECRET_KEY = "YmVuY2htYXJrLW9ubHktc2VjcmV0LWtleS0zMmJ5dGU="
"""At-rest key of synthetic fleets (32 bytes, public on purpose: the keys it protects are
throw-away keys of a benchmark CA). Fixed so a fleet loaded once can be reused by later runs."""

CACHED_POLICY: dict[str, Any] = {"mode": "full"}
"""Cache policy of every odd site (:meth:`FleetShape.site_cached`); even sites have none."""

HOST_PORT_BASE = {"ssh": 13000, "ftp": 14000, "http": 11000, "https": 12000}
"""Placeholder ports of host i (base + i) until :func:`attach_backends` sets the real ones."""


@dataclass(frozen=True)
class FleetShape:
    """How big a synthetic fleet is; every derived name is a pure function of these."""

    hosts: int = 500
    tenants: int = 100_000
    sites: int = 1_000_000
    accounts: int = 100_000
    certs: int = 10_000
    seed: int = 1

    def __post_init__(self) -> None:
        if self.hosts < 1 or self.tenants < 1:
            raise ValueError("a fleet needs at least one host and one tenant")
        if self.hosts > 1000:
            raise ValueError("at most 1000 hosts (one loopback port block each)")
        if min(self.sites, self.accounts, self.certs) < 0:
            raise ValueError("sites, accounts and certs must not be negative")
        if self.certs > self.tenants:
            raise ValueError("at most one certificate per tenant (--certs <= --tenants)")

    @classmethod
    def for_sites(cls, sites: int, certs: int = 0) -> FleetShape:
        """The usual proportions: 10 sites and 1 account per tenant, <= 500 hosts."""
        tenants = max(1, sites // 10)
        return cls(hosts=min(500, max(2, tenants // 200)), tenants=tenants, sites=sites,
                   accounts=tenants, certs=min(certs, tenants))

    def host_name(self, index: int) -> str:
        return f"b{index + 1:04d}"

    def host_address(self, index: int) -> str:
        return f"127.0.0.{index % 250 + 2}"

    def tenant_host(self, tenant: int) -> int:
        return tenant % self.hosts

    def site_name(self, site: int) -> str:
        """Stored hostname of site ``site`` (0-based); may be a wildcard ``*.x``."""
        return synthetic_site_name(site % self.tenants, site // self.tenants)

    def request_name(self, site: int) -> str:
        """A hostname a client would send for site ``site`` (wildcards get a label)."""
        return self.site_name(site).replace("*", f"x{site}")

    def site_cached(self, site: int) -> bool:
        return site % 2 == 1

    def site_host(self, site: int) -> int:
        return self.tenant_host(self.site_tenant(site))

    def site_tenant(self, site: int) -> int:
        return site % self.tenants

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


# -- certificates ---------------------------------------------------------------------------

class CertFactory:
    """One throw-away CA and a small pool of EC keys: thousands of leaf certificates fast.

    Sharing keys between certificates is fine for a benchmark (the proxy still decrypts,
    parses and loads each certificate on its own) and makes 10,000 certificates take seconds
    rather than minutes.
    """

    def __init__(self, pool: int = 16, seed_name: str = "edge benchmark CA") -> None:
        now = datetime.datetime.now(datetime.UTC)
        self.not_before = now - datetime.timedelta(days=1)
        self.not_after = now + datetime.timedelta(days=365)
        self.ca_key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, seed_name)])
        self.ca_cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                        .public_key(self.ca_key.public_key())
                        .serial_number(x509.random_serial_number())
                        .not_valid_before(self.not_before).not_valid_after(self.not_after)
                        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                        .sign(self.ca_key, hashes.SHA256()))
        self.keys = [ec.generate_private_key(ec.SECP256R1()) for _ in range(max(1, pool))]
        self.key_pems = [k.private_bytes(serialization.Encoding.PEM,
                                         serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()).decode() for k in self.keys]
        self.ca_pem = self.ca_cert.public_bytes(serialization.Encoding.PEM).decode()

    def issue(self, names: Sequence[str], index: int) -> tuple[str, str]:
        """(chain PEM: leaf + CA, key PEM) for ``names``; key ``index % pool``."""
        key = self.keys[index % len(self.keys)]
        leaf = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
                .issuer_name(self.ca_cert.subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(self.not_before).not_valid_after(self.not_after)
                .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]),
                               critical=False)
                .sign(self.ca_key, hashes.SHA256()))
        chain = leaf.public_bytes(serialization.Encoding.PEM).decode() + self.ca_pem
        return chain, self.key_pems[index % len(self.key_pems)]


def cert_names(tenant: int) -> list[str]:
    return [f"tenant{tenant}.example", f"*.tenant{tenant}.example"]


# -- popularity -----------------------------------------------------------------------------

class Zipf:
    """Zipf(s) popularity over ``n`` sites: rank k has weight 1/k**s; ranks are shuffled over
    site indexes (seeded) so hot sites are spread over tenants and hosts."""

    def __init__(self, n: int, s: float = 1.0, seed: int = 42) -> None:
        if n < 1:
            raise ValueError("Zipf needs at least one item")
        self.n = n
        weights = [1.0 / (k ** s) for k in range(1, n + 1)]
        self.cumulative = list(itertools.accumulate(weights))
        self.order = list(range(n))
        random.Random(seed).shuffle(self.order)

    def sample(self, count: int, seed: int = 7) -> list[int]:
        """``count`` site indexes drawn by popularity."""
        rng = random.Random(seed)
        total = self.cumulative[-1]
        return [self.order[min(self.n - 1, bisect.bisect_left(self.cumulative, rng.random() * total))]
                for _ in range(count)]

    def hottest(self, count: int) -> list[int]:
        return self.order[:count]


# -- the fleet as bulk-load lines -----------------------------------------------------------

def fleet_lines(shape: FleetShape, certs: CertFactory | None = None) -> Iterator[str]:
    """JSON Lines for :func:`edge.directory.bulk.bulk_load`, in load order."""
    dumps = json.JSONEncoder(separators=(",", ":")).encode
    rng = random.Random(shape.seed)
    for h in range(shape.hosts):
        yield dumps({"kind": "host", "name": shape.host_name(h), "address": shape.host_address(h),
                     **{f"{p}_port": base + h for p, base in HOST_PORT_BASE.items()}})
    for t in range(shape.tenants):
        yield dumps({"kind": "tenant", "name": f"tenant{t}",
                     "host": shape.host_name(shape.tenant_host(t))})
    if shape.certs:
        factory = certs or CertFactory()
        for t in range(shape.certs):
            chain, key = factory.issue(cert_names(t), t)
            yield dumps({"kind": "certificate", "ref": f"c{t}", "cert_pem": chain, "key_pem": key})
    for s in range(shape.sites):
        tenant = shape.site_tenant(s)
        name = shape.site_name(s)
        record: dict[str, Any] = {"kind": "site", "hostname": name, "tenant": f"tenant{tenant}"}
        if tenant < shape.certs and name.endswith(f"tenant{tenant}.example"):
            record["certificate"] = f"c{tenant}"
        if s % 2 == 1:  # odd sites cache everything, even sites never: cache on/off runs
            record["cache_policy"] = CACHED_POLICY
        yield dumps(record)
    for a in range(shape.accounts):
        tenant, nth = a % shape.tenants, a // shape.tenants
        username = f"tenant{tenant}" if nth == 0 else f"tenant{tenant}-{nth + 1}"
        protocols = ["ftp", "ssh"] if rng.random() < 0.7 else [rng.choice(("ssh", "ftp"))]
        yield dumps({"kind": "account", "username": username, "tenant": f"tenant{tenant}",
                     "protocols": protocols, "upstream_username": username})


def progress_bar(done: int, total: int, width: int = 24) -> str:
    """``[#########...............]  37%``"""
    fraction = min(1.0, done / total) if total else 1.0
    filled = round(fraction * width)
    return f"[{'#' * filled}{'.' * (width - filled)}] {fraction * 100:3.0f}%"


async def provision_fleet(url: str, shape: FleetShape, *, progress: bool = False,
                          ) -> dict[str, Any]:
    """Make ``url`` hold ``shape``'s fleet; returns what was done and how fast.

    An existing database already holding this shape (hosts, tenants, sites and accounts equal,
    at least as many certificates) is reused, so a 1M-site fleet is loaded once and passed
    with ``--database`` to later runs; a database holding something else is refused rather
    than mixed.
    """
    store = store_for_url(url)
    await store.open()
    try:
        await store.migrate()
        counts = {k: await store.count(t) for k, t in (
            ("hosts", "hosts"), ("tenants", "tenants"), ("sites", "sites"),
            ("accounts", "accounts"), ("certs", "certificates"))}
        wanted = {k: getattr(shape, k) for k in counts}
        # Extra certificates do not change a lookup's cost: a fleet loaded with certificates
        # serves the scenarios that need fewer (or none).
        if all(counts[k] == v for k, v in wanted.items() if k != "certs") \
                and counts["certs"] >= wanted["certs"]:
            return {"reused": True, "counts": counts}
        if any(counts.values()):
            raise SystemExit(f"{url} holds {counts}, not the fleet {wanted}: use an empty "
                             "database (or the one this shape was loaded into)")
        started = time.perf_counter()
        last = [started]

        expected = {"host": shape.hosts, "tenant": shape.tenants, "site": shape.sites,
                    "account": shape.accounts, "certificate": shape.certs}

        def report(kind: str, count: int) -> None:
            if progress and time.perf_counter() - last[0] > 5:
                last[0] = time.perf_counter()
                print(f"  ... provision {progress_bar(count, expected.get(kind, count))} "
                      f"{count:,}/{expected.get(kind, count):,} {kind}s "
                      f"({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)

        loaded = await bulk_load(store, fleet_lines(shape), keybox=KeyBox.from_text(BENCH_SECRET_KEY),
                                 progress=report, batch_size=5000)
        seconds = time.perf_counter() - started
        return {"reused": False, "counts": loaded, "seconds": seconds,
                "rows_per_second": sum(loaded.values()) / seconds}
    finally:
        await store.close()


async def attach_backends(url: str, shape: FleetShape, ports: dict[str, list[int]],
                          hosts: Sequence[int] | None = None) -> None:
    """Point hosts at the ports the backends really bound (``ports[proto][i]`` for host i).

    ``hosts`` limits it to these host indexes (others keep their ports). One transaction per
    host through :class:`DirectoryService`, so every running proxy sees it via the feed.
    """
    store = store_for_url(url)
    await store.open()
    try:
        service = DirectoryService(store)
        for i in hosts if hosts is not None else range(shape.hosts):
            fields = {f"{proto}_port": values[i] for proto, values in ports.items()
                      if i < len(values)}
            if fields:
                await service.update_host(shape.host_name(i), **fields)
    finally:
        await store.close()
