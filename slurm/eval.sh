#!/usr/bin/env bash
# Standalone evaluation of a checkpoint on one Slurm node: box AP and caption metrics on the val split,
# one task per GPU started by srun (each rank evaluates its share of the images).
#
#   TICOD_CHECKPOINT=runs/ticod_large sbatch slurm/eval.sh [key=value ...]     # from the repository root
#   TICOD_CHECKPOINT=/shared/runs/large/export TICOD_DATA=/shared/coco_shards sbatch --gpus-per-node=4 \
#       --ntasks-per-node=4 slurm/eval.sh eval.max_images=500
#
# Environment:
#   TICOD_CHECKPOINT a run dir, an export dir or a checkpoint dir (required)
#   TICOD_OUT        where metrics.json and predictions go (default TICOD_CHECKPOINT/eval-JOBID)
#   TICOD_DATA       shards dir, passed as --data (default: the checkpoint's config)
#   TICOD_OVERRIDES  more key=value overrides, space separated (arguments after the script name too)
#   TICOD_PYTHON     interpreter (default .venv/bin/python of the repository, else python3)
#   TICOD_ROOT       repository root (default: the directory sbatch was run from)
#   TICOD_DEVICE=cpu evaluate on CPU ranks even where GPUs exist; with --gpus-per-node=0 for tests
#SBATCH --job-name=ticod-eval
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=04:00:00
#SBATCH --output=%x-%j.out
#SBATCH --error=%x-%j.out
set -euo pipefail

ROOT="${TICOD_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}"
cd "$ROOT"
[[ -f ticod/evaluate.py ]] || { echo "error: $ROOT is not the TICOD repository; set TICOD_ROOT" >&2; exit 2; }
CHECKPOINT="${TICOD_CHECKPOINT:?set TICOD_CHECKPOINT to a run dir, export dir or checkpoint dir}"
if [[ -z "${TICOD_PYTHON:-}" && -x .venv/bin/python ]]; then TICOD_PYTHON=.venv/bin/python; fi
PYTHON="${TICOD_PYTHON:-python3}"
read -r -a OVERRIDES <<< "${TICOD_OVERRIDES:-}"
ARGS=(--checkpoint "$CHECKPOINT" --out "${TICOD_OUT:-$CHECKPOINT/eval-${SLURM_JOB_ID}}")
if [[ -n "${TICOD_DATA:-}" ]]; then ARGS+=(--data "$TICOD_DATA"); fi
ARGS+=("${OVERRIDES[@]}" "$@")

# srun does not inherit --cpus-per-task from sbatch since Slurm 22.05.
export SRUN_CPUS_PER_TASK="${SLURM_CPUS_PER_TASK:-1}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$SRUN_CPUS_PER_TASK}"
if [[ "${TICOD_DEVICE:-}" == cpu ]]; then
  export CUDA_VISIBLE_DEVICES="" DS_ACCELERATOR=cpu
fi

echo "job ${SLURM_JOB_ID} on ${SLURM_JOB_NODELIST}: ${SLURM_NTASKS} tasks, GPUs per node ${SLURM_GPUS_PER_NODE:-none}"
set -x
exec srun "$PYTHON" -u -m ticod.evaluate "${ARGS[@]}"
