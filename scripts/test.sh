#!/usr/bin/env bash
# The test suite: set up if needed, then pytest (unit tests and the slow end-to-end sweeps).
# Extra arguments go to pytest. `--fast` first is the fast lane while editing: everything but the slow
# end-to-end sweeps (a -m on the command line replaces pyproject's, so the lane restates its exclusions).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ "${1:-}" = "--fast" ]; then
  shift
  set -- -m "not slow and not bench and not gpu" "$@"
fi
# One pytest-xdist worker per core (PTSBENCH_TEST_WORKERS sets the number; a later -n on the command line
# wins). Benchmarks and the GPU check (-m bench, -m gpu) time themselves, so they run in one process.
workers=(-n "${PTSBENCH_TEST_WORKERS:-auto}")
prev=""
for arg in "$@"; do
  if [ "$prev" = "-m" ] && { [ "$arg" = "bench" ] || [ "$arg" = "gpu" ]; }; then
    workers=(-n 0)
  fi
  prev="$arg"
done
exec .venv/bin/python -m pytest "${workers[@]}" "$@"
