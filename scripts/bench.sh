#!/usr/bin/env bash
# The default benchmark: set up if needed, then sweep models x methods x sparsities on Fashion-MNIST.
# Dense models are trained on first use and cached (PTSBENCH_CACHE, default ~/.cache/ptsbench).
# Extra arguments go to ptsbench as Hydra overrides.
#
# Jobs run in parallel on this machine through the joblib launcher (hydra/launcher=parallel): PTSBENCH_JOBS
# processes at once (default: one per core, at most 8, so the in-memory datasets of the jobs stay within a
# few GB). Every job gets cores // min(cores, 8) torch threads however many run at once: the learned methods'
# float results depend on the thread count (reductions split across threads round differently), so the
# sequential run, PTSBENCH_JOBS=1 bash scripts/bench.sh, gives the parallel run's records (top-1, mask
# hashes). A `threads=N` override wins over that count (and changes the learned methods' last bits).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cores="$(nproc)"
fitted=$(( cores < 8 ? cores : 8 ))
jobs="${PTSBENCH_JOBS:-$fitted}"
launcher=()
if [ "$jobs" -gt 1 ]; then
  launcher=(hydra/launcher=parallel "hydra.launcher.n_jobs=$jobs")
fi
exec .venv/bin/ptsbench experiment=fmnist_benchmark "${launcher[@]}" "threads=$(( cores / fitted ))" "$@"
