"""Sabotage check: break the package one line at a time and show that the tests notice.

``python tools/sabotage.py [--only NAME ...] [--list] [--out results.json] [--no-baseline] [--timeout S]``

The rows are data, in ``tools/sabotage_rows.yaml`` (``--rows``): each is a one-line change to ``ticod/`` (a
regular expression that must match exactly once in the package, and its replacement) and the tests that
must fail because of it. The tool copies the working tree (the files git tracks plus untracked ones it
does not ignore) into a temporary directory, first runs every named test there unchanged (the baseline:
a test that fails anyway proves nothing), then for each row makes a fresh copy, applies the row's change
and runs ``python -m pytest -q TESTS`` in the copy with ``PYTHONPATH`` set to it, after checking that
``import ticod`` there imports the copy and not the editable install. A row is *caught* when every one of
its tests fails (a parametrized test fails when any of its cases does), *partly caught* when only some
do, *survived* when all pass, and an *error* when pytest could not run them (exit status 2-5: a
collection or usage error, no tests) or timed out.

A row whose pattern matches no line or more than one, or that names a test file that does not exist, is
*stale*: the code or the tests moved on. Stale rows are found before anything runs, reported together
(each with where its pattern matches) and not run; the others run. ``--list`` checks every row against
the current tree, lists them and exits: status 2 when a row is stale. A refactor therefore never fails CI
through this tool; whoever runs it sees every stale row at once and mends the rows file. Prints a
markdown table; ``--out`` also writes the results as JSON. Exit status 0 when every row was caught, 1
otherwise, 2 when nothing could be judged (a failing baseline, stale rows under ``--list``).

The copy has no ``../shared``: the real COCO sample the tests look for there is passed on as
``TICOD_COCO_SAMPLE`` when it exists and that variable is not set.

Slow (the rows that need 2-rank training runs take minutes each) and not part of CI: run it before
resolving a change to core logic or to the tests that guard it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from helpers import run_killing_group  # noqa: E402 (tests/ is not a package)

PACKAGE = "ticod"
ROWS = ROOT / "tools" / "sabotage_rows.yaml"
# Never copied: environments, caches and run outputs (when the tree is not a git checkout).
SKIP_DIRS = {".git", ".venv", "__pycache__", ".pytest_cache", ".ruff_cache", "runs", "demo_data", "wandb"}
FIELDS = ("name", "what", "pattern", "replacement", "tests")


@dataclass(frozen=True)
class Sabotage:
    """A one-line change to the package and the tests that must fail under it."""

    name: str
    what: str  # the claim it breaks, in words
    pattern: str  # regular expression (re.MULTILINE); must match exactly once in ticod/**/*.py
    replacement: str  # re.sub replacement (may use groups)
    tests: tuple[str, ...]  # pytest node ids, relative to the repository root


def load_rows(path: Path = ROWS) -> list[Sabotage]:
    """The rows of a rows file; ValueError naming the row for a missing or unknown key, a bad regular
    expression or a repeated name."""
    rows, names = [], set()
    for i, row in enumerate(yaml.safe_load(path.read_text()) or []):
        label = f"{path.name}: row {i} ({row.get('name', '?') if isinstance(row, dict) else row!r})"
        if not isinstance(row, dict) or set(row) != set(FIELDS):
            keys = sorted(row) if isinstance(row, dict) else type(row).__name__
            raise ValueError(f"{label}: has {keys}, needs exactly {list(FIELDS)}")
        if row["name"] in names:
            raise ValueError(f"{label}: the name is used twice")
        if not row["tests"] or not all(isinstance(t, str) for t in row["tests"]):
            raise ValueError(f"{label}: tests must be a non-empty list of pytest node ids")
        try:
            re.compile(row["pattern"], re.MULTILINE)
        except re.error as e:
            raise ValueError(f"{label}: pattern: {e}") from None
        names.add(row["name"])
        rows.append(Sabotage(*(row[k] if k != "tests" else tuple(row[k]) for k in FIELDS)))
    return rows


@dataclass
class Result:
    """What one row did to the package and how its tests took it."""

    name: str
    what: str
    file: str
    line: int
    tests: list[str]
    before: str  # the line as it is
    after: str  # the line sabotaged ("" when deleted)
    result: str = "not run"  # caught | partly caught | survived | error | stale
    failed: list[str] = field(default_factory=list)  # node ids of the tests that failed (or errored)
    summary: list[str] = field(default_factory=list)  # their lines in pytest's short summary (the reason)
    seconds: float = 0.0


class StaleSabotage(RuntimeError):
    """A pattern matches no line of the package, or more than one; or a named test file is missing."""


def locate(tree: Path, sab: Sabotage) -> tuple[Path, re.Match[str]]:
    """The one file of ``tree/ticod`` where ``sab.pattern`` matches, and the match."""
    found = []
    for path in sorted((tree / PACKAGE).rglob("*.py")):
        found += [(path, m) for m in re.finditer(sab.pattern, path.read_text(), re.MULTILINE)]
    if len(found) != 1:
        where = ", ".join(f"{p.relative_to(tree)}:{line_of(m)}" for p, m in found) or "nowhere"
        raise StaleSabotage(
            f"pattern {sab.pattern!r} must match exactly once in {PACKAGE}/**/*.py, "
            f"matches {len(found)} times ({where})"
        )
    missing = sorted({t.split("::")[0] for t in sab.tests if not (tree / t.split("::")[0]).is_file()})
    if missing:
        raise StaleSabotage(f"names test files that do not exist: {', '.join(missing)}")
    return found[0]


def check_rows(
    tree: Path, rows: list[Sabotage]
) -> tuple[dict[str, tuple[Path, re.Match[str]]], dict[str, str]]:
    """Where each row applies, and why each stale row does not (every row checked, none run)."""
    where, stale = {}, {}
    for s in rows:
        try:
            where[s.name] = locate(tree, s)
        except StaleSabotage as e:
            stale[s.name] = str(e)
    return where, stale


def line_of(m: re.Match[str]) -> int:
    return m.string.count("\n", 0, m.start()) + 1


def sabotaged(m: re.Match[str], sab: Sabotage) -> str:
    """The text of the file ``m`` matched in, with ``sab`` applied."""
    return m.string[: m.start()] + m.expand(sab.replacement) + m.string[m.end() :]


def changed_line(m: re.Match[str], sab: Sabotage) -> tuple[str, str]:
    """The matched line before and after the sabotage (stripped; empty after: the line is deleted)."""
    start = m.string.rfind("\n", 0, m.start()) + 1
    end = m.string.find("\n", m.end() - 1 if m.group().endswith("\n") else m.end())
    after_end = end + len(sabotaged(m, sab)) - len(m.string)
    return m.string[start:end].strip(), sabotaged(m, sab)[start:after_end].strip()


def apply(tree: Path, sab: Sabotage) -> None:
    path, m = locate(tree, sab)
    path.write_text(sabotaged(m, sab))


def source_files(root: Path) -> list[Path]:
    """The working tree's files: git's tracked and untracked-but-not-ignored ones, or a plain walk."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=root,
            capture_output=True,
            check=True,
        ).stdout
        files = [Path(p.decode()) for p in out.split(b"\0") if p]
    except (OSError, subprocess.CalledProcessError):
        files = [
            p.relative_to(root)
            for p in root.rglob("*")
            if p.is_file() and not SKIP_DIRS.intersection(p.relative_to(root).parts)
        ]
    return [f for f in files if (root / f).is_file()]  # not the deleted ones git still tracks


