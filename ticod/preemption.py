"""Preemption-safe stopping: a signal asks for a checkpoint and a clean exit with the requeue status.

Contract with the trainer and the Slurm scripts:

1. :class:`PreemptionHandler` turns SIGUSR1 (Slurm's ``--signal=USR1@SECONDS`` warning before the time
   limit, or ``scancel --signal=USR1``) and SIGTERM (preemption, ``scancel``, the launcher stopping us)
   into a flag; nothing else happens inside the signal handler, so a step in flight is never torn.
2. After every micro-batch the trainer folds the flag into its one per-step all-reduce
   (``ticod.train.step_flags``, with the finite-loss check; :func:`should_stop` does the same alone), so
   all ranks agree on the same step although a signal may reach one rank before another.
3. On ``True`` every rank saves the checkpoint of that step and the process exits with
   :data:`REQUEUE_EXIT_CODE`. The Slurm scripts requeue the job on that status; the requeued job runs
   with ``checkpoint.resume=auto`` and continues from the checkpoint just written.

Time budget: Slurm SIGKILLs a job ``KillWait`` seconds (default 30) after SIGTERM, and the ``deepspeed``
launcher SIGKILLs its children 30 s after passing SIGTERM on. After SIGTERM, the step in flight plus the
checkpoint save must fit in those 30 s; SIGUSR1 from ``--signal=USR1@120`` leaves 120 s before the limit.
"""

from __future__ import annotations

import logging
import signal
from types import FrameType
from typing import Any

import torch

from ticod import distributed

log = logging.getLogger(__name__)

# sysexits.h EX_TEMPFAIL: "a temporary failure; the user is invited to retry". Distinct from Python's
# 1 (exception) and 2 (usage), the trainer's 3 (stopped on purpose) and 128+N (killed by signal N).
REQUEUE_EXIT_CODE = 75

DEFAULT_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class PreemptionHandler:
    """Sets :attr:`requested` when one of ``signals`` arrives; :attr:`signal_name` says which came first."""

    def __init__(self, signals: tuple[signal.Signals, ...] = DEFAULT_SIGNALS) -> None:
        self.signals = tuple(signals)
        self.requested = False
        self.signal_name: str | None = None
        self._previous: dict[signal.Signals, Any] = {}

    def install(self) -> PreemptionHandler:
        """Install the handlers (main thread only, as Python requires); returns ``self``."""
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        """Restore the handlers that were installed before."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if not self.requested:
            self.signal_name = signal.Signals(signum).name
        self.requested = True

    def __enter__(self) -> PreemptionHandler:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.uninstall()


def should_stop(handler: PreemptionHandler, device: torch.device | str = "cpu") -> bool:
    """True on every rank when any rank's handler was signalled (all_reduce MAX when distributed).

    Every rank must call it at the same point (it is a collective when torch.distributed is initialised).
    """
    anywhere = distributed.any_true(handler.requested, device)
    if anywhere and not handler.requested:
        log.info("another rank received a stop signal")
    return anywhere
