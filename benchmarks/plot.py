"""``--plot``: PNG charts from a result JSON (matplotlib, ``pip install -e '.[bench]'``).

* ``http``: latency CDF of every target (edge, nginx, haproxy, direct), cache off and on;
* ``workers``: requests/s vs workers, edge and nginx;
* ``scale``: RSS vs directory size (edge) next to RSS vs server blocks (nginx);
* ``tls``: handshakes per CPU-second vs distinct SNI names (the certificate-cache pressure);
* ``ssh`` / ``ftp`` / ``move``: login latency CDFs / move propagation per move.

``python -m benchmarks.plot RESULT.json...`` re-renders charts of earlier runs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("--plot needs matplotlib: .venv/bin/pip install -e '.[bench]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _cdf(values: list[float]) -> tuple[list[float], list[float]]:
    ordered = sorted(values)
    n = len(ordered)
    return ordered, [100 * (i + 1) / n for i in range(n)]


def plot_result(path: Path) -> list[Path]:
    """Render the charts for one result file; returns the PNGs written (next to it)."""
    doc = json.loads(Path(path).read_text())
    results = doc.get("results", {})
    scenario = doc.get("scenario", "")
    stem = Path(path).with_suffix("")
    plt = _pyplot()
    written: list[Path] = []

    def save(fig: Any, suffix: str) -> None:
        out = Path(f"{stem}-{suffix}.png")
        fig.tight_layout()
        fig.savefig(out, dpi=110)
        plt.close(fig)
        written.append(out)

    if scenario == "http" and results.get("results"):
        modes = results["results"]
        fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4.5), squeeze=False)
        for ax, (mode, block) in zip(axes[0], modes.items(), strict=False):
            for name, target in block["targets"].items():
                cdf = target["latency_cdf_ms"]
                ax.plot([v for _, v in cdf], [p for p, _ in cdf], marker=".",
                        label=f"{name} ({target['rps']:,.0f} req/s)")
            ax.set_xscale("log")
            ax.set_xlabel("latency (ms, log)")
            ax.set_ylabel("percentile")
            ax.set_title(f"HTTP keep-alive latency CDF, {mode.replace('_', ' ')}")
            ax.grid(True, alpha=0.3)
            ax.legend()
        save(fig, "latency-cdf")
    elif scenario == "workers" and results.get("series"):
        fig, ax = plt.subplots(figsize=(6, 4.5))
        for name, series in results["series"].items():
            if series:
                xs = sorted(int(k) for k in series)
                ax.plot(xs, [series[str(x)]["rps"] for x in xs], marker="o", label=name)
        ax.set_xlabel("worker processes")
        ax.set_ylabel("requests/s")
        ax.set_title("HTTP throughput vs workers")
        ax.grid(True, alpha=0.3)
        ax.legend()
        save(fig, "throughput-vs-workers")
    elif scenario == "scale" and results.get("edge"):
        fig, ax = plt.subplots(figsize=(6.5, 4.5))

        def med(samples: list[dict[str, Any]], key: str) -> float:
            values = sorted(s[key] for s in samples)
            return float(values[len(values) // 2])

        for label, data in (("edge serve (sites in directory)", results["edge"]),
                            ("nginx (static server blocks)", results.get("nginx", {}))):
            if data:
                xs = sorted(int(k) for k in data)
                # The same figure as the table: after requests (warm cache) when measured.
                first = data[str(xs[0])]["samples"][0]
                key = next(k for k in ("pss_after_requests_kib", "pss_kib", "rss_kib")
                           if k in first)
                ax.plot(xs, [med(data[str(x)]["samples"], key) / 1024 for x in xs],
                        marker="o", label=label)
        ax.set_xscale("log")
        ax.set_xlabel("sites / server blocks (log)")
        ax.set_ylabel("memory of master + workers, PSS (MiB)")
        ax.set_title("Memory vs number of sites")
        ax.grid(True, alpha=0.3)
        ax.legend()
        save(fig, "rss-vs-sites")
    elif scenario == "tls" and results.get("results"):
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        for name, data in results["results"].items():
            if data:
                xs = sorted(int(k) for k in data)
                ax.plot(xs, [data[str(x)]["per_cpu_second"] for x in xs], marker="o", label=name)
        ax.set_xscale("log")
        if results.get("context_cache_size"):
            ax.axvline(results["context_cache_size"], color="grey", linestyle="--",
                       label=f"edge context cache ({results['context_cache_size']})")
        ax.set_xlabel("distinct SNI names cycled (certificates)")
        ax.set_ylabel("handshakes per server CPU-second")
        ax.set_title("TLS handshakes vs certificate set size")
        ax.grid(True, alpha=0.3)
        ax.legend()
        save(fig, "handshakes-vs-certs")
    elif scenario in ("ssh", "ftp") and results.get("logins"):
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        for name, data in results["logins"].items():
            if data["latencies_ms"]:
                values, ranks = _cdf(data["latencies_ms"])
                ax.plot(values, ranks, label=f"{name} ({data['rate_per_s']:.1f} logins/s)")
        ax.set_xlabel("login latency (ms)")
        ax.set_ylabel("percentile")
        ax.set_title(f"{scenario.upper()} login latency CDF")
        ax.grid(True, alpha=0.3)
        ax.legend()
        save(fig, "login-cdf")
    elif scenario == "move" and results.get("moves"):
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        values = [(m["seconds"] or float("nan")) * 1000 for m in results["moves"]]
        ax.bar(range(1, len(values) + 1), values)
        ax.axhline(1000, color="red", linestyle="--", label="goal (poll interval)")
        ax.set_xlabel("move")
        ax.set_ylabel("commit → every worker on the new host (ms)")
        ax.set_title("Tenant move propagation under load")
        ax.legend()
        save(fig, "move-propagation")
    return written


def main(argv: list[str] | None = None) -> int:
    for name in argv if argv is not None else sys.argv[1:]:
        for png in plot_result(Path(name)):
            print(png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
