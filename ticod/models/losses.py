"""The one place where loss weights are applied: cascade stage weights, λ, or learned task weights."""

from __future__ import annotations

import torch
from torch import nn

from ticod.config import Balance, LossConfig, Task


def per_image_weights(sampled: list[torch.Tensor]) -> torch.Tensor:
    """Weight of each sampled unit (anchor, RoI) of a batch: ``1 / (n_i · B)`` for the ``n_i`` units of image
    ``i`` of ``B``, so that a loss summed with them is the mean over images of each image's mean (every image
    weighs the same however many units it sampled); with equal ``n_i``, the plain mean over all units."""
    return torch.cat([torch.full((n,), 1.0 / (max(n, 1) * len(sampled))) for n in map(len, sampled)])


class LossCombiner(nn.Module):
    """Adds ``loss_det``, ``loss_cap`` and the total ``loss`` to a dict of unweighted named losses.

    ``loss_det = rpn_objectness + rpn_box + Σ_i w_i (stage{i}_cls + b · stage{i}_box)`` with the cascade
    stage weights w_i and the box loss weight b; ``loss_cap = caption``. The total is

    - ``balance=fixed``: ``loss_det + λ · loss_cap`` (λ = ``caption_weight``; the task alone when only one
      task is trained);
    - ``balance=uncertainty`` (Kendall, Gal & Cipolla, CVPR 2018, homoscedastic task uncertainty):
      ``exp(-s_det) · loss_det + s_det + exp(-s_cap) · loss_cap + s_cap`` with learned log-variances
      ``s = log σ²`` initialised to 0 (λ is not used).

    Args:
        cfg: Task switch, λ and balance mode.
        stage_loss_weights: One weight per cascade stage.
        box_loss_weight: Weight of every stage's box loss relative to its classification loss.
    """

    def __init__(
        self, cfg: LossConfig, stage_loss_weights: list[float], box_loss_weight: float = 1.0
    ) -> None:
        super().__init__()
        self.box_loss_weight = float(box_loss_weight)
        self.task = Task(cfg.task)
        self.caption_weight = float(cfg.caption_weight)
        self.stage_loss_weights = [float(w) for w in stage_loss_weights]
        self.balance = Balance(cfg.balance)
        if self.balance == Balance.uncertainty:
            if self.task != Task.joint:
                raise ValueError("loss.balance=uncertainty needs loss.task=joint")
            # Named log_var_* so the optimizer's no-weight-decay rule (ticod.optim) recognises them. Shape
            # (1,), not (): DeepSpeed's parameter broadcast views each tensor as bytes, which 0-d cannot do.
            self.log_var_det = nn.Parameter(torch.zeros(1))
            self.log_var_cap = nn.Parameter(torch.zeros(1))

    def forward(
        self, losses: dict[str, torch.Tensor], present: tuple[bool, bool] = (True, True)
    ) -> dict[str, torch.Tensor]:
        """``losses`` plus the weighted parts; ``present``: whether the batch had samples labelled for
        detection / captioning (partial labels). An absent task's losses are 0 already; with learned task
        weights its whole term is multiplied by 0 too, so its ``s`` gets a zero gradient rather than a
        pull towards larger weight from a task that had no data.

        ``term_det`` / ``term_cap`` (trained tasks only) are each task's weighted loss in ``loss`` (``loss``
        minus them is the learned weights' regulariser, or 0): a trainer that normalises the losses over a
        whole step rescales them (:func:`ticod.train.step_loss`)."""
        out = dict(losses)
        if self.task != Task.caption:
            det = losses["rpn_objectness"] + losses["rpn_box"]
            for i, w in enumerate(self.stage_loss_weights):
                det = det + w * (losses[f"stage{i}_cls"] + self.box_loss_weight * losses[f"stage{i}_box"])
            out["loss_det"] = det
        if self.task != Task.detection:
            out["loss_cap"] = losses["caption"]
        if self.task == Task.detection:
            out["loss"] = out["term_det"] = out["loss_det"]
        elif self.task == Task.caption:
            out["loss"] = out["term_cap"] = out["loss_cap"]
        elif self.balance == Balance.uncertainty:
            s_det, s_cap = self.log_var_det[0], self.log_var_cap[0]
            det, cap = torch.exp(-s_det) * out["loss_det"], torch.exp(-s_cap) * out["loss_cap"]
            out["term_det"] = det if present[0] else det * 0
            out["term_cap"] = cap if present[1] else cap * 0
            out["loss"] = out["term_det"] + (s_det if present[0] else s_det * 0)
            out["loss"] = out["loss"] + out["term_cap"] + (s_cap if present[1] else s_cap * 0)
        else:
            out["term_det"], out["term_cap"] = out["loss_det"], self.caption_weight * out["loss_cap"]
            out["loss"] = out["term_det"] + out["term_cap"]
        return out
