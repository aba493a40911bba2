"""The training budget in steps, samples or epochs, resolved per world size (ticod/budget.py), its lr schedule
(ticod/optim.py) and its use by ticod.train."""

from __future__ import annotations

import json
import math
import re

import pytest
from helpers import DEMO, ok, run_train, train_log
from omegaconf import OmegaConf
from torch import nn

from ticod import checkpoint as ck
from ticod.budget import resolve_plan
from ticod.config import Config, ConfigError, LrScaling, load_config, to_yaml, validate
from ticod.optim import build_optimizer, build_scheduler, warmup_cosine, warmup_cosine_samples

CONFIGS = DEMO.parent
DATASET = 24  # images in the demo train split (tests/conftest.py)
DEMO_BACKBONE_LR = load_config(DEMO).optim.backbone_lr


class Toy(nn.Module):
    """Two parameter groups, as the real model: ``backbone.*`` and the heads."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Linear(2, 2)
        self.head = nn.Linear(2, 2)


def lr_by_samples(cfg, world_size: int) -> tuple[dict[int, tuple[float, ...]], object]:
    """Run the real scheduler over the whole plan: {samples done at the end of a step: its lr per group}."""
    plan = resolve_plan(cfg, world_size, DATASET)
    opt = build_optimizer(Toy(), cfg.optim, lr_scale=plan.lr_scale)
    sched = build_scheduler(opt, cfg.optim, plan=plan)
    lrs = {}
    for step in range(plan.steps):
        lrs[(step + 1) * plan.global_batch] = tuple(g["lr"] for g in opt.param_groups)
        opt.step()
        sched.step()
    return lrs, plan


@pytest.mark.parametrize("budget", ["train_samples=96", "train_epochs=4"])
def test_same_samples_and_same_lr_at_the_same_sample_count_on_1_2_4_ranks(budget):
    cfg = load_config(DEMO, [budget, "data.batch_size=2", "optim.warmup_samples=16"])
    runs = {w: lr_by_samples(cfg, w) for w in (1, 2, 4)}
    assert {w: (plan.global_batch, plan.steps, plan.samples) for w, (_, plan) in runs.items()} == {
        1: (2, 48, 96),
        2: (4, 24, 96),
        4: (8, 12, 96),
    }
    assert {plan.warmup_steps for _, plan in runs.values()} == {8, 4, 2}
    assert all(plan.epochs == 4.0 for _, plan in runs.values())
    lrs4 = runs[4][0]
    assert sorted(lrs4) == list(range(8, 97, 8))  # the step boundaries every world size shares
    for w in (1, 2):
        for samples, lr in lrs4.items():
            assert runs[w][0][samples] == lr, (w, samples)  # exactly: the same integers go in
    heads, backbone = 1e-3, DEMO_BACKBONE_LR
    assert runs[1][0][16] == pytest.approx((backbone, backbone, heads, heads))  # warmup over: the peak
    assert runs[1][0][2] == pytest.approx(tuple(lr * 2 / 16 for lr in runs[1][0][16]))
    assert runs[1][0][96] == pytest.approx(tuple(lr * 0.01 for lr in runs[1][0][16]))  # min_lr_ratio
    assert runs[1][0][56] == pytest.approx(tuple(lr * (0.01 + 0.99 * 0.5) for lr in runs[1][0][16]))


def test_a_budget_that_does_not_divide_rounds_up_to_whole_steps():
    cfg = load_config(DEMO, ["train_samples=10", "data.batch_size=2", "optim.warmup_samples=0"])
    assert [(p.steps, p.samples) for p in (resolve_plan(cfg, w) for w in (1, 2, 4))] == [
        (5, 10),
        (3, 12),
        (2, 16),
    ]
    # The schedule spans the 10 samples asked for at any world size; a last step past them gets the min lr.
    assert {resolve_plan(cfg, w).schedule_samples for w in (1, 2, 4)} == {10}
    assert warmup_cosine_samples(0, 10, 8, 0.01)(1) == 0.01


def test_a_budget_in_steps_keeps_the_step_schedule():
    """demo.yaml and the ablation arms: max_steps and warmup_steps give what they always gave, at any world size
    (the quickstart's numbers depend on it)."""
    for name in ("demo.yaml", "ablation/joint.yaml", "ablation/caption_only.yaml"):
        cfg = load_config(CONFIGS / name)
        for w in (1, 2):
            plan = resolve_plan(cfg, w)
            assert (plan.steps, plan.warmup_steps, plan.samples) == (600, 50, 600 * 4 * w)
            assert (plan.lr, plan.backbone_lr, plan.lr_scale, plan.schedule_samples) == (
                1e-3,
                DEMO_BACKBONE_LR,
                1.0,
                0,
            )
        lrs, plan = lr_by_samples(cfg, 1)
        factor = warmup_cosine(50, 600, cfg.optim.min_lr_ratio)
        assert [lr[-1] for lr in lrs.values()] == [1e-3 * factor(s) for s in range(600)]


@pytest.mark.parametrize(
    ("rule", "world_size", "scale"),
    [("none", 32, 1.0), ("linear", 8, 1.0), ("linear", 32, 4.0), ("sqrt", 32, 2.0), ("sqrt", 2, 0.5)],
)
def test_lr_scaling_rules(rule, world_size, scale):
    """Reference batch 16 = 8 ranks x 2; 32 ranks give 64."""
    cfg = load_config(
        DEMO,
        ["data.batch_size=2", f"optim.lr_scaling={rule}", "optim.reference_batch=16", "optim.warmup_steps=0"],
    )
    plan = resolve_plan(cfg, world_size)
    assert plan.lr_scale == pytest.approx(scale)
    assert (plan.lr, plan.backbone_lr) == pytest.approx((1e-3 * scale, DEMO_BACKBONE_LR * scale))
    opt = build_optimizer(Toy(), cfg.optim, lr_scale=plan.lr_scale)
    build_scheduler(opt, cfg.optim, plan=plan)  # no warmup: the first step runs at the peak
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([plan.backbone_lr] * 2 + [plan.lr] * 2)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["max_steps=null"], "max_steps"),
        (["train_samples=0"], "train_samples"),
        (["train_epochs=0"], "train_epochs"),
        (["optim.warmup_samples=-1"], "optim.warmup_samples"),
        (["train_samples=10", "optim.warmup_samples=20"], "optim.warmup_samples"),
        (["optim.lr_scaling=linear"], "optim.reference_batch"),
    ],
)
def test_impossible_budgets_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=re.escape(f"config key '{key}'")):
        load_config(DEMO, overrides)


