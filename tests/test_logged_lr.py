"""The lrs logged by ticod.train are those the logged step applied, for the heads and for the backbone."""

from __future__ import annotations

import pytest
from helpers import ok, run_train, train_log

from ticod.optim import warmup_cosine

LR, BACKBONE_LR = 1e-3, 2e-4  # configs/demo.yaml: optim.lr, optim.backbone_lr


def test_logged_lrs_are_those_the_step_applied(demo_shards_dir, tmp_path):
    """Warmup over 2 steps: step 1 applied the schedule's value of step index 0 (half the peak), not the
    next step's (the peak); train/lr is the heads' lr and train/lr_backbone the backbone's."""
    run = tmp_path / "run"
    args = [f"run_dir={run}", f"data.shards_dir={demo_shards_dir}", "deepspeed.zero_stage=0", "max_steps=2"]
    ok(run_train([*args, "optim.warmup_steps=2"]))
    rows = train_log(run)
    assert [r["step"] for r in rows] == [1, 2]
    factor = warmup_cosine(2, 2, 0.01)
    assert (rows[0]["train/lr"], rows[0]["train/lr_backbone"]) == pytest.approx(
        (LR * factor(0), BACKBONE_LR * factor(0)), rel=1e-12
    )
    assert factor(0) == 0.5 and rows[1]["train/lr"] == pytest.approx(LR * factor(1), rel=1e-12)
    for r in rows:
        assert r["train/lr_backbone"] / r["train/lr"] == pytest.approx(BACKBONE_LR / LR, rel=1e-12)
