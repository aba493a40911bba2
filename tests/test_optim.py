"""AdamW groups (backbone vs heads, no decay on norms/biases/embeddings) and the LR schedule."""

import math

import pytest
import torch
from torch import nn

from ticod.config import OptimConfig
from ticod.optim import build_optimizer, build_scheduler, param_groups, warmup_cosine


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
