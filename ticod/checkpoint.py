"""Checkpoints: atomic publish, latest-complete lookup, keep-last-K, export to safetensors.

Layout of a run dir::

    run_dir/config.yaml  categories.json  tokenizer/  train_log.jsonl
    run_dir/checkpoints/step_00000100/   DeepSpeed files + rng_rank{r}.pt + trainer_state.json
    run_dir/checkpoints/.tmp-step_...    a checkpoint being written (never picked as latest)
    run_dir/export/                      model.safetensors + config.yaml + categories.json + tokenizer/

DeepSpeed's rank 0 writes its ``latest`` tag before the other ranks finish, and it keeps no last-K,
so we do not use its tag file: every rank writes into a temp dir, all ranks meet at a barrier,
then rank 0 writes ``trainer_state.json`` and renames the dir into place. A rename is atomic on
POSIX filesystems, so a checkpoint dir without the ``.tmp-`` prefix is always complete. Multi-node
runs need ``run_dir`` on a filesystem every node sees.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

CKPT_DIR = "checkpoints"
PREFIX = "step_"
TMP_PREFIX = ".tmp-"
STATE_FILE = "trainer_state.json"


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Published (complete) checkpoints, oldest first."""
    root = Path(run_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(PREFIX) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def resolve_resume(resume: str, run_dir: str | Path) -> Path | None:
    """``""`` -> None, ``auto`` -> latest complete checkpoint (or None), else the given dir."""
    if not resume:
        return None
    if resume == "auto":
        return latest_checkpoint(run_dir)
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"checkpoint.resume={resume}: not a complete TICOD checkpoint dir")
    return path


def resolve_resume_on_rank0(resume: str, run_dir: str | Path) -> Path | None:
    """:func:`resolve_resume` on rank 0, the same answer on every rank (a collective).

    Ranks that each look for the latest checkpoint can disagree (a checkpoint published between their
    looks, a node that sees another directory), and a job whose ranks resume from different steps, or some
    from none, trains on silently. Every rank must then see the chosen checkpoint.

    Raises:
        FileNotFoundError: on every rank, when rank 0 found no checkpoint at ``resume`` or a rank cannot
            see the one rank 0 chose.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return resolve_resume(resume, run_dir)
    box: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            box = [("ok", resolve_resume(resume, run_dir))]
        except FileNotFoundError as e:
            box = [("error", str(e))]
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise FileNotFoundError(value)
    seen = [None] * dist.get_world_size()
    dist.all_gather_object(seen, value is None or (value / STATE_FILE).is_file())
    blind = [r for r, ok in enumerate(seen) if not ok]
    if blind:
        raise FileNotFoundError(
            f"rank 0 resumes from {value}, which ranks {blind} cannot see: run_dir and checkpoint.resume "
            "must be on a filesystem every node sees"
        )
    return value


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(engine, run_dir: str | Path, step: int, trainer_state: dict, keep_last: int) -> Path:
    """Save on every rank (collective), publish atomically, prune to the newest ``keep_last``."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    root = Path(run_dir) / CKPT_DIR
    name = checkpoint_name(step)
    tmp, final = root / f"{TMP_PREFIX}{name}", root / name
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # left over from a crash mid-write
        root.mkdir(parents=True, exist_ok=True)
    _barrier()
    engine.save_checkpoint(str(root), tag=tmp.name, client_state={}, save_latest=False)
    torch.save(rng_state(), tmp / f"rng_rank{rank}.pt")
    _barrier()  # every rank has finished writing its shards
    if rank == 0:
        (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=2))
        if final.exists():  # re-saving a step (e.g. a stop right after a periodic save)
            shutil.rmtree(final)
        tmp.rename(final)
        prune(run_dir, keep_last)
    _barrier()
    return final


def prune(run_dir: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` complete checkpoints; never the newest one."""
    ckpts = list_checkpoints(run_dir)
    doomed = ckpts[: max(0, len(ckpts) - max(1, keep_last))]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return doomed


def read_trainer_state(ckpt: Path) -> dict:
    """The ``trainer_state.json`` of a checkpoint: {"train": ..., "plan": ..., "config": ...}."""
    return json.loads((ckpt / STATE_FILE).read_text())


def load_engine_state(engine, ckpt: Path) -> None:
    """Restore the engine (weights, optimizer, LR schedule) from ``ckpt`` (a checkpoint or its universal form).

    The RNG is restored separately (:func:`restore_rng`), right before the first step: building the data
    loader iterator draws from torch's global RNG, which the uninterrupted run did before step 1.

    The schedule keeps its position (the step count) but not its peak lrs: those of the engine as built, for
    this run's plan, replace the saved ones, so a resume onto another global batch trains at the new plan's
    ``lr_scale`` (the same lrs where the plan is unchanged).
    """
    scheduler = engine.lr_scheduler
    planned = list(scheduler.base_lrs) if scheduler is not None else None
    path, _ = engine.load_checkpoint(
        str(ckpt.parent), tag=ckpt.name, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {ckpt}")
    if planned is not None:
        set_peak_lrs(scheduler, planned)


def set_peak_lrs(scheduler: torch.optim.lr_scheduler.LambdaLR, base_lrs: list[float]) -> None:
    """Make ``base_lrs`` the peak lrs of ``scheduler`` at its current step: the optimizer's groups get the lr
    the scheduler's step would have given them (``base_lr * factor(last_epoch)``)."""
    scheduler.base_lrs = list(base_lrs)
    groups = scheduler.optimizer.param_groups
    lrs = [base * f(scheduler.last_epoch) for base, f in zip(base_lrs, scheduler.lr_lambdas, strict=True)]
    for group, base, lr in zip(groups, base_lrs, lrs, strict=True):
        group["initial_lr"], group["lr"] = base, lr
    scheduler._last_lr = lrs


def load_checkpoint(engine, ckpt: Path) -> dict:
    """:func:`load_engine_state`, then the checkpoint's trainer state."""
    load_engine_state(engine, ckpt)
    return read_trainer_state(ckpt)


def restore_rng(ckpt: Path) -> None:
    """Set this rank's python/torch/CUDA RNG to what they were when ``ckpt`` was saved."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    rng_file = ckpt / f"rng_rank{rank}.pt"
    if not rng_file.is_file():
        raise FileNotFoundError(f"{rng_file} missing: checkpoint {ckpt} was saved by a different world size?")
    set_rng_state(torch.load(rng_file, weights_only=True))


@dataclass
class RunFiles:
    """The run-level files every checkpoint and export share."""

    config_yaml: str
    categories: list[dict]
    tokenizer: Any  # a transformers tokenizer (save_pretrained)


def write_run_files(directory: str | Path, files: RunFiles) -> None:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.yaml").write_text(files.config_yaml)
    (d / "categories.json").write_text(json.dumps(files.categories, indent=2))
    files.tokenizer.save_pretrained(str(d / "tokenizer"))
