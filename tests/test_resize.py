"""A requeue onto another number of ranks: resume from the same sample count, not bit-exact, and say so."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import ok, run_train, train_log
from safetensors.torch import load_file

from ticod import checkpoint as ck
from ticod.engine import UNIVERSAL_DIR


@pytest.mark.slow
def test_resume_onto_one_rank_from_two_continues_at_the_same_sample_count(demo_shards_dir, tmp_path):
    """2 ranks (ZeRO-2, global batch 4) checkpoint at step 2 = 8 samples and die; one rank (global batch 2)
    resumes from that checkpoint and trains the 16 samples still to do: steps 3..10, ending at 24."""
    run = tmp_path / "run"
    common = [
        f"run_dir={run}",
        f"data.shards_dir={demo_shards_dir}",
        "train_samples=24",
        "optim.warmup_samples=4",
        "deepspeed.zero_stage=2",
        "checkpoint.save_every=2",
    ]
    killed = run_train([*common, "faults.kill_at_step=2", "faults.kill_rank=1"], nproc=2)
    assert killed.returncode != 0
    assert [p.name for p in ck.list_checkpoints(run)] == [ck.checkpoint_name(2)]
    saved = ck.read_trainer_state(run / ck.CKPT_DIR / ck.checkpoint_name(2))
    assert saved["train"]["layout"] == [2, 1, 2, 1] and saved["plan"]["global_batch"] == 4
    weights_at_2 = _weights(run)

    before = len(train_log(run))
    resumed = run_train([*common, "checkpoint.save_every=0", "--resume", "auto"], nproc=1)
    ok(resumed)
    assert f"resumed from {run / ck.CKPT_DIR / ck.checkpoint_name(2)} at step 2" in resumed.stderr
    assert "[2, 1, 2, 1] -> [1, 1, 2, 1] at step 2, 8 samples" in resumed.stderr
    assert "not bit-exact" in resumed.stderr
    assert (run / ck.CKPT_DIR / ck.checkpoint_name(2) / UNIVERSAL_DIR / "zero").is_dir()

    rows = train_log(run)[before:]
    assert [r["step"] for r in rows] == list(range(3, 11))  # 16 samples to go at 2 per step
    final = ck.read_trainer_state(run / ck.CKPT_DIR / ck.checkpoint_name(10))
    assert final["plan"]["steps"] == 10 and final["plan"]["samples"] == 24
    assert (final["plan"]["origin_step"], final["plan"]["origin_samples"]) == (2, 8)
    assert final["train"]["layout"] == [1, 1, 2, 1] and final["train"]["origin"] == 2
    # The lr follows the samples done: step s of the resumed run ends at 8 + (s - 2) * 2 samples (the logged
    # lrs are those that step applied). Warmup 4, cosine to 24 samples.
    floor = 0.01  # configs/demo.yaml: optim.min_lr_ratio; optim.lr 1e-3, optim.backbone_lr 2e-4
    for r in rows:
        done = 8 + (r["step"] - 2) * 2
        progress = min(1.0, (done - 4) / (24 - 4))
        factor = floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        assert r["train/lr"] == pytest.approx(1e-3 * factor, rel=1e-6), r["step"]
        assert r["train/lr_backbone"] == pytest.approx(2e-4 * factor, rel=1e-6), r["step"]
    assert all(math.isfinite(r["train/loss"]) for r in rows)
    # The optimizer state came along (Adam's step count goes on from 2), and so did the weights.
    optim = torch.load(
        run / ck.CKPT_DIR / ck.checkpoint_name(10) / "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        weights_only=False,  # DeepSpeed's own file, written by this test
    )["optimizer_state_dict"]["base_optimizer_state"]["state"]
    assert {float(s["step"]) for s in optim.values()} == {10.0}
    exported = load_file(run / "export" / "model.safetensors")
    moved = max(
        (exported[k].float() - w).abs().max().item() for k, w in weights_at_2.items() if k in exported
    )
    assert 0 < moved < 0.1  # 8 more steps at lr <= 1e-3 from the step-2 weights, not a fresh start


def _weights(run_dir) -> dict[str, torch.Tensor]:
    from ticod.engine import consolidated_state_dict

    return consolidated_state_dict(run_dir / ck.CKPT_DIR / ck.checkpoint_name(2))
