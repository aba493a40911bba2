"""DeepSpeed's CPU communication op on a shared machine: its build cache per venv, and its /dev/shm buffers.

DeepSpeed JIT-builds the op into ``TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``): two
clones with their own venvs then rebuild it into one cache and take turns invalidating it. Unless the
variable is set, it becomes ``<venv>/torch_extensions`` (:func:`use_venv_extensions_dir`; ``launch/setup.sh``
builds the op there).

When every rank runs on one machine the op (``deepspeed/ops/csrc/cpu/comm/shm.cpp``) creates one POSIX
shared-memory buffer per rank, ``/dev/shm/deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>``
(~69 MB), maps the buffers of all ranks, and never unlinks them: every run, finished or killed, left its
buffers in memory. Once every rank has mapped them the names are not needed any more, so each rank
unlinks its own right after the process group starts (:func:`release_own_buffer`): the memory then goes
with the last process that maps it, however the run ends. Buffers left by runs that died before that
point, or by older code, are removed at start and when a test session ends (:func:`sweep_dead_buffers`):
those of this user that no live process maps.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
PREFIX = "deepspeed_allreduce_buffer_"
# A buffer is created, then mapped a moment later by its rank: younger ones are left alone.
MIN_AGE_S = 30.0


def use_venv_extensions_dir() -> str | None:
    """Set ``TORCH_EXTENSIONS_DIR`` to ``<venv>/torch_extensions`` unless it is set or this is no venv."""
    if "TORCH_EXTENSIONS_DIR" not in os.environ and sys.prefix != sys.base_prefix:
        os.environ["TORCH_EXTENSIONS_DIR"] = str(Path(sys.prefix) / "torch_extensions")
    return os.environ.get("TORCH_EXTENSIONS_DIR")


def own_buffer(rank: int, env: dict[str, str] | os._Environ = os.environ, shm_dir: Path = SHM_DIR) -> Path:
    """The buffer DeepSpeed's CPU op creates for ``rank`` of the job that ``env`` describes."""
    addr, port = env.get("MASTER_ADDR", ""), env.get("MASTER_PORT", "")
    return shm_dir / f"{PREFIX}{os.getuid()}_{addr}_{port}_{rank}"


def release_own_buffer(rank: int, world_size: int) -> bool:
    """After every rank mapped the buffers (a barrier), unlink this rank's name; True if there was one.

    Call on every rank right after the process group started (a collective when ``world_size > 1``).
    """
    if world_size > 1:
        from ticod import distributed  # late: the rest of this module needs no torch

        distributed.barrier()
    path = own_buffer(rank)
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    log.debug("unlinked %s (mapped by every rank; freed when they exit)", path)
    return True


def mapped_files() -> set[str]:
    """Paths of the files mapped by the processes whose maps this user can read."""
    paths: set[str] = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        with contextlib.suppress(OSError):  # gone, or another user's
            for line in maps.read_text().splitlines():
                parts = line.split(maxsplit=5)
                if len(parts) == 6:
                    paths.add(parts[5].removesuffix(" (deleted)"))
    return paths


def sweep_dead_buffers(shm_dir: Path = SHM_DIR, min_age_s: float = MIN_AGE_S) -> list[Path]:
    """Remove this user's DeepSpeed CPU all-reduce buffers that no process maps (their runs ended); the
    ones removed."""
    mine = sorted(shm_dir.glob(f"{PREFIX}{os.getuid()}_*"))
    if not mine:
        return []
    mapped, now, removed, size = mapped_files(), time.time(), [], 0
    for path in mine:
        with contextlib.suppress(OSError):  # another process swept it first
            info = path.stat()
            if str(path) in mapped or now - info.st_mtime < min_age_s:
                continue
            path.unlink()
            removed.append(path)
            size += info.st_size
    if removed:
        log.info(
            "removed %d DeepSpeed all-reduce buffer(s) of ended runs from %s (%.0f MB)",
            len(removed),
            shm_dir,
            size / 1e6,
        )
    return removed
