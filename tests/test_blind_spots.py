"""Two paths the exact-resume and model tests could not see (issue 24): the box loss weight of the reference
configs reaching the combined loss, and Python's global ``random`` state coming back at a resume."""

from __future__ import annotations

import random
from pathlib import Path

import torch
from tiny_model import BOS, EOS, TINY, VOCAB, batch
from torch import nn

from ticod import checkpoint as ck
from ticod.config import BoxLoss, load_config
from ticod.models import TICOD

SMALL = Path(__file__).resolve().parents[1] / "configs" / "ticod_small.yaml"


class Toy(nn.Module):
    """The two parameter groups of the real model, ``backbone.*`` and the heads, for a DeepSpeed engine."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Linear(8, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.backbone(x))).pow(2).mean()


def test_reference_box_loss_weight_reaches_the_combined_loss():
    """ticod_small.yaml's box head (4conv1fc, class-specific, GIoU x 10), at the tiny test sizes: the total
    loss is the sum of the unweighted parts with the stage weights, the box weight and λ applied."""
    cfg = load_config(
        SMALL,
        [
            *TINY,
            "model.captioner.pretrained=false",
            "model.roi.grad_checkpointing=false",
            "data.max_caption_tokens=32",
        ],
    )
    roi = cfg.model.roi
    assert (roi.head, roi.class_agnostic_bbox, roi.box_loss, roi.box_loss_weight) == (
        "4conv1fc",
        False,
        BoxLoss.giou,
        10.0,
    )
    stage_weights, lam = list(roi.stage_loss_weights), cfg.loss.caption_weight
    assert stage_weights == [1.0, 0.5, 0.25] and lam == 0.1
    torch.manual_seed(0)
    model = TICOD(cfg.model, cfg.loss, VOCAB, BOS, EOS, EOS)
    b = batch()
    parts = model.train()(b.images, b.targets, b.captions, image_sizes=b.image_sizes)
    boxes = [parts[f"stage{i}_box"] for i in range(3)]
    assert all(b.item() > 0 for b in boxes)  # the weight has something to weigh
    det = parts["rpn_objectness"] + parts["rpn_box"]
    det = det + sum(w * (parts[f"stage{i}_cls"] + 10.0 * boxes[i]) for i, w in enumerate(stage_weights))
    torch.testing.assert_close(parts["loss_det"], det)
    torch.testing.assert_close(parts["loss"], det + lam * parts["caption"])


def test_python_random_state_is_restored_at_resume(tmp_path, single_rank_pg):
    """The draws of Python's ``random`` after :func:`ticod.checkpoint.restore_rng` are those the
    uninterrupted run made after the save, not those of the resumed process's fresh seed."""
    from ticod.engine import build_engine

    cfg = load_config(
        overrides=[
            "deepspeed.zero_stage=0",
            "deepspeed.precision=fp32",
            "max_steps=10",
            "optim.warmup_steps=2",
        ]
    )
    engine = build_engine(Toy(), cfg, world_size=1)
    random.seed(0)  # the run's seed (ticod.train.seed_everything), then draws before the checkpoint
    [random.random() for _ in range(5)]
    path = ck.save_checkpoint(engine, tmp_path, 1, {"train": {"step": 1}}, keep_last=1)
    uninterrupted = [random.random() for _ in range(3)]

    random.seed(0)  # a resumed process seeds as any run does
    fresh = [random.random() for _ in range(3)]
    random.seed(0)
    ck.restore_rng(path)
    resumed = [random.random() for _ in range(3)]
    assert resumed == uninterrupted and fresh != uninterrupted
