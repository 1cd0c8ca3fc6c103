"""Random pruning: the control every pruning criterion must beat (as in ShrinkBench's `RandomPruning`).

The allocation axis splits the target across layers as for magnitude pruning; inside a layer the weights
to remove are drawn uniformly at random (`ptsbench.toolkit.scores.random`: a seeded stream per job, so the
same seed gives the same masks), under N:M as random N of each M. BatchNorm can be re-estimated afterwards
like the other baselines. The code path is magnitude pruning's (`algorithms.scored`) with the random score.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from algorithms.scored import ScorePruning
from ptsbench.errors import ConfigError
from ptsbench.settings import POSITIVE, Settings, option
from ptsbench.toolkit.allocation import AllocationChoice
from ptsbench.toolkit.allocations import weight_only_allocations


@dataclass(frozen=True)
class RandomSettings(Settings):
    """The `algorithm` node of the random control: an allocation's counts and BatchNorm re-estimation, no
    more (the score is the point of the control; no reconstruction, no refinement)."""

    allocation: str = "uniform"  # a weight-only allocation: the count per layer (global ones from |w|)
    erk_power_scale: float = option(1.0, POSITIVE)
    bn_recalibration: bool = False

    def check_together(self, key: str) -> None:
        if AllocationChoice.read(self.allocation, self.erk_power_scale).needs_calibration:
            raise ConfigError(f"{key}.allocation={self.allocation} reads calibration statistics; the random "
                              "control takes a weight-only allocation's counts "
                              f"({', '.join(weight_only_allocations())}).")


class RandomPruning(ScorePruning):
    name = "random"
    default_score = "random"
    settings = RandomSettings

    def __init__(self, **config: Any):
        super().__init__(**asdict(RandomSettings.read(config, "algorithm")))
