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

:class:`Checkpointer` (``checkpoint.async_save``) writes in the background: DeepSpeed's ``save_checkpoint``
runs as always, but its checkpoint engine's ``save(state_dict, path)`` calls are caught and each state dict
is copied to host memory (:class:`HostStaging`); the loop goes on while a thread hands the copies to
DeepSpeed's own engine to write. The publish (the rename) waits until every rank's thread is done.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import random
import shutil
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ticod import distributed

CKPT_DIR = "checkpoints"
PREFIX = "step_"
TMP_PREFIX = ".tmp-"
STATE_FILE = "trainer_state.json"

log = logging.getLogger(__name__)


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
    if distributed.world_size() == 1:
        return resolve_resume(resume, run_dir)
    chosen: tuple[str, Any] | None = None
    if distributed.is_rank0():
        try:
            chosen = ("ok", resolve_resume(resume, run_dir))
        except FileNotFoundError as e:
            chosen = ("error", str(e))
    kind, value = distributed.broadcast_from_rank0(chosen)
    if kind == "error":
        raise FileNotFoundError(value)
    seen = distributed.gather_objects(value is None or (value / STATE_FILE).is_file())
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
    return Checkpointer(run_dir, keep_last).save(engine, step, trainer_state)


@dataclass
class SaveTimes:
    """One save: ``blocking_s`` the loop waited (a write still in flight included), ``total_s`` until published."""

    step: int
    blocking_s: float
    total_s: float = 0.0


class HostStaging:
    """Copies of state dicts in host memory, made at save time, that the loop's later steps cannot change.

    Every tensor storage is copied once (views of one storage stay views of one copy, as ``torch.save`` stores
    them), into buffers kept from the previous save where the sizes match (PyTorch DCP's cached staging):
    a copy into memory already mapped is several times faster than into fresh memory. Containers are
    rebuilt, other values deep-copied. Holds about one checkpoint of this rank in host memory.
    """

    def __init__(self) -> None:
        self._buffers: list[torch.UntypedStorage] = []
        self._used = 0
        self._memo: dict[tuple[str, int], torch.UntypedStorage] = {}
        self._ids: dict[int, tuple[Any, Any]] = {}

    def begin(self) -> None:
        """Start a new checkpoint (the previous one's copies are written and may be overwritten)."""
        self._used, self._memo, self._ids = 0, {}, {}

    def end(self) -> None:
        """The checkpoint is staged: let go of the references to the live state."""
        self._memo, self._ids = {}, {}

    def copy(self, obj: Any) -> Any:
        """A copy of ``obj`` that shares no mutable state with it; objects it holds twice, the copy holds
        twice (as ``copy.deepcopy``), so ``torch.save`` writes the same bytes for both."""
        if obj is None or isinstance(obj, str | int | float | bool | torch.dtype | torch.device):
            return obj
        seen = self._ids.get(id(obj))
        if seen is not None:
            return seen[1]
        if torch.is_tensor(obj):
            out = self._tensor(obj)
        elif isinstance(obj, dict):
            out = copy.copy(obj)  # keeps the class (OrderedDict, and its _metadata)
            out.clear()
            out.update((k, self.copy(v)) for k, v in obj.items())
        elif isinstance(obj, list):
            out = type(obj)(self.copy(v) for v in obj)
        elif isinstance(obj, tuple):
            items = [self.copy(v) for v in obj]
            if all(a is b for a, b in zip(items, obj, strict=True)):
                out = obj  # immutable all the way down
            else:
                out = type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)  # namedtuple: fields
        else:
            out = copy.deepcopy(obj)
        self._ids[id(obj)] = (obj, out)  # obj kept alive: its id is not reused while this copy is made
        return out

    def _tensor(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = (str(storage.device), storage.data_ptr())
        staged = self._memo.get(key) if storage.nbytes() else None
        if staged is None:
            staged = self._buffer(storage.nbytes(), pin=storage.device.type == "cuda")
            _as_bytes(staged).copy_(_as_bytes(storage))
            if storage.nbytes():
                self._memo[key] = staged
        out = torch.empty(0, dtype=t.dtype).set_(staged, t.storage_offset(), t.size(), t.stride())
        if isinstance(t, torch.nn.Parameter):
            return torch.nn.Parameter(out, t.requires_grad)
        return out.requires_grad_() if t.requires_grad else out

    def _buffer(self, nbytes: int, pin: bool) -> torch.UntypedStorage:
        i, self._used = self._used, self._used + 1
        if i < len(self._buffers) and self._buffers[i].nbytes() == nbytes:
            return self._buffers[i]
        buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin).untyped_storage()
        self._buffers[i:] = [buf]  # a layout that changed: the later buffers are stale too
        return buf


def _as_bytes(storage: torch.UntypedStorage) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)


class _Catch:
    """Stands in for a DeepSpeed checkpoint engine during ``save_checkpoint``: ``save`` stages a host copy
    and queues it; everything else (``makedirs``, ``create``, ``commit``, ...) is the real engine's."""

    def __init__(self, inner: Any, staging: HostStaging) -> None:
        self.inner, self.staging = inner, staging
        self.files: list[tuple[Any, str]] = []

    def save(self, state_dict: Any, path: str) -> None:
        self.files.append((self.staging.copy(state_dict), path))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@dataclass
class _Pending:
    step: int
    tmp: Path
    final: Path
    state_json: str
    started: float
    blocking_s: float


