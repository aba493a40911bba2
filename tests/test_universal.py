"""DeepSpeed's universal checkpoint, made for a resume onto another world size (issue 25, defect 3): two jobs
converting the same checkpoint at once both end with it whole; a change that keeps the world size makes
none."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import ROOT, ok, run_train

from ticod import checkpoint as ck
from ticod.engine import UNIVERSAL_DIR, to_universal

CONVERT = "import sys; from pathlib import Path; from ticod.engine import to_universal; to_universal(Path(sys.argv[1]))"


@pytest.fixture(scope="module")
def zero2_run(demo_shards_dir, tmp_path_factory) -> Path:
    """A one-rank ZeRO-2 run of the demo model with its step-1 checkpoint (read-only: copy it)."""
    run = tmp_path_factory.mktemp("zero2") / "run"
    args = [f"run_dir={run}", f"data.shards_dir={demo_shards_dir}", "deepspeed.zero_stage=2", "max_steps=1"]
    ok(run_train(args))
    return run


def test_two_concurrent_conversions_both_end_with_a_whole_universal_checkpoint(zero2_run, tmp_path):
    """The first job is frozen (SIGSTOP) in the middle of its conversion while the second one runs; then it
    goes on. Both exit 0, and what is published is the universal checkpoint a lone conversion makes."""
    alone = shutil.copytree(zero2_run, tmp_path / "alone") / ck.CKPT_DIR / ck.checkpoint_name(1)
    to_universal(alone)
    ckpt = shutil.copytree(zero2_run, tmp_path / "run") / ck.CKPT_DIR / ck.checkpoint_name(1)
    env = {"PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}

    def convert() -> subprocess.Popen:
        cmd = [sys.executable, "-c", CONVERT, str(ckpt)]
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    first = convert()
    try:
        until(lambda: (ckpt / f".tmp-{UNIVERSAL_DIR}").exists() or first.poll() is not None)
        assert first.poll() is None, "the first conversion ended before it could be caught in the middle"
        first.send_signal(signal.SIGSTOP)
        second = convert()
        # The second either ends (nothing stops it), or waits for the first's lock (a blocked flock is shown
        # in /proc/locks with "->").
        until(lambda: second.poll() is not None or waits_for_lock(second.pid))
    finally:
        first.send_signal(signal.SIGCONT)
    outs = [p.communicate(timeout=600)[0] for p in (first, second)]
    assert [p.returncode for p in (first, second)] == [0, 0], "\n".join(o[-3000:] for o in outs)

    assert not (ckpt / f".tmp-{UNIVERSAL_DIR}").exists()
    made, expected = files(ckpt / UNIVERSAL_DIR), files(alone / UNIVERSAL_DIR)
    assert made == expected and any(f.endswith("fp32.pt") for f in made)
    for name in (f for f in made if f.startswith("zero/") and f.count("/") == 2):  # zero/<parameter>/<state>
        a, b = (
            torch.load(d / UNIVERSAL_DIR / name, weights_only=False) for d in (ckpt, alone)
        )  # DeepSpeed's
        assert same(a, b), name


def same(a, b) -> bool:
    """Equal tensors, or dicts of equal tensors and values."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if torch.is_tensor(a):
        return torch.is_tensor(b) and torch.equal(a, b)
    return a == b


def until(done, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def waits_for_lock(pid: int) -> bool:
    return any("->" in line and f" {pid} " in line for line in Path("/proc/locks").read_text().splitlines())


def files(directory: Path) -> set[str]:
    return {str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file()}


def test_a_resume_with_other_loader_workers_loads_the_shards_as_they_are(
    zero2_run, demo_shards_dir, tmp_path
):
    run = shutil.copytree(zero2_run, tmp_path / "run")
    args = [f"run_dir={run}", f"data.shards_dir={demo_shards_dir}", "deepspeed.zero_stage=2", "max_steps=2"]
    resumed = run_train([*args, "data.num_workers=2", "--resume", "auto"])
    ok(resumed)
    assert "resumed from" in resumed.stderr and "another layout" in resumed.stderr
    assert not (run / ck.CKPT_DIR / ck.checkpoint_name(1) / UNIVERSAL_DIR).exists()
    assert [p.name for p in ck.list_checkpoints(run)] == [ck.checkpoint_name(1), ck.checkpoint_name(2)]
