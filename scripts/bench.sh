#!/usr/bin/env bash
# The default benchmark: set up if needed, then sweep models x methods x sparsities on Fashion-MNIST.
# Dense models are trained on first use and cached (PTSBENCH_CACHE, default ~/.cache/ptsbench).
# Extra arguments go to ptsbench as Hydra overrides.
#
# Jobs run in parallel on this machine through the joblib launcher (hydra/launcher=parallel): PTSBENCH_JOBS
# processes (default: one per core, at most 8, so the in-memory datasets of the jobs stay within a few GB),
# each with cores // jobs torch threads (ptsbench.cli.threads_per_job), so the jobs do not fight over cores.
# The thread count is not part of a job's identity; the records (top-1, mask hashes) are the sequential run's.
# Sequentially, one job at a time with torch's own thread count: PTSBENCH_JOBS=1 bash scripts/bench.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cores="$(nproc)"
jobs="${PTSBENCH_JOBS:-$(( cores < 8 ? cores : 8 ))}"
launcher=()
if [ "$jobs" -gt 1 ]; then
  launcher=(hydra/launcher=parallel "hydra.launcher.n_jobs=$jobs")
fi
exec .venv/bin/ptsbench experiment=fmnist_benchmark "${launcher[@]}" "$@"
