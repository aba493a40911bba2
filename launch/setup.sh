#!/usr/bin/env bash
# Create .venv (if missing) and install TICOD with its dev tools into it. Sourced by the other scripts.
# TICOD_PYTHON picks the interpreter used to create the venv (default: python3).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${TICOD_VENV:-$ROOT/.venv}"
if [[ ! -x "$VENV/bin/python" ]]; then
  echo "+ creating $VENV"
  "${TICOD_PYTHON:-python3}" -m venv "$VENV"
fi
# Reinstall only when pyproject.toml changed since the last install. Under a lock: two shells that
# source this at once (parallel jobs, a test run beside a quickstart) must not run pip together.
STAMP="$VENV/.ticod-installed"
if [[ ! -f "$STAMP" || "$ROOT/pyproject.toml" -nt "$STAMP" ]]; then
  exec 9> "$VENV/.install.lock"
  flock 9
  if [[ ! -f "$STAMP" || "$ROOT/pyproject.toml" -nt "$STAMP" ]]; then
    echo "+ pip install -e ${ROOT}[dev]"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q -e "${ROOT}[dev]"
    touch "$STAMP"
  fi
  flock -u 9
  exec 9>&-
fi
export PATH="$VENV/bin:$PATH"
# DeepSpeed must be told to use the CPU when there is no GPU (it picks its accelerator at import).
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  export DS_ACCELERATOR=cpu
fi
