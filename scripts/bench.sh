#!/usr/bin/env bash
# The default benchmark: set up if needed, then sweep models x methods x sparsities on Fashion-MNIST.
# Dense models are trained on first use and cached (PTSBENCH_CACHE, default ~/.cache/ptsbench).
# Extra arguments go to ptsbench as Hydra overrides.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/ptsbench experiment=fmnist_benchmark "$@"
