"""What a training log line reports: the log window of losses and data counts, its reduction over the ranks,
and the run totals it adds to; the gradient norm, lrs and peak memory of the logged step.

The loop (:mod:`ticod.train`) fills a :class:`Window` every micro-batch without reading the device, reduces
it once per log line (:meth:`Window.reduce`: one all-reduce, one device-to-host read) and adds its counts to
the run totals in the :class:`~ticod.resume.TrainState` (:func:`add_counts`).
"""

from __future__ import annotations

import resource
from collections import defaultdict
from typing import Any

import torch

from ticod import distributed
from ticod.data_wait import rank_slots, wait_fraction
from ticod.resume import TrainState

CAPTION_LOSSES = ("caption", "loss_cap")


class Window:
    """Loss and data statistics accumulated between two log lines on one rank.

    The loss sums stay on the device: reading a loss waits for the device to finish the step, so they are
    read once per log line, in :meth:`reduce`.
    """

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.had: dict[str, int] = defaultdict(int)  # micro-batches with labels for each loss's task
        self.samples = 0
        self.read = 0
        self.counts: dict[str, int] = defaultdict(int)  # "bad/<reason>", "fixed/<reason>", "sources/<name>"
        self.step_time = 0.0
        self.data_wait = 0.0  # seconds the loop waited for its next batch (ticod.data_wait)
        self.steps = 0  # optimizer steps in the window
        self.grad_norm: float | None = None  # of the logged step, where DeepSpeed reports none
        self.folded: dict[str, int] = {}  # counts already added to the run totals (train.fold_window)
        self.lrs: dict[str, float] = {}  # of the logged step (:func:`step_lrs`)

    def add_losses(
        self, losses: dict[str, torch.Tensor], batch_size: int, present: tuple[bool, bool] = (True, True)
    ) -> None:
        """Add a micro-batch's losses. ``present``: whether it had images labelled for boxes / captions; a
        task's losses are averaged over the micro-batches that had it (the others' are a zero stand-in)."""
        for k, v in losses.items():
            v = v.detach().to(torch.float64)
            self.sums[k] = self.sums[k] + v if k in self.sums else v
            self.had[k] += loss_task_present(k, present)
        self.samples += batch_size

    def add_stats(self, stats: dict) -> None:
        self.read += int(stats.get("read", 0))
        for kind in ("bad", "fixed", "sources"):
            for reason, n in stats.get(kind, {}).items():
                self.counts[f"{kind}/{reason}"] += int(n)

    def reduce(self, device: torch.device, world_size: int) -> dict[str, Any]:
        """Mean losses over ranks; summed counts; images/s, the mean optimizer step time and the data wait
        share (the slowest rank's) over the window.

        One all-reduce and one device-to-host read for the whole window.
        """
        keys = sorted(self.sums)
        reasons = sorted(all_reasons(self.counts, device))
        waits = rank_slots(wait_fraction(self.data_wait, self.step_time), distributed.rank(), world_size)
        counts = torch.tensor(
            [self.samples, self.read]
            + [self.counts[r] for r in reasons]
            + [self.had[k] for k in keys]
            + waits,
            dtype=torch.float64,
        )
        losses = [torch.stack([self.sums[k] for k in keys]).to(device)] if keys else []
        vec = torch.cat([*losses, counts.to(device)])
        values = distributed.all_reduce_(vec).tolist()
        n = len(keys)
        samples, read = int(values[n]), int(values[n + 1])
        had = values[n + 2 + len(reasons) : n + 2 + len(reasons) + n]
        # A task's mean over the micro-batches that had its labels (all of them, without partial labels);
        # none in the window on any rank: not logged.
        out: dict[str, Any] = {k: values[i] / had[i] for i, k in enumerate(keys) if had[i]}
        out["images_per_s"] = samples / max(self.step_time, 1e-9)
        out["step_time_s"] = self.step_time / max(self.steps, 1)
        out["data_wait_frac"] = max(values[len(values) - world_size :])
        out["samples"], out["read"] = samples, read
        out["bad"], out["fixed"], out["sources"] = {}, {}, {}
        for i, key in enumerate(reasons):
            kind, reason = key.split("/", 1)
            out[kind][reason] = int(values[n + 2 + i])
        return out


def loss_task_present(key: str, present: tuple[bool, bool]) -> bool:
    """Whether a micro-batch with labels ``present`` (boxes, captions) had the task of loss ``key``."""
    if key == "loss":
        return True
    return present[1] if key in CAPTION_LOSSES else present[0]


def all_reasons(counts: dict[str, int], device: torch.device) -> set[str]:
    """Union of the count keys seen by any rank (so every rank reduces the same vector)."""
    return {r for rs in distributed.gather_objects(sorted(counts)) for r in rs}


def add_counts(state: TrainState, window: Window, reduced: dict[str, Any]) -> None:
    """Add the counts of a reduced ``window`` (:meth:`Window.reduce`) to the run totals, less those an
    earlier :func:`ticod.train.fold_window` of the same window added."""
    counts = {"samples": reduced["samples"], "read": reduced["read"]}
    for kind in ("bad", "fixed", "sources"):
        counts.update({f"{kind}/{reason}": n for reason, n in reduced[kind].items()})
    new = {k: n - window.folded.get(k, 0) for k, n in counts.items()}
    window.folded = counts
    state.samples += new.pop("samples")
    state.samples_read += new.pop("read")
    for key, n in new.items():
        kind, reason = key.split("/", 1)
        totals = getattr(state, kind)
        totals[reason] = totals.get(reason, 0) + n


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux: process RSS peak


def unreported_grad_norm(engine: Any) -> float | None:
    """The gradient norm where DeepSpeed computes none it reports (ZeRO stage 0 in fp32), else None.

    Call between ``backward`` and ``step``. At stage 0 the gradients are all-reduced by then, so every rank's
    norm is the global one.
    """
    if engine.zero_optimization_stage() != 0 or engine.bfloat16_enabled() or engine.fp16_enabled():
        return None
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0


def step_lrs(optimizer: Any) -> dict[str, float]:
    """The lrs the optimizer's next step applies: ``lr`` of the heads, ``lr_backbone`` of the backbone,
    ``lr_caption`` of the caption decoder where it has groups of its own (``optim.caption_lr``); by the group
    names of :func:`ticod.optim.param_groups`, a part without trainable parameters is absent."""
    keys = {"backbone": "lr_backbone", "captioner": "lr_caption"}
    out: dict[str, float] = {}
    for group in optimizer.param_groups:
        key = keys.get(group["name"].split("_")[0], "lr")
        out.setdefault(key, float(group["lr"]))
    return out


def metric_float(x: Any) -> float:
    """A logged number: a tensor's value (a host read), NaN for None."""
    if x is None:
        return float("nan")
    return float(x.item() if torch.is_tensor(x) else x)
