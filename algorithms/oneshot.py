"""What Wanda and SparseGPT share: one-shot, layer-wise pruning on calibration statistics.

Per-layer counts come from the allocation axis (and the pattern); each block of layers is calibrated on
the outputs of the blocks already pruned (`ptsbench.layerwise.sequential_prune`) and each layer is pruned
by the method's own rule on the statistic of its inputs. A method names its statistic and its layer rule.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any, ClassVar

import torch
from torch import nn

from algorithms.base import PruneContext, PruneResult, PTSAlgorithm
from algorithms.magnitude import AllocationChoice
from ptsbench.bn import recalibrate_batchnorm
from ptsbench.errors import ConfigError
from ptsbench.layerwise import InputStatistic, check_supported, sequential_prune
from ptsbench.sparsity import PrunableLayer, magnitude_mask, rates


class LayerwiseOneShot(PTSAlgorithm):
    supports_nm_pattern = True
    statistic: ClassVar[type]  # built per layer, fed the layer's unfolded inputs

    def __init__(self, allocation: str = "uniform", erk_power_scale: float = 1.0, allocation_file: str | None = None,
                 allocation_label: str | None = None, batch_size: int = 64, bn_recalibration: bool = False,
                 bn_sequential: bool = False):
        self.alloc = AllocationChoice(allocation, float(erk_power_scale), allocation_file, allocation_label).check()
        self.batch_size = int(batch_size)  # calibration images per forward pass (memory, not results)
        # Not in the papers (language models have no BatchNorm): on a BN network the pruned layers shift the
        # batch statistics, and re-estimating them on the calibration images is what magnitude+bn does too.
        self.bn_recalibration = bool(bn_recalibration)
        # With re-estimation only at the end, each block is calibrated on a pruned prefix whose BN layers
        # still hold the dense statistics, i.e. on inputs the final network never sees; `bn_sequential`
        # re-estimates them before every block's pass as well (one more pass per block).
        self.bn_sequential = bool(bn_sequential)
        if self.bn_sequential and not self.bn_recalibration:
            raise ConfigError("algorithm.bn_sequential=true re-estimates BatchNorm along the sequential pass and "
                              "needs algorithm.bn_recalibration=true (the statistics after the last block).")

    def options(self) -> dict[str, Any]:
        opts = {**self.alloc.options(), "bn_recalibration": self.bn_recalibration}
        return opts | ({"bn_sequential": True} if self.bn_sequential else {})

    @property
    def family(self) -> str:
        bn = "+seqbn" if self.bn_sequential else "+bn" if self.bn_recalibration else ""
        return f"{self.name}-{self.alloc.describe(self.pattern)}{bn}"

    def validate(self, layers: list[PrunableLayer], target: float) -> None:
        check_supported(layers)
        self.alloc.validate(layers, target, self.pattern)

    @abstractmethod
    def prune_layer(self, layer: PrunableLayer, stat: InputStatistic, n_zero: int) -> torch.Tensor:
        """Prune `layer` in place to `n_zero` zeros (and the pattern) from its input statistic; return its mask."""

    def prune(self, model: nn.Module, layers: list[PrunableLayer], target: float, ctx: PruneContext) -> PruneResult:
        counts = self.alloc.counts(layers, target, self.pattern)
        masks = {ly.name: magnitude_mask(ly.weight, 0) for ly in layers}

        def finish(layer: PrunableLayer, stat: InputStatistic) -> None:
            masks[layer.name] = self.prune_layer(layer, stat, counts[layer.name])

        def reestimate() -> int:
            return recalibrate_batchnorm(model, ctx.calib, ctx.device, self.batch_size)

        todo = [ly for ly in layers if counts[ly.name] > 0]  # dense layers need no statistics
        passes = sequential_prune(model, todo, ctx.calib, self.batch_size, self.statistic, finish,
                                  progress=ctx.progress, desc=self.name,
                                  before_block=reestimate if self.bn_sequential else None) if todo else 0
        bn_layers = reestimate() if self.bn_recalibration else 0
        bn_passes = max(passes - 1, 0) if self.bn_sequential and bn_layers else 0  # none before the first block
        return PruneResult(model=model, allocation=rates(layers, counts), masks=masks,
                           stats={"calib_passes": passes + bn_passes + int(self.bn_recalibration),
                                  "layers_pruned": len(todo), "bn_layers_recalibrated": bn_layers})
