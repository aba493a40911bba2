"""AdamW parameter groups and the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from ticod.budget import Plan, cosine_progress
from ticod.config import OptimConfig

# Parameters whose names contain one of these never get weight decay (positional tables, as
# timm's Swin `no_weight_decay()` and GPT-2's wte/wpe).
_NO_DECAY_NAME_PARTS = ("relative_position_bias_table", "absolute_pos_embed", "pos_embed", "log_var")


def param_groups(model: nn.Module, cfg: OptimConfig, lr_scale: float = 1.0) -> list[dict]:
    """Split trainable parameters into backbone/captioner/heads x decay/no-decay groups.

    No weight decay on norms, biases (every parameter with ndim <= 1), embeddings (nn.Embedding
    weights) and positional tables. The backbone (parameters under ``backbone.``) uses
    ``cfg.backbone_lr``; the caption decoder (under ``captioner.``) ``cfg.caption_lr`` in groups of its own
    when that is set (else it is a head); everything else ``cfg.lr``; all times ``lr_scale``
    (:func:`ticod.budget.lr_scale`). Each group carries its name for logging.
    """
    lrs = {"backbone": cfg.backbone_lr, "captioner": cfg.caption_lr, "heads": cfg.lr}
    embedding_params = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    groups: dict[str, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        part = "backbone" if name.startswith("backbone.") else "heads"
        if cfg.caption_lr is not None and name.startswith("captioner."):
            part = "captioner"
        no_decay = p.ndim <= 1 or id(p) in embedding_params or any(s in name for s in _NO_DECAY_NAME_PARTS)
        key = f"{part}_{'no_decay' if no_decay else 'decay'}"
        if key not in groups:
            groups[key] = {
                "name": key,
                "params": [],
                "lr": lrs[part] * lr_scale,
                "weight_decay": 0.0 if no_decay else cfg.weight_decay,
            }
        groups[key]["params"].append(p)
    return [groups[k] for k in sorted(groups)]


def build_optimizer(
    model: nn.Module, cfg: OptimConfig, *, fused: bool = False, lr_scale: float = 1.0
) -> torch.optim.Optimizer:
    """torch AdamW over :func:`param_groups` (``fused`` on CUDA is faster)."""
    return torch.optim.AdamW(
        param_groups(model, cfg, lr_scale), betas=tuple(cfg.betas), eps=cfg.eps, fused=fused or None
    )


def warmup_cosine(warmup_steps: int, max_steps: int, min_ratio: float) -> Callable[[int], float]:
    """LR multiplier: linear warmup from ~0 to 1, then cosine decay to ``min_ratio`` at max_steps."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def warmup_cosine_samples(
    warmup_samples: int,
    total_samples: int,
    global_batch: int,
    min_ratio: float,
    origin: tuple[int, int] = (0, 0),
    origin_progress: float = 0.0,
) -> Callable[[int], float]:
    """LR multiplier of optimizer step ``step`` (0-based) as a function of the samples done at its end.

    ``x = (step + 1) * global_batch``: linear warmup ``x / warmup_samples``, then cosine decay to
    ``min_ratio`` at ``total_samples``. A step that ends at the same sample count gets the same multiplier
    at any global batch. ``origin`` = (step, samples done) where the global batch changed on a resume, and
    ``origin_progress`` the cosine's progress there (:func:`ticod.budget.cosine_progress`): the lr is
    continuous in the samples done across the change.
    """
    origin_step, origin_samples = origin

    def factor(step: int) -> float:
        done = origin_samples + (step + 1 - origin_step) * global_batch
        if done < warmup_samples:
            return done / warmup_samples
        progress = cosine_progress(done, warmup_samples, total_samples, origin_samples, origin_progress)
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, max_steps: int = 0, *, plan: Plan | None = None
) -> torch.optim.lr_scheduler.LambdaLR:
    """Warmup + cosine of a resolved ``plan``, or without one ``cfg.warmup_steps`` and ``max_steps`` steps.

    A plan with ``schedule_samples`` schedules by samples (:func:`warmup_cosine_samples`), else by steps.
    """
    if plan is None:
        factor = warmup_cosine(cfg.warmup_steps or 0, max_steps, cfg.min_lr_ratio)
    elif plan.schedule_samples:
        factor = warmup_cosine_samples(
            plan.warmup_samples,
            plan.schedule_samples,
            plan.global_batch,
            cfg.min_lr_ratio,
            (plan.origin_step, plan.origin_samples),
            plan.origin_progress,
        )
    else:
        factor = warmup_cosine(plan.warmup_steps, plan.steps, cfg.min_lr_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
