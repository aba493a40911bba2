"""The one place where loss weights are applied: cascade stage weights, λ, or learned task weights."""

from __future__ import annotations

import torch
from torch import nn

from ticod.config import Balance, LossConfig, Task


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
        pull towards larger weight from a task that had no data."""
        out = dict(losses)
        if self.task != Task.caption:
            det = losses["rpn_objectness"] + losses["rpn_box"]
            for i, w in enumerate(self.stage_loss_weights):
                det = det + w * (losses[f"stage{i}_cls"] + self.box_loss_weight * losses[f"stage{i}_box"])
            out["loss_det"] = det
        if self.task != Task.detection:
            out["loss_cap"] = losses["caption"]
        if self.task == Task.detection:
            out["loss"] = out["loss_det"]
        elif self.task == Task.caption:
            out["loss"] = out["loss_cap"]
        elif self.balance == Balance.uncertainty:
            s_det, s_cap = self.log_var_det[0], self.log_var_cap[0]
            det = torch.exp(-s_det) * out["loss_det"] + s_det
            cap = torch.exp(-s_cap) * out["loss_cap"] + s_cap
            out["loss"] = (det if present[0] else det * 0) + (cap if present[1] else cap * 0)
        else:
            out["loss"] = out["loss_det"] + self.caption_weight * out["loss_cap"]
        return out
