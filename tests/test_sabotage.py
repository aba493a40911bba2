"""tools/sabotage.py on a package made here: it reports every stale row at once instead of stopping, runs the
others, and tells a caught row from a survived one. Whether the real rows still match the code is not
checked here (a refactor must not fail CI through them): ``python tools/sabotage.py --list`` reports it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import load_tool

sabotage = load_tool("sabotage")

MODULE = """
def add(a, b):
    return a + b


def mul(a, b):
    return a * b


def twice(x):
    return x + x


def thrice(x):
    return x + x + x
"""
TESTS = """
from ticod.arith import add, mul


def test_add():
    assert add(2, 3) == 5


def test_mul():
    assert mul(2, 3) == 6
"""


def row(name: str, pattern: str, replacement: str, tests: list[str]) -> str:
    return (
        f"- name: {name}\n  what: 'breaks {name}'\n  pattern: '{pattern}'\n"
        f"  replacement: '{replacement}'\n  tests: {json.dumps(tests)}\n"
    )


ROWS = (
    row("add-subtracts", r"return a \+ b", "return a - b", ["tests/test_arith.py::test_add"])
    + row("thrice-is-twice", r"return x \+ x \+ x", "return x + x", ["tests/test_arith.py::test_mul"])
    + row("gone", r"return a / b", "return b", ["tests/test_arith.py::test_add"])
    + row("twice", r"return x \+ x", "return x", ["tests/test_arith.py::test_add"])  # also in thrice
    + row("test-renamed", r"return a \* b", "return a", ["tests/test_maths.py::test_mul"])
)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "tree"
    (root / "ticod").mkdir(parents=True)
    (root / "tests").mkdir()
    (root / "ticod" / "__init__.py").write_text("")
    (root / "ticod" / "arith.py").write_text(MODULE)
    (root / "tests" / "test_arith.py").write_text(TESTS)
    (tmp_path / "rows.yaml").write_text(ROWS)
    return root


def test_list_reports_every_stale_row_and_exits_2(tree: Path, capsys: pytest.CaptureFixture) -> None:
    status = sabotage.main(["--list", "--root", str(tree), "--rows", str(tree.parent / "rows.yaml")])
    out, err = capsys.readouterr()
    assert status == 2
    assert "3 stale" in out
    assert (
        "STALE gone: pattern 'return a / b' must match exactly once in ticod/**/*.py, matches 0 times" in err
    )
    assert "STALE twice:" in err and "matches 2 times (ticod/arith.py:11, ticod/arith.py:15)" in err
    assert "STALE test-renamed: names test files that do not exist: tests/test_maths.py" in err
    assert "ticod/arith.py:3\n  - return a + b\n  + return a - b" in out


def test_a_run_skips_stale_rows_and_tells_caught_from_survived(tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    status = sabotage.main(["--root", str(tree), "--rows", str(tmp_path / "rows.yaml"), "--out", str(out)])
    assert status == 1
    results = {r["name"]: r for r in json.loads(out.read_text())}
    assert {n: r["result"] for n, r in results.items()} == {
        "add-subtracts": "caught",
        "thrice-is-twice": "survived",
        "gone": "stale",
        "twice": "stale",
        "test-renamed": "stale",
    }
    assert results["add-subtracts"]["failed"] == ["tests/test_arith.py::test_add"]
    assert (tree / "ticod" / "arith.py").read_text() == MODULE  # the copies were sabotaged, not the tree


def test_the_rows_file_loads(tmp_path: Path) -> None:
    rows = sabotage.load_rows()
    assert len(rows) >= 39 and all(s.tests and s.what for s in rows)
    bad = tmp_path / "bad.yaml"
    bad.write_text(ROWS + row("add-subtracts", "x", "y", ["tests/test_arith.py::test_add"]))
    with pytest.raises(ValueError, match=r"add-subtracts.*used twice"):
        sabotage.load_rows(bad)
    bad.write_text("- {name: a, what: b, pattern: '(', replacement: c, tests: [t]}\n")
    with pytest.raises(ValueError, match="pattern"):
        sabotage.load_rows(bad)
