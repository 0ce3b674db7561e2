"""``python -m benchmarks SCENARIO... [--quick] [--plot] [--workers N] [options]``.

``python -m benchmarks provision --hosts 500 --tenants 100000 --sites 1000000 ...`` loads a
synthetic fleet; ``python -m benchmarks SCENARIO --help`` lists a scenario's own options (they
apply when one scenario is named; several scenarios run with their defaults / ``--quick``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from benchmarks import logins as _logins  # noqa: F401 - registers the scenarios
from benchmarks import move as _move  # noqa: F401
from benchmarks import scale as _scale  # noqa: F401
from benchmarks import scenarios as _scenarios  # noqa: F401
from benchmarks import web as _web  # noqa: F401
from benchmarks.core import RESULTS_DIR, SCENARIOS, Run

ORDER = ("lookup", "propagation", "rss", "http", "tls", "workers", "ssh", "ftp", "move", "scale")
"""Order of ``all`` and of --help: cheap directory scenarios first, the long ones last."""


def ordered() -> list[str]:
    return sorted(SCENARIOS, key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n))

DESCRIPTION = """\
Load tests of the hosting edge. Each scenario starts what it needs (a synthetic fleet in a
temporary database, backends, `edge serve`, nginx/haproxy/OpenSSH/pyftpdlib peers), drives
loopback-only load bounded in time and count, stops everything, prints a table with ratios
to the peer measured in the same run and writes benchmarks/results/SCENARIO-TIME.json.
A part that cannot run (a proxy not built yet, a tool not installed) is reported as
"skipped: <reason>" in the table and the JSON.

scenarios:
"""


def common_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="small sizes and short runs: every scenario in under 5 minutes")
    parser.add_argument("--plot", action="store_true",
                        help="also render PNG charts next to the JSON (needs matplotlib: "
                             "pip install -e '.[bench]')")
    parser.add_argument("--engine", choices=("mysql", "sqlite"), default="mysql",
                        help="where temporary databases go (default: the local MariaDB, "
                             "$EDGE_BENCH_MYSQL_URL or mysql://root@127.0.0.1:3306/)")
    parser.add_argument("--database", default=None, metavar="URL",
                        help="use this database instead of a temporary one (loaded if empty, "
                             "reused if it already holds the fleet, never dropped)")
    parser.add_argument("--results-dir", default=str(RESULTS_DIR), metavar="DIR")


def scenario_parser(name: str) -> argparse.ArgumentParser:
    item = SCENARIOS[name]
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks {name}", description=item.help)
    common_options(parser)
    item.add_arguments(parser)
    if not any(a.dest == "workers" for a in parser._actions):
        parser.add_argument("--workers", type=int, default=None, help=argparse.SUPPRESS)
    return parser


def multi_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=DESCRIPTION + "\n".join(f"  {n:<12} {SCENARIOS[n].help}" for n in ordered())
        + "\n  all          every scenario in turn"
        + "\n  provision    load a synthetic fleet (see: python -m benchmarks provision --help)",
        usage="python -m benchmarks SCENARIO... [--quick] [--plot] [--workers N] [--engine "
              "mysql|sqlite] [--database URL] [--results-dir DIR]")
    parser.add_argument("scenarios", nargs="*", metavar="SCENARIO")
    common_options(parser)
    parser.add_argument("--workers", type=int, default=None,
                        help="edge serve --workers for the scenarios that take it")
    parser.add_argument("--set", action="append", default=[], metavar="SCENARIO.OPTION=VALUE",
                        help="a scenario's own option when several run, e.g. --set "
                             "http.duration=5 --set scale.sizes=[1000,5000] (JSON values)")
    return parser


def parse_sets(items: list[str], parser: argparse.ArgumentParser) -> dict[str, dict[str, Any]]:
    """``--set http.duration=5`` → ``{"http": {"duration": 5}}`` (checked against the
    scenario's options; values are JSON, else plain strings)."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        target, sep, text = item.partition("=")
        name, dot, option = target.partition(".")
        option = option.replace("-", "_")
        if not sep or not dot or name not in SCENARIOS:
            parser.error(f"--set {item!r}: expected SCENARIO.OPTION=VALUE with a known scenario")
        known = vars(scenario_parser(name).parse_args([]))
        if option not in known:
            parser.error(f"--set {item!r}: {name} has no option {option!r} "
                         f"(see python -m benchmarks {name} --help)")
        try:
            value: Any = json.loads(text)
        except ValueError:
            value = text
        out.setdefault(name, {})[option] = value
    return out


def run_one(name: str, args: argparse.Namespace, explicit: dict[str, Any]) -> Path:
    """Run scenario ``name``: its defaults, then --quick overrides, then explicit options."""
    item = SCENARIOS[name]
    values = vars(scenario_parser(name).parse_args([]))
    if args.quick:
        values.update(item.quick)
    values.update({k: v for k, v in explicit.items() if k in values and v is not None})
    for key in ("engine", "database", "quick", "results_dir", "plot"):
        values[key] = getattr(args, key)
    ns = argparse.Namespace(**values)
    run = Run(name, dict(values))
    try:
        async def scenario_main() -> None:
            await item.run(ns, run)

        asyncio.run(scenario_main())
    except Exception as exc:  # one broken scenario must not lose the others' results
        traceback.print_exc()
        run.skip("*", f"failed: {type(exc).__name__}: {str(exc)[:300]}")
        run.data["error"] = traceback.format_exc()[-4000:]
    run.print_table()
    path = run.save(Path(args.results_dir))
    print(f"results: {path}", flush=True)
    if args.plot:
        from benchmarks.plot import plot_result

        for png in plot_result(path):
            print(f"chart: {png}", flush=True)
    return path


def _terminate(signum: int, frame: object) -> None:
    """SIGTERM/SIGHUP: unwind like Ctrl-C, so every started server is stopped."""
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _terminate)
    if argv and argv[0] == "provision":
        from benchmarks.provision import main as provision_main

        return provision_main(argv[1:])
    first = argv[0] if argv else ""
    if first in SCENARIOS and not any(a in SCENARIOS or a == "all" for a in argv[1:]):
        # One scenario: its own options apply (python -m benchmarks http --duration 30).
        names = [first]
        parser = scenario_parser(first)
        args = parser.parse_args(argv[1:])
        defaults = vars(parser.parse_args([]))
        explicit = {k: v for k, v in vars(args).items() if v != defaults.get(k)}
        sets = {}
    else:
        parser = multi_parser()
        args = parser.parse_args(argv)
        names = args.scenarios
        unknown = [n for n in names if n not in SCENARIOS and n != "all"]
        if unknown or not names:
            parser.error(f"unknown scenario {unknown[0]!r} (see --help)" if unknown else
                         "name at least one SCENARIO (or all)")
        explicit = {"workers": args.workers}
        sets = parse_sets(args.set, parser)
    todo = ordered() if "all" in names else list(dict.fromkeys(names))
    started = time.perf_counter()
    for name in todo:
        run_one(name, args, {**explicit, **sets.get(name, {})})
    print(f"\ntotal {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
