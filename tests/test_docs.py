"""The README and docs/ stay true: every script their commands name exists and answers ``--help``."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
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


def help_command(name: str) -> list[str]:
    if name.endswith(".sh"):
        return ["bash", str(ROOT / name), "--help"]
    if name.endswith(".py"):
        return [sys.executable, str(ROOT / name), "--help"]
    return [sys.executable, "-m", name, "--help"]


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

    def run(name: str) -> tuple[str, subprocess.CompletedProcess]:
        cmd = help_command(name)
        return name, subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(run, names))
    failed = {
        n: (p.returncode, p.stderr[-500:]) for n, p in results if p.returncode != 0 or not p.stdout.strip()
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
