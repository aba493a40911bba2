#!/usr/bin/env bash
# Set up .venv if needed and run the test suite: launch/test.sh [pytest args]
# Default: every test except the opt-in Slurm cluster tests (TICOD_TEST_SLURM=1 adds them).
# Edit-test loop: launch/test.sh -m "not slow" (no multi-process or long runs).
# Runs on TICOD_TEST_WORKERS pytest-xdist workers (default 2; 1: one process, for -s, --pdb), with the
# multi-process and Slurm tests one at a time on one of them (tests/conftest.py).
set -euo pipefail
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"
  exit 0
fi
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=launch/setup.sh
source "$ROOT/launch/setup.sh"
cd "$ROOT"
if [[ $# -eq 0 ]]; then
  set -- -q
fi
WORKERS="${TICOD_TEST_WORKERS:-2}"
if [[ "$WORKERS" != 1 && " $* " != *" -n "* && " $* " != *" --numprocesses"* ]]; then
  set -- -n "$WORKERS" --dist loadgroup "$@"
fi
set -x
exec python -m pytest "$@"
