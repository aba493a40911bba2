"""Where the time from process start to the first optimizer step goes (what a requeue costs).

The trainer marks the end of each start-up part (:func:`mark`); at the first optimizer step each rank
writes ``RUN_DIR/startup/rank<r>.json``: the wall-clock time (``time.time()``) at which the process
started and each part ended, plus the data stream's seek time as its first batch reported it. Rank 0
also logs the parts in one line. ``tools/bench/requeue.py`` reads these files.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_marks: list[tuple[str, float]] = []
_extra: dict[str, Any] = {}
_done = False


def process_start_time() -> float:
    """When this process started (``time.time()`` scale), from /proc; now where /proc is missing."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(
            float(line.split()[1])
            for line in Path("/proc/stat").read_text().splitlines()
            if line.startswith("btime")
        )
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return time.time()


def mark(part: str, **extra: Any) -> None:
    """The start-up part ``part`` ends now (ignored after the first step was reported)."""
    if not _done:
        _marks.append((part, time.time()))
        _extra.update(extra)


def report(run_dir: str | Path, rank: int) -> dict[str, Any] | None:
    """At the first optimizer step: write this rank's marks (once per process) and return them."""
    global _done
    if _done:
        return None
    _done = True
    start = process_start_time()
    out = {"rank": rank, "pid": os.getpid(), "process_start": start, "marks": dict(_marks), **_extra}
    path = Path(run_dir) / "startup" / f"rank{rank}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    if rank == 0:
        parts, before = [], start
        for name, t in _marks:
            parts.append(f"{name} {t - before:.1f} s")
            before = t
        log.info("process start -> first step %.1f s: %s", before - start, ", ".join(parts))
    return out