@pytest.mark.parametrize(
    ("text", "key", "other"),
    [
        ("max_steps: 5\ntrain_epochs: 1\n", "train_epochs", "max_steps"),
        ("train_samples: 5\ntrain_epochs: 1\n", "train_epochs", "train_samples"),
        ("optim:\n  warmup_steps: 1\n  warmup_samples: 2\n", "optim.warmup_samples", "optim.warmup_steps"),
    ],
)
def test_a_file_that_sets_two_budgets_is_an_error(tmp_path, text, key, other):
    (tmp_path / "two.yaml").write_text(text)
    with pytest.raises(
        ConfigError, match=re.escape(f"config key '{key}': {tmp_path / 'two.yaml'} also set '{other}'")
    ):
        load_config(tmp_path / "two.yaml")


def test_a_config_built_in_code_with_two_budgets_is_an_error():
    with pytest.raises(ConfigError, match=re.escape("config key 'train_epochs'")):
        validate(OmegaConf.structured(Config(train_epochs=2.0)))  # max_steps keeps its default
    validate(OmegaConf.structured(Config(max_steps=None, train_epochs=2.0)))


def test_the_budget_set_last_wins(tmp_path):
    """max_steps=100 on top of a config in samples means 100 steps (a smoke test of the large config); of two
    overrides the later one counts, as for one key given twice (helpers add overrides before the user's)."""
    cfg = load_config(CONFIGS / "ticod_large.yaml", ["max_steps=100", "optim.warmup_steps=10"])
    assert (cfg.max_steps, cfg.train_samples, cfg.train_epochs) == (100, None, None)
    assert (cfg.optim.warmup_steps, cfg.optim.warmup_samples) == (10, None)
    cfg = load_config(
        DEMO, ["train_epochs=2", "optim.warmup_samples=8", "max_steps=7", "optim.warmup_steps=1"]
    )
    assert (cfg.max_steps, cfg.train_epochs, cfg.optim.warmup_steps, cfg.optim.warmup_samples) == (
        7,
        None,
        1,
        None,
    )
    (tmp_path / "base.yaml").write_text("train_epochs: 2\n")
    (tmp_path / "child.yaml").write_text("defaults: [base.yaml]\ntrain_samples: 50\n")
    cfg = load_config(tmp_path / "child.yaml")
    assert (cfg.max_steps, cfg.train_samples, cfg.train_epochs) == (None, 50, None)
    # A run dir's config.yaml (every key written out, the unused ones null) loads back to the same config.
    saved = tmp_path / "saved.yaml"
    saved.write_text(to_yaml(cfg))
    assert load_config(saved) == cfg


def test_epochs_need_the_dataset_size_and_warmup_must_fit():
    cfg = load_config(DEMO, ["train_epochs=1", "optim.warmup_samples=30"])
    with pytest.raises(ConfigError, match="config key 'train_epochs'"):
        resolve_plan(cfg, 1)
    with pytest.raises(ConfigError, match=r"config key 'optim\.warmup_samples'"):
        resolve_plan(cfg, 1, DATASET)  # 30 warmup samples, 24 in the budget
    assert resolve_plan(cfg, 1, 30).steps == math.ceil(30 / 4)


