"""How much of the step time the training loop waits for its next batch (``train/data_wait_frac``).

Per log window each rank sums the seconds ``next(loader)`` blocked and divides by its step time; the
logged value is the maximum over ranks (the slowest input stream sets the pace of a synchronous job).
It rides on the window's one all-reduce: each rank writes its fraction into its own slot of a
``world_size``-long vector of zeros, so the sum holds every rank's value (:func:`rank_slots`). A high value
for several windows in a row is warned about with the fix (:class:`DataWaitWatch`), as torchtitan's
``data_loading(%)`` and the data times of open_clip, mmdet and detectron2 let one see.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

WARN_ABOVE = 0.05  # share of the step time
WARN_AFTER = 3  # log windows in a row above it


def rank_slots(value: float, rank: int, world_size: int) -> list[float]:
    """``value`` in slot ``rank`` of ``world_size`` zeros: summed over ranks, every rank's value."""
    slots = [0.0] * world_size
    slots[rank] = value
    return slots


def wait_fraction(wait_s: float, step_s: float) -> float:
    """The share of ``step_s`` spent waiting (0 for an empty window)."""
    return min(1.0, wait_s / step_s) if step_s > 0 else 0.0


class DataWaitWatch:
    """Warns once per streak of :data:`WARN_AFTER` log windows whose ``data_wait_frac`` exceeds
    :data:`WARN_ABOVE`, naming the loader settings to raise."""

    def __init__(self, num_workers: int, prefetch_factor: int) -> None:
        self.num_workers, self.prefetch_factor = num_workers, prefetch_factor
        self.streak = 0

    def update(self, step: int, frac: float) -> bool:
        """Record a window's value; True when it warned."""
        self.streak = self.streak + 1 if frac > WARN_ABOVE else 0
        if self.streak != WARN_AFTER:
            return False
        log.warning(
            "step %d: the training loop waited for data %.0f%% of the step time (train/data_wait_frac, "
            "slowest rank) for %d log windows in a row: the input pipeline is the bottleneck. Give the "
            "loader more workers (data.num_workers=%d now) or a bigger prefetch (data.prefetch_factor=%d "
            "now), or check the shard storage's read speed",
            step,
            100 * frac,
            self.streak,
            self.num_workers,
            self.prefetch_factor,
        )
        return True
