"""A failed rank ends every process of the job within 60 s, with a non-zero status, and the last checkpoint
resumes: under the ``deepspeed`` launcher here, under Slurm in tests/test_slurm.py (same checks).

The faults: rank 1 raises (exits 1) or is SIGKILLed after a step while rank 0 stops responding at the same
step. Rank 0 then sits where no transport error reaches it, as a rank does inside an NCCL collective (gloo
would notice the closed socket by itself): only the launcher can end it.
"""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
from helpers import (
    CHAIN,
    DEMO,
    FAST,
    SAVE_EVERY,
    assert_failed_fast,
    assert_resumed,
    deepspeed_cmd,
    fault_overrides,
    process_group,
    processes_of,
    train_env,
)

from ticod import checkpoint as ck


@pytest.mark.slow
def test_a_failed_rank_ends_the_deepspeed_launch(demo_shards_dir: Path, tmp_path: Path) -> None:
    """DeepSpeed's launcher SIGTERMs the other ranks when one exits non-zero, and SIGKILLs them 30 s later."""
    run = tmp_path / "run"
    resumed_from = None
    for fault, step, max_steps in CHAIN:
        cmd = [*deepspeed_cmd("ticod.train"), "--config", str(DEMO), *FAST, f"run_dir={run}"]
        cmd += [
            f"data.shards_dir={demo_shards_dir}",
            f"max_steps={max_steps}",
            f"checkpoint.save_every={SAVE_EVERY}",
        ]
        cmd += ["checkpoint.resume=auto", *fault_overrides(fault, step)]
        # A session of its own: what the launcher leaves behind is found, then SIGKILLed with the group.
        with process_group(cmd, env=train_env(), merge_output=True) as proc:
            log, _ = proc.communicate(timeout=600)
            ended, left = datetime.datetime.now(), processes_of(run)
        if resumed_from is not None:
            assert_resumed(log, run, resumed_from)
        if fault is None:
            assert proc.returncode == 0, log[-3000:]
            assert ck.latest_checkpoint(run) == run / ck.CKPT_DIR / ck.checkpoint_name(max_steps)
        else:
            assert_failed_fast(proc.returncode, log, fault, step, ended, run, left)
            resumed_from = step - step % SAVE_EVERY