def test_shipped_configs_state_their_budget_in_samples():
    """ticod_large/small were written for 8 GPUs x 2 images: 90k steps there, the same images anywhere."""
    for name in ("ticod_large.yaml", "ticod_small.yaml"):
        cfg = load_config(CONFIGS / name)
        assert cfg.max_steps is None and cfg.optim.warmup_steps is None
        assert (cfg.optim.lr_scaling, cfg.optim.reference_batch) == (LrScaling.sqrt, 16)
        at_8, at_16 = resolve_plan(cfg, 8, 118_287), resolve_plan(cfg, 16, 118_287)
        assert (at_8.steps, at_8.warmup_steps, at_8.lr, at_8.backbone_lr) == (90_000, 1000, 1e-4, 1e-4)
        assert (at_16.steps, at_16.warmup_steps, at_16.samples) == (45_000, 500, at_8.samples)
        assert at_16.lr == pytest.approx(1e-4 * math.sqrt(2))


@pytest.mark.slow  # one process, but a whole start-up of ticod.train (test_single_process_... has one already)
def test_train_runs_the_budget_in_samples(demo_shards_dir, tmp_path):
    """``python -m ticod.train`` with train_samples: the steps, the start line, the lr the engine used, the
    checkpoint's record."""
    run = tmp_path / "run"
    args = [
        f"run_dir={run}",
        f"data.shards_dir={demo_shards_dir}",
        "deepspeed.zero_stage=0",
        "train_samples=6",
    ]
    # FAST sets optim.warmup_steps=1 (2 samples here); scaling 2 / 4 halves the lrs. train/lr is the heads',
    # train/lr_backbone the backbone's.
    proc = run_train([*args, "optim.lr_scaling=linear", "optim.reference_batch=4"])
    ok(proc)
    line = (
        "budget: global batch 2 (2 per rank x 1 accumulation x 1 ranks), 3 steps (warmup 1), 6 images"
        f" = 0.25 epochs of 24, peak lr 0.0005 heads / {DEMO_BACKBONE_LR * 0.5:.3g} backbone (x0.5 for the global batch)"
    )
    assert line in proc.stderr
    rows = train_log(run)
    assert [(r["step"], r["train/samples"]) for r in rows] == [(1, 2), (2, 4), (3, 6)]
    # The lrs the logged step applied (its 0-based index is step - 1), step * 2 samples at its end.
    factor = warmup_cosine_samples(2, 6, 2, 0.01)
    assert [r["train/lr"] for r in rows] == pytest.approx(
        [5e-4 * factor(r["step"] - 1) for r in rows], rel=1e-12
    )
    assert [r["train/lr_backbone"] for r in rows] == pytest.approx(
        [DEMO_BACKBONE_LR * 0.5 * factor(r["step"] - 1) for r in rows], rel=1e-12
    )
    state = json.loads((run / ck.CKPT_DIR / ck.checkpoint_name(3) / ck.STATE_FILE).read_text())
    assert state["train"]["samples"] == 6
    assert {k: state["plan"][k] for k in ("global_batch", "steps", "samples", "dataset_size", "lr")} == {
        "global_batch": 2,
        "steps": 3,
        "samples": 6,
        "dataset_size": 24,
        "lr": 5e-4,
    }


@pytest.mark.slow
def test_one_and_two_ranks_train_the_same_samples_at_the_same_lr(demo_shards_dir, tmp_path):
    common = [f"data.shards_dir={demo_shards_dir}", "deepspeed.zero_stage=0", "train_samples=16"]
    common += ["optim.warmup_samples=8"]
    lr_at: dict[int, dict[int, float]] = {}
    for nproc in (1, 2):
        run = tmp_path / f"ranks{nproc}"
        ok(run_train([f"run_dir={run}", *common], nproc=nproc))
        rows, batch = train_log(run), 2 * nproc
        assert [r["step"] for r in rows] == list(range(1, 16 // batch + 1))
        assert rows[-1]["train/samples"] == 16
        # Keyed by the samples at the end of the step the logged lr was applied in (see the test above).
        lr_at[nproc] = {r["train/samples"]: (r["train/lr"], r["train/lr_backbone"]) for r in rows}
    shared = sorted(lr_at[1].keys() & lr_at[2].keys())
    assert shared == [4, 8, 12, 16]
    assert [lr_at[1][s] for s in shared] == [lr_at[2][s] for s in shared]
    factors = [0.5, 1.0, 0.01 + 0.99 * 0.5, 0.01]
    assert [lr for s in shared for lr in lr_at[1][s]] == pytest.approx(
        [p * f for f in factors for p in (1e-3, DEMO_BACKBONE_LR)]
    )
