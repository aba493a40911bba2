"""The package's module graph: each module's size and the package modules it imports, and its cycles.

``python tools/import_graph.py [--package ticod] [--root DIR]``

Reads the source with :mod:`ast` (nothing is imported), counting every ``import`` of a package module,
also those inside functions and under ``TYPE_CHECKING``: a cycle that a late import hides is still one.
Prints one line per module (lines, imported package modules), then the cycles. Exit status 1 when there is
a cycle, 0 otherwise.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The absolute module name a (possibly relative) ``from ... import`` names."""
    if not node.level:
        return node.module or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def imports(path: Path, module: str, modules: set[str]) -> set[str]:
    """The modules of ``modules`` that ``path`` (module ``module``) imports, anywhere in the file."""
    found: set[str] = set()
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(node, module, is_package)
            # ``from pkg import mod`` imports the submodule pkg.mod; ``from mod import name`` the module.
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for name in names:
            # ``import a.b.c`` of a name that is not a module: its closest enclosing module.
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


def graph(root: Path, package: str) -> tuple[dict[str, set[str]], dict[str, int]]:
    """Module -> the package modules it imports, and module -> its number of lines."""
    paths = {module_name(p, root): p for p in sorted((root / package).rglob("*.py"))}
    modules = set(paths)
    edges = {m: imports(p, m, modules) for m, p in paths.items()}
    sizes = {m: len(p.read_text().splitlines()) for m, p in paths.items()}
    return edges, sizes


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return sorted(found)


def listing(edges: dict[str, set[str]], sizes: dict[str, int], package: str) -> str:
    width = max(map(len, edges))
    rows = []
    for m in sorted(edges):
        deps = " ".join(sorted(d.removeprefix(f"{package}.") for d in edges[m]))
        rows.append(f"{m:<{width}}  {sizes[m]:>5}  {deps or '-'}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--package", default="ticod")
    p.add_argument("--root", type=Path, default=ROOT, help="the directory holding the package")
    args = p.parse_args(argv)
    sys.setrecursionlimit(10_000)
    edges, sizes = graph(args.root, args.package)
    print(f"{'module':<{max(map(len, edges))}}  lines  imports ({args.package}.*)")
    print(listing(edges, sizes, args.package))
    found = cycles(edges)
    print(f"\n{len(edges)} modules, {sum(sizes.values())} lines, {len(found)} import cycle(s)")
    for c in found:
        print("cycle: " + " <-> ".join(c))
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
