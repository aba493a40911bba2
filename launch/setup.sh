#!/usr/bin/env bash
# Create .venv (if missing) and install TICOD with its dev tools into it, at the exact versions of
# constraints.txt (the tested lock; pyproject.toml has ranges). Sourced by the other scripts.
# TICOD_PYTHON picks the interpreter used to create the venv (default: python3).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${TICOD_VENV:-$ROOT/.venv}"
if [[ ! -x "$VENV/bin/python" ]]; then
  echo "+ creating $VENV"
  "${TICOD_PYTHON:-python3}" -m venv "$VENV"
fi
# Reinstall only when pyproject.toml or constraints.txt changed since the last install. Under a lock: two
# shells that source this at once (parallel jobs, a test run beside a quickstart) must not run pip together.
STAMP="$VENV/.ticod-installed"
LOCK="$ROOT/constraints.txt"
ticod_install_stale() { [[ ! -f "$STAMP" || "$ROOT/pyproject.toml" -nt "$STAMP" || "$LOCK" -nt "$STAMP" ]]; }
if ticod_install_stale; then
  exec 9> "$VENV/.install.lock"
  flock 9
  if ticod_install_stale; then
    echo "+ pip install -c constraints.txt -e ${ROOT}[dev]"
    "$VENV/bin/python" -m pip install -q --upgrade -c "$LOCK" pip
    "$VENV/bin/python" -m pip install -q -c "$LOCK" -e "${ROOT}[dev]"
    touch "$STAMP"
  fi
  flock -u 9
  exec 9>&-
fi
export PATH="$VENV/bin:$PATH"
# DeepSpeed must be told to use the CPU when there is no GPU (it picks its accelerator at import).
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  export DS_ACCELERATOR=cpu
  # The op's build cache belongs to this venv (ticod/cpu_comm.py picks the same dir): two clones sharing
  # ~/.cache/torch_extensions rebuilt it into one place and took turns invalidating each other's build.
  export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$VENV/torch_extensions}"
  # Build DeepSpeed's CPU comm op once, here, instead of inside the first multi-rank job, where ranks
  # would wait for one of them to build it (~90 s) and a short rendezvous timeout can fail them.
  if [[ ! -f "$VENV/.ds-cpu-ops-built" || ! -d "$TORCH_EXTENSIONS_DIR" ]]; then
    echo "+ building DeepSpeed's CPU communication op (once, ~90 s)"
    python -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()" > /dev/null
    touch "$VENV/.ds-cpu-ops-built"
  fi
fi
