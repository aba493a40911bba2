"""The serial tests really run one at a time on one worker under ``launch/test.sh`` (``-n 2 --dist loadgroup``).

``conftest.py`` puts the slow multi-process, Slurm and ``serial`` tests into one pytest-xdist group; xdist
reads the groups in a hook of its own, so the order of the hooks and the pytest version decide whether they
take. Until 2026-12-06 they did not, and the serial tests ran beside each other without any sign of it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from helpers import ROOT

PROBE = """
import pytest

@pytest.mark.serial
@pytest.mark.parametrize("i", range(4))
def test_serial(i):
    pass

@pytest.mark.parametrize("i", range(4))
def test_free(i):
    pass
"""


def test_serial_tests_share_one_worker(tmp_path: Path):
    (tmp_path / "test_probe.py").write_text(PROBE)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)])}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "conftest", "-n", "2", "--dist", "loadgroup", "-v",
         "-p", "no:cacheprovider", "--rootdir", str(tmp_path), str(tmp_path / "test_probe.py")],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    serial = re.findall(r"\[(gw\d+)\].*PASSED \S*::test_serial\[\d\](@\w+)?", proc.stdout)
    assert len(serial) == 4, proc.stdout[-3000:]
    assert {group for _, group in serial} == {"@serial"}, proc.stdout[-3000:]
    assert len({worker for worker, _ in serial}) == 1, proc.stdout[-3000:]