class Checkpointer:
    """The run's checkpoint saves: one at a time, published atomically, the last ``keep_last`` kept.

    With ``async_save`` :meth:`save` returns once this rank's state is in host memory; a thread writes the
    files. Every rank reports its write with :meth:`write_flag` (0 done or none, 1 in flight, 2 failed) in a
    collective the loop makes anyway, and passes the maximum over ranks to :meth:`agreed`: at 0 rank 0
    publishes. The next save, and :meth:`wait` (before an exit), wait for the write in flight.

    ``on_published`` gets the :class:`SaveTimes` of each published checkpoint (all ranks).
    ``kill_in_write_at_step``: fault injection, this process SIGKILLs itself in the background write of
    that step's checkpoint, after its first file (0 = never).
    """

    def __init__(
        self,
        run_dir: str | Path,
        keep_last: int,
        *,
        async_save: bool = False,
        on_published: Callable[[SaveTimes], None] | None = None,
        kill_in_write_at_step: int = 0,
    ) -> None:
        self.run_dir, self.keep_last, self.async_save = Path(run_dir), keep_last, async_save
        self.on_published = on_published
        self.kill_in_write_at_step = kill_in_write_at_step
        self.staging = HostStaging()
        self._pending: _Pending | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def save(self, engine, step: int, trainer_state: dict) -> Path:
        """Save on every rank (collective); returns the dir the checkpoint is published as."""
        started = time.perf_counter()
        self.wait()
        rank = distributed.rank()
        root = self.run_dir / CKPT_DIR
        name = checkpoint_name(step)
        tmp, final = root / f"{TMP_PREFIX}{name}", root / name
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # left over from a crash mid-write
            root.mkdir(parents=True, exist_ok=True)
        distributed.barrier()
        state_json = json.dumps(trainer_state, indent=2)
        if not self.async_save:
            engine.save_checkpoint(str(root), tag=tmp.name, client_state={}, save_latest=False)
            torch.save(rng_state(), tmp / f"rng_rank{rank}.pt")
            distributed.barrier()  # every rank has finished writing its shards
            self._pending = _Pending(step, tmp, final, state_json, started, time.perf_counter() - started)
            self._publish()
            return final
        inner = engine.checkpoint_engine
        if inner.is_decoupled():
            raise RuntimeError(
                "checkpoint.async_save writes in its own thread: use no DeepSpeed writer config"
            )
        self.staging.begin()
        catch = _Catch(inner, self.staging)
        engine.checkpoint_engine = catch
        try:
            engine.save_checkpoint(str(root), tag=tmp.name, client_state={}, save_latest=False)
        finally:
            engine.checkpoint_engine = inner
            self.staging.end()
        files = [*catch.files, (rng_state(), str(tmp / f"rng_rank{rank}.pt"))]
        self._pending = _Pending(step, tmp, final, state_json, started, time.perf_counter() - started)
        self._error = None
        self._thread = threading.Thread(
            target=self._write, args=(inner, files, step), name=f"checkpoint-{step}", daemon=True
        )
        self._thread.start()
        return final

    def _write(self, inner: Any, files: list[tuple[Any, str]], step: int) -> None:
        try:
            for i, (obj, path) in enumerate(files):
                inner.save(obj, path)
                if i == 0 and step == self.kill_in_write_at_step:
                    log.warning("fault injection: SIGKILL in the background write of checkpoint %d", step)
                    os.kill(os.getpid(), signal.SIGKILL)
        except BaseException as e:  # reported to every rank by agreed() / wait()
            log.exception("writing checkpoint %d failed", step)
            self._error = e

    @property
    def pending(self) -> bool:
        """A checkpoint was saved but is not published yet (the same on every rank)."""
        return self._pending is not None

    def write_flag(self) -> int:
        """This rank's write: 0 none or done, 1 in flight, 2 failed."""
        if self._thread is None:
            return 0
        if self._thread.is_alive():
            return 1
        return 2 if self._error is not None else 0

    def agreed(self, flag: int) -> None:
        """Act on the maximum of :meth:`write_flag` over ranks (every rank calls it with the same value):
        publish when every write is done; raise on every rank when one failed."""
        if self._pending is None or flag == 1:
            return
        if flag >= 2:
            step, self._pending = self._pending.step, None
            raise RuntimeError(
                f"writing checkpoint {step} failed on a rank (see its log); it was not published"
            )
        self._thread = None
        self._publish()

    def wait(self) -> None:
        """Wait for the write in flight, if any, on every rank, and publish it (collective)."""
        if self._pending is None:
            return
        if self._thread is not None:
            if self._thread.is_alive():
                log.info("waiting for the background write of checkpoint %d", self._pending.step)
            self._thread.join()
        failed = any(distributed.gather_objects(self.write_flag() == 2))  # on some rank
        self.agreed(2 if failed else 0)
        distributed.barrier()

    def _publish(self) -> None:
        p, self._pending = self._pending, None
        assert p is not None
        if distributed.is_rank0():
            (p.tmp / STATE_FILE).write_text(p.state_json)
            if p.final.exists():  # re-saving a step (e.g. a stop right after a periodic save)
                shutil.rmtree(p.final)
            p.tmp.rename(p.final)
            prune(self.run_dir, self.keep_last)
        if not self.async_save:
            distributed.barrier()
        if self.on_published is not None:
            self.on_published(SaveTimes(p.step, p.blocking_s, time.perf_counter() - p.started))


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
    rng_file = ckpt / f"rng_rank{distributed.rank()}.pt"
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
