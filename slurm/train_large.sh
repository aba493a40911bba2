#!/usr/bin/env bash
# TICOD-large on a Slurm cluster: 2 nodes x 8 GPUs by default, one task per GPU started by srun.
#
#   sbatch slurm/train_large.sh [key=value ...]                       # run from the repository root
#   sbatch --nodes=4 --partition=gpu --account=ACC slurm/train_large.sh optim.lr=2e-4
#   TICOD_DATA=/shared/coco_shards TICOD_RUN_DIR=/shared/runs/large sbatch slurm/train_large.sh
#
# sbatch flags override the #SBATCH lines; keep --ntasks-per-node equal to --gpus-per-node (the
# trainer stops with a clear error otherwise). Rank, world size and master come from Slurm's variables
# inside the trainer (ticod/distributed.py). Environment, all optional:
#   TICOD_CONFIG     config file (default configs/ticod_large.yaml)
#   TICOD_DATA       shards dir, passed as data.shards_dir (default: the config's)
#   TICOD_RUN_DIR    run dir (default runs/JOBNAME-JOBID); on a filesystem every node sees
#   TICOD_OVERRIDES  more key=value overrides, space separated (arguments after the script name too)
#   TICOD_PYTHON     interpreter (default .venv/bin/python of the repository, else python3)
#   TICOD_ROOT       repository root (default: the directory sbatch was run from)
#   TICOD_DEVICE=cpu train on CPU ranks (gloo) even where GPUs exist; with --gpus-per-node=0 for tests
# Preemption: Slurm sends SIGUSR1 120 s before the time limit (so does `scancel --signal=USR1 JOBID`);
# every rank then finishes its step, saves a checkpoint and exits with status 75, and this script
# requeues the job, which resumes from that checkpoint (checkpoint.resume=auto). The same job id keeps
# the same run dir and log file.
#SBATCH --job-name=ticod-large
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=48:00:00
#SBATCH --output=%x-%j.out
#SBATCH --error=%x-%j.out
#SBATCH --open-mode=append
#SBATCH --signal=USR1@120
#SBATCH --requeue
set -euo pipefail

REQUEUE_EXIT_CODE=75 # ticod.preemption.REQUEUE_EXIT_CODE
ROOT="${TICOD_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}"
cd "$ROOT"
[[ -f ticod/train.py ]] || { echo "error: $ROOT is not the TICOD repository; set TICOD_ROOT" >&2; exit 2; }
if [[ -z "${TICOD_PYTHON:-}" && -x .venv/bin/python ]]; then TICOD_PYTHON=.venv/bin/python; fi
PYTHON="${TICOD_PYTHON:-python3}"
RUN_DIR="${TICOD_RUN_DIR:-runs/${SLURM_JOB_NAME}-${SLURM_JOB_ID}}"
read -r -a OVERRIDES <<< "${TICOD_OVERRIDES:-}"
ARGS=(--config "${TICOD_CONFIG:-configs/ticod_large.yaml}" run_dir="$RUN_DIR" checkpoint.resume=auto)
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
