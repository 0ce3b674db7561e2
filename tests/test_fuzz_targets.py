"""Each coverage-guided fuzz target in tests/fuzz/ runs for a bounded number of inputs (atheris,
from its seed corpus, fixed seed) in its own process; a property failure or an undocumented
exception is a crash, and the test prints the input that caused it (also left in tmp_path).

Longer runs: ``python tests/fuzz/fuzz_ftp.py -atheris_runs=1000000 CORPUS_DIR``."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FUZZ = ROOT / "tests" / "fuzz"
TARGETS = sorted(p.stem for p in FUZZ.glob("fuzz_*.py"))
RUNS = 5000

pytest.importorskip("atheris")


def seed_corpus(target: str, directory: Path) -> None:
    sys.path.insert(0, str(FUZZ))
    try:
        harness = importlib.import_module("_harness")
        module = importlib.import_module(target)
        harness.write_seeds(directory, module.seeds())
    finally:
        sys.path.remove(str(FUZZ))


def test_every_parser_has_a_target() -> None:
    assert set(TARGETS) >= {"fuzz_clienthello", "fuzz_ftp", "fuzz_proxyproto",
                            "fuzz_request_head", "fuzz_response_head", "fuzz_rules"}


@pytest.mark.slow
@pytest.mark.parametrize("target", TARGETS)
def test_fuzz_target(target: str, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    seed_corpus(target, corpus)
    argv = [sys.executable, str(FUZZ / f"{target}.py"), f"-atheris_runs={RUNS}", "-seed=1",
            "-max_len=2048", "-rss_limit_mb=1024", "-timeout=20",
            f"-artifact_prefix={tmp_path}/", str(corpus)]
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=240,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    crashes = sorted(tmp_path.glob("crash-*")) + sorted(tmp_path.glob("timeout-*"))
    detail = proc.stderr[-4000:] + "".join(f"\n{p.name}: {p.read_bytes()!r}" for p in crashes)
    assert proc.returncode == 0 and not crashes, detail
    assert f"Done {RUNS} " in proc.stderr or "Done " in proc.stderr, detail
