"""AdamW groups (backbone vs heads, no decay on norms/biases/embeddings) and the LR schedule."""

import math

import pytest
import torch
from torch import nn

from ticod.config import OptimConfig
from ticod.optim import build_optimizer, build_scheduler, param_groups, warmup_cosine
from ticod.train_metrics import step_lrs


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.LayerNorm(4))
        self.backbone.relative_position_bias_table = nn.Parameter(torch.zeros(5, 2))
        self.head = nn.Linear(4, 2)
        self.embed = nn.Embedding(10, 4)
        self.frozen = nn.Parameter(torch.zeros(3), requires_grad=False)


def test_groups():
    cfg = OptimConfig(lr=1e-3, backbone_lr=1e-4, weight_decay=0.05)
    m = Toy()
    groups = {g["name"]: g for g in param_groups(m, cfg)}

    def names(group: str) -> set[int]:
        return {id(p) for p in groups[group]["params"]}

    assert names("backbone_decay") == {id(m.backbone[0].weight)}
    assert names("backbone_no_decay") == {
        id(m.backbone[0].bias),
        id(m.backbone[1].weight),
        id(m.backbone[1].bias),
        id(m.backbone.relative_position_bias_table),
    }
    assert names("heads_decay") == {id(m.head.weight)}
    assert names("heads_no_decay") == {id(m.head.bias), id(m.embed.weight)}
    assert groups["backbone_decay"]["lr"] == 1e-4 and groups["heads_decay"]["lr"] == 1e-3
    assert groups["heads_no_decay"]["weight_decay"] == 0.0 and groups["heads_decay"]["weight_decay"] == 0.05
    assert sum(len(g["params"]) for g in groups.values()) == sum(p.requires_grad for p in m.parameters())


def test_caption_lr_gives_the_decoder_groups_of_its_own():
    """optim.caption_lr moves every parameter under ``captioner.`` (and only those) into captioner groups at
    that lr, scaled like the others; unset, the decoder is a head."""
    m = Toy()
    m.captioner = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    heads_only = {g["name"] for g in param_groups(m, OptimConfig(lr=1e-3, backbone_lr=1e-4))}
    assert heads_only == {"backbone_decay", "backbone_no_decay", "heads_decay", "heads_no_decay"}
    cfg = OptimConfig(lr=1e-3, backbone_lr=1e-4, caption_lr=3e-3, weight_decay=0.05)
    groups = {g["name"]: g for g in param_groups(m, cfg, lr_scale=2.0)}
    cap = {id(p) for p in m.captioner.parameters()}
    assert {id(p) for p in groups["captioner_decay"]["params"]} == {id(m.captioner[0].weight)}
    assert {id(p) for p in groups["captioner_no_decay"]["params"]} == cap - {id(m.captioner[0].weight)}
    assert not cap & {id(p) for n in ("heads_decay", "heads_no_decay") for p in groups[n]["params"]}
    lrs = {n: g["lr"] for n, g in groups.items()}
    assert lrs == pytest.approx(
        {"backbone_decay": 2e-4, "backbone_no_decay": 2e-4, "captioner_decay": 6e-3, "captioner_no_decay": 6e-3,
         "heads_decay": 2e-3, "heads_no_decay": 2e-3}
    )  # fmt: skip
    assert (
        groups["captioner_no_decay"]["weight_decay"] == 0.0
        and groups["captioner_decay"]["weight_decay"] == 0.05
    )
    # Logged as train/lr (heads), train/lr_backbone and train/lr_caption.
    opt = build_optimizer(m, cfg, lr_scale=2.0)
    assert step_lrs(opt) == pytest.approx({"lr": 2e-3, "lr_backbone": 2e-4, "lr_caption": 6e-3})
    assert step_lrs(build_optimizer(m, OptimConfig(lr=1e-3, backbone_lr=1e-4))) == pytest.approx(
        {"lr": 1e-3, "lr_backbone": 1e-4}
    )


def test_warmup_cosine_values():
    f = warmup_cosine(warmup_steps=10, max_steps=110, min_ratio=0.1)
    assert f(0) == pytest.approx(0.1)
    assert f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(110) == pytest.approx(0.1)
    assert f(500) == pytest.approx(0.1)


def test_scheduler_scales_each_group():
    cfg = OptimConfig(lr=1e-3, backbone_lr=1e-4, warmup_steps=4)
    opt = build_optimizer(Toy(), cfg)
    sched = build_scheduler(opt, cfg, max_steps=20)
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs["backbone_decay"] == pytest.approx(1e-4 / 4) and lrs["heads_decay"] == pytest.approx(1e-3 / 4)
    for _ in range(3):
        opt.step()
        sched.step()
    assert {g["name"]: g["lr"] for g in opt.param_groups}["heads_decay"] == pytest.approx(1e-3)
