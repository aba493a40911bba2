"""Where a run continues from: the trainer state a checkpoint holds besides the engine, and the resume policy.

:func:`find_resume` picks the checkpoint ``checkpoint.resume`` names (rank 0 decides for every rank) and
says whether the run goes on in the same layout [world size, loader workers, batch size, grad accumulation]
(bit-exact: the same streams and RNG) or in another one (fresh streams from the checkpoint's step, the lr
schedule going on from its progress there). :func:`needs_universal` says whether the ZeRO shards must be
converted to DeepSpeed's universal form first, :func:`resumed_state` loads the engine and gives the
:class:`TrainState` to continue with.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ticod import checkpoint as ckpt_lib
from ticod import distributed
from ticod import engine as engine_lib
from ticod.budget import Plan
from ticod.config import Config

log = logging.getLogger("ticod")


@dataclass
class TrainState:
    """What a checkpoint needs besides the engine to continue exactly where it stopped."""

    step: int = 0  # optimizer steps done
    batches: int = 0  # micro-batches drawn from this rank's stream (the stream position)
    samples: int = 0  # samples trained on, all ranks
    nonfinite: int = 0  # micro-batches skipped for a non-finite loss
    samples_read: int = 0  # samples read by the loaders, all ranks (incl. bad ones)
    bad: dict[str, int] = field(default_factory=dict)  # bad samples by reason, all ranks
    fixed: dict[str, int] = field(default_factory=dict)  # boxes dropped from kept samples, by reason
    sources: dict[str, int] = field(default_factory=dict)  # samples trained on per source of a mix, all ranks
    # [name, shards_dir, train split, weight, samples] per source: a resume onto other data is named in the log.
    data: list[list[Any]] = field(default_factory=list)
    eval_failed: int = 0  # evaluations that failed (logged, counted and survived)
    train_time_s: float = 0.0
    # [world size, loader workers, batch size, grad accumulation]. A resume onto another layout (a requeue
    # onto other nodes) cannot continue the old data streams, nor keep the old global batch: it starts
    # fresh streams at step `origin` and counts `batches` from there.
    layout: list[int] = field(default_factory=list)
    origin: int = 0


@dataclass
class Resume:
    """The checkpoint a run continues from, its trainer state, and whether the data layout changed."""

    ckpt: Path
    saved: dict[str, Any]  # trainer_state.json
    relayout: bool  # another [world size, loader workers, batch size, grad accumulation]: not bit-exact
    origin: tuple[int, int]  # (step, samples done) where the current layout began (the plan's origin)
    progress: float = 0.0  # the lr cosine's progress at the origin (Plan.origin_progress)
    world_size: int = 0  # that the checkpoint was saved at (its ZeRO shards' partitioning)

    @property
    def rng_from(self) -> Path | None:
        """The checkpoint whose RNG states the run continues: none on a new layout (ranks without RNG)."""
        return None if self.relayout else self.ckpt


def find_resume(cfg: Config, layout: list[int]) -> Resume | None:
    """The checkpoint that ``checkpoint.resume`` names (rank 0 decides for all), or None to start fresh."""
    ckpt = ckpt_lib.resolve_resume_on_rank0(cfg.checkpoint.resume, cfg.run_dir)
    if ckpt is None:
        return None
    saved = ckpt_lib.read_trainer_state(ckpt)
    plan = Plan(**saved["plan"]) if "plan" in saved else None
    relayout = saved["train"].get("layout", layout) != layout
    if relayout:
        step = saved["train"]["step"]
        origin = (step, plan.samples_at(step) if plan else saved["train"]["samples"])
        progress = plan.progress_at(origin[1]) if plan else 0.0
    else:  # the layout of the saved plan goes on, from wherever it began
        origin = (plan.origin_step, plan.origin_samples) if plan else (0, 0)
        progress = plan.origin_progress if plan else 0.0
    return Resume(ckpt, saved, relayout, origin, progress, saved["train"].get("layout", layout)[0])


def needs_universal(resume: Resume | None, world_size: int, zero_stage: int) -> bool:
    """Whether the checkpoint is loaded through DeepSpeed's universal form.

    Another world size cannot load ZeRO 1-3 shards as they are: DeepSpeed's universal form can. Another
    batch, accumulation or loader workers on the same world size load the shards as they are.
    """
    return bool(resume and resume.world_size != world_size and zero_stage > 0)


def load_resume(engine: Any, resume: Resume, layout: list[int], *, universal: bool, rank: int) -> TrainState:
    """Load the engine from ``resume``; the trainer state to continue with (fresh streams on a relayout)."""
    if universal:
        if rank == 0:
            engine_lib.to_universal(resume.ckpt)
        distributed.barrier()  # the other ranks read what rank 0 converted
    source = resume.ckpt / engine_lib.UNIVERSAL_DIR if universal else resume.ckpt
    ckpt_lib.load_engine_state(engine, source)  # the trainer state was read by find_resume
    state = TrainState(**resume.saved["train"])
    log.info("resumed from %s at step %d", resume.ckpt, state.step)
    if resume.relayout:
        log.warning(
            "resumed onto another layout [world size, loader workers, batch size, accumulation] %s -> %s at "
            "step %d, "
            "%d samples: the run continues from there with fresh data streams and RNG, so it is not "
            "bit-exact with an uninterrupted run",
            state.layout,
            layout,
            *resume.origin,
        )
        state.origin, state.batches = resume.origin[0], 0
    state.layout = layout
    return state


def resumed_state(
    engine: Any,
    resume: Resume | None,
    layout: list[int],
    data: list[list[Any]],
    *,
    universal: bool,
    rank: int,
) -> TrainState:
    """The trainer state a run starts with: fresh without ``resume``, else :func:`load_resume`'s (which loads
    the engine) with today's ``data`` layout, a change of data since the checkpoint named in the log."""
    if resume is None:
        return TrainState(layout=layout, data=data)
    state = load_resume(engine, resume, layout, universal=universal, rank=rank)
    if state.data and state.data != data:
        log.warning(
            "the training data changed since the checkpoint (%s -> %s): the streams go on from the "
            "same positions over the new shard list, not over the data an uninterrupted run would read",
            state.data,
            data,
        )
    state.data = data
    return state
