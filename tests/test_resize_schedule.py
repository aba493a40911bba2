"""The lr schedule across a requeue onto another number of ranks (issue 25, defect 2): a schedule in samples
is continuous in the samples seen, and a budget in steps still ends at its last step at the floor lr.

The checkpoint is a trainer_state.json as the trainer writes it; the resumed plan is made as ``ticod.train``
makes it (find_resume, then resolve_plan with the origin and the cosine's progress there)."""

from __future__ import annotations

import itertools
import json
from dataclasses import asdict

import pytest
from helpers import DEMO
from torch import nn

from ticod import checkpoint as ck
from ticod.budget import resolve_plan
from ticod.config import load_config
from ticod.optim import build_optimizer, build_scheduler
from ticod.resume import find_resume

FLOOR = 0.01  # optim.min_lr_ratio
STEPS_BUDGET = ["max_steps=1000", "optim.warmup_samples=1600", "data.batch_size=2"]


def factor_of(cfg, plan):
    """The real scheduler's lr multiplier of 0-based step ``s`` under ``plan``."""
    opt = build_optimizer(nn.Linear(2, 2), cfg.optim, lr_scale=plan.lr_scale)
    return build_scheduler(opt, cfg.optim, plan=plan).lr_lambdas[0]


def resumed_plan(tmp_path, overrides: list[str], ranks: int, at_step: int, new_ranks: int):
    """The plan of a run on ``ranks`` ranks checkpointed at ``at_step`` and resumed on ``new_ranks``."""
    cfg = load_config(DEMO, [*overrides, f"run_dir={tmp_path}", "checkpoint.resume=auto"])
    before = resolve_plan(cfg, ranks)
    ckpt = tmp_path / ck.CKPT_DIR / ck.checkpoint_name(at_step)
    ckpt.mkdir(parents=True)
    train = {"step": at_step, "samples": before.samples_at(at_step), "layout": [ranks, 1, 2, 1]}
    (ckpt / ck.STATE_FILE).write_text(json.dumps({"train": train, "plan": asdict(before)}))
    resume = find_resume(cfg, [new_ranks, 1, 2, 1])
    assert resume is not None and resume.relayout and resume.origin == (at_step, before.samples_at(at_step))
    return cfg, before, resolve_plan(cfg, new_ranks, 0, resume.origin, resume.progress)


@pytest.mark.parametrize("new_ranks", [4, 16])
def test_budget_in_steps_warmup_in_samples_resumed_onto_other_ranks(tmp_path, new_ranks):
    """The issue's setup: max_steps=1000, warmup 1600 samples, 8 ranks (global batch 16), resumed at step
    500 (8000 samples). The lr goes on from where it was and reaches the floor at step 1000, as the budget
    in steps says; it does not jump to the floor (4 ranks) nor back up (16 ranks)."""
    cfg, before, after = resumed_plan(tmp_path, STEPS_BUDGET, 8, 500, new_ranks)
    batch = 2 * new_ranks
    assert (after.steps, after.global_batch, after.samples) == (1000, batch, 8000 + 500 * batch)
    assert after.schedule_samples == after.samples and after.warmup_samples == 1600
    old, new = factor_of(cfg, before), factor_of(cfg, after)
    # At the origin (the end of step index 499, 8000 samples) the same factor as the uninterrupted run.
    assert new(499) == pytest.approx(old(499), rel=1e-12)
    assert old(499) == pytest.approx(0.591, abs=1e-3)
    # The first resumed step moves on by its samples' share of the rest of the cosine, no more.
    slope = (old(499) - FLOOR) / (after.samples - 8000) * batch * 2
    assert 0 < new(499) - new(500) < slope
    factors = [new(s) for s in range(499, 1000)]
    assert all(a > b for a, b in itertools.pairwise(factors))  # decreasing, no plateau
    assert new(999) == pytest.approx(FLOOR, rel=1e-12) and new(998) > FLOOR
    # The rest of the cosine spread over the steps left: each step's lr is the uninterrupted run's.
    assert [round(new(s), 3) for s in (500, 750, 999)] == [0.589, 0.185, 0.01]
    assert all(new(s) == pytest.approx(old(s), rel=1e-9) for s in range(499, 1000))


def test_a_resume_inside_the_warmup_keeps_the_warmup_in_samples(tmp_path):
    """Resumed at step 50 (800 samples on 8 ranks) onto 16: the warmup still ends at 1600 samples, and every
    sample count both runs reach in it has the same lr."""
    cfg, before, after = resumed_plan(tmp_path, STEPS_BUDGET, 8, 50, 16)
    old, new = factor_of(cfg, before), factor_of(cfg, after)
    assert after.warmup_steps == 50 + 800 // 32
    for step in range(50, 75):  # new: 800 + (s + 1 - 50) * 32 samples at the end of step s
        done = 800 + (step + 1 - 50) * 32
        assert new(step) == pytest.approx(done / 1600, rel=1e-12)
        assert new(step) == pytest.approx(old(done // 16 - 1), rel=1e-12)
    assert new(74) == pytest.approx(1.0) and new(75) < 1.0


@pytest.mark.parametrize("new_ranks", [4, 16])
def test_a_budget_in_samples_keeps_its_lr_at_every_sample_count(tmp_path, new_ranks):
    """A budget in samples ends where it would have: every sample count both runs reach has the same lr."""
    overrides = ["train_samples=16000", "optim.warmup_samples=1600", "data.batch_size=2"]
    cfg, before, after = resumed_plan(tmp_path, overrides, 8, 500, new_ranks)
    assert after.samples == 16000 and after.schedule_samples == 16000
    old, new = factor_of(cfg, before), factor_of(cfg, after)
    batch = 2 * new_ranks
    for step in range(500, after.steps):
        done = 8000 + (step + 1 - 500) * batch
        if done % 16 == 0:
            assert new(step) == pytest.approx(old(done // 16 - 1), rel=1e-9), step
