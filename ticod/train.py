"""Training entry point: ``python -m ticod.train --config configs/demo.yaml [key=value ...]``.

Runs alone, under the ``deepspeed`` launcher, under torchrun or under Slurm's srun; the launcher is
detected by :mod:`ticod.distributed`. The loop below is the whole training procedure, top to bottom:
one optimizer step is ``grad_accum`` micro-batches; after each step come logging, evaluation,
checkpointing and the preemption check, in that order.
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ticod import checkpoint as ckpt_lib
from ticod import distributed, startup
from ticod import engine as engine_lib
from ticod.budget import Plan, resolve_plan
from ticod.config import Config, ConfigError, Task, load_config, to_dict, to_yaml
from ticod.data.samples import Batch
from ticod.data.spec import resolve_data
from ticod.data.train_stream import build_train_loader
from ticod.data_wait import DataWaitWatch
from ticod.evaluate import Evaluator
from ticod.export import export_checkpoint
from ticod.factory import build_model, build_tokenizer
from ticod.faults import inject_process_fault, kill_in_write_step, poison_loss, process_fault_due
from ticod.init_from import init_from
from ticod.model_card import write_model_card
from ticod.models.ticod import label_units, labelled_tasks
from ticod.preemption import REQUEUE_EXIT_CODE, PreemptionHandler
from ticod.preflight import PreflightError, run_preflight
from ticod.resume import TrainState, find_resume, needs_universal, resumed_state
from ticod.tracker import Tracker, setup_console_logging
from ticod.train_metrics import (
    Window,
    add_counts,
    metric_float,
    peak_memory_gb,
    step_lrs,
    unreported_grad_norm,
)

log = logging.getLogger("ticod")

# The bad-sample ceiling is judged only once this many samples were read (one early bad sample
# in a small run is not a 1% rate).
MIN_SAMPLES_FOR_BAD_RATIO = 100
EVAL_ERROR_CHARS = 500  # of each rank's evaluation error, in eval/error


class TrainingStopped(RuntimeError):
    """The run stopped on purpose (too many non-finite losses or bad samples)."""


def parse_args(argv: list[str] | None) -> tuple[str | None, list[str]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--config",
        help="YAML file with overrides of the schema in ticod/config.py, or a shipped one: ticod_large",
    )
    p.add_argument("--resume", help="'auto' (latest complete checkpoint in run_dir) or a checkpoint dir")
    p.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. max_steps=100")
    # Intermixed: key=value overrides may come before and after --resume/--config (plain parse_args
    # rejects overrides that follow an option once the positional list was consumed).
    args = p.parse_intermixed_args(argv)
    overrides = list(args.overrides)
    if args.resume:
        overrides.append(f"checkpoint.resume={args.resume}")
    return args.config, overrides


def main(argv: list[str] | None = None) -> int:
    startup.mark("imports")
    config_path, overrides = parse_args(argv)
    try:
        cfg = load_config(config_path, overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # Before any slow setup, so a SIGUSR1/SIGTERM during start-up is not lost: it is honoured after
    # the first step (checkpoint, exit 75, requeue).
    preemption = PreemptionHandler().install()
    info = distributed.world_info_from_env()
    setup_console_logging(info.rank)
    device = distributed.select_device(info)
    engine_lib.init_distributed(distributed.backend_for(device), cfg.deepspeed.dist_timeout_s)
    startup.mark("process group")
    try:
        return train(cfg, rank=info.rank, world_size=info.world_size, device=device, preemption=preemption)
    except TrainingStopped as e:
        log.error("training stopped: %s", e)
        return 3
    except PreflightError as e:  # raised on every rank alike: one message, from rank 0
        if info.rank == 0:
            log.error("preflight failed, nothing was trained:\n%s", e)
        return 2
    except ConfigError as e:  # found at start against the data (budget, categories): the same on every rank
        if info.rank == 0:
            log.error("error: %s", e)
        return 2
    finally:
        distributed.destroy()


@dataclass
class Run:
    """What the loop works with, built once by :func:`setup`."""

    cfg: Config
    rank: int
    world_size: int
    device: torch.device
    engine: Any
    state: TrainState
    tracker: Tracker
    evaluator: Evaluator
    loader: Any
    rng_from: Path | None  # the checkpoint whose RNG states this run continues (an exact resume)
    plan: Plan  # the budget resolved for this world size: steps, global batch, peak lr
    data_wait: DataWaitWatch = field(init=False)
    checkpointer: ckpt_lib.Checkpointer = field(init=False)

    def __post_init__(self) -> None:
        self.data_wait = DataWaitWatch(self.cfg.data.num_workers, self.cfg.data.prefetch_factor)
        self.checkpointer = ckpt_lib.Checkpointer(
            self.cfg.run_dir,
            self.cfg.checkpoint.keep_last,
            async_save=self.cfg.checkpoint.async_save,
            on_published=self.log_save,
            kill_in_write_at_step=kill_in_write_step(self.cfg.faults, self.rank),
        )

    def save(self, *, wait: bool = False) -> Path:
        """Save a checkpoint (collective); ``wait``: also for its write and publish (before an exit or export)."""
        ts = {"train": asdict(self.state), "plan": asdict(self.plan), "config": to_dict(self.cfg)}
        path = self.checkpointer.save(self.engine, self.state.step, ts)
        if wait:
            self.checkpointer.wait()
        return path

    def log_save(self, times: ckpt_lib.SaveTimes) -> None:
        metrics = {"blocking_s": times.blocking_s, "total_s": times.total_s}
        self.tracker.log(times.step, metrics, prefix="checkpoint/", echo=False)

    def evaluate(self) -> dict[str, Any]:
        """Evaluate on every rank. A failure on any rank is logged, counted (``eval/failed``) and survived:
        days of training never end on a metric, and the ranks agree so none waits for another."""
        step = self.state.step
        # Evaluation draws from the RNGs (its loader's seed, sampling): put them back, so a run trains the
        # same with or without evaluations (the quickstart's eval.at_start moved its val CIDEr by 0.06).
        rng = ckpt_lib.rng_state()
        try:
            metrics, error = self.evaluator.run(self.engine, step, self.tracker), ""
        except Exception as e:  # whatever broke (Java, BERTScore, wandb media, OOM): the training goes on
            log.exception("evaluation at step %d failed on rank %d; training goes on", step, self.rank)
            metrics, error = {}, f"rank {self.rank}: {type(e).__name__}: {e}"[:EVAL_ERROR_CHARS]
        ckpt_lib.set_rng_state(rng)
        self.engine.train()
        if distributed.all_true(not error, self.device):
            return metrics
        # Why, in the run dir too (eval/error in train_log.jsonl): a rank's stderr may be lost or elsewhere.
        reason = "; ".join(e for e in distributed.gather_objects(error) if e)
        if self.rank == 0:
            log.error("evaluation at step %d failed: %s", step, reason)
        self.state.eval_failed += 1
        self.tracker.log(step, {"failed": self.state.eval_failed, "error": reason}, prefix="eval/")
        return {}


def train(
    cfg: Config, *, rank: int, world_size: int, device: torch.device, preemption: PreemptionHandler
) -> int:
    """The training loop: one pass of the body is one micro-batch, ``grad_accum`` of them one step."""
    run = setup(cfg, rank=rank, world_size=world_size, device=device)
    state, engine = run.state, run.engine
    if cfg.eval.at_start and state.step == 0:
        run.evaluate()
    batches = iter(run.loader)
    if run.rng_from is not None:
        ckpt_lib.restore_rng(run.rng_from)  # after iter(loader), which draws a seed from torch's RNG
    steps = run.plan.steps
    window, progress = Window(), make_progress(cfg, rank, state.step, steps)
    consecutive_nonfinite, first_batch = 0, state.batches
    accum, pending, done, units = cfg.optim.grad_accum, deque(), 0, StepUnits()
    t_step = time.perf_counter()
    while state.step < steps:
        if not pending:
            # A step's micro-batches are drawn together: their label units (box images, caption tokens),
            # summed over ranks with the first micro-batch's flags, normalise the step's losses before its
            # first backward. A replacement for a skipped (non-finite) micro-batch keeps the step's units.
            t_wait = time.perf_counter()
            pending.extend(next(batches) for _ in range(accum - done))
            window.data_wait += time.perf_counter() - t_wait
            if done == 0:
                local = torch.stack([batch_units(b) for b in pending]).sum(dim=0)
                units = StepUnits(local, micro_batches=world_size * accum)
        batch = pending.popleft()
        if state.batches == first_batch:
            startup.mark("first batch", seek_s=batch.seek_s)
        state.batches += 1
        window.add_stats(batch.stats)
        boundary = engine.is_gradient_accumulation_boundary()
        # This micro-batch completes a step that gets logged (the step count rises below).
        log_now = boundary and is_log_step(cfg, state.step + 1, steps)
        if log_now:  # before engine.step() moves the schedule on: the lrs this step applies
            window.lrs = step_lrs(engine.optimizer)
        losses, grad_norm, stop = forward_backward(
            run, batch.to(device), log_now, preemption.requested, units
        )
        if losses is None:  # non-finite loss: every rank skipped this micro-batch
            consecutive_nonfinite += 1
            stop_if_nonfinite(run, consecutive_nonfinite, window)
            continue
        consecutive_nonfinite, done = 0, done + 1
        window.grad_norm = grad_norm
        window.add_losses(losses, len(batch.image_sizes), tasks_present(batch))
        if not boundary:
            continue

        state.step, done = state.step + 1, 0
        startup.mark("first step")
        startup.report(cfg.run_dir, rank)
        now = time.perf_counter()
        state.train_time_s += now - t_step
        window.step_time += now - t_step
        window.steps += 1
        if progress is not None:
            progress.update(1)
        if log_now:
            metrics = log_step(run, window, echo=progress is None)
            if progress is not None:
                progress.set_postfix(loss=f"{metrics['loss']:.3f}")
            window = Window()
        if cfg.eval.every and state.step % cfg.eval.every == 0 and state.step < steps:
            run.evaluate()
        if cfg.checkpoint.save_every and state.step % cfg.checkpoint.save_every == 0:
            fold_window(run, window)
            run.save()
        if process_fault_due(cfg.faults, state.step):  # one tuple test per step when no fault is set
            run.checkpointer.wait()  # a drill's fault "after step N" comes after step N's checkpoint is complete
            inject_process_fault(cfg.faults, state.step, rank)
        # The stop flag came with this step's finite-loss check (one all-reduce; see step_flags). A signal
        # that arrives after that check is acted on one step later.
        if stop:
            if not preemption.requested:
                log.info("another rank received a stop signal")
            fold_window(run, window)
            path = run.save(wait=True)
            log.warning("%s received: checkpoint %s saved, exiting for requeue", preemption.signal_name, path)
            run.tracker.close()
            return REQUEUE_EXIT_CODE
        t_step = time.perf_counter()

    if progress is not None:
        progress.close()
    finish(run)
    return 0


def setup(cfg: Config, *, rank: int, world_size: int, device: torch.device) -> Run:
    """Model, engine, resumed state, run files, tracker, evaluator and train loader."""
    run_dir = Path(cfg.run_dir)
    # First, before anything slow: a shared run_dir, Java, the BERTScore model and wandb, on every rank.
    tracker = run_preflight(cfg, lambda: Tracker(cfg.logging, run_dir, rank=rank, config=to_dict(cfg)))
    tokenizer = build_tokenizer(cfg.data)
    # The data worked out once: sources, train manifests (COCO's is ~12 MB with its offsets), label space.
    spec = resolve_data(cfg.data)
    categories = spec.categories
    layout = [world_size, cfg.data.num_workers, cfg.data.batch_size, cfg.optim.grad_accum]
    resume = find_resume(cfg, layout)
    origin = resume.origin if resume else (0, 0)
    plan = resolve_plan(cfg, world_size, spec.total_samples, origin, resume.progress if resume else 0.0)
    data = spec.layout()
    if len(categories) != cfg.model.num_classes:
        raise ConfigError(
            f"config key 'model.num_classes': {cfg.model.num_classes}, but the shards in {spec.shards_dirs()} "
            f"have {len(categories)} categories"
            + (f" after merging by name ({spec.space.describe()})" if len(spec.sources) > 1 else "")
        )

    startup.mark("preflight, tokenizer, manifests")
    # Same seed on every rank for identical initial weights; per-rank seeds afterwards (dropout).
    torch.manual_seed(cfg.seed)
    # A resume loads every weight from its checkpoint: no random init first (most of a build's time).
    model = build_model(cfg, tokenizer, init_weights=resume is None)
    if cfg.model.init_from and resume is None:  # a resumed run continues from its own checkpoint
        init_from(model, cfg.model.init_from, categories, tokenizer)
    model = model.to(device)
    startup.mark("model build")
    universal = needs_universal(resume, world_size, cfg.deepspeed.zero_stage)
    engine = engine_lib.build_engine(model, cfg, world_size, plan, load_universal=universal)
    startup.mark("engine")
    seed_everything(cfg.seed + 1000 * rank + origin[0])

    state = resumed_state(engine, resume, layout, data, universal=universal, rank=rank)
    if resume is None and cfg.checkpoint.resume == "auto":
        log.info("checkpoint.resume=auto: no checkpoint in %s, starting fresh", run_dir)
    startup.mark("checkpoint load")
    if rank == 0:
        ckpt_lib.write_run_files(run_dir, ckpt_lib.RunFiles(to_yaml(cfg), categories, tokenizer))
    evaluator = Evaluator(cfg, tokenizer, categories, rank=rank, world_size=world_size, device=device)
    loader = build_train_loader(
        cfg.data,
        tokenizer,
        rank=rank,
        world_size=world_size,
        seed=cfg.seed,
        start_batch=state.batches,
        origin=state.origin,
        spec=spec,
    )
    startup.mark("data loader")
    log.info(
        "training %s: %d parameters, world size %d on %s, steps %d -> %d",
        cfg.loss.task.value,
        sum(p.numel() for p in model.parameters()),
        world_size,
        device,
        state.step,
        plan.steps,
    )
    log.info("%s", plan.describe())
    engine.train()
    rng_from = resume.rng_from if resume else None
    return Run(cfg, rank, world_size, device, engine, state, tracker, evaluator, loader, rng_from, plan)


@dataclass
class StepUnits:
    """The label units (images labelled for boxes, caption target tokens) of one optimizer step.

    ``local``: this rank's sum over the step's micro-batches, until the first micro-batch's flag all-reduce
    (:func:`step_flags`) sums it over the ranks into ``total``. ``micro_batches``: world size × gradient
    accumulation, the micro-batches whose gradients DeepSpeed averages into the step.
    """

    local: torch.Tensor | None = None
    total: list[float] = field(default_factory=lambda: [0.0, 0.0])
    micro_batches: int = 1


def batch_units(batch: Batch) -> torch.Tensor:
    """:func:`ticod.models.ticod.label_units` of a collated batch (no host read)."""
    return label_units(
        len(batch.image_sizes),
        batch.captions.get("attention_mask"),
        batch.has_boxes,
        batch.has_caption,
    )


def tasks_present(batch: Batch) -> tuple[bool, bool]:
    """(any image labelled for boxes, any with a caption) of a batch, as the model decides it."""
    return labelled_tasks(batch.has_boxes, batch.has_caption)


def step_loss(losses: dict[str, torch.Tensor], here: torch.Tensor, units: StepUnits) -> torch.Tensor:
    """The micro-batch's loss to back-propagate, normalised over the whole step.

    The model's task losses are means over this micro-batch's units ``here``. Each task's weighted term is
    rescaled to its sum over them divided by the step's units per micro-batch (``total / micro_batches``):
    after DeepSpeed's mean over the ``micro_batches``, every labelled image (detection) and every caption
    token of the step weighs the same, whichever rank and micro-batch it landed in.
    """
    loss = losses["loss"]
    here = here.to(loss.device, loss.dtype)  # on the loss's device already in training: no copy
    for i, key in enumerate(TERM_KEYS):
        if key in losses:
            scale = here[i] * (units.micro_batches / max(units.total[i], 1.0))  # Python factor: no copy
            loss = loss + losses[key] * (scale - 1)  # = term · scale in place of term
    return loss


TERM_KEYS = ("term_det", "term_cap")


def forward_backward(
    run: Run, batch: Batch, log_now: bool, stop_requested: bool, units: StepUnits | None = None
) -> tuple[dict[str, torch.Tensor] | None, float | None, bool]:
    """Forward, backward and optimizer step of one micro-batch: (losses, grad norm, stop), losses None
    when the loss was non-finite on any rank (nothing else done then). ``stop``: whether any rank was asked
    to stop (``stop_requested`` here). The grad norm is computed only on log steps, and only where
    DeepSpeed reports none (:func:`unreported_grad_norm`). ``units``: the step's label units (None: the step
    is this micro-batch alone); the returned ``loss`` is the normalised one that was back-propagated
    (:func:`step_loss`)."""
    cfg, engine, state = run.cfg, run.engine, run.state
    here = batch_units(batch)
    if units is None:
        units = StepUnits(here, micro_batches=distributed.world_size())
    losses = engine(
        batch.images,
        targets=batch.targets if cfg.loss.task != Task.caption else None,
        captions=batch.captions if cfg.loss.task != Task.detection else None,
        image_sizes=batch.image_sizes,
        # Partially labelled data: per-image Python bools (None: every image has boxes and a caption).
        has_boxes=batch.has_boxes,
        has_caption=batch.has_caption,
    )
    loss = poison_loss(cfg.faults, state.batches, losses["loss"])  # faults.nan_loss_at_steps
    finite, stop, written, total = step_flags(
        loss, stop_requested, run.checkpointer.write_flag(), units.local
    )
    run.checkpointer.agreed(written)
    if units.local is not None:
        units.local, units.total = None, total
    if not finite:
        # Every rank skips together: a lone backward would hang ZeRO's gradient reduction.
        state.nonfinite += 1
        return None, None, stop
    loss = step_loss(losses, here, units)
    losses = {k: v for k, v in losses.items() if k not in TERM_KEYS} | {"loss": loss}
    engine.backward(loss)
    grad_norm = unreported_grad_norm(engine) if log_now else None
    engine.step()
    return losses, grad_norm, stop


def is_log_step(cfg: Config, step: int, last: int) -> bool:
    return step % cfg.logging.log_every == 0 or step == last


def stop_if_nonfinite(run: Run, consecutive: int, window: Window) -> None:
    """Warn about a skipped micro-batch; save and stop after ``max_nonfinite`` in a row."""
    log.warning("non-finite loss at step %d (skipped; %d in a row)", run.state.step, consecutive)
    if consecutive >= run.cfg.max_nonfinite:
        fold_window(run, window)
        # Skipped micro-batches change no weights: this checkpoint holds the pre-fault weights.
        path = run.save(wait=True)
        raise TrainingStopped(
            f"{consecutive} consecutive non-finite losses (max_nonfinite={run.cfg.max_nonfinite}); "
            f"weights from before the fault saved in {path}"
        )


def log_step(run: Run, window: Window, *, echo: bool) -> dict[str, Any]:
    """Reduce the window over ranks, add it to the run totals, log it (and return it); stop on too much
    bad data."""
    state, engine = run.state, run.engine
    metrics = window.reduce(run.device, run.world_size)
    add_counts(state, window, metrics)
    for key in ("samples", "read", "bad", "fixed", "sources"):
        metrics.pop(key)
    metrics.update(
        **window.lrs,
        grad_norm=metric_float(
            engine.get_global_grad_norm() if window.grad_norm is None else window.grad_norm
        ),
        peak_mem_gb=peak_memory_gb(run.device),
        nonfinite_skipped=state.nonfinite,
        bad_samples=sum(state.bad.values()),
        samples=state.samples,
        # Run totals by reason (console, jsonl and wandb): which kind of damage the data has.
        **{f"bad/{r}": n for r, n in sorted(state.bad.items())},
        **{f"boxes_dropped/{r}": n for r, n in sorted(state.fixed.items())},
        # A mix: samples trained on per source, run totals (their shares follow data.sources' weights).
        **{f"samples/{name}": n for name, n in sorted(state.sources.items())},
    )
    run.tracker.log(state.step, metrics, prefix="train/", echo=echo)
    run.data_wait.update(state.step, metrics["data_wait_frac"])
    try:
        check_bad_fraction(state, run.cfg.max_bad_fraction)
    except TrainingStopped:  # on every rank alike (reduced counts): the save in flight is published first
        run.checkpointer.wait()
        raise
    return metrics


def fold_window(run: Run, window: Window) -> None:
    """Add the open log window's counts to the run totals before a checkpoint between log steps (a periodic
    save, a stop): the checkpoint then holds every sample trained on and read, and the totals add up
    across a requeue. The window's log line later adds only what came after. Collective (all ranks)."""
    add_counts(run.state, window, window.reduce(run.device, run.world_size))


