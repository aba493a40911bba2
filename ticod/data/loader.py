"""The ``DataLoader`` both streams run in: batches made inside the workers, workers that outlive stop
signals but not the main process."""

from __future__ import annotations

import atexit
import multiprocessing
import signal
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info


def worker_slot() -> tuple[int, int]:
    """(this dataloader worker's id, the number of workers); (0, 1) in the main process."""
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def _as_is(batch: Any) -> Any:
    return batch


def _ignore_stop_signals(worker_id: int) -> None:
    """Workers outlive SIGTERM/SIGUSR1 so that the training process can act on them.

    Slurm signals every process of a job step and the deepspeed launcher the whole process tree; a worker
    killed by the signal (torch's worker handler re-raises SIGTERM) makes the main process raise "DataLoader
    worker is killed" mid-step, before the preemption checkpoint. Workers still end with the main process.
    """
    del worker_id
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


def _kill_leftover_workers() -> None:
    """At exit, SIGKILL the loader workers still alive (after an error, say).

    multiprocessing's own exit hook would SIGTERM them, which they ignore, then wait for them forever: a
    rank that failed (e.g. on a distributed timeout) would hang instead of exiting. Registered after
    multiprocessing's hook, so it runs first.
    """
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()


def data_loader(stream: IterableDataset, num_workers: int, prefetch_factor: int = 4) -> DataLoader:
    if num_workers:
        atexit.unregister(_kill_leftover_workers)  # once, however many loaders are built
        atexit.register(_kill_leftover_workers)
    return DataLoader(
        stream,
        batch_size=None,  # batches are made (and their stats attached) inside the workers
        collate_fn=_as_is,  # the default would turn the (h, w) tuples into lists
        num_workers=num_workers,
        worker_init_fn=_ignore_stop_signals,
        pin_memory=torch.cuda.is_available(),
        prefetch_factor=prefetch_factor if num_workers else None,
        persistent_workers=False,
    )
