"""checkpoint.async_save under faults, 2 ranks, ZeRO-2, one chain of runs: a rank killed in the background
write of a checkpoint, then SIGUSR1 during a write, each followed by an exact resume."""

import json
import os
from pathlib import Path

import pytest
from helpers import (
    assert_same_weights,
    launch_module,
    losses_by_step,
    ok,
    run_train,
    train_log,
    trainer_state,
)

from ticod import checkpoint as ck
from ticod.preemption import REQUEUE_EXIT_CODE

# ticod.train whose rank 0 signals itself SIGUSR1 when the background write of checkpoint STEP starts, and
# holds that write until the loop waits for it: the stop's save then certainly finds it in flight.
USR1_IN_WRITE = """
import os, signal, sys, threading

from ticod import checkpoint, train

STEP = int(os.environ["USR1_IN_WRITE_STEP"])
_write, _wait = checkpoint.Checkpointer._write, checkpoint.Checkpointer.wait
waited = threading.Event()


def write(self, inner, files, step):
    if step == STEP and os.environ["RANK"] == "0":
        os.kill(os.getpid(), signal.SIGUSR1)
        if not waited.wait(300):
            raise RuntimeError("the loop never waited for the write")
    _write(self, inner, files, step)


def wait(self):
    if self._pending is not None and self._pending.step == STEP:
        waited.set()
    _wait(self)


checkpoint.Checkpointer._write, checkpoint.Checkpointer.wait = write, wait
if __name__ == "__main__":
    sys.exit(train.main())
"""


def checkpoint_rows(run_dir: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "checkpoint/total_s" in r}


@pytest.mark.slow
def test_kill_and_usr1_during_background_writes_resume_exactly(demo_shards_dir: Path, tmp_path: Path):
    """Saves at steps 2, 4, 6 (keep_last=3), written in the background.

    1. Rank 1 is SIGKILLed in the write of checkpoint 4, after its first file: step 2 stays the newest
       complete checkpoint (4 is an unpublished temp dir).
    2. Resumed from 2; SIGUSR1 arrives as the write of checkpoint 4 starts: the stop's save waits for that
       write, publishes 4 and its own step's checkpoint, and the job exits 75.
    3. Resumed from there to step 6. Losses, final weights and trainer state are those of an uninterrupted
       run that saved synchronously (async and sync saves train the same run).
    """
    common = [
        f"data.shards_dir={demo_shards_dir}",
        "max_steps=6",
        "deepspeed.zero_stage=2",
        "checkpoint.save_every=2",
        "checkpoint.keep_last=3",
    ]
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    ok(run_train([f"run_dir={ref}", *common, "checkpoint.async_save=false"], nproc=2))
    sync_rows = checkpoint_rows(ref)
    assert sorted(sync_rows) == [2, 4, 6]

    # 1. A kill in the background write.
    kill = ["faults.kill_in_write_at_step=4", "faults.kill_rank=1"]
    killed = run_train([f"run_dir={cut}", *common, *kill], nproc=2)
    assert killed.returncode != 0
    assert "fault injection: SIGKILL in the background write of checkpoint 4" in killed.stderr
    ckpts = cut / ck.CKPT_DIR
    assert ck.list_checkpoints(cut) == [ckpts / ck.checkpoint_name(2)]
    partial = ckpts / f"{ck.TMP_PREFIX}{ck.checkpoint_name(4)}"
    assert partial.is_dir() and not (partial / ck.STATE_FILE).exists()
    rows = checkpoint_rows(cut)
    assert list(rows) == [2]  # published after its write, with its timings
    assert 0 < rows[2]["checkpoint/blocking_s"] <= rows[2]["checkpoint/total_s"]

    # 2. SIGUSR1 during the write of checkpoint 4.
    (tmp_path / "ticod_usr1_in_write.py").write_text(USR1_IN_WRITE)
    path = os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH")) if p)
    env = {"PYTHONPATH": path, "USR1_IN_WRITE_STEP": "4"}
    stopped = launch_module("ticod_usr1_in_write", [f"run_dir={cut}", *common, "--resume", "auto"], env=env)
    assert stopped.returncode == REQUEUE_EXIT_CODE, stopped.stderr[-3000:]
    assert f"resumed from {ckpts / ck.checkpoint_name(2)} at step 2" in stopped.stderr
    assert "waiting for the background write of checkpoint 4" in stopped.stderr
    stop = int(ck.latest_checkpoint(cut).name[len(ck.PREFIX) :])
    assert stop in (5, 6)  # the step in flight when the signal came, or the next
    assert [p.name for p in ck.list_checkpoints(cut)] == [ck.checkpoint_name(s) for s in (2, 4, stop)]
    assert f"SIGUSR1 received: checkpoint {ckpts / ck.checkpoint_name(stop)} saved" in stopped.stderr
    assert not partial.exists()
    assert trainer_state(cut, 4) == trainer_state(ref, 4)

    # 3. The requeue.
    before = len(train_log(cut))
    ok(run_train([f"run_dir={cut}", *common, "--resume", "auto"], nproc=2))
    assert [r["step"] for r in train_log(cut)[before:]] == list(range(stop + 1, 7))
    expected, got = losses_by_step(ref), losses_by_step(cut)
    assert sorted(expected) == sorted(got) == [1, 2, 3, 4, 5, 6]
    for step in expected:
        assert got[step] == expected[step], (step, got[step], expected[step])
    assert_same_weights(ref / "export" / "model.safetensors", cut / "export" / "model.safetensors")
    assert trainer_state(cut, 6) == trainer_state(ref, 6)
