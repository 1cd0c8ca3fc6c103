"""The default benchmark's launcher: `bash scripts/bench.sh` in parallel (one job per core, the joblib
launcher) against the same sweep run sequentially (`PTSBENCH_JOBS=1`), wall time and records, in one run
(`bash scripts/test.sh -m bench -s tests/test_bench_sweep.py`); excluded from the default run.

The whole default benchmark runs for hours on two cores, so the sweep is a slice of it by default, set by
PTSBENCH_BENCH_SWEEP (Hydra overrides added to bench.sh's); `PTSBENCH_BENCH_SWEEP= ` runs all of it.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# resnet18's heuristics and Wanda at three sparsities: the short rows, most of the benchmark's job count
DEFAULT_SLICE = ("model=resnet18 "
                 "algorithm=magnitude_uniform_bn,magnitude_erk_bn,magnitude_global_bn,wanda_bn "
                 "sparsity=0.9,0.98,0.995")


def run_bench(sweep_dir: Path, jobs: int, overrides: list[str]) -> float:
    env = {**os.environ, "PTSBENCH_JOBS": str(jobs)}
    start = time.perf_counter()
    subprocess.run(["bash", "scripts/bench.sh", f"hydra.sweep.dir={sweep_dir}", "progress=false", *overrides],
                   cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def job_results(sweep_dir: Path) -> dict[str, tuple]:
    out = {}
    for path in sorted(sweep_dir.rglob("result.json")):
        rec = json.loads(path.read_text())
        job = str(path.parent.relative_to(sweep_dir))
        out[job] = (rec.get("status"), rec.get("top1"), rec.get("mask_hash"))
    return out


@pytest.mark.bench
def test_bench_parallel_against_sequential(tmp_path):
    overrides = os.environ.get("PTSBENCH_BENCH_SWEEP", DEFAULT_SLICE).split()
    cores = os.cpu_count() or 1
    parallel = run_bench(tmp_path / "parallel", min(cores, 8), overrides)
    sequential = run_bench(tmp_path / "sequential", 1, overrides)
    par, seq = job_results(tmp_path / "parallel"), job_results(tmp_path / "sequential")
    print(f"\nbench.sh on {cores} cores, {len(seq)} jobs ({' '.join(overrides) or 'the whole benchmark'}): "
          f"parallel ({min(cores, 8)} jobs at once) {parallel:.0f} s, sequential {sequential:.0f} s, "
          f"ratio {parallel / sequential:.3f}; records equal: {par == seq}")
    assert seq and all(status == "ok" for status, _, _ in seq.values())
    assert par == seq  # same top-1 and mask hash for every job
