#!/usr/bin/env bash
# Local multi-process training with the deepspeed launcher:
#   launch/train_local.sh CONFIG [key=value ...]
# One rank per GPU; with no GPU, NPROC CPU ranks (default 2) on gloo. NPROC also caps the GPU count.
set -euo pipefail
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"
  exit 0
fi
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CONFIG="${1:?usage: launch/train_local.sh CONFIG [key=value ...]}"
shift
# shellcheck source=launch/setup.sh
source "$ROOT/launch/setup.sh"
GPUS=$(python -c "import torch; print(torch.cuda.device_count())")
if [[ "$GPUS" -gt 0 ]]; then
  NPROC="${NPROC:-$GPUS}"
else
  NPROC="${NPROC:-2}"
  # Split the cores between the CPU ranks instead of letting each take all of them.
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( $(nproc) / NPROC > 0 ? $(nproc) / NPROC : 1 ))}"
fi
PORT="${MASTER_PORT:-$(python -c 'import socket; s=socket.socket(); s.bind(("",0)); print(s.getsockname()[1])')}"
cd "$ROOT"
set -x
exec deepspeed --num_gpus "$NPROC" --master_port "$PORT" --module ticod.train --config "$CONFIG" "$@"
