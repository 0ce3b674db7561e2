"""``python -m benchmarks [--quick] {lookup,propagation,rss,all} [options]``."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

from benchmarks import scenarios as _scenarios  # noqa: F401 - registers the scenarios
from benchmarks.core import RESULTS_DIR, SCENARIOS, Run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Benchmarks of the hosting edge. Each scenario measures a peer in the same "
                    "run, prints a table and writes a JSON file under benchmarks/results/.")
    parser.add_argument("--quick", dest="quick_top", action="store_true",
                        help="same as SCENARIO --quick (python -m benchmarks --quick all)")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--engine", choices=("mysql", "sqlite"), default="mysql",
                        help="where temporary databases go (default: the local MariaDB, "
                             "$EDGE_BENCH_MYSQL_URL or mysql://root@127.0.0.1:3306/)")
    common.add_argument("--database", default=None, metavar="URL",
                        help="use this database instead of a temporary one (loaded if empty, "
                             "reused if it already holds the fleet, never dropped); "
                             "e.g. sqlite:///tmp/bench.sqlite3")
    common.add_argument("--quick", action="store_true",
                        help="small sizes (20k sites): all scenarios in well under 2 minutes")
    common.add_argument("--results-dir", default=str(RESULTS_DIR), metavar="DIR")
    sub = parser.add_subparsers(dest="scenario", required=True, metavar="SCENARIO")
    for item in SCENARIOS.values():
        p = sub.add_parser(item.name, help=item.help, description=item.help, parents=[common])
        item.add_arguments(p)
    sub.add_parser("all", help="every scenario in turn (with their defaults or --quick)",
                   parents=[common])
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.quick = args.quick or args.quick_top
    names = list(SCENARIOS) if args.scenario == "all" else [args.scenario]
    started = time.perf_counter()
    for name in names:
        item = SCENARIOS[name]
        # Defaults of this scenario, then --quick overrides, then what was given explicitly.
        defaults = vars(build_parser().parse_args([name]))
        own = vars(args) if args.scenario == name else {}
        values = {**defaults, **{k: v for k, v in own.items() if v != defaults.get(k)}}
        for key in ("engine", "database", "quick", "results_dir"):
            values[key] = getattr(args, key)
        if args.quick:
            values.update({k: v for k, v in item.quick.items()
                           if k not in own or own[k] == defaults.get(k)})
        ns = argparse.Namespace(**values)
        values.pop("quick_top", None)
        run = Run(name, {k: v for k, v in values.items() if k != "scenario"})
        asyncio.run(item.run(ns, run))
        run.print_table()
        from pathlib import Path

        print(f"results: {run.save(Path(args.results_dir))}")
    print(f"\ntotal {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
