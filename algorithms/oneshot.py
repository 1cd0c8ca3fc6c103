"""What the layer-wise one-shot methods (Wanda, SparseGPT, RIA) share: pruning on calibration statistics.

Per-layer counts come from the allocation axis (and the pattern); each layer is pruned by the method's own
rule on the statistic of its inputs, and the calibration protocol says which network those inputs come from
(`ptsbench.toolkit.layerwise.CALIB_PROTOCOLS`): `dense`, every layer's inputs from the dense network, as the
reference vision code of Wanda (locuslab/wanda `image_classifiers/`) takes them; `sequential`, from the
already pruned (and, for SparseGPT, updated) prefix, as the reference SparseGPT; `sequential+bn`, the same
with the prefix's BatchNorm re-estimated before each block. A method names its statistic, its layer rule
and its default protocol.

On a BatchNorm network `sequential` calibrates every block after the first on a prefix whose BN layers
still hold the dense statistics, i.e. on inputs the final, re-estimated network never produces: a labelled
ablation (`*_stalebn`), not a default.

Two additions from later papers sit on their own axes: `allocation=owl` (`ptsbench.toolkit.owl`) takes the
rates from the outlier ratios of the dense network's Wanda scores, one extra calibration pass before pruning;
`refine=dsnot` (`ptsbench.toolkit.dsnot`) swaps each pruned layer's weights within rows right after the method
prunes it, on the mean and variance of the same inputs.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from algorithms.base import PruneContext, PruneResult, PTSAlgorithm
from ptsbench.settings import COUNT, Settings, option
from ptsbench.toolkit.allocation import AllocationSettings
from ptsbench.toolkit.bn import recalibrate_batchnorm
from ptsbench.toolkit.dsnot import RefinementSettings, dsnot_layer
from ptsbench.toolkit.layerwise import (
    InputMoments,
    InputStatistic,
    StatisticPair,
    calibrated_prune,
    check_protocol,
    check_protocol_bn,
    check_supported,
    dense_input_norms,
)
from ptsbench.toolkit.sparsity import PrunableLayer, magnitude_mask, rates


@dataclass(frozen=True)
class OneShotSettings(AllocationSettings, RefinementSettings):
    """The `algorithm` node of a layer-wise one-shot method: the allocation axis, DSnoT's refinement and the
    keys below; conf/algorithm/<method>.yaml starts from it (`schema/algorithm/<name>`)."""

    batch_size: int = option(64, COUNT)  # calibration images per forward pass (memory, not results)
    # Not in the papers (language models have no BatchNorm): on a BN network the pruned layers shift the
    # batch statistics, and re-estimating them on the calibration images is what magnitude+bn does too.
    bn_recalibration: bool = False
    # dense | sequential | sequential+bn; None: the method's reference protocol (`default_protocol`)
    calib_protocol: str | None = option(None, check_protocol)

    def check_together(self, key: str) -> None:
        check_protocol_bn(key, self.calib_protocol, self.bn_recalibration)
        super().check_together(key)


class LayerwiseOneShot(PTSAlgorithm):
    supports_nm_pattern = True
    statistic: ClassVar[type]  # built per layer, fed the layer's unfolded inputs
    settings: ClassVar[type[Settings]] = OneShotSettings  # a method with keys of its own extends it

    def __init__(self, **config: Any):
        given = self.settings.read(config, "algorithm")
        self.config = given
        self.alloc = given.allocation_choice()
        self.dsnot = given.refinement()
        self.batch_size = int(given.batch_size)
        self.bn_recalibration = bool(given.bn_recalibration)
        protocol = given.calib_protocol
        self.calib_protocol = self.default_protocol() if protocol is None else protocol

    def default_protocol(self) -> str:
        """The protocol of the method's reference code. The reference SparseGPT and RIA calibrate each block
        on the pruned prefix; on a BN network that prefix is only what the final network computes once its
        BatchNorm is re-estimated along the pass. A method whose reference differs overrides it."""
        return "sequential+bn" if self.bn_recalibration else "sequential"

    def options(self) -> dict[str, Any]:
        """The allocation's, BN's, the protocol's and the refinement's options, then the method's own keys
        (its settings' fields beyond OneShotSettings's) as they are."""
        refine = {} if self.dsnot is None else {"refine": "dsnot", **self.dsnot.options()}
        shared = set(OneShotSettings.field_names())
        own = {k: getattr(self.config, k) for k in self.config.field_names() if k not in shared}
        return {**self.alloc.options(), "bn_recalibration": self.bn_recalibration,
                "calib_protocol": self.calib_protocol, **refine, **own}

    @property
    def family(self) -> str:
        tags = {"dense": "dense", "sequential": "seq", "sequential+bn": "seqbn"}
        protocol = "" if self.calib_protocol == self.default_protocol() else f"-{tags[self.calib_protocol]}"
        method = self.name if self.dsnot is None else f"{self.name}+dsnot"
        return (f"{method}-{self.alloc.describe(self.pattern)}{protocol}"
                f"{'+bn' if self.bn_recalibration else ''}")

    def validate(self, layers: list[PrunableLayer], target: float) -> None:
        check_supported(layers)
        self.alloc.validate(layers, target, self.pattern)

    @abstractmethod
    def prune_layer(self, layer: PrunableLayer, stat: InputStatistic, n_zero: int) -> torch.Tensor:
        """Prune `layer` in place to `n_zero` zeros (and the pattern) from its input statistic; return its
        mask."""

    def prune(self, model: nn.Module, layers: list[PrunableLayer], target: float,
              ctx: PruneContext) -> PruneResult:
        owl_pass = self.alloc.needs_calibration
        norms = dense_input_norms(model, layers, ctx.calib, self.batch_size) if owl_pass else None
        counts = self.alloc.counts(layers, target, self.pattern, norms)
        masks = {ly.name: magnitude_mask(ly.weight, 0) for ly in layers}
        swaps = 0

        def begin(layer: PrunableLayer) -> InputStatistic:
            own = self.statistic(layer)
            return own if self.dsnot is None else StatisticPair(own, InputMoments(layer))

        def finish(layer: PrunableLayer, stat: InputStatistic) -> None:
            nonlocal swaps
            if self.dsnot is None:
                masks[layer.name] = self.prune_layer(layer, stat, counts[layer.name])
                return
            dense = layer.weight.detach().clone()
            mask = self.prune_layer(layer, stat.first, counts[layer.name])
            masks[layer.name], n = dsnot_layer(layer, dense, mask, stat.second, len(ctx.calib), self.pattern,
                                               self.dsnot)
            swaps += n

        todo = [ly for ly in layers if counts[ly.name] > 0]  # dense layers need no statistics
        passes, bn_passes = (0, 0) if not todo else calibrated_prune(
            self.calib_protocol, model, todo, ctx.calib, self.batch_size, begin, finish, ctx.device,
            progress=ctx.progress, desc=self.name)
        bn_layers = 0
        if self.bn_recalibration:
            bn_layers = recalibrate_batchnorm(model, ctx.calib, ctx.device, self.batch_size)
        passes += bn_passes + int(self.bn_recalibration) + int(owl_pass)
        stats: dict[str, Any] = {"calib_passes": passes, "layers_pruned": len(todo),
                                 "bn_layers_recalibrated": bn_layers}
        if self.dsnot is not None:
            stats["dsnot_swaps"] = swaps
        return PruneResult(model=model, allocation=rates(layers, counts), masks=masks, stats=stats)
