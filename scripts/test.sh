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
exec .venv/bin/python -m pytest "$@"
