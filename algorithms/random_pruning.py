"""Random pruning: the control every pruning criterion must beat (as in ShrinkBench's `RandomPruning`).

The allocation axis splits the target across layers as for magnitude pruning; inside a layer the weights
to remove are drawn uniformly at random (`ptsbench.toolkit.scores.random`: a seeded stream per job, so the
same seed gives the same masks), under N:M as random N of each M. BatchNorm can be re-estimated afterwards
like the other baselines. The code path is magnitude pruning's (`algorithms.scored`) with the random score.
"""

from __future__ import annotations

from algorithms.scored import ScorePruning
from ptsbench.errors import ConfigError
from ptsbench.toolkit.allocations import weight_only_allocations


class RandomPruning(ScorePruning):
    name = "random"
    default_score = "random"

    def __init__(self, allocation: str = "uniform", erk_power_scale: float = 1.0,
                 bn_recalibration: bool = False):
        super().__init__(allocation, erk_power_scale, bn_recalibration=bn_recalibration)
        if self.alloc.needs_calibration:
            raise ConfigError(f"algorithm.allocation={allocation} reads calibration statistics; the random "
                              "control takes a weight-only allocation's counts "
                              f"({', '.join(weight_only_allocations())}).")
