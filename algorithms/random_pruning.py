"""Random pruning: the control every pruning criterion must beat (as in ShrinkBench's `RandomPruning`).

The allocation axis splits the target across layers as for magnitude pruning; inside a layer the weights
to remove are drawn uniformly at random (a seeded stream per job, so the same seed gives the same masks),
under N:M as random N of each M. BatchNorm can be re-estimated afterwards like the other baselines.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from algorithms.base import PruneContext, PruneResult, PTSAlgorithm
from ptsbench.allocation import AllocationChoice, pattern_masks
from ptsbench.bn import recalibrate_batchnorm
from ptsbench.errors import ConfigError
from ptsbench.sparsity import PrunableLayer, apply_masks, bake_masks, rates


class RandomPruning(PTSAlgorithm):
    name = "random"
    supports_nm_pattern = True

    def __init__(self, allocation: str = "uniform", erk_power_scale: float = 1.0, bn_recalibration: bool = False):
        self.alloc = AllocationChoice(allocation, float(erk_power_scale)).check()
        if self.alloc.needs_calibration:
            raise ConfigError(f"algorithm.allocation={allocation} reads calibration statistics; the random control "
                              "takes a weight-only allocation's counts (uniform, erk, global, global_l2norm).")
        self.bn_recalibration = bool(bn_recalibration)

    def options(self) -> dict[str, Any]:
        return {**self.alloc.options(), "bn_recalibration": self.bn_recalibration}

    @property
    def family(self) -> str:
        return f"random-{self.alloc.describe(self.pattern)}" + ("+bn" if self.bn_recalibration else "")

    def validate(self, layers: list[PrunableLayer], target: float) -> None:
        self.alloc.validate(layers, target, self.pattern)

    def prune(self, model: nn.Module, layers: list[PrunableLayer], target: float, ctx: PruneContext) -> PruneResult:
        counts = self.alloc.counts(layers, target, self.pattern)
        generator = ctx.generator("random.scores")
        scores = {ly.name: torch.rand(ly.weight.shape, generator=generator).to(ly.weight.device) for ly in layers}
        masks = pattern_masks(layers, counts, self.pattern, scores)
        apply_masks(layers, masks)
        bn_layers = recalibrate_batchnorm(model, ctx.calib, ctx.device) if self.bn_recalibration else 0
        bake_masks(model)
        return PruneResult(model=model, allocation=rates(layers, counts), masks=masks,
                           stats={"bn_layers_recalibrated": bn_layers, "calib_passes": int(self.bn_recalibration)})
