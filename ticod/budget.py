"""The training budget resolved for one world size: global batch, steps, warmup, epochs and peak lr.

A config states its budget in optimizer steps (``max_steps``), samples (``train_samples``) or epochs
(``train_epochs``), and its warmup in steps or samples. Steps are of the global batch
``data.batch_size x optim.grad_accum x world size``, so a budget in steps trains on more samples with more
GPUs; one in samples or epochs is converted to steps here, once, at start. The peak learning rates follow
``optim.lr_scaling`` against ``optim.reference_batch``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ticod.config import Config, ConfigError, LrScaling


@dataclass(frozen=True)
class Plan:
    """What a run trains on ``world_size`` ranks; the loop, the lr schedule and the start log use it."""

    batch_size: int  # per rank and micro-batch
    grad_accum: int
    world_size: int
    global_batch: int  # samples per optimizer step, all ranks
    steps: int  # optimizer steps of the whole run
    warmup_steps: int  # steps until the peak lr (rounded up where the warmup is in samples)
    samples: int  # steps x global_batch: what the run trains on
    dataset_size: int  # the train manifest's total_samples (0: not known)
    lr_scale: float  # peak lr / configured lr
    lr: float  # peak lr of the heads
    backbone_lr: float  # peak lr of the backbone
    # The schedule in samples: 0 when both the budget and the warmup are in steps (the lr then follows the
    # step count, as it always did); else the samples the cosine spans (the budget, not rounded to steps).
    schedule_samples: int
    warmup_samples: int  # the warmup in samples where schedule_samples is set
    # Where this plan takes over: 0, 0 for a run's start; the step and the samples done at it when a run
    # resumed with another global batch (a requeue onto other nodes). Samples after it count at this batch.
    origin_step: int = 0
    origin_samples: int = 0
    # The cosine's progress (0..1) at origin_samples under the plan before: the schedule in samples goes on
    # from there to 1 at schedule_samples, so the lr is continuous in the samples seen across a resize.
    origin_progress: float = 0.0
    caption_lr: float | None = None  # peak lr of the caption decoder where optim.caption_lr sets one

    def samples_at(self, step: int) -> int:
        """Samples trained, all ranks, when ``step`` optimizer steps are done."""
        return self.origin_samples + (step - self.origin_step) * self.global_batch

    def progress_at(self, samples: int) -> float:
        """The cosine's progress when ``samples`` are done (0 in the warmup, and for a schedule in steps)."""
        if not self.schedule_samples:
            return 0.0
        return cosine_progress(
            samples, self.warmup_samples, self.schedule_samples, self.origin_samples, self.origin_progress
        )

    @property
    def epochs(self) -> float:
        """Passes over the train split (nan when its size is not known)."""
        return self.samples / self.dataset_size if self.dataset_size else math.nan

    def describe(self) -> str:
        """One line for the start of the run."""
        return (
            f"budget: global batch {self.global_batch} ({self.batch_size} per rank x {self.grad_accum} accumulation"
            f" x {self.world_size} ranks), {self.steps} steps (warmup {self.warmup_steps}), {self.samples} images"
            f" = {self.epochs:.2f} epochs of {self.dataset_size}, peak lr {self.lr:.3g} heads /"
            + ("" if self.caption_lr is None else f" {self.caption_lr:.3g} caption decoder /")
            + f" {self.backbone_lr:.3g} backbone (x{self.lr_scale:.3g} for the global batch)"
        )


def cosine_progress(
    done: int, warmup_samples: int, total_samples: int, origin_samples: int = 0, origin_progress: float = 0.0
) -> float:
    """Progress (0..1) of the cosine of a schedule in samples when ``done`` samples are done: 0 until the
    warmup ends, then linear in the samples from ``origin_progress`` at ``max(warmup, origin_samples)`` to 1
    at ``total_samples`` (from 0 at the warmup's end for a run without a resize)."""
    start = max(warmup_samples, origin_samples)
    progress = origin_progress if origin_samples > warmup_samples else 0.0
    if done <= start:
        return progress
    return min(1.0, progress + (1.0 - progress) * (done - start) / max(1, total_samples - start))