def snapshot(root: Path, dest: Path) -> Path:
    for rel in source_files(root):
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / rel, dest / rel)
    return dest


def copy_env(tree: Path, root: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(tree), env.get("PYTHONPATH")) if p)
    sample = root.parent / "shared" / "coco_sample"  # where tests/conftest.py looks next to a checkout
    if "TICOD_COCO_SAMPLE" not in env and sample.is_dir():
        env["TICOD_COCO_SAMPLE"] = str(sample)
    return env


def check_imports_copy(tree: Path, root: Path) -> None:
    """``import ticod`` in the copy's environment must import the copy (not the editable install)."""
    out = subprocess.run(
        [sys.executable, "-c", f"import {PACKAGE}; print({PACKAGE}.__file__)"],
        cwd=tree,
        env=copy_env(tree, root),
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if Path(out).resolve() != (tree / PACKAGE / "__init__.py").resolve():
        raise RuntimeError(
            f"in the copy {tree}, `import {PACKAGE}` imports {out}: the sabotage would not apply"
        )


def run_pytest(tree: Path, root: Path, tests: list[str], *, timeout: float) -> tuple[int, str]:
    """Exit status and output of pytest on ``tests`` in ``tree``; its whole process group is killed after."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", *tests]
    try:
        proc = run_killing_group(cmd, env=copy_env(tree, root), timeout=timeout, cwd=tree, merge_output=True)
    except subprocess.TimeoutExpired:
        return -1, f"timed out after {timeout:.0f} s"
    return proc.returncode, proc.stdout


def summary_lines(output: str) -> list[str]:
    """The FAILED and ERROR lines of pytest's short summary (``-rfE``)."""
    return [line for line in output.splitlines() if line.startswith(("FAILED ", "ERROR "))]


def node_id(summary_line: str) -> str:
    return summary_line.split(" ", 1)[1].split(" - ")[0]


def verdict(status: int, tests: list[str], failed: list[str]) -> str:
    """caught / partly caught / survived / error, from pytest's exit status and failed node ids."""
    if status not in (0, 1):
        return "error"
    hit = [t for t in tests if any(f == t or f.startswith(f"{t}[") for f in failed)]
    if status == 0 or not hit:
        return "survived" if status == 0 else "error"  # failures, but none of the named tests
    return "caught" if len(hit) == len(tests) else "partly caught"


def table(results: list[Result]) -> str:
    rows = [
        "| sabotage | one-line change | where | tests that must catch it | result | failing test |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        failed = "<br>".join(f.removeprefix("tests/") for f in r.failed)
        tests = "<br>".join(t.split("::")[-1] for t in r.tests)
        where = f"{r.file}:{r.line}" if r.file else "-"
        rows.append(f"| {r.name} | {r.what} | {where} | {tests} | {r.result} | {failed or '-'} |")
    return "\n".join(rows)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", action="append", metavar="NAME", help="run only this row (repeatable)")
    p.add_argument(
        "--list", action="store_true", help="check every row against the tree, list the rows (stale ones too)"
    )
    p.add_argument(
        "--rows", type=Path, default=ROWS, help=f"the rows file (default {ROWS.relative_to(ROOT)})"
    )
    p.add_argument("--root", type=Path, default=ROOT, help="the tree to copy and sabotage (default this one)")
    p.add_argument("--out", type=Path, help="also write the results as JSON here")
    p.add_argument("--no-baseline", action="store_true", help="skip the unsabotaged run of the tests")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per pytest run (default 3600)")
    p.add_argument("--keep", action="store_true", help="keep the temporary copies (their path is printed)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    root = args.root.resolve()
    try:
        rows = load_rows(args.rows)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    chosen = rows
    if args.only:
        unknown = sorted(set(args.only) - {s.name for s in rows})
        if unknown:
            print(f"error: unknown sabotage(s) {unknown}; --list shows them", file=sys.stderr)
            return 2
        chosen = [s for s in rows if s.name in args.only]
    where, stale = check_rows(root, chosen)  # every row, before anything runs
    results = []
    for s in chosen:
        if s.name in stale:
            results.append(Result(s.name, s.what, "", 0, list(s.tests), "", "", result="stale"))
            continue
        path, m = where[s.name]
        before, after = changed_line(m, s)
        results.append(
            Result(s.name, s.what, str(path.relative_to(root)), line_of(m), list(s.tests), before, after)
        )
    for name, why in stale.items():
        print(f"STALE {name}: {why}; update it in {args.rows.name}", file=sys.stderr)
    if args.list:
        for s, r in zip(chosen, results, strict=True):
            if r.result == "stale":
                print(f"{s.name}: {s.what}\n  STALE: {stale[s.name]}")
            else:
                print(f"{s.name}: {s.what}\n  {r.file}:{r.line}\n  - {r.before}\n  + {r.after}")
            print(f"  caught by: {' '.join(s.tests)}")
        print(f"\n{len(chosen)} rows, {len(stale)} stale")
        return 2 if stale else 0

    runnable = [(s, r) for s, r in zip(chosen, results, strict=True) if r.result != "stale"]
    work = Path(tempfile.mkdtemp(prefix="ticod-sabotage-"))
    try:
        pristine = snapshot(root, work / "pristine")
        check_imports_copy(pristine, root)
        if not args.no_baseline and runnable:
            tests = sorted({t for s, _ in runnable for t in s.tests})
            print(f"baseline: {len(tests)} test(s) unchanged ...", flush=True)
            t0 = time.monotonic()
            status, out = run_pytest(pristine, root, tests, timeout=args.timeout)
            if status != 0:
                print(out[-6000:], file=sys.stderr)
                print(f"error: the tests fail without any sabotage (pytest exit {status})", file=sys.stderr)
                return 2
            print(f"baseline: all pass ({time.monotonic() - t0:.0f} s)", flush=True)
        for s, r in runnable:
            tree = work / s.name
            shutil.copytree(pristine, tree)
            apply(tree, s)
            check_imports_copy(tree, root)
            print(f"{s.name}: {r.file}:{r.line} ...", end=" ", flush=True)
            t0 = time.monotonic()
            status, out = run_pytest(tree, root, r.tests, timeout=args.timeout)
            r.seconds = round(time.monotonic() - t0, 1)
            r.summary = summary_lines(out)
            r.failed = [node_id(line) for line in r.summary]
            r.result = verdict(status, r.tests, r.failed)
            if r.result == "error":
                print(out[-3000:], file=sys.stderr)
            print(f"{r.result} ({r.seconds:.0f} s)", flush=True)
            if not args.keep:
                shutil.rmtree(tree, ignore_errors=True)
    finally:
        if args.keep:
            print(f"copies kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    print()
    print(table(results))
    if args.out:
        args.out.write_text(json.dumps([asdict(r) for r in results], indent=2) + "\n")
    bad = [r.name for r in results if r.result != "caught"]
    if bad:
        print(f"\nnot caught: {', '.join(bad)}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
