"""The README and docs/ stay true: every script their commands name exists and answers ``--help``."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(?:bash|sh)\n(.*?)^```", re.M | re.S)
SCRIPT = re.compile(r"(?<![\w/.-])((?:tools|launch)/[\w/.-]+\.(?:py|sh))\b")
MODULE = re.compile(r"python -m (ticod(?:\.\w+)+)")
README_MAX_BYTES = 12 * 1024  # details go to docs/


def commands() -> dict[str, list[str]]:
    """Script paths and ``python -m`` modules named in fenced bash blocks -> the pages naming them."""
    found: dict[str, list[str]] = {}
    for page in PAGES:
        for block in FENCE.findall(page.read_text()):
            for name in SCRIPT.findall(block) + MODULE.findall(block):
                found.setdefault(name, []).append(page.name)
    return found


# Runs ``--help`` of each Python command in turn in one interpreter, as ``python FILE`` / ``python -m MODULE``
# would (``__main__``, its own argv): the commands share their imports (torch, ticod) instead of paying for
# them once each. Prints {name: [exit status, stdout]} as JSON.
HELP_DRIVER = """
import contextlib, io, json, os, runpy, sys
results = {}
for name in sys.argv[1:]:
    out = io.StringIO()
    sys.argv = [name, "--help"]
    status = 0
    try:
        with contextlib.redirect_stdout(out):
            if name.endswith(".py"):
                sys.path.insert(0, os.path.dirname(os.path.abspath(name)))  # as python FILE puts it
                try:
                    runpy.run_path(name, run_name="__main__")
                finally:
                    sys.path.pop(0)
            else:
                runpy.run_module(name, run_name="__main__", alter_sys=True)
    except SystemExit as e:
        status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException as e:
        status, out = 1, io.StringIO(f"{type(e).__name__}: {e}")
    results[name] = [status, out.getvalue()]
print(json.dumps(results))
"""


def test_the_docs_name_commands():
    found = commands()
    # The pages this test reads must keep naming the entry points; an empty scan would pass anything.
    for name in ("launch/quickstart.sh", "launch/test.sh", "tools/shard_coco.py", "ticod.train"):
        assert name in found, f"{name} is no longer in a fenced bash block of README.md or docs/"
    assert any(n.startswith("tools/bench/") for n in found)


def test_every_script_the_docs_name_exists():
    missing = {n: pages for n, pages in commands().items() if "/" in n and not (ROOT / n).is_file()}
    assert not missing, f"named in the docs but missing: {missing}"


def test_every_command_the_docs_name_answers_help():
    names = sorted(n for n in commands() if "/" not in n or (ROOT / n).is_file())
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    python = [n for n in names if not n.endswith(".sh")]
    driver = subprocess.run(
        [sys.executable, "-c", HELP_DRIVER, *python],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert driver.returncode == 0, driver.stderr[-3000:]
    results = {n: tuple(r) for n, r in json.loads(driver.stdout.splitlines()[-1]).items()}
    for name in (n for n in names if n.endswith(".sh")):
        p = subprocess.run(
            ["bash", str(ROOT / name), "--help"], cwd=ROOT, env=env, capture_output=True, text=True
        )
        results[name] = (p.returncode, p.stdout)
    assert sorted(results) == names
    failed = {
        n: (status, out[-500:]) for n, (status, out) in results.items() if status != 0 or not out.strip()
    }
    assert not failed, failed


def test_readme_is_a_front_page():
    size = len((ROOT / "README.md").read_bytes())
    assert size <= README_MAX_BYTES, f"README.md is {size} bytes; the record goes to docs/"
    text = (ROOT / "README.md").read_text()
    for page in ("docs/performance.md", "docs/reliability.md", "docs/study.md", "docs/troubleshooting.md"):
        assert page in text and (ROOT / page).is_file(), page


@pytest.mark.parametrize("page", PAGES[1:], ids=lambda p: p.name)
def test_doc_pages_are_dated(page):
    assert re.search(r"20\d\d-\d\d-\d\d", page.read_text()), f"{page.name} does not say when it was current"
