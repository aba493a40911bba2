"""A resume onto another global batch trains at the new plan's peak lr (issue 25, defect 1), with ZeRO stage
0 (another batch size) and through DeepSpeed's universal checkpoint (ZeRO-2, one rank then two)."""

from __future__ import annotations

import pytest
from helpers import DEMO, ok, run_train, train_log

from ticod import checkpoint as ck
from ticod.config import load_config
from ticod.engine import UNIVERSAL_DIR
from ticod.optim import warmup_cosine

# configs/demo.yaml; train/lr is the heads', train/lr_backbone the backbone's
LR, BACKBONE_LR = load_config(DEMO).optim.lr, load_config(DEMO).optim.backbone_lr


@pytest.mark.parametrize(
    ("stage", "resume_as"),
    [(0, ["data.batch_size=4"]), pytest.param(2, [], marks=pytest.mark.slow)],
    ids=["zero0-batch4", "zero2-two-ranks"],
)
def test_a_resume_onto_a_larger_global_batch_uses_the_new_peak_lr(
    demo_shards_dir, tmp_path, stage, resume_as
):
    """Global batch 2 for 2 steps, then 4 from the step-2 checkpoint (batch 4 on one rank, or 2 on each of two
    ranks): with the linear rule against reference batch 2 the peak lr doubles, and the logged lr of steps 3
    and 4 is the new peak times the step schedule."""
    run = tmp_path / "run"
    common = [
        f"run_dir={run}",
        f"data.shards_dir={demo_shards_dir}",
        f"deepspeed.zero_stage={stage}",
        "max_steps=4",
        "optim.lr_scaling=linear",
        "optim.reference_batch=2",
    ]
    first = run_train([*common, "checkpoint.save_every=2", "faults.kill_at_step=2"])
    assert first.returncode != 0  # killed after the step-2 checkpoint
    assert [p.name for p in ck.list_checkpoints(run)] == [ck.checkpoint_name(2)]
    before = len(train_log(run))

    resumed = run_train([*common, *resume_as, "--resume", "auto"], nproc=1 if resume_as else 2)
    ok(resumed)
    assert (
        f"peak lr {2 * LR:.3g} heads / {2 * BACKBONE_LR:.3g} backbone (x2 for the global batch)"
        in resumed.stderr
    )
    # Another world size at ZeRO-2: loaded through the universal form.
    assert (run / ck.CKPT_DIR / ck.checkpoint_name(2) / UNIVERSAL_DIR / "zero").is_dir() == bool(stage)
    rows = train_log(run)[before:]
    assert [r["step"] for r in rows] == [3, 4]
    # The logged lrs are those the step applied: step index r["step"] - 1 of a 4-step schedule with 1 warmup
    # step (FAST).
    factor = warmup_cosine(1, 4, 0.01)
    assert [r["train/lr"] for r in rows] == pytest.approx(
        [2 * LR * factor(r["step"] - 1) for r in rows], rel=1e-9
    )
    assert [r["train/lr_backbone"] for r in rows] == pytest.approx(
        [2 * BACKBONE_LR * factor(r["step"] - 1) for r in rows], rel=1e-9
    )
    final = ck.read_trainer_state(run / ck.CKPT_DIR / ck.checkpoint_name(4))
    assert final["plan"]["lr_scale"] == 2.0
