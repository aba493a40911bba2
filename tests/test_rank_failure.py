"""A failed rank ends every process of the job within 60 s, with a non-zero status, and the last checkpoint
resumes: under the ``deepspeed`` launcher here, under Slurm in tests/test_slurm.py (same checks).

The faults: rank 1 raises (exits 1) or is SIGKILLed after a step while rank 0 stops responding at the same
step. Rank 0 then sits where no transport error reaches it, as a rank does inside an NCCL collective (gloo
would notice the closed socket by itself): only the launcher can end it.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from test_train import DEMO, FAST, LAUNCHER_VARS, ROOT, _port

from ticod import checkpoint as ck

GONE_WITHIN_S = 60
SAVE_EVERY = 2
# (fault, its step, max_steps) of three runs in one run dir: a fault; a resume and the other fault; a resume
# to the end. With checkpoint.save_every=2 each fault leaves the checkpoint of the step before.
CHAIN = (("raise", 3, 6), ("kill", 5, 6), (None, 0, 6))


def fault_overrides(fault: str | None, step: int) -> list[str]:
    """Rank 1 raises or is killed after ``step`` while rank 0 stops responding after the same step."""
    if fault is None:
        return []
    return [
        f"faults.{fault}_at_step={step}",
        "faults.kill_rank=1",
        f"faults.hang_at_step={step}",
        "faults.hang_rank=0",
    ]


def processes_of(run_dir: Path) -> list[str]:
    """The live processes started for ``run_dir`` (trainer ranks, task wrappers), as ``pid: command``."""
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if str(run_dir) in cmd and p.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(f"{p.pid}: {cmd[:200]}")
    return found


def assert_failed_fast(
    status: int, log: str, fault: str, step: int, ended: datetime.datetime, run_dir: Path, left: list[str]
) -> None:
    """A non-zero status, no process ``left``, the end within GONE_WITHIN_S of the fault (as rank 1 logged
    it), and the checkpoint of the last save before the fault complete."""
    assert status != 0, log[-3000:]
    assert not left, left
    what = {"raise": "rank 1 raises", "kill": "SIGKILL rank 1"}[fault]
    m = re.search(rf"(\d\d:\d\d:\d\d) \[rank1\] WARNING fault injection: {what} after step {step}\b", log)
    assert m, log[-3000:]
    took = (ended - datetime.datetime.combine(ended.date(), datetime.time.fromisoformat(m[1]))).seconds
    print(f"{fault} after step {step}: every process gone {took} s later, status {status}")
    assert took < GONE_WITHIN_S, (took, log[-3000:])
    saved = step - step % SAVE_EVERY
    assert ck.latest_checkpoint(run_dir) == run_dir / ck.CKPT_DIR / ck.checkpoint_name(saved)
    assert not list((run_dir / ck.CKPT_DIR).glob(f"{ck.TMP_PREFIX}*"))


def assert_resumed(log: str, run_dir: Path, step: int) -> None:
    assert f"resumed from {run_dir / ck.CKPT_DIR / ck.checkpoint_name(step)} at step {step}" in log, log[
        -3000:
    ]


@pytest.mark.slow
def test_a_failed_rank_ends_the_deepspeed_launch(demo_shards_dir: Path, tmp_path: Path) -> None:
    """DeepSpeed's launcher SIGTERMs the other ranks when one exits non-zero, and SIGKILLs them 30 s later."""
    run = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS and not k.startswith("SLURM_")}
    env |= {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    resumed_from = None
    for fault, step, max_steps in CHAIN:
        cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", _port()]
        cmd += ["--module", "ticod.train", "--config", str(DEMO), *FAST, f"run_dir={run}"]
        cmd += [
            f"data.shards_dir={demo_shards_dir}",
            f"max_steps={max_steps}",
            f"checkpoint.save_every={SAVE_EVERY}",
        ]
        cmd += ["checkpoint.resume=auto", *fault_overrides(fault, step)]
        # A session of its own: what the launcher leaves behind is found, then SIGKILLed with the group.
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        try:
            log, _ = proc.communicate(timeout=600)
            ended, left = datetime.datetime.now(), processes_of(run)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if resumed_from is not None:
            assert_resumed(log, run, resumed_from)
        if fault is None:
            assert proc.returncode == 0, log[-3000:]
            assert ck.latest_checkpoint(run) == run / ck.CKPT_DIR / ck.checkpoint_name(max_steps)
        else:
            assert_failed_fast(proc.returncode, log, fault, step, ended, run, left)
            resumed_from = step - step % SAVE_EVERY
