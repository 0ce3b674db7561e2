"""``python -m benchmarks provision``: load a synthetic fleet into SQLite or MariaDB.

    python -m benchmarks provision --database mysql://root@127.0.0.1:3306/edge_bench_1m \\
        --hosts 500 --tenants 100000 --sites 1000000 --accounts 100000 --certs 10000

The database is created on MariaDB if missing; a database already holding exactly this fleet
is left as it is; any other non-empty database is refused. Pass the same URL to later runs
with ``--database`` so they skip the load.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from benchmarks.core import _mysql_admin
from benchmarks.fleet import FleetShape, provision_fleet


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks provision",
        description="Load a synthetic hosting fleet (hosts, tenants, sites with wildcards and "
                    "Zipf popularity, ssh/ftp accounts, certificates) through the bulk-load "
                    "path, in one transaction.")
    parser.add_argument("--database", required=True, metavar="URL",
                        help="sqlite:///PATH or mysql://user@host:port/DB (created if missing)")
    defaults = FleetShape()
    for name, help_text in (("hosts", "simulated backend hosts"), ("tenants", "tenants"),
                            ("sites", "sites (dealt round-robin over tenants)"),
                            ("accounts", "SSH/FTP accounts"),
                            ("certs", "certificates (one per tenant, first tenants)")):
        parser.add_argument(f"--{name}", type=int, default=getattr(defaults, name),
                            help=f"{help_text} (default {getattr(defaults, name):,})")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    return parser


def ensure_mysql_database(url: str) -> None:
    """CREATE DATABASE IF NOT EXISTS for a mysql:// URL with a database part."""
    if not url.startswith("mysql://"):
        return
    name = url.rstrip("/").rsplit("/", 1)[-1].split("?", 1)[0]
    if not name.replace("_", "").isalnum():
        raise SystemExit(f"database name {name!r}: use letters, digits and _ only")
    admin = _mysql_admin(url.rstrip("/").rsplit("/", 1)[0] + "/")
    try:
        with admin.cursor() as cursor:
            cursor.execute(f"CREATE DATABASE IF NOT EXISTS {name}")
    finally:
        admin.close()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        shape = FleetShape(hosts=args.hosts, tenants=args.tenants, sites=args.sites,
                           accounts=args.accounts, certs=args.certs, seed=args.seed)
    except ValueError as exc:
        print(f"provision: error: {exc}", file=sys.stderr)
        return 2
    ensure_mysql_database(args.database)
    result = asyncio.run(provision_fleet(args.database, shape, progress=True))
    if args.json:
        print(json.dumps({"shape": shape.as_dict(), **result}))
    elif result.get("reused"):
        print(f"{args.database} already holds this fleet: {result['counts']}")
    else:
        counts = ", ".join(f"{v:,} {k}s" for k, v in result["counts"].items())
        print(f"loaded {counts} in {result['seconds']:.1f} s "
              f"({result['rows_per_second']:,.0f} rows/s)")
    return 0
