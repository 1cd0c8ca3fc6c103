#!/usr/bin/env bash
# The test suite: set up if needed, then pytest (unit tests and the slow end-to-end sweeps).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
