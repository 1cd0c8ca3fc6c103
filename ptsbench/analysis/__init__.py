"""The analysis programs: what happens to jobs after they ran.

The job path (ptsbench.cli -> ptsbench.runner) leaves one folder per job under a scratch runs folder
(result.json, allocation.csv, calibration indices, Hydra's copies). A *study* is the committed form of a
set of jobs: `study.collect` turns their folders into one `records.jsonl` and one long-format
`allocations.csv`, and everything below reads studies, not job folders:

    runs/<study>/...  --study.collect-->  results/<study>/{records.jsonl, allocations.csv}
                      --report (ptsbench-report)-->  results.{md,csv}, accuracy_vs_sparsity.png, pareto
    budget          runs a study's points (budget curves, the leaderboard), then collects and reports
    leaderboard     every run ranked per cell, paired gaps; discriminating: each model's range
    matrix          allocation x reconstruction, replaying learned allocations from studies' allocations.csv
    overlap         mask overlap between methods (needs the jobs' checkpoints, so it reads run folders) and
                    per-layer sparsity charts (from a study)
    claims          the papers' headline claims on the studies conf/study/claims.yaml lists
    reference       measured rows beside the published numbers; pareto, plotting: the report's views

Every program's `main` is wrapped by `program`: bad input ends as one line and exit status 2.

The lists these programs need (which algorithms a study runs, which are baselines, which allocations are
learned) live in conf/experiment/<study>.yaml and conf/study/<study>.yaml, never in the modules.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Sequence

from ptsbench.errors import PtsbenchError

Main = Callable[[Sequence[str] | None], int]


def program(prog: str) -> Callable[[Main], Main]:
    """Decorate an analysis program's `main`: bad input (a PtsbenchError, which names the file or key, the
    bad value and what is allowed) ends as one line `prog: message` on stderr and exit status 2, not a
    traceback. Any other exception is a bug and keeps its traceback."""

    def decorate(main: Main) -> Main:
        @functools.wraps(main)
        def run(argv: Sequence[str] | None = None) -> int:
            try:
                return main(argv)
            except PtsbenchError as exc:
                print(f"{prog}: {exc}", file=sys.stderr)
                return 2

        return run

    return decorate