def finish(run: Run) -> None:
    """Final checkpoint, export (rank 0), final evaluation and the run summary."""
    state, run_dir = run.state, Path(run.cfg.run_dir)
    final = run.save(wait=True)
    if run.rank == 0:
        # Before the final eval: the exported model is there even if evaluation fails.
        export_checkpoint(final, run_dir / "export")
        log.info("exported %s", run_dir / "export")
    metrics = run.evaluate() if run.cfg.eval.at_end else {}
    if run.rank == 0 and metrics:
        write_model_card(run_dir / "export")  # again, with the final metrics
    run.tracker.summary({"final_step": state.step, **{f"eval/{k}": v for k, v in metrics.items()}})
    run.tracker.close()
    log.info("done: %d steps, %d samples, %.1f s training", state.step, state.samples, state.train_time_s)


def check_bad_fraction(state: TrainState, ceiling: float) -> None:
    bad = sum(state.bad.values())
    if state.samples_read >= MIN_SAMPLES_FOR_BAD_RATIO and bad > ceiling * state.samples_read:
        raise TrainingStopped(
            f"{bad} of {state.samples_read} samples read were bad ({bad / state.samples_read:.2%} > "
            f"max_bad_fraction={ceiling:.2%}); by reason: {dict(sorted(state.bad.items()))}"
        )


