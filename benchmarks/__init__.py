"""Benchmarks and load-test harness for the hosting edge (``python -m benchmarks --help``).

Scenarios live in a small registry (:mod:`benchmarks.core`); each one measures the thing under
test *and* a peer in the same run (a plain dict, a raw ``SELECT``), so a result is a ratio that
survives a different machine, and writes a JSON file under ``benchmarks/results/``.
"""
