"""tools/sabotage.py stays in step with the code: every row's pattern matches exactly one line."""

from __future__ import annotations

import subprocess
import sys

from conftest import ROOT


def test_every_sabotage_pattern_matches_exactly_once() -> None:
    r = subprocess.run(
        [sys.executable, "tools/sabotage.py", "--list"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "caught by: tests/" in r.stdout
