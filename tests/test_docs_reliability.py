"""docs/reliability.md names the test behind every fault and attack it lists: each named test
must exist, so renaming or deleting one without updating the page fails here."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "reliability.md"


def _test_functions() -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in (ROOT / "tests").glob("test_*.py"):
        tree = ast.parse(path.read_text())
        found[f"tests/{path.name}"] = {node.name for node in ast.walk(tree)
                                       if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)}
    return found


def test_every_test_the_reliability_page_names_exists() -> None:
    functions = _test_functions()
    everywhere = set().union(*functions.values())
    missing, current = [], ""
    for span in re.findall(r"`([^`]+)`", PAGE.read_text()):
        path, _, name = span.partition("::")
        name = re.sub(r"\[.*", "", name)  # a parametrised id
        if re.fullmatch(r"tests/test_\w+\.py", path):
            current = path
            if path not in functions:
                missing.append(path)
            elif name and name not in functions[path]:
                missing.append(span)
        elif not path and name:  # `::name`: in the file named last
            if name not in functions.get(current, set()):
                missing.append(f"{current}::{name}")
        elif re.fullmatch(r"test_\w+", span) and span not in everywhere:
            missing.append(span)
    assert not missing, missing


def test_the_page_lists_at_least_forty_faults_and_attacks() -> None:
    rows = [line for line in PAGE.read_text().splitlines()
            if line.startswith("| ") and ("`tests/" in line or "`::" in line)]
    assert len(rows) >= 40, len(rows)
