"""The layout's promise that anyone can check: no function in gmr/ is longer than 60 lines (a long
function is a sign that one concept hides several), and every module says what it is for."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "gmr"
MAX_LINES = 60


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_no_function_is_longer_than_60_lines():
    long = []
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_LINES:
                    long.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, "functions over 60 lines:\n" + "\n".join(long)


def test_every_module_has_a_docstring():
    missing = [str(p.relative_to(PACKAGE.parent)) for p in _modules() if not ast.get_docstring(ast.parse(p.read_text()))]
    assert not missing, missing
