#!/usr/bin/env bash
# The job body shared by slurm/train_large.sh and slurm/train_small.sh (which document the variables):
# srun one trainer task per GPU; requeue the job when the trainer exits after a preemption signal.
set -euo pipefail

REQUEUE_EXIT_CODE=75 # ticod.preemption.REQUEUE_EXIT_CODE
[[ -f ticod/train.py ]] || { echo "error: $PWD is not the TICOD repository; set TICOD_ROOT" >&2; exit 2; }
if [[ -z "${TICOD_PYTHON:-}" && -x .venv/bin/python ]]; then TICOD_PYTHON=.venv/bin/python; fi
PYTHON="${TICOD_PYTHON:-python3}"
RUN_DIR="${TICOD_RUN_DIR:-runs/${SLURM_JOB_NAME}-${SLURM_JOB_ID}}"
read -r -a OVERRIDES <<< "${TICOD_OVERRIDES:-}"
ARGS=(--config "${TICOD_CONFIG:?set TICOD_CONFIG}" run_dir="$RUN_DIR" checkpoint.resume=auto)
if [[ -n "${TICOD_DATA:-}" ]]; then ARGS+=(data.shards_dir="$TICOD_DATA"); fi
ARGS+=("${OVERRIDES[@]}" "$@")

# srun does not inherit --cpus-per-task from sbatch since Slurm 22.05.
export SRUN_CPUS_PER_TASK="${SLURM_CPUS_PER_TASK:-1}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$SRUN_CPUS_PER_TASK}"
if [[ "${TICOD_DEVICE:-}" == cpu ]]; then
  export CUDA_VISIBLE_DEVICES="" DS_ACCELERATOR=cpu
fi

echo "job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST}:" \
  "${SLURM_NTASKS} tasks, ${SLURM_NTASKS_PER_NODE:-?} per node, GPUs per node ${SLURM_GPUS_PER_NODE:-none}"
# No --kill-on-bad-exit: it would SIGTERM the ranks still exiting after a preemption save and turn
# their status 75 into 143. A crashed rank makes the others fail after deepspeed.dist_timeout_s.
set -x
srun "$PYTHON" -u -m ticod.train "${ARGS[@]}" && status=0 || status=$?
{ set +x; } 2> /dev/null
if [[ $status -eq $REQUEUE_EXIT_CODE ]]; then
  echo "checkpoint saved after a preemption signal: scontrol requeue ${SLURM_JOB_ID}"
  scontrol requeue "$SLURM_JOB_ID"
fi
exit "$status"
