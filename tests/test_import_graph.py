"""The package's imports form no cycle (tools/import_graph.py), the data code does not import the model, and
no test module imports another test module (shared code is in helpers.py and tiny_model.py)."""

from __future__ import annotations

import ast
from pathlib import Path

from helpers import ROOT, load_tool

import_graph = load_tool("import_graph")


def test_the_package_has_no_import_cycle() -> None:
    edges, _ = import_graph.graph(ROOT, "ticod")
    # The scan sees the imports (an empty graph has no cycle either): records is what both sides import.
    assert "ticod.data.records" in edges["ticod.data.coco"] & edges["ticod.data.shards"]
    assert import_graph.cycles(edges) == []


def test_data_does_not_import_the_model_or_the_trainer() -> None:
    edges, _ = import_graph.graph(ROOT, "ticod")
    for module, deps in edges.items():
        if module.startswith("ticod.data"):
            above = sorted(d for d in deps if not d.startswith(("ticod.data", "ticod.config")))
            assert not above, f"{module} imports {above}"


def test_a_cycle_is_found_also_through_a_late_relative_import(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from .c import g\n")
    (pkg / "sub" / "c.py").write_text("import pkg.a\n")
    (pkg / "d.py").write_text("from pkg import a\n")
    edges, sizes = import_graph.graph(tmp_path, "pkg")
    assert edges["pkg.sub.b"] == {"pkg.sub.c"} and edges["pkg.d"] == {"pkg.a"}
    assert sizes["pkg.sub.b"] == 2
    assert import_graph.cycles(edges) == [["pkg.a", "pkg.sub.b", "pkg.sub.c"]]


def imported_test_modules(path: Path) -> list[str]:
    """The test modules (``test_*``) and ``conftest`` that the file at ``path`` imports."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names = [node.module or ""]
        else:
            continue
        found += [n for n in names if n.split(".")[0].startswith("test_") or n.split(".")[0] == "conftest"]
    return found


def test_no_test_module_imports_another() -> None:
    files = sorted((ROOT / "tests").glob("*.py"))
    assert len(files) > 30
    imports = {f.name: imported_test_modules(f) for f in files}
    assert {k: v for k, v in imports.items() if v} == {}


def test_imports_of_test_modules_are_found(tmp_path: Path) -> None:
    (tmp_path / "test_x.py").write_text(
        "import os\nfrom test_train import ok\nimport conftest\ndef f():\n    import test_y.z\n"
    )
    assert imported_test_modules(tmp_path / "test_x.py") == ["test_train", "conftest", "test_y.z"]