def lr_scale(rule: LrScaling, global_batch: int, reference_batch: int) -> float:
    """Multiplier of the configured learning rates for ``global_batch`` (1 at the reference batch)."""
    if rule == LrScaling.none:
        return 1.0
    ratio = global_batch / reference_batch
    return ratio if rule == LrScaling.linear else math.sqrt(ratio)


def resolve_plan(
    cfg: Config,
    world_size: int,
    dataset_size: int = 0,
    origin: tuple[int, int] = (0, 0),
    origin_progress: float = 0.0,
) -> Plan:
    """The plan of ``cfg`` on ``world_size`` ranks; ``dataset_size`` is the train manifest's total_samples
    (needed only by ``train_epochs``); ``origin`` = (step, samples done) where a resumed run changed its
    global batch (:attr:`Plan.origin_step`), ``origin_progress`` the cosine's progress there under the plan
    before (:meth:`Plan.progress_at`).

    A budget in samples or epochs becomes ``ceil(samples / global_batch)`` steps: the run trains on at most
    one global batch more than asked for. After an origin, the samples still to do are divided by the new
    global batch, so the run ends at the same sample count; a budget in steps stays in steps, and a schedule
    in samples (warmup in samples) then ends at the samples the run will have done at its last step. A
    warmup in steps in a schedule in samples ends at the samples done at that step.
    """
    origin_step, origin_samples = origin
    optim = cfg.optim
    batch = cfg.data.batch_size * optim.grad_accum * world_size
    if cfg.train_epochs is not None:
        if dataset_size < 1:
            raise ConfigError("config key 'train_epochs': needs the train manifest's total_samples")
        budget_samples = max(1, round(cfg.train_epochs * dataset_size))
    elif cfg.train_samples is not None:
        budget_samples = cfg.train_samples
    else:
        budget_samples = 0
    if budget_samples:
        steps = origin_step + max(0, math.ceil((budget_samples - origin_samples) / batch))
    else:
        steps = cfg.max_steps
    samples = origin_samples + (steps - origin_step) * batch
    if optim.warmup_samples is not None:
        warmup_samples = optim.warmup_samples
        warmup_steps = origin_step + max(0, math.ceil((warmup_samples - origin_samples) / batch))
        if warmup_samples <= origin_samples:  # over before the origin: its step as the plan before counted it
            warmup_steps = min(origin_step, math.ceil(warmup_samples / batch))
    else:
        warmup_steps = optim.warmup_steps or 0
        # The samples done at that step; one over before the origin ends no later than the origin.
        warmup_samples = origin_samples + (warmup_steps - origin_step) * batch
        if warmup_steps <= origin_step:
            warmup_samples = min(origin_samples, warmup_steps * batch)
    in_samples = bool(budget_samples) or optim.warmup_samples is not None
    schedule_samples = (budget_samples or samples) if in_samples else 0
    if in_samples and warmup_samples > schedule_samples:
        key = "optim.warmup_samples" if optim.warmup_samples is not None else "optim.warmup_steps"
        raise ConfigError(
            f"config key '{key}': {warmup_samples} warmup samples exceed the budget of {schedule_samples}"
        )
    scale = lr_scale(optim.lr_scaling, batch, optim.reference_batch)
    return Plan(
        batch_size=cfg.data.batch_size,
        grad_accum=optim.grad_accum,
        world_size=world_size,
        global_batch=batch,
        steps=steps,
        warmup_steps=warmup_steps,
        samples=samples,
        dataset_size=dataset_size,
        lr_scale=scale,
        lr=optim.lr * scale,
        backbone_lr=optim.backbone_lr * scale,
        schedule_samples=schedule_samples,
        warmup_samples=warmup_samples if in_samples else 0,
        origin_step=origin_step,
        origin_samples=origin_samples,
        origin_progress=origin_progress if in_samples else 0.0,
        caption_lr=None if optim.caption_lr is None else optim.caption_lr * scale,
    )
