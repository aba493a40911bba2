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

# Every task takes its rank and world from Slurm's variables (ticod/distributed.py). torchrun's, exported
# into the job by sbatch from the submitting shell, would win over them and are stale here: drop them.
unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE MASTER_ADDR MASTER_PORT
# srun does not inherit --cpus-per-task from sbatch since Slurm 22.05.
export SRUN_CPUS_PER_TASK="${SLURM_CPUS_PER_TASK:-1}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$SRUN_CPUS_PER_TASK}"
if [[ "${TICOD_DEVICE:-}" == cpu ]]; then
  export CUDA_VISIBLE_DEVICES="" DS_ACCELERATOR=cpu
  # DeepSpeed JIT-builds its CPU comm op with other flags here than outside Slurm; a cache of its own
  # keeps the two builds from replacing each other (a ~90 s rebuild at every switch).
  export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/torch_extensions/ticod-cpu}"
fi

echo "job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST}:" \
  "${SLURM_NTASKS} tasks, ${SLURM_NTASKS_PER_NODE:-?} per node, GPUs per node ${SLURM_GPUS_PER_NODE:-none}"
# --kill-on-bad-exit: a rank that fails (exception, OOM, signal) ends every task of the step at once,
# instead of leaving the others in a collective until deepspeed.dist_timeout_s. slurm/task.sh turns a
# rank's preemption status 75 into 0 plus a marker file in REQUEUE_DIR (on the shared run dir, so the
# markers of every node are seen here), which keeps 75 from counting as a bad exit.
REQUEUE_DIR="$RUN_DIR/.requeue-${SLURM_JOB_ID}"
rm -rf "$REQUEUE_DIR" && mkdir -p "$REQUEUE_DIR"
export TICOD_REQUEUE_DIR="$REQUEUE_DIR"
set -x
srun --kill-on-bad-exit=1 bash slurm/task.sh "$PYTHON" -u -m ticod.train "${ARGS[@]}" && status=0 || status=$?
{ set +x; } 2> /dev/null
if [[ $status -eq 0 && -n "$(ls -A "$REQUEUE_DIR")" ]]; then
  status=$REQUEUE_EXIT_CODE
  echo "checkpoint saved after a preemption signal: scontrol requeue ${SLURM_JOB_ID}"
  scontrol requeue "$SLURM_JOB_ID"
fi
rm -rf "$REQUEUE_DIR"
exit "$status"
