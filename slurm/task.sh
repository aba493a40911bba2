#!/usr/bin/env bash
# One srun task of slurm/train_job.sh: runs the trainer command given as arguments and lets srun's
# --kill-on-bad-exit tell a crash from a preemption:
#   exit 75 (checkpoint saved after a preemption signal) -> a marker file in $TICOD_REQUEUE_DIR, exit 0
#   any other status                                   -> passed on (non-zero: srun kills the other tasks)
# Slurm signals every process of a task (scancel --signal=USR1, the time limit's USR1@120, the kill after a
# bad exit): this shell waits them out and the trainer handles them.
set -uo pipefail

REQUEUE_EXIT_CODE=75 # ticod.preemption.REQUEUE_EXIT_CODE
: "${TICOD_REQUEUE_DIR:?set by slurm/train_job.sh}"
trap : USR1 TERM
"$@"
status=$?
if [[ $status -eq $REQUEUE_EXIT_CODE ]]; then
  touch "$TICOD_REQUEUE_DIR/task-${SLURM_PROCID:?}"
  exit 0
fi
exit "$status"