def step_flags(
    loss: torch.Tensor, stop_requested: bool, write: int = 0, units: torch.Tensor | None = None
) -> tuple[bool, bool, int, list[float]]:
    """(the loss is finite on every rank, some rank was asked to stop, the max over ranks of ``write``, their
    checkpoint writes' :meth:`~ticod.checkpoint.Checkpointer.write_flag`, ``units`` summed over the ranks):
    one small all-reduce and one device-to-host read per micro-batch, the only sync the step loop makes
    outside log steps. ``units``: the step's label units on this rank (:class:`StepUnits`), sent with the
    first micro-batch's flags (None: zeros are sent and returned)."""
    # [non-finite, stop, write in flight, write failed, box images, caption tokens], summed over ranks: a
    # flag > 0 means some rank raised it, so the write's max over ranks is 2 if any failed, else 1 if any
    # is in flight.
    nonfinite = torch.isfinite(loss.detach()).logical_not().to(torch.float64)
    raised = [stop_requested, write == 1, write >= 2]
    counts = torch.zeros(2, dtype=torch.float64) if units is None else units.to(torch.float64)
    flags = torch.cat(
        [torch.stack([nonfinite, *(torch.full_like(nonfinite, f) for f in raised)]),
         counts.to(loss.device, non_blocking=True)]
    )  # fmt: skip
    distributed.all_reduce_(flags)
    nonfinite, stop, in_flight, failed, *total = flags.tolist()
    return nonfinite == 0, stop > 0, 2 if failed else 1 if in_flight else 0, total


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def make_progress(cfg: Config, rank: int, start: int, total: int):
    """A tqdm bar on rank 0 when stderr is a terminal; log lines otherwise (batch logs, Slurm)."""
    if rank != 0 or not cfg.logging.progress_bar or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc="train", dynamic_ncols=True)


if __name__ == "__main__":
    sys.exit(main())
