"""Magnitude PTS: split the global target across layers (an allocation), then remove each layer's
smallest-magnitude weights, optionally re-estimating BatchNorm statistics on the calibration set.

This is the baseline every PTS paper starts from; with `allocation=global_l2norm` it is POT's mask
selection without POT's corrections.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
from torch import nn

from algorithms.base import PruneContext, PruneResult, PTSAlgorithm
from ptsbench.bn import recalibrate_batchnorm
from ptsbench.errors import ConfigError, unknown_choice
from ptsbench.sparsity import (
    ALLOCATIONS,
    PrunableLayer,
    allocate,
    apply_masks,
    bake_masks,
    counts_from_rates,
    magnitude_masks,
    rates,
)

ALLOCATION_CHOICES = ALLOCATIONS + ("from_file",)


def read_allocation_file(path: str | Path, layers: list[PrunableLayer], target: float,
                         tolerance: float = 5e-3) -> dict[str, float]:
    """Per-layer sparsities from another job's allocation.csv (its audited `achieved_sparsity` column)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"algorithm.allocation_file={str(path)!r} does not exist.")
    table = pd.read_csv(path)
    column = "achieved_sparsity" if "achieved_sparsity" in table else "target_sparsity"
    if "name" not in table or column not in table:
        raise ConfigError(f"{path} has no 'name' and 'achieved_sparsity' columns (an allocation.csv from a job).")
    given = dict(zip(table["name"], table[column], strict=True))
    names = {ly.name for ly in layers}
    unknown = sorted(set(given) - names)
    missing = sorted(names - set(given))
    if unknown or missing:
        raise ConfigError(
            f"Allocation file {path} does not fit this model: layers the model does not have: "
            f"{unknown[:8] or 'none'}; model layers the file lacks: {missing[:8] or 'none'}."
        )
    layer_rates = {name: float(given[name]) for name in names}
    bad = {name: v for name, v in layer_rates.items() if not 0.0 <= v <= 1.0}
    if bad:
        raise ConfigError(f"Allocation file {path} has layer sparsities outside [0, 1]: {dict(list(bad.items())[:5])}.")
    total = sum(ly.numel for ly in layers)
    reached = sum(layer_rates[ly.name] * ly.numel for ly in layers) / total
    if abs(reached - target) > tolerance:
        raise ConfigError(
            f"Allocation file {path} gives global sparsity {reached:.4f}, not the target {target} "
            f"(tolerance {tolerance}). Use the file with sparsity={reached:.4f} or pick another file."
        )
    return layer_rates


class MagnitudePruning(PTSAlgorithm):
    name = "magnitude"

    def __init__(self, allocation: str = "uniform", erk_power_scale: float = 1.0, allocation_file: str | None = None,
                 bn_recalibration: bool = False, bn_batch_size: int = 64):
        if allocation not in ALLOCATION_CHOICES:
            raise unknown_choice("allocation", allocation, ALLOCATION_CHOICES)
        if allocation == "from_file" and not allocation_file:
            raise ConfigError("algorithm.allocation=from_file needs algorithm.allocation_file=PATH (an allocation.csv).")
        self.allocation = allocation
        self.erk_power_scale = float(erk_power_scale)
        self.allocation_file = allocation_file
        self.bn_recalibration = bool(bn_recalibration)
        self.bn_batch_size = int(bn_batch_size)

    def options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {"allocation": self.allocation, "bn_recalibration": self.bn_recalibration}
        if self.allocation == "erk":
            opts["erk_power_scale"] = self.erk_power_scale
        if self.allocation == "from_file":
            opts["allocation_file"] = str(self.allocation_file)
        return opts

    @property
    def label(self) -> str:
        alloc = self.allocation if self.allocation != "erk" or self.erk_power_scale == 1.0 else f"erk{self.erk_power_scale:g}"
        return f"magnitude-{alloc}" + ("+bn" if self.bn_recalibration else "")

    def validate(self, layers: list[PrunableLayer], target: float) -> None:
        if self.allocation == "from_file":
            read_allocation_file(self.allocation_file, layers, target)

    def prune(self, model: nn.Module, layers: list[PrunableLayer], target: float, ctx: PruneContext) -> PruneResult:
        # 1. Allocation: how many weights each layer loses.
        if self.allocation == "from_file":
            counts = counts_from_rates(layers, read_allocation_file(self.allocation_file, layers, target))
        else:
            counts = allocate(layers, target, self.allocation, self.erk_power_scale)
        # 2. Masks: the smallest magnitudes of each layer.
        masks = magnitude_masks(layers, counts)
        apply_masks(layers, masks)
        # 3. Optional BatchNorm re-estimation on the calibration images.
        bn_layers = 0
        if self.bn_recalibration:
            bn_layers = recalibrate_batchnorm(model, ctx.calib, ctx.device, self.bn_batch_size)
        bake_masks(model)
        stats = {"bn_layers_recalibrated": bn_layers, "calib_passes": int(self.bn_recalibration)}
        return PruneResult(model=model, allocation=rates(layers, counts), masks=masks, stats=stats)
