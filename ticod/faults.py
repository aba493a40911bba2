"""Fault injection for reliability tests and drills (config ``faults``, :class:`ticod.config.FaultConfig`).

Every fault is off by default. The loop asks :func:`process_fault_due` once per optimizer step (one tuple
test) and does the rest only when a fault is due; the NaN loss is one list test per micro-batch.
"""

from __future__ import annotations

import logging
import os
import signal
import time

import torch

from ticod.config import FaultConfig

log = logging.getLogger("ticod")


def poison_loss(faults: FaultConfig, batches: int, loss: torch.Tensor) -> torch.Tensor:
    """``loss`` made NaN at the micro-batches ``faults.nan_loss_at_steps`` name (``batches``: the micro-batches
    drawn on this rank, 1-based), else ``loss`` itself.

    By micro-batch, not step: a skipped micro-batch leaves the step count unchanged, so a step-keyed fault
    would fire again on every retry and one injected NaN would become many.
    """
    if batches in faults.nan_loss_at_steps:
        return loss * float("nan")
    return loss


def kill_in_write_step(faults: FaultConfig, rank: int) -> int:
    """The step whose background checkpoint write this rank dies in (``kill_rank`` only; 0 = never)."""
    return faults.kill_in_write_at_step if rank == faults.kill_rank else 0


def process_fault_due(faults: FaultConfig, step: int) -> bool:
    """Whether a fault "after step ``step``" is due on some rank (the same answer on every rank)."""
    return step in (faults.kill_at_step, faults.hang_at_step, faults.raise_at_step)


def inject_process_fault(faults: FaultConfig, step: int, rank: int) -> None:
    """After optimizer step ``step``: SIGKILL, hang or raise on the rank the fault names, if it is due."""
    hang_rank = faults.kill_rank if faults.hang_rank is None else faults.hang_rank
    if rank == faults.kill_rank and faults.kill_at_step == step:
        log.warning("fault injection: SIGKILL rank %d after step %d", rank, step)
        os.kill(os.getpid(), signal.SIGKILL)
    if rank == hang_rank and faults.hang_at_step == step:
        log.warning("fault injection: rank %d stops responding after step %d", rank, step)
        while True:
            time.sleep(3600)
    if rank == faults.kill_rank and faults.raise_at_step == step:
        log.warning("fault injection: rank %d raises after step %d", rank, step)
        raise RuntimeError(f"fault injection: rank {rank} raises after step {step}")
