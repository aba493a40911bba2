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
# the same run dir and log file. A rank that fails (exception, OOM, signal) ends every task of the job at
# once (srun --kill-on-bad-exit, slurm/task.sh), with its status: the job fails and is not requeued.
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
# sbatch runs a copy of this script from its spool dir: the body is found from the submit dir.
cd "${TICOD_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}"
export TICOD_CONFIG="${TICOD_CONFIG:-configs/ticod_large.yaml}"
exec bash slurm/train_job.sh "$@"
